"""One PostgreSQL statement with its parameters bound by the server, for the ledger's hot statements.

Django's cursor binds parameters on the client: each element of an array goes into the statement's text,
quoted. For the ledger's statements, which take one array per column of hundreds of events, that cost 12.5 µs of
CPU per event on the writer thread, which shares the GIL with the event loop. Binary parameters (`%b`) bound by
the server cost 5.3 (billing.services._insert_new_events, billing.ledger._not_in_ledger).
"""

from __future__ import annotations

from typing import Any

import psycopg
from django.db import connection


def first_column(statement: str, params: list[Any]) -> list[Any]:
    """Run `statement` on the default connection and return the first column of the rows it returns. Raises
    Django's errors (IntegrityError, DataError, OperationalError), as Django's own cursor does."""
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(statement, params, prepare=False)  # never a named statement: a pooler may sit between
        return [row[0] for row in cursor.fetchall()]
