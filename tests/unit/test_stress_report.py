"""``rekey stress report``: one self-contained HTML page over stress run directories, its tables
what the raw events say, several runs side by side, crashed runs recomputed, bad input refused."""

from __future__ import annotations

import base64
import json
import math
import re
import tomllib
from collections.abc import Callable
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rekey import stress as stress_package
from rekey.stress.report import load_runs, phase_spans, render_html
from rekey.stress.summary import summarize
from tests.fixtures.cli import run_cli
from tests.fixtures.stress_run import known_ops, meta_for, shifted, write_run

Run = Callable[..., tuple[int, str, str]]
ROOT = Path(__file__).resolve().parents[2]
SECTIONS = (
    "overview",
    "summary",
    "load",
    "latency",
    "throttling",
    "errors",
    "rotations",
    "incidents",
    "lag",
    "parameters",
)


@pytest.fixture
def rekey(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.setenv("REKEY_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return lambda *args: run_cli(capsys, *args)


class Page(HTMLParser):
    """The parts of the report a reader sees: sections, images, links, table rows per section."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.rows: dict[str, list[list[str]]] = {}
        self._section = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self._section = attributes.get("id") or ""
            self.sections.append(self._section)
        for name in ("src", "href", "action", "data", "poster"):
            if attributes.get(name) is not None:
                (self.images if tag == "img" else self.links).append(str(attributes[name]))
        if tag == "tr":
            self._row = []
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.rows.setdefault(self._section, []).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A governor run that finished and a naive one, three times slower, that crashed (no
    summary.json), rendered once for the tests that only read the page."""
    base = tmp_path_factory.mktemp("runs")
    fast = write_run(base / "governor", known_ops(duration=12), meta=meta_for(label="governor"))
    slow = write_run(
        base / "naive",
        shifted(known_ops(duration=12), factor=3.0),
        meta=meta_for(strategy="naive", label=""),
        summary=False,
    )
    html = render_html(load_runs([fast, slow]))
    return fast, slow, html


def test_the_page_has_every_section_and_embeds_its_plots_as_pngs(two_runs: tuple[Path, Path, str]) -> None:
    _, _, html = two_runs
    page = Page(html)
    assert [s for s in SECTIONS if s not in page.sections] == []
    assert len(page.images) == 6
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
    png = base64.b64decode(page.images[0].split(",", 1)[1], validate=True)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    # Self-contained: every link is to the page itself, nothing is loaded from anywhere.
    assert all(link.startswith("#") for link in page.links), page.links
    lowered = html.lower()
    for loader in ("<script", "<link", "<iframe", "@import", "url("):
        assert loader not in lowered
    # Every plot says what it shows.
    assert html.count("<figcaption>") == 6


def test_the_summary_table_is_what_the_raw_events_say(two_runs: tuple[Path, Path, str]) -> None:
    fast, slow, html = two_runs
    rows = Page(html).rows["summary"]
    header, body = rows[0], rows[1:]
    assert header[2:] == [
        "count",
        "rate (/s)",
        "throughput (/s)",
        "mean (ms)",
        "p95 (ms)",
        "p99 (ms)",
        "success ratio",
    ]
    # 4 rows (wrap, unwrap, rewrap, all) per run, the run named on its first.
    assert len(body) == 8
    assert body[0][0] == "governor" and body[4][0] == "naive/azure"
    for run_dir, run_rows in ((fast, body[:4]), (slow, body[4:])):
        # The events read straight from the Parquet files, without the report's code.
        table = pa.concat_tables(pq.read_table(p) for p in sorted((run_dir / "events").glob("*.parquet")))
        events = table.to_pylist()
        elapsed = max(e["end"] for e in events)
        for row in run_rows:
            name = row[1]
            mine = [e for e in events if name == "all" or e["op"] == name]
            latencies = [(e["end"] - e["intended"]) * 1000 for e in mine]
            ok = sum(1 for e in mine if e["outcome"] == "ok")
            expected = [
                f"{len(mine):,}",
                f"{len(mine) / elapsed:,.2f}",
                f"{ok / elapsed:,.2f}",
                f"{sum(latencies) / len(latencies):,.2f}",
                f"{nearest_rank(latencies, 95):,.2f}",
                f"{nearest_rank(latencies, 99):,.2f}",
                f"{100 * ok / len(mine):.2f}%",
            ]
            assert row[2:] == expected, (run_dir.name, name)


def test_two_runs_are_side_by_side_one_colour_each(two_runs: tuple[Path, Path, str]) -> None:
    _, _, html = two_runs
    page = Page(html)
    overview = page.rows["overview"]
    assert overview[0][1:] == ["governor", "naive/azure"]
    colours = re.findall(r'class="swatch" style="background: (#[0-9a-f]{6})"', html)
    assert len(set(colours)) == 2
    status = next(row for row in overview if row[0] == "status")
    assert status[1] == "completed"
    assert "no summary.json" in status[2]
    incidents = page.rows["incidents"]
    assert sum(1 for row in incidents if row and row[0] == "#") == 2  # one incident table per run
    assert any("rotation-failed" in cell for row in incidents for cell in row)


def test_a_crashed_run_is_recomputed_and_reported(rekey: Run, tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    recorded = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    # It lost a chunk and the line it was writing.
    chunk = sorted((run / "events").glob("*.parquet"))[-1]
    lost = pq.read_table(chunk).num_rows
    chunk.unlink()
    with (run / "seconds.jsonl").open("a") as f:
        f.write('{"t": 10, "off')

    code, out, err = rekey("stress", "report", str(run), "--json")
    assert (code, err) == (0, "")
    [summary] = json.loads(out)
    assert summary == summarize(run)
    assert summary["done"] == recorded["done"] - lost
    assert summary["interrupted"] is True and summary["thresholds"] == []
    assert not (tmp_path / "report.html").exists()  # --json alone writes no page

    code, out, err = rekey("stress", "report", str(run), "--out", str(tmp_path / "crashed.html"))
    assert (code, err) == (0, "")
    assert "crashed" in out and "report:" in out
    assert "no summary.json" in (tmp_path / "crashed.html").read_text()


def test_the_default_page_and_json_together(rekey: Run, tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    code, _, err = rekey("stress", "report", str(run))
    assert (code, err) == (0, "")
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
    code, out, err = rekey("stress", "report", str(run), "--json", "--out", "both.html")
    assert (code, err) == (0, "")
    assert json.loads(out)[0]["done"] == 200
    assert (tmp_path / "both.html").exists()


def test_a_summary_that_disagrees_with_the_events_is_pointed_out(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    recorded = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**recorded, "ok": recorded["ok"] + 7}))
    [loaded] = load_runs([run])
    assert loaded.summary["ok"] == recorded["ok"]
    assert loaded.mismatches == [f"summary.json has ok {recorded['ok'] + 7}, the raw files {recorded['ok']}"]


def test_labels_are_escaped_and_told_apart(tmp_path: Path) -> None:
    hostile = "<script>alert(1)</script>"
    ops = known_ops(duration=3)
    a = write_run(
        tmp_path / "a", ops, meta=meta_for(label=hostile), rotations=[], incidents=[], summary=False
    )
    b = write_run(tmp_path / "b", ops, meta=meta_for(label=hostile), summary=False)
    runs = load_runs([a, b])
    assert [r.label for r in runs] == [f"{hostile} (a)", f"{hostile} (b)"]
    assert runs[0].summary["label"] == hostile
    assert runs[0].colour != runs[1].colour
    html = render_html(runs[:1])
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; (a)" in html


def test_phase_spans_end_with_the_rotation_or_the_run() -> None:
    rows = [
        {"t": 1.0, "rotation_id": "r", "event": "start", "phase": "PREPARING"},
        {"t": 2.0, "rotation_id": "r", "event": "phase", "phase": "REWRAPPING"},
        {"t": 2.5, "rotation_id": "r", "event": "progress", "phase": "REWRAPPING"},
        {"t": 4.0, "rotation_id": "r", "event": "done", "phase": "DONE"},
        {"t": 6.0, "rotation_id": "s", "event": "start", "phase": "PREPARING"},
    ]
    spans = [(s.start, s.end, s.phase) for s in phase_spans(rows, 9.0)]
    assert spans == [(1.0, 2.0, "PREPARING"), (2.0, 4.0, "REWRAPPING"), (6.0, 9.0, "PREPARING")]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d.mkdir(), "not a stress run directory (no meta.json)"),
        (lambda d: None, "not a directory"),
        (lambda d: (write_run(d), (d / "meta.json").write_text("[1, 2")), "meta.json: not JSON"),
        (
            lambda d: (write_run(d), next((d / "events").glob("*.parquet")).write_bytes(b"nope")),
            "not a readable Parquet file",
        ),
        (lambda d: (write_run(d), (d / "summary.json").write_text("{")), "summary.json: not JSON"),
        (lambda d: (write_run(d), [p.unlink() for p in (d / "events").glob("*")]), "empty run"),
        (lambda d: (write_run(d), (d / "seconds.jsonl").unlink()), "seconds.jsonl: missing"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    rekey: Run, tmp_path: Path, make: Callable[[Path], object], message: str
) -> None:
    good = write_run(tmp_path / "good")
    make(tmp_path / "bad")
    code, out, err = rekey("stress", "report", str(good), str(tmp_path / "bad"), "--out", "x.html")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "x.html").exists()


def test_no_directory_is_a_usage_error(rekey: Run) -> None:
    code, _, err = rekey("stress", "report")
    assert code == 2 and err.startswith("error: Missing argument")


def test_the_template_ships_in_the_package() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["rekey.stress"]
    package = Path(stress_package.__file__).parent
    template = package / "templates" / "report.html.j2"
    assert template.is_file()
    assert any(fnmatch(template.relative_to(package).as_posix(), p) for p in patterns)


def test_a_label_with_dollar_signs_is_text_not_mathtext(tmp_path: Path) -> None:
    label = r"x $\undefinedmacro$ y"
    run = write_run(tmp_path / "a", known_ops(duration=3), meta=meta_for(label=label), summary=False)
    html = render_html(load_runs([run]))  # matplotlib's mathtext refused the unknown macro
    assert "undefinedmacro" in html
