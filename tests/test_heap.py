"""Freezing start-up's heap (soon after start-up, or on the first request), and timing the garbage
collector's pauses."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import openai
import pytest
from prometheus_client import REGISTRY

from litellm_credits import heap, metrics
from litellm_credits import runtime as runtime_module
from litellm_credits.hooks import CreditsHandler
from litellm_credits.runtime import Runtime
from litellm_credits.settings import CreditsConfig, Settings

from .conftest import Proxy

PRICES = {"models": {"house": {"input_cost_per_token": "0.000001", "output_cost_per_token": "0.000002"}}}


@pytest.fixture
def unfrozen(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process not frozen yet; the test process's heap is unfrozen again afterwards."""
    monkeypatch.setattr(heap, "_frozen", False)
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()


def test_the_heap_is_frozen_once(unfrozen: None) -> None:
    alive = [object() for _ in range(10)]
    assert gc.get_freeze_count() == 0 and not heap.frozen()
    assert heap.freeze_once() is True
    assert heap.frozen()
    frozen = gc.get_freeze_count()
    assert frozen >= len(alive)  # everything alive then, these included
    more = [[] for _ in range(1000)]  # made later: collected as before, not frozen
    assert heap.freeze_once() is False
    # nothing frozen again (the count may fall: a frozen object freed by its reference count, by
    # another thread of this process meanwhile, leaves the permanent generation)
    assert gc.get_freeze_count() <= frozen
    tracked = {id(o) for o in gc.get_objects()}  # (the frozen are not in it)
    assert all(id(o) in tracked for o in more)


def test_garbage_is_collected_before_the_freeze(unfrozen: None) -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    gc.disable()  # no collection between making the garbage and the freeze but freeze_once's
    try:
        Cycle()  # unreachable at once, freed only by a collection
        garbage = [o for o in gc.get_objects() if isinstance(o, Cycle)]
        assert len(garbage) == 1
        del garbage
        heap.freeze_once()
    finally:
        gc.enable()
    gc.unfreeze()  # (get_objects does not look at the frozen)
    # the cycle was collected, not frozen for ever
    assert not [o for o in gc.get_objects() if isinstance(o, Cycle)]


def _pauses(generation: str) -> float:
    count = REGISTRY.get_sample_value("litellm_credits_gc_pause_seconds_count", {"generation": generation})
    return count or 0.0


def test_collections_are_timed_by_generation() -> None:
    heap.watch_pauses()
    heap.watch_pauses()  # once, however often asked
    assert gc.callbacks.count(heap._timed) == 1
    heap.record_pauses()
    before = _pauses("2"), _pauses("0")
    gc.collect()
    gc.collect(0)
    heap.record_pauses()
    # (at least: an automatic collection may run between the two reads)
    assert _pauses("2") >= before[0] + 1
    assert _pauses("0") >= before[1] + 1
    total = REGISTRY.get_sample_value("litellm_credits_gc_pause_seconds_sum", {"generation": "2"})
    assert total is not None and total > 0


def test_a_collection_while_a_metric_lock_is_held_does_not_deadlock() -> None:
    """prometheus_client's locks are not reentrant: a collection that starts while this thread
    holds one (here the pause histogram's own) must not wait for it in the callback."""
    heap.watch_pauses()
    child = metrics.GC_PAUSE_SECONDS.labels(generation="2")
    # a value's lock (one for every value in multiprocess mode), and the parent's, which a scrape
    # holds while it copies the children and labels() while it makes one
    for lock in (child._sum._lock, metrics.GC_PAUSE_SECONDS._lock):  # type: ignore[attr-defined]

        def collect_under(lock: threading.Lock = lock) -> None:
            with lock:
                gc.collect()

        worker = threading.Thread(target=collect_under, daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "the garbage collector's callback deadlocked on a metric's lock"
    before = _pauses("2")
    heap.record_pauses()
    assert _pauses("2") >= before + 1


@pytest.fixture(params=[True, False], ids=["gc_freeze", "no_gc_freeze"])
async def handler(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[CreditsHandler]:
    credits = CreditsConfig.model_validate(PRICES)
    rt = Runtime(settings.model_copy(update={"credits": credits, "gc_freeze": request.param}))
    yield CreditsHandler(rt, deployments=lambda group: [])
    await rt.close()


async def test_the_first_request_freezes_unless_turned_off(unfrozen: None, handler: CreditsHandler) -> None:
    ledger = await handler.runtime.ledger()
    await ledger.create_account("heap-" + str(id(handler)), tier="free")
    await ledger.credit("heap-" + str(id(handler)), 10_000_000)
    auth = SimpleNamespace(user_id="heap-" + str(id(handler)), team_id=None, end_user_id=None, token="t",
                           user_role="internal_user")  # fmt: skip
    data = {"model": "house", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    out = await handler.async_pre_call_hook(auth, None, data, "acompletion")
    claim = handler._claim(out)
    assert claim is not None
    await ledger.void(claim.subject_id, claim.hold_id)
    on = handler.runtime.settings.gc_freeze
    assert heap.frozen() is on
    assert (gc.get_freeze_count() > 0) is on


@pytest.mark.parametrize("on", [True, False], ids=["gc_freeze", "no_gc_freeze"])
async def test_the_heap_is_frozen_soon_after_start_up_without_a_request(
    unfrozen: None, settings: Settings, monkeypatch: pytest.MonkeyPatch, on: bool
) -> None:
    """The proxy's start-up (``Runtime.start_soon``, on its loop) freezes the heap a few seconds
    on, so the first request does not pay the full collection; not with CREDITS_GC_FREEZE=false."""
    monkeypatch.setattr(runtime_module, "FREEZE_AFTER_SECONDS", 0.05)
    rt = Runtime(settings.model_copy(update={"gc_freeze": on}))
    try:
        rt.start_soon()
        assert not heap.frozen()  # (not at once: the proxy is still starting)
        await asyncio.sleep(0.5)
        assert heap.frozen() is on
        assert (gc.get_freeze_count() > 0) is on
    finally:
        await rt.close()


def test_the_proxy_freezes_on_its_first_request_and_times_collections(proxy: Proxy) -> None:
    _, key = proxy.create_account("1")
    openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0).chat.completions.create(
        model="fake-custom", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert "froze" in proxy.log_path.read_text() and "start-up objects" in proxy.log_path.read_text()
    with proxy.admin() as c:
        text = c.get("/api/v1/admin/credits/metrics").text
    assert 'litellm_credits_gc_pause_seconds_count{generation="0"}' in text
    assert 'litellm_credits_gc_pause_seconds_bucket{generation="2",le="0.5"}' in text
