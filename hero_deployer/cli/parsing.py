"""How the CLI's parsers are built: one-line descriptions, defaults in the help, shared flags."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from core.registry import OPERATIONS, Op
from hero_deployer.cli.validation import bounds, field_type


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs keep their lines; a flag's help ends with its default when it has a real one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "default:" in text or not action.option_strings:
            return text
        if default is None or default is False or default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one JSON object on stderr under `--json`."""

    json_errors = False  # set by `main` when the command line holds --json

    def error(self, message: str) -> NoReturn:
        if not self.json_errors:
            super().error(message)
        from hero_deployer.cli.errors import Failure, report

        sys.exit(report(Failure("Usage", f"{self.prog}: {message}"), as_json=True))


@dataclass(frozen=True, slots=True)
class Options:
    """The flags commands share, as parent parsers; a command takes only those it uses."""

    data_dir: argparse.ArgumentParser
    nats: argparse.ArgumentParser
    json: argparse.ArgumentParser
    timeout: argparse.ArgumentParser

    @property
    def client(self) -> list[argparse.ArgumentParser]:
        """What every command that talks to a running service takes."""
        return [self.data_dir, self.nats, self.json, self.timeout]


def options() -> Options:
    """The shared flags."""
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="where the token, keys and databases live (default: the running up's, else ./var)",
    )
    nats = argparse.ArgumentParser(add_help=False)
    nats.add_argument(
        "--nats",
        metavar="URL",
        help="NATS URL of the service (default: the `up` running here, else nats://127.0.0.1:4222)",
    )
    json = argparse.ArgumentParser(add_help=False)
    json.add_argument(
        "--json", action="store_true", help="print JSON for scripts (errors: JSON on stderr)"
    )
    timeout = argparse.ArgumentParser(add_help=False)
    timeout.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="wait this long per request"
    )
    return Options(data_dir, nats, json, timeout)


def command(
    sub: Any,
    name: str,
    summary: str,
    *,
    parents: list[argparse.ArgumentParser] | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand with its one-line `summary` in the list and at the top of its `--help`."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        parents=parents or [],
        epilog=epilog,
        formatter_class=HelpFormatter,
    )
    return parser


def group(sub: Any, name: str, summary: str, *, dest: str, epilog: str) -> Any:
    """A command group (`vms`, `users`): its own subcommands, examples in its `--help`."""
    parser = command(sub, name, summary, epilog=epilog)
    return parser.add_subparsers(dest=dest, required=True, metavar="COMMAND")


def row(request: type[msgspec.Struct]) -> Op:
    """The registry's row whose request type is `request`."""
    return OPERATIONS.row(request)


def operation_summary(request: type[msgspec.Struct]) -> str:
    """The contract's one description of an operation, as a subcommand's summary."""
    text = row(request).summary.rstrip(".").replace("`secret`", "the secret")
    return text[0].lower() + text[1:]


def field_option(
    parser: argparse.ArgumentParser,
    flag: str,
    struct: type[Any],
    field: str,
    text: str,
    **kwargs: Any,
) -> None:
    """A flag for `struct.field` whose help gives the field's bounds and default, from the type.

    The flag's own default stays None: the service applies the type's default, so the CLI sends
    only what was given.
    """
    kind, default = field_type(struct, field)
    span = bounds(kind) if "default:" not in text else ""
    extra = ", ".join(part for part in (span, _default(default)) if part)
    kwargs.setdefault("metavar", "N" if kwargs.get("type") is int else flag.strip("-").upper())
    parser.add_argument(
        flag, dest=field, help=f"{text} ({extra})" if extra else text, default=None, **kwargs
    )


def _default(value: Any) -> str:
    return "" if value in (None, "") else f"default: {value}"
