"""The main.tf of a VM or a gateway for the ThreeFold grid's Terraform provider, and grid names."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from core.gateway_names import GRID_GATEWAY_NAME
from core.ports import BackendError, GatewaySpec, VmSpec

FLISTS: Final = {
    "ubuntu-24.04": "https://hub.grid.tf/tf-official-vms/ubuntu-24.04-full.flist",
}
NETWORKS: Final = frozenset({"main", "test", "qa", "dev"})
# The provider release main.tf is written for, pinned: its schema moved between releases
# (`mounts { disk_name }` until 1.11.1, `mounts { name }` after; the development line's
# scheduler requires `yggdrasil` and `wireguard`). Every block below follows 1.11.1's
# threefoldtech/terraform-provider-grid `docs/resources/*.md` and `internal/provider/*.go`.
PROVIDER_VERSION: Final = "1.11.1"
RANDOM_VERSION: Final = "3.6.3"
# A workload name: `^[a-zA-Z0-9_]+$`, 1..36 characters (threefoldtech/zosbase
# `pkg/gridtypes/id.go` IsValidName); ours are lowercase and at most 32, leaving room for the
# network's `net_`. A mapped name ends with `_` and 12 hex characters, which no kept name does.
WORKLOAD_NAME_MAX: Final = 36
_KEPT_NAME: Final = re.compile(r"[a-z0-9_]{1,32}")
_MAPPED_SUFFIX: Final = re.compile(r"_[0-9a-f]{12}\Z")
_RESERVED_NAMES: Final = frozenset({"ygg"})  # zosbase pkg/gridtypes/id.go reservedNames
GATEWAY_NAME: Final = GRID_GATEWAY_NAME
DISK_MOUNT: Final = "/data"


def grid_name(name: str) -> str:
    """A workload name for `name`: at most 32 lowercase alphanumerics and `_`, unique for it.

    Names of that form that do not look mapped (sids like `vm_0193…`) stay as they are; any
    other is its lowercase slug, cut, plus `_` and 12 hex characters of its SHA-256.
    """
    if (
        _KEPT_NAME.fullmatch(name)
        and not _MAPPED_SUFFIX.search(name)
        and name not in _RESERVED_NAMES
    ):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:19]
    return f"{slug}_{digest}" if slug else f"vm_{digest}"


def check_gateway_name(name: str) -> None:
    if not GATEWAY_NAME.fullmatch(name):
        raise BackendError(
            f"gateway name {name!r} must match {GATEWAY_NAME.pattern}: a workload name "
            "(at most 36 characters) that is also a name contract (lowercase)"
        )


def render_vm(spec: VmSpec, *, network: str) -> str:
    """The main.tf of one VM: its network with mycelium keys and its deployment, sizes in MB."""
    flist = FLISTS.get(spec.image)
    if flist is None:
        raise BackendError(f"image {spec.image!r} is not available: one of {', '.join(FLISTS)}")
    if not spec.mycelium and not spec.public_ip:
        raise BackendError("a vm needs mycelium or a public ip to be reachable")
    name = grid_name(spec.name)
    node, scheduler = _node(spec)
    parts = [
        _preamble(network),
        _block('resource "random_bytes" "mycelium_key"', [_attr("length", 32)]),
        _block('resource "random_bytes" "mycelium_ip_seed"', [_attr("length", 6)]),
        scheduler,
        _block('resource "grid_network" "net"', _network_body(spec, name, node)),
        _block(
            'resource "grid_deployment" "vm"',
            [
                _attr("name", name),
                _raw("node", node),
                _raw("network_name", "grid_network.net.name"),
                _block("disks", [_attr("name", "data"), _attr("size", spec.disk_gb)]),
                _block("vms", _vm_body(spec, name, flist)),
            ],
        ),
        _output("node_id", "grid_deployment.vm.node"),
        _output("mycelium_ip", "grid_deployment.vm.vms[0].mycelium_ip"),
        _output("public_ip", "grid_deployment.vm.vms[0].computedip"),
        _output("private_ip", "grid_deployment.vm.vms[0].ip"),
        _output("network_name", "grid_network.net.name"),
    ]
    return "\n".join(p for p in parts if p)


def _node(spec: VmSpec) -> tuple[str, str]:
    """The VM's node expression, and the `grid_scheduler` that picks it when none is given."""
    if spec.node_id is not None:
        return str(spec.node_id), ""
    scheduler = _block(
        'resource "grid_scheduler" "sched"',
        [
            _block(
                "requests",
                [
                    _attr("name", "vm"),
                    _attr("cru", spec.cpu_count),
                    _attr("mru", spec.memory_gb * 1024),
                    _attr("sru", (spec.rootfs_gb + spec.disk_gb) * 1024),
                    _attr("public_ips_count", 1 if spec.public_ip else 0),
                ],
            )
        ],
    )
    return 'grid_scheduler.sched.nodes["vm"]', scheduler


def _vm_body(spec: VmSpec, name: str, flist: str) -> list[str]:
    """The `vms` block of the deployment: sizes, mycelium seed, the data disk and SSH keys."""
    vm_body = [
        _attr("name", name),
        _attr("flist", flist),
        _attr("entrypoint", "/sbin/zinit init"),
        _attr("cpu", spec.cpu_count),
        _attr("memory", spec.memory_gb * 1024),
        _attr("rootfs_size", spec.rootfs_gb * 1024),
        _attr("publicip", spec.public_ip),
    ]
    if spec.mycelium:
        vm_body.append(_raw("mycelium_ip_seed", "random_bytes.mycelium_ip_seed.hex"))
    # 1.11.1 docs/resources/deployment.md, `vms.mounts`: `disk_name` and `mount_point`.
    vm_body.append(_block("mounts", [_attr("disk_name", "data"), _attr("mount_point", DISK_MOUNT)]))
    vm_body.append(_map("env_vars", {"SSH_KEY": "\n".join(spec.ssh_keys)}))
    return vm_body


def _network_body(spec: VmSpec, name: str, node: str) -> list[str]:
    """The `grid_network` block's body, with a mycelium key for the VM's node."""
    network_body = [
        _attr("name", f"net_{name}"),
        _attr("description", f"hero-deployer network of {spec.name}"),
        _raw("nodes", f"[{node}]"),
        _attr("ip_range", "10.1.0.0/16"),
    ]
    if spec.mycelium:
        key = _hcl(str(spec.node_id)) if spec.node_id is not None else f'format("%s", {node})'
        network_body.append(_block("mycelium_keys =", [_raw(key, "random_bytes.mycelium_key.hex")]))
    return network_body


def render_gateway(
    spec: GatewaySpec, *, network: str, private: tuple[str, str] | None = None
) -> str:
    """The main.tf of one web gateway: a `grid_name_proxy` on the node, to the backend URL.

    With `private` (the VM's network name and private IP) the gateway joins that network and
    forwards to the private IP on the backend URL's port: 1.11.1's documented pattern for a VM
    without a public IP (docs/resources/private_gateway.md, `network` in name_proxy.md).
    """
    check_gateway_name(spec.name)
    body = [_attr("node", spec.node_id), _attr("name", spec.name)]
    if private is None:
        body.append(_attr("backends", [spec.backend_url]))
    else:
        net, ip = private
        body.append(_attr("backends", [_with_host(spec.backend_url, ip)]))
        body.append(_attr("network", net))
    body.append(_attr("tls_passthrough", False))
    parts = [
        _preamble(network),
        _block('resource "grid_name_proxy" "gateway"', body),
        _output("fqdn", "grid_name_proxy.gateway.fqdn"),
    ]
    return "\n".join(parts)


def _with_host(url: str, host: str) -> str:
    """`url` with its host replaced by `host`, its scheme and port kept."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}"


def _preamble(network: str) -> str:
    return "\n".join(
        [
            "# Generated by hero-deployer; edits are overwritten. The provider reads the",
            "# mnemonic from the environment, never from this file.",
            _block(
                "terraform",
                [
                    _block(
                        "required_providers",
                        [
                            _block(
                                "grid =",
                                [
                                    _attr("source", "threefoldtech/grid"),
                                    _attr("version", f"= {PROVIDER_VERSION}"),
                                ],
                            ),
                            _block(
                                "random =",
                                [
                                    _attr("source", "hashicorp/random"),
                                    _attr("version", f"= {RANDOM_VERSION}"),
                                ],
                            ),
                        ],
                    )
                ],
            ),
            _block('provider "grid"', [_attr("network", network)]),
        ]
    )


def _hcl(value: Any) -> str:
    """An HCL literal; strings are JSON-quoted with template sequences escaped."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value).replace("${", "$${").replace("%{", "%%{")
    if isinstance(value, list):
        return "[" + ", ".join(_hcl(v) for v in value) + "]"
    raise TypeError(f"no HCL literal for {type(value).__name__}")


def _attr(key: str, value: Any) -> str:
    return f"{key} = {_hcl(value)}"


def _raw(key: str, expression: str) -> str:
    return f"{key} = {expression}"


def _map(key: str, values: Mapping[str, str]) -> str:
    return _block(f"{key} =", [_attr(k, v) for k, v in values.items()])


def _block(header: str, body: Sequence[str]) -> str:
    inner = "\n".join("  " + line for item in body for line in item.splitlines())
    return f"{header} {{\n{inner}\n}}\n"


def _output(name: str, expression: str) -> str:
    return _block(f'output "{name}"', [_raw("value", expression)])
