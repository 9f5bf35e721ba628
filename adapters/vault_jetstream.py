"""Sealed secrets in a JetStream KV bucket, so every replica of one log opens the same secrets."""

from __future__ import annotations

import base64

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from adapters.vault_sqlite import _context as sealing_context
from core.errors import Unavailable
from core.ports import Sealer

BUCKET = "HERO_VAULT"


def vault_key(owner: str, kind: str) -> str:
    """A KV key (letters, digits and `-/_=.` only) for `owner/kind`, one-to-one."""
    sealing_context(owner, kind)  # refuses what the SQLite vault refuses
    return f"s.{_b32(owner)}.{_b32(kind)}"


def owner_kind(key: str) -> tuple[str, str]:
    """The `owner, kind` a `vault_key` was made from."""
    _, owner, kind = key.split(".")
    return _unb32(owner), _unb32(kind)


def _b32(text: str) -> str:
    return base64.b32encode(text.encode()).decode().rstrip("=")


def _unb32(text: str) -> str:
    return base64.b32decode(text + "=" * (-len(text) % 8)).decode()


async def vault_bucket(js: JetStreamContext, *, replicas: int) -> KeyValue:
    """The HERO_VAULT bucket, made if missing: one revision per secret, on file."""
    try:
        return await js.key_value(BUCKET)
    except nats.js.errors.BucketNotFoundError:
        config = api.KeyValueConfig(
            bucket=BUCKET, history=1, replicas=replicas, storage=api.StorageType.FILE
        )
        return await js.create_key_value(config)


class JetStreamSecretVault:
    """A SecretVault in one KV bucket (history 1); every value is sealed to `owner/kind`."""

    def __init__(self, kv: KeyValue, sealer: Sealer) -> None:
        self._kv = kv
        self._sealer = sealer

    @classmethod
    async def open(
        cls, js: JetStreamContext, sealer: Sealer, *, replicas: int
    ) -> JetStreamSecretVault:
        return cls(await vault_bucket(js, replicas=replicas), sealer)

    async def put(self, owner: str, kind: str, plaintext: bytes) -> None:
        """Seals and stores the secret, replacing any earlier one."""
        sealed = self._sealer.seal(plaintext, context=sealing_context(owner, kind))
        try:
            await self._kv.put(vault_key(owner, kind), sealed)
        except (nats.errors.Error, nats.js.errors.Error) as error:
            raise Unavailable("the vault cannot be reached") from error

    async def get(self, owner: str, kind: str) -> bytes | None:
        """The opened secret, or None; raises if the stored value does not open."""
        try:
            entry = await self._kv.get(vault_key(owner, kind))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except (nats.errors.Error, nats.js.errors.Error) as error:
            raise Unavailable("the vault cannot be reached") from error
        if not entry.value:
            return None
        return self._sealer.open(entry.value, context=sealing_context(owner, kind))

    async def delete(self, owner: str, kind: str) -> bool:
        """Purges every stored revision of the secret; True if there was one."""
        key = vault_key(owner, kind)
        try:
            try:
                existed = bool((await self._kv.get(key)).value)
            except (KeyNotFoundError, KeyDeletedError):
                existed = False
            await self._kv.purge(key)
        except (nats.errors.Error, nats.js.errors.Error) as error:
            raise Unavailable("the vault cannot be reached") from error
        return existed
