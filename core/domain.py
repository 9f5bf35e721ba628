"""The aggregates of the domain as Deciders, and the one decoder of every event they record."""

from __future__ import annotations

from typing import Final

from core import user, user_events, user_state, vm, vm_events
from core.decider import Decider
from core.events import EventRegistry

VMS: Final[Decider[vm.Vm]] = Decider(
    kind="vm",
    decide=vm.decide,
    evolve=vm.evolve,
    events=vm_events.VmEvent,
)
USERS: Final[Decider[user_state.User]] = Decider(
    kind="user",
    decide=user.decide,
    evolve=user_state.evolve,
    events=user_events.UserEvent,
)
EVENTS: Final = EventRegistry((*VMS.types, *USERS.types))
"""Decodes any recorded event: the store's readers, the views, the rebuild and the SDK."""
