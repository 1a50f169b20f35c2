"""Calls priced by the unit: images held at the map's price for their size, quality and count,
transcriptions by their audio's duration, and calls nothing bounds refused (or held at the
operator's fixed amount)."""

from __future__ import annotations

import io
import struct
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import litellm
import numpy as np
import openai
import pytest
import soundfile
from litellm.cost_calculator import default_image_cost_calculator
from litellm.proxy._types import ProxyException

from litellm_credits.hooks import CreditsHandler
from litellm_credits.ledger import Ledger
from litellm_credits.money import micro_ceil
from litellm_credits.money import parse_credits as c
from litellm_credits.runtime import Runtime
from litellm_credits.settings import CreditsConfig, Settings
from litellm_credits.unit_prices import ImagePrices, audio_seconds, normalize_size

from .conftest import Proxy
from .test_proxy import settled

D = Decimal


def audio(seconds: float, fmt: str, subtype: str, rate: int = 8000) -> bytes:
    samples = np.random.default_rng(7).uniform(-0.3, 0.3, int(rate * seconds)).astype("float32")
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")]
)
def test_audio_duration_from_the_header(fmt: str, subtype: str) -> None:
    data = audio(12.3, fmt, subtype)
    # 12.3 s, held as 13 (14 for Ogg Vorbis, whose nominal bitrate is above what it used)
    seconds = audio_seconds(data)
    assert seconds is not None and 13 <= seconds <= 14
    stream = io.BytesIO(data)
    stream.seek(5)
    assert audio_seconds(stream) == seconds
    assert stream.tell() == 5  # the upload is left as it was found
    assert audio_seconds(("a.bin", data, "audio/x")) == seconds


def test_a_header_that_understates_its_audio_is_not_believed() -> None:
    """Found in review: a WAV whose data chunk claims one second for a minute of audio was held
    for one second (the provider bills the minute). Its size at its stated bitrate bounds it."""
    rate = 8000
    header = (
        b"RIFF"
        + struct.pack("<I", 36 + rate * 2)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", rate * 2)  # one second, it says
    )
    assert audio_seconds(header + b"\x00\x00" * rate * 60) == 61


@pytest.mark.parametrize("junk", [b"", b"not audio" * 100, b"RIFF\x00\x00", None, "a/path.wav", 12])
def test_unreadable_audio_has_no_duration(junk: Any) -> None:
    assert audio_seconds(junk) is None


def test_image_prices_follow_litellms_lookup() -> None:
    images = ImagePrices(litellm.model_cost)
    for model, provider, size, quality in [
        ("gpt-image-1", "openai", "1024x1024", "high"),
        ("openai/gpt-image-1", "openai", "1024x1536", "low"),
        ("fal_ai/openai/gpt-image-2", "fal_ai", "1920x1080", "medium"),
        ("aiml/flux-pro", "aiml", "1024x1024", None),
        ("azure/gpt-image-1", "azure", "1024x1024", "medium"),
    ]:
        theirs = default_image_cost_calculator(
            model=model, custom_llm_provider=provider, quality=quality, n=3, size=size
        )
        ours = images.price(model, provider, size=size, quality=quality)
        assert ours is not None
        assert abs(float(ours * 3) - theirs) < 1e-9, model


def test_an_open_size_or_quality_is_held_at_the_dearest() -> None:
    images = ImagePrices(litellm.model_cost)
    listed = [
        images.one("gpt-image-1", "openai", s, q)
        for s in ("1024-x-1024", "1024-x-1536", "1536-x-1024")
        for q in ("low", "medium", "high")
    ]
    assert images.price("gpt-image-1", "openai") == max(p for p in listed if p is not None)
    assert images.price("gpt-image-1", "openai", size="1024x1024", quality="auto") == images.one(
        "gpt-image-1", "openai", "1024-x-1024", "high"
    )
    assert normalize_size("auto") is None and normalize_size("1024x1536") == "1024-x-1536"
    assert images.price("no-such-image-model", "openai") is None


# --- through the proxy ----------------------------------------------------------------------------


def images_client(proxy: Proxy, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=60)


async def test_an_image_is_held_and_charged_at_its_size_and_quality(proxy: Proxy, ledger: Ledger) -> None:
    user, key = proxy.create_account("1000")
    per_image = D(repr(litellm.model_cost["high/1024-x-1536/gpt-image-1"]["input_cost_per_image"]))
    with images_client(proxy, key) as oa:
        reply = oa.images.generate(model="fake-image", prompt="a cat", n=2, size="1024x1536", quality="high")
    assert len(reply.data or []) == 2
    await settled(ledger, user, 1)
    [hold] = await ledger.pool.fetch("SELECT amount FROM credits.holds WHERE subject_id = $1", user)
    assert hold["amount"] == micro_ceil(per_image * 2 * 1000)  # size × quality × n, from the map
    assert (await ledger.require_account(user)).balance == c("1000") - hold["amount"]


def test_an_image_the_balance_cannot_pay_is_refused(proxy: Proxy) -> None:
    _, key = proxy.create_account("100")  # one high 1024x1536 image is 250 credits
    with images_client(proxy, key) as oa, pytest.raises(openai.APIStatusError) as err:
        oa.images.generate(model="fake-image", prompt="a cat", size="1024x1536", quality="high")
    assert err.value.status_code == 402
    body: Any = err.value.body
    assert body["type"] == "insufficient_credits"
    # LiteLLM's image route re-raises a refusal without its details: the message keeps the figures
    assert body["message"].startswith("insufficient credits: 250.000000 required")


async def test_a_transcription_is_held_by_its_audio(proxy: Proxy, ledger: Ledger) -> None:
    user, key = proxy.create_account("10")
    data = audio(20.4, "WAV", "PCM_16")
    with images_client(proxy, key) as oa:
        reply = oa.audio.transcriptions.create(model="fake-whisper", file=("talk.wav", data, "audio/wav"))
    assert reply.text
    await settled(ledger, user, 1)
    [hold] = await ledger.pool.fetch("SELECT amount FROM credits.holds WHERE subject_id = $1", user)
    assert hold["amount"] == micro_ceil(21 * D("0.0001") * 1000)  # 21 s at whisper-1's price
    charged = c("10") - (await ledger.require_account(user)).balance
    assert 0 < charged <= hold["amount"]  # LiteLLM measured 20.4 s


def test_a_call_nothing_bounds_is_refused(proxy: Proxy) -> None:
    _, key = proxy.create_account("100")
    with images_client(proxy, key) as oa, pytest.raises(openai.APIStatusError) as err:
        oa.audio.speech.create(model="fake-tts-seconds", voice="alloy", input="hello")
    assert err.value.status_code == 400
    assert err.value.body["type"] == "cost_not_bounded"  # type: ignore[index]


# the same, with the operator's fixed hold; and a transcription with no readable duration


@pytest.fixture(scope="module")
async def handler(settings: Settings) -> Any:
    cfg = {
        "credits_per_usd": 1000,
        "unbounded_hold": "2.5",
        "max_audio_seconds": 600,
        "models": {
            "tts-seconds": {"output_cost_per_second": "0.001"},
            "whisper-house": {"input_cost_per_second": "0.0001"},
        },
    }
    rt = Runtime(settings.model_copy(update={"credits": CreditsConfig.model_validate(cfg)}))
    yield CreditsHandler(rt, deployments=lambda group: [])
    await rt.close()


def auth(user: str) -> Any:
    return SimpleNamespace(user_id=user, team_id=None, end_user_id=None, token="h", user_role="internal_user")


async def test_unbounded_calls_take_the_fixed_hold_when_allowed(handler: CreditsHandler) -> None:
    ledger: Ledger = await handler.runtime.ledger()
    await ledger.create_account("fixed-hold", tier="free", exist_ok=True)
    await ledger.credit("fixed-hold", c("10"))
    await handler.async_pre_call_hook(
        auth("fixed-hold"), None, {"model": "tts-seconds", "input": "hi"}, "aspeech"
    )
    assert (await ledger.require_account("fixed-hold")).held == c("2.5")


async def test_a_transcription_without_a_readable_duration_holds_the_maximum(handler: CreditsHandler) -> None:
    ledger: Ledger = await handler.runtime.ledger()
    await ledger.create_account("max-audio", tier="free", exist_ok=True)
    await ledger.credit("max-audio", c("100"))
    upload = io.BytesIO(b"not audio at all")
    await handler.async_pre_call_hook(
        auth("max-audio"), None, {"model": "whisper-house", "file": upload}, "atranscription"
    )
    assert (await ledger.require_account("max-audio")).held == c("60")  # 600 s × 0.0001 USD × 1000
    with pytest.raises(ProxyException) as err:
        await handler.async_pre_call_hook(
            auth("max-audio"), None, {"model": "whisper-house", "file": io.BytesIO(b"x")}, "atranscription"
        )
    assert err.value.type == "insufficient_credits"


async def test_a_transcription_with_no_measured_duration_is_charged_its_header(
    handler: CreditsHandler,
) -> None:
    """Found in review: when LiteLLM reports no duration (a format its soundfile cannot read),
    the settlement charged 0 seconds: the audio's header's, as held, are charged instead; and a
    model priced per second of output only is charged that rate, as LiteLLM charges it."""
    from datetime import datetime, timezone

    ledger: Ledger = await handler.runtime.ledger()
    await ledger.create_account("no-duration", tier="free", exist_ok=True)
    await ledger.credit("no-duration", c("100"))
    data = await handler.async_pre_call_hook(
        auth("no-duration"),
        None,
        {"model": "whisper-house", "file": io.BytesIO(audio(9.2, "WAV", "PCM_16"))},
        "atranscription",
    )
    kwargs = {
        "litellm_params": {"metadata": data["metadata"], "model_info": {}},
        "standard_logging_object": {"model_group": "whisper-house"},
        "model": "whisper-house",
    }
    now = datetime.now(timezone.utc)
    await handler.async_log_success_event(kwargs, {"text": "hi"}, now, now)
    account = await ledger.require_account("no-duration")
    assert (account.balance, account.held) == (c("100") - c("1"), 0)  # 10 s × 0.0001 USD × 1000
    from litellm_credits.pricing import ModelPrice, audio_second_rate, transcription_usage, usd_cost

    soniox = ModelPrice(output_cost_per_second=D("0.0002"))
    assert audio_second_rate(soniox) == D("0.0002")
    assert usd_cost(soniox, transcription_usage(soniox, D(10))) == D("0.002")
    both = ModelPrice(input_cost_per_second=D("0.0001"), output_cost_per_second=D("0.0003"))
    assert usd_cost(both, transcription_usage(both, D(10))) == D("0.003")  # one rate, not both
