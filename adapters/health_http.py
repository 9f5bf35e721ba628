"""The HealthProbe port: the HTTP status a URL answers with."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import httpx

from core.ports import ExternalError


class HttpxHealthProbe:
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
