"""Connectors: signed HTTP tool calls and MCP tools over streamable HTTP, against real servers on loopback."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import time
from typing import Any

import orjson
import pytest

from agents import connectors
from agents.connectors import HttpConnectorSpec, McpServerSpec, ToolOutcome
from platform_site.kernel import outbound
from tests.agents.conftest import McpTestServer, ToolServer

CONTEXT = {"request_id": "req_123", "session_id": "sess_abc", "agent": "support"}


def http_spec(server: ToolServer, path: str, *, timeout_ms: int = 2000, max_response_bytes: int = 65_536,
              secret: str | None = None) -> HttpConnectorSpec:
    return HttpConnectorSpec(public_id="conn_http", name="lookup", url=server.url(path),
                             secret=server.secret if secret is None else secret, timeout_ms=timeout_ms,
                             max_response_bytes=max_response_bytes)


def mcp_spec(url: str, *, timeout_ms: int = 5000, max_response_bytes: int = 65_536,
             authorization: str = "") -> McpServerSpec:
    return McpServerSpec(public_id="conn_mcp", name="shop", url=url, authorization=authorization,
                         timeout_ms=timeout_ms, max_response_bytes=max_response_bytes)


async def fake_public_check(host: str) -> bool:
    return True


async def running_tasks() -> set[asyncio.Task[Any]]:
    """The tasks of the loop but this one, once the loop has settled. The SDK leaves httpx2's response
    generators suspended when a stream is abandoned; asyncio closes each in a short task of its own when it is
    garbage collected, which may be late for objects in a cycle. Collecting first makes that happen now."""
    gc.collect()
    for _ in range(5):
        await asyncio.sleep(0)
    return asyncio.all_tasks() - {asyncio.current_task()}


def assert_no_payload_in_error(outcome: ToolOutcome, *texts: str) -> None:
    for text in texts:
        assert text not in outcome.error


# Signatures


def test_a_signature_verifies_and_a_stale_or_tampered_one_does_not() -> None:
    body = b'{"tool":"lookup","arguments":{"id":7}}'
    header = connectors.sign("s3cret", 1_700_000_000, body)
    digest = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={digest}"

    assert connectors.verify("s3cret", header, body, now=1_700_000_100)
    assert not connectors.verify("s3cret", header, body, now=1_700_000_301), "older than the tolerance"
    assert not connectors.verify("s3cret", header, body, now=1_699_999_000), "from the future"
    assert not connectors.verify("s3cret", header, body + b" ", now=1_700_000_000), "tampered body"
    assert not connectors.verify("other", header, body, now=1_700_000_000), "another secret"
    for malformed in (None, "", "garbage", "t=abc,v1=00", f"v1={digest}", "t=1700000000", "t=1700000000,v1"):
        assert not connectors.verify("s3cret", malformed, body, now=1_700_000_000), malformed
    rotated = f"t=1700000000,v1={'0' * 64},v1={digest}"
    assert connectors.verify("s3cret", rotated, body, now=1_700_000_000), "any v1 may match"


# HTTP connectors


async def test_an_http_tool_call_is_signed_and_its_reply_returned(tool_server: ToolServer,
                                                                  allow_loopback: None) -> None:
    outcome = await connectors.http_tool_call(http_spec(tool_server, "/ok"), arguments={"order_id": "A-17"},
                                              context=CONTEXT)
    assert outcome.outcome == "ok" and outcome.error == ""
    assert orjson.loads(outcome.content) == {"echo": {"order_id": "A-17"}, "signature_valid": True}
    assert 0 <= outcome.duration_ms < 2000

    (request,) = tool_server.requests
    assert request.method == "POST" and request.path == "/ok"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == "Keyway connectors"
    assert orjson.loads(request.body) == {"tool": "lookup", "arguments": {"order_id": "A-17"}, **CONTEXT}
    signature = request.headers["X-Keyway-Signature"]
    assert connectors.verify(tool_server.secret, signature, request.body, now=time.time())
    timestamp = int(signature.split(",")[0].removeprefix("t="))
    assert abs(timestamp - time.time()) < 5


async def test_an_http_tool_signed_with_the_wrong_secret_is_rejected_by_the_receiver(
    tool_server: ToolServer, allow_loopback: None
) -> None:
    outcome = await connectors.http_tool_call(http_spec(tool_server, "/ok", secret="not the secret"),
                                              arguments={}, context=CONTEXT)
    assert (outcome.outcome, outcome.error) == ("error", "HTTP 401")


async def test_an_http_tool_answering_500_is_an_error_without_its_body(tool_server: ToolServer,
                                                                      allow_loopback: None) -> None:
    outcome = await connectors.http_tool_call(http_spec(tool_server, "/fail"), arguments={"q": "x"}, context=CONTEXT)
    assert outcome.outcome == "error" and outcome.error == "HTTP 500"
    assert "500" in outcome.content and "lookup" in outcome.content
    assert "secret stack trace" not in outcome.content + outcome.error


async def test_an_http_tool_that_answers_late_times_out_within_its_time(tool_server: ToolServer,
                                                                         allow_loopback: None) -> None:
    started = time.monotonic()
    outcome = await connectors.http_tool_call(http_spec(tool_server, "/slow", timeout_ms=300), arguments={},
                                              context=CONTEXT)
    elapsed = time.monotonic() - started
    assert outcome.outcome == "timeout" and "300 ms" in outcome.content
    assert 0.25 < elapsed < 1.5 and 250 <= outcome.duration_ms < 1500


async def test_an_http_reply_larger_than_the_limit_is_an_error(tool_server: ToolServer, allow_loopback: None) -> None:
    outcome = await connectors.http_tool_call(http_spec(tool_server, "/big", max_response_bytes=4096),
                                              arguments={}, context=CONTEXT)
    assert (outcome.outcome, outcome.error) == ("error", "response larger than 4096 bytes")
    assert "x" * 100 not in outcome.content


async def test_an_http_redirect_is_not_followed(tool_server: ToolServer, allow_loopback: None) -> None:
    outcome = await connectors.http_tool_call(http_spec(tool_server, "/redirect"), arguments={}, context=CONTEXT)
    assert (outcome.outcome, outcome.error) == ("error", "HTTP 302")
    assert [request.path for request in tool_server.requests] == ["/redirect"]


async def test_an_http_tool_failing_then_working_gives_one_outcome_per_call(tool_server: ToolServer,
                                                                           allow_loopback: None) -> None:
    first = await connectors.http_tool_call(http_spec(tool_server, "/flaky"), arguments={}, context=CONTEXT)
    second = await connectors.http_tool_call(http_spec(tool_server, "/flaky"), arguments={}, context=CONTEXT)
    assert (first.outcome, first.error) == ("error", "HTTP 503")
    assert second.outcome == "ok" and orjson.loads(second.content)["attempt"] == 2


async def test_an_http_reply_that_is_not_utf8_is_decoded_with_replacements(tool_server: ToolServer,
                                                                          allow_loopback: None) -> None:
    outcome = await connectors.http_tool_call(http_spec(tool_server, "/latin1"), arguments={}, context=CONTEXT)
    assert outcome.outcome == "ok" and outcome.content == "caf\ufffd"


async def test_an_http_tool_on_a_private_address_is_refused_without_being_contacted(
    tool_server: ToolServer, settings: Any
) -> None:
    settings.KEYWAY_FETCH_ALLOW_PRIVATE = False
    for url in (tool_server.url("/ok"), f"http://localhost:{tool_server.port}/ok",
                f"http://2130706433:{tool_server.port}/ok", f"http://[::ffff:127.0.0.1]:{tool_server.port}/ok"):
        spec = HttpConnectorSpec(public_id="conn_http", name="lookup", url=url, secret=tool_server.secret,
                                 timeout_ms=2000, max_response_bytes=65_536)
        outcome = await connectors.http_tool_call(spec, arguments={"order_id": "A-17"}, context=CONTEXT)
        assert outcome.outcome == "refused", url
        assert outcome.error == "the connector's address is private"
        assert_no_payload_in_error(outcome, "A-17", tool_server.secret)
    assert tool_server.requests == []


async def test_an_http_host_that_turns_private_after_the_check_is_refused_at_connect(
    tool_server: ToolServer, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name looked public when checked, and names loopback when connecting."""
    settings.KEYWAY_FETCH_ALLOW_PRIVATE = False
    monkeypatch.setattr(outbound, "resolves_to_public_only", fake_public_check)
    spec = HttpConnectorSpec(public_id="conn_http", name="lookup", url=f"http://localhost:{tool_server.port}/ok",
                             secret=tool_server.secret, timeout_ms=2000, max_response_bytes=65_536)
    outcome = await connectors.http_tool_call(spec, arguments={}, context=CONTEXT)
    assert (outcome.outcome, outcome.error) == ("refused", "the connector's address is private")
    assert tool_server.requests == []


async def test_an_http_tool_nobody_listens_on_is_an_error(closed_port_url: str, allow_loopback: None) -> None:
    spec = HttpConnectorSpec(public_id="conn_http", name="lookup", url=closed_port_url, secret="k",
                             timeout_ms=2000, max_response_bytes=1024)
    outcome = await connectors.http_tool_call(spec, arguments={}, context=CONTEXT)
    assert outcome.outcome == "error" and outcome.error.startswith("the connector cannot be reached")


async def test_an_http_tool_whose_host_does_not_resolve_is_an_error(settings: Any) -> None:
    settings.KEYWAY_FETCH_ALLOW_PRIVATE = False
    spec = HttpConnectorSpec(public_id="conn_http", name="lookup", url="http://no-such-host.invalid/tool",
                             secret="k", timeout_ms=2000, max_response_bytes=1024)
    outcome = await connectors.http_tool_call(spec, arguments={}, context=CONTEXT)
    assert (outcome.outcome, outcome.error) == ("error", "the connector's host cannot be resolved")


# MCP connectors


async def test_an_mcp_servers_tools_are_listed_with_their_schemas(mcp_server: McpTestServer,
                                                                 allow_loopback: None) -> None:
    tools = {tool.name: tool for tool in await connectors.mcp_list_tools(mcp_spec(mcp_server.url))}
    assert set(tools) == {"add", "lookup_order", "explode", "sleepy"}
    assert tools["add"].description == "Add two integers."
    schema = tools["add"].parameters
    assert schema["type"] == "object" and set(schema["required"]) == {"a", "b"}
    assert schema["properties"]["a"]["type"] == "integer"
    assert tools["lookup_order"].parameters["properties"]["order_id"]["type"] == "string"


async def test_an_mcp_tool_list_is_cached_per_server_and_authorization(mcp_server: McpTestServer,
                                                                       allow_loopback: None) -> None:
    spec = mcp_spec(mcp_server.url)
    first = await connectors.mcp_list_tools(spec)
    listed = mcp_server.rpc_methods().count("tools/list")
    assert await connectors.mcp_list_tools(spec) == first
    assert mcp_server.rpc_methods().count("tools/list") == listed, "the second listing came from the cache"

    await connectors.mcp_list_tools(mcp_spec(mcp_server.url, authorization="Bearer another-tenant"))
    assert mcp_server.rpc_methods().count("tools/list") == listed + 1, "another credential lists anew"


async def test_concurrent_listings_of_one_server_share_one_request(mcp_server: McpTestServer,
                                                                   allow_loopback: None) -> None:
    before = mcp_server.rpc_methods().count("tools/list")
    results = await asyncio.gather(*(connectors.mcp_list_tools(mcp_spec(mcp_server.url)) for _ in range(5)))
    assert all(result == results[0] for result in results)
    assert mcp_server.rpc_methods().count("tools/list") == before + 1


async def test_an_mcp_tool_call_returns_the_tools_text(mcp_server: McpTestServer, allow_loopback: None) -> None:
    outcome = await connectors.mcp_call_tool(mcp_spec(mcp_server.url), tool="add", arguments={"a": 2, "b": 3})
    assert (outcome.outcome, outcome.content, outcome.error) == ("ok", "5", "")

    order = await connectors.mcp_call_tool(mcp_spec(mcp_server.url), tool="lookup_order",
                                           arguments={"order_id": "A-17"})
    assert (order.outcome, order.content) == ("ok", "order A-17: shipped")


async def test_an_mcp_session_is_opened_and_closed_for_each_call(mcp_server: McpTestServer,
                                                                 allow_loopback: None) -> None:
    mcp_server.requests.clear()
    await connectors.mcp_call_tool(mcp_spec(mcp_server.url), tool="add", arguments={"a": 1, "b": 1})
    seen = [(request.http_method, request.rpc_method) for request in mcp_server.requests]
    assert seen[0] == ("POST", "initialize")
    assert ("POST", "tools/call") in seen
    assert ("POST", "tools/list") not in seen, "no listing before a call"
    assert seen[-1] == ("DELETE", ""), "the session is ended on the server too"


async def test_an_mcp_tool_that_raises_is_an_error_outcome_with_its_message(mcp_server: McpTestServer,
                                                                            allow_loopback: None) -> None:
    outcome = await connectors.mcp_call_tool(mcp_spec(mcp_server.url), tool="explode", arguments={})
    assert (outcome.outcome, outcome.error) == ("error", "the tool reported an error")
    assert "the tool blew up" in outcome.content


async def test_an_mcp_tool_that_does_not_exist_is_an_error_outcome(mcp_server: McpTestServer,
                                                                   allow_loopback: None) -> None:
    outcome = await connectors.mcp_call_tool(mcp_spec(mcp_server.url), tool="nope", arguments={})
    assert outcome.outcome == "error" and outcome.content


async def test_an_mcp_tool_that_runs_too_long_times_out(mcp_server: McpTestServer, allow_loopback: None) -> None:
    started = time.monotonic()
    outcome = await connectors.mcp_call_tool(mcp_spec(mcp_server.url, timeout_ms=500), tool="sleepy",
                                             arguments={"seconds": 5})
    elapsed = time.monotonic() - started
    assert outcome.outcome == "timeout" and "500 ms" in outcome.content
    assert 0.45 < elapsed < 2.0


async def test_an_mcp_result_larger_than_the_limit_is_an_error(mcp_server: McpTestServer,
                                                               allow_loopback: None) -> None:
    outcome = await connectors.mcp_call_tool(mcp_spec(mcp_server.url, max_response_bytes=10), tool="lookup_order",
                                             arguments={"order_id": "A-17"})
    assert (outcome.outcome, outcome.error) == ("error", "response larger than 10 bytes")
    assert "A-17" not in outcome.content

    # A reply far past the limit is cut off as it arrives, not read whole first.
    huge = await connectors.mcp_call_tool(mcp_spec(mcp_server.url, max_response_bytes=1000), tool="lookup_order",
                                          arguments={"order_id": "x" * 200_000})
    assert (huge.outcome, huge.error) == ("error", "response larger than 1000 bytes")


async def test_an_mcp_server_not_listening_cannot_be_listed_or_called(closed_port_url: str,
                                                                      allow_loopback: None) -> None:
    spec = mcp_spec(closed_port_url, authorization="Bearer very-secret-token")
    with pytest.raises(connectors.ConnectorError) as caught:
        await connectors.mcp_list_tools(spec)
    assert "shop" in str(caught.value) and "very-secret-token" not in str(caught.value)
    assert closed_port_url not in str(caught.value)

    outcome = await connectors.mcp_call_tool(spec, tool="add", arguments={"a": 1, "b": 2})
    assert outcome.outcome == "error" and outcome.error == "the MCP server cannot be reached"


async def test_an_mcp_server_on_a_private_address_is_refused_without_being_contacted(
    mcp_server: McpTestServer, settings: Any
) -> None:
    settings.KEYWAY_FETCH_ALLOW_PRIVATE = False
    mcp_server.requests.clear()
    with pytest.raises(connectors.ConnectorError, match="private"):
        await connectors.mcp_list_tools(mcp_spec(mcp_server.url))
    outcome = await connectors.mcp_call_tool(mcp_spec(mcp_server.url), tool="add", arguments={"a": 1, "b": 2})
    assert (outcome.outcome, outcome.error) == ("refused", "the connector's address is private")
    assert mcp_server.requests == []


async def test_an_mcp_host_that_turns_private_after_the_check_is_refused_at_connect(
    mcp_server: McpTestServer, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding, for the SDK's HTTP client: its connections go through the public-only backend."""
    settings.KEYWAY_FETCH_ALLOW_PRIVATE = False
    monkeypatch.setattr(outbound, "resolves_to_public_only", fake_public_check)
    mcp_server.requests.clear()
    url = mcp_server.url.replace("127.0.0.1", "localhost")
    outcome = await connectors.mcp_call_tool(mcp_spec(url), tool="add", arguments={"a": 1, "b": 2})
    assert (outcome.outcome, outcome.error) == ("refused", "the connector's address is private")
    with pytest.raises(connectors.ConnectorError, match="private"):
        await connectors.mcp_list_tools(mcp_spec(url))
    assert mcp_server.requests == []


async def test_cancelling_an_mcp_call_midway_leaves_no_task_running(mcp_server: McpTestServer,
                                                                    allow_loopback: None) -> None:
    before = await running_tasks()
    mcp_server.requests.clear()
    started = len(mcp_server.calls_started)
    call = asyncio.create_task(connectors.mcp_call_tool(mcp_spec(mcp_server.url, timeout_ms=10_000), tool="sleepy",
                                                        arguments={"seconds": 5}))
    deadline = time.monotonic() + 5
    while mcp_server.calls_started[started:] != ["sleepy"]:
        assert time.monotonic() < deadline, "the tool never started"
        await asyncio.sleep(0.01)

    cancelled_at = time.monotonic()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert time.monotonic() - cancelled_at < 2, "cancellation is prompt"
    left = await running_tasks() - before
    assert not left, left
    assert mcp_server.requests[-1].http_method == "DELETE", "the session is ended on the server too"


async def test_an_mcp_server_that_never_answers_cannot_be_listed_in_time(silent_url: str,
                                                                         allow_loopback: None) -> None:
    started = time.monotonic()
    with pytest.raises(connectors.ConnectorError, match="no reply in time"):
        await connectors.mcp_list_tools(mcp_spec(silent_url, timeout_ms=300))
    assert time.monotonic() - started < 2.5, "within the time-out and the grace for closing"
    outcome = await connectors.mcp_call_tool(mcp_spec(silent_url, timeout_ms=300), tool="add", arguments={})
    assert outcome.outcome == "timeout"


async def test_cancelling_a_tool_listing_leaves_no_task_running(silent_url: str, allow_loopback: None) -> None:
    before = await running_tasks()
    listings = [asyncio.create_task(connectors.mcp_list_tools(mcp_spec(silent_url, timeout_ms=10_000)))
                for _ in range(2)]
    await asyncio.sleep(0.2)
    shared = [task for task in asyncio.all_tasks() if task.get_coro().__name__ == "_list_tools_now"]  # type: ignore[union-attr]
    assert len(shared) == 1, "two callers, one listing"
    for listing in listings:
        listing.cancel()
    for listing in listings:
        with pytest.raises(asyncio.CancelledError):
            await listing
    left = await running_tasks() - before
    assert not left, left
