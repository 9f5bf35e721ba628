"""bench/fuzz_edge.py has a valid body for every operation the SDK knows, so it runs at all."""

from __future__ import annotations

import random

import pytest

from bench.fuzz_edge import Fuzzer
from hero_deployer.sdk.client import OPERATIONS


@pytest.mark.parametrize("op", sorted(o.name for o in OPERATIONS))
def test_the_fuzzer_has_a_valid_body_for_each_operation(op: str) -> None:
    fuzzer = Fuzzer(random.Random(1), sids=["vm_0123456789abcdef"])
    assert isinstance(fuzzer.valid_body(op), dict)
