"""The dashboard's pages. Objects are named by public id in URLs; no secret is ever in one."""

from __future__ import annotations

from django.urls import path

from dashboard.views import agents, billing, front, keys, models, playground, settings, usage

app_name = "dashboard"

urlpatterns = [
    path("", front.home, name="home"),
    path("organizations/new", front.organization_new, name="organization-new"),
    path("organizations/switch", front.organization_switch, name="organization-switch"),
    path("invite/<str:token>", front.invite_accept, name="invite-accept"),
    path("usage", usage.usage_view, name="usage"),
    path("usage/export.csv", usage.usage_export_view, name="usage-export"),
    path("models", models.models_view, name="models"),
    path("playground", playground.playground_view, name="playground"),
    path("playground/key", playground.playground_key_view, name="playground-key"),
    # Connectors and hooks before the agents' own ids, which the pattern after them would take them for.
    path("agents", agents.agent_list_view, name="agent-list"),
    path("agents/connectors", agents.connector_list_view, name="connector-list"),
    path("agents/connectors/<str:public_id>/delete", agents.connector_delete_view, name="connector-delete"),
    path("agents/hooks", agents.hook_list_view, name="hook-list"),
    path("agents/hooks/<str:public_id>", agents.hook_detail_view, name="hook-detail"),
    path("agents/hooks/<str:public_id>/delete", agents.hook_delete_view, name="hook-delete"),
    path("agents/<str:public_id>", agents.agent_detail_view, name="agent-detail"),
    path("agents/<str:public_id>/delete", agents.agent_delete_view, name="agent-delete"),
    path("settings/api-keys", keys.apikey_list_view, name="apikey-list"),
    path("settings/api-keys/new", keys.apikey_create_view, name="apikey-create"),
    path("settings/api-keys/<str:public_id>/rotate", keys.apikey_rotate_view, name="apikey-rotate"),
    path("settings/api-keys/<str:public_id>/revoke", keys.apikey_revoke_view, name="apikey-revoke"),
    path("settings/admin-keys", settings.admin_key_list, name="admin-key-list"),
    path("settings/organization", settings.organization_settings, name="organization-settings"),
    path("settings/organization/leave", settings.organization_leave, name="organization-leave"),
    path("settings/projects", settings.project_list_view, name="project-list"),
    path("settings/projects/<str:public_id>", settings.project_detail, name="project-detail"),
    path("settings/members", settings.member_list_view, name="member-list"),
    path("settings/members/<str:user_public_id>", settings.member_update, name="member-update"),
    path("settings/invitations/<str:public_id>/delete", settings.invitation_delete_view, name="invitation-delete"),
    path("settings/audit-log", settings.audit_log_view, name="audit-log"),
    path("billing", billing.billing_overview, name="billing"),
    # The PDF first: the page's pattern would take "2025-03.pdf" as a month, and answer that it is not one.
    path("billing/statements/<str:period>.pdf", billing.statement_pdf_view, name="billing-statement-pdf"),
    path("billing/statements/<str:period>", billing.statement_view, name="billing-statement"),
]
