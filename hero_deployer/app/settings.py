"""Settings: embedded defaults, then `HERO_DEPLOYER_*` environment variables, then flags."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.keyfiles import load_or_create_token
from core.contract import Step
from core.registry import OPERATIONS

ENV_PREFIX = "HERO_DEPLOYER_"


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of a process; `HERO_DEPLOYER_` + a name in capitals is its variable."""

    data_dir: Path = Path("var")  # --data-dir: the token, keys and databases
    nats_url: str = "nats://127.0.0.1:4222"  # serve --nats: a server's URL, or a cluster's
    nats_port: int = 4222  # up --nats-port: the port of up's own nats-server
    # The NATS identity this process connects with: an NKey seed file or a creds file (`serve
    # --nkey/--creds`); the CLI and the dashboard default to DIR/client.nk when it exists.
    nats_nkey: str = ""
    nats_creds: str = ""
    prefix: str = "hero.v1"  # every subject of the contract begins with it
    token: str = field(default="", repr=False)  # bearer token; empty: DIR/token (made once)
    exempt: frozenset[str] = OPERATIONS.unauthenticated
    require_secret: bool = False
    synchronous: str = "FULL"  # SQLite's PRAGMA synchronous for the event log
    backend: str = "local"
    local_deploy_delay: float = 2.0  # seconds a local grid VM takes to deploy
    local_action_delay: float = 0.3  # and to start, stop or restart
    local_ssh: bool = True  # a local grid VM is an SSH sandbox on loopback
    log_level: str = "info"
    log_format: str = "console"
    shutdown_timeout: float = 10.0
    # Provisioning users (issue 3). The Forge admin password is read from the environment only
    # (there is no flag for it) and never shown: it is left out of `repr`.
    forge_url: str = ""
    forge_admin_user: str = ""
    forge_admin_password: str = field(default="", repr=False)
    forge_admin_token: str = field(default="", repr=False)
    forge_email_domain: str = "users.noreply.hero.local"
    gridproxy_url: str = ""  # empty: the grid proxy of `tofu_network` for a real grid
    candidate_nodes: tuple[int, ...] = (1, 8, 13, 50)
    # The grid installs the VM's SSH_KEY for root (zosbase pkg/vm/manager.go).
    ssh_user: str = "root"
    # Gateway names are name contracts, unique across the whole grid: the operator's prefix
    # namespaces them (see core/gateway_names.py).
    gateway_prefix: str = ""
    gateway_backend: str = "network"  # or "mycelium": how a gateway reaches its VM
    setup_command: str = "./setup-binaries.sh"
    step_deadline: float = 600.0
    step_deadlines: str = f"{Step.DEPLOY_VM}=1200,{Step.RUN_SETUP}=1800"
    step_retries: int = 4
    step_retries_by_step: str = ""
    step_base_delay: float = 0.5
    step_max_delay: float = 30.0
    # Real compute backends (issue 4); see docs/backends.md. The hero_compute owner secret and
    # the grid mnemonic come from the environment only and are never shown.
    hero_compute_url: str = ""
    hero_compute_socket: str = ""
    hero_compute_secret: str = field(default="", repr=False)
    hero_compute_timeout: float = 30.0
    hero_compute_deploy_timeout: float = 900.0
    tofu_path: str = "tofu"
    tofu_network: str = "main"
    tofu_mnemonic_env: str = "TFGRID_MNEMONIC"
    tofu_timeout: float = 900.0
    # Where browsers reach the dashboard (behind a proxy): its Host only, Secure cookies if https.
    public_url: str = ""
    # Where the event log lives (docs/scale-out.md): "sqlite" (DIR/events.db) or "jetstream" (a
    # stream with `replicas` copies on the NATS cluster; DIR then holds views and keys only).
    store: str = "sqlite"
    replicas: int = 3
    lease_ttl: float = 10.0  # seconds a dead replica holds the side effects' lease (jetstream)
    # seconds after which a dead replica's idempotency reservation is settled by others (jetstream)
    reservation_stale_after: float = 60.0

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        *,
        found: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Defaults, then `found` (a running `up`'s context), the environment, `overrides` (flags).

        The data dir comes out absolute, so every part of the process sees one path.
        """
        values = explicit_values(overrides)
        if "nats_url" not in values and "nats_port" in values:
            values["nats_url"] = f"nats://127.0.0.1:{values['nats_port']}"
        settings = cls(**{**(found or {}), **values})
        return dataclasses.replace(settings, data_dir=settings.data_dir.expanduser().absolute())

    def with_token(self) -> Settings:
        """The settings with the bearer token resolved: configured, else `DIR/token`."""
        token = load_or_create_token(self.data_dir / "token", self.token or None)
        return dataclasses.replace(self, token=token)


def explicit_values(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings given by `HERO_DEPLOYER_*` variables, overridden by `overrides` (flags)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = os.environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None and raw != "":
            values[f.name] = _parse(f.name, raw)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    return values


def per_step(spec: str, kind: type[float] | type[int]) -> dict[str, float]:
    """`step=value,...` as a dict; ValueError names the part that does not parse."""
    values: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, sep, raw = part.partition("=")
        try:
            if not sep:
                raise ValueError(part)
            values[name.strip()] = kind(raw.strip())
        except ValueError:
            raise ValueError(f"expected step=value, got {part.strip()!r}") from None
    return values


def _parse(name: str, raw: str) -> Any:
    default = {f.name: f for f in dataclasses.fields(Settings)}[name]
    kind = type(getattr(Settings(), name))
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    if kind is frozenset:
        return frozenset(x.strip() for x in raw.split(",") if x.strip())
    if kind is tuple:
        return tuple(int(x) for x in raw.split(",") if x.strip())
    if default.name == "data_dir":
        return Path(raw)
    return raw
