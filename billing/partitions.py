"""The usage ledger partitioned by calendar month (UTC) on PostgreSQL.

`billing_usageevent` is a table partitioned by range of `created_at` (when the call was admitted): one
partition a month, `billing_usageevent_y2026m12`, and a default partition for what falls outside them (a
journal replayed from before the first month, a clock far ahead). A month's queries — caps, statements,
usage pages, reconciliation — read one partition, and a month that is no longer needed online can be detached
and archived whole (`ALTER TABLE billing_usageevent DETACH PARTITION …`) instead of deleted row by row.

PostgreSQL requires every unique key of a partitioned table to include the partition key, so the primary key
is (id, created_at) and the ledger's idempotency key is (call_id, created_at). An event keeps its
`created_at` wherever it goes (journal, usage stream, a replay: the same float, turned into the same
microsecond), so a call written twice still conflicts with itself and is charged once.

Partitions are made ahead: this month's and the next two, by the migration that partitions the table, at each
worker's start and by the ledger writer once an hour (`ensure_usage_partitions`). Rows that waited in the
default partition for a month that gets its partition later are moved into it in the same transaction.
SQLite (the embedded default) keeps one plain table; everything here is a no-op there.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from django.db import connections, transaction

logger = logging.getLogger(__name__)

TABLE = "billing_usageevent"
DEFAULT_PARTITION = f"{TABLE}_default"
MONTHS_AHEAD = 2
_CHECK_EVERY = 3600.0
_checked_at = 0.0


def _month_start(year: int, month: int) -> datetime:
    return datetime(year + (month - 1) // 12, (month - 1) % 12 + 1, 1, tzinfo=UTC)


def partition_name(start: datetime) -> str:
    return f"{TABLE}_y{start.year:04d}m{start.month:02d}"


def is_partitioned(connection: Any) -> bool:
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(%s)", [TABLE])
        return cursor.fetchone() is not None


def _existing(connection: Any) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT child.relname FROM pg_inherits JOIN pg_class child ON child.oid = pg_inherits.inhrelid "
            "WHERE pg_inherits.inhparent = to_regclass(%s)", [TABLE]
        )
        return {row[0] for row in cursor.fetchall()}


def _create_month(connection: Any, start: datetime) -> None:
    """One month's partition, taking over the rows of that month that waited in the default partition."""
    end = _month_start(start.year, start.month + 1)
    name = partition_name(start)
    quote = connection.ops.quote_name
    moving = quote(f"moving_{name}")  # one per month: several may be made in one transaction (a migration)
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMPORARY TABLE {moving} ON COMMIT DROP AS WITH moved AS ("  # noqa: S608
            f"DELETE FROM {quote(DEFAULT_PARTITION)} WHERE created_at >= %s AND created_at < %s RETURNING *) "
            "SELECT * FROM moved", [start, end],
        )
        cursor.execute(
            f"CREATE TABLE {quote(name)} PARTITION OF {quote(TABLE)} FOR VALUES FROM (%s) TO (%s)", [start, end]
        )
        cursor.execute(f"INSERT INTO {quote(TABLE)} SELECT * FROM {moving}")  # noqa: S608
        moved = cursor.rowcount
    if moved:
        logger.warning("Moved %d usage events from the default partition into %s", moved, name)


def ensure_usage_partitions(*, using: str = "default", now: float | None = None, since: datetime | None = None,
                            months_ahead: int = MONTHS_AHEAD) -> list[str]:
    """Make sure the partitions of this month (or of every month from `since`) to `months_ahead` months ahead
    exist; returns the names made. Nothing on SQLite or on a table that is not partitioned."""
    connection = connections[using]
    if not is_partitioned(connection):
        return []
    today = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    first = since or today
    existing = _existing(connection)
    made = []
    months = (today.year - first.year) * 12 + today.month - first.month + months_ahead
    for offset in range(months + 1):
        start = _month_start(first.year, first.month + offset)
        if partition_name(start) not in existing:
            _create_month(connection, start)
            made.append(partition_name(start))
    return made


def ensure_usage_partitions_now_and_then() -> None:
    """From the ledger writer: at most once an hour (cheap otherwise); never raises into a write."""
    global _checked_at
    if time.monotonic() - _checked_at < _CHECK_EVERY:
        return
    _checked_at = time.monotonic()
    try:
        made = ensure_usage_partitions()
    except Exception:
        logger.exception("Could not make the usage ledger's next partitions; will try again in an hour")
        return
    if made:
        logger.info("Made usage ledger partitions %s", ", ".join(made))


def _definitions(cursor: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """The ledger table's plain indexes (their CREATE statements) and its foreign keys (name, definition)."""
    cursor.execute(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = %s AND indexname "
        "NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(%s) AND contype IN ('p', 'u'))",
        [TABLE, TABLE],
    )
    indexes = [row[0] for row in cursor.fetchall()]
    cursor.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = to_regclass(%s) "
        "AND contype = 'f'", [TABLE]
    )
    return indexes, list(cursor.fetchall())


def _keys(cursor: Any) -> tuple[str, str]:
    cursor.execute(
        "SELECT contype, conname FROM pg_constraint WHERE conrelid = to_regclass(%s) AND contype IN ('p', 'u')",
        [TABLE],
    )
    names = dict(cursor.fetchall())
    return names["p"], names["u"]


def rebuild(connection: Any, *, partitioned: bool) -> None:
    """Turn the ledger table into a partitioned one (or back), keeping every row, id, index and foreign key
    under the names Django's migrations know. For the migration (0008)."""
    if connection.vendor != "postgresql" or is_partitioned(connection) == partitioned:
        return
    quote = connection.ops.quote_name
    new = f"{TABLE}_rebuilt"
    with connection.cursor() as cursor:
        indexes, foreign_keys = _definitions(cursor)
        primary, unique = _keys(cursor)
        cursor.execute("SELECT min(created_at) FROM " + quote(TABLE))  # noqa: S608
        oldest = cursor.fetchone()[0]
        how = " PARTITION BY RANGE (created_at)" if partitioned else ""
        cursor.execute(
            f"CREATE TABLE {quote(new)} (LIKE {quote(TABLE)} INCLUDING DEFAULTS INCLUDING IDENTITY "
            f"INCLUDING CONSTRAINTS){how}"
        )
        if partitioned:
            cursor.execute(f"CREATE TABLE {quote(DEFAULT_PARTITION)} PARTITION OF {quote(new)} DEFAULT")
        cursor.execute(f"INSERT INTO {quote(new)} SELECT * FROM {quote(TABLE)}")  # noqa: S608
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence(%s, 'id'), coalesce(max(id), 0) + 1, false) "  # noqa: S608
            f"FROM {quote(new)}", [new],
        )
        cursor.execute(f"DROP TABLE {quote(TABLE)}")
        cursor.execute(f"ALTER TABLE {quote(new)} RENAME TO {quote(TABLE)}")
        key = ", created_at" if partitioned else ""
        cursor.execute(f"ALTER TABLE {quote(TABLE)} ADD CONSTRAINT {quote(primary)} PRIMARY KEY (id{key})")
        cursor.execute(f"ALTER TABLE {quote(TABLE)} ADD CONSTRAINT {quote(unique)} UNIQUE (call_id{key})")
        for statement in indexes:
            cursor.execute(statement)
        for name, definition in foreign_keys:
            cursor.execute(f"ALTER TABLE {quote(TABLE)} ADD CONSTRAINT {quote(name)} {definition}")
    if partitioned:
        # The default partition holds everything copied; each month's partition takes its rows over.
        ensure_usage_partitions(using=connection.alias, since=oldest)
