"""channels_redis, surviving a Redis outage (README, "When a backing service fails").

Every open WebSocket waits on the channel layer for broadcasts (a key's revocation). Stock channels_redis
raises out of that wait when Redis goes away, which ends the consumer and drops the socket without a close
frame: a Redis restart would cut every realtime session. Here the wait retries instead (with a growing
pause, up to KEYWAY_REDIS_RETRY_AFTER), and joining or leaving a group while Redis is away is skipped:
such a session misses broadcasts until it reconnects, and re-checks its key on its own timer meanwhile
(apikeys.sessions), so a revocation still reaches it. The layer keeps its own connections (channels_redis'),
whose failures say nothing about the counters' and the cache's: they do not open the Redis breaker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels_redis.core import RedisChannelLayer
from django.conf import settings

from platform_site.kernel import breaker

logger = logging.getLogger(__name__)


class ResilientRedisChannelLayer(RedisChannelLayer):
    async def receive(self, channel: str) -> Any:
        pause = 0.05
        while True:
            try:
                return await super().receive(channel)
            except breaker.connection_errors():
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # The wait was cancelled (the consumer is ending) and the client turned that into a
                    # connection error on its way out: end, never wait again.
                    raise asyncio.CancelledError from None
                await asyncio.sleep(pause)
                pause = min(pause * 2, max(settings.KEYWAY_REDIS_RETRY_AFTER, 0.05))

    async def group_add(self, group: str, channel: str) -> None:
        try:
            await super().group_add(group, channel)
        except breaker.connection_errors():
            logger.warning("Could not join %s while Redis is unreachable; its key is re-checked on a timer", group)

    async def group_discard(self, group: str, channel: str) -> None:
        try:
            await super().group_discard(group, channel)
        except breaker.connection_errors():
            pass  # the membership expires with the group (channels_redis' group_expiry)
