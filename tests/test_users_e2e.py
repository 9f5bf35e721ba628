"""Provisioning and decommissioning users end to end: real nats-server, SQLite, local grid VMs
with real SSH, and protocol fakes of Forgejo and the grid proxy on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio
import structlog
from nats.aio.client import Client

from adapters.localgrid import LocalGrid
from adapters.ssh_asyncssh import AsyncsshShell
from core.contract import RevealInitialPassword
from core.errors import NotFound
from core.manifest import PROFILES
from core.operations import RequestMeta
from core.ports import SshTarget
from core.retry import RetryPolicy
from core.user import Context as UserContext
from hero_deployer.app.bootstrap import FROM_SETTINGS, PROJECTIONS, App
from hero_deployer.app.commands import Command, run
from hero_deployer.app.logs import configure
from hero_deployer.app.natsserver import free_port
from hero_deployer.app.settings import Settings
from hero_deployer.app.user_handlers import FORGE_PASSWORD, SSH_PRIVATE_KEY, VM_SECRET
from hero_deployer.app.user_manager import ssh_keys_for
from hero_deployer.sdk.client import HeroDeployerClient
from projections.runner import connect_views, rebuild
from tests.conftest import STORES, TOKEN, Place, make_settings
from tests.fakes.forgejo import FakeForgejo
from tests.fakes.gridproxy import CANDIDATE_QUERY, FakeGridProxy, grid_node

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = frozenset({"ProvisioningCompleted", "StepFailed"})
HAPPY_PATH = [  # a provisioning's events, in order, when no step fails
    "ProvisioningRequested",
    "ForgeUserEnsured",
    "SshKeyGenerated",
    "NodeSelected",
    "UserVmDeployRequested",
    "UserVmDeployed",
    "GatewayDeployed",
    "SshReachable",
    "ManifestUploaded",
    "SetupCompleted",
    "HealthVerified",
    "ProvisioningCompleted",
]
STEP_POLICY: dict[str, Any] = {
    "step_base_delay": 0.05,
    "step_max_delay": 0.2,
    "step_retries": 2,
    "step_deadline": 30.0,
}


pytestmark = pytest.mark.stores(*STORES)  # SQLite, and two replicas on a JetStream cluster

# Fixtures ------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def forge() -> AsyncIterator[FakeForgejo]:
    async with FakeForgejo() as server:
        yield server


def local_grid_nodes() -> list[dict[str, Any]]:
    """The local grid's nodes as the grid proxy lists them; 13 is big but has no gateway."""
    return [
        grid_node(1, total_memory_gb=128, total_disk_gb=4000, domain="gent01.local.grid"),
        grid_node(8, total_memory_gb=256, total_disk_gb=8000, domain="gent02.local.grid"),
        grid_node(13, total_memory_gb=384, total_disk_gb=12000, domain=""),
        grid_node(50, total_memory_gb=64, total_disk_gb=2000, domain="gent04.local.grid"),
        grid_node(99, total_memory_gb=999, total_disk_gb=99999, domain="gent99.local.grid"),
    ]


@pytest_asyncio.fixture
async def gridproxy() -> AsyncIterator[FakeGridProxy]:
    async with FakeGridProxy(local_grid_nodes()) as server:
        yield server


@dataclass
class Users:
    app: App
    client: HeroDeployerClient
    settings: Settings
    grid: LocalGrid
    replies: list[bytes] = dataclasses.field(default_factory=list)

    async def call(self, operation: str, body: dict[str, Any]) -> Any:
        """Calls the service and keeps the raw reply, to search it for secrets later."""
        raw = await self.client.call_raw(operation, body)
        self.replies.append(raw)
        return msgspec.json.decode(raw)


def forge_settings(forge: FakeForgejo) -> dict[str, Any]:
    return {
        "forge_url": forge.url,
        "forge_admin_user": forge.admin_user,
        "forge_admin_password": forge.admin_password,
    }


@asynccontextmanager
async def users_service(
    tmp_path: Path, place: Place | Client, *, shell: Any = None, **overrides: Any
) -> AsyncIterator[Users]:
    """The service where `place` runs it (its replicas share the grid); `app` is the first. A
    bare connection (the web tests') means SQLite beside its server."""
    if not isinstance(place, Place):
        place = Place("sqlite", place, [])
    settings = make_settings(tmp_path / "data", local_ssh=True, **{**STEP_POLICY, **overrides})
    async with (
        LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=True) as grid,
        place.serve(
            settings,
            compute=grid,
            retry=RetryPolicy(base_delay=0.01),
            shell=shell,
            forge=FROM_SETTINGS if settings.forge_url else None,
            directory=FROM_SETTINGS if settings.gridproxy_url else None,
        ) as apps,
    ):
        client = HeroDeployerClient(place.nc, token=TOKEN, prefix=settings.prefix)
        yield Users(app=apps[0], client=client, settings=settings, grid=grid)


@pytest.fixture
def logs() -> Any:
    """Everything the service logs, at debug level, as text."""
    buffer = io.StringIO()
    configure("debug", "json", stream=buffer)
    yield buffer
    structlog.reset_defaults()


async def terminal(
    client: HeroDeployerClient,
    username: str,
    *,
    after: int = 0,
    types: frozenset[str] = TERMINAL,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """The first event of `types` on the user's stream after `after` (the status stream)."""
    async with asyncio.timeout(timeout):
        async for event in client.follow(after=after, stream=f"user:{username}"):
            if event["type"] in types:
                return dict(event)
    raise AssertionError("unreachable")


async def stream_events(client: HeroDeployerClient, stream: str) -> list[dict[str, Any]]:
    page = await client.call("events", {"stream": stream, "limit": 1000})
    return list(page["events"])


async def provision_ready(svc: Users, username: str, **body: Any) -> dict[str, Any]:
    reply = await svc.call("provision_user", {"username": username, **body})
    assert reply["status"] == "provisioning"
    event = await terminal(svc.client, username)
    assert event["type"] == "ProvisioningCompleted", event
    user = await svc.call("get_user", {"username": username})
    assert user["status"] == "ready"
    return dict(user)


# Provisioning --------------------------------------------------------------------------------


async def test_provision_reaches_ready_and_health_answers_through_the_gateway(
    tmp_path: Path, place: Place, forge: FakeForgejo, gridproxy: FakeGridProxy
) -> None:
    async with users_service(
        tmp_path, place, **forge_settings(forge), gridproxy_url=gridproxy.url
    ) as svc:
        user = await provision_ready(
            svc, "alice", display_name="Alice A.", forge_email="alice@example.org"
        )

        assert user["step"] == "done"
        assert user["error"] == ""
        assert user["forge_user_created"] is True
        assert user["node_id"] == 8  # 13 has more room but no gateway; 99 is no candidate
        assert user["ssh_public_key"].startswith("ssh-ed25519 ")
        assert user["vm_sid"].startswith("vm_")
        async with httpx.AsyncClient() as http:
            health = await http.get(user["gateway_url"] + "/health")
        assert health.status_code == 200
        assert health.json()["services"] == list(PROFILES["demo"])

        types = [e["type"] for e in await stream_events(svc.client, "user:alice")]
        assert types == HAPPY_PATH

        # The exact Forge conversation: look up, create as the admin, token as the user.
        requests = [(r.method, r.path, r.auth_user, r.auth_scheme) for r in forge.requests]
        assert requests == [
            ("GET", "/api/v1/users/alice", forge.admin_user, "basic"),
            ("POST", "/api/v1/admin/users", forge.admin_user, "basic"),
            ("POST", "/api/v1/users/alice/tokens", "alice", "basic"),
        ]
        created = forge.requests[1].json
        assert {k: v for k, v in created.items() if k != "password"} == {
            "username": "alice",
            "email": "alice@example.org",
            "must_change_password": False,
            "full_name": "Alice A.",
            "send_notify": False,
            "source_id": 0,
            "login_name": "alice",
        }
        token = forge.requests[2].json
        assert token["name"].startswith("hero-deployer-1-")
        assert token["scopes"] == ["write:repository", "write:user"]
        assert [r.query for r in gridproxy.requests] == [CANDIDATE_QUERY]

        # The user's VM is an ordinary owned VM of the fixed size, reachable with no other secret.
        vm_events = await stream_events(svc.client, f"vm:{user['vm_sid']}")
        requested = vm_events[0]["data"]
        assert {k: requested[k] for k in ("name", "image", "node_id", "cpu_count")} == {
            "name": "user-alice",
            "image": "ubuntu-24.04",
            "node_id": 8,
            "cpu_count": 16,
        }
        assert (requested["memory_gb"], requested["disk_gb"], requested["rootfs_gb"]) == (
            8,
            200,
            16,
        )
        assert [e["type"] for e in vm_events] == ["VmDeployRequested", "VmDeployed"]
        with pytest.raises(NotFound):
            await svc.client.call("get_vm", {"sid": user["vm_sid"], "secret": ""})
        # Only the user's own VM gets the user's key, not a tenant VM that borrows its name.
        keys = ssh_keys_for(svc.app.deps)
        assert await keys(user["vm_sid"]) == (user["ssh_public_key"],)
        tenant = await svc.client.call("deploy_vm", {"name": "user-alice", "secret": "t"})
        assert await keys(tenant["sid"]) == ()

        # Asking again while ready is InvalidState; listing shows the one user.
        listed = await svc.call("list_users", {})
        assert [u["username"] for u in listed["users"]] == ["alice"]


async def test_password_revealed_once_and_no_secret_leaks(
    tmp_path: Path, place: Place, forge: FakeForgejo, logs: io.StringIO
) -> None:
    async with users_service(tmp_path, place, **forge_settings(forge)) as svc:
        await provision_ready(svc, "dora")
        private_key = await svc.app.deps.vault.get("dora", SSH_PRIVATE_KEY)
        vm_secret = await svc.app.deps.vault.get("dora", VM_SECRET)
        assert private_key is not None and vm_secret is not None
        await svc.call("list_users", {})
        await svc.call("events", {"limit": 1000})

        revealed = await svc.client.call("reveal_initial_password", {"username": "dora"})
        password = revealed["initial_password"]
        assert revealed["username"] == "dora"
        assert password == forge.users["dora"].password
        with pytest.raises(NotFound, match="initial password not found"):
            await svc.client.call("reveal_initial_password", {"username": "dora"})
        with pytest.raises(NotFound, match="user not found"):
            await svc.client.call("reveal_initial_password", {"username": "nobody"})

    # Every line of the key's body, the VM secret and the password: in no database file, no
    # log line, no reply (the one reveal reply aside, which is the password's only way out).
    needles = [
        line.encode()
        for line in private_key.decode().splitlines()
        if line and not line.startswith("-----")
    ]
    needles += [vm_secret, password.encode()]
    haystacks = {
        str(path): path.read_bytes()
        for path in (tmp_path / "data").rglob("*")
        if path.is_file() and path.name != "master.key"
    }
    haystacks["logs"] = logs.getvalue().encode()
    assert b"user_manager.action" in haystacks["logs"]  # the capture works
    for index, reply in enumerate(svc.replies):
        haystacks[f"reply {index}"] = reply
    for needle in needles:
        for where, haystack in haystacks.items():
            assert needle not in haystack, f"a secret leaked into {where}"


async def test_a_reveal_recorded_but_not_yet_destroyed_is_destroyed_by_its_replay(
    tmp_path: Path, place: Place, forge: FakeForgejo
) -> None:
    """The crash window of `reveal_initial_password`: the event is in, the password still sealed."""
    async with users_service(tmp_path, place, **forge_settings(forge)) as svc:
        await provision_ready(svc, "ella")
        vault = svc.app.deps.vault
        assert await vault.get("ella", FORGE_PASSWORD) is not None
        # what the request does before it destroys the password, and no more
        meta = RequestMeta(operation="reveal_initial_password", request_id="crashed")
        deps = svc.app.deps
        reveal = RevealInitialPassword(username="ella")
        await run(deps, [Command(deps.users, "ella", reveal, UserContext(now=deps.clock()))], meta)
        revealed = (await svc.app.store.read_stream("user:ella"))[-1]
        assert revealed.type == "InitialPasswordRevealed"

        await svc.app.manager.handle([revealed])  # as the follower does, also after a restart

        assert await vault.get("ella", FORGE_PASSWORD) is None
        with pytest.raises(NotFound, match="initial password not found"):
            await svc.client.call("reveal_initial_password", {"username": "ella"})


async def test_decommission_from_ready_keeps_forge_account_and_log(
    tmp_path: Path, place: Place, forge: FakeForgejo
) -> None:
    async with users_service(tmp_path, place, **forge_settings(forge)) as svc:
        user = await provision_ready(svc, "erin")
        position = (await svc.client.call("health", {}))["position"]

        reply = await svc.call("decommission_user", {"username": "erin"})
        assert reply["status"] == "decommissioning"
        done = await terminal(
            svc.client, "erin", after=position, types=frozenset({"UserDecommissioned"})
        )
        assert done["type"] == "UserDecommissioned"

        got = await svc.call("get_user", {"username": "erin"})
        assert (got["status"], got["error"]) == ("decommissioned", "")
        vm_types = [e["type"] for e in await stream_events(svc.client, f"vm:{user['vm_sid']}")]
        assert vm_types[-2:] == ["VmDeleteRequested", "VmDeleted"]
        assert await svc.grid.find_vm(user["vm_sid"]) is None
        async with httpx.AsyncClient() as http:
            gone = await http.get(user["gateway_url"] + "/health")
        assert gone.status_code == 404
        assert "erin" in forge.users  # the Forge account is kept
        assert await svc.app.deps.vault.get("erin", SSH_PRIVATE_KEY) is None
        types = [e["type"] for e in await stream_events(svc.client, "user:erin")]
        assert types[0] == "ProvisioningRequested"
        assert types[-4:] == [
            "DecommissionRequested",
            "GatewayDeleted",
            "UserVmDeleted",
            "UserDecommissioned",
        ]


async def test_forge_down_fails_at_forge_user_then_resumes(
    tmp_path: Path, place: Place, forge: FakeForgejo
) -> None:
    async with users_service(tmp_path, place, **forge_settings(forge)) as svc:
        await forge.go_down("503")
        await svc.call("provision_user", {"username": "bob"})
        failed = await terminal(svc.client, "bob")
        assert failed["type"] == "StepFailed"
        assert failed["data"]["step"] == "forge_user"
        assert "forgejo answered 503" in failed["data"]["reason"]
        assert failed["data"]["attempts"] == 3  # the first try and two retries
        user = await svc.call("get_user", {"username": "bob"})
        assert (user["status"], user["step"]) == ("failed", "forge_user")
        assert user["error"].startswith("forge_user: forgejo answered 503")
        types = [e["type"] for e in await stream_events(svc.client, "user:bob")]
        assert types.count("StepRetried") == 2

        await forge.come_up()
        resumed = await svc.call("provision_user", {"username": "bob"})
        assert (resumed["status"], resumed["step"]) == ("provisioning", "forge_user")
        done = await terminal(svc.client, "bob", after=failed["position"])
        assert done["type"] == "ProvisioningCompleted", done
        assert "bob" in forge.users


async def test_a_failed_vm_is_replaced_and_decommission_deletes_both(
    tmp_path: Path, place: Place
) -> None:
    async with users_service(tmp_path, place) as svc:
        svc.grid.fail_next("deploy_vm", "node 13 refused the workload")
        user = await provision_ready(svc, "gina")
        events = await stream_events(svc.client, "user:gina")
        requested = [e["data"]["vm_sid"] for e in events if e["type"] == "UserVmDeployRequested"]
        assert len(requested) == 2 and requested[1] == user["vm_sid"]
        retried = next(e for e in events if e["type"] == "StepRetried")["data"]
        assert retried["step"] == "deploy_vm"
        assert "node 13 refused the workload" in retried["reason"]

        position = (await svc.client.call("health", {}))["position"]
        await svc.call("decommission_user", {"username": "gina"})
        await terminal(svc.client, "gina", after=position, types=frozenset({"UserDecommissioned"}))
        for sid in requested:
            types = [e["type"] for e in await stream_events(svc.client, f"vm:{sid}")]
            assert types[-1] == "VmDeleted", (sid, types)

        # a history with a retry, a replaced VM and a decommission rebuilds to the live views
        last = await svc.app.store.last_position()
        await svc.app.views.wait_for(last)
        rebuilt = tmp_path / "rebuilt" / "views.db"
        conn = await connect_views(rebuilt)
        try:
            assert await rebuild(svc.app.store, conn, PROJECTIONS(), page_size=5) == last
        finally:
            await conn.close()
        live = svc.settings.data_dir / "views.db"
        for query in ("SELECT * FROM users ORDER BY username", "SELECT * FROM vms ORDER BY sid"):
            with sqlite3.connect(live) as a, sqlite3.connect(rebuilt) as b:
                live_rows, rebuilt_rows = a.execute(query).fetchall(), b.execute(query).fetchall()
            assert rebuilt_rows == live_rows
            assert live_rows


class DeadPortShell(AsyncsshShell):
    """The real SSH client, pointed at a port where nothing listens: SSH never comes up."""

    def __init__(self) -> None:
        super().__init__(initial_backoff=0.05, max_backoff=0.2)
        self.port = free_port()
        self.timeouts: list[float] = []  # what each wait_ready was given
        self.connects = 0

    async def wait_ready(self, target: SshTarget, *, timeout: float) -> None:
        self.timeouts.append(timeout)
        dead = msgspec.structs.replace(target, port=self.port)
        await super().wait_ready(dead, timeout=timeout)

    async def _connect(self, target: SshTarget, key: Any) -> Any:
        self.connects += 1
        return await super()._connect(target, key)


async def test_ssh_never_up_fails_at_wait_ssh_within_its_deadline_then_decommissions(
    tmp_path: Path, place: Place
) -> None:
    shell = DeadPortShell()
    async with users_service(tmp_path, place, shell=shell, step_deadlines="wait_ssh=2") as svc:
        await svc.call("provision_user", {"username": "carol"})
        failed = await terminal(svc.client, "carol")
        assert failed["type"] == "StepFailed"
        assert failed["data"]["step"] == "wait_ssh"
        # each try is on record; the first polled the dead port (refused, again and again) for
        # all the time the step's 2 s deadline gave it, a later one only for what was left
        events = await stream_events(svc.client, "user:carol")
        reasons = [
            e["data"]["reason"]
            for e in events
            if e["type"] == "StepRetried" and e["data"]["step"] == "wait_ssh"
        ] + [failed["data"]["reason"]]
        assert len(reasons) == len(shell.timeouts)
        assert f"not ready within {shell.timeouts[0]:g}s" in reasons[0]
        assert 0 < shell.timeouts[0] <= 2
        assert all(later < shell.timeouts[0] for later in shell.timeouts[1:])
        assert shell.connects >= 2

        user = await svc.call("get_user", {"username": "carol"})
        assert (user["status"], user["step"]) == ("failed", "wait_ssh")
        await svc.call("decommission_user", {"username": "carol"})
        done = await terminal(
            svc.client, "carol", after=failed["position"], types=frozenset({"UserDecommissioned"})
        )
        assert done["type"] == "UserDecommissioned"
        assert await svc.grid.find_vm(user["vm_sid"]) is None
        got = await svc.call("get_user", {"username": "carol"})
        assert got["status"] == "decommissioned"


async def test_twenty_users_provisioned_concurrently_all_reach_ready(
    tmp_path: Path, place: Place
) -> None:
    names = [f"user{i:02d}" for i in range(20)]
    async with users_service(tmp_path, place) as svc:
        await asyncio.gather(*(svc.call("provision_user", {"username": n}) for n in names))
        outcomes: dict[str, str] = {}
        async with asyncio.timeout(45):
            async for event in svc.client.follow():
                if event["type"] in TERMINAL:
                    outcomes[event["stream"][5:]] = event["type"]
                    if len(outcomes) == len(names):
                        break
        assert outcomes == {n: "ProvisioningCompleted" for n in names}
        users = (await svc.call("list_users", {}))["users"]
        assert sorted(u["username"] for u in users) == names
        assert {u["status"] for u in users} == {"ready"}
        assert len({u["vm_sid"] for u in users}) == 20
        ensured = await stream_events(svc.client, "user:user07")
        forge_event = next(e for e in ensured if e["type"] == "ForgeUserEnsured")
        assert forge_event["data"]["skipped_reason"] == "no Forge URL is configured"


# Crash and restart -----------------------------------------------------------------------------


class Fifo:
    """A named pipe read without blocking the loop: the setup script reports to it."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self._read = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # no EOF while nobody writes
        self._buffer = b""

    async def line(self) -> bytes:
        loop = asyncio.get_running_loop()
        while b"\n" not in self._buffer:
            ready = asyncio.Event()
            loop.add_reader(self._read, ready.set)
            try:
                await ready.wait()
            finally:
                loop.remove_reader(self._read)
            self._buffer += os.read(self._read, 4096)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close(self) -> None:
        os.close(self._read)
        os.close(self._keep)


async def start_serve(env: dict[str, str], data_dir: Path, nats_url: str, log: Path) -> Any:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hero_deployer",
        "serve",
        "--nats",
        nats_url,
        "--data-dir",
        str(data_dir),
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=log.open("ab"),
    )
    assert process.stdout is not None
    async with asyncio.timeout(20):
        while b"ready" not in await process.stdout.readline():
            pass
    return process


@pytest.mark.stores(
    "sqlite",
    reason="kills and restarts one serve process on one SQLite DIR; a JetStream replica is"
    " killed in test_jetstream_cluster.py (test_killing_a_node_under_load_...)",
)
async def test_kill_during_run_setup_then_restart_reaches_ready_without_harm(
    tmp_path: Path, place: Place, forge: FakeForgejo, gridproxy: FakeGridProxy
) -> None:
    nats_url, nc = place.urls[0], place.nc
    started = Fifo(tmp_path / "setup-started")
    release = tmp_path / "setup-release"
    settings = make_settings(tmp_path / "data")
    env = {
        **os.environ,
        "HERO_DEPLOYER_TOKEN": TOKEN,
        "HERO_DEPLOYER_PREFIX": settings.prefix,
        "HERO_DEPLOYER_LOCAL_DEPLOY_DELAY": "0",
        "HERO_DEPLOYER_LOCAL_ACTION_DELAY": "0",
        "HERO_DEPLOYER_LOCAL_SSH": "true",
        "HERO_DEPLOYER_FORGE_URL": forge.url,
        "HERO_DEPLOYER_FORGE_ADMIN_USER": forge.admin_user,
        "HERO_DEPLOYER_FORGE_ADMIN_PASSWORD": forge.admin_password,
        "HERO_DEPLOYER_GRIDPROXY_URL": gridproxy.url,
        "HERO_DEPLOYER_STEP_BASE_DELAY": "0.05",
        "HERO_DEPLOYER_STEP_MAX_DELAY": "0.2",
        "HERO_DEPLOYER_LOG_LEVEL": "debug",
        # Says it started, waits (inside the VM) to be released, then runs the real setup.
        "HERO_DEPLOYER_SETUP_COMMAND": (
            f"echo started >> {started.path};"
            f" while [ ! -e {release} ]; do sleep 0.02; done; ./setup-binaries.sh"
        ),
    }
    log = tmp_path / "service.log"
    client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)
    first = await start_serve(env, settings.data_dir, nats_url, log)
    second = None
    try:
        await client.call("provision_user", {"username": "frank"})
        async with asyncio.timeout(30):
            assert await started.line() == b"started"
        first.send_signal(signal.SIGKILL)
        await first.wait()

        second = await start_serve(env, settings.data_dir, nats_url, log)
        async with asyncio.timeout(30):
            assert await started.line() == b"started"  # setup is run again: it is safe to
        release.touch()
        done = await terminal(client, "frank")
        assert done["type"] == "ProvisioningCompleted", done

        user = await client.call("get_user", {"username": "frank"})
        assert user["status"] == "ready"
        types = [e["type"] for e in await stream_events(client, "user:frank")]
        # the steps up to the gateway (ForgeUserEnsured .. GatewayDeployed), setup, completion
        for once in (*HAPPY_PATH[1:7], "SetupCompleted", "ProvisioningCompleted"):
            assert types.count(once) == 1, (once, types)
        # One Forge account, one token, one VM: nothing harmful ran twice.
        assert [(r.method, r.path) for r in forge.requests].count(
            ("POST", "/api/v1/admin/users")
        ) == 1
        assert len(forge.users["frank"].tokens) == 1
        vm_events = await stream_events(client, f"vm:{user['vm_sid']}")
        assert [e["type"] for e in vm_events] == ["VmDeployRequested", "VmDeployed"]
        page = await client.call("events", {"limit": 1000})
        assert sum(e["type"] == "VmDeployRequested" for e in page["events"]) == 1
    finally:
        release.touch()  # frees a setup script the killed service left behind
        for process in (first, second):
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(15):
                    await process.wait()
        started.close()
    assert second is not None and second.returncode == 0
