"""rekey.client without a server: ids, durations, errors and their exit codes."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from temporalio.client import Client

from rekey.cli.output import EXIT_FAILED, EXIT_USAGE, exit_code_of, known_errors
from rekey.client import (
    InvalidDuration,
    InvalidId,
    InvalidOption,
    MigrationFailed,
    NoWorker,
    RekeyClient,
    RekeyClientError,
    RotationFailed,
    RotationNotFound,
    RotationRefused,
    ScheduleExists,
    ScheduleNotFound,
    TemporalRequestFailed,
    TemporalUnreachable,
    UpdateUnanswered,
    connect,
    key_ref_of,
    parse_duration,
    parse_rotation_id,
    parse_schedule_id,
    rotation_id,
    schedule_id,
    seconds,
)
from rekey.config import ConfigError, Settings
from tests.fixtures.cli import run_cli
from tests.fixtures.ports import free_port

# ---------------------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "key_ref", ["vault:orders", "aws:alias/orders", "vault:orders-2.v1", "azure:orders-2"]
)
def test_ids_are_built_from_the_key_ref_and_parsed_back(key_ref: str) -> None:
    assert rotation_id(key_ref) == f"rotate:{key_ref}"
    assert schedule_id(key_ref) == f"schedule:rotate:{key_ref}"
    for text in (key_ref, rotation_id(key_ref)):
        assert parse_rotation_id(text) == rotation_id(key_ref)
    for text in (key_ref, schedule_id(key_ref)):
        assert parse_schedule_id(text) == schedule_id(key_ref)
    for text in (key_ref, rotation_id(key_ref), schedule_id(key_ref)):
        assert key_ref_of(text) == key_ref


def test_a_rotation_a_schedule_started_keeps_its_scheduled_time() -> None:
    started = "rotate:vault:orders-2030-01-02T03:04:05Z"
    assert parse_rotation_id(started) == started
    assert key_ref_of(started) == "vault:orders"
    assert key_ref_of("rotate:vault:orders-2030") == "vault:orders-2030"  # a name, not a time


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "key reference '' must look like backend:name"),
        ("orders", "key reference 'orders' must look like backend:name"),
        ("gcp:orders", "unknown backend 'gcp'"),
        ("vault:", "key reference 'vault:': name must be"),
        ("vault:a b", "name must be"),
        ("vault:x\n", "key reference 'vault:x\\n': name must be"),
        ("vault:x\x1b[31m", "name must be"),
        ("rotate:", "rotation id 'rotate:': key reference '' must look like backend:name"),
        ("rotate:rotate:vault:x", "rotation id 'rotate:rotate:vault:x': key reference 'rotate:vault:x':"),
        ("rotate:gcp:x", "rotation id 'rotate:gcp:x': key reference 'gcp:x': unknown backend 'gcp'"),
        ("rotate:vault:x-2030-01-02T03:04:05Z-2030-01-02T03:04:05Z", "name must be"),
        ("rotate:vault:x-2030-01-02T03:04:05Z\n", "name must be"),
        ("schedule:rotate:vault:x", "unknown backend 'schedule'"),
    ],
)
def test_hostile_rotation_ids_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidId) as refused:
        parse_rotation_id(text)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert refused.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize(
    "text", ["", "schedule:rotate:", "schedule:rotate:gcp:x", "schedule:", "rotate:vault:x", "vault:x y"]
)
def test_hostile_schedule_ids_are_refused(text: str) -> None:
    with pytest.raises(InvalidId):
        parse_schedule_id(text)
    with pytest.raises(InvalidId):
        key_ref_of(text if text.startswith("schedule:") else f"schedule:rotate:{text}")


def test_building_an_id_checks_the_key_ref() -> None:
    for build in (rotation_id, schedule_id):
        with pytest.raises(InvalidId, match="unknown backend 'rotate'"):
            build("rotate:vault:x")  # an id where a key ref belongs


# ---------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("0s", 0),
        (" 0 ", 0),
        ("30s", 30),
        ("15m", 900),
        ("24h", 86400),
        ("7d", 604800),
        ("1h30m", 5400),
    ],
)
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == expected
    assert seconds(text) == expected


@pytest.mark.parametrize("text", ["", "5x", "-1s", "0m", "1.5h", "30", "30m1h", "1 h", "∞"])
def test_bad_durations_name_what_they_were_given_for(text: str) -> None:
    with pytest.raises(InvalidDuration) as refused:
        parse_duration(text, "--grace")
    assert str(refused.value) == f"--grace {text!r} is not a duration like 30s, 15m, 24h or 7d"
    assert refused.value.exit_code == EXIT_USAGE


def test_seconds_of_numbers_and_timedeltas() -> None:
    assert seconds(timedelta(minutes=2)) == 120 and seconds(1.5) == 1.5 and seconds(0) == 0
    for bad in (-1, timedelta(seconds=-1), math.nan):
        with pytest.raises(InvalidDuration, match=r"^grace must not be negative"):
            seconds(bad, "grace")


# -------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TemporalUnreachable("x"), EXIT_FAILED),
        (TemporalRequestFailed("x"), EXIT_FAILED),
        (RotationFailed("rotate:vault:x", "boom"), EXIT_FAILED),
        (MigrationFailed("migrate:gen-a:gen-b", "boom"), EXIT_FAILED),
        (InvalidId("x"), EXIT_USAGE),
        (InvalidDuration("x"), EXIT_USAGE),
        (InvalidOption("x"), EXIT_USAGE),
        (RotationRefused("x"), EXIT_USAGE),
        (NoWorker("x"), EXIT_FAILED),
        (UpdateUnanswered("x"), EXIT_FAILED),
        (RotationNotFound("x"), EXIT_USAGE),
        (ScheduleExists("x"), EXIT_USAGE),
        (ScheduleNotFound("x"), EXIT_USAGE),
    ],
)
def test_every_client_error_has_its_exit_code(error: RekeyClientError, code: int) -> None:
    assert isinstance(error, RekeyClientError) and isinstance(error, known_errors())
    assert error.exit_code == exit_code_of(error) == code
    assert type(error).__doc__  # each says what happened


def test_rotation_failed_carries_the_cause() -> None:
    failed = RotationFailed("rotate:vault:x", "vault:x does not exist")
    assert str(failed) == "rotation rotate:vault:x failed: vault:x does not exist"
    assert (failed.rotation_id, failed.cause) == ("rotate:vault:x", "vault:x does not exist")


def test_migration_failed_says_migration() -> None:
    failed = MigrationFailed("migrate:gen-a:gen-b", "new agent unreachable")
    assert str(failed) == "migration migrate:gen-a:gen-b failed: new agent unreachable"
    assert not isinstance(failed, RotationFailed)
    assert (failed.migration_id, failed.cause) == ("migrate:gen-a:gen-b", "new agent unreachable")


async def test_connect_names_the_address_it_cannot_reach(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(TemporalUnreachable) as unreachable:
        await connect(Settings(home=tmp_path, temporal_address=address))
    message = str(unreachable.value)
    assert message.startswith(f"cannot reach Temporal at {address}: ") and "\n" not in message


async def test_input_is_checked_before_anything_is_sent() -> None:
    client = RekeyClient(cast(Client, object()))  # any use of it would fail
    with pytest.raises(InvalidId):
        await client.start_rotation("gcp:orders")
    with pytest.raises(InvalidDuration, match=r"^grace '5x'"):
        await client.start_rotation("vault:orders", grace="5x")
    with pytest.raises(InvalidDuration, match=r"^destroy_after must not be negative"):
        await client.start_rotation("vault:orders", destroy_after=-1)
    with pytest.raises(InvalidDuration, match=r"^every must be longer than 0s"):
        await client.create_schedule("vault:orders", every="0s")
    with pytest.raises(InvalidDuration, match=r"^jitter "):
        await client.create_schedule("vault:orders", every="1d", jitter="soon")
    with pytest.raises(InvalidId):
        client.rotation("rotate:")
    for action in (client.pause_schedule, client.delete_schedule, client.describe_schedule):
        with pytest.raises(InvalidId):
            await action("schedule:rotate:")


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"grace": math.inf}, InvalidDuration, r"^grace inf is longer than 3660d"),
        ({"grace": 1e300}, InvalidDuration, r"^grace 1e\+300 is longer than 3660d"),
        ({"grace": "1000000000d"}, InvalidDuration, r"^grace '1000000000d' is longer than 3660d"),
        ({"destroy_after": timedelta(days=3661)}, InvalidDuration, r"^destroy_after .* is longer than"),
        ({"grace": math.nan}, InvalidDuration, r"^grace must not be negative"),
        ({"grace": True}, InvalidDuration, r"^grace must be seconds"),
        ({"batch_size": "10"}, InvalidOption, r"^batch_size must be an integer from 1 to 10000, got '10'"),
        ({"batch_size": True}, InvalidOption, r"^batch_size must be an integer"),
        ({"batch_size": 10_001}, InvalidOption, r"^batch_size must be an integer from 1 to 10000"),
        ({"in_flight": 0}, InvalidOption, r"^in_flight must be an integer from 1 to 16"),
        ({"started_by": "ci-bot\nrun 42"}, InvalidOption, r"^started_by contains control characters"),
        ({"started_by": "x" * 300}, InvalidOption, r"^started_by is longer than 256"),
    ],
)
async def test_options_no_rotation_could_run_with_are_refused_before_it_starts(
    options: dict[str, Any], error: type[RekeyClientError], message: str
) -> None:
    # Each of these used to start a rotation that stayed RUNNING for ever: the workflow task
    # or its first audit record failed on every attempt.
    client = RekeyClient(cast(Client, object()))  # any use of it would fail
    with pytest.raises(error, match=message):
        await client.start_rotation("vault:orders", **options)
    schedule_options = {"every": "1d", **options}
    with pytest.raises(error, match=message):
        await client.create_schedule("vault:orders", **schedule_options)


def test_a_scheduled_time_is_ascii_digits() -> None:
    with pytest.raises(InvalidId):
        parse_rotation_id("rotate:vault:x-\u0662\u0660\u0663\u0660-\u0660\u0661-\u0660\u0661T00:00:00Z")


def test_an_address_that_is_no_address_is_refused_by_the_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"temporal_address 'not a host' is not host:port"):
        Settings(home=tmp_path, temporal_address="not a host")


# ------------------------------------------------------------------------------ command line


def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, home: Path, *args: str) -> Any:
    monkeypatch.setenv("REKEY_HOME", str(home))
    monkeypatch.setenv("REKEY_TEMPORAL_ADDRESS", f"127.0.0.1:{free_port()}")
    return run_cli(capsys, *args)


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (("rotate", "status", "rotate:"), 2, "error: rotation id 'rotate:': key reference ''"),
        (("rotate", "approve", ""), 2, "error: key reference '' must look like backend:name"),
        (("rotate", "start", "gcp:x"), 2, "error: key reference 'gcp:x': unknown backend 'gcp'"),
        (("rotate", "start", "vault:x", "--grace", "5x"), 2, "error: --grace '5x' is not a duration"),
        (("schedule", "create", "vault:x", "--every", "0"), 2, "error: --every must be longer than 0s"),
        (("schedule", "delete", "schedule:rotate:"), 2, "error: schedule id 'schedule:rotate:': "),
        (("rotate", "status", "vault:x"), 1, "error: cannot reach Temporal at 127.0.0.1:"),
        (("schedule", "list"), 1, "error: cannot reach Temporal at 127.0.0.1:"),
    ],
)
def test_cli_errors_are_one_line_with_their_exit_code(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: tuple[str, ...],
    code: int,
    line: str,
) -> None:
    result = cli(capsys, monkeypatch, tmp_path, *args)
    assert result[0] == code and result[1] == ""
    assert result[2].startswith(line) and len(result[2].splitlines()) == 1, result[2]


def test_cli_error_lines_are_not_rich_text(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    code, _, err = cli(capsys, monkeypatch, tmp_path, "rotate", "status", "vault:[bold]x:smile:")
    assert code == 2 and "'vault:[bold]x:smile:'" in err
