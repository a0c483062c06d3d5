"""mma.sync rule for fragment-native formats (``Format.fragment_native``: QTIP HYB in the reference's
kernel layout; QTIP 1MAD / 3INST as the unregistered variants qtip-<code>-<K>@mma-kernel), whose
stored order IS the PTX mma.m16n8k16 A-fragment order: lane l's packed bytes of a 16x16 tile decode
to exactly its own eight A registers (V=1: register e = state 8l + e; the format's gather decodes
the codes, there is no table).

The generic mma.sync kernel (qcompile.kernels.mma) gives lane (g, t) whole decode units (16 columns
of weight rows 2g, 2g + 1). For HYB such a tile row needs stream slices of four lanes' chunks, read as
scalar 16-bit loads (qtip-hyb-2 M=16 on 28672x8192: 606 us, against 322 us on the WMMA kernel). Here
instead every lane decodes its own fragment, as the layout was designed for:

- rows: tile row r = g + 8h is mma row r itself (``NATURAL_ROWS``: ``a_layout_natural``), so the output
  comes out in natural row order; columns: step s of K block kb multiplies tile column
  J = kb * steps + s in its natural order (``natural_column``); the activations of a lane are
  column pairs (4-byte loads).
- per lane and 32x32 super-tile (I2, J2): its 4K packed bytes (all four tiles: K=2 one 8-byte load,
  K=4 one 16-byte load) and lane l + 1's 4K bytes (a second load, an L1 hit) are staged in registers
  (stage W_lane_words); per tile one stream slice (own chunk << 8K | next chunk, W_lane_slice); four
  windows at bits 0, 2K, 4K, 6K -> four HYB table words (W_lane_gather, the table in shared memory:
  ``MmaConfig.lut_shared`` 2 = one copy per lane % 16, 1 = one copy, 0 = global); A register e = half
  e % 2 of word e // 2 (W_frag; with ``PACKED_A`` W_frag holds the words themselves as the mma's 32-bit
  A registers). The format owns every bit of this (``TrellisFormat.tir_fragment_*``,
  stages built by ``compute.fragment_stages``); this module only places the stages.
- two 16-row tiles a warp are the two row-subtiles of a super-tile, so a lane's staged words feed
  both (``check_mma_config(..., fragment=True)`` refuses an odd ``MmaConfig.tiles``); a K block is
  4 x span = 64 x units columns (2 x units super-tiles), the generic kernel's K blocks for QTIP's
  16-column unit, so the MmaConfig knobs and their checks are the same, plus lut_shared=2 and a
  shared-memory check (default: ``format_default_mma_config``, one unit a lane).

Everything else (split-K warps and their shared-memory partials, M padding to n8 token tiles, the
epilogue, one mma.sync per step, tile and token tile) is the generic rule's
(``mma.schedule_mma_rows``).
"""
from __future__ import annotations

from ..formats.base import tir_word_half
from .mma import (FRAGMENT_DYNAMIC_LUT, FRAGMENT_LUT_COPIES, FRAGMENT_SIGNED_LUT, MMA_M, NATURAL_ROWS,
                  NATURAL_ROWS_PACKED_A, STAGED_BITS, MmaConfig, _loops_below, check_mma_config,
                  format_default_mma_config, fill_per_block, fragment_products, k_blocks, partials_over_copies,
                  schedule_mma_rows, span_of, streamed_bits, x_fragments)
from .schedules import _get_sblock, vectorize_copy

# the A fragments as the lane's 32-bit registers (mma.NATURAL_ROWS_PACKED_A: W_frag holds the gathered
# words whole) rather than fp16 halves: nvcc rebuilt each register from its two halves (SHF + PRMT, 2
# of 9 instructions a table word). H100, M=1, same process (artifacts/bench/
# mma-sweep-qtip-hyb-packed-a-h100.json): qtip-hyb-2 28672x8192 68.5 -> 54.6 us, 8192x28672 67.3 ->
# 51.5; hyb-3 72.2 -> 59.8, 71.8 -> 57.3; hyb-4 70.5 -> 60.3, 71.4 -> 55.0; M=16 97.2 -> 88.9 and
# 104.9 -> 104.7 us; the GPU suite passed with it on (294 tests)
PACKED_A = True


def natural_column(kb, s, hi, t, lo, span):
    """The weight / activation column of fragment column c = 8 * hi + 2 * t + lo of mma step s of K
    block kb: tile column J = kb * (span / 4) + s, in its natural order (the A fragment's own)."""
    return kb * (4 * span) + 16 * s + 8 * hi + 2 * t + lo


def fragment_mma_func(fmt, n: int, k: int, m: int, span: int, blocks: int = 0, lane_copies: int = 0,
                      packed_a: bool = False, signed_table: bool = False):
    """PrimFunc main(X fp16[m, k], *packed tensors, Y fp16[m, n]) of a fragment-native format:
    acc[a, i] = sum over K blocks kb, steps s, fragment columns c of X_frag[a, kb, s, c] *
    W_frag[i, kb, s, c], W_frag[i, kb, s, (hi, t, lo)] = A register 4hi + 2h + lo of lane
    4 * (i % 8) + t of tile (i // 16, kb * span / 4 + s), h = i % 16 // 8 (``tir_fragment_decode``),
    i.e. the weight at row i, column ``natural_column``. ``blocks``: K blocks of the loop (0: those of
    K); past K's, X_frag is zero and W_frag repeats K's last block (as ``mma.mma_func``).
    ``lane_copies``: copies of the format's lane table stage (W_table_lanes; 0: its default);
    ``signed_table``: the format's sign-folded tables (``Format.tir_tables(signed=True)``)."""
    import tvm
    from tvm import te

    from .compute import fragment_stages

    if not getattr(fmt, "fragment_native", False):
        raise ValueError(f"{fmt.name} is not fragment-native (its stored order is not the mma A-fragment order)")
    fmt.check_shape(n, k)
    if span % 8:
        raise ValueError(f"span {span} must be a multiple of 8 (K blocks of whole 32-column super-tiles)")
    X, XF, clamp, frag = x_fragments(m, k, span, blocks, lambda kb, *c: natural_column(kb, *c, span))
    params, bufs = fragment_stages(fmt, n, k, lane_copies, signed_table)
    steps = frag[1]

    def w_value(tile, h, g, kb, s, hi, t, lo):  # weight row 16 * tile + 8h + g = A row g + 8h
        return fmt.tir_fragment_decode(bufs, tile, clamp(kb) * steps + s, 4 * g + t, 4 * hi + 2 * h + lo)

    def w_register(tile, h, g, kb, s, hi, t):  # the register of both lo halves
        return fmt.tir_fragment_register(bufs, tile, clamp(kb) * steps + s, 4 * g + t, 2 * hi + h)

    # the block iterates rows as (tile, h, g), so that the lane 4g + t of a register is plain in every
    # index (with i % 8, compute_at's region analysis relaxed the lane over the tile loops); its
    # buffer is [n, ...] like mma_func's (transform_layout below), which acc reads as an einsum
    if packed_a:
        WF = te.compute((n // MMA_M, 2, MMA_M // 2, *frag[:-1]), w_register, name="W_frag")
        Y = fragment_products(XF, frag, m, n, lambda i, axes: tir_word_half(
            WF[(i // MMA_M, i % MMA_M // 8, i % 8, *axes[:-1])], axes[-1]))
    else:
        WF = te.compute((n // MMA_M, 2, MMA_M // 2, *frag), w_value, name="W_frag")
        Y = fragment_products(XF, frag, m, n, lambda i, axes: WF[(i // MMA_M, i % MMA_M // 8, i % 8, *axes)])
    func = te.create_prim_func([X, *params, Y]).with_attr("global_symbol", "main")
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    sch.transform_layout(sch.get_sblock("W_frag"), ("write", 0),
                         lambda tile, h, g, *rest: (tile * MMA_M + h * 8 + g, *rest))
    return sch.mod["main"]


class _FragmentDecode:
    """The weight side of ``fragment_mma_func`` for ``mma.schedule_mma_rows``: lane (g, t) = lane
    4g + t computes its A registers of the warp's tiles; its staged words, slices and table words in
    registers; the table where ``cfg.lut_shared`` says."""

    def __init__(self, cfg: MmaConfig, staged_bits: int, packed_a: bool = False):
        self.cfg, self.staged_bits, self.packed_a = cfg, staged_bits, packed_a

    def staged_reads(self, sch):
        """The lane's staged words (W_lane_words: its own and lane + 1's bytes of each super-tile) read
        the packed trellis; with stages > 1 they read the block's shared-memory copy of the K step."""
        return [(sch.get_sblock("W_lane_words"), 0)]

    def lane_loops(self, sch, wf):
        # (tiles, h, g, steps, hi, t, lo) -> lane (g, t); the lane loop outermost, so that the stages
        # computed at it cover all the warp's tiles (both row-subtiles of a super-tile)
        loops = sch.get_loops(wf)
        lo = [] if self.packed_a else [loops[-1]]  # packed A: a register holds both lo halves
        loops = loops if self.packed_a else loops[:-1]
        g, s, hi, t = loops[-4:]
        tile_h = loops[-6:-4]
        sch.reorder(g, t, *tile_h, s, hi, *lo)
        # under a serial loop of extent 1: a thread loop straight under the K-step loop would be
        # flattened into it before InjectSoftwarePipeline counts its stages (MmaConfig.stages > 1)
        _, w_lane = sch.split(sch.fuse(g, t), [1, None])
        sch.bind(w_lane, "threadIdx.x")
        for loop in (*tile_h, s, hi, *lo):
            sch.unroll(loop)
        return w_lane

    def decode(self, sch, w_lane, bn):
        cfg = self.cfg
        # consumers first: the table words, the slices they share, the packed words those read
        for name in ("W_lane_gather", "W_lane_slice", "W_lane_words"):
            blk = sch.get_sblock(name)
            sch.compute_at(blk, w_lane)
            sch.set_scope(blk, 0, "local")
            loops = _loops_below(sch, blk, w_lane)
            if name == "W_lane_words":  # (super-tiles..., word): own words, then lane + 1's: two vector loads
                words = int(sch.get(loops[-1]).extent)
                half, _ = sch.split(loops[-1], [2, words // 2])
                for loop in (*loops[:-1], half):
                    sch.unroll(loop)
                vectorize_copy(sch, blk, 16, len(sch.get_loops(blk)) - 1)
            else:
                for loop in loops:
                    sch.unroll(loop)
        _place_tables(sch, bn, cfg)
        return []


def _place_tables(sch, bn, cfg: MmaConfig) -> None:
    """The format's derived tables (Format.tir_tables: W_table, its lane copies W_table_lanes):
    lut_shared 2: the lane copies (16) in shared memory, 3: the lane copies (32, 64 KiB) in dynamic
    shared memory, 4: the 16 copies of the sign-folded table (64 KiB) there, 5: its 32 copies (128
    KiB) there, 1: the single table, 0: both inlined (the table words read from the format's tensors in global memory). Filled once per
    thread block by all its threads."""
    lanes, single = _get_sblock(sch, "W_table_lanes"), _get_sblock(sch, "W_table")
    if lanes is None and single is None:
        return
    if cfg.lut_shared == 0:
        for blk in (lanes, single):
            if blk is not None:
                sch.compute_inline(blk)
        return
    staged_single = False
    if cfg.lut_shared in FRAGMENT_LUT_COPIES and lanes is not None:
        # 32 copies: the copies are filled from the single table in shared memory (a broadcast read
        # a word), itself filled first (two words a thread): filled from global memory directly, a
        # thread's 64 words were 128 16-bit loads that nvcc kept in flight at once (70 registers, not 40)
        staged_single = single is not None and cfg.lut_shared in FRAGMENT_DYNAMIC_LUT
        if single is not None and not staged_single:
            sch.compute_inline(single)
        keep = lanes
    else:
        if lanes is not None:
            sch.compute_inline(lanes)
        keep = sch.get_sblock("W_table")
    fill_per_block(sch, keep, bn, cfg)
    if staged_single:
        fill_per_block(sch, single, bn, cfg)
        sch.set_scope(single, 0, "shared")
    # (dynamic shared memory: TVM lays the split-K partials over the copies after the K loop)
    dynamic = cfg.lut_shared in FRAGMENT_DYNAMIC_LUT or (lanes is not None and partials_over_copies(cfg))
    sch.set_scope(keep, 0, "shared.dyn" if dynamic else "shared")


def schedule_fragment_mma_cuda(func, cfg: MmaConfig, unit: int = 16, staged_bits: int = STAGED_BITS,
                               packed_a: bool = False):
    """Schedule ``fragment_mma_func(fmt, n, k, m, span_of(cfg, unit), ..., packed_a=packed_a)`` for
    mma.sync (``unit``: the format's decode unit, which sets the K block as in the generic kernel;
    ``staged_bits``: the format's bits per weight, what a pipeline stage holds with ``cfg.stages`` > 1);
    returns an IRModule."""
    rows = NATURAL_ROWS_PACKED_A if packed_a else NATURAL_ROWS
    return schedule_mma_rows(func, cfg, unit, rows, _FragmentDecode(cfg, staged_bits, packed_a))


def fragment_mma_scheduled_func(fmt, n: int, k: int, m: int, cfg: MmaConfig = None, packed_a: bool = None):
    """The scheduled PrimFunc ("main") of a fragment-native format's fused decode + matmul on mma.sync
    (``packed_a``: A fragments as 32-bit registers; None: ``PACKED_A``)."""
    packed_a = PACKED_A if packed_a is None else packed_a
    from ..formats import get as get_format

    fmt = get_format(fmt)
    if not fmt.fragment_native:
        raise ValueError(f"{fmt.name} is not fragment-native (its stored order is not the mma A-fragment order)")
    unit = fmt.decode_unit
    cfg = cfg or format_default_mma_config(fmt, n, k, m)
    bits = streamed_bits(fmt, n, k)
    check_mma_config(cfg, n, k, m, unit, fragment=True, staged_bits=bits)
    func = fragment_mma_func(fmt, n, k, m, span_of(cfg, unit), k_blocks(cfg, k, unit),
                             FRAGMENT_LUT_COPIES.get(cfg.lut_shared, 0), packed_a,
                             cfg.lut_shared in FRAGMENT_SIGNED_LUT)
    return schedule_fragment_mma_cuda(func, cfg, unit, bits, packed_a)["main"]
