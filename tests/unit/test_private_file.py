"""Token files are read without a check-then-use race (issue 12, open review findings): opened
once without following a symlink, checked through the descriptor, read from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from rekey.agent_auth import AgentCredentialError, create_tokens, read_token, token_path
from rekey.codec import CodecError
from rekey.codec_server import new_server_token, read_server_token, server_token_path, write_server_token

PLANTED = "planted-token-the-attacker-knows-0123456789"


def _swap_around_checks(monkeypatch: pytest.MonkeyPatch, path: Path, planted: Path) -> None:
    """The attacker's best timing: whenever the reader checks the file (an ``lstat`` or an
    ``fstat``) it sees the genuine file, and right after the check ``path`` is a symlink to
    ``planted``."""
    real_stat, real_fstat = os.stat, os.fstat
    genuine = path.with_name(path.name + ".genuine")
    os.link(path, genuine)

    def put(symlink: bool) -> None:
        spare = path.with_name(path.name + ".spare")
        if symlink:
            spare.symlink_to(planted)
        else:
            os.link(genuine, spare)
        os.replace(spare, path)

    def stat(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        checked = kwargs.get("follow_symlinks") is False and os.fspath(target) == str(path)
        if checked:
            put(symlink=False)
        result = real_stat(target, *args, **kwargs)
        if checked:
            put(symlink=True)
        return result

    def lstat(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        return stat(target, *args, follow_symlinks=False, **kwargs)

    def fstat(fd: int) -> os.stat_result:
        result = real_fstat(fd)
        put(symlink=True)
        return result

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(os, "fstat", fstat)


def _planted(tmp_path: Path, mode: int) -> Path:
    planted = tmp_path / "planted"
    planted.write_text(PLANTED + "\n")
    planted.chmod(mode)
    return planted


def test_codec_token_swapped_after_the_check_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    genuine = new_server_token()
    write_server_token(home, genuine)
    _swap_around_checks(monkeypatch, server_token_path(home), _planted(tmp_path, 0o644))
    try:
        loaded = read_server_token(home)
    except CodecError:
        return  # refused: also fine
    assert loaded == genuine, "a symlink swapped in after the check was followed"


def test_agent_token_swapped_after_the_check_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "agent"
    genuine = next(iter(create_tokens(state, [])))
    _swap_around_checks(monkeypatch, token_path(state), _planted(tmp_path, 0o644))
    try:
        loaded = read_token(state)
    except AgentCredentialError:
        return
    assert loaded == genuine


@pytest.mark.parametrize("kind", ["symlink", "group-readable", "fifo", "directory"])
def test_unsafe_token_files_are_refused(tmp_path: Path, kind: str) -> None:
    state = tmp_path / "agent"
    create_tokens(state, [])
    path = token_path(state)
    path.unlink()
    if kind == "symlink":
        path.symlink_to(_planted(tmp_path, 0o600))
    elif kind == "group-readable":
        path.write_text(PLANTED)
        path.chmod(0o640)
    elif kind == "fifo":
        os.mkfifo(path, 0o600)  # an open without O_NONBLOCK would hang here
    else:
        path.mkdir(mode=0o700)
    with pytest.raises(AgentCredentialError) as info:
        read_token(state)
    assert PLANTED not in str(info.value)


def _make_unsafe(path: Path, kind: str, tmp_path: Path) -> None:
    content = path.read_bytes()
    path.unlink()
    if kind == "symlink":
        target = tmp_path / f"planted-{path.name}"
        target.write_bytes(content)
        target.chmod(0o600)
        path.symlink_to(target)
    else:  # group-readable
        path.write_bytes(content)
        path.chmod(0o640)


@pytest.mark.parametrize("kind", ["symlink", "group-readable"])
def test_the_same_reader_guards_codec_keys_sim_host_secrets_and_the_audit_key(
    tmp_path: Path, kind: str
) -> None:
    """The same class elsewhere: the codec keyring, the sim host's root secret and the audit
    signing key were checked by path and then read (or, for the audit key, not checked at all)."""
    from audit import AuditError, default_signing_key_path, load_or_create_signing_key, load_signing_key
    from rekey.codec import codec_keys_path, load_or_create_codec_keys
    from sealing.tee.sim import ROOT_SECRET_FILE, SimHost, SimHostError

    home = tmp_path / "home"
    load_or_create_codec_keys(home)
    _make_unsafe(codec_keys_path(home), kind, tmp_path)
    with pytest.raises(CodecError, match="codec keyring"):
        load_or_create_codec_keys(home)

    host_dir = tmp_path / "host"
    SimHost.load_or_create(host_dir)
    _make_unsafe(host_dir / ROOT_SECRET_FILE, kind, tmp_path)
    with pytest.raises(SimHostError):
        SimHost.load_or_create(host_dir)

    key_path = default_signing_key_path(home)
    load_or_create_signing_key(key_path)
    _make_unsafe(key_path, kind, tmp_path)
    with pytest.raises(AuditError):
        load_signing_key(key_path)
    with pytest.raises(AuditError):  # and never replaced by a new key either
        load_or_create_signing_key(key_path)
