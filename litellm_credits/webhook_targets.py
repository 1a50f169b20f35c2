"""Where a webhook may be sent (SSRF), and a connection only to the address that was checked.

:func:`check_target` refuses a URL that is not http(s), carries credentials, or whose host resolves
to an address this deployment must not call: loopback, private and reserved ones unless
``alerts.allow_private_targets`` is set, link-local ones (cloud metadata: 169.254.169.254,
fd00:ec2::254), multicast and unspecified ones never. It resolves the name httpx will connect to
(``httpx.URL(url).raw_host``: IDNA 2008, as httpx encodes it; Python's own codec is IDNA 2003,
which maps some names, ``faß.de`` for one, to another host).

A name can resolve to one address for the check and to another a moment later, for the connection
(DNS rebinding): :class:`VettedBackend` closes that window. It sits under httpx as the connection
pool's network backend; while a delivery runs, :data:`VETTED` holds its host and the addresses the
check approved, and a new connection to that host goes to those addresses, in order, instead of
resolving the name again. Everything else stays httpx's own, by the name: the URL and ``Host``,
the pool's key (two endpoints on one address never share a connection), TLS's server name and
certificate check, and proxies (a delivery through ``HTTPS_PROXY`` connects to the proxy, which
resolves the target itself; ``NO_PROXY`` matches the name).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import typing
from contextvars import ContextVar
from urllib.parse import urlsplit

import httpcore
import httpx

from .errors import InvalidRequest, WebhookTargetRefused

log = logging.getLogger("litellm_credits.webhooks")

# a link-local range holds the metadata services; these are named for clarity
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}

# while a delivery runs (in its own task): its host (as httpx connects to it) and the addresses
# check_target approved for it, in the resolver's order
VETTED: ContextVar[tuple[str, tuple[str, ...]] | None] = ContextVar("webhook_vetted", default=None)


async def check_target(url: str, *, allow_private: bool) -> tuple[str, tuple[str, ...]]:
    """The URL's host and the addresses it may be called at; refuses a URL whose scheme is not
    http(s) or whose host resolves to an address this deployment must not call."""
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        raise InvalidRequest("the URL must not contain spaces or control characters", param="url")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        raise InvalidRequest("the URL is not valid", param="url") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise InvalidRequest("the URL must be http:// or https:// with a host", param="url")
    if parts.username or parts.password:
        raise InvalidRequest("the URL must not carry credentials", param="url")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidRequest("the URL's port is not valid", param="url") from None
    try:
        host = httpx.URL(url).raw_host.decode("ascii")
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError, httpx.InvalidURL):
        raise WebhookTargetRefused(f"{parts.hostname} does not resolve", param="url") from None
    addresses: list[str] = []
    for info in infos:
        text = str(info[4][0])
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:169.254.169.254 is the metadata service too
        if address in _METADATA or address.is_link_local or address.is_multicast or address.is_unspecified:
            raise WebhookTargetRefused(
                f"{parts.hostname} resolves to {address}, which is never called", param="url"
            )
        if not allow_private and (address.is_private or address.is_loopback or address.is_reserved):
            raise WebhookTargetRefused(
                f"{parts.hostname} resolves to a private address ({address}); set "
                "alerts.allow_private_targets to call it",
                param="url",
            )
        if text not in addresses:
            addresses.append(text)
    return host, tuple(addresses)


class VettedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, except that while :data:`VETTED` is set a connection goes to
    its approved addresses, in order (the next one after a refused or timed-out connection), all
    within the one connect timeout, instead of to whatever the name resolves to now. A connection
    to any other host then is refused: this backend sits under the direct connections of the
    delivery's own client (proxies have pools of their own), so another host means a URL that was
    not checked."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self.inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        vetted = VETTED.get()
        if vetted is None:  # not a delivery
            return await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        checked, addresses = vetted
        if host != checked:
            raise httpcore.ConnectError(f"{host} is not the host that was checked ({checked})")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        failures: list[str] = []
        for n, address in enumerate(addresses):
            # each address a fair share of what is left of the one timeout (the last: all of it)
            share = None if deadline is None else max(0.0, deadline - loop.time()) / (len(addresses) - n)
            try:
                return await self.inner.connect_tcp(address, port, share, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failures.append(f"{address}: {exc or type(exc).__name__}")
        raise httpcore.ConnectError(
            f"{host} did not answer at its approved addresses ({'; '.join(failures)})"
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self.inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def vet_connections(client: httpx.AsyncClient) -> bool:
    """Put :class:`VettedBackend` under the client's own (direct) connections. httpx 0.28 takes no
    network backend, so this reaches into the transport it made; False (and a warning) if its
    layout changed: the dispatcher then refuses to deliver rather than resolve the name again."""
    pool = getattr(getattr(client, "_transport", None), "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if type(pool) is not httpcore.AsyncConnectionPool or not isinstance(
        backend, httpcore.AsyncNetworkBackend
    ):
        log.warning(
            "litellm-credits: webhooks cannot pin their connections to the checked addresses "
            "(httpx's transport has changed): no webhook is delivered until this is fixed"
        )
        return False
    if not isinstance(backend, VettedBackend):
        pool._network_backend = VettedBackend(backend)
    return True


__all__ = ["VETTED", "VettedBackend", "check_target", "vet_connections"]
