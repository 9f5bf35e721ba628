"""The adapters the settings describe, each built on the composition root's exit stack."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from typing import cast

import aiosqlite
from nats.aio.client import Client

from adapters.eventstore_sqlite import SqliteEventStore
from adapters.keyfiles import load_or_create_key
from adapters.lease_jetstream import CHECKPOINTS, LEASES, KvCheckpoints, KvLease, bucket
from adapters.sealing import AesGcmSealer
from adapters.sqlite_events import Synchronous
from adapters.vault_sqlite import SqliteSecretVault
from core.ports import (
    BackendError,
    ComputeBackend,
    Forge,
    HealthProbe,
    NodeDirectory,
    RemoteShell,
    SecretVault,
)
from hero_deployer.app.backends import build_backend, gridproxy_url
from hero_deployer.app.deps import ServiceStore
from hero_deployer.app.settings import Settings
from projections.runner import ConnectionHook


async def backend(settings: Settings, stack: AsyncExitStack) -> ComputeBackend:
    """The configured backend; a real one must pass its check before the service starts."""
    backend = await build_backend(settings, stack)
    check = getattr(backend, "check", None)
    if settings.backend != "local" and check is not None:
        problems: list[str] = await check()
        if problems:
            raise BackendError(f"backend {settings.backend} is not usable: " + "; ".join(problems))
    return backend


async def event_store(
    settings: Settings, nc: Client | None, stack: AsyncExitStack, on_connect: ConnectionHook | None
) -> ServiceStore:
    """DIR/events.db, or the JetStream stream on the cluster `nc` is connected to."""
    if settings.store == "sqlite":
        return await stack.enter_async_context(
            SqliteEventStore(
                settings.data_dir / "events.db",
                synchronous=cast(Synchronous, settings.synchronous),
                on_connect=on_connect,
            )
        )
    if settings.store != "jetstream":
        raise ValueError(f"unknown store {settings.store!r}: sqlite or jetstream")
    if nc is None:
        raise ValueError("the jetstream store needs a NATS connection")
    from adapters.eventstore_jetstream import JetStreamEventStore

    store = JetStreamEventStore(nc, replicas=settings.replicas)
    store.keys.stale_after = settings.reservation_stale_after
    return await stack.enter_async_context(store)


async def side_effects_lease(
    settings: Settings, nc: Client | None, stack: AsyncExitStack
) -> tuple[KvLease, KvCheckpoints] | None:
    """Beside a jetstream log: the lease that makes one replica at a time run side effects, and
    the checkpoints all replicas share (docs/scale-out.md)."""
    if settings.store != "jetstream" or nc is None:
        return None
    js = nc.jetstream()
    leases = await bucket(js, LEASES, replicas=settings.replicas, ttl=settings.lease_ttl)
    lease = await stack.enter_async_context(KvLease(leases, "side-effects", ttl=settings.lease_ttl))
    shared = await bucket(js, CHECKPOINTS, replicas=settings.replicas)
    return lease, KvCheckpoints(shared, lease)


async def vault(settings: Settings, stack: AsyncExitStack, nc: Client | None) -> SecretVault:
    """Sealed secrets in `DIR/vault.db` (beside a jetstream log: in its cluster's HERO_VAULT
    bucket, which every replica shares), under the master key."""
    master = load_or_create_key(
        settings.data_dir / "master.key", os.environ.get("HERO_DEPLOYER_MASTER_KEY")
    )
    if settings.store == "jetstream" and nc is not None:
        from adapters.vault_jetstream import JetStreamSecretVault

        return await JetStreamSecretVault.open(
            nc.jetstream(), AesGcmSealer(master), replicas=settings.replicas
        )
    conn = await aiosqlite.connect(settings.data_dir / "vault.db")
    stack.push_async_callback(conn.close)
    await conn.execute("PRAGMA busy_timeout=5000")
    return SqliteSecretVault(conn, AesGcmSealer(master))


def shell() -> RemoteShell:
    """The SSH client that runs the setup command on a user's VM."""
    from adapters.ssh_asyncssh import AsyncsshShell

    return AsyncsshShell()


async def probe(stack: AsyncExitStack) -> HealthProbe:
    """The HTTP client that checks a user's gateway answers."""
    from adapters.health_http import HttpxHealthProbe

    return await stack.enter_async_context(HttpxHealthProbe())


async def forge(settings: Settings, stack: AsyncExitStack) -> Forge | None:
    """The Forgejo admin client of `forge_url`; none when it is empty."""
    if not settings.forge_url:
        return None
    from adapters.forge_http import ForgejoClient

    client = ForgejoClient(
        settings.forge_url,
        admin_user=settings.forge_admin_user,
        admin_password=settings.forge_admin_password or None,
        admin_token=settings.forge_admin_token or None,
    )
    return await stack.enter_async_context(client)


async def directory(settings: Settings, stack: AsyncExitStack) -> NodeDirectory | None:
    """The grid proxy: configured, or the OpenTofu network's; none for the other backends."""
    url = gridproxy_url(settings)
    if not url:
        return None
    from adapters.gridproxy_http import GridProxyDirectory

    return await stack.enter_async_context(GridProxyDirectory(url))
