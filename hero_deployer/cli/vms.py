"""`hero-deployer vms …` and `migrate-secret`: a tenant's VMs, reached with the tenant's secret."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from core.contract import DeployVm, GetVm, ListVms, MigrateSecret, VmRef
from core.registry import OPERATIONS, Op
from hero_deployer.app.settings import Settings
from hero_deployer.cli.confirm import add_yes_argument, confirm, require_answer
from hero_deployer.cli.connect import connected, send, send_given
from hero_deployer.cli.errors import CommandFailed
from hero_deployer.cli.output import print_json, print_vms
from hero_deployer.cli.parsing import (
    Options,
    command,
    field_option,
    group,
    operation_summary,
    row,
)
from hero_deployer.cli.progress import Wait, add_wait_arguments, describe_vm_event, follow
from hero_deployer.cli.secret_input import (
    NEW_SECRET,
    OLD_SECRET,
    SECRET,
    add_secret_arguments,
    resolve_secret,
)
from hero_deployer.cli.validation import field_type, rule_of

VMS_EPILOG = """\
The secret comes from --secret-file FILE, $HERO_DEPLOYER_SECRET, or a prompt on a terminal.

examples:
  hero-deployer vms deploy web-1                      # asks for the secret
  hero-deployer vms deploy web-1 --cpu 4 --memory 8 --wait --secret-file ~/.hero-secret
  HERO_DEPLOYER_SECRET=… hero-deployer vms list --json
  hero-deployer vms stop vm_3f2a…
  hero-deployer vms delete vm_3f2a… --yes             # no question asked"""

MIGRATE_EPILOG = """\
examples:
  hero-deployer migrate-secret                        # asks for both, the new one twice
  HERO_DEPLOYER_SECRET=… hero-deployer migrate-secret --new-secret-file ~/.hero-new-secret"""

SIZE_FLAGS = (
    ("--image", "image", "the VM's image", str),
    ("--cpu", "cpu_count", "CPU cores", int),
    ("--memory", "memory_gb", "memory in GB", int),
    ("--disk", "disk_gb", "data disk in GB", int),
    ("--rootfs", "rootfs_gb", "root filesystem in GB", int),
    ("--node", "node_id", "the grid node to deploy on (default: the backend picks one)", int),
)


def _verb(op: Op) -> str:
    """A VM operation's subcommand: the first word of its name, the verb."""
    return op.name.split("_")[0]


VM_ACTIONS = {_verb(op): op for op in OPERATIONS if issubclass(op.request, VmRef)}
"""`vms get|start|…`: every operation whose request names one VM by (sid, secret)."""
DEPLOY, LIST = row(DeployVm), row(ListVms)


def add_commands(sub: Any, opts: Options) -> None:
    """Adds `vms deploy|list|get|start|stop|restart|delete` and `migrate-secret`."""
    vms = group(sub, "vms", "a tenant's VMs, by secret", dest="vm_action", epilog=VMS_EPILOG)
    deploy = command(vms, _verb(DEPLOY), operation_summary(DeployVm), parents=opts.client)
    deploy.add_argument("name", help=f"the VM's name: {rule_of(field_type(DeployVm, 'name')[0])}")
    add_secret_arguments(deploy, SECRET)
    for flag, field, text, kind in SIZE_FLAGS:
        field_option(deploy, flag, DeployVm, field, text, type=kind)
    add_wait_arguments(deploy, "--wait", "follow the deploy until the VM runs or fails")
    add_secret_arguments(
        command(vms, _verb(LIST), operation_summary(ListVms), parents=opts.client), SECRET
    )
    for action, op in VM_ACTIONS.items():
        parser = command(vms, action, operation_summary(op.request), parents=opts.client)
        parser.add_argument("sid", help="the VM's sid (vm_…), as deploy and list show it")
        add_secret_arguments(parser, SECRET)
        if action == "delete":
            add_yes_argument(parser)
    for parser in vms.choices.values():
        parser.set_defaults(handler=_vms)

    migrate = command(
        sub,
        "migrate-secret",
        "re-key all of your VMs to a new secret, in one transaction",
        parents=opts.client,
        epilog=MIGRATE_EPILOG,
    )
    add_secret_arguments(migrate, OLD_SECRET)
    add_secret_arguments(migrate, NEW_SECRET)
    migrate.set_defaults(handler=_migrate)


async def _vms(args: argparse.Namespace, settings: Settings) -> None:
    action = args.vm_action
    secret = resolve_secret(args, SECRET, what=f"vms {action}")
    if action == "delete":
        require_answer(args, "vms delete")
    async with connected(args, settings) as client:
        if action == _verb(DEPLOY):
            await _deploy(args, client, secret)
        elif action == _verb(LIST):
            result = await send(client, ListVms(secret=secret))
            print_vms(args, result["vms"], many=True)
        else:
            if action == "delete":
                vm = await send(client, GetVm(sid=args.sid, secret=secret))
                await confirm(args, f"Delete VM {vm['name']} ({vm['sid']}, {vm['status']})?")
            request = VM_ACTIONS[action].request(sid=args.sid, secret=secret)
            print_vms(args, [await send(client, request)], many=False)


async def _deploy(args: argparse.Namespace, client: Any, secret: str) -> None:
    before = await client.position() if args.wait else 0
    fields = [field for _, field, _, _ in SIZE_FLAGS]
    vm = await send_given(client, DeployVm, args, fields, name=args.name, secret=secret)
    if not args.wait or vm["status"] != "deploying":
        print_vms(args, [vm], many=False)
        return
    began = datetime.fromisoformat(vm["updated_at"])
    wait = Wait(f"vm:{vm['sid']}", before, began, "VmDeployed", "VmDeployFailed", describe_vm_event)
    failure = await follow(args, client, wait)
    vm = await send(client, GetVm(sid=vm["sid"], secret=secret))
    print_vms(args, [vm], many=False)
    if failure is not None:
        raise CommandFailed(f"{vm['name']} failed to deploy: {failure['data']['error']}")


async def _migrate(args: argparse.Namespace, settings: Settings) -> None:
    old = resolve_secret(args, OLD_SECRET, what="migrate-secret")
    new = resolve_secret(args, NEW_SECRET, what="migrate-secret")
    async with connected(args, settings) as client:
        result = await send(client, MigrateSecret(old_secret=old, new_secret=new))
    if args.json:
        print_json(result)
    else:
        print(f"migrated {result['migrated_count']} vms")
