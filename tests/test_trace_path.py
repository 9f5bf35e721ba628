"""One deploy_vm crosses few files of its own: its decider, handlers, reactor and view."""

from __future__ import annotations

from pathlib import Path

from bench.trace_path import operation_specific, trace


async def test_deploy_vm_crosses_at_most_four_operation_specific_files(tmp_path: Path) -> None:
    deploy, provision = await trace(tmp_path)
    specific = operation_specific(deploy, provision)
    assert set(specific) <= {
        "core/vm.py",
        "hero_deployer/app/vm_handlers.py",
        "hero_deployer/app/vm_reactor.py",
        "projections/vm_view.py",
    }, specific
    assert "core/vm.py" in specific  # the trace saw the decider: it measures something
    assert "hero_deployer/app/commands.py" in deploy.calls  # the one runner is on the path
