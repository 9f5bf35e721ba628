"""Whether this host is on mycelium: an IPv6 address in 400::/7 on one of its interfaces.

A VM without a public IP is reachable only over mycelium (its `mycelium_ip`), so the deployer
host must be on mycelium itself to SSH into it. Linux lists the host's IPv6 addresses in
`/proc/net/if_inet6`: one line per address, 32 hex digits, then the interface index, the prefix
length, the scope, the flags (all hex) and the interface name.
"""

from __future__ import annotations

from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Final

MYCELIUM_NETWORK: Final = IPv6Network("400::/7")
IF_INET6: Final = Path("/proc/net/if_inet6")


def mycelium_addresses(if_inet6: str) -> list[tuple[str, IPv6Address]]:
    """(interface, address) of every mycelium address in the text of `/proc/net/if_inet6`."""
    found: list[tuple[str, IPv6Address]] = []
    for line in if_inet6.splitlines():
        fields = line.split()
        if len(fields) < 6 or len(fields[0]) != 32:
            continue
        try:
            address = IPv6Address(int(fields[0], 16))
        except ValueError:
            continue
        if address in MYCELIUM_NETWORK:
            found.append((fields[5], address))
    return found


def mycelium_note(if_inet6: Path = IF_INET6) -> str | None:
    """A note for the operator when this host has no mycelium address; None when it has one."""
    try:
        text = if_inet6.read_text()
    except OSError:
        return (
            f"cannot tell whether this host is on mycelium ({if_inet6} is not readable); "
            "SSH to VMs that only have a mycelium address needs it"
        )
    if mycelium_addresses(text):
        return None
    return (
        "this host has no mycelium address (400::/7): it cannot SSH into VMs that only have a "
        "mycelium address, so user provisioning fails at wait_ssh; run mycelium on this host"
    )
