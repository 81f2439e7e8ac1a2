"""The billing API's routes as drf-spectacular documents them: under their public prefix, described by
billing.schema (imported here, so any document built from this URLconf has the descriptions)."""

from __future__ import annotations

from django.urls import include, path

import billing.schema  # noqa: F401 - registers the views' descriptions with drf-spectacular

urlpatterns = [path("api/billing/", include("billing.urls"))]
