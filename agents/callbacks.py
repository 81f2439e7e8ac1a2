"""Posting a webhook turn's reply to its hook's callback URL: signed like the requests the hook accepts,
under the same outbound-address rules as connectors, bounded in time and in what is read back. Plain async
I/O; the surface records each attempt and decides on retries."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from agents.connectors import sign
from platform_site.kernel.loops import PerLoop
from platform_site.kernel.outbound import PublicOnlyResolver, private_addresses_allowed, resolves_to_public_only

CALLBACK_TIMEOUT = 10.0
SIGNATURE_HEADER = "X-Keyway-Signature"


def _new_session() -> aiohttp.ClientSession:
    # Its own small pool: a tenant's slow receiver must not hold connections that models or tools need.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64, use_dns_cache=False, resolver=PublicOnlyResolver()),
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": "Keyway webhooks"},
    )


async def _close(session: aiohttp.ClientSession) -> None:
    await session.close()


callback_sessions: PerLoop[aiohttp.ClientSession] = PerLoop(
    "webhook callbacks", _new_session, _close, is_closed=lambda session: session.closed
)


@dataclass(frozen=True, slots=True)
class Attempt:
    delivered: bool
    status_code: int | None
    error: str


async def post_callback(url: str, *, secret: str, payload: dict[str, Any]) -> Attempt:
    """One attempt: delivered when the receiver answers 2xx. Never raises for the receiver's failures."""
    body = orjson.dumps(payload)
    host = urlsplit(url).hostname or ""
    try:
        if not private_addresses_allowed() and not await resolves_to_public_only(host):
            return Attempt(False, None, "the callback URL points to a private address")
    except OSError:
        return Attempt(False, None, "the callback host cannot be resolved")
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, int(time.time()), body)}
    try:
        async with asyncio.timeout(CALLBACK_TIMEOUT):
            async with callback_sessions.get().post(url, data=body, headers=headers, allow_redirects=False) as reply:
                await reply.content.read(65_536)  # what a receiver says is not kept; reading lets the pool reuse it
                if 200 <= reply.status < 300:
                    return Attempt(True, reply.status, "")
                return Attempt(False, reply.status, f"the receiver answered HTTP {reply.status}")
    except TimeoutError:
        return Attempt(False, None, f"the receiver did not answer within {CALLBACK_TIMEOUT:g} s")
    except (aiohttp.ClientError, OSError) as error:
        return Attempt(False, None, f"the receiver could not be reached ({type(error).__name__})")
