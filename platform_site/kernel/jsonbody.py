"""Reading a JSON request body within bounds, for every API: the lean path's views and DRF's.

orjson reads up to 1,024 levels of nesting but writes only 254, and the standard library's json module
recurses (a deep body is a RecursionError): a body nested a few hundred levels deep was a 500 wherever it
had to be written out again (to an upstream, into a token estimate) or was parsed by DRF. No API field needs
more than a few dozen levels, so deeper bodies are refused as they are read.
"""

from __future__ import annotations

from typing import Any

import orjson
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from platform_site.kernel.errors import ApiError

MAX_DEPTH = 64


class TooDeep(ValueError):
    pass


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise TooDeep if `value` nests more than `limit` containers; iterative, so any depth is safe."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise TooDeep(f"nested more than {limit} levels deep")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def loads(raw: bytes) -> Any:
    """orjson.loads, then the depth check, which only a body with that many brackets can fail (so it costs
    two byte counts for everything else)."""
    value = orjson.loads(raw)
    if isinstance(value, dict | list) and raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:
        check_depth(value)
    return value


def too_deep_error() -> ApiError:
    return ApiError(f"The JSON body is nested more than {MAX_DEPTH} levels deep.", code="invalid_json")


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser on orjson, with the same depth bound."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return loads(stream.read() if stream is not None else b"")
        except orjson.JSONDecodeError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        except TooDeep:
            raise ParseError(too_deep_error().message) from None
