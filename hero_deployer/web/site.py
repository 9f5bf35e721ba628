"""What belongs to the dashboard's own site: its public origin, the Hosts it answers, redirects.

Without a public URL the dashboard answers only `127.0.0.1`, `localhost` or `[::1]` on the port
the request came in on (DNS rebinding gets 421); with `--public-url https://…` it answers only
that URL's host and port, and its cookies carry `Secure`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

LOOPBACK_NAMES: Final = frozenset({"127.0.0.1", "localhost", "::1"})
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
HOST_HEADER: Final = re.compile(r"\A(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?\Z")
# A redirect target is one of the dashboard's own GET pages, with an optional plain query. The
# path starts with a single "/" followed by a letter: no "//", "/\", scheme, control character
# or percent-escape can reach the Location header, so a browser resolves it on this site.
NEXT_TARGET: Final = re.compile(
    r"\A/(?:users(?:/[A-Za-z0-9_-]{1,40})?|audit|tenant)"
    r"(?:\?(?:[A-Za-z0-9_.~:=&+-]|%[0-9A-Fa-f]{2})*)?\Z"
)
HOME: Final = "/users"
MISDIRECTED: Final = 421
BAD_REQUEST: Final = 400


def safe_next(value: str | None) -> str:
    """`value` when it is one of the dashboard's own pages, else `/users`: never off-site."""
    if value and NEXT_TARGET.fullmatch(value):
        return value
    return HOME


@dataclass(frozen=True, slots=True)
class Site:
    """The dashboard's public origin (empty scheme: none configured, loopback only)."""

    scheme: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, public_url: str) -> Site:
        """The site of `public_url` (`http(s)://host[:port]`); ValueError says what is wrong."""
        if not public_url:
            return cls()
        parts = urlsplit(public_url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"--public-url must be http(s)://host[:port], got {public_url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError("--public-url takes no path, query, fragment or user")
        try:
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise ValueError(f"--public-url has a bad port: {public_url!r}") from None
        return cls(scheme=parts.scheme, host=parts.hostname.lower(), port=port)

    @property
    def secure(self) -> bool:
        """True when browsers reach the dashboard over https: cookies get `Secure`."""
        return self.scheme == "https"

    @property
    def origin(self) -> str:
        """`scheme://host[:port]` as a browser sends it in `Origin`; empty without a public URL."""
        if not self.scheme:
            return ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = DEFAULT_PORTS[self.scheme] == self.port
        return f"{self.scheme}://{host}" + ("" if default else f":{self.port}")

    def host_status(self, header: str | None, local_port: int | None) -> int:
        """0 when the `Host` header names this site, 400 when it is malformed, else 421."""
        if header is None or not HOST_HEADER.fullmatch(header):
            return BAD_REQUEST
        parts = urlsplit("//" + header)
        try:
            port = parts.port
        except ValueError:
            return BAD_REQUEST
        name = (parts.hostname or "").lower()
        if self.scheme:
            ok = name == self.host and (port or DEFAULT_PORTS[self.scheme]) == self.port
        else:
            ok = name in LOOPBACK_NAMES and (port or 80) == local_port
        return 0 if ok else MISDIRECTED

    def same_origin(self, origin: str, host: str) -> bool:
        """True when a request's `Origin` header is this site's."""
        if self.scheme:
            return origin.lower() == self.origin
        return urlsplit(origin).netloc == host
