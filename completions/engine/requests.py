"""What the engine is asked to do: typed requests, parsed once by a surface (completions/api/requests.py for
the REST API) and read by everything downstream.

`body` is what goes upstream: the fields Keyway knows for the endpoint, already checked, with the gateway's
own fields (`provider`, `models`) taken out and legacy forms rewritten. Unknown fields are not in it: they
wait in `extra_fields` until the engine knows which deployments may answer, and go only to a deployment
whose operator allowed them (Deployment.extra_fields); a field no candidate allows is a 400
`unknown_parameter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Preferences:
    """Seed 002's `provider` object: which providers to use, in which order, and whether to fall back."""

    order: tuple[str, ...] = ()
    allow_fallbacks: bool = True
    only: frozenset[str] = frozenset()
    ignore: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class InputNeed:
    """A part of the input that only some models take (an image needs `vision`), and where it is."""

    capability: str
    kind: str
    param: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    # The model asked for first, then the request's `models` fallbacks; () when the key's organization pins
    # a model and the request named none.
    models: tuple[str, ...]
    stream: bool = False
    include_usage: bool = False
    # The client's output limit per choice (max_completion_tokens, else max_tokens); None: what the context
    # leaves.
    max_tokens: int | None = None
    # Which field set it, for errors that name it.
    max_tokens_param: str = "max_tokens"
    n: int = 1
    uses_tools: bool = False
    needs: tuple[InputNeed, ...] = ()
    preferences: Preferences = Preferences()
    extra_fields: dict[str, Any] = field(default_factory=dict)

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.body["messages"]
        return messages


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    body: dict[str, Any]
    model: str
    # Strings and token-id lists; also `body["input"]`.
    inputs: list[str | list[int]]
    wants_dimensions: bool = False
    preferences: Preferences = Preferences()
    extra_fields: dict[str, Any] = field(default_factory=dict)
