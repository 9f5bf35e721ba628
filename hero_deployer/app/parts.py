"""The parts of the setup a service runs with, as `health` reports them (for the banners)."""

from __future__ import annotations

from core.contract import Part
from hero_deployer.app.settings import Settings


def setup_parts(settings: Settings, *, forge: bool, grid_proxy: bool) -> tuple[Part, ...]:
    """The backend, the Forge and the grid proxy this service runs with; no URL, no credential."""
    if settings.backend == "local":
        backend = Part("backend", "ok", "The local grid: VMs are simulated on this machine.")
    else:
        backend = Part("backend", "ok", f"The {settings.backend} backend.")
    parts = [backend, _forge(settings, forge)]
    if settings.backend != "local":
        parts.append(
            Part("grid_proxy", "ok", "A grid proxy picks the nodes.")
            if grid_proxy
            else Part(
                "grid_proxy",
                "missing",
                "No grid proxy is configured (HERO_DEPLOYER_GRIDPROXY_URL): nodes are picked "
                "from the backend's own list, without the grid's view of their capacity.",
            )
        )
    return tuple(parts)


def _forge(settings: Settings, configured: bool) -> Part:
    if not configured:
        return Part(
            "forge",
            "missing",
            "No Forge is configured (HERO_DEPLOYER_FORGE_URL): provisioned users get no Forge "
            "account and no initial password.",
        )
    if not settings.forge_admin_password and not settings.forge_admin_token:
        return Part(
            "forge",
            "missing",
            "The Forge has no admin password or token (HERO_DEPLOYER_FORGE_ADMIN_PASSWORD or "
            "_TOKEN): creating Forge accounts fails.",
        )
    return Part("forge", "ok", "A Forge creates the users' accounts.")
