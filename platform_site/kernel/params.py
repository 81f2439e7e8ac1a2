"""Checks of what arrives in URLs, shared by every view that reads a number or a string from one.

Python's `str.isdigit()` and `int()` accept far more than ASCII digits ('²', '١٢', '１２'), and PostgreSQL
refuses a NUL byte in any string and an integer past 2^63: each was a 500 before these checks. A view asks
`whole_number()` for a number, and NUL bytes never get past `nul_byte_param()`, which both request paths
(the lean API handler and the middleware of the full stack) run first.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from platform_site.kernel.errors import ApiError

BIGINT_MAX = 2**63 - 1


def whole_number(raw: str, *, maximum: int = BIGINT_MAX) -> int | None:
    """The integer that `raw` spells in ASCII digits, if it is at most `maximum`; None otherwise."""
    if not raw or len(raw) > 19 or not (raw.isascii() and raw.isdigit()):
        return None
    value = int(raw)
    return value if value <= maximum else None


def nul_byte_param(path: str, query_string: str) -> str | None:
    """Where a NUL byte is, if there is one: "path", or the query parameter holding it."""
    if "\x00" in path:
        return "path"
    if "%00" not in query_string and "\x00" not in query_string:
        return None
    for name, value in parse_qsl(query_string, keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return name.replace("\x00", "") or "query"
    return "query"


def nul_byte_error(param: str) -> ApiError:
    where = "The URL path" if param == "path" else f"The query parameter '{param}'"
    return ApiError(f"{where} contains a NUL byte.", param=None if param == "path" else param,
                    code="invalid_value")
