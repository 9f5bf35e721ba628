import json
import os
import re
import sys
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest

from adapters.gridproxy_http import GridProxyDirectory
from adapters.opentofu import OpenTofuBackend, parse_outputs
from adapters.opentofu_hcl import PROVIDER_VERSION, grid_name, render_gateway, render_vm
from core.ports import BackendError, GatewaySpec, VmSpec
from tests.compute_contract import ComputeBackendContract, small_vm
from tests.fakes.gridproxy import FakeGridProxy, NameRegistry

ROOT = Path(__file__).resolve().parents[1]

MNEMONIC = "winter cactus orbit hidden velvet rapid tiger lava spoon guide laptop hero"

# A stand-in `tofu`: checks the generated main.tf the way the pinned grid provider (1.11.1), the
# node and the chain would reject it, keeps its state in terraform.tfstate as tofu does, and
# prints what tofu prints. Gateway names go through the name registry every deployer shares
# (FAKE_GRID_REGISTRY, as this deployer's twin FAKE_TWIN_ID). Faults come from the environment:
# FAKE_TOFU_FAIL_APPLY, FAKE_TOFU_HANG_APPLY, FAKE_TOFU_ECHO_MNEMONIC.
FAKE_TOFU = r"""
import hashlib, ipaddress, json, os, re, sys, time
from pathlib import Path
from urllib.parse import urlsplit


def registry():
    # imported only when a gateway needs it: it brings aiohttp, slow to import
    sys.path.insert(0, os.environ["FAKE_REPO_ROOT"])
    from tests.fakes.gridproxy import NameContractError, NameRegistry
    return NameRegistry(Path(os.environ["FAKE_GRID_REGISTRY"])), NameContractError

args = sys.argv[1:]
cwd = Path.cwd()
with open(os.environ["FAKE_TOFU_LOG"], "a") as log:
    log.write(json.dumps({"args": args, "dir": cwd.name, "pid": os.getpid(),
                          "mnemonic": os.environ.get("MNEMONICS") == os.environ["FAKE_MNEMONIC"],
                          "network": os.environ.get("NETWORK")}) + "\n")
PINNED = "1.11.1"

def fail(message):
    out = sys.stderr if "-json" in args else sys.stdout
    print("\u2577\n\u2502 Error: " + message + "\n\u2502\n\u2575", file=out)
    sys.exit(1)

def number(text, key):
    m = re.search(r"^\s*" + key + r"\s*=\s*(\d+)\s*$", text, re.M)
    return int(m.group(1)) if m else None

def string(text, key):
    m = re.search(r"^\s*" + key + r'\s*=\s*"([^"]*)"\s*$', text, re.M)
    return m.group(1) if m else None

def block(text, header):
    m = re.search(r"^(\s*)" + header + r" \{\n(.*?)^\1\}", text, re.M | re.S)
    return m.group(2) if m else None

def check_names(text):
    # threefoldtech/zosbase pkg/gridtypes/id.go IsValidName: every workload name (vm, disk,
    # network, deployment, gateway) is 1..36 of [a-zA-Z0-9_] and not "ygg"; the provider's own
    # nameValidationRegex (internal/provider/provider.go) is the same pattern.
    for name in re.findall(r'^\s*name = "([^"]*)"', text, re.M):
        if not name:
            fail("name cannot be empty")
        if len(name) > 36:
            fail(f"name {name} cannot exceed 36 characters")
        if not re.fullmatch(r"[a-zA-Z0-9_]+", name):
            fail(f"unsupported character in workload name {name}")
        if name == "ygg":
            fail("invalid name 'ygg' is reserved")

def check_provider(text):
    # The stand-in implements terraform-provider-grid 1.11.1's schema only; an unpinned
    # provider would be whatever release is newest, with another schema.
    grid = block(text, "grid =")
    if grid is None or string(grid, "source") != "threefoldtech/grid":
        fail("provider threefoldtech/grid is not required")
    if string(grid, "version") != "= " + PINNED:
        fail("provider threefoldtech/grid is not pinned to = " + PINNED)
    if string(text, "network") not in ("main", "test", "qa", "dev"):
        fail("network must be one of dev, qa, test, main")

def check_vm(text):
    if not string(text, "flist").endswith("/ubuntu-24.04-full.flist"):
        fail("unexpected flist")
    memory, rootfs = number(text, "memory"), number(text, "rootfs_size")
    cpu = number(text, "cpu")
    if memory is None or not 256 <= memory <= 262144:
        fail("memory must be between 256MBs and 262144MBs")
    if rootfs is None or rootfs < 1024:
        fail("rootfs_size must be at least 1024MBs")
    if cpu is None or not 1 <= cpu <= 32:
        fail("cpu must be between 1 and 32")
    size = number(text, "size")
    if size is None or not 1 <= size <= 10240:
        fail("disk size must be between 1GB and 10240GBs")
    # 1.11.1 internal/provider/resource_deployment.go, vms.mounts: disk_name and mount_point
    # (`name` arrived after 1.11.1).
    mounts = block(text, "mounts")
    if mounts is None:
        fail("the vm does not mount its disk")
    if string(mounts, "name") is not None:
        fail('Unsupported argument: An argument named "name" is not expected here.')
    if string(mounts, "disk_name") != "data" or string(mounts, "mount_point") != "/data":
        fail('The argument "disk_name" is required, but no definition was found.')
    if "mycelium_ip_seed = random_bytes.mycelium_ip_seed.hex" not in text:
        fail("no mycelium ip seed")
    if "mycelium_keys = {" not in text:
        fail("the network has no mycelium keys")
    if not re.search(r'SSH_KEY = "ssh-', text):
        fail("no SSH_KEY in the vm's environment")

def check_gateway(text):
    gateway = block(text, 'resource "grid_name_proxy" "gateway"')
    backends = re.findall(r'"([^"]*)"', re.search(r"backends = \[(.*)\]", gateway).group(1))
    if not backends:
        fail("backends list can not be empty")
    for backend in backends:
        # threefoldtech/zosbase pkg/gridtypes/zos/gw.go Backend.Valid (no tls passthrough):
        # http, and the host an IP that is not loopback.
        try:
            url = urlsplit(backend)
            ip = ipaddress.ip_address(url.hostname or "")
        except ValueError:
            fail(f"invalid ip address in backend: {backend}")
        if url.scheme != "http":
            fail("scheme expected to be http")
        if ip.is_loopback:
            fail(f"invalid ip address in backend: {url.hostname}")
        # gw.go GatewayBase.Network: a private backend IP is reachable only in that network.
        if ip.is_private and ip.version == 4 and string(gateway, "network") is None:
            fail(f"backend {backend} is private: the gateway must join its network")

def claim(name, state):
    # The name contract (tfchain pallet-smart-contract): created at the first apply only.
    if state.exists() and json.loads(state.read_text()).get("outputs", {}).get("fqdn"):
        return
    if os.environ.get("FAKE_GRID_REGISTRY"):
        names, refused = registry()
        try:
            names.create(name, int(os.environ.get("FAKE_TWIN_ID", "1")))
        except refused as e:
            fail(f"failed to create name contract {name}: {e}")
    elif not re.fullmatch(r"[a-z0-9_-]{3,64}", name):
        fail(f"failed to create name contract {name}: NameNotValid")

def check(text):
    if os.environ["FAKE_MNEMONIC"] in text:
        fail("the mnemonic is written in main.tf")
    check_provider(text)
    check_names(text)
    if 'resource "grid_deployment"' in text:
        check_vm(text)
    elif 'resource "grid_name_proxy"' in text:
        check_gateway(text)
    else:
        fail("nothing to deploy")

def outputs(text):
    if 'resource "grid_name_proxy"' in text:
        return {"fqdn": string(text, "name") + ".gent02.grid.tf"}
    vm = re.search(r'vms \{\s*name = "([^"]*)"', text).group(1)
    network = string(block(text, 'resource "grid_network" "net"'), "name")
    h = hashlib.sha256(vm.encode()).hexdigest()
    node = number(text, "node") or 42
    ip = "5" + h[1:4] + ":" + ":".join(h[i:i + 4] for i in range(4, 32, 4))
    private = "10.1.%d.2" % (2 + int(h[:2], 16) % 200)
    return {"node_id": node, "mycelium_ip": ip, "public_ip": "", "private_ip": private,
            "network_name": network}

state = cwd / "terraform.tfstate"
command = args[0] if args else ""
if command == "version":
    print("OpenTofu v1.8.3\non linux_amd64")
elif command == "init":
    if not (cwd / "main.tf").exists():
        fail("No configuration files")
    check_provider((cwd / "main.tf").read_text())
    (cwd / ".terraform").mkdir(exist_ok=True)
    print("\nInitializing the backend...\n\nInitializing provider plugins...")
    print("- Finding threefoldtech/grid versions matching \"= " + PINNED + "\"...")
    print("- Installing threefoldtech/grid v" + PINNED + "...")
    print("\nOpenTofu has been successfully initialized!")
elif command in ("apply", "destroy"):
    if "-auto-approve" not in args:
        fail("would wait for approval")
    if not (cwd / ".terraform").is_dir():
        fail("Inconsistent dependency lock file: run tofu init")
    if not os.environ.get("MNEMONICS"):
        fail("mnemonic is required")
    if os.environ.get("FAKE_TOFU_ECHO_MNEMONIC"):
        print("provider grid configured for " + os.environ["MNEMONICS"])
    text = (cwd / "main.tf").read_text()
    if command == "destroy":
        if 'resource "grid_name_proxy"' in text and os.environ.get("FAKE_GRID_REGISTRY"):
            registry()[0].cancel(
                string(text, "name"), int(os.environ.get("FAKE_TWIN_ID", "1")))
        print("grid_deployment.vm: Destroying...\nDestroy complete! Resources: 4 destroyed.")
        state.write_text(json.dumps({"version": 4, "outputs": {}, "resources": []}))
        sys.exit(0)
    check(text)
    if os.environ.get("FAKE_TOFU_HANG_APPLY"):
        print("grid_deployment.vm: Creating...", flush=True)
        time.sleep(600)
    if os.environ.get("FAKE_TOFU_FAIL_APPLY"):
        fail("failed to deploy deployment: node 42 has not enough capacity")
    if 'resource "grid_name_proxy"' in text:
        claim(string(text, "name"), state)
    print("random_bytes.mycelium_key: Creating...\ngrid_deployment.vm: Creation complete after 41s")
    print("\nApply complete! Resources: 4 added, 0 changed, 0 destroyed.")
    values = outputs(text)
    typed = {k: {"value": v, "type": "string" if isinstance(v, str) else "number"}
             for k, v in values.items()}
    state.write_text(json.dumps({"version": 4, "outputs": typed}))
elif command == "output":
    values = json.loads(state.read_text())["outputs"] if state.exists() else {}
    print(json.dumps({k: {"sensitive": False, **v} for k, v in values.items()}, indent=2))
else:
    fail("unknown command " + command)
"""


@pytest.fixture
def tofu(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "tofu"
    path.parent.mkdir()
    path.write_text(f"#!{sys.executable}\n{FAKE_TOFU}")
    path.chmod(0o755)
    return path


@pytest.fixture
def calls_log(tmp_path: Path) -> Path:
    return tmp_path / "tofu-calls.jsonl"


def environment(tofu: Path, calls_log: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{tofu.parent}{os.pathsep}{os.environ['PATH']}",
        "TFGRID_MNEMONIC": MNEMONIC,
        "FAKE_MNEMONIC": MNEMONIC,
        "FAKE_TOFU_LOG": str(calls_log),
        "FAKE_REPO_ROOT": str(ROOT),
        "FAKE_GRID_REGISTRY": str(calls_log.with_name("grid-names.json")),
        **extra,
    }


@pytest.fixture
def names(calls_log: Path) -> NameRegistry:
    """The grid's name contracts, as the stand-in tofu registers them."""
    return NameRegistry(calls_log.with_name("grid-names.json"))


def calls(calls_log: Path) -> list[dict[str, object]]:
    if not calls_log.exists():
        return []
    return [json.loads(line) for line in calls_log.read_text().splitlines()]


@pytest.fixture
def log_lines() -> list[str]:
    return []


@pytest.fixture
def backend_of(tmp_path: Path, tofu: Path, calls_log: Path, log_lines: list[str]):
    def build(
        timeout: float = 60.0,
        names: GridProxyDirectory | None = None,
        gateway_backend: str = "network",
        **extra_env: str,
    ) -> OpenTofuBackend:
        return OpenTofuBackend(
            work_dir=tmp_path / "tofu",
            network="test",
            timeout=timeout,
            log=log_lines.append,
            env=environment(tofu, calls_log, **extra_env),
            names=names,
            gateway_backend=gateway_backend,
        )

    return build


@pytest.fixture
def opentofu(backend_of) -> OpenTofuBackend:
    return backend_of()


class TestOpenTofuContract(ComputeBackendContract):
    unsupported: ClassVar[frozenset[str]] = frozenset({"start", "stop", "restart"})

    @pytest.fixture
    async def backend(self, opentofu: OpenTofuBackend) -> OpenTofuBackend:
        return opentofu


# Running tofu ------------------------------------------------------------------------------


async def test_deploy_writes_one_dir_runs_init_apply_output_and_streams_the_log(
    tmp_path: Path, opentofu: OpenTofuBackend, calls_log: Path, log_lines: list[str]
) -> None:
    vm = await opentofu.create_vm(small_vm("alice", node_id=21))

    work = tmp_path / "tofu" / "vm_alice"
    assert (work / "main.tf").read_text() == render_vm(
        small_vm("alice", node_id=21), network="test"
    )
    assert [c["args"][0] for c in calls(calls_log)] == ["init", "apply", "output"]  # type: ignore[index]
    assert {c["dir"] for c in calls(calls_log)} == {"vm_alice"}
    assert all(c["mnemonic"] and c["network"] == "test" for c in calls(calls_log))
    assert "Apply complete! Resources: 4 added, 0 changed, 0 destroyed." in log_lines
    assert "OpenTofu has been successfully initialized!" in log_lines
    assert vm.node_id == 21
    assert re.fullmatch(r"5[0-9a-f]{3}(:[0-9a-f]{4}){7}", vm.mycelium_ip)
    assert vm.ssh_host == vm.mycelium_ip


async def test_redeploy_of_an_applied_vm_only_reads_its_outputs(
    opentofu: OpenTofuBackend, calls_log: Path
) -> None:
    first = await opentofu.create_vm(small_vm("bob"))
    calls_log.unlink()

    assert await opentofu.create_vm(small_vm("bob")) == first
    assert [c["args"][0] for c in calls(calls_log)] == ["output"]  # type: ignore[index]


async def test_a_vm_without_a_node_gets_one_from_the_scheduler(opentofu: OpenTofuBackend) -> None:
    vm = await opentofu.create_vm(small_vm("carol"))

    assert vm.node_id == 42


async def test_delete_destroys_and_removes_the_working_dir(
    tmp_path: Path, opentofu: OpenTofuBackend, calls_log: Path
) -> None:
    await opentofu.create_vm(small_vm("dave"))
    calls_log.unlink()

    await opentofu.destroy_vm("dave")

    assert [c["args"][:2] for c in calls(calls_log)] == [  # type: ignore[index]
        ["init", "-input=false"],
        ["destroy", "-auto-approve"],
    ]
    assert not (tmp_path / "tofu" / "vm_dave").exists()


async def test_a_failed_apply_is_a_retryable_error_with_tofus_words(
    backend_of, log_lines: list[str]
) -> None:
    backend = backend_of(FAKE_TOFU_FAIL_APPLY="1")

    with pytest.raises(BackendError, match="not enough capacity") as raised:
        await backend.create_vm(small_vm("erin"))

    assert raised.value.retryable
    assert "tofu apply failed (exit 1)" in raised.value.message
    assert (await backend.find_vm("erin")).status == "failed"  # type: ignore[union-attr]


async def test_an_apply_past_the_deadline_is_stopped_and_retryable(
    backend_of, calls_log: Path
) -> None:
    backend = backend_of(timeout=5.0, FAKE_TOFU_HANG_APPLY="1")

    with pytest.raises(BackendError, match="took longer than 5s") as raised:
        await backend.create_vm(small_vm("frank"))

    assert raised.value.retryable
    apply = next(c for c in calls(calls_log) if c["args"][0] == "apply")  # type: ignore[index]
    with pytest.raises(ProcessLookupError):
        os.kill(int(apply["pid"]), 0)  # type: ignore[call-overload]


async def test_the_mnemonic_never_reaches_main_tf_or_the_log(
    tmp_path: Path, backend_of, log_lines: list[str]
) -> None:
    backend = backend_of(FAKE_TOFU_ECHO_MNEMONIC="1")

    await backend.create_vm(small_vm("grace"))

    assert "provider grid configured for ***" in log_lines
    assert not any(MNEMONIC in line for line in log_lines)
    for path in (tmp_path / "tofu").rglob("*.tf"):
        assert MNEMONIC not in path.read_text()


async def test_gateway_is_a_name_proxy_in_its_own_dir(
    tmp_path: Path, opentofu: OpenTofuBackend
) -> None:
    spec = GatewaySpec(name="alice_web", node_id=7, backend_url="http://[5a1::1]:8080")

    gateway = await opentofu.deploy_gateway(spec)

    assert gateway.fqdn == "alice_web.gent02.grid.tf"
    assert gateway.url == "https://alice_web.gent02.grid.tf"
    assert (tmp_path / "tofu" / "gw_alice_web" / "main.tf").exists()


async def test_a_gateway_name_the_grid_refuses_is_a_permanent_error(
    opentofu: OpenTofuBackend,
) -> None:
    spec = GatewaySpec(name="alice-web", node_id=7, backend_url="http://[5a1::1]:8080")

    with pytest.raises(BackendError, match=re.escape("[a-z0-9_]{3,36}")) as raised:
        await opentofu.deploy_gateway(spec)

    assert not raised.value.retryable


# Start and check -----------------------------------------------------------------------------


def test_a_missing_tofu_binary_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="OpenTofu binary 'tofu' not found"):
        OpenTofuBackend(work_dir=tmp_path, env={"PATH": str(tmp_path)})


def test_an_unknown_network_fails_at_construction(tmp_path: Path, tofu: Path) -> None:
    with pytest.raises(BackendError, match="unknown grid network 'mainnet'"):
        OpenTofuBackend(work_dir=tmp_path, tofu_path=str(tofu), network="mainnet", env={})


async def test_check_is_empty_when_everything_is_there(opentofu: OpenTofuBackend) -> None:
    assert await opentofu.check() == []


async def test_check_names_a_missing_mnemonic(tmp_path: Path, tofu: Path, calls_log: Path) -> None:
    env = environment(tofu, calls_log)
    del env["TFGRID_MNEMONIC"]
    backend = OpenTofuBackend(work_dir=tmp_path / "w", env=env)

    assert await backend.check() == [
        "environment variable TFGRID_MNEMONIC (the grid mnemonic) is not set"
    ]
    with pytest.raises(BackendError, match="TFGRID_MNEMONIC is not set"):
        await backend.create_vm(small_vm("heidi"))


# The generated main.tf -----------------------------------------------------------------------


def hcl_value(text: str, key: str) -> str:
    found = re.findall(rf"^\s*{re.escape(key)} = (.+)$", text, re.M)
    assert len(found) == 1, (key, found)
    return found[0]


def test_main_tf_sizes_are_in_mb_and_the_disk_in_gb() -> None:
    spec = VmSpec(name="sizes", cpu_count=4, memory_gb=8, rootfs_gb=16, disk_gb=200, node_id=13)

    text = render_vm(spec, network="main")

    assert hcl_value(text, "cpu") == "4"
    assert hcl_value(text, "memory") == "8192"
    assert hcl_value(text, "rootfs_size") == "16384"
    assert hcl_value(text, "size") == "200"
    assert re.search(r'disks \{\n    name = "data"\n    size = 200\n  \}', text)
    assert re.search(
        r'mounts \{\n      disk_name = "data"\n      mount_point = "/data"\n    \}', text
    )


def test_main_tf_names_the_flist_node_network_and_provider() -> None:
    text = render_vm(small_vm("where", node_id=13), network="main")

    assert (
        hcl_value(text, "flist") == '"https://hub.grid.tf/tf-official-vms/ubuntu-24.04-full.flist"'
    )
    assert hcl_value(text, "node") == "13"
    assert hcl_value(text, "nodes") == "[13]"
    assert hcl_value(text, "network") == '"main"'
    assert (
        'grid = {\n      source = "threefoldtech/grid"\n      version = "= 1.11.1"\n    }' in text
    )
    assert hcl_value(text, "network_name") == "grid_network.net.name"
    assert [line for line in text.splitlines() if "mnemonic" in line and line[0] != "#"] == []


def test_main_tf_gives_mycelium_keys_a_seed_and_the_ssh_keys() -> None:
    spec = small_vm("keys", node_id=13, ssh_keys=("ssh-ed25519 AAAA a", "ssh-rsa BBBB b ${x}"))

    text = render_vm(spec, network="main")

    assert '"13" = random_bytes.mycelium_key.hex' in text
    assert hcl_value(text, "mycelium_ip_seed") == "random_bytes.mycelium_ip_seed.hex"
    assert re.search(r'resource "random_bytes" "mycelium_key" \{\n  length = 32\n\}', text)
    assert re.search(r'resource "random_bytes" "mycelium_ip_seed" \{\n  length = 6\n\}', text)
    assert hcl_value(text, "SSH_KEY") == r'"ssh-ed25519 AAAA a\nssh-rsa BBBB b $${x}"'


def test_main_tf_without_a_node_asks_the_scheduler() -> None:
    text = render_vm(small_vm("anywhere", memory_gb=4, rootfs_gb=2, disk_gb=10), network="dev")

    assert hcl_value(text, "node") == 'grid_scheduler.sched.nodes["vm"]'
    assert hcl_value(text, "mru") == "4096"
    assert hcl_value(text, "sru") == str((2 + 10) * 1024)
    assert 'format("%s", grid_scheduler.sched.nodes["vm"]) = random_bytes.mycelium_key.hex' in text


def test_main_tf_refuses_an_image_it_has_no_flist_for() -> None:
    with pytest.raises(BackendError, match="image 'debian-12' is not available"):
        render_vm(small_vm("img", image="debian-12"), network="main")


def test_main_tf_of_a_gateway_is_a_name_proxy() -> None:
    spec = GatewaySpec(name="alice_web", node_id=7, backend_url="http://[5a1::1]:8080")

    text = render_gateway(spec, network="main")

    assert 'resource "grid_name_proxy" "gateway"' in text
    assert hcl_value(text, "name") == '"alice_web"'
    assert hcl_value(text, "node") == "7"
    assert hcl_value(text, "backends") == '["http://[5a1::1]:8080"]'
    assert hcl_value(text, "tls_passthrough") == "false"


@pytest.mark.parametrize(
    "name", ["alice-web", "alice.web", "", "a b", "ällo", "Alice", "ab", "a" * 37]
)
def test_gateway_names_outside_the_grid_rule_are_refused(name: str) -> None:
    with pytest.raises(BackendError, match="must match"):
        render_gateway(GatewaySpec(name=name, node_id=7, backend_url="http://x"), network="main")


@pytest.mark.parametrize("name", ["alice", "alice-vm", "Alice.VM", "..", "a" * 64, "-x-"])
def test_grid_names_are_lowercase_alphanumerics_and_unique(name: str) -> None:
    assert re.fullmatch(r"[a-z0-9_]{1,32}", grid_name(name))


def test_grid_names_of_names_that_fold_together_differ() -> None:
    names = ["a-b", "a.b", "a_b", "A-B", "a--b"]

    assert len({grid_name(n) for n in names}) == len(names)


def test_parse_outputs_reads_tofu_output_json() -> None:
    text = json.dumps(
        {
            "mycelium_ip": {"sensitive": False, "type": "string", "value": "5a1::1"},
            "node_id": {"sensitive": False, "type": "number", "value": 13},
        }
    )

    assert parse_outputs(text) == {"mycelium_ip": "5a1::1", "node_id": 13}
    assert parse_outputs("{}") == {}
    with pytest.raises(BackendError):
        parse_outputs("Warning: No outputs found")


# The grid's rules, and the stand-in that holds them ------------------------------------------


def run_tofu(tofu: Path, calls_log: Path, work: Path, text: str, **extra: str) -> tuple[int, str]:
    """Runs the stand-in's init and apply on `text` in `work`; the exit code and output."""
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    (work / "main.tf").write_text(text)
    env = environment(tofu, calls_log, MNEMONICS=MNEMONIC, **extra)
    out = ""
    for args in (["init"], ["apply", "-auto-approve"]):
        done = subprocess.run(
            [str(tofu), *args], cwd=work, env=env, capture_output=True, text=True, timeout=60
        )
        out += done.stdout + done.stderr
        if done.returncode != 0:
            return done.returncode, out
    return 0, out


def old_grid_name(name: str) -> str:
    """The workload name the adapter used to derive: up to 40 + 1 + 8 characters."""
    import hashlib

    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40]
    return f"{slug}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def test_every_workload_name_in_main_tf_is_at_most_36_characters() -> None:
    for name in ["vm_019abcdef012a1b2c3d4", "x" * 64, "User-Alice.Long-Name_" * 3, "ygg"]:
        text = render_vm(small_vm(name, node_id=13), network="main")
        names = re.findall(r'^\s*name = "([^"]*)"', text, re.M)
        assert names and all(re.fullmatch(r"[a-zA-Z0-9_]{1,36}", n) for n in names), names
        assert "ygg" not in names


def test_a_sid_is_its_own_workload_name() -> None:
    sid = "vm_019abcdef012a1b2c3d4"

    text = render_vm(small_vm(sid, node_id=13), network="main")

    assert hcl_value(text, "network_name") == "grid_network.net.name"
    assert re.findall(r'^\s*name = "([^"]*)"', text, re.M) == [f"net_{sid}", sid, "data", sid]


def test_the_stand_in_refuses_the_49_character_name_the_adapter_used_to_send(
    tmp_path: Path, tofu: Path, calls_log: Path
) -> None:
    name = "a-tenant-vm-with-a-rather-long-descriptive-name"
    old = old_grid_name(name)
    assert len(old) == 49
    text = render_vm(small_vm(name, node_id=13), network="test")
    assert run_tofu(tofu, calls_log, tmp_path / "new", text)[0] == 0

    code, out = run_tofu(tofu, calls_log, tmp_path / "old", text.replace(grid_name(name), old))

    assert code == 1
    assert f"name net_{old} cannot exceed 36 characters" in out  # 53: the network's name


def test_the_stand_in_refuses_an_unpinned_provider(
    tmp_path: Path, tofu: Path, calls_log: Path
) -> None:
    text = render_vm(small_vm("pin", node_id=13), network="test")
    unpinned = text.replace(f'      version = "= {PROVIDER_VERSION}"\n', "", 1)
    assert unpinned != text

    code, out = run_tofu(tofu, calls_log, tmp_path / "old", unpinned)

    assert code == 1
    assert "provider threefoldtech/grid is not pinned to = 1.11.1" in out


def test_the_stand_in_refuses_mounts_by_name_which_1_11_1_does_not_know(
    tmp_path: Path, tofu: Path, calls_log: Path
) -> None:
    text = render_vm(small_vm("mnt", node_id=13), network="test")
    old = text.replace('disk_name = "data"', 'name = "data"')

    code, out = run_tofu(tofu, calls_log, tmp_path / "old", old)

    assert code == 1
    assert 'An argument named "name" is not expected here' in out


@pytest.mark.parametrize(
    ("name", "error"),
    [("Alice", "NameNotValid"), ("alice_" + "x" * 40, "cannot exceed 36 characters")],
)
def test_the_stand_in_refuses_gateway_names_the_adapter_used_to_send(
    tmp_path: Path, tofu: Path, calls_log: Path, name: str, error: str
) -> None:
    spec = GatewaySpec(name="alice", node_id=7, backend_url="http://[5a1::1]:9988")
    text = render_gateway(spec, network="test")

    code, out = run_tofu(tofu, calls_log, tmp_path / "old", text.replace('"alice"', f'"{name}"'))

    assert code == 1
    assert error in out


def test_the_stand_in_refuses_a_private_backend_outside_its_network(
    tmp_path: Path, tofu: Path, calls_log: Path
) -> None:
    spec = GatewaySpec(name="priv", node_id=7, backend_url="http://10.1.2.2:9988")
    text = render_gateway(spec, network="test")

    code, out = run_tofu(tofu, calls_log, tmp_path / "gw", text)

    assert code == 1
    assert "the gateway must join its network" in out


async def test_a_gateway_reaches_its_vm_on_the_vms_private_network_by_default(
    tmp_path: Path, opentofu: OpenTofuBackend
) -> None:
    vm = await opentofu.create_vm(small_vm("vm_0193aa", node_id=7))
    spec = GatewaySpec(
        name="hd_alice",
        node_id=vm.node_id,
        backend_url=f"http://[{vm.mycelium_ip}]:9988",
        vm_name="vm_0193aa",
    )

    gateway = await opentofu.deploy_gateway(spec)

    text = (tmp_path / "tofu" / "gw_hd_alice" / "main.tf").read_text()
    assert '\n  network = "net_vm_0193aa"\n' in text
    assert re.fullmatch(r'\["http://10\.1\.\d+\.2:9988"\]', hcl_value(text, "backends"))
    assert gateway.fqdn == "hd_alice.gent02.grid.tf"


async def test_the_mycelium_form_is_an_option(tmp_path: Path, backend_of) -> None:
    backend = backend_of(gateway_backend="mycelium")
    vm = await backend.create_vm(small_vm("vm_0193bb", node_id=7))
    url = f"http://[{vm.mycelium_ip}]:9988"

    await backend.deploy_gateway(
        GatewaySpec(name="hd_bob", node_id=7, backend_url=url, vm_name="vm_0193bb")
    )

    text = (tmp_path / "tofu" / "gw_hd_bob" / "main.tf").read_text()
    assert hcl_value(text, "backends") == f'["{url}"]'
    assert 'network = "net_' not in text


async def test_a_gateway_before_its_vm_has_a_private_address_is_retryable(
    opentofu: OpenTofuBackend,
) -> None:
    spec = GatewaySpec(name="hd_carol", node_id=7, backend_url="http://[5a1::1]:9988")
    spec = GatewaySpec(**{**msgspec.structs.asdict(spec), "vm_name": "vm_never"})

    with pytest.raises(BackendError, match="no private address") as raised:
        await opentofu.deploy_gateway(spec)

    assert raised.value.retryable


def test_an_unknown_gateway_backend_fails_at_construction(tmp_path: Path, tofu: Path) -> None:
    with pytest.raises(BackendError, match="unknown gateway backend 'public'"):
        OpenTofuBackend(work_dir=tmp_path, tofu_path=str(tofu), gateway_backend="public", env={})


async def test_a_gateway_name_another_deployer_holds_fails_fast_with_the_reason(
    backend_of, names: NameRegistry, calls_log: Path
) -> None:
    contract = names.create("hd_dave", twin_id=4242)  # someone else's, anywhere on the grid
    async with FakeGridProxy(names=names) as proxy, GridProxyDirectory(proxy.url) as directory:
        backend = backend_of(names=directory, gateway_backend="mycelium")
        spec = GatewaySpec(name="hd_dave", node_id=7, backend_url="http://[5a1::1]:9988")

        with pytest.raises(BackendError) as raised:
            await backend.deploy_gateway(spec)

    assert not raised.value.retryable
    assert raised.value.message == (
        "gateway name 'hd_dave' is already registered on the test grid (name contract "
        f"{contract} of twin 4242): names are unique across the whole grid; set "
        "HERO_DEPLOYER_GATEWAY_PREFIX to a prefix of your own"
    )
    assert calls(calls_log) == []  # no tofu run at all


async def test_without_the_check_the_chain_refuses_the_taken_name_at_apply(
    backend_of, names: NameRegistry
) -> None:
    names.create("hd_erin", twin_id=4242)
    backend = backend_of(gateway_backend="mycelium")
    spec = GatewaySpec(name="hd_erin", node_id=7, backend_url="http://[5a1::1]:9988")

    with pytest.raises(BackendError, match="NameExists"):
        await backend.deploy_gateway(spec)


async def test_our_own_name_is_registered_once_and_freed_on_delete(
    backend_of, names: NameRegistry
) -> None:
    async with FakeGridProxy(names=names) as proxy, GridProxyDirectory(proxy.url) as directory:
        backend = backend_of(names=directory, gateway_backend="mycelium")
        spec = GatewaySpec(name="hd_frank", node_id=7, backend_url="http://[5a1::1]:9988")
        first = await backend.deploy_gateway(spec)
        assert await backend.deploy_gateway(spec) == first  # applied: no second claim
        assert (await directory.name_holder("hd_frank")) is not None

        await backend.delete_gateway("hd_frank")

        assert await directory.name_holder("hd_frank") is None


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        ("", "HERO_DEPLOYER_GATEWAY_PREFIX is not set: gateway names are name contracts"),
        ("Hero-Demo", "HERO_DEPLOYER_GATEWAY_PREFIX: gateway prefix 'Hero-Demo' must be"),
        ("herodemo", None),
    ],
)
async def test_check_vets_the_gateway_prefix(
    tmp_path: Path, tofu: Path, calls_log: Path, prefix: str, problem: str | None
) -> None:
    backend = OpenTofuBackend(
        work_dir=tmp_path / "w", env=environment(tofu, calls_log), gateway_prefix=prefix
    )

    problems = await backend.check()

    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(problem)


async def test_build_backend_wires_the_networks_grid_proxy_and_the_settings(
    tmp_path: Path, tofu: Path, calls_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contextlib import AsyncExitStack

    from hero_deployer.app.backends import build_backend, gridproxy_url
    from hero_deployer.app.settings import Settings

    for key, value in environment(tofu, calls_log).items():
        monkeypatch.setenv(key, value)
    settings = Settings(
        data_dir=tmp_path,
        backend="opentofu",
        tofu_network="qa",
        gateway_prefix="Bad-Prefix",
        gateway_backend="mycelium",
    )
    assert gridproxy_url(settings) == "https://gridproxy.qa.grid.tf"
    assert gridproxy_url(Settings(backend="local")) == ""

    async with AsyncExitStack() as stack:
        backend = await build_backend(settings, stack)
        assert isinstance(backend, OpenTofuBackend)
        assert (await backend.check())[0].startswith("HERO_DEPLOYER_GATEWAY_PREFIX: gateway")
