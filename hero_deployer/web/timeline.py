"""The provisioning timeline of one user, read from the events of its stream."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import msgspec

from core.contract import STEPS
from hero_deployer.sdk.client import EventOut, UserOut
from hero_deployer.sdk.steps import BEGIN_EVENTS, STEP_EVENTS, STEP_LABELS, step_detail

_LIFECYCLE: Final[dict[str, str]] = {
    "ProvisioningRequested": "Provisioning requested",
    "ProvisioningResumed": "Provisioning resumed",
    "ProvisioningCompleted": "Ready",
    "DecommissionRequested": "Decommission requested",
    "GatewayDeleted": "Gateway deleted",
    "UserVmDeleted": "VM deleted",
    "DecommissionActionFailed": "Decommission action failed",
    "UserDecommissioned": "Decommissioned",
    "InitialPasswordRevealed": "Initial password revealed",
}


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of the timeline: what happened, when, how long it took, and any error."""

    kind: str  # "step", "retry", "failed", "event", "running"
    label: str
    at: datetime
    seconds: float | None = None
    detail: str = ""
    error: str = ""
    step: str = ""


@dataclass(frozen=True, slots=True)
class StepState:
    step: str
    label: str
    state: str  # "done", "current", "failed", "pending", "decommissioning", "decommissioned"


def _at(event: EventOut, data: dict[str, Any]) -> datetime:
    raw = data.get("at")
    return datetime.fromisoformat(raw) if isinstance(raw, str) else event.recorded_at


def timeline(events: list[EventOut], user: UserOut, now: datetime) -> list[Entry]:
    """The user's history as timeline entries, with each step's duration and error."""
    entries: list[Entry] = []
    began: datetime | None = None
    for event in events:
        data: dict[str, Any] = msgspec.json.decode(event.data)
        at = _at(event, data)
        kind = event.type
        if kind in BEGIN_EVENTS:
            began = at
        if kind in STEP_EVENTS:
            step = STEP_EVENTS[kind]
            seconds = (at - began).total_seconds() if began else None
            entries.append(
                Entry("step", STEP_LABELS[step], at, seconds, step_detail(kind, data), step=step)
            )
            began = at
        elif kind == "StepRetried":
            step = str(data.get("step", ""))
            label = f"{STEP_LABELS.get(step, step)}: retry #{data.get('attempt', '?')}"
            entries.append(Entry("retry", label, at, error=str(data.get("reason", "")), step=step))
        elif kind == "StepFailed":
            step = str(data.get("step", ""))
            seconds = (at - began).total_seconds() if began else None
            label = f"{STEP_LABELS.get(step, step)} failed"
            entries.append(
                Entry("failed", label, at, seconds, error=str(data.get("reason", "")), step=step)
            )
        elif kind == "DecommissionActionFailed":
            entries.append(Entry("failed", _LIFECYCLE[kind], at, error=str(data.get("reason", ""))))
        elif kind in _LIFECYCLE:
            entries.append(Entry("event", _LIFECYCLE[kind], at, detail=step_detail(kind, data)))
        elif kind == "UserVmDeployRequested":
            entries.append(Entry("event", "VM requested", at, detail=step_detail(kind, data)))
    if user.status == "provisioning" and began is not None:
        label = f"{STEP_LABELS.get(user.step, user.step)}: in progress"
        seconds = max(0.0, (now - began).total_seconds())
        entries.append(Entry("running", label, began, seconds, step=user.step))
    return entries


def step_states(user: UserOut) -> list[StepState]:
    """Each provisioning step as done, current, failed or pending, for the progress strip.

    While and after a decommission every step shows that state instead: what they built is
    being deleted or gone.
    """
    steps = [s for s in STEPS if s != "done"]
    if user.status in ("decommissioning", "decommissioned"):
        return [StepState(s, STEP_LABELS[s], user.status) for s in steps]
    if user.status == "ready" and user.step == "done":
        return [StepState(s, STEP_LABELS[s], "done") for s in steps]
    index = STEPS.index(user.step)
    states = []
    for position, step in enumerate(steps):
        if position < index:
            state = "done"
        elif position == index:
            state = "failed" if user.status == "failed" else "current"
        else:
            state = "pending"
        states.append(StepState(step, STEP_LABELS[step], state))
    return states
