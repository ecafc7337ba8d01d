"""The command line of ``python -m emulators.azure_keyvault``: prints the URL and the CA file, then
serves until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import math
import signal
import threading

from emulators.azure_keyvault.emulator import AzureKeyVaultEmulator
from emulators.azure_keyvault.throttle import DEFAULT_LIMITS, SustainedLoad, managed_hsm_limits

__all__ = ["PROFILES", "main"]

#: ``--profile``: Managed HSM's documented limits, alone or with the sustained-load model.
PROFILES = ("managed-hsm", "managed-hsm-sustained")

# --sustained-* option -> SustainedLoad field
_SUSTAINED_OPTIONS = {
    "sustained_share": "share",
    "sustained_after": "after",
    "sustained_drop": "drop",
    "latency_step": "latency_step",
    "latency_cap": "latency_cap",
    "recover_share": "recover_share",
    "recover_after": "recover_after",
}


def _parse_limit(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--limit takes CLASS=N, not {text!r}")
    if name not in DEFAULT_LIMITS:
        raise argparse.ArgumentTypeError(f"unknown class {name!r} (known: {', '.join(DEFAULT_LIMITS)})")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit {name}= needs a number") from None


def _positive_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a number of requests/s, not {text!r}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of requests/s, not {text!r}")
    return rate


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"needs a finite number, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    defaults = SustainedLoad()
    parser = argparse.ArgumentParser(
        prog="python -m emulators.azure_keyvault",
        description="Azure Key Vault / Managed HSM emulator on 127.0.0.1 (HTTPS; see "
        "docs/azure-keyvault-emulator.md).",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--state-dir", required=True, help="directory for keys.json and the TLS files")
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        help="managed-hsm: Managed HSM's documented per-second limits (the default limits); "
        "managed-hsm-sustained: the same plus the sustained-load model",
    )
    parser.add_argument(
        "--throttle-rate",
        type=_positive_rate,
        metavar="R",
        help="limit of the wrap class in requests/s (default: the documented 2100); the other "
        "cryptographic classes are scaled by the same factor, create/read/manage stay as documented",
    )
    parser.add_argument(
        "--limit",
        action="append",
        type=_parse_limit,
        default=[],
        metavar="CLASS=N",
        help=f"requests/s for one class (0 = unlimited); classes: {', '.join(DEFAULT_LIMITS)}",
    )
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply every default limit")
    parser.add_argument("--retry-after", choices=("on", "off"), default="on", help="send Retry-After on 429")
    model = parser.add_argument_group(
        "sustained-load model (with --profile managed-hsm-sustained; seconds, shares of the limit)"
    )
    model.add_argument("--sustained-share", type=_number, help=f"default {defaults.share:g}")
    model.add_argument("--sustained-after", type=_number, help=f"default {defaults.after:g}")
    model.add_argument("--sustained-drop", type=_number, help=f"default {defaults.drop:g}")
    model.add_argument("--latency-step", type=_number, help=f"default {defaults.latency_step:g}")
    model.add_argument("--latency-cap", type=_number, help=f"default {defaults.latency_cap:g}")
    model.add_argument("--recover-share", type=_number, help=f"default {defaults.recover_share:g}")
    model.add_argument("--recover-after", type=_number, help=f"default {defaults.recover_after:g}")
    parser.add_argument(
        "--attestation-verifier",
        help="PEM public key that signs attestation tokens for release (without it, signatures are "
        "NOT checked)",
    )
    args = parser.parse_args(argv)
    given = {field: getattr(args, option) for option, field in _SUSTAINED_OPTIONS.items()}
    given = {field: value for field, value in given.items() if value is not None}
    sustained: SustainedLoad | None = None
    if args.profile == "managed-hsm-sustained":
        try:
            sustained = SustainedLoad(**given)
        except ValueError as exc:
            parser.error(str(exc))
    elif given:
        parser.error("the sustained-load options need --profile managed-hsm-sustained")
    limits = managed_hsm_limits(args.throttle_rate) if args.throttle_rate is not None else {}
    if limits and args.rate_scale != 1.0:
        parser.error("--throttle-rate and --rate-scale do not go together")
    limits.update(dict(args.limit))
    emulator = AzureKeyVaultEmulator(
        args.state_dir,
        port=args.port,
        limits=limits,
        rate_scale=args.rate_scale,
        retry_after=args.retry_after == "on",
        sustained=sustained,
        attestation_verifier=args.attestation_verifier,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    url = emulator.start()
    print(f"AZURE_KEYVAULT_URL={url}", flush=True)
    print(f"AZURE_KEYVAULT_CA_FILE={emulator.ca_file}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
    return 0
