"""GET /v1/openapi.json: the OpenAPI 3.1 document of what Keyway serves under /v1 (and /api/v1).

It is built once per process from two parts:

- OpenAI's own description of the operations Keyway serves: `openai_openapi_subset.json`, the part of
  OpenAI's OpenAPI document (MIT-licensed) those operations need, vendored because an installed server does
  not have the whole document. `manage.py openapi_subset` regenerates it; nobody edits it by hand.
- Keyway's extensions, added here: the gateway's request fields (`models`, `provider`), the routes only
  Keyway has, the error responses (every error is OpenAI's error object, whatever the status), the response
  headers, and event streams described one event at a time.

Where Keyway deliberately refuses something the official schema allows (hosted tools, audio output, any
field outside an endpoint's allow-list), the official schema is kept: such a request is answered with a 400
error object, which the document also describes.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import orjson
from django.http import HttpResponse, HttpResponseBase

from apikeys.scopes import CHAT, EMBEDDINGS, MODELS_READ, RESPONSES, SESSIONS
from completions.api.http import ApiRequest, api_endpoint

SUBSET_PATH = Path(__file__).with_name("openai_openapi_subset.json")

# The official operations Keyway serves, as OpenAI's document names their paths, with the key scope each
# needs. `manage.py openapi_subset` copies exactly these from OpenAI's document.
SERVED: dict[str, dict[str, str]] = {
    "/models": {"get": MODELS_READ},
    "/models/{model}": {"get": MODELS_READ},
    "/chat/completions": {"post": CHAT},
    "/embeddings": {"post": EMBEDDINGS},
    "/responses": {"post": RESPONSES},
    "/responses/{response_id}": {"get": RESPONSES, "delete": RESPONSES},
    "/responses/{response_id}/cancel": {"post": RESPONSES},
    "/responses/{response_id}/input_items": {"get": RESPONSES},
    "/conversations": {"post": RESPONSES},
    "/conversations/{conversation_id}": {"get": RESPONSES, "post": RESPONSES, "delete": RESPONSES},
    "/conversations/{conversation_id}/items": {"get": RESPONSES, "post": RESPONSES},
    "/conversations/{conversation_id}/items/{item_id}": {"get": RESPONSES, "delete": RESPONSES},
}

_SCHEMAS = "#/components/schemas/"
_ERROR = {"$ref": f"{_SCHEMAS}ErrorResponse"}
_METERED = ("/chat/completions", "/embeddings", "/responses")

_DESCRIPTION = """\
Keyway's OpenAI-compatible API. Point an OpenAI SDK at `<server>/v1` with a Keyway key (`sk-kw-…`); every \
operation names the key scope it needs in `x-keyway-scope`.

The request and response schemas are OpenAI's, from OpenAI's OpenAPI document (MIT licence; see \
`x-source`). Keyway adds:

- `models` (fallback models, tried in order) and `provider` (`order`, `allow_fallbacks`, `only`, `ignore`) \
on chat completions and responses, and `provider` on embeddings: they steer Keyway's routing and never reach \
an upstream;
- `GET /chat/models` (an alias of `GET /models`) and this document, `GET /openapi.json`;
- sessions and agents: `session_id` and `max_iterations` on chat completions, models named `agent:<slug>` \
(listed by `GET /models`), `session_id` at the top of an agent's answer and of each of its chunks, \
`stream_options.include_tool_progress` (named `tool.progress` events between the chunks), and the sessions \
API, `/sessions`;
- error responses: every error, whatever its status, is OpenAI's error object \
`{"error": {"message", "type", "param", "code"}}`; a field outside an endpoint's allow-list, a hosted tool or \
a stored prompt is a 400 naming the field;
- response headers: `x-request-id` on every response; `x-ratelimit-*`, `x-keyway-model` and \
`x-keyway-provider` on model calls; `Retry-After` where a retry is worth it;
- event streams described one event at a time: each `data` is one JSON object of the documented schema, an \
error object if the stream broke after it began, or `[DONE]` at the end of a chat stream.
"""


def _header(description: str, *, required: bool = False, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": kind}}


_HEADERS: dict[str, dict[str, Any]] = {
    "RequestId": _header("The request's id (`req_…`), also in the server's logs.", required=True),
    "RetryAfter": _header("Seconds to wait before retrying.", kind="integer"),
    "KeywayModel": _header("The model that answered (after fallbacks)."),
    "KeywayProvider": _header("The provider that answered."),
    **{
        f"RateLimit{kind.title()}{part.title()}": _header(f"OpenAI's `x-ratelimit-{part}-{kind}` of this key.")
        for kind in ("requests", "tokens")
        for part in ("limit", "remaining", "reset")
    },
}
_REQUEST_ID = {"x-request-id": {"$ref": "#/components/headers/RequestId"}}
_MODEL_CALL_HEADERS = {
    **_REQUEST_ID,
    "x-keyway-model": {"$ref": "#/components/headers/KeywayModel"},
    "x-keyway-provider": {"$ref": "#/components/headers/KeywayProvider"},
    **{
        f"x-ratelimit-{part}-{kind}": {"$ref": f"#/components/headers/RateLimit{kind.title()}{part.title()}"}
        for kind in ("requests", "tokens")
        for part in ("limit", "remaining", "reset")
    },
}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {**_REQUEST_ID, "Retry-After": {"$ref": "#/components/headers/RetryAfter"}},
        "content": {"application/json": {"schema": _ERROR}},
    }


_ERROR_RESPONSES = {
    "KeywayClientError": _error_response(
        "Refused, as an OpenAI error object: 400 an invalid or unsupported field (`param` names it), 401 no or "
        "an invalid key, 403 a scope or model the key lacks, 404 no such object or model here, 405 a method "
        "the route does not take, 408 or 413 a body too slow or too large, 409 a conflicting change, 429 a "
        "rate limit, budget or queue."
    ),
    "KeywayServerError": _error_response(
        "Failed, as an OpenAI error object: 500 an unexpected error (its message names the request id), 502 "
        "`upstream_error`, 503 overloaded or shutting down (retry), 504 `upstream_timeout`."
    ),
}

_GATEWAY_SCHEMAS: dict[str, dict[str, Any]] = {
    "KeywayProviderPreferences": {
        "type": "object",
        "description": "Keyway: how to choose among the model's deployments (OpenRouter's `provider` object).",
        "properties": {
            "order": {"type": "array", "items": {"type": "string"}, "description": "Providers to try first."},
            "allow_fallbacks": {
                "type": "boolean",
                "default": True,
                "description": "Whether providers outside `order` may answer.",
            },
            "only": {"type": "array", "items": {"type": "string"}, "description": "The only providers allowed."},
            "ignore": {"type": "array", "items": {"type": "string"}, "description": "Providers never used."},
        },
    },
    "KeywayModelFallbacks": {
        "type": "array",
        "description": "Keyway: models to fall back to, in order, when the first cannot answer.",
        "items": {"type": "string", "minLength": 1},
        "minItems": 1,
        "maxItems": 10,
    },
    "KeywayChatSession": {
        "type": "object",
        "description": "Keyway: a server-side chat session of the key's project.",
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["chat.session"]},
            "created_at": {"type": "integer"},
            "updated_at": {"type": "integer", "description": "The last turn; retention counts from here."},
            "model": {"type": ["string", "null"], "description": "`agent:<slug>` for an agent's session."},
            "message_count": {"type": "integer"},
            "bytes": {"type": "integer"},
            "messages": {
                "type": "array",
                "items": {"type": "object"},
                "description": "The messages, oldest first (on retrieval only).",
            },
        },
        "required": ["id", "object", "created_at", "updated_at", "model", "message_count", "bytes"],
    },
    "KeywayChatSessionList": {
        "type": "object",
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": {"$ref": f"{_SCHEMAS}KeywayChatSession"}},
            "first_id": {"type": ["string", "null"]},
            "last_id": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"},
        },
        "required": ["object", "data", "first_id", "last_id", "has_more"],
    },
    "KeywayChatSessionDeleted": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["chat.session.deleted"]},
            "deleted": {"type": "boolean", "enum": [True]},
        },
        "required": ["id", "object", "deleted"],
    },
    "KeywayResponseDeleted": {
        "type": "object",
        "description": "A deleted response.",
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["response"]},
            "deleted": {"type": "boolean", "enum": [True]},
        },
        "required": ["id", "object", "deleted"],
    },
}
_GATEWAY_FIELDS = {
    "models": {"$ref": f"{_SCHEMAS}KeywayModelFallbacks"},
    "provider": {"$ref": f"{_SCHEMAS}KeywayProviderPreferences"},
    "session_id": {
        "type": "string",
        "maxLength": 40,
        "description": "Keyway: continue this server-side session (its messages are prepended, this turn is "
        "appended). An agent's turn without one opens a new session; its id comes back as `session_id` in the "
        "body, in every chunk and in `x-session-id`.",
    },
    "max_iterations": {
        "type": "integer",
        "minimum": 1,
        "maximum": 50,
        "description": "Keyway: the most model steps an agent's turn makes (`agent:<slug>` models only); the "
        "agent's own setting by default (25).",
    },
}
# Request bodies with the gateway's fields: (official schema, Keyway's schema, the fields it adds).
_EXTENDED_BODIES = (
    ("CreateChatCompletionRequest", "KeywayCreateChatCompletionRequest",
     ("models", "provider", "session_id", "max_iterations")),
    ("CreateResponse", "KeywayCreateResponse", ("models", "provider")),
    ("CreateEmbeddingRequest", "KeywayCreateEmbeddingRequest", ("provider",)),
)


# Requests Keyway answers, as examples of each model call (the default catalog's models).
_USER = {"role": "user", "content": "Say hello in three words."}
_CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
_EXAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("/chat/completions", "post"): {
        "text": {"model": "gemma-3-270m", "messages": [_USER], "max_tokens": 16},
        "stream": {
            "model": "gemma-3-270m",
            "messages": [_USER],
            "max_tokens": 16,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        "gateway": {
            "model": "gemma-3-270m",
            "messages": [_USER],
            "max_tokens": 16,
            "models": ["gemma-3-270m"],
            "provider": {"order": ["local"], "allow_fallbacks": True},
        },
        "tools": {
            "model": "gemma-3-270m",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": _CITY}}],
            "tool_choice": "auto",
        },
        "session": {
            "model": "gemma-3-270m",
            "messages": [_USER],
            "max_tokens": 16,
            "session_id": "sess_0123456789abcdefghijklmn",
        },
        "json_schema": {
            "model": "gemma-3-270m",
            "messages": [_USER],
            "max_tokens": 32,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "greeting",
                    "schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
                },
            },
        },
    },
    ("/embeddings", "post"): {
        "strings": {"model": "all-minilm-l6-v2", "input": ["The quick brown fox", "jumps"]},
        "base64": {"model": "all-minilm-l6-v2", "input": "The quick brown fox", "encoding_format": "base64"},
    },
    ("/responses", "post"): {
        "text": {"model": "gemma-3-270m", "input": "Say hello in three words.", "max_output_tokens": 16},
        "stream": {"model": "gemma-3-270m", "input": "Say hello.", "max_output_tokens": 16, "stream": True},
        "background": {"model": "gemma-3-270m", "input": "Say hello.", "max_output_tokens": 16, "background": True},
        "items": {
            "model": "gemma-3-270m",
            "instructions": "Answer briefly.",
            "store": False,
            "input": [
                {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Again."},
            ],
        },
        "json_schema": {
            "model": "gemma-3-270m",
            "input": "Say hello.",
            "text": {
                "format": {
                    "type": "json_schema",
                    "name": "greeting",
                    "schema": {
                        "type": "object",
                        "properties": {"text": {"type": "string"}},
                        "required": ["text"],
                        "additionalProperties": False,
                    },
                }
            },
        },
    },
    ("/conversations", "post"): {
        "items": {"metadata": {"topic": "demo"}, "items": [{"type": "message", "role": "user", "content": "Hello"}]},
    },
    ("/conversations/{conversation_id}", "post"): {"metadata": {"metadata": {"topic": "renamed"}}},
    ("/conversations/{conversation_id}/items", "post"): {
        "items": {"items": [{"type": "message", "role": "user", "content": "Hi"}]},
    },
}
# Where Keyway's answer is not what OpenAI's schema says, and why.
_EMPTY_PAGE = (
    "Keyway: null on an empty page, as OpenAI answers (and as its newer lists document); the official "
    "schema of this list says a string."
)
_DEVIATIONS = {
    ("ConversationItemList", "first_id"): {"type": ["string", "null"], "description": _EMPTY_PAGE},
    ("ConversationItemList", "last_id"): {"type": ["string", "null"], "description": _EMPTY_PAGE},
    ("ResponseItemList", "first_id"): {"type": ["string", "null"], "description": _EMPTY_PAGE},
    ("ResponseItemList", "last_id"): {"type": ["string", "null"], "description": _EMPTY_PAGE},
}


def _keyway_version() -> str:
    try:
        return version("keyway")
    except PackageNotFoundError:
        return "0.1.0"


def as_json_schema_2020(node: Any) -> Any:
    """OpenAI's document is OpenAPI 3.1, whose schemas are JSON Schema 2020-12, but a few of them still use
    older spellings that 2020-12 ignores or refuses; here they are spelled its way, meaning the same:
    3.0's `nullable: true` becomes null in `type` (or `enum`), and a `default: null` (meaning "absent") goes
    unless the field's type names null."""
    if isinstance(node, list):
        return [as_json_schema_2020(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: as_json_schema_2020(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        if "enum" in node and None not in node["enum"]:
            node["enum"] = [*node["enum"], None]
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        elif isinstance(node.get("type"), list) and "null" not in node["type"]:
            node["type"] = [*node["type"], "null"]
        elif "type" not in node and "enum" not in node:
            node = {"anyOf": [node, {"type": "null"}]}
    kind = node.get("type")
    if (
        "default" in node
        and node["default"] is None
        and not (kind == "null" or isinstance(kind, list) and "null" in kind)
    ):
        del node["default"]
    return node


def _recursion_as_ref(schemas: dict[str, Any]) -> None:
    """2019-09's `$recursiveAnchor` / `$recursiveRef: "#"` (a schema that contains itself), which 2020-12
    does not know, as a plain `$ref` to the component."""

    def replace(node: Any, ref: str) -> Any:
        if isinstance(node, list):
            return [replace(item, ref) for item in node]
        if not isinstance(node, dict):
            return node
        if node.get("$recursiveRef") == "#":
            return {"$ref": ref, **{key: value for key, value in node.items() if key != "$recursiveRef"}}
        return {key: replace(value, ref) for key, value in node.items()}

    for name, schema in schemas.items():
        if isinstance(schema, dict) and schema.pop("$recursiveAnchor", None) is not None:
            schemas[name] = replace(schema, f"{_SCHEMAS}{name}")


def _discriminator_values(schemas: dict[str, Any], ref: Any, field: str) -> list[Any] | None:
    """The values of `field` that the component `ref` names itself by (its `const` or `enum`), or None."""
    if not isinstance(ref, str) or not ref.startswith(_SCHEMAS):
        return None
    schema = schemas.get(ref.removeprefix(_SCHEMAS))
    if not isinstance(schema, dict):
        return None
    for part in (schema, *schema.get("allOf", ())):
        if "$ref" in part:
            found = _discriminator_values(schemas, part["$ref"], field)
            if found:
                return found
        prop = (part.get("properties") or {}).get(field)
        if isinstance(prop, dict):
            if "const" in prop:
                return [prop["const"]]
            if isinstance(prop.get("enum"), list):
                return [value for value in prop["enum"] if value is not None]
    return None


def _explicit_discriminators(node: Any, schemas: dict[str, Any]) -> Any:
    """A discriminator without a mapping means, in OpenAPI 3.1, that the property holds a component's name;
    OpenAI's document means the value each variant's own schema gives it (`"type": "message"`). Where the
    variants say it unambiguously, the mapping is written out; elsewhere the discriminator goes (it is only a
    hint: the oneOf still decides)."""
    if isinstance(node, list):
        return [_explicit_discriminators(item, schemas) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _explicit_discriminators(value, schemas) for key, value in node.items()}
    discriminator = node.get("discriminator")
    if isinstance(discriminator, dict) and "mapping" not in discriminator:
        field = str(discriminator.get("propertyName"))
        mapping: dict[str, str] = {}
        for variant in node.get("oneOf") or node.get("anyOf") or ():
            values = _discriminator_values(schemas, variant.get("$ref"), field)
            if not values or any(not isinstance(value, str) or value in mapping for value in values):
                del node["discriminator"]
                break
            mapping.update(dict.fromkeys(values, variant["$ref"]))
        else:
            node["discriminator"] = {**discriminator, "mapping": mapping}
    return node


def _extended_body(schemas: dict[str, Any], official: str, fields: tuple[str, ...]) -> dict[str, Any]:
    added = {name: _GATEWAY_FIELDS[name] for name in fields}
    schema = schemas[official]
    description = f"OpenAI's `{official}`, with Keyway's {', '.join(f'`{name}`' for name in fields)}."
    if schema.get("additionalProperties") is False:
        # A closed object: the fields are added to its own list (a sibling in allOf would be refused by it).
        return {**schema, "description": description, "properties": {**schema["properties"], **added}}
    return {
        "description": description,
        "allOf": [{"$ref": f"{_SCHEMAS}{official}"}, {"type": "object", "properties": added}],
    }


def _event_stream(schema: dict[str, Any]) -> dict[str, Any]:
    """One event of a stream whose events carry `schema` (OpenAPI 3.1 describes an event stream's events one
    at a time): `data` is one JSON object of it, an error object after a failure, or `[DONE]`."""
    return {
        "type": "object",
        "description": "One server-sent event.",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": {"contentMediaType": "application/json", "contentSchema": {"anyOf": [schema, _ERROR]}},
            },
        },
    }


def _keyway_responses(path: str, method: str, responses: dict[str, Any]) -> dict[str, Any]:
    """The official 200 (with Keyway's headers and streams), the official 429, and Keyway's errors. Other
    official errors go: they name `Error` where the body is the `ErrorResponse` envelope."""
    ok = copy.deepcopy(responses["200"])
    ok["headers"] = _MODEL_CALL_HEADERS if path in _METERED else _REQUEST_ID
    for media_type, content in (ok.get("content") or {}).items():
        if media_type == "text/event-stream":
            content["schema"] = _event_stream(content["schema"])
    if (path, method) == ("/responses/{response_id}", "get"):
        # `?stream=true` replays a stored response's events (OpenAI streams here too).
        ok["content"]["text/event-stream"] = {"schema": _event_stream({"$ref": f"{_SCHEMAS}ResponseStreamEvent"})}
    if (path, method) == ("/responses/{response_id}", "delete"):
        ok["content"] = {"application/json": {"schema": {"$ref": f"{_SCHEMAS}KeywayResponseDeleted"}}}
    return {
        "200": ok,
        "429": {"$ref": "#/components/responses/TooManyRequests"},
        "4XX": {"$ref": "#/components/responses/KeywayClientError"},
        "5XX": {"$ref": "#/components/responses/KeywayServerError"},
    }


def _extension_operations(paths: dict[str, Any]) -> dict[str, Any]:
    chat_models = copy.deepcopy(paths["/models"]["get"])
    chat_models.update(
        operationId="listChatModels",
        summary="Lists the models the key may use: an alias of GET /models.",
        description="Keyway: the same list as `GET /models`, at the path some clients of chat gateways use.",
    )
    chat_models["x-keyway-scope"] = MODELS_READ
    document = {
        "operationId": "getOpenApiDocument",
        "summary": "This document.",
        "description": "Keyway: the OpenAPI document of this API. No key needed; cacheable (ETag).",
        "tags": ["Keyway"],
        "security": [],
        "responses": {
            "200": {
                "description": "OK",
                "headers": _REQUEST_ID,
                "content": {"application/json": {"schema": {"type": "object", "required": ["openapi", "paths"]}}},
            },
            "304": {"description": "Not modified (the `If-None-Match` ETag is current)."},
            "4XX": {"$ref": "#/components/responses/KeywayClientError"},
            "5XX": {"$ref": "#/components/responses/KeywayServerError"},
        },
        "x-keyway-extension": True,
    }
    return {
        "/chat/models": {"get": chat_models},
        "/openapi.json": {"get": document},
        **_session_operations(),
    }


def _keyway_operation(operation_id: str, summary: str, schema: str, *, parameters: list[Any] | None = None,
                      body: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "tags": ["Keyway"],
        "x-keyway-scope": SESSIONS,
        "x-keyway-extension": True,
        "responses": {
            "200": {"description": "OK", "headers": _REQUEST_ID,
                    "content": {"application/json": {"schema": {"$ref": f"{_SCHEMAS}{schema}"}}}},
            "4XX": {"$ref": "#/components/responses/KeywayClientError"},
            "5XX": {"$ref": "#/components/responses/KeywayServerError"},
        },
    }
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False}}}}
    return operation


def _session_operations() -> dict[str, Any]:
    """The sessions API: a project's server-side chat sessions (continued on /chat/completions)."""
    session_id = [{"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    listing = [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
        {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"], "default": "desc"}},
        {"name": "after", "in": "query", "schema": {"type": "string"}},
    ]
    return {
        "/sessions": {
            "get": _keyway_operation("listSessions", "Lists the project's sessions.", "KeywayChatSessionList",
                                     parameters=listing),
            "post": _keyway_operation("createSession", "Opens an empty session.", "KeywayChatSession", body=True),
        },
        "/sessions/{session_id}": {
            "get": _keyway_operation("getSession", "A session with its messages.", "KeywayChatSession",
                                     parameters=session_id),
            "delete": _keyway_operation("deleteSession", "Deletes a session.", "KeywayChatSessionDeleted",
                                        parameters=session_id),
        },
    }


def build_document(subset: dict[str, Any]) -> dict[str, Any]:
    """The served document: the vendored subset of OpenAI's document with Keyway's extensions."""
    source = as_json_schema_2020(copy.deepcopy(subset))
    components = source["components"]
    schemas = components["schemas"]
    _recursion_as_ref(schemas)
    components["schemas"] = schemas = _explicit_discriminators(schemas, schemas)
    for official, extended, fields in _EXTENDED_BODIES:
        schemas[extended] = _extended_body(schemas, official, fields)
    schemas.update(_GATEWAY_SCHEMAS)
    for (name, field), schema in _DEVIATIONS.items():
        schemas[name]["properties"][field] = schema
    bodies = {f"{_SCHEMAS}{official}": f"{_SCHEMAS}{extended}" for official, extended, _ in _EXTENDED_BODIES}
    paths: dict[str, Any] = {}
    for path, methods in SERVED.items():
        item: dict[str, Any] = {}
        for method, scope in methods.items():
            operation = source["paths"][path][method]
            body = ((operation.get("requestBody") or {}).get("content") or {}).get("application/json") or {}
            ref = (body.get("schema") or {}).get("$ref")
            if ref in bodies:
                body["schema"] = {"$ref": bodies[ref]}
            if (path, method) in _EXAMPLES:
                body["examples"] = {name: {"value": value} for name, value in _EXAMPLES[path, method].items()}
            operation["responses"] = _keyway_responses(path, method, operation["responses"])
            operation["x-keyway-scope"] = scope
            item[method] = operation
        paths[path] = item
    paths.update(_extension_operations(paths))
    too_many = components["responses"]["TooManyRequests"]
    too_many["headers"] = {**_REQUEST_ID, **too_many.get("headers", {})}
    components["responses"].update(_ERROR_RESPONSES)
    components["headers"] = _HEADERS
    components["securitySchemes"] = {
        "ApiKeyAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "A Keyway API key, `sk-kw-…`, holding the operation's scope (`x-keyway-scope`).",
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Keyway API",
            "version": _keyway_version(),
            "description": _DESCRIPTION,
        },
        "servers": [{"url": "/v1"}],
        "security": [{"ApiKeyAuth": []}],
        "tags": [*source.get("tags", []), {"name": "Keyway", "description": "What only Keyway serves."}],
        "paths": paths,
        "components": components,
        "x-source": source["x-source"],
    }


def load_subset() -> dict[str, Any]:
    subset: dict[str, Any] = orjson.loads(SUBSET_PATH.read_bytes())
    return subset


@functools.cache
def document() -> dict[str, Any]:
    """The document, built on first use and kept for the life of the process."""
    return build_document(load_subset())


@functools.cache
def _rendered() -> tuple[bytes, str]:
    body = orjson.dumps(document())
    return body, f'"{hashlib.sha256(body).hexdigest()[:32]}"'


@api_endpoint(methods=("GET",), scope=None)
async def openapi_json(request: ApiRequest) -> HttpResponseBase:
    body, etag = _rendered()
    # The same document for every caller until the server is upgraded: any cache may keep it, and revalidate.
    headers = {"ETag": etag, "Cache-Control": "public, max-age=300"}
    if etag in request.headers.get("If-None-Match", ""):
        return HttpResponse(status=304, headers=headers)
    return HttpResponse(body, content_type="application/json", headers=headers)
