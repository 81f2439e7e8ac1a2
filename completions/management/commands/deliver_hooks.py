from __future__ import annotations

import asyncio
from typing import Any

from django.core.management.base import BaseCommand

from agents.hooks import deliveries_left_behind
from completions.api.hooks import deliver
from platform_site.kernel import loops
from platform_site.kernel.orm import orm


class Command(BaseCommand):
    help = (
        "Deliver webhook replies whose server process stopped before their callback succeeded: each gets the "
        "attempts it has left (run it every few minutes, e.g. from cron)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        async def run() -> int:
            left = await orm(deliveries_left_behind)
            try:
                for delivery in left:
                    await deliver(delivery_id=delivery.delivery_id, url=delivery.url, secret=delivery.secret,
                                  reply=delivery.reply, first_attempt=delivery.attempts + 1)
            finally:
                await loops.close_all()  # this loop's HTTP sessions, before asyncio.run closes it
            return len(left)

        self.stdout.write(f"Retried {asyncio.run(run())} callback deliveries.")
