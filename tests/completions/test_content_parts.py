"""Multimodal content parts: validation, capability gating, image fetching within limits, PDF to text."""

from __future__ import annotations

import base64
import time
from typing import Any

import openai
import pytest
from asgiref.sync import sync_to_async

from bench import fake_upstream
from completions.services import provider_upsert_openai_compatible

pytestmark = pytest.mark.django_db(transaction=True)

PNG_URL = "data:image/png;base64," + base64.b64encode(fake_upstream.PNG).decode()


def make_pdf(text: str) -> bytes:
    """A one-page PDF with `text` in Helvetica, with a correct cross-reference table."""
    stream = f"BT /F1 24 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


@pytest.fixture
async def sdk(sdk: openai.AsyncOpenAI, default_model: None, upstream: tuple[int, Any]) -> openai.AsyncOpenAI:
    port, _ = upstream

    def models() -> None:
        base_url = f"http://127.0.0.1:{port}/v1"
        provider_upsert_openai_compatible(name="vision", base_url=base_url, models=["ok"],
                                          capabilities=["chat", "vision", "audio", "files"])
        provider_upsert_openai_compatible(name="plain", base_url=base_url, models=["text-only"], capabilities=["chat"])

    await sync_to_async(models)()
    return sdk


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "Look:"}, *parts]}]


async def test_image_goes_to_a_vision_model_and_not_to_a_text_model(sdk: Any, upstream: tuple[int, Any]) -> None:
    image = {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}}
    await sdk.chat.completions.create(model="ok", messages=user(image))
    assert upstream[1][fake_upstream.SEEN][-1]["messages"][0]["content"][1] == image
    for model in ("gemma-3-270m", "text-only"):
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.chat.completions.create(model=model, messages=user(image))
        assert caught.value.code == "unsupported_content_part"
        assert caught.value.param == "messages[0].content[1]" and model in caught.value.message


async def test_remote_images_are_fetched_within_limits_and_passed_on_inline(
    sdk: Any, upstream: tuple[int, Any], settings: Any
) -> None:
    port, app = upstream
    url = f"http://127.0.0.1:{port}/files/pixel.png"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="ok", messages=user({"type": "image_url", "image_url": {"url": url}}))
    assert caught.value.code == "image_fetch_refused", "loopback is private: refused unless allowed"

    settings.KEYWAY_FETCH_ALLOW_PRIVATE = True
    settings.KEYWAY_MAX_IMAGE_BYTES = 1024 * 1024
    settings.KEYWAY_FETCH_TIMEOUT = 0.5
    await sdk.chat.completions.create(model="ok", messages=user({"type": "image_url", "image_url": {"url": url}}))
    assert app[fake_upstream.SEEN][-1]["messages"][0]["content"][1]["image_url"]["url"] == PNG_URL
    for name, code in (("big.png", "content_too_large"), ("slow.png", "image_fetch_failed"),
                       ("page.html", "image_fetch_failed"), ("missing", "image_fetch_failed")):
        part = {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{port}/files/{name}"}}
        if name == "missing":
            part["image_url"]["url"] = f"http://127.0.0.1:{port}/nothing"
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.chat.completions.create(model="ok", messages=user(part))
        assert caught.value.code == code, name


async def test_pdf_becomes_text_for_a_model_without_files(sdk: Any, upstream: tuple[int, Any]) -> None:
    pdf = base64.b64encode(make_pdf("Quarterly revenue grew")).decode()
    part = {"type": "file", "file": {"filename": "report.pdf", "file_data": f"data:application/pdf;base64,{pdf}"}}
    raw = await sdk.chat.completions.with_raw_response.create(model="text-only", messages=user(part))
    assert raw.headers["x-keyway-file-conversion"] == "pdf-to-text; files=1"
    sent = upstream[1][fake_upstream.SEEN][-1]["messages"][0]["content"][1]
    assert sent["type"] == "text" and "Quarterly revenue grew" in sent["text"] and "report.pdf" in sent["text"]

    bare = {"type": "file", "file": {"filename": "report.pdf", "file_data": pdf}}
    raw = await sdk.chat.completions.with_raw_response.create(model="ok", messages=user(bare))
    assert "x-keyway-file-conversion" not in raw.headers
    assert upstream[1][fake_upstream.SEEN][-1]["messages"][0]["content"][1] == bare

    local = await sdk.chat.completions.with_raw_response.create(
        model="gemma-3-270m", messages=user(part), max_tokens=2
    )
    assert local.headers["x-keyway-file-conversion"] == "pdf-to-text; files=1"


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
         "messages[0].content[1].image_url.url"),
        ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}, "messages[0].content[1]"),
        ({"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}},
         "messages[0].content[1].image_url.url"),
        ({"type": "image_url", "image_url": {"url": PNG_URL, "detail": "huge"}},
         "messages[0].content[1].image_url.detail"),
        ({"type": "input_audio", "input_audio": {"data": "aGk=", "format": "ogg"}},
         "messages[0].content[1].input_audio.format"),
        ({"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}},
         "messages[0].content[1].input_audio.data"),
        ({"type": "file", "file": {"file_id": "file-123"}}, "messages[0].content[1].file.file_id"),
        ({"type": "file", "file": {"file_data": base64.b64encode(b"not a pdf").decode()}},
         "messages[0].content[1].file.file_data"),
        ({"type": "video", "video": {}}, "messages[0].content[1].type"),
    ],
)
async def test_invalid_parts_get_400_naming_the_part(sdk: Any, part: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="ok", messages=user(part))
    assert caught.value.param == param, caught.value.message


async def test_audio_needs_an_audio_model(sdk: Any, upstream: tuple[int, Any]) -> None:
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF....WAVE").decode(), "format": "wav"}}
    await sdk.chat.completions.create(model="ok", messages=user(part))
    with pytest.raises(openai.BadRequestError):
        await sdk.chat.completions.create(model="text-only", messages=user(part))


def make_bomb_pdf(megabytes: int) -> bytes:
    """A valid one-page PDF whose content stream inflates from a few hundred kilobytes to `megabytes` MB."""
    import zlib

    packer = zlib.compressobj(9)
    chunk = b"0 0 m " * (1024 * 1024 // 6)
    packed = b"".join(packer.compress(chunk) for _ in range(megabytes)) + packer.flush()
    pdf = make_pdf("x")
    body = b"<< /Length " + str(len(packed)).encode() + b" /Filter /FlateDecode >>\nstream\n" + packed + b"\nendstream"
    start = pdf.index(b"4 0 obj\n") + len(b"4 0 obj\n")
    end = pdf.index(b"\nendobj", start)
    # The cross-reference offsets of object 5 move; pypdf repairs that as any reader does.
    return pdf[:start] + body + pdf[end:]


@pytest.mark.parametrize(
    ("case", "limits"),
    [
        ("a 1 GB inflation bomb", {"KEYWAY_PDF_MEMORY_MB": 256}),
        ("a slow read", {"KEYWAY_PDF_TIMEOUT": 0.001}),
        ("garbage", {}),
    ],
)
async def test_a_hostile_pdf_costs_its_own_process_and_gets_a_400(
    sdk: Any, settings: Any, case: str, limits: dict[str, Any]
) -> None:
    for name, value in limits.items():
        setattr(settings, name, value)
    pdf = {"a 1 GB inflation bomb": lambda: make_bomb_pdf(1024), "a slow read": lambda: make_pdf("a page"),
           "garbage": lambda: b"%PDF-1.4\n" + b"\x00garbage" * 100}[case]()
    data = base64.b64encode(pdf).decode()
    part = {"type": "file", "file": {"filename": "bomb.pdf", "file_data": f"data:application/pdf;base64,{data}"}}
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.chat.completions.create(model="text-only", messages=user(part))
    assert refused.value.code == "invalid_file" and refused.value.param == "messages[0].content[1].file.file_data"
    assert time.monotonic() - started < 30


async def test_a_pdf_longer_than_the_page_limit_is_refused(sdk: Any, settings: Any) -> None:
    settings.KEYWAY_PDF_MAX_PAGES = 1
    two_pages = make_pdf("one").replace(b"/Kids [3 0 R] /Count 1", b"/Kids [3 0 R 3 0 R] /Count 2")
    data = base64.b64encode(two_pages).decode()
    part = {"type": "file", "file": {"filename": "long.pdf", "file_data": f"data:application/pdf;base64,{data}"}}
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.chat.completions.create(model="text-only", messages=user(part))
    assert "at most 1 are read" in refused.value.message
