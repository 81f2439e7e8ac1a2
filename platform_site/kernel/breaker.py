"""Whether a backing service (Redis, PostgreSQL) is reachable, as this process last saw it: one circuit breaker
per service, shared by everything that uses it.

A call to Redis that fails (refused, reset, or no answer within KEYWAY_REDIS_TIMEOUT) opens its breaker for
KEYWAY_REDIS_RETRY_AFTER seconds; a PostgreSQL connection that cannot be made opens the database's for
DATABASE_RETRY_AFTER. While a breaker is open, callers do not touch the network at all: the key cache goes
straight to the database, admission answers its 503, a query raises at once, so an outage costs a request
microseconds, not a timeout, and a dead service is not hammered with reconnections by every request. When the
time is up, the next call tries again (a probe); its success closes the breaker. Each change is logged once
and shown as a metric (`keyway_backing_service_up{service="redis"|"postgresql"}`), not once per request.

Callers run on the event loop and in worker threads; they only read and write a few floats here, which is
safe without a lock (the worst race is one extra probe).
"""

from __future__ import annotations

import logging
import math
import time

from django.conf import settings

from platform_site.kernel import metrics

logger = logging.getLogger(__name__)


class Breaker:
    def __init__(self, service: str, retry_after_setting: str) -> None:
        self.service = service
        self.retry_after_setting = retry_after_setting
        self.open_until = 0.0
        self.down_since: float | None = None
        self.last_failure = -math.inf

    def allows(self) -> bool:
        """Whether a call should be tried now (closed, or open long enough that the next call is a probe)."""
        return time.monotonic() >= self.open_until

    def failed(self, error: BaseException) -> None:
        now = time.monotonic()
        retry_after = self.retry_after()
        self.open_until = now + retry_after
        self.last_failure = now
        if self.down_since is None:
            self.down_since = now
            # The error's class only: a message may quote the URL, with its password.
            logger.error("%s is unreachable (%s); failing fast, retrying every %.1f s", self.service,
                         type(error).__name__, retry_after)
            metrics.backing_service(self.service.lower(), up=False)

    def succeeded(self) -> None:
        if self.down_since is not None:
            logger.warning("%s is reachable again after %.1f s", self.service,
                           time.monotonic() - self.down_since)
            self.down_since = None
            self.open_until = 0.0
            metrics.backing_service(self.service.lower(), up=True)

    def retry_after(self) -> float:
        return float(getattr(settings, self.retry_after_setting))

    def failed_within(self, seconds: float) -> bool:
        return time.monotonic() - self.last_failure < seconds

    def reset(self) -> None:
        """Forget every failure (tests)."""
        self.open_until, self.down_since, self.last_failure = 0.0, None, -math.inf


class Unavailable(Exception):
    """Redis is down as far as this process knows (the breaker is open), or a call to it just failed."""


def connection_errors() -> tuple[type[BaseException], ...]:
    """What a call to an unreachable Redis raises: refused, reset, timed out, or still loading its data."""
    import redis.exceptions

    # A Redis Cluster that lost a node, or slots, until it fails over (billing.connections).
    cluster = (redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError, redis.exceptions.SlotNotCoveredError)
    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, TimeoutError, *cluster)


redis = Breaker("Redis", "KEYWAY_REDIS_RETRY_AFTER")
database = Breaker("PostgreSQL", "DATABASE_RETRY_AFTER")
