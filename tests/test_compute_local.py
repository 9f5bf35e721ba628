from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.localgrid import LocalGrid
from tests.compute_contract import ComputeBackendContract

# How LocalGrid runs: without SSH, with a real SSH server per VM, in a process of its own
LOCAL_GRIDS = [
    pytest.param({"ssh": False}, id="no-ssh"),
    pytest.param({"ssh": True}, id="with-ssh"),
    pytest.param({"own_process": True}, id="own-process"),
]


class TestLocalGridContract(ComputeBackendContract):
    @pytest.fixture(params=LOCAL_GRIDS)
    async def backend(
        self, request: pytest.FixtureRequest, tmp_path: Path
    ) -> AsyncIterator[LocalGrid]:
        options: dict[str, Any] = request.param
        async with LocalGrid(data_dir=tmp_path, deploy_delay=0, action_delay=0, **options) as grid:
            yield grid
