"""CPU checks of qcompile.kernels.wgmma, the Hopper wgmma GEMM that M=1024 is to run on: its layout math is
self-consistent; its fp16 and int4 variants (also warp-specialised) generate wgmma code that ptxas takes for
sm_90a with no spills and no local-memory arrays (the register copies of prefetched words must stay
registers); a config that cannot build is refused with one line. Its numbers come from the GPU
(tests/gpu/wgmma_probe.py --check); nothing here times or runs it."""
import importlib.util
import os
import re
import shutil

import pytest

import qcompile as qc
from qcompile.errors import QCompileError
from qcompile.kernels.resources import kernel_resources
from qcompile.kernels.wgmma import WGMMA_ARCH, WgmmaConfig, check_wgmma_config, layout_selftest, smem_bytes, \
    wgmma_gemm_func


def test_layout_selftest_passes():
    assert layout_selftest() is True


def _cuda(func):
    import tvm

    ex = tvm.compile(tvm.IRModule({func.attrs["global_symbol"]: func}),
                     target=tvm.target.Target({"kind": "cuda", "arch": WGMMA_ARCH}))
    return ex.mod.imports[0].inspect_source()


CONFIGS = [
    (None, WgmmaConfig(bn=128, stages=4)),  # fp16 B by cp.async
    ("int4-g128", WgmmaConfig(bn=256, stages=4, prefetch=2, word_vec=4, decode_intrin=True)),
    ("int4-g128", WgmmaConfig(bn=128, stages=3, wg_inflight=0, prefetch=0)),
    (None, WgmmaConfig(bn=256, stages=4, warp_specialized=True)),
    ("int4-g128", WgmmaConfig(bn=256, stages=4, prefetch=2, word_vec=4, decode_intrin=True, warp_specialized=True)),
    ("e8p-2", WgmmaConfig(bn=128, prefetch=0)),  # any other format: its TIR decode where it loads
    ("qtip-3inst-2", WgmmaConfig(bn=256, prefetch=0, warp_specialized=True)),
    ("e8p-4", WgmmaConfig(bn=256, prefetch=0, decode_intrin=True, warp_specialized=True)),  # its intrinsic
]


@pytest.mark.parametrize("name,cfg", CONFIGS, ids=lambda c: c if isinstance(c, str) or c is None else
                         "-".join(f"{k}{int(v)}" for k, v in c.as_dict().items()))
def test_kernel_generates_wgmma_that_ptxas_takes(name, cfg):
    fmt = qc.formats.get(name) if name else None
    src = _cuda(wgmma_gemm_func(fmt, 512, 1024, 256, cfg))
    # four k16 steps of one 64-row slab a k tile; the non-specialised loop is unrolled by the prefetch depth
    steps = 4 * (max(1, cfg.prefetch) if fmt is not None and not cfg.warp_specialized else 1)
    if name in ("e8p-2", "qtip-3inst-2", "e8p-4"):  # the format's own tensors are the kernel's parameters
        assert all(f"W_{t}_ptr" in src for t in fmt.tensor_specs(512, 1024))
    calls = re.findall(rf"wgmma_f16_ss_mma_async_sync_aligned_m64n{cfg.bn}k16_f32_f16_f16_\w+\(acc_ptr\[0\]", src)
    assert len(calls) == steps
    assert re.search(r"cp_async\w*shared_global_16\(", src)
    if cfg.warp_specialized:  # the stage hand-over is by named barriers, not __syncthreads
        assert "bar.sync %0, %1;" in src and "bar.arrive %0, %1;" in src and "__syncthreads" not in src
    if cfg.decode_intrin and name == "int4-g128":
        assert "qc_decode_int4x8_f16(" in src and "lop3.b32" in src  # the format's intrinsic, its source imported
    if cfg.decode_intrin and name == "e8p-4":  # sign words of both stages, 8 gathered words, the residual scale
        assert re.search(r"qc_e8p4_decode32\(\(&\(ureg_ptr\[0\]\)\), \(&\(ureg_ptr\[1\]\)\), \(&\(gath_ptr\[0\]\)\), "
                         r"\(&\(W_resid_inv_scale_ptr\[0\]\)\), \(&\(wdec_ptr\[0\]\)\)\);", src)
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: the generated source was checked, ptxas not run")
    (res,) = kernel_resources(src, WGMMA_ARCH).values()
    assert res.stack_bytes == 0 and res.spill_bytes == 0, res


def _probe():
    spec = importlib.util.spec_from_file_location("wgmma_probe", os.path.join(os.path.dirname(__file__), "gpu",
                                                                              "wgmma_probe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_builds_the_library_kernel():
    """The GPU harness maps its arguments onto WgmmaConfig: same kernel, same source."""
    probe = _probe()
    fmt = qc.formats.get("int4-g128")
    cfg = WgmmaConfig(bn=256, prefetch=2, word_vec=4, decode_intrin=True)
    a = probe.build(256, 512, 1024, BN=256, quant="int4-g128", qprefetch=2, qvec=4, qintrin=1)
    assert a.script() == wgmma_gemm_func(fmt, 512, 1024, 256, cfg).script()


@pytest.mark.parametrize("name,n,k,m,cfg,match", [
    (None, 512, 1024, 200, WgmmaConfig(), "multiples of 128, 128 and 64"),
    (None, 512, 1024, 256, WgmmaConfig(bn=96), "bn=96"),
    (None, 512, 1024, 256, WgmmaConfig(stages=2), "at least 2 \\+ wg_inflight"),
    (None, 512, 1024, 256, WgmmaConfig(bn=256, stages=5), "shared memory exceed"),
    (None, 512, 1024, 256, WgmmaConfig(stages=3, wg_inflight=0, warp_specialized=True), "warp-specialised"),
    ("int4-g128", 512, 1024, 256, WgmmaConfig(word_vec=8), "word_vec=8"),
    ("int4-g128", 512, 1024, 256, WgmmaConfig(prefetch=0, decode_intrin=True), "decode_intrin needs"),
    ("e8p-2", 512, 1024, 256, WgmmaConfig(), "decodes where it loads"),
    ("e8p-2", 512, 1024, 256, WgmmaConfig(prefetch=0, bn=64), "do not split"),
    ("qtip-hyb-2", 500, 1024, 256, WgmmaConfig(prefetch=0), "multiples of"),
])
def test_bad_configs_are_refused_in_one_line(name, n, k, m, cfg, match):
    fmt = qc.formats.get(name) if name else None
    with pytest.raises(QCompileError, match=match) as info:
        check_wgmma_config(fmt, n, k, m, cfg)
    assert "\n" not in str(info.value)


def test_default_config_per_format():
    from qcompile.kernels.wgmma import default_wgmma_config

    assert default_wgmma_config(None, 512, 1024) == WgmmaConfig(bn=256)
    int4 = qc.formats.get("int4-g128")
    assert default_wgmma_config(int4, 512, 1024) == WgmmaConfig(bn=256, prefetch=1, decode_intrin=True)
    assert default_wgmma_config(int4, 640, 1024).bn == 128  # N not a multiple of 256
    for name in ("e8p-4", "qtip-hyb-3", "qtip-1mad-2"):
        fmt = qc.formats.get(name)
        cfg = default_wgmma_config(fmt, 512, 1024)
        check_wgmma_config(fmt, 512, 1024, 256, cfg)  # builds as it stands
        assert cfg.prefetch == 0 and wgmma_gemm_func(fmt, 512, 1024, 256) is not None


def test_smem_of_the_fp16_winner_fits():
    # BN=256, two warpgroups, 4 stages: 4 x (128 + 256) rows x 128 bytes + 1 KiB
    assert smem_bytes(WgmmaConfig(bn=256, stages=4)) == 4 * 384 * 128 + 1024
    check_wgmma_config(None, 28672, 8192, 1024, WgmmaConfig(bn=256, stages=4))


def test_sweep_parses_configs_and_refuses_bad_ones(capsys):
    from qcompile.bench.wgmma_sweep import main, parse_wgmma_config

    cfg = parse_wgmma_config("bn=256,decode_intrin=1,warp_specialized=1,prefetch=2")
    assert cfg == WgmmaConfig(bn=256, decode_intrin=True, warp_specialized=True, prefetch=2)
    with pytest.raises(ValueError, match="not FIELD=INT"):
        parse_wgmma_config("bn=wide")
    with pytest.raises(ValueError, match="not FIELD=INT"):
        parse_wgmma_config("tiles=4")
    # a config that cannot build is refused before any GPU work, in one line
    assert main(["--format", "int4-g128", "--shapes", "4096x4096", "--m", "1024", "--config", "bn=96"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: wgmma int4-g128: bn=96") and err.count("\n") == 1
    assert main(["--format", "int4-g128", "--shapes", "4096x4096", "--m", "1000"]) == 2
    assert "multiples of 128" in capsys.readouterr().err


def test_sweep_needs_a_gpu(capsys):
    import torch

    from qcompile.bench.wgmma_sweep import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the sweep would run")
    assert main(["--format", "fp16", "--shapes", "4096x4096", "--m", "1024"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_sweep_default_config_suits_the_format(capsys, monkeypatch):
    """Without --config the sweep takes the format's default (E8P: decode where loaded), so it passes the
    config check and stops only for want of a GPU."""
    import torch

    from qcompile.bench.wgmma_sweep import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--format", "e8p-2", "--shapes", "4096x4096", "--m", "1024"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
