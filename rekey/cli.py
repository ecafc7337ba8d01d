"""The ``rekey`` command line: noun verb, every reporting command takes ``--json``.

Errors end in one line on stderr and a non-zero exit code (2 for bad input, 1 for a failed
operation, 4 for a generation downgrade); ``--debug`` adds the traceback.
"""

from __future__ import annotations

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

from kms_adapters.keyref import InvalidKeyRef
from rekey import devstack
from rekey.backends import BackendNotAvailable, transit_admin, wrapper_for
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
    ConfigError,
    ManifestError,
    InvalidKeyRef,
    BackendNotAvailable,
    SealingError,
    StoreError,
    devstack.DevStackError,
    InputFileError,
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


def _key_dict(key_ref: str, info: Any) -> dict[str, Any]:
    return {
        "key_ref": key_ref,
        "type": info.key_type,
        "primary_version": info.latest_version,
        "min_decryption_version": info.min_decryption_version,
        "versions": [{"version": v, "state": info.version_state(v)} for v in info.versions],
    }


def _print_key(data: dict[str, Any]) -> None:
    out.print(f"{data['key_ref']}  type {data['type']}  primary version {data['primary_version']}")
    table = _table("version", "state")
    for v in data["versions"]:
        primary = " (primary)" if v["version"] == data["primary_version"] else ""
        table.add_row(str(v["version"]), v["state"] + primary)
    out.print(table)


@key_app.command("create")
@click.argument("key_ref", metavar="KEYREF")
@json_option
def key_create(key_ref: str, json_out: bool) -> None:
    """Create a key (a no-op if it exists)."""
    admin, name = transit_admin(_settings(), key_ref)
    info, created = admin.create(name)
    data = _key_dict(key_ref, info) | {"created": created}
    if json_out:
        _emit_json(data)
        return
    out.print(f"{'created' if created else 'exists:'} {key_ref}")
    _print_key(data)


@key_app.command("show")
@click.argument("key_ref", metavar="KEYREF")
@json_option
def key_show(key_ref: str, json_out: bool) -> None:
    """Show a key's versions and which one is primary."""
    admin, name = transit_admin(_settings(), key_ref)
    data = _key_dict(key_ref, admin.describe(name))
    _emit_json(data) if json_out else _print_key(data)


# -------------------------------------------------------------------------------------- state


def _sealed_state(store: SealedStateStore) -> SealedState:
    settings = _settings()
    wrappers: dict[str, KeyWrapper] = {}

    def resolve(key_ref: str) -> KeyWrapper:
        if key_ref not in wrappers:
            wrappers[key_ref] = wrapper_for(settings, key_ref)
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


if __name__ == "__main__":
    main()
