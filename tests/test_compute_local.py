from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.localgrid import LocalGrid
from tests.compute_contract import ComputeBackendContract


@pytest.fixture
async def local_grid(tmp_path: Path) -> AsyncIterator[LocalGrid]:
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, action_delay=0, ssh=False) as grid:
        yield grid


class TestLocalGridContract(ComputeBackendContract):
    @pytest.fixture
    async def backend(self, local_grid: LocalGrid) -> LocalGrid:
        return local_grid


@pytest.fixture
async def local_grid_with_ssh(tmp_path: Path) -> AsyncIterator[LocalGrid]:
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, action_delay=0, ssh=True) as grid:
        yield grid


class TestLocalGridWithSshContract(ComputeBackendContract):
    @pytest.fixture
    async def backend(self, local_grid_with_ssh: LocalGrid) -> LocalGrid:
        return local_grid_with_ssh


@pytest.fixture
async def local_grid_own_process(tmp_path: Path) -> AsyncIterator[LocalGrid]:
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, action_delay=0, own_process=True) as g:
        yield g


class TestLocalGridOwnProcessContract(ComputeBackendContract):
    @pytest.fixture
    async def backend(self, local_grid_own_process: LocalGrid) -> LocalGrid:
        return local_grid_own_process
