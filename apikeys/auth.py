"""Bearer-key authentication for the API (REST and WebSocket), built for the hot path.

A key is looked up in three tiers: an in-process dict trusted for KEYWAY_KEY_LOCAL_TTL (0.5 s by default),
the shared cache (Redis in production), then the database. Revoke and rotate delete the shared entry on
commit, so every worker sees the change once its local copy ages out: within a second. Where the cache is
process-local (the embedded default) the shared tier is skipped and the database is asked instead, because
a revocation made by another process (the CLI) could not reach a process-local cache.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from django.core.cache import cache, caches
from django.core.cache.backends.locmem import LocMemCache
from django.utils import timezone

from apikeys import keyformat, throttle
from apikeys.exceptions import InvalidApiKey, MissingScope, ModelNotAllowed, TooManyFailedAuthentications
from platform_site.kernel import breaker
from platform_site.kernel.conf import settings  # Django's, read faster (the module says why)
from platform_site.kernel.orm import orm
from platform_site.kernel.singleflight import SingleFlight

logger = logging.getLogger(__name__)

_LAST_USED_EVERY = 60.0
_INVALID_MESSAGE = "Incorrect API key provided. You can find your API keys in Settings → API Keys."


@dataclass(frozen=True, slots=True)
class AuthenticatedKey:
    """What the API knows about the caller after authentication. Holds no secret."""

    id: int
    public_id: str
    name: str
    organization_id: int
    organization_slug: str
    pinned_model: str
    scopes: frozenset[str]
    allowed_models: frozenset[str]
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    monthly_budget_micros: int | None = None
    # None for an admin key, which belongs to no project.
    project_id: int | None = None
    project_public_id: str = ""

    def require_scope(self, scope: str) -> None:
        if scope not in self.scopes:
            raise MissingScope(scope)

    def may_use_model(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def require_model(self, model: str) -> None:
        if not self.may_use_model(model):
            raise ModelNotAllowed(model)


@dataclass(frozen=True, slots=True)
class _KeyRecord:
    """The cached form of a key row: enough to verify a secret and decide validity without a query."""

    key: AuthenticatedKey
    secret_hash: str
    previous_secret_hash: str
    previous_valid_until: float | None
    expires_at: float | None
    revoked: bool
    last_used_at: float | None


_LOCAL_MAX = 50_000
_background: set[asyncio.Task[None]] = set()


def _cache_key(public_id: str) -> str:
    return f"apikey:{public_id}"


def _shared_cache_is_process_local() -> bool:
    return isinstance(caches["default"], LocMemCache)


def _timestamp(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _query_record(public_id: str) -> _KeyRecord | None:
    # Imported here because the model registry is not ready when this module is first imported by services.
    from apikeys.models import ApiKey

    row = (
        ApiKey.objects.select_related("organization", "project")
        .filter(public_id=public_id)
        .only(
            "id", "public_id", "name", "secret_hash", "previous_secret_hash", "previous_secret_expires_at",
            "scopes", "allowed_models", "expires_at", "revoked_at", "last_used_at", "rpm_limit", "tpm_limit",
            "monthly_budget_micros", "organization__id", "organization__slug", "organization__pinned_model",
            "project__id", "project__public_id", "project__archived_at",
        )
        .first()
    )
    if row is None:
        return None
    return _KeyRecord(
        key=AuthenticatedKey(
            id=row.id,
            public_id=row.public_id,
            name=row.name,
            organization_id=row.organization.id,
            organization_slug=row.organization.slug,
            pinned_model=row.organization.pinned_model,
            scopes=frozenset(row.scopes),
            allowed_models=frozenset(row.allowed_models),
            rpm_limit=row.rpm_limit,
            tpm_limit=row.tpm_limit,
            monthly_budget_micros=row.monthly_budget_micros,
            project_id=row.project.id if row.project is not None else None,
            project_public_id=row.project.public_id if row.project is not None else "",
        ),
        secret_hash=row.secret_hash,
        previous_secret_hash=row.previous_secret_hash,
        previous_valid_until=_timestamp(row.previous_secret_expires_at),
        expires_at=_timestamp(row.expires_at),
        # A key of an archived project is refused like a revoked one (archiving forgets the cached copies).
        revoked=row.revoked_at is not None or (row.project is not None and row.project.archived_at is not None),
        last_used_at=_timestamp(row.last_used_at),
    )


_MISSING = "missing"


def _generation_key(public_id: str) -> str:
    return f"apikey-gen:{public_id}"


def _fetch_record(
    public_id: str, *, load: Callable[[str], _KeyRecord | None] = _query_record
) -> _KeyRecord | None:
    """Shared cache, then database. Runs in a worker thread (through orm(), which hands the connection
    back), or inside Django's request cycle (authenticate_key_sync), whose connection Django closes.

    A cached copy is stamped with the key's generation as it was read before the database was: a change
    sets a new generation, so a copy loaded before a revocation committed, and written after it, is never
    trusted (it would otherwise have served a revoked key for KEYWAY_KEY_CACHE_TTL)."""
    if _shared_cache_is_process_local():
        return load(public_id)
    if _uninvalidated and breaker.redis.allows():
        _invalidate_again()  # for the other processes, which may not have noticed the outage
    if _shared_cache_suspect():
        return load(public_id)
    record_key, generation_key = _cache_key(public_id), _generation_key(public_id)
    found = cache.get_many([record_key, generation_key])
    generation = found.get(generation_key)
    cached = found.get(record_key)
    if isinstance(cached, tuple) and len(cached) == 2 and cached[0] == generation:
        return None if cached[1] == _MISSING else cached[1]
    record = load(public_id)
    # Unknown ids are remembered briefly only: a key created a moment later must start working quickly.
    if record is None:
        cache.set(record_key, (generation, _MISSING), timeout=2)
    else:
        cache.set(record_key, (generation, record), timeout=settings.KEYWAY_KEY_CACHE_TTL)
    return record


def _shared_cache_suspect() -> bool:
    """Whether this process saw Redis fail within a key-cache lifetime: a revocation made meanwhile may not
    have reached the shared copy, which Redis could still hold when it returns, so the database answers."""
    return breaker.redis.failed_within(settings.KEYWAY_KEY_CACHE_TTL)


# Keys whose shared copies this process could not forget (Redis was down): forgotten on its return.
_uninvalidated: set[str] = set()


def _forget_shared_copy(public_id: str) -> bool:
    failures = breaker.redis.last_failure
    cache.set(_generation_key(public_id), secrets.token_hex(8), timeout=settings.KEYWAY_KEY_CACHE_TTL + 600)
    cache.delete(_cache_key(public_id))
    return breaker.redis.last_failure == failures and breaker.redis.down_since is None


def _invalidate_again() -> None:
    for public_id in list(_uninvalidated):
        if not _forget_shared_copy(public_id):
            return
        _uninvalidated.discard(public_id)


def _local_ttl() -> float:
    return float(settings.KEYWAY_KEY_LOCAL_TTL)


# The in-process tier. A record of None means "no such key", cached like any other answer so unknown ids
# cannot hammer the database.
_records: SingleFlight[str, _KeyRecord | None] = SingleFlight(_fetch_record, ttl=_local_ttl, max_entries=_LOCAL_MAX)


def invalidate_cached_key(public_id: str) -> None:
    """Forget every cached copy of a key that this process can reach, and make any copy being loaded right
    now untrusted (a new generation, outliving every copy stamped with the old one). Called on commit of a
    key change."""
    _records.invalidate(public_id)
    if not _shared_cache_is_process_local() and not _forget_shared_copy(public_id):
        # Redis is down: this process reads keys from the database until KEYWAY_KEY_CACHE_TTL after it
        # returns, and forgets the shared copy on its next lookup once it is back.
        _uninvalidated.add(public_id)
        logger.warning("Could not forget the shared cached copy of key %s: Redis is unreachable", public_id)


def _mark_used(key_id: int, public_id: str) -> None:
    from apikeys.models import ApiKey

    # The shared cache makes "at most once a minute" hold across worker processes too.
    if not cache.add(f"apikey-used:{public_id}", 1, timeout=int(_LAST_USED_EVERY)):
        return
    ApiKey.objects.filter(pk=key_id).update(last_used_at=timezone.now())


def _schedule_touch(record: _KeyRecord) -> None:
    task = asyncio.get_running_loop().create_task(orm(_mark_used, record.key.id, record.key.public_id))
    _background.add(task)
    task.add_done_callback(_background.discard)


_last_touch: dict[str, float] = {}


def forget_last_touches() -> None:
    """Forget when keys were last marked used, and the keys whose shared copies are still to forget (tests)."""
    _last_touch.clear()
    _uninvalidated.clear()


def parse_bearer(header: str | None) -> str:
    if not header:
        raise InvalidApiKey(
            "You didn't provide an API key. Provide it in the Authorization header as 'Bearer YOUR_KEY'."
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidApiKey("The Authorization header must be 'Bearer YOUR_KEY'.")
    return token.strip()


def _verified(record: _KeyRecord | None, public_id: str, secret: str) -> tuple[float, _KeyRecord]:
    """The record if it is live and the secret (or, within its grace period, the previous secret) matches;
    InvalidApiKey otherwise. Returns the time the check was made at, too."""
    if record is None or record.revoked:
        raise InvalidApiKey(_INVALID_MESSAGE)
    now = time.time()
    if record.expires_at is not None and now >= record.expires_at:
        raise InvalidApiKey(_INVALID_MESSAGE)
    if not keyformat.secret_matches(public_id, secret, record.secret_hash):
        still_in_grace = record.previous_valid_until is not None and now < record.previous_valid_until
        if not (still_in_grace and keyformat.secret_matches(public_id, secret, record.previous_secret_hash)):
            raise InvalidApiKey(_INVALID_MESSAGE)
    return now, record


async def authenticate_key(raw_key: str) -> AuthenticatedKey:
    """Return the key behind a raw secret, or raise InvalidApiKey. Malformed keys never reach a query."""
    parsed = keyformat.parse_key(raw_key)
    if parsed is None:
        raise InvalidApiKey(_INVALID_MESSAGE)
    public_id, secret = parsed
    # Single flight: when a busy key's local copy expires, every request in flight sees it at once; they
    # share one lookup instead of queueing dozens of identical queries.
    now, record = _verified(await _records.get(public_id), public_id, secret)
    last = _last_touch.get(public_id, record.last_used_at or 0.0)
    if now - last >= _LAST_USED_EVERY:
        if len(_last_touch) >= _LOCAL_MAX:
            _last_touch.clear()
        _last_touch[public_id] = now
        _schedule_touch(record)
    return record.key


async def authenticate_from(address: str, raw_key: Callable[[], str]) -> AuthenticatedKey:
    """authenticate_key for a client at `address`: its failures are counted, and an address past its limit
    is refused before any lookup (apikeys.throttle). `raw_key` may itself refuse (a malformed header)."""
    if address:
        wait = throttle.retry_after(address)
        if wait is not None:
            raise TooManyFailedAuthentications(wait)
    try:
        return await authenticate_key(raw_key())
    except InvalidApiKey:
        if address:
            throttle.record_failure(address)
        raise


async def authenticate_header(header: str | None, *, address: str = "") -> AuthenticatedKey:
    """The key in an Authorization header (counted against `address` where it is given)."""
    return await authenticate_from(address, lambda: parse_bearer(header))


def authenticate_key_sync(raw_key: str) -> AuthenticatedKey:
    """authenticate_key for synchronous code inside Django's request cycle (the DRF management API).

    The same checks on the same record, fetched through the shared cache. The in-process tier and the
    single flight are left out: they exist for the hot path's request rates, and they belong to one event
    loop. The request's own database connection is used, and Django returns it when the request ends.
    """
    parsed = keyformat.parse_key(raw_key)
    if parsed is None:
        raise InvalidApiKey(_INVALID_MESSAGE)
    public_id, secret = parsed
    now, record = _verified(_fetch_record(public_id, load=_query_record), public_id, secret)
    if now - (record.last_used_at or 0.0) >= _LAST_USED_EVERY:
        _mark_used(record.key.id, public_id)
    return record.key


def key_for_service(public_id: str) -> AuthenticatedKey:
    """A key as the platform itself uses it, without its secret (a webhook's turns run under the key made for
    the hook): refused like any other if it was revoked, has expired, or its project was archived."""
    record = _query_record(public_id)
    if record is None or record.revoked or (record.expires_at is not None and record.expires_at <= time.time()):
        raise InvalidApiKey(_INVALID_MESSAGE)
    return record.key
