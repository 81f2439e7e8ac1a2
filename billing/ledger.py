"""Getting settled calls into the usage ledger: off the hot path, in batches, and never lost.

With Redis (production: several processes, several hosts), a settled call's usage event reaches the shared
usage stream in the same atomic step that settles its counters (billing.counters), and an answer waits for
that step. Every worker process is a consumer in one consumer group on that stream (`_StreamConsumer`, on the
ledger's writer thread every KEYWAY_USAGE_FLUSH_INTERVAL seconds): it reads new events, writes them to the
database in one transaction, then acknowledges and deletes them, so the stream holds only what is not written
yet. A host that dies takes nothing the ledger still needs:
- events it had read but not written stay pending under its name, and any live worker claims them once
  they have been idle for KEYWAY_USAGE_CLAIM_IDLE seconds;
- a write that fails (the database away) leaves the events pending with the worker, which retries them first.
Redis must therefore keep what it is given (appendonly; README, "Several hosts").

Without Redis (the embedded default, one process), and on any host while Redis is away, a settled call is
appended, as one line, to this process's journal file (one `write` to a file the process holds an exclusive
lock on), then kept in memory. A background task writes the batch to the database in one transaction every
KEYWAY_USAGE_FLUSH_INTERVAL seconds (sooner when KEYWAY_USAGE_FLUSH_BATCH events are waiting): before it
writes, it starts a new journal file, and it deletes the old one only after the transaction has committed.
So a crash at any point loses nothing and charges nothing twice:
- before the commit, the events are still in the journal, which the lock marks as orphaned once the
  process is gone; any worker (or `manage.py usage_recover`) replays orphaned journals;
- after the commit but before the old journal is deleted, the replay finds the events already written and
  skips them: the writer is idempotent on the call id and charges only what it inserts (which is also what
  makes a stream event claimed from a worker that was merely slow harmless).
On a clean stop (lifespan shutdown, or process exit under daphne) the buffer is written at once.

Rows per request: one, in a transaction shared with every other request of the batch, so under load the
database sees one write per flush interval rather than one per request.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from django.conf import settings
from django.db import DataError, IntegrityError, InterfaceError, OperationalError
from django.db import connection as database

from billing import connections, keys
from billing.alerts import spend_alerts_after_usage
from billing.partitions import ensure_usage_partitions_now_and_then
from billing.services import SettledUsage, usage_events_write
from platform_site.kernel import breaker, metrics
from platform_site.kernel.orm import orm, returns_connection

logger = logging.getLogger(__name__)

_SUFFIX = ".usage"
# Events the database refused, one JSON line each, beside the journals (not a journal: never replayed).
_REJECTED = "rejected.usage-rows"
_RECOVER_EVERY = 60.0
_KEPT_SEGMENT_SECONDS = 5.0


class _JournalFile:
    def __init__(self, directory: Path, sequence: int, kind: str = "") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{kind}{socket.gethostname()}-{os.getpid()}-{int(time.time() * 1000)}-{sequence}{_SUFFIX}"
        self.path = directory / name
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # Held for as long as this process lives: a journal nobody holds belongs to a process that died.
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.events: list[SettledUsage] = []
        # A kept copy (`_Ledger.keep`) holds rows, not events: tuples of strings and numbers, which the garbage
        # collector stops tracking. Kept for 15 s at a thousand requests a second, events were 15,000 objects
        # every full collection walked (bench/hotpath_bench.py --heap), and pauses over 5 ms.
        self.rows: list[tuple[Any, ...]] = []
        self.opened = time.monotonic()

    def append(self, event: SettledUsage) -> None:
        os.write(self.fd, orjson.dumps(event.as_row()) + b"\n")
        self.events.append(event)

    def append_row(self, event: SettledUsage) -> None:
        row = event.as_row()
        os.write(self.fd, orjson.dumps(row) + b"\n")
        self.rows.append(row)

    def discard(self) -> None:
        """After its events are committed: delete the file, then let go of it."""
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)


class _Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the current file and the list of sealed ones
        self._write_lock = threading.Lock()  # one database writer at a time in this process
        self._sequence = 0
        self._current: _JournalFile | None = None
        self._sealed: list[_JournalFile] = []  # rotated away, waiting for (or retrying) their write
        self._executor: ThreadPoolExecutor | None = None  # made on the first write, not at import
        self._flusher: asyncio.Task[None] | None = None
        self._last_recovery = 0.0
        # With Redis: the copy this host keeps of what it sent to the usage stream, until the ledger has it.
        self._kept: _JournalFile | None = None
        self._kept_sealed: list[_JournalFile] = []

    def _directory(self) -> Path:
        return Path(settings.KEYWAY_USAGE_JOURNAL_DIR)

    def record(self, event: SettledUsage) -> None:
        """Journal one settled request and schedule its write. Synchronous and cheap (one `write`), so it
        can run in a `finally:` of a cancelled stream."""
        with self._lock:
            if self._current is None:
                self._sequence += 1
                self._current = _JournalFile(self._directory(), self._sequence)
            self._current.append(event)
            waiting = len(self._current.events)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a management command): written by flush_sync or at exit
        if waiting >= settings.KEYWAY_USAGE_FLUSH_BATCH:
            loop.create_task(self.flush())
        elif self._flusher is None or self._flusher.done() or self._flusher.get_loop() is not loop:
            self._flusher = loop.create_task(self._flush_soon())

    def keep(self, event: SettledUsage) -> None:
        """With Redis: keep a copy of an event sent to the usage stream, in a journal of its own (one `write`),
        until `verify_kept` finds it in the ledger. Redis may lose the stream (a restart without persistence,
        a flush, a failover): what it lost is written from here. Never replayed by this process otherwise;
        orphaned (the process died) it is replayed like any journal, which charges nothing twice."""
        with self._lock:
            kept = self._kept
            if kept is None or time.monotonic() - kept.opened >= _KEPT_SEGMENT_SECONDS:
                if kept is not None:
                    self._kept_sealed.append(kept)
                self._sequence += 1
                kept = self._kept = _JournalFile(self._directory(), self._sequence, kind="kept-")
            kept.append_row(event)

    def verify_kept(self, *, older_than: float | None = None) -> int:
        """Check the kept segments sealed `older_than` seconds ago (KEYWAY_USAGE_VERIFY_AFTER by default; 0: all,
        the current one too) against the ledger; write the events it lacks, then delete them. Returns how many
        were missing. Raises the database's errors (the segments are kept and checked again)."""
        older_than = settings.KEYWAY_USAGE_VERIFY_AFTER if older_than is None else older_than
        with self._lock:
            if older_than <= 0 and self._kept is not None:
                self._kept_sealed.append(self._kept)
                self._kept = None
            due = [kept for kept in self._kept_sealed if time.monotonic() - kept.opened >= older_than
                   + _KEPT_SEGMENT_SECONDS or older_than <= 0]
        missing = 0
        for kept in due:
            lacking = _not_in_ledger(kept.rows)
            if lacking:
                _write(lacking, self._directory())
                missing += len(lacking)
                if older_than > 0:
                    logger.warning("%d usage events sent to the usage stream were not in the ledger after %.0f s; "
                                   "written from this host's copy", len(lacking), older_than)
                else:
                    logger.info("%d usage events this worker settled were not in the ledger yet as it stopped; "
                                "written from its copy", len(lacking))
            with self._lock:
                self._kept_sealed.remove(kept)
            kept.discard()
        return missing

    async def _flush_soon(self) -> None:
        # Until nothing is left: events journaled while a write was under way (this task was not done, so
        # `record` did not schedule another), and batches whose write failed (the database is down), are
        # written on the next interval, not only when some later request happens to settle.
        while True:
            await asyncio.sleep(settings.KEYWAY_USAGE_FLUSH_INTERVAL)
            await self.flush()
            if not self.pending():
                return
            await asyncio.sleep(settings.KEYWAY_USAGE_RETRY_INTERVAL if self._sealed else 0)

    def _seal(self) -> list[_JournalFile]:
        with self._lock:
            if self._current is not None and self._current.events:
                self._sealed.append(self._current)
                self._current = None
            return list(self._sealed)

    async def flush(self) -> None:
        """Write everything journaled so far, and with Redis everything in the usage stream (background task,
        shutdown, tests)."""
        await self._in_writer_thread(self.flush_sync)
        if settings.REDIS_URL and breaker.redis.allows():
            from redis.exceptions import RedisError

            try:
                await self._in_writer_thread(drain_stream)
            except RedisError as error:
                # The events wait in Redis (and what settled while it was away, in the journal just written).
                logger.warning("Reading the usage stream failed (%s); will retry", type(error).__name__)

    async def _in_writer_thread(self, function: Any, *args: Any) -> Any:
        if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
            # SQLite has one writer at a time anyway; writing from the thread every other ORM call of the
            # process uses avoids lock contention between threads inside the process.
            return await orm(function, *args)
        # One thread: one database writer at a time in this process, journal and stream alike.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-ledger")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def flush_sync(self) -> None:
        with self._write_lock:
            for journal in self._seal():
                try:
                    _write(journal.events, self._directory())
                except (OperationalError, InterfaceError) as error:
                    # The database is unreachable (its breaker said so, once): keep the sealed journal and
                    # retry. Nothing is lost while the file exists.
                    logger.warning("Writing %d usage events failed (%s); they wait in the journal",
                                   len(journal.events), type(error).__name__)
                    return
                except Exception:
                    # The database refused the batch: keep the sealed journal and retry on the next flush.
                    logger.exception("Writing %d usage events failed; will retry", len(journal.events))
                    return
                with self._lock:
                    self._sealed.remove(journal)
                journal.discard()
            if time.monotonic() - self._last_recovery >= _RECOVER_EVERY:
                self._last_recovery = time.monotonic()
                recover_orphans(self._directory())

    def pending(self) -> int:
        with self._lock:
            current = len(self._current.events) if self._current is not None else 0
            return current + sum(len(journal.events) for journal in self._sealed)


@returns_connection
def _not_in_ledger(rows: Sequence[tuple[Any, ...]]) -> list[SettledUsage]:
    """The events of these rows (SettledUsage.as_row) that the ledger lacks.

    Every event a worker settles is looked up once, so on PostgreSQL the ids go in one binary array, bound by the
    server: a Django `IN` of 1,000 placeholders took 4.9 µs of CPU per event on the writer thread, this 0.7
    (700 ids, a 50,000-row ledger)."""
    from billing.models import UsageEvent

    ids = [row[0] for row in rows]
    found: set[str] = set()
    if database.vendor == "postgresql":
        from platform_site.database.server_bound import first_column

        table = database.ops.quote_name(UsageEvent._meta.db_table)
        statement = f"SELECT call_id FROM {table} WHERE call_id = ANY(%b::varchar[])"  # noqa: S608 - a table name
        found.update(first_column(statement, [ids]))
    else:
        for start in range(0, len(ids), 1000):
            found.update(
                UsageEvent.objects.filter(call_id__in=ids[start:start + 1000]).values_list("call_id", flat=True)
            )
    return [SettledUsage(*row) for row in rows if row[0] not in found]


# What one row can do wrong, as opposed to the database being unreachable: a reference that no longer holds
# (IntegrityError), or a value no column can take (DataError on PostgreSQL; SQLite's driver raises
# OverflowError for an integer past 64 bits).
_BAD_ROW = (IntegrityError, DataError, OverflowError)


@returns_connection
def _write(events: list[SettledUsage], directory: Path | None = None) -> None:
    ensure_usage_partitions_now_and_then()  # at most once an hour: next months' partitions, on PostgreSQL
    try:
        usage_events_write(events)
    except _BAD_ROW:
        # One bad event must not hold the rest back forever: write them one by one, and set aside those the
        # database refuses, each in its own transaction (a refused one rolls back alone).
        for event in events:
            try:
                usage_events_write([event])
            except _BAD_ROW as error:
                _set_aside(event, error, directory)
    # Committed: alert on caps the batch crossed (cheap for organizations without alerts; never raises).
    spend_alerts_after_usage(events=events)


def _set_aside(event: SettledUsage, error: Exception, directory: Path | None) -> None:
    """Keep a refused event where an operator finds it (rejected.usage-rows beside the journals), never lose it
    silently. The log names the call and the kind of error, not the database's message, which quotes values."""
    directory = Path(directory or settings.KEYWAY_USAGE_JOURNAL_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / _REJECTED).open("ab") as handle:
        # The standard library's encoder: orjson refuses the integers past 64 bits that may be why it failed.
        handle.write(json.dumps({"error": type(error).__name__, "event": event.as_row()}).encode() + b"\n")
    logger.error("Usage event %s refused by the database (%s); set aside in %s", event.call_id,
                 type(error).__name__, _REJECTED)


def _read_journal(path: Path, *, quiet: bool = False) -> list[SettledUsage]:
    events = []
    for line in path.read_bytes().splitlines():
        try:
            events.append(SettledUsage.from_row(orjson.loads(line)))
        except (orjson.JSONDecodeError, TypeError):
            # Only the last line of a process killed mid-write can be torn; its request never got an answer.
            if not quiet:
                logger.warning("Skipping a torn line in %s", path.name)
    return events


def read_journals(directory: Path) -> list[SettledUsage]:
    """Every event in the journals of this host, live ones included (billing.reconcile): what was settled and
    is written, or waiting to be. A line being appended right now may be torn, and is skipped."""
    events = []
    for path in sorted(directory.glob(f"*{_SUFFIX}")) if directory.is_dir() else []:
        try:
            events.extend(_read_journal(path, quiet=True))
        except FileNotFoundError:
            continue  # written and deleted meanwhile
    return events


def recover_orphans(directory: Path | None = None) -> int:
    """Replay the journals of processes that are gone; returns how many events were replayed."""
    directory = Path(directory or settings.KEYWAY_USAGE_JOURNAL_DIR)
    if not directory.is_dir():
        return 0
    replayed = 0
    for path in sorted(directory.glob(f"*{_SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process holds it
            events = _read_journal(path)
            if events:
                _write(events, directory)
                replayed += len(events)
                logger.warning("Replayed %d usage events from orphaned journal %s", len(events), path.name)
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return replayed


ledger = _Ledger()

# The consumer group in which every worker writes the shared usage stream to the ledger.
GROUP = "ledger"
_READ_BATCH = 500
_CLAIM_EVERY = 5.0
_FORGET_CONSUMERS_IDLE_MS = 600_000


def _decoded(entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> tuple[list[bytes], list[SettledUsage]]:
    ids, events = [], []
    for entry_id, fields in entries:
        ids.append(entry_id)
        payload = fields.get(b"e") if fields else None
        if payload is None:
            continue  # deleted meanwhile (written by a worker that claimed it): only acknowledged
        try:
            events.append(SettledUsage.from_row(orjson.loads(payload)))
        except (orjson.JSONDecodeError, TypeError, ValueError):
            _set_aside_raw(payload)
    return ids, events


def _set_aside_raw(payload: bytes) -> None:
    directory = Path(settings.KEYWAY_USAGE_JOURNAL_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / _REJECTED).open("ab") as handle:
        handle.write(json.dumps({"error": "unreadable", "event": payload.decode(errors="replace")}).encode() + b"\n")
    logger.error("An unreadable usage event in the stream was set aside in %s", _REJECTED)


class _StreamConsumer:
    """This process's consumer in the group that writes the shared usage stream to the ledger (see the module's
    docstring). Synchronous, on a thread of its own (the ledger's writer thread, a management command, a test's
    thread): it reads from Redis and writes to the database, neither of which the event loop should wait on."""

    def __init__(self) -> None:
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lock = threading.Lock()
        self.last_claim = 0.0
        self._client: Any = None
        self._client_url = ""

    def client(self) -> Any:
        if self._client is None or self._client_url != connections.url():
            self._client = connections.sync_client(timeout=max(settings.KEYWAY_REDIS_TIMEOUT, 5.0),
                                                   connect_timeout=settings.KEYWAY_REDIS_TIMEOUT)
            self._client_url = connections.url()
        return self._client

    def drain(self, *, claim_idle: float | None = None, periodic: bool = False) -> int:
        """Write what this consumer was given and did not write yet, what lost consumers left (idle for
        `claim_idle` seconds, KEYWAY_USAGE_CLAIM_IDLE by default, looked for every few seconds or whenever
        `claim_idle` is given), then everything new. Returns how many entries were written or acknowledged.
        Raises the database's errors (the events stay pending) and redis' (they stay in the stream)."""
        from redis.exceptions import ResponseError

        with self.lock:
            try:
                return self._drain(claim_idle, periodic)
            except ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                self._make_group()  # a new stream, or a Redis that restarted empty
                return self._drain(claim_idle, periodic)

    def _drain(self, claim_idle: float | None, periodic: bool) -> int:
        # Each shard's stream on its own (billing.keys): on a Redis Cluster they are on different nodes.
        done = 0
        claim = claim_idle is not None or time.monotonic() - self.last_claim >= _CLAIM_EVERY
        if claim:
            self.last_claim = time.monotonic()
        backlog = 0
        for shard in keys.shards():
            stream = keys.usage_stream(shard)
            while count := self._read(stream, "0", "retried"):
                done += count
            if claim:
                done += self._claim(stream, settings.KEYWAY_USAGE_CLAIM_IDLE if claim_idle is None else claim_idle)
            if periodic and not self._my_turn(stream):
                continue
            while count := self._read(stream, ">", "stream"):
                done += count
                if count < _READ_BATCH:
                    # Not "until the stream is empty": under load, what arrived while one batch was being
                    # written would be written at once, in a chain of transactions of a few events each.
                    break
            backlog += int(self.client().xlen(stream))
        metrics.usage_backlog(backlog)
        return done

    def _my_turn(self, stream: str) -> bool:
        """One periodic drain per KEYWAY_USAGE_FLUSH_INTERVAL across every worker and host, whoever takes the
        turn: each writes a whole interval's events in one transaction, where every worker draining on its own
        clock would write the same events in as many smaller ones (measured: the ledger's share of the
        workers' CPU went from 13 % to 20 % with two workers, the per-batch roll-ups and alerts doubling)."""
        interval_ms = max(1, int(settings.KEYWAY_USAGE_FLUSH_INTERVAL * 1000))
        return bool(self.client().set(f"{stream}:turn", self.name, nx=True, px=interval_ms))

    def _read(self, stream: str, start: str, source: str) -> int:
        reply = self.client().xreadgroup(GROUP, self.name, {stream: start}, count=_READ_BATCH)
        return self._write(stream, reply[0][1] if reply else [], source)

    def _claim(self, stream: str, idle_seconds: float) -> int:
        client, done, start = self.client(), 0, "0-0"
        while True:
            next_start, entries, *_ = client.xautoclaim(
                stream, GROUP, self.name, int(idle_seconds * 1000), start, count=_READ_BATCH
            )
            if entries:
                logger.warning("Claimed %d usage events that a lost worker had read and not written", len(entries))
            done += self._write(stream, entries, "claimed")
            start = next_start.decode() if isinstance(next_start, bytes) else next_start
            if start == "0-0":
                break
        # Consumers of processes long gone, with nothing pending: forgotten, so the group stays small.
        for consumer in client.xinfo_consumers(stream, GROUP):
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            if name != self.name and not consumer["pending"] and consumer["idle"] > _FORGET_CONSUMERS_IDLE_MS:
                client.xgroup_delconsumer(stream, GROUP, name)
        return done

    def _write(self, stream: str, entries: list[Any], source: str) -> int:
        if not entries:
            return 0
        ids, events = _decoded(entries)
        if events:
            _write(events)  # raises, leaving them pending with this consumer, if the database fails
            metrics.usage_written(source, len(events))
        pipe = self.client().pipeline(transaction=True)
        pipe.xack(stream, GROUP, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()
        return len(ids)

    def _make_group(self) -> None:
        from redis.exceptions import ResponseError

        for shard in keys.shards():
            try:
                self.client().xgroup_create(keys.usage_stream(shard), GROUP, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise


stream_consumer = _StreamConsumer()


def drain_stream(*, claim_idle: float | None = None, periodic: bool = False) -> int:
    """Write the usage stream's waiting events to the ledger, from this thread (see _StreamConsumer.drain);
    `periodic`: only if it is this worker's turn (the periodic writer)."""
    return stream_consumer.drain(claim_idle=claim_idle, periodic=periodic)


async def write_stream_periodically() -> None:
    """Each worker runs this with Redis: every KEYWAY_USAGE_FLUSH_INTERVAL seconds, on the ledger's writer thread,
    write what the usage stream holds (unless KEYWAY_USAGE_STREAM_WRITER is off: `manage.py usage_writer` does it
    elsewhere), and check the copies this host kept of what it sent against the ledger. The check is this host's
    own, whoever writes the stream: left undone, its copies would pile up for as long as the process lives."""
    from redis.exceptions import RedisError

    while True:
        await asyncio.sleep(settings.KEYWAY_USAGE_FLUSH_INTERVAL)
        try:
            # While Redis is away the events wait there (or in the journals written meanwhile); the copies this
            # host kept are checked against the ledger either way.
            if settings.KEYWAY_USAGE_STREAM_WRITER and breaker.redis.allows():
                await ledger._in_writer_thread(functools.partial(drain_stream, periodic=True))
            await ledger._in_writer_thread(ledger.verify_kept)
        except (OperationalError, InterfaceError) as error:
            logger.warning("Writing usage events from the stream failed (%s); they wait in Redis",
                           type(error).__name__)
            await asyncio.sleep(settings.KEYWAY_USAGE_RETRY_INTERVAL)
        except RedisError as error:
            logger.warning("Reading the usage stream failed (%s); will retry", type(error).__name__)
            await asyncio.sleep(settings.KEYWAY_USAGE_RETRY_INTERVAL)
        except Exception:
            logger.exception("Writing usage events from the stream failed; will retry")
            await asyncio.sleep(settings.KEYWAY_USAGE_RETRY_INTERVAL)


async def stream_events(client: Any, prefix: str, *, limit: int) -> list[SettledUsage] | None:
    """The events in the usage streams (settled, not yet written), oldest first in each shard; None if there
    are more than `limit` (billing.reconcile then leaves the money counters for a later run)."""
    found: list[SettledUsage] = []
    for shard in keys.shards():
        start = "-"
        while True:
            entries = await client.xrange(keys.usage_stream(shard, prefix), min=start, max="+", count=1000)
            if not entries:
                break
            found.extend(_decoded(entries)[1])
            if len(found) > limit:
                return None
            last = entries[-1][0].decode()
            milliseconds, sequence = last.split("-")
            start = f"{milliseconds}-{int(sequence) + 1}"
    return found


async def flush_at_shutdown() -> None:
    await ledger.flush()


async def recover_at_start() -> None:
    # Before the first request seeds the shared counters from the ledger, the ledger should hold what
    # workers that died left in their journals.
    await orm(recover_orphans)
    if settings.REDIS_URL:
        from billing import counters

        try:
            # Registered, and writing the usage stream, before the first request: events that waited in Redis
            # while every worker was down are written now, not when someone next calls the API.
            await counters.store().start()
        except breaker.Unavailable:
            logger.warning("Redis is unreachable at start-up; this worker registers with its first request")


async def verify_at_shutdown() -> None:
    """After the last settlements went to Redis: the ledger has everything this worker kept a copy of, or it
    is written now (the copies stay on disk, replayed as orphans by the host's other workers, if not)."""
    if not settings.REDIS_URL:
        return
    try:
        await ledger.flush()
        await ledger._in_writer_thread(functools.partial(ledger.verify_kept, older_than=0))
    except Exception:
        logger.exception("Could not check the usage this worker sent against the ledger; its copy stays on disk")


def flush_at_exit() -> None:
    # daphne does not speak lifespan, so its workers end without the shutdown hook; write what is buffered
    # while the process can still reach the database. If even this fails, the journal is still on disk.
    if ledger.pending():
        try:
            ledger.flush_sync()
        except Exception:
            logger.exception("Could not write buffered usage at exit; it stays in the journal")
    if settings.REDIS_URL:
        # With Redis, every event this worker settled is in its kept copy: what the ledger lacks of it
        # (settlements the stop left unsent, events in the stream that no consumer has written yet) is written
        # now, as verify_at_shutdown does under lifespan; a consumer that writes the same events later charges
        # nothing twice (idempotent on the call id). After lifespan's shutdown nothing is left to check.
        try:
            ledger.verify_kept(older_than=0)
        except Exception:
            logger.exception("Could not check the usage this worker sent against the ledger; its copy stays on disk")

