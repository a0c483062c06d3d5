"""The mma.sync rule (qcompile.kernels.mma) on a machine without a GPU: its fragment layouts are PTX's
m16n8k16 layouts, its permuted K order sums every column exactly once (checked by running the
unscheduled compute on llvm against a float64 matmul), every format schedules and compiles for sm_90
into mma.sync with the format's decode intrinsic and no fragment left in local memory, the library
routes the right buckets to it, and configs that do not fit are refused in one line. (Values on the
GPU: tests/gpu/test_mma_gpu.py.)"""
import re
import shutil

import pytest
import torch

import qcompile as qc
from qcompile.kernels.library import (GEMV_FAMILY, GEMM_FAMILY, MMA_FAMILY, TC_FAMILY, KernelSpec, kernel_family,
                                      scheduled_func)
from qcompile.kernels.mma import (MmaConfig, a_layout, b_layout, c_layout, check_mma_config, default_mma_config,
                                  fragment_column, k_blocks, mma_func, mma_scheduled_func,
                                  schedule_mma_cuda, span_of)
from qcompile.kernels.pipeline import compile_module
from qcompile.kernels.schedules import inline_derived
from qcompile.kernels.target import parse_target

N, K = 256, 512
INTRIN_FUNC = {"int4-g128": "qc_decode_int4x8_f16", "e8p-2": "qc_e8p2_decode32", "e8p-3": "qc_e8p3_decode32",
               "e8p-4": "qc_e8p4_decode32"}


# --- fragment layouts against the PTX ISA's tables (mma.m16n8k16, .f16 A/B, .f32 C) ------------------

def ptx_a(lane, i):  # (row, column) of A register element i of a lane
    g, t = lane // 4, lane % 4
    return g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)


def ptx_b(lane, i):  # (k, n) of B element i
    g, t = lane // 4, lane % 4
    return 2 * t + (i & 1) + 8 * (i >> 1), g


def ptx_c(lane, i):  # (row, column) of C element i
    g, t = lane // 4, lane % 4
    return g + 8 * (i >> 1), 2 * t + (i & 1)


def mma_row(r):  # this kernel's tile row r = 2g + h is mma row g + 8h
    return r // 2 + 8 * (r % 2)


def test_fragment_layouts_are_ptx_layouts():
    seen = set()
    for r in range(16):
        for hi in range(2):
            for t in range(4):
                for lo in range(2):
                    lane, e = a_layout(r, hi, t, lo)
                    assert ptx_a(lane, e) == (mma_row(r), 8 * hi + 2 * t + lo)
                    seen.add((lane, e))
    assert seen == {(lane, e) for lane in range(32) for e in range(8)}
    seen = set()
    for a in range(8):
        for hi in range(2):
            for t in range(4):
                for lo in range(2):
                    lane, e = b_layout(a, hi, t, lo)
                    assert ptx_b(lane, e) == (8 * hi + 2 * t + lo, a)
                    seen.add((lane, e))
    assert seen == {(lane, e) for lane in range(32) for e in range(4)}
    seen = set()
    for r in range(16):
        for a in range(8):
            lane, e = c_layout(r, a)
            assert ptx_c(lane, e) == (mma_row(r), a)
            seen.add((lane, e))
    assert seen == {(lane, e) for lane in range(32) for e in range(4)}


@pytest.mark.parametrize("span", [4, 8, 16, 32, 64])
def test_fragment_columns_cover_k_once_and_stay_in_the_lanes_span(span):
    nkb, steps = 3, span // 4
    cols = []
    for kb in range(nkb):
        for s in range(steps):
            for hi in range(2):
                for t in range(4):
                    for lo in range(2):
                        c = fragment_column(kb, s, hi, t, lo, span)
                        assert kb * 4 * span + t * span <= c < kb * 4 * span + (t + 1) * span
                        cols.append(c)
    assert sorted(cols) == list(range(nkb * 4 * span))


def random_quantized(fmt, n, k, seed):
    return fmt.random_weight(n, k, seed=seed)


@pytest.mark.parametrize("name,span,k,blocks", [("int4-g128", 32, 512, 0), ("int4-g128", 8, 512, 0),
                                                ("e8p-2", 32, 512, 0), ("e8p-4", 64, 512, 0),
                                                ("int4-g128", 32, 384, 4), ("e8p-2", 32, 1536, 16)])
def test_mma_order_compute_matches_float64_on_llvm(name, span, k, blocks):
    """The products in mma order (the same TE compute the GPU schedule starts from, unscheduled) sum to
    X @ W^T: the permutation of K loses and repeats nothing, M=3 (not a multiple of 8); with padded K
    blocks (``blocks`` > K's: 3 -> 4, 12 -> 16) the blocks past K add nothing."""
    fmt = qc.formats.get(name)
    n, m = 32, 3
    qw = random_quantized(fmt, n, k, seed=7)
    err = llvm_rel_err(inline_derived(mma_func(fmt, n, k, m, span, blocks)), fmt, qw, n, k, m)
    assert err < 1e-3, err  # fp32 sums, one fp16 rounding of the output


def llvm_rel_err(func, fmt, qw, n, k, m) -> float:
    """Relative error against float64 of an (unscheduled) matmul PrimFunc of ``fmt`` run on llvm with
    weight ``qw`` and a seeded X of M rows (the output poisoned with NaN first)."""
    import tvm

    ex = tvm.compile(tvm.IRModule({"main": func}), target=parse_target("llvm").tvm_target())
    X = (torch.randn(m, k, generator=torch.Generator().manual_seed(1)) / 8).half()
    Y = torch.full((m, n), float("nan"), dtype=torch.float16)
    ex["main"](X, *[qw.tensors[t] for t in fmt.tensor_specs(n, k)], Y)
    ref = X.double() @ fmt.decode_fp16(qw).double().T
    return ((Y.double() - ref).norm() / ref.norm()).item()


# --- CUDA code generation ------------------------------------------------------------------------------

def compile_sm90(funcs):
    import tvm

    from qcompile.kernels.library import cuda_source

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
                        for name, f in funcs.items()})
    return cuda_source(compile_module(mod, tvm.target.Target({"kind": "cuda", "arch": "sm_90"})))


def ptxas_report(src: str) -> str:
    """What ``nvcc -Xptxas -v`` says of CUDA source ``src`` for sm_90 (registers, stack, spills)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/k.cu", "w") as f:
            f.write(src)
        out = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-Xptxas", "-v", "-o", f"{tmp}/k.cubin", f"{tmp}/k.cu"],
                             capture_output=True, text=True, check=True)
    return out.stderr + out.stdout


def kernel_body(src, name, suffix="_kernel"):
    start = re.search(rf"{name}{suffix}\([^)]*\)\s*{{", src).start()  # the definition, not a declaration
    end = src.find('extern "C" __global__', start + 1)
    return src[start:end if end > 0 else len(src)]


FAST = ("int4-g128", "e8p-2", "e8p-4")


@pytest.mark.parametrize("name", FAST)
def test_row_packed_formats_compile_to_mma_sync(name):
    fmt = qc.formats.get(name)
    funcs = {f"k_m{m}": mma_scheduled_func(fmt, N, K, m) for m in (2, 9, 16)}
    funcs["k_m4_cfg"] = mma_scheduled_func(fmt, N, K, 4, MmaConfig(units=max(1, 64 // fmt.decode_unit), tiles=1,
                                                                    warps_n=2, warps_k=1, unroll=2))
    src = compile_sm90(funcs)
    for fname in funcs:
        body = kernel_body(src, fname)
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in body, fname
        assert f"{INTRIN_FUNC[name]}(" in body, fname
        # LowerWarpMemory lowered every fragment: no warp-wide array left in a thread
        assert not re.search(r"half \w+\[(256|512|1024)\]", body), fname
        assert "__shfl" not in body  # each lane decodes its own fragment elements: no shuffles


@pytest.mark.parametrize("name, table", [("e8p-2", "grid_packed_abs"), ("e8p-4", "grid_packed_abs")])
def test_lookup_tables_go_to_shared_memory_with_lut_shared(name, table):
    """E8P's abs table: one copy per thread block in shared memory (lut_shared=1, the default), or
    read from global memory through L1 (lut_shared=0)."""
    src = compile_sm90({"shared": mma_scheduled_func(name, N, K, 4),
                        "global": mma_scheduled_func(name, N, K, 4, MmaConfig(units=2 if name == "e8p-4" else 1, warps_k=2, lut_shared=0))})
    assert re.search(rf"__shared__ \S+ int {table}_shared\w*\[256\]", kernel_body(src, "shared"))
    assert f"{table}_shared" not in kernel_body(src, "global")
    with pytest.raises(ValueError, match="lut_shared must be 0 or 1"):
        check_mma_config(MmaConfig(lut_shared=2), N, K, 4, 32)


@pytest.mark.slow
@pytest.mark.parametrize("name", qc.formats.names())
def test_every_format_compiles_to_mma_sync(name):
    fmt = qc.formats.get(name)
    src = compile_sm90({f"k_m{m}": mma_scheduled_func(fmt, N, K, m) for m in (1, 5, 16, 40)})
    assert src.count("mma.sync.aligned.m16n8k16") >= 4


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas) for the register report")
def test_e8p_fragments_stay_in_registers():
    """ptxas's report: no local memory (a fragment indexed by a value the compiler cannot fold went
    to local memory before the fragments were laid out lane-outermost)."""
    # and the defaults with four tiles a warp (M > 8 on a wide N), and of the M=32/64 buckets (up to
    # 8 token tiles of accumulators a lane)
    src = compile_sm90({"k": mma_scheduled_func("e8p-2", N, K, 16), "wide_e8p": mma_scheduled_func("e8p-2", 28672, 8192, 16),
                        "wide_int4": mma_scheduled_func("int4-g128", 28672, 8192, 16),
                        "e8p_m32": mma_scheduled_func("e8p-2", 28672, 8192, 32),
                        "int4_m64": mma_scheduled_func("int4-g128", 8192, 28672, 64),
                        "e8p4_m64": mma_scheduled_func("e8p-4", 28672, 8192, 64)})
    report = ptxas_report(src)
    assert report.count("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads") == 6, report


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas) for the register report")
@pytest.mark.parametrize("name", ["int4-g128", "e8p-2"])
def test_pipeline_stages_copy_the_packed_words_with_cp_async(name):
    """MmaConfig.stages: the K step's packed words go global -> shared with 16-byte cp.async
    (qc_cp_async16), stages - 1 steps ahead (the software pipeline's commit / wait groups), and the
    lanes read them from shared memory; stages=1 has none of it. The M=16 default on 28672 x 8192
    with two stages (the table in global memory, to fit the stages) keeps its fragments in registers."""
    fmt = qc.formats.get(name)
    n, k, m = 28672, 8192, 16
    from qcompile.kernels.mma import format_default_mma_config

    base = MmaConfig(**{**format_default_mma_config(fmt, n, k, m).as_dict(), "lut_shared": 1, "stages": 1})
    piped = MmaConfig(**{**base.as_dict(), "lut_shared": 0, "stages": 2})
    deep = MmaConfig(**{**base.as_dict(), "tiles": 2, "lut_shared": 0, "stages": 3})
    src = compile_sm90({"piped": mma_scheduled_func(fmt, n, k, m, piped), "plain": mma_scheduled_func(fmt, n, k, m, base),
                        "deep": mma_scheduled_func(fmt, n, k, m, deep)})
    words = "qweight" if name == "int4-g128" else "qidxs"
    for fname, stages in (("piped", 2), ("deep", 3)):
        body = kernel_body(src, fname)
        assert body.count("qc_cp_async16(") == stages  # stages - 1 prologue copies, the loop's one step ahead
        assert re.search(rf"__shared__ alignas\(\d+\) int {words}_shared\w*\[\d+\]", body)
        assert "commit_group();" in body and f"wait_group_{stages - 1}();" in body
        assert "mma.sync.aligned.m16n8k16" in body
    plain = kernel_body(src, "plain")
    assert "qc_cp_async16(" not in plain and f"{words}_shared" not in plain
    report = ptxas_report(src)
    piped_report = report[report.index("Function properties for piped_kernel"):][:200]
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in piped_report, piped_report


# --- dispatch and configs --------------------------------------------------------------------------------

def test_library_routes_low_batch_of_row_packed_formats_to_mma():
    for name in ("int4-g128", "e8p-2", "e8p-3", "e8p-4"):
        assert kernel_family(name, 1) == GEMV_FAMILY
        for m in (2, 4, 8, 16, 17, 32, 64):
            assert kernel_family(name, m) == MMA_FAMILY, (name, m)
        assert kernel_family(name, 65) == kernel_family(name, 128) == GEMM_FAMILY
    # QTIP HYB (fragment-native) runs M=1..16 on its own mma.sync kernel; 1MAD/3INST keep GEMV + WMMA
    assert [kernel_family("qtip-hyb-2", m) for m in (1, 2, 4, 8, 16, 17, 64)] == [
        MMA_FAMILY, MMA_FAMILY, MMA_FAMILY, MMA_FAMILY, MMA_FAMILY, GEMM_FAMILY, GEMM_FAMILY]
    assert [kernel_family("qtip-3inst-3", m) for m in (1, 2, 4, 8, 16, 64)] == [
        GEMV_FAMILY, GEMV_FAMILY, TC_FAMILY, TC_FAMILY, TC_FAMILY, GEMM_FAMILY]
    assert [kernel_family("qtip-1mad-2", m) for m in (1, 4, 8, 16, 64)] == [GEMV_FAMILY, GEMV_FAMILY, TC_FAMILY,
                                                                            TC_FAMILY, GEMM_FAMILY]
    src = compile_sm90({"k": scheduled_func(KernelSpec("int4-g128", N, K, 4), parse_target("sm_90"))})
    assert "mma.sync.aligned.m16n8k16" in src


def test_default_buckets_and_decode_route_follow_the_mma_buckets():
    """int4/E8P on a GPU compile 32 and 64 (single mma.sync launches) and then take the decode route
    from M=128; a module without the 64 bucket keeps the M=16-block crossover (96). QTIP and the CPU
    build keep 1, 4, 16; HYB's decode route starts at 64, 1MAD/3INST's at 17."""
    from qcompile.kernels import library

    for name in ("int4-g128", "e8p-2", "e8p-4"):
        assert library.default_buckets(name) == (1, 4, 16, 32, 64)
        assert library.default_buckets(name, "llvm") == (1, 4, 16)
        assert library.default_decode_min_m(name) == library.default_decode_min_m(name, (1, 64)) == 128
        assert library.default_decode_min_m(name, (1, 4, 16)) == library.default_decode_min_m(name, (1, 32)) == 96
    for name in ("qtip-hyb-2", "qtip-3inst-2", "qtip-1mad-3"):
        assert library.default_buckets(name) == (1, 4, 16)
    assert library.default_decode_min_m("qtip-hyb-2") == library.default_decode_min_m("qtip-hyb-2", (1, 4)) == 65
    assert library.default_decode_min_m("qtip-3inst-2") == 17


def test_library_refuses_another_familys_config():
    from qcompile.kernels.schedules import GemvConfig

    with pytest.raises(ValueError, match="runs on the mma.sync kernel, which takes an MmaConfig; got a GemvConfig"):
        scheduled_func(KernelSpec("e8p-2", N, K, 4), parse_target("sm_90"), GemvConfig())
    from qcompile.kernels.tensorcore import TensorCoreConfig

    with pytest.raises(ValueError, match="takes a GemvConfig; got a TensorCoreConfig"):
        scheduled_func(KernelSpec("e8p-2", N, K, 1), parse_target("sm_90"), TensorCoreConfig())
    # (an MmaConfig at M=1 is an alternative family the tuner may pick: tests/test_tune.py)


def test_default_config_tiles_real_shapes():
    for name in ("int4-g128", "e8p-2"):
        unit = qc.formats.get(name).decode_unit
        for n, k in [(28672, 8192), (8192, 28672), (4096, 11008), (11008, 4096), (12288, 4096), (256, 512)]:
            for m in (2, 4, 16):
                cfg = default_mma_config(n, k, m, unit)
                check_mma_config(cfg, n, k, m, unit)
                assert span_of(cfg, unit) == 32
        assert default_mma_config(28672, 8192, 4, unit) == MmaConfig(units=32 // unit, tiles=2, warps_k=8)
        # M > 8 on a wide N: four tiles share each B fragment (448 blocks of 64 rows); not on 8192 rows
        assert default_mma_config(28672, 8192, 16, unit) == MmaConfig(units=32 // unit, tiles=4, warps_k=4)
        assert default_mma_config(28672, 8192, 8, unit).tiles == 2
        assert default_mma_config(8192, 28672, 16, unit) == MmaConfig(units=32 // unit, tiles=2, warps_k=8)
        # K = 11008: 86 K blocks of 128 columns = 2 x 43, padded to 88 for 8 K warps (not 2 warps)
        cfg = default_mma_config(11008, 11008, 4, unit)
        assert cfg.warps_k == 8 and k_blocks(cfg, 11008, unit) == 88
        # a narrow N (4096 rows: 128 blocks of 32, under 132) splits K over 16 warps, two K blocks a
        # step, one tile at M <= 4, two at M = 5..16 (up to 4223 rows); 86 -> 96 K blocks
        narrow4, narrow16 = default_mma_config(4096, 11008, 4, unit), default_mma_config(4096, 11008, 16, unit)
        assert narrow4 == MmaConfig(units=32 // unit, tiles=1, warps_k=16, unroll=2)
        assert narrow16 == MmaConfig(units=32 // unit, tiles=2, warps_k=16, unroll=2)
        assert k_blocks(narrow4, 11008, unit) == 96
        assert default_mma_config(4192, 11008, 4, unit) == narrow4
        for m in (4, 16):  # 4224 rows = 132 blocks: as before
            assert default_mma_config(4224, 11008, m, unit).warps_k == 8
            assert default_mma_config(8192, 28672, m, unit).warps_k == 8
        assert default_mma_config(12288, 4096, 4, unit) == MmaConfig(units=32 // unit, tiles=2, warps_k=8)
        assert default_mma_config(4096, 11008, 1, unit).warps_k == 8  # M=1 (the GEMV's bucket): as before
        # a K that 16 warps x unroll 2 do not split (13824: 108 blocks -> 128, 16 % idle): as before
        assert default_mma_config(4096, 13824, 4, unit).warps_k == 8
    # not for a two-stage decode (e8p-4: 183 registers a lane with four tiles, slower on the H100)
    e8p4 = qc.formats.get("e8p-4")
    assert e8p4.decode_stages == 2 and qc.formats.get("e8p-2").decode_stages == 1
    assert default_mma_config(28672, 8192, 16, 32, e8p4.decode_stages) == MmaConfig(units=1, tiles=2, warps_k=8)
    assert default_mma_config(4096, 11008, 4, 32, e8p4.decode_stages) == MmaConfig(units=1, tiles=2, warps_k=8)


def test_padded_k_blocks_need_a_padded_func():
    fmt = qc.formats.get("e8p-2")
    cfg = MmaConfig(units=1, tiles=2, warps_k=8)
    check_mma_config(cfg, 256, 11008, 4, 32)  # 86 -> 88 blocks: 2.3 % idle, allowed
    func = inline_derived(mma_func(fmt, 256, 11008, 4, 32))  # 86 blocks: not split by 8 warps
    with pytest.raises(ValueError, match="k_blocks"):
        schedule_mma_cuda(func, cfg, 32)
    # 86 -> 96 blocks for 16 warps x unroll 2 is 10.4 % idle (allowed); 86 -> 128 for 64 is not
    check_mma_config(MmaConfig(units=1, tiles=1, warps_k=16, unroll=2), 256, 11008, 4, 32)
    with pytest.raises(ValueError, match="padded to 128"):
        check_mma_config(MmaConfig(units=1, tiles=1, warps_k=16, unroll=4), 256, 11008, 4, 32)


@pytest.mark.parametrize("name, m", [("int4-g128", 1), ("e8p-2", 5), ("qtip-hyb-2", 1), ("qtip-hyb-2", 16)])
def test_grid_split_k_is_two_kernels_and_stores_each_partial_once(name, m):
    """MmaConfig.blocks_k = 2: the mma kernel's grid has blockIdx.y = the K range, each thread block
    reads only its own range of the packed words, sums its K warps' partials in a register and stores
    it once (no read-modify-write of global memory); a second kernel adds the two partials (fp32) and
    stores fp16 Y."""
    fmt = qc.formats.get(name)
    frag = fmt.fragment_native
    units = 1 if frag else max(1, 32 // fmt.decode_unit)
    cfg = MmaConfig(units=units, tiles=2, warps_k=4, lut_shared=2 if frag else 1, blocks_k=2)
    n, k = 256, 2048
    check_mma_config(cfg, n, k, m, fmt.decode_unit, fragment=frag)
    src = compile_sm90({"split": mma_scheduled_func(fmt, n, k, m, cfg)})
    first, second = kernel_body(src, "split"), kernel_body(src, "split_kernel_1", suffix="")
    assert "blockIdx.y" in first and "mma.sync.aligned.m16n8k16" in first
    partial = re.findall(r"(\w+_rf_ptr)\[", first)
    assert partial, "the block's partial is not stored to global memory"
    stores = re.findall(rf"{partial[0]}\[[^;]*\] = ([^;]*);", first)
    assert stores and all(partial[0] not in rhs for rhs in stores), stores  # one store, no accumulation
    assert "mma.sync" not in second and "Y_ptr[" in second and second.count(f"{partial[0]}[") == 2
    assert "blockIdx.y" not in second


@pytest.mark.parametrize("cfg,n,k,m,match", [
    (MmaConfig(units=1), 256, 500, 4, "K=500 is not a multiple of the K block 128"),
    (MmaConfig(tiles=4, warps_n=2), 96, 512, 4, "N=96 is not a multiple of 128 rows per block"),
    (MmaConfig(warps_k=8, unroll=2), 256, 512, 4, "the 4 K blocks do not split over 8 warps x unroll 2"),
    (MmaConfig(warps_n=8, warps_k=8), 1024, 8192, 4, "2048 threads per block"),
    (MmaConfig(), 256, 512, 65, "M=65 must be 1..64"),
    (MmaConfig(warps_k=8), 256, 1024, 64, "the 8 K warps' partial sums need 64 KiB of shared memory"),
    (MmaConfig(units=0), 256, 512, 4, "units must be a positive int"),
    (MmaConfig(stages=4), 256, 512, 4, "stages must be 1..3"),
    (MmaConfig(warps_k=2, unroll=2, stages=2), 256, 1024, 4, "stages=2 needs unroll=1"),
    (MmaConfig(tiles=4, warps_k=4, stages=3), 256, 4096, 16, "3 pipeline stages of 16 KiB"),
    (MmaConfig(warps_k=4, stages=2), 256, 11008 - 3 * 128, 4, "split evenly over 4 K warps"),
    (MmaConfig(blocks_k=0), 256, 512, 4, "blocks_k must be a positive int"),
    (MmaConfig(min_blocks=-1), 256, 512, 4, "min_blocks must be a non-negative int"),
    (MmaConfig(stage_pad=1, min_blocks=-1), 256, 512, 4, "stage_pad=1 pads pipeline stages"),
    (MmaConfig(warps_k=16, min_blocks=5), 256, 4096, 4, "min_blocks=5 blocks of 512 threads exceed the 2048"),
    (MmaConfig(warps_k=2, blocks_k=4), 256, 2048 - 5 * 128, 4, "11 K blocks do not split over 4 blocks x 2 warps"),
    (MmaConfig(warps_k=2, stages=2, blocks_k=2), 256, 2048 - 2 * 128, 4, "split evenly over 4 K warps"),
])
def test_bad_configs_are_refused_in_one_line(cfg, n, k, m, match):
    with pytest.raises(ValueError, match=match) as info:
        check_mma_config(cfg, n, k, m, 32)
    assert "\n" not in str(info.value)


def test_default_takes_the_pipeline_only_where_it_was_measured_faster():
    """int4 at M = 5..16 on layers of >= 2^27 weights (the 70B MLP shapes, measured on the H100) gets two
    cp.async stages with no table reserve; smaller layers, other M, E8P (a table, 2-bit words) and QTIP
    keep one stage."""
    from qcompile.kernels.mma import PIPELINE_MIN_WEIGHTS, format_default_mma_config

    int4, e8p = qc.formats.get("int4-g128"), qc.formats.get("e8p-2")
    for n, k in ((28672, 8192), (8192, 28672)):
        assert n * k >= PIPELINE_MIN_WEIGHTS
        for m in (5, 8, 9, 16):
            cfg = format_default_mma_config(int4, n, k, m)
            assert (cfg.stages, cfg.lut_shared, cfg.unroll) == (2, 0, 1), (n, k, m, cfg)
        for m in (2, 4, 32):
            assert format_default_mma_config(int4, n, k, m).stages == 1, (n, k, m)
        assert format_default_mma_config(e8p, n, k, 16).stages == 1
        assert format_default_mma_config(qc.formats.get("qtip-hyb-2"), n, k, 16).stages == 1
    for n, k in ((22016, 4096), (12288, 4096), (4096, 11008)):
        assert format_default_mma_config(int4, n, k, 16).stages == 1, (n, k)


@pytest.mark.parametrize("cfg,bits", [
    (MmaConfig(units=1, tiles=4, warps_k=4, stages=2, stage_pad=1), 2),   # e8p-2: 8-byte lane reads
    (MmaConfig(units=1, tiles=2, warps_k=8, stages=2, stage_pad=1), 2),
    (MmaConfig(units=2, tiles=2, warps_k=4, stages=2, stage_pad=1), 2),   # 16-byte lane reads
    (MmaConfig(units=4, tiles=2, warps_k=4, stages=2, stage_pad=1), 4),   # int4 (8-column units)
    (MmaConfig(units=2, tiles=2, warps_k=2, stages=2, stage_pad=1), 4),
])
def test_stage_pad_spreads_a_wavefront_over_distinct_banks(cfg, bits):
    """The lanes of one shared-memory wavefront (128 bytes: 8 lanes of 16-byte reads, 16 of 8-byte) read
    rows 2g of the stage at their column t; with the padded row stride no two of them touch the same
    bank, and the rows stay 16-byte aligned for cp.async. Unpadded, the same lanes collide."""
    from qcompile.kernels.mma import stage_lane_bytes, stage_row_bytes, stage_row_pad

    unit = 32 if bits == 2 else 8
    lane = stage_lane_bytes(cfg, unit, bits)
    assert lane in (8, 16)

    def max_conflict(stride):
        banks = {}
        for lane_id in range(128 // lane):  # one wavefront
            g, t = lane_id // 4, lane_id % 4
            start = 2 * g * stride + t * lane
            for word in range(start // 4, (start + lane) // 4):
                banks.setdefault(word % 32, set()).add(word)
        return max(len(words) for words in banks.values())

    row = stage_row_bytes(cfg, unit, bits)
    stride = row + stage_row_pad(cfg, unit, bits)
    assert stride % 16 == 0 and max_conflict(stride) == 1
    assert max_conflict(row) > 1
    assert stage_row_pad(MmaConfig(**{**cfg.as_dict(), "stage_pad": 0}), unit, bits) == 0


def test_stage_pad_pads_the_e8p_stage_rows_in_the_kernel():
    """e8p-2's M=16 default tiles with two padded stages: 64 rows of 32 words -> a stride of 36 words."""
    fmt = qc.formats.get("e8p-2")
    cfg = MmaConfig(units=1, tiles=4, warps_k=4, stages=2, stage_pad=1)
    body = kernel_body(compile_sm90({"k": mma_scheduled_func(fmt, 28672, 8192, 16, cfg)}), "k")
    assert re.search(r"__shared__ alignas\(\d+\) int qidxs_shared\w*\[4608\]", body)  # 2 x 64 x 36
    with pytest.raises(ValueError, match="stage_pad=1 pads pipeline stages"):
        check_mma_config(MmaConfig(stage_pad=1), 256, 1024, 4, 32)
    with pytest.raises(ValueError, match="one packed-word tensor"):
        mma_scheduled_func("e8p-4", 28672, 8192, 16, MmaConfig(units=1, tiles=2, warps_k=4, stages=2, stage_pad=1))
