"""``rekey stress``: the HSM stress harness (`rekey.stress`)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from rekey.cli.context import settings
from rekey.cli.output import CliError, emit_json, err, fail, json_option, out, table
from rekey.stress.run import RunObserver


@click.group("stress")
def cli() -> None:
    """Stress a KMS backend with crypto and rotation load, and report on the runs."""


@cli.command("report")
@click.argument("run_dirs", nargs=-1, required=True, metavar="DIR...", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The HTML file to write [default: report.html; with --json, none unless given].",
)
@json_option
def report(run_dirs: tuple[Path, ...], out_path: Path | None, json_out: bool) -> None:
    """Write one self-contained HTML report over the run directories DIR... (several runs side
    by side, one colour each), with every figure recomputed from the runs' raw files (a run
    without summary.json, one that crashed, is reported too).

    With --json, print the runs' recomputed summaries instead (a JSON list in the order of
    DIR..., each in summary.json's shape), and write the HTML only if --out is given too.

    A directory that is not a readable run (no meta.json, a missing or corrupt file, no
    operation recorded) is an error (exit 2).
    """
    from rekey.stress.report import load_runs, write_report
    from rekey.stress.summary import RunDirError

    target = out_path if out_path is not None or json_out else Path("report.html")
    try:
        runs = load_runs(list(run_dirs))
        if target is not None:
            write_report(runs, target)
    except RunDirError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write {target}: {exc.strerror or type(exc).__name__}") from None
    if json_out:
        emit_json([run.summary for run in runs])
        return
    rows = table("run", "offered/s", "goodput/s", "success", "p99 ms", "throttled", "incidents", "status")
    for run in runs:
        s = run.summary
        status = "crashed" if run.recorded is None else "interrupted" if s["interrupted"] else "completed"
        rows.add_row(
            Text(run.label),
            f"{s['offered_rate']:.1f}",
            f"{s['goodput']:.1f}",
            f"{100 * (s['success_ratio'] or 0):.2f}%",
            f"{s['latency_ms']['p99']:.2f}",
            f"{100 * s['throttled_share']:.2f}%",
            str(s["incidents"]),
            status,
        )
    out.print(rows)
    out.print(f"report: {target}", markup=False)


# ----------------------------------------------------------------------------------- run


def _duration(text: str | None, option: str) -> float | None:
    from rekey.client import InvalidDuration, parse_duration

    if text is None:
        return None
    try:
        return parse_duration(text, option)
    except InvalidDuration as exc:
        raise CliError(str(exc)) from None


class LiveDisplay(RunObserver):
    """The run's live view: a rich Live panel on a terminal, else one plain line every 10 s
    (on stderr with --json, so that stdout holds the summary only). Fed from the run's threads."""

    PLAIN_EVERY = 10

    def __init__(self, *, json_out: bool) -> None:
        from rich.console import Console

        self.console = err if json_out else out
        self.live_mode = self.console.is_terminal and not json_out
        self.plain = Console(stderr=True, highlight=False, soft_wrap=True) if json_out else out
        self._lock = threading.Lock()
        self.meta: dict[str, Any] = {}
        self.last: dict[str, Any] = {}
        self.totals = {
            "offered": 0,
            "done": 0,
            "ok": 0,
            "throttled": 0,
            "throttled_attempts": 0,
            "errors": 0,
            "dropped": 0,
        }
        self.rotation_text = ""
        self.incidents: list[str] = []
        self.live: Any = None

    # RunObserver
    def note(self, text: str) -> None:
        self.plain.print(Text(text))

    def started(self, meta: Any) -> None:
        self.meta = dict(meta)
        if self.live_mode:
            from rich.live import Live

            self.live = Live(self._panel(), console=self.console, refresh_per_second=2, transient=False)
            self.live.start()
        else:
            self.plain.print(
                Text(f"load started: {meta['rate']:g} ops/s for {meta['duration']:g}s on {meta['key_ref']}")
            )

    def second(self, row: Any) -> None:
        with self._lock:
            self.last = dict(row)
            outcomes = row.get("outcomes") or {}
            self.totals["offered"] += int(row.get("offered") or 0)
            self.totals["done"] += int(row.get("done") or 0)
            self.totals["ok"] += int(row.get("ok") or 0)
            self.totals["throttled"] += int(outcomes.get("throttled", 0))
            self.totals["throttled_attempts"] += int(row.get("throttled_attempts") or 0)
            self.totals["dropped"] += int(outcomes.get("dropped", 0))
            self.totals["errors"] += int(row.get("done") or 0) - int(row.get("ok") or 0)
        if self.live is not None:
            self.live.update(self._panel())
        elif int(row.get("t", 0)) % self.PLAIN_EVERY == self.PLAIN_EVERY - 1:
            self.plain.print(Text(self._line()))

    def rotation(self, event: Any) -> None:
        with self._lock:
            self.rotation_text = (
                f"{event['rotation_id']} {event['event']} {event['phase']}"
                f" {event['rewrapped']}/{event['total']}"
            )
        if self.live is None and event["event"] in ("start", "done", "failed", "late", "unfinished"):
            self.plain.print(Text(f"rotation {self.rotation_text} {event.get('message') or ''}".rstrip()))

    def incident(self, incident: Any) -> None:
        with self._lock:
            self.incidents.append(f"t={incident['t']:.0f}s {incident['kind']}: {incident['message']}")
        if self.live is None:
            self.plain.print(Text(f"incident: {self.incidents[-1]}"))
        else:
            self.live.update(self._panel())

    def stop(self) -> None:
        if self.live is not None:
            self.live.update(self._panel())
            self.live.stop()
            self.live = None

    def _line(self) -> str:
        row = self.last
        versions = ",".join(f"v{v}" for v in sorted(row.get("versions") or {}, key=lambda v: int(v)))
        return (
            f"t={row.get('t', 0):>4}s offered {row.get('offered', 0)}/s done {row.get('done', 0)}/s"
            f" ok {row.get('ok', 0)}/s p50 {row.get('p50_ms', 0):.1f}ms p99 {row.get('p99_ms', 0):.1f}ms"
            f" throttled {self.totals['throttled_attempts']} attempts ({self.totals['throttled']} gave up)"
            f" errors {self.totals['errors']}"
            f" dropped {self.totals['dropped']} versions {versions or '-'}"
            f" rotation {self.rotation_text or '-'} incidents {len(self.incidents)}"
        )

    def _panel(self) -> Any:
        from rich.panel import Panel
        from rich.table import Table

        with self._lock:
            row = self.last
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold")
            grid.add_column()
            grid.add_row("second", Text(f"{row.get('t', 0)} of {self.meta.get('duration', 0):g}"))
            grid.add_row(
                "rate",
                Text(
                    f"offered {row.get('offered', 0)}/s  achieved {row.get('done', 0)}/s"
                    f"  ok {row.get('ok', 0)}/s"
                ),
            )
            grid.add_row(
                "latency", Text(f"p50 {row.get('p50_ms', 0):.1f} ms  p99 {row.get('p99_ms', 0):.1f} ms")
            )
            grid.add_row(
                "so far",
                Text(
                    f"done {self.totals['done']}  throttled attempts {self.totals['throttled_attempts']}"
                    f" (gave up {self.totals['throttled']})"
                    f"  errors {self.totals['errors']}  dropped {self.totals['dropped']}"
                ),
            )
            grid.add_row(
                "versions",
                Text(", ".join(f"v{k}: {n}" for k, n in sorted((row.get("versions") or {}).items()))),
            )
            grid.add_row("rotation", Text(self.rotation_text or "-"))
            grid.add_row("incidents", Text(str(len(self.incidents))))
            for line in self.incidents[-3:]:
                grid.add_row("", Text(line))
            title = Text(f"rekey stress run {self.meta.get('label') or self.meta.get('run_id', '')}")
        return Panel(grid, title=title)


@cli.command("run")
@click.option(
    "--backend", type=click.Choice(["vault", "aws", "azure"]), default=None, help="Implied by --profile."
)
@click.option(
    "--key",
    "key",
    default=None,
    metavar="NAME",
    help="Key name on the backend [default: a fresh stress-<random> key].",
)
@click.option(
    "--rate",
    type=float,
    required=True,
    metavar="OPS_PER_S",
    help="Operations offered per second (after the ramp).",
)
@click.option("--duration", required=True, metavar="DUR", help="Length of the load: 90s, 10m, 1h.")
@click.option(
    "--ramp", default=None, metavar="DUR", help="Linear ramp from 0 to --rate over this long [default: none]."
)
@click.option(
    "--rotate-every", default=None, metavar="DUR", help="Rotate the key through RotateKeyWorkflow this often."
)
@click.option(
    "--rotation-grace",
    default=None,
    metavar="DUR",
    help="Each rotation disables the old version this long after verifying"
    " [default: half of --rotate-every].",
)
@click.option(
    "--blobs",
    type=int,
    default=None,
    metavar="N",
    help="Sealed blobs stored under the key for the rotations [default: 100].",
)
@click.option(
    "--mix", "mix_text", default="wrap=60,unwrap=30,rewrap=10", show_default=True, help="Operation weights."
)
@click.option(
    "--strategy",
    type=click.Choice(["governor", "sdk-default", "naive"]),
    default="governor",
    show_default=True,
    help="How the load retries (the rotation worker always uses the governor).",
)
@click.option("--processes", type=int, default=1, show_default=True, help="Load processes.")
@click.option(
    "--concurrency", type=int, default=64, show_default=True, help="Operations in flight per process."
)
@click.option(
    "--fail-on",
    "fail_on",
    default="",
    metavar="EXPR",
    help="Thresholds, e.g. 'p99<500ms,errors<0.1%,incidents=0': exit 3 if any is crossed.",
)
@click.option(
    "--profile",
    default=None,
    metavar="NAME",
    help="Run against a local throttled stack (rekey stress profiles).",
)
@click.option(
    "--throttle-rate", type=float, default=None, metavar="R", help="The profile's limit R (requests/s)."
)
@click.option("--label", default="", metavar="TEXT", help="What reports call this run.")
@click.option(
    "--force", is_flag=True, help="Write into a non-empty --out (its previous run files are removed)."
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="The run directory.",
)
@json_option
def run(
    backend: str | None,
    key: str | None,
    rate: float,
    duration: str,
    ramp: str | None,
    rotate_every: str | None,
    rotation_grace: str | None,
    blobs: int | None,
    mix_text: str,
    strategy: str,
    processes: int,
    concurrency: int,
    fail_on: str,
    profile: str | None,
    throttle_rate: float | None,
    label: str,
    force: bool,
    out_dir: Path,
    json_out: bool,
) -> None:
    """Offer open-loop load to a KMS key (operations at their intended times; latency from the
    intended start), optionally rotating the key through the rotation workflow meanwhile, and
    record it all in DIR (reportable with `rekey stress report DIR`).

    Exit codes: 0 ok, 2 bad input (nothing written), 3 a --fail-on threshold crossed,
    130 interrupted (the first Ctrl-C stops the load; the run directory is still reportable)."""
    from rekey.stress.generator import GeneratorError
    from rekey.stress.run import (
        Interrupted,
        RunOptions,
        StressRunError,
        StressSetupFailed,
        check_options,
        parse_mix,
        run_stress,
    )

    try:
        options = RunOptions(
            rate=rate,
            duration=_duration(duration, "--duration") or 0.0,
            ramp=_duration(ramp, "--ramp") or 0.0,
            rotate_every=_duration(rotate_every, "--rotate-every"),
            rotation_grace=_duration(rotation_grace, "--rotation-grace"),
            out=out_dir,
            backend=backend,
            key=key,
            blobs=blobs,
            mix=parse_mix(mix_text),
            strategy=strategy,
            processes=processes,
            concurrency=concurrency,
            fail_on=fail_on,
            profile=profile,
            throttle_rate=throttle_rate,
            label=label,
            force=force,
        )
        check_options(options)
    except StressRunError as exc:
        raise CliError(str(exc)) from None
    configured = None if profile is not None else settings()
    display = LiveDisplay(json_out=json_out)
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        display.plain.print("stopping: finishing the operations in flight (Ctrl-C again to abort)")

    signal.signal(signal.SIGINT, on_sigint)
    try:
        outcome = run_stress(options, settings=configured, observer=display, stop=stop)
    except (StressRunError, StressSetupFailed, Interrupted, GeneratorError) as exc:
        display.stop()
        fail(str(exc), exc.exit_code)
    finally:
        display.stop()
        signal.signal(signal.SIGINT, previous)
    s = outcome.summary
    if json_out:
        emit_json(s)
    else:
        status = "interrupted" if outcome.interrupted else "completed"
        out.print(
            Text(
                f"{status}: {s['done']} ops in {s['elapsed']:.1f}s, goodput {s['goodput']:.1f}/s,"
                f" success {100 * (s['success_ratio'] or 0):.2f}%, p99 {s['latency_ms']['p99'] or 0:.2f} ms,"
                f" incidents {s['incidents']}"
            )
        )
        if outcome.rotations:
            out.print(Text("rotations: " + ", ".join(f"{k} {v}" for k, v in outcome.rotations.items())))
        for result in s.get("thresholds") or []:
            out.print(
                Text(
                    f"threshold {result['expr']}: {'ok' if result['ok'] else 'CROSSED'}"
                    f" (measured {result['value']})"
                )
            )
        out.print(Text(f"run: {outcome.run_dir}  (rekey stress report {outcome.run_dir})"))
    if outcome.exit_code:
        sys.exit(outcome.exit_code)


@cli.command("profiles")
@json_option
def profiles(json_out: bool) -> None:
    """The local throttled stacks `rekey stress run --profile` can start."""
    from emulators.profiles import PROFILES, describe_profile

    described = [describe_profile(name) for name in PROFILES]
    if json_out:
        emit_json(described)
        return
    rows = table("profile", "backend", "default R/s", "description")
    for d in described:
        rows.add_row(Text(d["profile"]), d["backend"], f"{d['default_rate']:g}", Text(d["description"]))
    out.print(rows)
