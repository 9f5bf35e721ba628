"""The CLI as its users expect (issue 14): help, exit statuses, JSON errors, colour, confirmation,
live progress and `status`, against a real `up` (its nats-server, SQLite, the local grid)."""

from __future__ import annotations

import argparse
import asyncio
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

import msgspec
import pytest

from core.contract import DeployVm, VmRef
from core.registry import OPERATIONS
from hero_deployer import VERSION, cli
from hero_deployer.app.natsserver import free_port
from hero_deployer.cli.main import build_parser
from hero_deployer.cli.parsing import operation_summary
from hero_deployer.cli.secret_input import (
    NEW_SECRET,
    NEW_SECRET_ENV,
    OLD_SECRET,
    SECRET_ENV,
    UsageError,
    resolve_secret,
)
from hero_deployer.cli.validation import readable
from tests.conftest import TOKEN, Service
from tests.helpers import arun_cli, run_cli, spawn_up

ANSI = "\x1b["


@dataclass
class Up:
    process: subprocess.Popen[str]
    env: dict[str, str]  # a user's environment: finds this `up` through its context file
    cwd: Path
    port: int

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`hero-deployer ARGS` with pipes for stdin, stdout and stderr (no terminal)."""
        return run_cli(*args, cwd=self.cwd, env={**self.env, **(env or {})})

    def json(self, *args: str) -> Any:
        done = self.cli(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def _user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERO_DEPLOYER_", "NO_COLOR"))}
    env.update(HOME=str(home), XDG_STATE_HOME=str(home / "state"), COLUMNS="250", TERM="xterm")
    return env


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """`up` whose users fail fast at wait_ssh (the local grid runs no SSH here): one second."""
    root = tmp_path_factory.mktemp("ux")
    env, port = _user_env(root), free_port()
    service_env = {
        **env,
        "HERO_DEPLOYER_LOCAL_DEPLOY_DELAY": "0.2",
        "HERO_DEPLOYER_LOCAL_SSH": "0",
        "HERO_DEPLOYER_STEP_DEADLINES": "wait_ssh=1",
        "HERO_DEPLOYER_STEP_RETRIES": "0",
    }
    process = spawn_up(root, service_env, port, stderr=subprocess.DEVNULL)
    try:
        yield Up(process, env, root, port)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


class Terminal:
    """The CLI with stdin, stdout and stderr on one pseudo-terminal, read as a person sees it."""

    def __init__(self, up: Up, *args: str, env: dict[str, str] | None = None) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hero_deployer", *args],
            cwd=up.cwd,
            env={**up.env, **(env or {})},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.screen = b""

    def _read(self, deadline: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
        try:
            chunk = os.read(self.master, 4096) if ready else b""
        except OSError:  # EIO: the process closed the terminal
            chunk = b""
        self.screen += chunk
        return bool(chunk)

    def expect(self, text: str) -> None:
        """Waits (30 s at most) until `text` is on the screen."""
        deadline = time.monotonic() + 30
        while text.encode() not in self.screen:
            assert self._read(deadline), f"no {text!r} on {self.screen!r}"

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def finish(self) -> tuple[int, str]:
        """The exit status and everything the terminal showed."""
        deadline = time.monotonic() + 60
        while self._read(deadline):
            pass
        code = self.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        os.close(self.master)
        return code, self.screen.decode().replace("\r\n", "\n")


# Help --------------------------------------------------------------------------------------


def _commands(
    parser: argparse.ArgumentParser, path: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser, str | None]]:
    """Every (sub)command: its path, its parser and its one-line summary in its parent's list."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                yield f"{path} {name}".strip(), child, summaries.get(name)
                yield from _commands(child, f"{path} {name}")


def test_every_command_has_a_summary_a_description_and_help_on_each_flag() -> None:
    commands = list(_commands(build_parser()))
    assert {"vms deploy", "vms delete", "users decommission", "status", "audit verify"} <= {
        path for path, _, _ in commands
    }
    for path, parser, summary in commands:
        assert summary and parser.description, path
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{path} {action.option_strings or action.dest}"


def test_the_vm_subcommands_are_the_registrys_rows_that_name_one_vm() -> None:
    commands = {path: (parser, summary) for path, parser, summary in _commands(build_parser())}
    rows = [op for op in OPERATIONS if issubclass(op.request, VmRef)]
    assert len(rows) == 5
    for op in rows:
        parser, summary = commands[f"vms {op.name.split('_')[0]}"]
        assert summary == operation_summary(op.request) and summary
        assert [a.dest for a in parser._actions if not a.option_strings] == ["sid"]
    verbs = {path.split()[1] for path in commands if path.startswith("vms ")}
    assert verbs == {"deploy", "list"} | {op.name.split("_")[0] for op in rows}


def test_flags_show_the_request_types_defaults_and_bounds(up: Up) -> None:
    deploy = up.cli("vms", "deploy", "--help").stdout
    fields = {f.name: f for f in msgspec.structs.fields(DeployVm)}
    assert fields["cpu_count"].default == 16
    assert "--cpu N               CPU cores (1 to 64, default: 16)" in deploy
    assert "(1 to 1024, default: 8)" in deploy and "(default: ubuntu-24.04)" in deploy
    assert "--wait-timeout SECONDS" in deploy and "(default: 3600.0)" in deploy
    assert "vm:<sid> or user:<name>" in up.cli("events", "--help").stdout
    for group in ("vms", "users", "events", "up", "status"):
        assert "examples:\n  hero-deployer " in up.cli(group, "--help").stdout, group


def test_up_help_lists_only_what_up_uses(up: Up) -> None:
    text = up.cli("up", "--help").stdout.split("examples:")[0]
    for flag in ("--data-dir", "--nats-port", "--backend", "--web-port", "--public-url"):
        assert flag in text
    for flag in ("--json", "--nats ", "--timeout", "--secret"):
        assert flag not in text


def test_version_and_the_exit_statuses_in_the_main_help(up: Up) -> None:
    version = up.cli("--version")
    assert (version.returncode, version.stdout) == (0, f"hero-deployer {VERSION}\n")
    text = up.cli("--help").stdout
    for code in (0, 1, 2, 65, 66, 69, 77):
        assert f"\n  {code:<3} " in text
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for code in (65, 66, 69, 77):
        assert f"| {code} |" in readme


# Exit statuses and errors ------------------------------------------------------------------


def test_each_class_of_error_has_its_exit_status_and_json_on_stderr(up: Up) -> None:
    sid = _running(up, "exit-1", "s")
    gone = free_port()
    cases = [
        (
            ["vms", "deploy", "not a name", "--secret", "s"],
            {},
            "InvalidInput",
            cli.EXIT_INVALID_INPUT,
        ),
        (["vms", "get", "vm_nope", "--secret", "s"], {}, "NotFound", cli.EXIT_NOT_FOUND),
        (["vms", "list", "--secret", "s"], {"HERO_DEPLOYER_TOKEN": "wrong"}, "Unauthorized", 77),
        (["health", "--nats", f"nats://127.0.0.1:{gone}"], {}, "Unavailable", 69),
        (["vms", "start", sid, "--secret", "s"], {}, "InvalidState", cli.EXIT_ERROR),
        (["vms", "list", "--secret", "s", "--bogus"], {}, "Usage", cli.EXIT_USAGE),
        (["vms", "list"], {}, "Usage", cli.EXIT_USAGE),  # no secret from any source
    ]
    for args, env, code, status in cases:
        text = up.cli(*args, env=env)
        assert text.returncode == status, (args, text.stderr)
        assert text.stdout == ""
        as_json = up.cli(*args, "--json", env=env)
        assert as_json.returncode == status, (args, as_json.stderr)
        (line,) = as_json.stderr.splitlines()  # one object, one line, nothing else
        error = json.loads(line)["error"]
        assert (error["code"], as_json.stdout) == (code, "")
        assert error["message"] and ANSI not in as_json.stderr
        if code != "Usage":
            assert text.stderr.splitlines() in (
                [f"error: {code}: {error['message']}"],
                [f"error: {error['message']}"],
            )
    assert {66: "NotFound", 69: "Unavailable", 77: "Unauthorized"} == {
        v: k for k, v in cli.EXIT_BY_CODE.items() if v in (66, 69, 77)
    }


def test_validation_messages_read_as_sentences(up: Up) -> None:
    named = up.cli("vms", "deploy", "not a name", "--secret", "s")
    assert (
        named.stderr == "error: InvalidInput: name: use 1 to 64 letters, digits, '.', '_' or '-'\n"
    )
    cpu = up.cli("vms", "deploy", "ok-name", "--secret", "s", "--cpu", "65", "--json")
    message = json.loads(cpu.stderr)["error"]["message"]
    assert message == "--cpu: use a whole number from 1 to 64"
    profile = up.cli("users", "provision", "carol", "--profile", "Not OK")
    assert profile.stderr.startswith("error: InvalidInput: --profile: use 1 to 32 lower-case")
    limit = up.cli("events", "--limit", "0")
    assert limit.stderr == "error: InvalidInput: --limit: use a whole number from 1 to 1000\n"
    for shown in (named.stderr, cpu.stderr, profile.stderr, limit.stderr):
        assert "regex" not in shown and "Expected" not in shown and "$." not in shown


def test_messages_the_cli_cannot_read_stay_as_they_are() -> None:
    assert readable("old_secret and new_secret are equal") == "old_secret and new_secret are equal"
    assert readable("Expected `int` >= 1 - at `$.unknown_field`").endswith("$.unknown_field`")
    reserved = "username is one of the names Forgejo reserves - at `$.username`"
    assert readable(reserved) == "username is one of the names Forgejo reserves"


def test_a_missing_secret_is_named_with_its_article(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(NEW_SECRET_ENV, raising=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    nothing = argparse.Namespace()
    with pytest.raises(UsageError, match=r"^migrate-secret needs an old secret: --old-secret-file"):
        resolve_secret(nothing, OLD_SECRET, what="migrate-secret")
    with pytest.raises(UsageError, match=r"^migrate-secret needs a new secret: --new-secret-file"):
        resolve_secret(nothing, NEW_SECRET, what="migrate-secret")


# Terminal or pipe ---------------------------------------------------------------------------


def test_plain_text_when_piped_or_no_color_and_colour_on_a_terminal(up: Up) -> None:
    up.json("vms", "deploy", "colour-1", "--secret", "c")
    piped = up.cli("vms", "list", "--secret", "c")
    assert piped.stdout.startswith("SID ") and "colour-1" in piped.stdout
    assert ANSI not in piped.stdout + piped.stderr
    assert ANSI not in up.cli("status").stdout

    terminal = Terminal(up, "vms", "list", "--secret", "c")
    code, screen = terminal.finish()
    assert code == 0 and "colour-1" in screen
    assert f"{ANSI}1mSID" in screen  # a bold header

    for no_color in ("1", "yes"):
        terminal = Terminal(up, "vms", "list", "--secret", "c", env={"NO_COLOR": no_color})
        code, screen = terminal.finish()
        assert code == 0 and "SID" in screen and "colour-1" in screen
        assert ANSI not in screen

    narrow = Terminal(up, "vms", "list", "--secret", "c", env={"COLUMNS": "100", "NO_COLOR": "1"})
    code, screen = narrow.finish()
    assert code == 0 and "…" in screen  # cut to the terminal's width
    assert max(len(line) for line in screen.splitlines()) <= 100
    assert max(len(line) for line in piped.stdout.splitlines()) > 100  # piped: never cut

    terminal = Terminal(up, "vms", "get", "vm_nope", "--secret", "c")
    code, screen = terminal.finish()
    assert code == cli.EXIT_NOT_FOUND
    assert f"{ANSI}31merror:{ANSI}0m NotFound: vm not found" in screen


# Confirmation -------------------------------------------------------------------------------


def test_delete_asks_on_a_terminal_and_needs_yes_elsewhere(up: Up) -> None:
    sid = _running(up, "doomed-1", "d")

    refused = up.cli("vms", "delete", sid, "--secret", "d")
    assert refused.returncode == cli.EXIT_USAGE
    assert refused.stderr == (
        "error: vms delete asks for confirmation on a terminal: pass --yes to go ahead\n"
    )
    no = Terminal(up, "vms", "delete", sid, "--secret", "d")
    no.expect(f"Delete VM doomed-1 ({sid}, running)? [y/N] ")
    no.type("n")
    code, screen = no.finish()
    assert code == cli.EXIT_ERROR and "cancelled: nothing was done" in screen
    assert up.json("vms", "get", sid, "--secret", "d")["status"] == "running"

    yes = Terminal(up, "vms", "delete", sid, "--secret", "d")
    yes.expect("[y/N] ")
    yes.type("y")
    code, screen = yes.finish()
    assert code == 0, screen
    assert up.json("vms", "get", sid, "--secret", "d")["status"] in ("deleting", "deleted")

    other = _running(up, "doomed-2", "d")
    scripted = up.cli("vms", "delete", other, "--secret", "d", "--yes", "--json")
    assert scripted.returncode == 0, scripted.stderr
    assert json.loads(scripted.stdout)["status"] == "deleting"


# Live progress -------------------------------------------------------------------------------


def test_deploy_wait_shows_the_deploy_live_then_the_vm(up: Up) -> None:
    waited = up.cli("vms", "deploy", "waited-1", "--secret", "w", "--cpu", "2", "--wait")
    assert waited.returncode == 0, waited.stderr
    lines = waited.stdout.splitlines()
    assert lines[0].startswith("deploying waited-1 (vm_") and "2 CPU" in lines[0]
    assert lines[1].split()[:2] == ["deploy", "done"] and "node " in lines[1]
    assert lines[2].startswith("SID") and " running " in lines[3]

    as_json = up.cli("vms", "deploy", "waited-2", "--secret", "w", "--wait", "--json")
    assert as_json.returncode == 0, as_json.stderr
    *events, vm = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [e["type"] for e in events] == ["VmDeployRequested", "VmDeployed"]
    assert vm["status"] == "running" and vm["sid"] == events[0]["data"]["sid"]


def test_decommission_asks_then_waits_with_live_progress(up: Up) -> None:
    failed = up.cli("users", "provision", "dora")  # wait_ssh fails after a second here
    assert failed.returncode == cli.EXIT_ERROR
    assert " FAILED " in failed.stdout and "error: dora failed at wait_ssh" in failed.stderr
    assert up.cli("users", "decommission", "dora").returncode == cli.EXIT_USAGE
    assert up.json("users", "get", "dora")["status"] == "failed"

    terminal = Terminal(up, "users", "decommission", "dora", "--wait")
    terminal.expect("Decommission dora (failed): delete its VM and gateway? [y/N] ")
    terminal.type("yes")
    code, screen = terminal.finish()
    assert code == 0, screen
    assert "decommissioning dora, following its events" in screen
    assert "UserVmDeleted" in screen and "GatewayDeleted" in screen
    assert screen.rstrip().endswith("dora is decommissioned")


# status ---------------------------------------------------------------------------------------


def test_status_says_where_the_service_is_and_what_it_runs(up: Up) -> None:
    health = up.json("health")
    status = up.json("status")
    assert status["url"] == f"nats://127.0.0.1:{up.port}"
    assert (status["version"], status["backend"], status["checked_by"]) == (
        VERSION,
        "local",
        "service",
    )
    assert status["position"] >= health["position"]
    assert {p["name"]: p["state"] for p in status["parts"]} == {"backend": "ok", "forge": "missing"}
    lines = up.cli("status").stdout.splitlines()
    assert lines[0].startswith(f"server    nats://127.0.0.1:{up.port}  (prefix hero.v1")
    assert f"version   {VERSION}" in lines and any(line.startswith("position  ") for line in lines)
    assert any(line.startswith("backend   local  ok  ") for line in lines)
    assert any(line.startswith("forge     missing  No Forge is configured") for line in lines)


async def test_status_checks_here_when_the_service_reports_no_parts(
    nats_url: str, nc: Any, tmp_path: Path
) -> None:
    """An older service's health has no parts: `backend check` runs where the CLI is."""

    async def answer(msg: Any) -> None:
        result = {"status": "ok", "version": "0.0.9", "position": 7}
        await nc.publish(msg.reply, json.dumps({"ok": True, "result": result}).encode())

    sub = await nc.subscribe("older.v1.health", cb=answer)
    await nc.flush()
    env = {**_user_env(tmp_path), "HERO_DEPLOYER_TOKEN": TOKEN, "HERO_DEPLOYER_PREFIX": "older.v1"}
    code, stdout, stderr = await arun_cli(
        "status", "--nats", nats_url, "--json", cwd=tmp_path, env=env
    )
    await sub.unsubscribe()
    assert code == 0, stderr
    status = json.loads(stdout)
    assert (status["version"], status["position"], status["checked_by"]) == ("0.0.9", 7, "cli")
    parts = {p["name"]: p for p in status["parts"]}
    assert parts["check"]["state"] == "ok" and parts["forge"]["state"] == "missing"


def _running(up: Up, name: str, secret: str) -> str:
    """Deploys a VM and waits (`--wait`) until it runs; returns its sid."""
    deployed = up.cli("vms", "deploy", name, "--secret", secret, "--wait")
    assert deployed.returncode == 0, deployed.stderr
    sid = deployed.stdout.split()[2].rstrip(":").lstrip("(")  # "deploying NAME (SID: …)"
    assert up.json("vms", "get", sid, "--secret", secret)["status"] == "running"
    return sid


async def test_deploy_wait_ends_with_the_backends_failure(
    service: Service, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    service.grid.fail_next("deploy_vm", "node 13 has no capacity left")
    monkeypatch.setenv("HERO_DEPLOYER_TOKEN", TOKEN)
    monkeypatch.setenv("HERO_DEPLOYER_PREFIX", service.settings.prefix)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))  # no `up` of this machine is found
    args = ["vms", "deploy", "unlucky", "--secret", "u", "--wait", "--nats", nats_url]
    status = await asyncio.to_thread(cli.main, args)
    out, err = capsys.readouterr()
    assert status == cli.EXIT_ERROR
    lines = out.splitlines()
    assert lines[0].startswith("deploying unlucky (vm_")
    assert lines[1].split()[:2] == ["deploy", "FAILED"]
    assert lines[1].endswith("node 13 has no capacity left")
    assert " failed " in lines[3] and "node 13 has no capacity left" in lines[3]
    assert err == "error: unlucky failed to deploy: node 13 has no capacity left\n"
