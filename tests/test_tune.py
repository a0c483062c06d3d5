"""Tuning (CPU side): the GEMV and tensor-core search spaces, the record database, the resumable driver
with a fake measure function, records reaching `build`, and `qcompile tune` without a GPU."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qcompile import formats as qc_formats
from qcompile.cli import main as cli_main
from qcompile.errors import QCompileError
from qcompile.kernels import library
from qcompile.kernels.library import TC_MIN_M, KernelSpec, default_gemv_config
from qcompile.kernels.mma import MmaConfig, check_mma_config, default_mma_config, streamed_bits
from qcompile.kernels.schedules import GemvConfig
from qcompile.kernels.tensorcore import TensorCoreConfig, check_tc_config, default_tc_config
from qcompile.kernels.target import parse_target
from qcompile.tune import driver, space
from qcompile.tune.driver import CandidateError, tune
from qcompile.tune.records import (SCHEMA, RecordsError, named_candidates, positional_key, records_json, TuningEntry, TuningRecords, TuningRecordsWarning,
                                   current_versions, records_gpu)

FORMAT = "int4-g128"
N, K = 256, 1024  # small: 8 groups of 128 along K, 128 decode units
SM90 = parse_target("sm_90")
GPU = "h100"
REPO = Path(__file__).resolve().parents[1]


def fake_us(cfg: GemvConfig) -> float:
    """A deterministic 'time' with one best config: rows=2, threads_k=32, chunks=1, unroll=1, row_tile=2."""
    return (10.0 + abs(cfg.rows - 2) + abs(cfg.threads_k - 32) / 16 + (cfg.chunks - 1) * 0.2
            + (cfg.unroll - 1) * 0.05 + abs(cfg.row_tile - 2) * 0.3)


def fake_any_us(cfg) -> float:
    """fake_us, fake_tc_us or fake_mma_us by the config's family."""
    if isinstance(cfg, TensorCoreConfig):
        return fake_tc_us(cfg)
    return fake_mma_us(cfg) if isinstance(cfg, MmaConfig) else fake_us(cfg)


class CountingMeasure:
    def __init__(self, fn=fake_any_us):
        self.fn, self.calls = fn, []

    def __call__(self, spec, cfg, kernel):
        assert callable(kernel)  # the compiled TVM function
        self.calls.append((spec, space.config_key(cfg)))
        return self.fn(cfg)


def thread_extents(func) -> dict:
    """{thread tag: extent} of a scheduled PrimFunc (blockIdx.x, threadIdx.x, threadIdx.y) in its first
    kernel (a grid split-K's second kernel, which sums the blocks' partials, binds its own)."""
    pairs = re.findall(r'T\.thread_binding\((\d+), thread="([\w.]+)"\)', func.script())
    extents = {}
    for extent, tag in pairs:
        extents.setdefault(tag, int(extent))
    return extents


# --- the space -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1])
def test_space_is_valid_deterministic_and_starts_with_the_default(m):
    spec = KernelSpec(FORMAT, N, K, m)
    cands = space.candidates(spec)
    assert cands == space.candidates(spec)
    assert cands[0] == default_gemv_config(N, K, m) == space.default_config(spec)
    keys = [space.config_key(c) for c in cands]
    assert len(set(keys)) == len(keys) > 100
    for cfg in cands[1:]:
        assert space.tiling_error(cfg, N, K, 8) is None
        assert space.MIN_THREADS <= cfg.rows * cfg.threads_k <= space.MAX_THREADS
        assert cfg.threads_k * cfg.chunks * 8 <= K
    assert all(space.config_from_key(key) == cfg for key, cfg in zip(keys, cands))
    assert keys[0] == ",".join(f"{k}={v}" for k, v in cands[0].as_dict().items())


def test_config_keys_and_dicts_reject_nonsense():
    assert space.config_key(GemvConfig(4, 64, 2, 2, 1)) == "rows=4,threads_k=64,chunks=2,unroll=2,row_tile=1,lut_shared=1,lut_lanes=0"
    assert space.config_from_dict({"rows": 8}) == GemvConfig(rows=8)  # missing knobs: their defaults
    for bad in ({"rows": 0}, {"rows": 2.0}, {"rows": True}, {"warps": 4}, [1, 2]):
        with pytest.raises(ValueError):
            space.config_from_dict(bad)
    for bad in ("rows=4,threads_k", "", "rows=x"):
        with pytest.raises(ValueError):
            space.config_from_key(bad)


def test_space_refuses_gemm_and_bad_shapes():
    with pytest.raises(QCompileError, match="GEMM"):
        space.candidates(KernelSpec(FORMAT, N, K, 128))
    with pytest.raises(QCompileError, match="group"):
        space.candidates(KernelSpec(FORMAT, N, 100, 1))


def _compiles_as_configured(spec, cfg):
    func = library.scheduled_func(spec, SM90, cfg)
    assert thread_extents(func) == {"blockIdx.x": spec.n // (cfg.rows * cfg.row_tile),
                                    "threadIdx.y": cfg.rows, "threadIdx.x": cfg.threads_k}
    source = library.cuda_source(library.build([spec], SM90, lambda s: cfg))
    assert f"__launch_bounds__({cfg.rows * cfg.threads_k})" in source


@pytest.mark.parametrize("m", [1])
def test_sampled_space_compiles_for_sm90(m):
    spec = KernelSpec(FORMAT, N, K, m)
    cands = space.candidates(spec)
    for cfg in cands[:3] + cands[3::40]:  # the default, its nearest neighbours, a spread of the rest
        _compiles_as_configured(spec, cfg)


@pytest.mark.parametrize("m", [1])
def test_space_of_a_ragged_k_keeps_many_threads_along_k(m):
    """E8P at K = 11008 (344 units = 8 * 43, Llama-2-7B down_proj): exact splits stop at 8 threads
    along K; the space also holds splits with a ragged last step (the schedule masks the units past
    K) that leave at most MAX_RAGGED_IDLE of the step slots idle, the default among them."""
    n, k, unit = 4096, 11008, 32
    spec = KernelSpec("e8p-2", n, k, m)
    cands = space.candidates(spec)
    assert all(space.tiling_error(cfg, n, k, unit) is None for cfg in cands)  # the default too
    ragged = [cfg for cfg in cands if (k // unit) % (cfg.threads_k * cfg.chunks)]
    assert cands[0] in ragged and cands[0].threads_k >= 32
    assert {cfg.threads_k for cfg in ragged} >= {16, 32, 64}
    assert "idle" in space.tiling_error(GemvConfig(threads_k=64, chunks=4), n, k, unit)  # 344 of 512 slots
    assert "exceeds" in space.tiling_error(GemvConfig(threads_k=128, chunks=4), n, k, unit)
    for cfg in cands[:2] + cands[2::50]:
        _compiles_as_configured(spec, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("m", [1])
def test_every_config_in_the_space_compiles_for_sm90(m):
    spec = KernelSpec(FORMAT, N, K, m)
    for cfg in space.candidates(spec):
        _compiles_as_configured(spec, cfg)


# --- records -----------------------------------------------------------------------------------------------

def make_entry(spec=KernelSpec(FORMAT, N, K, 1), gpu=GPU, versions=None, times=None):
    entry = TuningEntry(spec.format, gpu, spec.n, spec.k, spec.m, *(versions or current_versions()),
                        default=space.default_config(spec))
    for cfg, us in (times or {}).items():
        entry.add_measurement(cfg, us)
    return entry


BEST = GemvConfig(rows=2, threads_k=32, chunks=1, unroll=1, row_tile=2)


def test_records_round_trip_readable_and_atomic(tmp_path):
    records = TuningRecords(tmp_path)
    spec = KernelSpec(FORMAT, N, K, 1)
    entry = make_entry(spec, times={space.default_config(spec): 12.5, BEST: 9.25})
    entry.add_failure(GemvConfig(rows=8, threads_k=64, chunks=1, unroll=1, row_tile=1), "compile: boom\nline 2")
    path = records.save(entry)
    assert path == tmp_path / GPU / f"{FORMAT}.json"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left behind
    text = path.read_text()
    doc = json.loads(text)
    # readable: indented, sorted keys, each config object on one line of its own
    assert text == records_json(doc) + "\n"
    assert re.search(r'\n +"config": \{"chunks": \d+, "lut_lanes": 0, [^\n]*\},\n', text)
    assert text.count("\n") == json.dumps(doc, indent=1, sort_keys=True).count("\n") + 1 - 2 * (7 + 1)
    assert doc["schema"] == SCHEMA and doc["gpu"] == GPU and doc["format"] == FORMAT
    (stored,) = doc["entries"]
    assert stored["best"] == {"config": BEST.as_dict(), "us": 9.25}
    assert stored["default"] == {"config": space.default_config(spec).as_dict(), "us": 12.5}
    # candidates keyed by their knob values in the order of "knobs" (schema 2)
    assert stored["knobs"] == "rows,threads_k,chunks,unroll,row_tile,lut_shared,lut_lanes"
    assert stored["failed"] == {"8,64,1,1,1,1,0": "compile: boom line 2"}
    assert named_candidates(stored, "failed") == {
        "rows=8,threads_k=64,chunks=1,unroll=1,row_tile=1,lut_shared=1,lut_lanes=0": "compile: boom line 2"}
    back = records.entry(spec, GPU)
    assert back == entry and back.best() == (BEST, 9.25) and back.default_us == 12.5
    assert records.config_for(spec, GPU) == BEST


def test_schema_1_records_with_named_keys_still_read_and_are_rewritten_as_schema_2(tmp_path):
    """Files of schema 1 (candidates keyed name=value,..., no "knobs": what shipped before) read as
    the same entries; the next save writes the file in schema 2, every candidate kept."""
    from qcompile.tune.records import SCHEMA_NAMED_KEYS

    spec = KernelSpec(FORMAT, N, K, 1)
    entry = make_entry(spec, times={space.default_config(spec): 12.5, BEST: 9.25})
    entry.add_failure(GemvConfig(rows=8, threads_k=64, chunks=1, unroll=1, row_tile=1), "compile: boom")
    stored = entry.to_json()
    old = {**{k: v for k, v in stored.items() if k != "knobs"}, "measured_us": named_candidates(stored),
           "failed": named_candidates(stored, "failed")}
    assert "rows=8,threads_k=64,chunks=1,unroll=1,row_tile=1,lut_shared=1,lut_lanes=0" in old["failed"]
    path = tmp_path / GPU / f"{FORMAT}.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"schema": SCHEMA_NAMED_KEYS, "gpu": GPU, "format": FORMAT, "entries": [old]}))
    records = TuningRecords(tmp_path, warn=pytest.fail)
    assert records.entry(spec, GPU) == entry and records.config_for(spec, GPU) == BEST
    records.save(make_entry(KernelSpec(FORMAT, 2 * N, K, 1), times={BEST: 8.0}))
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and all("knobs" in e for e in doc["entries"])
    assert TuningRecords(tmp_path).entry(spec, GPU) == entry


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    records = TuningRecords(tmp_path)
    path = records.save(make_entry(times={BEST: 9.0}))
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        records.save(make_entry(times={BEST: 8.0}))
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [path.name]


def test_merge_adds_records_tuned_elsewhere(tmp_path, capsys):
    """Records tuned on another machine join these: new keys copied, a shared key gets the union of
    both measurements (the incoming time where both measured a config), a damaged source is refused
    before anything is written; `qcompile tune --merge` does it without a GPU."""
    spec, other = KernelSpec(FORMAT, N, K, 1), KernelSpec(FORMAT, N, K, 4)
    here, there = TuningRecords(tmp_path / "here"), TuningRecords(tmp_path / "there")
    default = space.default_config(spec)
    here.save(make_entry(spec, times={default: 12.0, BEST: 10.0}))
    there.save(make_entry(spec, times={default: 11.0}))
    there.save(make_entry(other, times={space.default_config(other): 20.0}))
    (path, count), = here.merge(tmp_path / "there")
    assert path == tmp_path / "here" / GPU / f"{FORMAT}.json" and count == 2
    merged = here.entry(spec, GPU)
    assert merged.measured_us == {space.config_key(default): 11.0, space.config_key(BEST): 10.0}
    assert here.config_for(spec, GPU) == BEST and here.entry(other, GPU).default_us == 20.0
    before = path.read_bytes()
    bad = tmp_path / "bad" / GPU / f"{FORMAT}.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(RecordsError):
        here.merge(tmp_path / "bad")
    assert path.read_bytes() == before
    with pytest.raises(QCompileError, match="not a directory"):
        here.merge(tmp_path / "missing")
    assert cli_main(["tune", "--merge", str(tmp_path / "there"), "--records", str(tmp_path / "cli")]) == 0
    assert f"{FORMAT}.json: 2 entries merged" in capsys.readouterr().out
    assert TuningRecords(tmp_path / "cli").entry(other, GPU).default_us == 20.0
    assert cli_main(["tune", "--merge", str(tmp_path / "missing"), "--records", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert cli_main(["tune", "--merge", str(tmp_path / "there"), "--records", str(tmp_path / "dry"), "--dry-run"]) == 2
    assert "takes no --dry-run" in capsys.readouterr().err and not (tmp_path / "dry").exists()
    # a failure on one side never hides the other side's measurement of the config
    failing = make_entry(spec, times={default: 11.0})
    failing.add_failure(BEST, "measure: launch failed")
    TuningRecords(tmp_path / "fails").save(failing)
    here.merge(tmp_path / "fails")
    assert here.entry(spec, GPU).measured_us[space.config_key(BEST)] == 10.0 and here.config_for(spec, GPU) == BEST
    assert not here.entry(spec, GPU).failed
    # a damaged destination file stops the merge before any file is written
    for fmt in ("e8p-2", FORMAT):  # e8p-2's file comes first
        TuningRecords(tmp_path / "two").save(make_entry(KernelSpec(fmt, N, K, 1), times={}))
    dest = TuningRecords(tmp_path / "dest")
    (tmp_path / "dest" / GPU).mkdir(parents=True)
    (tmp_path / "dest" / GPU / f"{FORMAT}.json").write_text("{not json")
    with pytest.raises(RecordsError):
        dest.merge(tmp_path / "two")
    assert not (tmp_path / "dest" / GPU / "e8p-2.json").exists()


def test_dry_run_with_a_gpu_tells_each_records_state(tmp_path, capsys, monkeypatch):
    """`qcompile tune --dry-run --target h100` also lists each kernel's record and what tuning and
    build do with it: today's kernels (applied, resumed), kernels changed since (not applied, measured
    anew), no fingerprint (applied, measured anew), none."""
    spec = KernelSpec(FORMAT, N, K, 1)
    tune([spec], SM90, CountingMeasure(), tmp_path, budget=3, gpu=GPU, log=None, alternatives=False)
    path = TuningRecords(tmp_path).path(GPU, FORMAT)
    argv = ["tune", "--format", FORMAT, "--shapes", f"{N}x{K}", "--m", "1,4", "--dry-run", "--target", GPU,
            "--records", str(tmp_path), "--no-alternatives"]

    def line(m):
        assert cli_main(argv) == 0
        out = capsys.readouterr().out
        assert f"records for {GPU} (" in out
        return next(row for row in out.splitlines() if f"M={m:>4} " in row and "tried" in row or
                    f"M={m:>4} " in row and row.endswith("none"))

    assert "3 tried" in line(1) and "today's kernels; build applies it; a tuning run resumes it" in line(1)
    assert line(4).endswith(": none")
    doc = json.loads(path.read_text())
    doc["entries"][0]["code"] = "0123456789abcdef"
    path.write_text(json.dumps(doc))
    assert "kernels changed since; build does not apply it; a tuning run measures it anew" in line(1)
    doc["entries"][0].pop("code")
    path.write_text(json.dumps(doc))
    assert "no fingerprint; build applies it; a tuning run measures it anew" in line(1)
    assert cli_main(argv) == 0
    assert "2 kernels: build applies a record to 1; 0 have records it does not apply; 1 have none" in \
        capsys.readouterr().out
    # an entry tuned against another default (one of the space's other configs), today's default not among
    # its measurements: kept, not applied, and the dry-run says why
    others = space.candidates(spec)[1:3]
    stale = TuningEntry(spec.format, GPU, spec.n, spec.k, spec.m, *current_versions(), default=others[0])
    stale.add_measurement(others[0], 10.0)
    stale.add_measurement(others[1], 9.0)
    path.unlink()
    TuningRecords(tmp_path).save(stale)
    assert "today's kernels; build does not apply it (tuned against another default); a tuning run resumes it" \
        in line(1)
    assert cli_main(argv) == 0
    assert "2 kernels: build applies a record to 0; 1 have records it does not apply; 1 have none" in \
        capsys.readouterr().out
    import qcompile.tune.records as records_module

    monkeypatch.setattr(records_module, "local_gpu_name", lambda: None)
    argv[argv.index("--target") + 1] = "sm_90"  # no GPU named (and no local one): the kernels only
    assert cli_main(argv) == 0 and "records for" not in capsys.readouterr().out


def test_merge_never_undoes_a_newer_tuning_run(tmp_path):
    """Two device runs that each carried a copy of the same old records: whatever the order of their
    merges, the entry measured on today's kernels stays, and a legacy (unfingerprinted) or stale copy
    of it never replaces it; a stale entry here gives way to an incoming one of today's kernels."""
    spec = KernelSpec(FORMAT, N, K, 1)
    default = space.default_config(spec)
    legacy = tmp_path / "legacy"
    TuningRecords(legacy).save(make_entry(spec, times={default: 30.0, BEST: 25.0}))
    path = TuningRecords(legacy).path(GPU, FORMAT)
    doc = json.loads(path.read_text())
    doc["entries"][0].pop("code")
    path.write_text(json.dumps(doc))
    stale = tmp_path / "stale"
    stale_path = TuningRecords(stale).path(GPU, FORMAT)
    stale_path.parent.mkdir(parents=True)
    doc["entries"][0]["code"] = "0123456789abcdef"
    stale_path.write_text(json.dumps(doc))
    fresh = tmp_path / "fresh"
    TuningRecords(fresh).save(make_entry(spec, times={default: 12.0}))
    for order in ((legacy, fresh, stale), (fresh, legacy, stale), (stale, fresh, legacy)):
        here = TuningRecords(tmp_path / f"here-{len(list(tmp_path.iterdir()))}")
        for source in order:
            here.merge(source)
        entry = here.entry(spec, GPU)
        assert entry.measured_us == {space.config_key(default): 12.0}, order
        assert entry.code is not None and not entry.stale_code()


def test_a_layout_variant_has_its_own_records_file(tmp_path):
    """qtip-3inst-2@mma-kernel (an opt-in layout variant) is tuned and built like a registered format:
    its records live in their own file, and are never another format's."""
    spec = KernelSpec("qtip-3inst-2@mma-kernel", 256, 512, 4)
    records = TuningRecords(tmp_path)
    default = space.default_config(spec)
    best = next(c for c in space.candidates(spec) if c != default)
    entry = TuningEntry(spec.format, GPU, spec.n, spec.k, spec.m, *current_versions(), default=default)
    entry.add_measurement(default, 9.0)
    entry.add_measurement(best, 7.0)
    assert records.save(entry) == tmp_path / GPU / "qtip-3inst-2@mma-kernel.json"
    assert records.config_for(spec, GPU) == best
    assert records.config_for(KernelSpec("qtip-3inst-2", 256, 512, 4), GPU) is None
    with pytest.raises(QCompileError, match="cannot name a records file"):
        records.path(GPU, "../int4")


def test_records_apply_only_to_their_own_key(tmp_path):
    qc_version, tvm_version = current_versions()
    spec = KernelSpec(FORMAT, N, K, 1)
    records = TuningRecords(tmp_path)
    records.save(make_entry(spec, times={BEST: 9.0}))
    assert records.config_for(spec, GPU) == BEST
    for other in (KernelSpec(FORMAT, N, K, 4), KernelSpec(FORMAT, 512, K, 1), KernelSpec(FORMAT, N, 2048, 1),
                  KernelSpec("e8p-2", N, K, 1)):
        assert records.config_for(other, GPU) is None
    assert records.config_for(spec, "a100") is None and records.config_for(spec, None) is None
    for versions in ((qc_version + ".1", tvm_version), (qc_version, "0.26.0")):
        assert TuningRecords(tmp_path, versions=versions).config_for(spec, GPU) is None
    # a record of other versions is kept beside the current one, and each applies only to its own
    old = make_entry(spec, versions=("0.0.9", tvm_version), times={GemvConfig(rows=8, threads_k=32, chunks=1,
                                                                              unroll=1, row_tile=1): 5.0})
    records.save(old)
    assert records.config_for(spec, GPU) == BEST
    assert TuningRecords(tmp_path, versions=("0.0.9", tvm_version)).config_for(spec, GPU).rows == 8
    assert len(records.entries(GPU, FORMAT)) == 2
    # a file copied to another GPU's directory is not that GPU's record
    (tmp_path / "a100").mkdir()
    shutil.copy(records.path(GPU, FORMAT), records.path("a100", FORMAT))
    messages = []
    assert TuningRecords(tmp_path, warn=messages.append).config_for(spec, "a100") is None
    assert len(messages) == 1 and "gpu 'h100'" in messages[0]


def _corrupt(doc_text_or_fn):
    def make(path: Path):
        if callable(doc_text_or_fn):
            doc = json.loads(path.read_text())
            doc_text_or_fn(doc)
            path.write_text(json.dumps(doc))
        else:
            path.write_text(doc_text_or_fn)
    return make


CORRUPTIONS = {
    "truncated": (_corrupt('{"schema": "qcompile-tuning-records/1", "entries": ['), "not valid JSON"),
    "not an object": (_corrupt("[1, 2]"), "not a JSON object"),
    "other schema": (_corrupt(lambda d: d.update(schema="v0")), "schema"),
    "unknown knob": (_corrupt(lambda d: d["entries"][0]["best"]["config"].update(warps=2)), "unknown GEMV knob"),
    "bad time": (_corrupt(lambda d: d["entries"][0]["measured_us"].update({"rows=1": -3})), "positive number"),
    "edited best": (_corrupt(lambda d: d["entries"][0]["best"]["config"].update(rows=1)), "not the fastest"),
    "best does not tile": (_corrupt(lambda d: d["entries"][0].update(
        best={"config": dict(BEST.as_dict(), rows=3), "us": 9.0},
        measured_us={"3,32,1,1,2,1,0": 9.0})), "does not fit"),
    "candidate of too few values": (_corrupt(lambda d: d["entries"][0]["measured_us"].update({"4,32,1": 9.0})),
                                    "has 3 values for 7 knobs"),
    "unknown knob in knobs": (_corrupt(lambda d: d["entries"][0].update(knobs="rows,threads_k,chunks,unroll,row_tile,"
                                                                         "lut_shared,tiles")), "unknown GEMV knob(s) tiles"),
    "entries missing": (_corrupt(lambda d: d.pop("entries")), "entries must be a list"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_damaged_records_warn_once_and_fall_back_to_defaults(tmp_path, name):
    corrupt, expected = CORRUPTIONS[name]
    spec = KernelSpec(FORMAT, N, K, 1)
    path = TuningRecords(tmp_path).save(make_entry(spec, times={BEST: 9.0}))
    corrupt(path)
    assert_damaged_file_falls_back(TuningRecords(tmp_path), path, spec, KernelSpec(FORMAT, N, K, 4), expected)


def assert_damaged_file_falls_back(records, path, spec, other_spec, expected):
    """A damaged records file: one warning line (no second one for another spec of the same file),
    no config, and the tuner refuses to overwrite it with a one-line error."""
    with pytest.warns(TuningRecordsWarning) as caught:
        assert records.config_for(spec, GPU) is None
        assert records.config_for(other_spec, GPU) is None  # same file: no second warning
    (warning,) = caught
    text = str(warning.message)
    assert "\n" not in text and str(path) in text and expected in text and "default schedules" in text
    with pytest.raises(RecordsError, match=re.escape(expected)) as info:  # the tuner refuses to overwrite it
        records.entry(spec, GPU)
    assert "\n" not in str(info.value)


def test_build_applies_records_only_for_their_gpu(tmp_path):
    spec1, spec4 = KernelSpec(FORMAT, N, K, 1), KernelSpec(FORMAT, N, K, 4)
    records = TuningRecords(tmp_path)
    records.save(make_entry(spec1, times={BEST: 9.0, space.default_config(spec1): 12.0}))
    seen = {}

    def config_for(spec):
        seen[spec] = records.config_for(spec, GPU)
        return seen[spec]

    source = library.cuda_source(library.build([spec1, spec4], SM90, config_for))
    assert seen == {spec1: BEST, spec4: None}
    bounds = re.findall(r"__launch_bounds__\((\d+)\) (\w+)_kernel\(", source)
    default4 = space.default_config(spec4)  # M=4 of int4-g128: the mma.sync kernel
    assert type(default4) is MmaConfig
    assert sorted(set(bounds)) == sorted({(str(BEST.rows * BEST.threads_k), spec1.name),
                                          (str(default4.threads), spec4.name)})
    assert records_gpu(parse_target("h100")) == "h100"
    assert records_gpu(parse_target("llvm")) is None
    if not torch.cuda.is_available():  # sm_90 alone names no GPU; only the local one would do
        assert records_gpu(parse_target("sm_90")) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_model_build_uses_records_and_says_so(tmp_path, default_model):
    from qcompile.model.build import build, decoder_linear_shapes

    n, k = sorted(set(decoder_linear_shapes(Path(default_model)).values()))[0]
    spec = KernelSpec(FORMAT, n, k, 1)
    tuned = next(c for c in space.candidates(spec)[1:] if c.rows * c.threads_k == 64)
    TuningRecords(tmp_path / "rec").save(make_entry(spec, times={tuned: 5.0}))
    # and an mma.sync record of the M=16 bucket, beside an old GEMV record of it that must not apply
    spec16 = KernelSpec(FORMAT, n, k, 16)
    tuned16 = next(c for c in space.candidates(spec16)[1:] if c.threads != space.default_config(spec16).threads)
    TuningRecords(tmp_path / "rec").save(tc_entry(spec16, times={tuned16: 4.0}))
    TuningRecords(tmp_path / "rec").save(TuningEntry(FORMAT, GPU, n, k, 16, *current_versions(), default=tuned,
                                                     measured_us={space.config_key(tuned): 3.0}))
    said = []
    out = build(default_model, FORMAT, "h100", tmp_path / "art", buckets=(1, 4, 16), progress=said.append,
                records=tmp_path / "rec")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tuned_kernels"] == {spec.name: space.config_key(tuned), spec16.name: space.config_key(tuned16)}
    assert any(line.startswith("tuned schedules for 2 of ") for line in said)
    source = (out / "kernels.cu").read_text()
    assert f"__launch_bounds__(64) {spec.name}_kernel(" in source
    assert f"__launch_bounds__({tuned16.threads}) {spec16.name}_kernel(" in source
    with pytest.raises(QCompileError, match="does not exist"):
        build(default_model, FORMAT, "h100", tmp_path / "art2", buckets=(1,), progress=None,
              records=tmp_path / "missing")


# --- the driver ---------------------------------------------------------------------------------------------

def test_tune_measures_budget_saves_each_and_picks_the_best(tmp_path):
    measure = CountingMeasure()
    logs = []
    spec = KernelSpec(FORMAT, N, K, 1)
    (result,) = tune([spec, spec], SM90, measure, tmp_path, budget=12, gpu=GPU, order="space", log=logs.append)
    assert len(measure.calls) == 12 and result.measured_now == 12
    assert measure.calls[0] == (spec, space.config_key(space.default_config(spec)))
    assert [key for _, key in measure.calls] == [space.config_key(c) for c in space.candidates(spec)[:12]]
    entry = TuningRecords(tmp_path).entry(spec, GPU)
    assert entry.tried_count == 12
    best_key = min(entry.measured_us, key=entry.measured_us.get)
    assert entry.best() == (space.config_from_key(best_key), fake_us(space.config_from_key(best_key)))
    progress = [line for line in logs if line.startswith("[")]
    assert len(progress) == 12 and progress[2].startswith(f"[3/12] N={N} K={K} M=1 ")
    assert re.search(r" \d+\.\d\d us \(best \d+\.\d\d us\)$", progress[2])


@pytest.mark.parametrize("jobs", [1, 3])
def test_tune_resumes_after_an_interrupt_and_never_remeasures(tmp_path, jobs):
    spec = KernelSpec(FORMAT, N, K, 4)

    class Interrupted(CountingMeasure):
        def __call__(self, spec, cfg, kernel):
            if len(self.calls) == 5:
                raise KeyboardInterrupt
            return super().__call__(spec, cfg, kernel)

    first = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        tune([spec], SM90, first, tmp_path, budget=16, gpu=GPU, log=None, jobs=jobs)
    assert TuningRecords(tmp_path).entry(spec, GPU).tried_count == 5  # all but the one in flight

    second = CountingMeasure()
    tune([spec], SM90, second, tmp_path, budget=16, gpu=GPU, log=None, jobs=jobs)
    assert len(second.calls) == 11
    assert not set(first.calls) & set(second.calls)
    third = CountingMeasure()
    (result,) = tune([spec], SM90, third, tmp_path, budget=16, gpu=GPU, log=None, jobs=jobs)
    assert third.calls == [] and result.measured_now == 0  # a second run with records measures nothing
    more = CountingMeasure()
    tune([spec], SM90, more, tmp_path, budget=20, gpu=GPU, log=None, jobs=jobs)  # a larger budget continues
    assert len(more.calls) == 4 and not set(more.calls) & (set(first.calls) | set(second.calls))


def test_tune_measures_anew_what_was_measured_on_other_kernels(tmp_path):
    """A stored entry whose kernel-code fingerprint is not today's (the library changed the kernel
    since) or that has none is not resumed: the run says so, measures from the default on, and its
    saves replace the stored times."""
    spec = KernelSpec(FORMAT, N, K, 1)
    tune([spec], SM90, CountingMeasure(), tmp_path, budget=4, gpu=GPU, log=None)
    path = TuningRecords(tmp_path).path(GPU, FORMAT)
    for code in ("0123456789abcdef", None):
        doc = json.loads(path.read_text())
        if code is None:
            doc["entries"][0].pop("code")
        else:
            doc["entries"][0]["code"] = code
        path.write_text(json.dumps(doc))
        again, logs = CountingMeasure(), []
        tune([spec], SM90, again, tmp_path, budget=4, gpu=GPU, log=logs.append)
        assert len(again.calls) == 4 and again.calls[0] == (spec, space.config_key(space.default_config(spec)))
        why = "since changed" if code else "did not record"
        assert any("4 stored measurements" in line and why in line for line in logs), logs
        entry = TuningRecords(tmp_path).entry(spec, GPU)
        assert entry.tried_count == 4 and entry.code is not None and not entry.stale_code()


def test_tune_records_failures_and_does_not_retry_them(tmp_path, monkeypatch):
    spec = KernelSpec(FORMAT, N, K, 1)
    cands = space.candidates(spec)
    no_compile, wrong = cands[1], cands[2]
    real_scheduled_func = driver.scheduled_func

    def scheduled_func(spec, target, config=None):
        if config == no_compile:
            raise ValueError("cannot schedule this\n  deep TVM detail")
        return real_scheduled_func(spec, target, config)

    def fn(cfg):
        if cfg == wrong:
            raise CandidateError("wrong result: relative error 1.0e+00 > 0.01")
        return fake_us(cfg)

    monkeypatch.setattr(driver, "scheduled_func", scheduled_func)
    measure = CountingMeasure(fn)
    logs = []
    tune([spec], SM90, measure, tmp_path, budget=4, gpu=GPU, order="space", log=logs.append)
    entry = TuningRecords(tmp_path).entry(spec, GPU)
    assert set(entry.failed) == {space.config_key(no_compile), space.config_key(wrong)}
    assert entry.failed[space.config_key(no_compile)].startswith("compile: ValueError: cannot schedule this")
    assert entry.failed[space.config_key(wrong)] == "measure: wrong result: relative error 1.0e+00 > 0.01"
    assert any(line.startswith("[2/4]") and " failed: compile: " in line for line in logs)
    again = CountingMeasure()
    tune([spec], SM90, again, tmp_path, budget=6, gpu=GPU, order="space", log=None)
    assert [key for _, key in again.calls] == [space.config_key(c) for c in cands[4:6]]


def test_a_broken_measurer_stops_the_run_with_one_line(tmp_path):
    spec = KernelSpec(FORMAT, N, K, 1)

    def broken(spec, cfg, kernel):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    with pytest.raises(QCompileError, match="run again to resume") as info:
        tune([spec], SM90, broken, tmp_path, budget=4, gpu=GPU, log=None)
    assert "\n" not in str(info.value)
    assert TuningRecords(tmp_path).entry(spec, GPU) is None  # nothing recorded as the candidate's fault


def test_tune_time_budget_skips_gemm_and_refuses_bad_settings(tmp_path):
    ticks = iter(range(1000))
    measure = CountingMeasure()
    logs = []
    results = tune([KernelSpec(FORMAT, N, K, 1), KernelSpec(FORMAT, N, K, 128)], SM90, measure, tmp_path,
                   budget=50, time_budget_s=3, gpu=GPU, log=logs.append, clock=lambda: next(ticks))
    # the clock reads 0 at the start, then 1, 2, 3 before each candidate: two fit in 3 s
    assert len(measure.calls) == 2 and any("time budget of 3 s reached" in line for line in logs)
    assert results[1].skipped and results[1].entry is None
    assert any(line.startswith(f"skip N={N} K={K} M=128: GEMM") for line in logs)
    for kwargs, message in (({"target": "llvm"}, "CUDA targets"), ({"budget": 0}, "budget"),
                            ({"order": "random"}, "order"), ({"gpu": None, "target": "sm_90"}, "which GPU"),
                            ({"time_budget_s": -1}, "time budget")):
        args = {"target": SM90, "gpu": GPU, **kwargs}
        with pytest.raises(QCompileError, match=message):
            tune([KernelSpec(FORMAT, N, K, 1)], args.pop("target"), measure, tmp_path, log=None, **args)


def test_model_order_is_deterministic_and_finds_the_best(tmp_path):
    spec = KernelSpec(FORMAT, N, K, 4)
    runs = []
    for name in ("a", "b"):
        measure = CountingMeasure()
        tune([spec], SM90, measure, tmp_path / name, budget=40, gpu=GPU, order="model", log=None)
        runs.append([key for _, key in measure.calls])
    assert runs[0] == runs[1]
    space_order = [space.config_key(c) for c in space.candidates(spec)]
    assert runs[0] != space_order[:40]  # the model reordered the search
    best = min(space.candidates(spec), key=fake_any_us)
    assert TuningRecords(tmp_path / "a").entry(spec, GPU).best()[0] == best


def test_parallel_compiles_measure_the_same_candidates_in_the_same_order(tmp_path):
    """jobs > 1 compiles a batch of candidates in threads while they are measured one by one: in the
    space order it measures exactly what jobs=1 measures, in the same order; in the model order it
    stays deterministic, within the budget, default first and no repeats."""
    spec = KernelSpec(FORMAT, N, K, 4)
    serial, parallel = CountingMeasure(), CountingMeasure()
    tune([spec], SM90, serial, tmp_path / "s", budget=9, gpu=GPU, order="space", log=None)
    tune([spec], SM90, parallel, tmp_path / "p", budget=9, gpu=GPU, order="space", log=None, jobs=4)
    assert parallel.calls == serial.calls and len(serial.calls) == 9
    runs = []
    for name in ("a", "b"):
        measure = CountingMeasure()
        tune([spec], SM90, measure, tmp_path / name, budget=13, gpu=GPU, order="model", log=None, jobs=4)
        runs.append([key for _, key in measure.calls])
    assert runs[0] == runs[1] and len(set(runs[0])) == 13
    assert runs[0][0] == space.config_key(space.default_config(spec))
    assert TuningRecords(tmp_path / "a").entry(spec, GPU).tried_count == 13
    with pytest.raises(QCompileError, match="compile jobs"):
        tune([spec], SM90, CountingMeasure(), tmp_path / "c", gpu=GPU, log=None, jobs=0)


def test_parallel_tune_records_failures_and_stops_at_the_time_budget(tmp_path, monkeypatch):
    """jobs > 1: a candidate that cannot be scheduled is recorded as failed like with jobs=1, and the
    time budget (checked before each measurement) leaves the rest of a compiled batch unmeasured and
    unrecorded, so the next run measures it."""
    spec = KernelSpec(FORMAT, N, K, 1)
    cands = space.candidates(spec)
    real_scheduled_func = driver.scheduled_func

    def scheduled_func(spec, target, config=None):
        if config == cands[2]:
            raise ValueError("cannot schedule this")
        return real_scheduled_func(spec, target, config)

    monkeypatch.setattr(driver, "scheduled_func", scheduled_func)
    measure = CountingMeasure()
    tune([spec], SM90, measure, tmp_path, budget=5, gpu=GPU, order="space", log=None, jobs=3)
    entry = TuningRecords(tmp_path).entry(spec, GPU)
    assert set(entry.failed) == {space.config_key(cands[2])} and entry.tried_count == 5
    assert [key for _, key in measure.calls] == [space.config_key(c) for c in cands[:5] if c != cands[2]]
    ticks = iter(range(1000))
    more = CountingMeasure()
    tune([spec], SM90, more, tmp_path, budget=12, time_budget_s=2, gpu=GPU, order="space", log=None, jobs=4,
         clock=lambda: next(ticks))
    assert [key for _, key in more.calls] == [space.config_key(c) for c in cands[5:6]]  # one fit in 2 s
    assert TuningRecords(tmp_path).entry(spec, GPU).tried_count == 6
    assert driver.default_jobs() >= 1


# --- the tensor-core family (TC_MIN_M <= M <= GEMV_MAX_M) ---------------------------------------------------

TC_N, TC_K = 256, 512  # small: a tensor-core kernel of this shape schedules in well under a second
TC_FORMAT = "qtip-1mad-2"  # the row-packed formats (int4, E8P) run M=2..16 on mma.sync instead
TC_SPEC = KernelSpec(TC_FORMAT, TC_N, TC_K, 16)
TC_SPEC1 = KernelSpec(TC_FORMAT, TC_N, TC_K, 1)


def fake_tc_us(cfg: TensorCoreConfig) -> float:
    """A deterministic 'time' of a tensor-core config, best at n_tile=16, k_tile=128, 2 stages."""
    return (5.0 + abs(math.log2(cfg.n_tile) - 4) * 0.4 + abs(math.log2(cfg.k_tile) - 7) * 0.3
            + (2 - cfg.stages) * 0.2 + abs(cfg.warps_n * cfg.warps_k - 4) * 0.05 + (4 - cfg.units) * 0.01)


def tc_entry(spec=TC_SPEC, gpu=GPU, versions=None, times=None):
    entry = TuningEntry(spec.format, gpu, spec.n, spec.k, spec.m, *(versions or current_versions()),
                        default=space.default_config(spec))
    for cfg, us in (times or {}).items():
        entry.add_measurement(cfg, us)
    return entry


TC_BEST = TensorCoreConfig(n_tile=32, k_tile=128, warps_n=1, warps_k=4, units=2, stages=2)


@pytest.mark.parametrize("name", ["qtip-1mad-2", "qtip-3inst-3"])
@pytest.mark.parametrize("m", [TC_MIN_M, 16])
def test_tc_space_is_valid_bounded_and_starts_with_the_default(name, m):
    spec = KernelSpec(name, TC_N, TC_K, m)
    unit = qc_formats.get(name).decode_unit
    cands = space.candidates(spec)
    assert cands == space.candidates(spec) and library.kernel_family(name, m) == "tensorcore"
    assert cands[0] == default_tc_config(TC_N, TC_K, m, unit) == space.default_config(spec)
    assert 20 <= len(cands) <= space.MAX_TC_CANDIDATES
    keys = [space.config_key(c) for c in cands]
    assert len(set(keys)) == len(keys)
    for cfg, key in zip(cands, keys):
        assert type(cfg) is TensorCoreConfig and space.family_of(cfg) == "tensorcore"
        check_tc_config(cfg, TC_N, TC_K, m, unit)
        assert space.fit_error(cfg, TC_N, TC_K, m, unit) is None
        assert space.config_from_key(key, "tensorcore") == cfg
        assert cfg.m_tile == 16 and cfg.warps_m == 1 and cfg.units * unit <= space.TC_MAX_UNIT_COLUMNS
    # the knobs the space searches all vary
    for knob in space.TC_KNOB_VALUES:
        assert len({getattr(c, knob) for c in cands}) > 1, knob
    dist = [space._distance(c, cands[0]) for c in cands]
    assert dist == sorted(dist)  # nearest the default first


def test_tc_config_keys_round_trip_and_reject_nonsense():
    cfg = TensorCoreConfig(n_tile=32, k_tile=256, warps_n=2, warps_k=4, units=4)
    key = space.config_key(cfg)
    assert key == "m_tile=16,n_tile=32,k_tile=256,warps_m=1,warps_n=2,warps_k=4,vec=8,units=4,stages=1"
    assert space.config_from_key(key, "tensorcore") == cfg
    assert space.config_from_dict(cfg.as_dict(), "tensorcore") == cfg
    assert space.config_from_dict({"n_tile": 128}, "tensorcore") == TensorCoreConfig(n_tile=128)
    assert space.family_of(cfg) == "tensorcore" and space.family_of(GemvConfig()) == "gemv"
    assert not set(space.knob_names("gemv")) & set(space.knob_names("tensorcore"))  # keys never mix up
    for bad in ({"n_tile": 0}, {"n_tile": 2.0}, {"stages": True}, {"rows": 4}, [16]):
        with pytest.raises(ValueError) as info:
            space.config_from_dict(bad, "tensorcore")
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown tensor-core knob"):
        space.config_from_key(space.config_key(GemvConfig()), "tensorcore")
    with pytest.raises(ValueError, match="unknown GEMV knob"):
        space.config_from_key(key)  # GEMV is the default family
    for bad in ("m_tile=16,n_tile", "", "n_tile=x"):
        with pytest.raises(ValueError):
            space.config_from_key(bad, "tensorcore")
    with pytest.raises(ValueError, match="unknown kernel family"):
        space.config_from_key(key, "gemm")
    with pytest.raises(ValueError, match="not a kernel config"):
        space.config_key({"n_tile": 32})


@pytest.mark.parametrize("name", ["qtip-1mad-2"])
def test_every_tc_candidate_schedules_and_some_compile(name):
    """Every candidate of the space schedules, with the block and warps it asks for; the default and
    the farthest candidate compile for sm_90 (WMMA and the format's decode intrinsic)."""
    spec = KernelSpec(name, TC_N, TC_K, 16)
    cands = space.candidates(spec)
    for cfg in cands:
        func = library.scheduled_func(spec, SM90, cfg)
        assert thread_extents(func) == {"blockIdx.y": 1, "blockIdx.x": TC_N // cfg.n_tile, "threadIdx.x": 32,
                                        "threadIdx.y": cfg.warps_m * cfg.warps_n, "threadIdx.z": cfg.warps_k}, cfg
    for cfg in (cands[0], cands[-1]):
        source = library.cuda_source(library.build([spec], SM90, lambda s: cfg))
        assert "wmma::mma_sync" in source and f"__launch_bounds__({cfg.threads}) {spec.name}_kernel(" in source


def test_scheduled_func_applies_a_tc_config():
    default = library.scheduled_func(TC_SPEC, SM90).script()
    assert library.scheduled_func(TC_SPEC, SM90, space.default_config(TC_SPEC)).script() == default
    for cfg in (TC_BEST, replace(space.default_config(TC_SPEC), warps_n=1)):
        assert cfg != space.default_config(TC_SPEC)
        text = library.scheduled_func(TC_SPEC, SM90, cfg).script()
        assert text != default and "wmma.matrix_a" in text
    # the config reaches the kernel: the grid and the warps are TC_BEST's
    assert thread_extents(library.scheduled_func(TC_SPEC, SM90, TC_BEST)) == {
        "blockIdx.y": 1, "blockIdx.x": TC_N // 32, "threadIdx.y": 1, "threadIdx.z": 4, "threadIdx.x": 32}


@pytest.mark.parametrize("fmt, m, cfg, words", [
    (TC_FORMAT, 16, GemvConfig(), "runs on the low-batch WMMA tensor-core kernel, which takes a TensorCoreConfig; "
                                  "got a GemvConfig"),
    (TC_FORMAT, TC_MIN_M, MmaConfig(), "which takes a TensorCoreConfig; got a MmaConfig"),
    (TC_FORMAT, 4, MmaConfig(), "runs on the CUDA-core GEMV, which takes a GemvConfig; got a MmaConfig"),
    (FORMAT, 1, TensorCoreConfig(), "runs on the CUDA-core GEMV, which takes a GemvConfig; got a TensorCoreConfig"),
    (FORMAT, 4, GemvConfig(), "runs on the mma.sync kernel, which takes an MmaConfig; got a GemvConfig"),
    (FORMAT, 16, TensorCoreConfig(), "runs on the mma.sync kernel, which takes an MmaConfig; got a TensorCoreConfig"),
    (FORMAT, 128, GemvConfig(), "runs on the GEMM (M > 64), which takes no config"),
    (TC_FORMAT, 64, TensorCoreConfig(), "which takes no config; got a TensorCoreConfig"),
    (TC_FORMAT, 16, TensorCoreConfig(n_tile=48), "n_tile 48"),  # the right family, but it does not fit
    (FORMAT, 16, MmaConfig(tiles=32), "N=256 is not a multiple of 512 rows per block"),
])
def test_wrong_family_config_raises_one_line(fmt, m, cfg, words):
    with pytest.raises(ValueError) as info:
        library.scheduled_func(KernelSpec(fmt, TC_N, TC_K, m), SM90, cfg)
    assert words in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError):
        library.build([KernelSpec(fmt, TC_N, TC_K, m)], SM90, lambda s: cfg)


def test_records_round_trip_with_a_tc_entry(tmp_path):
    records = TuningRecords(tmp_path)
    spec1 = TC_SPEC1
    best1 = space.candidates(spec1)[1]
    default16 = space.default_config(TC_SPEC)
    tc = tc_entry(times={default16: 7.5, TC_BEST: 6.25})
    tc.add_failure(TensorCoreConfig(n_tile=256, k_tile=32, warps_n=4, warps_k=2), "compile: boom")
    gemv = make_entry(spec1, times={space.default_config(spec1): 12.5, best1: 9.25})
    assert tc.kernel == "tensorcore" and gemv.kernel == "gemv" and tc.key[-1] == "tensorcore"
    records.save(tc)
    path = records.save(gemv)
    doc = json.loads(path.read_text())
    stored = {e["m"]: e for e in doc["entries"]}
    assert stored[1]["kernel"] == "gemv" and stored[16]["kernel"] == "tensorcore"
    assert stored[16]["best"] == {"config": TC_BEST.as_dict(), "us": 6.25}
    assert stored[16]["default"] == {"config": default16.as_dict(), "us": 7.5}
    assert set(named_candidates(stored[16])) == {space.config_key(default16), space.config_key(TC_BEST)}
    assert list(named_candidates(stored[16], "failed")) == ["m_tile=16,n_tile=256,k_tile=32,warps_m=1,warps_n=4,warps_k=2,vec=8,"
                                          "units=1,stages=1"]
    back = TuningRecords(tmp_path)
    assert back.entry(TC_SPEC, GPU) == tc and back.entry(spec1, GPU) == gemv
    assert back.entry(TC_SPEC, GPU).best() == (TC_BEST, 6.25)
    assert back.config_for(TC_SPEC, GPU) == TC_BEST and back.config_for(spec1, GPU) == best1
    # build passes the tuned tensor-core config through: the TC kernel gets TC_BEST's 128 threads
    source = library.cuda_source(library.build([spec1, TC_SPEC], SM90, back.lookup(GPU)))
    bounds = dict((name, int(n)) for n, name in re.findall(r"__launch_bounds__\((\d+)\) (\w+)_kernel\(", source))
    assert bounds == {spec1.name: best1.rows * best1.threads_k, TC_SPEC.name: TC_BEST.threads}
    # resuming the TC entry measures only what it lacks
    again = back.open_entry(TC_SPEC, GPU, default16)
    assert again.tried(TC_BEST) and again.tried_count == 3


def test_old_gemv_entry_of_a_tc_bucket_is_kept_but_never_applied(tmp_path):
    """A file written before the "kernel" field (its entries are GEMV entries) with an M=16 GEMV record,
    measured before M=16 ran on tensor cores: it reads cleanly, the M=1 record applies, the M=16 one
    does not (the bucket gets the default tensor-core kernel), and a TC entry of the same bucket lives
    beside it and is the one that applies."""
    spec1 = TC_SPEC1
    best1 = space.candidates(spec1)[1]
    old16 = TuningEntry(TC_FORMAT, GPU, TC_N, TC_K, 16, *current_versions(), default=space.default_config(spec1))
    old16.add_measurement(best1, 20.0)
    old1 = make_entry(spec1, times={best1: 9.0})
    path = tmp_path / GPU / f"{TC_FORMAT}.json"
    path.parent.mkdir()
    entries = [e.to_json() for e in (old1, old16)]
    for e in entries:
        del e["kernel"]
    path.write_text(json.dumps({"schema": SCHEMA, "gpu": GPU, "format": TC_FORMAT, "entries": entries}))
    records = TuningRecords(tmp_path, warn=pytest.fail)
    assert records.config_for(spec1, GPU) == best1
    assert records.config_for(TC_SPEC, GPU) is None
    assert records.entry(TC_SPEC, GPU) is None and records.entry(TC_SPEC, GPU, "gemv") == old16
    source = library.cuda_source(library.build([TC_SPEC], SM90, records.lookup(GPU)))
    assert "wmma::mma_sync" in source  # the default tensor-core kernel, no GEMV record in sight
    # a tensor-core entry for the same bucket is stored beside the old one and applies
    records.save(tc_entry(times={TC_BEST: 6.0}))
    assert records.config_for(TC_SPEC, GPU) == TC_BEST
    assert records.entry(TC_SPEC, GPU, "gemv") == old16 and len(records.entries(GPU, TC_FORMAT)) == 3


def test_tc_records_apply_only_to_their_own_key(tmp_path):
    qc_version, tvm_version = current_versions()
    records = TuningRecords(tmp_path)
    records.save(tc_entry(times={TC_BEST: 6.0}))
    assert records.config_for(TC_SPEC, GPU) == TC_BEST
    for other in (KernelSpec(TC_FORMAT, TC_N, TC_K, TC_MIN_M), KernelSpec(TC_FORMAT, 512, TC_K, 16),
                  KernelSpec(TC_FORMAT, TC_N, 1024, 16), KernelSpec("qtip-3inst-2", TC_N, TC_K, 16),
                  KernelSpec(TC_FORMAT, TC_N, TC_K, 4), KernelSpec(TC_FORMAT, TC_N, TC_K, 32)):
        assert records.config_for(other, GPU) is None, other
    assert records.config_for(TC_SPEC, "a100") is None and records.config_for(TC_SPEC, None) is None
    for versions in ((qc_version + ".1", tvm_version), (qc_version, "0.26.0")):
        assert TuningRecords(tmp_path, versions=versions).config_for(TC_SPEC, GPU) is None


def _tc_record_file(tmp_path):
    path = TuningRecords(tmp_path).save(tc_entry(times={space.default_config(TC_SPEC): 7.0, TC_BEST: 6.0}))
    doc = json.loads(path.read_text())
    return path, doc


TC_CORRUPTIONS = {
    # knobs that fail check_tc_config for the entry's shape (n_tile 48 is no multiple of 16 x warps_n)
    "best does not fit": (lambda e: e.update(
        best={"config": dict(TC_BEST.as_dict(), n_tile=48), "us": 5.0},
        measured_us=dict(e["measured_us"], **{positional_key(space.config_key(replace(TC_BEST, n_tile=48)), "tensorcore"): 5.0})),
        "does not fit the shape"),
    "default does not fit": (lambda e: e["default"].update(config=dict(TC_BEST.as_dict(), k_tile=1024), us=None),
                             "k_tile 1024 does not divide K=512"),
    "gemv knob in a tc entry": (lambda e: e["best"]["config"].update(rows=4), "unknown tensor-core knob"),
    "unknown family": (lambda e: e.update(kernel="gemm"), "kernel must be one of gemv, tensorcore"),
    "tc entry read as gemv": (lambda e: e.pop("kernel"), "unknown GEMV knob"),
}


@pytest.mark.parametrize("name", sorted(TC_CORRUPTIONS))
def test_invalid_tc_entry_warns_once_and_falls_back_to_defaults(tmp_path, name):
    corrupt, expected = TC_CORRUPTIONS[name]
    path, doc = _tc_record_file(tmp_path)
    corrupt(doc["entries"][0])
    path.write_text(json.dumps(doc))
    assert_damaged_file_falls_back(TuningRecords(tmp_path), path, TC_SPEC, TC_SPEC1, expected)
    # and build falls back to the default tensor-core kernel
    lookup = TuningRecords(tmp_path, warn=lambda text: None).lookup(GPU)
    source = library.cuda_source(library.build([TC_SPEC], SM90, lookup))
    assert f"__launch_bounds__({space.default_config(TC_SPEC).threads}) {TC_SPEC.name}_kernel(" in source


def test_tune_covers_the_tc_bucket_resumes_and_never_remeasures(tmp_path):
    spec1 = TC_SPEC1
    logs = []
    first = CountingMeasure(fake_any_us)
    results = tune([spec1, TC_SPEC, KernelSpec(TC_FORMAT, TC_N, TC_K, 64)], SM90, first, tmp_path, budget=5, gpu=GPU,
                   order="space", log=logs.append)
    assert [r.entry.kernel if r.entry else r.skipped[:4] for r in results] == ["gemv", "tensorcore", "GEMM"]
    tc_calls = [key for spec, key in first.calls if spec == TC_SPEC]
    assert tc_calls == [space.config_key(c) for c in space.candidates(TC_SPEC)[:5]]
    assert tc_calls[0] == space.config_key(space.default_config(TC_SPEC))
    progress = [line for line in logs if line.startswith("[") and " M=16 " in line]
    assert len(progress) == 5 and progress[0].startswith(f"[1/5] N={TC_N} K={TC_K} M=16 tensorcore m_tile=16,")
    assert any(line.startswith(f"[1/5] N={TC_N} K={TC_K} M=1 gemv rows=") for line in logs)
    assert any(line.startswith(f"N={TC_N} K={TC_K} M=16 tensorcore: best m_tile=") for line in logs)
    entry = TuningRecords(tmp_path).entry(TC_SPEC, GPU)
    assert entry.kernel == "tensorcore" and entry.tried_count == 5 and entry.default == space.default_config(TC_SPEC)

    second = CountingMeasure(fake_any_us)
    logs = []
    tune([TC_SPEC], SM90, second, tmp_path, budget=8, gpu=GPU, order="space", log=logs.append)
    assert [key for _, key in second.calls] == [space.config_key(c) for c in space.candidates(TC_SPEC)[5:8]]
    assert any(line == f"N={TC_N} K={TC_K} M=16 tensorcore: 5 candidates already tried "
                       f"({tmp_path / GPU / (TC_FORMAT + '.json')})" for line in logs)
    third = CountingMeasure(fake_any_us)
    (result,) = tune([TC_SPEC], SM90, third, tmp_path, budget=8, gpu=GPU, log=None)
    assert third.calls == [] and result.measured_now == 0
    best = min(space.candidates(TC_SPEC)[:8], key=fake_tc_us)
    assert TuningRecords(tmp_path).config_for(TC_SPEC, GPU) == best


def test_tune_records_tc_failures_and_model_order_stays_in_the_family(tmp_path, monkeypatch):
    """A tensor-core candidate that does not compile is recorded as failed; the cost model (fitted on
    tensor-core entries only: another shape's TC entry and this one) orders the rest deterministically."""
    cands = space.candidates(TC_SPEC)
    broken = cands[1]
    real_scheduled_func = driver.scheduled_func

    def scheduled_func(spec, target, config=None):
        if config == broken:
            raise ValueError("cannot schedule this\n  deep TVM detail")
        return real_scheduled_func(spec, target, config)

    monkeypatch.setattr(driver, "scheduled_func", scheduled_func)
    other = KernelSpec(TC_FORMAT, 512, TC_K, 16)
    runs = []
    for name in ("a", "b"):
        root = tmp_path / name
        tune([TC_SPEC1, other], SM90, CountingMeasure(fake_any_us), root, budget=10, gpu=GPU,
             order="space", log=None)
        measure = CountingMeasure(fake_any_us)
        tune([TC_SPEC], SM90, measure, root, budget=16, gpu=GPU, order="model", log=None)
        runs.append([key for _, key in measure.calls])
        entry = TuningRecords(root).entry(TC_SPEC, GPU)
        assert entry.failed == {space.config_key(broken):
                                "compile: ValueError: cannot schedule this ... deep TVM detail"}
    assert runs[0] == runs[1] and len(runs[0]) == 15
    assert runs[0] != [space.config_key(c) for c in cands[:16] if c != broken]  # the model reordered the search


# --- the mma.sync family (M = 2..16 of the row-packed formats) ------------------------------------------------

MMA_SPEC = KernelSpec(FORMAT, TC_N, TC_K, 16)
MMA_BEST = MmaConfig(units=4, tiles=4, warps_n=1, warps_k=2, unroll=2)


def fake_mma_us(cfg: MmaConfig) -> float:
    """A deterministic 'time' of an mma.sync config, best at tiles=4, warps_k=2, unroll=2."""
    return (4.0 + abs(math.log2(cfg.tiles) - 2) * 0.5 + abs(math.log2(cfg.warps_k) - 1) * 0.3
            + abs(math.log2(cfg.units) - 2) * 0.2 + (cfg.warps_n - 1) * 0.1 + (2 - cfg.unroll) * 0.05)


@pytest.mark.parametrize("name", ["int4-g128", "e8p-2"])
@pytest.mark.parametrize("m", [2, 16])
def test_mma_space_is_valid_bounded_and_starts_with_the_default(name, m):
    n, k = 1024, 4096  # room along K for every warps_k
    spec = KernelSpec(name, n, k, m)
    unit = qc_formats.get(name).decode_unit
    cands = space.candidates(spec)
    assert cands == space.candidates(spec) and library.kernel_family(name, m) == "mma"
    assert cands[0] == default_mma_config(n, k, m, unit) == space.default_config(spec)
    assert 20 <= len(cands) <= space.MAX_MMA_CANDIDATES
    keys = [space.config_key(c) for c in cands]
    assert len(set(keys)) == len(keys)
    bits = streamed_bits(qc_formats.get(name), n, k)
    assert bits == {"int4-g128": 4, "e8p-2": 2}[name]
    for cfg, key in zip(cands, keys):
        assert type(cfg) is MmaConfig and space.family_of(cfg) == "mma"
        check_mma_config(cfg, n, k, m, unit, staged_bits=bits)
        assert space.fit_error(cfg, n, k, m, unit, staged_bits=bits) is None
        assert space.config_from_key(key, "mma") == cfg
        assert cfg.units * unit <= space.MMA_MAX_SPAN
        assert space.MMA_MIN_WARPS <= cfg.warps_n * cfg.warps_k <= space.MMA_MAX_WARPS
    for knob in space.MMA_KNOB_VALUES:
        if knob != "units" or unit < 32:  # E8P's 32-column unit allows units 1 and 2 only
            assert len({getattr(c, knob) for c in cands}) > 1, knob
    dist = [space._distance(c, cands[0]) for c in cands]
    assert dist == sorted(dist)


@pytest.mark.parametrize("name", ["int4-g128", "e8p-2"])
@pytest.mark.parametrize("n, k", [(28672, 8192), (4096, 11008)])
def test_mma_space_above_m16_puts_the_defaults_wide_n_twins_first(name, n, k):
    """At M = 32 / 64 (one launch reads the activation tile through L2 once per row block) the default's
    twins with 2 and 4 warps across N come right after it: its other knobs, the most K warps that fit;
    at M=16 the space keeps warps_n <= 2 (measured slower there)."""
    fmt = qc_formats.get(name)
    unit = fmt.decode_unit
    for m in (32, 64):
        spec = KernelSpec(name, n, k, m)
        cands = space.candidates(spec)
        default, twins = cands[0], cands[1:3]
        assert [c.warps_n for c in twins] == [2, 4]
        for twin in twins:
            assert space.fit_error(twin, n, k, m, unit, staged_bits=streamed_bits(fmt, n, k)) is None
            assert {f: v for f, v in twin.as_dict().items() if f not in ("warps_n", "warps_k")} == \
                {f: v for f, v in default.as_dict().items() if f not in ("warps_n", "warps_k")}
            wider = MmaConfig(**{**twin.as_dict(), "warps_k": twin.warps_k * 2})
            assert space.fit_error(wider, n, k, m, unit, staged_bits=streamed_bits(fmt, n, k)) is not None or \
                wider.warps_n * wider.warps_k > space.MMA_MAX_WARPS
    assert max(c.warps_n for c in space.candidates(KernelSpec(name, n, k, 16))) <= 2


@pytest.mark.parametrize("name", ["qtip-hyb-2", "qtip-hyb-4"])
@pytest.mark.parametrize("n, k", [(28672, 8192), (8192, 28672), (4096, 4096)])
def test_mma_space_measures_hybs_seeds_right_after_the_default(name, n, k):
    """QTIP HYB's configs that won off the grid (HYB_SEEDS_*: 32 sign-folded lane copies at 32 K warps for
    M=1, staged activations beside 32 lane copies for M > 1) come right after the default, valid for the
    shape; other formats get none."""
    fmt = qc_formats.get(name)
    bits = streamed_bits(fmt, n, k)
    for m, seeds in ((1, space.HYB_SEEDS_M1), (16, space.HYB_SEEDS_MULTI)):
        cands = space.candidates(KernelSpec(name, n, k, m))
        assert len(set(cands)) == len(cands)
        for cand, override in zip(cands[1:1 + len(seeds)], seeds):
            assert {f: getattr(cand, f) for f in override} == override
            assert space.fit_error(cand, n, k, m, fmt.decode_unit, fragment=True, staged_bits=bits) is None
    e8p = space.mma_candidates(KernelSpec("e8p-2", n, k, 1), qc_formats.get("e8p-2"))
    assert all(c.lut_shared != 5 and c.warps_n * c.warps_k <= space.MMA_MAX_WARPS for c in e8p)


def test_mma_config_keys_round_trip_and_reject_nonsense():
    key = space.config_key(MMA_BEST)
    assert key == "units=4,tiles=4,warps_n=1,warps_k=2,unroll=2,lut_shared=1,stages=1,stage_pad=0"
    assert space.config_from_key(key, "mma") == MMA_BEST
    assert space.config_from_dict({"tiles": 1}, "mma") == MmaConfig(tiles=1)
    assert space.config_from_dict({"lut_shared": 0}, "mma") == MmaConfig(lut_shared=0)
    for bad in ({"tiles": 0}, {"tiles": 2.0}, {"unroll": True}, {"n_tile": 4}, {"lut_shared": -1}, [16]):
        with pytest.raises(ValueError) as info:
            space.config_from_dict(bad, "mma")
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown mma.sync knob"):
        space.config_from_key(space.config_key(TensorCoreConfig()), "mma")


def test_every_mma_candidate_schedules_and_some_compile():
    """Every candidate schedules with the grid and warps it asks for; the default and the farthest
    candidate compile for sm_90 into mma.sync with the format's decode intrinsic."""
    cands = space.candidates(MMA_SPEC)
    for cfg in cands:
        func = library.scheduled_func(MMA_SPEC, SM90, cfg)
        extents = thread_extents(func)
        assert extents["blockIdx.x"] == TC_N // (16 * cfg.tiles * cfg.warps_n), cfg
        assert (extents["threadIdx.x"], extents["threadIdx.y"], extents["threadIdx.z"]) == (32, cfg.warps_n,
                                                                                          cfg.warps_k), cfg
        assert extents.get("blockIdx.y", 1) == cfg.blocks_k, cfg
    assert {c.blocks_k for c in cands} == {1, 2, 4}
    for cfg in (cands[0], cands[-1]):
        source = library.cuda_source(library.build([MMA_SPEC], SM90, lambda s: cfg))
        assert "mma.sync.aligned.m16n8k16" in source and "qc_decode_int4x8_f16(" in source
        assert f"__launch_bounds__({cfg.threads}) {MMA_SPEC.name}_kernel(" in source


def test_a_late_knob_is_keyed_only_off_its_default():
    """MmaConfig.blocks_k and min_blocks came after the shipped records: at its default the key and the stored dict are
    what they were before it (the shipped files keep their bytes); off it, both name it and read back."""
    base = MmaConfig(units=4, tiles=4, warps_n=1, warps_k=2, unroll=2)
    assert space.config_key(base) == "units=4,tiles=4,warps_n=1,warps_k=2,unroll=2,lut_shared=1,stages=1,stage_pad=0"
    assert "blocks_k" not in space.config_values(base)
    split = MmaConfig(**{**base.as_dict(), "blocks_k": 2})
    assert space.config_key(split).endswith(",blocks_k=2") and space.config_values(split)["blocks_k"] == 2
    bounded = MmaConfig(**{**base.as_dict(), "min_blocks": 3})
    assert space.config_key(bounded).endswith(",stage_pad=0,min_blocks=3")
    for cfg in (base, split, bounded):
        assert space.config_from_key(space.config_key(cfg), "mma") == cfg
        assert space.config_from_dict(space.config_values(cfg), "mma") == cfg


def test_records_round_trip_with_an_mma_entry_and_build_applies_it(tmp_path):
    records = TuningRecords(tmp_path)
    spec1 = KernelSpec(FORMAT, TC_N, TC_K, 1)
    default16 = space.default_config(MMA_SPEC)
    mma = tc_entry(MMA_SPEC, times={default16: 7.5, MMA_BEST: 6.0})
    mma.add_failure(MmaConfig(units=8, tiles=1, warps_n=2, warps_k=2), "compile: boom")
    records.save(mma)
    path = records.save(make_entry(spec1, times={BEST: 9.0}))
    stored = {e["m"]: e for e in json.loads(path.read_text())["entries"]}
    # (blocks_k, min_blocks and x_staged, knobs added after records shipped, are written only off their
    # defaults)
    written = {name: v for name, v in MMA_BEST.as_dict().items()
               if name not in ("blocks_k", "min_blocks", "x_staged")}
    assert stored[16]["kernel"] == "mma" and stored[16]["best"] == {"config": written, "us": 6.0}
    assert list(named_candidates(stored[16], "failed")) == ["units=8,tiles=1,warps_n=2,warps_k=2,unroll=1,lut_shared=1,stages=1,stage_pad=0"]
    back = TuningRecords(tmp_path)
    assert back.entry(MMA_SPEC, GPU) == mma and back.config_for(MMA_SPEC, GPU) == MMA_BEST
    for other in (KernelSpec(FORMAT, TC_N, TC_K, 8), KernelSpec("e8p-2", TC_N, TC_K, 16),
                  KernelSpec(FORMAT, 512, TC_K, 16)):
        assert back.config_for(other, GPU) is None
    assert back.config_for(MMA_SPEC, "a100") is None
    source = library.cuda_source(library.build([spec1, MMA_SPEC], SM90, back.lookup(GPU)))
    bounds = dict((name, int(n)) for n, name in re.findall(r"__launch_bounds__\((\d+)\) (\w+)_kernel\(", source))
    assert bounds == {spec1.name: BEST.rows * BEST.threads_k, MMA_SPEC.name: MMA_BEST.threads}
    # a tensor-core entry for the bucket (the family before mma.sync ran it) is kept, never applied
    path.write_text(path.read_text().replace('"kernel": "mma"', '"kernel": "tensorcore"'))
    stale = TuningRecords(tmp_path, warn=pytest.fail)
    with pytest.raises(RecordsError):  # an MmaConfig's knobs read as tensor-core knobs: refused on load
        stale.entry(MMA_SPEC, GPU, "tensorcore")


def test_mma_records_reach_m64_for_row_packed_formats_only(tmp_path):
    """An mma.sync entry of int4 at M=64 (one launch) round-trips; M=65, or a QTIP HYB mma entry at
    M=32 (its mma buckets end at 16), makes the file damaged (one-line RecordsError)."""
    from qcompile.tune.records import read_records_file

    spec64 = KernelSpec(FORMAT, TC_N, TC_K, 64)
    records = TuningRecords(tmp_path)
    path = records.save(tc_entry(spec64, times={space.default_config(spec64): 9.0}))
    assert read_records_file(path, GPU, FORMAT)[(TC_N, TC_K, 64, *current_versions(), "mma")].m == 64
    assert TuningRecords(tmp_path).config_for(spec64, GPU) == space.default_config(spec64)
    path.write_text(path.read_text().replace('"m": 64', '"m": 65'))
    with pytest.raises(RecordsError, match="M > 64 has no mma.sync config"):
        read_records_file(path, GPU, FORMAT)
    hyb = KernelSpec("qtip-hyb-2", 256, 512, 16)
    hyb_path = records.save(tc_entry(hyb, times={space.default_config(hyb): 5.0}))
    read_records_file(hyb_path, GPU, "qtip-hyb-2")
    hyb_path.write_text(hyb_path.read_text().replace('"m": 16', '"m": 32'))
    with pytest.raises(RecordsError, match="M > 16 has no mma.sync config"):
        read_records_file(hyb_path, GPU, "qtip-hyb-2")


def test_tune_covers_the_mma_bucket_and_never_remeasures(tmp_path):
    logs = []
    first = CountingMeasure()
    results = tune([MMA_SPEC], SM90, first, tmp_path, budget=6, gpu=GPU, order="space", log=logs.append)
    assert results[0].entry.kernel == "mma"
    assert [key for _, key in first.calls] == [space.config_key(c) for c in space.candidates(MMA_SPEC)[:6]]
    assert any(line.startswith(f"[1/6] N={TC_N} K={TC_K} M=16 mma units=") for line in logs)
    again = CountingMeasure()
    (result,) = tune([MMA_SPEC], SM90, again, tmp_path, budget=6, gpu=GPU, log=None)
    assert again.calls == [] and result.measured_now == 0
    model = CountingMeasure()
    tune([MMA_SPEC], SM90, model, tmp_path, budget=30, gpu=GPU, order="model", log=None)
    assert len(model.calls) == 24
    best = min(space.candidates(MMA_SPEC)[:6] + [space.config_from_key(k, "mma") for _, k in model.calls],
               key=fake_mma_us)
    assert TuningRecords(tmp_path).config_for(MMA_SPEC, GPU) == best


# --- command line -------------------------------------------------------------------------------------------

def test_cli_tune_without_a_gpu_exits_2_with_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "qcompile", "tune", "--format", FORMAT, "--shapes", f"{N}x{K}",
                           "--m", "1,4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: qcompile tune measures candidates on a CUDA GPU")


def test_cli_tune_and_build_bad_arguments(tmp_path, capsys):
    assert cli_main(["tune", "--format", "int4-g99", "--shapes", "256x1024"]) == 2
    assert cli_main(["tune", "--format", FORMAT, "--shapes", "256x100"]) == 2
    assert cli_main(["tune", "--format", FORMAT, "--shapes", "256by1024"]) == 2
    assert cli_main(["tune", "--format", FORMAT, "--shapes", "256x1024", "--jobs", "0"]) == 2
    assert cli_main(["build", "-f", FORMAT, "-t", "h100", "-o", str(tmp_path / "o"),
                     "--records", str(tmp_path / "nowhere")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 5 and all(line.startswith("error: ") for line in errors)
    assert "--jobs 0" in errors[3]
    assert "does not exist" in errors[-1]


# --- alternative families: the tuner may move a bucket to another family that can run it ----------------------

def test_family_options_and_alternative_configs_schedule():
    """mma.sync can also run M=1 of int4/E8P/HYB; QTIP 1MAD/3INST's M = 2..7 can run on the GEMV or
    the WMMA kernel; a config of an option picks its family, any other family is refused in one line."""
    from qcompile.kernels.library import family_options

    assert family_options(FORMAT, 1) == ("gemv", "mma") and family_options(FORMAT, 4) == ("mma",)
    assert family_options("qtip-hyb-2", 1) == ("mma", "gemv") and family_options("qtip-hyb-2", 16) == ("mma",)
    assert family_options("qtip-1mad-2", 4) == ("gemv", "tensorcore")
    assert family_options("qtip-3inst-2", 4) == ("tensorcore", "gemv")
    assert family_options("qtip-1mad-2", 16) == ("tensorcore",) and family_options(FORMAT, 128) == ("gemm",)
    spec1 = KernelSpec(FORMAT, TC_N, TC_K, 1)
    mma1 = space.default_config(spec1, "mma")
    assert isinstance(mma1, MmaConfig) and space.candidates(spec1, "mma")[0] == mma1
    src = library.cuda_source(library.build([spec1], SM90, lambda s: mma1))
    assert "mma.sync.aligned.m16n8k16" in src
    tc4 = space.default_config(KernelSpec("qtip-1mad-2", TC_N, TC_K, 4), "tensorcore")
    assert "wmma.matrix_a" in library.scheduled_func(KernelSpec("qtip-1mad-2", TC_N, TC_K, 4), SM90, tc4).script()
    with pytest.raises(QCompileError, match="cannot run on the gemv family"):
        space.candidates(KernelSpec(FORMAT, TC_N, TC_K, 4), "gemv")
    with pytest.raises(ValueError, match="takes an MmaConfig; got a GemvConfig"):
        library.scheduled_func(KernelSpec(FORMAT, TC_N, TC_K, 4), SM90, GemvConfig())


def test_tune_alternatives_and_build_takes_the_faster_family(tmp_path):
    """With alternatives, M=1 of int4 is tuned on the GEMV (budget) and on mma.sync (a quarter of it),
    into two entries; the build takes the mma.sync config where its best beat the GEMV's, the GEMV's
    where it did not, and never an alternative without the default family's entry beside it."""
    spec = KernelSpec(FORMAT, TC_N, TC_K, 1)

    def measure_with(mma_us):
        return CountingMeasure(lambda cfg: mma_us if isinstance(cfg, MmaConfig) else fake_us(cfg))

    fast = measure_with(1.0)  # mma.sync faster than every GEMV config (>= 10 us)
    results = tune([spec], SM90, fast, tmp_path / "a", budget=8, gpu=GPU, order="space", log=None, alternatives=True)
    assert [r.entry.kernel for r in results] == ["gemv", "mma"]
    assert [r.measured_now for r in results] == [8, 2]
    records = TuningRecords(tmp_path / "a")
    assert records.entry(spec, GPU, "mma").tried_count == 2
    assert isinstance(records.config_for(spec, GPU), MmaConfig)
    src = library.cuda_source(library.build([spec], SM90, records.lookup(GPU)))
    assert "mma.sync.aligned.m16n8k16" in src

    slow = measure_with(99.0)
    tune([spec], SM90, slow, tmp_path / "b", budget=8, gpu=GPU, order="space", log=None, alternatives=True)
    assert isinstance(TuningRecords(tmp_path / "b").config_for(spec, GPU), GemvConfig)

    only_alt = measure_with(1.0)  # an mma.sync entry alone: not known to beat the default route
    TuningRecords(tmp_path / "c").save(TuningEntry(FORMAT, GPU, TC_N, TC_K, 1, *current_versions(),
                                                   default=space.default_config(spec, "mma"),
                                                   measured_us={space.config_key(space.default_config(spec, "mma")): 1.0}))
    assert TuningRecords(tmp_path / "c").config_for(spec, GPU) is None and not only_alt.calls
    # without alternatives (the default) only the bucket's own family is tuned
    plain = CountingMeasure()
    assert len(tune([spec], SM90, plain, tmp_path / "d", budget=3, gpu=GPU, log=None)) == 1
    assert plain.calls and all(key.startswith("rows=") for _, key in plain.calls)  # GEMV configs only


def test_import_sweep_adds_plain_measured_rows_to_the_records(tmp_path, capsys):
    """tc_sweep rows join the records as tuner measurements: only plain rows (not the library default,
    a --flag or --plain-decode build, a failed row), only kernels whose rows timed today's default,
    only rows whose fingerprint (where given) is today's kernel; a config already measured keeps its
    recorded time; the GPU comes from the row or --gpu."""
    from qcompile.tune.records import kernel_code
    from qcompile.tune.sweep_import import import_sweep, read_sweep_rows

    spec = KernelSpec("qtip-hyb-2", 1024, 2048, 16)
    default = space.default_config(spec, "mma")
    better, flagged = [c for c in space.candidates(spec, "mma") if c != default][:2]

    def row(cfg, us, **extra):
        return {"format": spec.format, "N": spec.n, "K": spec.k, "M": spec.m, "kernel": "mma-x",
                "cfg": None if cfg is None else cfg.as_dict(), "intrin": True, "us": us, "error": None, **extra}

    rows = [row(None, 1.0, kernel="library-default", intrin=None), row(default, 10.0), row(better, 8.0),
            row(flagged, 1.0, intrin=["flags", "lane-copy-min"]), row(flagged, 2.0, intrin=False),
            row(flagged, None, error="launch failed")]
    with pytest.raises(QCompileError, match="--gpu"):
        import_sweep(TuningRecords(tmp_path / "r"), rows)
    records = TuningRecords(tmp_path / "r")
    lines = import_sweep(records, rows, GPU)
    assert len(lines) == 1 and "2 measurement(s) added" in lines[0]
    entry = TuningRecords(tmp_path / "r").entry(spec, GPU, "mma")
    assert entry.measured_us == {space.config_key(default): 10.0, space.config_key(better): 8.0}
    assert not entry.stale_code() and entry.code is not None
    assert TuningRecords(tmp_path / "r").config_for(spec, GPU) == better
    # again, faster: the recorded time stays; a row of another kernel's fingerprint is skipped
    again = [row(default, 10.0, gpu=GPU), row(better, 5.0, gpu=GPU),
             row(flagged, 1.0, gpu=GPU, code="0" * 16)]
    lines = import_sweep(TuningRecords(tmp_path / "r"), again)
    assert any("no longer generates" in line for line in lines)
    assert TuningRecords(tmp_path / "r").entry(spec, GPU, "mma").measured_us[space.config_key(better)] == 8.0
    today = row(flagged, 9.0, gpu=GPU, code=kernel_code(spec, GPU, [flagged]))
    import_sweep(TuningRecords(tmp_path / "r"), [row(default, 10.0), today], GPU)
    assert TuningRecords(tmp_path / "r").entry(spec, GPU, "mma").measured_us[space.config_key(flagged)] == 9.0
    # a sweep that did not time the default adds nothing
    lines = import_sweep(TuningRecords(tmp_path / "s"), [row(better, 8.0)], GPU)
    assert "did not time today's default" in lines[0] and not (tmp_path / "s").exists()
    with pytest.raises(QCompileError, match="measured on a100"):
        import_sweep(TuningRecords(tmp_path / "s"), [row(default, 1.0, gpu="a100")], GPU)
    # files and the command line
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps(rows))
    assert read_sweep_rows(sweep) == rows
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(QCompileError, match="not a JSON file"):
        read_sweep_rows(tmp_path / "bad.json")
    assert cli_main(["tune", "--import-sweep", str(sweep), "--gpu", GPU, "--records", str(tmp_path / "cli")]) == 0
    assert "2 measurement(s) added" in capsys.readouterr().out
    assert TuningRecords(tmp_path / "cli").config_for(spec, GPU) == better
    assert cli_main(["tune", "--import-sweep", str(sweep), "--shapes", "1024x2048", "--gpu", GPU]) == 2
    assert "takes no --shapes" in capsys.readouterr().err
    assert cli_main(["tune", "--gpu", GPU, "--shapes", "1024x2048", "--format", "int4-g128"]) == 2
    assert "--gpu names the GPU of an --import-sweep file" in capsys.readouterr().err


def test_tc_sweep_rows_carry_what_import_sweep_checks(tmp_path):
    """tc_sweep's rows (``sweep_row``, before the GPU fills in the time) name their GPU and, for plain
    configs, today's kernel fingerprint: such rows import; a switched build carries no fingerprint and is
    left out; a row whose fingerprint is not today's is skipped."""
    from qcompile.bench.tc_sweep import sweep_row
    from qcompile.tune.sweep_import import import_sweep

    fmt = qc_formats.get("qtip-hyb-2")
    spec = KernelSpec(fmt.name, 1024, 2048, 16)
    default = space.default_config(spec, "mma")
    other = next(c for c in space.candidates(spec, "mma") if c != default)
    rows = [sweep_row(fmt, spec.n, spec.k, spec.m, label, cfg, intrin, 50.0, GPU)
            for label, cfg, intrin in (("mma-default", default, True), ("mma-1", other, True),
                                       ("mma-1-lane-copy-min", other, ("flags", "lane-copy-min")))]
    assert [row["gpu"] for row in rows] == [GPU] * 3 and "code" not in rows[2]
    assert rows[0]["code"] and rows[0]["code"] != rows[1]["code"]
    for row, us in zip(rows, (10.0, 9.0, 1.0)):
        row["us"] = us
    stale = dict(rows[1], code="f" * 16)
    lines = import_sweep(TuningRecords(tmp_path), rows[:1] + [stale] + rows[2:])
    assert any("no longer generates" in line for line in lines)
    import_sweep(TuningRecords(tmp_path), rows)
    entry = TuningRecords(tmp_path).entry(spec, GPU, "mma")
    assert entry.measured_us == {space.config_key(default): 10.0, space.config_key(other): 9.0}
