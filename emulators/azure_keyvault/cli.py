"""The command line of ``python -m emulators.azure_keyvault``: prints the URL and the CA file, then
serves until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading

from emulators.azure_keyvault.emulator import AzureKeyVaultEmulator
from emulators.azure_keyvault.throttle import DEFAULT_LIMITS

__all__ = ["main"]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emulators.azure_keyvault",
        description="Azure Key Vault / Managed HSM emulator on 127.0.0.1 (HTTPS; see "
        "docs/azure-keyvault-emulator.md).",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--state-dir", required=True, help="directory for keys.json and the TLS files")
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
    parser.add_argument(
        "--attestation-verifier",
        help="PEM public key that signs attestation tokens for release (without it, signatures are "
        "NOT checked)",
    )
    args = parser.parse_args(argv)
    emulator = AzureKeyVaultEmulator(
        args.state_dir,
        port=args.port,
        limits=dict(args.limit),
        rate_scale=args.rate_scale,
        retry_after=args.retry_after == "on",
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
