from collections.abc import AsyncIterator

import httpx
import pytest

from adapters.forge_http import ForgejoClient, generate_password
from core.ports import ExternalError, ForgeUser
from tests.fakes.forgejo import (
    COMPLEXITY_MESSAGE,
    FakeForgejo,
    RecordedRequest,
    password_is_complex,
)

PASSWORD = "Str0ng-Enough-Passw0rd!"


@pytest.fixture
async def forge() -> AsyncIterator[FakeForgejo]:
    async with FakeForgejo() as fake:
        yield fake


@pytest.fixture
async def client(forge: FakeForgejo) -> AsyncIterator[ForgejoClient]:
    async with ForgejoClient(
        forge.url, admin_user=forge.admin_user, admin_password=forge.admin_password
    ) as c:
        yield c


def admin_basic(forge: FakeForgejo, method: str, path: str, json: object = None) -> RecordedRequest:
    return RecordedRequest(method, path, json, forge.admin_user, "basic")


async def test_find_user_returns_the_account(forge: FakeForgejo, client: ForgejoClient) -> None:
    forge.add_user("alice", password=PASSWORD, email="alice@example.org")

    user = await client.find_user("alice")

    assert user == ForgeUser(id=2, login="alice", email="alice@example.org")
    assert forge.requests == [admin_basic(forge, "GET", "/api/v1/users/alice")]


async def test_find_user_is_none_on_404(forge: FakeForgejo, client: ForgejoClient) -> None:
    assert await client.find_user("nobody") is None
    assert forge.requests == [admin_basic(forge, "GET", "/api/v1/users/nobody")]


async def test_create_user_posts_the_admin_request(
    forge: FakeForgejo, client: ForgejoClient
) -> None:
    user = await client.create_user(
        "alice", email="alice@example.org", password=PASSWORD, full_name="Alice A."
    )

    assert user == ForgeUser(id=2, login="alice", email="alice@example.org")
    body = {
        "username": "alice",
        "email": "alice@example.org",
        "password": PASSWORD,
        "must_change_password": False,
        "full_name": "Alice A.",
        "send_notify": False,
        "source_id": 0,
        "login_name": "alice",
    }
    assert forge.requests == [admin_basic(forge, "POST", "/api/v1/admin/users", body)]
    assert forge.users["alice"].must_change_password is False
    assert forge.users["alice"].password == PASSWORD


async def test_admin_token_is_sent_as_a_token_header(forge: FakeForgejo) -> None:
    async with ForgejoClient(
        forge.url, admin_user=forge.admin_user, admin_token=forge.admin_token
    ) as client:
        await client.create_user("alice", email="a@example.org", password=PASSWORD)
        assert await client.find_user("alice") is not None

    assert [(r.auth_user, r.auth_scheme) for r in forge.requests] == [
        (forge.admin_user, "token"),
        (forge.admin_user, "token"),
    ]


async def test_an_existing_user_is_refused_with_forgejos_message(
    forge: FakeForgejo, client: ForgejoClient
) -> None:
    forge.add_user("alice", password=PASSWORD)

    with pytest.raises(ExternalError) as caught:
        await client.create_user("alice", email="other@example.org", password=PASSWORD)

    assert caught.value.message == "user already exists [name: alice]"
    assert caught.value.retryable is False
    assert PASSWORD not in str(caught.value)


async def test_a_weak_password_is_refused_with_forgejos_message(client: ForgejoClient) -> None:
    with pytest.raises(ExternalError) as caught:
        await client.create_user("alice", email="a@example.org", password="weak-pass")

    assert caught.value.message == COMPLEXITY_MESSAGE
    assert caught.value.retryable is False


async def test_wrong_admin_credentials_are_not_retryable(forge: FakeForgejo) -> None:
    async with ForgejoClient(
        forge.url, admin_user=forge.admin_user, admin_password="wrong-password"
    ) as client:
        with pytest.raises(ExternalError) as caught:
            await client.create_user("alice", email="a@example.org", password=PASSWORD)

    assert caught.value.retryable is False
    assert "wrong-password" not in str(caught.value)
    assert "alice" not in forge.users


async def test_create_token_authenticates_as_the_user(
    forge: FakeForgejo, client: ForgejoClient
) -> None:
    await client.create_user("alice", email="a@example.org", password=PASSWORD)

    token = await client.create_token(
        "alice", password=PASSWORD, token_name="hero", scopes=["write:repository", "read:user"]
    )

    assert forge.users["alice"].tokens == {"hero": token}
    assert len(token) == 40
    assert forge.requests[-1] == RecordedRequest(
        "POST",
        "/api/v1/users/alice/tokens",
        {"name": "hero", "scopes": ["write:repository", "read:user"]},
        "alice",
        "basic",
    )


async def test_create_token_with_a_wrong_password_fails_without_leaking_it(
    forge: FakeForgejo, client: ForgejoClient
) -> None:
    forge.add_user("alice", password=PASSWORD)

    with pytest.raises(ExternalError) as caught:
        await client.create_token(
            "alice", password="Not-The-Passw0rd", token_name="hero", scopes=["read:user"]
        )

    assert (
        caught.value.message
        == "forgejo answered 401 to POST /api/v1/users/alice/tokens: auth required"
    )
    assert caught.value.retryable is False
    assert "Not-The-Passw0rd" not in str(caught.value)
    assert forge.users["alice"].tokens == {}


async def test_a_reused_token_name_is_refused(forge: FakeForgejo, client: ForgejoClient) -> None:
    forge.add_user("alice", password=PASSWORD)
    await client.create_token("alice", password=PASSWORD, token_name="hero", scopes=["all"])

    with pytest.raises(ExternalError, match="access token name has been used already"):
        await client.create_token("alice", password=PASSWORD, token_name="hero", scopes=["all"])


@pytest.mark.parametrize("mode", ["503", "closed"])
async def test_forge_down_is_retryable_and_recovers(
    forge: FakeForgejo, client: ForgejoClient, mode: str
) -> None:
    assert await client.find_user("alice") is None
    await forge.go_down(mode)  # type: ignore[arg-type]

    with pytest.raises(ExternalError) as caught:
        await client.create_user("alice", email="a@example.org", password=PASSWORD)
    assert caught.value.retryable is True
    assert "forgejo" in caught.value.message
    assert PASSWORD not in str(caught.value)

    await forge.come_up()
    assert (await client.create_user("alice", email="a@example.org", password=PASSWORD)).login == (
        "alice"
    )


async def test_a_stalled_forge_times_out_as_retryable(forge: FakeForgejo) -> None:
    async with ForgejoClient(
        forge.url, admin_user=forge.admin_user, admin_password=forge.admin_password, timeout=0.2
    ) as client:
        await forge.go_down("hang")
        with pytest.raises(ExternalError, match="did not answer") as caught:
            await client.find_user("alice")

    assert caught.value.retryable is True


async def test_an_unreachable_forge_is_retryable() -> None:
    async with FakeForgejo() as fake:
        url = fake.url
    async with ForgejoClient(url, admin_user="admin", admin_password="pw") as client:
        with pytest.raises(ExternalError, match="cannot reach forgejo") as caught:
            await client.find_user("alice")

    assert caught.value.retryable is True


def test_credentials_are_required() -> None:
    with pytest.raises(ValueError):
        ForgejoClient("http://127.0.0.1:1", admin_user="admin")


def test_generated_passwords_meet_the_complexity_rules() -> None:
    passwords = [generate_password() for _ in range(200)]

    assert len(set(passwords)) == len(passwords)
    assert all(len(p) == 24 and password_is_complex(p) for p in passwords)
    assert all(p.isascii() and p.isprintable() and " " not in p for p in passwords)
    assert len(generate_password(16)) == 16
    with pytest.raises(ValueError):
        generate_password(15)


# Forgejo's username rule (issue 11, item 7) ------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "message"),
    [
        ("_bob", "[Username]: invalid username"),
        ("bob-", "[Username]: invalid username"),
        ("a__b", "[Username]: invalid username"),
        ("bob\n", "[Username]: invalid username"),
        ("admin", "name is reserved [name: admin]"),
        ("Explore", "name is reserved [name: explore]"),
    ],
)
async def test_usernames_forgejo_refuses_are_refused_by_the_fake_with_422(
    forge: FakeForgejo, client: ForgejoClient, username: str, message: str
) -> None:
    # These are requests the adapter sent before the service checked Forgejo's rule itself.
    with pytest.raises(ExternalError) as caught:
        await client.create_user(username, email="x@example.org", password=PASSWORD)

    assert caught.value.message == message
    assert caught.value.retryable is False
    assert set(forge.users) == {forge.admin_user}


async def test_a_dotted_username_is_one_forgejo_accepts(client: ForgejoClient) -> None:
    # Forgejo allows dots (ALLOW_DOTS_IN_USERNAMES defaults to true); the service refuses them
    # itself because a username is a NATS subject token. The fake follows Forgejo, not us.
    user = await client.create_user("bob.smith", email="b@example.org", password=PASSWORD)
    assert user.login == "bob.smith"


# Admin token scopes -----------------------------------------------------------------------------


def token_client(forge: FakeForgejo) -> ForgejoClient:
    return ForgejoClient(forge.url, admin_user=forge.admin_user, admin_token=forge.admin_token)


async def test_an_admin_token_without_write_admin_cannot_create_users() -> None:
    async with FakeForgejo(admin_token_scopes=("read:user",)) as forge, token_client(forge) as c:
        with pytest.raises(ExternalError) as caught:
            await c.create_user("alice", email="a@example.org", password=PASSWORD)

    assert caught.value.message == (
        "forgejo answered 403 to POST /api/v1/admin/users: "
        "token does not have at least one of required scope(s): [write:admin]"
    )
    assert "alice" not in forge.users


@pytest.mark.parametrize(
    "scopes", [("write:admin", "read:user"), ("all",), ("write:admin", "write:user")]
)
async def test_check_passes_a_token_with_the_needed_scopes(scopes: tuple[str, ...]) -> None:
    async with FakeForgejo(admin_token_scopes=scopes) as forge, token_client(forge) as c:
        assert await c.check() == []

    assert set(forge.users) == {forge.admin_user}  # the probes created nothing


async def test_check_passes_admin_password_credentials(client: ForgejoClient) -> None:
    assert await client.check() == []


@pytest.mark.parametrize(
    ("scopes", "missing"),
    [
        (("read:user",), ["write:admin"]),
        (("read:admin", "write:admin"), ["read:user"]),
        (("write:repository",), ["read:user", "write:admin"]),
    ],
)
async def test_check_names_each_missing_scope(scopes: tuple[str, ...], missing: list[str]) -> None:
    async with FakeForgejo(admin_token_scopes=scopes) as forge, token_client(forge) as c:
        problems = await c.check()

    assert sorted(p.split("`")[1] for p in problems) == missing
    assert all("lacks the" in p and "required scope(s)" in p for p in problems)
    assert all(forge.admin_token not in p for p in problems)


async def test_check_reports_refused_credentials_without_echoing_them(forge: FakeForgejo) -> None:
    async with ForgejoClient(
        forge.url, admin_user=forge.admin_user, admin_token="f" * 40
    ) as client:
        problems = await client.check()

    assert problems == ["forgejo refused the admin credentials: token is required"]


async def test_check_reports_an_admin_user_that_is_no_site_admin(forge: FakeForgejo) -> None:
    forge.add_user("helper", password=PASSWORD)
    async with ForgejoClient(forge.url, admin_user="helper", admin_password=PASSWORD) as client:
        assert await client.check() == ["the forgejo admin user is not a site administrator"]


async def test_check_reports_an_unreachable_forge() -> None:
    async with FakeForgejo() as fake:
        url = fake.url
    async with ForgejoClient(url, admin_user="admin", admin_password="pw") as client:
        (problem,) = await client.check()

    assert problem.startswith("cannot reach forgejo")


@pytest.mark.parametrize(
    ("scopes", "status", "message"),
    [
        (("all",), 401, "auth method not allowed"),
        (
            ("write:admin", "read:user"),
            403,
            "token does not have at least one of required scope(s): [write:user]",
        ),
    ],
)
async def test_the_fake_creates_tokens_only_for_a_password_login(
    scopes: tuple[str, ...], status: int, message: str
) -> None:
    # What tokenRequiresScopes and then reqBasicOrRevProxyAuth refuse: a token mints no tokens.
    async with (
        FakeForgejo(admin_token_scopes=scopes) as forge,
        httpx.AsyncClient(base_url=forge.url) as http,
    ):
        response = await http.post(
            f"/api/v1/users/{forge.admin_user}/tokens",
            json={"name": "t", "scopes": ["read:user"]},
            headers={"Authorization": f"token {forge.admin_token}"},
        )

    assert response.status_code == status
    assert response.json()["message"] == message
