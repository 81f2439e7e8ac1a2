"""A realtime session's state: its configuration and its conversation, checked on the way in and rendered in
the client's dialect on the way out, and turned into the chat request each response makes.

Everything a client sends is checked before anything changes: a `session.update` with one bad field changes
nothing, an item with one bad part is not added. Errors name the offending field as the client wrote it
(`session.tools[0].name`, `item.content[1].text`).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import wave
from dataclasses import dataclass, field
from typing import Any

import orjson

from completions.realtime.protocol import Dialect, invalid
from platform_site.kernel import ids

MAX_TOOLS = 128
MAX_METADATA_PAIRS = 16
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ITEM_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_AUDIO_FORMATS = ("audio/pcm", "audio/pcmu", "audio/pcma")
_BETA_AUDIO_FORMATS = ("pcm16", "g711_ulaw", "g711_alaw")
_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
# Fields of the session that are accepted and shown back but change nothing a text model does.
_PASSIVE_GA = ("tracing", "truncation", "include", "prompt")
_READ_ONLY = ("id", "object", "expires_at", "client_secret")


def new_id(prefix: str) -> str:
    return f"{prefix}_{ids.token_hex(10)}"


def as_string(value: Any, param: str, *, limit: int | None = None) -> str:
    if not isinstance(value, str):
        raise invalid(f"Invalid type for '{param}': expected a string, but got {_kind(value)}.", param,
                      "invalid_type")
    if limit is not None and len(value) > limit:
        raise invalid(f"Invalid '{param}': string too long. Expected a string with maximum length {limit}, but "
                      f"got a string with length {len(value)} instead.", param, "string_above_max_length")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), "a value")


def as_object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"Invalid type for '{param}': expected an object, but got {_kind(value)}.", param,
                      "invalid_type")
    return value


def as_list(value: Any, param: str) -> list[Any]:
    if not isinstance(value, list):
        raise invalid(f"Invalid type for '{param}': expected an array, but got {_kind(value)}.", param,
                      "invalid_type")
    return value


def one_of(value: Any, param: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        shown = ", ".join(f"'{choice}'" for choice in choices)
        raise invalid(f"Invalid value: {orjson.dumps(value).decode()[:100]}. Supported values are: {shown}.", param)
    return str(value)


def reject_unknown(fields: dict[str, Any], known: set[str], param: str) -> None:
    for name in fields:
        if name not in known:
            raise invalid(f"Unknown parameter: '{param}.{name}'.", f"{param}.{name}", "unknown_parameter")


def output_modalities(value: Any, param: str, *, audio_ok: bool, model: str) -> list[str]:
    modalities = as_list(value, param)
    if not modalities:
        raise invalid(f"'{param}' must name at least one modality.", param)
    for index, modality in enumerate(modalities):
        one_of(modality, f"{param}[{index}]", ("text", "audio"))
    if "audio" in modalities and not audio_ok:
        raise invalid(
            f"The model `{model}` produces text only: set '{param}' to [\"text\"]. Audio needs a realtime model "
            "served by an upstream realtime provider.", param, "audio_not_supported",
        )
    return list(dict.fromkeys(modalities))


def tools(value: Any, param: str) -> list[dict[str, Any]]:
    items = as_list(value, param)
    if len(items) > MAX_TOOLS:
        raise invalid(f"'{param}' may hold at most {MAX_TOOLS} tools.", param, "array_above_max_length")
    result, names = [], set()
    for index, raw in enumerate(items):
        where = f"{param}[{index}]"
        tool = as_object(raw, where)
        kind = tool.get("type", "function")
        if kind != "function":
            raise invalid(f"Tools of type {orjson.dumps(kind).decode()[:60]} are not supported here; use "
                          "'function'.", f"{where}.type", "unsupported_value")
        reject_unknown(tool, {"type", "name", "description", "parameters"}, where)
        name = as_string(tool.get("name"), f"{where}.name")
        if not _NAME.match(name):
            raise invalid(f"Invalid '{where}.name': use 1 to 64 letters, digits, underscores or dashes.",
                          f"{where}.name")
        if name in names:
            raise invalid(f"Two tools are named '{name}'.", f"{where}.name")
        names.add(name)
        clean: dict[str, Any] = {"type": "function", "name": name}
        if "description" in tool and tool["description"] is not None:
            clean["description"] = as_string(tool["description"], f"{where}.description")
        if "parameters" in tool and tool["parameters"] is not None:
            clean["parameters"] = as_object(tool["parameters"], f"{where}.parameters")
        result.append(clean)
    return result


def tool_choice(value: Any, param: str) -> str | dict[str, Any]:
    if isinstance(value, str):
        return one_of(value, param, ("auto", "none", "required"))
    choice = as_object(value, param)
    if choice.get("type") != "function":
        raise invalid(f"Invalid '{param}.type': only 'function' can be chosen by name.", f"{param}.type")
    reject_unknown(choice, {"type", "name"}, param)
    name = as_string(choice.get("name"), f"{param}.name")
    return {"type": "function", "name": name}


def max_output_tokens(value: Any, param: str) -> int | None:
    if value == "inf":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise invalid(f"Invalid '{param}': expected an integer between 1 and 4096, or \"inf\".", param)
    return value


def temperature(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise invalid(f"Invalid '{param}': expected a number between 0 and 2.", param)
    return float(value)


def metadata(value: Any, param: str) -> dict[str, str] | None:
    if value is None:
        return None
    pairs = as_object(value, param)
    if len(pairs) > MAX_METADATA_PAIRS:
        raise invalid(f"'{param}' may hold at most {MAX_METADATA_PAIRS} pairs.", param)
    for name, text in pairs.items():
        if len(name) > 64:
            raise invalid(f"Invalid '{param}': keys are at most 64 characters.", param)
        as_string(text, f"{param}.{name}", limit=512)
    return dict(pairs)


def _audio_format(value: Any, param: str) -> dict[str, Any]:
    fmt = as_object(value, param)
    kind = one_of(fmt.get("type"), f"{param}.type", _AUDIO_FORMATS)
    if kind == "audio/pcm" and fmt.get("rate", 24000) != 24000:
        raise invalid(f"Invalid '{param}.rate': only 24000 is supported.", f"{param}.rate")
    return {"type": kind, "rate": 24000} if kind == "audio/pcm" else {"type": kind}


def _nullable_object(value: Any, param: str) -> dict[str, Any] | None:
    return None if value is None else dict(as_object(value, param))


def _audio(value: Any, param: str, current: dict[str, Any]) -> dict[str, Any]:
    """GA's nested audio settings, checked and merged over the current ones (kept and shown back; they take
    effect on a realtime audio model)."""
    audio = as_object(value, param)
    reject_unknown(audio, {"input", "output"}, param)
    merged = {"input": dict(current["input"]), "output": dict(current["output"])}
    if "input" in audio:
        raw = as_object(audio["input"], f"{param}.input")
        reject_unknown(raw, {"format", "transcription", "noise_reduction", "turn_detection"}, f"{param}.input")
        if "format" in raw:
            merged["input"]["format"] = _audio_format(raw["format"], f"{param}.input.format")
        for name in ("transcription", "noise_reduction", "turn_detection"):
            if name in raw:
                merged["input"][name] = _nullable_object(raw[name], f"{param}.input.{name}")
    if "output" in audio:
        raw = as_object(audio["output"], f"{param}.output")
        reject_unknown(raw, {"format", "voice", "speed"}, f"{param}.output")
        if "format" in raw:
            merged["output"]["format"] = _audio_format(raw["format"], f"{param}.output.format")
        if "voice" in raw:
            merged["output"]["voice"] = as_string(raw["voice"], f"{param}.output.voice", limit=64)
        if "speed" in raw:
            speed = raw["speed"]
            if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0.25 <= speed <= 1.5:
                raise invalid(f"Invalid '{param}.output.speed': expected a number between 0.25 and 1.5.",
                              f"{param}.output.speed")
            merged["output"]["speed"] = float(speed)
    return merged


def _default_audio() -> dict[str, Any]:
    pcm = {"type": "audio/pcm", "rate": 24000}
    return {
        "input": {"format": dict(pcm), "transcription": None, "noise_reduction": None, "turn_detection": None},
        "output": {"format": dict(pcm), "voice": "alloy", "speed": 1.0},
    }


@dataclass(slots=True)
class SessionConfig:
    """What `session.update` sets, in one form for both dialects."""

    id: str
    model: str
    expires_at: int
    audio_ok: bool = False
    output_modalities: list[str] = field(default_factory=lambda: ["text"])
    instructions: str = ""
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    max_output_tokens: int | None = None
    temperature: float | None = None
    audio: dict[str, Any] = field(default_factory=_default_audio)
    passive: dict[str, Any] = field(default_factory=lambda: {"tracing": None, "truncation": "auto",
                                                              "include": None, "prompt": None})

    def updated(self, raw: Any, *, beta: bool) -> SessionConfig:
        """A copy with the client's changes, every one checked first (a bad field changes nothing)."""
        session = as_object(raw, "session")
        new = SessionConfig(
            id=self.id, model=self.model, expires_at=self.expires_at, audio_ok=self.audio_ok,
            output_modalities=list(self.output_modalities), instructions=self.instructions, tools=list(self.tools),
            tool_choice=self.tool_choice, max_output_tokens=self.max_output_tokens, temperature=self.temperature,
            audio=self.audio, passive=dict(self.passive),
        )
        if beta:
            self._update_beta(new, session)
        else:
            self._update_ga(new, session)
        if "instructions" in session:
            new.instructions = as_string(session["instructions"], "session.instructions")
        if "tools" in session:
            new.tools = tools(session["tools"], "session.tools")
        if "tool_choice" in session:
            new.tool_choice = tool_choice(session["tool_choice"], "session.tool_choice")
        if "model" in session and session["model"] != self.model:
            raise invalid(f"The model is chosen when the session opens (`{self.model}`); open a new session for "
                          "another one.", "session.model")
        return new

    def _update_ga(self, new: SessionConfig, session: dict[str, Any]) -> None:
        reject_unknown(session, {"type", "model", "output_modalities", "instructions", "tools", "tool_choice",
                           "max_output_tokens", "audio", *_PASSIVE_GA, *_READ_ONLY}, "session")
        if "type" in session:
            kind = one_of(session["type"], "session.type", ("realtime", "transcription"))
            if kind != "realtime":
                raise invalid("Transcription sessions are not supported here; use type 'realtime'.",
                              "session.type", "unsupported_value")
        if "output_modalities" in session:
            new.output_modalities = output_modalities(session["output_modalities"], "session.output_modalities",
                                                      audio_ok=self.audio_ok, model=self.model)
        if "max_output_tokens" in session:
            new.max_output_tokens = max_output_tokens(session["max_output_tokens"], "session.max_output_tokens")
        if "audio" in session:
            new.audio = _audio(session["audio"], "session.audio", self.audio)
        for name in _PASSIVE_GA:
            if name in session:
                new.passive[name] = session[name]

    def _update_beta(self, new: SessionConfig, session: dict[str, Any]) -> None:
        reject_unknown(session, {"model", "modalities", "instructions", "voice", "input_audio_format",
                           "output_audio_format", "input_audio_transcription", "turn_detection",
                           "input_audio_noise_reduction", "tools", "tool_choice", "temperature",
                           "max_response_output_tokens", "speed", "tracing", *_READ_ONLY}, "session")
        if "modalities" in session:
            modalities = output_modalities(session["modalities"], "session.modalities", audio_ok=True,
                                           model=self.model)
            if not self.audio_ok:
                # Beta clients ask for ["text", "audio"] by habit; a text model answers those in text.
                if "text" not in modalities:
                    output_modalities(modalities, "session.modalities", audio_ok=False, model=self.model)
                modalities = ["text"]
            new.output_modalities = modalities
        if "max_response_output_tokens" in session:
            new.max_output_tokens = max_output_tokens(session["max_response_output_tokens"],
                                                      "session.max_response_output_tokens")
        if "temperature" in session:
            new.temperature = temperature(session["temperature"], "session.temperature")
        audio = {"input": dict(self.audio["input"]), "output": dict(self.audio["output"])}
        if "voice" in session:
            audio["output"]["voice"] = as_string(session["voice"], "session.voice", limit=64)
        for name, side in (("input_audio_format", "input"), ("output_audio_format", "output")):
            if name in session:
                fmt = one_of(session[name], f"session.{name}", _BETA_AUDIO_FORMATS)
                audio[side]["format"] = {"pcm16": {"type": "audio/pcm", "rate": 24000}, "g711_ulaw": {
                    "type": "audio/pcmu"}, "g711_alaw": {"type": "audio/pcma"}}[fmt]
        for name, side, key in (("input_audio_transcription", "input", "transcription"),
                                ("turn_detection", "input", "turn_detection"),
                                ("input_audio_noise_reduction", "input", "noise_reduction")):
            if name in session:
                audio[side][key] = _nullable_object(session[name], f"session.{name}")
        new.audio = audio

    def render(self, dialect: Dialect) -> dict[str, Any]:
        max_tokens: int | str = self.max_output_tokens if self.max_output_tokens is not None else "inf"
        tool_choice = self.tool_choice
        if dialect.beta:
            fmt = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
            return {
                "id": self.id, "object": "realtime.session", "model": self.model, "expires_at": self.expires_at,
                "modalities": list(self.output_modalities), "instructions": self.instructions,
                "voice": self.audio["output"]["voice"],
                "input_audio_format": fmt[self.audio["input"]["format"]["type"]],
                "output_audio_format": fmt[self.audio["output"]["format"]["type"]],
                "input_audio_transcription": self.audio["input"]["transcription"],
                "turn_detection": self.audio["input"]["turn_detection"],
                "tools": [dict(tool) for tool in self.tools], "tool_choice": tool_choice,
                "temperature": self.temperature if self.temperature is not None else 0.8,
                "max_response_output_tokens": max_tokens,
            }
        return {
            "type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model,
            "output_modalities": list(self.output_modalities), "instructions": self.instructions,
            "tools": [dict(tool) for tool in self.tools], "tool_choice": tool_choice,
            "max_output_tokens": max_tokens, "audio": self.audio, "expires_at": self.expires_at, **self.passive,
        }


# Content part types each role may send, in both dialects' names (stored under GA's).
_PARTS = {
    "system": ("input_text",),
    "user": ("input_text", "input_audio", "input_image"),
    "assistant": ("output_text", "text", "output_audio", "audio"),
}
_CANONICAL = {"text": "output_text", "audio": "output_audio"}


def _part(raw: Any, param: str, role: str, *, capabilities: frozenset[str], model: str) -> dict[str, Any]:
    part = as_object(raw, param)
    kind = one_of(part.get("type"), f"{param}.type", _PARTS[role])
    kind = _CANONICAL.get(kind, kind)
    if kind in ("input_text", "output_text"):
        reject_unknown(part, {"type", "text"}, param)
        return {"type": kind, "text": as_string(part.get("text"), f"{param}.text")}
    if kind == "input_image":
        reject_unknown(part, {"type", "image_url", "detail"}, param)
        if "vision" not in capabilities:
            raise invalid(f"The model `{model}` does not accept images.", param, "unsupported_content_part")
        # Images come inline, as OpenAI's realtime API takes them: nothing is fetched on a client's behalf.
        url = as_string(part.get("image_url"), f"{param}.image_url")
        if not url.startswith("data:image/"):
            raise invalid(f"Invalid '{param}.image_url': expected a base64 data:image/… URL.", f"{param}.image_url")
        detail = one_of(part.get("detail", "auto"), f"{param}.detail", ("auto", "low", "high"))
        return {"type": kind, "image_url": url, "detail": detail}
    # Audio parts (input_audio from the user, output_audio from the assistant): a text model reads only
    # their transcript.
    reject_unknown(part, {"type", "audio", "transcript", "format"}, param)
    transcript = part.get("transcript")
    if transcript is not None:
        as_string(transcript, f"{param}.transcript")
    if part.get("audio") is not None:
        as_string(part["audio"], f"{param}.audio")
        if "audio" not in capabilities:
            raise invalid(
                f"The model `{model}` does not take audio. Send text, or give the audio part a 'transcript' "
                "(the model reads that).", f"{param}.audio", "audio_not_supported",
            )
        try:
            base64.b64decode(part["audio"], validate=True)
        except (binascii.Error, ValueError):
            raise invalid(f"Invalid '{param}.audio': expected base64 PCM16 audio.", f"{param}.audio") from None
    if transcript is None and part.get("audio") is None:
        raise invalid(f"'{param}' needs 'audio' or 'transcript'.", param, "missing_required_parameter")
    clean = {"type": kind, "transcript": transcript}
    if part.get("audio") is not None:
        clean["audio"] = part["audio"]
    return clean


def parse_item(raw: Any, param: str, *, capabilities: frozenset[str], model: str) -> dict[str, Any]:
    """A client's conversation item, checked, in the stored (GA) form, with an id."""
    item = as_object(raw, param)
    kind = one_of(item.get("type"), f"{param}.type", ("message", "function_call", "function_call_output"))
    if "id" in item and item["id"] is not None:
        item_id = as_string(item["id"], f"{param}.id")
        if not _ITEM_ID.match(item_id):
            raise invalid(f"Invalid '{param}.id': use 1 to 64 letters, digits, underscores or dashes.", f"{param}.id")
    else:
        item_id = new_id("item")
    common = {"id", "type", "object", "status"}
    if kind == "message":
        reject_unknown(item, {*common, "role", "content"}, param)
        role = one_of(item.get("role"), f"{param}.role", ("user", "assistant", "system"))
        content = as_list(item.get("content"), f"{param}.content")
        if not content:
            raise invalid(f"'{param}.content' must hold at least one part.", f"{param}.content")
        parts = [_part(part, f"{param}.content[{index}]", role, capabilities=capabilities, model=model)
                 for index, part in enumerate(content)]
        return {"id": item_id, "object": "realtime.item", "type": "message", "status": "completed", "role": role,
                "content": parts}
    if kind == "function_call":
        reject_unknown(item, {*common, "call_id", "name", "arguments"}, param)
        call_id = as_string(item["call_id"], f"{param}.call_id", limit=64) if item.get("call_id") else new_id("call")
        return {"id": item_id, "object": "realtime.item", "type": "function_call", "status": "completed",
                "call_id": call_id, "name": as_string(item.get("name"), f"{param}.name", limit=64),
                "arguments": as_string(item.get("arguments", ""), f"{param}.arguments")}
    reject_unknown(item, {*common, "call_id", "output"}, param)
    return {"id": item_id, "object": "realtime.item", "type": "function_call_output",
            "call_id": as_string(item.get("call_id"), f"{param}.call_id", limit=64),
            "output": as_string(item.get("output"), f"{param}.output")}


def render_item(item: dict[str, Any], dialect: Dialect) -> dict[str, Any]:
    """An item as the client's dialect shows it (a copy: the stored one may still change)."""
    shown = dict(item)
    if item.get("type") == "message":
        shown["content"] = [
            {**part, "type": dialect.content_type(part["type"])} if item["role"] == "assistant" else dict(part)
            for part in item["content"]
        ]
    return shown


def item_size(item: dict[str, Any]) -> int:
    return len(orjson.dumps(item))


class Conversation:
    """The session's default conversation: items in order, bounded in number and in bytes."""

    def __init__(self, *, max_items: int, max_bytes: int) -> None:
        self.id = new_id("conv")
        self.items: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.bytes = 0
        self.max_items = max_items
        self.max_bytes = max_bytes

    def room_for(self, size: int, param: str | None) -> None:
        if len(self.order) >= self.max_items:
            raise invalid(f"The conversation holds {self.max_items} items, the most it may; delete some with "
                          "conversation.item.delete.", param, "conversation_full")
        if self.bytes + size > self.max_bytes:
            raise invalid(f"The conversation would exceed {self.max_bytes} bytes, the most it may hold; delete "
                          "items with conversation.item.delete.", param, "conversation_full")

    def add(
        self, item: dict[str, Any], *, previous_item_id: str | None, param: str | None = "item", bounded: bool = True
    ) -> str | None:
        """Insert after `previous_item_id` ("root": first; None: last). Returns the id it follows. A response's
        own output is not `bounded`: its room was checked when it was asked for, and the model's output
        limit bounds it."""
        if item["id"] in self.items:
            raise invalid(f"An item with id '{item['id']}' already exists in the conversation.",
                          f"{param}.id" if param else None, "duplicate_item_id")
        size = item_size(item)
        if bounded:
            self.room_for(size, param)
        if previous_item_id is None:
            index = len(self.order)
        elif previous_item_id == "root":
            index = 0
        else:
            if previous_item_id not in self.items:
                raise invalid(f"Previous item with id '{previous_item_id}' not found.", "previous_item_id",
                              "item_not_found")
            index = self.order.index(previous_item_id) + 1
        self.order.insert(index, item["id"])
        self.items[item["id"]] = item
        self.bytes += size
        return self.order[index - 1] if index > 0 else None

    def get(self, item_id: Any, param: str = "item_id") -> dict[str, Any]:
        if not isinstance(item_id, str) or item_id not in self.items:
            shown = item_id if isinstance(item_id, str) else orjson.dumps(item_id).decode()[:64]
            raise invalid(f"Item with item_id not found: {shown[:80]}", param, "item_not_found")
        return self.items[item_id]

    def delete(self, item_id: Any) -> str:
        item = self.get(item_id)
        self.order.remove(item["id"])
        del self.items[item["id"]]
        self.bytes -= item_size(item)
        return str(item["id"])

    def resize(self, item: dict[str, Any], before: int) -> None:
        """Account for an item whose content changed in place (a streamed answer, a truncation)."""
        self.bytes += item_size(item) - before

    def in_order(self) -> list[dict[str, Any]]:
        return [self.items[item_id] for item_id in self.order]


def _wav(pcm_base64: str) -> str:
    """Realtime audio (PCM16, 24 kHz, mono, base64) as the base64 WAV file chat's input_audio parts take."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(24000)
        wav.writeframes(base64.b64decode(pcm_base64))
    return base64.b64encode(buffer.getvalue()).decode()


def _chat_content(item: dict[str, Any]) -> str | list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for part in item["content"]:
        if part["type"] in ("input_text", "output_text"):
            parts.append({"type": "text", "text": part["text"]})
        elif part["type"] == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"], "detail": part["detail"]}})
        elif part["type"] == "input_audio" and part.get("audio"):
            # Only a model with the audio capability gets here (parse_item checks).
            parts.append({"type": "input_audio", "input_audio": {"data": _wav(part["audio"]), "format": "wav"}})
        elif part.get("transcript"):
            parts.append({"type": "text", "text": part["transcript"]})
    if item["role"] != "user" or all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def chat_messages(instructions: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation as chat messages: instructions first, function calls as the assistant's tool calls
    (consecutive ones in one message), their outputs as tool messages."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        if item["type"] == "message":
            messages.append({"role": item["role"], "content": _chat_content(item)})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and ("tool_calls" in last or not last["content"]):
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def chat_tools(session_tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {name: value for name, value in tool.items() if name != "type"}}
        for tool in session_tools
    ]


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice["name"]}}

