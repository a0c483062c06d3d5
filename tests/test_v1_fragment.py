"""QTIP 1MAD / 3INST (V=1) in the kernel layout (the unregistered variants qtip-<code>-<K>@mma-kernel:
mma order, one state per position, kernel packing) are fragment-native like HYB's stored layout: lane
l's A register e is state 8l + e, the window at bit e*K of the slice (own chunk << 8K | lane l + 1's),
so the fragment mma.sync kernel (qcompile.kernels.mma_fragment) runs them. On a machine without a
GPU: the names resolve, the fragment decode is bit for bit the PTX A fragment of decode_fp16 (llvm),
the unscheduled compute sums to X @ W^T, the kernel compiles for sm_90 into mma.sync without spills.
(Values on the GPU: tests/gpu/test_mma_gpu.py, test_v1_fragment_variants_match_float64.)"""
import re
import shutil

import pytest
import torch

import qcompile as qc
from qcompile.errors import QCompileError
from qcompile.formats import trellis as tr
from qcompile.kernels.mma import default_mma_config, mma_scheduled_func, span_of
from qcompile.kernels import mma_fragment
from qcompile.kernels.mma_fragment import fragment_mma_func
from qcompile.kernels.target import parse_target

from test_mma_fragment import WORD_LOAD, kernel_body
from test_mma_schedule import compile_sm90, llvm_rel_err, ptxas_report
from test_trellis import f16_bits, ptx_a_fragment

V1 = [f"qtip-{code}-{K}@mma-kernel" for code in ("1mad", "3inst") for K in (2, 3, 4)]


def test_variant_names_resolve_and_only_the_kernel_layout_is_fragment_native():
    for name in V1:
        fmt = qc.formats.get(name)
        assert fmt is tr.trellis_format(name) and fmt.name == name and fmt.fragment_native
        assert fmt.fragment_word_count == 4 * fmt.K and name not in qc.formats.names()
    assert qc.formats.get("qtip-hyb-3@mma-kernel") is qc.formats.get("qtip-hyb-3")  # the stored layout
    for name in ("qtip-3inst-2", "qtip-1mad-4", "qtip-3inst-2@mma-tiles", "qtip-1mad-2@row-kernel",
                 "qtip-hyb-2@mma-tiles"):
        assert not qc.formats.get(name).fragment_native, name
    with pytest.raises(QCompileError, match="has no layout variants"):
        qc.formats.get("int4-g128@mma-kernel")
    with pytest.raises(QCompileError, match="not a qtip format variant name"):
        qc.formats.get("qtip-3inst-2@mma")
    with pytest.raises(QCompileError, match="unknown format"):
        qc.formats.get("nope-2@mma-kernel")


def test_v1_windows_fit_in_the_slice():
    """Register 7's window (bits 7K .. 7K + 16 of the 16K-bit slice) stays inside lane l + 1's chunk."""
    for K in tr.BITS:
        assert 7 * K + 16 <= 16 * K


@pytest.mark.parametrize("name", V1)
@pytest.mark.parametrize("staged", [False, True])
def test_v1_fragment_decode_is_the_ptx_a_fragment_on_llvm(name, staged):
    import tvm
    from tvm import te

    from qcompile.kernels.compute import fragment_stages

    fmt = qc.formats.get(name)
    n, k = 64, 128
    qw = fmt.random_weight(n, k, seed=20 + fmt.K)
    if staged:
        params, bufs = fragment_stages(fmt, n, k)
        assert {"fragment_words", "fragment_slices", "fragment_gathered"} <= set(bufs)
    else:
        bufs = {nm: te.placeholder(sp.shape, sp.dtype, name=nm) for nm, sp in fmt.tensor_specs(n, k).items()}
        params = list(bufs.values())
    F = te.compute((n // 16, k // 16, 32, 8), lambda I, J, lane, e: fmt.tir_fragment_decode(bufs, I, J, lane, e),
                   name="F")
    ex = tvm.compile(te.create_prim_func([*params, F]), target=parse_target("llvm").tvm_target())
    out = torch.empty(n // 16, k // 16, 32, 8, dtype=torch.float16)
    ex["main"](*[qw.tensors[nm] for nm in fmt.tensor_specs(n, k)], out)
    assert torch.equal(f16_bits(out), f16_bits(ptx_a_fragment(fmt.decode_fp16(qw))))


@pytest.mark.parametrize("name", ["qtip-3inst-2@mma-kernel", "qtip-1mad-3@mma-kernel"])
def test_v1_fragment_compute_matches_float64_on_llvm(name):
    fmt = qc.formats.get(name)
    n, k, m, span = 64, 256, 3, 16
    qw = fmt.random_weight(n, k, seed=3)
    assert llvm_rel_err(fragment_mma_func(fmt, n, k, m, span), fmt, qw, n, k, m) < 1e-3


PTXAS_CASES = [(name, 28672, 8192, m) for name in ("qtip-3inst-2@mma-kernel", "qtip-1mad-2@mma-kernel")
               for m in (4, 16)]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas) for the register report")
def test_v1_fragment_kernel_compiles_to_mma_sync_without_spills():
    """The default fragment configs on 28672x8192 at M = 4 and 16: mma.sync, the lanes' packed words in
    vector loads, no table, no fragment in local memory; ptxas: no stack frame, no spills."""
    funcs = {f"k{i}": mma_scheduled_func(name, n, k, m) for i, (name, n, k, m) in enumerate(PTXAS_CASES)}
    src = compile_sm90(funcs)
    for i, (name, n, k, m) in enumerate(PTXAS_CASES):
        body = kernel_body(src, f"k{i}")
        cfg = default_mma_config(n, k, m, 16, fragment=True)
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in body, name
        regs = cfg.tiles * span_of(cfg, 16) // 4 * 8  # fp16 A entries a lane, or half as many 32-bit words
        assert re.search(rf"uint W_frag_warp_ptr\[{regs // 2}\];" if mma_fragment.PACKED_A
                         else rf"half W_frag_warp_ptr\[{regs}\];", body), name
        assert re.search(WORD_LOAD[2], body) and "trellis_ptr[" not in body, name
        assert "W_table" not in body and "__shfl" not in body, name
    report = ptxas_report(src)
    assert report.count("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads") == len(PTXAS_CASES), report
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert len(regs) == len(PTXAS_CASES) and max(regs) <= 128, report


def test_tc_sweep_takes_the_variant():
    """tc_sweep --format qtip-3inst-2@mma-kernel --family mma: the fragment kernel's configs."""
    from qcompile.bench import tc_sweep
    from qcompile.kernels.mma import check_mma_config

    fmt = qc.formats.get("qtip-3inst-2@mma-kernel")
    sweep = tc_sweep.candidates(fmt, 28672, 8192, 16, [], True, False, "mma")
    assert sweep[0][0] == "mma-default"
    for _, cfg, _ in sweep:
        check_mma_config(cfg, 28672, 8192, 16, 16, fragment=True)
