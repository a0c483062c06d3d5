"""qcompile bench's control flow on the CPU: run_bench with the CUDA calls stood in for (device
queries, timing) and the kernels compiled for llvm. The bench itself only runs on a GPU, so without
this its route logic was checked only there (a shadowed name broke every M > 16 until an H100 run
showed it). The timings here are fake; what is checked is that every route runs, is labelled as the
runtime takes it, and computes the layer."""
import types

import pytest
import torch

from qcompile.bench import harness, timing

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="with a GPU, tests/gpu/test_bench_gpu.py runs the real bench")

FAKE_US = 7.0


class _FakeCuda:
    """torch.cuda as run_bench uses it, on the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    def is_available(self):
        return True

    def get_device_name(self, device=None):
        return "NVIDIA H100 80GB HBM3"

    def mem_get_info(self, device=None):
        return 8 << 30, 80 << 30

    def synchronize(self, *args):
        pass

    def empty_cache(self):
        pass


class _CpuTorch(types.ModuleType):
    """torch with a CPU 'cuda' device: tensors made for "cuda" land on the CPU."""

    def __init__(self):
        super().__init__("torch_on_cpu")
        self.cuda = _FakeCuda()

    def __getattr__(self, name):
        return getattr(torch, name)

    def device(self, *args, **kwargs):
        return torch.device("cpu")


@pytest.fixture
def cpu_bench(monkeypatch):
    launches = []

    def fake_time_cuda(launch, iters=200, warmup=10, mode="graph", period=1):
        launch(0)  # the method runs (an exception here is the bench's to handle, as on the GPU)
        launches.append(mode)
        return timing.Timing(FAKE_US, FAKE_US, FAKE_US, iters, mode)

    monkeypatch.setattr(harness, "require_cuda", lambda: _CpuTorch())
    monkeypatch.setattr(timing, "time_cuda", fake_time_cuda)
    monkeypatch.setattr(timing, "copy_bandwidth_GBps", lambda nbytes, iters=20, device="cuda": 3000.0)
    monkeypatch.setattr(timing, "l2_cache_bytes", lambda device=None: 1 << 20)
    return launches


@pytest.mark.parametrize("name, ms, routes", [
    ("int4-g128", (1, 16, 48, 256), ["fused", "fused", "split", "decode_cublas"]),
    ("qtip-hyb-2", (1, 4, 64, 80), ["fused", "fused", "split", "decode_cublas"]),
])
def test_every_route_runs_and_is_labelled_as_the_runtime_takes_it(cpu_bench, name, ms, routes):
    doc = harness.run_bench(name, [(256, 1024)], list(ms), iters=2, warmup=1, log=lambda text: None)
    harness.check_bench_document(doc)
    plan = harness.bench_plan(name, ms)
    assert [r["route"] for r in doc["records"]] == routes == [plan.route(m) for m in ms]
    for r in doc["records"]:
        assert r["rel_err"] is not None and r["rel_err"] < 1e-2, r  # the llvm kernels computed the layer
        assert r["us"] == FAKE_US and r["cublas_fp16_us"] == FAKE_US
    split = doc["records"][2]  # the split M also timed the decode route beside it (recorded as measured)
    assert split["decode_cublas_us"] == FAKE_US and split["decode_exact"] is True
    assert cpu_bench  # the fake timer was used


def test_a_low_decode_threshold_routes_small_batches_to_the_decode(cpu_bench):
    doc = harness.run_bench("qtip-hyb-2", [(256, 1024)], [1, 4], iters=2, warmup=1, decode_min_m=4,
                            log=lambda text: None)
    assert [r["route"] for r in doc["records"]] == ["fused", "decode_cublas"]
    assert all(r["rel_err"] < 1e-2 for r in doc["records"])


def test_with_records_the_tuned_rows_also_time_their_default_config_twins(cpu_bench, monkeypatch, tmp_path):
    # a record "applies" to the M=16 bucket (the fused route) and to the 32-row mma bucket a split
    # route launches; the llvm build ignores the configs, so only the bench's bookkeeping is checked
    from qcompile.kernels.mma import MmaConfig
    from qcompile.tune import records

    tuned_ms = {16, 32}
    monkeypatch.setattr(records.TuningRecords, "lookup", lambda self, gpu: (
        lambda spec: MmaConfig(units=4, tiles=1, warps_k=4) if spec.m in tuned_ms else None))
    builds = []  # (specs, with configs?) of every build_kernels call
    real_build = harness.build_kernels

    def build_kernels(specs, target, log, config_for=None):
        builds.append((sorted(getattr(s, "m", 0) for s in specs), config_for is not None))
        return real_build(specs, target, log, config_for)

    monkeypatch.setattr(harness, "build_kernels", build_kernels)
    kw = dict(iters=2, warmup=1, log=lambda text: None, records_dir=tmp_path)
    doc = harness.run_bench("int4-g128", [(256, 1024)], [1, 16, 24, 32], **kw)
    harness.check_bench_document(doc)
    assert builds[1] == ([16, 32], False)  # the twins: exactly the tuned kernels, default configs
    by_m = {r["M"]: r for r in doc["records"]}
    assert [by_m[m]["route"] for m in (1, 16, 24, 32)] == ["fused", "fused", "split", "split"]
    assert "untuned_us" not in by_m[1]  # nothing tuned there: one kernel, timed once
    assert by_m[16]["untuned_us"] == FAKE_US and by_m[16]["tuned_config"] == MmaConfig(units=4, tiles=1, warps_k=4).as_dict()
    assert by_m[24]["untuned_us"] == FAKE_US  # the split route's tuned 32-row launch, with its default twin
    # the twins computed the layer too, into their own outputs (M=24: a padded launch, its rows copied
    # back; M=32: one whole launch writing the output directly)
    assert all(by_m[m]["untuned_rel_err"] < 1e-2 for m in (16, 24, 32))
    assert all(r["rel_err"] < 1e-2 for r in doc["records"])
    # --no-untuned (untuned=False): the tuned kernels only
    doc = harness.run_bench("int4-g128", [(256, 1024)], [16], untuned=False, **kw)
    assert "untuned_us" not in doc["records"][0]


def test_no_untuned_needs_records():
    with pytest.raises(harness.QCompileError, match="--no-untuned only applies with --records"):
        harness.main(["--no-untuned", "--format", "int4-g128", "--shapes", "256x1024", "--m", "1"])
