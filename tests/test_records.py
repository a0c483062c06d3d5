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
    """Every records file under schedules/ reads cleanly, and every best config fits its shape."""
    from pathlib import Path

    import qcompile as qc
    from qcompile.kernels.mma import streamed_bits
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
            assert space.family_of(best[0]) == entry.kernel
            fmt = qc.formats.get(path.stem)
            # (pipeline stages hold the format's own bits per weight, as the loader checks them)
            bits = streamed_bits(fmt, entry.n, entry.k)
            assert space.fit_error(best[0], entry.n, entry.k, entry.m, fmt.decode_unit, fmt.fragment_native,
                                   bits) is None


def test_shipped_gemv_records_of_tensor_core_buckets_are_not_applied(tmp_path):
    """The shipped M=16 GEMV entries were measured before M=16 ran on tensor cores (now the mma.sync
    kernel). In the file's first layout (no "kernel" field, as shipped until the mma entries joined)
    they read as GEMV entries and stay in the file, but build never applies them to a bucket another
    family runs; the M=1 entries of the same shapes still apply."""
    from pathlib import Path

    from qcompile.kernels.library import GEMV_FAMILY, KernelSpec, kernel_family
    from qcompile.kernels.schedules import GemvConfig
    from qcompile.tune.records import TuningRecords, applies_today, read_records_file

    shipped = json.loads((Path(__file__).resolve().parents[1] / "schedules" / "h100" / "int4-g128.json").read_text())
    old = [{key: value for key, value in entry.items() if key != "kernel"}  # the first layout
           for entry in shipped["entries"] if entry.get("kernel", "gemv") == "gemv"]
    root = tmp_path / "schedules"
    path = root / "h100" / "int4-g128.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(dict(shipped, entries=old)))
    entries = read_records_file(path, "h100", "int4-g128")
    stale = [e for e in entries.values() if kernel_family(e.format, e.m) != GEMV_FAMILY]
    assert stale and all(e.m == 16 and e.kernel == "gemv" and e.best() is not None for e in stale)
    for entry in stale:
        spec = KernelSpec(entry.format, entry.n, entry.k, entry.m)
        records = TuningRecords(root, versions=(entry.qcompile_version, entry.tvm_version))
        assert records.config_for(spec, "h100") is None
        assert records.entry(spec, "h100") is None and records.entry(spec, "h100", "gemv") == entry
        m1 = KernelSpec(entry.format, entry.n, entry.k, 1)
        m1_entry = entries.get((entry.n, entry.k, 1, entry.qcompile_version, entry.tvm_version, "gemv"))
        if m1_entry is not None and applies_today(m1_entry, m1):
            assert isinstance(records.config_for(m1, "h100"), GemvConfig)


def test_records_tuned_against_another_default_are_not_applied(tmp_path):
    """A record whose default is not today's default config, and which never measured today's
    default, is stale (its best only beat a config the library no longer uses); once today's
    default is among its measurements, its best applies again."""
    import dataclasses

    from qcompile.kernels.library import KernelSpec
    from qcompile.tune.records import TuningEntry, TuningRecords
    from qcompile.tune.space import candidates, config_key, default_config

    spec = KernelSpec("e8p-2", 1024, 2048, 1)
    today = default_config(spec)
    others = [c for c in candidates(spec) if c != today]
    old_default, best = others[0], others[1]
    records = TuningRecords(tmp_path)
    entry = TuningEntry(format=spec.format, n=spec.n, k=spec.k, m=spec.m, gpu="h100",
                        qcompile_version=records.versions[0], tvm_version=records.versions[1], default=old_default,
                        measured_us={config_key(old_default): 10.0, config_key(best): 8.0})
    records.save(entry)
    assert TuningRecords(tmp_path).config_for(spec, "h100") is None
    records.save(dataclasses.replace(entry, measured_us={**entry.measured_us, config_key(today): 9.0}))
    assert TuningRecords(tmp_path).config_for(spec, "h100") == best
    records.save(dataclasses.replace(entry, default=today, measured_us={config_key(today): 9.0, config_key(best): 8.0}))
    assert TuningRecords(tmp_path).config_for(spec, "h100") == best


def test_shipped_mma_records_hold_todays_default():
    """Every shipped mma.sync entry was tuned against today's default config of its bucket or measured
    it, so build applies it (``applies_today``). A change of ``default_mma_config`` that moves a
    shipped shape's default to a config its entry never measured silently turns that record off (as
    the first narrow-N rule did to int4's 8192x28672 M=4): re-tune the entry, or keep the default."""
    from pathlib import Path

    from qcompile.tune.records import applies_today, read_records_file

    root = Path(__file__).resolve().parents[1] / "schedules"
    stale = []
    for path in sorted(root.glob("*/*.json")):
        for entry in read_records_file(path, path.parent.name, path.stem).values():
            if entry.kernel == "mma" and not applies_today(entry, entry.spec):
                stale.append(f"{path.parent.name}/{path.stem} N={entry.n} K={entry.k} M={entry.m}")
    assert not stale, "shipped mma records no longer applied: " + ", ".join(stale)


def test_shipped_records_are_of_todays_kernels():
    """Every shipped entry that carries a kernel-code fingerprint was measured on the kernels the
    library generates today. A change to a kernel (a decode trick, a register layout) turns its
    records off until they are tuned again: re-tune them on the GPU, as the change's own timings
    should have been anyway."""
    from pathlib import Path

    from qcompile.tune.records import read_records_file

    root = Path(__file__).resolve().parents[1] / "schedules"
    stale = [f"{path.parent.name}/{path.stem} {entry.kernel} N={entry.n} K={entry.k} M={entry.m}"
             for path in sorted(root.glob("*/*.json"))
             for entry in read_records_file(path, path.parent.name, path.stem).values() if entry.stale_code()]
    assert not stale, "shipped records measured on since-changed kernels: " + ", ".join(stale)


def test_records_of_changed_kernels_are_not_applied(tmp_path, monkeypatch):
    """An entry is stamped with the fingerprint of its default config's kernel when tuning saves it.
    Build applies it only while the library generates that kernel (a changed one: not applied, one
    warning a file); an entry without a fingerprint applies as before. The tuner measures an entry
    of changed or unrecorded kernels anew instead of resuming it, and replaces it on save."""
    import qcompile.formats.trellis as trellis
    from qcompile.kernels.library import KernelSpec
    from qcompile.tune.records import RecordsError, TuningEntry, TuningRecords, kernel_code
    from qcompile.tune.space import candidates, config_key, default_config

    spec = KernelSpec("qtip-hyb-2", 1024, 2048, 1)
    today = default_config(spec, "mma")
    best = next(c for c in candidates(spec, "mma") if c != today)
    records = TuningRecords(tmp_path)
    entry = TuningEntry(format=spec.format, n=spec.n, k=spec.k, m=spec.m, gpu="h100",
                        qcompile_version=records.versions[0], tvm_version=records.versions[1], default=today,
                        measured_us={config_key(today): 10.0, config_key(best): 8.0})
    path = records.save(entry)
    stored = json.loads(path.read_text())
    code = stored["entries"][0]["code"]
    assert code == kernel_code(spec, "h100", [today])
    warned = []
    assert TuningRecords(tmp_path, warn=warned.append).config_for(spec, "h100") == best and not warned
    assert records.open_entry(spec, "h100", today).tried_count == 2  # today's kernels: resumed

    # the same config, another kernel: a decode switch of the HYB-2 fragment kernel flips the fingerprint
    monkeypatch.setattr(trellis, "LANE_COPY_BY_MIN", ())
    changed = TuningRecords(tmp_path, warn=warned.append)
    assert kernel_code(spec, "h100", [today]) != code
    assert changed.config_for(spec, "h100") is None and changed.config_for(spec, "h100") is None
    assert len(warned) == 1 and "since changed" in warned[0] and "qcompile tune" in warned[0]
    fresh = changed.open_entry(spec, "h100", today)
    assert fresh.tried_count == 0
    fresh.add_measurement(today, 12.0)
    changed.save(fresh)  # replaces the stale entry: its times of other kernels are not merged in
    assert changed.entry(spec, "h100").measured_us == {config_key(today): 12.0}
    assert changed.config_for(spec, "h100") == today
    monkeypatch.undo()

    # no fingerprint (tuned before they existed): applied as before, measured anew by the tuner
    stored["entries"][0].pop("code")
    path.write_text(json.dumps(stored))
    legacy = TuningRecords(tmp_path, warn=warned.append)
    assert legacy.config_for(spec, "h100") == best and len(warned) == 1
    assert legacy.open_entry(spec, "h100", today).tried_count == 0

    stored["entries"][0]["code"] = "not-a-hash"
    path.write_text(json.dumps(stored))
    with pytest.raises(RecordsError, match="code must be 16 lower-case hex digits"):
        TuningRecords(tmp_path).entry(spec, "h100")
