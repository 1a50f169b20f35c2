"""The proxy process's heap and Python's garbage collector: freeze what start-up left, time the pauses.

LiteLLM's proxy holds 800,000 to 860,000 objects once it has started (its modules, the price map,
the router, FastAPI's routes), and every full (generation-2) garbage collection walks all of them
while the event loop stands still: 0.16 to 0.9 s each on a 2-core VM, several a minute under load
(``bench/RESULTS.md``). Each such pause lands on every request in flight, and a Redis reply that
arrives during one is read late.

:func:`freeze_once` runs a few seconds after the plugin loads (``Runtime.start_soon``, on the
proxy's loop: it has started by then, and most often no request is in flight), or on the first LLM
request the pre-call hook sees if that comes first: one ``gc.collect()``, so start-up's garbage
is not kept, then ``gc.freeze()``, which moves every object alive at that moment out of the
collector's walk. Objects made later are collected as before; the frozen ones are still freed
by reference counting, and only a frozen object that later becomes part of an unreachable cycle
is never freed (a bounded leak, the trade-off vLLM's API server and others make the same way).
Measured in the proxy: full collections went from 0.3-0.9 s to 11-26 ms. Whatever runs then pays
the one collection. Off with ``CREDITS_GC_FREEZE=false``.

:func:`watch_pauses` times every collection, and :func:`record_pauses` (on each request, each
scrape of the plugin's metrics route and each gauge sample, every ``metrics.sample_seconds``) puts
them into ``litellm_credits_gc_pause_seconds`` by generation (``prometheus_client`` counts
collections, not how long they stop the process), so a tail of slow requests can be told from a
slow ledger.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import deque
from typing import Any

from . import metrics

log = logging.getLogger("litellm_credits.heap")

_lock = threading.Lock()
_frozen = False
_watching = False
_started: list[float] = [0.0]  # when the running collection started (perf_counter)
# (generation, seconds) of collections not yet in the histogram; bounded, should nobody read it
_pending: deque[tuple[int, float]] = deque(maxlen=10_000)


def frozen() -> bool:
    """Whether :func:`freeze_once` has run in this process."""
    return _frozen


def freeze_once() -> bool:
    """Collect, then freeze the heap, once per process; True if this call did it."""
    global _frozen
    if _frozen:  # every request asks: no lock once done
        return False
    with _lock:
        if _frozen:
            return False
        _frozen = True
        began = time.perf_counter()
        collected = gc.collect()
        gc.freeze()
        log.info(
            "litellm-credits: froze %d start-up objects out of the garbage collector's walk "
            "(collected %d first, in %.0f ms; CREDITS_GC_FREEZE=false turns this off)",
            gc.get_freeze_count(),
            collected,
            (time.perf_counter() - began) * 1000,
        )
        return True


def _timed(phase: str, info: dict[str, Any]) -> None:
    """A ``gc.callbacks`` entry: the time between a collection's start and its stop, queued.

    Only queued: a collection can start at any allocation, also while this thread holds one of
    ``prometheus_client``'s locks (they are not reentrant; in multiprocess mode one lock guards
    every value), so observing the histogram here could deadlock the thread on itself. One
    collection runs at a time in a process (the collector is not reentrant), so one start slot
    serves every thread."""
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _pending.append((info["generation"], time.perf_counter() - _started[0]))


def record_pauses() -> None:
    """Move the collections timed since the last call into ``litellm_credits_gc_pause_seconds``
    (outside any collection): on each request, before each scrape of the plugin's route, and with
    each sample of the gauges."""
    while _pending:
        try:
            generation, seconds = _pending.popleft()
        except IndexError:  # another thread took the last one
            return
        metrics.GC_PAUSE_SECONDS.labels(generation=str(generation)).observe(seconds)


def watch_pauses() -> None:
    """Time every garbage collection of this process into ``litellm_credits_gc_pause_seconds``."""
    global _watching
    with _lock:
        if not _watching:
            gc.callbacks.append(_timed)
            # a forked worker reports its own collections, not its parent's queued ones
            os.register_at_fork(after_in_child=_pending.clear)
            _watching = True


__all__ = ["freeze_once", "frozen", "record_pauses", "watch_pauses"]
