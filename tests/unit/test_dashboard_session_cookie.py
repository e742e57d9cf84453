"""The dashboard session cookie's signature: what it accepts and what it refuses."""

from __future__ import annotations

from api.security.sessions import DashboardSession, session_cookie, session_id_of_cookie, sign_session_id
from shared.settings import Settings

OLD, NEW = "an old server secret of some length", "the new server secret of some length"


def settings(**values: object) -> Settings:
    return Settings(secret_key=NEW, **values)  # type: ignore[arg-type]


def test_a_signed_id_reads_back_and_a_tampered_one_does_not() -> None:
    s = settings()
    cookie = sign_session_id(s, "abc123")
    assert session_id_of_cookie(s, cookie) == "abc123"
    session_id, _, signature = cookie.partition(".")
    assert session_id_of_cookie(s, f"abd123.{signature}") is None  # another id, same signature
    assert session_id_of_cookie(s, f"{session_id}.{signature[:-1]}0") is None
    assert session_id_of_cookie(s, session_id) is None  # unsigned
    assert session_id_of_cookie(s, f".{signature}") is None
    assert session_id_of_cookie(s, f"{'a' * 65}.{signature}") is None  # longer than any we make


def test_a_cookie_signed_before_a_key_rotation_still_reads_and_one_from_another_server_does_not() -> None:
    before = sign_session_id(Settings(secret_key=OLD), "abc123")
    assert session_id_of_cookie(settings(secret_key_previous=OLD), before) == "abc123"
    assert session_id_of_cookie(settings(), before) is None


def test_the_cookie_is_secure_behind_an_https_public_url() -> None:
    session = DashboardSession(id="abc", digest="d", csrf_token="t", key_id="k", key_name="")
    https = session_cookie(settings(server={"public_url": "https://kiln.example"}), session)
    assert https.secure and https.httponly and https.samesite == "strict" and https.max_age == 12 * 3600
    assert not session_cookie(settings(server={"public_url": "http://127.0.0.1:8000"}), session).secure
    cleared = session_cookie(settings(), None)
    assert cleared.value == "" and cleared.max_age == 0
