"""Key references hold a safe alphabet (issue 12 finding 2), and only configured ones are used."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kms_adapters.keyref import BACKENDS, InvalidKeyRef, KeyRef
from rekey.backends import adapter_for, known_key_ref
from rekey.config import ConfigError, Settings, load_settings

GOOD = [
    "vault:orders",
    "vault:orders-2.v1",
    "vault:a_b-c.d.e",
    "vault:" + "a" * 128,
    "aws:orders",
    "aws:team/orders",
    "aws:a/b/c_d-e",
    "azure:orders-2",
    "azure:" + "a" * 127,
]

BAD = [
    "vault:x/../../../sys/seal",
    "vault:x/../../keys/orders/rotate",
    "vault:..",
    "vault:.",
    "vault:.hidden",
    "vault:trailing.",
    "vault:a..b",
    "vault:a/b",  # Transit names hold no '/'
    "vault:x\n",  # `$` let this through
    "vault:x\r",
    "vault:x\x00",
    "vault:x%2F..",
    "vault:x y",
    "vault:" + "a" * 129,
    "vault:",
    "vault:-x",
    "vault:ørders",
    "aws:a/../b",
    "aws:./a",
    "aws:a//b",
    "aws:/a",
    "aws:a/",
    "aws:a.b",
    "aws:orders\n",
    "aws:" + "a" * 129,
    "azure:a_b",
    "azure:Orders",  # Key Vault names ignore case: one key, one reference (one rotation id)
    "azure:ORDERS",
    "azure:a.b",
    "azure:a/b",
    "azure:" + "a" * 128,
    "gcp:orders",
    "orders",
    "",
]


@pytest.mark.parametrize("text", GOOD)
def test_safe_refs_parse_and_round_trip(text: str) -> None:
    ref = KeyRef.parse(text)
    assert str(ref) == text


@pytest.mark.parametrize("text", BAD)
def test_unsafe_refs_are_refused_with_one_line(text: str) -> None:
    with pytest.raises(InvalidKeyRef) as refused:
        KeyRef.parse(text)
    message = str(refused.value)
    assert message.startswith("key reference ") and "\n" not in message and "\r" not in message
    assert refused.value.exit_code == 2


def test_the_dataclass_checks_too() -> None:
    with pytest.raises(InvalidKeyRef):
        KeyRef("vault", "x/../sys/seal")
    with pytest.raises(InvalidKeyRef):
        KeyRef("gcp", "orders")
    with pytest.raises(InvalidKeyRef):
        KeyRef.parse(b"vault:orders")  # type: ignore[arg-type]


@given(st.sampled_from(BACKENDS), st.text(alphabet=st.sampled_from("ab_-./%\n:Z9"), min_size=0, max_size=40))
def test_every_accepted_ref_round_trips_and_cannot_climb(backend: str, name: str) -> None:
    text = f"{backend}:{name}"
    try:
        ref = KeyRef.parse(text)
    except InvalidKeyRef as exc:
        assert "\n" not in str(exc)
        return
    assert str(ref) == text and KeyRef.parse(str(ref)) == ref
    segments = ref.name.split("/")
    assert all(segment not in ("", ".", "..") for segment in segments)
    assert ".." not in ref.name and ref.name.isprintable() and ref.name.isascii()
    # every segment is its own percent-encoding: nothing to escape, nothing hvac could leave as-is
    assert all(quote(segment, safe="") == segment for segment in segments)
    if backend != "aws":
        assert segments == [ref.name]


# ------------------------------------------------------------------------------- allowed_keys


def test_allowed_keys_from_toml_and_environment(tmp_path: Path) -> None:
    (tmp_path / "rekey.toml").write_text('allowed_keys = ["vault:orders", "aws:team/*"]\n')
    settings = load_settings(tmp_path, environ={})
    assert settings.allowed_keys == ("vault:orders", "aws:team/*")
    assert settings.allows_key("vault:orders") and settings.allows_key("aws:team/x")
    assert not settings.allows_key("vault:orders2") and not settings.allows_key("aws:teamx")
    from_env = load_settings(tmp_path, environ={"REKEY_ALLOWED_KEYS": "azure:a, vault:b"})
    assert from_env.allowed_keys == ("azure:a", "vault:b")
    assert from_env.environ()["REKEY_ALLOWED_KEYS"] == "azure:a,vault:b"
    assert load_settings(tmp_path / "none", environ={}).allowed_keys == ()
    assert "REKEY_ALLOWED_KEYS" not in load_settings(tmp_path / "none", environ={}).environ()


@pytest.mark.parametrize(
    "value", ['["vault:x/../sys"]', '["gcp:*"]', '["vault:orders\\n"]', "[1]", "1", '["vault:a b*"]']
)
def test_bad_allowed_keys_are_a_config_error(tmp_path: Path, value: str) -> None:
    (tmp_path / "rekey.toml").write_text(f"allowed_keys = {value}\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(tmp_path, environ={})
    assert "allowed_keys" in str(refused.value) and "\n" not in str(refused.value)


def test_adapter_for_refuses_refs_the_configuration_does_not_know(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, vault_token="t", allowed_keys=("vault:orders", "azure:team-*"))
    assert known_key_ref(settings, "vault:orders") == KeyRef("vault", "orders")
    assert known_key_ref(settings, "azure:team-a") == KeyRef("azure", "team-a")
    for text in ("vault:other", "aws:orders", "azure:other", "vault:x/../../../sys/seal"):
        with pytest.raises(InvalidKeyRef):
            adapter_for(settings, text)
    open_settings = Settings(home=tmp_path, vault_token="t")
    assert adapter_for(open_settings, "vault:other").key_ref == "vault:other"  # no server call
    with pytest.raises(InvalidKeyRef):
        adapter_for(open_settings, "vault:x/../../keys/orders/rotate")


@pytest.mark.parametrize("text", ["vault:" + "a" * 10_000, "x" * 10_000 + ":k", "x" * 10_000])
def test_a_huge_ref_is_not_shown_whole(text: str) -> None:
    with pytest.raises(InvalidKeyRef) as refused:
        KeyRef.parse(text)
    assert len(str(refused.value)) < 300 and "10" in str(refused.value)
