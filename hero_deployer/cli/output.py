"""What the CLI prints: tables and colour on a terminal, plain text when piped, JSON for scripts.

Colour follows the common conventions: only on a terminal, never with `NO_COLOR` set to
anything (no-color.org) or `TERM=dumb`. On a terminal a table fits its width; piped, no cell is
cut and no escape code is written, so `grep`/`awk` see the values as they are.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any, Final, TextIO

import msgspec

_CODES: Final = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}

# a status's colour: settled and well, on its way, failed, gone
STATUS_COLOURS: Final = {
    **dict.fromkeys(("running", "ready", "ok", "done"), "green"),
    **dict.fromkeys(("deploying", "provisioning", "decommissioning", "deleting"), "yellow"),
    **dict.fromkeys(("failed", "FAILED", "missing"), "red"),
    **dict.fromkeys(("stopped", "deleted", "decommissioned"), "dim"),
}

VM_COLUMNS: Final = (
    "sid",
    "name",
    "status",
    "node_id",
    "mycelium_ip",
    "cpu_count",
    "memory_gb",
    "error",
)
USER_COLUMNS: Final = ("username", "status", "step", "node_id", "vm_sid", "gateway_url", "error")


def colour_on(stream: TextIO) -> bool:
    """Whether to colour what goes to `stream`: a terminal, no NO_COLOR, not TERM=dumb."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


def paint(text: str, style: str, *, on: bool) -> str:
    """`text` in `style` (a key of _CODES) when `on`, else `text` as it is."""
    return f"\033[{_CODES[style]}m{text}\033[0m" if on and style in _CODES else text


def status(text: str, *, on: bool) -> str:
    """A status word in its colour."""
    return paint(text, STATUS_COLOURS.get(text, ""), on=on)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, tty: bool = False) -> str:
    """Rows under an upper-case header; `tty`: coloured and cut to the terminal's width."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    if tty:
        widths = _fit(widths, shutil.get_terminal_size().columns)
    on = tty and colour_on(sys.stdout)
    header = "  ".join(
        paint(_cut(c.upper(), w).ljust(w), "bold", on=on)
        for c, w in zip(columns, widths, strict=True)
    )
    lines = [header]
    for row in cells:
        values = [_cut(v, w) for v, w in zip(row, widths, strict=True)]
        padded = [v.ljust(w) for v, w in zip(values, widths, strict=True)]
        if on and "status" in columns:
            i = list(columns).index("status")
            padded[i] = status(values[i], on=True) + " " * (widths[i] - len(values[i]))
        lines.append("  ".join(padded))
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _fit(widths: list[int], total: int) -> list[int]:
    """The widths with the widest columns narrowed (to 8 at least) until the row fits `total`."""
    widths = list(widths)
    while sum(widths) + 2 * (len(widths) - 1) > total:
        widest = max(range(len(widths)), key=lambda i: widths[i])
        if widths[widest] <= 8:
            break
        widths[widest] -= 1
    return widths


def _cut(value: str, width: int) -> str:
    return value if len(value) <= width else value[: width - 1] + "…"


def print_json(value: Any) -> None:
    """One JSON value on one line of stdout."""
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    sys.stdout.flush()


def print_record(record: dict[str, Any]) -> None:
    """One resource as `key  value` lines, its status coloured on a terminal."""
    on = colour_on(sys.stdout)
    for key, value in record.items():
        shown = _cell(value)
        print(f"{key:<20}{status(shown, on=on) if key == 'status' else shown}")


def print_vms(args: argparse.Namespace, vms: list[dict[str, Any]], *, many: bool) -> None:
    """VMs as JSON (a list when `many`), else a table."""
    if args.json:
        print_json(vms if many else vms[0])
    elif not vms:
        print("no vms")
    else:
        print(table(vms, VM_COLUMNS, tty=sys.stdout.isatty()))


def print_users(args: argparse.Namespace, users: list[dict[str, Any]], *, many: bool) -> None:
    """Users as JSON (a list when `many`), a table of many, or one user's fields."""
    if args.json:
        print_json(users if many else users[0])
    elif not users:
        print("no users")
    elif many:
        print(table(users, USER_COLUMNS, tty=sys.stdout.isatty()))
    else:
        print_record(users[0])


def print_events(args: argparse.Namespace, events: list[dict[str, Any]]) -> None:
    """Events as JSON lines, else one line each: position, time, stream, version, type, data."""
    on = colour_on(sys.stdout)
    for event in events:
        if args.json:
            print_json(event)
            continue
        data = msgspec.json.encode(event["data"]).decode()
        kind = paint(event["type"], "cyan", on=on)
        print(
            f"{event['position']:>8}  {event['recorded_at']}  {event['stream']}"
            f"  v{event['version']}  {kind}  {data}",
            flush=True,
        )
