"""An adapter that owns an httpx client: used with `async with`, it closes the client's pool."""

from __future__ import annotations

from typing import Self

import httpx


class HttpxOwner:
    """The owner of `self._client`: `async with` yields it, `aclose` closes the pool."""

    _client: httpx.AsyncClient

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the connection pool."""
        await self._client.aclose()
