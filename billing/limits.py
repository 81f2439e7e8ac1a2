"""A project's ceilings as the hot path sees them: per-model rate limits and the monthly budget.

OpenAI's project rate limits: every project has, for every model, a requests-per-minute and a
tokens-per-minute ceiling shared by all of its keys (the platform default unless the project lowers or
raises it), and optionally a requests-per-day ceiling. Each key's own RPM and TPM apply as well.

Read from the database at most every KEYWAY_BILLING_LOCAL_TTL seconds per process and project, one query at
a time (single flight); a change is seen at once by the process that made it and by every other within that
time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from platform_site.kernel.conf import settings  # Django's, read faster (the module says why)
from platform_site.kernel.singleflight import SingleFlight


@dataclass(frozen=True, slots=True)
class ModelLimit:
    """One model's ceilings in a project. `requests_per_day` 0 means none."""

    requests_per_minute: int
    tokens_per_minute: int
    requests_per_day: int = 0


@dataclass(frozen=True, slots=True)
class ProjectLimits:
    monthly_budget_micros: int | None
    # Only the models the project changed; every other model takes default_limit().
    models: dict[str, ModelLimit] = field(default_factory=dict)

    def for_model(self, model: str) -> ModelLimit:
        return self.models.get(model) or default_limit()


def default_limit() -> ModelLimit:
    return ModelLimit(settings.KEYWAY_PROJECT_RPM, settings.KEYWAY_PROJECT_TPM)


def effective_limit(
    *, max_requests_per_1_minute: int | None, max_tokens_per_1_minute: int | None, max_requests_per_1_day: int | None
) -> ModelLimit:
    """A stored row's limits with its empty fields filled from the platform default."""
    default = default_limit()
    return ModelLimit(
        requests_per_minute=max_requests_per_1_minute or default.requests_per_minute,
        tokens_per_minute=max_tokens_per_1_minute or default.tokens_per_minute,
        requests_per_day=max_requests_per_1_day or 0,
    )


def _load(project_id: int) -> ProjectLimits:
    from billing.models import ProjectRateLimit
    from platform_site.models import Project

    budget = Project.objects.filter(pk=project_id).values_list("monthly_budget_micros", flat=True).first()
    rows = ProjectRateLimit.objects.filter(project_id=project_id)
    return ProjectLimits(
        monthly_budget_micros=budget,
        models={
            row.model: effective_limit(
                max_requests_per_1_minute=row.max_requests_per_1_minute,
                max_tokens_per_1_minute=row.max_tokens_per_1_minute,
                max_requests_per_1_day=row.max_requests_per_1_day,
            )
            for row in rows
        },
    )


def _ttl() -> float:
    return float(settings.KEYWAY_BILLING_LOCAL_TTL)


_limits: SingleFlight[int, ProjectLimits] = SingleFlight(_load, ttl=_ttl, stale_if_error=True)


def wanted_limits(project_id: int) -> tuple[SingleFlight[int, ProjectLimits], int]:
    """The project's limits, for singleflight.prefetch."""
    return _limits, project_id


async def project_limits(project_id: int) -> ProjectLimits:
    return await _limits.get(project_id)


def forget_project_limits(project_id: int | None = None) -> None:
    """Drop this process's copy (on commit of a change to the project's limits or budget)."""
    _limits.invalidate(project_id)
