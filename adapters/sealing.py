"""AES-256-GCM sealing of secrets at rest, bound to a context such as `alice/ssh_key`."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# Format v1: version byte | 12-byte nonce | ciphertext with its 16-byte tag.
# The associated data is the version byte followed by the context.
_V1 = b"\x01"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HKDF_INFO = b"hero-deployer sealer v1"


class UnsealError(ValueError):
    """A sealed value is malformed, tampered with, or bound to another context or key."""


class AesGcmSealer:
    """Seals with AES-256-GCM under a key derived from the master key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the sealing key must be at least 32 bytes")
        # HKDF gives the cipher its own key, so a master key shared with other uses (or longer
        # than 32 bytes) is never used for AES directly.
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(key)
        self._aead = AESGCM(derived)

    def seal(self, plaintext: bytes, *, context: bytes) -> bytes:
        """Encrypts `plaintext` under a fresh random nonce, bound to `context`."""
        nonce = os.urandom(_NONCE_BYTES)
        return _V1 + nonce + self._aead.encrypt(nonce, plaintext, _V1 + context)

    def open(self, sealed: bytes, *, context: bytes) -> bytes:
        """Decrypts a sealed value; UnsealError unless it is intact and bound to `context`."""
        if len(sealed) < 1 + _NONCE_BYTES + _TAG_BYTES:
            raise UnsealError("sealed value is too short")
        version, nonce, body = sealed[:1], sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        if version != _V1:
            raise UnsealError(f"unknown sealed format version {version[0]}")
        try:
            return self._aead.decrypt(nonce, body, version + context)
        except InvalidTag:
            raise UnsealError("sealed value is tampered with or bound to another context") from None
