"""How a response's output arrives: recorded as steps, written as Responses stream events.

A response's chat chunks become a short log of steps (`Recorder`), and the steps become events and output
items (`OutputWriter`):

    ["s", "in_progress"]                          the response started producing
    ["m", item_id]                                a message item opens
    ["t", text, logprobs?]  /  ["r", text]        text / refusal for the open message
    ["c", index, item_id, call_id, name]          a function call item opens (chat's tool-call index)
    ["a", index, text]                            arguments for that call

The log is what is stored. Feeding it to a fresh writer gives the same events with the same sequence numbers,
which is how a stream is resumed (`GET /v1/responses/{id}?stream=true&starting_after=N`), by any worker,
while the response runs or after it finished.
"""

from __future__ import annotations

from typing import Any

from completions.api.items import new_id

Step = list[Any]
Event = dict[str, Any]

TERMINAL_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete",
                   "failed": "response.failed"}


def snapshot(body: dict[str, Any], status: str) -> dict[str, Any]:
    """The response as it stood before it produced anything (what `response.created` and friends carry)."""
    shown = {**body, "status": status, "output": [], "completed_at": None, "error": None, "incomplete_details": None}
    shown.pop("usage", None)
    return shown


class Recorder:
    """Turns the engine's chat choices into steps, giving new items their ids."""

    __slots__ = ("message_open", "calls", "finish_reason", "max_calls", "logprobs")

    def __init__(self, *, max_calls: int | None) -> None:
        self.message_open = False
        # Logprobs of tokens that brought no text yet (part of a character): they go with the next text.
        self.logprobs: list[Any] = []
        self.calls: set[int] = set()
        self.finish_reason: str | None = None
        self.max_calls = max_calls

    def steps(self, choices: list[dict[str, Any]]) -> list[Step]:
        steps: list[Step] = []
        for choice in choices:
            if choice.get("index", 0) != 0:
                continue  # the Responses API has one answer
            delta = choice.get("delta") or {}
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and logprobs.get("content"):
                self.logprobs.extend(logprobs["content"])
            for kind, name in (("t", "content"), ("r", "refusal")):
                text = delta.get(name)
                if isinstance(text, str) and text:
                    if not self.message_open:
                        self.message_open = True
                        steps.append(["m", new_id("msg")])
                    if kind == "t" and self.logprobs:
                        steps.append(["t", text, self.logprobs])
                        self.logprobs = []
                    else:
                        steps.append([kind, text])
            for call in delta.get("tool_calls") or ():
                index = call.get("index", 0)
                function = call.get("function") or {}
                if index not in self.calls:
                    if self.max_calls is not None and len(self.calls) >= self.max_calls:
                        continue
                    self.calls.add(index)
                    self.message_open = False
                    steps.append(["c", index, new_id("fc"), call.get("id") or new_id("call"),
                                  function.get("name") or ""])
                arguments = function.get("arguments")
                if index in self.calls and isinstance(arguments, str) and arguments:
                    steps.append(["a", index, arguments])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return steps


class _Item:
    __slots__ = ("item", "index", "parts", "open_part", "done")

    def __init__(self, item: dict[str, Any], index: int) -> None:
        self.item = item
        self.index = index
        # A message's parts as [kind, texts, logprobs]; a call's argument fragments in parts[0][1].
        self.parts: list[list[Any]] = []
        self.open_part = False
        self.done = False


class OutputWriter:
    """Steps in, events and output items out, with sequence numbers from 0."""

    def __init__(self) -> None:
        self.sequence = 0
        self.items: list[_Item] = []
        self.message: _Item | None = None
        self.calls: dict[int, _Item] = {}
        self.last_call: _Item | None = None

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return event

    # The response ---------------------------------------------------------------------------------------
    def header(self, body: dict[str, Any]) -> list[Event]:
        """`response.created` (and `response.queued` for a background response)."""
        if body.get("background"):
            queued = snapshot(body, "queued")
            return [self._event("response.created", response=queued), self._event("response.queued", response=queued)]
        return [self._event("response.created", response=snapshot(body, "in_progress"))]

    def terminal(self, body: dict[str, Any]) -> list[Event]:
        kind = TERMINAL_EVENTS.get(body["status"])
        return [self._event(kind, response=body)] if kind else []

    # Steps ------------------------------------------------------------------------------------------------
    def feed(self, step: Step, body: dict[str, Any]) -> list[Event]:
        kind = step[0]
        if kind == "s":
            return [self._event("response.in_progress", response=snapshot(body, "in_progress"))]
        if kind == "m":
            events = self._close_open(call_too=True)
            item = {"id": step[1], "type": "message", "status": "in_progress", "role": "assistant", "content": []}
            self.message = self._add(item)
            return [*events, self._event("response.output_item.added", output_index=self.message.index,
                                         item=_copy(item))]
        if kind in ("t", "r"):
            return self._text(kind, step)
        if kind == "c":
            events = self._close_open(call_too=True)
            item = {"id": step[2], "type": "function_call", "status": "in_progress", "call_id": step[3],
                    "name": step[4], "arguments": ""}
            opened = self.calls[step[1]] = self.last_call = self._add(item)
            opened.parts.append(["arguments", []])
            return [*events, self._event("response.output_item.added", output_index=opened.index, item=_copy(item))]
        call = self.calls.get(step[1])
        if call is None:
            return []
        call.parts[0][1].append(step[2])
        if call.done:
            call.item["arguments"] = "".join(call.parts[0][1])
            return []  # a fragment of a call already closed (an upstream that interleaves its calls)
        return [self._event("response.function_call_arguments.delta", item_id=call.item["id"],
                            output_index=call.index, delta=step[2])]

    def _add(self, item: dict[str, Any]) -> _Item:
        entry = _Item(item, len(self.items))
        self.items.append(entry)
        return entry

    def _text(self, kind: str, step: Step) -> list[Event]:
        message = self.message
        if message is None or message.done:
            return []  # the recorder always opens a message first
        events: list[Event] = []
        part_kind = "output_text" if kind == "t" else "refusal"
        if not message.open_part or message.parts[-1][0] != part_kind:
            events += self._close_part(message)
            message.parts.append([part_kind, [], []])
            message.open_part = True
            events.append(self._event("response.content_part.added", item_id=message.item["id"],
                                      output_index=message.index, content_index=len(message.parts) - 1,
                                      part=_empty_part(part_kind)))
        part = message.parts[-1]
        part[1].append(step[1])
        where = {"item_id": message.item["id"], "output_index": message.index, "content_index": len(message.parts) - 1}
        if kind == "r":
            events.append(self._event("response.refusal.delta", **where, delta=step[1]))
        else:
            logprobs = step[2] if len(step) > 2 else []
            part[2].extend(logprobs)
            events.append(self._event("response.output_text.delta", **where, delta=step[1], logprobs=logprobs))
        return events

    def _close_part(self, message: _Item) -> list[Event]:
        if not message.open_part:
            return []
        message.open_part = False
        kind, texts, logprobs = message.parts[-1]
        text = "".join(texts)
        where = {"item_id": message.item["id"], "output_index": message.index, "content_index": len(message.parts) - 1}
        part = _part(kind, text, logprobs)
        if kind == "refusal":
            done = self._event("response.refusal.done", **where, refusal=text)
        else:
            done = self._event("response.output_text.done", **where, text=text, logprobs=logprobs)
        return [done, self._event("response.content_part.done", **where, part=part)]

    def _close(self, entry: _Item, status: str) -> list[Event]:
        if entry.done:
            return []
        entry.done = True
        item = entry.item
        events: list[Event] = []
        if item["type"] == "message":
            events += self._close_part(entry)
            item["content"] = [_part(kind, "".join(texts), logprobs) for kind, texts, logprobs in entry.parts]
        else:
            item["arguments"] = "".join(entry.parts[0][1])
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=entry.index, name=item["name"], arguments=item["arguments"]))
        item["status"] = status
        events.append(self._event("response.output_item.done", output_index=entry.index, item=_copy(item)))
        return events

    def _close_open(self, *, call_too: bool) -> list[Event]:
        events: list[Event] = []
        if self.message is not None:
            events += self._close(self.message, "completed")
        if call_too and self.last_call is not None:
            events += self._close(self.last_call, "completed")
        return events

    def finish(self, item_status: str) -> list[Event]:
        """Close every item still open, with `item_status` (`completed`, or `incomplete` for a response cut
        short)."""
        events: list[Event] = []
        for entry in self.items:
            events += self._close(entry, item_status)
        return events

    def output(self) -> list[dict[str, Any]]:
        """The output items as they stand (open ones with what they hold so far)."""
        shown = []
        for entry in self.items:
            item = _copy(entry.item)
            if not entry.done:
                if item["type"] == "message":
                    item["content"] = [_part(kind, "".join(texts), logprobs) for kind, texts, logprobs in entry.parts]
                else:
                    item["arguments"] = "".join(entry.parts[0][1])
            shown.append(item)
        return shown


def _empty_part(kind: str) -> dict[str, Any]:
    if kind == "refusal":
        return {"type": "refusal", "refusal": ""}
    return {"type": "output_text", "text": "", "annotations": [], "logprobs": []}


def _part(kind: str, text: str, logprobs: list[Any]) -> dict[str, Any]:
    if kind == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(logprobs)}


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    copied = dict(item)
    if "content" in copied:
        copied["content"] = [dict(part) for part in copied["content"]]
    return copied


def replay(body: dict[str, Any], log: list[Step], *, finished: bool) -> tuple[list[Event], OutputWriter]:
    """The events of a stored response, from its log (and, once it `finished`, its end)."""
    writer = OutputWriter()
    events = writer.header(body)
    for step in log:
        events += writer.feed(step, body)
    if finished:
        events += writer.finish(item_status(body["status"]))
        events += writer.terminal(body)
    return events, writer


def item_status(status: str) -> str:
    """The status of the items a response left open when it ended with `status`."""
    return "completed" if status == "completed" else "incomplete"
