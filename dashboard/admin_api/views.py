"""The management API under /v1/organization/, in the paths and objects of OpenAI's Admin API, plus key
creation and rotation in projects (which OpenAI lacks). Every write goes through the same services as the
dashboard; every read is scoped to the caller's organization."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.response import Response

from agents.selectors import connectors_named, key_connector_ids, project_key_connector_ids
from agents.services import connector_grants_set
from apikeys.models import ApiKey
from apikeys.scopes import ADMIN, ALL_SCOPES
from apikeys.services import MAX_KEY_BUDGET_MICROS, apikey_create, apikey_revoke, apikey_rotate, project_archive
from billing.money import usd_to_micros
from billing.selectors import project_month_spend, project_rate_limit_list
from billing.services import MAX_BUDGET_MICROS, RATE_LIMIT_FIELDS, project_budget_set, project_rate_limit_set
from completions.selectors import model_ids_enabled
from dashboard.admin_api import objects
from dashboard.admin_api import schema as doc
from dashboard.admin_api.base import ManagementApi, field, page, page_of, parse_unix
from platform_site.exceptions import NotFound, TenancyError
from platform_site.kernel.params import whole_number
from platform_site.models import Project
from platform_site.selectors import (
    audit_log_list,
    invitation_get,
    invitation_list,
    member_get,
    member_list,
    project_get,
    project_list,
)
from platform_site.services import (
    invitation_create,
    invitation_delete,
    member_remove,
    member_role_set,
    project_create,
    project_rename,
)


def _public_id(prefix: str = "") -> Any:
    return lambda value: Q(public_id=value.removeprefix(prefix))


class _Keys(ManagementApi):
    def roles(self) -> dict[int, str]:
        return objects.roles_of(member_list(organization=self.actor.organization))

    def keys(self) -> Any:
        return ApiKey.objects.filter(organization=self.actor.organization).select_related(
            "organization", "project", "created_by", "created_by__keyway_profile"
        )

    def key(self, key_id: str, **scope: Any) -> ApiKey:
        key = self.keys().filter(public_id=key_id.removeprefix(objects.KEY_ID_PREFIX), **scope).first()
        if key is None:
            raise NotFound(f"No API key '{key_id}' here.", param="key_id")
        return key

    def project_key(self, key: ApiKey) -> dict[str, Any]:
        """One project key as rendered, with the connectors it was given."""
        connectors = key_connector_ids(organization=self.actor.organization, keys=[key])[key.pk]
        return objects.project_key(key, self.roles(), connectors)


class AdminApiKeyListApi(_Keys):
    @doc.operation(doc.listing(doc.ADMIN_KEY), listed=True, operation_id="admin_key_list", summary="List admin keys")
    def get(self, request: Request) -> Response:
        roles = self.roles()
        return Response(
            page(
                request,
                self.keys().filter(project__isnull=True),
                public_id=_public_id(objects.KEY_ID_PREFIX),
                render=lambda key: objects.admin_key(key, roles),
            )
        )

    @doc.operation(
        doc.with_value(doc.ADMIN_KEY),
        request=doc.body({"name": doc.STR, "expires_in_seconds": doc.INT}, ["name"]),
        summary="Create an admin key (its secret in `value`, once)",
    )
    def post(self, request: Request) -> Response:
        name = field(request.data, "name", str, required=True)
        seconds = field(request.data, "expires_in_seconds", int)
        if seconds is not None and not 1 <= seconds <= 31_536_000:
            raise TenancyError("expires_in_seconds must be from 1 to 31536000.", param="expires_in_seconds")
        key, raw = apikey_create(
            organization=self.actor.organization,
            name=name,
            scopes=[ADMIN],
            by=self.actor,
            expires_at=None if seconds is None else timezone.now() + timedelta(seconds=seconds),
        )
        # The secret is in this response only, as OpenAI's `value`; nothing can show it again.
        return Response({**objects.admin_key(key, self.roles()), "value": raw})


class AdminApiKeyApi(_Keys):
    @doc.operation(doc.ADMIN_KEY)
    def get(self, request: Request, key_id: str) -> Response:
        return Response(objects.admin_key(self.key(key_id, project__isnull=True), self.roles()))

    @doc.operation(doc.deleted("organization.admin_api_key.deleted"))
    def delete(self, request: Request, key_id: str) -> Response:
        key = apikey_revoke(key=self.key(key_id, project__isnull=True), by=self.actor)
        return Response({"id": objects.key_id(key), "object": "organization.admin_api_key.deleted", "deleted": True})


class ProjectListApi(ManagementApi):
    @doc.operation(doc.listing(doc.PROJECT), listed=True, operation_id="project_list")
    def get(self, request: Request) -> Response:
        archived = request.query_params.get("include_archived", "false").lower() == "true"
        projects = project_list(organization=self.actor.organization, include_archived=archived)
        return Response(page(request, projects, public_id=_public_id(), render=objects.project))

    @doc.operation(doc.PROJECT, request=doc.body({"name": doc.STR}, ["name"]))
    def post(self, request: Request) -> Response:
        return Response(
            objects.project(project_create(by=self.actor, name=field(request.data, "name", str, required=True)))
        )


class ProjectApi(ManagementApi):
    @doc.operation(doc.PROJECT)
    def get(self, request: Request, project_id: str) -> Response:
        return Response(objects.project(project_get(organization=self.actor.organization, public_id=project_id)))

    @doc.operation(doc.PROJECT, request=doc.body({"name": doc.STR}), operation_id="project_update")
    def post(self, request: Request, project_id: str) -> Response:
        project = project_get(organization=self.actor.organization, public_id=project_id)
        name = field(request.data, "name", str)
        if name is not None:
            project = project_rename(by=self.actor, project=project, name=name)
        return Response(objects.project(project))


class ProjectArchiveApi(ManagementApi):
    @doc.operation(doc.PROJECT, summary="Archive a project (its keys stop working)")
    def post(self, request: Request, project_id: str) -> Response:
        project = project_get(organization=self.actor.organization, public_id=project_id)
        return Response(objects.project(project_archive(by=self.actor, project=project)))


# OpenAI's limits for kinds of work Keyway does not serve: refused by name rather than silently ignored.
_UNSERVED_LIMITS = ("max_images_per_1_minute", "max_audio_megabytes_per_1_minute", "batch_1_day_max_input_tokens")


class _ProjectRateLimits(ManagementApi):
    def limits(self, project: Project) -> list[dict[str, Any]]:
        listed = project_rate_limit_list(
            organization=self.actor.organization, project=project, models=model_ids_enabled()
        )
        return [objects.rate_limit(item) for item in listed]


class ProjectRateLimitListApi(_ProjectRateLimits):
    @doc.operation(
        doc.listing(doc.RATE_LIMIT),
        operation_id="project_rate_limit_list",
        summary="The project's rate limits per model (every model of the catalog)",
    )
    def get(self, request: Request, project_id: str) -> Response:
        project = project_get(organization=self.actor.organization, public_id=project_id)
        return Response(page_of(request, self.limits(project), default_limit=100))


class ProjectRateLimitApi(_ProjectRateLimits):
    @doc.operation(
        doc.RATE_LIMIT,
        request=doc.body({name: doc.NULL_INT for name in RATE_LIMIT_FIELDS}),
        operation_id="project_rate_limit_update",
        summary="Change a project's rate limits on one model (null: back to the platform default)",
    )
    def post(self, request: Request, project_id: str, rate_limit_id: str) -> Response:
        project = project_get(organization=self.actor.organization, public_id=project_id)
        current = next((item for item in self.limits(project) if item["id"] == rate_limit_id), None)
        if current is None:
            raise NotFound(f"No rate limit '{rate_limit_id}' in this project.", param="rate_limit_id")
        body = request.data
        if not isinstance(body, dict):
            raise TenancyError("The request body must be a JSON object.", code="invalid_body")
        for name in body:
            if name in _UNSERVED_LIMITS:
                raise TenancyError(
                    f"Keyway serves no images, audio or batch endpoints, so '{name}' limits nothing here.",
                    param=name,
                    code="unsupported_parameter",
                )
        if body:
            # The service checks every field's name, type and range, naming the field.
            project_rate_limit_set(by=self.actor, project=project, model=current["model"], changes=dict(body))
            current = next(item for item in self.limits(project) if item["id"] == rate_limit_id)
        return Response(current)


class ProjectSpendLimitApi(ManagementApi):
    def project(self, project_id: str) -> Project:
        return project_get(organization=self.actor.organization, public_id=project_id)

    def limit(self, project: Project) -> dict[str, Any]:
        if project.monthly_budget_micros is None:
            raise NotFound(f"Project {project.public_id} has no spend limit.", param="project_id")
        spent = project_month_spend(organization=self.actor.organization, project=project)
        return objects.spend_limit(budget_micros=project.monthly_budget_micros, spent_micros=spent)

    @doc.operation(doc.SPEND_LIMIT, operation_id="project_spend_limit_get")
    def get(self, request: Request, project_id: str) -> Response:
        return Response(self.limit(self.project(project_id)))

    @doc.operation(
        doc.SPEND_LIMIT,
        request=doc.body(
            {"threshold_amount": doc.INT, "currency": {"type": "string", "enum": ["USD"]},
             "interval": {"type": "string", "enum": ["month"]}},
            ["threshold_amount", "currency", "interval"],
        ),
        operation_id="project_spend_limit_update",
        summary="Set the project's monthly spend limit, in cents (enforced on every key of the project)",
    )
    def post(self, request: Request, project_id: str) -> Response:
        project = self.project(project_id)
        cents = field(request.data, "threshold_amount", int, required=True)
        for name, only in (("currency", "USD"), ("interval", "month")):
            if field(request.data, name, str, required=True) != only:
                raise TenancyError(f"'{name}' must be '{only}'.", param=name, code="invalid_value")
        if cents < 1:
            raise TenancyError("'threshold_amount' must be at least 1 (cent).", param="threshold_amount",
                               code="invalid_value")
        if cents > MAX_BUDGET_MICROS // objects.MICROS_PER_CENT:
            raise TenancyError("'threshold_amount' is too large.", param="threshold_amount", code="invalid_value")
        project = project_budget_set(
            by=self.actor, project=project, monthly_budget_micros=cents * objects.MICROS_PER_CENT
        )
        return Response(self.limit(project))

    @doc.operation(doc.SPEND_LIMIT_DELETED, operation_id="project_spend_limit_delete")
    def delete(self, request: Request, project_id: str) -> Response:
        project = self.project(project_id)
        self.limit(project)  # 404 when there is none
        project_budget_set(by=self.actor, project=project, monthly_budget_micros=None)
        return Response({"object": "project.spend_limit.deleted", "deleted": True})


def _budget_micros(value: Any) -> int | None:
    """A key's `monthly_budget_usd` (a number or a numeric string) in micro-USD, exactly."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TenancyError("monthly_budget_usd must be a number.", param="monthly_budget_usd", code="invalid_type")
    try:
        micros = usd_to_micros(str(value))
    except ValueError as error:
        raise TenancyError(str(error), param="monthly_budget_usd") from None
    if not 0 < micros <= MAX_KEY_BUDGET_MICROS:
        raise TenancyError(
            f"monthly_budget_usd must be above zero and at most {MAX_KEY_BUDGET_MICROS // 1_000_000} USD.",
            param="monthly_budget_usd",
        )
    return micros


class ProjectApiKeyListApi(_Keys):
    def project(self, project_id: str) -> Project:
        return project_get(organization=self.actor.organization, public_id=project_id)

    @doc.operation(doc.listing(doc.PROJECT_KEY), listed=True, operation_id="project_key_list")
    def get(self, request: Request, project_id: str) -> Response:
        project = self.project(project_id)
        roles = self.roles()
        # Every connector given to a key of the project, in one query rather than one per key.
        granted = project_key_connector_ids(organization=self.actor.organization, project=project)
        return Response(
            page(
                request,
                self.keys().filter(project=project),
                public_id=_public_id(objects.KEY_ID_PREFIX),
                render=lambda key: objects.project_key(key, roles, granted.get(key.pk, [])),
            )
        )

    @doc.operation(
        doc.with_value(doc.PROJECT_KEY),
        request=doc.body(
            {
                "name": doc.STR,
                "scopes": doc.STRS,
                "models": doc.STRS,
                "rpm": doc.INT,
                "tpm": doc.INT,
                "monthly_budget_usd": {"type": ["number", "string"]},
                "expires_at": doc.INT,
                "connectors": doc.STRS,
            },
            ["name"],
        ),
        summary="Create a project key (Keyway; its secret in `value`, once; `connectors` needs the scope)",
    )
    def post(self, request: Request, project_id: str) -> Response:
        project = self.project(project_id)
        body = request.data
        scopes = field(body, "scopes", list, default=list(ALL_SCOPES))
        models = field(body, "models", list, default=[])
        for param, values in (("scopes", scopes), ("models", models)):
            if not all(isinstance(value, str) for value in values):
                raise TenancyError(f"'{param}' must be a list of strings.", param=param, code="invalid_type")
        unknown = sorted(set(models) - set(model_ids_enabled()))
        if unknown:
            raise TenancyError(f"Unknown model(s): {', '.join(unknown)}.", param="models", code="model_not_found")
        name = field(body, "name", str, required=True)
        rpm, tpm = field(body, "rpm", int), field(body, "tpm", int)
        budget = _budget_micros(body.get("monthly_budget_usd") if isinstance(body, dict) else None)
        expires_at = parse_unix(field(body, "expires_at", int), "expires_at")
        connector_ids = field(body, "connectors", list, default=[])
        if not all(isinstance(value, str) for value in connector_ids):
            raise TenancyError("'connectors' must be a list of strings.", param="connectors", code="invalid_type")
        connectors = connectors_named(organization=self.actor.organization, project=project, public_ids=connector_ids)
        # One transaction: a key whose connectors are refused is not created either.
        with transaction.atomic():
            key, raw = apikey_create(
                organization=self.actor.organization,
                project=project,
                name=name,
                scopes=scopes,
                allowed_models=models,
                rpm_limit=rpm,
                tpm_limit=tpm,
                monthly_budget_micros=budget,
                expires_at=expires_at,
                by=self.actor,
            )
            if connectors:
                connector_grants_set(by=self.actor, key=key, connectors=connectors)
        return Response({**self.project_key(key), "value": raw})


class ProjectApiKeyApi(_Keys):
    @doc.operation(doc.PROJECT_KEY)
    def get(self, request: Request, project_id: str, key_id: str) -> Response:
        project = project_get(organization=self.actor.organization, public_id=project_id)
        return Response(self.project_key(self.key(key_id, project=project)))

    @doc.operation(doc.PROJECT_KEY, request=doc.body({"connectors": doc.STRS}, ["connectors"]),
                   summary="Change the connectors a project key was given (Keyway)")
    def post(self, request: Request, project_id: str, key_id: str) -> Response:
        project = project_get(organization=self.actor.organization, public_id=project_id)
        key = self.key(key_id, project=project)
        connector_ids = field(request.data, "connectors", list, required=True)
        if not all(isinstance(value, str) for value in connector_ids):
            raise TenancyError("'connectors' must be a list of strings.", param="connectors", code="invalid_type")
        connectors = connectors_named(organization=self.actor.organization, project=project, public_ids=connector_ids)
        connector_grants_set(by=self.actor, key=key, connectors=connectors)
        return Response(self.project_key(key))

    @doc.operation(doc.deleted("organization.project.api_key.deleted"))
    def delete(self, request: Request, project_id: str, key_id: str) -> Response:
        project = project_get(organization=self.actor.organization, public_id=project_id)
        key = apikey_revoke(key=self.key(key_id, project=project), by=self.actor)
        return Response({"object": "organization.project.api_key.deleted", "id": objects.key_id(key), "deleted": True})


class ProjectApiKeyRotateApi(_Keys):
    @doc.operation(
        doc.with_value(doc.PROJECT_KEY),
        request=doc.body({"grace_period_seconds": doc.INT}),
        summary="Rotate a project key (Keyway; the old secret works for the grace period)",
    )
    def post(self, request: Request, project_id: str, key_id: str) -> Response:
        project = project_get(organization=self.actor.organization, public_id=project_id)
        seconds = field(request.data if request.data else {}, "grace_period_seconds", int)
        key, raw = apikey_rotate(
            key=self.key(key_id, project=project),
            grace=None if seconds is None else timedelta(seconds=max(seconds, -1)),
            by=self.actor,
        )
        return Response({**self.project_key(key), "value": raw})


class UserListApi(ManagementApi):
    @doc.operation(doc.listing(doc.USER), listed=True, operation_id="user_list")
    def get(self, request: Request) -> Response:
        members = member_list(organization=self.actor.organization)
        emails = request.query_params.getlist("emails[]") or request.query_params.getlist("emails")
        if emails:
            members = members.filter(user__email__in=emails)
        return Response(
            page(request, members, public_id=lambda v: Q(user__keyway_profile__public_id=v), render=objects.user)
        )


class UserApi(ManagementApi):
    @doc.operation(doc.USER)
    def get(self, request: Request, user_id: str) -> Response:
        return Response(objects.user(member_get(organization=self.actor.organization, user_public_id=user_id)))

    @doc.operation(doc.USER, request=doc.body({"role": doc.STR}, ["role"]))
    def post(self, request: Request, user_id: str) -> Response:
        membership = member_get(organization=self.actor.organization, user_public_id=user_id)
        role = field(request.data, "role", str, required=True)
        return Response(objects.user(member_role_set(by=self.actor, membership=membership, role=role)))

    @doc.operation(doc.deleted("organization.user.deleted"))
    def delete(self, request: Request, user_id: str) -> Response:
        membership = member_get(organization=self.actor.organization, user_public_id=user_id)
        member_remove(by=self.actor, membership=membership)
        return Response({"object": "organization.user.deleted", "id": user_id, "deleted": True})


class InviteListApi(ManagementApi):
    @doc.operation(doc.listing(doc.INVITE), listed=True, operation_id="invite_list")
    def get(self, request: Request) -> Response:
        now = timezone.now()
        return Response(
            page(
                request,
                invitation_list(organization=self.actor.organization),
                public_id=_public_id(),
                render=lambda item: objects.invite(item, now),
            )
        )

    @doc.operation(doc.INVITE, request=doc.body({"email": doc.STR, "role": doc.STR}, ["email", "role"]))
    def post(self, request: Request) -> Response:
        accept_url = request.build_absolute_uri(reverse("dashboard:invite-accept", args=["TOKEN"]))
        invitation = invitation_create(
            by=self.actor,
            email=field(request.data, "email", str, required=True),
            role=field(request.data, "role", str, required=True),
            accept_url=accept_url.replace("TOKEN", "{token}"),
        )
        return Response(objects.invite(invitation, timezone.now()))


class InviteApi(ManagementApi):
    @doc.operation(doc.INVITE)
    def get(self, request: Request, invite_id: str) -> Response:
        invitation = invitation_get(organization=self.actor.organization, public_id=invite_id)
        return Response(objects.invite(invitation, timezone.now()))

    @doc.operation(doc.deleted("organization.invite.deleted"))
    def delete(self, request: Request, invite_id: str) -> Response:
        invitation_delete(
            by=self.actor, invitation=invitation_get(organization=self.actor.organization, public_id=invite_id)
        )
        return Response({"object": "organization.invite.deleted", "id": invite_id, "deleted": True})


def _audit_id(value: str) -> Q:
    number = value.removeprefix("audit_log-")
    pk = whole_number(number)
    return Q(pk=pk) if pk is not None else Q(pk=None)


class AuditLogListApi(ManagementApi):
    @doc.operation(doc.listing(doc.AUDIT_LOG), listed=True, operation_id="audit_log_list")
    def get(self, request: Request) -> Response:
        params = request.query_params
        events = audit_log_list(organization=self.actor.organization).filter(action__in=objects.OPENAI_EVENT_TYPES)
        types = params.getlist("event_types[]")
        if types:
            events = events.filter(action__in=types)
        projects = params.getlist("project_ids[]")
        if projects:
            events = events.filter(project__public_id__in=projects)
        emails = params.getlist("actor_emails[]")
        if emails:
            events = events.filter(actor__email__in=emails)
        resources = params.getlist("resource_ids[]")
        if resources:
            events = events.filter(target__in=[r.removeprefix(objects.KEY_ID_PREFIX) for r in resources])
        for bound, lookup in (("gt", "gt"), ("gte", "gte"), ("lt", "lt"), ("lte", "lte")):
            raw = params.get(f"effective_at[{bound}]")
            if raw is not None:
                seconds = whole_number(raw)
                if seconds is None:
                    raise TenancyError("effective_at bounds are Unix seconds.", param=f"effective_at[{bound}]")
                moment = parse_unix(seconds, f"effective_at[{bound}]")
                events = events.filter(**{f"created_at__{lookup}": moment})
        before = params.get("before")
        if before:
            cursor = events.filter(_audit_id(before)).values("created_at", "id").first()
            if cursor is None:
                raise TenancyError(f"No event '{before}' in this list.", param="before")
            events = events.filter(
                Q(created_at__gt=cursor["created_at"]) | Q(created_at=cursor["created_at"], id__gt=cursor["id"])
            )
        return Response(page(request, events, public_id=_audit_id, render=objects.audit_log, default_order="desc"))
