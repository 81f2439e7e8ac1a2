"""Database hygiene for ORM calls made from async code outside Django's request cycle."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from django.db import close_old_connections

P = ParamSpec("P")
R = TypeVar("R")


def returns_connection(func: Callable[P, R]) -> Callable[P, R]:
    """Hand the thread's connection back (to the pool on PostgreSQL) when the call ends.

    The API path runs no request_started/finished signals, so nothing else would: a connection left checked
    out by a worker thread would be held until that thread dies.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        finally:
            close_old_connections()

    return wrapper
