"""Handlers of the operator user API: plain async functions of (request, meta, deps)."""

from __future__ import annotations

from typing import Final

import msgspec

from core.contract import (
    DecommissionUser,
    GetUser,
    InitialPassword,
    ListUsers,
    ProvisionUser,
    RevealInitialPassword,
    UserList,
)
from core.errors import USER_NOT_FOUND, NotFound
from core.events import IdempotencyRecord, user_stream
from core.operations import RequestMeta
from core.user import PASSWORD_NOT_FOUND, Context, OutcomeCommand, User, UserCommand, decide, evolve
from hero_deployer.commands import consistent_views, execute_one, idempotent
from hero_deployer.deps import Deps

# What the vault holds per user (owner = username), sealed; never in an event, a log or a reply.
FORGE_PASSWORD: Final = "forge_password"  # noqa: S105  (a vault kind, not a password)
FORGE_TOKEN: Final = "forge_token"  # noqa: S105
SSH_PRIVATE_KEY: Final = "ssh_private_key"
VM_SECRET: Final = "vm_secret"  # noqa: S105

_encoder = msgspec.json.Encoder()


def _result(user: User | None) -> bytes:
    return _encoder.encode(user.public()) if user is not None else b"null"


async def run_user_command(
    deps: Deps,
    username: str,
    command: UserCommand,
    ctx: Context,
    meta: RequestMeta,
    idempotency: IdempotencyRecord | None = None,
    *,
    reply: bool = True,
) -> bytes:
    """Decides one command on one user and records its events; returns the User as JSON."""
    return await execute_one(
        deps,
        deps.users,
        user_stream(username),
        lambda user: decide(user, command, ctx),
        evolve,
        _result if reply else None,
        meta,
        idempotency,
    )


async def provision_user(request: ProvisionUser, meta: RequestMeta, deps: Deps) -> bytes:
    """Starts provisioning; resumes a failed user; a user already provisioning is left alone."""
    ctx = Context(now=deps.clock())

    async def run(idempotency: IdempotencyRecord | None) -> bytes:
        return await run_user_command(deps, request.username, request, ctx, meta, idempotency)

    return await idempotent(deps, meta, request, run)


async def decommission_user(request: DecommissionUser, meta: RequestMeta, deps: Deps) -> bytes:
    ctx = Context(now=deps.clock())

    async def run(idempotency: IdempotencyRecord | None) -> bytes:
        return await run_user_command(deps, request.username, request, ctx, meta, idempotency)

    return await idempotent(deps, meta, request, run)


async def record_user_outcome(
    deps: Deps, username: str, command: OutcomeCommand, request_id: str
) -> None:
    """Records what a side effect did for a user; used by the process manager."""
    meta = RequestMeta(operation="record_outcome", request_id=request_id)
    await run_user_command(deps, username, command, Context(now=deps.clock()), meta, reply=False)


async def get_user(request: GetUser, meta: RequestMeta, deps: Deps) -> bytes:
    await consistent_views(deps)
    user = await deps.user_view.get(request.username)
    if user is None:
        raise NotFound(USER_NOT_FOUND)
    return _encoder.encode(user.public())


async def list_users(request: ListUsers, meta: RequestMeta, deps: Deps) -> bytes:
    await consistent_views(deps)
    users = await deps.user_view.all()
    return _encoder.encode(UserList(users=[user.public() for user in users]))


async def reveal_initial_password(
    request: RevealInitialPassword, meta: RequestMeta, deps: Deps
) -> bytes:
    """Hands out the sealed initial Forge password once: read, record the reveal, destroy.

    There is no idempotency record for this operation: a replayable reply would store the
    password. Of two concurrent calls the aggregate lets one record the reveal; the other is
    NotFound.
    """
    username = request.username
    user, _ = await deps.users.load(user_stream(username))
    if user is None:
        raise NotFound(USER_NOT_FOUND)
    if not user.initial_password_available:
        raise NotFound(PASSWORD_NOT_FOUND)
    sealed = await deps.vault.get(username, FORGE_PASSWORD)
    if sealed is None:
        raise NotFound(PASSWORD_NOT_FOUND)
    await run_user_command(deps, username, request, Context(now=deps.clock()), meta, reply=False)
    await deps.vault.delete(username, FORGE_PASSWORD)
    return _encoder.encode(InitialPassword(username=username, initial_password=sealed.decode()))
