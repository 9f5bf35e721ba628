"""`up --nats-port` outside 1..65535 is refused in one line before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hero_deployer.app.natsserver import NatsServerError, ensure_port_free


@pytest.mark.parametrize("port", [0, -1, 65536, 70000])
def test_a_port_outside_the_tcp_range_is_not_free(port: int) -> None:
    with pytest.raises(NatsServerError, match=f"NATS port {port} is not a TCP port"):
        ensure_port_free(port)


@pytest.mark.parametrize("port", ["0", "70000"])
def test_up_with_an_impossible_nats_port_exits_with_one_line_and_starts_nothing(
    tmp_path: Path, port: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERO_DEPLOYER_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    data_dir = tmp_path / "var"
    command = [sys.executable, "-m", "hero_deployer", "up", "--data-dir", str(data_dir)]
    command += ["--nats-port", port, "--web-port", "0"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        f"error: NATS port {port} is not a TCP port (1..65535): choose another with --nats-port"
    ]
    assert "ready" not in done.stdout
    assert not (data_dir / "events.db").exists()
    assert not (data_dir / "nats-server.log").exists()  # no nats-server was started
