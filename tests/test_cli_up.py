"""`hero-deployer up` as an operator runs it: a real process with its own nats-server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from hero_deployer.natsserver import free_port


def _cli(*args: str, data_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hero_deployer",
            *args,
            "--data-dir",
            str(data_dir),
            "--nats",
            f"nats://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_serves_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    port = free_port()
    web_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERO_DEPLOYER_")}
    env["HERO_DEPLOYER_LOCAL_DEPLOY_DELAY"] = "0"
    env["HERO_DEPLOYER_LOCAL_SSH"] = "0"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hero_deployer",
            "up",
            "--data-dir",
            str(data_dir),
            "--nats-port",
            str(port),
            "--web-port",
            str(web_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        assert "ready" in ready, ready + (process.stderr.read() if process.stderr else "")

        token = (data_dir / "token").read_text().strip()
        assert len(token) >= 43  # 32 random bytes, URL-safe
        assert (data_dir / "token").stat().st_mode & 0o777 == 0o600

        health = _cli("health", "--json", data_dir=data_dir, port=port)
        assert health.returncode == 0, health.stderr
        assert json.loads(health.stdout)["status"] == "ok"

        deployed = _cli(
            "vms", "deploy", "web-1", "--secret", "s3cret", "--json", data_dir=data_dir, port=port
        )
        assert deployed.returncode == 0, deployed.stderr
        sid = json.loads(deployed.stdout)["sid"]

        listed = _cli("vms", "list", "--secret", "s3cret", data_dir=data_dir, port=port)
        assert sid in listed.stdout and "web-1" in listed.stdout
        assert "SID" in listed.stdout.splitlines()[0]

        missing = _cli("vms", "get", "vm_nope", "--secret", "s3cret", data_dir=data_dir, port=port)
        assert missing.returncode != 0
        assert missing.stderr.strip() == "error: NotFound: vm not found"

        login = httpx.get(f"http://127.0.0.1:{web_port}/login", timeout=10)
        assert login.status_code == 200 and 'name="token"' in login.text
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0, process.stderr.read() if process.stderr else ""
    assert not _listening(port), "the embedded nats-server must stop with the service"
    assert not _listening(web_port), "the dashboard must stop with the service"
    assert (data_dir / "events.db").exists()
