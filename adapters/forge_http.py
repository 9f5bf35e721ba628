"""The Forge port over Forgejo's HTTP API, with admin credentials."""

from __future__ import annotations

import secrets
import string
from collections.abc import Sequence
from typing import Any, Final, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from adapters.httpx_owner import HttpxOwner
from core.ports import ExternalError, ForgeUser

# Specials of Forgejo's `spec` class without quotes, `$`, `#`, `!`, `\` or spaces, so the password
# survives being pasted into a shell or a config file.
_SPECIALS = "%+,-.=@^_~"
# Forgejo's own message is the whole story for these; others also need the status.
_VERBATIM = frozenset({400, 409, 422})
_CLASSES = (string.ascii_lowercase, string.ascii_uppercase, string.digits, _SPECIALS)
_T = TypeVar("_T")
# The token scopes the admin calls need. forgejo/forgejo routers/api/v1/api.go: `find_user` is a
# GET in the `/users` group (`tokenRequiresScopes(...User)`: read:user), `create_user` a POST in
# the `/admin` group (`tokenRequiresScopes(...Admin)`: write:admin). Password logins have no scopes.
REQUIRED_SCOPES: Final = ("write:admin", "read:user")
_SCOPE_REFUSAL = "token does not have at least one of required scope(s)"


class _Token(msgspec.Struct):
    sha1: str


class _ErrorBody(msgspec.Struct):
    message: str = ""


class _Me(msgspec.Struct):
    is_admin: bool = False


def generate_password(length: int = 24) -> str:
    """A random password with a lower, an upper, a digit and a special, as Forgejo requires."""
    if length < 16:
        raise ValueError("a generated password has at least 16 characters")
    rng = secrets.SystemRandom()
    chars = [rng.choice(cls) for cls in _CLASSES]
    alphabet = "".join(_CLASSES)
    chars += [rng.choice(alphabet) for _ in range(length - len(chars))]
    rng.shuffle(chars)
    return "".join(chars)


class ForgejoClient(HttpxOwner):
    """A Forgejo server reached over HTTP; admin calls use a token if given, else basic auth."""

    def __init__(
        self,
        base_url: str,
        *,
        admin_user: str,
        admin_password: str | None = None,
        admin_token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not admin_password and not admin_token:
            raise ValueError("Forgejo needs an admin password or an admin token")
        self._admin_headers: dict[str, str] = {}
        self._admin_auth: httpx.BasicAuth | None = None
        if admin_token:
            self._admin_headers["Authorization"] = f"token {admin_token}"
        else:
            assert admin_password is not None
            self._admin_auth = httpx.BasicAuth(admin_user, admin_password)
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            transport=transport,
            headers={"Accept": "application/json"},
            follow_redirects=False,
        )

    async def find_user(self, username: str) -> ForgeUser | None:
        """The account named `username`, or None when Forgejo has none."""
        response = await self._send("GET", f"/api/v1/users/{_segment(username)}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise _refusal(response)
        return _decode(response, ForgeUser)

    async def create_user(
        self, username: str, *, email: str, password: str, full_name: str = ""
    ) -> ForgeUser:
        """Creates a local account that need not change its password; ExternalError otherwise."""
        body = {
            "username": username,
            "email": email,
            "password": password,
            "must_change_password": False,
            "full_name": full_name,
            "send_notify": False,
            "source_id": 0,
            "login_name": username,
        }
        response = await self._send("POST", "/api/v1/admin/users", json=body)
        if response.status_code != 201:
            raise _refusal(response, redact=password)
        return _decode(response, ForgeUser)

    async def create_token(
        self, username: str, *, password: str, token_name: str, scopes: Sequence[str]
    ) -> str:
        """Creates a scoped access token, authenticating as the user; returns the token."""
        response = await self._send(
            "POST",
            f"/api/v1/users/{_segment(username)}/tokens",
            json={"name": token_name, "scopes": list(scopes)},
            auth=httpx.BasicAuth(username, password),
        )
        if response.status_code != 201:
            raise _refusal(response, redact=password)
        return _decode(response, _Token).sha1

    async def check(self) -> list[str]:
        """What keeps the admin credentials from working, one line each; empty when usable.

        Forgejo tells no client its token's scopes, so each scope is probed with a request that
        needs it and changes nothing: `GET /api/v1/user` (read:user) and `POST /api/v1/admin/users`
        with an empty body, which the admin group's checks (scope, token, site admin) see first
        and the binding then refuses with 422, before any account is touched.
        """
        try:
            me = await self._send("GET", "/api/v1/user")
            create = await self._send("POST", "/api/v1/admin/users", json={})
        except ExternalError as error:
            return [error.message]
        problems = [
            p for p in (_probe_problem(me, "read:user"), _probe_problem(create, "write:admin")) if p
        ]
        if me.status_code == 200 and not _is_admin(me):
            problems.append("the forgejo admin user is not a site administrator")
        elif create.status_code == 403 and _SCOPE_REFUSAL not in _message(create):
            problems.append(f"forgejo refused the admin user: {_message(create)}")
        return list(dict.fromkeys(problems))

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        auth: httpx.BasicAuth | None = None,
    ) -> httpx.Response:
        """Sends one request, as the admin unless `auth` is given; transport failures retry."""
        headers = {} if auth else self._admin_headers
        try:
            return await self._client.request(
                method, path, json=json, headers=headers, auth=auth or self._admin_auth
            )
        except httpx.TimeoutException:
            raise ExternalError(
                f"forgejo did not answer {method} {path} in time", retryable=True
            ) from None
        except httpx.TransportError as exc:
            raise ExternalError(
                f"cannot reach forgejo for {method} {path}: {type(exc).__name__}", retryable=True
            ) from None


def _segment(name: str) -> str:
    """`name` as one URL path segment."""
    return quote(name, safe="")


def _message(response: httpx.Response) -> str:
    """Forgejo's `message`, or "" when the body has none."""
    try:
        return msgspec.json.decode(response.content, type=_ErrorBody).message
    except msgspec.DecodeError:
        return ""


def _is_admin(response: httpx.Response) -> bool:
    try:
        return bool(msgspec.json.decode(response.content, type=_Me).is_admin)
    except msgspec.DecodeError:
        return False


def _probe_problem(response: httpx.Response, scope: str) -> str:
    """The problem a scope probe shows: refused credentials, or the scope missing."""
    status, message = response.status_code, _message(response)
    if status == 401:
        return f"forgejo refused the admin credentials: {message or 'HTTP 401'}"
    if status == 403 and _SCOPE_REFUSAL in message:
        return f"the forgejo admin token lacks the `{scope}` scope (forgejo: {message})"
    if status >= 500 or status in (404, 405):
        return f"forgejo answered {status} to {response.request.method} {response.request.url.path}"
    return ""


def _refusal(response: httpx.Response, *, redact: str = "") -> ExternalError:
    """Forgejo's own message for a failed request; only 5xx, 408 and 429 are worth retrying."""
    message = _message(response)
    if redact:
        message = message.replace(redact, "***")
    status = response.status_code
    if status not in _VERBATIM or not message:
        request = response.request
        prefix = f"forgejo answered {status} to {request.method} {request.url.path}"
        message = f"{prefix}: {message}" if message else prefix
    return ExternalError(message, retryable=status >= 500 or status in (408, 429))


def _decode(response: httpx.Response, type_: type[_T]) -> _T:
    """Decodes a success body; a body that is not what Forgejo sends is an ExternalError."""
    try:
        return msgspec.json.decode(response.content, type=type_)
    except msgspec.DecodeError as exc:
        raise ExternalError(f"forgejo sent an unexpected body: {exc}") from None
