"""Builds the configured compute backend, and says what is missing when it cannot."""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import structlog

from core.ports import BackendError, ComputeBackend
from hero_deployer.app.settings import Settings

log = structlog.get_logger(__name__)

BACKENDS = ("local", "hero-compute", "opentofu")


async def build_backend(settings: Settings, stack: AsyncExitStack) -> ComputeBackend:
    """The backend `settings.backend` names, entered on `stack`; BackendError if unusable."""
    match settings.backend:
        case "local":
            from adapters.localgrid import LocalGrid

            grid = LocalGrid(
                data_dir=settings.data_dir,
                deploy_delay=settings.local_deploy_delay,
                action_delay=settings.local_action_delay,
                ssh=settings.local_ssh,
                gateway_port=_stable_port(settings.data_dir / "localgrid" / "gateway.port"),
                own_process=True,  # the simulated machines take neither the service's loop nor GIL
            )
            return cast(ComputeBackend, await stack.enter_async_context(grid))
        case "hero-compute":
            from adapters.herocompute import HeroComputeBackend

            if not settings.hero_compute_secret:
                raise BackendError("hero-compute needs HERO_DEPLOYER_HERO_COMPUTE_SECRET")
            backend = HeroComputeBackend(
                url=settings.hero_compute_url or None,
                socket_path=settings.hero_compute_socket or None,
                owner_secret=settings.hero_compute_secret,
                timeout=settings.hero_compute_timeout,
                deploy_timeout=settings.hero_compute_deploy_timeout,
            )
            return cast(ComputeBackend, await stack.enter_async_context(backend))
        case "opentofu":
            from adapters.gridproxy_http import GridProxyDirectory
            from adapters.opentofu import OpenTofuBackend

            def step_log(line: str) -> None:
                log.info("tofu", line=line)

            names = GridProxyDirectory(gridproxy_url(settings))
            return OpenTofuBackend(
                work_dir=settings.data_dir / "opentofu",
                tofu_path=settings.tofu_path,
                network=settings.tofu_network,
                mnemonic_env=settings.tofu_mnemonic_env,
                timeout=settings.tofu_timeout,
                log=step_log,
                names=await stack.enter_async_context(names),
                gateway_backend=settings.gateway_backend,
                gateway_prefix=settings.gateway_prefix,
            )
    raise BackendError(f"unknown backend {settings.backend!r}; choose one of {', '.join(BACKENDS)}")


def gridproxy_url(settings: Settings) -> str:
    """The configured grid proxy; for the OpenTofu backend, its network's by default."""
    if settings.gridproxy_url or settings.backend != "opentofu":
        return settings.gridproxy_url
    from adapters.gridproxy_http import gridproxy_url_for

    try:
        return gridproxy_url_for(settings.tofu_network)
    except ValueError as error:
        raise BackendError(str(error)) from None


def _stable_port(path: Path) -> int:
    """A loopback port chosen at the first start and kept in `path`, so URLs survive restarts."""
    if path.exists():
        return int(path.read_text().strip())
    from hero_deployer.app.natsserver import free_port

    port = free_port()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{port}\n")
    return port


@dataclass(frozen=True, slots=True)
class BackendCheck:
    """What `backend check` found: problems make the setup unusable, notes are worth reading."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


async def check_backend(settings: Settings, *, if_inet6: Path | None = None) -> BackendCheck:
    """The configured backend's problems and notes, the Forge's, and this host's mycelium."""
    report = BackendCheck()
    if settings.backend != "local":
        # the local grid needs nothing, and entering it would take the ledger a service holds
        await _check_compute(settings, report)
        from adapters.mycelium_host import IF_INET6, mycelium_note

        note = mycelium_note(if_inet6 or IF_INET6)
        report.notes.extend([note] if note else [])
    if settings.forge_url:
        report.problems.extend(await _check_forge(settings))
    return report


async def _check_compute(settings: Settings, report: BackendCheck) -> None:
    """Adds what the backend's own check says (`check_report` when it has notes too)."""
    async with AsyncExitStack() as stack:
        try:
            backend = await build_backend(settings, stack)
        except BackendError as error:
            report.problems.append(error.message)
            return
        check_report = getattr(backend, "check_report", None)
        check = getattr(backend, "check", None)
        if check_report is not None:
            problems, notes = await check_report()
            report.problems.extend(problems)
            report.notes.extend(notes)
        elif check is not None:
            report.problems.extend(await check())


async def _check_forge(settings: Settings) -> list[str]:
    """Whether the Forge admin credentials work and a token has the scopes the calls need."""
    from adapters.forge_http import ForgejoClient

    if not settings.forge_admin_password and not settings.forge_admin_token:
        return ["forge_url is set but neither a Forge admin password nor an admin token is"]
    async with ForgejoClient(
        settings.forge_url,
        admin_user=settings.forge_admin_user,
        admin_password=settings.forge_admin_password or None,
        admin_token=settings.forge_admin_token or None,
    ) as client:
        return await client.check()
