"""POST /v1/embeddings: parse, one engine call, respond."""

from __future__ import annotations

import base64

import numpy as np
from django.http import HttpResponseBase

from apikeys.scopes import EMBEDDINGS
from completions.api.http import ApiRequest, api_endpoint, json_body, json_response
from completions.api.requests import parse_embeddings
from completions.engine import calls


@api_endpoint(methods=("POST",), scope=EMBEDDINGS)
async def embeddings(request: ApiRequest) -> HttpResponseBase:
    parsed = parse_embeddings(json_body(request))
    result = await calls.embed(parsed, caller=request.caller)
    body = result.body
    if parsed.body.get("encoding_format") == "base64":
        for item in body["data"]:
            if isinstance(item["embedding"], np.ndarray):
                # Little-endian float32, which is what the SDKs decode (and request by default).
                item["embedding"] = base64.b64encode(item["embedding"].astype("<f4").tobytes()).decode()
    return json_response(body, headers=result.headers)
