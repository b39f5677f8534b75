"""The credentials an upstream's error answer may quote back (`capture._credentials`): what the
client sent in its URL, raw and decoded, wherever the URL holds a parameter."""

from __future__ import annotations

from llmtap.gateway.capture import Capture, _credentials, _scrub_text


def _capture(url: str) -> Capture:
    return Capture("id", "default", "openai", "POST", "/v1/x", url, [], None, b"", 0, 0.0, 0.0, 1024)


def test_url_credentials_are_known_raw_decoded_and_after_any_separator() -> None:
    # rev26: only the `?` query split at `&` was read, and only decoded values were kept, so an
    # upstream echoing the raw URL had these stored whole in the error body
    cap = _capture(
        "https://api.example.com/v1/x;key=PATHPARAMSECRET77?a=1;token=SEMICOLONSECRET9"
        "&key=AbC%2BQUERYSECRET88%3D&model=gpt-4o#frag"
    )
    secrets = _credentials(cap)
    for value in ["PATHPARAMSECRET77", "SEMICOLONSECRET9", "AbC%2BQUERYSECRET88%3D", "AbC+QUERYSECRET88="]:
        assert value.encode() in secrets, value
    assert b"gpt-4o" not in secrets and b"1" not in secrets
    echoed = (
        "Invalid URL (POST /v1/x;key=PATHPARAMSECRET77?a=1;token=SEMICOLONSECRET9&key=AbC%2BQUERYSECRET88%3D)"
        " for key AbC+QUERYSECRET88="
    )
    shown = "Invalid URL (POST /v1/x;key=***?a=1;token=***&key=***) for key ***"
    assert _scrub_text(echoed, secrets) == shown


def test_a_url_without_credentials_gives_none() -> None:
    assert _credentials(_capture("https://api.example.com/v1/models;v=2?limit=20&order=desc")) == set()
    assert _credentials(_capture("https://api.example.com/v1/chat/completions")) == set()


def test_every_value_the_url_rule_masks_is_known() -> None:
    # rev28b: a key as a plain value, a bare piece or a name, and an encoded URL's password,
    # were masked in the recorded URL but not in the error the upstream quoted it in
    key = "sk-proj-Ab3dEfGh1jKlMn0pQrStUvWxYz012345"
    nxt = "https%3A%2F%2Fbob%3AHunter2Secret99%40db.example.com%2F"
    cap = _capture(f"https://api.example.com/v1/x?x={key}%zz&next={nxt}&{key[:-1]}Q=1")
    secrets = _credentials(cap)
    echoed = (
        f"Invalid URL (POST /v1/x?x={key}%zz&next={nxt}&{key[:-1]}Q=1);"
        " next=https://bob:Hunter2Secret99@db.example.com/"
    )
    assert _scrub_text(echoed, secrets) == "Invalid URL (POST /v1/x?x=***&next=***&***=1); next=***"
    assert _credentials(_capture(f"https://api.example.com/v1/x?{key}")) == {key.encode()}
