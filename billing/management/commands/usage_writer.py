from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import InterfaceError, OperationalError

from billing.ledger import drain_stream
from platform_site.kernel.orm import returns_connection

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Write the shared usage stream to the ledger until stopped (SIGTERM, SIGINT), as every API worker does "
        "unless KEYWAY_USAGE_STREAM_WRITER=0. Run one (or more: they take turns) where the ledger's writing "
        "should spend its CPU, the database's host say, and set KEYWAY_USAGE_STREAM_WRITER=0 on the gateway "
        "hosts. Needs Redis. --once writes what is waiting, then exits."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--once", action="store_true", help="write what is waiting now, then exit")

    def handle(self, *args: Any, once: bool = False, **options: Any) -> None:
        from redis.exceptions import RedisError

        if not settings.REDIS_URL:
            raise CommandError("The usage stream lives in Redis: set REDIS_URL (without it, each worker writes "
                               "its own journal to the ledger).")
        # Connections handed back after each turn, as the workers' writer thread does: one that died with
        # PostgreSQL (a restart) is replaced on the next turn rather than failing every turn after.
        drain = returns_connection(drain_stream)
        stopping = threading.Event()
        if not once:
            for sent in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sent, lambda *_: stopping.set())
        written = 0
        while True:
            try:
                # Not once: a turn a KEYWAY_USAGE_FLUSH_INTERVAL, shared with every other writer, so each writes
                # a whole interval's events in one transaction (billing.ledger._StreamConsumer._my_turn).
                written += drain(periodic=not once)
            except (OperationalError, InterfaceError, RedisError) as error:
                # The events wait in the stream (pending with this consumer, or unread) for the next turn.
                if once:
                    raise CommandError(f"Writing the usage stream failed: {type(error).__name__}") from error
                logger.warning("Writing the usage stream failed (%s); will retry", type(error).__name__)
                if stopping.wait(settings.KEYWAY_USAGE_RETRY_INTERVAL):
                    break
                continue
            if once or stopping.wait(settings.KEYWAY_USAGE_FLUSH_INTERVAL):
                break
        self.stdout.write(f"{written} usage event(s) written from the usage stream.")
