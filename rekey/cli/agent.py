"""``rekey agent serve``: the enclave agent that runs inside a workload's TEE."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from attestation.sim import SimVerifier
from rekey.agent_server import make_server
from rekey.cli.context import sim_host_dir
from rekey.cli.output import CliError, out
from sealing.agent import EnclaveAgent
from sealing.generation import ManifestError, load_manifest
from sealing.tee.sim import EnclaveIdentity, SimHost


class PortUnavailable(CliError):
    """The agent cannot listen on the address asked for (port in use, or not allowed)."""


@click.group("agent")
def cli() -> None:
    """The enclave agent that runs inside a workload's TEE."""


@cli.command("serve")
@click.option(
    "--manifest",
    "manifest_path",
    required=True,
    type=click.Path(path_type=Path),
    metavar="GEN_MANIFEST",
    help="Generation manifest of the build this agent runs in.",
)
@click.option(
    "--platform",
    type=click.Choice(["sim"]),
    default="sim",
    show_default=True,
    help="TEE platform (real hardware platforms come later).",
)
@click.option(
    "--host-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Simulated host: root secret, attestation key, CA (default <home>/sim-host).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port on 127.0.0.1 (0 picks a free one and prints it).",
)
def serve(manifest_path: Path, platform: str, host_dir: Path | None, port: int) -> None:
    """Serve the agent API on 127.0.0.1 until stopped (SIGINT/SIGTERM)."""
    manifest = load_manifest(manifest_path)
    if manifest.platform != platform:
        raise ManifestError(f"{manifest_path}: field 'platform': {manifest.platform} is not {platform}")
    host = SimHost.load_or_create(sim_host_dir(host_dir))
    enclave = host.enclave(EnclaveIdentity.from_manifest(manifest))
    agent = EnclaveAgent(manifest, enclave, SimVerifier(host.root_ca_pem()))
    try:
        server = make_server(agent, port)
    except OSError as exc:
        raise PortUnavailable(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    bound = server.server_address[1]
    out.print(f"rekey agent for generation {manifest.id} listening on http://127.0.0.1:{bound}")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
