"""Builds the configured compute backend, and says what is missing when it cannot."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import cast

import structlog

from core.ports import BackendError, ComputeBackend
from hero_deployer.settings import Settings

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
            from adapters.opentofu import OpenTofuBackend

            def step_log(line: str) -> None:
                log.info("tofu", line=line)

            return OpenTofuBackend(
                work_dir=settings.data_dir / "opentofu",
                tofu_path=settings.tofu_path,
                network=settings.tofu_network,
                mnemonic_env=settings.tofu_mnemonic_env,
                timeout=settings.tofu_timeout,
                log=step_log,
            )
    raise BackendError(f"unknown backend {settings.backend!r}; choose one of {', '.join(BACKENDS)}")


def _stable_port(path: Path) -> int:
    """A loopback port chosen at the first start and kept in `path`, so URLs survive restarts."""
    if path.exists():
        return int(path.read_text().strip())
    from hero_deployer.natsserver import free_port

    port = free_port()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{port}\n")
    return port


async def check_backend(settings: Settings) -> list[str]:
    """Human-readable problems with the configured backend; empty when it is usable."""
    if settings.backend == "local":
        # it needs nothing, and entering it would take the ledger of the grid a service runs
        return []
    async with AsyncExitStack() as stack:
        try:
            backend = await build_backend(settings, stack)
        except BackendError as error:
            return [error.message]
        check = getattr(backend, "check", None)
        if check is None:
            return []
        problems: list[str] = await check()
        return problems
