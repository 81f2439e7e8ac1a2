"""Models: every model the organization may call, with the endpoints that answer with it, its context length,
its prices at the organization's terms and a first call to copy. Picking one of the organization's keys
narrows the list to what that key may call (its scopes and allowed models)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from apikeys.models import ApiKey
from apikeys.scopes import CHAT, EMBEDDINGS, REALTIME, RESPONSES
from apikeys.selectors import apikey_list
from completions.selectors import OfferedModel, catalog_for_organization
from dashboard.snippets import model_examples
from dashboard.views.common import api_base_url, member_required
from platform_site.access import KEY_MAKERS, Actor
from platform_site.models import Organization

# The scope a key needs for each endpoint (completions/api/*).
ENDPOINT_SCOPES = {"chat": CHAT, "responses": RESPONSES, "realtime": REALTIME, "embeddings": EMBEDDINGS}
ENDPOINT_LABELS = {"chat": "Chat", "responses": "Responses", "realtime": "Realtime", "embeddings": "Embeddings"}
# Capabilities the endpoints already say; the others (tools, vision…) are shown as features.
_ENDPOINT_CAPABILITIES = {"chat", "embeddings", "realtime"}
KEY_CHOICES_LIMIT = 200


@dataclass(frozen=True)
class Example:
    language: str
    code: str
    element_id: str

    @property
    def rows(self) -> int:
        return self.code.count("\n") + 1


@dataclass(frozen=True)
class ModelCard:
    model: OfferedModel
    endpoints: list[str]
    features: list[str]
    input_price: str
    cached_input_price: str
    output_price: str
    example_endpoint: str
    examples: list[Example]


def price_per_million(micros: Decimal) -> str:
    """A price per million tokens for people: "free" at zero, else USD with at least cents and every digit
    that is not zero (a price multiplied by a plan's rate may go below a cent)."""
    if micros <= 0:
        return "free"
    whole, _, fraction = f"{(micros / 1_000_000).normalize():f}".partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def _active_keys(organization: Organization, now: datetime) -> QuerySet[ApiKey]:
    """The organization's keys that call models today: project keys neither revoked, expired nor archived."""
    return (
        apikey_list(organization=organization)
        .filter(project__isnull=False, project__archived_at__isnull=True, revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
    )


def _card(model: OfferedModel, *, key: ApiKey | None, base_url: str, index: int) -> ModelCard | None:
    endpoints = list(model.endpoints)
    if key is not None:
        if key.allowed_models and model.public_id not in key.allowed_models:
            return None
        endpoints = [endpoint for endpoint in endpoints if ENDPOINT_SCOPES[endpoint] in key.scopes]
        if not endpoints:
            return None
    example_endpoint = next((endpoint for endpoint in ("chat", "embeddings") if endpoint in endpoints), "")
    examples = []
    if example_endpoint:
        code = model_examples(base_url=base_url, model=model.public_id, endpoint=example_endpoint)
        examples = [
            Example(language=language, code=text, element_id=f"example-{index}-{number}")
            for number, (language, text) in enumerate(code.items(), start=1)
        ]
    return ModelCard(
        model=model,
        endpoints=[ENDPOINT_LABELS[endpoint] for endpoint in endpoints],
        features=[capability for capability in model.capabilities if capability not in _ENDPOINT_CAPABILITIES],
        input_price=price_per_million(model.input_per_million_micros),
        cached_input_price=price_per_million(model.cached_input_per_million_micros),
        output_price=price_per_million(model.output_per_million_micros),
        example_endpoint=example_endpoint,
        examples=examples,
    )


@member_required
def models_view(request: HttpRequest) -> HttpResponse:
    actor: Actor = request.actor  # type: ignore[attr-defined]
    organization = actor.organization
    keys = list(_active_keys(organization, timezone.now()).select_related("project")[:KEY_CHOICES_LIMIT])
    wanted = request.GET.get("key", "")
    key = next((candidate for candidate in keys if candidate.public_id == wanted), None)
    if wanted and key is None:
        # Another organization's key, a revoked or expired one and an unknown id look the same.
        raise Http404("No such active API key in this organization.")
    catalog = catalog_for_organization(organization=organization)
    base_url = api_base_url(request)
    cards = [
        card
        for index, model in enumerate(catalog.models, start=1)
        if (card := _card(model, key=key, base_url=base_url, index=index)) is not None
    ]
    context = {
        "cards": cards,
        "catalog": catalog,
        "keys": keys,
        "key": key,
        "base_url": base_url,
        # The plan's rate as people write it: 1.2, not 1.2000 (nor 1E+1 for ten).
        "custom_rate": f"{catalog.price_multiplier.normalize():f}" if catalog.price_multiplier != 1 else "",
        "may_play": actor.role in KEY_MAKERS and bool(catalog.chat_models),
    }
    return render(request, "dashboard/models.html", context)
