"""Live progress of a command that waits: a resource's events, one line each, as they happen.

`users provision`, `users decommission --wait` and `vms deploy --wait` follow the resource's
stream from the position before their request until the event that ends the wait; each line
says what finished and how long it took. Under `--json` the events are JSON lines instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from core.contract import Step
from hero_deployer.cli.output import colour_on, paint, print_json
from hero_deployer.sdk.steps import BEGIN_EVENTS, STEP_EVENTS, step_detail

# A line about an event, given the seconds since the clock last restarted, and whether this
# event restarts it (it began or finished something); None: nothing to say about it.
Describe = Callable[[dict[str, Any], float], tuple[str, bool] | None]


@dataclass(frozen=True, slots=True)
class Wait:
    """What to follow: a stream, from a position, until `until` (done) or `failed` (raised)."""

    stream: str
    after: int
    since: datetime
    until: str
    failed: str
    describe: Describe


async def follow(args: argparse.Namespace, client: Any, wait: Wait) -> dict[str, Any] | None:
    """Shows the stream's events until `wait.until`; returns the `wait.failed` event, if any."""
    on = colour_on(sys.stdout)
    clock = wait.since
    async with asyncio.timeout(args.wait_timeout):
        async for event in client.follow(after=wait.after, stream=wait.stream):
            at = event_time(event)
            said = None if args.json else wait.describe(event, (at - clock).total_seconds())
            if args.json:
                print_json(event)
            elif said is not None:
                text, restarts = said
                clock = at if restarts else clock
                print(paint(text, "red", on=on) if " FAILED " in text else text, flush=True)
            if event["type"] == wait.failed:
                return dict(event)
            if event["type"] == wait.until:
                return None
    return None


def add_wait_arguments(parser: argparse.ArgumentParser, flag: str, text: str) -> None:
    """Adds `flag` (`--wait` or `--no-wait`) and the `--wait-timeout` that `follow` obeys."""
    parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument(
        "--wait-timeout", type=float, default=3600.0, metavar="SECONDS", help="give up after"
    )


def event_time(event: dict[str, Any]) -> datetime:
    """When the event happened: its data's `at`, else when it was recorded."""
    return datetime.fromisoformat(str(event["data"].get("at") or event["recorded_at"]))


# Users -------------------------------------------------------------------------------------

DECOMMISSION_EVENTS: Final = ("GatewayDeleted", "UserVmDeleted", "DecommissionActionFailed")


def describe_user_event(event: dict[str, Any], elapsed: float) -> tuple[str, bool] | None:
    """A line about one of a user's events: a step done, retried, failed, or a part removed."""
    kind, data = event["type"], event["data"]
    if kind in BEGIN_EVENTS:
        return kind, True
    if kind in STEP_EVENTS:
        return f"  {STEP_EVENTS[kind]:<16} done   {elapsed:6.1f}s  {step_detail(kind, data)}", True
    if kind == "UserVmDeployRequested":
        return f"  {Step.DEPLOY_VM:<16} ...            vm {data['vm_sid']} requested", False
    if kind == "StepRetried":
        return f"  {data['step']:<16} retry  #{data['attempt']:<5}  {data['reason']}", False
    if kind == "StepFailed":
        return f"  {data['step']:<16} FAILED {elapsed:6.1f}s  {data['reason']}", True
    if kind in DECOMMISSION_EVENTS:
        what = data.get("name") or data.get("vm_sid") or data.get("reason", "")
        return f"  {kind:<24} {what}", False
    return None


# VMs ---------------------------------------------------------------------------------------


def describe_vm_event(event: dict[str, Any], elapsed: float) -> tuple[str, bool] | None:
    """A line about one of a VM's deploy events: requested, deployed, or failed."""
    kind, data = event["type"], event["data"]
    if kind == "VmDeployRequested":
        size = f"{data['cpu_count']} CPU, {data['memory_gb']} GB memory, {data['disk_gb']} GB disk"
        return f"deploying {data['name']} ({data['sid']}: {size})", True
    if kind == "VmDeployed":
        where = f"node {data['node_id']}, mycelium {data['mycelium_ip']}"
        return f"  {'deploy':<16} done   {elapsed:6.1f}s  {where}", True
    if kind == "VmDeployFailed":
        return f"  {'deploy':<16} FAILED {elapsed:6.1f}s  {data['error']}", True
    return None
