"""Which deployment answers: balancing, provider preferences, fallbacks and a circuit breaker.

A public model may have several deployments. Requests go to the lowest priority number first, spread by
weight among equals; on a 429, a 5xx, a connection error or a timeout the next one is tried, then the next
model of the request's `models` list. A deployment that fails KEYWAY_BREAKER_FAILURES times in a row is taken
out for KEYWAY_BREAKER_COOLDOWN seconds, then given one trial request. The breaker is per worker process:
each worker learns on its own, which costs a few failed attempts per worker and no shared state on the hot
path.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from django.conf import settings

from completions.engine.catalog import CatalogEntry, DeploymentEntry
from completions.engine.requests import Preferences
from completions.providers.base import (
    ProviderBusy,
    ProviderError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from platform_site.kernel import metrics
from platform_site.kernel.errors import ApiError

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class _Breaker:
    failures: int = 0
    open_until: float = 0.0


_breakers: dict[int, _Breaker] = {}


def is_open(deployment: DeploymentEntry) -> bool:
    breaker = _breakers.get(deployment.id)
    return breaker is not None and time.monotonic() < breaker.open_until


def record_success(deployment: DeploymentEntry) -> None:
    _breakers.pop(deployment.id, None)


def record_failure(deployment: DeploymentEntry) -> None:
    breaker = _breakers.setdefault(deployment.id, _Breaker())
    breaker.failures += 1
    if breaker.failures >= settings.KEYWAY_BREAKER_FAILURES:
        # Open (again, after a failed trial): the deployment sits out the cool-down.
        breaker.open_until = time.monotonic() + settings.KEYWAY_BREAKER_COOLDOWN


def reset_breakers() -> None:
    _breakers.clear()


def _balanced(deployments: list[DeploymentEntry]) -> list[DeploymentEntry]:
    """Priority groups in order; within a group a weighted random order (Efraimidis–Spirakis), so traffic
    splits by weight and every deployment of the group is still a fallback for the others."""

    def key(deployment: DeploymentEntry) -> tuple[int, float]:
        if deployment.weight <= 0:
            return (deployment.priority, float("inf"))
        return (deployment.priority, -(random.random() ** (1.0 / deployment.weight)))  # noqa: S311 - not crypto

    return sorted(deployments, key=key)


def plan(entry: CatalogEntry, preferences: Preferences) -> list[DeploymentEntry]:
    """The deployments of one model in the order to try them."""
    candidates = [
        deployment
        for deployment in entry.deployments
        if (not preferences.only or deployment.provider_name in preferences.only)
        and deployment.provider_name not in preferences.ignore
    ]
    if preferences.order:
        ranked = [d for name in preferences.order for d in candidates if d.provider_name == name]
        if preferences.allow_fallbacks:
            ranked += [d for d in _balanced(candidates) if d not in ranked]
        ordered = ranked
    else:
        ordered = _balanced(candidates)
        if not preferences.allow_fallbacks:
            ordered = ordered[:1]
    # Deployments whose circuit is open go last: tried only when everything else has failed too.
    return [d for d in ordered if not is_open(d)] + [d for d in ordered if is_open(d)]


def _error_kind(error: ProviderError) -> str:
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamUnavailable):
        return "unavailable"
    return f"http_{error.status}"


def is_retryable(error: ProviderError) -> bool:
    if isinstance(error, UpstreamTimeout | UpstreamUnavailable):
        return True
    return isinstance(error, UpstreamRejected) and error.status == 429


async def first_success(
    attempts: list[tuple[CatalogEntry, DeploymentEntry]],
    call: Callable[[CatalogEntry, DeploymentEntry], Awaitable[T]],
) -> tuple[T, CatalogEntry, DeploymentEntry]:
    """Try each (model, deployment) in turn until one answers; errors that a retry cannot fix end it."""
    last_error: ProviderError | None = None
    for entry, deployment in attempts:
        try:
            result = await call(entry, deployment)
        except ProviderBusy as error:
            # Full, not failing: the next deployment may have room, and this one's circuit stays closed.
            metrics.upstream_error(deployment.provider_name, "busy")
            last_error = error
            continue
        except ProviderError as error:
            kind = _error_kind(error)
            metrics.upstream_error(deployment.provider_name, kind)
            # What failed, never what was sent: the provider's name and the kind of failure.
            logger.warning("Upstream attempt failed: provider %s, %s", deployment.provider_name, kind)
            if not is_retryable(error):
                raise
            record_failure(deployment)
            last_error = error
            continue
        record_success(deployment)
        return result, entry, deployment
    if last_error is not None:
        raise last_error
    raise ApiError(
        "No deployment of this model matches the request's provider preferences.",
        status=404,
        param="provider",
        code="no_deployment_available",
    )
