"""An agent's connectors as the tools its model sees, and running one of them: the call, its progress
events, and the outcome the model reads next."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from agents.connectors import (
    ConnectorError,
    HttpConnectorSpec,
    ToolOutcome,
    http_tool_call,
    mcp_call_tool,
    mcp_list_tools,
)
from agents.exceptions import ConnectorUnavailable
from agents.runtime import AgentSpec, ConnectorRef
from platform_site.kernel.errors import ApiError

# What OpenAI allows as a function name.
_MAX_NAME = 64
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class ServerTool:
    """One tool the platform runs: the function name the model calls, the connector's tool it stands for,
    and how progress events name it."""

    function_name: str
    tool_name: str
    label: str
    connector: ConnectorRef
    definition: dict[str, Any]


def _definition(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


async def server_tools(agent: AgentSpec) -> dict[str, ServerTool]:
    """The agent's tools by function name. An HTTP connector is one tool named as the connector; an MCP
    server's tools are listed (cached for a minute) and named `<connector>__<tool>`, so two servers may
    both have a `search`. A server that cannot be listed fails the turn before any model is called."""
    tools: dict[str, ServerTool] = {}
    for connector in agent.connectors:
        if isinstance(connector.spec, HttpConnectorSpec):
            tools[connector.name] = ServerTool(
                connector.name, connector.name, connector.name, connector,
                _definition(connector.name, connector.description, connector.parameters),
            )
            continue
        try:
            listed = await mcp_list_tools(connector.spec)
        except ConnectorError as error:
            raise ConnectorUnavailable(
                f"The agent's MCP connector `{connector.name}` could not be reached: {error}", param="model"
            ) from None
        for tool in listed:
            name = f"{connector.name}__{tool.name}"
            if len(name) > _MAX_NAME or not tool.name:
                continue  # a name the model could not call
            tools[name] = ServerTool(name, tool.name, connector.name, connector,
                                     _definition(name, tool.description, tool.parameters))
    return tools


def check_client_tools(body: dict[str, Any], tools: dict[str, ServerTool]) -> None:
    """A function the client sent may not take the name of one of the agent's own tools: the platform
    could not tell whose call the model made."""
    for position, tool in enumerate(body.get("tools") or ()):
        name = (tool.get("function") or {}).get("name") if isinstance(tool, dict) else None
        if name in tools:
            raise ApiError(
                f"The tool name `{name}` is taken by one of the agent's connectors; rename your function.",
                param=f"tools[{position}].function.name", code="invalid_value",
            )


async def run_tool(
    tool: ServerTool, *, arguments: str, iteration: int, context: dict[str, str], progress: Progress | None
) -> ToolOutcome:
    """Run one call the model made, telling `progress` when it starts and ends. Never raises for a failing
    tool: the model reads what went wrong and may try something else."""
    if progress is not None:
        progress({"type": "tool.started", "tool_name": tool.tool_name, "label": tool.label, "iteration": iteration})
    began = time.perf_counter()
    try:
        parsed = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        outcome = ToolOutcome(outcome="error", content="Error: the arguments were not a JSON object.",
                              error="arguments were not a JSON object",
                              duration_ms=int((time.perf_counter() - began) * 1000))
    elif isinstance(tool.connector.spec, HttpConnectorSpec):
        outcome = await http_tool_call(tool.connector.spec, arguments=parsed, context=context)
    else:
        outcome = await mcp_call_tool(tool.connector.spec, tool=tool.tool_name, arguments=parsed)
    if progress is not None:
        progress({"type": "tool.completed", "tool_name": tool.tool_name, "label": tool.label,
                  "success": outcome.outcome == "ok", "duration_ms": outcome.duration_ms})
    return outcome
