"""Tuning on the GPU: CudaMeasure times a correct candidate, refuses a wrong one, and a short tuning
run writes a record that build then applies."""
import pytest

from qcompile.kernels.library import KernelSpec
from qcompile.kernels.target import parse_target
from qcompile.tune import space
from qcompile.tune.driver import CandidateError, compile_candidate, tune
from qcompile.tune.records import TuningRecords, local_gpu_name

pytestmark = pytest.mark.gpu
FMT = "int4-g128"


@pytest.fixture(scope="module")
def measure():
    from qcompile.tune.measure import CudaMeasure

    return CudaMeasure(iters=20, warmup=2)


def test_cuda_measure_times_a_candidate_and_refuses_a_wrong_one(measure):
    spec = KernelSpec(FMT, 1024, 1024, 4)
    target = parse_target("auto")
    cfg = space.candidates(spec)[1]
    us = measure(spec, cfg, compile_candidate(spec, target, cfg))
    assert 0 < us < 1000

    def writes_nothing(X, *tensors_and_Y):
        pass

    with pytest.raises(CandidateError, match="NaN"):
        measure(spec, cfg, writes_nothing)


def test_short_tuning_run_writes_a_record_build_applies(measure, tmp_path):
    spec = KernelSpec(FMT, 1024, 1024, 1)
    target = parse_target("auto")
    gpu = local_gpu_name()
    (result,) = tune([spec], target, measure, tmp_path, budget=3, gpu=gpu, log=None)
    assert result.measured_now == 3 and len(result.entry.measured_us) == 3
    assert TuningRecords(tmp_path).config_for(spec, gpu) == result.best[0]
    (again,) = tune([spec], target, measure, tmp_path, budget=3, gpu=gpu, log=None)
    assert again.measured_now == 0


@pytest.mark.parametrize("fmt, family", [("qtip-1mad-2", "tensorcore"), (FMT, "mma")])
def test_short_low_batch_tuning_run_writes_a_record_build_applies(measure, tmp_path, fmt, family):
    """M=16 runs on the WMMA kernel (QTIP) or the mma.sync kernel (row-packed formats): the same
    measure times its candidates (each checked against the float64 reference first) and the record
    holds that family's configs."""
    from qcompile.tune.space import CONFIG_CLASS

    spec = KernelSpec(fmt, 1024, 1024, 16)
    target = parse_target("auto")
    gpu = local_gpu_name()
    (result,) = tune([spec], target, measure, tmp_path, budget=3, gpu=gpu, order="space", log=None)
    assert result.entry.kernel == family and result.entry.tried_count == 3
    assert result.entry.default_us is not None, result.entry.failed  # the default kernel runs and is right
    assert isinstance(result.best[0], CONFIG_CLASS[family])
    assert TuningRecords(tmp_path).config_for(spec, gpu) == result.best[0]
    (again,) = tune([spec], target, measure, tmp_path, budget=3, gpu=gpu, log=None)
    assert again.measured_now == 0
