"""The benchmark and quality records committed under artifacts/bench keep the schemas other checks read."""
import json
from pathlib import Path

import pytest

from qcompile.bench.harness import check_bench_document

BENCH = Path(__file__).resolve().parents[1] / "artifacts" / "bench"
KERNEL_RECORDS = sorted(p for p in BENCH.glob("*.json") if "records" in json.loads(p.read_text()))


@pytest.mark.parametrize("path", KERNEL_RECORDS, ids=lambda p: p.name)
def test_kernel_records_follow_the_bench_schema(path):
    doc = json.loads(path.read_text())
    check_bench_document(doc)
    assert doc["commit"] != "unknown" and doc["copy_bandwidth_GBps"] > 0
    assert Path(path.with_suffix(".png")).is_file()


def test_there_is_a_kernel_record():
    assert KERNEL_RECORDS


def test_quality_table_schema():
    doc = json.loads((BENCH / "quality.json").read_text())
    assert isinstance(doc["model"], str) and isinstance(doc["context"], int)
    assert doc["rows"][0]["format"] == "fp16"
    for row in doc["rows"]:
        assert set(row) >= {"format", "rht", "ldlq", "ppl", "bits_per_weight"}
        assert isinstance(row["rht"], bool) and isinstance(row["ldlq"], bool)
        assert row["ppl"] > 1 and 1 < row["bits_per_weight"] <= 16


def test_shipped_tuning_records_are_valid():
    """Every records file under schedules/ reads cleanly, and every best config tiles its shape."""
    from pathlib import Path

    import qcompile as qc
    from qcompile.tune import space
    from qcompile.tune.records import read_records_file

    root = Path(__file__).resolve().parents[1] / "schedules"
    files = sorted(root.glob("*/*.json"))
    assert files, "no shipped tuning records"
    for path in files:
        entries = read_records_file(path, path.parent.name, path.stem)
        assert entries, path
        for entry in entries.values():
            best = entry.best() if callable(entry.best) else entry.best
            assert best is not None, (path, entry.n, entry.k, entry.m)
            unit = qc.formats.get(path.stem).decode_unit
            assert space.tiling_error(best[0], entry.n, entry.k, unit) is None
