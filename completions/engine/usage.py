"""How a completions request is metered: what it may cost at most, and what it did cost.

The usage an upstream reports is used as it is. Where there is none — an upstream that does not report it,
a client that left before the usage chunk, an upstream that broke mid-stream — the prompt and what was
produced so far are counted with the model's tokenizer, or estimated where the model has none. The ledger
records which rule gave the numbers.
"""

from __future__ import annotations

from typing import Any

from billing.metering import Meter, Status, UsageSource
from billing.ratelimits import estimate_tokens
from completions.engine.catalog import CatalogEntry, DeploymentEntry
from completions.engine.requests import ChatRequest
from completions.engine.tokenizers import token_counter_for


def max_output_tokens(request: ChatRequest, *, context_length: int, prompt_tokens: int) -> int:
    """The most a chat request can produce: its output limit (or what the context leaves) for each choice."""
    limit = request.max_tokens or max(context_length - prompt_tokens, 1)
    return limit * request.n


class Produced:
    """The text a stream has sent so far (content, refusals, tool-call names and arguments)."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add_choices(self, choices: list[dict[str, Any]]) -> None:
        for choice in choices:
            self._add_message(choice.get("delta") or choice.get("message") or {})

    def _add_message(self, message: dict[str, Any]) -> None:
        for name in ("content", "refusal", "reasoning_content"):
            value = message.get(name)
            if isinstance(value, str) and value:
                self.parts.append(value)
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            for name in ("name", "arguments"):
                value = function.get(name)
                if isinstance(value, str) and value:
                    self.parts.append(value)

    def text(self) -> str:
        return "".join(self.parts)


_MOST_TOKENS = 2**31 - 1


def _reported(usage: Any) -> tuple[int, int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    cached = cached if isinstance(cached, int) else 0
    # A report no request can have (negative, which would credit the tenant, or past what a ledger column
    # holds) is not believed: the tokens are counted instead.
    if any(isinstance(n, bool) or not 0 <= n <= _MOST_TOKENS for n in (prompt, cached, completion)) or cached > prompt:
        return None
    return prompt, cached, completion


def settle_chat(
    meter: Meter,
    *,
    entry: CatalogEntry | None,
    deployment: DeploymentEntry | None,
    status: int,
    messages: list[dict[str, Any]],
    usage: Any = None,
    produced: str = "",
) -> int:
    """Settle a chat request from reported usage, or else by counting; returns the cost."""
    if entry is None or deployment is None:
        # Nothing answered: no tokens were processed anywhere.
        model = entry.public_id if entry is not None else ""
        return meter.settle(model=model, status=status, usage_source=UsageSource.NONE)
    reported = _reported(usage)
    counter = token_counter_for(entry, deployment) if reported is None else None
    if reported is not None:
        source = UsageSource.REPORTED
        prompt, cached, completion = reported
    elif counter is not None:
        source, cached = UsageSource.COUNTED, 0
        prompt = counter.count_messages(messages)
        completion = counter.count_text(produced) if produced else 0
    else:
        source, cached = UsageSource.ESTIMATED, 0
        prompt = estimate_tokens(messages)
        completion = len(produced.encode()) // 4 + 1 if produced else 0
    return meter.settle(model=entry.public_id, deployment_id=deployment.id, provider=deployment.provider_name,
                        status=status, usage_source=source, prompt_tokens=prompt, cached_tokens=cached,
                        completion_tokens=completion)


def settle_embeddings(
    meter: Meter,
    *,
    entry: CatalogEntry,
    deployment: DeploymentEntry | None,
    inputs: list[Any],
    usage: Any = None,
    status: int = Status.OK,
) -> int:
    if deployment is None:
        return meter.settle(model=entry.public_id, status=status, usage_source=UsageSource.NONE)
    reported = _reported(usage)
    return meter.settle(
        model=entry.public_id,
        deployment_id=deployment.id,
        provider=deployment.provider_name,
        status=status,
        usage_source=UsageSource.REPORTED if reported is not None else UsageSource.ESTIMATED,
        prompt_tokens=reported[0] if reported is not None else estimate_tokens(inputs),
    )
