"""CPU checks of tests/gpu/wgmma_probe.py, the Hopper wgmma GEMM that M=1024 is to run on: its layout math is
self-consistent, and its fp16 and int4 variants (also warp-specialised) still generate wgmma code that ptxas takes for sm_90a with
no spills and no local-memory arrays (the register copies of prefetched words must stay registers). Its
numbers come from the GPU (`--check`, device_run.sh py); nothing here times or runs it."""
import importlib.util
import os
import re
import shutil

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "gpu", "wgmma_probe.py")


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("wgmma_probe", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_layout_selftest_passes(probe, capsys):
    assert probe.layout_selftest() is True
    assert "PASS" in capsys.readouterr().out


CONFIGS = [
    dict(BN=128, stages=4),  # fp16 B by cp.async
    dict(BN=256, stages=4, quant="int4-g128", qprefetch=2, qvec=4, qintrin=1),
    dict(BN=128, stages=3, wg_inflight=0, quant="int4-g128", qprefetch=0),
    dict(BN=256, stages=4, ws=1),  # warp-specialised, fp16
    dict(BN=256, stages=4, quant="int4-g128", qprefetch=2, qvec=4, qintrin=1, ws=1),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_probe_generates_wgmma_that_ptxas_takes(probe, cfg):
    m, n, k = 256, 512, 1024
    src = probe.cuda_source(probe.compile_func(probe.build(m, n, k, **cfg)))
    bn = cfg["BN"]
    # four k16 steps of one 64-row slab a k tile, unrolled; the loop is unrolled by the prefetch depth
    steps = 4 * max(1, cfg.get("qprefetch", 1) if cfg.get("quant") and not cfg.get("ws") else 1)
    assert len(re.findall(rf"wgmma_f16_ss_mma_async_sync_aligned_m64n{bn}k16_f32_f16_f16_\w+\(acc_ptr\[0\]", src)) == steps
    assert re.search(r"cp_async\w*shared_global_16\(", src)
    if cfg.get("ws"):  # the stage hand-over is by named barriers, not __syncthreads
        assert "bar.sync %0, %1;" in src and "bar.arrive %0, %1;" in src and "__syncthreads" not in src
    if cfg.get("qintrin"):
        assert "qc_decode_int4x8_f16(" in src and "lop3.b32" in src  # the format's intrinsic, its source imported
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: the generated source was checked, ptxas not run")
    ok, report, _ = probe.ptxas_report(src)
    assert ok, report[-2000:]
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in report, report[-2000:]


def test_word_vectors_must_divide_a_threads_words(probe):
    # BN=128 with two warpgroups: four words a thread a k tile, so eight at once cannot be
    with pytest.raises(AssertionError):
        probe.build(256, 512, 1024, BN=128, quant="int4-g128", qvec=8)
