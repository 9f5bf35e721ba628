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

# forgejo/forgejo routers/api/v1/admin/user.go `CreateUser`: a password that misses a class is
# `ctx.Error(http.StatusBadRequest, "PasswordComplexity", errors.New("PasswordComplexity"))`.
COMPLEXITY_MESSAGE = "PasswordComplexity"
_SPECIAL = re.compile(r"[^A-Za-z0-9]")
# forgejo/forgejo modules/validation/helpers.go `IsValidUsername`, with `ALLOW_DOTS_IN_USERNAMES`
# at its default (true, modules/setting/service.go): Go's `\w` is ASCII and its `$` is the end of
# the text, hence re.ASCII and `\Z` here.
_USERNAME_WITH_DOTS = re.compile(r"^[\da-zA-Z][-.\w]*\Z", re.ASCII)
_INVALID_USERNAME = re.compile(r"[-._]{2,}|[-._]\Z")
# forgejo/forgejo modules/structs/admin_user.go `CreateUserOption.Username`:
# `binding:"Required;Username;MaxSize(40)"`.
USERNAME_MAX = 40
# forgejo/forgejo models/user/user.go `reservedUsernames` and `reservedUserPatterns`, kept here on
# their own (not imported from core) so the fake refuses what Forgejo refuses, not what we think.
RESERVED_USERNAMES = frozenset(
    {
        ".", "..", "-", ".well-known", "api", "metrics", "v2", "assets", "attachments",
        "avatar", "avatars", "repo-avatars", "captcha", "login", "org", "repo", "user",
        "admin", "explore", "issues", "pulls", "milestones", "notifications", "report_abuse",
        "favicon.ico", "manifest.json", "robots.txt", "sitemap.xml", "ssh_info",
        "swagger.v1.json", "ghost", "gitea-actions", "forgejo-actions",
    }
)  # fmt: skip
RESERVED_USER_PATTERNS = ("*.keys", "*.gpg", "*.rss", "*.atom", "*.png")
# forgejo/forgejo models/auth/access_token_scope.go: the scopes a token can carry.
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
} | {"all", "public-only"}


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
    """Speaks `/api/v1/user`, `/api/v1/users/{name}`, `/api/v1/admin/users` and user tokens."""

    def __init__(
        self,
        *,
        admin_user: str = "forge_admin",
        admin_password: str = "Admin-Passw0rd!",
        admin_token: str = "0123456789abcdef0123456789abcdef01234567",
        admin_token_scopes: tuple[str, ...] = ("write:admin", "read:user"),
    ) -> None:
        super().__init__()
        self.admin_token = admin_token
        self.requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        self.users: dict[str, FakeUser] = {}
        self.add_user(admin_user, password=admin_password, is_admin=True)
        self.admin_user = admin_user
        self.admin_password = admin_password
        self.token_scopes: dict[str, tuple[str, ...]] = {admin_token: admin_token_scopes}

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

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/user", self._get_me),
            web.get("/api/v1/users/{name}", self._get_user),
            web.post("/api/v1/admin/users", self._create_user),
            web.post("/api/v1/users/{name}/tokens", self._create_token),
        ]

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

    async def _record(
        self, request: web.Request, scope: str
    ) -> tuple[FakeUser | None, str | None, Any, web.Response | None]:
        """Records the request; the caller, the auth scheme, the body and a scope refusal."""
        user, claimed, scheme = self._authenticate(request)
        body = await request.json() if request.can_read_body else None
        self.requests.append(RecordedRequest(request.method, request.path, body, claimed, scheme))
        refusal = None
        if user is not None and scheme == "token":
            refusal = self._scope_refusal(request, scope)
        return user, scheme, body, refusal

    async def _signed_in(
        self, request: web.Request, scope: str, anonymous: str
    ) -> tuple[FakeUser, str | None, Any] | web.Response:
        """`_record` for a route that needs a caller: a 401 saying `anonymous` without one."""
        caller, scheme, body, refusal = await self._record(request, scope)
        if refusal is not None:
            return refusal
        return (caller, scheme, body) if caller is not None else _error(401, anonymous)

    def _scope_refusal(self, request: web.Request, category: str) -> web.Response | None:
        """forgejo/forgejo routers/api/v1/api.go `tokenRequiresScopes`: only a token has scopes;
        a POST/PUT/PATCH/DELETE needs `write:<category>`, anything else `read:<category>`."""
        level = "write" if request.method in ("POST", "PUT", "PATCH", "DELETE") else "read"
        required = f"{level}:{category}"
        token = request.headers.get("Authorization", "").partition(" ")[2]
        if _has_scope(self.token_scopes.get(token, ()), required):
            return None
        return _error(403, f"token does not have at least one of required scope(s): [{required}]")

    # Routes --------------------------------------------------------------------------------

    async def _get_me(self, request: web.Request) -> web.Response:
        # forgejo/forgejo routers/api/v1/api.go: the `/user` group is
        # `tokenRequiresScopes(AccessTokenScopeCategoryUser), reqToken`.
        found = await self._signed_in(request, "user", "token is required")
        return found if isinstance(found, web.Response) else web.json_response(found[0].as_json())

    async def _get_user(self, request: web.Request) -> web.Response:
        _, _, _, refusal = await self._record(request, "user")
        if refusal is not None:
            return refusal
        user = self.users.get(request.match_info["name"].lower())
        if user is None:
            name = request.match_info["name"]
            return _error(404, f"user redirect does not exist [name: {name}]")
        return web.json_response(user.as_json())

    async def _create_user(self, request: web.Request) -> web.Response:
        # forgejo/forgejo routers/api/v1/api.go: the `/admin` group is
        # `tokenRequiresScopes(AccessTokenScopeCategoryAdmin), reqToken, reqSiteAdmin()`; the
        # body is bound (422 on a binding error) only after those.
        found = await self._signed_in(request, "admin", "token is required")
        if isinstance(found, web.Response):
            return found
        caller, _, body = found
        if not caller.is_admin:
            return _error(403, "user should be the site admin")
        if not isinstance(body, dict):
            return _error(422, "invalid JSON body")
        problem = _binding_problem(body)
        if problem:
            return _error(422, problem)
        username, email, password = body["username"], body["email"], body.get("password", "")
        if not password_is_complex(password):
            return _error(400, COMPLEXITY_MESSAGE)
        problem = _unusable_username(username)
        if problem:
            return _error(422, problem)
        if username.lower() in self.users:
            return _error(422, f"user already exists [name: {username}]")
        if any(u.email.lower() == email.lower() for u in self.users.values()):
            return _error(422, f"e-mail already in use [email: {email}]")
        user = self.add_user(username, password=password, email=email)
        user.full_name = body.get("full_name", "")
        user.must_change_password = bool(body.get("must_change_password", True))
        return web.json_response(user.as_json(), status=201)

    async def _create_token(self, request: web.Request) -> web.Response:
        # forgejo/forgejo routers/api/v1/api.go: `/users/{username}/tokens` is in the `/users`
        # group (user scope) under `reqSelfOrAdmin()`; its POST adds `reqBasicOrRevProxyAuth()`,
        # which refuses any login but a password with 401 "auth method not allowed".
        found = await self._signed_in(request, "user", "auth required")
        if isinstance(found, web.Response):
            return found
        caller, scheme, body = found
        owner = self.users.get(request.match_info["name"].lower())
        if owner is None or (owner.login != caller.login and not caller.is_admin):
            return _error(403, "doer should be the site admin or be same as the contextUser")
        if scheme != "basic":
            return _error(401, "auth method not allowed")
        if not isinstance(body, dict) or not body.get("name"):
            return _error(422, "[Name]: Required")
        scopes = body.get("scopes") or []
        if not scopes or not set(scopes) <= SCOPES:
            return _error(400, "invalid access token scope provided")
        if body["name"] in owner.tokens:
            return _error(422, "access token name has been used already")
        sha1 = hashlib.sha1(secrets.token_bytes(20)).hexdigest()
        owner.tokens[body["name"]] = sha1
        self.token_scopes[sha1] = tuple(scopes)
        token = {
            "id": len(owner.tokens),
            "name": body["name"],
            "sha1": sha1,
            "token_last_eight": sha1[-8:],
            "scopes": scopes,
        }
        return web.json_response(token, status=201)


def _has_scope(scopes: tuple[str, ...], required: str) -> bool:
    """forgejo/forgejo models/auth/access_token_scope.go `HasScope`: `all` holds every scope and
    `write:<category>` holds `read:<category>`."""
    level, _, category = required.partition(":")
    held = {"all", required} | ({f"write:{category}"} if level == "read" else set())
    return bool(held & set(scopes))


def _binding_problem(body: dict[str, Any]) -> str:
    """The first binding error of `CreateUserOption`, in field order, as the API words it.

    forgejo/forgejo routers/api/v1/api.go `bind`: `"%s: %s", errs[0].FieldNames, errs[0].Error()`;
    modules/validation/binding.go `addUsernamePatternRule`: "invalid username".
    """
    username = body.get("username")
    if not username:
        return "[Username]: Required"
    if not isinstance(username, str) or not _valid_username(username):
        return "[Username]: invalid username"
    if len(username) > USERNAME_MAX:
        return "[Username]: MaxSize"
    if not body.get("email"):
        return "[Email]: Required"
    return ""


def _valid_username(name: str) -> bool:
    """forgejo/forgejo modules/validation/helpers.go `IsValidUsername`."""
    return bool(_USERNAME_WITH_DOTS.match(name)) and not _INVALID_USERNAME.search(name)


def _unusable_username(name: str) -> str:
    """forgejo/forgejo models/db/name.go `IsUsableName`: trimmed, lower case; names, patterns."""
    lower = name.strip().lower()
    if lower in RESERVED_USERNAMES:
        return f"name is reserved [name: {lower}]"
    for pattern in RESERVED_USER_PATTERNS:
        if (pattern[0] == "*" and lower.endswith(pattern[1:])) or (
            pattern[-1] == "*" and lower.startswith(pattern[:-1])
        ):
            return f"name pattern is not allowed [pattern: {pattern}]"
    return ""


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"message": message, "url": "http://forge.invalid/api/swagger"}, status=status
    )
