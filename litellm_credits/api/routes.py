"""What every credits route shares: error mapping, security headers, who is calling.

Every route answers errors in the OpenAI shape with a machine-readable ``type``, never a stack
trace or SQL, and sets the security headers below.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from litellm.proxy._types import LitellmUserRoles, ProxyException
from litellm.proxy.auth.user_api_key_auth import user_api_key_auth

from ..errors import CreditsError, InvalidRequest, PermissionDenied, ServiceUnavailable
from ..ledger import INVALID_INPUT_ERRORS, UNAVAILABLE_ERRORS
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
    code: {"model": schemas.ErrorBody} for code in (400, 401, 402, 403, 404, 409, 422, 429, 503)
}


def _error(status: int, type_: str, message: str, param: str | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": str(status)}
    body.update(extra)
    return JSONResponse(status_code=status, content={"error": body})


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    fields = [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    first = fields[0] if fields else {"loc": [], "msg": "invalid request"}
    param = ".".join(first["loc"][1:]) or None
    return _error(422, "validation_error", f"{param or 'request'}: {first['msg']}", param, fields=fields)


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
            try:
                if self.cross_origin(request):
                    raise PermissionDenied(
                        "cross-origin request refused: a browser session cannot change credits from "
                        "another site (send an API key, or add the origin to allowed_origins)"
                    )
                response = await original(request)
            except CreditsError as err:
                response = JSONResponse(status_code=err.status, content=err.to_body(), headers=err.headers)
            except RequestValidationError as exc:
                response = _validation_error(exc)
            except ProxyException as exc:
                status = int(exc.code) if str(exc.code).isdigit() else 401
                response = _error(status, exc.type or "authentication_error", exc.message, exc.param)
            except HTTPException as exc:
                response = _error(exc.status_code, "http_error", str(exc.detail))
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


async def _caller(request: Request, auth: Annotated[Any, Depends(user_api_key_auth)]) -> Caller:
    role = getattr(auth, "user_role", None)
    is_admin = role == LitellmUserRoles.PROXY_ADMIN or str(role) == "proxy_admin"
    subject = auth.user_id if auth.user_id not in (None, "default_user_id") else None
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


async def _service(caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    if not caller.is_service:
        raise PermissionDenied("this route needs a service key or an admin key")
    return caller


async def _admin(caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    if not caller.is_admin:
        raise PermissionDenied("this route needs the proxy's master key or an admin key")
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
    "limit_account",
    "target",
]
