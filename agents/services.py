"""State changes of agents and what they stand on: connectors, agents, webhook hooks, and the connectors a key
is given. Each is one transaction with an audit row, made on behalf of an Actor who must be an owner or an
admin (an admin key acts as an admin): a connector reaches into the organization's own systems, so wiring
one up is a manager's decision, not a member's.

A project that is archived is read-only here as everywhere (platform_site.services.project_lock_for_change),
and locking it also serialises the name checks of everything created in it. Secrets (a connector's signing
key or authorization, a hook's signing key) are stored encrypted and never written to an audit row.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from typing import Any
from urllib.parse import urlsplit

import orjson
from django.db import IntegrityError, transaction

from agents.models import Agent, Connector, ConnectorGrant, Hook
from apikeys.models import ApiKey
from apikeys.scopes import CHAT, CONNECTORS
from apikeys.services import apikey_create, apikey_revoke
from platform_site.access import Actor
from platform_site.crypto import encrypt_secret
from platform_site.exceptions import Conflict, NotFound, TenancyError
from platform_site.kernel.outbound import is_public_address, private_addresses_allowed
from platform_site.models import Project
from platform_site.services import audit_log_record, project_lock_for_change

CONNECTOR_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]{0,47}")
AGENT_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
HOOK_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
MAX_URL = 2000
MAX_DESCRIPTION = 1024
MAX_PARAMETERS_BYTES = 64 * 1024
MAX_AUTHORIZATION = 4096
MAX_AGENT_NAME = 200
MAX_MODEL = 128
# Instructions are sent with every step of every run: generous for a system prompt, not a place for a corpus.
MAX_INSTRUCTIONS = 100_000
TIMEOUT_MS = (100, 120_000)
RESPONSE_BYTES = (1024, 1_048_576)
ITERATIONS = (1, 50)
DEFAULT_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def _invalid(message: str, param: str, code: str = "invalid_value") -> TenancyError:
    return TenancyError(message, param=param, code=code)


def _new_signing_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def _has_control(text: str) -> bool:
    return any(ord(char) < 32 or ord(char) == 127 for char in text)


def _clean_url(url: str, *, param: str) -> str:
    """An http(s) URL with a host, as typed. Credentials in it are refused: a URL is shown in lists and kept
    in plain text, so a secret belongs in the encrypted `authorization`. A private IP literal is refused
    here already (unless private addresses are allowed); a name is checked where it is resolved, at every
    connection (platform_site.kernel.outbound)."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise _invalid(f"'{param}' must be an http or https URL of at most {MAX_URL} characters.", param, "invalid_url")
    if any(char.isspace() for char in url) or _has_control(url):
        raise _invalid(f"'{param}' must not contain spaces or control characters.", param, "invalid_url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port that is not a number raises here, not at the first call.
    except ValueError:
        raise _invalid(f"'{param}' is not a valid URL.", param, "invalid_url") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _invalid(f"'{param}' must be an http or https URL with a host.", param, "invalid_url")
    if parts.username is not None or parts.password is not None:
        raise _invalid(f"'{param}' must not carry credentials.", param, "invalid_url")
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        address = None
    if address is not None and not is_public_address(address) and not private_addresses_allowed():
        raise _invalid(f"'{param}' names a private address, which Keyway does not connect to.", param, "invalid_url")
    return url


def _clean_text(value: str, *, param: str, limit: int, required: bool = False) -> str:
    if not isinstance(value, str) or len(value) > limit or (required and not value.strip()):
        span = f"1 to {limit}" if required else f"at most {limit}"
        raise _invalid(f"'{param}' must be a string of {span} characters.", param)
    # PostgreSQL refuses a NUL in text; refused here by name rather than as a database error.
    if "\x00" in value:
        raise _invalid(f"'{param}' must not contain NUL characters.", param)
    return value


def _clean_int(value: int | None, *, param: str, bounds: tuple[int, int], default: int) -> int:
    if value is None:
        return default
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(f"'{param}' must be a whole number from {low} to {high}.", param)
    return value


def _clean_parameters(parameters: dict[str, Any] | None) -> str:
    """An HTTP connector's JSON schema of its arguments, as the text stored: a JSON object of type object
    (the only kind of arguments a model's function call has)."""
    if parameters is None:
        parameters = DEFAULT_PARAMETERS
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise _invalid('\'parameters\' must be a JSON schema object whose "type" is "object".', "parameters")
    try:
        text = orjson.dumps(parameters)
    except orjson.JSONEncodeError:
        raise _invalid(
            "'parameters' cannot be stored as JSON (too deep, or a number too large).", "parameters"
        ) from None
    if len(text) > MAX_PARAMETERS_BYTES:
        raise _invalid(f"'parameters' must be at most {MAX_PARAMETERS_BYTES} bytes of JSON.", "parameters")
    return text.decode()


def _project_for_change(*, by: Actor, project: Project, what: str) -> Project:
    """The project, locked, once `by` may change it: an owner or admin of its organization, and the project
    not archived. Another organization's project is as unknown as one that does not exist."""
    by.require_manager(what)
    if project.organization_id != by.organization.pk:
        raise NotFound(f"No project '{project.public_id}' in this organization.", param="project_id")
    return project_lock_for_change(by=by, project=project, what=what)


def _require_own(by: Actor, item: Connector | Agent | Hook, param: str) -> None:
    if item.organization_id != by.organization.pk:
        raise NotFound(f"No object '{item.public_id}' in this organization.", param=param)


def _clean_connectors(connectors: list[Connector], *, project: Project, param: str = "connectors") -> list[Connector]:
    """The connectors, once each, in a stable order; every one of `project` (an agent or a key reaches
    only its own project's connectors)."""
    unique = {connector.pk: connector for connector in connectors}
    foreign = [
        c.public_id
        for c in unique.values()
        if c.project_id != project.pk or c.organization_id != project.organization_id
    ]
    if foreign:
        raise _invalid(f"No connector '{foreign[0]}' in this project.", param, "connector_not_found")
    return sorted(unique.values(), key=lambda connector: connector.name)


@transaction.atomic
def connector_create(
    *,
    by: Actor,
    project: Project,
    type: str,  # noqa: A002 - the API's own word for it.
    name: str,
    url: str,
    description: str = "",
    parameters: dict[str, Any] | None = None,
    timeout_ms: int | None = None,
    max_response_bytes: int | None = None,
    authorization: str = "",
) -> tuple[Connector, str]:
    """Create a connector and return it with its signing secret. An HTTP connector's requests are signed with
    a new random secret, returned here exactly once (it is stored encrypted, and nothing shows it again); an
    MCP connector has none ("" is returned), and may carry an Authorization header value instead, stored
    encrypted and never shown."""
    project = _project_for_change(by=by, project=project, what="create connectors")
    if type not in Connector.Type.values:
        raise _invalid(f"'type' must be one of: {', '.join(Connector.Type.values)}.", "type")
    if not isinstance(name, str) or not CONNECTOR_NAME.fullmatch(name):
        raise _invalid("A connector's name is a letter, then up to 47 letters, digits, '_' or '-'.", "name")
    url = _clean_url(url, param="url")
    description = _clean_text(description, param="description", limit=MAX_DESCRIPTION)
    timeout = _clean_int(timeout_ms, param="timeout_ms", bounds=TIMEOUT_MS, default=10_000)
    response_bytes = _clean_int(max_response_bytes, param="max_response_bytes", bounds=RESPONSE_BYTES, default=65_536)
    if type == Connector.Type.HTTP:
        if authorization:
            raise _invalid("An HTTP connector's requests are signed; it takes no 'authorization'.", "authorization")
        parameters_json = _clean_parameters(parameters)
        secret = _new_signing_secret()
        stored = secret
    else:
        if parameters is not None:
            raise _invalid(
                "An MCP server describes its own tools; an MCP connector takes no 'parameters'.", "parameters"
            )
        if not isinstance(authorization, str) or len(authorization) > MAX_AUTHORIZATION or _has_control(authorization):
            raise _invalid(
                f"'authorization' must be a header value of at most {MAX_AUTHORIZATION} characters.", "authorization"
            )
        parameters_json = "{}"
        secret = ""
        stored = authorization
    if Connector.objects.filter(project=project, name=name).exists():
        raise Conflict(f"This project already has a connector named '{name}'.", param="name", code="name_taken")
    connector = Connector.objects.create(
        organization=by.organization,
        project=project,
        type=type,
        name=name,
        description=description,
        url=url,
        parameters_json=parameters_json,
        timeout_ms=timeout,
        max_response_bytes=response_bytes,
        secret_encrypted=encrypt_secret(stored),
    )
    audit_log_record(
        organization=by.organization,
        action="connector.created",
        target=connector.public_id,
        project=project,
        by=by,
        details={"data": {"type": type, "name": name, "timeout_ms": timeout, "max_response_bytes": response_bytes}},
    )
    return connector, secret


@transaction.atomic
def connector_delete(*, by: Actor, connector: Connector) -> None:
    """Delete a connector: the agents that used it stop offering it, and the keys given it lose the grant.
    Its tool runs stay in the audit, without it."""
    _require_own(by, connector, "connector_id")
    project = _project_for_change(by=by, project=connector.project, what="delete connectors")
    agents = sorted(connector.agents.values_list("slug", flat=True))
    public_id, name = connector.public_id, connector.name
    connector.delete()
    audit_log_record(
        organization=by.organization,
        action="connector.deleted",
        target=public_id,
        project=project,
        by=by,
        details={"name": name, "agents": agents},
    )


def _agent_fields(
    *, name: str | None, model: str | None, instructions: str | None, max_iterations: int | None
) -> dict[str, Any]:
    """The given fields of an agent, checked; a None is left out."""
    fields: dict[str, Any] = {}
    if name is not None:
        fields["name"] = _clean_text(name, param="name", limit=MAX_AGENT_NAME, required=True).strip()
    if model is not None:
        fields["model"] = _clean_text(model, param="model", limit=MAX_MODEL, required=True).strip()
    if instructions is not None:
        fields["instructions"] = _clean_text(instructions, param="instructions", limit=MAX_INSTRUCTIONS)
    if max_iterations is not None:
        fields["max_iterations"] = _clean_int(max_iterations, param="max_iterations", bounds=ITERATIONS, default=25)
    return fields


def _agent_data(agent: Agent, connectors: list[Connector]) -> dict[str, Any]:
    # Instructions are the tenant's prompt text: the audit says that they changed, not what they say.
    return {
        "slug": agent.slug,
        "name": agent.name,
        "model": agent.model,
        "max_iterations": agent.max_iterations,
        "connectors": [connector.public_id for connector in connectors],
    }


@transaction.atomic
def agent_create(
    *,
    by: Actor,
    project: Project,
    slug: str,
    name: str,
    model: str,
    instructions: str = "",
    connectors: list[Connector] | None = None,
    max_iterations: int = 25,
) -> Agent:
    """Create an agent, called as the model `agent:<slug>`. The slug is unique in the organization, so that
    the name means one agent whichever project's key calls it. Whether `model` is in the catalog is the
    caller's check (the catalog lives above this app)."""
    project = _project_for_change(by=by, project=project, what="create agents")
    if not isinstance(slug, str) or not AGENT_SLUG.fullmatch(slug):
        raise _invalid("An agent's slug is up to 64 lowercase letters, digits and '-', not starting with '-'.", "slug")
    fields = _agent_fields(name=name, model=model, instructions=instructions, max_iterations=max_iterations)
    chosen = _clean_connectors(connectors or [], project=project)
    taken = Conflict(f"This organization already has an agent '{slug}'.", param="slug", code="slug_taken")
    if Agent.objects.filter(organization=by.organization, slug=slug).exists():
        raise taken
    try:
        # A savepoint: two projects of the organization may race for the slug, and only the constraint sees
        # both.
        with transaction.atomic():
            agent = Agent.objects.create(organization=by.organization, project=project, slug=slug, **fields)
    except IntegrityError:
        raise taken from None
    agent.connectors.set(chosen)
    audit_log_record(
        organization=by.organization,
        action="agent.created",
        target=agent.public_id,
        project=project,
        by=by,
        details={"data": _agent_data(agent, chosen)},
    )
    return agent


@transaction.atomic
def agent_update(
    *,
    by: Actor,
    agent: Agent,
    name: str | None = None,
    model: str | None = None,
    instructions: str | None = None,
    connectors: list[Connector] | None = None,
    max_iterations: int | None = None,
) -> Agent:
    """Change the given fields of an agent (None leaves one as it is; `connectors` replaces the list). Runs
    that have started keep what they read."""
    _require_own(by, agent, "agent_id")
    project = _project_for_change(by=by, project=agent.project, what="change agents")
    agent = Agent.objects.select_for_update().get(pk=agent.pk)
    fields = _agent_fields(name=name, model=model, instructions=instructions, max_iterations=max_iterations)
    changes = {field: value for field, value in fields.items() if getattr(agent, field) != value}
    current = sorted(agent.connectors.all(), key=lambda connector: connector.name)
    chosen = current if connectors is None else _clean_connectors(connectors, project=project)
    connectors_changed = [c.pk for c in chosen] != [c.pk for c in current]
    if not changes and not connectors_changed:
        return agent
    for field, value in changes.items():
        setattr(agent, field, value)
    if changes:
        agent.save(update_fields=list(changes))
    if connectors_changed:
        agent.connectors.set(chosen)
    requested: dict[str, Any] = {k: v for k, v in changes.items() if k != "instructions"}
    if "instructions" in changes:
        requested["instructions_changed"] = True
    if connectors_changed:
        requested["connectors"] = [connector.public_id for connector in chosen]
    audit_log_record(
        organization=by.organization,
        action="agent.updated",
        target=agent.public_id,
        project=project,
        by=by,
        details={"changes_requested": requested},
    )
    return agent


def _hook_remove(*, by: Actor, hook: Hook, project: Project) -> None:
    """Delete a hook and revoke the key its turns ran under: the key was the hook's alone."""
    key = hook.api_key
    public_id, name = hook.public_id, hook.name
    hook.delete()
    apikey_revoke(key=key, by=by)
    audit_log_record(
        organization=by.organization,
        action="hook.deleted",
        target=public_id,
        project=project,
        by=by,
        details={"name": name},
    )


@transaction.atomic
def agent_delete(*, by: Actor, agent: Agent) -> None:
    """Delete an agent and the hooks that call it (revoking their keys). Its sessions stay until they age
    out, and a later call of `agent:<slug>` is answered as an unknown model."""
    _require_own(by, agent, "agent_id")
    project = _project_for_change(by=by, project=agent.project, what="delete agents")
    for hook in Hook.objects.filter(agent=agent).select_related("api_key").order_by("pk"):
        _hook_remove(by=by, hook=hook, project=project)
    public_id, slug = agent.public_id, agent.slug
    agent.delete()
    audit_log_record(
        organization=by.organization,
        action="agent.deleted",
        target=public_id,
        project=project,
        by=by,
        details={"slug": slug},
    )


@transaction.atomic
def hook_create(
    *, by: Actor, project: Project, name: str, agent: Agent, mode: str, callback_url: str = ""
) -> tuple[Hook, str]:
    """Create a hook, `POST /hooks/<name>`, and return it with its signing secret, exactly once: it is stored
    encrypted and nothing shows it again. The hook's turns are made and billed under a project key created
    for it alone (chat only), whose raw value is dropped here: no person ever holds it."""
    project = _project_for_change(by=by, project=project, what="create hooks")
    if not isinstance(name, str) or not HOOK_NAME.fullmatch(name):
        raise _invalid("A hook's name is up to 64 lowercase letters, digits and '-', not starting with '-'.", "name")
    if mode not in Hook.Mode.values:
        raise _invalid(f"'mode' must be one of: {', '.join(Hook.Mode.values)}.", "mode")
    if mode == Hook.Mode.CALLBACK:
        if not callback_url:
            raise TenancyError(
                "A hook in callback mode needs a 'callback_url'.",
                param="callback_url",
                code="missing_required_parameter",
            )
        callback_url = _clean_url(callback_url, param="callback_url")
    elif callback_url:
        raise _invalid("Only a hook in callback mode takes a 'callback_url'.", "callback_url")
    if agent.organization_id != by.organization.pk or agent.project_id != project.pk:
        raise _invalid(f"No agent '{agent.slug}' in this project.", "agent", "agent_not_found")
    if Hook.objects.filter(project=project, name=name).exists():
        raise Conflict(f"This project already has a hook named '{name}'.", param="name", code="name_taken")
    key, _ = apikey_create(
        organization=by.organization, project=project, name=f"hook {name}", scopes=[CHAT], by=by, reason="hook"
    )
    secret = _new_signing_secret()
    hook = Hook.objects.create(
        organization=by.organization,
        project=project,
        name=name,
        agent=agent,
        mode=mode,
        callback_url=callback_url,
        secret_encrypted=encrypt_secret(secret),
        api_key=key,
    )
    audit_log_record(
        organization=by.organization,
        action="hook.created",
        target=hook.public_id,
        project=project,
        by=by,
        details={"data": {"name": name, "agent": agent.slug, "mode": mode, "api_key": key.public_id}},
    )
    return hook, secret


@transaction.atomic
def hook_delete(*, by: Actor, hook: Hook) -> None:
    _require_own(by, hook, "hook_id")
    project = _project_for_change(by=by, project=hook.project, what="delete hooks")
    _hook_remove(by=by, hook=hook, project=project)


@transaction.atomic
def connector_grants_set(*, by: Actor, key: ApiKey, connectors: list[Connector]) -> None:
    """Give `key` exactly these connectors (replacing what it had). Each must be of the key's project, and a
    key given any needs the `connectors` scope too: without it a grant would do nothing, silently."""
    by.require_manager("give keys connectors")
    if key.organization_id != by.organization.pk:
        raise NotFound(f"No API key '{key.public_id}' in this organization.", param="key_id")
    if key.project is None:
        raise _invalid("An admin key calls no model, so it takes no connectors.", "connectors")
    if key.revoked_at is not None:
        raise _invalid("A revoked key cannot be given connectors.", "connectors")
    project = _project_for_change(by=by, project=key.project, what="give keys connectors")
    chosen = _clean_connectors(connectors, project=project)
    if chosen and CONNECTORS not in key.scopes:
        raise _invalid(f"A key given connectors needs the '{CONNECTORS}' scope too.", "connectors")
    wanted = {connector.pk for connector in chosen}
    grants = ConnectorGrant.objects.filter(api_key=key)
    had = set(grants.values_list("connector_id", flat=True))
    if wanted == had:
        return
    grants.exclude(connector_id__in=wanted).delete()
    ConnectorGrant.objects.bulk_create([ConnectorGrant(api_key=key, connector_id=pk) for pk in sorted(wanted - had)])
    audit_log_record(
        organization=by.organization,
        action="api_key.connectors_set",
        target=key.public_id,
        project=project,
        by=by,
        details={"data": {"connectors": [connector.public_id for connector in chosen]}},
    )
