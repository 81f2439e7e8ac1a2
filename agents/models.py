"""Agents and what they stand on: server-side chat sessions, the connectors an agent may call as tools, the
keys each connector is granted to, webhook hooks with their deliveries, and the audit of every tool run.

Its own app because it is its own kind of data and reaches out: connectors call the tenant's own systems. It
imports nothing above conversations; the loop that runs an agent lives with the surfaces
(completions.agent), since each of its steps is an engine call.

Message bodies are JSON kept as text (orjson in, orjson out), as conversations keeps its items: PostgreSQL's
jsonb refuses a `\\u0000` escape that a prompt may well contain.
"""

from __future__ import annotations

import secrets
import string

from django.db import models

from apikeys.models import ApiKey
from platform_site.models import Organization, Project

_ALPHABET = string.ascii_lowercase + string.digits


def _random_id(prefix: str, length: int = 24) -> str:
    # One read of the system's randomness (a session id is made per agent turn), 24 base-36 digits of it.
    number = int.from_bytes(secrets.token_bytes(16))
    digits = []
    for _ in range(length):
        number, digit = divmod(number, 36)
        digits.append(_ALPHABET[digit])
    return prefix + "".join(digits)


def new_session_id() -> str:
    return _random_id("sess_")


def new_agent_id() -> str:
    return _random_id("agent_")


def new_connector_id() -> str:
    return _random_id("conn_")


def new_hook_id() -> str:
    return _random_id("hook_")


def new_delivery_id() -> str:
    return _random_id("hookdel_")


class ChatSession(models.Model):
    """A conversation kept on the server for /v1/chat/completions: a request that names it has its messages
    prepended, and its turn appended. It belongs to a project; any key of that project may continue it."""

    id = models.CharField(primary_key=True, max_length=40, default=new_session_id)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    # The key that opened it (none once that key is deleted) and the agent it talks to ("" for a model).
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    agent_slug = models.CharField(max_length=64, blank=True, default="")
    # Who the session is with where a webhook opened it: the hook and the sender's `from`.
    hook = models.ForeignKey("Hook", null=True, blank=True, on_delete=models.CASCADE, related_name="sessions")
    external_id = models.CharField(max_length=200, blank=True, default="")
    message_count = models.PositiveIntegerField(default=0)
    # Bytes of its messages: a session that would grow past the limit is refused before a model is called.
    size = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField()
    # The last turn; retention counts from here, so a session in use is never purged.
    updated_at = models.DateTimeField()

    class Meta:
        indexes = [
            models.Index(fields=["organization", "project", "created_at"]),
            models.Index(fields=["updated_at"]),
        ]
        constraints = [
            models.UniqueConstraint(fields=["hook", "external_id"], condition=models.Q(hook__isnull=False),
                                    name="session_hook_sender_unique")
        ]

    def __str__(self) -> str:
        return self.id


class SessionMessage(models.Model):
    """One message of a session, as the model reads it. The auto-increment key is the session's order."""

    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="messages")
    body_json = models.TextField()
    size = models.PositiveIntegerField()
    created_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.session_id}#{self.pk}"


class Connector(models.Model):
    """A server-side tool: an HTTP endpoint Keyway POSTs the model's arguments to, signed; or an MCP server
    whose tools are listed and called over streamable HTTP."""

    class Type(models.TextChoices):
        HTTP = "http"
        MCP = "mcp"

    public_id = models.CharField(max_length=40, unique=True, default=new_connector_id)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="connectors")
    type = models.CharField(max_length=8, choices=Type.choices)
    # A function name as the model sees it (HTTP), or the prefix of the MCP server's tool names.
    name = models.CharField(max_length=48)
    description = models.TextField(blank=True, default="")
    url = models.URLField(max_length=2000)
    # An HTTP connector's JSON schema of its arguments, as JSON text.
    parameters_json = models.TextField(default="{}")
    timeout_ms = models.PositiveIntegerField(default=10_000)
    max_response_bytes = models.PositiveIntegerField(default=65_536)
    # HTTP: the HMAC key its requests are signed with, encrypted at rest (shown once, at creation).
    # MCP: an optional Authorization header value for the server, encrypted at rest.
    secret_encrypted = models.TextField(blank=True, default="")
    # Keys that may reach this connector (with the `connectors` scope).
    keys = models.ManyToManyField(ApiKey, blank=True, related_name="+", through="ConnectorGrant")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="connector_name_unique")]
        indexes = [models.Index(fields=["organization", "created_at"])]

    def __str__(self) -> str:
        return self.name


class ConnectorGrant(models.Model):
    connector = models.ForeignKey(Connector, on_delete=models.CASCADE, related_name="grants")
    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="+")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["api_key", "connector"], name="connector_grant_unique")]

    def __str__(self) -> str:
        return f"{self.api_key_id} → {self.connector_id}"


class Agent(models.Model):
    """A model with instructions and connectors, called as the model `agent:<slug>`."""

    public_id = models.CharField(max_length=40, unique=True, default=new_agent_id)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="agents")
    # Unique in the organization, so that `agent:<slug>` (and an organization's pin) names one agent.
    slug = models.SlugField(max_length=64)
    name = models.CharField(max_length=200)
    model = models.CharField(max_length=128)
    instructions = models.TextField(blank=True, default="")
    connectors = models.ManyToManyField(Connector, blank=True, related_name="agents")
    max_iterations = models.PositiveSmallIntegerField(default=25)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["organization", "slug"], name="agent_slug_unique")]
        indexes = [models.Index(fields=["organization", "created_at"])]

    def __str__(self) -> str:
        return f"agent:{self.slug}"


class Hook(models.Model):
    """A webhook ingress, `POST /hooks/<name>`: a signed `{"text", "from", "action"}` becomes a turn of its
    agent, in a session per sender, answered in the response (sync) or POSTed to the callback URL."""

    class Mode(models.TextChoices):
        SYNC = "sync"
        CALLBACK = "callback"

    public_id = models.CharField(max_length=40, unique=True, default=new_hook_id)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="hooks")
    # Unique in the project, not platform-wide: one tenant's names are no obstacle to another's. A request is
    # matched to a hook of that name by its signature.
    name = models.SlugField(max_length=64)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="hooks")
    mode = models.CharField(max_length=8, choices=Mode.choices, default=Mode.SYNC)
    callback_url = models.URLField(max_length=2000, blank=True, default="")
    # The HMAC key requests are signed with, encrypted at rest (shown once, at creation).
    secret_encrypted = models.TextField()
    # The key its turns are made and metered under: created with the hook, its secret never shown.
    api_key = models.ForeignKey(ApiKey, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="hook_name_unique")]
        indexes = [models.Index(fields=["name"])]

    def __str__(self) -> str:
        return self.name


class HookDelivery(models.Model):
    """One signed request a hook accepted, and what became of its reply."""

    class Status(models.TextChoices):
        RUNNING = "running"
        ANSWERED = "answered"  # sync: the reply went back in the response
        PENDING = "pending"  # callback: waiting for its next attempt
        DELIVERED = "delivered"
        FAILED = "failed"

    public_id = models.CharField(max_length=40, unique=True, default=new_delivery_id)
    hook = models.ForeignKey(Hook, on_delete=models.CASCADE, related_name="deliveries")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    session_id = models.CharField(max_length=40, blank=True, default="")
    sender = models.CharField(max_length=200)
    # The signature it came with (the HMAC of its timestamp and body): a second request with the same one is a
    # replay, refused by the unique constraint whichever worker takes it.
    signature = models.CharField(max_length=64)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.RUNNING)
    # The reply, kept until the callback receiver has it (then cleared).
    reply_json = models.TextField(blank=True, default="")
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True, default="")
    created_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["hook", "created_at"]),
            models.Index(fields=["status", "next_attempt_at"]),
        ]
        constraints = [models.UniqueConstraint(fields=["hook", "signature"], name="hook_delivery_signature_unique")]

    def __str__(self) -> str:
        return self.public_id


class ToolRun(models.Model):
    """The audit of one server-side tool call: who, which connector, how long, how it ended, and the engine
    call (the step) whose usage it belongs with. Never the arguments or the result: they are prompt text."""

    class Outcome(models.TextChoices):
        OK = "ok"
        ERROR = "error"
        TIMEOUT = "timeout"
        REFUSED = "refused"

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    project = models.ForeignKey(Project, null=True, on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey(ApiKey, null=True, on_delete=models.SET_NULL, related_name="+")
    agent_slug = models.CharField(max_length=64)
    connector = models.ForeignKey(Connector, null=True, on_delete=models.SET_NULL, related_name="runs")
    tool_name = models.CharField(max_length=128)
    session_id = models.CharField(max_length=40)
    request_id = models.CharField(max_length=64)
    call_id = models.CharField(max_length=64)
    iteration = models.PositiveSmallIntegerField()
    outcome = models.CharField(max_length=8, choices=Outcome.choices)
    error = models.CharField(max_length=300, blank=True, default="")
    duration_ms = models.PositiveIntegerField()
    started_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["organization", "started_at"]), models.Index(fields=["session_id"])]

    def __str__(self) -> str:
        return f"{self.tool_name} ({self.outcome})"
