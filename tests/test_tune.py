"""Tuning (CPU side): the GEMV search space, the record database, the resumable driver with a fake
measure function, records reaching `build`, and `qcompile tune` without a GPU."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qcompile.cli import main as cli_main
from qcompile.errors import QCompileError
from qcompile.kernels import library
from qcompile.kernels.library import KernelSpec, default_gemv_config
from qcompile.kernels.schedules import GemvConfig
from qcompile.kernels.target import parse_target
from qcompile.tune import driver, space
from qcompile.tune.driver import CandidateError, tune
from qcompile.tune.records import (SCHEMA, RecordsError, TuningEntry, TuningRecords, TuningRecordsWarning,
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


class CountingMeasure:
    def __init__(self, fn=fake_us):
        self.fn, self.calls = fn, []

    def __call__(self, spec, cfg, kernel):
        assert callable(kernel)  # the compiled TVM function
        self.calls.append((spec, space.config_key(cfg)))
        return self.fn(cfg)


def thread_extents(func) -> dict:
    """{thread tag: extent} of a scheduled PrimFunc (blockIdx.x, threadIdx.x, threadIdx.y)."""
    pairs = re.findall(r'T\.thread_binding\((\d+), thread="([\w.]+)"\)', func.script())
    return {tag: int(extent) for extent, tag in pairs}


# --- the space -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 4])
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
        space.candidates(KernelSpec(FORMAT, N, K, 64))
    with pytest.raises(QCompileError, match="group"):
        space.candidates(KernelSpec(FORMAT, N, 100, 1))


def _compiles_as_configured(spec, cfg):
    func = library.scheduled_func(spec, SM90, cfg)
    assert thread_extents(func) == {"blockIdx.x": spec.n // (cfg.rows * cfg.row_tile),
                                    "threadIdx.y": cfg.rows, "threadIdx.x": cfg.threads_k}
    source = library.cuda_source(library.build([spec], SM90, lambda s: cfg))
    assert f"__launch_bounds__({cfg.rows * cfg.threads_k})" in source


@pytest.mark.parametrize("m", [1, 4])
def test_sampled_space_compiles_for_sm90(m):
    spec = KernelSpec(FORMAT, N, K, m)
    cands = space.candidates(spec)
    for cfg in cands[:3] + cands[3::40]:  # the default, its nearest neighbours, a spread of the rest
        _compiles_as_configured(spec, cfg)


@pytest.mark.parametrize("m", [1, 4])
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
@pytest.mark.parametrize("m", [1, 2, 4])
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
    assert text == json.dumps(doc, indent=1, sort_keys=True) + "\n"
    assert doc["schema"] == SCHEMA and doc["gpu"] == GPU and doc["format"] == FORMAT
    (stored,) = doc["entries"]
    assert stored["best"] == {"config": BEST.as_dict(), "us": 9.25}
    assert stored["default"] == {"config": space.default_config(spec).as_dict(), "us": 12.5}
    assert stored["failed"] == {"rows=8,threads_k=64,chunks=1,unroll=1,row_tile=1,lut_shared=1,lut_lanes=0": "compile: boom line 2"}
    back = records.entry(spec, GPU)
    assert back == entry and back.best() == (BEST, 9.25) and back.default_us == 12.5
    assert records.config_for(spec, GPU) == BEST


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
        measured_us={"rows=3,threads_k=32,chunks=1,unroll=1,row_tile=2,lut_shared=1": 9.0})), "does not fit"),
    "entries missing": (_corrupt(lambda d: d.pop("entries")), "entries must be a list"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_damaged_records_warn_once_and_fall_back_to_defaults(tmp_path, name):
    corrupt, expected = CORRUPTIONS[name]
    spec = KernelSpec(FORMAT, N, K, 1)
    path = TuningRecords(tmp_path).save(make_entry(spec, times={BEST: 9.0}))
    corrupt(path)
    records = TuningRecords(tmp_path)
    with pytest.warns(TuningRecordsWarning) as caught:
        assert records.config_for(spec, GPU) is None
        assert records.config_for(KernelSpec(FORMAT, N, K, 4), GPU) is None  # same file: no second warning
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
    default4 = default_gemv_config(N, K, 4)
    assert sorted(set(bounds)) == sorted({(str(BEST.rows * BEST.threads_k), spec1.name),
                                          (str(default4.rows * default4.threads_k), spec4.name)})
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
    said = []
    out = build(default_model, FORMAT, "h100", tmp_path / "art", buckets=(1, 4), progress=said.append,
                records=tmp_path / "rec")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tuned_kernels"] == {spec.name: space.config_key(tuned)}
    assert any(line.startswith("tuned schedules for 1 of ") for line in said)
    source = (out / "kernels.cu").read_text()
    assert f"__launch_bounds__(64) {spec.name}_kernel(" in source
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


def test_tune_resumes_after_an_interrupt_and_never_remeasures(tmp_path):
    spec = KernelSpec(FORMAT, N, K, 4)

    class Interrupted(CountingMeasure):
        def __call__(self, spec, cfg, kernel):
            if len(self.calls) == 5:
                raise KeyboardInterrupt
            return super().__call__(spec, cfg, kernel)

    first = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        tune([spec], SM90, first, tmp_path, budget=16, gpu=GPU, log=None)
    assert TuningRecords(tmp_path).entry(spec, GPU).tried_count == 5  # all but the one in flight

    second = CountingMeasure()
    tune([spec], SM90, second, tmp_path, budget=16, gpu=GPU, log=None)
    assert len(second.calls) == 11
    assert not set(first.calls) & set(second.calls)
    third = CountingMeasure()
    (result,) = tune([spec], SM90, third, tmp_path, budget=16, gpu=GPU, log=None)
    assert third.calls == [] and result.measured_now == 0  # a second run with records measures nothing
    more = CountingMeasure()
    tune([spec], SM90, more, tmp_path, budget=20, gpu=GPU, log=None)  # a larger budget continues
    assert len(more.calls) == 4 and not set(more.calls) & (set(first.calls) | set(second.calls))


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
    results = tune([KernelSpec(FORMAT, N, K, 1), KernelSpec(FORMAT, N, K, 64)], SM90, measure, tmp_path,
                   budget=50, time_budget_s=3, gpu=GPU, log=logs.append, clock=lambda: next(ticks))
    # the clock reads 0 at the start, then 1, 2, 3 before each candidate: two fit in 3 s
    assert len(measure.calls) == 2 and any("time budget of 3 s reached" in line for line in logs)
    assert results[1].skipped and results[1].entry is None
    assert any(line.startswith(f"skip N={N} K={K} M=64: GEMM") for line in logs)
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
    best = min(space.candidates(spec), key=fake_us)
    assert TuningRecords(tmp_path / "a").entry(spec, GPU).best()[0] == best


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
    assert cli_main(["build", "-f", FORMAT, "-t", "h100", "-o", str(tmp_path / "o"),
                     "--records", str(tmp_path / "nowhere")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors)
    assert "does not exist" in errors[-1]
