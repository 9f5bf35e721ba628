"""The CLI beside a running `up`: found from any directory, one line when nothing runs, and
secrets from a file, a variable or a terminal prompt instead of the command line (issue 11)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from hero_deployer.app import context
from hero_deployer.app.context import Context
from hero_deployer.app.natsserver import free_port
from hero_deployer.app.settings import Settings
from hero_deployer.cli import EXIT_UNAUTHORIZED, EXIT_UNAVAILABLE
from tests.conftest import TOKEN
from tests.helpers import arun_cli, run_cli, spawn_up

SECRET_WAYS = ("--secret-file FILE", "HERO_DEPLOYER_SECRET", "a prompt on a terminal")


# A real `up`, and the CLI run as a user would ---------------------------------------------------


@dataclass
class Up:
    process: subprocess.Popen[str]
    cwd: Path  # where `up` was started, with its default relative ./var
    state: Path  # XDG_STATE_HOME of this test's user
    env: dict[str, str]  # the user's environment: no HERO_DEPLOYER_* settings at all
    port: int

    def cli(
        self, *args: str, cwd: Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Runs `hero-deployer ARGS` in `cwd` with no terminal on stdin."""
        return run_cli(*args, cwd=cwd, env={**self.env, **(env or {})})


def user_env(home: Path) -> dict[str, str]:
    """The environment of a user whose home and state dir are `home`: no HERO_DEPLOYER_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERO_DEPLOYER_")}
    env.update(HOME=str(home), XDG_STATE_HOME=str(home / "state"))
    return env


def start_up(root: Path) -> Up:
    """`hero-deployer up` started in `root/service` with the default data dir (./var)."""
    cwd, home = root / "service", root / "home"
    cwd.mkdir()
    home.mkdir()
    env = user_env(home)
    port = free_port()
    service_env = {**env, "HERO_DEPLOYER_LOCAL_DEPLOY_DELAY": "0", "HERO_DEPLOYER_LOCAL_SSH": "0"}
    process = spawn_up(cwd, service_env, port)
    return Up(process, cwd, home / "state", env, port)


def stop(up: Up) -> int:
    up.process.send_signal(signal.SIGTERM)
    return up.process.wait(30)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    service = start_up(tmp_path_factory.mktemp("up"))
    try:
        yield service
    finally:
        assert stop(service) == 0


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A directory unrelated to the service's, as a user's shell would be in."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


def names(listed: subprocess.CompletedProcess[str]) -> list[str]:
    assert listed.returncode == 0, listed.stderr
    return [vm["name"] for vm in json.loads(listed.stdout)]


# From any directory -------------------------------------------------------------------------


def test_the_cli_finds_up_from_another_directory(up: Up, elsewhere: Path) -> None:
    secret_file = elsewhere / "secret"
    secret_file.write_text("far-away\n")  # the final line break is not part of the secret
    deployed = up.cli("vms", "deploy", "far-1", "--secret-file", str(secret_file), cwd=elsewhere)
    assert deployed.returncode == 0, deployed.stderr
    assert "far-1" in deployed.stdout

    by_env = up.cli(
        "vms", "list", "--json", cwd=elsewhere, env={"HERO_DEPLOYER_SECRET": "far-away"}
    )
    assert names(by_env) == ["far-1"]
    by_flag = up.cli("vms", "list", "--json", "--secret", "far-away", cwd=elsewhere)
    assert names(by_flag) == ["far-1"]
    assert list(elsewhere.iterdir()) == [secret_file]  # no ./var made where the CLI ran


def test_up_records_an_absolute_data_dir_and_forgets_it_on_exit(tmp_path: Path) -> None:
    service = start_up(tmp_path)
    try:
        (path,) = (service.state / "hero-deployer").iterdir()
        found = json.loads(path.read_text())
        assert found["data_dir"] == str(service.cwd / "var")  # up ran with the relative ./var
        assert found["nats_url"] == f"nats://127.0.0.1:{service.port}"
        assert found["pid"] == service.process.pid
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert service.cli("vms", "deploy", "f-1", "--no-secret", cwd=tmp_path).returncode == 0
        follow = subprocess.Popen(
            [sys.executable, "-m", "hero_deployer", "events", "--follow"],
            cwd=tmp_path,
            env=service.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert follow.stdout is not None
        assert "VmDeployRequested" in follow.stdout.readline()  # it follows the service
    finally:
        assert stop(service) == 0
    assert list((service.state / "hero-deployer").iterdir()) == []
    _, stderr = follow.communicate(timeout=30)
    assert follow.returncode == EXIT_UNAVAILABLE
    assert stderr.splitlines() == [f"error: lost the connection to nats://127.0.0.1:{service.port}"]

    url = f"nats://127.0.0.1:{service.port}"
    after = service.cli("health", "--nats", url, cwd=tmp_path)
    assert after.returncode == EXIT_UNAVAILABLE
    assert after.stderr.splitlines() == [
        f'error: no hero-deployer at {url} (is "hero-deployer up" running?)'
    ]


def test_flags_and_variables_point_the_cli_elsewhere(up: Up, elsewhere: Path) -> None:
    port = free_port()  # nothing listens there
    for how in (["--nats", f"nats://127.0.0.1:{port}"], []):
        env = {} if how else {"HERO_DEPLOYER_NATS_URL": f"nats://127.0.0.1:{port}"}
        result = up.cli("health", *how, cwd=elsewhere, env=env)
        assert result.returncode == EXIT_UNAVAILABLE
        assert result.stderr.splitlines() == [
            f'error: no hero-deployer at nats://127.0.0.1:{port} (is "hero-deployer up" running?)'
        ]


# Failing fast -------------------------------------------------------------------------------


def test_with_no_service_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    port = free_port()
    env.update(HERO_DEPLOYER_NATS_URL=f"nats://127.0.0.1:{port}", HERO_DEPLOYER_TOKEN=TOKEN)
    result = run_cli("health", cwd=tmp_path, env=env)
    assert result.returncode == EXIT_UNAVAILABLE
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f'error: no hero-deployer at nats://127.0.0.1:{port} (is "hero-deployer up" running?)'
    ]


def test_a_nats_without_the_service_is_one_line(nats_url: str, tmp_path: Path) -> None:
    env = user_env(tmp_path)
    env.update(HERO_DEPLOYER_TOKEN=TOKEN, HERO_DEPLOYER_PREFIX="nobody-here.v1")
    result = run_cli("health", "--nats", nats_url, "--timeout", "0.5", cwd=tmp_path, env=env)
    assert result.returncode == EXIT_UNAVAILABLE
    assert result.stderr.splitlines() == [
        "error: Unavailable: no hero-deployer is answering on NATS"
    ]


async def test_a_request_that_times_out_is_one_line(nats_url: str, nc: Any, tmp_path: Path) -> None:
    silent = await nc.subscribe("hung.v1.health")  # takes the request, never answers
    await nc.flush()
    env = {**user_env(tmp_path), "HERO_DEPLOYER_TOKEN": TOKEN, "HERO_DEPLOYER_PREFIX": "hung.v1"}
    code, _, stderr = await arun_cli(
        "health", "--nats", nats_url, "--timeout", "0.2", cwd=tmp_path, env=env
    )
    await silent.unsubscribe()
    assert code == EXIT_UNAVAILABLE
    assert stderr.splitlines() == ["error: Unavailable: health timed out after 0.2s"]


def test_without_a_token_one_line_and_no_file_made(nats_url: str, tmp_path: Path) -> None:
    result = run_cli("health", "--nats", nats_url, cwd=tmp_path, env=user_env(tmp_path))
    assert result.returncode == EXIT_UNAUTHORIZED
    assert result.stderr.splitlines() == [
        f"error: no token at {tmp_path / 'var' / 'token'}: set HERO_DEPLOYER_TOKEN or --data-dir"
    ]
    assert not (tmp_path / "var").exists()  # the CLI used to create ./var/token here


# Secrets off the command line ---------------------------------------------------------------


def test_deploy_without_a_secret_is_a_usage_error_and_deploys_nothing(
    up: Up, elsewhere: Path
) -> None:
    refused = up.cli("vms", "deploy", "open-1", cwd=elsewhere)
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert line.startswith("error: vms deploy needs a secret: ")
    assert all(way in line for way in SECRET_WAYS) and "--no-secret" in line
    assert "open-1" not in names(up.cli("vms", "list", "--json", "--no-secret", cwd=elsewhere))

    empty = elsewhere / "empty"
    empty.write_text("\n")
    for how in (["--secret-file", str(empty)], ["--secret", ""]):
        result = up.cli("vms", "deploy", "open-1", *how, cwd=elsewhere)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            "error: vms deploy: the secret is empty; --no-secret means none"
        ]
    assert "open-1" not in names(up.cli("vms", "list", "--json", "--no-secret", cwd=elsewhere))

    deployed = up.cli("vms", "deploy", "open-1", "--no-secret", "--json", cwd=elsewhere)
    assert deployed.returncode == 0, deployed.stderr
    assert "open-1" in names(up.cli("vms", "list", "--json", "--no-secret", cwd=elsewhere))


def test_a_secret_file_may_be_stdin_and_an_unreadable_one_is_one_line(
    up: Up, elsewhere: Path
) -> None:
    deployed = up.cli("vms", "deploy", "piped-1", "--secret", "from-a-pipe", cwd=elsewhere)
    assert deployed.returncode == 0, deployed.stderr
    piped = run_cli(
        "vms",
        "list",
        "--json",
        "--secret-file",
        "-",
        cwd=elsewhere,
        env=up.env,
        input="from-a-pipe\n",
    )
    assert names(piped) == ["piped-1"]

    missing = elsewhere / "missing"
    unreadable = up.cli("vms", "list", "--secret-file", str(missing), cwd=elsewhere)
    assert unreadable.returncode == 2
    assert unreadable.stderr.splitlines() == [
        f"error: cannot read the secret file {missing}: No such file or directory"
    ]
    binary = elsewhere / "binary"
    binary.write_bytes(b"\xff\xfe")
    refused = up.cli("vms", "list", "--secret-file", str(binary), cwd=elsewhere)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [f"error: the secret file {binary} is not UTF-8 text"]


@pytest.mark.parametrize("action", ["list", "get", "stop", "delete"])
def test_other_vm_commands_without_a_secret_name_the_three_ways(
    up: Up, elsewhere: Path, action: str
) -> None:
    args = ["vms", action] + ([] if action == "list" else ["vm_0123"])
    result = up.cli(*args, cwd=elsewhere)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: vms {action} needs a secret: ")
    assert all(way in line for way in SECRET_WAYS)


def test_the_readme_way_secret_in_the_environment_new_one_in_a_file(
    up: Up, elsewhere: Path
) -> None:
    (elsewhere / "old").write_text("mig-old\n")
    (elsewhere / "new").write_text("mig-new\n")
    old_file = ["--secret-file", str(elsewhere / "old")]
    deployed = up.cli("vms", "deploy", "mig-1", *old_file, "--json", cwd=elsewhere)
    assert deployed.returncode == 0, deployed.stderr
    sid = json.loads(deployed.stdout)["sid"]
    old_env = {"HERO_DEPLOYER_SECRET": "mig-old"}
    stopped = up.cli("vms", "stop", sid, "--json", cwd=elsewhere, env=old_env)
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["sid"] == sid

    missing = up.cli("migrate-secret", cwd=elsewhere, env=old_env)
    assert missing.returncode == 2
    (line,) = missing.stderr.splitlines()
    assert "needs a new secret" in line and "HERO_DEPLOYER_NEW_SECRET" in line

    new_file = ["--new-secret-file", str(elsewhere / "new")]
    migrated = up.cli("migrate-secret", *new_file, cwd=elsewhere, env=old_env)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.strip() == "migrated 1 vms"
    listed = up.cli("vms", "list", "--json", "--secret-file", str(elsewhere / "new"), cwd=elsewhere)
    assert names(listed) == ["mig-1"]


class Terminal:
    """The CLI with a real pseudo-terminal on stdin (no controlling terminal: getpass uses it)."""

    def __init__(self, up: Up, cwd: Path, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hero_deployer", *args],
            cwd=cwd,
            env=up.env,
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        os.close(slave)
        self.prompts = b""

    def answer(self, prompt: bytes, text: str) -> None:
        """Waits for `prompt` on stderr (getpass flushes earlier input), then types `text`."""
        assert self.process.stderr is not None
        deadline = time.monotonic() + 30
        while not self.prompts.endswith(prompt):
            ready, _, _ = select.select([self.process.stderr], [], [], deadline - time.monotonic())
            chunk = os.read(self.process.stderr.fileno(), 1024) if ready else b""
            assert chunk, f"no prompt {prompt!r}; got {self.prompts!r}"
            self.prompts += chunk
        os.write(self.master, text.encode() + b"\n")

    def finish(self) -> tuple[int, str, str]:
        stdout, stderr = self.process.communicate(timeout=60)
        os.close(self.master)
        return self.process.returncode, stdout.decode(), (self.prompts + stderr).decode()


def test_on_a_terminal_the_cli_prompts_for_the_secret(up: Up, elsewhere: Path) -> None:
    terminal = Terminal(up, elsewhere, "vms", "deploy", "typed-1", "--json")
    terminal.answer(b"secret: ", "typed-secret")
    code, stdout, stderr = terminal.finish()
    assert code == 0, stderr
    assert json.loads(stdout)["name"] == "typed-1"
    assert "typed-secret" not in stdout + stderr  # not echoed

    terminal = Terminal(up, elsewhere, "migrate-secret")
    terminal.answer(b"old secret: ", "typed-secret")
    terminal.answer(b"new secret: ", "typed-new")
    terminal.answer(b"new secret again: ", "typed-new")
    code, stdout, stderr = terminal.finish()
    assert code == 0, stderr
    assert stdout.strip() == "migrated 1 vms"
    by_env = up.cli(
        "vms", "list", "--json", cwd=elsewhere, env={"HERO_DEPLOYER_SECRET": "typed-new"}
    )
    assert names(by_env) == ["typed-1"]


def test_a_new_secret_typed_twice_differently_changes_nothing(up: Up, elsewhere: Path) -> None:
    deployed = up.cli("vms", "deploy", "twice-1", "--secret", "twice-old", cwd=elsewhere)
    assert deployed.returncode == 0, deployed.stderr
    terminal = Terminal(up, elsewhere, "migrate-secret")
    terminal.answer(b"old secret: ", "twice-old")
    terminal.answer(b"new secret: ", "twice-new")
    terminal.answer(b"new secret again: ", "twice-nwe")
    code, stdout, stderr = terminal.finish()
    assert (code, stdout) == (2, "")
    assert stderr.splitlines()[-1] == "error: the two new secrets differ"
    listed = up.cli("vms", "list", "--json", "--secret", "twice-old", cwd=elsewhere)
    assert names(listed) == ["twice-1"]


# The pieces ---------------------------------------------------------------------------------


def test_the_state_dir_follows_the_xdg_rules(tmp_path: Path) -> None:
    home = Path.home()
    assert context.state_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "hero-deployer"
    assert context.state_dir({"XDG_STATE_HOME": "relative/x"}) == (
        home / ".local" / "state" / "hero-deployer"
    )  # a relative XDG_STATE_HOME is invalid (XDG base directory spec)
    assert context.state_dir({}) == home / ".local" / "state" / "hero-deployer"


def _context(pid: int, port: int, started: str = "") -> Context:
    return Context(
        data_dir=f"/data/{port}",
        nats_url=f"nats://127.0.0.1:{port}",
        prefix="hero.v1",
        pid=pid,
        started=started,
    )


def _gone_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait(10)
    return child.pid


def test_only_contexts_of_running_processes_are_found(tmp_path: Path) -> None:
    me = context.current(Settings(data_dir=Path("rel"), nats_url="nats://127.0.0.1:5001"))
    assert me.pid == os.getpid() and Path(me.data_dir).is_absolute()
    context.record(me, tmp_path)
    context.record(_context(_gone_pid(), 5002), tmp_path)
    context.record(_context(os.getpid(), 5003, started="1"), tmp_path)  # pid reused since
    assert context.live(tmp_path) == [me]


def test_find_picks_the_context_at_the_url_else_the_default_one(tmp_path: Path) -> None:
    assert context.find(None, tmp_path) is None
    other = _context(os.getpid(), 5004)
    context.record(other, tmp_path)
    assert context.find(None, tmp_path) == other  # the only one
    default = _context(os.getpid(), 4222)
    context.record(default, tmp_path)
    assert context.find(None, tmp_path) == default
    assert context.find("nats://localhost:5004", tmp_path) == other
    assert context.find("nats://127.0.0.1:5005", tmp_path) is None


def test_a_context_is_removed_only_by_its_own_process(tmp_path: Path) -> None:
    mine = _context(os.getpid(), 5006)
    with context.recorded(mine, tmp_path) as path:
        assert path is not None and context.live(tmp_path) == [mine]
        context.remove(path, pid=mine.pid + 1)
        assert path.exists()
    assert not path.exists()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with capture_logs() as logs, context.recorded(mine, blocked / "sub") as nowhere:
        assert nowhere is None  # the service runs on regardless, and says why it cannot be found
    assert [entry["event"] for entry in logs] == ["context.unrecorded"]


def test_settings_take_flags_then_variables_then_the_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("HERO_DEPLOYER_"):
            monkeypatch.delenv(name)
    found = _context(1, 5007).settings()
    settings = Settings.load(found=found)
    assert (settings.data_dir, settings.nats_url) == (Path("/data/5007"), "nats://127.0.0.1:5007")
    monkeypatch.setenv("HERO_DEPLOYER_PREFIX", "env.v1")
    monkeypatch.setenv("HERO_DEPLOYER_DATA_DIR", "rel")
    settings = Settings.load({"prefix": "flag.v1"}, found=found)
    assert settings.prefix == "flag.v1"
    assert settings.data_dir == tmp_path / "rel"  # absolute, from the variable
    assert settings.nats_url == "nats://127.0.0.1:5007"
    monkeypatch.setenv("HERO_DEPLOYER_NATS_PORT", "5008")  # a port given is a URL given
    assert Settings.load(found=found).nats_url == "nats://127.0.0.1:5008"
