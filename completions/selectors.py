"""Reads of the catalog for the dashboard and the management API (the hot path reads engine.catalog)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.db.models import Exists, OuterRef

from billing.models import BillingAccount, Price
from completions.models import Deployment, Model
from platform_site.models import Organization


def model_ids_enabled() -> list[str]:
    """Public ids of every enabled model, sorted: the choices a key's allowed models come from."""
    return list(Model.objects.filter(enabled=True).order_by("public_id").values_list("public_id", flat=True))


def chat_model_id_default() -> str | None:
    """The model a first-call snippet names: the first enabled chat model."""
    for public_id, capabilities in Model.objects.filter(enabled=True).order_by("id").values_list(
        "public_id", "capabilities"
    ):
        if Model.Capability.CHAT in capabilities:
            return str(public_id)
    return None


# What a chat model answers besides chat completions: the Responses API and realtime sessions, which Keyway
# runs itself in text (completions.engine.calls.realtime_model). A model with the `realtime` capability is an
# upstream's realtime model, relayed as it is.
CHAT_ENDPOINTS = ("chat", "responses", "realtime")


@dataclass(frozen=True)
class OfferedModel:
    """A model an organization may call, as the dashboard's models page and playground show it."""

    public_id: str
    owned_by: str
    context_length: int
    # As the catalog records them (chat, embeddings, tools, vision…).
    capabilities: tuple[str, ...]
    # The API surfaces that answer with it for this organization: chat, responses, realtime, embeddings.
    endpoints: tuple[str, ...]
    # Micro-USD per million tokens at the organization's terms: the list price times its plan's multiplier,
    # which is what settlement charges (billing.pricing.cost_micros). Zero where the model is free or unpriced.
    input_per_million_micros: Decimal
    cached_input_per_million_micros: Decimal
    output_per_million_micros: Decimal


@dataclass(frozen=True)
class OrganizationCatalog:
    models: list[OfferedModel]
    # The model that answers every chat, Responses and realtime request of the organization, or "".
    pinned_model: str
    price_multiplier: Decimal

    @property
    def chat_models(self) -> list[OfferedModel]:
        return [model for model in self.models if "chat" in model.endpoints]


def _endpoints(public_id: str, capabilities: list[str], *, pinned_model: str) -> tuple[str, ...]:
    endpoints: list[str] = []
    # A pinned organization's chat requests are all answered by the pinned model, whatever they name.
    if Model.Capability.CHAT in capabilities and pinned_model in ("", public_id):
        endpoints += CHAT_ENDPOINTS
    if Model.Capability.REALTIME in capabilities and "realtime" not in endpoints:
        endpoints.append("realtime")
    if Model.Capability.EMBEDDINGS in capabilities:
        endpoints.append("embeddings")
    return tuple(endpoints)


def catalog_for_organization(*, organization: Organization) -> OrganizationCatalog:
    """The models the organization may call, with its prices: enabled models that an enabled deployment on
    an enabled provider serves (the hot path offers no other, completions.engine.catalog), narrowed by the
    organization's pinned model. A key may narrow them further (its scopes and allowed models)."""
    account = BillingAccount.objects.filter(organization=organization).select_related("plan").first()
    plan = account.plan if account is not None else None
    multiplier = plan.price_multiplier if plan is not None else Decimal(1)
    served = Deployment.objects.filter(model=OuterRef("pk"), enabled=True, provider__enabled=True)
    rows = Model.objects.filter(enabled=True).filter(Exists(served)).order_by("public_id")
    prices = {price.model: price for price in Price.objects.filter(model__in=rows.values("public_id"))}
    offered = []
    for row in rows:
        endpoints = _endpoints(row.public_id, row.capabilities, pinned_model=organization.pinned_model)
        if not endpoints:
            continue
        price = prices.get(row.public_id)
        offered.append(
            OfferedModel(
                public_id=row.public_id,
                owned_by=row.owned_by,
                context_length=row.context_length,
                capabilities=tuple(row.capabilities),
                endpoints=endpoints,
                input_per_million_micros=multiplier * (price.input_per_million_micros if price else 0),
                cached_input_per_million_micros=multiplier * (price.cached_input_per_million_micros if price else 0),
                output_per_million_micros=multiplier * (price.output_per_million_micros if price else 0),
            )
        )
    return OrganizationCatalog(models=offered, pinned_model=organization.pinned_model, price_multiplier=multiplier)
