"""CPU per parse of a typical chat completions body: Keyway's parser (completions.api.requests) against a DRF
serializer and a pydantic model holding a subset of the same rules. Run by hand:
    .venv/bin/python bench/parse_bench.py

It decides how bodies are parsed on the hot path (the budget is ≤ 1.5 ms of CPU per proxied request, all
of it): see the figures in completions/api/requests.py's docstring.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "platform_site.settings")

import django  # noqa: E402

django.setup()

import pydantic  # noqa: E402
from rest_framework import serializers  # noqa: E402

from completions.api.requests import parse_chat  # noqa: E402

BODY = orjson.dumps({
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "Let me check."},
        {"role": "user", "content": [{"type": "text", "text": "Please be brief."}]},
    ],
    "temperature": 0.7,
    "max_tokens": 256,
    "stream": True,
    "stream_options": {"include_usage": True},
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
    "tool_choice": "auto",
    "metadata": {"team": "search"},
})


class MessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["developer", "system", "user", "assistant", "tool", "function"])
    content = serializers.JSONField(required=False, allow_null=True)
    tool_call_id = serializers.CharField(required=False)


class FunctionSerializer(serializers.Serializer):
    name = serializers.RegexField(r"^[a-zA-Z0-9_-]{1,64}$")
    parameters = serializers.DictField(required=False)


class ToolSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=["function"])
    function = FunctionSerializer()


class ChatSerializer(serializers.Serializer):
    model = serializers.CharField()
    messages = MessageSerializer(many=True, allow_empty=False)
    temperature = serializers.FloatField(min_value=0, max_value=2, required=False)
    top_p = serializers.FloatField(min_value=0, max_value=1, required=False)
    max_tokens = serializers.IntegerField(min_value=1, required=False)
    stream = serializers.BooleanField(required=False)
    stream_options = serializers.DictField(required=False)
    tools = ToolSerializer(many=True, required=False)
    tool_choice = serializers.JSONField(required=False)
    metadata = serializers.DictField(child=serializers.CharField(max_length=512), required=False)


class Message(pydantic.BaseModel):
    role: Literal["developer", "system", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class Function(pydantic.BaseModel):
    name: str = pydantic.Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    parameters: dict[str, Any] | None = None


class Tool(pydantic.BaseModel):
    type: Literal["function"]
    function: Function


class Chat(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = pydantic.Field(min_length=1)
    temperature: float | None = pydantic.Field(None, ge=0, le=2)
    top_p: float | None = pydantic.Field(None, ge=0, le=1)
    max_tokens: int | None = pydantic.Field(None, ge=1)
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = None
    metadata: dict[str, str] | None = None


def keyway() -> None:
    parse_chat(orjson.loads(BODY), model_pinned=False)


def drf() -> None:
    serializer = ChatSerializer(data=orjson.loads(BODY))
    assert serializer.is_valid(), serializer.errors


def pydantic_model() -> None:
    Chat.model_validate_json(BODY)


def measure(name: str, parse: Any, rounds: int = 20_000) -> None:
    for _ in range(500):
        parse()
    started = time.process_time()
    for _ in range(rounds):
        parse()
    print(f"{name:<24} {(time.process_time() - started) / rounds * 1e6:8.1f} µs CPU per body")


if __name__ == "__main__":
    measure("Keyway (hand-written)", keyway)
    measure("DRF serializer", drf, rounds=5_000)
    measure("pydantic v2 model", pydantic_model)
