import asyncio
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

from adapters.ssh_asyncssh import AsyncsshShell
from adapters.sshkeys import SshKeyPair, generate_ed25519
from core.ports import CommandResult, ExternalError, SshTarget

USER = "driver"


@dataclass
class VmState:
    """What the test SSH server lets in and what it was asked."""

    home: Path
    authorized: set[str] = field(default_factory=set)
    auth_attempts: list[tuple[str, str]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    attempted: asyncio.Event = field(default_factory=asyncio.Event)
    killed: asyncio.Event = field(default_factory=asyncio.Event)


class VmSshServer(asyncssh.SSHServer):
    """Public-key auth only, for one user, against the state's authorized keys.

    asyncssh's SSHServer (asyncssh/server.py) already asks every user to authenticate
    (begin_auth returns True) and offers no password auth, nor keyboard-interactive, which
    follows password auth unless overridden: public keys are all this server adds.
    """

    def __init__(self, state: VmState) -> None:
        self._state = state

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        line = key.export_public_key("openssh").decode().split()[1]
        self._state.auth_attempts.append((username, line))
        self._state.attempted.set()
        return username == USER and line in self._state.authorized


def exec_in_home(state: VmState) -> Callable[[asyncssh.SSHServerProcess[bytes]], Awaitable[None]]:
    """Runs each exec request with /bin/sh in the VM's home; kills it if the channel closes."""

    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
        command = process.command or ""
        state.commands.append(command)
        shell = await asyncio.create_subprocess_shell(
            command,
            cwd=state.home,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )

        async def pump(
            reader: asyncio.StreamReader | None, writer: asyncssh.SSHWriter[bytes]
        ) -> None:
            assert reader is not None
            while chunk := await reader.read(65536):
                writer.write(chunk)

        pumps = asyncio.gather(
            pump(shell.stdout, process.stdout), pump(shell.stderr, process.stderr)
        )
        exited = asyncio.ensure_future(shell.wait())
        closed = asyncio.ensure_future(process.wait_closed())
        await asyncio.wait({exited, closed}, return_when=asyncio.FIRST_COMPLETED)
        if not exited.done():
            os.killpg(shell.pid, signal.SIGKILL)
            await exited
            state.killed.set()
            pumps.cancel()
            return
        await pumps
        closed.cancel()
        process.exit(exited.result())

    return handle


@dataclass
class Vm:
    state: VmState
    port: int
    key: SshKeyPair

    def target(self, key: SshKeyPair | None = None, username: str = USER) -> SshTarget:
        private = (key or self.key).private_openssh
        return SshTarget(host="127.0.0.1", port=self.port, username=username, private_key=private)

    def authorize(self, key: SshKeyPair) -> None:
        self.state.authorized.add(key.public_openssh.split()[1])


@pytest.fixture
async def vm(tmp_path: Path) -> AsyncIterator[Vm]:
    home = tmp_path / "home" / USER
    home.mkdir(parents=True)
    state = VmState(home=home)
    server = await asyncssh.create_server(
        lambda: VmSshServer(state),
        "127.0.0.1",
        0,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        process_factory=exec_in_home(state),
        sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=os.fsencode(home)),
        allow_pty=False,
        encoding=None,
    )
    key = generate_ed25519("driver@test")
    machine = Vm(state=state, port=int(server.sockets[0].getsockname()[1]), key=key)
    machine.authorize(key)
    try:
        yield machine
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def shell() -> AsyncsshShell:
    return AsyncsshShell(connect_timeout=2.0, initial_backoff=0.02, max_backoff=0.1)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# wait_ready ----------------------------------------------------------------------------------


async def test_wait_ready_returns_once_the_key_is_accepted(vm: Vm, shell: AsyncsshShell) -> None:
    await shell.wait_ready(vm.target(), timeout=5)

    assert vm.state.auth_attempts[-1] == (USER, vm.key.public_openssh.split()[1])


async def test_wait_ready_keeps_trying_until_the_key_is_installed(
    vm: Vm, shell: AsyncsshShell
) -> None:
    later = generate_ed25519()
    waiting = asyncio.create_task(shell.wait_ready(vm.target(later), timeout=10))
    await asyncio.wait_for(vm.state.attempted.wait(), 5)
    assert not waiting.done()

    vm.authorize(later)
    await asyncio.wait_for(waiting, 5)

    attempts = [a for a in vm.state.auth_attempts if a[1] == later.public_openssh.split()[1]]
    assert len(attempts) >= 2


async def test_wait_ready_times_out_naming_the_target(shell: AsyncsshShell) -> None:
    port = closed_port()
    target = SshTarget(host="127.0.0.1", port=port, private_key=generate_ed25519().private_openssh)
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(ExternalError) as caught:
        await shell.wait_ready(target, timeout=0.5)

    assert loop.time() - started < 2
    assert caught.value.retryable is True
    assert f"127.0.0.1:{port}" in caught.value.message
    assert "PRIVATE" not in caught.value.message


async def test_wait_ready_with_a_refused_key_times_out(vm: Vm, shell: AsyncsshShell) -> None:
    stranger = generate_ed25519()

    with pytest.raises(ExternalError) as caught:
        await shell.wait_ready(vm.target(stranger), timeout=0.5)

    assert caught.value.retryable is True
    assert "ermission denied" in caught.value.message
    assert stranger.private_openssh not in str(caught.value)


async def test_an_unreadable_key_is_not_retryable(vm: Vm, shell: AsyncsshShell) -> None:
    target = SshTarget(host="127.0.0.1", port=vm.port, private_key="not a key")

    with pytest.raises(ExternalError, match="cannot be read") as caught:
        await shell.wait_ready(target, timeout=1)

    assert caught.value.retryable is False
    assert "not a key" not in caught.value.message


async def test_another_login_is_refused(vm: Vm, shell: AsyncsshShell) -> None:
    with pytest.raises(ExternalError):
        await shell.run(vm.target(username="root"), "true", timeout=5)

    assert vm.state.commands == []


# upload --------------------------------------------------------------------------------------


async def test_upload_creates_parent_folders_relative_to_home(vm: Vm, shell: AsyncsshShell) -> None:
    content = b'[meta]\nuser = "alice"\n'

    await shell.upload(vm.target(), "hero/cfg/cockpit/services.toml", content)

    written = vm.state.home / "hero" / "cfg" / "cockpit" / "services.toml"
    assert written.read_bytes() == content
    assert sorted(p.name for p in written.parent.iterdir()) == ["services.toml"]


async def test_upload_replaces_an_existing_file_and_accepts_home_paths(
    vm: Vm, shell: AsyncsshShell
) -> None:
    await shell.upload(vm.target(), "~/cfg/a.toml", b"first version, longer")
    await shell.upload(vm.target(), "~/cfg/a.toml", b"second")
    await shell.upload(vm.target(), "/abs/b.txt", b"absolute")

    assert (vm.state.home / "cfg" / "a.toml").read_bytes() == b"second"
    assert (vm.state.home / "abs" / "b.txt").read_bytes() == b"absolute"


async def test_uploaded_file_is_where_commands_run(vm: Vm, shell: AsyncsshShell) -> None:
    await shell.upload(vm.target(), "hero/setup.txt", b"ready\n")

    result = await shell.run(vm.target(), "cat hero/setup.txt", timeout=5)

    assert result == CommandResult(exit_status=0, output_tail="ready\n")


async def test_upload_refused_by_the_server_is_not_retryable(vm: Vm, shell: AsyncsshShell) -> None:
    (vm.state.home / "hero").write_text("a file, not a folder")

    with pytest.raises(ExternalError, match=r"sftp upload of hero/x\.toml") as caught:
        await shell.upload(vm.target(), "hero/x.toml", b"x")

    assert caught.value.retryable is False


async def test_upload_to_a_missing_vm_is_retryable(shell: AsyncsshShell) -> None:
    port = closed_port()
    target = SshTarget(host="127.0.0.1", port=port, private_key=generate_ed25519().private_openssh)

    with pytest.raises(ExternalError, match=f"127.0.0.1:{port}") as caught:
        await shell.upload(target, "x", b"x")

    assert caught.value.retryable is True


async def test_another_users_home_cannot_be_named(vm: Vm, shell: AsyncsshShell) -> None:
    with pytest.raises(ValueError):
        await shell.upload(vm.target(), "~root/x", b"x")


# run -----------------------------------------------------------------------------------------


async def test_run_returns_the_exit_status_and_output(vm: Vm, shell: AsyncsshShell) -> None:
    result = await shell.run(vm.target(), "printf 'one\\ntwo\\n'; exit 3", timeout=5)

    assert result == CommandResult(exit_status=3, output_tail="one\ntwo\n")
    assert vm.state.commands == ["printf 'one\\ntwo\\n'; exit 3"]


async def test_run_merges_standard_error_into_the_output(vm: Vm, shell: AsyncsshShell) -> None:
    result = await shell.run(vm.target(), "echo oops >&2; false", timeout=5)

    assert result == CommandResult(exit_status=1, output_tail="oops\n")


async def test_run_keeps_only_the_last_4_kib(vm: Vm, shell: AsyncsshShell) -> None:
    command = "head -c 200000 /dev/zero | tr '\\0' x; echo; echo END"

    result = await shell.run(vm.target(), command, timeout=10)

    assert result.exit_status == 0
    assert len(result.output_tail.encode()) == 4096
    assert result.output_tail.endswith("x\nEND\n")


async def test_run_gives_the_command_no_input(vm: Vm, shell: AsyncsshShell) -> None:
    result = await shell.run(vm.target(), "cat; echo done", timeout=5)

    assert result == CommandResult(exit_status=0, output_tail="done\n")


async def test_a_command_over_its_timeout_is_killed(vm: Vm, shell: AsyncsshShell) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(ExternalError, match=r"ran over 0\.3s and was killed") as caught:
        await shell.run(vm.target(), "echo started; sleep 30", timeout=0.3)

    assert loop.time() - started < 3
    assert caught.value.retryable is True
    await asyncio.wait_for(vm.state.killed.wait(), 5)


async def test_run_on_a_missing_vm_is_retryable(shell: AsyncsshShell) -> None:
    port = closed_port()
    target = SshTarget(host="127.0.0.1", port=port, private_key=generate_ed25519().private_openssh)

    with pytest.raises(
        ExternalError, match=re.escape(f"ssh root@127.0.0.1:{port} failed")
    ) as caught:
        await shell.run(target, "true", timeout=5)

    assert caught.value.retryable is True
