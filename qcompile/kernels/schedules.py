"""Hand-written TIR schedules of the fused decode + matmul PrimFunc (see compute.py).

One small rule per kernel family, in the style of TVM's dlight: each takes the unscheduled
PrimFunc and a config of knobs (the tuner's search space varies the knobs), and returns a
scheduled IRModule. Nothing here knows a format's bits: the decode block comes from the format.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GemvConfig:
    """Knobs of the CUDA GEMV / low-batch kernel (inner reduction over K).

    lut_shared: where a format's lookup tables live (E8P's 1 KiB abs table): 1 = shared memory
    (filled once per thread block; a warp's random lookups cost a few bank-conflict replays),
    0 = global memory through L1 (each warp lookup touches up to eight 128-byte lines).
    rows: output rows per thread block (threadIdx.y); threads_k: threads sharing one row's K
    (threadIdx.x, reduced with warp shuffles / shared memory); chunks: consecutive 8-column
    chunks a thread handles per step (4 chunks = 16 bytes of int4 words: one vector load);
    unroll: steps of the K loop unrolled so that several loads are in flight per thread;
    row_tile: rows per thread (register blocking over N), which divides the activation traffic from
    L1/shared memory by row_tile, the bound of the GEMV family at M > 1.
    lut_lanes (with lut_shared; only formats whose derived tables include a W_table_lanes stage, i.e.
    QTIP HYB, see Format.tir_tables; the others ignore it): 1 = the shared-memory table holds
    LUT_COPIES copies, entry-major, a warp lane reading its own (HYB: 512 uint32 x 16 = 32 KiB of
    dynamic shared memory per block); 0 = one copy (2 KiB, bank-conflict replays). Measured on an
    H100 (qtip-hyb-2, 28672x8192, M=1): 94 us with 0, 109 us with 1 (fewer blocks per SM), so 0.
    """

    rows: int = 4
    threads_k: int = 32
    chunks: int = 4
    unroll: int = 2
    row_tile: int = 1  # output rows per thread: each activation load is reused row_tile times
    lut_shared: int = 1  # formats with table gathers: 1 = copy the tables to shared memory per block
    lut_lanes: int = 0  # formats with a per-lane table stage (QTIP HYB): 1 = one copy per warp lane

    def as_dict(self):
        return asdict(self)


# A K split whose threads_k * chunks does not divide the decode units runs a ragged last step (the
# schedule masks the units past K); the config rules (default_gemv_config, the tuner's space) take
# one only while at most this fraction of the K loop's unit slots is idle.
MAX_RAGGED_IDLE = 1 / 8


def k_steps(units: int, threads_k: int, chunks: int) -> int:
    """Steps of the K loop over ``units`` decode units, threads_k * chunks units a step (the last
    one ragged where that does not divide ``units``)."""
    return -(-units // (threads_k * chunks))


def ragged_idle(units: int, threads_k: int, chunks: int) -> float:
    """The fraction of the K loop's unit slots past K: 0 when threads_k * chunks divides ``units``."""
    slots = k_steps(units, threads_k, chunks) * threads_k * chunks
    return (slots - units) / slots


def _func_mod(func):
    import tvm

    return tvm.IRModule({"main": func})


def vectorize_copy(sch, block, nbytes=16, n_outer=0):
    """Split the innermost loop of a register <-> memory copy block into the widest vectors of at
    most ``nbytes`` bytes (a power of two of lanes) that divide it, unrolled otherwise. ``n_outer``:
    how many enclosing loops are not the copy's own (a copy of one element has no loop)."""
    import tvm

    loops = sch.get_loops(block)
    if len(loops) <= n_outer:
        return
    loop = loops[-1]
    dtype = str(sch.get(block).writes[0].source.dtype)
    lanes = max(1, nbytes * 8 // tvm.DataType(dtype).bits)
    extent = int(sch.get(loop).extent)
    while extent % lanes:  # the widest vector (a power of two) that divides the copy
        lanes //= 2
    if extent == 1:
        return
    if lanes == 1:
        sch.unroll(loop)
        return
    if extent > lanes:
        outer, loop = sch.split(loop, [None, lanes])
        sch.unroll(outer)
    sch.vectorize(loop)


def schedule_gemv_cuda(func, cfg: GemvConfig = GemvConfig(), intrin=None, streamed=None):
    """Inner-reduction GEMV for small M: every thread decodes its chunk once and reuses it for
    all M activation rows; partial sums meet in a cross-thread reduction. ``streamed``: names of
    the packed-word tensors to stage in registers with vector loads (default: the decode's first
    read). Tables live where ``cfg.lut_shared`` / ``cfg.lut_lanes`` say: those a gather stage reads,
    and the format's derived tables (Format.tir_tables).

    threads_k * chunks need not divide the decode units along K (11008 = 344 E8P units = 8 * 43):
    the split then runs a ragged last step, and TVM's predicate (unit < units) guards every stage
    of a unit, from the global loads to the per-thread sum, so the units past K are neither read
    nor summed. A step must still have at least threads_k * chunks units (every thread's partial
    sum is initialized in the first step)."""
    import tvm

    sch = tvm.s_tir.Schedule(_func_mod(func))
    acc = sch.get_sblock("acc")
    m_loop, n_loop, c_loop, *runs = sch.get_loops(acc)  # runs: (run, pair) loops of the fp16 runs of a unit
    n_chunks = int(sch.get(c_loop).extent)
    n_rows = int(sch.get(n_loop).extent)
    if n_rows % (cfg.rows * cfg.row_tile) or n_chunks < cfg.threads_k * cfg.chunks:
        raise ValueError(f"config {cfg} does not tile N={n_rows} (rows*row_tile) or has more than the "
                         f"{n_chunks} decode units of K in one step (threads_k*chunks)")
    ragged = n_chunks % (cfg.threads_k * cfg.chunks) != 0  # a masked last K step
    bx, ty, rt = sch.split(n_loop, [None, cfg.rows, cfg.row_tile])
    ko, tx, kv = sch.split(c_loop, [None, cfg.threads_k, cfg.chunks])
    # M > 1: activation rows outside the row tile, so one activation row of the chunk is in
    # registers at a time (staging all M rows at once spills at M=16) and is reused row_tile times;
    # unless the decoded row tile itself would crowd the registers (QTIP's 16-row tiles: 256 values)
    m_outside = int(sch.get(m_loop).extent) > 1 and cfg.row_tile * cfg.chunks * _unit_of(sch) <= 128
    row_loops = (m_loop, rt) if m_outside else (rt, m_loop)
    sch.reorder(bx, ty, tx, ko, kv, *row_loops, *runs)
    rf = sch.rfactor(tx, factor_axis=0)  # per-thread partial sums, then a cross-thread reduction
    bx, ty, tx, ko, kv, outer_i, inner_i, *runs = sch.get_loops(rf)
    m_loop, rt = (outer_i, inner_i) if m_outside else (inner_i, outer_i)
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.set_scope(rf, 0, "local")

    part = sch.get_sblock("partial")
    dec = sch.get_sblock("W_decode")
    sch.compute_at(part, runs[0])
    sch.set_scope(part, 0, "local")
    # decode one chunk of one row (all row_tile rows when M > 1) once, reuse it for all M rows
    dec_at = kv if m_outside else rt
    sch.compute_at(dec, dec_at)
    sch.set_scope(dec, 0, "local")
    gather = _gather_block(sch)
    if gather is not None:  # table lookups / stream slices of the chunk, into registers just before its decode
        sch.compute_at(gather, dec_at)
        sch.set_scope(gather, 0, "local")
        sch.unroll(sch.get_loops(gather)[-1])
        slices = _get_sblock(sch, "W_slice")
        if slices is not None:  # the packed-word slices the gather shares, in registers just before it
            sch.compute_at(slices, dec_at)
            sch.set_scope(slices, 0, "local")
            sch.unroll(sch.get_loops(slices)[-1])
    derived = _place_derived_tables(sch, bx, cfg)  # the format's W_table* stages (Format.tir_tables)
    if cfg.lut_shared and gather is not None:  # tables to shared memory: what the gather reads besides the packed words
        stream_names = set(streamed or ()) | derived | {"W_slice_local"}  # (the slices: registers, above)
        for idx in [i for i, r in enumerate(sch.get(gather).reads) if r.source.name not in stream_names]:
            _table_to_shared(sch, gather, idx, bx, cfg)

    p_loop, k_loop = sch.get_loops(part)[-2:]  # (pair, k) of a paired fp16 run: pairs innermost,
    sch.reorder(k_loop, p_loop)                 # then one HFMA2 per pair (below)

    # 16-byte vector loads of the packed words and of the activations
    n_outer = 4  # bx, ty, tx, ko enclose the per-step copies
    staged = [(dec, 0)]
    if streamed:  # each from the decode block, or from the gather when only the gather reads it
        staged = []
        for nm in streamed:
            for blk in (dec, gather, _get_sblock(sch, "W_slice")):
                names = [] if blk is None else [r.source.name for r in sch.get(blk).reads]
                if nm in names:
                    staged.append((blk, names.index(nm)))
                    break
    for blk, idx in staged:  # cache_read adds no reads, so the indices stay valid
        wq = sch.cache_read(blk, idx, "local")
        sch.compute_at(wq, ko)
        vectorize_copy(sch, wq, 16, n_outer)
    xl = sch.cache_read(part, 0, "local")
    sch.compute_at(xl, m_loop if m_outside else ko)
    vectorize_copy(sch, xl, 16, n_outer + (2 if m_outside else 0))
    # cross-thread reduction and the fp16 store (before the tensorize below: in a ragged split,
    # blockizing a predicated block leaves a scope that reverse_compute_at refuses)
    sch.reverse_compute_at(acc, ty)
    # rfactor(factor_axis=0) left the loops as (thread reduction, row tile, m) (unit loops
    # dropped); the thread-bound reduction must be innermost so that every output gets its own
    # cross-thread reduction
    inner = sch.get_loops(acc)[2:]
    if len(inner) > 1:
        sch.reorder(*inner[1:], inner[0])
    sch.bind(inner[0], "threadIdx.x")
    sch.set_scope(acc, 0, "local")
    out = sch.get_sblock("Y")
    sch.reverse_compute_at(out, ty)
    # a paired run as run/2 HFMA2 (TVM prints float16x2 arithmetic lane by lane)
    from .intrinsics import register_hdot_pairs

    hdot, hdot_source = register_hdot_pairs(_run_of(sch))
    sch.decompose_reduction(part, sch.get_loops(part)[-2])
    _tensorize(sch, sch.get_sblock("partial_update"), 2, hdot, ragged)
    sources = [hdot_source]
    if intrin is not None:  # the format's hand-written decode of one unit
        name, source = intrin
        _tensorize(sch, dec, 1, name, ragged)
        sources.append(source)
    else:
        sch.unroll(sch.get_loops(dec)[-1])
    if sources:
        sch.annotate(rf, "pragma_import_c", "\n".join(sources))
    sch.unroll(kv)
    sch.unroll(rt)
    sch.unroll(m_loop)
    for loop in runs:
        sch.unroll(loop)
    if cfg.unroll > 1:
        ko_outer, ko_inner = sch.split(ko, [None, cfg.unroll])
        sch.unroll(ko_inner)

    return sch.mod


def _run_of(sch) -> int:
    """Products per fp16 partial sum: the decode unit over the runs per unit (partial [m, n, c, r, 2])."""
    return _unit_of(sch) // int(sch.get(sch.get_sblock("partial")).writes[0].source.shape[3])


def _unit_of(sch) -> int:
    """The decode unit (columns) of the fused PrimFunc: the last axis of W_decode [n, k/unit, unit]."""
    return int(sch.get(sch.get_sblock("W_decode")).writes[0].source.shape[-1])


def _table_to_shared(sch, block, read_idx, bx, cfg):
    """Copy a lookup table read by ``block`` to shared memory once per thread block, by all threads."""
    tc = sch.cache_read(block, read_idx, "shared")
    sch.compute_at(tc, bx)
    fused = sch.fuse(*sch.get_loops(tc)[1:])
    _, t_y, t_x = sch.split(fused, [None, cfg.rows, cfg.threads_k])
    sch.bind(t_y, "threadIdx.y")
    sch.bind(t_x, "threadIdx.x")


TABLE_STAGES = ("W_table_lanes", "W_table")  # Format.tir_tables stages, consumers first


def _get_sblock(sch, name):
    """The block ``name``, or None when the PrimFunc has no such stage."""
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises its own error type for a missing block
        return None


def _inline_tables(sch, names=TABLE_STAGES):
    for name in names:
        blk = _get_sblock(sch, name)
        if blk is not None:
            sch.compute_inline(blk)


def _place_derived_tables(sch, bx, cfg):
    """The format's derived tables (Format.tir_tables): with lut_shared, computed into shared memory
    once per thread block by all its threads (with lut_lanes, the per-lane copies W_table_lanes,
    in dynamic shared memory; else the single table W_table, its lane copies inlined); without,
    inlined into their readers. Returns the names of the buffers left in shared memory."""
    lanes, single = _get_sblock(sch, "W_table_lanes"), _get_sblock(sch, "W_table")
    if lanes is None and single is None:
        return set()
    if not cfg.lut_shared:
        _inline_tables(sch)
        return set()
    if cfg.lut_lanes and lanes is not None:
        _inline_tables(sch, ("W_table",))
        keep, scope = sch.get_sblock("W_table_lanes"), "shared.dyn"  # 64 KiB: over the static limit
    else:
        _inline_tables(sch, ("W_table_lanes",))
        keep, scope = sch.get_sblock("W_table"), "shared"
    sch.compute_at(keep, bx)
    fused = sch.fuse(*sch.get_loops(keep)[1:])
    _, t_y, t_x = sch.split(fused, [None, cfg.rows, cfg.threads_k])
    sch.bind(t_y, "threadIdx.y")
    sch.bind(t_x, "threadIdx.x")
    sch.set_scope(keep, 0, scope)
    return {sch.get(keep).writes[0].source.name}


def _tensorize(sch, block, n_loops, intrin, guarded):
    """Tensorize the innermost ``n_loops`` loops of ``block``. ``guarded``: the block carries the
    ragged-K predicate (units past K), which tensorize cannot match (it compares the block's
    predicate with the intrinsic's, which has none): blockize the loops first, which moves the
    predicate (it depends on outer loops only) onto the new outer block, and tensorize the
    predicate-free copy inside it."""
    loop = sch.get_loops(block)[-n_loops]
    if guarded:
        outer = sch.blockize(loop)
        (inner,) = sch.get_child_blocks(outer)
        loop = sch.get_loops(inner)[-n_loops]
    sch.tensorize(loop, intrin)


def _gather_block(sch):
    """The format's table-gather stage (W_gather), or None."""
    return _get_sblock(sch, "W_gather")


def inline_derived(func):
    """``func`` with the format's derived stages (table stages of Format.tir_tables, W_slice) inlined
    into their readers, the gather kept: for rules that keep a gather stage but place no tables
    (a stage left at the root would become a global buffer of its own)."""
    import tvm

    sch = tvm.s_tir.Schedule(_func_mod(func))
    _inline_tables(sch)
    _inline_tables(sch, ("W_slice",))
    return sch.mod["main"]


def inline_gather(func):
    """``func`` with the gather stage inlined into the decode (for rules that expect one
    elementwise decode producer, e.g. dlight's tensor-core GEMM)."""
    import tvm

    sch = tvm.s_tir.Schedule(_func_mod(func))
    gather = _gather_block(sch)
    if gather is None:
        return func
    _inline_tables(sch)  # the format's derived tables (Format.tir_tables) too
    _inline_tables(sch, ("W_slice",))  # and the slices the gather reads
    sch.compute_inline(sch.get_sblock("W_gather"))
    return sch.mod["main"]


def schedule_llvm(func):
    """CPU schedule: rows in parallel, the decode of each chunk computed once per row."""
    import tvm

    sch = tvm.s_tir.Schedule(_func_mod(inline_gather(func)))
    acc = sch.get_sblock("acc")
    m_loop, n_loop, c_loop, *runs = sch.get_loops(acc)
    sch.reorder(n_loop, m_loop, c_loop)
    sch.parallel(n_loop)
    part = sch.get_sblock("partial")
    sch.compute_at(part, c_loop)
    sch.compute_inline(sch.get_sblock("W_decode"))
    return sch.mod


def schedule_gemm_cuda(func, target):
    """Tensor-core GEMM for M > 16: the decode runs in the shared-memory staging of the weight
    tile, then WMMA 16x16x16. For now this delegates the tiling to TVM's dlight Matmul rule (the
    decode stays fused); our own mma.sync/ldmatrix GEMM family replaces it in the tuning work."""
    from tvm.s_tir import dlight as dl

    from tvm.s_tir.dlight.gpu.matmul import MatmulTensorization

    from .intrinsics import tvm_cuda_tensor_intrin

    tvm_cuda_tensor_intrin()  # before dlight imports it the slow way (see there)

    tgt = target.tvm_target()
    func = inline_gather(func)
    # dlight's Matmul only tensorizes above M=64; its WMMA rule itself is fine from M=32
    sch = MatmulTensorization().apply(func, tgt, False)
    if sch is not None:
        return sch.mod
    mod = _func_mod(func)
    with tgt:
        out = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(mod)
    attrs = out["main"].attrs
    if attrs is None or "tirx.is_scheduled" not in attrs:
        raise ValueError("the tensor-core GEMM rule does not apply to this shape")
    return out
