"""The RemoteShell port over SSH with asyncssh: readiness, SFTP uploads and commands."""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncssh

from core.ports import CommandResult, ExternalError, SshTarget
from core.retry import RetryPolicy

_TAIL_BYTES = 4096
_READ_CHUNK = 65536


@dataclass(kw_only=True, eq=False)
class AsyncsshShell:
    """SSH into VMs with the user's key; every call opens and closes its own connection."""

    connect_timeout: float = 10.0
    tail_bytes: int = _TAIL_BYTES
    initial_backoff: float = 0.5
    max_backoff: float = 5.0

    async def wait_ready(self, target: SshTarget, *, timeout: float) -> None:
        """Polls connect and key auth with backoff until both succeed or `timeout` passes."""
        key = _import_key(target)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = RetryPolicy(base_delay=self.initial_backoff, max_delay=self.max_backoff)
        failures = 0
        last_error = ""
        while (remaining := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(min(remaining, self.connect_timeout)):
                    conn = await self._connect(target, key)
                conn.close()
                await conn.wait_closed()
                return
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                # An attempt cut short by the deadline says less than the refusal before it.
                if not last_error or not isinstance(exc, TimeoutError):
                    last_error = _describe(exc)
            failures += 1
            pause = min(backoff.delay(failures), deadline - loop.time())
            if pause > 0:
                await asyncio.sleep(pause)
        raise ExternalError(
            f"ssh {_where(target)} not ready within {timeout:g}s: {last_error}", retryable=True
        )

    async def upload(
        self, target: SshTarget, path: str, content: bytes, *, owner: str = ""
    ) -> None:
        """Writes `content` to `path` (relative paths from the login home), creating folders.

        With `owner` (a login as root writing for another account), a relative path starts at
        the owner's home, and the folders below that home and the file belong to the owner.
        The content goes to `<path>.part` first and is renamed over `path`, so a broken
        upload never leaves a half-written file in place.
        """
        remote = _remote_path(path)
        async with self._session(target) as conn:
            try:
                async with conn.start_sftp_client() as sftp:
                    if owner:
                        uid, gid, home = await _account(sftp, owner)
                        remote = posixpath.join(home, remote)
                        await _makedirs_owned(sftp, home, posixpath.dirname(remote), uid, gid)
                    elif parent := posixpath.dirname(remote):
                        await sftp.makedirs(parent, exist_ok=True)
                    await _write_replacing(sftp, remote, content)
                    if owner:
                        await sftp.chown(remote, uid, gid)
            except LookupError as exc:
                raise ExternalError(f"sftp upload of {path} to {_where(target)}: {exc}") from None
            except asyncssh.SFTPError as exc:
                raise ExternalError(
                    f"sftp upload of {path} to {_where(target)} failed: {exc.reason}"
                ) from None
            except (OSError, asyncssh.Error) as exc:
                raise _retryable(f"sftp upload of {path} to {_where(target)} failed", exc) from None

    async def run(self, target: SshTarget, command: str, *, timeout: float) -> CommandResult:
        """Runs `command` with no input; returns its exit status and last output bytes.

        Standard error is merged into the output. A command still running after `timeout`
        is sent SIGKILL and its channel closed, which ends it on servers that ignore signals.
        """
        async with self._session(target) as conn:
            tail = bytearray()
            try:
                process = await conn.create_process(
                    command, stdin=asyncssh.DEVNULL, stderr=asyncssh.STDOUT, encoding=None
                )
            except (OSError, asyncssh.Error) as exc:
                raise _retryable(f"cannot start a command on {_where(target)}", exc) from None
            try:
                async with asyncio.timeout(timeout):
                    while chunk := await process.stdout.read(_READ_CHUNK):
                        tail += chunk
                        del tail[: -self.tail_bytes]
                    completed = await process.wait()
            except TimeoutError:
                with contextlib.suppress(OSError, asyncssh.Error):
                    process.kill()
                process.close()
                raise ExternalError(
                    f"command on {_where(target)} ran over {timeout:g}s and was killed",
                    retryable=True,
                ) from None
            except (OSError, asyncssh.Error) as exc:
                raise _retryable(f"command on {_where(target)} lost its connection", exc) from None
        return CommandResult(
            exit_status=_exit_status(completed.returncode),
            output_tail=bytes(tail).decode("utf-8", "replace"),
        )

    @contextlib.asynccontextmanager
    async def _session(self, target: SshTarget) -> AsyncIterator[asyncssh.SSHClientConnection]:
        """One authenticated connection, closed on exit; failures to connect are retryable."""
        key = _import_key(target)
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn = await self._connect(target, key)
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise _retryable(f"ssh {_where(target)} failed", exc) from None
        try:
            yield conn
        finally:
            conn.close()
            await conn.wait_closed()

    async def _connect(
        self, target: SshTarget, key: asyncssh.SSHKey
    ) -> asyncssh.SSHClientConnection:
        """Connects with exactly the target's key: no agent, no ~/.ssh config or keys."""
        return await asyncssh.connect(
            target.host,
            target.port,
            username=target.username,
            client_keys=[key],
            # The VM was created moments ago with a host key nothing tells us in advance, and it
            # is reached over mycelium, whose addresses are derived from the peer's own key, so
            # a known_hosts check would only be trust-on-first-use: it would add nothing.
            known_hosts=None,
            agent_path=None,
            config=None,
            preferred_auth="publickey",
            connect_timeout=self.connect_timeout,
            login_timeout=self.connect_timeout,
        )


def _import_key(target: SshTarget) -> asyncssh.SSHKey:
    """The target's private key; an unreadable one is an error that retrying cannot fix."""
    try:
        return asyncssh.import_private_key(target.private_key)
    except (asyncssh.KeyImportError, ValueError):
        raise ExternalError(f"the private key for {_where(target)} cannot be read") from None


async def _write_replacing(sftp: asyncssh.SFTPClient, remote: str, content: bytes) -> None:
    """Writes `<remote>.part`, then renames it over `remote`."""
    partial = f"{remote}.part"
    async with sftp.open(partial, "wb") as remote_file:
        await remote_file.write(content)
    try:
        await sftp.posix_rename(partial, remote)
    except asyncssh.SFTPOpUnsupported:
        with contextlib.suppress(asyncssh.SFTPNoSuchFile):
            await sftp.remove(remote)
        await sftp.rename(partial, remote)


async def _account(sftp: asyncssh.SFTPClient, user: str) -> tuple[int, int, str]:
    """The uid, gid and home of `user` from the VM's `/etc/passwd`; LookupError if absent."""
    async with sftp.open("/etc/passwd", "rb") as passwd:
        data: object = await passwd.read()
    text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 6 and fields[0] == user:
            try:
                return int(fields[2]), int(fields[3]), fields[5] or f"/home/{user}"
            except ValueError:
                break
    raise LookupError(f"the vm has no account {user!r}")


async def _makedirs_owned(
    sftp: asyncssh.SFTPClient, home: str, folder: str, uid: int, gid: int
) -> None:
    """Creates `folder` and its parents; those below `home` (and a home it made) get the owner."""
    missing_home = not await sftp.exists(home)
    await sftp.makedirs(folder, exist_ok=True)
    relative = posixpath.relpath(folder, home)
    if relative.startswith(".."):
        return
    owned = [home] if missing_home else []
    current = home
    for part in [] if relative == "." else relative.split("/"):
        current = posixpath.join(current, part)
        owned.append(current)
    for path in owned:
        await sftp.chown(path, uid, gid)


def _remote_path(path: str) -> str:
    """The SFTP path: `~/x` and `x` are relative to the login home, `/x` is absolute."""
    if path == "~" or path.startswith("~/"):
        path = path[2:]
    elif path.startswith("~"):
        raise ValueError(f"another user's home cannot be named over SFTP: {path}")
    if not path or path.endswith("/"):
        raise ValueError(f"not a file path: {path!r}")
    return path


def _where(target: SshTarget) -> str:
    return f"{target.username}@{target.host}:{target.port}"


def _describe(exc: BaseException) -> str:
    """A short reason; asyncssh and OS errors name no key material."""
    if isinstance(exc, asyncssh.Error):
        return exc.reason or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _retryable(what: str, exc: BaseException) -> ExternalError:
    """A retryable ExternalError: `what` failed, and the short reason why."""
    return ExternalError(f"{what}: {_describe(exc)}", retryable=True)


def _exit_status(returncode: int | None) -> int:
    """The exit status; a command ended by signal N reports 128 + N, as a shell would."""
    if returncode is None:
        return -1
    return 128 - returncode if returncode < 0 else returncode
