"""Multimodal content parts (seed 002): validation, limits, fetching image URLs, and PDF to text.

Parts are checked before any model sees them; a part goes only to a model whose catalog entry declares the
capability (image_url → vision, input_audio → audio, file → files). A PDF sent to a model without `files`
is turned into text here, and the response says so in `x-keyway-file-conversion`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sys
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from django.conf import settings

from completions.engine.calls import Prepare
from completions.engine.catalog import CatalogEntry
from platform_site.kernel import outbound
from platform_site.kernel.errors import ApiError
from platform_site.kernel.loops import PerLoop

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
AUDIO_FORMATS = frozenset({"wav", "mp3"})
CAPABILITY_OF_PART = {"image_url": "vision", "input_audio": "audio", "file": "files"}


@dataclass(slots=True)
class _Part:
    message: int
    index: int
    kind: str

    @property
    def param(self) -> str:
        return f"messages[{self.message}].content[{self.index}]"


@dataclass(slots=True)
class ContentReport:
    """What the request carries, and what was done to it."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    parts: list[_Part] = field(default_factory=list)
    pdfs_converted: int = 0


def _bad(message: str, param: str, code: str = "invalid_content_part") -> ApiError:
    return ApiError(message, param=param, code=code)


def _decode_base64(data: Any, param: str, *, limit: int) -> bytes:
    if not isinstance(data, str) or not data:
        raise _bad(f"'{param}' must be a non-empty base64 string.", param)
    if len(data) * 3 // 4 > limit:
        raise _bad(f"'{param}' is larger than the limit of {limit} bytes.", param, "content_too_large")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"'{param}' is not valid base64.", param) from None


def _parse_data_url(url: str, param: str, *, limit: int) -> tuple[str, bytes]:
    header, separator, data = url.partition(",")
    if not separator or not header.startswith("data:") or not header.endswith(";base64"):
        raise _bad(f"'{param}' must be a base64 data: URL.", param)
    return header[5:-7].lower(), _decode_base64(data, param, limit=limit)


def _check_part(part: Any, where: _Part) -> None:
    param = where.param
    if where.kind == "text":
        if not isinstance(part.get("text"), str):
            raise _bad(f"'{param}.text' must be a string.", f"{param}.text")
    elif where.kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(url, str):
            raise _bad(f"'{param}.image_url.url' must be a string.", f"{param}.image_url.url")
        if image.get("detail") not in (None, "auto", "low", "high"):
            raise _bad(f"'{param}.image_url.detail' must be 'auto', 'low' or 'high'.", f"{param}.image_url.detail")
        if url.startswith("data:"):
            mime, _ = _parse_data_url(url, f"{param}.image_url.url", limit=settings.KEYWAY_MAX_IMAGE_BYTES)
            if mime not in IMAGE_TYPES:
                raise _bad(f"'{param}' has type {mime!r}; images must be PNG, JPEG, GIF or WebP.", param)
        elif urlsplit(url).scheme not in ("http", "https"):
            raise _bad(f"'{param}.image_url.url' must be an http(s) or data: URL.", f"{param}.image_url.url")
    elif where.kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or audio.get("format") not in AUDIO_FORMATS:
            raise _bad(f"'{param}.input_audio.format' must be 'wav' or 'mp3'.", f"{param}.input_audio.format")
        _decode_base64(audio.get("data"), f"{param}.input_audio.data", limit=settings.KEYWAY_MAX_AUDIO_BYTES)
    elif where.kind == "file":
        file = part.get("file")
        if not isinstance(file, dict):
            raise _bad(f"'{param}.file' must be an object.", f"{param}.file")
        if file.get("file_id"):
            raise _bad("'file_id' is not supported here: send the file inline as 'file_data'.",
                       f"{param}.file.file_id", "unsupported_parameter")
        pdf = _file_bytes(file, f"{param}.file.file_data")
        if not pdf.startswith(b"%PDF-"):
            raise _bad(f"'{param}.file.file_data' is not a PDF; only PDF files are supported.",
                       f"{param}.file.file_data")
    else:
        raise _bad(f"'{param}.type' must be one of 'text', 'image_url', 'input_audio', 'file'.", f"{param}.type")


def _file_bytes(file: dict[str, Any], param: str) -> bytes:
    data = file.get("file_data")
    limit = settings.KEYWAY_MAX_FILE_BYTES
    # Clients send either a bare base64 string or a data: URL; both are accepted.
    if isinstance(data, str) and data.startswith("data:"):
        return _parse_data_url(data, param, limit=limit)[1]
    return _decode_base64(data, param, limit=limit)


def inspect_content(messages: list[dict[str, Any]]) -> ContentReport:
    """Validate every content part of every message; returns where the non-text parts are."""
    report = ContentReport(messages=messages)
    for m, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise _bad(f"'messages[{m}].content[{i}]' must be an object.", f"messages[{m}].content[{i}]")
            where = _Part(m, i, str(part.get("type")))
            if where.kind != "text" and message.get("role") != "user":
                raise _bad(f"Only user messages may carry {where.kind} parts.", where.param)
            _check_part(part, where)
            if where.kind != "text":
                report.parts.append(where)
    return report


async def _pdf_text(pdf: bytes, param: str) -> str:
    """The PDF's text, read in a process of its own (completions/api/pdf_worker.py) with memory, time, page
    and text limits: a malicious PDF can cost that process, never the server."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "completions.api.pdf_worker", str(settings.KEYWAY_PDF_MAX_PAGES),
        str(settings.KEYWAY_PDF_MAX_TEXT_CHARS), str(settings.KEYWAY_PDF_MEMORY_MB),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        cwd=settings.BASE_DIR,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(pdf), settings.KEYWAY_PDF_TIMEOUT)
    except TimeoutError:
        raise ApiError(f"The PDF took longer than {settings.KEYWAY_PDF_TIMEOUT:g} s to read.", param=param,
                       code="invalid_file") from None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    try:
        result = json.loads(out) if out else {"error": "The PDF could not be read."}
    except ValueError:
        result = {"error": "The PDF could not be read."}
    if "error" in result:
        raise ApiError(str(result["error"]), param=param, code="invalid_file")
    return str(result.get("text", ""))


async def convert_pdfs_to_text(messages: list[dict[str, Any]], report: ContentReport) -> None:
    """Replace each PDF part with a text part holding its text (for models without `files`)."""
    for where in report.parts:
        if where.kind != "file":
            continue
        part = messages[where.message]["content"][where.index]
        file = part["file"]
        text = await _pdf_text(_file_bytes(file, where.param), f"{where.param}.file.file_data")
        name = file.get("filename") or "document.pdf"
        messages[where.message]["content"][where.index] = {"type": "text", "text": f"[{name}]\n{text}"}
        report.pdfs_converted += 1


def _vet(host: str, addresses: list[str], param: str) -> None:
    if outbound.private_addresses_allowed():
        return
    for text in addresses:
        if not outbound.is_public_text(text):
            raise _bad(f"'{param}' points to a private address; only public URLs are fetched.", param,
                       "image_fetch_refused")


def _new_fetch_session() -> aiohttp.ClientSession:
    # Its own small pool, apart from the upstream pool: fetching customers' URLs must not take connections
    # the proxy hop needs, and no cookie set by one customer's server may ride along to another's. No DNS
    # cache: every fetch is vetted afresh.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=settings.KEYWAY_FETCH_POOL_SIZE, use_dns_cache=False,
                                       resolver=outbound.PublicOnlyResolver()),
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": "Keyway image fetcher"},
    )


async def _close_session(session: aiohttp.ClientSession) -> None:
    await session.close()


fetch_sessions: PerLoop[aiohttp.ClientSession] = PerLoop(
    "image fetching", _new_fetch_session, _close_session, is_closed=lambda session: session.closed
)


async def _refuse_private_address(host: str, param: str) -> None:
    """Server-side fetching must not become a way into the private network (SSRF): every address the host
    names (IP literals in any spelling, decimal and hex included, or a name) must be public. The session's
    resolver vets the addresses it connects to once more."""
    if outbound.private_addresses_allowed():
        return
    try:
        addresses = await outbound.resolve(host)
    except OSError:
        raise _bad(f"The host of '{param}' cannot be resolved.", param, "image_fetch_failed") from None
    _vet(host, addresses, param)


class _Budget:
    """The bytes one request may still fetch, over all its images."""

    __slots__ = ("left",)

    def __init__(self, total: int) -> None:
        self.left = total


async def _fetch_image(url: str, param: str, budget: _Budget) -> str:
    limit = settings.KEYWAY_MAX_IMAGE_BYTES
    await _refuse_private_address(urlsplit(url).hostname or "", param)
    timeout = aiohttp.ClientTimeout(total=settings.KEYWAY_FETCH_TIMEOUT)
    try:
        async with fetch_sessions.get().get(url, timeout=timeout, allow_redirects=False) as response:
            # The peer actually connected to, checked once more.
            transport = response.connection.transport if response.connection is not None else None
            peer = transport.get_extra_info("peername") if transport is not None else None
            if peer:
                _vet(urlsplit(url).hostname or "", [str(peer[0])], param)
            if response.status != 200:
                raise _bad(f"Fetching '{param}' gave HTTP {response.status}.", param, "image_fetch_failed")
            mime = response.content_type.lower()
            if mime not in IMAGE_TYPES:
                raise _bad(f"'{param}' is {mime!r}, not a PNG, JPEG, GIF or WebP image.", param, "image_fetch_failed")
            body = bytearray()
            async for piece in response.content.iter_chunked(65536):
                body += piece
                budget.left -= len(piece)
                if len(body) > limit:
                    raise _bad(f"'{param}' is larger than the limit of {limit} bytes.", param, "content_too_large")
                if budget.left < 0:
                    raise _bad(f"The request's images are larger than {settings.KEYWAY_FETCH_MAX_TOTAL_BYTES} "
                               "bytes together.", param, "content_too_large")
    except TimeoutError:
        raise _bad(f"Fetching '{param}' took too long.", param, "image_fetch_failed") from None
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, outbound.PrivateAddress) or isinstance(exc.__cause__, outbound.PrivateAddress):
            raise _bad(f"'{param}' points to a private address; only public URLs are fetched.", param,
                       "image_fetch_refused") from None
        raise _bad(f"Fetching '{param}' failed ({type(exc).__name__}).", param, "image_fetch_failed") from None
    except aiohttp.ClientError as exc:
        raise _bad(f"Fetching '{param}' failed ({type(exc).__name__}).", param, "image_fetch_failed") from None
    return f"data:{mime};base64,{base64.b64encode(bytes(body)).decode()}"


async def inline_remote_images(messages: list[dict[str, Any]], report: ContentReport) -> None:
    """Fetch http(s) images once, here, within limits, and pass them on as data: URLs."""
    remote = [w for w in report.parts if w.kind == "image_url"
              and not messages[w.message]["content"][w.index]["image_url"]["url"].startswith("data:")]
    if len(remote) > settings.KEYWAY_FETCH_MAX_IMAGES:
        raise _bad(f"A request may name at most {settings.KEYWAY_FETCH_MAX_IMAGES} image URLs to fetch; send the "
                   "others inline as data: URLs.", f"{remote[-1].param}.image_url.url", "too_many_images")
    budget = _Budget(settings.KEYWAY_FETCH_MAX_TOTAL_BYTES)
    urls = await asyncio.gather(*(
        _fetch_image(messages[w.message]["content"][w.index]["image_url"]["url"], f"{w.param}.image_url.url",
                     budget)
        for w in remote
    ))
    for where, data_url in zip(remote, urls, strict=True):
        image = messages[where.message]["content"][where.index]["image_url"]
        messages[where.message]["content"][where.index]["image_url"] = {**image, "url": data_url}


def content_step(report: ContentReport) -> Prepare | None:
    """What the content parts need once the request is admitted: PDFs turned into text where a model cannot
    take files, remote images fetched. Returns the headers that tell the client what was done."""
    if not report.parts:
        return None

    async def prepare(entries: list[CatalogEntry]) -> dict[str, str]:
        messages = report.messages
        if any(part.kind == "file" for part in report.parts) and any("files" not in e.capabilities for e in entries):
            await convert_pdfs_to_text(messages, report)
        await inline_remote_images(messages, report)
        if report.pdfs_converted:
            return {"x-keyway-file-conversion": f"pdf-to-text; files={report.pdfs_converted}"}
        return {}

    return prepare
