"""What handlers need, built once by the bootstrap and passed to every handler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from bus.publisher import SetAside
from core.contract import Part
from core.ports import EventStore, SecretVault
from core.secrets import Fingerprinter
from core.user_state import User
from core.vm import Vm
from hero_deployer.app.aggregates import Aggregates, KeyedLocks
from projections.replay import PagedSource
from projections.runner import ProjectionRunner
from projections.user_view import UserView
from projections.vm_view import VmView


class ServiceStore(EventStore, PagedSource, Protocol):
    """The event log as the service uses it: the port, pages for rebuilds, the chain's head."""

    @property
    def head_hash(self) -> str: ...


@dataclass(slots=True)
class Deps:
    store: ServiceStore
    views: ProjectionRunner
    vm_view: VmView
    vms: Aggregates[Vm]
    users: Aggregates[User]
    user_view: UserView
    vault: SecretVault
    fingerprint: Fingerprinter
    clock: Callable[[], datetime]
    version: str
    require_secret: bool = False
    max_retries: int = 8
    idempotency_locks: KeyedLocks = field(default_factory=KeyedLocks)
    set_aside: SetAside = field(default_factory=SetAside)  # events the publisher could not publish
    parts: tuple[Part, ...] = ()  # the setup's parts as found at start, for `health`
