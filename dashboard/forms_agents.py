"""The agents pages' forms: agents, connectors and hooks. They parse what a person typed and choose among the
project's own objects; the services (agents.services) decide what may be done and check the rest."""

from __future__ import annotations

import json
from typing import Any

from django import forms

from agents.models import Agent, Connector, Hook
from agents.services import ITERATIONS, MAX_DESCRIPTION, RESPONSE_BYTES, TIMEOUT_MS

# Agent slugs and hook names are what the services accept; the form says so before the services refuse.
SLUG = r"^[a-z0-9][a-z0-9-]*$"
SLUG_ERROR = "Lowercase letters, digits and -, not starting with -."


class AgentForm(forms.Form):
    slug = forms.RegexField(
        label="Slug",
        max_length=64,
        regex=SLUG,
        error_messages={"invalid": SLUG_ERROR},
        # Help texts are HTML, as Django renders them.
        help_text="Called as the model agent:&lt;slug&gt;. Unique in the organization; it cannot be changed later.",
    )
    name = forms.CharField(label="Name", max_length=200)
    model = forms.ChoiceField(label="Model", help_text="An enabled model of the catalog.")
    instructions = forms.CharField(
        label="Instructions",
        required=False,
        widget=forms.Textarea(attrs={"rows": 6}),
        help_text="The system message every turn of this agent starts with.",
    )
    connectors = forms.MultipleChoiceField(
        label="Connectors",
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="The tools the agent may call, run by Keyway on the server.",
    )
    max_iterations = forms.IntegerField(
        label="Max iterations",
        min_value=ITERATIONS[0],
        max_value=ITERATIONS[1],
        initial=25,
        help_text="Model steps one turn may take before it stops.",
    )

    def __init__(
        self, *args: Any, models: list[str], connectors: list[Connector], editing: Agent | None = None, **kwargs: Any
    ) -> None:
        if editing is not None:
            kwargs.setdefault(
                "initial",
                {
                    "name": editing.name,
                    "model": editing.model,
                    "instructions": editing.instructions,
                    "connectors": [c.public_id for c in editing.connectors.all()],
                    "max_iterations": editing.max_iterations,
                },
            )
        super().__init__(*args, **kwargs)
        self._connectors = {c.public_id: c for c in connectors}
        self.fields["model"].choices = [(model, model) for model in models]  # type: ignore[attr-defined]
        self.fields["connectors"].choices = [  # type: ignore[attr-defined]
            (c.public_id, f"{c.name} ({c.type.upper()})") for c in connectors
        ]
        if editing is not None:
            # A slug names the agent to every caller; renaming it would break them, so it is not a field.
            del self.fields["slug"]

    def chosen_connectors(self) -> list[Connector]:
        return [self._connectors[public_id] for public_id in self.cleaned_data["connectors"]]


class ConnectorForm(forms.Form):
    type = forms.ChoiceField(
        label="Type",
        choices=[
            (Connector.Type.HTTP, "HTTP endpoint: Keyway POSTs the model's arguments to it, signed"),
            (Connector.Type.MCP, "MCP server: its tools, over streamable HTTP"),
        ],
        initial=Connector.Type.HTTP,
        widget=forms.RadioSelect,
    )
    name = forms.RegexField(
        label="Name",
        max_length=48,
        regex=r"^[A-Za-z][A-Za-z0-9_-]*$",
        error_messages={"invalid": "Letters, digits, _ and -, starting with a letter."},
        help_text="HTTP: the function name the model sees. MCP: the prefix of the server's tool names.",
    )
    description = forms.CharField(
        label="Description",
        required=False,
        max_length=MAX_DESCRIPTION,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="HTTP: tells the model when to call it.",
    )
    url = forms.URLField(
        label="URL",
        max_length=2000,
        assume_scheme="https",
        help_text="HTTP: where the calls are POSTed. MCP: the server's streamable HTTP endpoint.",
    )
    parameters = forms.CharField(
        label="Parameters (JSON schema)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 6, "class": "mono", "spellcheck": "false"}),
        help_text='HTTP only: the JSON schema of the arguments, e.g. {"type": "object", "properties": {…}}.',
    )
    timeout_ms = forms.IntegerField(
        label="Timeout (ms)",
        required=False,
        min_value=TIMEOUT_MS[0],
        max_value=TIMEOUT_MS[1],
        help_text="Empty: 10,000.",
    )
    max_response_bytes = forms.IntegerField(
        label="Max response bytes",
        required=False,
        min_value=RESPONSE_BYTES[0],
        max_value=RESPONSE_BYTES[1],
        help_text="Empty: 65,536. A longer answer is refused.",
    )
    authorization = forms.CharField(
        label="Authorization header",
        required=False,
        max_length=2000,
        widget=forms.PasswordInput(attrs={"autocomplete": "off"}),
        help_text="MCP only, optional: sent as the Authorization header (e.g. Bearer …), kept encrypted.",
    )

    def clean_parameters(self) -> dict[str, Any] | None:
        text = self.cleaned_data["parameters"].strip()
        if not text:
            return None
        try:
            schema = json.loads(text)
        except ValueError as error:
            raise forms.ValidationError(f"Not valid JSON: {error}.") from None
        if not isinstance(schema, dict):
            raise forms.ValidationError("The schema is a JSON object.")
        return schema

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if cleaned.get("type") == Connector.Type.MCP and cleaned.get("parameters") is not None:
            self.add_error("parameters", "An MCP server describes its own tools; leave this empty.")
        if cleaned.get("type") == Connector.Type.HTTP and cleaned.get("authorization"):
            self.add_error("authorization", "An HTTP connector is signed with its own secret; leave this empty.")
        return cleaned


class HookForm(forms.Form):
    name = forms.RegexField(
        label="Name",
        max_length=64,
        regex=SLUG,
        error_messages={"invalid": SLUG_ERROR},
        help_text="The hook's URL is /hooks/&lt;name&gt;. Unique in the project.",
    )
    agent = forms.ChoiceField(label="Agent", help_text="Every request becomes a turn of this agent.")
    mode = forms.ChoiceField(
        label="Reply",
        choices=[
            (Hook.Mode.SYNC, "In the response to the request"),
            (Hook.Mode.CALLBACK, "POSTed to a callback URL (the request is answered 202 at once)"),
        ],
        initial=Hook.Mode.SYNC,
        widget=forms.RadioSelect,
    )
    callback_url = forms.URLField(
        label="Callback URL",
        required=False,
        max_length=2000,
        assume_scheme="https",
        help_text="For callback replies: where Keyway POSTs them, signed with the hook's secret.",
    )

    def __init__(self, *args: Any, agents: list[Agent], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._agents = {a.public_id: a for a in agents}
        self.fields["agent"].choices = [(a.public_id, f"agent:{a.slug}") for a in agents]  # type: ignore[attr-defined]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if cleaned.get("mode") == Hook.Mode.CALLBACK and not cleaned.get("callback_url"):
            self.add_error("callback_url", "A hook that replies by callback needs its URL.")
        if cleaned.get("mode") == Hook.Mode.SYNC and cleaned.get("callback_url"):
            self.add_error("callback_url", "A hook that replies in the response has no callback URL.")
        return cleaned

    def chosen_agent(self) -> Agent:
        return self._agents[self.cleaned_data["agent"]]
