"""GET /v1/openapi.json: a valid OpenAPI 3.1 document of exactly the /v1 routes Keyway serves, built from the
vendored part of OpenAI's document, which is what `manage.py openapi_subset` makes of that document."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import pytest
from django.core.management import call_command
from django.urls import URLPattern
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from completions.api import openapi
from completions.api import urls as api_urls
from tests.conftest import OPENAPI_PATH, bearer

METHODS = ("GET", "POST", "DELETE")


def _route_template(pattern: URLPattern) -> str:
    """A URL pattern of completions.api.urls as an OpenAPI path with anonymous parameters: /models/{}."""
    return "/" + re.sub(r"<(?:\w+:)?\w+>", "{}", str(pattern.pattern))


def _anonymous(path: str) -> str:
    return re.sub(r"\{\w+\}", "{}", path)


def _routes() -> list[str]:
    return [_route_template(pattern) for pattern in api_urls.urlpatterns if pattern.name != "unknown"]


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi.document()


async def test_the_document_is_served_without_a_key_as_valid_openapi_3_1_and_revalidates(asgi_client) -> None:
    response = await asgi_client.get("/v1/openapi.json")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    assert "public" in response.headers["cache-control"]
    body = response.json()
    assert body["openapi"] == "3.1.0"
    validate(body)
    again = await asgi_client.get("/v1/openapi.json", headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and not again.content
    assert (await asgi_client.get("/api/v1/openapi.json")).json() == body


def test_every_v1_route_is_documented_and_nothing_else(document: dict[str, Any]) -> None:
    assert sorted(_routes()) == sorted(_anonymous(path) for path in document["paths"])


@pytest.mark.django_db(transaction=True)
async def test_each_route_answers_the_methods_the_document_lists_and_405_to_the_others(
    asgi_client, api_key, document: dict[str, Any]
) -> None:
    documented = {_anonymous(path): item for path, item in document["paths"].items()}
    for template in _routes():
        path = "/v1" + template.replace("{}", "nothing-here")
        for method in METHODS:
            response = await asgi_client.request(
                method, path, headers=bearer(api_key[1]), json={} if method == "POST" else None
            )
            listed = method.lower() in documented[template]
            assert (response.status_code == 405) is not listed, (method, path, response.status_code, response.text)
            assert response.status_code < 500, (method, path, response.text)


def test_every_operation_names_its_scope_its_errors_and_the_request_id(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert responses["4XX"] == {"$ref": "#/components/responses/KeywayClientError"}, (method, path)
            assert responses["5XX"] == {"$ref": "#/components/responses/KeywayServerError"}, (method, path)
            assert "x-request-id" in responses["200"]["headers"], (method, path)
            assert operation.get("x-keyway-scope") or operation.get("security") == [], (method, path)
    for name in ("KeywayClientError", "KeywayServerError"):
        schema = document["components"]["responses"][name]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorResponse"}


def test_the_gateway_fields_are_in_the_request_schemas_and_every_example_is_valid(document: dict[str, Any]) -> None:
    registry = Registry().with_resource("urn:keyway", DRAFT202012.create_resource(document))
    checked = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            content = (operation.get("requestBody") or {}).get("content", {}).get("application/json", {})
            # The request schema where it stands in the document, so that its own references resolve.
            pointer = "/".join(
                quote(part.replace("~", "~0").replace("/", "~1"), safe="")
                for part in ("paths", path, method, "requestBody", "content", "application/json", "schema")
            )
            validator = Draft202012Validator({"$ref": f"urn:keyway#/{pointer}"}, registry=registry)
            for name, example in content.get("examples", {}).items():
                errors = list(validator.iter_errors(example["value"]))
                assert not errors, (method, path, name, [error.message[:200] for error in errors[:3]])
                checked += 1
    assert checked >= 10
    chat = document["paths"]["/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat == {"$ref": "#/components/schemas/KeywayCreateChatCompletionRequest"}
    added = document["components"]["schemas"]["KeywayCreateChatCompletionRequest"]["allOf"][1]["properties"]
    assert set(added) == {"models", "provider", "session_id", "max_iterations"}


@pytest.mark.skipif(not OPENAPI_PATH.exists(), reason="OpenAI's OpenAPI document (../shared) is not here")
def test_the_vendored_subset_is_what_the_generator_makes_of_openais_document() -> None:
    call_command("openapi_subset", "--check", "--source", str(OPENAPI_PATH))
