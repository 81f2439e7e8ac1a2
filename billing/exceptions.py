"""Errors of metering and limits. Each carries its status, type and code (platform_site.kernel.errors)."""

from __future__ import annotations

import math

from django.conf import settings

from platform_site.kernel.errors import ApiError


class RateLimitExceeded(ApiError):
    """429 rate_limit_exceeded; `kind` is "requests" or "tokens", as OpenAI's error type says. `where` names a
    limit other than the key's own ("for gpt-4o in project proj_…"); `per` is "min" or "day"."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(
        self, *, kind: str, limit: int, retry_after: int, headers: dict[str, str], where: str = "", per: str = "min"
    ) -> None:
        unit = f"{kind} per {per} ({kind[0].upper()}P{per[0].upper()})"
        super().__init__(
            f"Rate limit reached{' ' + where if where else ''} on {unit}: Limit {limit}. "
            f"Please try again in {retry_after}s.",
            error_type=kind,
            headers={**headers, "Retry-After": str(retry_after)},
        )
        self.kind = kind
        self.retry_after = retry_after


class BillingError(ApiError):
    """A billing change that cannot be made (bad amount, missing reason)."""

    code = "invalid_value"


class QuotaExceeded(ApiError):
    """429: the request's worst-case cost does not fit. `code` says what ran out: insufficient_quota (prepaid
    credit), organization_budget_exceeded, project_budget_exceeded or key_budget_exceeded (a monthly spend
    cap). No Retry-After: waiting does not help, someone has to add credit or raise a cap."""

    status = 429
    error_type = "insufficient_quota"

    MESSAGES = {
        "insufficient_quota": (
            "You exceeded your current quota, please check your plan and billing details. Your organization's "
            "prepaid credit does not cover this request's worst-case cost."
        ),
        "organization_budget_exceeded": (
            "Your organization has reached its monthly spend cap. Ask an administrator to raise it, or wait "
            "for the next calendar month (UTC)."
        ),
        "key_budget_exceeded": (
            "This API key has reached its monthly spend cap. Raise the key's cap in Settings → API Keys, or "
            "wait for the next calendar month (UTC)."
        ),
        "project_budget_exceeded": (
            "This API key's project has reached its monthly spend cap. Ask an administrator to raise it in "
            "Settings → Projects, or wait for the next calendar month (UTC)."
        ),
    }

    def __init__(self, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(self.MESSAGES[code], code=code, headers=headers)


class CountersUnavailable(ApiError):
    """503: the shared counters (Redis) cannot be reached, and the request needs them: `billing_unavailable`
    where it reserves against prepaid credit or a spend cap (always refused: nobody may overspend during an
    outage), `rate_limits_unavailable` where only rate limits count it and KEYWAY_RATE_LIMITS_WITHOUT_REDIS is
    "closed". Retry-After says when this worker tries Redis again."""

    status = 503
    error_type = "server_error"

    MESSAGES = {
        "billing_unavailable": (
            "Keyway cannot check your organization's credit and spend caps right now (a backing service is "
            "unavailable), so it does not start this request. Please retry shortly."
        ),
        "rate_limits_unavailable": (
            "Keyway cannot count this request against its rate limits right now (a backing service is "
            "unavailable), so it does not start it. Please retry shortly."
        ),
    }

    def __init__(self, code: str) -> None:
        retry_after = max(math.ceil(settings.KEYWAY_REDIS_RETRY_AFTER), 1)
        super().__init__(self.MESSAGES[code], code=code, headers={"Retry-After": str(retry_after)})


class TooManySessions(ApiError):
    """429: the key already holds as many open realtime sessions as it may (KEYWAY_REALTIME_SESSIONS_PER_KEY),
    counted across every worker."""

    status = 429
    error_type = "requests"
    code = "concurrent_sessions_exceeded"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"This API key already has {limit} open realtime sessions, the most it may hold at once. Close one "
            "and try again."
        )
