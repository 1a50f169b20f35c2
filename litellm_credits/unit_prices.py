"""Prices of calls billed by the unit, bounded before the call: an image by its model, size,
quality and count; a transcription by the duration its audio file's header states.

Images follow LiteLLM's own lookup (``cost_calculator.default_image_cost_calculator``): the price
map keeps a price per image (or per pixel) under names such as ``high/1024-x-1024/gpt-image-1``
or ``fal_ai/low/1024-x-768/openai/gpt-image-2``. A request that leaves the size or the quality to
the provider is held at the dearest one the map lists for the model.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from .money import to_decimal

log = logging.getLogger("litellm_credits.unit_prices")

_SIZE = re.compile(r"^(\d{1,5})-x-(\d{1,5})$")
# the qualities image models are priced under in the map (OpenAI's, fal.ai's, DALL·E's)
QUALITIES = ("low", "medium", "high", "standard", "hd", "xhigh", "max", "auto")
DEFAULT_SIZE = "1024-x-1024"


def normalize_size(size: Any) -> str | None:
    """``"1024x1536"`` or ``"1024-x-1536"`` as the map writes it; None for anything else
    (``"auto"``, a typo), which the hold then treats as "any size"."""
    if not isinstance(size, str):
        return None
    text = size.strip().lower()
    if "-x-" not in text:
        text = text.replace("x", "-x-")
    return text if _SIZE.match(text) else None


def _lookup_names(model: str, provider: str | None, size: str, quality: str | None) -> list[str]:
    """The map names LiteLLM tries for an image of ``size`` and ``quality``, in its order."""
    bare = model[len(provider) + 1 :] if provider and model.startswith(provider + "/") else None
    base = f"{provider}/{size}/{bare}" if bare else f"{size}/{model}"
    without_provider = f"{size}/{model.split('/')[-1]}"
    names = [
        f"{quality}/{base}" if quality else base,
        f"{provider}/{quality}/{size}/{bare or model}" if quality and provider else "",
        base,
        f"high/{base}",
        f"{quality}/{without_provider}" if quality else without_provider,
        without_provider,
        model,
        bare or "",
    ]
    return [n for n in names if n]


def _per_image(table: Mapping[str, Any], size: str) -> Decimal | None:
    """A table's price of one image of ``size``: per image, else per pixel."""
    for key in ("input_cost_per_image", "output_cost_per_image"):
        if table.get(key) is not None:
            return to_decimal(table[key])
    if table.get("input_cost_per_pixel") is not None:
        width, height = (int(x) for x in size.split("-x-"))
        return to_decimal(table["input_cost_per_pixel"]) * width * height
    return None


class ImagePrices:
    """Per-image prices from LiteLLM's map (and a deployment's own prices, which come first)."""

    def __init__(self, model_cost: Mapping[str, Mapping[str, Any]]) -> None:
        self.model_cost = model_cost
        self._sizes: dict[str, set[str]] | None = None

    def sizes(self, model: str, provider: str | None) -> tuple[str, ...]:
        """The sizes the map prices images of ``model`` at (the default one when it lists none)."""
        if self._sizes is None:  # built once: model name after the size -> sizes
            index: dict[str, set[str]] = {}
            for name in self.model_cost:
                parts = name.split("/")
                for i, part in enumerate(parts):
                    if _SIZE.match(part) and i + 1 < len(parts):
                        index.setdefault("/".join(parts[i + 1 :]), set()).add(part)
                        break
            self._sizes = index
        bare = model[len(provider) + 1 :] if provider and model.startswith(provider + "/") else model
        found = self._sizes.get(model, set()) | self._sizes.get(bare, set())
        return tuple(sorted(found)) or (DEFAULT_SIZE,)

    def price(
        self,
        model: str,
        provider: str | None,
        *,
        size: Any = None,
        quality: Any = None,
        deployment: Mapping[str, Any] | None = None,
    ) -> Decimal | None:
        """USD for one image of ``size`` and ``quality``, or the dearest of those the map lists
        for the model when either is left to the provider (absent, or "auto"); None when nothing
        prices an image of this model."""
        wanted = normalize_size(size)
        sizes = (wanted,) if wanted else self.sizes(model, provider)
        if isinstance(quality, str) and quality.strip() and quality.strip().lower() != "auto":
            qualities: tuple[str | None, ...] = (quality.strip().lower(),)
        else:
            qualities = (*QUALITIES, None)
        prices = [self.one(model, provider, s, q, deployment) for s in sizes for q in qualities]
        return max((p for p in prices if p is not None), default=None)

    def one(
        self,
        model: str,
        provider: str | None,
        size: str,
        quality: str | None,
        deployment: Mapping[str, Any] | None = None,
    ) -> Decimal | None:
        """LiteLLM's price of one image of exactly this size and quality, or None."""
        match = next((n for n in _lookup_names(model, provider, size, quality) if n in self.model_cost), None)
        for table in (deployment, self.model_cost.get(match) if match else None):
            if table:
                price = _per_image(table, size)
                if price is not None:
                    return price
        return None


def _length(stream: Any) -> float | None:
    """Seconds by the header mutagen recognises (by content, or the upload's file name); bare
    MPEG frames carry no magic bytes, so MP3 is tried last.

    A header is the client's word: a crafted one may state a second for an hour of audio. So the
    length is at least what the file's size lasts at the bitrate its stream header states (a WAV
    whose data chunk understates its data, an MP3 whose Xing frame count does): the larger of
    the two. (A file that states both a short length and a high bitrate can still understate it;
    the settlement then charges what LiteLLM measures, an overrun.)"""
    import mutagen
    from mutagen.mp3 import MP3

    stream.seek(0, io.SEEK_END)
    size = stream.tell()
    for read in (mutagen.File, MP3):  # type: ignore[attr-defined]
        try:
            stream.seek(0)
            info = getattr(read(stream), "info", None)
            length = getattr(info, "length", None)
            bitrate = getattr(info, "bitrate", None)
        except Exception:  # a malformed header: mutagen raises many kinds; it only means "unknown"
            log.debug("litellm-credits: could not read an audio header", exc_info=True)
            continue
        if isinstance(length, int | float) and length > 0:
            lasts = size * 8 / bitrate if isinstance(bitrate, int | float) and bitrate > 0 else 0.0
            return max(float(length), lasts)
    return None


def audio_seconds(file: Any) -> Decimal | None:
    """The duration in seconds that an uploaded audio file's header states (wav, mp3, flac,
    ogg and others mutagen reads), rounded up to the second; None when it cannot tell.
    The file's position is left where it was."""
    if isinstance(file, bytes | bytearray):
        stream: Any = io.BytesIO(file)
    elif isinstance(file, tuple) and len(file) >= 2 and isinstance(file[1], bytes | bytearray):
        stream = io.BytesIO(file[1])  # (name, content[, type]) as the OpenAI SDK's files
    elif hasattr(file, "read") and hasattr(file, "seek"):
        stream = file
    else:
        return None
    try:
        position = stream.tell()
    except (OSError, ValueError):
        return None
    try:
        length = _length(stream)
    finally:
        try:
            stream.seek(position)
        except (OSError, ValueError):
            pass
    if length is None or not 0 < length < 10**7:
        return None
    # rounded up to the second: the hold bounds what LiteLLM then measures itself (soundfile)
    return Decimal(repr(length)).to_integral_value(rounding="ROUND_CEILING")


__all__ = ["DEFAULT_SIZE", "QUALITIES", "ImagePrices", "audio_seconds", "normalize_size"]
