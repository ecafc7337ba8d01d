"""Placeholder: the throttling governor is being written; this pass-through keeps the interface."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Governor:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def call(self, fn: Callable[[], T], *, op: str = "") -> T:
        return fn()


_registry: dict[str, Governor] = {}
_lock = threading.Lock()


def governor_for(endpoint: str) -> Governor:
    with _lock:
        if endpoint not in _registry:
            _registry[endpoint] = Governor(endpoint)
        return _registry[endpoint]
