"""The HealthProbe port: the HTTP status a URL answers with."""

from __future__ import annotations

import httpx

from adapters.httpx_owner import HttpxOwner
from core.ports import ExternalError


class HttpxHealthProbe(HttpxOwner):
    """GETs a URL with httpx, without following redirects, and reports the status."""

    def __init__(
        self,
        timeout: float = 5.0,
        *,
        verify: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            timeout=timeout, verify=verify, transport=transport, follow_redirects=False
        )

    async def status(self, url: str) -> int:
        """The status of GET `url`; ExternalError(retryable=True) when no answer comes."""
        try:
            response = await self._client.get(url)
        except httpx.TimeoutException:
            raise ExternalError(f"{url} did not answer in time", retryable=True) from None
        except httpx.TransportError as exc:
            raise ExternalError(
                f"cannot reach {url}: {type(exc).__name__}", retryable=True
            ) from None
        return response.status_code
