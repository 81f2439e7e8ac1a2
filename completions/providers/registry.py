"""Provider instances by configuration: one instance (and so one pool or one loaded model) per provider."""

from __future__ import annotations

import threading

from completions.providers.base import ChatProvider, ProviderConfig
from completions.providers.llamacpp import LlamaCppProvider
from completions.providers.onnx_embeddings import OnnxEmbeddingsProvider
from completions.providers.openai_compatible import OpenAICompatibleProvider

_KINDS: dict[str, type] = {
    "llamacpp": LlamaCppProvider,
    "openai_compatible": OpenAICompatibleProvider,
    "onnx_embeddings": OnnxEmbeddingsProvider,
}
_instances: dict[ProviderConfig, ChatProvider] = {}
_lock = threading.Lock()


def provider_for(config: ProviderConfig) -> ChatProvider:
    """The provider for a configuration; a changed configuration (say, a new API key) gets a new instance."""
    instance = _instances.get(config)
    if instance is None:
        with _lock:
            instance = _instances.get(config)
            if instance is None:
                for old in [known for known in _instances if known.name == config.name]:
                    del _instances[old]
                instance = _KINDS[config.kind](config)
                _instances[config] = instance
    return instance


def loaded_models() -> list[str]:
    return sorted({name for instance in list(_instances.values()) for name in instance.loaded_models()})

