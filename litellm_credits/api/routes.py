"""What every credits route shares: error mapping, security headers, who is calling.

Every route answers errors in the OpenAI shape with a machine-readable ``type``, never a stack
trace or SQL, and sets the security headers below. No input gives a 5xx: a body that is not a
JSON object is refused with a 422 naming ``body``, after the caller is authenticated (a request
without a valid key gets its 401 whatever it sent), and paths under the credits prefixes that no
route serves get a 404 or 405 in the same shape (:func:`add_fallback_routes`).
"""

from __future__ import annotations

import email.message
import json
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from litellm.proxy._types import LitellmUserRoles, ProxyException
from litellm.proxy.auth.user_api_key_auth import user_api_key_auth
from starlette.exceptions import HTTPException  # fastapi's HTTPException is a subclass
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from ..errors import CreditsError, InvalidRequest, PermissionDenied, ServiceUnavailable
from ..history import PeriodError
from ..ledger import INVALID_INPUT_ERRORS, UNAVAILABLE_ERRORS
from ..money import JSONNumber
from ..ratelimit import Rate
from . import schemas

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger("litellm_credits.api")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody} for code in (400, 401, 402, 403, 404, 409, 410, 422, 429, 503)
}


def _error(
    status: int,
    type_: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": str(status)}
    body.update(extra)
    return JSONResponse(status_code=status, content={"error": body}, headers=headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    fields = [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    param = _param(fields[0]["loc"]) if fields else None
    msg = fields[0]["msg"] if fields else "invalid request"
    return _error(422, "validation_error", f"{param or 'request'}: {msg}", param, fields=fields)


def _param(loc: Sequence[str]) -> str | None:
    """The parameter an error location names: ``("query", "end_date", "date")`` is ``end_date``
    (the rest is which member of a union failed), ``("body", "items", "0", "amount")`` is
    ``items.0.amount``, and ``("body",)`` the body as a whole."""
    if not loc:
        return None
    if loc[0] == "body":
        return ".".join(loc[1:]) or "body"
    return loc[1] if len(loc) > 1 else None


def _field_error(param: str, where: str, message: str, kind: str = "value_error") -> JSONResponse:
    fields = [{"loc": [where, param], "msg": message, "type": kind}]
    return _error(422, "validation_error", f"{param}: {message}", param, fields=fields)


# the ``type`` of an HTTP error raised by Starlette or FastAPI themselves, by status
HTTP_ERROR_TYPES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    503: "service_unavailable",
}


def _http_error(exc: HTTPException) -> JSONResponse:
    status = exc.status_code
    type_ = HTTP_ERROR_TYPES.get(status, "invalid_request" if status < 500 else "internal_error")
    message = str(exc.detail or "") or f"HTTP {status}"
    return _error(status, type_, message, headers=dict(exc.headers or {}))


# --- the request body -----------------------------------------------------------------------

BODY_ERROR = "credits_body_error"  # request.state: why the body was refused, raised after auth


class BodyError(ValueError):
    """A body that is not a JSON object; ``kind`` is its error type in ``fields``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def validation_error(self) -> RequestValidationError:
        return RequestValidationError([{"type": self.kind, "loc": ("body",), "msg": self.message}])


def _no_constant(name: str) -> NoReturn:
    raise BodyError("json_invalid", f"{name} is not JSON")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object from UTF-8 bytes, or :class:`BodyError` saying where and why it is not one.

    Stricter than ``json.loads``: no NaN or Infinity, no other encodings; a nesting too deep for
    the parser or a number too long to convert is an error, not a crash.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError("utf8_invalid", f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        # numbers with a fraction or an exponent stay as written, for money.parse_credits to judge
        # (only amounts accept them: any other field refuses a JSONNumber)
        value = json.loads(text, parse_constant=_no_constant, parse_float=JSONNumber)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno} (char {exc.pos})"
        raise BodyError("json_invalid", f"invalid JSON at {where}: {exc.msg}") from None
    except RecursionError:
        raise BodyError("json_too_deep", "the JSON is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python converts
        raise BodyError("json_invalid", f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BodyError("dict_type", f"the body must be a JSON object, not {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "a number"


def _is_json(content_type: str | None) -> bool:
    """FastAPI's test: only these bodies does it parse as JSON (others stay bytes, and fail
    validation as not an object)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    is_json = subtype == "json" or subtype.endswith("+json")
    return message.get_content_maintype() == "application" and is_json


async def _read_body(request: Request) -> None:
    """Parse a JSON body before FastAPI does, keeping a bad one's error for after authentication.

    FastAPI would refuse it before any dependency ran, so before the key is checked.
    """
    if not _is_json(request.headers.get("content-type")):
        return
    raw = await request.body()
    if not raw:
        return
    try:
        parsed: Any = parse_json_object(raw)
    except BodyError as err:
        setattr(request.state, BODY_ERROR, err)
        parsed = {}
    request._json = parsed  # Starlette's cache of request.json(), which FastAPI reads


def _refuse_bad_body(request: Request) -> None:
    err = getattr(request.state, BODY_ERROR, None)
    if err is not None:
        raise err.validation_error()


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
KEY_HEADERS = ("authorization", "x-litellm-api-key", "api-key", "x-api-key")


RATE_LIMIT_EXTRA = "x-credits-rate-limit"
# routes that move money (or guess coupon codes) count against the stricter ``api_charge`` limit
CHARGE_ROUTE: dict[str, Any] = {RATE_LIMIT_EXTRA: "api_charge"}


class CreditsRoute(APIRoute):
    """Maps every error to one JSON shape, adds security headers, refuses cross-site writes."""

    # origins besides the proxy's own that may change state with a browser session (cookie)
    allowed_origins: frozenset[str] = frozenset()
    # the process's runtime, bound by ``bind`` (rate limits need it before the endpoint runs)
    runtime: Runtime | None = None

    @classmethod
    def bind(cls, runtime: Runtime) -> type[CreditsRoute]:
        """This route class with a runtime and its configured allowed origins."""
        origins = frozenset(runtime.settings.credits.allowed_origins)
        return type("BoundCreditsRoute", (cls,), {"runtime": runtime, "allowed_origins": origins})

    @property
    def rate_limit(self) -> str:
        return str((self.openapi_extra or {}).get(RATE_LIMIT_EXTRA, "api"))

    def cross_origin(self, request: Request) -> bool:
        """A state-changing request carried by a browser cookie from a foreign page (CSRF).

        A request with an API key in a header was not sent by a browser on its own: another site
        cannot make a browser add one, so only cookie-authenticated writes are checked.
        """
        if request.method in SAFE_METHODS or "cookie" not in request.headers:
            return False
        if any(request.headers.get(h) for h in KEY_HEADERS):
            return False
        origin = request.headers.get("origin")
        if origin is None:
            return False  # not a browser's cross-site request: browsers send Origin on every POST
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        return origin != own and origin not in self.allowed_origins

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            # LiteLLM's authentication reads a body as an LLM call's parameters, assumes a JSON
            # object and fails with a 500 on any other; a credits body is the plugin's own, so
            # it is shown an empty one (the parsed-body cache it reads first)
            request.scope["parsed_body"] = ((), {})
            try:
                if self.cross_origin(request):
                    raise PermissionDenied(
                        "cross-origin request refused: a browser session cannot change credits from "
                        "another site (send an API key, or add the origin to allowed_origins)"
                    )
                if self.body_field is not None:
                    await _read_body(request)
                response = await original(request)
            except CreditsError as err:
                response = JSONResponse(status_code=err.status, content=err.to_body(), headers=err.headers)
            except RequestValidationError as exc:
                response = _validation_error(exc)
            except PeriodError as exc:
                response = _field_error(exc.param, "query", exc.message)
            except ProxyException as exc:
                status = int(exc.code) if str(exc.code).isdigit() and int(exc.code) >= 400 else 401
                response = _error(
                    status,
                    exc.type or "authentication_error",
                    exc.message,
                    exc.param,
                    headers=dict(getattr(exc, "headers", None) or {}),
                )
            except HTTPException as exc:
                response = _http_error(exc)
            except ClientDisconnect:
                response = _error(400, "invalid_request", "the client closed the connection mid-request")
            except INVALID_INPUT_ERRORS:
                response = _error(400, "invalid_request", "the request breaks a limit of the ledger")
            except UNAVAILABLE_ERRORS as exc:
                log.error(
                    "litellm-credits: ledger unavailable on %s: %s", request.url.path, type(exc).__name__
                )
                unavailable = ServiceUnavailable("the credit ledger is unavailable; try again")
                response = JSONResponse(status_code=unavailable.status, content=unavailable.to_body())
            except Exception:
                log.exception("litellm-credits: unexpected error on %s", request.url.path)
                response = _error(500, "internal_error", "internal error; the operator's logs have details")
            response.headers.update(SECURITY_HEADERS)
            decision = getattr(request.state, "credits_rate", None)
            if decision is not None:
                response.headers["X-RateLimit-Limit"] = str(decision.limit)
                response.headers["X-RateLimit-Remaining"] = str(decision.remaining)
            return response

        return handler


@dataclass(frozen=True)
class Caller:
    subject_id: str | None
    is_admin: bool
    # a backend that charges accounts for services outside the proxy
    is_service: bool = False


async def _identity(request: Request, auth: Annotated[Any, Depends(user_api_key_auth)]) -> Caller:
    """Who is calling (a bad key is a 401 here); counts the request against the account's limit."""
    role = getattr(auth, "user_role", None)
    is_admin = role == LitellmUserRoles.PROXY_ADMIN or str(role) == "proxy_admin"
    subject = auth.user_id if auth.user_id not in (None, "default_user_id") else None
    if subject is None and not is_admin:
        # a LiteLLM team key (no user) is its team's account where teams pay
        route = request.scope.get("route")
        runtime = route.runtime if isinstance(route, CreditsRoute) else None
        if runtime is not None and runtime.settings.credits.subject in ("team", "team_member"):
            subject = getattr(auth, "team_id", None) or None
    credits_role = (getattr(auth, "metadata", None) or {}).get("credits_role")
    caller = Caller(subject_id=subject, is_admin=is_admin, is_service=is_admin or credits_role == "service")
    route = request.scope.get("route")
    if isinstance(route, CreditsRoute) and route.runtime is not None:
        if subject is not None and not caller.is_service:  # services: see limit_account
            await limit_account(route.runtime, route.rate_limit, caller, subject, request)
    return caller


async def limit_account(
    runtime: Runtime, name: str, caller: Caller, account: str, request: Request | None = None
) -> None:
    """Count one request against the account's ``name`` limit; 429 ``rate_limited`` when spent.
    Admins are never limited."""
    if caller.is_admin:
        return
    cfg = runtime.settings.credits.rate_limits
    limit = cfg.api_charge if name == "api_charge" else cfg.api
    if limit is None:
        return
    decision = await runtime.limiter.check(account, name, Rate(limit.requests, limit.per_seconds))
    if request is not None:
        request.state.credits_rate = decision


# each of these runs after authentication, then refuses a body that is not a JSON object
async def _caller(request: Request, caller: Annotated[Caller, Depends(_identity)]) -> Caller:
    _refuse_bad_body(request)
    return caller


async def _service(request: Request, caller: Annotated[Caller, Depends(_identity)]) -> Caller:
    if not caller.is_service:
        raise PermissionDenied("this route needs a service key or an admin key")
    _refuse_bad_body(request)
    return caller


async def _admin(request: Request, caller: Annotated[Caller, Depends(_identity)]) -> Caller:
    if not caller.is_admin:
        raise PermissionDenied("this route needs the proxy's master key or an admin key")
    _refuse_bad_body(request)
    return caller


def target(caller: Caller, user_id: str | None) -> str:
    """The account a user route acts on: the caller's own, or any for an admin."""
    if user_id is not None and user_id != caller.subject_id:
        if not caller.is_admin:
            raise PermissionDenied("you can only access your own account")
        return user_id
    if caller.subject_id is None:
        raise InvalidRequest("pass user_id to act for an account with an admin key", param="user_id")
    return caller.subject_id


# --- what no route serves ---------------------------------------------------------------------

CREDITS_PREFIXES = ("/credits", "/admin/credits")


def add_fallback_routes(router: APIRouter, prefixes: tuple[str, ...] = CREDITS_PREFIXES) -> None:
    """Last routes of ``router``: any other path under the ``prefixes`` gets a 404 ``not_found``,
    and a path served for other methods a 405 ``method_not_allowed`` with ``Allow``, in the
    credits error shape (not FastAPI's ``{"detail": ...}``) with the security headers."""

    async def fallback(request: Request) -> Response:
        allowed: set[str] = set()
        for route in router.routes:
            if isinstance(route, APIRoute):
                match, _ = route.matches(request.scope)
                if match is not Match.NONE:
                    allowed |= route.methods or set()
        path = request.url.path
        if allowed:
            allow = ", ".join(sorted(allowed))
            message = f"{request.method} is not allowed on {path}; allowed: {allow}"
            response = _error(405, "method_not_allowed", message, headers={"Allow": allow})
        else:
            response = _error(404, "not_found", f"no credits route {path}")
        response.headers.update(SECURITY_HEADERS)
        return response

    for prefix in prefixes:
        for path in (prefix, prefix + "/{path:path}"):
            # a plain Starlette route with no methods matches every method, even those FastAPI
            # does not list (QUERY, PROPFIND), which would otherwise get FastAPI's own 405
            router.add_route(router.prefix + path, fallback, methods=(), include_in_schema=False)


CallerDep = Annotated[Caller, Depends(_caller)]
AdminDep = Annotated[Caller, Depends(_admin)]
ServiceDep = Annotated[Caller, Depends(_service)]
UserIdQuery = Annotated[str | None, Query(max_length=256, description="admin only: act for this account")]
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]


__all__ = [
    "CHARGE_ROUTE",
    "ERROR_RESPONSES",
    "SECURITY_HEADERS",
    "AdminDep",
    "Caller",
    "CallerDep",
    "CreditsRoute",
    "Limit",
    "Offset",
    "ServiceDep",
    "UserIdQuery",
    "add_fallback_routes",
    "limit_account",
    "parse_json_object",
    "target",
]
