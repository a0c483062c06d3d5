"""Kernel library: which kernels a model needs, how each is scheduled, and one compiled module.

A kernel is keyed by (format, N, K, M bucket). Batches are served by the buckets compiled into
the module (see qcompile.runtime.dispatch): small M pads up to the next bucket, large M is split
into bucket-sized row blocks, so no M ever needs a kernel of its own.

A model with RHT weights also needs the randomized Hadamard transform kernels of
qcompile.kernels.hadamard (``RhtSpec(side, size, M bucket)``): ``rht_kernel_specs`` lists them and
``build(..., rht=...)`` compiles them into the same module as the matmul kernels.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

from ..formats import get as get_format
from .compute import matmul_func
from .decode import DecodeSpec, decode_scheduled_func
from .hadamard import SIDES, RhtSpec, rht_specs, scheduled_rht_func
from .mma import MMA_MAX_M, MmaConfig, mma_scheduled_func
from .pipeline import compile_module
from .schedules import GemvConfig, schedule_gemm_cuda, schedule_gemv_cuda, schedule_llvm
from .target import TargetInfo
from .tensorcore import TensorCoreConfig, tc_scheduled_func

# Above the largest bucket of a module the runtime splits M into bucket-sized launches, and from a
# format's ``default_decode_min_m`` on it decodes the weight once and multiplies with cuBLAS (see
# qcompile.kernels.decode): the fused GEMM buckets (then 64 and 256; 64 is an mma.sync bucket of
# int4/E8P now) lost to both on every shape measured (H100: e8p-2 M=64 on 8192x28672 710 us against
# 4 x 61 us on the mma.sync kernel), so GEMM buckets are opt-in (--buckets)
DEFAULT_BUCKETS = (1, 4, 16)
# every bucket issue 5 asks for; each needs a kernel, so it is opt-in (qcompile build --buckets) while
# compile time matters more than the last few percent of padding
TUNED_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GEMV_MAX_M = 16  # up to here the low-batch families (decode once, reuse over M); above, the GEMM
# (int4/E8P: mma.sync up to MMA_MAX_M first)
# from this bucket up to GEMV_MAX_M the low-batch WMMA kernel (qcompile.kernels.tensorcore) serves
# the buckets of the formats that do not run on mma.sync (``runs_mma``, below: QTIP 1MAD/3INST): at M=16 on the 70B MLP shapes it ran 1.2x (int4-g128) / 0.9-1.15x
# (e8p-2) of cuBLAS fp16 where the CUDA-core GEMV, 16 multiply-adds per decoded weight, reached
# 0.5-0.7x / 0.3x (H100). A tuning record names its kernel family and applies only to a bucket that
# family serves (an old GEMV record of M=16 is kept but not applied).
TC_MIN_M = 8
# the kernel families of a bucket (``kernel_family``); "gemv", "tensorcore" and "mma" are also the
# "kernel" field of a tuning record
GEMV_FAMILY, TC_FAMILY, MMA_FAMILY, GEMM_FAMILY = "gemv", "tensorcore", "mma", "gemm"
# from this bucket up to MMA_MAX_M, formats packed row by row (``Format.gemv_tile`` (1, 1): E8P,
# group-wise int) run the mma.sync kernel (qcompile.kernels.mma): each lane decodes its weights
# straight into A fragments, no shared memory. H100, 28672x8192 / 8192x28672, default MmaConfig:
# e8p-2 M=4 47.0 / 50.9 us (GEMV 79.9 / 79.7), M=16 70.8 / 63.9 us (WMMA kernel 140 / 180);
# int4-g128 M=4 56.9 / 64.7 (GEMV 76.2 / 81.7), M=16 72.3 / 67.1 (131 / 138). At M=1 the GEMV stays
# (e8p-2 42.2 / 44.0 us against the best mma config's 45.1 / 48.3). QTIP's tile-packed trellis is
# read through data-dependent windows that the row-wise mma lanes load as scalars (qtip-hyb-2 M=16:
# 606 us against 322 us on the WMMA kernel): QTIP HYB runs a fragment-native variant instead
# (FRAGMENT_MMA_ROUTED, below), 1MAD/3INST keep the GEMV / WMMA families.
MMA_MIN_M = 2
MIN_GEMV_THREADS = 32768  # threads in flight below which a GEMV cannot cover an H100-class GPU (132 SMs)
# threads of a 32-column-unit (E8P) GEMV that fill an H100 (132 SMs x 2048): below it, more threads
# along K (e8p-2 M=1, 8192x28672: 49.7 -> 46.2 us at 128 threads; 4096x11008: 26.5 -> 20.1 us)
TARGET_GEMV_THREADS = 262144


# int4 and E8P on a CUDA target add the mma.sync buckets 32 and 64 (MMA_MAX_M): one launch decodes the
# weight once for all rows, where blocks of 16 rows decode it once per block
MMA_EXTRA_BUCKETS = (32, 64)


def default_buckets(fmt, target_kind: str = "cuda") -> Tuple[int, ...]:
    """The M buckets ``qcompile build`` compiles for format ``fmt`` by default: DEFAULT_BUCKETS, plus
    MMA_EXTRA_BUCKETS for the formats that run mma.sync (``runs_mma``) on CUDA."""
    if target_kind == "cuda" and runs_mma(fmt) and mma_max_m(fmt) >= max(MMA_EXTRA_BUCKETS):
        return DEFAULT_BUCKETS + MMA_EXTRA_BUCKETS
    return DEFAULT_BUCKETS


# From this M on a row-packed format (``runs_mma``) takes the decode + cuBLAS route: below it, the
# mma.sync launches of the bucket plan cost less (each reads the packed weight once, ~0.4x of the
# fp16 weight's read time on the 70B MLP shapes, against ~2x for writing and reading an fp16 copy).
# With buckets up to 16 only (MMA_DECODE_MIN_M_M16), measured crossover (e8p-2, H100): M=64 split
# 268 us vs decode 361 us, M=128 split 536 us vs decode 359 us on 28672x8192 (59 vs 77 us and 115 vs
# 78 us on 4096x11008). With the M=32 and 64 buckets on one mma.sync launch each (H100, tc_sweep at
# 9b550f9: e8p-2 M=64 183.6 / 165.0 / 41.5 us on 28672x8192 / 8192x28672 / 4096x11008), M=128 costs
# two M=64 launches, 367 us against the decode route's 359 us: the crossover moves to 128
# (MMA_DECODE_MIN_M, for modules that have the 64 bucket). The WMMA formats (QTIP 1MAD / 3INST: M=16
# on the WMMA kernel costs about as much as the decode route) take it from GEMV_MAX_M + 1.
MMA_DECODE_MIN_M = 128
MMA_DECODE_MIN_M_M16 = 96
# QTIP HYB on its fragment-native mma.sync kernel: M=16 100 / 111 / 37.6 us (H100, same sweep), so
# M=32 as two launches (200 us on 28672x8192) beats decode + cuBLAS (263 + 155 us). At M=64 the bench
# at ae4cd4e timed both routes in one process (qtip-hyb-2-h100.json): four M=16 launches 384.1 /
# 407.0 / 103.1 us against decode + cuBLAS 444.3 / 443.1 / 96.0 us on 28672x8192 / 8192x28672 /
# 4096x11008, so the decode route starts above 64 (at 80, five launches, it would be ~490 us against
# ~445 on the large shapes)
FRAGMENT_DECODE_MIN_M = 65


# The fragment-native formats (``Format.fragment_native``: QTIP HYB, stored in the mma A-fragment
# order) have their own mma.sync kernel (qcompile.kernels.mma_fragment: each lane decodes its own A
# registers from its own bytes), which ``mma_scheduled_func`` builds for them, and which serves their
# buckets MMA_MIN_M..GEMV_MAX_M. H100 (tc_sweep at 9b550f9, qtip-hyb-2, default configs), against the
# GEMV (M < 8) / WMMA (M >= 8) kernels it replaces: 28672x8192 M=4 76.8 vs 240.6 us, M=16 100 vs 320 us;
# 8192x28672 M=4 84.4 vs 243 us, M=16 111 vs 336 us; 4096x11008 M=4 30.8 vs 207 us, M=16 37.6 vs 83.5 us.
FRAGMENT_MMA_ROUTED = True
# ... and its M=1 too: the tuner's alternative-family runs (H100, c8d9447, budget 12-16) measured the
# fragment kernel's best below the GEMV's best on all six shapes tried: 28672x8192 74.1 vs 84.6 us,
# 8192x28672 71.2 vs 73.6, 4096x11008 19.1 vs 29.4, 4096x4096 9.0 vs 13.6, 12288x4096 19.2 vs 20.5,
# 22016x4096 34.9 vs 35.5 us (schedules/h100/qtip-hyb-2.json); the GEMV stays its alternative
FRAGMENT_MMA_MIN_M = 1


def mma_min_m(fmt) -> int:
    """The smallest bucket format ``fmt`` runs on mma.sync when it does (``runs_mma``):
    FRAGMENT_MMA_MIN_M for a fragment-native one, MMA_MIN_M (M=1 on the GEMV) for the row-packed ones."""
    return FRAGMENT_MMA_MIN_M if get_format(fmt).fragment_native else MMA_MIN_M


def default_decode_min_m(fmt, buckets: Optional[Sequence[int]] = None) -> int:
    """The smallest M at which format ``fmt`` (name or Format) runs decode + cuBLAS by default, in a
    module compiled with ``buckets`` (None: ``default_buckets(fmt)``): for the row-packed formats
    MMA_DECODE_MIN_M when the buckets include MMA_MAX_M's single-launch bucket (64), else
    MMA_DECODE_MIN_M_M16; FRAGMENT_DECODE_MIN_M for a fragment-native one on mma.sync; GEMV_MAX_M + 1
    for the WMMA formats (each measured, above)."""
    f = get_format(fmt)
    if f.row_packed:
        buckets = default_buckets(f) if buckets is None else buckets
        return MMA_DECODE_MIN_M if max(MMA_EXTRA_BUCKETS) in buckets else MMA_DECODE_MIN_M_M16
    return FRAGMENT_DECODE_MIN_M if runs_mma(f) else GEMV_MAX_M + 1


def runs_mma(fmt) -> bool:
    """True when format ``fmt`` (name or Format) runs buckets mma_min_m(fmt)..mma_max_m(fmt) on mma.sync: its
    packed words are per row (``Format.gemv_tile`` (1, 1)), which the lanes load with vector loads,
    or it is fragment-native and FRAGMENT_MMA_ROUTED is on."""
    f = get_format(fmt)
    return f.row_packed or (FRAGMENT_MMA_ROUTED and f.fragment_native)


def mma_max_m(fmt) -> int:
    """The largest bucket format ``fmt`` runs on mma.sync when it does (``runs_mma``): MMA_MAX_M for
    the row-packed formats (measured there), GEMV_MAX_M for a fragment-native one."""
    return MMA_MAX_M if get_format(fmt).row_packed else GEMV_MAX_M


# QTIP 3INST's bucket 4 (M = 2..4) runs on the WMMA kernel too: H100, qtip-3inst-2 at M=4, WMMA (tc_sweep
# at 9b550f9) against the GEMV (bench records at 1e5e29e, the same GEMV kernel): 175 vs 262.8 us on
# 28672x8192, 166 vs 168 us on 8192x28672, 50.1 vs 56.9 us on 4096x11008 (the last pair in one process).
# 1MAD stays on the GEMV there: 183 vs 264.8 us, but 184 vs 170.5 us and 59.6 vs 57.8 us (same process).
TC_MIN_M_BY_CODE = {"3inst": 4}


def tc_min_m(fmt) -> int:
    """The smallest bucket a WMMA format ``fmt`` runs on the WMMA kernel (TC_MIN_M unless measured
    otherwise, TC_MIN_M_BY_CODE)."""
    return TC_MIN_M_BY_CODE.get(getattr(get_format(fmt), "code", None), TC_MIN_M)


def serves_gemv(fmt, m: int) -> bool:
    """True when bucket ``m`` (<= GEMV_MAX_M) of format ``fmt`` (name or Format) runs the CUDA-core
    GEMV family: M < ``mma_min_m`` for the formats that run mma.sync (``runs_mma``: M=1 of int4 and
    E8P, none of QTIP HYB), M < ``tc_min_m`` for the others. (QTIP HYB's GEMV thread holds a 32-row super-tile, whose M accumulators
    spill from M=8 on: qtip-hyb-2 on 28672x8192 at M=16 measured 3005 us on GEMV, 322 us on tensor
    cores; H100, 6b07141.)"""
    if runs_mma(fmt):  # (an unknown name fails here, with the formats listed)
        return m < mma_min_m(fmt)
    return m < tc_min_m(fmt)


def kernel_family(fmt, m: int) -> str:
    """Which kernel family runs bucket ``m`` of format ``fmt`` (name or Format) on CUDA:
    GEMV_FAMILY (``GemvConfig``), MMA_FAMILY (``MmaConfig``, MMA_MIN_M..MMA_MAX_M of the row-packed
    formats, FRAGMENT_MMA_MIN_M..GEMV_MAX_M of QTIP HYB) or TC_FAMILY (the WMMA kernel, ``TensorCoreConfig``,
    TC_MIN_M..GEMV_MAX_M of QTIP 1MAD/3INST); GEMM_FAMILY (no config) above those."""
    if runs_mma(fmt) and mma_min_m(fmt) <= m <= mma_max_m(fmt):
        return MMA_FAMILY
    if m > GEMV_MAX_M:
        get_format(fmt)
        return GEMM_FAMILY
    if serves_gemv(fmt, m):
        return GEMV_FAMILY
    return MMA_FAMILY if runs_mma(fmt) else TC_FAMILY


@dataclass(frozen=True)
class KernelSpec:
    format: str
    n: int
    k: int
    m: int

    @property
    def name(self) -> str:
        return f"{re.sub(r'[^0-9a-zA-Z]', '_', self.format)}_n{self.n}_k{self.k}_m{self.m}"


def default_gemv_config(n: int, k: int, m: int, unit: int = 8, tile: Tuple[int, int] = (1, 1)) -> GemvConfig:
    """The best hand-picked GEMV config for (n, k). From H100 sweeps (qcompile.bench.sweep). 8-column
    units (int4): M <= 2: 4 rows x 64 threads, 2 words per step, 2 steps unrolled; larger M: 32
    threads and 2 rows per thread, which halves the activation re-reads that bound M > 1. 32-column
    units (E8P word pairs): 4 rows per thread, one pair per step (the LSU, not DRAM, bounds these
    kernels: row_tile 4 divides the activation loads by 4; e8p-2 at M=1 on 28672x8192 went 79 -> 45 us).

    The config tiles K exactly where that keeps the preferred threads_k. Where it does not (a K with
    a large odd factor: 11008 = 344 E8P units = 8 * 43 would leave 8 threads per row), the preferred
    threads_k runs with a ragged last K step instead (the schedule masks the units past K), provided
    at most MAX_RAGGED_IDLE of the step slots are idle (344 units on 32 threads: 11 steps, 8 of 352
    slots idle); of the preferred chunks and 1, the one with fewer idle slots (ties: the preferred)."""
    from .schedules import MAX_RAGGED_IDLE, k_steps, ragged_idle

    if tuple(tile) != (1, 1):
        return _tiled_gemv_config(n, k, m, unit, tile)
    if unit >= 32:
        row_tile = 4 if m <= 4 else 2
        # M <= 2 only: at M=4 the GPU-filling split measured slower (e8p-2 28672x8192 86.6 vs 78 us)
        threads_k = 32 if m > 2 else next((t for t in (32, 64) if (n // row_tile) * t >= TARGET_GEMV_THREADS), 128)
        preferred = GemvConfig(rows=max(1, 128 // threads_k), threads_k=threads_k, chunks=1,
                               unroll=2 if m <= 2 else 1, row_tile=row_tile)
    elif m <= 2:
        preferred = GemvConfig(rows=4, threads_k=64, chunks=2, unroll=2, row_tile=1)
    else:
        preferred = GemvConfig(rows=4, threads_k=32, chunks=2, unroll=1, row_tile=2)
    chunks_k = k // unit  # decode units (the format's decode_unit columns each) along K

    def tile_rows(threads_k, chunks):  # rows, row_tile and unroll for a K split, or None
        steps = k_steps(chunks_k, threads_k, chunks)
        unroll = preferred.unroll if steps % preferred.unroll == 0 else 1
        for row_tile in (preferred.row_tile, 2, 1):
            # few threads along K (a K with a large odd factor that not even a ragged split keeps at
            # the preferred threads_k) leave too few threads to cover the GPU: give up rows per
            # thread for parallelism first
            if row_tile > 1 and (n // row_tile) * threads_k < MIN_GEMV_THREADS:
                continue
            # and blocks of at least 128 threads when few threads share a row
            for rows in (max(preferred.rows, 128 // threads_k), preferred.rows, 2, 1):
                if n % (rows * row_tile) == 0:
                    return GemvConfig(rows=rows, threads_k=threads_k, chunks=chunks, unroll=unroll,
                                      row_tile=row_tile)
        return None

    def exact():
        for threads_k in dict.fromkeys((preferred.threads_k, 64, 32, 16, 8, 4, 2, 1)):
            for chunks in (preferred.chunks, 1):
                if chunks_k % (threads_k * chunks) == 0:
                    cfg = tile_rows(threads_k, chunks)
                    if cfg is not None:
                        return cfg
        return None

    def ragged():
        fits = [c for c in dict.fromkeys((preferred.chunks, 1))
                if preferred.threads_k * c <= chunks_k
                and ragged_idle(chunks_k, preferred.threads_k, c) <= MAX_RAGGED_IDLE]
        for chunks in sorted(fits, key=lambda c: ragged_idle(chunks_k, preferred.threads_k, c)):  # stable
            cfg = tile_rows(preferred.threads_k, chunks)
            if cfg is not None:
                return cfg
        return None

    cfg = exact()
    if cfg is None or cfg.threads_k < preferred.threads_k:
        cfg = ragged() or cfg
    if cfg is None:
        raise ValueError(f"no GEMV config tiles N={n}, K={k} in units of {unit}")
    return cfg


def _tiled_gemv_config(n: int, k: int, m: int, unit: int, tile: Tuple[int, int]) -> GemvConfig:
    """Formats whose packed words come in groups of rows (``Format.gemv_tile``: a QTIP tile's 16 rows,
    HYB's 32x32 super-tiles): one group per thread (row_tile x chunks), which makes every word index
    a constant, and many threads along K, since each thread already holds 16-32 rows (from H100
    sweeps of qtip-3inst-2 / 1mad-2 / hyb-2 on the 70B MLP shapes: 128 x 16-row tiles, 64 x super-tiles
    along K; 32 rows per block: HYB at M=1 went 94.4 -> 83.7 us on 28672x8192 and 112.5 -> 79.8 us on
    8192x28672 with 128 super-tiles along K instead of 64). At M > 2 HYB keeps 64 super-tiles along K
    and 2 per block (28672x8192 M=4: 236 us, against 336 us with the M=1 split)."""
    from .schedules import MAX_RAGGED_IDLE, ragged_idle

    row_tile, chunks = tile
    units = k // unit
    if n % row_tile or units % chunks:
        raise ValueError(f"no GEMV config tiles N={n}, K={k} in groups of {row_tile} rows x {chunks} units")
    for threads_k in ((128 if m <= 2 else 128 // chunks), 64, 32, 16, 8, 4, 2, 1):
        if threads_k * chunks <= units and ragged_idle(units, threads_k, chunks) <= MAX_RAGGED_IDLE:
            break
    per_block = max(1, (32 if m <= 2 else 2 * row_tile) // row_tile)
    rows = per_block if n % (per_block * row_tile) == 0 else 1
    return GemvConfig(rows=rows, threads_k=threads_k, chunks=chunks, unroll=1, row_tile=row_tile)


KernelConfig = Union[GemvConfig, TensorCoreConfig, MmaConfig]


def family_options(fmt, m: int) -> Tuple[str, ...]:
    """The kernel families that can run bucket ``m`` of format ``fmt``: ``kernel_family`` first (the
    route without a tuning record), then the alternatives ``qcompile tune`` also measures, so that a
    record can move the bucket where it measured faster on that GPU and shape: at M=1, the mma.sync
    kernel or the GEMV, whichever is not the default, for the formats that run mma.sync; between the
    GEMV and the WMMA kernel for QTIP 1MAD/3INST's buckets 2..7 (1MAD's M=4: WMMA 30 % faster on
    28672x8192, 9 % slower on 8192x28672)."""
    default = kernel_family(fmt, m)
    if default == GEMM_FAMILY:
        return (default,)
    if runs_mma(fmt):
        if m != 1:
            return (default,)
        return (default, GEMV_FAMILY if default == MMA_FAMILY else MMA_FAMILY)
    if 2 <= m < TC_MIN_M:
        return (default, TC_FAMILY if default == GEMV_FAMILY else GEMV_FAMILY)
    return (default,)


_CONFIG_FAMILY = {GemvConfig: GEMV_FAMILY, TensorCoreConfig: TC_FAMILY, MmaConfig: MMA_FAMILY}


def check_config_family(spec: KernelSpec, config) -> str:
    """The kernel family that runs ``spec`` with ``config``: ``kernel_family`` for None, else the
    config's own family when it is one of ``family_options`` (a tuning record may move a bucket to an
    alternative family); ValueError (one line) for a config of a family that cannot run the bucket
    (a GemvConfig for an mma.sync bucket of M > 1, any config for a GEMM bucket, which has no knobs)."""
    family = kernel_family(spec.format, spec.m)
    if config is None:
        return family
    if _CONFIG_FAMILY.get(type(config)) in family_options(spec.format, spec.m):
        return _CONFIG_FAMILY[type(config)]
    expected = {GEMV_FAMILY: GemvConfig, TC_FAMILY: TensorCoreConfig, MMA_FAMILY: MmaConfig}.get(family)
    if expected is None or type(config) is not expected:
        runs = {GEMV_FAMILY: "the CUDA-core GEMV, which takes a GemvConfig",
                TC_FAMILY: "the low-batch WMMA tensor-core kernel, which takes a TensorCoreConfig",
                MMA_FAMILY: "the mma.sync kernel, which takes an MmaConfig",
                GEMM_FAMILY: f"the GEMM (M > {mma_max_m(spec.format) if runs_mma(spec.format) else GEMV_MAX_M}), "
                             f"which takes no config"}[family]
        raise ValueError(f"M={spec.m} of {spec.format} runs on {runs}; got a {type(config).__name__}")
    return family


# Scheduling is Python (and registers TensorIntrins on first use): one schedule at a time where
# threads compile kernels side by side (the tuner), the compiles themselves overlap.
SCHEDULE_LOCK = threading.Lock()


def scheduled_func(spec: KernelSpec, target: TargetInfo, config: Optional[KernelConfig] = None):
    """The scheduled PrimFunc of one kernel, renamed to ``spec.name``. ``config``: the knobs of a
    family that can run the bucket (``family_options``: a GemvConfig, MmaConfig or TensorCoreConfig,
    none for the GEMM), which picks that family, or None for the default family and config;
    ValueError (one line) for another family's config or one that does not fit the shape. The CPU (llvm) schedule
    has no knobs and ignores ``config``."""
    fmt = get_format(spec.format)
    if target.kind == "llvm":
        mod = schedule_llvm(matmul_func(fmt, spec.n, spec.k, spec.m))
        return mod["main"].with_attr("global_symbol", spec.name).with_attr("tirx.is_scheduled", True)
    family = check_config_family(spec, config)
    if family == MMA_FAMILY:
        return mma_scheduled_func(fmt, spec.n, spec.k, spec.m, config).with_attr(
            "global_symbol", spec.name).with_attr("tirx.is_scheduled", True)
    if family == TC_FAMILY:
        return tc_scheduled_func(fmt, spec.n, spec.k, spec.m, config).with_attr(
            "global_symbol", spec.name).with_attr("tirx.is_scheduled", True)
    elif family == GEMV_FAMILY:
        cfg = config or default_gemv_config(spec.n, spec.k, spec.m, fmt.decode_unit, fmt.gemv_tile)
        mod = schedule_gemv_cuda(matmul_func(fmt, spec.n, spec.k, spec.m), cfg, fmt.decode_intrin("cuda"),
                                 fmt.streamed)
    else:
        mod = schedule_gemm_cuda(matmul_func(fmt, spec.n, spec.k, spec.m, two_level=False), target)
    func = mod["main"].with_attr("global_symbol", spec.name).with_attr("tirx.is_scheduled", True)
    return func


def scheduled_decode_func(spec: DecodeSpec, target: TargetInfo):
    """The scheduled decode kernel of ``spec`` (qcompile.kernels.decode), renamed to ``spec.name``."""
    func = decode_scheduled_func(spec.format, spec.n, spec.k, "llvm" if target.kind == "llvm" else "cuda")
    return func.with_attr("global_symbol", spec.name).with_attr("tirx.is_scheduled", True)


def rht_kernel_specs(layers: Iterable[Tuple[int, int]], buckets: Sequence[int]) -> List[RhtSpec]:
    """The RHT kernels that RHT layers of shapes (N, K) need, one per (side, size, bucket): the input
    side at size K (hadUt(SU ⊙ x) before the matmul) and the output side at size N (SV ⊙ hadU(y)
    after it). Sorted and deduplicated; QCompileError for a size no Hadamard construction covers."""
    sizes = {side: set() for side in SIDES}
    for n, k in layers:
        sizes["input"].add(int(k))
        sizes["output"].add(int(n))
    return [spec for side in SIDES for size in sorted(sizes[side]) for spec in rht_specs(size, buckets, (side,))]


def build(specs: Iterable[KernelSpec], target: TargetInfo,
          config_for: Optional[Callable[[KernelSpec], Optional[KernelConfig]]] = None,
          rht: Iterable[RhtSpec] = (), decode: Iterable[DecodeSpec] = ()):
    """Compile every kernel into one TVM executable. ``config_for(spec)``: a tuned config for the
    spec (a GemvConfig, MmaConfig or TensorCoreConfig, the family of its bucket: ``scheduled_func``), or None
    for the default (e.g. ``qcompile.tune.records.TuningRecords.lookup``); build
    never tunes. ``rht``: RHT kernels (``rht_kernel_specs``) to compile into the same module,
    named by ``RhtSpec.name``, with the target's RHT schedule (qcompile.kernels.hadamard);
    ``decode``: decode-only kernels (``DecodeSpec``, the large-M route), named by their ``name``."""
    import tvm

    funcs = {}
    for spec in specs:
        if spec.name not in funcs:
            config = config_for(spec) if config_for is not None else None
            funcs[spec.name] = scheduled_func(spec, target, config)
    for spec in rht:
        if spec.name not in funcs:
            funcs[spec.name] = scheduled_rht_func(spec, target)
    for spec in decode:
        if spec.name not in funcs:
            funcs[spec.name] = scheduled_decode_func(spec, target)
    mod = tvm.IRModule({name: f for name, f in funcs.items()})
    return compile_module(mod, target.tvm_target())


def cuda_source(executable) -> Optional[str]:
    for m in executable.mod.imports:
        if m.kind == "cuda":
            return m.inspect_source()
    return None


def source_key(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def compile_fatbin(code: str, arch: str) -> bytes:
    """nvcc the generated CUDA source into a fatbin for ``arch`` (done at build time, so loading
    an artifact needs no CUDA compiler)."""
    import shutil

    import tvm
    from tvm.support import nvcc

    from ..errors import QCompileError

    if shutil.which("nvcc") is None:
        raise QCompileError(f"building for {arch} needs nvcc (the CUDA toolkit) on PATH to compile the "
                            f"kernels into a fatbin; install it or build with --target llvm")
    sm = arch.replace("sm_", "")
    # SASS for the arch plus its PTX, so a newer GPU can still JIT the kernels
    gencode = ["-gencode", f"arch=compute_{sm},code=[sm_{sm},compute_{sm}]"]
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return bytes(nvcc.compile_cuda(code, target_format="fatbin", arch=gencode, compiler="nvcc"))


def export(executable, target: TargetInfo, out_dir: str, fatbin: bool = True) -> List[str]:
    """Write kernels.so (and kernels.fatbin + kernels.cu for CUDA) into out_dir; return the names."""
    written = ["kernels.so"]
    executable.export_library(os.path.join(out_dir, "kernels.so"))
    if target.kind == "cuda":
        code = cuda_source(executable)
        with open(os.path.join(out_dir, "kernels.cu"), "w") as f:
            f.write(code)
        written.append("kernels.cu")
        if fatbin:
            with open(os.path.join(out_dir, "kernels.fatbin"), "wb") as f:
                f.write(compile_fatbin(code, target.arch))
            written.append("kernels.fatbin")
    return written
