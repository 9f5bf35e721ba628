"""The per-user `services.toml` that tells a Hero OS VM which services to run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from core.usernames import username_problem


@dataclass(frozen=True, slots=True)
class Service:
    """One service of a profile: the binary to start and the loopback port it listens on."""

    name: str
    binary: str
    port: int
    args: tuple[str, ...] = ()


SERVICES: dict[str, Service] = {
    s.name: s
    for s in (
        # The proxy is the VM's front door: the web gateway forwards to its port.
        Service("proxy", "hero_proxy", 9988),
        Service("router", "hero_router", 9990),
        Service("proc", "hero_proc", 9991),
        Service("cockpit", "hero_cockpit", 9992),
        Service("embedder-small", "hero_embedder", 9993, ("--model", "small")),
        Service("db", "hero_db", 9994),
        Service("books", "hero_books", 9995),
    )
}

PROFILES: dict[str, tuple[str, ...]] = {
    "demo": ("proxy", "router", "proc", "cockpit", "embedder-small", "db", "books"),
}


def render_services_toml(username: str, profile: str = "demo") -> str:
    """Renders the manifest of `profile` for `username`; ValueError for an unknown profile."""
    if username_problem(username) is not None:
        raise ValueError(f"not a valid username: {username!r}")
    try:
        names = PROFILES[profile]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown profile {profile!r} (known: {known})") from None
    lines = [
        "# Rendered by hero-deployer; changes are overwritten on the next provisioning.",
        "[meta]",
        f"user = {_toml_str(username)}",
        f"profile = {_toml_str(profile)}",
    ]
    for name in names:
        service = SERVICES[name]
        lines += [
            "",
            "[[service]]",
            f"name = {_toml_str(service.name)}",
            f"binary = {_toml_str(service.binary)}",
            f"port = {service.port}",
            f"args = [{', '.join(_toml_str(a) for a in service.args)}]",
        ]
    return "\n".join(lines) + "\n"


def sha256_hex(text: str) -> str:
    """The SHA-256 of the UTF-8 bytes of `text`, hex encoded."""
    return hashlib.sha256(text.encode()).hexdigest()


def _toml_str(value: str) -> str:
    """A TOML basic string; JSON's escaping is a valid subset of TOML's."""
    return json.dumps(value, ensure_ascii=False)
