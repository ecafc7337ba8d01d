"""``rekey stress``: the HSM stress harness (`rekey.stress`)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.text import Text

from rekey.cli.output import CliError, emit_json, json_option, out, table


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
