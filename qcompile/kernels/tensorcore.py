"""Tensor-core rule of the fused decode + matmul for M >= 2 (low batch, M tile 16) and GEMM (M tiles
32..128): the decoded weight feeds WMMA 16x16x16 (fp16 x fp16 -> fp32) instead of CUDA-core FMAs.

Why: the CUDA-core GEMV does 16 FMAs per decoded weight at M=16 and becomes compute bound there; a
tensor core does the same products for free next to the decode, so at low batch the kernel stays
bound by the weight stream (and the decode), like the M=1 GEMV.

Per thread block (blockIdx.x over N tiles, blockIdx.y over M tiles), per K step:
  X tile   [BM, BK]   global -> shared (M padded with zero rows up to the M tile, by pad_einsum)
  W tile   [BN, BK]   packed words -> decode -> shared; each thread decodes whole decode units
                      (``fmt.decode_unit`` consecutive K columns of one row), optionally with the
                      format's hand-written decode intrinsic into registers, then vector stores
  warps    warps_m x warps_n x warps_k: a warp owns (BM/warps_m) x (BN/warps_n) outputs over its
           1/warps_k share of BK (split-K inside the block: more warps, hence more decoders and loads
           in flight, for the same output tile); WMMA fragments loaded from shared, fp32 accumulation
  epilogue the accumulators go to shared memory (one partial tile per K warp), and the block sums
           the warps_k partials and stores fp16.

Input: the unscheduled PrimFunc of ``compute.matmul_func(fmt, n, k, m, two_level=False)`` (blocks
W_gather?, W_decode [n, k], acc [m, n] fp32, Y fp16). One small dlight-style rule; the knobs are
``TensorCoreConfig`` (the tuner's space).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .schedules import _func_mod, _gather_block, inline_derived, inline_gather, vectorize_copy

FRAG = 16  # WMMA m16n16k16
WARP = 32


@dataclass(frozen=True)
class TensorCoreConfig:
    """Knobs of the tensor-core kernel. Tiles in elements; fragments are 16x16x16.

    m_tile: rows of X per block (16 for low batch; M is padded up to it); n_tile: output columns
    (weight rows) per block; k_tile: K columns per step (the shared tiles are [m_tile, k_tile] of X
    and [n_tile, k_tile] of decoded weights); warps_m / warps_n: warps tiling the output block;
    warps_k: warps splitting k_tile (each sums its share, partials meet in shared memory);
    vec: elements per vector copy into shared memory (8 fp16 = 16 bytes); units: consecutive decode
    units per thread and K step (their packed words come in one vector load: 4 int4 words or 2 E8P
    word pairs = 16 bytes); stages: 1 = load, decode and compute one K step after the other, 2 =
    software pipeline (double-buffered tiles: the next step is loaded and decoded before this
    step's fragments run, one barrier per step).
    """

    m_tile: int = 16
    n_tile: int = 64
    k_tile: int = 128
    warps_m: int = 1
    warps_n: int = 2
    warps_k: int = 2
    vec: int = 8
    units: int = 1
    stages: int = 1

    def as_dict(self):
        return asdict(self)

    @property
    def threads(self) -> int:
        return WARP * self.warps_m * self.warps_n * self.warps_k

    def operand_bytes(self) -> int:
        """Static shared memory of the X and W tiles (x stages; rows padded by 8 halves)."""
        return 2 * (self.m_tile + self.n_tile) * (self.k_tile + 8) * self.stages

    def partial_bytes(self) -> int:
        """Dynamic shared memory of the fp32 partial tiles (one per K warp)."""
        return 4 * self.warps_k * self.m_tile * self.n_tile


# The operand tiles are static shared memory (at most 48 KiB) and the fp32 partial tiles dynamic:
# TVM merges every dynamic shared buffer into one, and a float32 wmma store into a buffer merged with
# float16 tiles fails to lower ("tvm_access_ptr element type must match the source buffer").
MAX_STATIC_SHARED = 48 * 1024
# Measured on an H100: configs over 48 KiB of shared memory in all fail to launch
# (CUDA_ERROR_INVALID_VALUE; TVM does not raise the block's dynamic shared-memory limit)
MAX_SHARED = 48 * 1024
MAX_THREADS = 1024


def check_tc_config(cfg: TensorCoreConfig, n: int, k: int, m: int, unit: int) -> None:
    """Raise ValueError (one line) when ``cfg`` cannot schedule an [n, k] weight at batch m."""
    problems = []
    for name in ("m_tile", "n_tile", "k_tile", "warps_m", "warps_n", "warps_k", "vec", "units", "stages"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) <= 0:
            problems.append(f"{name} must be a positive int")
    if problems:
        raise ValueError(f"bad TensorCoreConfig {cfg.as_dict()}: {'; '.join(problems)}")
    if cfg.m_tile % (FRAG * cfg.warps_m):
        problems.append(f"m_tile {cfg.m_tile} is not a multiple of 16 x warps_m ({cfg.warps_m})")
    if cfg.n_tile % (FRAG * cfg.warps_n):
        problems.append(f"n_tile {cfg.n_tile} is not a multiple of 16 x warps_n ({cfg.warps_n})")
    if cfg.k_tile % (FRAG * cfg.warps_k):
        problems.append(f"k_tile {cfg.k_tile} is not a multiple of 16 x warps_k ({cfg.warps_k})")
    if n % cfg.n_tile:
        problems.append(f"n_tile {cfg.n_tile} does not divide N={n}")
    if k % cfg.k_tile:
        problems.append(f"k_tile {cfg.k_tile} does not divide K={k}")
    if cfg.k_tile % (unit * cfg.units):
        problems.append(f"k_tile {cfg.k_tile} is not a multiple of units ({cfg.units}) x the decode unit {unit}")
    elif (cfg.n_tile * cfg.k_tile // (unit * cfg.units)) % cfg.threads:
        problems.append(f"the {cfg.n_tile * cfg.k_tile // (unit * cfg.units)} groups of {cfg.units} decode units of "
                        f"a weight tile do not divide over {cfg.threads} threads")
    if cfg.vec not in (1, 2, 4, 8) or unit % cfg.vec and cfg.vec % unit:
        problems.append(f"vec {cfg.vec} must be 1, 2, 4 or 8 and divide the decode unit {unit}")
    if cfg.stages not in (1, 2):
        problems.append(f"stages {cfg.stages} must be 1 or 2")
    if cfg.threads > MAX_THREADS:
        problems.append(f"{cfg.threads} threads per block (over {MAX_THREADS})")
    if cfg.operand_bytes() > MAX_STATIC_SHARED:
        problems.append(f"{cfg.operand_bytes()} bytes of operand tiles in shared memory (over {MAX_STATIC_SHARED})")
    elif cfg.operand_bytes() + cfg.partial_bytes() > MAX_SHARED:
        problems.append(f"{cfg.operand_bytes() + cfg.partial_bytes()} bytes of shared memory (over {MAX_SHARED})")
    if m <= 0:
        problems.append(f"M={m} must be positive")
    if problems:
        raise ValueError(f"TensorCoreConfig {cfg.as_dict()} cannot schedule N={n} K={k} M={m}: "
                         + "; ".join(problems))


def schedule_tc_cuda(func, cfg: TensorCoreConfig = None, intrin=None, streamed=None, unit=None):
    """Schedule the decode + matmul ``func`` (see the module doc) for tensor cores; returns an
    IRModule. ``cfg``: None = ``default_tc_config`` of the shape. ``intrin``: the format's
    (TensorIntrin name, CUDA source) decode of one unit (``fmt.decode_intrin("cuda")``), or None
    for the plain TIR decode; ``streamed``: the packed-word tensors that intrinsic reads from
    registers (``fmt.streamed``); ``unit``: ``fmt.decode_unit`` (None: read off the decode block).
    ValueError (one line) when the config does not fit the shape."""
    import tvm

    from .intrinsics import tvm_cuda_tensor_intrin

    get_wmma_intrin_group = tvm_cuda_tensor_intrin().get_wmma_intrin_group

    # the intrinsic decodes from registers, so the table gathers stay a stage of their own there
    # (the format's derived tables and slices inlined into it: left at the root, TVM made them
    # global buffers the kernel read before anything wrote them, and qtip-hyb-2 crashed the H100);
    # the plain decode reads the tables inline
    sch = tvm.s_tir.Schedule(_func_mod(inline_derived(func) if intrin is not None else inline_gather(func)))
    acc = sch.get_sblock("acc")
    m_loop, n_loop, k_loop = sch.get_loops(acc)
    m, n, k = (int(sch.get(loop).extent) for loop in (m_loop, n_loop, k_loop))
    unit = unit or _decode_unit(tvm.s_tir.Schedule(_func_mod(func)), k)  # before the gather is inlined
    if intrin is not None:  # iterate the decode by (row, unit, column in unit), as the intrinsic does
        sch.transform_block_layout(sch.get_sblock("W_decode"), lambda i, j: (i, j // unit, j % unit))
    cfg = cfg or default_tc_config(n, k, m, unit)
    check_tc_config(cfg, n, k, m, unit)
    fm = cfg.m_tile // (FRAG * cfg.warps_m)
    fn = cfg.n_tile // (FRAG * cfg.warps_n)
    fk = cfg.k_tile // (FRAG * cfg.warps_k)
    warps_mn = cfg.warps_m * cfg.warps_n

    # 1. pad M up to the M tile: X gets zero rows (block X_pad), the result is cut back to M rows
    #    (block acc_pad copies the padded acc_pad buffer into acc)
    m_pad = -(-m // cfg.m_tile) * cfg.m_tile
    padded = m_pad != m
    if padded:
        sch.pad_einsum(acc, [m_pad, 1, 1])
        m_loop, n_loop, k_loop = sch.get_loops(acc)

    # 2. tiles: block (b*), warp (w*), fragments per warp (f*), one 16x16x16 fragment (t*); the N
    #    tile is the fast grid axis so that blocks running together share the X tile in L2
    bm, wm, fm_, tm = sch.split(m_loop, [None, cfg.warps_m, fm, FRAG])
    bn, wn, fn_, tn = sch.split(n_loop, [None, cfg.warps_n, fn, FRAG])
    ko, wk, fk_, tk = sch.split(k_loop, [None, cfg.warps_k, fk, FRAG])
    sch.reorder(bm, bn, wm, wn, wk, ko, fk_, fm_, fn_, tm, tn, tk)
    # split-K inside the block: K warp wk accumulates its own partial tile rf[wk] (rfactor), the
    # write-back block (still named "acc") sums them
    rf = sch.rfactor(wk, factor_axis=0)
    bm, bn, wm, wn, wk, ko, fk_, fm_, fn_, tm, tn, tk = sch.get_loops(rf)
    sch.bind(bm, "blockIdx.y")
    sch.bind(bn, "blockIdx.x")
    warp = sch.fuse(wm, wn)
    sch.bind(warp, "threadIdx.y")
    sch.bind(wk, "threadIdx.z")
    outer = sch.blockize(tm)  # one 16x16x16 fragment product (tensorized at the end)

    # 3. operand tiles in shared memory, written once per K step by all threads of the block
    x_s = sch.cache_read(outer, _read_named(sch, outer, "X"), "shared")
    w_s = sch.cache_read(outer, _read_named(sch, outer, "W_decode"), "shared")
    for tile in (x_s, w_s):
        sch.compute_at(tile, ko)
        # rows padded by 8 halves (16 bytes): fragment loads of 16 rows hit distinct banks
        sch.storage_align(tile, 0, axis=-2, factor=16, offset=8)
    if padded:
        sch.compute_inline(sch.get_sblock("X_pad"))
    _cooperative_copy(sch, x_s, cfg)
    _decode_to_shared(sch, w_s, cfg, unit, streamed)

    # 4. WMMA fragments from shared memory, one K fragment (all M and N fragments of the warp) at a
    #    time; accumulators in registers, stored to the shared partial tiles rf[wk] after the K loop
    a_frag = sch.cache_read(outer, _read_named(sch, outer, sch.get(x_s).writes[0].source.name), "wmma.matrix_a")
    b_frag = sch.cache_read(outer, _read_named(sch, outer, sch.get(w_s).writes[0].source.name), "wmma.matrix_b")
    sch.compute_at(a_frag, fk_)
    sch.compute_at(b_frag, fk_)
    store = sch.cache_write(outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(store, wk)
    sch.set_scope(store, 0, "shared.dyn")
    init = sch.decompose_reduction(outer, ko)

    # 5. epilogue: each thread sums the warps_k partials of one output (registers), casts, stores
    wb = sch.get_sblock("acc")  # rfactor replaced the block: fetch it again
    sch.reverse_compute_at(wb, bn)
    own = sch.get_loops(wb)[2:]  # below blockIdx.y/x: (K warp, row, column); no K warp loop when warps_k = 1
    r_m, r_n = own[-2:]
    if len(own) == 3:
        sch.reorder(r_m, r_n, own[0])
    out = sch.fuse(r_m, r_n)
    _, t_z, t_y, t_x = sch.split(out, [None, cfg.warps_k, warps_mn, WARP])
    sch.bind(t_z, "threadIdx.z")
    sch.bind(t_y, "threadIdx.y")
    sch.bind(t_x, "threadIdx.x")
    sch.set_scope(wb, 0, "local")
    if padded:  # acc_pad (registers) -> rows < M of acc -> Y: one block, predicated on the row
        sch.reverse_compute_inline(sch.get_sblock("Y"))
        sch.reverse_compute_at(sch.get_sblock("acc_pad"), t_x)
    else:
        sch.reverse_compute_at(sch.get_sblock("Y"), t_x)

    # 6. the decode of one unit: the format's intrinsic, or the plain TIR decode unrolled
    sources = []
    dec = sch.get_sblock("W_decode")
    if intrin is not None:
        name, source = intrin
        # the intrinsic writes a [1, 1, unit] fragment: the decoded unit as (row, unit, column)
        sch.transform_layout(dec, ("write", 0), lambda i, j: (i, j // unit, j % unit))
        sch.tensorize(sch.get_loops(dec)[-1], name)
        sources.append(source)
    else:
        sch.unroll(sch.get_loops(dec)[-1])

    # 7. tensorize: fill / load_a / load_b / mma / store, all 16x16x16, fp16 in, fp32 accumulate
    group = get_wmma_intrin_group(load_scope="shared", store_scope="shared.dyn", in_dtype="float16",
                                  out_dtype="float32", trans_b=True)
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], group["init"])
    for frag, key in ((a_frag, "load_a"), (b_frag, "load_b"), (store, "store")):
        r, c = sch.get_loops(frag)[-2:]
        r0, r1 = sch.split(r, [None, FRAG])
        c0, c1 = sch.split(c, [None, FRAG])
        sch.reorder(r0, c0, r1, c1)
        sch.unroll(r0)
        sch.unroll(c0)
        sch.tensorize(r1, group[key])
    sch.tensorize(sch.get_loops(sch.get_sblock("acc_rf"))[-3], group["compute"])
    for loop in (fk_, fm_, fn_):
        sch.unroll(loop)
    if cfg.stages > 1:
        _pipeline(sch, ko)
    if sources:
        sch.annotate(w_s, "pragma_import_c", "\n".join(sources))
    return sch.mod


def _read_named(sch, block, prefix):
    """Index of the read of ``block`` whose buffer name starts with ``prefix``."""
    for idx, region in enumerate(sch.get(block).reads):
        if region.source.name.startswith(prefix):
            return idx
    raise RuntimeError(f"block {sch.get(block).name_hint} reads no buffer {prefix}*")


def _cooperative_copy(sch, block, cfg):
    """All threads of the block copy a [rows, cols] tile into shared memory, ``vec`` elements at a
    time (the widest vector that divides the tile per thread)."""
    fused = sch.fuse(*sch.get_loops(block)[-2:])
    total = int(sch.get(fused).extent)
    vec = cfg.vec
    while vec > 1 and total % (vec * cfg.threads):
        vec //= 2
    _, t_z, t_y, t_x, v = sch.split(fused, [None, cfg.warps_k, cfg.warps_m * cfg.warps_n, WARP, vec])
    sch.bind(t_z, "threadIdx.z")
    sch.bind(t_y, "threadIdx.y")
    sch.bind(t_x, "threadIdx.x")
    sch.vectorize(v)


def _decode_to_shared(sch, w_s, cfg, unit, streamed):
    """The weight tile: every thread decodes ``units`` whole units (one row, ``units * unit``
    consecutive columns; their packed words staged in registers with one vector load) into
    registers, one unit at a time, and stores each to shared memory with ``vec``-wide stores.
    Returns the loop over the thread's units (where the decode of one unit is computed)."""
    from tvm import tirx


    rows, cols = sch.get_loops(w_s)[-2:]
    groups, per_thread, col = sch.split(cols, [None, cfg.units, unit])
    fused = sch.fuse(rows, groups)
    total = int(sch.get(fused).extent)
    if total % cfg.threads:
        raise ValueError(f"TensorCoreConfig {cfg.as_dict()}: the {total} groups of {cfg.units} decode units of a "
                         f"weight tile do not divide over {cfg.threads} threads")
    _, t_z, t_y, t_x = sch.split(fused, [None, cfg.warps_k, cfg.warps_m * cfg.warps_n, WARP])
    sch.bind(t_z, "threadIdx.z")
    sch.bind(t_y, "threadIdx.y")
    sch.bind(t_x, "threadIdx.x")
    dec = sch.get_sblock("W_decode")
    sch.compute_at(dec, per_thread)
    sch.set_scope(dec, 0, "local")
    gather = _gather_block(sch)
    if gather is not None:  # the unit's table words, into registers just before its decode
        sch.compute_at(gather, per_thread)
        sch.set_scope(gather, 0, "local")
        sch.unroll(sch.get_loops(gather)[-1])
    # the packed words of the thread's units: registers, vector loads (cache_read adds no reads,
    # so the indices stay valid)
    read_names = [r.source.name for r in sch.get(dec).reads]
    for name in streamed or ():
        if name in read_names:
            words = sch.cache_read(dec, read_names.index(name), "local")
            sch.compute_at(words, t_x)
            n_outer = [sch.get(lp).same_as(sch.get(t_x)) for lp in sch.get_loops(words)].index(True) + 1
            if all(isinstance(sch.get(lp).extent, tirx.IntImm) for lp in sch.get_loops(words)[n_outer:]):
                vectorize_copy(sch, words, 16, n_outer)  # (a window of data-dependent extent stays scalar)
    sch.unroll(per_thread)
    vec = min(cfg.vec, unit)
    if vec > 1:
        outer, inner = sch.split(col, [None, vec])
        sch.unroll(outer)
        sch.vectorize(inner)
    else:
        sch.unroll(col)
    return per_thread


def _pipeline(sch, ko):
    """Two-stage software pipeline over the K steps: the next step's tiles are loaded (X) and
    decoded (W) while this step's fragments run."""
    sch.annotate(ko, "software_pipeline_stage", [0, 0, 1])  # X tile, W tile, fragments
    sch.annotate(ko, "software_pipeline_order", [0, 1, 2])


def _decode_unit(sch, k):
    """The format's decode unit, read off the func (schedule_tc_cuda's ``unit`` overrides it): K over
    the unit axis of the gather stage where there is one, else the smallest constant the decode
    divides its column by (int4: qweight[i, j // 8] -> 8)."""
    import re

    gather = _gather_block(sch)
    if gather is not None:
        return k // int(sch.get(gather).writes[0].source.shape[1])
    block = sch.get(sch.get_sblock("W_decode"))
    col = re.escape(block.iter_vars[1].var.name)
    found = [int(d) for region in block.reads for rng in region.region
             for d in re.findall(rf"(?<![\w.]){col} // (\d+)", str(rng.min))]
    return min(found) if found else 8


def _candidates(n: int, m: int, unit: int = 8):
    """Configs in order of preference (the first that fits the shape is the default)."""
    if m <= 16:
        # measured best on the 70B MLP shapes at M=16 (H100, qcompile.bench.tc_sweep): 32-column N
        # tiles, 256-column K steps, 2 warps along N x 4 splitting K (int4-g128 1.24x / 1.26x of
        # cuBLAS fp16, e8p-2 0.95x / 0.90x), then the double-buffered 128-column step, which is the
        # better one for 32-column units (e8p-2: 140 vs 170 us on 28672x8192, 181 vs 182 us on
        # 8192x28672; int4-g128: 139 vs 130 us)
        first, second = (TensorCoreConfig(16, 32, 256, 1, 2, 4), TensorCoreConfig(16, 32, 128, 1, 1, 4, stages=2))
        if unit >= 32:
            first, second = second, first
        for base in (first, second):
            for units in (4, 2, 1):
                yield replace(base, units=units)
        # low batch: one 16-row fragment of X. Wide N tiles: every block re-reads its X tile from L2
        # (16 x k_tile fp16 per step, twice the bytes of a 64-row tile of 2-bit weights), but at
        # least one block per SM of an H100 (132) first; 8 warps per block, 2 along N and the rest
        # splitting K; 16-byte loads of packed words where the units allow (4 int4 words)
        tiles = [t for t in (128, 64, 32, 16) if n % t == 0]
        tiles = [t for t in tiles if n // t >= 132] + [t for t in tiles if n // t < 132][::-1]
        for n_tile in tiles:
            warps_n = min(2, n_tile // FRAG)
            for warps_k in (8 // warps_n, 4 // warps_n, 1):
                for units in (4, 2, 1):
                    for k_tile in (128, 256, 64, 512, 32, 16):
                        yield TensorCoreConfig(16, n_tile, k_tile, 1, warps_n, warps_k, 8, units, 1)
        return
    # GEMM: M tile by M, 4-8 warps each with a 32x32 to 64x64 output tile, no split-K
    m_tile, warps_m = (32, 1) if m <= 32 else (64, 2) if m <= 64 else (128, 2)
    for n_tile, warps_n in ((128, 2), (64, 2), (32, 1), (16, 1)):
        for k_tile in (32, 64, 128):
            for units in (2, 1):
                yield TensorCoreConfig(m_tile, n_tile, k_tile, warps_m, warps_n, 1, 8, units, 1)


def default_tc_config(n: int, k: int, m: int, unit: int = 8) -> TensorCoreConfig:
    """The preferred config (``_candidates``) that tiles (n, k, m) exactly; ValueError if none does."""
    for cfg in _candidates(n, m, unit):
        if cfg.units > 1 and cfg.units * unit > 32:  # several units: up to 16 bytes of int4 words
            continue
        try:
            check_tc_config(cfg, n, k, m, unit)
        except ValueError:
            continue
        return cfg
    raise ValueError(f"no tensor-core config tiles N={n}, K={k}, M={m} in decode units of {unit} "
                     f"(N must be a multiple of 16, K of 16 and of the unit)")


def tc_scheduled_func(fmt, n: int, k: int, m: int, cfg: TensorCoreConfig = None, use_intrin: bool = True):
    """The scheduled PrimFunc ("main") of ``fmt``'s fused decode + matmul on tensor cores: builds
    ``matmul_func(..., two_level=False)`` and applies ``schedule_tc_cuda`` with the format's decode
    intrinsic (where it has one and ``use_intrin``)."""
    from ..formats import get as get_format
    from .compute import matmul_func

    fmt = get_format(fmt)
    intrin = fmt.decode_intrin("cuda") if use_intrin else None
    mod = schedule_tc_cuda(matmul_func(fmt, n, k, m, two_level=False), cfg, intrin, fmt.streamed, fmt.decode_unit)
    return mod["main"]
