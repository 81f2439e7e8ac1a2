"""The interface every provider implements, and the errors a provider may raise.

Providers hold no ORM: they receive plain configuration and plain request dicts, and return OpenAI-shaped
dicts. The engine owns ids, public model names, usage policy and normalisation. Their errors are ApiErrors
(platform_site.kernel.errors): each already says which status, type and code the client should see.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from platform_site.kernel.errors import ApiError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    kind: str
    base_url: str = ""
    api_key: str = field(default="", repr=False)
    extra_headers: tuple[tuple[str, str], ...] = ()
    timeout: float | None = None


@dataclass(slots=True)
class ChatCall:
    """One chat request as a provider sees it: the upstream model name and the OpenAI wire body (the known
    fields, checked, and the extra ones this deployment allows), with the parsed facts a provider that runs
    the model itself needs."""

    upstream_model: str
    body: dict[str, Any]
    request_id: str
    # The deployment's own timeout, over the provider's and the global default.
    timeout: float | None = None
    # The output limit per choice (max_completion_tokens, else max_tokens); None: what the context leaves.
    max_tokens: int | None = None
    n: int = 1
    # Opaque labels of who asks (organization, key), for sharing a provider's own capacity fairly between
    # tenants; never sent anywhere.
    organization: str = ""
    key: str = ""


@dataclass(slots=True)
class EmbeddingsCall:
    """`body["input"]` is normalised to a list whose items are strings or lists of token ids."""

    upstream_model: str
    body: dict[str, Any]
    request_id: str
    context_length: int
    timeout: float | None = None
    organization: str = ""
    key: str = ""


class ChatProvider(Protocol):
    async def chat(self, call: ChatCall) -> dict[str, Any]:
        """Return a `chat.completion` object (id, model and created are rewritten by the caller)."""

    def chat_stream(self, call: ChatCall) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Yield `chat.completion.chunk` objects in batches: each batch (never empty) holds the chunks that
        arrived together, in order, so that they can be relayed together. The last chunk carries `usage` when
        the backend knows it. Closing the iterator early must stop the generation upstream."""

    async def embeddings(self, call: EmbeddingsCall) -> dict[str, Any]:
        """Return an embeddings `list` object."""

    def loaded_models(self) -> list[str]:
        """Models this provider holds in memory in this process (empty for remote providers)."""


class LoadedOnce(Generic[T]):
    """Models an embedded provider holds in memory: each loaded lazily, once per process, off the event
    loop, however many requests ask for it at the same moment."""

    def __init__(self, load: Callable[[str], T]) -> None:
        self._load = load
        self._items: dict[str, T] = {}
        self._lock = threading.Lock()

    def get_sync(self, name: str) -> T:
        item = self._items.get(name)
        if item is None:
            with self._lock:
                item = self._items.get(name)
                if item is None:
                    item = self._items[name] = self._load(name)
        return item

    async def get(self, name: str) -> T:
        item = self._items.get(name)
        if item is None:
            item = await asyncio.to_thread(self.get_sync, name)
        return item

    def items(self) -> dict[str, T]:
        return dict(self._items)

    def clear(self) -> None:
        self._items.clear()


class ProviderError(ApiError):
    """An upstream failure, already classified as the OpenAI error the client should see."""

    status = 502
    error_type = "upstream_error"
    code: str | None = "upstream_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param)


class UpstreamTimeout(ProviderError):
    """The upstream did not finish in time. It was working on the request meanwhile, so the call is charged
    for the prompt, and for what it produced where the provider knows (`usage`, OpenAI's usage object)."""

    status = 504
    error_type = "timeout_error"
    code = "upstream_timeout"
    usage: dict[str, int] | None = None


class UpstreamUnavailable(ProviderError):
    """Connection refused or reset, a 5xx, or a body that is not what the protocol promises."""


class UpstreamRejected(ProviderError):
    """The upstream answered 4xx: its error is passed on with its status, in OpenAI's shape."""

    def __init__(
        self, message: str, *, status: int, error_type: str, code: str | None, param: str | None
    ) -> None:
        ApiError.__init__(self, message, status=status, error_type=error_type, param=param)
        # The upstream's own code, even none: it is not ours to fill in.
        self.code = code


class ProviderBusy(ProviderError):
    """No capacity for this call now, though nothing failed: 503 `server_overloaded`, or 429
    `rate_limit_exceeded` when it is the caller's own share that is used up. Another deployment may have
    room; this one's circuit is not counted against."""

    status = 503
    error_type = "server_error"
    code = "server_overloaded"

    def __init__(self, message: str, *, retry_after: int, status: int = 503) -> None:
        super().__init__(message)
        self.status = status
        if status == 429:
            self.error_type, self.code = "requests", "rate_limit_exceeded"
        self.headers = {"Retry-After": str(retry_after)}


class UnsupportedByModel(ProviderError):
    status = 400
    error_type = "invalid_request_error"
    code = "unsupported_model_capability"
