"""The management API's routes as drf-spectacular documents them: under their public prefix."""

from __future__ import annotations

from django.urls import include, path

urlpatterns = [path("v1/organization/", include("dashboard.admin_api.urls"))]
