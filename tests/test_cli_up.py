"""`hero-deployer up` as an operator runs it: a real process with its own nats-server."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hero_deployer.app.natsserver import free_port, nats_server_binary


def _cli(*args: str, data_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hero_deployer",
            *args,
            "--data-dir",
            str(data_dir),
            "--nats",
            f"nats://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERO_DEPLOYER_")}
    env["HERO_DEPLOYER_LOCAL_DEPLOY_DELAY"] = "0"
    env["HERO_DEPLOYER_LOCAL_SSH"] = "0"
    env["XDG_STATE_HOME"] = str(tmp_path / "state")  # where `up` records itself for the CLI
    return env


def _up(tmp_path: Path, data_dir: Path, port: int, web_port: int = 0) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "hero_deployer", "up", "--data-dir", str(data_dir)]
    command += ["--nats-port", str(port), "--web-port", str(web_port)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path)
    )


def test_up_serves_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o755)
    (data_dir / "notes.txt").write_text("left readable by an earlier version\n")
    (data_dir / "notes.txt").chmod(0o644)
    port = free_port()
    web_port = free_port()
    process = _up(tmp_path, data_dir, port, web_port)
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        assert "ready" in ready, ready + (process.stderr.read() if process.stderr else "")

        token = (data_dir / "token").read_text().strip()
        assert len(token) >= 43  # 32 random bytes, URL-safe
        assert (data_dir / "token").stat().st_mode & 0o777 == 0o600

        health = _cli("health", "--json", data_dir=data_dir, port=port)
        assert health.returncode == 0, health.stderr
        assert json.loads(health.stdout)["status"] == "ok"

        deployed = _cli(
            "vms", "deploy", "web-1", "--secret", "s3cret", "--json", data_dir=data_dir, port=port
        )
        assert deployed.returncode == 0, deployed.stderr
        sid = json.loads(deployed.stdout)["sid"]

        listed = _cli("vms", "list", "--secret", "s3cret", data_dir=data_dir, port=port)
        assert sid in listed.stdout and "web-1" in listed.stdout
        assert "SID" in listed.stdout.splitlines()[0]

        missing = _cli("vms", "get", "vm_nope", "--secret", "s3cret", data_dir=data_dir, port=port)
        assert missing.returncode != 0
        assert missing.stderr.strip() == "error: NotFound: vm not found"

        login = httpx.get(f"http://127.0.0.1:{web_port}/login", timeout=10)
        assert login.status_code == 200 and 'name="token"' in login.text
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0, process.stderr.read() if process.stderr else ""
    assert not _listening(port), "the embedded nats-server must stop with the service"
    assert not _listening(web_port), "the dashboard must stop with the service"
    assert (data_dir / "events.db").exists()
    _assert_owner_only(data_dir)


def _assert_owner_only(data_dir: Path) -> None:
    """The data dir is 0700, every file directly in it 0600, nothing below open to others."""
    assert data_dir.stat().st_mode & 0o777 == 0o700
    top = {p.name: p.stat().st_mode & 0o777 for p in data_dir.iterdir() if p.is_file()}
    expected = {"token", "service.nk", "client.nk", "nats-server.conf", "events.db", "views.db"}
    assert expected <= set(top), sorted(top)
    assert {name: mode for name, mode in top.items() if mode != 0o600} == {}
    for root, dirs, files in os.walk(data_dir):
        for name in (*dirs, *files):
            assert Path(root, name).lstat().st_mode & 0o077 == 0, Path(root, name)


@pytest.fixture
def taken_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A loopback port that a foreign process listens on: a bare socket, or a nats-server."""
    port = free_port()
    if request.param == "socket":
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))
            listener.listen()
            yield port
        return
    # issue 11: `up` used to join an anonymous nats-server there, and two services answered
    server = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        for line in server.stderr:  # it says when it listens
            if "Server is ready" in line:
                break
        yield port
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize("taken_port", ["socket", "nats-server"], indirect=True)
def test_up_on_a_taken_port_exits_with_one_line_and_starts_nothing(
    tmp_path: Path, taken_port: int
) -> None:
    data_dir = tmp_path / "var"
    process = _up(tmp_path, data_dir, taken_port)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    assert len(stderr.splitlines()) == 1, stderr
    assert str(taken_port) in stderr and "in use" in stderr
    assert "ready" not in stdout
    assert not (data_dir / "events.db").exists()


def _children(pid: int) -> list[int]:
    """The pids of `pid`'s children (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _nats_server_of(up: subprocess.Popen[str]) -> int:
    (pid,) = [
        p for p in _children(up.pid) if "nats-server" in Path(f"/proc/{p}/cmdline").read_text()
    ]
    return pid


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 0), (signal.SIGTERM, 0)]
)
def test_the_nats_server_of_up_never_outlives_it(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    port = free_port()
    process = _up(tmp_path, tmp_path / "var", port)
    try:
        assert process.stdout is not None
        assert "ready" in process.stdout.readline()
        nats_pid = _nats_server_of(process)
        pidfd = os.pidfd_open(nats_pid)  # before the kill: it cannot name another process later
    finally:
        process.send_signal(sig)
    try:
        assert process.wait(30) == code
        readable, _, _ = select.select([pidfd], [], [], 10)  # readable once it has exited
        if not readable:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # leave no orphan behind
        assert readable == [pidfd], "the nats-server outlived `up`"
    finally:
        os.close(pidfd)
    assert not _listening(port)
