"""Decode-only kernel: the whole weight decoded to fp16 in global memory, for large batches.

From some M on, a fused decode + matmul cannot beat "decode once, then the vendor GEMM": the GEMM is
compute bound, cuBLAS on Hopper runs wgmma + TMA pipelines our TIR tensor-core GEMM does not reach
(the fused dlight GEMM measured 0.22-0.36x of cuBLAS at M=1024 on an H100), and writing an fp16
copy of the weight costs a fixed ~2 bytes per weight, which the GEMM's ~2*M flops per weight dwarf
at large M. The runtime (qcompile.runtime.linear) takes this route for M >= the module's
``decode_min_m`` of the format: this kernel writes W fp16[N, K] into a scratch tensor, torch's
``F.linear`` (cuBLAS) multiplies.

The decode is the format's (its TIR decode of a unit and its decode intrinsic); this module only
places it: one thread per decode unit of one row (``units`` consecutive units per thread), threads
of a block along a row, so packed-word loads and the fp16 stores are contiguous across a warp.

Input: ``decode_func(fmt, n, k)``: main(*packed tensors, W fp16[n, k]). One small rule; the knobs
are ``DecodeConfig``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .schedules import _func_mod, inline_derived, inline_gather, vectorize_copy


@dataclass(frozen=True)
class DecodeSpec:
    """The decode kernel of one (format, N, K) layer; ``name`` is its function in a module."""

    format: str
    n: int
    k: int

    @property
    def name(self) -> str:
        return f"decode_{re.sub(r'[^0-9a-zA-Z]', '_', self.format)}_n{self.n}_k{self.k}"


@dataclass(frozen=True)
class DecodeConfig:
    """threads: threads per block (``block_threads``: with stage, a block holds whole rows or a
    whole part of one row); units: consecutive decode units of a row per thread; lut_shared: 1 = a
    format's lookup tables (never its packed words) copied to shared memory once per block, 0 =
    read through L1 (the tables are small and hot in L1); stage: 1 = the block's decoded values go
    through shared memory and leave in 16-byte stores of consecutive lanes (coalesced), 0 = each
    lane stores its own units (a warp's stores then stride by a unit: e8p-2 on 28672x8192 wrote at
    0.50 of copy bandwidth, int4's 16-byte units at 0.97)."""

    threads: int = 256
    units: int = 1
    lut_shared: int = 0
    stage: int = 1

    def as_dict(self):
        return asdict(self)


def default_decode_config(fmt) -> DecodeConfig:
    """The measured best default per format family (H100): row-packed formats stage their stores
    (e8p-2 on 28672x8192: 186 us staged, 354 us not); QTIP's tile-packed units are 16x16 tiles
    whose rows a lane already writes 32 bytes at a time, and staging only adds the shared-memory
    round trip (qtip-hyb-2 on 28672x8192: 309 us unstaged, 333 us staged), and HYB's 2 KiB table
    is worth a shared-memory copy per block (263 us against 308 us)."""
    return DecodeConfig() if fmt.row_packed else DecodeConfig(stage=0, lut_shared=1)


def decode_func(fmt, n: int, k: int):
    """PrimFunc main(*packed tensors, W fp16[n, k]) with W = the format's decode of every unit."""
    from tvm import te

    from .compute import format_stages

    params, bufs = format_stages(fmt, n, k)
    unit = fmt.decode_unit
    W_unit = te.compute((n, k // unit, unit), lambda i, c, j: fmt.tir_decode_unit(bufs, i, c, j), name="W_decode")
    W = te.compute((n, k), lambda i, j: W_unit[i, j // unit, j % unit], name="W")
    return te.create_prim_func([*params, W]).with_attr("global_symbol", "main")


def block_threads(cfg: DecodeConfig, n: int, row_units: int) -> int:
    """Threads per block for ``n`` rows of ``row_units`` decode units. Unstaged: the largest of
    cfg.threads, 128, 64, 32 whose blocks tile the n * row_units units. Staged: blocks must also
    cover whole rows or whole parts of one row (the shared-memory tile is a rectangle): cfg.threads
    where it divides a row's threads or they divide it, else one row per block (e.g. 344 threads
    for E8P's K = 11008) when that is at most 1024 threads, else the largest part of a row of 128 to
    1024 threads (int4's K = 11008: 1376 units a row, 688 threads; 32-thread blocks measured 108 us
    against e8p-2's 39 us on 4096x11008), else 32."""
    per_row = row_units // cfg.units
    total = n * per_row
    if cfg.stage:
        options = [t for t in dict.fromkeys((cfg.threads, 128, 64))
                   if (per_row % t == 0 or t % per_row == 0) and total % t == 0]
        if not options and per_row <= 1024:
            options = [per_row]
        if not options:
            options = [t for t in range(1024, 127, -1) if per_row % t == 0][:1]  # the largest
        if not options and per_row % 32 == 0:
            options = [32]
    else:
        options = [t for t in dict.fromkeys((cfg.threads, 128, 64, 32)) if total % t == 0]
    if not options:
        raise ValueError(f"DecodeConfig {cfg.as_dict()}: the {total} threads' units ({n} rows x {per_row}) do not "
                         f"split into blocks of 32..{cfg.threads} threads" + (" of whole rows" if cfg.stage else ""))
    return options[0]


def check_decode_config(cfg: DecodeConfig, n: int, k: int, unit: int) -> None:
    """Raise ValueError (one line) when ``cfg`` cannot schedule the decode of an [n, k] weight."""
    for name in ("threads", "units"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"bad DecodeConfig {cfg.as_dict()}: {name} must be a positive int")
    if cfg.threads % 32 or cfg.threads > 1024:
        raise ValueError(f"bad DecodeConfig {cfg.as_dict()}: threads must be a multiple of 32, at most 1024")
    for name in ("lut_shared", "stage"):
        if getattr(cfg, name) not in (0, 1):
            raise ValueError(f"bad DecodeConfig {cfg.as_dict()}: {name} must be 0 or 1")
    if (k // unit) % cfg.units:
        raise ValueError(f"DecodeConfig {cfg.as_dict()}: the {k // unit} decode units of a row are not a "
                         f"multiple of units={cfg.units}")
    block_threads(cfg, n, k // unit)


def schedule_decode_cuda(func, cfg: DecodeConfig, unit: int, intrin=None, packed=(), stream: bool = True):
    """Schedule ``decode_func`` (derived stages inlined, ``inline_derived``) for CUDA; returns an
    IRModule. ``intrin``: the format's (TensorIntrin name, CUDA source) decode of one unit, or None;
    ``packed``: the packed-word tensors (``fmt.streamed``), which ``lut_shared`` never copies (they
    are the weight, not a table) and which ``stream`` loads into registers."""
    import tvm

    from .mma import _loops_below, decode_in_registers, stage_packed_words

    sch = tvm.s_tir.Schedule(_func_mod(func))
    out = sch.get_sblock("W")
    i_loop, j_loop = sch.get_loops(out)
    n = int(sch.get(i_loop).extent)
    k = int(sch.get(j_loop).extent)
    check_decode_config(cfg, n, k, unit)
    threads = block_threads(cfg, n, k // unit)
    c_loop, u_loop = sch.split(j_loop, [None, unit])
    # threads along the units of a row (row-major over (row, unit)): a warp's loads are one
    # contiguous stretch of the packed rows
    bx, tx, own = sch.split(sch.fuse(i_loop, c_loop), [None, threads, cfg.units])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    # the stores: 16-byte vectors of the decoded unit (to shared memory with stage)
    vectorize_copy(sch, out, 16, 3)
    sch.unroll(own)
    if cfg.stage:  # the block's tile from shared memory to W: consecutive lanes, consecutive 16 bytes
        store = sch.cache_write(out, 0, "shared")
        sch.reverse_compute_at(store, bx)
        flat = sch.fuse(*sch.get_loops(store)[1:])
        _, s_tx, vec = sch.split(flat, [None, threads, 8])
        sch.bind(s_tx, "threadIdx.x")
        sch.vectorize(vec)

    def place_table(table):  # copied once per block by all its threads
        sch.compute_at(table, bx)
        copy = sch.fuse(*sch.get_loops(table)[1:])
        _, t_x = sch.split(copy, [None, threads])
        sch.bind(t_x, "threadIdx.x")

    dec, consumers = decode_in_registers(sch, own, packed, cfg.lut_shared, place_table)
    if stream:
        stage_packed_words(sch, consumers, packed, tx)
    for loop in _loops_below(sch, dec, own)[:-1]:
        sch.unroll(loop)
    if intrin is not None:
        name, source = intrin
        sch.tensorize(sch.get_loops(dec)[-1], name)
        sch.annotate(out, "pragma_import_c", source)
    else:
        sch.unroll(sch.get_loops(dec)[-1])
    return sch.mod


def schedule_decode_llvm(func):
    """CPU schedule: rows in parallel, the format's TIR decode inlined."""
    import tvm

    sch = tvm.s_tir.Schedule(_func_mod(inline_gather(func)))
    sch.compute_inline(sch.get_sblock("W_decode"))
    i_loop, _ = sch.get_loops(sch.get_sblock("W"))
    sch.parallel(i_loop)
    return sch.mod


def decode_scheduled_func(fmt, n: int, k: int, target_kind: str = "cuda", cfg: DecodeConfig = None,
                          use_intrin: bool = True):
    """The scheduled PrimFunc ("main") of ``fmt``'s decode of an [n, k] weight for ``target_kind``
    ("cuda" or "llvm")."""
    from ..formats import get as get_format

    fmt = get_format(fmt)
    func = decode_func(fmt, n, k)
    if target_kind == "llvm":
        return schedule_decode_llvm(func)["main"]
    cfg = cfg or default_decode_config(fmt)
    intrin = fmt.decode_intrin("cuda") if use_intrin else None
    # packed words in registers only where a unit's words are a fixed region of its row (row-packed
    # formats); QTIP's tile-packed windows have data-dependent extents and are read through L1
    stream = fmt.row_packed
    return schedule_decode_cuda(inline_derived(func), cfg, fmt.decode_unit, intrin, fmt.streamed, stream)["main"]
