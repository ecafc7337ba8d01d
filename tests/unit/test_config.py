"""Settings precedence: overrides > REKEY_* variables > rekey.toml > defaults."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from kms_adapters.keyref import InvalidKeyRef, KeyRef
from rekey.config import ConfigError, load_settings


def test_defaults_point_at_the_dev_stack(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, environ={})
    assert settings.temporal_address == "127.0.0.1:7233"
    assert settings.vault_addr == "http://127.0.0.1:8200"
    assert settings.aws_endpoint == "http://127.0.0.1:5000"
    assert settings.store_url == f"sqlite:///{tmp_path.resolve() / 'state.db'}"


def test_home_from_environment(tmp_path: Path) -> None:
    assert load_settings(environ={"REKEY_HOME": str(tmp_path)}).home == tmp_path


def test_precedence(tmp_path: Path) -> None:
    (tmp_path / "rekey.toml").write_text('openbao_port = 9100\ntransit_mount = "kek"\nmoto_port = 6000\n')
    settings = load_settings(tmp_path, environ={"REKEY_MOTO_PORT": "6001"})
    assert settings.vault_addr == "http://127.0.0.1:9100"  # derived from the file's port
    assert settings.transit_mount == "kek"
    assert settings.aws_endpoint == "http://127.0.0.1:6001"  # environment beats file
    explicit = load_settings(tmp_path, environ={"REKEY_VAULT_ADDR": "http://vault.internal:8200"})
    assert explicit.vault_addr == "http://vault.internal:8200"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("openbao_port = 'x'", "openbao_port must be an integer"),
        ("openbao_port = 70000", "port number"),
        ("vault_addr = 5", "vault_addr must be a string"),
        ("this is not toml", "cannot read settings"),
    ],
)
def test_bad_settings_file(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "rekey.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(tmp_path, environ={})


def test_bad_environment_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="REKEY_TEMPORAL_PORT"):
        load_settings(tmp_path, environ={"REKEY_TEMPORAL_PORT": "abc"})


def test_vault_token_from_dev_stack_init_file(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, environ={})
    assert settings.resolved_vault_token() == ""
    settings.openbao_dir.mkdir()
    fd = os.open(settings.openbao_init_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps({"root_token": "s.dev", "unseal_key": "k"}).encode())
    os.close(fd)
    assert settings.resolved_vault_token() == "s.dev"
    assert load_settings(tmp_path, environ={"REKEY_VAULT_TOKEN": "s.env"}).resolved_vault_token() == "s.env"


def test_key_refs() -> None:
    assert KeyRef.parse("vault:orders") == KeyRef("vault", "orders")
    assert str(KeyRef.parse("aws:alias/orders")) == "aws:alias/orders"
    for bad in ("orders", "gcp:orders", "vault:", "vault:a b"):
        with pytest.raises(InvalidKeyRef):
            KeyRef.parse(bad)


def test_blob_freshness_setting(tmp_path: Path) -> None:
    assert load_settings(tmp_path, environ={}).blob_freshness == "tofu"
    assert load_settings(tmp_path, environ={"REKEY_BLOB_FRESHNESS": "strict"}).blob_freshness == "strict"
    (tmp_path / "rekey.toml").write_text('blob_freshness = "off"\n')
    with pytest.raises(ConfigError, match="blob_freshness must be one of tofu, strict"):
        load_settings(tmp_path, environ={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('vault_adr = "http://vault:8200"', "unknown setting 'vault_adr'; did you mean 'vault_addr'?"),
        ("store_ulr = 'sqlite:///x.db'", "did you mean 'store_url'?"),
        ("nothing_like_a_setting = 1", "unknown setting 'nothing_like_a_setting'"),
        ('home = "/elsewhere"', "home cannot be set in rekey.toml"),
    ],
)
def test_unknown_field_in_the_settings_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "rekey.toml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load_settings(tmp_path, environ={})
    assert caught.value.exit_code == 2
    assert "\n" not in str(caught.value)


def test_unknown_rekey_variable_is_refused_with_the_closest_known(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("REKEY_VAULT_ADR; did you mean 'REKEY_VAULT_ADDR'?")):
        load_settings(tmp_path, environ={"REKEY_VAULT_ADR": "http://vault:8200"})
    with pytest.raises(ConfigError, match="unknown setting variable REKEY_STORE"):
        load_settings(tmp_path, environ={"REKEY_STORE": "sqlite:///x.db"})


def test_which_rekey_variables_are_checked(tmp_path: Path) -> None:
    """Every REKEY_ + upper-case name must be a field's variable or REKEY_HOME; names rekey never
    reads (no REKEY_ prefix, lower or mixed case) are left alone."""
    environ = {
        "REKEY_HOME": str(tmp_path),
        "REKEY_VAULT_ADDR": "http://vault:8200",
        "rekey_vault_adr": "x",
        "REKEY_vault_adr": "x",
        "MYREKEY_VAULT_ADR": "x",
    }
    assert load_settings(tmp_path, environ=environ).vault_addr == "http://vault:8200"
    # Every variable Settings.environ() hands a child process is a known one.
    child = load_settings(tmp_path, environ={}).environ()
    assert load_settings(tmp_path, environ=child).store_url == load_settings(tmp_path, environ={}).store_url


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REKEY_VAULT_ADDR", " "),
        ("REKEY_VAULT_ADDR", "127.0.0.1:8200"),
        ("REKEY_VAULT_ADDR", "ftp://127.0.0.1"),
        ("REKEY_VAULT_ADDR", "http://[::1"),
        ("REKEY_AWS_ENDPOINT", "http://127.0.0.1:99999"),
        ("REKEY_AWS_ENDPOINT", "http://user:pw@127.0.0.1:5000"),
        ("REKEY_AZURE_VAULT_URL", "https://a b"),
        ("REKEY_AZURE_VAULT_URL", "https://host/?x=1"),
        ("REKEY_TEMPORAL_ADDRESS", "127.0.0.1"),
        ("REKEY_TEMPORAL_ADDRESS", "127.0.0.1:0"),
        ("REKEY_TEMPORAL_ADDRESS", "http://127.0.0.1:7233"),
    ],
)
def test_endpoints_that_no_client_could_use_are_refused_naming_the_setting(
    tmp_path: Path, variable: str, value: str
) -> None:
    setting = variable.removeprefix("REKEY_").lower()
    with pytest.raises(ConfigError, match=f"^{setting} ") as caught:
        load_settings(tmp_path, environ={variable: value})
    assert "\n" not in str(caught.value)


def test_endpoints_of_a_real_deployment_are_accepted(tmp_path: Path) -> None:
    settings = load_settings(
        tmp_path,
        environ={
            "REKEY_VAULT_ADDR": "https://vault.internal:8200",
            "REKEY_AWS_ENDPOINT": "https://kms.eu-west-1.amazonaws.com",
            "REKEY_AZURE_VAULT_URL": "https://my-hsm.managedhsm.azure.net/",
            "REKEY_TEMPORAL_ADDRESS": "rekey.a1b2c.tmprl.cloud:7233",
        },
    )
    assert settings.temporal_address == "rekey.a1b2c.tmprl.cloud:7233"
    assert load_settings(tmp_path, environ={"REKEY_VAULT_ADDR": "http://[::1]:8200"}).vault_addr


@pytest.mark.parametrize("token", ["s.ÍX", "a b", "tok\n", "\x00"])
def test_a_token_that_cannot_travel_in_a_header_is_refused_without_showing_it(
    tmp_path: Path, token: str
) -> None:
    with pytest.raises(ConfigError, match="vault_token must be printable ASCII") as caught:
        load_settings(tmp_path, environ={"REKEY_VAULT_TOKEN": token})
    assert token not in str(caught.value)


@pytest.mark.parametrize("region", ["", "../../x", "eu west 1", "us-east-1\n", "-x", "123", "a" * 64])
def test_an_aws_region_botocore_would_crash_on_is_refused(tmp_path: Path, region: str) -> None:
    # botocore raises InvalidRegionError (no rekey error: "internal error") when it makes the
    # client; an empty region is accepted by botocore and answered 500 by the endpoint.
    with pytest.raises(ConfigError, match=r"^aws_region "):
        load_settings(tmp_path, environ={"REKEY_AWS_REGION": region})


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-3", "us-gov-west-1", "local"])
def test_real_aws_regions_are_accepted(tmp_path: Path, region: str) -> None:
    assert load_settings(tmp_path, environ={"REKEY_AWS_REGION": region}).aws_region == region


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("REKEY_VAULT_ADDR", "http://127.0.0.1:8200/v1/", "vault_addr .* must not have a path"),
        ("REKEY_TEMPORAL_NAMESPACE", "default\nWARN forged", "temporal_namespace .* is not a namespace name"),
        ("REKEY_TEMPORAL_NAMESPACE", "", "temporal_namespace '' is not a namespace name"),
        ("REKEY_TRANSIT_MOUNT", "../sys", "transit_mount '../sys' is not a mount path"),
        ("REKEY_TRANSIT_MOUNT", "transit/../sys", "is not a mount path"),
        ("REKEY_WITNESS_DIR", "w\x1b[2J", "witness_dir .* holds unprintable characters"),
        ("REKEY_AZURE_CA_FILE", "ca\n.pem", "azure_ca_file .* holds unprintable characters"),
    ],
)
def test_settings_an_sdk_would_misuse_are_refused(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(tmp_path, environ={variable: value})
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


def test_mounts_and_namespaces_of_real_deployments_are_accepted(tmp_path: Path) -> None:
    settings = load_settings(
        tmp_path,
        environ={"REKEY_TRANSIT_MOUNT": "team-a/transit", "REKEY_TEMPORAL_NAMESPACE": "rekey-prod.a1b2c"},
    )
    assert (settings.transit_mount, settings.temporal_namespace) == ("team-a/transit", "rekey-prod.a1b2c")
