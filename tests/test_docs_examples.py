"""Runs the examples of docs/api.md and docs/testing.md against a real service, so they cannot rot.

A fenced block whose first line is `# doc-example` is an example. The ```python ones of a page run
in order in one namespace, with top-level await, after the environment a reader would have
(`NATS_URL`, `HERO_DEPLOYER_TOKEN`, `HERO_DEPLOYER_PREFIX`) points at the test service; `client`
is injected too. The ```sh ones hold `nats req`, `nats sub` and `hero-deployer` commands: each is
carried out against the same service (nats-py speaks for the `nats` CLI, `hero_deployer.cli.main`
runs in-process) and checked against the comment lines under it.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import io
import json
import linecache
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core.errors import ERRORS_BY_CODE
from hero_deployer import cli
from tests.conftest import TOKEN, Service

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ("api.md", "testing.md")
MARKER = "# doc-example"
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```\s*$", re.M | re.S)
DOC_PREFIX = "hero.v1"


@dataclass
class Block:
    page: str
    line: int
    lang: str
    body: str

    @property
    def marked(self) -> bool:
        return self.body.lstrip().startswith(MARKER)

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    text = (DOCS / page).read_text(encoding="utf-8")
    return [
        Block(page, text.count("\n", 0, m.start()) + 1, m["lang"], m["body"])
        for m in FENCE.finditer(text)
    ]


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_is_an_example(page: str) -> None:
    found = blocks(page)
    python = [b for b in found if b.lang == "python"]
    assert python, f"docs/{page} has no Python examples"
    assert [b.where for b in python if not b.marked] == []
    assert any(b.lang == "sh" and b.marked for b in found), f"docs/{page} has no shell examples"


# Python ----------------------------------------------------------------------------------


async def run_python(block: Block, namespace: dict[str, Any], fixtures: dict[str, Any]) -> None:
    """Runs the block; a `test_*` function it defines is then called with the fixtures."""
    before = set(namespace)
    filename = f"docs/{block.page}"
    source = "\n" * block.line + block.body  # line numbers as in the page
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    code = compile(source, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)
    if asyncio.iscoroutine(result):
        await result
    for name in sorted(set(namespace) - before):
        test = namespace[name]
        if name.startswith("test_") and inspect.iscoroutinefunction(test):
            wanted = inspect.signature(test).parameters
            await test(**{p: fixtures[p] for p in wanted})


# Shell -----------------------------------------------------------------------------------


@dataclass
class Command:
    line: str
    expect: list[str] = field(default_factory=list)


def commands(block: Block) -> list[Command]:
    """Commands (backslash continuations joined) with the comment lines that follow each."""
    found: list[Command] = []
    for raw in block.body.replace("\\\n", " ").splitlines()[1:]:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if found:
                found[-1].expect.append(line.lstrip("#").strip())
            continue
        found.append(Command(line))
    return found


def _doc_subject(subject: str, prefix: str) -> str:
    assert subject.startswith(DOC_PREFIX + "."), subject
    return prefix + subject[len(DOC_PREFIX) :]


def _parse_nats(tokens: list[str]) -> tuple[str, list[str], dict[str, str]]:
    """(verb, positional arguments, headers) of a `nats` CLI command line."""
    verb, args, headers = tokens[1], [], {}
    rest = iter(tokens[2:])
    for token in rest:
        if token in ("-H", "--header"):
            name, _, value = next(rest).partition(":")
            headers[name.strip()] = value.strip()
        elif token in ("-s", "--server", "--timeout"):
            next(rest)
        elif token.startswith("-"):
            raise AssertionError(f"flag {token} is not understood by the doc runner")
        else:
            args.append(token)
    return verb, args, headers


class ShellRunner:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.previous_reply: Any = None

    async def run(self, block: Block) -> None:
        for command in commands(block):
            tokens = shlex.split(os.path.expandvars(command.line))
            where = f"{block.where}: {command.line}"
            if tokens[0] == "nats":
                await self.nats(tokens, command.expect, where)
            elif tokens[0] == "hero-deployer":
                await self.hero_deployer(tokens, command.expect, where)
            else:
                raise AssertionError(f"{where}: the doc runner cannot run {tokens[0]!r}")

    async def nats(self, tokens: list[str], expect: list[str], where: str) -> None:
        verb, args, headers = _parse_nats(tokens)
        prefix = self.service.settings.prefix
        if verb in ("req", "request"):
            subject = _doc_subject(args[0], prefix)
            body = args[1].encode() if len(args) > 1 else b""
            msg = await self.service.nc.request(subject, body, timeout=10, headers=headers or None)
            reply = json.loads(msg.data)
            shown = " ".join(expect)
            ok = re.search(r'"ok":(true|false)', shown)
            assert ok, f"{where}: the comment must show the reply"
            assert reply["ok"] is (ok[1] == "true"), f"{where}: {reply}"
            code = re.search(r'"code":"(\w+)"', shown)
            if code:
                assert reply["error"]["code"] == code[1], f"{where}: {reply}"
            if "the same reply" in shown:
                assert reply == self.previous_reply, where
            self.previous_reply = reply
        elif verb in ("sub", "subscribe"):
            sub = await self.service.nc.subscribe(_doc_subject(args[0], prefix))
            await self.service.nc.flush()
            await self.service.client.call("deploy_vm", {"name": "sub-probe", "secret": "probe"})
            msg = await sub.next_msg(timeout=10)
            event = json.loads(msg.data)
            assert set(event) == {"position", "stream", "version", "type", "data", "recorded_at"}
            await sub.unsubscribe()
        else:
            raise AssertionError(f"{where}: `nats {verb}` is not understood by the doc runner")

    async def hero_deployer(self, tokens: list[str], expect: list[str], where: str) -> None:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = await asyncio.to_thread(cli.main, tokens[1:])
        for line in expect:
            if not line.startswith("→"):
                continue
            wanted = line.removeprefix("→").strip()
            if wanted in ERRORS_BY_CODE:
                assert status == cli.EXIT_BY_CODE.get(wanted, cli.EXIT_ERROR), (
                    f"{where}: exit {status}"
                )
                assert f"error: {wanted}:" in err.getvalue(), f"{where}: {err.getvalue()}"
                return
            assert wanted in out.getvalue(), f"{where}: {wanted!r} not in {out.getvalue()!r}"
        assert status == 0, f"{where}: exit {status}: {err.getvalue()}"


# The pages -------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
async def test_the_examples_of_the_page_run(
    page: str,
    service: Service,
    nats_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # no `up` of this machine's
    monkeypatch.setenv("NATS_URL", nats_url)
    monkeypatch.setenv("HERO_DEPLOYER_NATS_URL", nats_url)
    monkeypatch.setenv("HERO_DEPLOYER_TOKEN", TOKEN)
    monkeypatch.setenv("HERO_DEPLOYER_PREFIX", service.settings.prefix)
    namespace: dict[str, Any] = {"__name__": f"docs_{page[:-3]}", "client": service.client}
    shell = ShellRunner(service)
    ran = 0
    for block in blocks(page):
        if not block.marked:
            continue
        if block.lang == "python":
            await run_python(block, namespace, {"service": service})
        elif block.lang == "sh":
            await shell.run(block)
        else:
            raise AssertionError(f"{block.where}: cannot run a {block.lang!r} example")
        ran += 1
    assert ran >= 3
    client = namespace["client"]
    if client is not service.client:
        await client.close()
