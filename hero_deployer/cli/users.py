"""`hero-deployer users …`: provision and decommission users, with live progress (operator)."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from core.contract import (
    DecommissionUser,
    GetUser,
    ListUsers,
    ProvisionUser,
    RevealInitialPassword,
)
from hero_deployer.app.settings import Settings
from hero_deployer.cli.confirm import add_yes_argument, confirm, require_answer
from hero_deployer.cli.connect import connected, send, send_given
from hero_deployer.cli.errors import CommandFailed
from hero_deployer.cli.output import print_json, print_users
from hero_deployer.cli.parsing import (
    Options,
    command,
    field_option,
    group,
    operation_summary,
)
from hero_deployer.cli.progress import Wait, add_wait_arguments, describe_user_event, follow
from hero_deployer.cli.validation import field_type, rule_of

USERS_EPILOG = """\
examples:
  hero-deployer users provision alice --email alice@example.org   # live, until ready or failed
  hero-deployer users provision alice --no-wait --json
  hero-deployer users list
  hero-deployer users get alice --json
  hero-deployer users reveal-password alice                       # once; then it is destroyed
  hero-deployer users decommission alice --wait                   # asks first on a terminal
  hero-deployer users decommission alice --yes                    # in a script"""


def add_commands(sub: Any, opts: Options) -> None:
    """Adds `users provision|list|get|decommission|reveal-password`."""
    users = group(
        sub,
        "users",
        "provision and decommission users (operator)",
        dest="user_action",
        epilog=USERS_EPILOG,
    )
    _add_provision(users, opts)
    command(users, "list", operation_summary(ListUsers), parents=opts.client)
    get = command(users, "get", operation_summary(GetUser), parents=opts.client)
    get.add_argument("username", help="the user's name")
    decommission = command(
        users,
        "decommission",
        operation_summary(DecommissionUser) + ": its VM, gateway and account",
        parents=opts.client,
    )
    decommission.add_argument("username", help="the user's name")
    add_wait_arguments(decommission, "--wait", "follow until decommissioned")
    add_yes_argument(decommission)
    reveal = command(
        users, "reveal-password", operation_summary(RevealInitialPassword), parents=opts.client
    )
    reveal.add_argument("username", help="the user's name")
    for parser in users.choices.values():
        parser.set_defaults(handler=_users)


def _add_provision(users: Any, opts: Options) -> None:
    """Adds `users provision` with its flags, each from ProvisionUser's field."""
    provision = command(
        users,
        "provision",
        operation_summary(ProvisionUser) + ", showing each step live",
        parents=opts.client,
    )
    rule = rule_of(field_type(ProvisionUser, "username")[0])
    provision.add_argument("username", help=f"the user's name, which {rule}")
    field_option(
        provision, "--display-name", ProvisionUser, "display_name", "the full name", metavar="TEXT"
    )
    field_option(
        provision,
        "--email",
        ProvisionUser,
        "forge_email",
        "the Forge account's e-mail",
        metavar="ADDRESS",
    )
    field_option(
        provision,
        "--profile",
        ProvisionUser,
        "profile",
        "what the VM is set up with",
        metavar="NAME",
    )
    add_wait_arguments(provision, "--no-wait", "do not follow the progress")


async def _users(args: argparse.Namespace, settings: Settings) -> None:
    action = args.user_action
    if action == "decommission":
        require_answer(args, "users decommission")
    async with connected(args, settings) as client:
        if action == "list":
            result = await send(client, ListUsers())
            print_users(args, result["users"], many=True)
        elif action == "get":
            user = await send(client, GetUser(username=args.username))
            print_users(args, [user], many=False)
        elif action == "reveal-password":
            result = await send(client, RevealInitialPassword(username=args.username))
            if args.json:
                print_json(result)
            else:
                print(result["initial_password"])
        elif action == "decommission":
            await _decommission(args, client)
        else:
            await _provision(args, client)


async def _provision(args: argparse.Namespace, client: Any) -> None:
    name = args.username
    before = await client.position()
    fields = ("display_name", "forge_email", "profile")
    user = await send_given(client, ProvisionUser, args, fields, username=name)
    if args.no_wait or user["status"] != "provisioning":
        print_users(args, [user], many=False)
        return
    if not args.json:
        print(f"provisioning {name} (step {user['step']}), following its events", flush=True)
    began = datetime.fromisoformat(user["updated_at"])
    wait = Wait(
        f"user:{name}", before, began, "ProvisioningCompleted", "StepFailed", describe_user_event
    )
    failure = await follow(args, client, wait)
    user = await send(client, GetUser(username=name))
    if args.json:
        print_json(user)
    elif failure is None:
        total = (datetime.fromisoformat(user["updated_at"]) - began).total_seconds()
        print(f"{name} is ready after {total:.1f}s: {user['gateway_url']}")
    if failure is not None:
        data = failure["data"]
        raise CommandFailed(f"{name} failed at {data['step']}: {data['reason']}")


async def _decommission(args: argparse.Namespace, client: Any) -> None:
    name = args.username
    current = await send(client, GetUser(username=name))
    await confirm(args, f"Decommission {name} ({current['status']}): delete its VM and gateway?")
    before = await client.position()
    user = await send(client, DecommissionUser(username=name))
    if not args.wait or user["status"] != "decommissioning":
        print_users(args, [user], many=False)
        return
    if not args.json:
        print(f"decommissioning {name}, following its events", flush=True)
    began = datetime.fromisoformat(user["updated_at"])
    wait = Wait(f"user:{name}", before, began, "UserDecommissioned", "", describe_user_event)
    await follow(args, client, wait)
    user = await send(client, GetUser(username=name))
    if args.json:
        print_json(user)
    else:
        print(f"{name} is {user['status']}")
