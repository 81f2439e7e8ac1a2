"""Reads of the catalog for the dashboard and the management API (the hot path reads engine.catalog)."""

from __future__ import annotations

from completions.models import Model


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
