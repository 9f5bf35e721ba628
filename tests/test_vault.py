import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import pytest

from adapters.sealing import AesGcmSealer, UnsealError
from adapters.vault_sqlite import SqliteSecretVault

KEY = bytes(range(32))
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- very secret material 4f1c9a"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "vault.db"


@pytest.fixture
async def conn(db_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    async with aiosqlite.connect(db_path) as c:
        yield c


@pytest.fixture
def vault(conn: aiosqlite.Connection) -> SqliteSecretVault:
    return SqliteSecretVault(conn, AesGcmSealer(KEY))


def database_bytes(db_path: Path) -> bytes:
    files = [db_path, *(db_path.with_name(db_path.name + s) for s in ("-wal", "-journal"))]
    return b"".join(p.read_bytes() for p in files if p.exists())


# Sealer --------------------------------------------------------------------------------------


def test_seal_round_trips_and_uses_a_fresh_nonce_each_time() -> None:
    sealer = AesGcmSealer(KEY)
    first = sealer.seal(SECRET, context=b"alice/ssh_key")
    second = sealer.seal(SECRET, context=b"alice/ssh_key")

    assert first != second
    assert first[0] == 1
    assert len(first) == 1 + 12 + len(SECRET) + 16
    assert sealer.open(first, context=b"alice/ssh_key") == SECRET


@pytest.mark.parametrize("index", [0, 1, 13, -1])
def test_any_flipped_byte_fails_to_open(index: int) -> None:
    sealer = AesGcmSealer(KEY)
    sealed = bytearray(sealer.seal(SECRET, context=b"alice/ssh_key"))
    sealed[index] ^= 0x01

    with pytest.raises(UnsealError):
        sealer.open(bytes(sealed), context=b"alice/ssh_key")


def test_another_context_or_key_fails_to_open() -> None:
    sealed = AesGcmSealer(KEY).seal(SECRET, context=b"alice/ssh_key")

    with pytest.raises(UnsealError):
        AesGcmSealer(KEY).open(sealed, context=b"bob/ssh_key")
    with pytest.raises(UnsealError):
        AesGcmSealer(os.urandom(32)).open(sealed, context=b"alice/ssh_key")
    with pytest.raises(UnsealError):
        AesGcmSealer(KEY).open(sealed[:20], context=b"alice/ssh_key")


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError):
        AesGcmSealer(b"k" * 31)


# Vault ---------------------------------------------------------------------------------------


async def test_put_then_get_round_trips_and_missing_is_none(vault: SqliteSecretVault) -> None:
    await vault.put("alice", "ssh_key", SECRET)

    assert await vault.get("alice", "ssh_key") == SECRET
    assert await vault.get("alice", "forge_password") is None
    assert await vault.get("bob", "ssh_key") is None


async def test_put_replaces_the_earlier_secret(vault: SqliteSecretVault) -> None:
    await vault.put("alice", "ssh_key", b"first")
    await vault.put("alice", "ssh_key", b"second")

    assert await vault.get("alice", "ssh_key") == b"second"


async def test_the_plaintext_never_reaches_the_database_file(
    vault: SqliteSecretVault, db_path: Path
) -> None:
    await vault.put("alice", "ssh_key", SECRET)
    await vault.put("bob", "vm_secret", SECRET)

    data = database_bytes(db_path)
    assert b"sealed_secrets" in data
    assert SECRET not in data
    assert b"very secret" not in data


async def test_writes_are_committed(vault: SqliteSecretVault, db_path: Path) -> None:
    await vault.put("alice", "ssh_key", SECRET)

    async with aiosqlite.connect(db_path) as other:
        reopened = SqliteSecretVault(other, AesGcmSealer(KEY))
        assert await reopened.get("alice", "ssh_key") == SECRET


async def test_a_tampered_row_fails_to_open(
    vault: SqliteSecretVault, conn: aiosqlite.Connection
) -> None:
    await vault.put("alice", "ssh_key", SECRET)
    async with conn.execute("SELECT sealed FROM sealed_secrets") as cursor:
        row = await cursor.fetchone()
    assert row is not None
    tampered = bytearray(row[0])
    tampered[20] ^= 0xFF
    await conn.execute("UPDATE sealed_secrets SET sealed = ?", (bytes(tampered),))
    await conn.commit()

    with pytest.raises(UnsealError):
        await vault.get("alice", "ssh_key")


async def test_a_row_moved_to_another_owner_fails_to_open(
    vault: SqliteSecretVault, conn: aiosqlite.Connection
) -> None:
    await vault.put("alice", "ssh_key", SECRET)
    await conn.execute("UPDATE sealed_secrets SET owner = 'mallory'")
    await conn.commit()

    with pytest.raises(UnsealError):
        await vault.get("mallory", "ssh_key")


async def test_delete_destroys_the_secret_once(
    vault: SqliteSecretVault, conn: aiosqlite.Connection, db_path: Path
) -> None:
    await vault.put("alice", "forge_password", SECRET)
    await vault.put("alice", "ssh_key", b"kept")
    async with conn.execute(
        "SELECT sealed FROM sealed_secrets WHERE kind = 'forge_password'"
    ) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    sealed = bytes(row[0])

    assert await vault.delete("alice", "forge_password") is True
    assert await vault.delete("alice", "forge_password") is False
    assert await vault.get("alice", "forge_password") is None
    assert await vault.get("alice", "ssh_key") == b"kept"
    assert sealed not in database_bytes(db_path)


async def test_an_ambiguous_owner_is_refused(vault: SqliteSecretVault) -> None:
    with pytest.raises(ValueError):
        await vault.put("alice/ssh_key", "x", SECRET)
