from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from adapters.gridproxy_http import GRIDPROXY_URLS, GridProxyDirectory, gridproxy_url_for
from core.ports import ExternalError, NameHolder, NodeInfo
from tests.fakes.gridproxy import (
    CANDIDATE_QUERY,
    GIB,
    FakeGridProxy,
    NameContractError,
    NameRegistry,
    RecordedQuery,
    grid_node,
)

CANDIDATES = [1, 8, 13, 50]
# The query the adapter used to send, before it excluded rented and dedicated nodes.
OLD_QUERY = {"node_ids": "1,8,13,50", "status": "up", "healthy": "true", "domain": "true"}


@pytest.fixture
async def proxy() -> AsyncIterator[FakeGridProxy]:
    nodes = [
        grid_node(1, total_memory_gb=64, used_memory_gb=60, domain="gw1.grid.tf"),
        grid_node(
            8, total_memory_gb=128, used_memory_gb=32, used_disk_gb=250, domain="gw8.grid.tf"
        ),
        grid_node(13, status="down", domain="gw13.grid.tf"),
        grid_node(50, healthy=False, domain="gw50.grid.tf"),
        grid_node(51, domain="gw51.grid.tf"),
        grid_node(52),
    ]
    async with FakeGridProxy(nodes) as fake:
        yield fake


@pytest.fixture
async def directory(proxy: FakeGridProxy) -> AsyncIterator[GridProxyDirectory]:
    async with GridProxyDirectory(proxy.url) as d:
        yield d


async def test_asks_for_up_healthy_gateway_nodes_among_the_candidates(
    proxy: FakeGridProxy, directory: GridProxyDirectory
) -> None:
    nodes = await directory.candidate_nodes(CANDIDATES)

    assert proxy.requests == [RecordedQuery("GET", "/nodes", CANDIDATE_QUERY)]
    assert [n.node_id for n in nodes] == [1, 8]


async def test_headroom_is_total_minus_used_in_gib(directory: GridProxyDirectory) -> None:
    nodes = {n.node_id: n for n in await directory.candidate_nodes(CANDIDATES)}

    assert nodes[8] == NodeInfo(
        node_id=8,
        free_memory_gb=96.0,
        free_disk_gb=750.0,
        free_cpu=32,
        gateway_domain="gw8.grid.tf",
        up=True,
    )
    assert nodes[1].free_memory_gb == 4.0


async def test_overcommitted_nodes_have_no_negative_headroom(proxy: FakeGridProxy) -> None:
    proxy.nodes = [
        grid_node(1, total_memory_gb=8, used_memory_gb=9, used_cpu=40, domain="gw.grid.tf")
    ]
    async with GridProxyDirectory(proxy.url) as directory:
        (node,) = await directory.candidate_nodes([1])

    assert (node.free_memory_gb, node.free_cpu) == (0.0, 0)


async def test_a_lax_proxy_cannot_offer_unusable_nodes(proxy: FakeGridProxy) -> None:
    class LaxProxy(FakeGridProxy):
        async def _nodes(self, request: web.Request) -> web.Response:  # ignores every filter
            self.requests.append(RecordedQuery(request.method, request.path, dict(request.query)))
            return web.json_response(self.nodes)

    async with LaxProxy(proxy.nodes) as lax, GridProxyDirectory(lax.url) as directory:
        nodes = await directory.candidate_nodes(CANDIDATES)

    assert [n.node_id for n in nodes] == [1, 8]


async def test_no_candidates_asks_nothing(
    proxy: FakeGridProxy, directory: GridProxyDirectory
) -> None:
    assert await directory.candidate_nodes([]) == []
    assert proxy.requests == []


async def test_real_sized_values_decode(proxy: FakeGridProxy) -> None:
    node = grid_node(13, domain="gent02.grid.tf")
    node["total_resources"] = {"cru": 48, "mru": 202875785216, "sru": 512110190592, "hru": 0}
    node["used_resources"] = {"cru": 6, "mru": 25769803776, "sru": 107374182400, "hru": 0}
    proxy.nodes = [node]
    async with GridProxyDirectory(proxy.url) as directory:
        (info,) = await directory.candidate_nodes([13])

    assert info.free_memory_gb == pytest.approx((202875785216 - 25769803776) / GIB)
    assert info.free_disk_gb == pytest.approx(376.9, abs=0.1)
    assert info.free_cpu == 42


@pytest.mark.parametrize("mode", ["503", "closed"])
async def test_proxy_down_is_retryable(
    proxy: FakeGridProxy, directory: GridProxyDirectory, mode: str
) -> None:
    await proxy.go_down(mode)  # type: ignore[arg-type]

    with pytest.raises(ExternalError) as caught:
        await directory.candidate_nodes(CANDIDATES)

    assert caught.value.retryable is True
    await proxy.come_up()
    assert len(await directory.candidate_nodes(CANDIDATES)) == 2


async def test_a_stalled_proxy_times_out(proxy: FakeGridProxy) -> None:
    await proxy.go_down("hang")
    async with GridProxyDirectory(proxy.url, timeout=0.2) as directory:
        with pytest.raises(ExternalError, match="did not answer") as caught:
            await directory.candidate_nodes(CANDIDATES)

    assert caught.value.retryable is True


async def test_a_refused_query_is_not_retryable(proxy: FakeGridProxy) -> None:
    class StrictProxy(FakeGridProxy):
        async def _nodes(self, request: web.Request) -> web.Response:
            return web.json_response({"error": "invalid node_ids"}, status=400)

    async with StrictProxy() as strict, GridProxyDirectory(strict.url) as directory:
        with pytest.raises(ExternalError, match="400: invalid node_ids") as caught:
            await directory.candidate_nodes(CANDIDATES)

    assert caught.value.retryable is False


# Rented and dedicated nodes ------------------------------------------------------------------


async def test_rented_and_dedicated_nodes_are_not_candidates(proxy: FakeGridProxy) -> None:
    proxy.nodes = [
        grid_node(1, domain="gw1.grid.tf", rented=True),
        grid_node(8, domain="gw8.grid.tf", dedicated=True),
        grid_node(13, domain="gw13.grid.tf"),
    ]
    async with GridProxyDirectory(proxy.url) as directory:
        nodes = await directory.candidate_nodes(CANDIDATES)

    assert [n.node_id for n in nodes] == [13]
    assert proxy.requests[-1].query == CANDIDATE_QUERY


async def test_the_old_query_was_offered_rented_and_dedicated_nodes(proxy: FakeGridProxy) -> None:
    proxy.nodes = [
        grid_node(1, domain="gw1.grid.tf", rented=True),
        grid_node(8, domain="gw8.grid.tf", dedicated=True),
    ]
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        old = (await http.get("/nodes", params=OLD_QUERY)).json()
        new = (await http.get("/nodes", params=CANDIDATE_QUERY)).json()

    assert [n["nodeId"] for n in old] == [1, 8]
    assert new == []


async def test_a_lax_proxy_cannot_offer_rented_or_dedicated_nodes() -> None:
    class LaxProxy(FakeGridProxy):
        async def _nodes(self, request: web.Request) -> web.Response:  # ignores every filter
            return web.json_response(self.nodes)

    nodes = [grid_node(1, domain="a.grid.tf", rented=True), grid_node(8, domain="b.grid.tf")]
    nodes.append(grid_node(13, domain="c.grid.tf", dedicated=True))
    async with LaxProxy(nodes) as lax, GridProxyDirectory(lax.url) as directory:
        assert [n.node_id for n in await directory.candidate_nodes(CANDIDATES)] == [8]


# Grid proxy URLs -----------------------------------------------------------------------------


def test_each_network_has_its_grid_proxy() -> None:
    assert gridproxy_url_for("main") == "https://gridproxy.grid.tf"
    for network in ("test", "qa", "dev"):
        assert gridproxy_url_for(network) == f"https://gridproxy.{network}.grid.tf"
    assert set(GRIDPROXY_URLS) == {"main", "test", "qa", "dev"}
    with pytest.raises(ValueError, match="unknown grid network 'mainnet'"):
        gridproxy_url_for("mainnet")


# Gateway names -------------------------------------------------------------------------------


async def test_a_free_name_has_no_holder_and_a_taken_one_names_its_contract(
    tmp_path: Path,
) -> None:
    names = NameRegistry(tmp_path / "names.json")
    contract = names.create("someone_alice", twin_id=77)
    async with FakeGridProxy(names=names) as proxy, GridProxyDirectory(proxy.url) as directory:
        assert await directory.name_holder("hd_alice") is None
        assert await directory.name_holder("someone_alice") == NameHolder(
            contract_id=contract, twin_id=77
        )
        names.cancel("someone_alice", twin_id=77)
        assert await directory.name_holder("someone_alice") is None

    assert proxy.requests[0].path == "/contracts"
    assert proxy.requests[0].query["type"] == "name"
    assert proxy.requests[0].query["name"] == "hd_alice"


def test_the_registry_refuses_what_tfchain_refuses(tmp_path: Path) -> None:
    names = NameRegistry(tmp_path / "names.json")
    names.create("alice", twin_id=1)

    for name, error in [
        ("Alice", "NameNotValid"),  # the gateway name the adapter used to send for `Alice`
        ("al", "NameContractNameTooShort"),
        ("a" * 65, "NameContractNameTooLong"),
        ("a.b", "NameNotValid"),
        ("alice", "NameExists"),  # whoever holds it: the registry is the whole grid's
    ]:
        with pytest.raises(NameContractError, match=error):
            names.create(name, twin_id=2)


async def test_an_unreachable_proxy_is_a_retryable_name_lookup(proxy: FakeGridProxy) -> None:
    await proxy.go_down("503")
    async with GridProxyDirectory(proxy.url) as directory:
        with pytest.raises(ExternalError) as caught:
            await directory.name_holder("hd_alice")

    assert caught.value.retryable is True
