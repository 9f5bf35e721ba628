"""Confirmation before a destructive command: asked on a terminal, `--yes` on any other."""

from __future__ import annotations

import argparse
import asyncio
import sys

from hero_deployer.cli.errors import Cancelled
from hero_deployer.cli.secret_input import UsageError


def add_yes_argument(parser: argparse.ArgumentParser) -> None:
    """Adds `--yes`, which answers the confirmation (required when stdin is no terminal)."""
    parser.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do it without asking (needed when standard input is not a terminal)",
    )


def require_answer(args: argparse.Namespace, what: str) -> None:
    """Raises UsageError, before anything is sent, when no one can answer and `--yes` is absent."""
    if not args.yes and not sys.stdin.isatty():
        raise UsageError(f"{what} asks for confirmation on a terminal: pass --yes to go ahead")


async def confirm(args: argparse.Namespace, question: str) -> None:
    """Asks `question` on the terminal (stderr, so stdout stays data); Cancelled unless yes."""
    if args.yes:
        return
    answer = await asyncio.to_thread(_ask, f"{question} [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise Cancelled("cancelled: nothing was done")


def _ask(prompt: str) -> str:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return sys.stdin.readline()
