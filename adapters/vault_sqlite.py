"""Sealed secrets in SQLite, one row per (owner, kind), kept outside the event log."""

from __future__ import annotations

import asyncio

import aiosqlite

from core.ports import Sealer

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sealed_secrets (
    owner  TEXT NOT NULL,
    kind   TEXT NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (owner, kind)
)
"""


class SqliteSecretVault:
    """A SecretVault on an aiosqlite connection; every value is sealed to `owner/kind`."""

    def __init__(self, conn: aiosqlite.Connection, sealer: Sealer) -> None:
        self._conn = conn
        self._sealer = sealer
        self._lock = asyncio.Lock()
        self._ready = False

    async def put(self, owner: str, kind: str, plaintext: bytes) -> None:
        """Seals and stores the secret, replacing any earlier one."""
        sealed = self._sealer.seal(plaintext, context=_context(owner, kind))
        async with self._lock:
            await self._ensure_schema()
            await self._conn.execute(
                "INSERT INTO sealed_secrets (owner, kind, sealed) VALUES (?, ?, ?) "
                "ON CONFLICT (owner, kind) DO UPDATE SET sealed = excluded.sealed",
                (owner, kind, sealed),
            )
            await self._conn.commit()

    async def get(self, owner: str, kind: str) -> bytes | None:
        """The opened secret, or None; raises if the stored value does not open."""
        context = _context(owner, kind)
        async with self._lock:
            await self._ensure_schema()
            async with self._conn.execute(
                "SELECT sealed FROM sealed_secrets WHERE owner = ? AND kind = ?", (owner, kind)
            ) as cursor:
                row = await cursor.fetchone()
        if row is None:
            return None
        return self._sealer.open(bytes(row[0]), context=context)

    async def delete(self, owner: str, kind: str) -> bool:
        """Overwrites the sealed value with zeros, removes the row; True if there was one."""
        _context(owner, kind)
        async with self._lock:
            await self._ensure_schema()
            cursor = await self._conn.execute(
                "UPDATE sealed_secrets SET sealed = zeroblob(length(sealed)) "
                "WHERE owner = ? AND kind = ?",
                (owner, kind),
            )
            existed = cursor.rowcount > 0
            await cursor.close()
            await self._conn.execute(
                "DELETE FROM sealed_secrets WHERE owner = ? AND kind = ?", (owner, kind)
            )
            await self._conn.commit()
        return existed

    async def _ensure_schema(self) -> None:
        """Creates the table once; has SQLite zero freed pages, so deleted rows leave no trace."""
        if self._ready:
            return
        await self._conn.execute("PRAGMA secure_delete = ON")
        await self._conn.execute(_SCHEMA)
        await self._conn.commit()
        self._ready = True


def _context(owner: str, kind: str) -> bytes:
    """The sealing context; a `/` in the owner would make two contexts ambiguous."""
    if not owner or not kind or "/" in owner:
        raise ValueError("owner and kind must be non-empty and the owner must not contain '/'")
    return f"{owner}/{kind}".encode()
