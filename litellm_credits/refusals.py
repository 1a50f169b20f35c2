"""How a refusal reaches the client, and the log.

A :class:`~litellm_credits.errors.CreditsError` becomes a LiteLLM ``ProxyException``: OpenAI's
error shape on every route, and Anthropic's on ``/v1/messages``::

    {"type": "error", "error": {"type": "billing_error", "message": "insufficient credits: ...",
                                "credits_type": "insufficient_credits", "details": {...}}}

LiteLLM's ``/v1/messages`` route renders a ``ProxyException`` itself, typed by status code
(``api_error`` for any status its table lacks, 402 included), but passes a message that already is
an Anthropic error body through unchanged (``AnthropicExceptionMapping.transform_to_anthropic_error``):
that message is how the plugin chooses the type there.

The pre-call hook logs each refusal once (:func:`refuse`, one line); :class:`QuietRefusals`, on
LiteLLM's proxy logger, drops LiteLLM's own line about it (``Exception occured ...`` at ERROR).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from litellm.proxy._types import ProxyException

from .errors import CreditsError

log = logging.getLogger("litellm_credits.refusals")

# LiteLLM's logger for the proxy (litellm/_logging.py: verbose_proxy_logger)
LITELLM_PROXY_LOGGER = "LiteLLM Proxy"

# the error types Anthropic's API and clients use, by status (docs.anthropic.com/en/api/errors)
ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    """Anthropic's error type for an HTTP status (other 4xx are invalid requests, 5xx api errors)."""
    return ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_body(err: CreditsError) -> dict[str, Any]:
    """``err`` in Anthropic's error shape; the plugin's own type is ``error.credits_type``."""
    error: dict[str, Any] = {
        "type": anthropic_type(err.status),
        "message": err.message,
        "credits_type": err.type,
    }
    if err.param:
        error["param"] = err.param
    if err.details:
        error["details"] = err.details
    return {"type": "error", "error": error}


class CreditsProxyException(ProxyException):
    """A ``ProxyException`` from a credits error: its details under ``error.details``.

    Built by :func:`to_proxy_exception`; the constructor stays ``ProxyException``'s so that LiteLLM
    can copy it.
    """

    credits_details: Mapping[str, Any] | None = None
    # set once the plugin has logged this refusal: LiteLLM's own log line about it is dropped
    credits_logged: bool = False

    def to_dict(self) -> dict:
        body = super().to_dict()
        body.pop("provider_specific_fields", None)
        if self.credits_details:
            body["details"] = dict(self.credits_details)
        return body


def to_proxy_exception(err: CreditsError, *, anthropic: bool = False) -> CreditsProxyException:
    """The exception that makes the proxy answer with ``err`` (Anthropic's shape when ``anthropic``)."""
    details = err.details or None
    exc = CreditsProxyException(
        message=json.dumps(anthropic_body(err)) if anthropic else err.message,
        type=err.type,
        param=err.param,
        code=err.status,
        # LiteLLM's /v1/messages route shows these beside the error: in that shape the details
        # are already inside it
        provider_specific_fields={"details": details} if details and not anthropic else None,
        headers=dict(err.headers) or None,
    )
    exc.credits_details = details
    return exc


def refuse(
    err: CreditsError,
    *,
    anthropic: bool = False,
    model: Any = None,
    user: Any = None,
    call_id: Any = None,
    cause: str | None = None,
) -> CreditsProxyException:
    """The exception the pre-call hook raises for ``err``, logged here in one line (WARNING for a
    refusal, ERROR for a 5xx); LiteLLM's own log line about it is dropped by :class:`QuietRefusals`.
    """
    level = logging.ERROR if err.status >= 500 else logging.WARNING
    log.log(
        level,
        "litellm-credits: refused %s %s (model %r, user %r, call %s): %s%s",
        err.status,
        err.type,
        model,
        user,
        call_id,
        err.message,
        f" ({cause})" if cause else "",
    )
    exc = to_proxy_exception(err, anthropic=anthropic)
    exc.credits_logged = True
    return exc


def _exceptions(record: logging.LogRecord) -> Iterator[BaseException]:
    """The exceptions a log record carries: its ``exc_info`` and any of its arguments."""
    if isinstance(record.exc_info, tuple) and isinstance(record.exc_info[1], BaseException):
        yield record.exc_info[1]
    args = record.args
    values = args.values() if isinstance(args, Mapping) else args if isinstance(args, tuple) else ()
    yield from (v for v in values if isinstance(v, BaseException))


class QuietRefusals(logging.Filter):
    """Drops LiteLLM's records (INFO and above) about a refusal the plugin has already logged.

    LiteLLM logs every exception from a pre-call hook (``_handle_llm_api_exception(): Exception
    occured - ...``), at ERROR, with a traceback when ``litellm.log_client_error_tracebacks`` is
    set. DEBUG records are kept: whoever runs ``--detailed_debug`` asked for everything.
    """

    credits_quiet_refusals = True  # marks the filter across module copies

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return True
        return not any(getattr(exc, "credits_logged", False) is True for exc in _exceptions(record))


def quiet_litellm_logs() -> None:
    """Install :class:`QuietRefusals` on LiteLLM's proxy logger, once per process."""
    logger = logging.getLogger(LITELLM_PROXY_LOGGER)
    if any(getattr(f, "credits_quiet_refusals", False) for f in logger.filters):
        return
    # first in line: LiteLLM's own filter on this logger may render the message and drop its
    # arguments, the exception among them
    logger.filters.insert(0, QuietRefusals())


__all__ = [
    "ANTHROPIC_TYPES",
    "CreditsProxyException",
    "QuietRefusals",
    "anthropic_body",
    "anthropic_type",
    "quiet_litellm_logs",
    "refuse",
    "to_proxy_exception",
]
