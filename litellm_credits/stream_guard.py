"""Streams stop at their hold: count what a stream delivers, and end it before it costs more.

A provider may ignore ``max_tokens``, or a stream may run past what the account can pay for. The
guard sits on the chunks the proxy sends the client (LiteLLM's
``async_post_call_streaming_iterator_hook``) and counts each chunk's output tokens with the
model's tokenizer (content, reasoning and tool-call arguments; a provider's own usage figure
replaces the count when a chunk carries one). Before a chunk would take the cost of what was
delivered past the hold, the stream ends as a normal end does: a chunk with
``finish_reason: "length"`` for every choice, a usage chunk when the client asked for one
(``stream_options.include_usage``), then ``[DONE]``. The chunk that would have passed the hold is
not sent, so the charge, settled from what was delivered, never exceeds the hold; it may differ
from the provider's own count by the tokenizer's error on that text (documented as "± one chunk").
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .claims import HoldClaim
from .estimate import Estimate
from .litellm_objects import field as read

log = logging.getLogger("litellm_credits.stream_guard")

TokenCounter = Callable[..., int]
# how much of the delivered text a new chunk is counted after (tokens do not span further)
TAIL_CHARACTERS = 64


def chunk_text(chunk: Any) -> str:
    """The output text of a chat completion chunk: every choice's content, reasoning and tool
    call arguments."""
    parts: list[str] = []
    for choice in read(chunk, "choices") or ():
        delta = read(choice, "delta") or read(choice, "text")
        if isinstance(delta, str):  # a text completion chunk
            parts.append(delta)
            continue
        for name in ("content", "reasoning_content"):
            value = read(delta, name)
            if isinstance(value, str):
                parts.append(value)
        for call in read(delta, "tool_calls") or ():
            arguments = read(read(call, "function"), "arguments")
            if isinstance(arguments, str):
                parts.append(arguments)
        arguments = read(read(delta, "function_call"), "arguments")
        if isinstance(arguments, str):
            parts.append(arguments)
    return "".join(parts)


async def _close(stream: Any) -> None:
    """Close an upstream stream we stopped reading; LiteLLM closes it again later, harmlessly."""
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:  # a stream that fails to close is not the client's problem
        log.debug("litellm-credits: closing a cut stream failed", exc_info=True)


@dataclass
class Delivered:
    """What a guarded stream delivered: output tokens (counted or reported), the provider's own
    prompt count if it gave one, and whether the guard cut the stream."""

    completion_tokens: int = 0
    prompt_tokens: int | None = None
    cut: bool = False
    choices: set[int] = field(default_factory=set)


class StreamGuard:
    """Passes a stream's chunks through until the next one would cost more than the hold."""

    def __init__(self, claim: HoldClaim, *, model: str, include_usage: bool, counter: TokenCounter) -> None:
        self.claim = claim
        self.model = model
        self.include_usage = include_usage
        self.counter = counter
        # output tokens the hold pays for after the prompt, in all choices together
        self.budget = Estimate(
            usd=claim.prompt_usd,
            prompt_tokens=claim.prompt_tokens,
            prompt_usd=claim.prompt_usd,
            output_usd=claim.output_usd,
            output_tokens=2**62,
        ).covered_output_tokens(claim.held, claim.rate)
        self.delivered = Delivered()
        self._tail = ""  # the end of the delivered text, where the next chunk's tokens may join

    def _count(self, text: str) -> int:
        try:
            return int(self.counter(model=self.model, text=text)) if text else 0
        except Exception:  # an unknown tokenizer: a character a token errs on the safe side
            return len(text)

    def _tokens(self, text: str) -> int:
        """The tokens ``text`` adds to what was delivered: a chunk alone would count too many
        where tokens join across chunks (" word" is one token, " " and "word" two), so the
        chunk is counted after the delivered text's last characters, less what they count."""
        if not text:
            return 0
        return max(self._count(self._tail + text) - self._count(self._tail), 0)

    async def guard(self, stream: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
        """The chunks of ``stream``, ended cleanly at the hold."""
        delivered = self.delivered
        async for chunk in stream:
            for choice in read(chunk, "choices") or ():
                index = read(choice, "index")
                delivered.choices.add(index if isinstance(index, int) else 0)
            text = chunk_text(chunk)
            usage = read(chunk, "usage")
            reported = read(usage, "completion_tokens") if usage is not None else None
            if isinstance(reported, int) and reported > 0:
                # the provider's count of everything so far: it replaces ours
                prompt = read(usage, "prompt_tokens")
                delivered.prompt_tokens = prompt if isinstance(prompt, int) else delivered.prompt_tokens
                total = reported
            else:
                total = delivered.completion_tokens + self._tokens(text)
            if total > self.budget and text:
                delivered.cut = True
                log.info(
                    "litellm-credits: stream of hold %s ended at its hold (%d output tokens)",
                    self.claim.hold_id,
                    delivered.completion_tokens,
                )
                try:
                    for final in self.endings(chunk):
                        yield final
                finally:
                    await _close(stream)  # the provider stops writing (and billing) now
                return
            delivered.completion_tokens = total
            self._tail = (self._tail + text)[-TAIL_CHARACTERS:]
            yield chunk

    def endings(self, last: Any) -> list[Any]:
        """The chunks that end a cut stream like a normal end: ``finish_reason: "length"`` for
        every choice, then the usage chunk when the client asked for usage."""
        from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices, Usage

        ident = str(read(last, "id") or f"chatcmpl-{self.claim.hold_id.hex}")
        created = int(read(last, "created") or time.time())
        model = str(read(last, "model") or self.model)
        indexes = sorted(self.delivered.choices) or [0]
        finish = ModelResponseStream(
            id=ident,
            created=created,
            model=model,
            choices=[StreamingChoices(index=i, delta=Delta(), finish_reason="length") for i in indexes],
        )
        if not self.include_usage:
            return [finish]
        prompt = self.delivered.prompt_tokens or self.claim.prompt_tokens
        completion = self.delivered.completion_tokens
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        return [finish, ModelResponseStream(id=ident, created=created, model=model, choices=[], usage=usage)]


__all__ = ["Delivered", "StreamGuard", "chunk_text"]
