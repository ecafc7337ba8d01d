"""The rotation benchmark runs end to end at a small size (it is not part of `make test`
otherwise, and a broken benchmark would go unnoticed until someone needs its numbers).

Its figures are not judged here (tests do not time things); only that every part of the
report is there and consistent with what was rotated."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import bench_rotation
from sealing import envelope
from sealing.keywrap import WrappedKey
from sealing.store import NewBlob, SealedStateStore


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """The benchmark sets the collector up as the worker does; give the test process its own back."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.integration
@pytest.mark.usefixtures("gc_restored")
def test_the_benchmark_reports_every_size_and_stage(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    bench_rotation.main(["--blobs", "300,900", "--batch-size", "400", "--json", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["blobs"] for r in report["results"]] == [300, 900]
    assert report["cores"] >= 1 and report["memory_ratio_largest_to_smallest"] > 0
    for r in report["results"]:
        assert r["sweep_per_s"] > 0 and r["raw_rewraps_per_s"] > 0
        assert r["sweep_ratio"] == pytest.approx(r["sweep_per_s"] / r["raw_rewraps_per_s"], rel=0.01)
        assert set(r["stages"]) >= {"kms_per_s", "kms_ratio", "store_per_s", "store_ratio", "store_cpu_us"}
        assert r["stages"]["kms_per_s"] > 0 and r["stages"]["store_per_s"] > 0
        assert r["cpu_us_per_blob"]["rotation_worker"] > 0
        assert r["cpu_ceiling_per_s"] > 0


class _Fixed:
    """Wraps every DEK to the same given ciphertext (the store stage reads only the slot)."""

    key_ref = "vault:k"

    def __init__(self, wrapped: bytes) -> None:
        self.wrapped = wrapped

    def wrap(self, dek: bytes) -> WrappedKey:
        return WrappedKey(self.wrapped, 3)


def test_the_store_stage_swaps_every_blob_with_a_local_stand_in(tmp_path: Path) -> None:
    blobs = [
        NewBlob(
            "ns",
            f"n{i}",
            "vault:k",
            3,
            "g",
            bytes(
                envelope.seal(
                    b"body", _Fixed(b"vault:v3:%06d" % i), namespace="ns", name=f"n{i}", generation="g"
                )
            ),
        )  # type: ignore[arg-type]
        for i in range(250)
    ]
    with SealedStateStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        ids = store.insert_many(blobs)
        measured = bench_rotation.store_stage(store, "vault:k", 3, 250, batch=100)
        assert measured["seconds"] > 0
        assert store.count_by_key_version("vault:k") == {4: 250}
        assert envelope.key_slot(store.get(ids[7]).blob).wrapped_dek == b"vault:v4:000007"
