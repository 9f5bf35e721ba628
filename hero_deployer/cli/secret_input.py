"""Where the CLI gets a tenant's secret: a file, an environment variable or a terminal prompt.

A secret on the command line is visible to every user of the machine (`ps`, `/proc/*/cmdline`)
and lands in shell history, so `--secret` stays only for compatibility. The empty secret means
"no protection" (contract: secret rules); nobody gets it by forgetting a flag: it takes an
explicit `--no-secret`, and an empty value from any source is refused.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

SECRET_ENV = "HERO_DEPLOYER_SECRET"  # noqa: S105 - a variable's name, not a secret
NEW_SECRET_ENV = "HERO_DEPLOYER_NEW_SECRET"  # noqa: S105


class UsageError(Exception):
    """The command line lacks what the command needs; the message says how to give it."""


@dataclass(frozen=True, slots=True)
class SecretSource:
    """One secret a command takes: its flags' stem, its variable, its prompt, its 'none' flag."""

    stem: str  # "secret" → --secret, --secret-file; "old-secret" → --old-secret, ...
    env: str
    prompt: str
    none_flag: str | None = None  # the flag that asks for the empty secret, if it may be empty
    confirm: bool = False  # prompt twice (a new secret)

    @property
    def dest(self) -> str:
        return self.stem.replace("-", "_")

    def ways(self) -> str:
        """The ways to give this secret, for a usage error."""
        ways = f"--{self.stem}-file FILE, {self.env}, or a prompt on a terminal"
        return ways + (f" ({self.none_flag} for none)" if self.none_flag else "")


SECRET = SecretSource("secret", SECRET_ENV, "secret: ", none_flag="--no-secret")
OLD_SECRET = SecretSource("old-secret", SECRET_ENV, "old secret: ", none_flag="--no-old-secret")
NEW_SECRET = SecretSource("new-secret", NEW_SECRET_ENV, "new secret: ", confirm=True)


def add_secret_arguments(parser: argparse.ArgumentParser, source: SecretSource) -> None:
    """Adds the secret's flags to `parser`: a file, the value itself (legacy), and 'none'."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        f"--{source.stem}-file",
        metavar="FILE",
        help=f"read the {source.stem.replace('-', ' ')} from FILE ('-': standard input)",
    )
    group.add_argument(
        f"--{source.stem}",
        metavar="S",
        help=f"the {source.stem.replace('-', ' ')} itself (visible to `ps`; prefer the file or "
        f"{source.env})",
    )
    if source.none_flag:
        group.add_argument(
            source.none_flag,
            action="store_true",
            help="no secret: the empty secret, which protects nothing",
        )


def resolve_secret(
    args: argparse.Namespace,
    source: SecretSource,
    *,
    what: str,
    ask: Callable[[str], str] = getpass.getpass,
) -> str:
    """The secret from the flags, else the variable, else a terminal prompt; else UsageError."""
    if source.none_flag and getattr(args, source.none_flag.lstrip("-").replace("-", "_"), False):
        return ""
    value: str | None = getattr(args, source.dest, None)
    path: str | None = getattr(args, f"{source.dest}_file", None)
    if value is None and path is not None:
        value = _read_file(path)
    if value is None:
        value = os.environ.get(source.env) or None
    if value is None and sys.stdin.isatty():
        value = _prompt(source, ask)
    if value is None:
        noun = _noun(source)
        article = "an" if noun[0] in "aeiou" else "a"
        raise UsageError(f"{what} needs {article} {noun}: {source.ways()}")
    if not value:
        ways = f"; {source.none_flag} means none" if source.none_flag else ""
        raise UsageError(f"{what}: the {_noun(source)} is empty{ways}")
    return value


def _noun(source: SecretSource) -> str:
    return source.stem.replace("-", " ")


def _read_file(path: str) -> str:
    """The file's content without its final line break; '-' reads standard input."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as error:
        raise UsageError(f"cannot read the secret file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the secret file {path} is not UTF-8 text") from None
    return text.removesuffix("\n").removesuffix("\r")


def _prompt(source: SecretSource, ask: Callable[[str], str]) -> str:
    value = ask(source.prompt)
    if source.confirm and value and ask(source.prompt.replace(": ", " again: ")) != value:
        raise UsageError(f"the two {_noun(source)}s differ")
    return value
