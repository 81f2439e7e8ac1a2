"""ASGI entry point: the API under /v1 and /api/v1 on a lean handler, everything else on Django's full stack;
WebSockets go to the realtime surface (completions.realtime.routing).

The lean handler runs no middleware: sessions, auth, messages and CSRF cost more than the whole proxy hop
(measured: ~1.8 ms, 1,029 → 379 req/s) and mean nothing to a bearer-token API. API views do their own
request ids, authentication and error mapping (completions.api.http).
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "platform_site.settings")

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.utils.module_loading import import_string  # noqa: E402

# Django must be set up before anything imports models, so the dashboard app is built first.
dashboard_app = get_asgi_application()

from platform_site.api_handler import ApiHandler  # noqa: E402
from platform_site.kernel import heap, loops, process  # noqa: E402

api_app = ApiHandler()
# Webhook ingress (/hooks/<name>) is the API's too: no cookies, no CSRF, its own signature.
_API_PREFIXES = ("/v1/", "/api/v1/", "/hooks/")
# The management API lives under /v1 but needs sessions and CSRF (dashboard users call it), so it takes the
# full stack; it is not a hot path.
_MANAGEMENT_PREFIX = "/v1/organization/"


async def http_app(scope, receive, send):  # type: ignore[no-untyped-def]
    heap.request_served()
    path = scope["path"]
    if (path.startswith(_API_PREFIXES) or path in ("/v1", "/api/v1")) and not path.startswith(_MANAGEMENT_PREFIX):
        await api_app(scope, receive, send)
    else:
        await dashboard_app(scope, receive, send)


# Named in settings, as the URL conf is: wiring may name the apps above it, never import them.
_router = ProtocolTypeRouter({"http": http_app, "websocket": import_string(settings.WEBSOCKET_APPLICATION)})


# Everything built so far lives as long as the process: out of the garbage collector's sight from now on.
heap.watch_pauses()
heap.freeze()
heap.collect_young_less_often()


async def _lifespan(receive, send):  # type: ignore[no-untyped-def]
    # uvicorn speaks lifespan, daphne does not. Start-up hooks are chores that are also done otherwise (the
    # ledger replays orphaned journals here, and from its periodic flush); shutdown writes what is buffered,
    # then closes this loop's pools and clients.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await process.run_startup_hooks()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await process.run_shutdown_hooks()
            await loops.close_all()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        await _router(scope, receive, send)
