"""Long-lived sessions held by a key (realtime WebSockets), and telling them that the key is gone.

A REST request checks its key when it arrives; a WebSocket may stay open for an hour after that. Each such
session joins its key's group on the channel layer (channels_redis where there is Redis, so a group spans
every worker), and revoking a key or archiving its project sends `key.ended` to that group on commit: every
session of the key closes within moments, wherever it runs. Sessions also re-check their key on a timer,
which covers what a broadcast cannot reach (an in-memory channel layer when the revocation came from another
process, an expiry date passing).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)

KEY_ENDED = "key.ended"


def key_group(public_id: str) -> str:
    """The channel-layer group of a key's open sessions (group names allow letters, digits, '.', '-', '_')."""
    return f"apikey.{public_id}"


async def announce_key_ended_async(public_ids: Iterable[str]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    for public_id in public_ids:
        await layer.group_send(key_group(public_id), {"type": KEY_ENDED, "key": public_id})


def announce_key_ended(public_ids: Iterable[str]) -> None:
    """Tell every open session of these keys to close. Called on commit of a revocation; a channel layer that
    cannot be reached is logged, never raised: the revocation stands, and the sessions' own re-checks end them."""
    try:
        async_to_sync(announce_key_ended_async)(list(public_ids))
    except Exception:
        logger.exception("Could not announce a key's revocation to its open sessions")
