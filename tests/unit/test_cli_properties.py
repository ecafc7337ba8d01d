"""Every command, driven with generated options, arguments and settings, answers like a tool.

For each leaf command of ``rekey`` (walked from the click tree, so a new command is covered
without editing this file), hypothesis draws a command line from hostile values (empty strings,
newlines, traversal, huge numbers, markup, wrong types, files that are garbage, missing or
directories) and a set of settings (``REKEY_*`` variables and a ``rekey.toml``), and runs it
in-process with every server address pointing at a closed port on 127.0.0.1. Whatever the
input, the command must end with exit 0, or with exactly one ``error:`` line as its last line
of stderr and a documented exit code; never a traceback, never ``internal error``, and within a
few seconds. When it fails, nothing in its home directory may have changed.

The commands that would serve forever (``worker``, ``agent serve``, ``codec-server``, ``dev
up``) run up to the point where they would start serving: that is where their input has been
checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from types import FrameType
from typing import Any

import click
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from rekey.cli import app, main
from rekey.config import Settings
from tests.fixtures.cli import MANIFEST

EXIT_CODES = {0, 1, 2, 3, 4}
LIMIT_S = 10
EXAMPLES = int(os.environ.get("CLI_PROPERTY_EXAMPLES", "0") or 0) or 40
"""Examples per command; ``CLI_PROPERTY_EXAMPLES=500 pytest tests/unit/test_cli_properties.py``
searches longer than `make test` does."""


class WouldServe(BaseException):  # a signal to the test, not an error
    """Raised where a long-running command would start serving: its input has been checked."""


class Hung(BaseException):
    """Raised by the alarm when one command runs longer than ``LIMIT_S``."""


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _leaf_commands() -> list[tuple[str, ...]]:
    ctx = click.Context(app)
    found: list[tuple[str, ...]] = []

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                walk(sub, (*path, name))
        else:
            found.append(path)

    walk(app, ())
    return found


def _command(path: tuple[str, ...]) -> click.Command:
    ctx = click.Context(app)
    command: click.Command = app
    for name in path:
        assert isinstance(command, click.Group)
        sub = command.get_command(ctx, name)
        assert sub is not None
        command = sub
    return command


NASTY = [
    "",
    " ",
    "-",
    "--",
    "-x",
    "..",
    "../etc",
    "/",
    "a\nb",
    "a\rb",
    "\t",
    "x" * 1000,
    "[bold]x[/bold]",
    ":smile:",
    "\x1b[31mred",
    "%s%n",
    "{}",
    "ü",
    "名前",
    "1",
    "0",
    "-1",
    "99999999999",
    "99999999999d",
    "1e309",
    "nan",
    "inf",
    "1s",
    "1d",
    "0s",
    "-5m",
    "30",
    "vault:",
    "vault:k",
    "vault:k:1",
    "vault:../k",
    "aws:alias/k",
    "aws:k",
    "azure:k",
    "azure:",
    "gcp:k",
    ":",
    "rotate:vault:k",
    "rotate:vault:k:1",
    "rotate:vault:k:x",
    "schedule:vault:k",
    "sha256:" + "0" * 64,
    "sha256:zz",
    "ab" * 32,
    "AAAA",
    "base64:AAAA",
    "hex:00",
    "app-v1",
    "http://127.0.0.1:1",
    "http://127.0.0.1:1/v1/nonce",
    "https://127.0.0.1:1",
    "http://[::1",
    "file:///etc/passwd",
    "127.0.0.1:1",
    "2026-12-01T00:00:00Z",
    "yesterday",
    "/v1/nonce",
    "/v1/seal",
    '{"a": 1}',
    "sqlite:///",
    "sqlite:////nonexistent/dir/x.db",
    "postgresql://127.0.0.1:1/x",
    "garbage",
    "file",
    "vault:signer",
    "aws:alias/signer",
    "tofu",
    "strict",
]

texts = st.one_of(
    st.sampled_from(NASTY),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40),
)


def _files(root: Path) -> list[str]:
    """Paths a hostile user hands the commands: garbage, empty, missing, a directory, JSON."""
    root.mkdir()
    (root / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    (root / "empty").write_bytes(b"")
    (root / "text.txt").write_text("hello\n")
    (root / "manifest.json").write_text(json.dumps(MANIFEST))
    (root / "bad-manifest.json").write_text(json.dumps({**MANIFEST, "svn": "x", "id": "../x"}))
    (root / "list.json").write_text("[1, 2]")
    (root / "policy.json").write_text(json.dumps({"measurements": ["11" * 32], "min_svn": 1}))
    (root / "dir").mkdir()
    (root / "loop").symlink_to(root / "loop")
    return [
        str(root / name)
        for name in (
            "garbage.bin",
            "empty",
            "text.txt",
            "manifest.json",
            "bad-manifest.json",
            "list.json",
            "policy.json",
            "dir",
            "loop",
            "missing",
            "dir/missing/deeper",
        )
    ] + ["/dev/null", "-", ""]


def _value(param: click.Parameter, paths: list[str]) -> st.SearchStrategy[str]:
    kind = param.type
    if isinstance(kind, click.Choice):
        return st.one_of(st.sampled_from([str(c) for c in kind.choices]), texts)
    if isinstance(kind, click.types._NumberParamTypeBase):
        numbers = st.one_of(
            st.integers(-(2**70), 2**70).map(str),
            st.floats(allow_nan=True, allow_infinity=True).map(str),
        )
        return st.one_of(numbers, texts)
    if isinstance(kind, click.Path):
        return st.one_of(st.sampled_from(paths), texts)
    return texts


def _argv(draw: Any, command: click.Command, paths: list[str]) -> list[str]:
    argv: list[str] = []
    positional: list[str] = []
    for param in command.params:
        if isinstance(param, click.Option):
            name = max(param.opts, key=len)
            if param.is_flag:
                if draw(st.booleans()):
                    argv.append(name)
                continue
            if not draw(st.booleans()) and not (param.required and draw(st.integers(0, 9)) > 0):
                continue
            for _ in range(draw(st.integers(1, 2)) if param.multiple else 1):
                argv += [name, draw(_value(param, paths))]
        elif isinstance(param, click.Argument) and (param.required or draw(st.booleans())):
            positional.append(draw(_value(param, paths)))
    if positional:
        argv += ["--", *positional]
    return argv


def _setting_value(name: str) -> st.SearchStrategy[str]:
    if name.endswith("_port"):
        return st.one_of(st.integers(-5, 70000).map(str), texts)
    return texts


@st.composite
def _environment(draw: st.DrawFn) -> dict[str, str]:
    names = [f.name for f in fields(Settings) if f.name != "home"]
    chosen = draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
    env = {f"REKEY_{name.upper()}": draw(_setting_value(name)) for name in chosen}
    if draw(st.integers(0, 9)) == 0:
        env[draw(st.sampled_from(["REKEY_VAULT_ADR", "REKEY_", "REKEY_X1"]))] = draw(texts)
    return env


@st.composite
def _toml(draw: st.DrawFn) -> str | None:
    if draw(st.integers(0, 3)) > 0:
        return None
    names = [f.name for f in fields(Settings)] + ["vault_adr", "Store_URL"]
    lines = []
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        value = draw(
            st.one_of(
                texts.map(json.dumps),
                st.integers(-(2**64), 2**64).map(str),
                st.sampled_from(["true", "[1, 2]", '["vault:*"]', "{a = 1}", "1.5", "nan"]),
            )
        )
        lines.append(f"{name} = {value}")
    if draw(st.integers(0, 9)) == 0:
        lines.append(draw(st.sampled_from(["[table", "= 1", "x = ", "\x00"])))
    return "\n".join(lines) + "\n"


def _snapshot(root: Path) -> dict[str, str]:
    seen: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.exists():
            seen[str(path)] = "link"
        elif path.is_dir():
            seen[str(path)] = "dir"
        else:
            seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@contextlib.contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    """Raise `Hung` after ``seconds``. The process has one real-time timer, which
    pytest-timeout arms for the whole test: it is re-armed afterwards with what it had left."""

    def ring(_signum: int, _frame: FrameType | None) -> None:
        raise Hung

    previous = signal.signal(signal.SIGALRM, ring)
    outer, _interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


@pytest.fixture(autouse=True)
def _no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    def would_serve(*_args: Any, **_kwargs: Any) -> None:
        raise WouldServe

    import rekey.cli.agent
    import rekey.cli.codec
    import rekey.cli.worker
    import rekey.devstack

    monkeypatch.setattr(rekey.cli.worker, "run_worker", would_serve)
    monkeypatch.setattr(rekey.cli.codec, "run_codec_server", would_serve)
    monkeypatch.setattr(rekey.cli.agent, "make_server", would_serve)
    monkeypatch.setattr(rekey.devstack, "up", would_serve)
    # `dev down` and `dev status` stop and probe what a home's pid files name: none here.


def _run(argv: list[str], environ: dict[str, str]) -> tuple[int | None, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ)
    code: int | None
    try:
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            _alarm(LIMIT_S),
        ):
            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except WouldServe:
                code = None
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, stdout.getvalue(), stderr.getvalue()


def _check(argv: list[str], code: int | None, out: str, err: str) -> None:
    shown = (
        f"rekey {' '.join(repr(a) for a in argv)}\nexit {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    )
    assert "Traceback" not in out + err, shown
    assert "internal error" not in err, shown
    if code is None or code == 0:
        return
    assert code in EXIT_CODES, shown
    if code in (3, 4):  # a policy's denial or a downgrade is a report, not an error
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), shown
    assert sum(line.startswith("error: ") for line in lines) == 1, shown


COMMANDS = _leaf_commands()


def test_the_per_command_alarm_leaves_the_test_timeout_armed() -> None:
    # pytest-timeout (timeout = 300, the signal method) arms the timer; without it, we do.
    ours = signal.getitimer(signal.ITIMER_REAL)[0] == 0
    if ours:
        signal.setitimer(signal.ITIMER_REAL, 3600)
    try:
        with _alarm(LIMIT_S):
            pass
        assert signal.getitimer(signal.ITIMER_REAL)[0] > LIMIT_S
    finally:
        if ours:
            signal.setitimer(signal.ITIMER_REAL, 0)


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_every_command_answers_hostile_input_with_one_error_line(
    path: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    command = _command(path)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Relative paths among the generated values land here, not in the checkout.
        monkeypatch.chdir(root)
        paths = _files(root / "files")
        closed = str(_closed_port())
        base = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(root / "user"),
            "REKEY_TEMPORAL_PORT": closed,
            "REKEY_OPENBAO_PORT": closed,
            "REKEY_MOTO_PORT": closed,
            "REKEY_AZURE_PORT": closed,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }
        counter = iter(range(10**9))

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            database=None,
        )
        @given(data=st.data())
        def check(data: st.DataObject) -> None:
            home = root / f"home-{next(counter)}"
            home.mkdir(mode=0o700)
            toml = data.draw(_toml(), label="rekey.toml")
            if toml is not None:
                (home / "rekey.toml").write_text(toml)
            environ = {**base, "REKEY_HOME": str(home), **data.draw(_environment(), label="environment")}
            argv = [*path, *_argv(data.draw, command, paths)]
            note(f"argv={argv!r}")
            before = _snapshot(home)
            code, out, err = _run(argv, environ)
            _check(argv, code, out, err)
            if code not in (0, None):
                assert _snapshot(home) == before, f"rekey {argv!r} failed ({err.strip()}) but changed {home}"

        check()
