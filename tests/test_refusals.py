"""Refusals: their OpenAI and Anthropic shapes, and the filter that keeps LiteLLM from logging
a refusal the plugin has already logged."""

from __future__ import annotations

import json
import logging

import pytest

from litellm_credits.errors import (
    AuthenticationError,
    InsufficientCredits,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
)
from litellm_credits.refusals import (
    LITELLM_PROXY_LOGGER,
    QuietRefusals,
    anthropic_body,
    quiet_litellm_logs,
    refuse,
    to_proxy_exception,
)


@pytest.mark.parametrize(
    ("err", "anthropic_type"),
    [
        (InvalidRequest("bad"), "invalid_request_error"),
        (AuthenticationError("who"), "authentication_error"),
        (InsufficientCredits("poor", balance="0.000000"), "billing_error"),
        (PermissionDenied("no"), "permission_error"),
        (ModelNotFound("where", param="model"), "not_found_error"),
        (RateLimited("slow down", retry_after=3), "rate_limit_error"),
        (ServiceUnavailable("later"), "api_error"),
    ],
)
def test_anthropic_shape_has_anthropic_type_and_ours(err, anthropic_type: str) -> None:  # type: ignore[no-untyped-def]
    body = anthropic_body(err)
    assert body["type"] == "error"
    assert (body["error"]["type"], body["error"]["credits_type"]) == (anthropic_type, err.type)
    assert body["error"]["message"] == err.message
    exc = to_proxy_exception(err, anthropic=True)
    assert json.loads(exc.message) == body and exc.code == str(err.status)
    assert exc.provider_specific_fields is None  # the details are inside the body already
    assert exc.headers == err.headers


def test_openai_shape_is_unchanged() -> None:
    exc = to_proxy_exception(RateLimited("slow down", retry_after=2.5))
    assert exc.to_dict() == {
        "message": "slow down",
        "type": "rate_limited",
        "param": None,
        "code": "429",
        "details": {"retry_after": 3},
    }
    assert exc.headers == {"Retry-After": "3"}


def _litellm_record(level: int, exc: BaseException, *, exc_info: bool = False) -> logging.LogRecord:
    """A record as LiteLLM's log_llm_api_exception makes it (common_request_processing.py)."""
    return logging.LogRecord(
        LITELLM_PROXY_LOGGER,
        level,
        "common_request_processing.py",
        1687,
        "litellm.proxy.proxy_server._handle_llm_api_exception(): Exception occured - litellm_call_id=%s - %s",
        ("call-1", exc),
        (type(exc), exc, None) if exc_info else None,
    )


def test_litellm_lines_about_a_logged_refusal_are_dropped() -> None:
    quiet = QuietRefusals()
    logged = refuse(InsufficientCredits("poor"))
    assert not quiet.filter(_litellm_record(logging.ERROR, logged))
    assert not quiet.filter(_litellm_record(logging.ERROR, logged, exc_info=True))  # with a traceback
    assert quiet.filter(_litellm_record(logging.DEBUG, logged))  # --detailed_debug keeps everything
    # the plugin's other exceptions (a bad key from custom_auth) are LiteLLM's to log
    assert quiet.filter(_litellm_record(logging.ERROR, to_proxy_exception(AuthenticationError("who"))))
    assert quiet.filter(_litellm_record(logging.ERROR, RuntimeError("upstream")))


def test_the_filter_goes_first_on_litellms_proxy_logger_once() -> None:
    logger = logging.getLogger(LITELLM_PROXY_LOGGER)
    quiet_litellm_logs()
    quiet_litellm_logs()
    ours = [f for f in logger.filters if isinstance(f, QuietRefusals)]
    assert len(ours) == 1 and logger.filters[0] is ours[0]
