"""GET /v1/models and /v1/models/{id}: the models the caller's key may use, and its project's agents
(`agent:<slug>`, owned by the organization)."""

from __future__ import annotations

from django.http import HttpResponseBase

from agents.runtime import AGENT_PREFIX, agent_models
from apikeys.auth import AuthenticatedKey
from apikeys.scopes import MODELS_READ
from completions.api.http import ApiRequest, api_endpoint, json_response
from completions.engine.calls import model_not_found
from completions.engine.catalog import catalog
from platform_site.kernel.orm import orm


async def _agents(key: AuthenticatedKey) -> list[dict[str, object]]:
    if key.project_id is None:
        return []
    return [
        {"id": model, "object": "model", "created": int(created.timestamp()), "owned_by": key.organization_slug}
        for model, created in await orm(agent_models, key=key)
        if key.may_use_model(model)
    ]


@api_endpoint(methods=("GET",), scope=MODELS_READ)
async def models_list(request: ApiRequest) -> HttpResponseBase:
    entries = (await catalog()).entries.values()
    data = [entry.as_openai() for entry in entries if request.api_key.may_use_model(entry.public_id)]
    data.extend(await _agents(request.api_key))
    return json_response({"object": "list", "data": data})


@api_endpoint(methods=("GET",), scope=MODELS_READ)
async def model_retrieve(request: ApiRequest, model_id: str) -> HttpResponseBase:
    if model_id.startswith(AGENT_PREFIX):
        for agent in await _agents(request.api_key):
            if agent["id"] == model_id:
                return json_response(agent)
        raise model_not_found(model_id)
    entry = (await catalog()).entries.get(model_id)
    if entry is None or not request.api_key.may_use_model(model_id):
        raise model_not_found(model_id)
    return json_response(entry.as_openai())
