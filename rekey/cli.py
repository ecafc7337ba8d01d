"""The ``rekey`` command line: noun verb, every reporting command takes ``--json``.

Errors end in one line on stderr and a non-zero exit code (2 for bad input, 1 for a failed
operation, 4 for a generation downgrade); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import tempfile
import traceback
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from activities.types import DEFAULT_BATCH, DEFAULT_IN_FLIGHT, MAX_BATCH, MAX_IN_FLIGHT
from attestation.errors import AttestationError
from kms_adapters.keyref import InvalidKeyRef
from rekey import devstack
from rekey.backends import BackendNotAvailable, adapter_for
from rekey.client import RekeyClientError
from rekey.config import ConfigError, Settings, load_settings
from sealing.errors import SealingError
from sealing.generation import (
    GenerationManifest,
    ManifestError,
    diff,
    load_manifest,
    parse_manifest,
)
from sealing.keywrap import KeyWrapper
from sealing.state import SealedState
from sealing.store import RecordNotFound, SealedStateStore, StoreError

EXIT_DENIED = 3
EXIT_DOWNGRADE = 4
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
json_option = click.option("--json", "json_out", is_flag=True, help="Print JSON.")

# Piped output is not cut to 80 columns: scripts and logs get whole key refs and paths.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _table(*columns: str) -> Table:
    return Table(*columns, box=None, pad_edge=False)


class InputFileError(Exception):
    """A file named on the command line cannot be read or written."""

    exit_code = 2


_KNOWN_ERRORS = (
    AttestationError,
    ConfigError,
    ManifestError,
    InvalidKeyRef,
    BackendNotAvailable,
    SealingError,
    StoreError,
    devstack.DevStackError,
    InputFileError,
    RekeyClientError,
)


class _Context:
    def __init__(self, home: Path | None) -> None:
        self.home = home

    @property
    @cache  # noqa: B019 - one context per process
    def settings(self) -> Settings:
        return load_settings(self.home)


def _ctx() -> _Context:
    obj = click.get_current_context().find_object(_Context)
    assert obj is not None
    return obj


def _settings() -> Settings:
    return _ctx().settings


def _store() -> SealedStateStore:
    return SealedStateStore(_settings().store_url)


def _emit_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


@click.group(context_settings=CONTEXT)
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    envvar="REKEY_HOME",
    help="State directory (default ./.rekey; env REKEY_HOME).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def app(ctx: click.Context, home: Path | None, debug: bool) -> None:
    """Key rotation and sealed-state migration for confidential-computing fleets."""
    ctx.obj = _Context(home)


@app.group("dev")
def dev_app() -> None:
    """The embedded dev stack: Temporal, OpenBao, moto."""


@app.group("key")
def key_app() -> None:
    """KMS keys."""


@app.group("state")
def state_app() -> None:
    """Sealed state in the store."""


@app.group("generation")
def generation_app() -> None:
    """Enclave generations (measured builds)."""


@app.group("agent")
def agent_app() -> None:
    """The enclave agent that runs inside a workload's TEE."""


@app.group("attest")
def attest_app() -> None:
    """Attestation evidence and results."""


# ---------------------------------------------------------------------------------------- dev


def _status_table(rows: list[devstack.ComponentStatus]) -> Table:
    table = _table("component", "state", "pid", "endpoints", "note")
    for row in rows:
        endpoints = "  ".join(f"{k} {v}" for k, v in row.endpoints.items())
        table.add_row(row.name, row.state, str(row.pid or "-"), endpoints, row.note)
    return table


@dev_app.command("up")
@json_option
def dev_up(json_out: bool) -> None:
    """Start the dev stack (idempotent) and wait until every component answers."""
    settings = _settings()
    echo = (lambda _msg: None) if json_out else (lambda msg: err.print(msg))
    rows = devstack.up(settings, echo=echo)
    if json_out:
        _emit_json([r.to_dict() for r in rows])
        return
    out.print(_status_table(rows))
    ui = next((r.endpoints.get("ui") for r in rows if r.endpoints.get("ui")), None)
    if ui:
        out.print(f"Temporal UI: {ui}")
    out.print(f"State directory: {settings.home.resolve()}  (stop with: rekey dev down)")


@dev_app.command("down")
@json_option
def dev_down(json_out: bool) -> None:
    """Stop exactly what `rekey dev up` started."""
    echo = (lambda _msg: None) if json_out else (lambda msg: err.print(msg))
    rows = devstack.down(_settings(), echo=echo)
    if json_out:
        _emit_json([r.to_dict() for r in rows])
    else:
        out.print(_status_table(rows))


@dev_app.command("status")
@json_option
def dev_status(json_out: bool) -> None:
    """Show each component, its state and endpoints."""
    rows = devstack.status(_settings())
    if json_out:
        _emit_json([r.to_dict() for r in rows])
    else:
        out.print(_status_table(rows))


# ---------------------------------------------------------------------------------------- key


def _print_key(data: dict[str, Any]) -> None:
    out.print(
        f"{data['key_ref']}  type {data['type']}  rotation {data['rotation_mode']}"
        f"  primary version {data['primary_version']}  release policy {data['release_policy'] or '-'}"
    )
    table = _table("version", "state", "created")
    for v in data["versions"]:
        primary = " (primary)" if v["primary"] else ""
        table.add_row(str(v["version"]), v["state"] + primary, (v["created_at"] or "")[:19])
    out.print(table)
    for note in data["notes"]:
        out.print(f"note: {note}")


@key_app.command("create")
@click.argument("key_ref", metavar="KEYREF")
@click.option(
    "--rotation-mode",
    type=click.Choice(["native", "key-per-version"]),
    default=None,
    help="AWS only: one KMS key per version (default, retirable) or RotateKeyOnDemand.",
)
@json_option
def key_create(key_ref: str, rotation_mode: str | None, json_out: bool) -> None:
    """Create a key (a no-op if it exists): vault:NAME, aws:NAME, azure:NAME."""
    info, created = adapter_for(_settings(), key_ref).create(rotation_mode=rotation_mode)  # type: ignore[arg-type]
    data = info.to_dict() | {"created": created}
    if json_out:
        _emit_json(data)
        return
    out.print(f"{'created' if created else 'exists:'} {key_ref}")
    _print_key(data)


@key_app.command("show")
@click.argument("key_ref", metavar="KEYREF")
@json_option
def key_show(key_ref: str, json_out: bool) -> None:
    """Show a key's versions, their state, the primary and the rotation mode."""
    data = adapter_for(_settings(), key_ref).describe().to_dict()
    _emit_json(data) if json_out else _print_key(data)


@key_app.command("list")
@click.argument("backends", nargs=-1, type=click.Choice(["vault", "aws", "azure"]))
@json_option
def key_list(backends: tuple[str, ...], json_out: bool) -> None:
    """List the keys on each backend (default: all three) with primary version and rotation mode."""
    from kms_adapters.errors import KmsError

    settings = _settings()
    rows: list[dict[str, Any]] = []
    for backend in backends or ("vault", "aws", "azure"):
        try:
            lister = adapter_for(settings, f"{backend}:rekey-list")
            for name in lister.list_names():  # type: ignore[attr-defined]
                rows.append(adapter_for(settings, f"{backend}:{name}").describe().to_dict())
        except (KmsError, ConfigError) as exc:  # one unreachable backend does not hide the others
            rows.append({"key_ref": f"{backend}:", "error": str(exc)})
    if json_out:
        _emit_json(rows)
        return
    table = _table("key", "type", "rotation", "primary", "versions")
    for row in rows:
        if "error" in row:
            table.add_row(row["key_ref"], "", "", "", f"unavailable: {row['error']}")
            continue
        states = ", ".join(f"v{v['version']} {v['state']}" for v in row["versions"])
        table.add_row(row["key_ref"], row["type"], row["rotation_mode"], str(row["primary_version"]), states)
    out.print(table if rows else "no keys")


# -------------------------------------------------------------------------------------- state


def _sealed_state(store: SealedStateStore) -> SealedState:
    settings = _settings()
    wrappers: dict[str, KeyWrapper] = {}

    def resolve(key_ref: str) -> KeyWrapper:
        if key_ref not in wrappers:
            wrappers[key_ref] = adapter_for(settings, key_ref)
        return wrappers[key_ref]

    return SealedState(store, resolve)


def _read_input(path: Path) -> bytes:
    if str(path) == "-":
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read: {exc.strerror}") from None


def _write_output(path: Path, data: bytes) -> None:
    """Write plaintext atomically, readable by the owner only."""
    if str(path) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.")
    except OSError as exc:
        raise InputFileError(f"{path}: cannot write: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InputFileError(f"{path}: cannot write: {exc.strerror}") from None


@state_app.command("put")
@click.option("--key", required=True, metavar="KEYREF", help="Key that wraps the DEK, e.g. vault:orders.")
@click.option("--generation", required=True, metavar="GEN", help="Registered generation id.")
@click.option("--name", required=True, help="Name of the state item.")
@click.option(
    "--in",
    "in_file",
    required=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="File to seal ('-' for stdin).",
)
@click.option("--namespace", default="default", show_default=True)
@json_option
def state_put(key: str, generation: str, name: str, in_file: Path, namespace: str, json_out: bool) -> None:
    """Seal a file under a key and store it (replacing an existing item of that name)."""
    data = _read_input(in_file)
    with _store() as store:
        record = _sealed_state(store).put(
            namespace=namespace, name=name, data=data, key_ref=key, generation=generation
        )
    summary = {
        "namespace": record.namespace,
        "name": record.name,
        "blob_id": record.blob_id,
        "key_ref": record.key_ref,
        "key_version": record.key_version,
        "generation": record.generation,
        "size": len(data),
        "row_version": record.row_version,
    }
    if json_out:
        _emit_json(summary)
    else:
        out.print(
            f"sealed {namespace}/{name} ({len(data)} bytes) under {record.key_ref}"
            f" v{record.key_version} for generation {record.generation}"
        )


@state_app.command("get")
@click.option("--name", required=True, help="Name of the state item.")
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Where to write ('-' for stdout); created with mode 0600.",
)
@click.option("--namespace", default="default", show_default=True)
def state_get(name: str, out_file: Path, namespace: str) -> None:
    """Unseal a stored item into a file."""
    with _store() as store:
        data = _sealed_state(store).get(namespace=namespace, name=name)
    _write_output(out_file, data)
    if str(out_file) != "-":
        err.print(f"wrote {len(data)} bytes to {out_file}")


@state_app.command("list")
@click.option("--namespace", default=None, help="Only this namespace.")
@json_option
def state_list(namespace: str | None, json_out: bool) -> None:
    """List stored items: name, key ref, key version, generation, sealed size in bytes."""
    with _store() as store:
        rows = store.summaries(namespace)
    items: list[dict[str, Any]] = [
        {
            "namespace": r.namespace,
            "name": r.name,
            "key_ref": r.key_ref,
            "key_version": r.key_version,
            "generation": r.generation,
            "sealed_size": r.size,
            "updated_at": r.updated_at.isoformat(),
        }
        for r in rows
    ]
    if json_out:
        _emit_json(items)
        return
    table = _table("namespace", "name", "key ref", "version", "generation", "sealed size", "updated")
    for i in items:
        table.add_row(
            i["namespace"],
            i["name"],
            i["key_ref"],
            str(i["key_version"]),
            i["generation"],
            str(i["sealed_size"]),
            i["updated_at"][:19],
        )
    out.print(table if items else "no sealed state stored")


# --------------------------------------------------------------------------------- generation


def _registered(store: SealedStateStore, generation_id: str) -> GenerationManifest:
    try:
        document = store.get_generation(generation_id)
    except RecordNotFound:
        raise ManifestError(f"generation {generation_id!r} is not registered") from None
    return parse_manifest(json.loads(document), f"generation {generation_id}")


@generation_app.command("register")
@click.argument("manifest", metavar="MANIFEST", type=click.Path(path_type=Path))
@json_option
def generation_register(manifest: Path, json_out: bool) -> None:
    """Register a generation from its manifest (idempotent for an identical manifest)."""
    parsed = load_manifest(manifest)
    with _store() as store:
        created = store.put_generation(parsed.id, parsed.canonical_json())
    if json_out:
        _emit_json(parsed.model_dump() | {"created": created})
    else:
        verb = "registered" if created else "already registered:"
        out.print(f"{verb} generation {parsed.id} ({parsed.platform}, svn {parsed.svn})")


@generation_app.command("list")
@json_option
def generation_list(json_out: bool) -> None:
    """List registered generations."""
    with _store() as store:
        rows = store.list_generations()
    items: list[dict[str, Any]] = [json.loads(doc) | {"registered_at": at.isoformat()} for _, doc, at in rows]
    if json_out:
        _emit_json(items)
        return
    table = _table("id", "platform", "svn", "product", "debug", "tcb", "measurement")
    for i in items:
        table.add_row(
            i["id"],
            i["platform"],
            str(i["svn"]),
            str(i["product_id"]),
            str(i["debug"]).lower(),
            i["tcb"],
            i["measurement"][:16] + "…",
        )
    out.print(table if items else "no generations registered")


@generation_app.command("diff")
@click.argument("old", metavar="GEN_A")
@click.argument("new", metavar="GEN_B")
@json_option
@click.option("--markdown", is_flag=True, help="Print a Markdown table (for a change review).")
def generation_diff(old: str, new: str, json_out: bool, markdown: bool) -> None:
    """Show every field old -> new and flag what matters for sealed state.

    Exits 4 when the SVN goes down (a downgrade)."""
    with _store() as store:
        result = diff(_registered(store, old), _registered(store, new))
    if json_out:
        _emit_json(result.to_dict())
    elif markdown:
        out.print(result.to_markdown(), markup=False)
    else:
        table = _table("field", old, new, "")
        for f in result.fields:
            table.add_row(f.field, str(f.old), str(f.new), "[bold]changed[/]" if f.changed else "")
        out.print(table)
        for flag in result.flags():
            out.print(f"[bold yellow]! {flag}[/]")
    if result.svn_lowered:
        raise click.exceptions.Exit(EXIT_DOWNGRADE)


# ------------------------------------------------------------------------------ agent, attest


def _sim_host_dir(host_dir: Path | None) -> Path:
    return host_dir if host_dir is not None else _settings().home / "sim-host"


@agent_app.command("serve")
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
def agent_serve(manifest_path: Path, platform: str, host_dir: Path | None, port: int) -> None:
    """Serve the agent API on 127.0.0.1 until stopped (SIGINT/SIGTERM)."""
    import signal

    from attestation.sim import SimVerifier
    from rekey.agent_server import make_server
    from sealing.agent import EnclaveAgent
    from sealing.tee.sim import EnclaveIdentity, SimHost

    manifest = load_manifest(manifest_path)
    if manifest.platform != platform:
        raise ManifestError(f"{manifest_path}: field 'platform': {manifest.platform} is not {platform}")
    host = SimHost.load_or_create(_sim_host_dir(host_dir))
    enclave = host.enclave(EnclaveIdentity.from_manifest(manifest))
    agent = EnclaveAgent(manifest, enclave, SimVerifier(host.root_ca_pem()))
    try:
        server = make_server(agent, port)
    except OSError as exc:
        raise InputFileError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None

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


def _read_evidence(path: Path) -> tuple[bytes, bytes]:
    """Raw evidence, or the JSON an agent's /v1/attest returns (evidence + public key)."""
    raw = _read_input(path)
    if raw[:1] == b"{":
        try:
            document = json.loads(raw)
            return base64.b64decode(document["evidence"], validate=True), base64.b64decode(
                document.get("public_key", ""), validate=True
            )
        except (ValueError, KeyError, TypeError):
            raise InputFileError(
                f"{path}: JSON evidence needs base64 'evidence' (and 'public_key')"
            ) from None
    return raw, b""


@attest_app.command("verify")
@click.argument("evidence_path", metavar="EVIDENCE", type=click.Path(path_type=Path))
@click.option("--platform", type=click.Choice(["sim"]), required=True, help="Evidence platform.")
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Policy (YAML/JSON); with it, a signed attestation result is issued.",
)
@click.option("--nonce", "nonce_hex", default=None, metavar="HEX", help="Nonce the evidence must bind.")
@click.option(
    "--at", "at_text", default=None, metavar="TIME", help="Verify as of this ISO 8601 time (default now)."
)
@click.option(
    "--host-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Simulated host whose root CA is trusted (default <home>/sim-host).",
)
@json_option
def attest_verify(
    evidence_path: Path,
    platform: str,
    policy_path: Path | None,
    nonce_hex: str | None,
    at_text: str | None,
    host_dir: Path | None,
    json_out: bool,
) -> None:
    """Verify evidence; exit 0 allowed, 3 denied by policy, 2 malformed or unverifiable."""
    import asyncio
    from datetime import UTC, datetime

    from attestation.errors import NonceMismatch, PolicyDenied
    from attestation.policy import load_policy
    from attestation.sim import SimVerifier
    from attestation.token import ResultSigner, verify_result
    from attestation.verifier import Verifier
    from sealing.handoff import report_data_for
    from sealing.tee.sim import SimHost

    try:
        at = datetime.fromisoformat(at_text) if at_text else datetime.now(UTC)
    except ValueError:
        raise InputFileError(f"--at {at_text!r} is not an ISO 8601 time") from None
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    try:
        nonce = bytes.fromhex(nonce_hex) if nonce_hex is not None else None
    except ValueError:
        raise InputFileError("--nonce must be hex") from None
    evidence, public_key = _read_evidence(evidence_path)
    root = SimHost.load_or_create(_sim_host_dir(host_dir)).root_ca_pem()
    platform_verifier = SimVerifier(root)
    result: dict[str, Any] = {}
    try:
        if policy_path is None:
            claims = platform_verifier.verify(evidence, at=at)
            if nonce is not None and bytes.fromhex(claims.report_data) != report_data_for(nonce, public_key):
                raise NonceMismatch("evidence does not bind the nonce (and public key)")
            result = {"allowed": True, "claims": claims.to_dict(), "token": None}
        else:
            policy = load_policy(policy_path)
            signer = ResultSigner.load_or_create(_settings().home / "verifier" / "es256.pem")
            verifier = Verifier({platform: platform_verifier}, signer, clock=lambda: at)
            token = asyncio.run(
                verifier.verify(
                    evidence,
                    platform=platform,
                    expected_nonce=nonce,
                    policy=policy,
                    audience="rekey",
                    cnf_public_key=public_key,
                )
            )
            verified = verify_result(
                token, public_key=signer.public_key, audience="rekey", policy_id=policy.id, now=at
            )
            result = {
                "allowed": True,
                "policy": policy.id,
                "claims": verified.claims.to_dict(),
                "token": token,
            }
    except PolicyDenied as exc:
        if json_out:
            _emit_json({"allowed": False, "reasons": exc.reasons})
        else:
            err.print("denied by policy:", markup=False)
            for reason in exc.reasons:
                err.print(f"  - {reason}", markup=False)
        sys.exit(EXIT_DENIED)
    if json_out:
        _emit_json(result)
        return
    table = _table("claim", "value")
    for key, value in result["claims"].items():
        table.add_row(key, str(value))
    out.print(table)
    if result.get("token"):
        out.print(f"attestation result (ES256 JWT, policy {result['policy']}):")
        out.print(result["token"], markup=False)


# ----------------------------------------------------------------- worker, rotate, schedule


def _duration(text: str, option: str) -> float:
    """``0``, ``0s``, ``30s``, ``15m``, ``24h``, ``7d`` (or combinations) -> seconds."""
    from attestation.errors import AttestationError
    from attestation.policy import parse_duration

    if text.strip() in ("0", "0s"):
        return 0.0
    try:
        return parse_duration(text).total_seconds()
    except (AttestationError, ValueError):
        raise InputFileError(f"{option} {text!r} is not a duration like 30s, 15m, 24h or 7d") from None


def _run_async(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


async def _client() -> Any:
    from rekey.client import connect

    return await connect(_settings())


@app.command("worker")
def worker_command() -> None:
    """Run a rekey worker (task queue `rekey`) until interrupted."""
    from rekey.worker import run_worker

    settings = _settings()
    err.print(f"rekey worker on task queue rekey, Temporal {settings.temporal_address}")
    with contextlib.suppress(KeyboardInterrupt):
        _run_async(run_worker(settings))


@app.command("codec-server")
@click.option("--port", type=click.IntRange(0, 65535), default=8234, show_default=True)
def codec_server_command(port: int) -> None:
    """Serve /encode and /decode for the Temporal UI (payloads are AES-GCM encrypted)."""
    from rekey.codec_server import run_codec_server

    sys.exit(run_codec_server(_settings().home, port))


@app.group("rotate")
def rotate_app() -> None:
    """Two-phase key rotation (RotateKeyWorkflow)."""


def _progress_dict(progress: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(progress)


def _print_progress(data: dict[str, Any]) -> None:
    out.print(
        f"{data['key_ref']}  phase {data['phase']}  v{data['old_primary']} -> v{data['new_version']}"
        f"  re-wrapped {data['rewrapped']}/{data['total']}  remaining {data['remaining']}"
        f"  conflicts {data['conflicts']}  failed {data['failed']}  throttled waits {data['throttled_waits']}"
        f"  rate {data['current_rate']:.0f}/s{'  PAUSED' if data['paused'] else ''}"
    )


async def _wait_with_progress(handle: Any) -> Any:
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from workflows.rotation import RotateKeyWorkflow

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bar:
        task = bar.add_task("PREPARING", total=None)
        result_task = asyncio.ensure_future(handle.result())
        while not result_task.done():
            try:
                progress = await handle.query(RotateKeyWorkflow.progress)
                bar.update(
                    task,
                    description=f"{progress.phase:<15}",
                    total=progress.total or None,
                    completed=progress.rewrapped + progress.conflicts + progress.failed,
                )
            except Exception as exc:  # a query can fail during continue-as-new; the next one works
                bar.console.log(f"progress unavailable for a moment: {type(exc).__name__}")
            await asyncio.wait({result_task}, timeout=0.5)
        return result_task.result()


@rotate_app.command("start")
@click.argument("key_ref", metavar="KEYREF")
@click.option("--grace", default="24h", show_default=True, help="Wait before retiring old versions.")
@click.option(
    "--destroy-after", default=None, help="Destroy old versions this long after disabling (default never)."
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_BATCH),
    default=DEFAULT_BATCH,
    show_default=True,
    help="Blobs per re-wrap activity (each is read, re-wrapped and swapped in pipelined chunks).",
)
@click.option(
    "--in-flight",
    type=click.IntRange(1, MAX_IN_FLIGHT),
    default=DEFAULT_IN_FLIGHT,
    show_default=True,
    help="Re-wrap activities running at once.",
)
@click.option("--wait", "wait_", is_flag=True, help="Show a progress bar and wait for the end.")
@json_option
def rotate_start(
    key_ref: str,
    grace: str,
    destroy_after: str | None,
    batch_size: int,
    in_flight: int,
    wait_: bool,
    json_out: bool,
) -> None:
    """Start rotating KEYREF; exits 0 when DONE (with --wait), 1 when ABORTED or failed."""
    from temporalio.client import WorkflowFailureError
    from temporalio.exceptions import WorkflowAlreadyStartedError

    from activities.types import TASK_QUEUE
    from kms_adapters.keyref import KeyRef
    from rekey.client import actor
    from workflows.rotation import DONE, RotateKeyInput, RotateKeyWorkflow, workflow_id

    KeyRef.parse(key_ref)
    request = RotateKeyInput(
        key_ref,
        grace_seconds=_duration(grace, "--grace"),
        destroy_after_seconds=None if destroy_after is None else _duration(destroy_after, "--destroy-after"),
        batch_size=batch_size,
        batches_in_flight=in_flight,
        started_by=actor(),
    )

    async def run() -> Any:
        client = await _client()
        try:
            handle = await client.start_workflow(
                RotateKeyWorkflow.run, request, id=workflow_id(key_ref), task_queue=TASK_QUEUE
            )
        except WorkflowAlreadyStartedError:
            raise InputFileError(
                f"a rotation of {key_ref} is already running (workflow {workflow_id(key_ref)});"
                f" see `rekey rotate status {workflow_id(key_ref)}`"
            ) from None
        if not wait_:
            return handle.id, None
        try:
            return handle.id, await _wait_with_progress(handle)
        except WorkflowFailureError as exc:
            cause = exc.cause.message if hasattr(exc.cause, "message") else str(exc.cause)
            raise devstack.DevStackError(f"rotation {handle.id} failed: {cause}") from None

    workflow_id_, result = _run_async(run())
    if result is None:
        if json_out:
            _emit_json({"workflow_id": workflow_id_})
        else:
            out.print(f"started {workflow_id_}  (follow it: rekey rotate status {workflow_id_})")
        return
    data = _progress_dict(result)
    _emit_json(data) if json_out else _print_progress(data)
    if data["phase"] != DONE:
        sys.exit(1)


def _rotation_id(text: str) -> str:
    return text if text.startswith("rotate:") else f"rotate:{text}"


@rotate_app.command("status")
@click.argument("rotation_id", metavar="ID")
@json_option
def rotate_status(rotation_id: str, json_out: bool) -> None:
    """Phase and progress of a rotation (ID is rotate:BACKEND:NAME, or the key ref)."""
    from temporalio.service import RPCError

    from workflows.rotation import RotateKeyWorkflow

    async def run() -> Any:
        handle = (await _client()).get_workflow_handle(_rotation_id(rotation_id))
        try:
            return await handle.query(RotateKeyWorkflow.progress)
        except RPCError as exc:
            raise InputFileError(f"no rotation {_rotation_id(rotation_id)}: {exc.message}") from None

    data = _progress_dict(_run_async(run()))
    _emit_json(data) if json_out else _print_progress(data)


def _signal_command(name: str, help_text: str) -> None:
    @rotate_app.command(name, help=help_text)
    @click.argument("rotation_id", metavar="ID")
    def command(rotation_id: str) -> None:
        from temporalio.service import RPCError

        async def run() -> None:
            handle = (await _client()).get_workflow_handle(_rotation_id(rotation_id))
            try:
                await handle.signal(name)
            except RPCError as exc:
                raise InputFileError(f"cannot {name} {_rotation_id(rotation_id)}: {exc.message}") from None

        _run_async(run())
        out.print(f"{name}: sent to {_rotation_id(rotation_id)}")


_signal_command("pause", "Pause the re-wrap sweep after the batches in flight.")
_signal_command("resume", "Resume a paused rotation.")
_signal_command("abort", "Abort before retirement: every blob stays readable.")
_signal_command("approve", "Commit now instead of waiting for the grace period.")


@app.group("schedule")
def schedule_app() -> None:
    """Scheduled rotation (Temporal Schedules, overlap policy skip)."""


def _schedule_id(text: str) -> str:
    return text if text.startswith("schedule:rotate:") else f"schedule:rotate:{text}"


@schedule_app.command("create")
@click.argument("key_ref", metavar="KEYREF")
@click.option("--every", required=True, help="Interval, e.g. 30d or 90d.")
@click.option("--jitter", default="0", show_default=True, help="Random delay added to each run.")
@click.option("--grace", default="24h", show_default=True)
@click.option("--destroy-after", default=None)
def schedule_create(key_ref: str, every: str, jitter: str, grace: str, destroy_after: str | None) -> None:
    """Rotate KEYREF every DUR (a run is skipped while the previous one is still going)."""
    from datetime import timedelta

    from temporalio.client import (
        Schedule,
        ScheduleActionStartWorkflow,
        ScheduleAlreadyRunningError,
        ScheduleIntervalSpec,
        ScheduleOverlapPolicy,
        SchedulePolicy,
        ScheduleSpec,
    )

    from activities.types import TASK_QUEUE
    from kms_adapters.keyref import KeyRef
    from rekey.client import actor
    from workflows.rotation import RotateKeyInput, RotateKeyWorkflow, workflow_id

    KeyRef.parse(key_ref)
    every_s = _duration(every, "--every")
    if every_s <= 0:
        raise InputFileError("--every must be longer than 0s")
    request = RotateKeyInput(
        key_ref,
        grace_seconds=_duration(grace, "--grace"),
        destroy_after_seconds=None if destroy_after is None else _duration(destroy_after, "--destroy-after"),
        started_by=f"schedule by {actor()}",
    )
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            RotateKeyWorkflow.run, request, id=workflow_id(key_ref), task_queue=TASK_QUEUE
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=timedelta(seconds=every_s))],
            jitter=timedelta(seconds=_duration(jitter, "--jitter")),
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )

    async def run() -> None:
        client = await _client()
        try:
            await client.create_schedule(_schedule_id(key_ref), schedule)
        except ScheduleAlreadyRunningError:
            raise InputFileError(
                f"a schedule for {key_ref} exists already ({_schedule_id(key_ref)})"
            ) from None

    _run_async(run())
    out.print(f"created {_schedule_id(key_ref)}: rotate {key_ref} every {every}")


@schedule_app.command("list")
@json_option
def schedule_list(json_out: bool) -> None:
    """List rotation schedules."""

    async def run() -> list[dict[str, Any]]:
        client = await _client()
        rows = []
        async for entry in await client.list_schedules():
            if not entry.id.startswith("schedule:rotate:"):
                continue
            info = entry.info
            rows.append(
                {
                    "id": entry.id,
                    "paused": bool(info and info.paused),
                    "next_runs": [t.isoformat() for t in (info.next_action_times if info else [])][:3],
                    "recent": [
                        a.action.workflow_id
                        for a in (info.recent_actions if info else [])
                        if hasattr(a.action, "workflow_id")
                    ][-3:],
                }
            )
        return rows

    rows = _run_async(run())
    if json_out:
        _emit_json(rows)
        return
    table = _table("schedule", "paused", "next runs")
    for row in rows:
        table.add_row(row["id"], str(row["paused"]).lower(), ", ".join(t[:19] for t in row["next_runs"]))
    out.print(table if rows else "no rotation schedules")


def _schedule_action(name: str, help_text: str) -> None:
    @schedule_app.command(name, help=help_text)
    @click.argument("schedule_id", metavar="ID")
    def command(schedule_id: str) -> None:
        from temporalio.service import RPCError

        async def run() -> None:
            handle = (await _client()).get_schedule_handle(_schedule_id(schedule_id))
            try:
                await getattr(handle, name)()
            except RPCError as exc:
                raise InputFileError(f"cannot {name} {_schedule_id(schedule_id)}: {exc.message}") from None

        _run_async(run())
        out.print(f"{name}: {_schedule_id(schedule_id)}")


_schedule_action("pause", "Stop starting rotations from this schedule.")
_schedule_action("unpause", "Start rotations from this schedule again.")
_schedule_action("trigger", "Start a rotation now (even while paused).")
_schedule_action("delete", "Delete the schedule (running rotations go on).")


def _register_audit() -> None:
    from rekey.audit import make_audit_group

    app.add_command(make_audit_group(_settings))


_register_audit()


# --------------------------------------------------------------------------------- entry point


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"error: {message}", markup=False)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        # Without standalone mode click returns the code of a `click.exceptions.Exit`.
        code = app.main(args=argv, prog_name="rekey", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except _KNOWN_ERRORS as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), int(getattr(exc, "exit_code", 1)))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # the last line of defence: never a bare traceback
        if debug:
            traceback.print_exc()
        _fail(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)


def entry() -> None:
    """Console entry point: ``main``, then exit without interpreter finalisation once the
    Temporal SDK's native runtime is loaded. Its threads can abort the interpreter at exit after
    all work succeeded (sdk-python#300); the SDK's own test suite ends the same way."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            err.print(exc.code, markup=False)
    if any(name.startswith("temporalio.bridge") for name in sys.modules):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
