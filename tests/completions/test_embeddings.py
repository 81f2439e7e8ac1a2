"""/v1/embeddings on the embedded all-MiniLM-L6-v2 (ONNX) and through an HTTP upstream, via the official SDK."""

from __future__ import annotations

from typing import Any

import numpy as np
import openai
import pytest
from asgiref.sync import sync_to_async

from apikeys.models import ApiKey
from apikeys.services import apikey_create
from bench import fake_upstream
from completions.models import Model
from completions.providers import onnx_embeddings
from completions.services import MINILM_PACKAGE, provider_upsert_openai_compatible
from platform_site.models import Organization
from tests.conftest import bearer

pytestmark = pytest.mark.django_db(transaction=True)
MODEL = "all-minilm-l6-v2"


@pytest.fixture
def sdk(sdk: openai.AsyncOpenAI, default_model: None) -> openai.AsyncOpenAI:
    return sdk


def vectors(response: Any) -> np.ndarray:
    return np.array([item.embedding for item in sorted(response.data, key=lambda item: item.index)])


async def test_sdk_default_base64_and_float_give_the_same_unit_vectors(sdk: openai.AsyncOpenAI) -> None:
    # The SDK asks for base64 unless told otherwise, and decodes little-endian float32 itself.
    as_base64 = await sdk.embeddings.create(model=MODEL, input="The cat sits on the mat.")
    as_float = await sdk.embeddings.create(model=MODEL, input="The cat sits on the mat.", encoding_format="float")
    a, b = vectors(as_base64), vectors(as_float)
    assert a.shape == (1, 384)
    assert np.allclose(a, b, atol=1e-6)
    assert abs(float(np.linalg.norm(a[0])) - 1.0) < 1e-4
    assert as_float.model == MODEL and as_float.usage.prompt_tokens == as_float.usage.total_tokens > 0


async def test_float_response_matches_the_openai_schema(
    asgi_client, api_key: tuple[ApiKey, str], default_model: None, validate_schema
) -> None:
    response = await asgi_client.post(
        "/v1/embeddings", headers=bearer(api_key[1]), json={"model": MODEL, "input": ["a", "b"]}
    )
    assert response.status_code == 200
    validate_schema("CreateEmbeddingResponse", response.json())


async def test_a_batch_is_one_model_call_and_equals_single_calls(
    sdk: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = ["A dog runs in the park.", "Stocks fell sharply today.", "short", "A puppy is playing outside on grass."]
    calls: list[int] = []
    original = onnx_embeddings.embed

    def counting(loaded: Any, token_ids: list[list[int]]) -> np.ndarray:
        calls.append(len(token_ids))
        return original(loaded, token_ids)

    monkeypatch.setattr(onnx_embeddings, "embed", counting)
    batch = vectors(await sdk.embeddings.create(model=MODEL, input=texts))
    assert calls == [4]
    singles = np.vstack([vectors(await sdk.embeddings.create(model=MODEL, input=text)) for text in texts])
    assert np.allclose(batch, singles, atol=1e-5), "padding in a batch must not change a vector"
    similarity = batch @ batch.T
    # A real sentence model: the two sentences about dogs are closer than dogs and stocks.
    assert similarity[0, 3] > similarity[0, 1] + 0.2


async def test_token_arrays_embed_like_their_text(sdk: openai.AsyncOpenAI) -> None:
    loaded = onnx_embeddings.models.get_sync(MINILM_PACKAGE)
    ids = loaded.tokenizer.encode("hello world", add_special_tokens=False).ids
    from_text = await sdk.embeddings.create(model=MODEL, input="hello world")
    from_ids = await sdk.embeddings.create(model=MODEL, input=ids)
    from_many = await sdk.embeddings.create(model=MODEL, input=[ids, ids])
    assert np.allclose(vectors(from_text), vectors(from_ids), atol=1e-6)
    assert vectors(from_many).shape == (2, 384)
    assert from_ids.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": ""}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": [1, "a"]}, "input"),
        ({"model": MODEL, "input": ["a"] * 2049}, "input"),
        ({"model": MODEL, "input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"model": MODEL, "input": "a", "dimensions": 0}, "dimensions"),
        ({"model": MODEL, "input": "a", "dimensions": 128}, "dimensions"),
        ({"model": MODEL, "input": "word " * 400}, "input"),
        ({"model": MODEL, "input": [[999999]]}, "input"),
    ],
)
async def test_invalid_embedding_requests_get_400_naming_the_field(
    asgi_client, api_key: tuple[ApiKey, str], default_model: None, body: dict[str, Any], param: str
) -> None:
    response = await asgi_client.post("/v1/embeddings", headers=bearer(api_key[1]), json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_models_are_used_only_for_what_they_can_do(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_supported"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.embeddings.create(model="gemma-3-270m", input="hi")
    assert caught.value.code == "model_not_supported"


async def test_embeddings_need_the_embeddings_scope(asgi_client, org: Organization, default_model: None) -> None:
    _, raw = await sync_to_async(apikey_create)(organization=org, name="chat only", scopes=["chat"])
    response = await asgi_client.post("/v1/embeddings", headers=bearer(raw), json={"model": MODEL, "input": "a"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "missing_scope"


async def test_upstream_embeddings_pass_through_with_dimensions(sdk: openai.AsyncOpenAI) -> None:
    runner, port, app = await fake_upstream.start()
    try:
        await sync_to_async(provider_upsert_openai_compatible)(
            name="fake-embed", base_url=f"http://127.0.0.1:{port}/v1", models=["remote-embed"]
        )
        await sync_to_async(Model.objects.filter(public_id="remote-embed").update)(
            capabilities=["embeddings", "dimensions"]
        )
        response = await sdk.embeddings.create(
            model="remote-embed", input=["a", "b"], dimensions=3, encoding_format="float"
        )
        assert [item.embedding for item in response.data] == [[0.5, -0.25, 0.0], [0.5, -0.25, 1.0]]
        assert response.model == "remote-embed"
        seen = app[fake_upstream.SEEN][-1]
        assert seen["dimensions"] == 3 and seen["input"] == ["a", "b"] and seen["model"] == "remote-embed"
    finally:
        await runner.cleanup()
