"""Encryption at rest for secrets Keyway must be able to read back (upstream provider keys).

Fernet (AES-128-CBC + HMAC-SHA256) under keys derived from KEYWAY_ENCRYPTION_KEY. That variable may hold a
comma-separated list: the first entry encrypts, all of them decrypt, which is how the key is rotated.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


@cache
def _fernet(material: str) -> MultiFernet:
    keys = [
        Fernet(base64.urlsafe_b64encode(hashlib.sha256(part.strip().encode()).digest()))
        for part in material.split(",")
        if part.strip()
    ]
    return MultiFernet(keys)


def encrypt_secret(plaintext: str) -> str:
    if not plaintext:
        return ""
    return _fernet(settings.KEYWAY_ENCRYPTION_KEY).encrypt(plaintext.encode()).decode()


def decrypt_secret(token: str) -> str:
    if not token:
        return ""
    try:
        return _fernet(settings.KEYWAY_ENCRYPTION_KEY).decrypt(token.encode()).decode()
    except InvalidToken:
        raise ValueError("A stored secret cannot be decrypted with KEYWAY_ENCRYPTION_KEY.") from None
