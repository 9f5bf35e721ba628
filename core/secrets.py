"""Keyed fingerprints of tenant secrets: the only form in which a secret is ever kept."""

from __future__ import annotations

import hashlib
import hmac


class Fingerprinter:
    """HMAC-SHA256 of a secret under the server's key, hex encoded."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the fingerprint key must be at least 32 bytes")
        self._key = key

    def __call__(self, secret: str) -> str:
        return hmac.new(self._key, secret.encode(), hashlib.sha256).hexdigest()
