"""Every ``rekey ...`` command line in the README's ``sh`` blocks runs here, against a real stack
(OpenBao, moto, the Azure emulator, a Temporal dev server and a rekey worker, from the tests'
fixtures), so that a documented command that crashes cannot land (issue 13: `schedule list`
crashed whenever a schedule existed).

Each line is expanded as a reader would read it: ``[...]`` is optional, ``a|b`` and ``(x | y)``
are alternatives, and ``rekey GROUP a ... | b ...`` runs ``rekey GROUP b ...`` too. Each line runs
once without its optional parts and once with all of them, for each alternative. Placeholders
(``N``, ``ID``, ``NS``, ...) get values from `PLACEHOLDERS`. Some commands need state first (a
rotation in AWAITING_DESTROY for ``approve-destroy``, a schedule for ``pause``): `before` sets it
up through the Python API. A command may exit non-zero only if `EXPECTED_REFUSALS` lists it (with
why); none may print a traceback or "internal error".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import pytest_asyncio
import yaml
from temporalio.testing import WorkflowEnvironment

from rekey.client import (
    AWAITING_COMMIT,
    AWAITING_DESTROY,
    BLOCKED,
    RekeyClient,
    RekeyClientError,
    RotationNotFound,
    RotationRefused,
)
from rekey.config import load_settings
from rekey.worker import build_worker
from tests.fixtures.azure import AzureKeyVault
from tests.fixtures.cli import run_cli
from tests.fixtures.openbao import OpenBao
from tests.fixtures.rotation import wait_phase

pytestmark = pytest.mark.integration

README: Final = Path(__file__).resolve().parents[2] / "README.md"

PLACEHOLDERS: Final = {"N": "2", "BLOB_ID": "blob-0", "NS": "default"}
"""Placeholder -> value. ``ID`` (``--update-id ID``) gets a fresh value at each use."""

EXPECTED_REFUSALS: Final[dict[str, str]] = {}
"""Expanded command -> why it exits non-zero (it must still be one ``error:`` line)."""

NOT_RUN: Final[dict[str, str]] = {}
"""Expanded command -> why it cannot run in a test."""

MANIFEST: Final = {
    "id": "payments-v1",
    "platform": "sim",
    "measurement": "11" * 32,
    "signer": "22" * 32,
    "product_id": 1,
    "svn": 2,
    "debug": False,
    "tcb": "UpToDate",
}


# ------------------------------------------------------------------------- the README's syntax


@dataclass(frozen=True)
class Optional_:
    parts: list[Any]


@dataclass(frozen=True)
class Choice:
    alternatives: list[list[Any]]


def _parse(tokens: list[str], i: int, closing: str | None) -> tuple[list[list[Any]], int]:
    """Alternatives (split at a lone ``|``) of the sequence up to ``closing``."""
    alternatives: list[list[Any]] = [[]]
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == closing:
            return alternatives, i
        if token == "|":
            alternatives.append([])
        elif token == "[":
            inner, i = _parse(tokens, i, "]")
            alternatives[-1].append(Optional_([Choice(inner)] if len(inner) > 1 else inner[0]))
        elif token == "(":
            inner, i = _parse(tokens, i, ")")
            alternatives[-1].append(Choice(inner))
        elif "|" in token:
            alternatives[-1].append(Choice([[word] for word in token.split("|")]))
        else:
            alternatives[-1].append(token)
    assert closing is None, f"unclosed {closing!r}"
    return alternatives, i


def _width(parts: list[Any]) -> int:
    widths = [1]
    for part in parts:
        if isinstance(part, Optional_):
            widths.append(_width(part.parts))
        elif isinstance(part, Choice):
            widths.append(max(len(part.alternatives), *(_width(a) for a in part.alternatives)))
    return max(widths)


def _render(parts: list[Any], full: bool, pick: int) -> list[str]:
    words: list[str] = []
    for part in parts:
        if isinstance(part, Optional_):
            if full:
                words += _render(part.parts, full, pick)
        elif isinstance(part, Choice):
            words += _render(part.alternatives[pick % len(part.alternatives)], full, pick)
        else:
            words.append(part)
    return words


def expand(line: str) -> list[list[str]]:
    """Every command one README line documents: for each alternative, without its optional parts
    and with all of them; a ``| b ...`` alternative keeps the line's ``rekey GROUP``."""
    line = re.sub(r"\s#.*$", "", line).strip()
    tokens = line.replace("[", " [ ").replace("]", " ] ").replace("(", " ( ").replace(")", " ) ").split()
    alternatives, _ = _parse(tokens, 0, None)
    prefix = alternatives[0][:2]
    commands: list[list[str]] = []
    for k, parts in enumerate(alternatives):
        parts = parts if k == 0 else prefix + parts
        for pick, full in itertools.product(range(_width(parts)), (False, True)):
            words = _render(parts, full, pick)
            if words not in commands:
                commands.append(words)
    return commands


def readme_commands(text: str) -> list[list[str]]:
    commands: list[list[str]] = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.splitlines():
            if line.strip().startswith("rekey "):
                commands += [c for c in expand(line) if c not in commands]
    return commands


def test_the_readme_syntax_expands_as_a_reader_reads_it() -> None:
    assert expand("rekey schedule list [--json] | pause|unpause vault:orders") == [
        ["rekey", "schedule", "list"],
        ["rekey", "schedule", "list", "--json"],
        ["rekey", "schedule", "pause", "vault:orders"],
        ["rekey", "schedule", "unpause", "vault:orders"],
    ]
    assert expand("rekey state accept --namespace default (--name db | --all) [--json]  # x [y]") == [
        ["rekey", "state", "accept", "--namespace", "default", "--name", "db"],
        ["rekey", "state", "accept", "--namespace", "default", "--name", "db", "--json"],
        ["rekey", "state", "accept", "--namespace", "default", "--all"],
        ["rekey", "state", "accept", "--namespace", "default", "--all", "--json"],
    ]
    commands = readme_commands(README.read_text())
    groups = {c[1] for c in commands}
    assert {"key", "state", "rotate", "schedule"} <= groups, groups  # the parser found the blocks
    assert ["rekey", "schedule", "list"] in commands and ["rekey", "schedule", "list", "--json"] in commands


# ---------------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    env: WorkflowEnvironment
    client: RekeyClient
    home: Path
    workdir: Path
    capsys: pytest.CaptureFixture[str]

    def run(self, args: list[str]) -> tuple[int, str, str]:
        """``rekey ARGS`` in-process, as from a shell: exit code, stdout, stderr."""
        return run_cli(self.capsys, *args)


@pytest_asyncio.fixture(loop_scope="session")
async def stack(
    temporal_env: WorkflowEnvironment,
    temporal_home: Path,
    openbao: OpenBao,
    moto_server: str,
    azure_keyvault: AzureKeyVault,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> AsyncIterator[Stack]:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    shutil.copytree(temporal_home / "codec", home / "codec")  # the test server's clients' codec keys
    env = {
        "REKEY_HOME": str(home),
        "REKEY_TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host,
        "REKEY_VAULT_ADDR": openbao.addr,
        "REKEY_VAULT_TOKEN": openbao.token,
        "REKEY_AWS_ENDPOINT": moto_server,
        "REKEY_AZURE_VAULT_URL": azure_keyvault.url,
        "REKEY_AZURE_CA_FILE": azure_keyvault.ca_file,
        "COLUMNS": "200",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    workdir = tmp_path / "work"  # where the examples' relative files (creds.json) are
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    (workdir / "creds.json").write_text('{"user": "app", "password": "example"}')
    (workdir / "vectors").symlink_to(README.parent / "vectors")  # the real samples the examples verify
    (workdir / "payments-v1.yaml").write_text(yaml.safe_dump(MANIFEST))
    settings = load_settings(home, environ=env)
    client = await RekeyClient.connect(settings)
    async with build_worker(temporal_env.client, settings):  # the worker of `rekey dev up`, on `rekey`
        stack = Stack(temporal_env, client, home, workdir, capsys)
        yield stack
        for key_ref in ("vault:orders", "aws:orders", "azure:orders"):
            with contextlib.suppress(RekeyClientError):
                await client.delete_schedule(key_ref)
            await _end_rotation(stack, key_ref)


async def _end_rotation(stack: Stack, key_ref: str) -> None:
    """End the key's running rotation the way an operator would (a terminated one could leave the
    key half retired): resume it if paused, approve or cancel the destroy, abort if BLOCKED."""
    rotation = stack.client.rotation(key_ref)
    for _ in range(100):
        try:
            if (await rotation.describe()).status != "RUNNING":
                return
            progress = await rotation.status()
            if progress.paused:
                await rotation.resume()
            elif progress.phase == AWAITING_COMMIT:
                await rotation.approve()
            elif progress.phase == AWAITING_DESTROY:
                await rotation.cancel_destroy()
            elif progress.phase == BLOCKED:
                await rotation.abort()
            else:
                await asyncio.sleep(0.1)
        except RotationNotFound:
            return
        except RotationRefused:  # it moved on meanwhile
            await asyncio.sleep(0.1)
    raise AssertionError(f"could not end the rotation of {key_ref}")


async def _fresh_rotation(stack: Stack, key_ref: str, phase: str | None, **options: Any) -> None:
    await _end_rotation(stack, key_ref)
    if phase is None:
        return
    rotation = await stack.client.start_rotation(key_ref, grace="24h", **options)
    await wait_phase(rotation, AWAITING_COMMIT)
    if phase == AWAITING_DESTROY:
        await rotation.approve()
        await wait_phase(rotation, AWAITING_DESTROY)


async def _drive(stack: Stack, key_ref: str) -> None:
    """What an operator does while `rotate start --wait` waits: approve, then approve-destroy."""
    rotation = stack.client.rotation(key_ref)
    seen_running = False  # until the command has started it, the key's last rotation has ended
    for _ in range(600):
        with contextlib.suppress(RekeyClientError):
            running = (await rotation.describe()).status == "RUNNING"
            if seen_running and not running:
                return
            seen_running |= running
            phase = (await rotation.status()).phase
            if phase == AWAITING_COMMIT:
                await rotation.approve()
            elif phase == AWAITING_DESTROY:
                await rotation.approve_destroy()
                return
        await asyncio.sleep(0.1)


def _value(command: list[str], option: str) -> str | None:
    return command[command.index(option) + 1] if option in command else None


async def before(stack: Stack, command: list[str]) -> asyncio.Task[None] | None:
    """Set up what ``command`` needs; a task to run alongside it (for `rotate start --wait`)."""
    group, verb = command[1], command[2]
    key_ref = next((w for w in command[3:] if re.fullmatch(r"(vault|aws|azure):[\w.-]+", w)), "")
    if group == "state" and verb in ("delete", "accept"):  # the example before deleted it
        code, _out, err = await asyncio.to_thread(stack.run, ["state", "put", *_put_args(command)])
        assert code == 0, err
    if group == "rotate" and verb == "start":
        await _end_rotation(stack, key_ref)
        if "--wait" in command:
            return asyncio.create_task(_drive(stack, key_ref))
    if group == "rotate" and verb in ("pause", "resume", "abort", "approve"):
        await _fresh_rotation(stack, key_ref, AWAITING_COMMIT)
        if verb == "resume":
            await stack.client.rotation(key_ref).pause()
    if group == "rotate" and verb in ("approve-destroy", "cancel-destroy"):
        await _fresh_rotation(stack, key_ref, AWAITING_DESTROY, destroy_after="7d")
    if group == "schedule" and verb == "create":
        with contextlib.suppress(RekeyClientError):
            await stack.client.delete_schedule(key_ref)
    if group == "schedule" and verb in ("pause", "unpause", "trigger", "delete"):
        with contextlib.suppress(RekeyClientError):
            await stack.client.create_schedule(key_ref, every="90d")
    return None


def _put_args(command: list[str]) -> list[str]:
    name = _value(command, "--name") or "db-creds"
    namespace = _value(command, "--namespace") or "default"
    args = ["--key", "vault:orders", "--generation", "payments-v1", "--name", name, "--namespace", namespace]
    return [*args, "--in", "creds.json"]


def _substituted(command: list[str], ids: Iterator[int]) -> list[str]:
    """The command's arguments (without ``rekey``), placeholders replaced."""
    return [f"readme-{next(ids)}" if word == "ID" else PLACEHOLDERS.get(word, word) for word in command[1:]]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.timeout(180)  # a command that waits for ever fails here instead of hanging the suite
async def test_every_readme_command_runs(stack: Stack) -> None:
    commands = readme_commands(README.read_text())
    # What the README's examples take as given: the generation its `state put` names, and the
    # Azure key its `key show` shows.
    assert stack.run(["generation", "register", str(stack.workdir / "payments-v1.yaml")])[0] == 0
    assert stack.run(["key", "create", "azure:orders"])[0] == 0
    ids = itertools.count(1)
    ran: list[str] = []
    for command in commands:
        text = " ".join(command)
        if text in NOT_RUN:
            continue
        alongside = await before(stack, command)
        code, out, err = await asyncio.to_thread(stack.run, _substituted(command, ids))
        if alongside is not None:
            await alongside
        assert "Traceback" not in out + err and "internal error" not in out + err, (text, err)
        if text in EXPECTED_REFUSALS:
            assert code != 0 and err.strip().splitlines()[-1].startswith("error: "), (text, code, err)
        else:
            assert code == 0, (text, code, out, err)
        ran.append(text)
    assert set(EXPECTED_REFUSALS) | set(NOT_RUN) <= {" ".join(c) for c in commands}, "stale entries"
    assert len(ran) >= 20, ran
