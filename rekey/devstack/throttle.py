"""The dev stack's throttle profile (``rekey dev up --throttle-profile NAME [--throttle-rate R]``):
which of ``emulators.profiles``'s named profiles the stack runs with, kept in ``<home>/devstack.json``
so that ``dev status`` shows it and a later ``dev up`` keeps it.

* ``vault-quota``: a rate-limit quota of R req/s on OpenBao's Transit mount, set after it starts;
* ``aws-kms``: the throttling proxy (component ``throttle``) listens on ``moto_port``, where the
  settings' AWS endpoint points, and moto moves behind it to ``moto_port + 1``;
* ``managed-hsm``, ``managed-hsm-sustained``: the Azure emulator started with the profile (and
  reconfigured live on every ``dev up``).

``emulators.profiles`` is imported only when a profile is used (``rekey dev`` starts light).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rekey.config import Settings
from rekey.devstack.errors import DevStackError
from rekey.devstack.files import absolute, write_atomic

__all__ = [
    "BACKEND_COMPONENT",
    "PROFILE_NAMES",
    "BadThrottleProfile",
    "ThrottleChoice",
    "carried_by",
    "choose",
    "read_choice",
    "state_file",
    "write_choice",
]

#: The names ``--throttle-profile`` takes (``none`` clears the profile); kept here so the CLI's
#: choices need no import of the emulators.
PROFILE_NAMES = ("vault-quota", "aws-kms", "managed-hsm", "managed-hsm-sustained")
_BACKENDS = {
    "vault-quota": "vault",
    "aws-kms": "aws",
    "managed-hsm": "azure",
    "managed-hsm-sustained": "azure",
}
#: The component that carries a backend's throttle (and shows it in ``dev status``).
BACKEND_COMPONENT = {"vault": "openbao", "aws": "throttle", "azure": "azure"}


class BadThrottleProfile(DevStackError):
    """An unknown profile name, or a rate that is not a positive number."""

    exit_code = 2


@dataclass(frozen=True)
class ThrottleChoice:
    """The stack's throttle profile (None: no throttling beyond the emulators' defaults) and its
    rate R in requests/s (None: the profile's documented default)."""

    profile: str | None = None
    rate: float | None = None

    @property
    def backend(self) -> str | None:
        return _BACKENDS.get(self.profile) if self.profile else None

    def effective_rate(self) -> float:
        """R: the chosen rate or the profile's default."""
        if self.profile is None:
            raise ValueError("no throttle profile")
        if self.rate is not None:
            return self.rate
        from emulators.profiles import get_profile

        return get_profile(self.profile).default_rate

    def describe(self) -> dict[str, Any]:
        """``{"profile", "rate", "default_rate"}`` for status rows and ``--json``."""
        if self.profile is None:
            return {}
        return {"profile": self.profile, "rate": self.effective_rate(), "default_rate": self.rate is None}

    def label(self) -> str:
        if self.profile is None:
            return "none"
        return f"{self.profile} {self.effective_rate():g} req/s"


def choose(profile: str | None, rate: float | None, current: ThrottleChoice) -> ThrottleChoice:
    """The choice ``dev up`` makes from its options: ``profile`` None keeps the current one (and
    ``rate``, if given, changes its rate), ``"none"`` clears it."""
    if rate is not None and (isinstance(rate, bool) or not math.isfinite(rate) or rate <= 0):
        raise BadThrottleProfile(f"--throttle-rate must be a positive number of requests/s, not {rate:g}")
    if profile is None:
        if rate is None:
            return current
        if current.profile is None:
            raise BadThrottleProfile("--throttle-rate needs --throttle-profile (the stack has none)")
        return ThrottleChoice(current.profile, rate)
    if profile == "none":
        if rate is not None:
            raise BadThrottleProfile("--throttle-rate does not go with --throttle-profile none")
        return ThrottleChoice()
    if profile not in PROFILE_NAMES:
        raise BadThrottleProfile(
            f"unknown throttle profile {profile!r}; choose one of {', '.join(PROFILE_NAMES)} or none"
        )
    return ThrottleChoice(profile, rate)


def state_file(settings: Settings) -> Path:
    return absolute(settings.home) / "devstack.json"


def read_choice(settings: Settings) -> ThrottleChoice:
    """The persisted choice (none if the file is missing or unreadable)."""
    try:
        data = json.loads(state_file(settings).read_text())
    except (OSError, ValueError):
        return ThrottleChoice()
    if not isinstance(data, dict):
        return ThrottleChoice()
    profile = data.get("throttle_profile")
    rate = data.get("throttle_rate")
    if profile not in PROFILE_NAMES:
        return ThrottleChoice()
    if not isinstance(rate, int | float) or isinstance(rate, bool) or not math.isfinite(rate) or rate <= 0:
        rate = None
    return ThrottleChoice(profile, float(rate) if rate is not None else None)


def write_choice(settings: Settings, choice: ThrottleChoice) -> None:
    write_atomic(
        state_file(settings),
        json.dumps({"throttle_profile": choice.profile, "throttle_rate": choice.rate}, indent=2) + "\n",
    )


def carried_by(settings: Settings, component: str) -> dict[str, Any] | None:
    """The stack's throttle if ``component`` carries it, else None."""
    choice = read_choice(settings)
    if choice.backend is None or BACKEND_COMPONENT[choice.backend] != component:
        return None
    return choice.describe()
