"""The OpenTofu backend: one generated `main.tf` per deployment for the ThreeFold grid provider."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from adapters.compute_power import PowerAction, PowerActions
from adapters.opentofu_hcl import (
    GATEWAY_NAME,
    NETWORKS,
    check_gateway_name,
    grid_name,
    render_gateway,
    render_vm,
)
from core.gateway_names import check_prefix
from core.ports import (
    BackendError,
    BackendGateway,
    BackendNotFound,
    BackendVm,
    BackendVmStatus,
    GatewayNameRegistry,
    GatewaySpec,
    NodeInfo,
    VmSpec,
)

# Provider 1.11.1 reads its mnemonic from MNEMONICS (internal/provider/provider.go), later
# releases from MNEMONIC. The child gets both, so main.tf never holds it.
PROVIDER_MNEMONIC_VARS: Final = ("MNEMONICS", "MNEMONIC")
GATEWAY_BACKENDS: Final = ("network", "mycelium")
UNSUPPORTED: Final = "is not supported by the OpenTofu backend: the grid cannot {} a VM in place"
TAIL_LINES: Final = 20
KILL_GRACE: Final = 10.0


class OpenTofuBackend(PowerActions):
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
        names: GatewayNameRegistry | None = None,
        gateway_backend: str = "network",
        gateway_prefix: str | None = None,
    ) -> None:
        """`names` says who holds a gateway name on the chain; `gateway_backend` is how the
        gateway reaches a VM: `network` (its private IP in the VM's network) or `mycelium`;
        `gateway_prefix`, when given, is the operator's namespace that `check` vets."""
        self._env = dict(os.environ if env is None else env)
        binary = shutil.which(tofu_path, path=self._env.get("PATH"))
        if binary is None:
            raise BackendError(
                f"OpenTofu binary {tofu_path!r} not found: install OpenTofu or set the tofu path"
            )
        if network not in NETWORKS:
            raise BackendError(f"unknown grid network {network!r}: one of {', '.join(NETWORKS)}")
        if gateway_backend not in GATEWAY_BACKENDS:
            raise BackendError(
                f"unknown gateway backend {gateway_backend!r}: one of {', '.join(GATEWAY_BACKENDS)}"
            )
        self._names = names
        self._gateway_backend = gateway_backend
        self._gateway_prefix = gateway_prefix
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

    async def create_vm(self, spec: VmSpec) -> BackendVm:
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

    async def find_vm(self, name: str) -> BackendVm | None:
        work = self._vm_dir(name)
        if not _configured(work):
            return None
        vm = _vm(name, await self._outputs(work))
        if vm is not None:
            return vm
        lock = self._locks.get(work)
        status: BackendVmStatus = "deploying" if lock is not None and lock.locked() else "failed"
        return BackendVm(name=name, node_id=0, mycelium_ip="", status=status)

    async def _power(self, action: PowerAction, name: str) -> None:
        """Refuses: the grid has no power calls for a VM (BackendNotFound if it does not exist)."""
        await self._unsupported(action, name)

    async def destroy_vm(self, name: str) -> None:
        """Destroys the VM's deployment and network; one never deployed counts as deleted."""
        await self._destroy(self._vm_dir(name), f"deleting vm {name}")

    async def deploy_gateway(self, spec: GatewaySpec) -> BackendGateway:
        """Applies a `grid_name_proxy` named `spec.name`; applying it again changes nothing.

        Before its first apply the name must be free on the chain: a name contract someone else
        holds fails at once, not after a long apply.
        """
        work = self._gateway_dir(spec.name)
        async with self._lock(work):
            outputs = await self._outputs(work)
            if not outputs.get("fqdn"):
                if not _has_state(work):
                    await self._claimable(spec.name)
                config = render_gateway(
                    spec, network=self._network, private=await self._private_backend(spec)
                )
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
        if not GATEWAY_NAME.fullmatch(name):
            return
        await self._destroy(self._gateway_dir(name), f"deleting gateway {name}")

    # Operator checks ----------------------------------------------------------------------------

    async def check(self) -> list[str]:
        """What keeps this backend from working, in the operator's words; empty when usable."""
        problems: list[str] = self._prefix_problems()
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

    def _prefix_problems(self) -> list[str]:
        """Why the gateway prefix cannot namespace names on a real grid, if it cannot."""
        if self._gateway_prefix is None:
            return []
        if not self._gateway_prefix:
            return [
                "HERO_DEPLOYER_GATEWAY_PREFIX is not set: gateway names are name contracts, "
                "unique across the whole grid, so a plain username is most likely taken; "
                "set a prefix of your own"
            ]
        problem = check_prefix(self._gateway_prefix)
        return [f"HERO_DEPLOYER_GATEWAY_PREFIX: {problem}"] if problem else []

    # Internals ---------------------------------------------------------------------------------

    def _vm_dir(self, name: str) -> Path:
        return self._work_dir / f"vm_{grid_name(name)}"

    def _gateway_dir(self, name: str) -> Path:
        check_gateway_name(name)
        return self._work_dir / f"gw_{name}"

    async def _claimable(self, name: str) -> None:
        """Raises a permanent BackendError when another twin holds the name contract `name`."""
        if self._names is None:
            return
        holder = await self._names.name_holder(name)
        if holder is not None:
            raise BackendError(
                f"gateway name {name!r} is already registered on the {self._network} grid "
                f"(name contract {holder.contract_id} of twin {holder.twin_id}): names are "
                "unique across the whole grid; set HERO_DEPLOYER_GATEWAY_PREFIX to a prefix "
                "of your own"
            )

    async def _private_backend(self, spec: GatewaySpec) -> tuple[str, str] | None:
        """The VM's network name and private IP when the gateway reaches it over its network."""
        if self._gateway_backend != "network" or not spec.vm_name:
            return None
        outputs = await self._outputs(self._vm_dir(spec.vm_name))
        network, ip = str(outputs.get("network_name") or ""), str(outputs.get("private_ip") or "")
        if not network or not ip:
            raise BackendError(
                f"vm {spec.vm_name} has no private address for gateway {spec.name} yet",
                retryable=True,
            )
        return network, ip

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
        if await self.find_vm(name) is None:
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


# Reading state ----------------------------------------------------------------------------------


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
