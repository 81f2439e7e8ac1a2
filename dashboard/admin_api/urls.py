"""Routes of the management API, mounted at /v1/organization/ and served by Django's full stack (sessions and
CSRF for dashboard users; admin keys need neither). Paths follow OpenAI's Admin API."""

from __future__ import annotations

from django.urls import path, re_path

from billing.errors import OpenApiDocumentView, unknown_route
from dashboard.admin_api import agents, usage, views

app_name = "admin-api"

urlpatterns = [
    path("admin_api_keys", views.AdminApiKeyListApi.as_view(), name="admin-key-list"),
    path("admin_api_keys/<str:key_id>", views.AdminApiKeyApi.as_view(), name="admin-key"),
    path("projects", views.ProjectListApi.as_view(), name="project-list"),
    path("projects/<str:project_id>", views.ProjectApi.as_view(), name="project"),
    path("projects/<str:project_id>/archive", views.ProjectArchiveApi.as_view(), name="project-archive"),
    path("projects/<str:project_id>/api_keys", views.ProjectApiKeyListApi.as_view(), name="project-key-list"),
    path("projects/<str:project_id>/api_keys/<str:key_id>", views.ProjectApiKeyApi.as_view(), name="project-key"),
    path(
        "projects/<str:project_id>/api_keys/<str:key_id>/rotate",
        views.ProjectApiKeyRotateApi.as_view(),
        name="project-key-rotate",
    ),
    path("projects/<str:project_id>/rate_limits", views.ProjectRateLimitListApi.as_view(), name="rate-limit-list"),
    # A rate limit's id is `rl-<model>`, and a model id may contain slashes.
    path(
        "projects/<str:project_id>/rate_limits/<path:rate_limit_id>",
        views.ProjectRateLimitApi.as_view(),
        name="rate-limit",
    ),
    path("projects/<str:project_id>/spend_limit", views.ProjectSpendLimitApi.as_view(), name="spend-limit"),
    path("projects/<str:project_id>/connectors", agents.ConnectorListApi.as_view(), name="connector-list"),
    path("projects/<str:project_id>/connectors/<str:connector_id>", agents.ConnectorApi.as_view(), name="connector"),
    path("projects/<str:project_id>/agents", agents.AgentListApi.as_view(), name="agent-list"),
    path("projects/<str:project_id>/agents/<str:agent_id>", agents.AgentApi.as_view(), name="agent"),
    path("projects/<str:project_id>/hooks", agents.HookListApi.as_view(), name="hook-list"),
    path("projects/<str:project_id>/hooks/<str:hook_id>", agents.HookApi.as_view(), name="hook"),
    path(
        "projects/<str:project_id>/hooks/<str:hook_id>/deliveries",
        agents.HookDeliveryListApi.as_view(),
        name="hook-delivery-list",
    ),
    path("users", views.UserListApi.as_view(), name="user-list"),
    path("users/<str:user_id>", views.UserApi.as_view(), name="user"),
    path("invites", views.InviteListApi.as_view(), name="invite-list"),
    path("invites/<str:invite_id>", views.InviteApi.as_view(), name="invite"),
    path("audit_logs", views.AuditLogListApi.as_view(), name="audit-log-list"),
    path("usage/completions", usage.UsageCompletionsApi.as_view(), name="usage-completions"),
    path("usage/embeddings", usage.UsageEmbeddingsApi.as_view(), name="usage-embeddings"),
    path("costs", usage.CostsApi.as_view(), name="costs"),
    path(
        "openapi.json",
        OpenApiDocumentView.as_view(
            urlconf="dashboard.admin_api.schema_urls", authentication_classes=[], permission_classes=[]
        ),
        name="openapi",
    ),
    # [\s\S], not `.`: a path may hold a newline (%0A), which `.` does not match; then no route matched, and
    # the client got Django's HTML 404 page instead of this JSON one. (An inline (?s) flag would break reverse().)
    re_path(r"^(?P<rest>[\s\S]*)$", unknown_route, name="unknown"),
]
