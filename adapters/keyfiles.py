"""Server keys and tokens: from the environment, else from a 0600 file the first start creates."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path


def load_or_create_token(path: Path, env_value: str | None, *, nbytes: int = 32) -> str:
    """A URL-safe token: `env_value` when set, else the file's content, created on first use."""
    if env_value:
        return env_value
    if path.exists():
        return path.read_text().strip()
    return _create_exclusive(path, secrets.token_urlsafe(nbytes))


def load_or_create_key(path: Path, env_value: str | None, *, nbytes: int = 32) -> bytes:
    """Raw key bytes: base64url `env_value` when set, else the 0600 file, created on first use."""
    text = load_or_create_token(path, env_value, nbytes=nbytes)
    padded = text + "=" * (-len(text) % 4)
    key = base64.urlsafe_b64decode(padded.encode())
    if len(key) < nbytes:
        raise ValueError(f"key {path.name} must be at least {nbytes} bytes (base64url)")
    return key


def _create_exclusive(path: Path, value: str) -> str:
    """Writes `value` to a new 0600 file; if another process won the race, reads its value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    return value
