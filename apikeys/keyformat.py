"""Making, parsing and hashing raw API keys. Nothing outside this app ever handles a raw key."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string

from platform_site.kernel.conf import settings  # Django's, read faster (the module says why)

PREFIX = "sk-kw-"
_PUBLIC_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
PUBLIC_ID_LENGTH = 12
# 44 characters of base62 carry 44 * log2(62) ≈ 262 bits of randomness, above the 256 we promise.
SECRET_LENGTH = 44
_KEY_RE = re.compile(rf"^sk-kw-([a-z0-9]{{{PUBLIC_ID_LENGTH}}})-([A-Za-z0-9]{{{SECRET_LENGTH}}})$")


def new_public_id() -> str:
    return "".join(secrets.choice(_PUBLIC_ALPHABET) for _ in range(PUBLIC_ID_LENGTH))


def new_secret() -> str:
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))


def format_key(public_id: str, secret: str) -> str:
    return f"{PREFIX}{public_id}-{secret}"


def parse_key(raw: str) -> tuple[str, str] | None:
    """Split a raw key into (public_id, secret), or None when it is not of our shape (checked before any query)."""
    match = _KEY_RE.match(raw)
    if match is None:
        return None
    return match.group(1), match.group(2)


def hash_secret(public_id: str, secret: str) -> str:
    # A fast keyed hash is right here: the secret has 256 bits of entropy, so there is nothing to stretch, and
    # the pepper (kept outside the database) makes a stolen table useless on its own.
    message = f"{public_id}:{secret}".encode()
    return hmac.new(settings.KEYWAY_KEY_PEPPER.encode(), message, hashlib.sha256).hexdigest()


def secret_matches(public_id: str, secret: str, stored_hash: str) -> bool:
    if not stored_hash:
        return False
    return hmac.compare_digest(hash_secret(public_id, secret), stored_hash)
