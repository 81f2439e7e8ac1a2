"""Django's PostgreSQL backend behind the database circuit breaker (platform_site.kernel.breaker).

While PostgreSQL is down, asking psycopg's pool for a connection waits DATABASE_POOL_TIMEOUT before it fails,
and every ORM call of the process queues behind that wait (they share one thread, platform_site.kernel.orm).
Here the first failed connection opens the breaker: until DATABASE_RETRY_AFTER has passed, connecting raises
at once, and then one probe — a plain connection with a one-second connect timeout, outside the pool — decides
whether the pool is asked again. So during an outage a query costs microseconds to refuse, the requests that
need no query (cached keys, prices and terms) go on being served, and service returns within a probe interval
of PostgreSQL's return. The pool's `check` (settings) replaces connections that died with the server.
"""

from __future__ import annotations

from typing import Any

import psycopg
from django.db.backends.postgresql import base

from platform_site.kernel import breaker


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        database = breaker.database
        if not database.allows():
            raise psycopg.OperationalError("PostgreSQL is unreachable (failing fast until the next probe)")
        try:
            if database.down_since is not None:
                self._probe(conn_params)
            connection = super().get_new_connection(conn_params)
        except psycopg.Error as error:  # psycopg_pool's PoolTimeout is a psycopg.OperationalError
            database.failed(error)
            raise
        database.succeeded()
        return connection

    def _probe(self, conn_params: dict[str, Any]) -> None:
        params = {name: value for name, value in conn_params.items() if name not in ("cursor_factory", "context")}
        with psycopg.connect(**{**params, "connect_timeout": 1}) as probe:
            probe.execute("SELECT 1")
