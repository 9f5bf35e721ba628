"""The NodeDirectory and GatewayNameRegistry ports over the ThreeFold grid proxy's API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import httpx
import msgspec

from adapters.httpx_owner import HttpxOwner
from core.ports import ExternalError, NameHolder, NodeInfo

_GIB = 1024**3
_PAGE_SIZE = 50  # the grid proxy's default page size
# The grid proxy of each network, as threefoldtech/tfgrid-sdk-go's grid-client lists them
# (grid-client/deployer, ProxyURLs).
GRIDPROXY_URLS: Final = {
    "main": "https://gridproxy.grid.tf",
    "test": "https://gridproxy.test.grid.tf",
    "qa": "https://gridproxy.qa.grid.tf",
    "dev": "https://gridproxy.dev.grid.tf",
}
# A name contract holds its name until it is deleted (tfchain pallet-smart-contract lib.rs
# removes ContractIDByNameRegistration only then); the grid proxy's contract states
# (tfgrid-sdk-go grid-proxy/pkg/types/contracts.go).
_LIVE_STATES: Final = ("Created", "GracePeriod")


def gridproxy_url_for(network: str) -> str:
    """The grid proxy URL of a grid network; ValueError for an unknown network."""
    try:
        return GRIDPROXY_URLS[network]
    except KeyError:
        raise ValueError(
            f"unknown grid network {network!r}: one of {', '.join(GRIDPROXY_URLS)}"
        ) from None


class _Capacity(msgspec.Struct):
    cru: int = 0
    mru: int = 0
    sru: int = 0
    hru: int = 0


class _PublicConfig(msgspec.Struct):
    domain: str = ""


class _Node(msgspec.Struct, rename="camel"):
    node_id: int
    total_resources: _Capacity = msgspec.field(name="total_resources", default_factory=_Capacity)
    used_resources: _Capacity = msgspec.field(name="used_resources", default_factory=_Capacity)
    public_config: _PublicConfig = msgspec.field(default_factory=_PublicConfig)
    status: str = ""
    healthy: bool = False
    rented: bool = False
    dedicated: bool = False


class _NameDetails(msgspec.Struct):
    name: str = ""


class _Contract(msgspec.Struct):
    contract_id: int
    twin_id: int = 0
    state: str = ""
    type: str = ""
    details: _NameDetails = msgspec.field(default_factory=_NameDetails)


class _ErrorBody(msgspec.Struct):
    error: str = ""


class GridProxyDirectory(HttpxOwner):
    """Candidate nodes that are up, healthy, shared and have a gateway domain, with their
    headroom; and who holds a gateway name."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            transport=transport,
            headers={"Accept": "application/json"},
        )

    async def candidate_nodes(self, node_ids: Sequence[int]) -> list[NodeInfo]:
        """The nodes among `node_ids` the grid proxy lists as up, healthy, gateway-capable and
        neither rented nor dedicated (a deploy on such a node fails for anyone but its renter)."""
        if not node_ids:
            return []
        # Filter names: tfgrid-sdk-go grid-proxy/pkg/types/nodes.go, NodeFilter.
        params = {
            "node_ids": ",".join(str(n) for n in node_ids),
            "status": "up",
            "healthy": "true",
            "domain": "true",
            "rented": "false",
            "dedicated": "false",
        }
        if len(node_ids) > _PAGE_SIZE:
            params["size"] = str(len(node_ids))
        nodes = await self._get("/nodes", params, list[_Node])
        wanted = set(node_ids)
        # The proxy applies the filters; checking again keeps a lax or stale proxy from
        # offering a node the VM or the gateway step cannot use.
        return [
            _node_info(n)
            for n in nodes
            if n.node_id in wanted
            and n.status == "up"
            and n.healthy
            and n.public_config.domain
            and not n.rented
            and not n.dedicated
        ]

    async def name_holder(self, name: str) -> NameHolder | None:
        """The live name contract holding the gateway name `name`, or None while it is free."""
        # Filter names: tfgrid-sdk-go grid-proxy/pkg/types/contracts.go, ContractFilter.
        params = [("type", "name"), ("name", name)] + [("state", s) for s in _LIVE_STATES]
        contracts = await self._get("/contracts", params, list[_Contract])
        for contract in contracts:
            if (
                contract.type == "name"
                and contract.details.name == name
                and contract.state in _LIVE_STATES
            ):
                return NameHolder(contract_id=contract.contract_id, twin_id=contract.twin_id)
        return None

    async def _get(self, path: str, params: Any, kind: Any) -> Any:
        """GETs `path` and decodes its JSON as `kind`; ExternalError when that fails."""
        try:
            response = await self._client.get(path, params=params)
        except httpx.TimeoutException:
            raise ExternalError("the grid proxy did not answer in time", retryable=True) from None
        except httpx.TransportError as exc:
            raise ExternalError(
                f"cannot reach the grid proxy: {type(exc).__name__}", retryable=True
            ) from None
        if response.status_code != 200:
            raise _refusal(response)
        try:
            return msgspec.json.decode(response.content, type=kind)
        except msgspec.DecodeError as exc:
            raise ExternalError(f"the grid proxy sent an unexpected body: {exc}") from None


def _node_info(node: _Node) -> NodeInfo:
    """Headroom is total minus used, never negative; memory and disk (SSD) in GiB."""
    total, used = node.total_resources, node.used_resources
    return NodeInfo(
        node_id=node.node_id,
        free_memory_gb=max(total.mru - used.mru, 0) / _GIB,
        free_disk_gb=max(total.sru - used.sru, 0) / _GIB,
        free_cpu=max(total.cru - used.cru, 0),
        gateway_domain=node.public_config.domain,
        up=node.status == "up",
    )


def _refusal(response: httpx.Response) -> ExternalError:
    """The grid proxy's `error` message; 5xx, 408 and 429 are worth retrying."""
    try:
        message = msgspec.json.decode(response.content, type=_ErrorBody).error
    except msgspec.DecodeError:
        message = ""
    status = response.status_code
    return ExternalError(
        f"the grid proxy answered {status}" + (f": {message}" if message else ""),
        retryable=status >= 500 or status in (408, 429),
    )
