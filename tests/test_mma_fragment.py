"""The fragment-native mma.sync rule (qcompile.kernels.mma_fragment, QTIP HYB) on a machine without a GPU:
its products (the unscheduled compute, on llvm) sum to X @ W^T in natural row and column order, it
schedules and compiles for sm_90 into mma.sync with the lanes' packed words in vector loads, no
fragment in local memory and (ptxas) no spills, the library can route to it with one flag, and
configs that do not fit are refused in one line. (Values on the GPU: tests/gpu/test_mma_gpu.py, which
runs mma_scheduled_func, i.e. this kernel for qtip-hyb-K.)"""
import re
import shutil

import pytest

import qcompile as qc
from qcompile.kernels import library
from qcompile.kernels.library import GEMV_FAMILY, MMA_FAMILY, TC_FAMILY, KernelSpec, kernel_family, scheduled_func
from qcompile.kernels.mma import (MmaConfig, a_layout_natural, c_layout_natural, check_mma_config,
                                  default_mma_config, k_blocks, mma_scheduled_func, span_of)
from qcompile.kernels import mma_fragment
from qcompile.kernels.mma_fragment import fragment_mma_func, natural_column
from qcompile.kernels.resources import kernel_resources
from qcompile.kernels.target import parse_target

from test_mma_schedule import compile_sm90, llvm_rel_err, ptxas_report

HYB = ("qtip-hyb-2", "qtip-hyb-3", "qtip-hyb-4")
N, K = 256, 1024


def test_natural_layouts_are_ptx_and_columns_cover_k_once():
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e in range(8):
            row, col = g + 8 * ((e >> 1) & 1), 2 * t + (e & 1) + 8 * (e >> 2)  # PTX A register e
            assert a_layout_natural(row, col // 8, (col % 8) // 2, col % 2) == (lane, e)
        for e in range(4):
            row, tok = g + 8 * (e >> 1), 2 * t + (e & 1)  # PTX C register e
            assert c_layout_natural(row, tok) == (lane, e)
    span = 32
    cols = sorted(natural_column(kb, s, hi, t, lo, span) for kb in range(3) for s in range(span // 4)
                  for hi in range(2) for t in range(4) for lo in range(2))
    assert cols == list(range(3 * 4 * span))


@pytest.mark.parametrize("name,span,k,blocks,copies,packed,signed", [
    ("qtip-hyb-2", 32, 512, 0, 0, False, False), ("qtip-hyb-3", 16, 256, 0, 0, False, False),
    ("qtip-hyb-4", 32, 384, 4, 0, False, False), ("qtip-hyb-2", 16, 256, 0, 32, False, False),
    ("qtip-hyb-2", 32, 512, 0, 0, True, False), ("qtip-hyb-4", 32, 384, 4, 0, True, False),
    ("qtip-3inst-3@mma-kernel", 16, 256, 0, 0, True, False),
    ("qtip-hyb-2", 32, 512, 0, 16, True, True), ("qtip-hyb-3", 16, 256, 0, 16, False, True),
    ("qtip-hyb-2", 16, 256, 0, 32, True, True), ("qtip-hyb-4", 32, 384, 4, 32, True, True)])
def test_fragment_compute_matches_float64_on_llvm(name, span, k, blocks, copies, packed, signed):
    """The unscheduled compute the GPU schedule starts from (A registers from tir_fragment_decode,
    natural rows and columns) sums to X @ W^T at M=3; with padded K blocks (3 -> 4) the blocks past K
    add nothing; with 32 table copies (lut_shared=3) each lane reads its own copy's flat index; with
    packed A registers (W_frag uint32) each product takes the right half of the right register; with
    the sign-folded tables (lut_shared=4) the flat index takes h's sign bit and the word its sign."""
    fmt = qc.formats.get(name)
    n, m = 64, 3
    qw = fmt.random_weight(n, k, seed=3)
    func = fragment_mma_func(fmt, n, k, m, span, blocks, lane_copies=copies, packed_a=packed, signed_table=signed)
    err = llvm_rel_err(func, fmt, qw, n, k, m)
    assert err < 1e-3, err


def test_lane_copy_by_min_is_the_lane_copy_and_reaches_the_address(monkeypatch):
    """trellis.LANE_COPY_BY_MIN: min(lane, lane ^ 16) is lane % 16 for every lane of a warp; with the
    flag the HYB-2 compute still sums to X @ W^T on llvm (an index out of the 16 copies would read past
    the table) and the CUDA table address takes the min form, without it the modulo."""
    from qcompile.formats import trellis

    assert all(min(lane, lane ^ 16) == lane % 16 for lane in range(32))
    fmt = qc.formats.get("qtip-hyb-2")
    cfg = MmaConfig(units=1, tiles=2, warps_k=4, lut_shared=2)
    assert trellis.lane_copy_by_min(2) and not trellis.lane_copy_by_min(3)  # the default: on for HYB-2 only
    monkeypatch.setattr(trellis, "LANE_COPY_BY_MIN", ())
    plain = kernel_body(compile_sm90({"k": mma_scheduled_func(fmt, N, K, 1, cfg)}), "k")
    monkeypatch.setattr(trellis, "LANE_COPY_BY_MIN", True)
    func = fragment_mma_func(fmt, 64, 512, 3, 32, 0, lane_copies=16, packed_a=True)
    assert llvm_rel_err(func, fmt, fmt.random_weight(64, 512, seed=3), 64, 512, 3) < 1e-3
    by_min = kernel_body(compile_sm90({"k": mma_scheduled_func(fmt, N, K, 1, cfg)}), "k")
    form = "min(((int)threadIdx.x), (((int)threadIdx.x) ^ 16))"
    assert form in by_min and form not in plain
    assert by_min.count("W_table_lanes_shared") == plain.count("W_table_lanes_shared")


def test_min_blocks_sets_the_launch_bounds_of_the_mma_kernel_only():
    """MmaConfig.min_blocks reaches __launch_bounds__(threads, min_blocks) of the PrimFunc's kernels
    (TVM prints it from a device-function attribute that the pipeline copies over), and of no other
    function compiled beside it."""
    fmt = qc.formats.get("qtip-hyb-2")
    cfg = MmaConfig(units=1, tiles=2, warps_k=16, lut_shared=2)
    bounded = MmaConfig(**{**cfg.as_dict(), "min_blocks": 3})
    src = compile_sm90({"plain": mma_scheduled_func(fmt, N, K, 1, cfg),
                        "bounded": mma_scheduled_func(fmt, N, K, 1, bounded)})
    assert re.search(r"__launch_bounds__\(512, 3\) bounded_kernel\(", src)
    assert re.search(r"__launch_bounds__\(512\) plain_kernel\(", src)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas) for the register report")
def test_min_blocks_holds_the_lane_copy_min_kernel_to_three_blocks_without_spills(monkeypatch):
    """With formats.trellis.LANE_COPY_BY_MIN, HYB-2's default M=1 kernel takes 51 registers (two
    512-thread blocks an SM); min_blocks=3 makes ptxas fit three (at most 42) without spilling."""
    from qcompile.formats import trellis

    monkeypatch.setattr(trellis, "LANE_COPY_BY_MIN", True)
    fmt = qc.formats.get("qtip-hyb-2")
    cfg = MmaConfig(units=1, tiles=2, warps_k=16, lut_shared=2, min_blocks=3)
    used = kernel_resources(compile_sm90({"k": mma_scheduled_func(fmt, 28672, 8192, 1, cfg)}))
    assert used and max(r.registers for r in used.values()) <= 65536 // (512 * 3), used
    assert all(r.spill_bytes == 0 for r in used.values()), used


def test_partials_in_table_overlay_the_lane_copies_after_the_k_loop(monkeypatch):
    """mma.FRAGMENT_PARTIALS_IN_TABLE: the 16 lane copies go to dynamic shared memory, where TVM lays the
    K warps' partial sums over them after the K loop, behind a barrier; check_mma_config then counts
    max(copies, partials), so a block of 4 tiles x 8 K warps at M=16 (32 KiB of partials beside 32 KiB
    of copies) fits where it did not."""
    from qcompile.kernels import mma

    fmt = qc.formats.get("qtip-hyb-2")
    wide = MmaConfig(units=1, tiles=4, warps_k=8, lut_shared=2)
    with pytest.raises(ValueError, match="partial sums need 32 KiB"):
        check_mma_config(wide, N, K, 16, 16, fragment=True, staged_bits=2)
    monkeypatch.setattr(mma, "FRAGMENT_PARTIALS_IN_TABLE", True)
    check_mma_config(wide, N, K, 16, 16, fragment=True, staged_bits=2)
    cfg = MmaConfig(units=1, tiles=4, warps_k=4, lut_shared=2)
    body = kernel_body(compile_sm90({"k": mma_scheduled_func(fmt, N, K, 16, cfg)}), "k")
    assert re.search(r"extern __shared__ \S+ uint W_table_lanes_shared_dyn\w*\[\];", body)
    assert "__shared__ alignas(64) float" not in body  # no partial buffer of its own
    loop_end = body.rindex("mma.sync")  # the last mma of the K loop, then the partials
    after = body[loop_end:]
    first_partial = re.search(r"\(\(float\*\)W_table_lanes_shared_dyn\w*\)\[[^\]]+\] = acc", after)
    assert first_partial and "__syncthreads();" in after[:first_partial.start()]


def test_tc_sweep_flags_check_and_build_with_the_switches_on_and_restore_them():
    """tc_sweep --flag: under flags_on the switches are on (so partials-in-table admits the 4-tile x
    8-K-warp block at M=16), off again afterwards, also after an error; an unknown name is refused in one
    line before any GPU work."""
    from qcompile.bench import tc_sweep
    from qcompile.formats import trellis
    from qcompile.kernels import mma

    fmt = qc.formats.get("qtip-hyb-2")
    wide = ["units=1,tiles=4,warps_n=1,warps_k=8,unroll=1,lut_shared=2,stages=1"]
    cfgs = lambda: [c for _, c, _ in tc_sweep.candidates(fmt, N, K, 16, wide, False, False, "mma")]  # noqa: E731
    assert MmaConfig(units=1, tiles=4, warps_k=8, lut_shared=2) not in cfgs()
    with tc_sweep.flags_on(["partials-in-table", "lane-copy-min"]):
        assert mma.FRAGMENT_PARTIALS_IN_TABLE and trellis.LANE_COPY_BY_MIN
        assert MmaConfig(units=1, tiles=4, warps_k=8, lut_shared=2) in cfgs()
    assert not mma.FRAGMENT_PARTIALS_IN_TABLE and trellis.LANE_COPY_BY_MIN == (2,)
    with pytest.raises(RuntimeError):
        with tc_sweep.flags_on(["lane-copy-min"]):
            raise RuntimeError("boom")
    assert trellis.LANE_COPY_BY_MIN == (2,)
    with tc_sweep.flags_on(["half-a"]):  # (a flag may also turn a switch off)
        assert mma_fragment.PACKED_A is False
    assert mma_fragment.PACKED_A is True
    assert tc_sweep.main(["--family", "mma", "--format", "qtip-hyb-2", "--flag", "lane-copy-min+nope"]) == 2


# --- CUDA code generation --------------------------------------------------------------------------------


def kernel_body(src, name):
    start = re.search(rf"{name}_kernel\([^)]*\)\s*{{", src).start()
    end = src.find('extern "C" __global__', start + 1)
    return src[start:end if end > 0 else len(src)]


# the lanes' packed words: own 4K bytes and lane + 1's, as vector loads (K=3: 12 bytes, 4-byte aligned)
WORD_LOAD = {2: r"\*\(short4\*\)\(trellis_ptr", 3: r"\*\(short2\*\)\(trellis_ptr", 4: r"\*\(int4\*\)\(trellis_ptr"}


@pytest.mark.parametrize("name", HYB)
def test_hyb_compiles_to_mma_sync_with_vector_loads(name):
    fmt = qc.formats.get(name)
    cfgs = {f"k_m{m}": (m, default_mma_config(N, K, m, 16, fragment=True)) for m in (2, 9, 16)}
    cfgs["k_cfg"] = (4, MmaConfig(units=1, tiles=2, warps_n=2, warps_k=2, unroll=2, lut_shared=1))
    cfgs["k_global"] = (5, MmaConfig(units=2, tiles=4, warps_k=2, lut_shared=0))
    cfgs["k_lanes32"] = (1, MmaConfig(units=1, tiles=2, warps_k=8, unroll=2, lut_shared=3))
    cfgs["k_signed"] = (1, MmaConfig(units=1, tiles=2, warps_k=16, lut_shared=4))
    src = compile_sm90({fname: mma_scheduled_func(fmt, N, K, m, cfg) for fname, (m, cfg) in cfgs.items()})
    for fname, (m, cfg) in cfgs.items():
        body = kernel_body(src, fname)
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in body, fname
        # LowerWarpMemory lowered the A fragments: each lane holds its own registers (tiles x steps x 8),
        # not a warp-wide array
        regs = cfg.tiles * span_of(cfg, 16) // 4 * 8
        if mma_fragment.PACKED_A:  # the same registers as 32-bit words
            assert re.search(rf"uint W_frag_warp_ptr\[{regs // 2}\];", body), fname
        else:
            assert re.search(rf"half W_frag_warp_ptr\[{regs}\];", body), fname
        assert not re.search(r"half \w+\[(2048|4096|8192|16384)\]", body), fname
        assert "__shfl" not in body, fname
        assert re.search(WORD_LOAD[fmt.K], body), fname
        assert "trellis_ptr[" not in body, fname  # no scalar loads of the packed words
        assert "qc_qtip_hyb" not in body, fname  # no unit decode: the lanes decode their own registers
    assert re.search(r"__shared__ \S+ uint W_table_lanes_shared\w*\[8192\]", kernel_body(src, "k_m2"))
    assert re.search(r"__shared__ \S+ uint W_table_shared\w*\[512\]", kernel_body(src, "k_cfg"))
    # lut_shared=3: 32 copies (64 KiB) in dynamic shared memory, a lane reading copy threadIdx.x of the
    # entry: flat index (((h << 1) & 0xFF80) | lane << 2) >> 2 = entry * 32 + lane (no bank conflicts;
    # h doubled, not the address: an IMAD.SHL where a LEA was)
    lanes32 = kernel_body(src, "k_lanes32")
    assert re.search(r"extern __shared__ \S+ uint W_table_lanes_shared_dyn\w*\[\];", lanes32)
    # (a lane's table words of a K block: 2 tiles x 4 mma steps x 4 words; the K loop unrolled twice)
    assert lanes32.count("<< (uint)1) & (uint)65408) | (((uint)((int)threadIdx.x)) << (uint)2)) >> (uint)2))]") == 2 * 32
    # ... filled from the single table in shared memory, not from tlut in global memory
    assert re.search(r"W_table_lanes_shared_dyn\w*\[[^\]]+\] = W_table_shared\w*\[", lanes32)
    assert not re.search(r"W_table_lanes_shared_dyn\w*\[[^\]]+\] = [^;]*tlut_ptr", lanes32)
    # lut_shared=4: 16 copies of the sign-folded table (1024 entries) in dynamic shared memory, filled
    # from the single signed table; the flat index masks h's bits 6..15 (0xFFC0 = 65472) and the word is
    # the table's own: no XOR with h & 0x8000 (32768) left
    signed = kernel_body(src, "k_signed")
    assert re.search(r"extern __shared__ \S+ uint W_table_lanes_shared_dyn\w*\[\];", signed)
    assert re.search(r"__shared__ \S+ uint W_table_shared\w*\[1024\]", signed)
    assert signed.count("(uint)65472) | (((uint)") == 32 and "(uint)32704)" not in signed
    assert "(uint)32768" not in signed.split("W_lane_gather_local_ptr[0] =", 1)[1]
    glob = kernel_body(src, "k_global")  # lut_shared=0: the table words read from tlut in global memory
    assert "W_table" not in glob and "tlut_ptr[" in glob


def test_x_staged_reads_the_b_fragments_from_a_padded_shared_tile():
    """MmaConfig.x_staged: each K warp copies its K block's activations (M rows x 64 columns) into a
    shared tile with 16-byte loads (4 a lane at M=16) at the top of each K step, rows padded 16 bytes
    (264 halves for 4 K blocks: a B-fragment read of 8 rows x 4 lanes meets 32 banks); the B fragments
    are read from the tile, never from X in global memory; the registers stay those of the unstaged
    kernel (nvcc). A row-packed format refuses it in one line."""
    fmt = qc.formats.get("qtip-hyb-2")
    cfg = MmaConfig(units=1, tiles=4, warps_k=4, lut_shared=3)
    staged = MmaConfig(**{**cfg.as_dict(), "x_staged": 1})
    src = compile_sm90({"plain": mma_scheduled_func(fmt, 28672, 8192, 16, cfg),
                        "staged": mma_scheduled_func(fmt, 28672, 8192, 16, staged)})
    body = kernel_body(src, "staged")
    assert re.search(r"__shared__ \S+ half X_frag_shared\w*\[4224\];", body)  # 16 rows x (256 + 8)
    loop = body.split("for (int kb_0 = 0;", 1)[1]
    copies = re.findall(r"\*\(uint4\*\)\(X_frag_shared\w* \+ [^;]*\) = \*\(uint4\*\)\(X_ptr \+", loop)
    assert len(copies) == 4
    assert "* 264)" in loop and loop.count("X_ptr") == 4
    assert re.search(r"X_frag_warp\w*\[[^\]]+\] = X_frag_shared\w*\[", loop)
    assert "X_frag_shared" not in kernel_body(src, "plain")
    if shutil.which("nvcc") is not None:
        used = kernel_resources(src)
        assert used["staged_kernel"].registers <= used["plain_kernel"].registers, used
    with pytest.raises(ValueError, match="x_staged=1 is for fragment-native formats"):
        check_mma_config(MmaConfig(x_staged=1), N, K, 16, 32)


@pytest.mark.parametrize("name", HYB)
def test_signed_lane_copies_of_lut_shared_5_are_conflict_free_and_sign_free(name):
    """lut_shared=5: 32 copies of the sign-folded table (1024 entries, 128 KiB of dynamic shared memory
    the partials reuse after the K loop), filled from the single signed table; a lane reads copy
    threadIdx.x at the flat index ((2h & 0x1FF80) | lane << 2) >> 2 (h's bits 6..15, the sign among
    them), and no word is XORed with h's sign afterwards. With nvcc: a 1024-thread block keeps its
    registers under 64 without spills."""
    fmt = qc.formats.get(name)
    cfg = MmaConfig(units=1, tiles=2, warps_k=32, lut_shared=5)
    src = compile_sm90({"k": mma_scheduled_func(fmt, 28672, 8192, 1, cfg)})
    body = kernel_body(src, "k")
    assert re.search(r"extern __shared__ \S+ uint W_table_lanes_shared_dyn\w*\[\];", body)
    assert re.search(r"__shared__ \S+ uint W_table_shared\w*\[1024\]", body)
    assert body.count("<< (uint)1) & (uint)130944) | (((uint)((int)threadIdx.x)) << (uint)2)) >> (uint)2))]") == 32
    assert "(uint)32768" not in body.split("W_lane_gather_local_ptr[0] =", 1)[1]
    if shutil.which("nvcc") is not None:
        used = kernel_resources(src)
        assert used and max(r.registers for r in used.values()) <= 64, used
        assert all(r.spill_bytes == 0 for r in used.values()), used


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas) for the register report")
@pytest.mark.parametrize("name", HYB)
def test_pipeline_stages_stage_the_trellis_with_cp_async(name):
    """MmaConfig.stages on the fragment kernel: the block's trellis words of a K step go global ->
    shared with 16-byte cp.async (qc_cp_async16) stages - 1 steps ahead, and the lanes' staged words
    (own and lane + 1's) are vector loads from that shared copy, never from global memory; no spill."""
    fmt = qc.formats.get(name)
    n, k = 28672, 8192
    # K=3: a K step's copies split over the block's threads with two units a lane and 4 K warps
    units, warps_k = (2, 4) if fmt.K == 3 else (1, 8)
    cfgs = {"piped": (1, MmaConfig(units=units, tiles=2, warps_k=warps_k, lut_shared=1, stages=2)),
            "deep": (16, MmaConfig(units=units, tiles=2, warps_k=warps_k, lut_shared=1, stages=3))}
    if fmt.K == 2:  # the per-lane tables (32 KiB) beside two 4 KiB stages
        cfgs["lanes"] = (1, MmaConfig(units=1, tiles=2, warps_k=8, lut_shared=2, stages=2))
    src = compile_sm90({fname: mma_scheduled_func(fmt, n, k, m, cfg) for fname, (m, cfg) in cfgs.items()})
    for fname, (m, cfg) in cfgs.items():
        body = kernel_body(src, fname)
        assert body.count("qc_cp_async16(") == cfg.stages, fname
        assert re.search(r"__shared__ alignas\(\d+\) short trellis_shared\w*\[\d+\]", body), fname
        assert "commit_group();" in body and f"wait_group_{cfg.stages - 1}();" in body, fname
        assert re.search(WORD_LOAD[fmt.K].replace("trellis_ptr", "trellis_shared_ptr"), body), fname
        assert not re.search(WORD_LOAD[fmt.K], body) and "trellis_ptr[" not in body.replace("(&(trellis_ptr[", ""), fname
        assert "mma.sync.aligned.m16n8k16" in body, fname
    report = ptxas_report(src)
    assert report.count("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads") == len(cfgs), report


# a fp16 A entry written from half `shift` of a 32-bit expression, and a whole register written
_HALF_STORE = re.compile(r"ushort (v\w*) = \(ushort\)\(\((.+?) >> \(uint\)(0|16)\) & \(uint\)65535\);\s*"
                         r"W_frag_warp_ptr\[(\d+)\] = \(\*\(half \*\)\(&\(\1\)\)\);")
_WORD_STORE = re.compile(r"W_frag_warp_ptr\[(\d+)\] = ([^;]+);")
_A_OPERAND = re.compile(r'"r"\(\(\(unsigned \*\)\(W_frag_warp_ptr \+ (\d+)\)\)\[0\]\)')


@pytest.mark.parametrize("name,m,cfg", [
    ("qtip-hyb-2", 1, MmaConfig(units=1, tiles=2, warps_k=8, unroll=2, lut_shared=2)),
    ("qtip-hyb-2", 16, MmaConfig(units=2, tiles=4, warps_n=2, warps_k=2, lut_shared=0)),
    ("qtip-hyb-3", 9, MmaConfig(units=2, tiles=2, warps_k=4, lut_shared=1, stages=2)),
    ("qtip-1mad-4@mma-kernel", 4, None)])
def test_packed_a_registers_are_the_half_kernels_registers(name, m, cfg):
    """mma_fragment.PACKED_A changes how the A registers are written, not what they hold: in the CUDA
    of the same config, each packed register w is stored from the expression whose low and high halves
    the fp16 kernel stores as entries 2w and 2w + 1, in the same order, and every mma.sync reads
    registers w..w+3 where the fp16 kernel reads entries 2w..2w+7 (the GPU suite checks the values)."""
    fmt = qc.formats.get(name)
    src = compile_sm90({"k_half": mma_scheduled_func(fmt, 28672, 8192, m, cfg, packed_a=False),
                        "k_packed": mma_scheduled_func(fmt, 28672, 8192, m, cfg, packed_a=True)})
    half, packed = kernel_body(src, "k_half"), kernel_body(src, "k_packed")
    assert re.search(r"half W_frag_warp_ptr\[\d+\];", half) and re.search(r"uint W_frag_warp_ptr\[\d+\];", packed)
    words = [(int(i), expr) for i, expr in _WORD_STORE.findall(packed)]
    halves = [(int(i), expr, int(shift)) for _, expr, shift, i in _HALF_STORE.findall(half)]
    assert words and halves == [e for i, expr in words for e in ((2 * i, expr, 0), (2 * i + 1, expr, 16))]
    a_half, a_packed = ([int(o) for o in _A_OPERAND.findall(body)] for body in (half, packed))
    assert a_packed and a_half == [2 * o for o in a_packed]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas) for the register report")
def test_32_table_copies_cost_no_registers_over_16():
    """lut_shared=3 fills 64 words a thread (twice lut_shared=2's): through the single shared table, so
    that nvcc does not keep a thread's whole fill in flight (filled from global memory it took 70
    registers against 40 on the M=1 HYB-2 kernel: fewer blocks of 16 K warps fit an SM)."""
    fmt = qc.formats.get("qtip-hyb-2")
    cfgs = {f"k_ls{ls}": MmaConfig(units=1, tiles=2, warps_k=16, lut_shared=ls) for ls in (2, 3)}
    src = compile_sm90({fname: mma_scheduled_func(fmt, 28672, 8192, 1, cfg, packed_a=False) for fname, cfg in cfgs.items()})
    regs = dict(re.findall(r"Function properties for (k_ls\d)_kernel.*?Used (\d+) registers", ptxas_report(src), re.S))
    assert set(regs) == set(cfgs) and int(regs["k_ls3"]) <= int(regs["k_ls2"]), regs


def test_signed_tables_are_tuner_candidates_for_hyb_3_and_4_at_m1_only():
    """mma.SIGNED_LUT_*: the tuner's mma space of QTIP HYB-3/4 at M=1 also holds lut_shared=4 configs (the
    sign-folded table copies, measured faster there), each passing its shared-memory check, while the
    default stays lut_shared=2 (the shipped records were tuned against it); every HYB code at M=1 also
    gets the 32 sign-folded lane copies (lut_shared=5: tune.space.HYB_SEEDS_M1), the fragment variants
    without a table keep the default's placement; HYB at M > 1 adds the 32 lane copies (lut_shared=3:
    mma.lane_lut_candidate) instead."""
    from qcompile.kernels.library import KernelSpec
    from qcompile.kernels.mma import format_default_mma_config
    from qcompile.tune import space

    for n, k in ((28672, 8192), (1024, 4096)):
        for name, m, luts_expected in (("qtip-hyb-3", 1, {2, 4, 5}), ("qtip-hyb-4", 1, {2, 4, 5}), ("qtip-hyb-2", 1, {2, 5}),
                                       ("qtip-hyb-4", 2, {2, 3}), ("qtip-hyb-3", 16, {2, 3}),
                                       ("qtip-1mad-3@mma-kernel", 1, {2})):
            fmt = qc.formats.get(name)
            assert format_default_mma_config(fmt, n, k, m).lut_shared == 2, (name, n, k, m)
            luts = {cfg.lut_shared for cfg in space.mma_candidates(KernelSpec(name, n, k, m), fmt)}
            assert luts == luts_expected, (name, n, k, m, luts)
            for cfg in space.mma_candidates(KernelSpec(name, n, k, m), fmt):
                check_mma_config(cfg, n, k, m, 16, fragment=True, staged_bits=fmt.K)


def test_default_config_per_m():
    """The fragment defaults the H100 records chose (FRAGMENT_SMALL_M_WARPS_K, FRAGMENT_UNROLL): 16 K
    warps up to M=4, two K blocks a step for two tiles above; the wide-N M > 8 keeps four tiles."""
    from qcompile.kernels import mma

    for n, k in ((4096, 4096), (8192, 28672), (28672, 8192)):
        for m in (1, 2, 4):
            cfg = default_mma_config(n, k, m, 16, fragment=True)
            assert (cfg.tiles, cfg.warps_k, cfg.unroll) == (2, mma.FRAGMENT_SMALL_M_WARPS_K, 1), (n, k, m)
        assert default_mma_config(n, k, 8, 16, fragment=True).unroll == mma.FRAGMENT_UNROLL
    assert default_mma_config(8192, 28672, 16, 16, fragment=True).unroll == mma.FRAGMENT_UNROLL
    wide = default_mma_config(28672, 8192, 16, 16, fragment=True)
    assert (wide.tiles, wide.warps_k, wide.unroll) == (4, 4, 1)
    assert default_mma_config(28672, 8192, 4, 32) == MmaConfig(units=1, tiles=2, warps_k=8)  # row-packed: as before
    # 4-bit codes keep one K block a step above FRAGMENT_UNROLL_MAX_M_WIDE (ptxas spilled them)
    assert default_mma_config(4096, 4096, 16, 16, fragment=True, code_bits=4).unroll == 1
    assert default_mma_config(4096, 4096, 8, 16, fragment=True, code_bits=4).unroll == mma.FRAGMENT_UNROLL
    assert mma.format_default_mma_config(qc.formats.get("qtip-hyb-4"), 4096, 4096, 16).unroll == 1


# (qtip-hyb-4 at M=16 with tiles=2: with two units a lane, ptxas spilled one value to stay at 48 registers)
PTXAS_CASES = [("qtip-hyb-2", 28672, 8192, 4), ("qtip-hyb-2", 28672, 8192, 16), ("qtip-hyb-2", 4096, 11008, 4),
               ("qtip-hyb-2", 4096, 11008, 16), ("qtip-hyb-3", 28672, 8192, 16), ("qtip-hyb-4", 8192, 28672, 16),
               ("qtip-hyb-4", 4096, 4096, 16), ("qtip-hyb-2", 1024, 2048, 16), ("qtip-hyb-2", 28672, 8192, 1),
               ("qtip-hyb-4", 4096, 4096, 1), ("qtip-hyb-4", 8192, 28672, 8), ("qtip-hyb-3", 4096, 11008, 8),
               ("qtip-hyb-3", 4096, 4096, 16)]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas) for the register report")
def test_default_configs_do_not_spill():
    """ptxas's report for the default configs on real shapes: no stack frame, no spills."""
    funcs = {f"k{i}": mma_scheduled_func(name, n, k, m) for i, (name, n, k, m) in enumerate(PTXAS_CASES)}
    report = ptxas_report(compile_sm90(funcs))
    assert report.count("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads") == len(PTXAS_CASES), report
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert len(regs) == len(PTXAS_CASES) and max(regs) <= 128, report


# --- configs and dispatch --------------------------------------------------------------------------------

def test_default_configs():
    for n, k in [(28672, 8192), (8192, 28672), (4096, 11008), (11008, 4096), (256, 512)]:
        for m in (2, 4, 8, 16):
            cfg = default_mma_config(n, k, m, 16, fragment=True)
            check_mma_config(cfg, n, k, m, 16, fragment=True)
            assert cfg.tiles % 2 == 0 and cfg.lut_shared == 2
    small, wide = (default_mma_config(28672, 8192, m, 16, fragment=True) for m in (4, 16))
    assert small == MmaConfig(units=1, tiles=2, warps_k=16, lut_shared=2)
    assert wide == MmaConfig(units=1, tiles=4, warps_k=4, lut_shared=2)
    cfg = default_mma_config(4096, 11008, 4, 16, fragment=True)  # 172 K blocks of 64 columns padded to 176
    assert cfg.warps_k == 16 and k_blocks(cfg, 11008, 16) == 176 and span_of(cfg, 16) == 16


@pytest.mark.parametrize("cfg,m,match", [
    (MmaConfig(tiles=1), 4, "tiles=1 must be even"),
    (MmaConfig(tiles=2, warps_k=16, lut_shared=2), 16, "KiB of shared memory beside 32 KiB of tables"),
    (MmaConfig(lut_shared=6), 4, "lut_shared must be 0..5"),
    (MmaConfig(tiles=2, warps_k=4, lut_shared=3, stages=2, x_staged=1), 16, "x_staged=1 takes stages=1"),
    (MmaConfig(tiles=2, warps_k=4, x_staged=2), 16, "x_staged must be 0 or 1"),
    # the activation tile (16 rows of 4 K blocks: 8.25 KiB) beside 32 KiB of copies and 16 KiB of partials
    (MmaConfig(tiles=4, warps_k=4, lut_shared=2, x_staged=1), 16, "beside 40 KiB of tables and activations \\(over 48\\)"),
    # lut_shared=5: 128 KiB of signed copies + the 4 KiB single signed table, under 163 KiB; partials of
    # 64 tiles' rows at M=16 past them do not fit
    (MmaConfig(tiles=8, warps_k=32, lut_shared=5), 16, "beside 132 KiB of tables \\(over 163\\)"),
    # (the copies in dynamic shared memory: the partials lie over them, so only partials past them count)
    (MmaConfig(tiles=8, warps_k=16, lut_shared=3), 16, "beside 66 KiB of tables \\(over 99\\)"),
    (MmaConfig(tiles=8, warps_k=16, lut_shared=4), 16, "beside 68 KiB of tables \\(over 99\\)"),
    (MmaConfig(tiles=2, warps_k=4, stages=2, stage_pad=1), 4, "stage_pad=1 is for row-packed formats"),
    (MmaConfig(tiles=2, warps_k=8, lut_shared=2, stages=2), 16, r"2 pipeline stages of \d KiB beside"),
])
def test_bad_fragment_configs_are_refused_in_one_line(cfg, m, match):
    with pytest.raises(ValueError, match=match) as info:
        check_mma_config(cfg, N, 8192, m, 16, fragment=True)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=match):
        mma_scheduled_func("qtip-hyb-2", N, 8192, m, cfg)
    with pytest.raises(ValueError, match="lut_shared must be 0 or 1"):  # per-lane copies: fragment formats only
        check_mma_config(MmaConfig(lut_shared=2), N, K, 4, 32)


def test_router_flag_routes_hyb_to_the_fragment_kernel(monkeypatch):
    """On (today): HYB's FRAGMENT_MMA_MIN_M..16 (M=1 included) run this kernel through scheduled_func, and its decode route
    starts at FRAGMENT_DECODE_MIN_M. Off: its buckets go back to the GEMV / WMMA kernels and the decode
    route to GEMV_MAX_M + 1. 1MAD/3INST are not fragment-native either way."""
    assert library.FRAGMENT_MMA_ROUTED is True
    assert [kernel_family("qtip-hyb-3", m) for m in (1, 2, 4, 8, 16)] == [MMA_FAMILY] * 5
    assert library.family_options("qtip-hyb-2", 1) == (MMA_FAMILY, GEMV_FAMILY)  # the GEMV: a record's alternative
    assert kernel_family("qtip-1mad-2", 4) == GEMV_FAMILY  # not fragment-native
    assert library.default_decode_min_m("qtip-hyb-2") == library.FRAGMENT_DECODE_MIN_M
    assert library.default_decode_min_m("qtip-3inst-2") == library.GEMV_MAX_M + 1
    src = compile_sm90({"k": scheduled_func(KernelSpec("qtip-hyb-2", N, K, 4), parse_target("sm_90"))})
    assert "mma.sync.aligned.m16n8k16" in src and "W_lane_gather" in src
    monkeypatch.setattr(library, "FRAGMENT_MMA_ROUTED", False)
    assert [kernel_family("qtip-hyb-2", m) for m in (1, 4, 8, 16)] == [GEMV_FAMILY, GEMV_FAMILY, TC_FAMILY, TC_FAMILY]
    assert library.default_decode_min_m("qtip-hyb-2") == library.GEMV_MAX_M + 1


def test_tuner_space_and_sweep_candidates(monkeypatch):
    """The tuner's mma.sync space and tc_sweep's candidates of HYB: fragment configs (even tiles, the
    per-lane tables by default), all passing the fragment check."""
    from qcompile.bench import tc_sweep
    from qcompile.tune import space

    monkeypatch.setattr(library, "FRAGMENT_MMA_ROUTED", True)
    spec = KernelSpec("qtip-hyb-2", 28672, 8192, 16)
    cands = space.candidates(spec)
    assert cands[0] == space.default_config(spec) == default_mma_config(28672, 8192, 16, 16, fragment=True)
    for cfg in cands:
        check_mma_config(cfg, 28672, 8192, 16, 16, fragment=True, staged_bits=2)
    # the fragment kernel's pipeline is in the space (it passed the GPU suite), up to
    # FRAGMENT_MAX_TUNED_STAGES; beside the default's 16 copies the 32 (mma.lane_lut_candidate at M > 1),
    # the default's twin among the first candidates after the seeds (tune.space.HYB_SEEDS_MULTI)
    assert {cfg.stages for cfg in cands} == {1, 2} == set(range(1, space.FRAGMENT_MAX_TUNED_STAGES + 1))
    assert {cfg.lut_shared for cfg in cands} == {2, 3} and cands[0].lut_shared == 2
    seeds = len(space.HYB_SEEDS_MULTI)
    assert all(cand.lut_shared == 3 or cand.blocks_k > 1 for cand in cands[1:1 + seeds])
    assert MmaConfig(**{**cands[0].as_dict(), "lut_shared": 3}) in cands[:4 + seeds]
    monkeypatch.setattr(space, "FRAGMENT_MAX_TUNED_STAGES", 1)
    assert {cfg.stages for cfg in space.candidates(spec)} == {1}
    row = space.candidates(KernelSpec("int4-g128", 28672, 8192, 16))
    assert any(cfg.stages == 2 for cfg in row)
    fmt = qc.formats.get("qtip-hyb-2")
    sweep = tc_sweep.candidates(fmt, 28672, 8192, 4, [], True, True, "mma")
    assert sweep[0][0] == "mma-default" and sweep[0][1].lut_shared == 2
    assert {cfg.lut_shared for _, cfg, _ in sweep} == {0, 1, 2}
    assert all(cfg.tiles % 2 == 0 for _, cfg, _ in sweep) and all(intrin for _, _, intrin in sweep)


def test_tuning_record_fit_check_knows_fragment_configs():
    """A tuning record of HYB may hold lut_shared=2 (per-lane tables); other formats' may not."""
    from qcompile.tune import space

    cfg = MmaConfig(units=1, tiles=2, warps_k=8, lut_shared=2)
    assert space.fit_error(cfg, 28672, 8192, 4, 16, fragment=True) is None
    assert "lut_shared must be 0 or 1" in space.fit_error(cfg, 28672, 8192, 4, 32)
    assert "must be even" in space.fit_error(MmaConfig(tiles=1), 28672, 8192, 4, 16, fragment=True)
