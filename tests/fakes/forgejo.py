"""A fake Forgejo API: users, admin user creation and access tokens, as Forgejo answers them."""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import LoopbackServer

COMPLEXITY_MESSAGE = "password does not meet complexity requirements"
_SPECIAL = re.compile(r"[^A-Za-z0-9]")
_USERNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,39}$")
SCOPES = {
    f"{access}:{category}"
    for access in ("read", "write")
    for category in (
        "activitypub",
        "admin",
        "issue",
        "misc",
        "notification",
        "organization",
        "package",
        "repository",
        "user",
    )
} | {"all"}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    json: Any
    auth_user: str | None
    auth_scheme: str | None


@dataclass
class FakeUser:
    id: int
    login: str
    email: str
    password: str
    full_name: str = ""
    is_admin: bool = False
    must_change_password: bool = False
    tokens: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "login": self.login,
            "login_name": self.login,
            "source_id": 0,
            "full_name": self.full_name,
            "email": self.email,
            "avatar_url": f"http://forge.invalid/avatars/{self.id}",
            "language": "",
            "is_admin": self.is_admin,
            "restricted": False,
            "active": True,
            "prohibit_login": False,
            "visibility": "public",
            "username": self.login,
        }


def password_is_complex(password: str) -> bool:
    """Forgejo's `PASSWORD_COMPLEXITY = lower,upper,digit,spec` with an 8-character minimum."""
    return (
        len(password) >= 8
        and any(c.islower() for c in password)
        and any(c.isupper() for c in password)
        and any(c.isdigit() for c in password)
        and bool(_SPECIAL.search(password))
    )


class FakeForgejo(LoopbackServer):
    """Speaks `/api/v1/users/{name}`, `/api/v1/admin/users`, `/api/v1/users/{name}/tokens`."""

    def __init__(
        self,
        *,
        admin_user: str = "forge_admin",
        admin_password: str = "Admin-Passw0rd!",
        admin_token: str = "0123456789abcdef0123456789abcdef01234567",
    ) -> None:
        super().__init__()
        self.admin_token = admin_token
        self.requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        self.users: dict[str, FakeUser] = {}
        self.add_user(admin_user, password=admin_password, is_admin=True)
        self.admin_user = admin_user
        self.admin_password = admin_password

    def add_user(
        self, login: str, *, password: str, email: str = "", is_admin: bool = False
    ) -> FakeUser:
        """Seeds an account, as if it had been created earlier."""
        user = FakeUser(
            id=next(self._ids),
            login=login,
            email=email or f"{login}@forge.invalid",
            password=password,
            is_admin=is_admin,
        )
        self.users[login.lower()] = user
        return user

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/users/{name}", self._get_user)
        app.router.add_post("/api/v1/admin/users", self._create_user)
        app.router.add_post("/api/v1/users/{name}/tokens", self._create_token)
        return app

    # Auth ----------------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> tuple[FakeUser | None, str | None, str | None]:
        """The authenticated user (or None), the claimed user name, and the scheme used."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                login, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                return None, None, "basic"
            user = self.users.get(login.lower())
            if user is None or not secrets.compare_digest(user.password, password):
                return None, login, "basic"
            return user, login, "basic"
        if scheme.lower() in ("token", "bearer"):
            if secrets.compare_digest(value, self.admin_token):
                admin = self.users[self.admin_user.lower()]
                return admin, admin.login, "token"
            for user in self.users.values():
                if value in user.tokens.values():
                    return user, user.login, "token"
            return None, None, "token"
        return None, None, None

    async def _record(self, request: web.Request) -> tuple[FakeUser | None, str | None, Any]:
        """Records the request; returns the authenticated user, the auth scheme and the body."""
        user, claimed, scheme = self._authenticate(request)
        body = await request.json() if request.can_read_body else None
        self.requests.append(RecordedRequest(request.method, request.path, body, claimed, scheme))
        return user, scheme, body

    # Routes --------------------------------------------------------------------------------

    async def _get_user(self, request: web.Request) -> web.Response:
        await self._record(request)
        user = self.users.get(request.match_info["name"].lower())
        if user is None:
            name = request.match_info["name"]
            return _error(404, f"user redirect does not exist [name: {name}]")
        return web.json_response(user.as_json())

    async def _create_user(self, request: web.Request) -> web.Response:
        caller, _, body = await self._record(request)
        if caller is None:
            return _error(401, "token is required")
        if not caller.is_admin:
            return _error(403, "reqSiteAdmin")
        if not isinstance(body, dict):
            return _error(422, "invalid JSON body")
        for required in ("username", "email", "password"):
            if not body.get(required):
                return _error(422, f"[{required.capitalize()}]: Required")
        username, email, password = body["username"], body["email"], body["password"]
        if not _USERNAME.match(username):
            return _error(422, "[Username]: Username should contain only alphanumeric characters")
        if username.lower() in self.users:
            return _error(422, f"user already exists [name: {username}]")
        if any(u.email.lower() == email.lower() for u in self.users.values()):
            return _error(422, f"e-mail already in use [email: {email}]")
        if not password_is_complex(password):
            return _error(422, COMPLEXITY_MESSAGE)
        user = self.add_user(username, password=password, email=email)
        user.full_name = body.get("full_name", "")
        user.must_change_password = bool(body.get("must_change_password", True))
        return web.json_response(user.as_json(), status=201)

    async def _create_token(self, request: web.Request) -> web.Response:
        caller, scheme, body = await self._record(request)
        if caller is None or scheme != "basic":
            return _error(401, "auth required")
        owner = self.users.get(request.match_info["name"].lower())
        if owner is None or owner.login != caller.login:
            return _error(403, "user should have a permission to create tokens for this user")
        if not isinstance(body, dict) or not body.get("name"):
            return _error(422, "[Name]: Required")
        scopes = body.get("scopes") or []
        if not scopes or not set(scopes) <= SCOPES:
            return _error(400, "invalid access token scope provided")
        if body["name"] in owner.tokens:
            return _error(422, "access token name has been used already")
        sha1 = hashlib.sha1(secrets.token_bytes(20)).hexdigest()
        owner.tokens[body["name"]] = sha1
        token = {
            "id": len(owner.tokens),
            "name": body["name"],
            "sha1": sha1,
            "token_last_eight": sha1[-8:],
            "scopes": scopes,
        }
        return web.json_response(token, status=201)


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"message": message, "url": "http://forge.invalid/api/swagger"}, status=status
    )
