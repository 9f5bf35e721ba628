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
from core.domain import USERS
from core.errors import USER_NOT_FOUND, NotFound
from core.operations import RequestMeta
from core.user import PASSWORD_NOT_FOUND, Context, OutcomeCommand
from core.user_state import User
from hero_deployer.app.commands import Command, Decided, Record, consistent_views, idempotent, run
from hero_deployer.app.deps import Deps

# What the vault holds per user (owner = username), sealed; never in an event, a log or a reply.
FORGE_PASSWORD: Final = "forge_password"  # noqa: S105  (a vault kind, not a password)
FORGE_TOKEN: Final = "forge_token"  # noqa: S105
SSH_PRIVATE_KEY: Final = "ssh_private_key"
VM_SECRET: Final = "vm_secret"  # noqa: S105

_encoder = msgspec.json.Encoder()


def user_reply(decided: list[Decided]) -> bytes:
    """The User resource after the command, as JSON."""
    user = decided[0].state
    return _encoder.encode(user.public()) if isinstance(user, User) else b"null"


async def user_command(
    request: ProvisionUser | DecommissionUser, meta: RequestMeta, deps: Deps
) -> bytes:
    """Provisions (starts, or resumes a failed user; one provisioning is left alone) or
    decommissions a user."""
    command = Command(deps.users, request.username, request, Context(now=deps.clock()))

    async def once(record: Record | None) -> bytes:
        return await run(deps, [command], meta, record, reply=user_reply)

    return await idempotent(deps, meta, request, once)


async def record_user_outcome(
    deps: Deps, username: str, command: OutcomeCommand, request_id: str
) -> None:
    """Records what a side effect did for a user; used by the process manager."""
    meta = RequestMeta(operation="record_outcome", request_id=request_id)
    await run(deps, [Command(deps.users, username, command, Context(now=deps.clock()))], meta)


async def one_user(request: GetUser, meta: RequestMeta, deps: Deps) -> bytes:
    await consistent_views(deps)
    user = await deps.user_view.get(request.username)
    if user is None:
        raise NotFound(USER_NOT_FOUND)
    return _encoder.encode(user.public())


async def all_users(request: ListUsers, meta: RequestMeta, deps: Deps) -> bytes:
    await consistent_views(deps)
    users = await deps.user_view.all()
    return _encoder.encode(UserList(users=[user.public() for user in users]))


async def reveal_password(request: RevealInitialPassword, meta: RequestMeta, deps: Deps) -> bytes:
    """Hands out the sealed initial Forge password once: read, record the reveal, destroy.

    There is no idempotency record for this operation: a replayable reply would store the
    password. Of two concurrent calls the aggregate lets one record the reveal; the other is
    NotFound.
    """
    username = request.username
    user, _ = await deps.users.load(USERS.stream(username))
    if user is None:
        raise NotFound(USER_NOT_FOUND)
    if not user.initial_password_available:
        raise NotFound(PASSWORD_NOT_FOUND)
    sealed = await deps.vault.get(username, FORGE_PASSWORD)
    if sealed is None:
        raise NotFound(PASSWORD_NOT_FOUND)
    await run(deps, [Command(deps.users, username, request, Context(now=deps.clock()))], meta)
    await deps.vault.delete(username, FORGE_PASSWORD)
    return _encoder.encode(InitialPassword(username=username, initial_password=sealed.decode()))
