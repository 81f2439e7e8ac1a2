"""The Responses and Conversations APIs on a real uvicorn server with two worker processes, driven by the
official SDK over fresh connections (so that consecutive calls land on either worker): a chained call made
right after its predecessor finds it, a background response runs in one worker while the other answers its
polls, streams and cancels, and the embedded Gemma answers through every mode."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from tests.e2e import server

pytestmark = pytest.mark.e2e

TEXT = "".join(f"t{i} " for i in range(20))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with server.keyway_stack(tmp_path_factory.mktemp("keyway-responses"), upstream_models="ok,drip",
                             workers=2) as running:
        yield running


@pytest.fixture
def client(stack: dict[str, Any]) -> Iterator[openai.OpenAI]:
    # No kept-alive connections: every call opens its own, and the kernel spreads them over both workers.
    http = httpx2.Client(limits=httpx2.Limits(max_keepalive_connections=0), timeout=60)
    yield openai.OpenAI(base_url=f"{stack['url']}/v1", api_key=stack["key"], http_client=http, max_retries=0)
    http.close()


def _until(client: openai.OpenAI, response_id: str, done: tuple[str, ...]) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        if response.status in done:
            return response
        time.sleep(0.05)
    raise AssertionError(f"{response_id} never reached {done}")


def test_every_chained_call_made_at_once_finds_its_predecessor(client: openai.OpenAI) -> None:
    previous = None
    for turn in range(8):
        response = client.responses.create(model="ok", input=f"turn {turn}", previous_response_id=previous)
        assert response.status == "completed"
        previous = response.id
    items = client.responses.input_items.list(previous)
    assert [item.content[0].text for item in items.data] == ["turn 7"]  # type: ignore[union-attr]


def test_background_responses_are_polled_streamed_and_cancelled_from_either_worker(client: openai.OpenAI) -> None:
    started = client.responses.create(model="drip", input="hi", background=True)
    assert started.status == "queued"
    _until(client, started.id, ("in_progress",))
    resumed = list(client.responses.retrieve(started.id, stream=True, starting_after=3))
    assert resumed[0].sequence_number == 4 and resumed[-1].type == "response.completed"
    assert resumed[-1].response.output_text == TEXT  # type: ignore[union-attr]
    assert _until(client, started.id, ("completed",)).output_text == TEXT

    # Several, so that some cancels reach the worker that runs the response and some the other one.
    for _ in range(4):
        running = client.responses.create(model="drip", input="hi", background=True)
        _until(client, running.id, ("in_progress",))
        client.responses.cancel(running.id)
        stopped = _until(client, running.id, ("cancelled",))
        text = stopped.output_text
        time.sleep(0.5)
        # Stopped for good: nothing more arrives after the cancel took effect.
        assert client.responses.retrieve(running.id).output_text == text != TEXT


def test_the_embedded_model_answers_in_every_mode_through_a_conversation(client: openai.OpenAI) -> None:
    conversation = client.conversations.create(items=[{"type": "message", "role": "user", "content": "Say hello"}])
    plain = client.responses.create(model="gemma-3-270m", input="Say hello", conversation=conversation.id,
                                    max_output_tokens=16, temperature=0)
    assert plain.output_text and plain.usage is not None and plain.usage.output_tokens <= 16
    with client.responses.stream(model="gemma-3-270m", input="Say hello", max_output_tokens=16,
                                 temperature=0) as stream:
        kinds = [event.type for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    background = client.responses.create(model="gemma-3-270m", input="Say hello", max_output_tokens=16,
                                         temperature=0, background=True, conversation=conversation.id)
    finished = _until(client, background.id, ("completed", "incomplete"))
    assert finished.output_text and finished.usage is not None
    assert finished.usage.input_tokens > plain.usage.input_tokens  # the conversation grew
    items = client.conversations.items.list(conversation.id, order="asc", limit=100)
    assert [item.role for item in items.data] == [  # type: ignore[union-attr]
        "user", "user", "assistant", "user", "assistant"]


def test_a_streamed_response_whose_client_leaves_is_stored_as_cancelled(
    stack: dict[str, Any], client: openai.OpenAI
) -> None:
    body = {"model": "drip", "input": "hi", "stream": True}
    response_id = None
    with httpx2.stream("POST", f"{stack['url']}/v1/responses", json=body, timeout=30,
                       headers={"Authorization": f"Bearer {stack['key']}"}) as answer:
        for line in answer.iter_lines():
            if line.startswith("data: ") and response_id is None:
                response_id = json.loads(line[6:])["response"]["id"]
            if line.startswith("event: response.output_text.delta"):
                break
    assert response_id is not None
    # Stored a moment after the server saw the client go (not before: it was never told it completed).
    deadline = time.monotonic() + 10
    while True:
        try:
            left = _until(client, response_id, ("cancelled",))
            break
        except openai.NotFoundError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert left.output_text and left.output_text != TEXT
