"""Monthly statements as documents: which months an organization has one for, and a statement's HTML as a PDF.

The PDF is WeasyPrint's rendering of the very HTML the statement page serves (the dashboard's statement template
in its print layout), so the page and the download cannot disagree. WeasyPrint was chosen over xhtml2pdf for what
it draws: real table layout, any script through fontconfig's fallback fonts (an organization's name or a credit's
reason need not be Latin-1), page numbers from CSS. Its cost is a system library, Pango >= 1.44, which it opens
on first use; so it is imported here, on the first PDF, and a server without Pango starts and serves everything
else while a PDF answers that it cannot be made (PdfUnavailable).
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from django.db.models import Min
from django.utils import timezone

from billing.exceptions import BillingError
from billing.models import CreditEntry, UsageDaily
from platform_site.models import Organization

# The first month a statement may be asked for: nothing was billed before, and it bounds what a URL can ask.
FIRST_MONTH = date(2000, 1, 1)


class PdfUnavailable(BillingError):
    """This server cannot make PDFs: WeasyPrint could not load the system's Pango."""

    status = 503
    code = "pdf_unavailable"


def statement_months(*, organization: Organization, now: datetime | None = None) -> list[date]:
    """The first day of every month from the organization's first usage or credit to the current month (UTC),
    newest first; [] when it has neither."""
    current = (now or timezone.now()).astimezone(UTC).date().replace(day=1)
    first_usage = UsageDaily.objects.filter(organization=organization).aggregate(first=Min("day"))["first"]
    first_credit = CreditEntry.objects.filter(organization=organization).aggregate(first=Min("created_at"))["first"]
    starts = [day for day in (first_usage, first_credit.astimezone(UTC).date() if first_credit else None) if day]
    if not starts:
        return []
    month = max(min(starts).replace(day=1), FIRST_MONTH)
    months = []
    while month <= current:
        months.append(month)
        month = date(month.year + 1, 1, 1) if month.month == 12 else date(month.year, month.month + 1, 1)
    return months[::-1]


def statement_pdf(*, html: str) -> bytes:
    """The PDF of a statement's HTML (a whole document with its styles inline). Loads nothing from anywhere: the
    document names no URL, and the fetcher refuses any it might name, so rendering can read no file and reach
    no host."""
    try:
        from weasyprint import HTML
        from weasyprint.urls import URLFetcher
    except (OSError, ImportError) as error:
        # WeasyPrint opens Pango with dlopen when it is imported (OSError without it); ImportError is WeasyPrint
        # itself missing from an install that skipped it.
        raise PdfUnavailable(
            "This server cannot make PDFs: it lacks the Pango library WeasyPrint needs (on Debian or Ubuntu: "
            "apt-get install libpango-1.0-0 libpangoft2-1.0-0). The statement page has the same numbers."
        ) from error
    return bytes(HTML(string=html, url_fetcher=URLFetcher(allowed_protocols=())).write_pdf())
