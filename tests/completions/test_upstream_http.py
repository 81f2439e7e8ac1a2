"""The upstream JSON client (completions.providers.upstream_http) against real HTTP servers on loopback, each
scripted to answer one way: well, in pieces, compressed, wrongly, too much, too late, or not at all."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from completions.providers import upstream_http
from completions.providers.upstream_http import Origin, UpstreamHTTP, UpstreamHTTPError

Answerer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Server:
    """A TCP server on loopback that reads each request whole and lets `answer` reply (the request's number on
    its connection is the last argument); it records the requests and counts the connections."""

    def __init__(self, answer: Answerer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if tls else 'http'}://{'localhost' if tls else '127.0.0.1'}:{port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                self.requests.append(head + await reader.readexactly(length))
                await self.answer(reader, writer, number)
                number += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[tuple[Server, str]]]]:
    servers: list[Server] = []

    async def start(answer: Answerer, tls: ssl.SSLContext | None = None) -> tuple[Server, str]:
        server = Server(answer)
        servers.append(server)
        return server, await server.start(tls)

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamHTTP]:
    client = UpstreamHTTP()
    yield client
    await client.close()


def reply(body: bytes, *headers: str, status: str = "200 OK") -> Answerer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        head = "".join(f"{header}\r\n" for header in headers)
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body)
        await writer.drain()

    return answer


async def post(client: UpstreamHTTP, base_url: str, *, timeout: float = 5.0,
               headers: dict[str, str] | None = None) -> upstream_http.Answer:
    origin = Origin(base_url, headers or {"Content-Type": "application/json"})
    return await client.post(origin, "/chat/completions", b'{"x": 1}', timeout=timeout, connect_timeout=timeout)


async def test_calls_share_one_kept_alive_connection_and_send_the_request_as_configured(serve, client) -> None:
    server, base_url = await serve(reply(b'{"ok": true}', "Retry-After: 3"))
    origin = Origin(base_url + "?api-version=1", {"Content-Type": "application/json", "Authorization": "Bearer up"})
    for _ in range(3):
        answer = await client.post(origin, "/chat/completions", b'{"x": 1}', timeout=5, connect_timeout=5)
        assert answer == (200, b'{"ok": true}', "3")
    assert server.connections == 1
    assert client.connections() == 1
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions?api-version=1 HTTP/1.1"
    assert f"Host: {base_url.split('//')[1].split('/')[0]}".encode() in lines
    assert b"Authorization: Bearer up" in lines and b"Content-Length: 8" in lines
    assert body == b'{"x": 1}'


async def test_chunked_compressed_and_close_ended_bodies_arrive_whole(serve, client) -> None:
    document = b'{"data": "' + b"x" * 50_000 + b'"}'

    async def chunked(reader, writer, number) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(document), 7_000):
            piece = document[start:start + 7_000]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    _, base_url = await serve(chunked)
    assert (await post(client, base_url)).body == document

    for encoding, packed in (("gzip", gzip.compress(document)), ("deflate", zlib.compress(document)),
                             ("deflate", zlib.compress(document, wbits=-15))):
        _, base_url = await serve(reply(packed, f"Content-Encoding: {encoding}"))
        assert (await post(client, base_url)).body == document

    async def until_close(reader, writer, number) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + document)
        await writer.drain()
        writer.close()

    server, base_url = await serve(until_close)
    assert (await post(client, base_url)).body == document
    assert (await post(client, base_url)).body == document
    assert server.connections == 2  # never reused

    async def says_close_but_lingers(reader, writer, number) -> None:
        await reply(b"{}", "Connection: close")(reader, writer, number)
        await asyncio.sleep(0.3)

    server, base_url = await serve(says_close_but_lingers)
    assert (await post(client, base_url)).status == 200
    assert (await post(client, base_url)).status == 200
    assert server.connections == 2  # the server said it would close it: never reused

    async def interim_then_answer(reader, writer, number) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}")

    _, base_url = await serve(interim_then_answer)
    assert (await post(client, base_url))[:2] == (201, b"{}")


async def test_a_connection_the_server_closed_while_idle_is_not_used_again(serve, client) -> None:
    async def answer_then_close(reader, writer, number) -> None:
        await reply(b"{}")(reader, writer, number)
        writer.close()

    server, base_url = await serve(answer_then_close)
    assert (await post(client, base_url)).status == 200
    await asyncio.sleep(0.05)  # the server's FIN arrives: the connection leaves the pool
    assert client.connections() == 0
    assert (await post(client, base_url)).status == 200
    assert server.connections == 2


@pytest.mark.parametrize("fault", ["malformed", "too-large", "head-too-large", "hang-up", "unknown-encoding",
                                   "bad-gzip"])
async def test_a_broken_answer_fails_the_call_and_closes_its_connection(serve, client, monkeypatch, fault) -> None:
    monkeypatch.setattr(upstream_http, "MAX_ANSWER", 10_000)

    async def answer(reader, writer, number) -> None:
        if len(server.requests) > 1:  # the call after the broken one, on a fresh connection
            await reply(b"{}")(reader, writer, number)
            return
        writer.write({
            "malformed": b"HTTP/1.1 2OO OK\r\n\r\n",
            "too-large": b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n" + b"x" * 20_000,
            "head-too-large": b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"y" * 70_000 + b"\r\n\r\n",
            "hang-up": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial",
            "unknown-encoding": b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
            "bad-gzip": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nnope",
        }[fault])
        await writer.drain()
        if fault == "hang-up":
            writer.close()

    server, base_url = await serve(answer)
    with pytest.raises(UpstreamHTTPError) as failure:
        await post(client, base_url)
    assert failure.value.reason == {
        "malformed": "MalformedAnswer", "too-large": "AnswerTooLarge", "head-too-large": "AnswerHeadTooLarge",
        "hang-up": "ServerDisconnected", "unknown-encoding": "UnsupportedContentEncoding",
        "bad-gzip": "MalformedCompressedBody",
    }[fault]
    if fault not in ("unknown-encoding", "bad-gzip"):
        assert client.connections() == 0
    assert (await post(client, base_url)).status == 200
    assert server.connections == (1 if fault in ("unknown-encoding", "bad-gzip") else 2)


async def test_a_gzip_bomb_is_refused_at_the_bound(serve, client, monkeypatch) -> None:
    monkeypatch.setattr(upstream_http, "MAX_ANSWER", 100_000)
    _, base_url = await serve(reply(gzip.compress(b"0" * 5_000_000), "Content-Encoding: gzip"))
    with pytest.raises(UpstreamHTTPError, match="AnswerTooLarge"):
        await post(client, base_url)


async def test_a_late_answer_times_out_and_a_cancelled_call_closes_its_connection(serve, client) -> None:
    released = asyncio.Event()

    async def late(reader, writer, number) -> None:
        if number == 0 and server.connections <= 2:
            await released.wait()
        await reply(b"{}")(reader, writer, number)

    server, base_url = await serve(late)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await post(client, base_url, timeout=0.3)
    assert 0.25 < loop.time() - started < 2
    call = asyncio.create_task(post(client, base_url))
    await asyncio.sleep(0.1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    released.set()
    assert client.connections() == 0
    assert (await post(client, base_url)).status == 200
    assert server.connections == 3


async def test_unreachable_and_misconfigured_origins_fail_plainly(client) -> None:
    with pytest.raises(UpstreamHTTPError, match="ConnectionRefusedError"):
        await post(client, "http://127.0.0.1:9/v1")
    for bad_url in ("ftp://example.com/v1", "http:///v1", "not a url"):
        with pytest.raises(ValueError):
            Origin(bad_url, {})
    for name, value in (("X-Org", "1\r\nX-Injected: 2"), ("X-Org", "1\n"), ("X-Org", "\0"), ("Bad Name", "1"),
                        ("X:Org", "1"), ("", "1")):
        with pytest.raises(ValueError):
            Origin("http://127.0.0.1/v1", {name: value})


def _certificate(directory: Path) -> tuple[ssl.SSLContext, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    certificate_file, key_file = directory / "cert.pem", directory / "key.pem"
    certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate_file, key_file)
    return context, certificate_file


async def test_tls_verifies_the_certificate_against_the_trusted_authorities(serve, client, tmp_path,
                                                                           monkeypatch) -> None:
    server_context, certificate_file = _certificate(tmp_path)
    _, base_url = await serve(reply(b"{}"), server_context)
    upstream_http._tls_context.cache_clear()
    try:
        with pytest.raises(UpstreamHTTPError, match="SSLCertVerificationError"):
            await post(client, base_url)  # a certificate nobody the system trusts signed
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate_file))
        upstream_http._tls_context.cache_clear()
        assert (await post(client, base_url)).status == 200
    finally:
        upstream_http._tls_context.cache_clear()


@pytest.mark.django_db
def test_the_admin_refuses_provider_headers_that_cannot_be_sent() -> None:
    from completions.admin import ProviderForm

    def form(headers: str) -> ProviderForm:
        return ProviderForm(data={"name": "up", "kind": "openai_compatible", "base_url": "https://up.example/v1",
                                  "enabled": True, "extra_headers": headers})

    assert form('{"X-Org": "42"}').is_valid()
    for headers in ('{"X-Org": "42\\r\\nX-Injected: 1"}', '{"Bad Name": "1"}'):
        refused = form(headers)
        assert not refused.is_valid() and "cannot be sent" in str(refused.errors["extra_headers"])


async def test_a_provider_whose_headers_cannot_be_sent_fails_its_calls_not_the_catalog() -> None:
    from completions.providers.base import ChatCall, ProviderConfig, UpstreamUnavailable
    from completions.providers.openai_compatible import OpenAICompatibleProvider

    provider = OpenAICompatibleProvider(ProviderConfig(
        name="up", kind="openai_compatible", base_url="http://127.0.0.1:9/v1", api_key="sk\r\nX-Injected: 1"))
    with pytest.raises(UpstreamUnavailable, match="configuration cannot be used"):
        await provider.chat(ChatCall(upstream_model="m", body={"messages": []}, request_id="r", timeout=1.0))


async def open_stream(client: UpstreamHTTP, base_url: str, *, read_timeout: float = 5.0) -> upstream_http.Stream:
    origin = Origin(base_url, {"Content-Type": "application/json"})
    return await client.open_stream(origin, "/chat/completions", b'{"stream": true}', read_timeout=read_timeout,
                                    connect_timeout=read_timeout)


def sse(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


async def test_a_stream_is_read_as_it_arrives_and_its_connection_kept_once_read_to_its_end(serve, client) -> None:
    async def events(reader, writer, number) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for index in range(3):
            sse(writer, b"data: %d\n\n" % index)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")

    server, base_url = await serve(events)
    for _ in range(2):
        stream = await open_stream(client, base_url)
        assert stream.status == 200
        reads = []
        while block := await stream.read_any():
            reads.append(block)
        stream.close()
        assert b"".join(reads) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert len(reads) == 3  # each as it came, not the whole at the end
    assert server.connections == 1

    left_early = asyncio.Event()

    async def endless(reader, writer, number) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                sse(writer, b"data: more\n\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            left_early.set()
            raise

    _, base_url = await serve(endless)
    stream = await open_stream(client, base_url)
    assert await stream.read_any()
    stream.close()  # not read to its end: the connection closes, which stops the upstream
    await asyncio.wait_for(left_early.wait(), 5)
    assert client.connections() == 1  # the first server's


async def test_a_reader_that_falls_behind_holds_the_upstream_back(serve, client) -> None:
    piece = b"data: " + b"x" * 16_000 + b"\n\n"
    sent = 0

    async def flood(reader, writer, number) -> None:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(2000):  # 32 MB, more than the sockets buffer
            sse(writer, piece)
            sent += len(piece)
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    _, base_url = await serve(flood)
    stream = await open_stream(client, base_url)
    await asyncio.sleep(0.5)
    connection = stream._connection
    assert connection.paused and connection.buffered <= upstream_http._READ_AHEAD + 256 * 1024  # and one read
    assert sent < 2000 * len(piece)  # the server is held at its socket's buffers
    total = 0
    while block := await stream.read_any():
        total += len(block)
    stream.close()
    assert total == 2000 * len(piece)


async def test_a_stream_that_stalls_or_breaks_fails_after_what_came_before(serve, client) -> None:
    async def stall(reader, writer, number) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        sse(writer, b"data: 1\n\n")
        await writer.drain()
        await asyncio.sleep(5)

    _, base_url = await serve(stall)
    stream = await open_stream(client, base_url, read_timeout=0.3)
    assert await stream.read_any() == b"data: 1\n\n"
    with pytest.raises(TimeoutError):
        await stream.read_any()
    stream.close()

    async def silent(reader, writer, number) -> None:
        await asyncio.sleep(5)

    _, base_url = await serve(silent)
    with pytest.raises(TimeoutError):
        await open_stream(client, base_url, read_timeout=0.3)

    async def hang_up(reader, writer, number) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        sse(writer, b"data: 1\n\n")
        await writer.drain()
        writer.close()

    _, base_url = await serve(hang_up)
    stream = await open_stream(client, base_url)
    assert await stream.read_any() == b"data: 1\n\n"
    with pytest.raises(UpstreamHTTPError, match="ServerDisconnected"):
        await stream.read_any()
    stream.close()

    _, base_url = await serve(reply(b'{"error": {"message": "slow down"}}', "Retry-After: 7", status="429 Too Many"))
    stream = await open_stream(client, base_url)
    assert (stream.status, stream.retry_after) == (429, "7")
    assert await stream.read_whole() == b'{"error": {"message": "slow down"}}'
    stream.close()
    assert client.connections() == 1

    _, base_url = await serve(reply(b"data: 1\n\n", "Content-Encoding: gzip"))
    with pytest.raises(UpstreamHTTPError, match="UnsupportedContentEncoding"):
        await open_stream(client, base_url)


async def test_connections_idle_past_the_keep_alive_are_closed_in_every_pool(serve, client, monkeypatch) -> None:
    monkeypatch.setattr(upstream_http, "_KEEP_IDLE", 0.2)
    closed = asyncio.Event()

    async def answer_then_watch(reader, writer, number) -> None:
        await reply(b"{}")(reader, writer, number)
        if not await reader.read(1):  # the client closed it
            closed.set()

    first, first_url = await serve(answer_then_watch)
    second, second_url = await serve(reply(b"{}"))
    await post(client, first_url)
    await post(client, second_url)
    assert client.connections() == 2
    await asyncio.sleep(0.3)
    await post(client, second_url)  # its old connection is too old to use; putting the new one back sweeps
    await asyncio.wait_for(closed.wait(), 5)
    assert client.connections() == 1
    assert (first.connections, second.connections) == (1, 2)
