"""The rules for connections Keyway opens to addresses its customers name: image URLs, connectors.

Server-side requests must not become a way into the private network (SSRF). Every address a customer's
host names has to be globally routable, unless `settings.KEYWAY_FETCH_ALLOW_PRIVATE` says otherwise (a
development machine, the test suite on loopback). A host is checked twice: once before anything is sent
(so a refused URL is never contacted), and once more by the resolver the connection actually uses (so a
name cannot resolve to a public address for the check and a private one for the connect: DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import aiohttp
import aiohttp.abc
from django.conf import settings

NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable unicast address, looking through the IPv6 forms that carry an IPv4 address
    (IPv4-mapped, NAT64, 6to4), which `is_global` alone judges by their IPv6 prefix: 64:ff9b::7f00:1 is
    127.0.0.1 behind a NAT64 gateway, and `is_global` says True."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and any(address in network for network in NAT64):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
    return address.is_global and not address.is_multicast


def is_public_text(address: str) -> bool:
    """`is_public_address` of an address as getaddrinfo or a socket spells it (an IPv6 scope id such as
    `%eth0` is dropped: it names an interface, not a different address)."""
    return is_public_address(ipaddress.ip_address(address.split("%", 1)[0]))


def private_addresses_allowed() -> bool:
    return bool(settings.KEYWAY_FETCH_ALLOW_PRIVATE)


class PrivateAddress(OSError):
    """Raised by the connection's own resolution when a host names a private address."""


async def resolve(host: str) -> list[str]:
    """Every address `host` names (IP literals in any spelling, decimal and hex included, or a name).
    Raises OSError when it names none."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def resolves_to_public_only(host: str) -> bool:
    """Whether every address `host` names is public. Raises OSError when the host cannot be resolved.
    Callers ask `private_addresses_allowed()` first: this says what the addresses are, not what is allowed."""
    return all(is_public_text(address) for address in await resolve(host))


class PublicOnlyResolver(aiohttp.abc.AbstractResolver):
    """An aiohttp session's resolver: the connection goes only to addresses vetted here, in the same lookup,
    so a name cannot resolve to a public address for the check and a private one for the connect (DNS
    rebinding). aiohttp does not consult a resolver for IP literals; those are settled by the check before
    the request (and by looking at the peer once connected)."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[Any]:
        found = await self._inner.resolve(host, port, family)
        if not private_addresses_allowed():
            for entry in found:
                if not is_public_address(ipaddress.ip_address(entry["host"])):
                    raise PrivateAddress(f"{host} resolves to a private address")
        return found

    async def close(self) -> None:
        await self._inner.close()
