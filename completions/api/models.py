"""GET /v1/models and /v1/models/{id}: the models the caller's key may use."""

from __future__ import annotations

from django.http import HttpResponseBase

from apikeys.scopes import MODELS_READ
from completions.api.http import ApiRequest, api_endpoint, json_response
from completions.engine.calls import model_not_found
from completions.engine.catalog import catalog


@api_endpoint(methods=("GET",), scope=MODELS_READ)
async def models_list(request: ApiRequest) -> HttpResponseBase:
    entries = (await catalog()).entries.values()
    data = [entry.as_openai() for entry in entries if request.api_key.may_use_model(entry.public_id)]
    return json_response({"object": "list", "data": data})


@api_endpoint(methods=("GET",), scope=MODELS_READ)
async def model_retrieve(request: ApiRequest, model_id: str) -> HttpResponseBase:
    entry = (await catalog()).entries.get(model_id)
    if entry is None or not request.api_key.may_use_model(model_id):
        raise model_not_found(model_id)
    return json_response(entry.as_openai())
