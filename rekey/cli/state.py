"""``rekey state put | get | delete | list | accept``: sealed state in the store. ``accept`` is the
operator's recovery after a legitimate restore of the store (docs/sealed-blob-format.md,
"Recovery")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from audit import AuditLog
from kms_adapters.keyref import InvalidKeyRef, KeyRef
from rekey.agent_auth import DEFAULT_CALLER
from rekey.agent_sealer import AgentSealer
from rekey.backends import adapter_for, signer_for, witness_for
from rekey.cli.agent import _caller_name, client_for, url_option_check
from rekey.cli.context import STORE_SETTING, settings, store
from rekey.cli.files import read_input, write_output
from rekey.cli.output import CliError, emit_json, err, json_option, out, table
from rekey.client.release_policies import agent_release_token
from sealing.keywrap import KeyWrapper
from sealing.names import InvalidName, check_generation_id, check_name, check_namespace, is_valid_name
from sealing.state import SealedState, UnknownGeneration
from sealing.store import BlobRecord, BlobSummary, SealedStateStore, StoreMissing
from sealing.witness import DirectoryWitness


def _checked(check: Callable[[object], str]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback refusing a name outside `sealing.names` (exit 2, before any store opens)."""

    def callback(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except InvalidName as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def _cell(value: str) -> Text:
    """A stored name as one table cell: a row stored before names were checked may hold a
    newline or markup; it is shown escaped, so the table stays one line per item."""
    return Text(value if value.isprintable() else value.encode("unicode_escape").decode("ascii"))


_NAME = _checked(check_name)
_NAMESPACE = _checked(check_namespace)


def _key_ref(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--key``: a key ref (`kms_adapters.keyref`), refused (exit 2) before any store opens."""
    if value is None:
        return None
    try:
        return str(KeyRef.parse(value))
    except InvalidKeyRef as exc:
        raise click.BadParameter(str(exc)) from None


@click.group("state")
def cli() -> None:
    """Sealed state in the store."""


def _sealed_state(sealed_store: SealedStateStore, witness: DirectoryWitness | None = None) -> SealedState:
    current = settings()
    wrappers: dict[str, KeyWrapper] = {}

    def resolve(key_ref: str) -> KeyWrapper:
        if key_ref not in wrappers:
            wrappers[key_ref] = adapter_for(current, key_ref)
        return wrappers[key_ref]

    # Every put, get and delete goes through the freshness witness (sealing.state).
    return SealedState(
        sealed_store,
        resolve,
        witness if witness is not None else witness_for(current),
        require_checkpoint=current.blob_freshness == "strict",
    )


agent_option = click.option(
    "--agent",
    "agent_url",
    default=None,
    metavar="URL",
    callback=url_option_check,
    help="Seal or open through the enclave agent at https://127.0.0.1:PORT (hardware-sealed state;"
    " with get, KMS-wrapped state too, through the attested release gate).",
)
state_dir_option = click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="With --agent: the agent's state directory with its token (default: found from the agent's"
    " generation, or from the fleet registry).",
)
caller_option = click.option(
    "--caller",
    default=DEFAULT_CALLER,
    show_default=True,
    callback=_caller_name,
    help="With --agent: whose token to present.",
)


def _agent_sealer(
    sealed_store: SealedStateStore, url: str, generation: str | None, state_dir: Path | None, caller: str
) -> AgentSealer:
    client = client_for(
        url, generation=generation, state_dir=state_dir, caller=caller, sealed_store=sealed_store
    )
    # A KMS-wrapped item opens in the agent after an attested release (release tokens signed
    # with this installation's verifier key; the key's release policy decides).
    return AgentSealer.connect(client, agent_release_token(settings(), sealed_store))


@cli.command("put")
@click.option(
    "--key",
    default=None,
    metavar="KEYREF",
    callback=_key_ref,
    help="Key that wraps the DEK, e.g. vault:orders (or --agent).",
)
@click.option(
    "--generation",
    default=None,
    metavar="GEN",
    callback=_checked(check_generation_id),
    help="Registered generation id (with --agent: the agent's, which it defaults to).",
)
@click.option("--name", required=True, callback=_NAME, help="Name of the state item.")
@click.option(
    "--in",
    "in_file",
    required=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="File to seal ('-' for stdin).",
)
@click.option("--namespace", default="default", show_default=True, callback=_NAMESPACE)
@agent_option
@click.option(
    "--seal",
    "seal_policy",
    type=click.Choice(["mrenclave", "mrsigner"]),
    default=None,
    help="With --agent: bind the sealing key to the measurement or to signer + product [default: mrenclave].",
)
@state_dir_option
@caller_option
@json_option
def put(
    key: str | None,
    generation: str | None,
    name: str,
    in_file: Path,
    namespace: str,
    agent_url: str | None,
    seal_policy: str | None,
    state_dir: Path | None,
    caller: str,
    json_out: bool,
) -> None:
    """Seal a file under a key, or with --agent inside that enclave agent (hardware-sealed,
    bound to the agent's host and generation), and store it (replacing an existing item of that
    name). Inputs above the max_blob_bytes setting (default 64 MiB) are refused before they are
    read."""
    if (key is None) == (agent_url is None):
        raise click.UsageError("give either --key KEYREF or --agent URL")
    if agent_url is None:
        if generation is None:
            raise click.UsageError("--key needs --generation GEN")
        if seal_policy is not None or state_dir is not None or caller != DEFAULT_CALLER:
            raise click.UsageError("--seal, --state-dir and --caller go with --agent")
    # The plaintext is handed to put with no reference kept here (popped from the list), so it
    # is freed once sealed, before the store write (sealing.state.SealedState.put): a put then
    # peaks at about twice the input, not five times.
    pending = [read_input(in_file, max_bytes=settings().max_blob_bytes)]
    size = len(pending[0])
    try:
        # Not created here: the generation must be registered, and registering made the store.
        opened = store()
    except StoreMissing:
        raise UnknownGeneration(
            f"generation {(generation or 'of the agent')!r} is not registered (rekey generation register"
            f" MANIFEST); there is no store yet ({STORE_SETTING})"
        ) from None
    with opened as sealed_store:
        record: BlobRecord | BlobSummary
        if agent_url is not None:
            sealer = _agent_sealer(sealed_store, agent_url, generation, state_dir, caller)
            if generation is not None and generation != sealer.generation:
                raise CliError(
                    f"the agent at {agent_url} runs generation {sealer.generation}, not {generation}"
                )
            record = _sealed_state(sealed_store).put_sealed(
                namespace=namespace,
                name=name,
                data=pending.pop(),
                policy="mrsigner" if seal_policy == "mrsigner" else "mrenclave",
                sealer=sealer,
            )
        else:
            assert key is not None and generation is not None  # nosec B101 # checked above
            record = _sealed_state(sealed_store).put(
                namespace=namespace,
                name=name,
                data=pending.pop(),
                key_ref=key,
                generation=generation,
            )
    summary = {
        "namespace": record.namespace,
        "name": record.name,
        "blob_id": record.blob_id,
        "kind": record.kind,
        "host": record.host,
        "key_ref": record.key_ref,
        "key_version": record.key_version,
        "generation": record.generation,
        "size": size,
        "row_version": record.row_version,
    }
    if json_out:
        emit_json(summary)
    elif record.kind == "tee":
        out.print(
            f"sealed {namespace}/{name} ({size} bytes) in the agent of generation {record.generation}"
            f" on host {record.host} ({record.key_ref} v{record.key_version})",
            markup=False,
        )
    else:
        out.print(
            f"sealed {namespace}/{name} ({size} bytes) under {record.key_ref}"
            f" v{record.key_version} for generation {record.generation}"
        )


@cli.command("get")
@click.option("--name", required=True, callback=_NAME, help="Name of the state item.")
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Where to write ('-' for stdout); created with mode 0600.",
)
@click.option("--namespace", default="default", show_default=True, callback=_NAMESPACE)
@agent_option
@click.option(
    "--generation",
    default=None,
    metavar="GEN",
    callback=_checked(check_generation_id),
    help="With --agent: the agent's generation id (finds its token).",
)
@state_dir_option
@caller_option
def get(
    name: str,
    out_file: Path,
    namespace: str,
    agent_url: str | None,
    generation: str | None,
    state_dir: Path | None,
    caller: str,
) -> None:
    """Unseal a stored item into a file. A hardware-sealed item opens only through an agent
    (--agent) on the host it was sealed on; a KMS-wrapped one with the configured KMS
    credentials (without --agent), or through an agent (--agent) after an attested release:
    the agent attests, the key's release gate releases the DEK encrypted to the agent's key
    (refused unless the key's release policy admits the agent's generation)."""
    if agent_url is None and (generation is not None or state_dir is not None or caller != DEFAULT_CALLER):
        raise click.UsageError("--generation, --state-dir and --caller go with --agent")
    with store() as sealed_store:
        sealer = (
            None
            if agent_url is None
            else _agent_sealer(sealed_store, agent_url, generation, state_dir, caller)
        )
        data = _sealed_state(sealed_store).get(namespace=namespace, name=name, sealer=sealer)
    write_output(out_file, data)
    if str(out_file) != "-":
        err.print(f"wrote {len(data)} bytes to {out_file}")


@cli.command("delete")
@click.option("--name", required=True, callback=_NAME, help="Name of the state item.")
@click.option("--namespace", default="default", show_default=True, callback=_NAMESPACE)
def delete(name: str, namespace: str) -> None:
    """Delete a stored item (its freshness checkpoint then refuses a restored copy)."""
    with store() as sealed_store:
        _sealed_state(sealed_store).delete(namespace=namespace, name=name)
    err.print(f"deleted {namespace}/{name}")


@cli.command("list")
@click.option("--namespace", default=None, callback=_NAMESPACE, help="Only this namespace.")
@json_option
def list_(namespace: str | None, json_out: bool) -> None:
    """List stored items: name, kind (kms or tee), host (of a tee item), key ref, key version,
    generation, sealed size in bytes."""
    with store() as sealed_store:
        rows = sealed_store.summaries(namespace)
    items: list[dict[str, Any]] = [
        {
            "namespace": r.namespace,
            "name": r.name,
            "kind": r.kind,
            "host": r.host,
            "key_ref": r.key_ref,
            "key_version": r.key_version,
            "generation": r.generation,
            "sealed_size": r.size,
            "updated_at": r.updated_at.isoformat(),
        }
        for r in rows
    ]
    if json_out:
        emit_json(items)
        return
    listing = table(
        "namespace", "name", "kind", "host", "key ref", "version", "generation", "sealed size", "updated"
    )
    for i in items:
        listing.add_row(
            _cell(i["namespace"]),
            _cell(i["name"]),
            i["kind"],
            _cell(i["host"] or "-"),
            _cell(i["key_ref"]),
            str(i["key_version"]),
            i["generation"],
            str(i["sealed_size"]),
            i["updated_at"][:19],
        )
    out.print(listing if items else "no sealed state stored")


@cli.command("accept")
@click.option("--namespace", required=True, callback=_NAMESPACE, help="Namespace of the item(s).")
@click.option("--name", default=None, callback=_NAME, help="Name of the item to accept.")
@click.option("--all-in-namespace", is_flag=True, help="Accept every item stored in the namespace.")
@json_option
def accept(namespace: str, name: str | None, all_in_namespace: bool, json_out: bool) -> None:
    """After restoring the store from a backup (or a failover that lost commits): accept the
    stored value(s) as current. Each must authenticate; its freshness checkpoint is re-signed at
    its version (the lost newer values stay refused) and a state.accepted audit record is
    appended. Needs the signing key. Refused (exit 2, nothing changed) if an item is missing or
    does not authenticate."""
    if (name is None) == (not all_in_namespace):
        raise CliError("give either --name NAME or --all-in-namespace")
    current = settings()
    with store() as sealed_store:  # first: a missing store is refused before any key is made
        signer = signer_for(current)
        witness = witness_for(current, signer=signer)
        if name is not None:
            names = [name]
        else:
            stored = [s.name for s in sealed_store.summaries(namespace)]
            names = [n for n in stored if is_valid_name(n)]
            if len(names) < len(stored):
                # Rows stored before names were checked (sealing.names) are left as they are.
                err.print(
                    f"skipped {len(stored) - len(names)} item(s) in {namespace!r} whose names are not"
                    " valid names (stored before names were checked)",
                    markup=False,
                )
        results = _sealed_state(sealed_store, witness).accept(namespace=namespace, names=names)
    changed = [r for r in results if r.changed]
    if changed:
        with AuditLog(current.store_url, signer, witness=witness) as log:
            for r in changed:
                log.append(
                    "state.accepted",
                    f"{r.namespace}/{r.name}",
                    {
                        "namespace": r.namespace,
                        "name": r.name,
                        "blob_id": r.blob_id,
                        "old_version": r.previous,
                        "old_state": r.previous_state,
                        "new_version": r.version,
                    },
                )
    if json_out:
        emit_json([r.to_dict() for r in results])
        return
    for r in results:
        if not r.changed:
            out.print(f"{r.namespace}/{r.name}: already current (version {r.version})", markup=False)
        else:
            before = "none" if r.previous is None else f"version {r.previous}"
            out.print(
                f"accepted {r.namespace}/{r.name} at version {r.version}"
                f" (checkpoint was {before}, {r.previous_state})",
                markup=False,
            )
