"""Getting settled requests into the usage ledger: off the hot path, in batches, and never lost.

A settled request is first appended, as one line, to this process's journal file (one `write` to a file
the process holds an exclusive lock on), then kept in memory. A background task writes the batch to the
database in one transaction every KEYWAY_USAGE_FLUSH_INTERVAL seconds (sooner when KEYWAY_USAGE_FLUSH_BATCH
events are waiting): before it writes, it starts a new journal file, and it deletes the old one only after
the transaction has committed.

So a crash at any point loses nothing and charges nothing twice:
- before the commit, the events are still in the journal, which the lock marks as orphaned once the
  process is gone; any worker (or `manage.py usage_recover`) replays orphaned journals;
- after the commit but before the old journal is deleted, the replay finds the events already written and
  skips them: the writer is idempotent on the request id and charges only what it inserts.
On a clean stop (lifespan shutdown, or process exit under daphne) the buffer is written at once.

Rows per request: one, in a transaction shared with every other request of the batch, so under load the
database sees one write per flush interval rather than one per request.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
from django.conf import settings
from django.db import DataError, IntegrityError, InterfaceError, OperationalError

from billing.alerts import spend_alerts_after_usage
from billing.services import SettledUsage, usage_events_write
from platform_site.kernel.orm import orm, returns_connection

logger = logging.getLogger(__name__)

_SUFFIX = ".usage"
# Events the database refused, one JSON line each, beside the journals (not a journal: never replayed).
_REJECTED = "rejected.usage-rows"
_RECOVER_EVERY = 60.0


class _JournalFile:
    def __init__(self, directory: Path, sequence: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{int(time.time() * 1000)}-{sequence}{_SUFFIX}"
        self.path = directory / name
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # Held for as long as this process lives: a journal nobody holds belongs to a process that died.
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.events: list[SettledUsage] = []

    def append(self, event: SettledUsage) -> None:
        os.write(self.fd, orjson.dumps(event.as_row()) + b"\n")
        self.events.append(event)

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
        """Write everything journaled so far (background task, shutdown, tests)."""
        if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
            # SQLite has one writer at a time anyway; writing from the thread every other ORM call of the
            # process uses avoids lock contention between threads inside the process.
            await orm(self.flush_sync)
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-ledger")
            await asyncio.get_running_loop().run_in_executor(self._executor, self.flush_sync)

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


# What one row can do wrong, as opposed to the database being unreachable: a reference that no longer holds
# (IntegrityError), or a value no column can take (DataError on PostgreSQL; SQLite's driver raises
# OverflowError for an integer past 64 bits).
_BAD_ROW = (IntegrityError, DataError, OverflowError)


@returns_connection
def _write(events: list[SettledUsage], directory: Path | None = None) -> None:
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


async def flush_at_shutdown() -> None:
    await ledger.flush()


async def recover_at_start() -> None:
    # Before the first request seeds the shared counters from the ledger, the ledger should hold what
    # workers that died left in their journals.
    await orm(recover_orphans)


def flush_at_exit() -> None:
    # daphne does not speak lifespan, so its workers end without the shutdown hook; write what is buffered
    # while the process can still reach the database. If even this fails, the journal is still on disk.
    if ledger.pending():
        try:
            ledger.flush_sync()
        except Exception:
            logger.exception("Could not write buffered usage at exit; it stays in the journal")

