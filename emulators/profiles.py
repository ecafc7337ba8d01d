"""Named throttling profiles: local backends that throttle like the real services.

=========================  =========================================================================
``vault-quota``            OpenBao (dev server) with a rate-limit quota of R requests/s on its
                           ``transit/`` mount (every Transit request counts: encrypt, decrypt,
                           rewrap, key reads); over it OpenBao itself answers HTTP 429.
``aws-kms``                moto behind the throttling proxy: R requests/s for AWS KMS's shared
                           symmetric-cryptography operations (Encrypt, Decrypt, ReEncrypt,
                           GenerateDataKey, ...), HTTP 400 ``ThrottlingException`` over it; other
                           operations (CreateKey, DescribeKey, ...) pass unmetered.
``managed-hsm``            the Azure Key Vault emulator with Managed HSM's documented per-second
                           limits per operation class (wrap = R; the other cryptographic classes
                           scaled by the same factor; create, read and manage as documented).
``managed-hsm-sustained``  ``managed-hsm`` plus the sustained-load model: received rate above
                           ``share`` x limit for ``after`` s -> limit x ``drop`` and growing latency
                           until the load falls back (compressed to seconds by default).
=========================  =========================================================================

Default R: OpenBao has no default quota (a cluster has none until an operator sets one), so
``vault-quota`` picks 500/s, below what one OpenBao on a 2-core machine serves, so that the quota
and not the CPU is the limit; ``aws-kms`` uses AWS's documented default for the shared symmetric
quota, 10,000/s per account and region (20,000 or 100,000 in some regions; older editions of the
page said 5,500); the Managed HSM profiles use 2,100/s, Microsoft's documented AES-256 wrap
throughput of one Managed HSM (see docs/azure-keyvault-emulator.md).

Python API (what ``rekey stress run --profile`` calls)::

    with start_local("managed-hsm-sustained", workdir, rate=200, after=30) as local:
        local.backend      # "azure"
        local.settings     # {"azure_vault_url": ..., "azure_ca_file": ..., "azure_token": ...}
        local.stats()      # {"served": n, "throttled": n, "degraded": False, ...}
        local.reset_stats()
        local.set_rate(None)  # lift the throttle (e.g. to seed data fast); set_rate(R) puts it back
        local.describe()   # profile, rate, parameters and limits, for the run's meta.json

This module imports nothing of the product (``settings`` uses the field names of rekey's
``Settings`` as plain strings); every server listens on a free 127.0.0.1 port.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulators.azure_keyvault import (
    CRYPTO_CLASSES,
    AzureKeyVaultEmulator,
    SustainedLoad,
    managed_hsm_limits,
)
from emulators.servers import PROMETHEUS_TELEMETRY, OpenBao, moto_server, openbao_dev
from emulators.throttle_proxy import KMS_CRYPTO_OPERATIONS, ThrottleProxy

__all__ = [
    "PROFILES",
    "QUOTA_NAME",
    "LocalBackend",
    "Profile",
    "ProfileError",
    "azure_stats",
    "check_rate",
    "describe_profile",
    "get_profile",
    "resolve_params",
    "set_vault_quota",
    "start_local",
]

#: The name of the rate-limit quota the ``vault-quota`` profile sets on OpenBao.
QUOTA_NAME = "rekey-throttle"

#: The bearer token clients send to the local Azure emulator (it accepts any).
_AZURE_TOKEN = "rekey-dev-token"  # noqa: S105 - the emulator accepts any token  # nosec B105

#: How the sustained model's seconds map to the hours operators report: with the defaults, 10 s
#: above 1.5 x the limit stands for about three hours of it (1 s ~ 18 min), recovery after 5 s for
#: about 1.5 h; latency is not compressed.
COMPRESSION = (
    "seconds stand for hours: after=10 s ~ 3 h above the limit (1 s ~ 18 min), recover_after=5 s ~ 1.5 h;"
    " latency is real time"
)


class ProfileError(ValueError):
    """A bad profile name, rate or parameter; the message is one line meant for the user."""

    exit_code = 2


@dataclass(frozen=True)
class Profile:
    """One named throttling profile."""

    name: str
    backend: str  # "vault" | "aws" | "azure"
    description: str  # one line
    default_rate: float  # R (requests/s) when none is given
    rate_source: str  # where the default comes from
    params: Mapping[str, Any] = field(default_factory=dict)  # the other parameters and their defaults


_SUSTAINED_DEFAULTS = SustainedLoad().to_dict()

PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile(
            "vault-quota",
            "vault",
            "OpenBao with a rate-limit quota of R req/s on its transit/ mount (HTTP 429 over it)",
            500.0,
            "our choice: OpenBao has no default quota; 500/s is below what one dev server on 2 cores serves",
        ),
        Profile(
            "aws-kms",
            "aws",
            "moto behind the throttling proxy: R req/s for KMS's shared symmetric crypto operations "
            "(HTTP 400 ThrottlingException)",
            10000.0,
            "AWS KMS request quotas: cryptographic operations (symmetric), 10,000/s shared per account "
            "and region (20,000 or 100,000 in some regions)",
            {"burst": None},
        ),
        Profile(
            "managed-hsm",
            "azure",
            "Azure emulator with Managed HSM's documented per-second limits per operation class (wrap = R)",
            2100.0,
            "Azure Managed HSM scaling guidance: AES-256 wrap 2,100/s per HSM instance (one partition)",
            {"retry_after": False},
        ),
        Profile(
            "managed-hsm-sustained",
            "azure",
            "managed-hsm plus the sustained-load model: long above its limit, the limit drops and latency "
            "grows until load falls back",
            2100.0,
            "Azure Managed HSM scaling guidance: AES-256 wrap 2,100/s per HSM instance (one partition)",
            {"retry_after": False, **_SUSTAINED_DEFAULTS},
        ),
    )
}


def get_profile(name: str) -> Profile:
    """The profile called ``name``, or :class:`ProfileError` naming the known ones."""
    try:
        return PROFILES[name]
    except (KeyError, TypeError):
        raise ProfileError(
            f"unknown throttle profile {name!r}; choose one of {', '.join(PROFILES)}"
        ) from None


def check_rate(rate: Any) -> float:
    """A throttle rate: a finite number of requests/s > 0, else :class:`ProfileError`."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
        raise ProfileError(f"the throttle rate must be a positive number of requests/s, not {rate!r}")
    return float(rate)


def resolve_params(profile: Profile, params: Mapping[str, Any]) -> dict[str, Any]:
    """The profile's parameters with ``params`` applied and checked (unknown names refused)."""
    unknown = sorted(set(params) - set(profile.params))
    if unknown:
        accepted = ", ".join(profile.params) or "none besides rate"
        raise ProfileError(
            f"profile {profile.name} takes no parameter {', '.join(unknown)} (it takes: {accepted})"
        )
    resolved = {**profile.params, **params}
    if "retry_after" in resolved and not isinstance(resolved["retry_after"], bool):
        raise ProfileError(f"retry_after must be true or false, not {resolved['retry_after']!r}")
    burst = resolved.get("burst")
    if burst is not None and (
        isinstance(burst, bool) or not isinstance(burst, int | float) or not math.isfinite(burst) or burst < 1
    ):
        raise ProfileError(f"burst must be a number >= 1, not {burst!r}")
    if profile.name == "managed-hsm-sustained":
        try:
            model = SustainedLoad.from_mapping({k: resolved[k] for k in _SUSTAINED_DEFAULTS})
        except ValueError as exc:
            raise ProfileError(str(exc)) from None
        resolved.update(model.to_dict())
    return resolved


def describe_profile(name: str, *, rate: float | None = None, **params: Any) -> dict[str, Any]:
    """What a profile would run with, without starting anything (the ``throttle`` object of a
    run's meta.json; :meth:`LocalBackend.describe` adds the live endpoints)."""
    profile = get_profile(name)
    chosen = profile.default_rate if rate is None else check_rate(rate)
    resolved = resolve_params(profile, params)
    out: dict[str, Any] = {
        "profile": profile.name,
        "backend": profile.backend,
        "description": profile.description,
        "rate": chosen,
        "default_rate": profile.default_rate,
        "rate_source": profile.rate_source,
        "unit": "requests/s",
    }
    if profile.backend == "vault":
        out["quota"] = {"name": QUOTA_NAME, "path": "transit/", "rate": chosen, "interval": "1s"}
        out["throttle_response"] = "HTTP 429 rate limit quota exceeded (OpenBao)"
        out["metered"] = "every request to the transit/ mount"
    elif profile.backend == "aws":
        burst = resolved["burst"] if resolved["burst"] is not None else max(1.0, chosen / 10.0)
        out["proxy"] = {"rate": chosen, "burst": float(burst)}
        out["throttle_response"] = "HTTP 400 ThrottlingException (no Retry-After)"
        out["metered"] = sorted(KMS_CRYPTO_OPERATIONS)
    else:
        out["limits"] = managed_hsm_limits(chosen)
        out["scaled_classes"] = list(CRYPTO_CLASSES)
        out["retry_after"] = resolved["retry_after"]
        out["throttle_response"] = "HTTP 429 Throttled" + (
            "" if resolved["retry_after"] else " (no Retry-After)"
        )
        out["burst"] = "one second of each class's limit"
        if profile.name == "managed-hsm-sustained":
            out["sustained"] = {k: resolved[k] for k in _SUSTAINED_DEFAULTS}
            out["compression"] = COMPRESSION
        else:
            out["sustained"] = None
    return out


@dataclass
class LocalBackend:
    """A throttled backend started by :func:`start_local`."""

    profile: str  # the profile's name
    backend: str  # "vault" | "aws" | "azure"
    rate: float  # R, requests/s
    #: What a rekey client or worker needs, as rekey ``Settings`` field names (strings).
    settings: dict[str, str]
    _stats: Callable[[], dict[str, Any]]
    _reset: Callable[[], None]
    _describe: dict[str, Any]
    _set_rate: Callable[[float | None], None] | None = None

    def stats(self) -> dict[str, Any]:
        """Server-side counters since the start or the last :meth:`reset_stats`: ``served`` and
        ``throttled`` requests of the metered kind, plus the profile's own (e.g. ``degraded``)."""
        return self._stats()

    def reset_stats(self) -> None:
        self._reset()

    def describe(self) -> dict[str, Any]:
        """The profile, its rate, parameters and limits, and the endpoints (for meta.json)."""
        return {**self._describe, "endpoints": dict(self.settings)}

    def set_rate(self, rate: float | None) -> None:
        """Throttle at ``rate`` requests/s from now on, or with None not at all (OpenBao: the
        quota is deleted; the proxy: no limit; the emulator: its cryptographic classes
        unlimited, create/read/manage as documented). ``rate`` and ``describe()`` keep the
        profile's R; the sustained-load model, if any, is not touched."""
        if rate is not None:
            rate = check_rate(rate)
        if self._set_rate is None:
            raise ProfileError(f"profile {self.profile} cannot change its rate while it runs")
        self._set_rate(rate)


@contextlib.contextmanager
def start_local(
    profile: str, workdir: str | os.PathLike[str], *, rate: float | None = None, **params: Any
) -> Iterator[LocalBackend]:
    """Start the throttled backend of ``profile`` on free 127.0.0.1 ports (state under
    ``workdir``); stop it on exit. ``rate`` is R (default: the profile's documented figure);
    ``params`` are the profile's other parameters (see :data:`PROFILES`). Bad input raises
    :class:`ProfileError` before anything starts."""
    chosen = get_profile(profile)
    description = describe_profile(profile, rate=rate, **params)
    resolved = resolve_params(chosen, params)
    r = float(description["rate"])
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    starters = {"vault": _start_vault, "aws": _start_aws, "azure": _start_azure}
    with starters[chosen.backend](chosen, r, resolved, description, root) as local:
        yield local


# ----------------------------------------------------------------------------------- OpenBao


def set_vault_quota(
    client: Any, rate: float | None, *, mount: str = "transit", name: str = QUOTA_NAME
) -> None:
    """Set (or with ``rate=None`` delete) the rate-limit quota ``name`` of ``rate`` requests/s on
    the Transit mount of an OpenBao/Vault reached through an hvac ``client``."""
    path = f"/v1/sys/quotas/rate-limit/{name}"
    if rate is None:
        client.adapter.delete(path)
        return
    client.adapter.post(path, json={"path": f"{mount.strip('/')}/", "rate": rate, "interval": "1s"})


_ROUTE_COUNT = re.compile(r"^vault_route_[a-z]+_transit__count\s+(\S+)$", re.MULTILINE)


def _vault_counts(server: OpenBao) -> tuple[int, int]:
    """(transit requests served, requests refused by the quota) from OpenBao's Prometheus metrics."""
    response = server.client().adapter.get("/v1/sys/metrics", params={"format": "prometheus"})
    text = response.text
    served = sum(int(float(value)) for value in _ROUTE_COUNT.findall(text))
    throttled = 0
    for line in text.splitlines():
        if line.startswith("vault_quota_rate_limit_violation{") and f'name="{QUOTA_NAME}"' in line:
            throttled += int(float(line.rsplit(None, 1)[1]))
    return served, throttled


@contextlib.contextmanager
def _start_vault(
    profile: Profile, rate: float, params: dict[str, Any], description: dict[str, Any], root: Path
) -> Iterator[LocalBackend]:
    with openbao_dev(config=PROMETHEUS_TELEMETRY) as server:
        set_vault_quota(server.client(), rate)
        base = [0, 0]

        def stats() -> dict[str, Any]:
            served, throttled = _vault_counts(server)
            return {"served": served - base[0], "throttled": throttled - base[1]}

        def reset() -> None:
            base[:] = list(_vault_counts(server))

        reset()
        yield LocalBackend(
            profile.name,
            profile.backend,
            rate,
            {"vault_addr": server.addr, "vault_token": server.token, "transit_mount": "transit"},
            stats,
            reset,
            description,
            lambda r: set_vault_quota(server.client(), r),
        )


# ------------------------------------------------------------------------------------ AWS KMS


@contextlib.contextmanager
def _start_aws(
    profile: Profile, rate: float, params: dict[str, Any], description: dict[str, Any], root: Path
) -> Iterator[LocalBackend]:
    with (
        moto_server() as moto,
        ThrottleProxy(
            moto, rate=rate, burst=params["burst"], profile="aws", operations=KMS_CRYPTO_OPERATIONS
        ) as proxy,
    ):

        def stats() -> dict[str, Any]:
            counts = proxy.stats()
            return {
                "served": int(counts["forwarded"]) - int(counts["unmetered"]),
                "throttled": int(counts["throttled"]),
                "unmetered": int(counts["unmetered"]),
                "backend_errors": int(counts["backend_errors"]),
            }

        yield LocalBackend(
            profile.name,
            profile.backend,
            rate,
            {"aws_endpoint": proxy.url, "aws_region": "us-east-1"},
            stats,
            proxy.reset_stats,
            {**description, "backend_url": moto},
            lambda r: proxy.set_rate(math.inf if r is None else r, params["burst"]),
        )


# ---------------------------------------------------------------------------------- Azure HSM


def azure_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The profile counters from the emulator's ``/_emulator/stats``: served and throttled summed
    over the cryptographic classes, and the ``wrap`` class's sustained-load state."""
    classes = stats["classes"]
    wrap = classes["wrap"]
    return {
        "served": sum(int(classes[name]["served"]) for name in CRYPTO_CLASSES),
        "throttled": sum(int(classes[name]["throttled"]) for name in CRYPTO_CLASSES),
        "degraded": bool(wrap["degraded"]),
        "degraded_since": wrap["degraded_since"],
        "degradations": int(wrap["degradations"]),
        "limit": wrap["limit"],
        "normal_limit": wrap["normal_limit"],
        "received_rate": wrap["received_rate"],
        "latency_ms": wrap["latency_ms"],
        "degraded_classes": list(stats["degraded"]),
    }


@contextlib.contextmanager
def _start_azure(
    profile: Profile, rate: float, params: dict[str, Any], description: dict[str, Any], root: Path
) -> Iterator[LocalBackend]:
    sustained = None
    if profile.name == "managed-hsm-sustained":
        sustained = SustainedLoad.from_mapping({k: params[k] for k in _SUSTAINED_DEFAULTS})
    emulator = AzureKeyVaultEmulator(
        root / "azure-keyvault",
        port=0,
        limits=managed_hsm_limits(rate),
        retry_after=params["retry_after"],
        sustained=sustained,
    )
    with emulator:
        yield LocalBackend(
            profile.name,
            profile.backend,
            rate,
            {"azure_vault_url": emulator.url, "azure_ca_file": emulator.ca_file, "azure_token": _AZURE_TOKEN},
            lambda: azure_stats(emulator.stats()),
            emulator.reset_stats,
            description,
            lambda r: emulator.set_limits(
                {name: 0.0 for name in CRYPTO_CLASSES} if r is None else managed_hsm_limits(r)
            ),
        )
