"""``rekey agent serve``: the enclave agent that runs inside a workload's TEE."""

from __future__ import annotations

import json
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from attestation.ratls import RatlsVerifier
from attestation.sim import SimVerifier
from rekey.agent_auth import (
    CALLER_NAME,
    DEFAULT_CALLER,
    AgentCallError,
    AgentClient,
    AgentCredentialError,
    check_agent_url,
    create_tokens,
    read_token,
    remove_tokens,
    token_path,
)
from rekey.agent_server import ServerLimits, make_server
from rekey.backends import agent_releaser, sim_root_cas
from rekey.cli.context import settings, sim_host_dir, store
from rekey.cli.output import (
    EXIT_FAILED,
    CliError,
    emit_json,
    err,
    json_option,
    log_format_option,
    out,
    printable,
    table,
)
from rekey.fleet import DEFAULT_REFRESH_SECONDS, FleetMembership
from rekey.ratls_transport import RatlsUntrusted, peer_verifier, server_expectation
from sealing.agent import EnclaveAgent
from sealing.errors import SealingError
from sealing.generation import ManifestError, load_manifest
from sealing.migration import manifest_of
from sealing.names import InvalidName, check_agent_id, check_generation_id
from sealing.store import MAX_REFRESH_SECONDS, AgentRecord, SealedStateStore
from sealing.tee.sim import EnclaveIdentity, SimHost


class PortUnavailable(CliError):
    """The agent cannot listen on the address asked for (port in use, or not allowed)."""


class AgentCredentialProblem(CliError):
    """The agent's state directory or token file is missing or unsafe."""


class AgentUntrusted(CliError):
    """What the agent's certificate must show is unknown (no registered generation, no host root)."""


class AgentRefused(CliError):
    """The agent answered with an error."""

    exit_code = EXIT_FAILED


def _state_dir(state_dir: Path | None, generation: str) -> Path:
    """The agent's state directory: ``state_dir``, else ``<home>/agent/<generation id>``."""
    return state_dir if state_dir is not None else settings().home / "agent" / generation


def _checked(check: Any) -> Any:
    def callback(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except InvalidName as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def _caller_name(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    names = value if isinstance(value, tuple) else (value,)
    for name in names:
        if not CALLER_NAME.fullmatch(name):
            raise click.BadParameter(f"{name!r} must match {CALLER_NAME.pattern}")
    return value


state_dir_option = click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The agent's state directory with its token files (default <home>/agent/<generation id>).",
)


def url_option_check(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    """A click callback refusing an agent URL that is not https://127.0.0.1:PORT (exit 2)."""
    if value is None:
        return None
    try:
        check_agent_url(value)
    except AgentCredentialError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def expectation_for(
    generation: str | None,
    *,
    record: AgentRecord | None,
    sealed_store: SealedStateStore | None,
    manifest_path: Path | None = None,
) -> RatlsVerifier:
    """What the agent's RA-TLS certificate must show: the evidence of ``manifest_path``'s
    generation, else of ``generation`` as the store registers it, on the agent's host (the
    registry's record of it) or, for an unregistered agent, any simulated host this home knows
    (``<home>/sim-host``, ``<home>/hosts/*``)."""
    roots = sim_root_cas(settings())
    if record is not None and record.host_id in roots:
        trusted = [roots[record.host_id]]
    else:
        trusted = list(roots.values())
    if not trusted:
        raise AgentUntrusted(
            f"no simulated host root CA under {settings().home} (sim-host, hosts/*): the agent's"
            " certificate cannot be checked"
        )
    if manifest_path is not None:
        manifest = load_manifest(manifest_path)
    elif generation is None or sealed_store is None:
        raise AgentUntrusted("the agent's generation is unknown: give --manifest or register it")
    else:
        try:
            manifest = manifest_of(sealed_store, generation)
        except SealingError as exc:
            raise AgentUntrusted(
                f"{exc}: the agent's certificate cannot be checked (give --manifest)"
            ) from None
    return server_expectation(manifest, trusted)


def _registered(sealed_store: SealedStateStore | None, url: str) -> AgentRecord | None:
    if sealed_store is None:
        return None
    endpoint = url.rstrip("/")
    found = [a for a in sealed_store.list_agents() if a.endpoint == endpoint]
    return max(found, key=lambda a: a.started_at) if found else None


def client_for(
    url: str,
    *,
    generation: str | None,
    state_dir: Path | None,
    caller: str,
    sealed_store: SealedStateStore | None = None,
    manifest_path: Path | None = None,
) -> AgentClient:
    """A client of the agent at ``url`` with ``caller``'s token from the agent's state directory:
    ``state_dir``, else ``<home>/agent/<generation>`` for ``generation``, else for the generation
    the fleet registry records for an agent at ``url`` (the most recently started). The agent's
    certificate must show that generation (`expectation_for`)."""
    record = _registered(sealed_store, url)
    if generation is None and record is not None:
        generation = record.generation
    if state_dir is None and generation is None:
        raise click.UsageError(
            f"no registered agent at {url}: give --generation ID or --state-dir DIR (where the"
            " agent's token is), or start it with --register"
        )
    try:
        token = read_token(_state_dir(state_dir, generation or ""), caller)
    except AgentCredentialError as exc:
        raise AgentCredentialProblem(str(exc)) from None
    expect = expectation_for(
        generation, record=record, sealed_store=sealed_store, manifest_path=manifest_path
    )
    return AgentClient(url, token, expect=expect)


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
@state_dir_option
@click.option(
    "--caller",
    "callers",
    multiple=True,
    callback=_caller_name,
    metavar="NAME",
    help="Also create a token for this named caller (token-NAME); nonces are bounded per caller.",
)
@click.option(
    "--allow-origin",
    "allowed_origins",
    multiple=True,
    metavar="ORIGIN",
    help="Accept requests carrying this Origin header (none is accepted by default).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1, 1024),
    default=32,
    show_default=True,
    help="Connections served at once.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(0.1, 3600),
    default=10.0,
    show_default=True,
    help="Seconds a connection may stay silent.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(0.1, 3600),
    default=60.0,
    show_default=True,
    help="Seconds a whole request may take.",
)
@click.option(
    "--auth-timeout",
    type=click.FloatRange(0.1, 3600),
    default=2.0,
    show_default=True,
    help="Seconds for a request's line and headers to arrive and be authenticated.",
)
@click.option(
    "--register",
    is_flag=True,
    help="Record this agent in the store's fleet registry (its generation must be registered)"
    " and refresh its last-seen time while it runs.",
)
@click.option(
    "--agent-id",
    default=None,
    callback=_checked(check_agent_id),
    metavar="ID",
    help="The id it registers under (default <generation id>@<host id>).",
)
@click.option(
    "--refresh-every",
    type=click.IntRange(1, MAX_REFRESH_SECONDS),
    default=DEFAULT_REFRESH_SECONDS,
    show_default=True,
    metavar="SECONDS",
    help="How often a registered agent refreshes its last-seen time.",
)
@log_format_option()
def serve(
    manifest_path: Path,
    platform: str,
    host_dir: Path | None,
    port: int,
    state_dir: Path | None,
    callers: tuple[str, ...],
    allowed_origins: tuple[str, ...],
    max_connections: int,
    idle_timeout: float,
    request_timeout: float,
    auth_timeout: float,
    register: bool,
    agent_id: str | None,
    refresh_every: int,
) -> None:
    """Serve the agent API over attested TLS (HTTPS only) on 127.0.0.1 until stopped (SIGINT/SIGTERM).

    At start the agent makes a fresh TLS key and a self-signed certificate whose extension
    carries its enclave's evidence over the key's hash (valid 24 h; every 12 h it makes a new one
    for new connections).
    Clients check that evidence against the generation they expect; a calling agent's optional
    client certificate must show the same signer and product id, an SVN not below this one's.

    Fresh caller tokens are written at every start to the state directory (0700, files 0600)
    and deleted at a clean stop: callers read theirs and sign their requests with it
    (``rekey.agent_auth``); the token itself is never sent.

    With --register the agent records itself in the store's fleet registry (agent id, host id,
    generation, endpoint, handoff key fingerprint), refreshes its last-seen time every
    --refresh-every seconds and is marked stopped at a clean stop. An id registered for another
    host or generation is refused (rekey agent remove frees it); the same agent starting again
    on the same host takes its registration over."""
    if not register and agent_id is not None:
        raise click.UsageError("--agent-id needs --register")
    manifest = load_manifest(manifest_path)
    if manifest.platform != platform:
        raise ManifestError(f"{manifest_path}: field 'platform': {manifest.platform} is not {platform}")
    host = SimHost.load_or_create(sim_host_dir(host_dir))
    enclave = host.enclave(EnclaveIdentity.from_manifest(manifest))
    # KMS-wrapped state opens and is re-bound inside the agent, with its own KMS settings
    # (`rekey.backends`): for Transit the release gate unwraps in this process.
    agent = EnclaveAgent(
        manifest, enclave, SimVerifier(host.root_ca_pem()), releaser=agent_releaser(settings())
    )
    directory = _state_dir(state_dir, manifest.id)
    try:
        tokens = create_tokens(directory, list(callers))
    except AgentCredentialError as exc:
        raise AgentCredentialProblem(str(exc)) from None
    limits = ServerLimits(
        max_connections=max_connections,
        idle_timeout=idle_timeout,
        request_timeout=request_timeout,
        auth_timeout=auth_timeout,
    )
    try:
        server = make_server(
            agent,
            port,
            tokens=tokens,
            allowed_origins=allowed_origins,
            limits=limits,
            # Its RA-TLS identity: made now from the enclave and renewed every RENEW_EVERY.
            # A calling agent's certificate: same signer and product, SVN not below this one.
            peer_verifier=peer_verifier(manifest, [host.root_ca_pem()]),
        )
    except OSError as exc:
        remove_tokens(directory, tokens)
        raise PortUnavailable(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    bound = server.server_address[1]
    endpoint = f"https://127.0.0.1:{bound}"
    membership: FleetMembership | None = None
    # From here on every way out (a refused registration, a stop at any point, a failed write to
    # stdout before serving) closes the server, deletes the tokens and marks the registration
    # stopped: a token left behind would let a later caller sign requests to whoever takes the
    # port, and the registry would still list the endpoint as live.
    signal.signal(signal.SIGTERM, stop)
    try:
        if register:
            membership = _register(agent, endpoint, agent_id, refresh_every)
        out.print(f"rekey agent for generation {manifest.id} listening on {endpoint}")
        out.print(f"caller token in {token_path(directory)}")
        if membership is not None and membership.registration is not None:
            registered = membership.registration
            out.print(f"registered as agent {registered.agent_id} on host {registered.host_id}", markup=False)
        sys.stdout.flush()
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # SIGINT or SIGTERM, while registering or serving: a clean stop
    finally:
        server.server_close()
        remove_tokens(directory, tokens)  # a process that later takes the port learns nothing
        if membership is not None:
            membership.stop()
            membership.store.close()


def _register(
    agent: EnclaveAgent, endpoint: str, agent_id: str | None, refresh_every: int
) -> FleetMembership:
    """Register the agent in the settings' store (which must exist: its generation is registered
    there) and start refreshing; the store stays open until the agent stops."""
    opened = store()
    try:
        membership = FleetMembership(
            opened,
            agent,
            endpoint=endpoint,
            agent_id=agent_id,
            refresh_seconds=refresh_every,
            report=lambda line: err.print(f"warning: {printable(line)}", markup=False, emoji=False),
        )
        membership.start()
    except BaseException:
        opened.close()
        raise
    return membership


@cli.command("call")
@click.argument("path", metavar="PATH")
@click.option("--url", required=True, metavar="URL", help="The agent, https://127.0.0.1:PORT.")
@click.option(
    "--generation", default=None, metavar="ID", help="The agent's generation id (finds its state dir)."
)
@state_dir_option
@click.option(
    "--caller",
    default=DEFAULT_CALLER,
    show_default=True,
    callback=_caller_name,
    help="Whose token to present.",
)
@click.option("--body", default=None, metavar="JSON", help="POST this JSON object (without it: GET).")
@click.option(
    "--manifest",
    "manifest_path",
    default=None,
    type=click.Path(path_type=Path),
    metavar="GEN_MANIFEST",
    help="The generation the agent must attest to (default: its generation as the store registers it).",
)
def call(
    path: str,
    url: str,
    generation: str | None,
    state_dir: Path | None,
    caller: str,
    body: str | None,
    manifest_path: Path | None,
) -> None:
    """Call the agent at URL over attested TLS, signing with the caller's token, and print the
    JSON answer. The agent's certificate must carry evidence of its generation (--manifest, or
    the registered one) on a simulated host this home knows, or nothing is sent."""
    if state_dir is None and generation is None:
        raise click.UsageError("give --generation ID or --state-dir DIR (where the agent's token is)")
    directory = _state_dir(state_dir, generation or "")
    payload: dict[str, Any] | None = None
    if body is not None:
        try:
            payload = json.loads(body)
        except ValueError:
            raise click.BadParameter("not JSON", param_hint="--body") from None
        if not isinstance(payload, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--body")
    try:
        token = read_token(directory, caller)
    except AgentCredentialError as exc:
        raise AgentCredentialProblem(str(exc)) from None
    if manifest_path is not None:
        expect = expectation_for(generation, record=None, sealed_store=None, manifest_path=manifest_path)
    else:
        with store() as sealed_store:
            record = _registered(sealed_store, url)
            expect = expectation_for(
                generation or (record.generation if record else None),
                record=record,
                sealed_store=sealed_store,
            )
    client = AgentClient(url, token, expect=expect)
    try:
        result = client.call(path, payload)
    except AgentCallError as exc:
        raise AgentRefused(str(exc)) from None
    except RatlsUntrusted as exc:
        raise AgentRefused(f"the agent at {url} is not the attested agent expected: {exc.strerror}") from None
    except OSError as exc:
        raise AgentRefused(f"cannot reach the agent at {url}: {exc}") from None
    emit_json(result)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{int(seconds)}s ago"
    if seconds < 7200:
        return f"{int(seconds // 60)}m ago"
    if seconds < 172800:
        return f"{int(seconds // 3600)}h ago"
    return f"{int(seconds // 86400)}d ago"


def _agent_json(record: AgentRecord, now: datetime) -> dict[str, Any]:
    return {
        "agent_id": record.agent_id,
        "host": record.host_id,
        "generation": record.generation,
        "endpoint": record.endpoint,
        "handoff_key_sha256": record.handoff_key_sha256,
        "state": record.status(now),
        "last_seen": record.last_seen.isoformat(),
        "last_seen_age_seconds": round(max(0.0, (now - record.last_seen).total_seconds()), 3),
        "started_at": record.started_at.isoformat(),
        "registered_at": record.registered_at.isoformat(),
        "refresh_seconds": record.refresh_seconds,
    }


@cli.command("list")
@click.option(
    "--generation",
    default=None,
    callback=_checked(check_generation_id),
    metavar="GEN",
    help="Only the agents of this generation.",
)
@json_option
def list_(generation: str | None, json_out: bool) -> None:
    """List the agents of the fleet registry: id, host, generation, endpoint, handoff key
    fingerprint, when last seen, and live, stale (not refreshed for three intervals) or stopped."""
    with store() as sealed_store:
        records = sealed_store.list_agents(generation=generation)
        now = sealed_store.clock()
    items = [_agent_json(r, now) for r in records]
    if json_out:
        emit_json(items)
        return
    listing = table("agent", "host", "generation", "endpoint", "fingerprint", "last seen", "state")
    for i in items:
        # A row is whatever the store holds (a writer may have put a newline or an escape
        # sequence in any field): every cell is shown escaped, one line per agent.
        listing.add_row(
            Text(printable(i["agent_id"])),
            Text(printable(i["host"])),
            Text(printable(i["generation"])),
            Text(printable(i["endpoint"])),
            Text(printable(i["handoff_key_sha256"][:12])),
            _age(i["last_seen_age_seconds"]),
            i["state"],
        )
    out.print(listing if items else "no agents registered")


@cli.command("remove")
@click.argument("agent_id", metavar="AGENT_ID", callback=_checked(check_agent_id))
def remove(agent_id: str) -> None:
    """Forget an agent's registration (e.g. one whose host is gone, so that its id can be used
    again). A registered agent that still runs registers itself again at its next refresh."""
    with store() as sealed_store:
        sealed_store.remove_agent(agent_id)
    err.print(f"removed agent {agent_id}", markup=False)
