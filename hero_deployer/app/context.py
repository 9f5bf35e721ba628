"""Where a running `up` is: a small file in the user's state dir, like the `nats` CLI's contexts.

`up` records its absolute data dir, NATS URL, prefix and process (pid and start time) in
`$XDG_STATE_HOME/hero-deployer/up-<port>.json` (else `~/.local/state/hero-deployer/`), mode 0600,
and removes it when it exits. The CLI reads the live ones, so it finds the service from any
directory; a file whose process is gone (a `kill -9`, a reboot) is ignored.

`up`'s nats-server also records its random `server_name` and URL in `DIR/nats-server.name`
(0600), kept after `up` stops: the CLI sends nothing to a server at that URL that names itself
otherwise (a foreign server on the port of a stopped `up`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import msgspec
import structlog

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
SERVER_NAME_FILE = "nats-server.name"


class Context(msgspec.Struct, frozen=True, kw_only=True):
    """One running `up`: where its data and its NATS are, and which process it is."""

    data_dir: str
    nats_url: str
    prefix: str
    pid: int
    started: str = ""  # the process's start time in clock ticks since boot (Linux), else ""

    def settings(self) -> dict[str, Any]:
        """The settings this context supplies (below environment variables and flags)."""
        return {"data_dir": Path(self.data_dir), "nats_url": self.nats_url, "prefix": self.prefix}


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_STATE_HOME/hero-deployer`, else `~/.local/state/hero-deployer` (XDG base dirs)."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME", "")
    # The XDG spec: a relative XDG_STATE_HOME is invalid and is ignored.
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "hero-deployer"


class _Located(Protocol):
    @property
    def data_dir(self) -> Path: ...
    @property
    def nats_url(self) -> str: ...
    @property
    def prefix(self) -> str: ...


def current(settings: _Located) -> Context:
    """The context of this process, serving with `settings`."""
    pid = os.getpid()
    return Context(
        data_dir=str(settings.data_dir.absolute()),
        nats_url=settings.nats_url,
        prefix=settings.prefix,
        pid=pid,
        started=_started(pid) or "",
    )


def record(context: Context, directory: Path | None = None) -> Path:
    """Writes the context's file atomically, mode 0600 in a 0700 dir; returns its path."""
    directory = directory or state_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / _file_name(context.nats_url)
    _write_private(path, msgspec.json.encode(context) + b"\n")
    return path


class ServerName(msgspec.Struct, frozen=True, kw_only=True):
    """The name `up`'s nats-server was given, and where it listened."""

    nats_url: str
    server_name: str


def record_server_name(data_dir: Path, nats_url: str, server_name: str) -> None:
    """Writes `DIR/nats-server.name` atomically, mode 0600."""
    record = ServerName(nats_url=nats_url, server_name=server_name)
    _write_private(data_dir / SERVER_NAME_FILE, msgspec.json.encode(record) + b"\n")


def expected_server_name(data_dir: Path, nats_url: str) -> str | None:
    """The name recorded in DIR for the server at `nats_url`; None when none is recorded."""
    try:
        record = msgspec.json.decode((data_dir / SERVER_NAME_FILE).read_bytes(), type=ServerName)
    except (OSError, msgspec.DecodeError):
        return None
    return record.server_name if _same_server(record.nats_url, nats_url) else None


def _write_private(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` through a 0600 temporary file beside it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def remove(path: Path, pid: int) -> None:
    """Removes the file at `path` if it still names process `pid` (a later `up` may own it)."""
    found = _read(path)
    if found is not None and found.pid == pid:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def recorded(context: Context, directory: Path | None = None) -> Iterator[Path | None]:
    """Records the context for as long as the block runs; yields None when it cannot be written.

    Finding the service is a convenience: an unwritable state dir must not stop the service.
    """
    try:
        path: Path | None = record(context, directory)
    except OSError as error:
        path = None
        log = structlog.get_logger("hero_deployer")
        log.warning("context.unrecorded", reason=str(error), hint="pass the CLI --nats/--data-dir")
    try:
        yield path
    finally:
        if path is not None:
            remove(path, context.pid)


def live(directory: Path | None = None) -> list[Context]:
    """The contexts whose process still runs, most recently written first."""
    directory = directory or state_dir()
    try:
        paths = sorted(
            directory.glob("up-*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True
        )
    except OSError:
        return []
    found = (_read(path) for path in paths)
    return [c for c in found if c is not None and _running(c)]


def find(nats_url: str | None, directory: Path | None = None) -> Context | None:
    """The live context at `nats_url`; without a URL, the default URL's, else the newest."""
    contexts = live(directory)
    if nats_url is not None:
        return next((c for c in contexts if _same_server(c.nats_url, nats_url)), None)
    default = next((c for c in contexts if _same_server(c.nats_url, DEFAULT_NATS_URL)), None)
    return default or (contexts[0] if contexts else None)


def _file_name(nats_url: str) -> str:
    # Two `up`s cannot share a port, so the port names the file; a new `up` replaces a stale one.
    return f"up-{urlsplit(nats_url).port or 4222}.json"


def _same_server(a: str, b: str) -> bool:
    first, second = urlsplit(a.split(",")[0].strip()), urlsplit(b.split(",")[0].strip())
    hosts = {"localhost", "127.0.0.1"}
    same_host = first.hostname == second.hostname or {first.hostname, second.hostname} <= hosts
    return same_host and (first.port or 4222) == (second.port or 4222)


def _read(path: Path) -> Context | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=Context)
    except (OSError, msgspec.DecodeError):
        return None


def _running(context: Context) -> bool:
    """Whether the context's process still runs: its pid exists and, on Linux, started then."""
    try:
        os.kill(context.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's process
    started = _started(context.pid)
    return not (context.started and started is not None and started != context.started)


def _started(pid: int) -> str | None:
    """The start time of `pid` from /proc (field 22 of `stat`), None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None
