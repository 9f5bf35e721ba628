"""The OpenTofu backend: one generated `main.tf` per deployment for the ThreeFold grid provider."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from core.ports import (
    BackendError,
    BackendGateway,
    BackendNotFound,
    BackendVm,
    BackendVmStatus,
    GatewaySpec,
    NodeInfo,
    VmSpec,
)

FLISTS: Final = {
    "ubuntu-24.04": "https://hub.grid.tf/tf-official-vms/ubuntu-24.04-full.flist",
}
NETWORKS: Final = frozenset({"main", "test", "qa", "dev"})
GATEWAY_NAME: Final = re.compile(r"^[a-zA-Z0-9_]+$")
DISK_MOUNT: Final = "/data"
# The provider reads its mnemonic from the environment; older releases read MNEMONICS, newer
# ones MNEMONIC. The child gets both, so main.tf never holds it.
PROVIDER_MNEMONIC_VARS: Final = ("MNEMONICS", "MNEMONIC")
UNSUPPORTED: Final = "is not supported by the OpenTofu backend: the grid cannot {} a VM in place"
TAIL_LINES: Final = 20
KILL_GRACE: Final = 10.0


class OpenTofuBackend:
    """A ComputeBackend that drives `tofu` against the ThreeFold grid's Terraform provider."""

    def __init__(
        self,
        *,
        work_dir: Path,
        tofu_path: str = "tofu",
        network: str = "main",
        mnemonic_env: str = "TFGRID_MNEMONIC",
        timeout: float = 900.0,
        log: Callable[[str], None] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._env = dict(os.environ if env is None else env)
        binary = shutil.which(tofu_path, path=self._env.get("PATH"))
        if binary is None:
            raise BackendError(
                f"OpenTofu binary {tofu_path!r} not found: install OpenTofu or set the tofu path"
            )
        if network not in NETWORKS:
            raise BackendError(f"unknown grid network {network!r}: one of {', '.join(NETWORKS)}")
        self._tofu = binary
        self._work_dir = work_dir
        self._network = network
        self._mnemonic_env = mnemonic_env
        self._timeout = timeout
        self._log = log or (lambda _line: None)
        self._locks: dict[Path, asyncio.Lock] = {}

    # ComputeBackend ---------------------------------------------------------------------------

    async def list_nodes(self) -> list[NodeInfo]:
        """No node list from here: nodes come from the grid proxy (NodeDirectory)."""
        return []

    async def deploy_vm(self, spec: VmSpec) -> BackendVm:
        """Applies the VM's configuration unless its state already holds it; returns it running."""
        config = render_vm(spec, network=self._network)
        work = self._vm_dir(spec.name)
        async with self._lock(work):
            outputs = await self._outputs(work)
            if not outputs.get("mycelium_ip") and not outputs.get("public_ip"):
                async with self._deadline(f"deploying vm {spec.name}"):
                    await self._apply(work, config)
                    outputs = await self._outputs(work)
        vm = _vm(spec.name, outputs)
        if vm is None:
            raise BackendError(f"tofu applied vm {spec.name} but output no address", retryable=True)
        return vm

    async def get_vm(self, name: str) -> BackendVm | None:
        work = self._vm_dir(name)
        if not _configured(work):
            return None
        vm = _vm(name, await self._outputs(work))
        if vm is not None:
            return vm
        lock = self._locks.get(work)
        status: BackendVmStatus = "deploying" if lock is not None and lock.locked() else "failed"
        return BackendVm(name=name, node_id=0, mycelium_ip="", status=status)

    async def start_vm(self, name: str) -> None:
        await self._unsupported("start", name)

    async def stop_vm(self, name: str) -> None:
        await self._unsupported("stop", name)

    async def restart_vm(self, name: str) -> None:
        await self._unsupported("restart", name)

    async def delete_vm(self, name: str) -> None:
        """Destroys the VM's deployment and network; one never deployed counts as deleted."""
        await self._destroy(self._vm_dir(name), f"deleting vm {name}")

    async def deploy_gateway(self, spec: GatewaySpec) -> BackendGateway:
        """Applies a `grid_name_proxy` named `spec.name`; applying it again changes nothing."""
        config = render_gateway(spec, network=self._network)
        work = self._gateway_dir(spec.name)
        async with self._lock(work):
            outputs = await self._outputs(work)
            if not outputs.get("fqdn"):
                async with self._deadline(f"deploying gateway {spec.name}"):
                    await self._apply(work, config)
                    outputs = await self._outputs(work)
        fqdn = str(outputs.get("fqdn") or "")
        if not fqdn:
            raise BackendError(
                f"tofu applied gateway {spec.name} but output no fqdn", retryable=True
            )
        return BackendGateway(name=spec.name, fqdn=fqdn, url=f"https://{fqdn}")

    async def delete_gateway(self, name: str) -> None:
        if not GATEWAY_NAME.match(name):
            return
        await self._destroy(self._gateway_dir(name), f"deleting gateway {name}")

    # Operator checks ----------------------------------------------------------------------------

    async def check(self) -> list[str]:
        """What keeps this backend from working, in the operator's words; empty when usable."""
        problems: list[str] = []
        if not self._env.get(self._mnemonic_env):
            problems.append(
                f"environment variable {self._mnemonic_env} (the grid mnemonic) is not set"
            )
        try:
            self._work_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self._work_dir, os.W_OK):
                problems.append(f"work dir {self._work_dir} is not writable")
        except OSError as e:
            problems.append(f"work dir {self._work_dir} cannot be created: {e.strerror}")
        try:
            async with asyncio.timeout(30):
                code, tail = await self._run(["version"], self._work_dir, quiet=True)
            if code != 0:
                problems.append(f"`{self._tofu} version` failed: {tail}")
        except (TimeoutError, OSError, BackendError) as e:
            problems.append(f"`{self._tofu} version` did not run: {e}")
        return problems

    # Internals ---------------------------------------------------------------------------------

    def _vm_dir(self, name: str) -> Path:
        return self._work_dir / f"vm_{grid_name(name)}"

    def _gateway_dir(self, name: str) -> Path:
        if not GATEWAY_NAME.match(name):
            raise BackendError(f"gateway name {name!r} must match {GATEWAY_NAME.pattern}")
        return self._work_dir / f"gw_{name}"

    def _lock(self, work: Path) -> asyncio.Lock:
        return self._locks.setdefault(work, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _deadline(self, what: str) -> AsyncIterator[None]:
        """Bounds a whole operation by the backend's timeout; expiry is a retryable error."""
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except TimeoutError:
            raise BackendError(
                f"{what} took longer than {self._timeout:g}s", retryable=True
            ) from None

    async def _unsupported(self, verb: str, name: str) -> None:
        if await self.get_vm(name) is None:
            raise BackendNotFound(f"no vm named {name}")
        raise BackendError(f"{verb} {UNSUPPORTED.format(verb)}")

    async def _apply(self, work: Path, config: str) -> None:
        _write_config(work, config)
        await self._step(work, ["init", "-input=false", "-no-color"])
        await self._step(work, ["apply", "-auto-approve", "-input=false", "-no-color"])

    async def _destroy(self, work: Path, what: str) -> None:
        async with self._lock(work):
            if _configured(work):
                async with self._deadline(what):
                    await self._step(work, ["init", "-input=false", "-no-color"])
                    await self._step(
                        work, ["destroy", "-auto-approve", "-input=false", "-no-color"]
                    )
            shutil.rmtree(work, ignore_errors=True)

    async def _outputs(self, work: Path) -> dict[str, Any]:
        """The values of `tofu output -json`, empty when nothing was applied yet."""
        if not _configured(work) or not _has_state(work):
            return {}
        async with self._deadline(f"reading outputs in {work.name}"):
            code, text = await self._run(["output", "-json", "-no-color"], work, quiet=True)
        if code != 0:
            raise BackendError(f"tofu output failed: {text}", retryable=True)
        return parse_outputs(text)

    async def _step(self, work: Path, args: Sequence[str]) -> None:
        code, tail = await self._run(args, work)
        if code != 0:
            raise BackendError(f"tofu {args[0]} failed (exit {code}): {tail}", retryable=True)

    async def _run(self, args: Sequence[str], cwd: Path, *, quiet: bool = False) -> tuple[int, str]:
        """Runs tofu, streaming its lines to the log; the exit code and the output's tail."""
        mnemonic = self._env.get(self._mnemonic_env, "")
        if not mnemonic and args[0] not in ("version", "output"):
            raise BackendError(f"environment variable {self._mnemonic_env} is not set")
        env = {**self._env, "TF_IN_AUTOMATION": "1", "TF_INPUT": "0"}
        env.update(dict.fromkeys(PROVIDER_MNEMONIC_VARS, mnemonic))
        env.update({"NETWORK": self._network})

        def redact(line: str) -> str:
            return line.replace(mnemonic, "***") if mnemonic else line

        try:
            proc = await asyncio.create_subprocess_exec(
                self._tofu,
                *args,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE if quiet else asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            raise BackendError(f"cannot run {self._tofu}: {e.strerror}") from None
        try:
            if quiet:
                out, err = await proc.communicate()
                code = proc.returncode if proc.returncode is not None else -1
                text = out.decode(errors="replace") if code == 0 else err.decode(errors="replace")
                return code, redact(text.strip())
            tail: deque[str] = deque(maxlen=TAIL_LINES)
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = redact(raw.decode(errors="replace").rstrip())
                tail.append(line)
                self._log(line)
            code = await proc.wait()
            return code, "\n".join(line for line in tail if line.strip())
        finally:
            if proc.returncode is None:
                await _terminate(proc)


def _configured(work: Path) -> bool:
    return (work / "main.tf").exists()


def _has_state(work: Path) -> bool:
    return any(work.glob("*.tfstate"))


def _write_config(work: Path, config: str) -> None:
    """Writes main.tf, leaving it untouched when it already says the same."""
    work.mkdir(parents=True, exist_ok=True)
    main_tf = work / "main.tf"
    if not main_tf.exists() or main_tf.read_text() != config:
        main_tf.write_text(config)


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """Interrupts tofu (so it releases its state lock), then kills it after a grace period."""
    for sig, grace in ((signal.SIGINT, KILL_GRACE), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        if grace is None:
            break
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await proc.wait()
                return
    await proc.wait()


# Configuration --------------------------------------------------------------------------------


def grid_name(name: str) -> str:
    """A grid-safe workload name (lowercase alphanumerics and `_`) unique for `name`."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40]
    if slug == name and slug:
        return slug
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{slug}_{digest}" if slug else f"vm_{digest}"


def render_vm(spec: VmSpec, *, network: str) -> str:
    """The main.tf of one VM: its network with mycelium keys and its deployment, sizes in MB."""
    flist = FLISTS.get(spec.image)
    if flist is None:
        raise BackendError(f"image {spec.image!r} is not available: one of {', '.join(FLISTS)}")
    if not spec.mycelium and not spec.public_ip:
        raise BackendError("a vm needs mycelium or a public ip to be reachable")
    name = grid_name(spec.name)
    if spec.node_id is None:
        node = 'grid_scheduler.sched.nodes["vm"]'
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
    else:
        node = str(spec.node_id)
        scheduler = ""
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
    vm_body.append(_block("mounts", [_attr("name", "data"), _attr("mount_point", DISK_MOUNT)]))
    vm_body.append(_map("env_vars", {"SSH_KEY": "\n".join(spec.ssh_keys)}))
    network_body = [
        _attr("name", f"net_{name}"),
        _attr("description", f"hero-deployer network of {spec.name}"),
        _raw("nodes", f"[{node}]"),
        _attr("ip_range", "10.1.0.0/16"),
    ]
    if spec.mycelium:
        key = _hcl(str(spec.node_id)) if spec.node_id is not None else f'format("%s", {node})'
        network_body.append(_block("mycelium_keys =", [_raw(key, "random_bytes.mycelium_key.hex")]))
    parts = [
        _preamble(network),
        _block('resource "random_bytes" "mycelium_key"', [_attr("length", 32)]),
        _block('resource "random_bytes" "mycelium_ip_seed"', [_attr("length", 6)]),
        scheduler,
        _block('resource "grid_network" "net"', network_body),
        _block(
            'resource "grid_deployment" "vm"',
            [
                _attr("name", name),
                _raw("node", node),
                _raw("network_name", "grid_network.net.name"),
                _block("disks", [_attr("name", "data"), _attr("size", spec.disk_gb)]),
                _block("vms", vm_body),
            ],
        ),
        _output("node_id", "grid_deployment.vm.node"),
        _output("mycelium_ip", "grid_deployment.vm.vms[0].mycelium_ip"),
        _output("public_ip", "grid_deployment.vm.vms[0].computedip"),
    ]
    return "\n".join(p for p in parts if p)


def render_gateway(spec: GatewaySpec, *, network: str) -> str:
    """The main.tf of one web gateway: a `grid_name_proxy` on the node, to the backend URL."""
    if not GATEWAY_NAME.match(spec.name):
        raise BackendError(f"gateway name {spec.name!r} must match {GATEWAY_NAME.pattern}")
    parts = [
        _preamble(network),
        _block(
            'resource "grid_name_proxy" "gateway"',
            [
                _attr("node", spec.node_id),
                _attr("name", spec.name),
                _attr("backends", [spec.backend_url]),
                _attr("tls_passthrough", False),
            ],
        ),
        _output("fqdn", "grid_name_proxy.gateway.fqdn"),
    ]
    return "\n".join(parts)


def parse_outputs(text: str) -> dict[str, Any]:
    """The output values of `tofu output -json` (`{name: {"value": v, ...}}`) by name."""
    try:
        data = json.loads(text or "{}")
    except json.JSONDecodeError:
        raise BackendError("tofu output -json printed no JSON", retryable=True) from None
    if not isinstance(data, dict):
        raise BackendError("tofu output -json printed no JSON object", retryable=True)
    return {k: v.get("value") for k, v in data.items() if isinstance(v, dict)}


def _vm(name: str, outputs: Mapping[str, Any]) -> BackendVm | None:
    mycelium_ip = str(outputs.get("mycelium_ip") or "")
    public_ip = str(outputs.get("public_ip") or "").split("/")[0]
    if not mycelium_ip and not public_ip:
        return None
    return BackendVm(
        name=name,
        node_id=int(outputs.get("node_id") or 0),
        mycelium_ip=mycelium_ip,
        status="running",
        ssh_host=mycelium_ip or public_ip,
    )


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
                            _block("grid =", [_attr("source", "threefoldtech/grid")]),
                            _block("random =", [_attr("source", "hashicorp/random")]),
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
