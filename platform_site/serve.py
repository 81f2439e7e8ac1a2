"""`make run`'s server: daphne, on uvloop. `python -m platform_site.serve [daphne's arguments]`.

Two things are added to `daphne`'s own command, both measured with bench/targets.py `daphne` (one process,
concurrency 32, CPU per request):
- uvloop under Twisted's asyncio reactor, when the `fast` extra is installed. daphne builds its event loop
  when `daphne.server` is first imported, from the event loop policy of that moment, so the policy is set
  before daphne's command line is loaded.
- Twisted parses every request's Content-Type header with the email package, to find form bodies: about 5 % of
  the process's samples under load (py-spy). The answer depends only on the header's bytes, and clients send
  few distinct values, so the answers for short values are kept (64 at most; a longer value is parsed each
  time, so no client can make the cache hold much).
- Twisted's own access log line is not written. daphne's HTTP factory inherits it from Twisted's, which formats
  a combined-log line for every request (about 28 µs under cProfile, 10 % of what daphne and Twisted add to a
  request) and hands it to Twisted's log, which daphne sends nowhere below verbosity 2. daphne's access log
  (`--access-log`, on stdout by default at verbosity 1) is untouched: it is the one that says what was served.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable

_CACHED_CONTENT_TYPE_LENGTH = 128


def command(port: int, *, quiet: bool = True) -> list[str]:
    """The command line that serves Keyway this way on 127.0.0.1:`port` (the e2e tests' and benches' daphne);
    `quiet`: daphne's own log at verbosity 0."""
    return [sys.executable, "-m", "platform_site.serve", "-b", "127.0.0.1", "-p", str(port),
            *(["-v", "0"] if quiet else []), "platform_site.asgi:application"]


def use_uvloop() -> bool:
    """uvloop's event loop policy, when uvloop is installed (before daphne is imported)."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def cached_content_types(parse: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    remembered = functools.lru_cache(maxsize=64)(parse)

    @functools.wraps(parse)
    def content_type(line: bytes) -> bytes:
        return remembered(line) if len(line) <= _CACHED_CONTENT_TYPE_LENGTH else parse(line)

    content_type.cache_info = remembered.cache_info  # type: ignore[attr-defined]
    return content_type


def cache_content_types() -> bool:
    """Twisted's Content-Type parsing, remembered (False when this Twisted has no such function to wrap)."""
    from twisted.web import http

    parse = getattr(http, "_parseContentType", None)
    if parse is None or hasattr(parse, "cache_info"):
        return False
    http._parseContentType = cached_content_types(parse)  # type: ignore[assignment]
    return True


def skip_twisted_access_log() -> bool:
    """daphne's HTTP factory without Twisted's per-request log line (False when it has no such method)."""
    from daphne.http_protocol import HTTPFactory

    if not callable(getattr(HTTPFactory, "log", None)):
        return False
    HTTPFactory.log = _no_log  # type: ignore[method-assign]
    return True


def _no_log(factory: object, request: object) -> None:
    """What a request leaves in Twisted's access log: nothing (daphne's own access log says what was served)."""


def main(argv: list[str] | None = None) -> None:
    use_uvloop()
    from daphne.cli import CommandLineInterface

    cache_content_types()
    skip_twisted_access_log()
    CommandLineInterface().run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
