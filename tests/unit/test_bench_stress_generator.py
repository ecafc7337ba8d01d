"""The stress generator's benchmark runs end to end at a small size (it is not part of `make
test` otherwise, and a broken benchmark would go unnoticed until someone needs its figures).

Its timings are not judged here; what is checked is that both measurements ran the whole
schedule and that the report carries every figure the README quotes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import bench_stress_generator


def test_the_benchmark_measures_the_generator_and_its_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    code = bench_stress_generator.main(["--rate", "200", "--duration", "2", "--json", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    generator, baseline = report["generator"], report["baseline_bare_loop"]
    assert generator["processes"] == 2 and generator["processes_alive"] == 2
    assert generator["ops"] == baseline["ops"] == 400
    assert generator["offered_per_s"] == baseline["offered_per_s"] == 200
    assert generator["dropped"] == 0 and generator["parquet_files"] == 2
    for figures in (generator, baseline):
        assert 0 <= figures["lag_p50_ms"] <= figures["lag_p99_ms"] <= figures["lag_max_ms"]
        assert figures["cpu_us_per_op"] > 0
    assert report["ratios"]["offered_vs_baseline"] == 1.0
    assert len(report["load_average_before"]) == 3 and report["cores"] >= 1
    assert set(report["goal"]) == {"rate", "lag_p99_ms", "met"}


def test_the_text_report_names_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_stress_generator.main(["--rate", "100", "--duration", "1", "--processes", "1"]) == 0
    text = capsys.readouterr().out
    for words in ("offered", "achieved", "lag", "p99", "baseline", "ratio", "load average", "goal"):
        assert words in text
