"""The NodeDirectory port over the ThreeFold grid proxy's `/nodes` API."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Self

import httpx
import msgspec

from core.ports import ExternalError, NodeInfo

_GIB = 1024**3
_PAGE_SIZE = 50  # the grid proxy's default page size


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


class _ErrorBody(msgspec.Struct):
    error: str = ""


class GridProxyDirectory:
    """Candidate nodes that are up, healthy and have a gateway domain, with their headroom."""

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

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the connection pool."""
        await self._client.aclose()

    async def candidate_nodes(self, node_ids: Sequence[int]) -> list[NodeInfo]:
        """The nodes among `node_ids` the grid proxy lists as up, healthy and gateway-capable."""
        if not node_ids:
            return []
        params = {
            "node_ids": ",".join(str(n) for n in node_ids),
            "status": "up",
            "healthy": "true",
            "domain": "true",
        }
        if len(node_ids) > _PAGE_SIZE:
            params["size"] = str(len(node_ids))
        try:
            response = await self._client.get("/nodes", params=params)
        except httpx.TimeoutException:
            raise ExternalError("the grid proxy did not answer in time", retryable=True) from None
        except httpx.TransportError as exc:
            raise ExternalError(
                f"cannot reach the grid proxy: {type(exc).__name__}", retryable=True
            ) from None
        if response.status_code != 200:
            raise _refusal(response)
        try:
            nodes = msgspec.json.decode(response.content, type=list[_Node])
        except msgspec.DecodeError as exc:
            raise ExternalError(f"the grid proxy sent an unexpected body: {exc}") from None
        wanted = set(node_ids)
        # The proxy applies the filters; checking again keeps a lax or stale proxy from
        # offering a node the gateway step cannot use.
        return [
            _node_info(n)
            for n in nodes
            if n.node_id in wanted and n.status == "up" and n.healthy and n.public_config.domain
        ]


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
