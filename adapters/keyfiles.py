"""Server keys and tokens: from the environment, else from a 0600 file the first start creates."""

from __future__ import annotations

import base64
import os
import secrets
import stat
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


def load_or_create_nkey(path: Path) -> str:
    """The public key (U…) of the NATS user NKey whose seed is `path`, created on first use."""
    import nkeys

    if path.exists():
        seed = path.read_text().strip()
    else:
        new_seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER).decode()
        seed = _create_exclusive(path, new_seed)
    try:
        key_pair = nkeys.from_seed(bytearray(seed.encode()))
    except nkeys.NkeysError:
        raise ValueError(f"{path} does not hold a NATS user NKey seed") from None
    try:
        if not key_pair.public_key.startswith(b"U"):
            raise ValueError(f"{path} holds an NKey seed that is not a user's")
        return str(key_pair.public_key.decode())
    finally:
        key_pair.wipe()


def restrict_to_owner(directory: Path) -> None:
    """Makes `directory` 0700 and takes group's and others' permissions off all it holds."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _owner_only(directory)
    for root, dirs, files in os.walk(directory):
        for name in (*dirs, *files):
            _owner_only(Path(root, name))


def _owner_only(path: Path) -> None:
    mode = path.lstat().st_mode
    # a symbolic link's own mode is never used; what it points at inside is visited itself
    if not stat.S_ISLNK(mode) and mode & 0o077:
        os.chmod(path, stat.S_IMODE(mode) & 0o700)
