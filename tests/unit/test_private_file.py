"""Token files are read without a check-then-use race (issue 12, open review findings): opened
once without following a symlink, checked through the descriptor, read from it."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rekey.agent_auth import AgentCredentialError, create_tokens, read_token, token_path
from rekey.codec import CodecError
from rekey.codec_server import load_or_create_server_token, server_token_path

PLANTED = "planted-token-the-attacker-knows-0123456789"


@pytest.fixture
def fast_switching() -> Iterator[None]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def _race(path: Path, planted: Path, load: Callable[[], str], rounds: int = 3000) -> set[str]:
    """Swap ``path`` between the genuine file and a symlink to ``planted`` while loading."""
    genuine = path.with_name(path.name + ".genuine")
    os.link(path, genuine)
    link = path.with_name(path.name + ".link")
    link.symlink_to(planted)
    stop = threading.Event()

    def swap() -> None:
        spare_link, spare_genuine = path.with_name("l2"), path.with_name("g2")
        while not stop.is_set():
            os.symlink(planted, spare_link)
            os.replace(spare_link, path)
            os.link(genuine, spare_genuine)
            os.replace(spare_genuine, path)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    seen: set[str] = set()
    try:
        for _ in range(rounds):
            with contextlib.suppress(AgentCredentialError, CodecError, FileNotFoundError):
                seen.add(load())
    finally:
        stop.set()
        swapper.join()
    return seen


def _planted(tmp_path: Path, mode: int) -> Path:
    planted = tmp_path / "planted"
    planted.write_text(PLANTED + "\n")
    planted.chmod(mode)
    return planted


def test_codec_token_is_never_read_through_a_swapped_symlink(tmp_path: Path, fast_switching: None) -> None:
    home = tmp_path / "home"
    genuine = load_or_create_server_token(home)
    seen = _race(
        server_token_path(home), _planted(tmp_path, 0o644), lambda: load_or_create_server_token(home)
    )
    assert PLANTED not in seen, "a symlink swapped in after the check was followed"
    assert seen <= {genuine}


def test_agent_token_is_never_read_through_a_swapped_symlink(tmp_path: Path, fast_switching: None) -> None:
    state = tmp_path / "agent"
    genuine = next(iter(create_tokens(state, [])))
    seen = _race(token_path(state), _planted(tmp_path, 0o600), lambda: read_token(state))
    assert PLANTED not in seen
    assert seen <= {genuine}


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
