"""Structured logs: one JSON object per line, with the request id of the request being served.

`current_request_id` is set where a request gets its id (the API's endpoint wrapper, the dashboard's
middleware); every line logged while it is served carries it. What is logged is only what the message
says: no record attribute is dumped wholesale, so nothing a caller did not mean to log (a header, a body)
can slip in.
"""

from __future__ import annotations

import contextvars
import logging
import time

import orjson

current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()
