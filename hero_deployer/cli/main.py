"""`hero-deployer`: the parser of every command, the settings, and one exit status per failure."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
from collections.abc import Sequence
from typing import Any

from hero_deployer import VERSION
from hero_deployer.app import audit, context
from hero_deployer.app.runtime import NatsRefused, prepare_process
from hero_deployer.app.settings import Settings, explicit_values
from hero_deployer.cli import run, service, store, users, vms
from hero_deployer.cli.errors import EXIT_STATUS_HELP, failure_of, report
from hero_deployer.cli.parsing import HelpFormatter, Parser, command, options
from hero_deployer.cli.validation import LABELS

DESCRIPTION = "Run hero-deployer, the owner of the Hero OS demo fleet's VMs, and talk to it."

EPILOG = f"""\
examples:
  hero-deployer up                        # run everything here; prints "ready"
  hero-deployer status                    # which service, what it runs, what it lacks
  hero-deployer vms deploy web-1 --wait   # asks for the secret, follows the deploy
  hero-deployer users provision alice     # live progress until ready or failed
  hero-deployer COMMAND --help            # each command's flags, defaults and examples

The CLI finds the `up` running on this machine; --nats URL, --data-dir DIR and
HERO_DEPLOYER_* variables point it elsewhere. Colour only on a terminal, never with NO_COLOR.

{EXIT_STATUS_HELP}"""

# Each module adds its commands; a new command is one `add_commands` here (or a line in one).
COMMAND_MODULES = (run, service, vms, users, store)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every command with its one-line summary and its own flags."""
    parser = Parser(
        prog="hero-deployer", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"hero-deployer {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    opts = options()
    for module in COMMAND_MODULES:
        module.add_commands(sub, opts)
    audit.add_commands(sub, opts.data_dir)
    spec = command(sub, "api-spec", "print the AsyncAPI 3 document of the contract")
    spec.add_argument("--prefix", default="hero.v1", help="the subjects' prefix")
    describe(parser)
    return parser


def describe(parser: argparse.ArgumentParser) -> None:
    """Gives every subcommand added elsewhere (audit's) its summary as its description too.

    It also tells the validation messages each field's flag (`cpu_count` → `--cpu`).
    """
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            LABELS.setdefault(action.dest, max(action.option_strings, key=len))
        if not isinstance(action, argparse._SubParsersAction):
            continue
        summaries = {a.dest: a.help for a in action._choices_actions}
        for name, child in action.choices.items():
            if child.description is None and summaries.get(name):
                summary = str(summaries[name])
                child.description = summary[0].upper() + summary[1:] + "."
                child.formatter_class = HelpFormatter
            describe(child)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags give (None: not given)."""
    overrides: dict[str, Any] = {"data_dir": getattr(args, "data_dir", None)}
    names = ("nats_port", "backend", "public_url", "store", "replicas", "nats_nkey", "nats_creds")
    for name in names:  # up/serve/web/backend check flags
        overrides[name] = getattr(args, name, None)
    if getattr(args, "nats", None):
        overrides["nats_url"] = args.nats
    return overrides


def _settings(command: str, overrides: dict[str, Any]) -> Settings:
    """Flags, then `HERO_DEPLOYER_*` variables, then the `up` running here, then the defaults.

    The running `up` (its context file) counts for the commands that talk to a service, not for
    the ones that run one; a URL given by flag or variable picks the context at that URL.
    """
    settings = Settings.load(overrides)
    if command in ("up", "serve"):
        return settings
    given = explicit_values(overrides)
    url_given = "nats_url" in given or "nats_port" in given
    found = context.find(settings.nats_url if url_given else None)
    return Settings.load(overrides, found=found.settings()) if found else settings


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    """Runs the command's handler (in an event loop when it is a coroutine); its exit status."""
    handler = getattr(args, "handler", None)
    if handler is None:  # audit verify, backup, restore
        return audit.run(args, settings)
    if not inspect.iscoroutinefunction(handler):
        return int(handler(args, settings) or 0)
    with _runner() as runner:
        return int(runner.run(handler(args, settings)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command line; returns its exit status (see `hero-deployer --help`)."""
    prepare_process()  # before any database is opened
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    Parser.json_errors = as_json
    args = build_parser().parse_args(argv)
    if args.command == "api-spec":
        from hero_deployer.sdk.asyncapi import print_spec

        print_spec(args.prefix)
        return 0
    try:
        return _run(args, _settings(args.command, _overrides(args)))
    except KeyboardInterrupt:
        return 0
    except NatsRefused as error:  # `serve` could not start: not a client's failure
        sys.stderr.write(f"error: {error}\n")
        return 1
    except Exception as error:
        failure = failure_of(error)
        if failure is None:
            raise
        return report(failure, as_json=as_json)
