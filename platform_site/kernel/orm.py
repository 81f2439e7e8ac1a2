"""ORM access from the async API path: one helper, `orm()`.

The API path runs outside Django's request cycle (no request_started/finished signals), so nothing else
would hand a worker thread's database connection back: a connection left checked out would be held until
the thread dies (and, on PostgreSQL, starve the pool). `orm(func, ...)` runs a synchronous ORM function in
Django's thread for sync work (`thread_sensitive=True`: one thread, so SQLite sees one writer and tests see
their transaction) and returns the connection when it ends.

Not for async views served inside Django's request cycle (the dashboard, the billing API, /status): there
the request's own connection is used and Django closes it when the request ends; closing it half-way would
break a transaction the request is in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

P = ParamSpec("P")
R = TypeVar("R")


def returns_connection(func: Callable[P, R]) -> Callable[P, R]:
    """Wrap `func` so that the thread's connection is handed back (to the pool) when the call ends. For
    synchronous code that runs off the request cycle in threads of its own (the ledger writer)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        finally:
            close_old_connections()

    return wrapper


async def orm(func: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the synchronous `func` (ORM queries, a service) from async code on the API path, and hand the
    connection back afterwards."""
    return await sync_to_async(returns_connection(func), thread_sensitive=True)(*args, **kwargs)
