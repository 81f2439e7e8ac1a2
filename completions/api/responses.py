"""The Responses API: `POST /v1/responses`, and a stored response's GET (JSON, or its stream replayed),
DELETE, cancel and input items.

A response is a surface over one engine call: its input (with the items of the previous response's chain
or of its conversation before it) becomes chat messages, the engine streams the answer, and the chunks
become output items and Responses events (completions/api/responses_events.py). Every mode is built from
that one stream:

- JSON: the events are not sent; the finished Response object is returned.
- Streamed: the events are sent as they come, `response.created` first and the terminal event last.
- Background: the call runs in a task of this worker, which writes its progress (and a heartbeat) to the
  stored response; the client gets `queued` at once and may poll, stream it (from any worker, resuming
  after any sequence number) or cancel it.

A stored response is written before its client learns it completed, so a chained call made right after
finds it. The call is metered under the response's id, in the conversation's session where there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from django.http import HttpResponseBase, StreamingHttpResponse

from apikeys.auth import AuthenticatedKey
from apikeys.scopes import RESPONSES
from billing.metering import Endpoint
from completions.api import sse
from completions.api.content import ContentReport, content_step
from completions.api.http import ApiRequest, api_endpoint, json_body, json_response
from completions.api.items import ParamMap, chat_messages, item_text_size
from completions.api.requests import parse_chat
from completions.api.responses_events import OutputWriter, Recorder, Step, item_status, replay
from completions.api.responses_request import CreateRequest, parse_create
from completions.engine import calls
from completions.engine.catalog import CatalogEntry, catalog
from completions.engine.requests import ChatRequest
from conversations import selectors as stored
from conversations import services as store
from conversations.exceptions import ConversationFull, DuplicateItemId
from conversations.models import StoredResponse
from platform_site.kernel import ids
from platform_site.kernel.errors import ApiError, server_error, to_api_error
from platform_site.kernel.groupcommit import GroupCommit
from platform_site.kernel.orm import orm

logger = logging.getLogger(__name__)

RUNNING = (StoredResponse.Status.QUEUED, StoredResponse.Status.IN_PROGRESS)
# How often a background response writes its progress, and at most how long it goes without writing.
FLUSH_EVERY = 0.25
HEARTBEAT_EVERY = 5.0


def new_response_id() -> str:
    return f"resp_{ids.token_hex(24)}"


def not_found(response_id: str) -> ApiError:
    return ApiError(f"Response with id '{response_id[:64]}' not found.", status=404, param="response_id",
                    code="not_found")


# The Response object ---------------------------------------------------------------------------------------


def response_usage(billed: dict[str, int] | None) -> dict[str, Any] | None:
    if billed is None:
        return None
    prompt, completion, cached = billed["prompt_tokens"], billed["completion_tokens"], billed["cached_tokens"]
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


@dataclass(slots=True)
class Prepared:
    """A response ready to make its call: the checked request, its chat form, and what it stores."""

    response_id: str
    created_at: int
    create: CreateRequest
    chat: ChatRequest
    report: ContentReport
    params: ParamMap
    key: AuthenticatedKey
    # This request's own input items (item references resolved), and those of them that are new.
    input_items: list[dict[str, Any]]
    new_items: list[dict[str, Any]]

    def body(self, *, model: str, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
             error: dict[str, Any] | None = None, incomplete: dict[str, Any] | None = None) -> dict[str, Any]:
        create, passive = self.create, self.create.passive
        return {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
            "background": create.background,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "conversation": {"id": create.conversation_id} if create.conversation_id else None,
            "error": error, "incomplete_details": incomplete, "instructions": create.instructions,
            "max_output_tokens": create.max_output_tokens, "max_tool_calls": create.max_tool_calls,
            "metadata": create.metadata, "model": model, "output": output,
            "parallel_tool_calls": create.parallel_tool_calls, "previous_response_id": create.previous_response_id,
            "prompt_cache_key": passive.get("prompt_cache_key"),
            "reasoning": {"effort": create.reasoning_effort, "summary": None},
            "safety_identifier": passive.get("safety_identifier"),
            # Keyway has one tier: whatever was asked for, the default one served it.
            "service_tier": "default", "store": create.store,
            "temperature": 1.0 if create.temperature is None else create.temperature, "text": create.text,
            "tool_choice": create.tool_choice, "tools": create.tools, "top_logprobs": create.top_logprobs or 0,
            "top_p": 1.0 if create.top_p is None else create.top_p, "truncation": create.truncation,
            # Absent until known: the schema has no null usage.
            **({"usage": usage} if usage is not None else {}),
            **({"user": create.user} if create.user is not None else {}),
        }

    def record(self, body: dict[str, Any], log: list[Step]) -> store.ResponseRecord:
        key = self.key
        return store.ResponseRecord(
            response_id=self.response_id, organization_id=key.organization_id, project_id=key.project_id,
            api_key_id=key.id, previous_response_id=self.create.previous_response_id or "",
            conversation_id=self.create.conversation_id, background=self.create.background, body=body,
            input_items=self.input_items, log=log,
        )


# Preparing: context, references, truncation, the chat request ------------------------------------------------


async def _context(create: CreateRequest, key: AuthenticatedKey) -> tuple[list[dict[str, Any]], bool, str | None]:
    """(earlier items, whether all of them fit the byte budget, the field that brought them)."""
    budget = settings.KEYWAY_RESPONSES_MAX_CONTEXT_BYTES
    if create.previous_response_id:
        previous = await orm(stored.response_get, organization_id=key.organization_id,
                             response_id=create.previous_response_id)
        if previous is None:
            raise ApiError(f"Previous response with id '{create.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        if previous.status in RUNNING:
            raise ApiError(f"Previous response with id '{create.previous_response_id}' is still in progress; "
                           "wait for it to finish.", param="previous_response_id", code="previous_response_in_progress")
        context = await orm(stored.response_chain_context, organization_id=key.organization_id,
                            response_id=previous.id, max_bytes=budget)
        return context.items, context.complete, "previous_response_id"
    if create.conversation_id:
        conversation = await orm(stored.conversation_get, organization_id=key.organization_id,
                                 conversation_id=create.conversation_id)
        if conversation is None:
            raise conversation_not_found(create.conversation_id, param="conversation")
        # Refused before the call, not after it was paid for: a conversation that cannot take this response's
        # input and at least one output item.
        room = settings.KEYWAY_CONVERSATION_MAX_ITEMS - conversation.item_count
        if room < len(create.input or ()) + 1:
            raise ConversationFull(f"The conversation holds {conversation.item_count} items and may hold "
                                   f"{settings.KEYWAY_CONVERSATION_MAX_ITEMS}; delete some or start a new one.",
                                   param="conversation")
        context = await orm(stored.conversation_context, conversation=conversation, max_bytes=budget)
        return context.items, context.complete, "conversation"
    return [], True, None


def conversation_not_found(conversation_id: str, *, param: str) -> ApiError:
    return ApiError(f"Conversation with id '{conversation_id[:64]}' not found.", status=404, param=param,
                    code="not_found")


async def _truncated(
    create: CreateRequest, key: AuthenticatedKey, items: list[dict[str, Any]], origins: list[str | None]
) -> tuple[list[dict[str, Any]], list[str | None]]:
    """`truncation: auto`: the oldest items dropped until the rest fits the model's context with room for the
    answer. Weighed at 3 bytes a token, which errs toward dropping; no function output is left without its
    call."""
    name = key.pinned_model or create.model or (create.passthrough.get("models") or [None])[0]
    entry: CatalogEntry | None = (await catalog()).entries.get(name) if isinstance(name, str) else None
    if entry is None:
        return items, origins  # the call will say what is wrong with the model
    room = entry.context_length - (create.max_output_tokens or min(entry.context_length // 4, 1024))
    weights = [item_text_size(item) // 3 + 8 for item in items]
    total = sum(weights) + len(create.instructions or "") // 3
    start = 0
    while total > room and start < len(items) - 1:
        total -= weights[start]
        start += 1
    while start < len(items) - 1 and items[start]["type"] == "function_call_output":
        start += 1
    return items[start:], origins[start:]


async def prepare(request: ApiRequest, body: dict[str, Any]) -> Prepared:
    create = parse_create(body)
    key = request.api_key
    context, complete, context_param = await _context(create, key)
    if not complete and create.truncation == "disabled":
        raise ApiError(f"The earlier items of this {context_param} are larger than this server reads for one "
                       "response; set 'truncation' to 'auto' to drop the oldest.", param=context_param,
                       code="context_length_exceeded")
    by_id = {item["id"]: item for item in context}
    input_items: list[dict[str, Any]] = []
    new_items: list[dict[str, Any]] = []
    for index, item in enumerate(create.input or ()):
        if item["type"] == "item_reference":
            found = by_id.get(item["id"])
            if found is None:
                raise ApiError(f"Item with id '{item['id']}' not found.", param=f"input[{index}].id",
                               code="item_not_found")
            input_items.append(found)
        else:
            if create.conversation_id and item["id"] in by_id:
                raise DuplicateItemId(f"An item with id '{item['id']}' already exists in the conversation.",
                                      param=f"input[{index}].id")
            input_items.append(item)
            new_items.append(item)
    items = context + input_items
    origins: list[str | None] = [None] * len(context) + [f"input[{index}]" for index in range(len(input_items))]
    if create.truncation == "auto":
        items, origins = await _truncated(create, key, items, origins)
    messages, params = chat_messages(create.instructions, items, origins)
    params.context_param = context_param
    try:
        chat, report = parse_chat(create.chat_body(messages), model_pinned=bool(key.pinned_model))
    except ApiError as error:
        raise params.translate(error) from None
    return Prepared(response_id=new_response_id(), created_at=int(time.time()), create=create, chat=chat,
                    report=report, params=params, key=key, input_items=input_items, new_items=new_items)


# Producing: one engine call, its chunks as steps and events ---------------------------------------------------


class Run:
    """One response being produced."""

    def __init__(self, prepared: Prepared, caller: calls.Caller) -> None:
        self.prepared = prepared
        self.caller = caller
        self.recorder = Recorder(max_calls=prepared.create.max_tool_calls)
        self.writer = OutputWriter()
        self.log: list[Step] = []
        self.stream: calls.ChatStream | None = None
        self.model = prepared.chat.models[0] if prepared.chat.models else (prepared.key.pinned_model or "")
        self.final: dict[str, Any] | None = None
        self.headers: dict[str, str] = {}
        # What the call was charged for, in chat's terms, once it ended.
        self.usage: dict[str, int] | None = None
        # Set once the final response is being stored (a second store of it would fail).
        self.saving = False
        self._started: dict[str, Any] | None = None

    def body(self, status: str, **fields: Any) -> dict[str, Any]:
        return self.prepared.body(model=self.model, status=status, output=self.writer.output(), **fields)

    async def open(self, prepare: calls.Prepare | None) -> None:
        """The engine call, up to its first chunk (admission, routing, fallbacks)."""
        try:
            self.stream = await calls.chat_stream(self.prepared.chat, caller=self.caller, prepare=prepare,
                                                  call_id=self.prepared.response_id)
        except ApiError as error:
            raise self.prepared.params.translate(error) from None
        self.model = self.stream.model
        self.headers = self.stream.headers

    async def complete(self, prepare: calls.Prepare | None) -> None:
        """The engine call answered whole (a plain response): its message becomes the same steps a stream's
        chunks would, in one piece."""
        try:
            result = await calls.chat(self.prepared.chat, caller=self.caller, prepare=prepare,
                                      call_id=self.prepared.response_id)
        except ApiError as error:
            raise self.prepared.params.translate(error) from None
        self.model, self.headers = result.model, result.headers
        choice = result.body["choices"][0]
        message = choice.get("message") or {}
        delta = {"content": message.get("content"), "refusal": message.get("refusal"),
                 "tool_calls": [{**call, "index": index} for index, call in enumerate(message.get("tool_calls") or ())]}
        self.record(["s", "in_progress"])
        for step in self.recorder.steps([{"index": 0, "delta": delta, "finish_reason": choice.get("finish_reason"),
                                          "logprobs": choice.get("logprobs")}]):
            self.record(step)
        usage = result.usage or {}
        details = usage.get("prompt_tokens_details") or {}
        self.usage = {"prompt_tokens": usage.get("prompt_tokens") or 0,
                      "completion_tokens": usage.get("completion_tokens") or 0,
                      "cached_tokens": details.get("cached_tokens") or 0}

    def record(self, step: Step) -> list[dict[str, Any]]:
        self.log.append(step)
        if self._started is None:
            self._started = self.prepared.body(model=self.model, status="in_progress", output=[])
        return self.writer.feed(step, self._started)

    async def produce(self) -> AsyncIterator[list[dict[str, Any]]]:
        """The events of the output as the chunks come, those of the chunks that arrived together in one list
        (which goes out in one write); raises what breaks the stream."""
        assert self.stream is not None
        # The first chunks are in already (calls.chat_stream waited for them): the opening goes with them.
        events = list(self.record(["s", "in_progress"]))
        recorder = self.recorder
        try:
            async with contextlib.aclosing(self.stream.batches()) as batches:
                async for batch in batches:
                    events += [event for choices in batch for step in recorder.steps(choices)
                               for event in self.record(step)]
                    if events:
                        yield events
                        events = []
        except Exception:
            if events:
                yield events  # numbered already: sent before the error, or the client would see a gap
            raise
        if events:
            yield events

    def end(self, status: str, error: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Close the output, settle the call, and make the final Response object. Returns the closing
        events (not the terminal one, which is sent once the response is stored)."""
        incomplete = None
        if status == "completed" and self.recorder.finish_reason in ("length", "content_filter"):
            status = "incomplete"
            reason = "max_output_tokens" if self.recorder.finish_reason == "length" else "content_filter"
            incomplete = {"reason": reason}
        events = self.writer.finish(item_status(status))
        stream = self.stream
        if stream is not None:
            stream.close()  # settles now, if the stream did not end by itself
            self.usage = stream.billed_usage
        usage = response_usage(self.usage)
        self.final = self.body(status, usage=usage, error=error, incomplete=incomplete)
        return events

    async def save(self) -> bool:
        """Store the final response (and add its items to its conversation). False: a background response that
        was deleted meanwhile."""
        assert self.final is not None
        self.saving = True
        prepared = self.prepared
        items = [*prepared.new_items, *self.final["output"]]
        if prepared.create.store:
            record = prepared.record(self.final, self.log)
            if not record.background and not prepared.create.conversation_id:
                await _stored.write(record)  # shared with the responses finishing at the same moment
                return True
            return await orm(store.response_save, record, conversation_items=items)
        if prepared.create.conversation_id:
            await orm(store.conversation_append, conversation_id=prepared.create.conversation_id, items=items)
        return True


# Finished responses of this worker, stored together when they finish together.
_stored: GroupCommit[store.ResponseRecord] = GroupCommit("stored responses", store.responses_insert)


def _failure(exc: BaseException, request_id: str) -> dict[str, Any]:
    error = to_api_error(exc, request_id=request_id)
    code = error.code if error.code in ("rate_limit_exceeded", "server_error") else "server_error"
    return {"code": code, "message": error.message}


# POST /v1/responses ---------------------------------------------------------------------------------------------


@api_endpoint(methods=("POST",), scope=RESPONSES)
async def responses_create(request: ApiRequest) -> HttpResponseBase:
    prepared = await prepare(request, json_body(request))
    caller = calls.Caller(key=request.api_key, request_id=request.request_id,
                          session_id=prepared.create.conversation_id or "", endpoint=Endpoint.RESPONSES)
    run = Run(prepared, caller)
    if prepared.create.background:
        return await _start_background(run)
    if prepared.create.stream:
        await run.open(content_step(prepared.report))
        return StreamingHttpResponse(_Streamed(run), content_type=sse.CONTENT_TYPE,
                                     headers={**sse.HEADERS, **run.headers})
    # Answered whole. A call that fails is an HTTP error and is not stored (nothing reached the client); the
    # engine settled it as it settles a failed chat call.
    await run.complete(content_step(prepared.report))
    run.end("completed")
    await run.save()
    assert run.final is not None
    return json_response(run.final, headers=run.headers)


class _Streamed:
    """The body of a streamed response. Its `close()` (Django calls it when the response is closed, finished
    or abandoned) settles the call; a client that left before the end is stored as `cancelled`."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()

    def close(self) -> None:
        run = self.run
        if run.final is None:
            run.end("cancelled")
        if not run.saving and run.prepared.create.store:
            _keep(run.save())

    async def _frames(self) -> AsyncIterator[bytes]:
        run = self.run
        yield b"".join(sse.event_frame(event) for event in run.writer.header(run.body("in_progress")))
        try:
            async for events in run.produce():
                yield b"".join(sse.event_frame(event) for event in events)
        except Exception as exc:  # noqa: BLE001 - after the first byte an error can only be an event
            closing = run.end("failed", _failure(exc, run.caller.request_id))
        else:
            closing = run.end("completed")
        yield b"".join(sse.event_frame(event) for event in closing)
        assert run.final is not None
        try:
            await run.save()
        except Exception as exc:  # noqa: BLE001 - the answer is whole; the client learns it was not stored
            logger.exception("Storing response %s failed", run.prepared.response_id)
            error = to_api_error(exc, request_id=run.caller.request_id)
            yield sse.event_frame({"type": "error", "code": error.code, "message": error.message,
                                   "param": error.param, "sequence_number": run.writer.sequence})
            return
        yield b"".join(sse.event_frame(event) for event in run.writer.terminal(run.final))


_tasks: set[asyncio.Task[Any]] = set()


def _keep(coroutine: Any) -> None:
    """Run a chore to its end even though nobody awaits it (a store after the client left)."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _save_quietly(run: Run) -> None:
    try:
        await run.save()
    except Exception:
        logger.exception("Storing response %s failed", run.prepared.response_id)


# Background responses -----------------------------------------------------------------------------------------


class _Background:
    """A background response running in this worker."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.task: asyncio.Task[None] | None = None
        self.admitted = asyncio.get_running_loop().create_future()
        self.cancel_requested = False

    def cancel(self) -> None:
        self.cancel_requested = True
        if self.task is not None and not self.task.done():
            self.task.cancel()


_background: dict[str, _Background] = {}


def _running_for(organization_id: int) -> int:
    return sum(1 for job in _background.values() if job.run.prepared.key.organization_id == organization_id)


async def _start_background(run: Run) -> HttpResponseBase:
    prepared = run.prepared
    if _running_for(prepared.key.organization_id) >= settings.KEYWAY_RESPONSES_BACKGROUND_PER_ORG:
        raise ApiError(f"Your organization has {settings.KEYWAY_RESPONSES_BACKGROUND_PER_ORG} background responses "
                       "running here, the most it may; wait for one to finish.", status=429,
                       error_type="rate_limit_exceeded", code="too_many_background_responses",
                       headers={"Retry-After": "1"})
    job = _background[prepared.response_id] = _Background(run)
    job.task = asyncio.get_running_loop().create_task(_run_background(job))
    await asyncio.wait({job.admitted, job.task}, return_when=asyncio.FIRST_COMPLETED)
    if not job.admitted.done():
        # Refused before it was admitted (a limit, a budget, a model): the client gets the error itself.
        error = job.task.exception() if job.task.done() and not job.task.cancelled() else None
        raise error if error is not None else server_error(request_id=run.caller.request_id)
    if prepared.create.stream:
        return StreamingHttpResponse(_follow(prepared.response_id, prepared.key.organization_id, -1),
                                     content_type=sse.CONTENT_TYPE, headers={**sse.HEADERS, **run.headers})
    return json_response(job.admitted.result(), headers=run.headers)


async def _run_background(job: _Background) -> None:
    try:
        await _produce_in_background(job)
    finally:
        _background.pop(job.run.prepared.response_id, None)


async def _produce_in_background(job: _Background) -> None:
    run, prepared = job.run, job.run.prepared
    flusher: asyncio.Task[None] | None = None
    content = content_step(prepared.report)

    async def admitted(entries: list[CatalogEntry]) -> dict[str, str]:
        nonlocal flusher
        run.model = entries[0].public_id
        queued = run.body("queued")
        await orm(store.response_start_background, prepared.record(queued, []))
        job.admitted.set_result(queued)
        flusher = asyncio.get_running_loop().create_task(_flush(job))
        return await content(entries) if content is not None else {}

    status, error = "completed", None
    try:
        await run.open(admitted)
        async for _ in run.produce():
            pass
    except asyncio.CancelledError:
        if not job.admitted.done():
            raise
        status = "cancelled" if job.cancel_requested else "failed"
        if not job.cancel_requested:
            error = {"code": "server_error", "message": "The server stopped before this response finished."}
        _uncancel()
    except Exception as exc:
        if not job.admitted.done():
            raise  # the request that started it reports this
        status, error = "failed", _failure(exc, run.caller.request_id)
    finally:
        if flusher is not None:
            flusher.cancel()
    run.end(status, error)
    await _save_quietly(run)


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def _flush(job: _Background) -> None:
    """Write a background response's progress as it comes, and a heartbeat; stop it if it was cancelled (or
    deleted) through another worker."""
    run = job.run
    written, last = 0, time.monotonic()
    while True:
        await asyncio.sleep(FLUSH_EVERY)
        if len(run.log) == written and time.monotonic() - last < HEARTBEAT_EVERY:
            continue
        status = "in_progress" if run.log else "queued"
        written, last = len(run.log), time.monotonic()
        try:
            alive = await orm(store.response_progress, response_id=run.prepared.response_id, status=status,
                              log=list(run.log))
        except Exception:
            logger.exception("Writing the progress of response %s failed", run.prepared.response_id)
            continue
        if not alive:
            job.cancel()
            return


async def cancel_all_background() -> None:
    """At shutdown: stop this worker's background responses, each stored as failed."""
    jobs = list(_background.values())
    for job in jobs:
        if job.task is not None:
            job.task.cancel()
    tasks = [job.task for job in jobs if job.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    if _tasks:
        await asyncio.wait(list(_tasks), timeout=10)


# Reading a stored response ---------------------------------------------------------------------------------------


async def _load(request: ApiRequest, response_id: str) -> StoredResponse:
    row = await orm(stored.response_get, organization_id=request.api_key.organization_id, response_id=response_id)
    if row is None:
        raise not_found(response_id)
    if row.status in RUNNING and response_id not in _background:
        row = await orm(store.response_fail_if_stale, row=row)
    return row


def _current(row: StoredResponse) -> tuple[dict[str, Any], list[Step], bool]:
    """(the Response object as it stands, its log, whether it has ended). A running one shows the output it
    has produced so far."""
    local = _local_state(row.id)
    if local is not None:
        return local
    body, log = orjson.loads(row.body_json), orjson.loads(row.log_json)
    body["status"] = row.status
    if row.status in RUNNING or (log and not body["output"]):
        # Running, or ended by another hand (a cancel its runner has not answered yet, a worker that died):
        # the output is what its log holds.
        _, writer = replay(body, log, finished=False)
        if row.status not in RUNNING:
            writer.finish("incomplete")
        body["output"] = writer.output()
        return body, log, row.status not in RUNNING
    return body, log, True


def _local_state(response_id: str) -> tuple[dict[str, Any], list[Step], bool] | None:
    """The state of a background response this worker runs, until its end is stored (then the database has it)."""
    job = _background.get(response_id)
    if job is None or job.run.final is not None:
        return None
    run = job.run
    return run.body("in_progress" if run.log else "queued"), list(run.log), False


@api_endpoint(methods=("GET", "DELETE"), scope=RESPONSES)
async def response_detail(request: ApiRequest, response_id: str) -> HttpResponseBase:
    row = await _load(request, response_id)
    if request.method == "DELETE":
        job = _background.get(row.id)
        if job is not None:
            job.cancel()
        await orm(store.response_delete, row=row)
        return json_response({"id": response_id, "object": "response", "deleted": True})
    if request.GET.get("stream") in ("true", "1"):
        raw = request.GET.get("starting_after")
        try:
            starting_after = int(raw) if raw not in (None, "") else -1
        except ValueError:
            raise ApiError("'starting_after' must be an integer.", param="starting_after",
                           code="invalid_type") from None
        return StreamingHttpResponse(_follow(row.id, request.api_key.organization_id, starting_after),
                                     content_type=sse.CONTENT_TYPE, headers=sse.HEADERS)
    body, _, _ = _current(row)
    return json_response(body)


async def _follow(response_id: str, organization_id: int, starting_after: int) -> AsyncIterator[bytes]:
    """A response's events after `starting_after`, replayed from its log, then as its log grows (polled:
    in memory when this worker runs it, in the database when another does) until it ends."""
    writer: OutputWriter | None = None
    fed = 0
    while True:
        state = _local_state(response_id)
        if state is None:
            row = await orm(stored.response_get, organization_id=organization_id, response_id=response_id)
            if row is None:
                return  # deleted meanwhile
            if row.status in RUNNING and response_id not in _background:
                row = await orm(store.response_fail_if_stale, row=row)
            state = _current(row)
        body, log, finished = state
        events: list[dict[str, Any]] = []
        if writer is None:
            writer = OutputWriter()
            events += writer.header(body)
        for step in log[fed:]:
            events += writer.feed(step, body)
        fed = len(log)
        if finished:
            events += writer.finish(item_status(body["status"]))
            events += writer.terminal(body)
        frames = b"".join(sse.event_frame(event) for event in events if event["sequence_number"] > starting_after)
        if frames:
            yield frames
        if finished:
            return
        await asyncio.sleep(0.05 if response_id in _background else FLUSH_EVERY)


@api_endpoint(methods=("POST",), scope=RESPONSES)
async def response_cancel(request: ApiRequest, response_id: str) -> HttpResponseBase:
    row = await _load(request, response_id)
    if not row.background:
        raise ApiError("Only responses created with 'background' set to true can be cancelled.",
                       param="response_id", code="invalid_value")
    job = _background.get(row.id)
    if job is not None:
        job.cancel()
        if job.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait({job.task}, timeout=5)
    if row.status in RUNNING:
        marked = await orm(store.response_cancel, row=row)
        # Another worker runs it: it sees the mark at its next write (every FLUSH_EVERY), stops, and stores
        # what it made. Waiting for that (a moment) answers with the output the response keeps.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            await asyncio.sleep(FLUSH_EVERY / 2)
            row = await _load(request, response_id)
            if row.updated_at > marked.updated_at:
                break
    row = await _load(request, response_id)
    body, _, _ = _current(row)
    return json_response(body)


@api_endpoint(methods=("GET",), scope=RESPONSES)
async def response_input_items(request: ApiRequest, response_id: str) -> HttpResponseBase:
    row = await _load(request, response_id)
    items = orjson.loads(row.input_json)
    limit, ascending, after = list_params(request)
    if not ascending:
        items.reverse()
    if after is not None:
        positions = [index for index, item in enumerate(items) if item["id"] == after]
        if not positions:
            raise ApiError(f"Item with id '{after[:64]}' not found.", param="after", code="not_found", status=404)
        items = items[positions[0] + 1:]
    page = items[:limit]
    return json_response(item_list(page, has_more=len(items) > limit))


def list_params(request: ApiRequest) -> tuple[int, bool, str | None]:
    """`limit` (1–100, 20 by default), `order` (`desc` by default) and `after` of a list endpoint."""
    raw = request.GET.get("limit")
    try:
        limit = int(raw) if raw not in (None, "") else 20
    except ValueError:
        raise ApiError("'limit' must be an integer.", param="limit", code="invalid_type") from None
    if not 1 <= limit <= 100:
        raise ApiError(f"'limit' must be between 1 and 100; got {limit}.", param="limit", code="invalid_value")
    order = request.GET.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise ApiError(f"Invalid value for 'order': {order[:20]!r}. Supported values are: 'asc' and 'desc'.",
                       param="order", code="invalid_value")
    after = request.GET.get("after") or None
    return limit, order == "asc", after


def item_list(items: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}
