"""mma.sync rule of the fused decode + matmul for small M (1..64: int4 and E8P route M = 2..64 here,
QTIP HYB M = 2..16 through the fragment-native variant in qcompile.kernels.mma_fragment): every lane
decodes its own share of the weight straight into the A fragments of ``mma.sync.m16n8k16`` (fp16 x fp16 -> fp32), the
activations are the B fragments (8 tokens per n8 tile, zero rows past M) and nothing goes through
shared memory but the final split-K sum.

Why: the CUDA-core GEMV spends ~30 % of its issue slots on the multiply-adds and their fp16 -> fp32
sums (E8P at M=1: 3.9 instructions per weight), and at M=16 on 16 multiply-adds per decoded weight;
a tensor core does all of them for one instruction per 16x8x16 products, next to the decode, so the
kernel is left with the decode and the weight stream at every M up to 64 (8 token tiles reuse each
decoded A fragment).

The weight is not permuted: the K order of the products is. Within a K block of 4 * span columns
(span = ``units`` decode units), lane (g, t) = (lane // 4, lane % 4) takes columns
[t * span, (t + 1) * span) of weight rows 2g and 2g + 1 of a 16-row tile, i.e. whole decode units,
which the format's decode (intrinsic) turns into registers, and mma step s (s < span / 4) consumes
columns t * span + 4s .. 4s + 3 of them as its A fragment: so the A fragment of a step is four
registers of the decoded units, in place. The activations of step s are the same columns of X
(``fragment_column``), so the sum over K is the same sum in another order. Rows: mma row g + 8h is
weight row 2g + h of the tile (``_row``), which keeps a lane's rows adjacent.

Input: ``mma_func(fmt, n, k, m, span)`` (blocks W_gather?, W_decode [n, k/unit, unit], X_frag and
W_frag [.., K blocks, steps, 16] (the operands in mma order), acc [m, n] fp32, Y fp16). One small
dlight-style rule; the knobs are ``MmaConfig`` (the tuner's space).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Tuple

from .compute import format_stages
from .schedules import _func_mod, _gather_block, _get_sblock, inline_derived, vectorize_copy

WARP = 32
MMA_M, MMA_N, MMA_K = 16, 8, 16  # mma.sync.aligned.m16n8k16: weight rows x tokens x columns


@dataclass(frozen=True)
class MmaConfig:
    """Knobs of the mma.sync kernel.

    units: consecutive decode units a lane decodes per K block (its span: units x decode unit
    columns of two rows; the K block is 4 spans); tiles: 16-row tiles per warp (their A fragments
    share each B fragment of activations); warps_n: warps along N per thread block; warps_k: warps
    splitting K per thread block (each sums its share of the K blocks; the partials meet in shared
    memory); unroll: K blocks per step of a warp's K loop (their loads in flight together);
    lut_shared: 1 = a format's lookup tables (E8P's abs table) copied to shared memory once per thread
    block, 0 = read from global memory (through L1); for the fragment-native formats (QTIP HYB,
    qcompile.kernels.mma_fragment) also 2 = LUT_COPIES (16) copies of the table, a lane reading its own
    (32 KiB of shared memory a block, bank conflicts at most two-way), and 3 = 32 copies, one a lane
    (64 KiB of dynamic shared memory, over the 48 KiB a launch gets without opting in: no bank
    conflicts; ``SHARED_BYTES_OPT_IN``). Measured slower than 2 on the H100 (qtip-hyb-2 M=1, 70ea965:
    74.2-115 against 63.4-80.6 us over the same shapes and warps; three 66 KiB blocks fit an SM where
    seven 32 KiB ones did; b2d52bb, the default's 2 tiles x 16 K warps: 62.8 / 59.5 against 50.7 /
    47.1 us on 28672x8192 / 8192x28672, where ncu showed the bank conflicts gone, L1 from 90 to 50 %
    busy, and the ALU pipe's instructions up from 13.1 to 20.2 million, the byte address's LEA among
    them; since then h is doubled by an IMAD.SHL instead: 51.3 / 47.1 against 50.4 / 46.7 us at c67c318,
    artifacts/bench/mma-sweep-qtip-hyb-2-lut5-xstaged-h100.json), so at M=1 the tuner keeps the
    default's placement; at M > 1, where it won on one 70B shape, it is a candidate
    (``lane_lut_candidate``). 4 = 16 copies of the
    sign-folded table (1024 entries, 64 KiB of dynamic shared memory; ``FRAGMENT_SIGNED_LUT``): a
    tuner candidate for HYB-3/4 at M=1 (``signed_lut_candidate``). 5 = 32 copies of the sign-folded
    table, one a lane (128 KiB, ``SHARED_BYTES_OPT_IN_LARGE``: one block an SM, so give it 1024
    threads): neither bank conflicts nor the sign's LOP3. H100 at c67c318 (qtip-hyb-2 M=1, 2 tiles x 32 K
    warps): 8192x28672 40.0 us (unroll 2) against the default's 46.7, 28672x8192 54.3 against 50.4
    (artifacts/bench/mma-sweep-qtip-hyb-2-lut5-xstaged-h100.json): a tuner candidate for HYB at M=1
    (tune.space.HYB_SEEDS_M1).
    stages: 1 = each lane loads its packed words from global memory into registers where it decodes
    them; 2 or 3 = a software pipeline: the whole thread block copies the packed words of a K step
    (the warps_k warps take interleaved K blocks, so one step is one contiguous column range) into
    shared memory with 16-byte cp.async, stages - 1 steps ahead of the step it decodes, and the
    lanes read their words from there (row-packed formats, unroll 1; ``stage_bytes``).
    stage_pad (with stages > 1): 1 = pad the rows of the stage buffer so that the rows a warp's lanes
    read at once (2g + h for lanes g = 0..) fall in different shared-memory banks (``stage_row_pad``;
    unpadded, 16-byte lane reads replay twice and 8-byte ones four times); 0 = rows back to back.
    blocks_k: thread blocks splitting K (grid split-K): each sums a contiguous 1 / blocks_k of the K
    blocks into fp32 partials in global memory, and a second kernel of the same function adds them
    and stores fp16; 1 = one kernel, the block's warps sum K alone. For a narrow N whose row blocks
    spread unevenly over the SMs: H100, qtip-hyb-2 M=1 on 5120x13824 (160 blocks of 32 rows for 132
    SMs) 27.7 us with one block a row block, 25.9 with 4 (8 K warps); on 4096x11008 (128 blocks) and
    22016x4096 it lost (15.8 -> 17.8-19.2, 26.9 -> 27.2-34.0 us; artifacts/bench/
    mma-sweep-qtip-hyb-2-blocks-k-h100.json), so the default stays 1 and the tuner decides.
    min_blocks: the mma kernel's __launch_bounds__ minimum of resident blocks per SM (0: none), which
    makes ptxas fit its registers to that many blocks (65536 / (threads x min_blocks) a thread): e.g. 3
    blocks of 512 threads keep 40 registers where a decode with fewer instructions took 51 (HYB with
    formats.trellis.LANE_COPY_BY_MIN: 213 K-loop instructions at 40 registers, no spills). Slower where
    timed (H100, HYB M=1, 2 tiles x 16 K warps: qtip-hyb-2 54.3 -> 59.9 us on 28672x8192, qtip-hyb-4 with
    lut_shared=4 56.6 -> 76.6; artifacts/bench/mma-sweep-qtip-hyb-switches-h100.json), so neither in a
    default nor in the tuner's space.
    x_staged (fragment-native formats, stages=1): 1 = each K step's activations go through shared
    memory: the K warps take interleaved K blocks, as with stages > 1, so that a step is one column
    range, and each warp copies its K block's tile with its lanes' 16-byte loads (each token row padded
    16 bytes, so that a warp's B-fragment reads of 8 token rows x 4 lanes meet 32 banks); the lanes
    read their B fragments there. Each
    lane's 4-byte global load of its B fragment (the reference layout fixes the pairs a lane needs)
    touches 8 token rows: at M=16 those loads put about as many wavefronts through L1 as the table
    lookups (ncu, qtip-hyb-2 28672x8192 at b2d52bb: L1 93 % busy). H100 at c67c318, qtip-hyb-2 M=16 with
    lut_shared=3, 2 tiles x 16 K warps, unroll 2: 79.5 / 73.8 us on 28672x8192 / 8192x28672 against the
    default's 86.8 / 103.7 (with 4 tiles x 4 K warps slower: 117.2 / 190.6): a tuner candidate for HYB at
    M > 1 (tune.space.HYB_SEEDS_MULTI).
    """

    units: int = 1
    tiles: int = 2
    warps_n: int = 1
    warps_k: int = 8
    unroll: int = 1
    lut_shared: int = 1
    stages: int = 1
    stage_pad: int = 0
    blocks_k: int = 1
    min_blocks: int = 0
    x_staged: int = 0

    def as_dict(self):
        return asdict(self)

    @property
    def threads(self) -> int:
        return WARP * self.warps_n * self.warps_k


MAX_THREADS = 1024
MAX_THREADS_PER_SM = 2048  # (sm_80 / sm_90; what MmaConfig.min_blocks may ask for)
# Batches up to this M run on one launch: the M tiles of 8 tokens all reuse each decoded A fragment
# (the M=16 kernel launched per 16 rows decodes the weight again for each block)
MMA_MAX_M = 64


def span_of(cfg: MmaConfig, unit: int) -> int:
    return cfg.units * unit


# A K whose K blocks do not split evenly over warps_k x unroll (11008 columns = 86 blocks of 128 =
# 2 x 43) runs padded K blocks: the blocks past K multiply zero activations with a re-decoded last
# block (any finite weight), at most this fraction of the K loop idle (86 -> 88 blocks for 8 warps:
# 2.3 %). Without it such a K took 2 warps (e8p-2 4096x11008 M=4: 43.8 us against 12.6 us at M=1).
MAX_PADDED_K = 1 / 8


def k_blocks(cfg: MmaConfig, k: int, unit: int) -> int:
    """K blocks of the kernel's K loop: those of K, rounded up to whole steps of blocks_k x warps_k x
    unroll."""
    block = 4 * span_of(cfg, unit)
    step = cfg.blocks_k * cfg.warps_k * cfg.unroll
    return -(-(k // block) // step) * step


# shared memory a thread block may take without opting in (static + dynamic): the split-K partial
# tiles (dynamic) and a format's tables
SHARED_BYTES = 48 * 1024
# the most a thread block may opt in to (dynamic shared memory past 48 KiB; the TVM runtime sets the
# kernel's attribute at launch): 99 KiB, what sm_86 / sm_89 allow (sm_80 163, sm_90 227), so that a
# config that fits runs on every mma.sync GPU; only the fragment kernel's 32 table copies use it
SHARED_BYTES_OPT_IN = 99 * 1024
# ... and what lut_shared=5 may take: 163 KiB, sm_80's most (sm_90 227); sm_86 / sm_89 cannot launch it
# (the tuner records the failure there)
SHARED_BYTES_OPT_IN_LARGE = 163 * 1024
# the fragment kernel's lut_shared -> HYB table copies in shared memory (0: none, 1: the single table)
FRAGMENT_LUT_COPIES = {2: 16, 3: 32, 4: 16, 5: 32}
# lut_shared=4: the 16 copies of HYB's sign-folded table (1024 entries: the sign flip of value 0 in the
# table, not a LOP3 a state; TrellisFormat.tir_tables(signed=True)): 64 KiB of dynamic shared memory.
# nvcc, qtip-hyb-2 M=1 28672x8192 default config with LANE_COPY_BY_MIN: K loop 209 -> 180 instructions at
# 40 registers (timed: SIGNED_LUT_BITS below)
# lut_shared=5: 32 copies of the sign-folded table, one a lane (128 KiB: one block an SM, so 1024 threads
# to keep 32 warps): no bank conflicts (lut_shared=2's two-way conflicts made its HYB-2 M=1 kernel L1-bound,
# ncu at b2d52bb) and no sign LOP3 (what lut_shared=3's 32 copies cost on the ALU pipe); K-loop SASS of
# qtip-hyb-2 M=1 28672x8192, 2 tiles x 32 K warps, nvcc 13.0: 217 instructions, 94 of them ALU-pipe
# (LOP3, SHF, PRMT and the like) and 66 IMAD, 32 LDS of one wavefront each, 41 registers (the
# default's lut_shared=2 at 16 K warps: 209, 112, 41, LDS of two wavefronts; 3: 246, 114, 75).
# Timed at c67c318: see MmaConfig's lut_shared (a tuner candidate for HYB at M=1)
FRAGMENT_SIGNED_LUT = (4, 5)
# the lut_shared whose copies are over the 48 KiB a launch gets: in dynamic shared memory, opted in
FRAGMENT_DYNAMIC_LUT = (3, 4, 5)
# lut_shared=2's 16 copies in dynamic shared memory, as lut_shared=3's 32 are: TVM then lays the K warps'
# partial sums over the copies, which are dead after the K loop (a __syncthreads between), so a block
# takes max(32 KiB, partials) instead of their sum: qtip-hyb-2's M=16 default (4 tiles, 4 K warps)
# 48 -> 32 KiB, six blocks an SM instead of four by shared memory (its 80 registers allow six). Off
# until it has run on a GPU (the CUDA is checked in a CPU test).
FRAGMENT_PARTIALS_IN_TABLE = False


def partials_over_copies(cfg: MmaConfig) -> bool:
    """Whether the fragment kernel's K-warp partials share dynamic shared memory with its table copies
    (FRAGMENT_DYNAMIC_LUT, whose copies are there anyway, and with FRAGMENT_PARTIALS_IN_TABLE also 2): the
    copies' scope and the shared-memory check both follow it."""
    return (cfg.lut_shared in FRAGMENT_DYNAMIC_LUT
            or (FRAGMENT_PARTIALS_IN_TABLE and cfg.lut_shared in FRAGMENT_LUT_COPIES))


def fragment_table_bytes(cfg: MmaConfig) -> Tuple[int, int]:
    """Shared memory of the fragment kernel's HYB tables under ``cfg.lut_shared``: (the copies, or the
    single table with 1; for FRAGMENT_DYNAMIC_LUT the single table they are filled from, beside them)."""
    from ..formats.trellis import Q_BITS

    entries = (2 if cfg.lut_shared in FRAGMENT_SIGNED_LUT else 1) << Q_BITS
    copies = 4 * entries * FRAGMENT_LUT_COPIES.get(cfg.lut_shared, cfg.lut_shared)
    return copies, 4 * entries if cfg.lut_shared in FRAGMENT_DYNAMIC_LUT else 0


# what a row-packed format's tables take in shared memory with lut_shared=1, at most (E8P's abs table
# 1 KiB, e8p-3's E81B table beside it): reserved beside the partial tiles
ROW_TABLE_RESERVE = 4 * 1024


def partial_bytes(cfg: MmaConfig, m: int) -> int:
    """Shared memory of the split-K partial tiles: warps_k x tokens (padded to n8) x rows fp32."""
    return cfg.warps_k * (-(-m // MMA_N) * MMA_N) * (MMA_M * cfg.tiles * cfg.warps_n) * 4


MAX_STAGES = 3
# bits per weight of the packed words a pipeline stage holds where the format is not known, the most
# of the row-packed formats (int4's words; e8p-4's two word pairs; scales are not staged)
STAGED_BITS = 4
CP_ASYNC_BYTES = 16


def streamed_bits(fmt, n: int, k: int) -> int:
    """Bits per weight of ``fmt``'s packed words that the kernels stream (``Format.streamed``), for a
    weight of shape [n, k]: what a pipeline stage holds of each weight (int4 4, e8p-2 2, e8p-3 3)."""
    specs = fmt.tensor_specs(n, k)
    bits = sum(math.prod(specs[name].shape) * specs[name].torch_dtype.itemsize * 8 for name in fmt.streamed)
    return -(-bits // (n * k))


def stage_row_bytes(cfg: MmaConfig, unit: int, staged_bits: int = STAGED_BITS) -> int:
    """Bytes of one weight row's packed words in a pipeline stage (warps_k K blocks of 4 x span columns)."""
    return cfg.warps_k * 4 * span_of(cfg, unit) * staged_bits // 8


def stage_lane_bytes(cfg: MmaConfig, unit: int, staged_bits: int = STAGED_BITS) -> int:
    """Bytes a lane reads of one row at once from a stage (its span's words, at most one 16-byte load)."""
    return min(CP_ASYNC_BYTES, span_of(cfg, unit) * staged_bits // 8)


def stage_row_pad(cfg: MmaConfig, unit: int, staged_bits: int = STAGED_BITS) -> int:
    """Padding bytes after each stage row with ``stage_pad``: the lanes of one shared-memory wavefront
    (8 lanes of 16-byte reads, 16 of 8-byte) read rows 0, 2, 4, 6 at the same column; a row stride of
    2 x lane bytes modulo 64 puts those rows 4 x lane bytes apart in the 128-byte bank space, so they
    take distinct banks (and the rows stay 16-byte aligned for cp.async)."""
    if not cfg.stage_pad:
        return 0
    return (2 * stage_lane_bytes(cfg, unit, staged_bits) - stage_row_bytes(cfg, unit, staged_bits)) % 64


# the row pad of a staged activation tile (MmaConfig.x_staged): 16 bytes, so that token rows of 128·j + 16
# bytes put a B-fragment read's 8 rows x 4 lanes (4-byte pairs) in 32 different banks
X_ROW_PAD = 16


def x_stage_bytes(cfg: MmaConfig, unit: int, m: int) -> int:
    """Shared memory of a K step's activations (MmaConfig.x_staged): M padded to n8 tiles of token rows
    of warps_k K blocks (4 x span fp16 columns each), each row padded X_ROW_PAD bytes."""
    return (-(-m // MMA_N) * MMA_N) * (cfg.warps_k * 4 * span_of(cfg, unit) * 2 + X_ROW_PAD)


def stage_bytes(cfg: MmaConfig, unit: int, staged_bits: int = STAGED_BITS) -> int:
    """Shared memory of one pipeline stage (``MmaConfig.stages`` > 1): the packed words of one K step
    of the block's rows (16 x tiles x warps_n rows, warps_k K blocks of 4 x span columns) at
    ``staged_bits`` per weight (``streamed_bits``), plus the row padding of ``stage_pad``."""
    rows = MMA_M * cfg.tiles * cfg.warps_n
    return rows * (stage_row_bytes(cfg, unit, staged_bits) + stage_row_pad(cfg, unit, staged_bits))


def check_mma_config(cfg: MmaConfig, n: int, k: int, m: int, unit: int, fragment: bool = False,
                     staged_bits: int = STAGED_BITS) -> None:
    """Raise ValueError (one line) when ``cfg`` cannot schedule an [n, k] weight at batch m.
    ``fragment``: for a fragment-native format (``Format.fragment_native``: qcompile.kernels.mma_fragment),
    whose lut_shared may also be 2 (per-lane table copies, which must fit in shared memory)."""
    problems = []
    for name in ("units", "tiles", "warps_n", "warps_k", "unroll", "stages", "blocks_k"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) <= 0:
            problems.append(f"{name} must be a positive int")
    if isinstance(cfg.stages, int) and cfg.stages > MAX_STAGES:
        problems.append(f"stages must be 1..{MAX_STAGES}")
    if cfg.stage_pad not in (0, 1):
        problems.append("stage_pad must be 0 or 1")
    elif cfg.stage_pad and cfg.stages == 1:
        problems.append("stage_pad=1 pads pipeline stages: it needs stages > 1")
    if not isinstance(cfg.min_blocks, int) or cfg.min_blocks < 0:
        problems.append("min_blocks must be a non-negative int")
    elif isinstance(cfg.threads, int) and cfg.min_blocks * cfg.threads > MAX_THREADS_PER_SM:
        problems.append(f"min_blocks={cfg.min_blocks} blocks of {cfg.threads} threads exceed the "
                        f"{MAX_THREADS_PER_SM} threads an SM holds")
    if cfg.x_staged not in (0, 1):
        problems.append("x_staged must be 0 or 1")
    elif cfg.x_staged and not fragment:
        problems.append("x_staged=1 is for fragment-native formats (QTIP HYB in its kernel layout): a row-packed "
                        "format's lanes load their activations as 16-byte vectors already")
    elif cfg.x_staged and cfg.stages != 1:
        problems.append("x_staged=1 takes stages=1 (the activation tile is not part of the cp.async pipeline)")
    if cfg.lut_shared not in ((0, 1, 2, 3, 4, 5) if fragment else (0, 1)):
        problems.append("lut_shared must be 0..5" if fragment else "lut_shared must be 0 or 1")
    if problems:
        raise ValueError(f"bad MmaConfig {cfg.as_dict()}: {'; '.join(problems)}")
    span = span_of(cfg, unit)
    block = 4 * span
    if span % 4:
        problems.append(f"a lane's span of {span} columns is not a multiple of 4 (one mma step)")
    if k % block:
        problems.append(f"K={k} is not a multiple of the K block {block} (4 lanes x {cfg.units} units of {unit})")
    elif (k // block) % (cfg.blocks_k * cfg.warps_k * cfg.unroll):
        padded = k_blocks(cfg, k, unit)
        if padded - k // block > MAX_PADDED_K * padded:
            over = f"{cfg.blocks_k} blocks x " if cfg.blocks_k > 1 else ""
            problems.append(f"the {k // block} K blocks do not split over {over}{cfg.warps_k} warps x unroll "
                            f"{cfg.unroll} (padded to {padded}, over {MAX_PADDED_K:.0%} idle)")
    rows = MMA_M * cfg.tiles * cfg.warps_n
    if n % rows:
        problems.append(f"N={n} is not a multiple of {rows} rows per block (16 x tiles x warps_n)")
    if cfg.threads > MAX_THREADS:
        problems.append(f"{cfg.threads} threads per block (over {MAX_THREADS})")
    if fragment and isinstance(cfg.tiles, int) and cfg.tiles % 2:
        problems.append(f"tiles={cfg.tiles} must be even (a warp decodes both 16-row halves of a 32x32 super-tile)")
    if not 1 <= m <= MMA_MAX_M:
        problems.append(f"M={m} must be 1..{MMA_MAX_M}")
    else:
        table = ROW_TABLE_RESERVE if cfg.lut_shared == 1 else 0
        limit = SHARED_BYTES
        partials = partial_bytes(cfg, m)
        if fragment:
            copies, single = fragment_table_bytes(cfg)
            table = copies + single
            if partials_over_copies(cfg):
                partials = max(0, partials - copies)  # (what the partials need past the copies)
            if cfg.lut_shared in FRAGMENT_DYNAMIC_LUT:
                limit = SHARED_BYTES_OPT_IN_LARGE if cfg.lut_shared == 5 else SHARED_BYTES_OPT_IN
        staged = stage_bytes(cfg, unit, staged_bits) * cfg.stages if cfg.stages > 1 else 0
        if cfg.x_staged:  # (beside the tables and partials: the step's activation tile)
            table += x_stage_bytes(cfg, unit, m)
        if cfg.stages > 1:
            copies = rows * stage_row_bytes(cfg, unit, staged_bits) // CP_ASYNC_BYTES
            if cfg.stage_pad and stage_lane_bytes(cfg, unit, staged_bits) < 8:
                problems.append(f"stage_pad=1 needs lane reads of 8 or 16 bytes, not "
                                f"{stage_lane_bytes(cfg, unit, staged_bits)}")
            if copies % cfg.threads:
                problems.append(f"stages={cfg.stages}: a K step's {copies} 16-byte copies do not split over the "
                                f"block's {cfg.threads} threads")
            if fragment and cfg.stage_pad:
                problems.append("stage_pad=1 is for row-packed formats (a fragment-native lane reads 2K consecutive "
                                "bytes of its own and of the next lane: no bank conflict to pad away)")
            if cfg.unroll != 1:
                problems.append(f"stages={cfg.stages} needs unroll=1 (the pipeline keeps the next K steps in flight)")
            if k % block == 0 and (k // block) % (cfg.blocks_k * cfg.warps_k):
                problems.append(f"stages={cfg.stages} needs the K blocks to split evenly over "
                                f"{cfg.blocks_k * cfg.warps_k} K warps (a padded step would copy words past K)")
        if staged and partials + table + staged > limit:
            problems.append(f"{cfg.stages} pipeline stages of {stage_bytes(cfg, unit, staged_bits) // 1024} KiB beside the partial sums "
                            f"({partial_bytes(cfg, m) // 1024} KiB) and tables exceed {limit // 1024} KiB of shared memory")
        elif partials + table > limit:
            problems.append(f"the {cfg.warps_k} K warps' partial sums need {partial_bytes(cfg, m) // 1024} KiB of "
                            f"shared memory" + (f" beside {table // 1024} KiB of tables"
                                                + (" and activations" if cfg.x_staged else "") if table else "")
                            + f" (over {limit // 1024})")
    if problems:
        raise ValueError(f"MmaConfig {cfg.as_dict()} cannot schedule N={n} K={k} M={m}: " + "; ".join(problems))


def fragment_column(kb, s, hi, t, lo, span):
    """The weight / activation column that mma step ``s`` of K block ``kb`` multiplies in its fragment
    column c = 8 * hi + 2 * t + lo: lane t of a quad owns columns [t * span, (t + 1) * span) of the
    block, and fragment columns 2t, 2t + 1, 2t + 8, 2t + 9 of step s hold their elements
    4s .. 4s + 3."""
    return kb * (4 * span) + t * span + 4 * s + 2 * hi + lo


# fragment layouts (PTX mma.m16n8k16: f16 A row-major, f16 B column-major, f32 C) in this kernel's row
# order, tile row r = 2g + h being mma row g + 8h, and fragment column c = 8 * hi + 2 * t + lo
def a_layout(r, hi, t, lo):
    """(lane, register element) of A fragment entry (tile row r, column (hi, t, lo))."""
    return 4 * (r // 2) + t, 4 * hi + 2 * (r % 2) + lo


def a_layout_natural(r, hi, t, lo):
    """``a_layout`` with tile row r = g + 8h (PTX's own row order: the A fragment of a stored tile)."""
    return 4 * (r % 8) + t, 4 * hi + 2 * (r // 8) + lo


def a_layout_packed(r, hi, t):
    """(lane, register) of the 32-bit A register holding fragment entries (tile row r = g + 8h, columns
    (hi, t, lo = 0, 1)): ``a_layout_natural``'s element // 2, the pair's low half at lo = 0."""
    return 4 * (r % 8) + t, 2 * hi + r // 8


def c_layout_natural(r, a):
    """``c_layout`` with tile row r = g + 8h."""
    return 4 * (r % 8) + a // 2, 2 * (r // 8) + a % 2


def b_layout(a, hi, t, lo):
    """(lane, element) of B fragment entry (token a, column (hi, t, lo))."""
    return 4 * a + t, 2 * hi + lo


def c_layout(r, a):
    """(lane, element) of C fragment entry (tile row r, token a)."""
    return 4 * (r // 2) + a // 2, 2 * (r % 2) + a % 2


def x_fragments(m: int, k: int, span: int, blocks: int, column):
    """(X, X_frag, clamp, frag) of a kernel whose K blocks are 4 x ``span`` columns: X the fp16[m, k]
    input; frag = (loop K blocks: ``blocks``, or 0 for K's, steps span / 4, hi 2, t 4, lo 2);
    X_frag[a, kb, s, hi, t, lo] = X[a, column(clamp(kb), s, hi, t, lo)], zero in the padded blocks past
    K (``k_blocks``); ``clamp`` maps a padded block to K's last one, so its weight reads stay in bounds
    (the products are zero anyway). ValueError (one line) when K is not whole K blocks or the loop's
    blocks cannot cover K's."""
    import tvm
    from tvm import te

    block = 4 * span
    if k % block:
        raise ValueError(f"in_features {k} must be a multiple of the K block {block}")
    X = te.placeholder((m, k), "float16", name="X")
    nkb = k // block
    frag = (blocks or nkb, span // 4, 2, 4, 2)  # K block, mma step, fragment column c = 8 * hi + 2 * t + lo
    loop_blocks = frag[0]
    if loop_blocks < nkb:
        raise ValueError(f"{loop_blocks} K blocks cannot cover the {nkb} of in_features {k}")

    def clamp(kb):
        return kb if loop_blocks == nkb else tvm.te.min(kb, nkb - 1)

    def x_value(a, kb, s, hi, t, lo):
        x = X[a, column(clamp(kb), s, hi, t, lo)]
        if loop_blocks == nkb:
            return x
        return tvm.tirx.if_then_else(kb < nkb, x, tvm.tirx.const(0, "float16"))

    return X, te.compute((m, *frag), x_value, name="X_frag"), clamp, frag


def fragment_products(XF, frag, m: int, n: int, w_at):
    """Y fp16[m, n] = acc in fp32: acc[a, i] = sum over the fragment axes of X_frag[a, axes] *
    ``w_at(i, axes)`` (the weight fragment's element of row i)."""
    from tvm import te

    axes = [te.reduce_axis((0, e), name=nm) for e, nm in zip(frag, ("kb", "s", "hi", "t", "lo"))]
    acc = te.compute((m, n), lambda a, i: te.sum(XF[(a, *axes)].astype("float32") * w_at(i, axes).astype("float32"),
                                                 axis=axes), name="acc")
    return te.compute((m, n), lambda a, i: acc[a, i].astype("float16"), name="Y")


def mma_func(fmt, n: int, k: int, m: int, span: int, blocks: int = 0):
    """PrimFunc main(X fp16[m, k], *packed tensors, Y fp16[m, n]) with the products in mma order
    (see the module doc): acc[a, i] = sum over K blocks kb, steps s, columns c of
    X_frag[a, kb, s, c] * W_frag[i, kb, s, c] in fp32. ``blocks``: K blocks of the loop (0: those of
    K); past K's, X_frag is zero and W_frag repeats K's last block (``k_blocks``)."""
    from tvm import te

    fmt.check_shape(n, k)
    unit = fmt.decode_unit
    if span % unit or span % 4:
        raise ValueError(f"span {span} must be a multiple of the decode unit {unit} and of 4")
    X, XF, clamp, frag = x_fragments(m, k, span, blocks, lambda kb, *c: fragment_column(kb, *c, span))
    params, bufs = format_stages(fmt, n, k)
    W = te.compute((n, k // unit, unit), lambda i, c, j: fmt.tir_decode_unit(bufs, i, c, j), name="W_decode")

    def col(kb, *c):
        return fragment_column(clamp(kb), *c, span)

    WF = te.compute((n, *frag), lambda i, *kc: W[i, col(*kc) // unit, col(*kc) % unit], name="W_frag")
    Y = fragment_products(XF, frag, m, n, lambda i, axes: WF[(i, *axes)])
    return te.create_prim_func([X, *params, Y]).with_attr("global_symbol", "main")


# The fragment buffers are [K block or warp, lane, ..., element]: per warp, once compacted, the lane
# is outermost and LowerWarpMemory splits an index into lane and register by one division, which
# folds to constants (with the lane inside, its divisions by 256 did not fold and the fragments went
# to local memory). One mma's fragments are then a strided region [lane, 1, 1, element]: the
# descriptions take that shape, with the lane stride as a variable.
_MMA_SCRIPT = '''
@T.prim_func(s_tir=True)
def {fname}(a: T.handle, b: T.handle, c: T.handle):
    sa0, sa1, sa2 = T.int32(), T.int32(), T.int32()
    sb0, sb1, sb2 = T.int32(), T.int32(), T.int32()
    sc0, sc1, sc2 = T.int32(), T.int32(), T.int32()
    A = T.match_buffer(a, (32, 1, 1, 8), "float16", scope="warp", offset_factor=1, strides=[sa0, sa1, sa2, 1])
    B = T.match_buffer(b, (32, 1, 1, 4), "float16", scope="warp", offset_factor=1, strides=[sb0, sb1, sb2, 1])
    C = T.match_buffer(c, (32, 1, 1, 4), "float32", scope="warp", offset_factor=1, strides=[sc0, sc1, sc2, 1])
    with T.sblock("root"):
        T.reads(C[0:32, 0, 0, 0:4], B[0:32, 0, 0, 0:4], A[0:32, 0, 0, 0:8])
        T.writes(C[0:32, 0, 0, 0:4])
{body}
'''
_MMA_DESC = '''        for i, j, hi, t, lo in T.grid(16, 8, 2, 4, 2):
            with T.sblock("C"):
                vj, vi, vhi, vt, vlo = T.axis.remap("SSRRR", [j, i, hi, t, lo])  # the kernel's block order
                lc, ec = T.meta_var(c_layout(vi, vj))
                lb, eb = T.meta_var(b_layout(vj, vhi, vt, vlo))
                la, ea = T.meta_var(a_layout(vi, vhi, vt, vlo))
                C[lc, 0, 0, ec] = C[lc, 0, 0, ec] + T.Cast("float32", B[lb, 0, 0, eb]) * T.Cast("float32", A[la, 0, 0, ea])'''
_MMA_IMPL = '''        for tx in T.thread_binding(0, 32, "threadIdx.x"):
            T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                        A.data, A.elem_offset + tx * sa0, B.data, B.elem_offset + tx * sb0,
                                        C.data, C.elem_offset + tx * sc0, False, dtype="float32"))'''

# the packed variant (RowMap.packed_a): A is the lane's four 32-bit registers themselves (uint32
# [lane, 4]), each product taking its fp16 half (``formats.base.tir_word_half``)
_MMA_SCRIPT_PACKED = _MMA_SCRIPT.replace('A = T.match_buffer(a, (32, 1, 1, 8), "float16"',
                                         'A = T.match_buffer(a, (32, 1, 1, 4), "uint32"').replace(
                                             "A[0:32, 0, 0, 0:8]", "A[0:32, 0, 0, 0:4]")
_MMA_DESC_PACKED = '''        for i, j, hi, t, lo in T.grid(16, 8, 2, 4, 2):
            with T.sblock("C"):
                vj, vi, vhi, vt, vlo = T.axis.remap("SSRRR", [j, i, hi, t, lo])
                lc, ec = T.meta_var(c_layout(vi, vj))
                lb, eb = T.meta_var(b_layout(vj, vhi, vt, vlo))
                la, ea = T.meta_var(a_layout(vi, vhi, vt))
                C[lc, 0, 0, ec] = C[lc, 0, 0, ec] + T.Cast("float32", B[lb, 0, 0, eb]) * T.Cast("float32", T.reinterpret(
                    "float16", T.Cast("uint16", T.bitwise_and(T.shift_right(A[la, 0, 0, ea], T.Cast("uint32", 16 * vlo)),
                                                              T.uint32(65535)))))'''

MMA_INTRIN = "qcompile.mma_m16n8k16_f16f32"


def register_mma(rows=None):
    """The TensorIntrin of one mma.sync.m16n8k16 in this kernel's fragment layouts (``a_layout`` ...;
    ``rows``: a RowMap, default PAIRED_ROWS; NATURAL_ROWS: ``a_layout_natural`` ...): C[r, a] +=
    X[a, c] * W[r, c] over a 16-row tile, 8 tokens and 16 columns."""
    import tvm
    from tvm.script import tirx as T

    from .intrinsics import _REGISTERED

    rows = rows or PAIRED_ROWS
    name = MMA_INTRIN + ("" if rows.paired else "_natural_rows") + ("_packed_a" if rows.packed_a else "")
    if name in _REGISTERED:
        return name
    a_lay, b_lay, c_lay = rows.layouts()
    env = {"T": T, "a_layout": a_lay, "b_layout": b_lay, "c_layout": c_lay}
    script, body = (_MMA_SCRIPT_PACKED, _MMA_DESC_PACKED) if rows.packed_a else (_MMA_SCRIPT, _MMA_DESC)
    desc = tvm.script.from_source(script.format(fname="desc", body=body), extra_vars=env)
    impl = tvm.script.from_source(script.format(fname="impl", body=_MMA_IMPL), extra_vars=env)
    tvm.s_tir.TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED[name] = ""
    return name


def schedule_mma_cuda(func, cfg: MmaConfig, unit: int, intrin=None, streamed=(), staged_bits: int = STAGED_BITS):
    """Schedule ``mma_func(fmt, n, k, m, span_of(cfg, unit))`` (with the format's derived stages
    inlined, ``inline_derived``) for mma.sync; returns an IRModule. ``intrin``: the format's
    (TensorIntrin name, CUDA source) decode of one unit, or None for the plain TIR decode;
    ``streamed``: the packed-word tensors to load into registers (``fmt.streamed``)."""
    return schedule_mma_rows(func, cfg, unit, PAIRED_ROWS, _UnitDecode(cfg, intrin, streamed, staged_bits))


@dataclass(frozen=True)
class RowMap:
    """How a kernel's 16-row tile maps onto the mma rows and how its X fragments are laid out.
    ``paired``: tile row r = 2g + h is mma row g + 8h (this module's kernel: lane (g, t) owns weight
    rows 2g, 2g + 1); else r = g + 8h, the PTX order itself (qcompile.kernels.mma_fragment: the
    stored A-fragment order). ``x_contiguous``: a lane's columns of a K block are contiguous
    (``fragment_column``: 16-byte activation loads), else only column pairs (4-byte loads).
    ``packed_a`` (natural rows): the A fragments are the lane's four 32-bit registers (W_frag uint32,
    ``a_layout_packed``), whose halves the products take (``formats.base.tir_word_half``)."""

    paired: bool
    x_contiguous: bool
    packed_a: bool = False

    def layouts(self):
        if self.paired:
            return a_layout, b_layout, c_layout
        return (a_layout_packed if self.packed_a else a_layout_natural), b_layout, c_layout_natural

    def intrin(self) -> str:
        return register_mma(self)

    def split_rows(self, sch, loop, tiles=None):
        """(tile, g, h) loops of a tile-row loop (tile row r = 2g + h or g + 8h)."""
        if self.paired:
            return sch.split(loop, [tiles, MMA_M // 2, 2])
        tile, h, g = sch.split(loop, [tiles, 2, MMA_M // 2])
        return tile, g, h


PAIRED_ROWS = RowMap(paired=True, x_contiguous=True)
NATURAL_ROWS = RowMap(paired=False, x_contiguous=False)
# natural rows with the A fragments as 32-bit registers (W_frag uint32 [.., lane, 4]): a decode whose
# words are already registers stores them whole, where fp16 halves came back through SHF + PRMT
NATURAL_ROWS_PACKED_A = RowMap(paired=False, x_contiguous=False, packed_a=True)


def schedule_mma_rows(func, cfg: MmaConfig, unit: int, rows: RowMap, weights):
    """The mma.sync schedule of an ``mma_func``-shaped PrimFunc (blocks X_frag, W_frag, acc, Y) whose
    tile rows map to mma rows as ``rows`` says; ``weights`` places the weight side: its
    ``lane_loops(sch, wf)`` lays out the W_frag block's loops (returns the lane loop) and its
    ``decode(sch, w_lane, bn)`` the stages W_frag reads (returns the CUDA sources to inject)."""
    import tvm

    sch = tvm.s_tir.Schedule(_func_mod(func))
    acc = sch.get_sblock("acc")
    m, n = (int(sch.get(loop).extent) for loop in sch.get_loops(acc)[:2])
    k = int(sch.get(sch.get_sblock("X_frag")).reads[0].source.shape[1])
    check_mma_config(cfg, n, k, m, unit, fragment=not rows.paired,
                     staged_bits=weights.staged_bits)
    a_lay, b_lay, c_lay = rows.layouts()

    # 1. M padded to whole n8 tiles of tokens: X_frag_pad holds zeros past M, acc_pad the padded result
    m_pad = -(-m // MMA_N) * MMA_N
    padded = m_pad != m
    if padded:
        sch.pad_einsum(acc, [MMA_N, 1, 1, 1, 1, 1, 1])
    m_loop, n_loop, kb_loop, s_loop, hi, t, lo = sch.get_loops(acc)

    # 2. blocks over N (warps_n warps of `tiles` 16-row tiles), warps_k warps splitting the K blocks
    #    of a block (split-K partials rf[wk]); per K block: mma steps x tiles x token tiles x one mma
    mo, mi = sch.split(m_loop, [None, MMA_N])
    bn, wn, tl, ti = sch.split(n_loop, [None, cfg.warps_n, cfg.tiles, MMA_M])
    if int(sch.get(kb_loop).extent) % (cfg.blocks_k * cfg.warps_k * cfg.unroll):
        raise ValueError(f"the PrimFunc's {int(sch.get(kb_loop).extent)} K blocks do not split over {cfg.blocks_k} "
                         f"blocks x {cfg.warps_k} warps x unroll {cfg.unroll}; make it with mma_func(..., "
                         f"k_blocks(cfg, k, unit))")
    # (with blocks_k > 1 the K blocks are first cut into blocks_k contiguous ranges, one a thread block)
    bk, kb_loop = sch.split(kb_loop, [cfg.blocks_k, None]) if cfg.blocks_k > 1 else (None, kb_loop)
    if cfg.stages > 1 or cfg.x_staged:  # K block ko * warps_k + wk: a step is one contiguous column range
        ko, wk = sch.split(kb_loop, [None, cfg.warps_k])
    else:
        wk, ko = sch.split(kb_loop, [cfg.warps_k, None])
    sch.reorder(bn, *([bk] if bk is not None else []), wn, wk, ko, s_loop, tl, mo, ti, mi, hi, t, lo)
    if bk is not None:  # acc = the sum of the blocks' partials acc_rf[bk] (fp32, global memory), each
        rf_k = sch.rfactor(bk, factor_axis=0)  # the sum of its K warps' acc_rf_rf[wk] (shared memory)
        rf = sch.rfactor(sch.get_loops(rf_k)[3], factor_axis=0)
        bn, bk, wn, wk, ko, s_loop, tl, mo, ti, mi, hi, t, lo = sch.get_loops(rf)
        sch.bind(bk, "blockIdx.y")
    else:
        rf = sch.rfactor(wk, factor_axis=0)
        bn, wn, wk, ko, s_loop, tl, mo, ti, mi, hi, t, lo = sch.get_loops(rf)
    block_loop = bk if bk is not None else bn  # the innermost loop bound to a block index
    mma_name = sch.get(rf).name_hint
    sch.bind(bn, "blockIdx.x")
    sch.bind(wn, "threadIdx.y")
    sch.bind(wk, "threadIdx.z")
    mma_block = sch.blockize(ti)

    # 3. the operands of one K block, per warp, in fragment registers ("warp" buffers [.., lane, element])
    if padded:
        sch.compute_inline(sch.get_sblock("X_frag"))
    xf = sch.get_sblock("X_frag_pad" if padded else "X_frag")
    # the activations: global -> registers with vector loads (xf, zeros past M), then one register
    # copy into the B fragments (xw): LowerWarpMemory takes only scalar stores into warp buffers
    xw = sch.cache_read(mma_block, _read_index(sch, mma_block, "X_frag"), "warp")
    wf = sch.get_sblock("W_frag")
    # (x_staged: the activations first, so that the block's barriers around their shared tile do not
    # hold the decoded A fragments live)
    for frag in ((xw, wf) if cfg.x_staged else (wf, xw)):
        sch.compute_at(frag, ko)
        sch.set_scope(frag, 0, "warp")
    store = sch.cache_write(mma_block, 0, "warp")
    sch.reverse_compute_at(store, wk)
    sch.set_scope(store, 0, "shared.dyn")  # each K warp's partial tile, summed below
    init = sch.decompose_reduction(mma_block, ko)
    def fragments(outer, lane_elem, *tiles):  # (K block or warp, lane, tile indices, element)
        return (outer, lane_elem[0], *tiles, lane_elem[1])

    if rows.packed_a:  # W_frag [n, kb, s, hi, t]: one 32-bit register per (hi, t), both lo halves
        sch.transform_layout(wf, ("write", 0), lambda i, kb, s, hi, t: fragments(
            kb, a_lay(i % MMA_M, hi, t), i // MMA_M, s))
    else:
        sch.transform_layout(wf, ("write", 0), lambda i, kb, s, hi, t, lo: fragments(
            kb, a_lay(i % MMA_M, hi, t, lo), i // MMA_M, s))
    sch.transform_layout(xw, ("write", 0), lambda a, kb, s, hi, t, lo: fragments(
        kb, b_lay(a % MMA_N, hi, t, lo), a // MMA_N, s))
    if bk is None:
        sch.transform_layout(store, ("read", 0), lambda w, a, i: fragments(
            w, c_lay(i % MMA_M, a % MMA_N), a // MMA_N, i // MMA_M))
    else:  # (the thread block's K range b leads: one of it a block once compacted)
        sch.transform_layout(store, ("read", 0), lambda w, b, a, i: (b, *fragments(
            w, c_lay(i % MMA_M, a % MMA_N), a // MMA_N, i // MMA_M)))

    # W fragments: (tile rows, steps, hi, t, lo) -> lane (g, t) (the weights' own layout)
    w_lane = weights.lane_loops(sch, wf)
    # X fragments: (tokens a, steps, hi, t, lo) -> lane (a, t); a lane's elements are its span of one
    # token's activations, contiguous: 16-byte loads (or, in natural column order, pairs: 4-byte loads)
    a, s, hi, t, lo = sch.get_loops(xw)[-5:]
    m_tile, a = sch.split(a, [None, MMA_N])
    sch.reorder(m_tile, a, t, s, hi, lo)
    x_lane = sch.fuse(a, t)
    sch.bind(x_lane, "threadIdx.x")
    for loop in (s, hi, lo):
        sch.unroll(loop)
    if cfg.x_staged:
        # the step's activation tile in shared memory: each warp copies its own K block's tile (the K
        # warps are bound outside) with its 32 lanes in 16-byte loads (natural column order: a token's
        # columns of a K block are contiguous; X_frag's zeros past M and past K included), rows padded
        sch.compute_at(xf, ko)
        sch.set_scope(xf, 0, "shared")
        elem = 2  # fp16
        sch.storage_align(xf, 0, axis=0, factor=128 // elem, offset=X_ROW_PAD // elem)
        outer, lane, vec = sch.split(sch.fuse(*_loops_below(sch, xf, ko)), [None, WARP, 16 // elem])
        sch.bind(lane, "threadIdx.x")
        sch.unroll(outer)
        sch.vectorize(vec)
    else:
        sch.compute_at(xf, x_lane)
        sch.set_scope(xf, 0, "local")
        own = _loops_below(sch, xf, x_lane)  # (steps, hi, lo): the lane's columns
        if rows.x_contiguous:
            if len(own) > 1:
                sch.fuse(*own)
        else:
            for loop in own[:-1]:
                sch.unroll(loop)
        vectorize_copy(sch, xf, 16, len(sch.get_loops(xf)) - min(1, len(own)))
    # C fragments: init and the store to the partial tile, lane (g, t) = rows (g, h), tokens 2t + l
    for blk, row_first in ((store, False), (sch.get_child_blocks(init)[0], True)):
        loops = sch.get_loops(blk)[-2:]
        r, a = loops if row_first else loops[::-1]
        tile, g, h = rows.split_rows(sch, r)
        m_tile, t, l = sch.split(a, [None, 4, 2])
        sch.reorder(m_tile, tile, g, t, h, l)
        sch.bind(sch.fuse(g, t), "threadIdx.x")
        sch.unroll(h)
        sch.unroll(l)

    # 4. the decode of the lane's weights, in registers
    sources = weights.decode(sch, w_lane, block_loop)

    # 5. epilogue: every thread sums the warps_k partials of some outputs and stores fp16 (blocks_k > 1:
    #    stores the block's fp32 partial, and a second kernel sums the blocks' and stores fp16)
    wb = sch.get_sblock("acc_rf" if bk is not None else "acc")
    sch.reverse_compute_at(wb, block_loop)
    loops = _loops_below(sch, wb, block_loop)  # (K warp,) token, row: a K-warp loop of extent 1 is gone
    r_k = loops[0] if len(loops) == 3 else None
    r_a, r_i = loops[-2:]
    if r_k is not None:
        sch.reorder(r_a, r_i, r_k)
    t_x = spread_over_block(sch, sch.fuse(r_a, r_i), cfg)
    if r_k is not None:
        sch.unroll(r_k)
    if padded:
        sch.reverse_compute_inline(sch.get_sblock("Y"))
    out = sch.get_sblock("acc_pad" if padded else "Y")
    if bk is None:
        sch.set_scope(wb, 0, "local")
        sch.reverse_compute_at(out, t_x)
    else:  # the K warps' sum in a register, then one store of the block's partial
        sch.reverse_compute_at(sch.cache_write(wb, 0, "local"), t_x)
        sum_blocks_k(sch, out, sch.get_sblock("acc"))

    # 6. the K step's packed words staged in shared memory (a pipeline stage) with stages > 1; one
    #    mma.sync per (step, tile, token tile); the K loop unrolled by cfg.unroll
    if cfg.stages > 1:
        sources += stage_words_async(sch, ko, cfg, weights.staged_reads(sch), unit,
                                     weights.staged_bits)
    sch.tensorize(sch.get_loops(sch.get_sblock(mma_name))[-5], rows.intrin())
    for loop in (s_loop, tl, mo):
        sch.unroll(loop)
    if cfg.unroll > 1:
        _, ko_inner = sch.split(ko, [None, cfg.unroll])
        sch.unroll(ko_inner)
    if cfg.stages > 1:
        pipeline_k_steps(sch, ko, cfg.stages)
    if sources:  # on the epilogue block: any block of the kernel would do
        sch.annotate(wb, "pragma_import_c", "\n".join(sources))
    from .pipeline import MIN_BLOCKS_ATTR, WARP_ATTR

    func = sch.mod["main"].with_attr(WARP_ATTR, True)
    if cfg.min_blocks:
        func = func.with_attr(MIN_BLOCKS_ATTR, cfg.min_blocks)
    return tvm.IRModule({"main": func})


# threads a block of the second kernel of a grid split-K (MmaConfig.blocks_k > 1), which adds the
# thread blocks' fp32 partials of each output (consecutive threads: consecutive rows, coalesced)
SUM_THREADS = 256


def sum_blocks_k(sch, out, acc) -> None:
    """The second kernel of a grid split-K: ``out`` (the fp16 store of each output, its own loop nest)
    over threads, each summing the blocks' partials of its output (``acc``, over blocks_k) in a register."""
    loops = sch.get_loops(out)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    b_x, t_x = sch.split(fused, [None, SUM_THREADS])
    sch.bind(b_x, "blockIdx.x")
    sch.bind(t_x, "threadIdx.x")
    sch.compute_at(acc, t_x)
    sch.set_scope(acc, 0, "local")
    sch.unroll(sch.get_loops(acc)[-1])


class _UnitDecode:
    """The weight side of ``mma_func``: lane (g, t) decodes whole units of rows 2g, 2g + 1 (the
    format's ``tir_decode_unit``, its gather and slices, its decode intrinsic) in registers."""

    def __init__(self, cfg: MmaConfig, intrin, streamed, staged_bits: int = STAGED_BITS):
        self.cfg, self.intrin, self.streamed, self.staged_bits = cfg, intrin, streamed, staged_bits

    def lane_loops(self, sch, wf):
        # (tile rows r = 2g + h, steps, hi, t, lo) -> lane (g, t); each lane's elements are columns
        # 4s + 2hi + lo of its decoded units of rows 2g, 2g + 1
        r, s, hi, t, lo = sch.get_loops(wf)[-5:]
        tile, g, h = sch.split(r, [self.cfg.tiles, MMA_M // 2, 2])
        sch.reorder(tile, g, t, s, hi, h, lo)
        w_lane = sch.fuse(g, t)
        sch.bind(w_lane, "threadIdx.x")
        for loop in (s, hi, h, lo):
            sch.unroll(loop)
        return w_lane

    def staged_reads(self, sch):
        """(block, read index) of each register copy of packed words (``stage_packed_words``' block
        "<tensor>_local"): what a pipeline stage serves instead of global memory."""
        return [(blk, 0) for blk in (_get_sblock(sch, name + "_local") for name in self.streamed) if blk is not None]

    def decode(self, sch, w_lane, bn):
        """The decode of the lane's units (two rows x cfg.units units), in registers."""
        cfg, intrin, streamed = self.cfg, self.intrin, self.streamed
        dec, consumers = decode_in_registers(sch, w_lane, streamed, cfg.lut_shared,
                                             lambda table: fill_per_block(sch, table, bn, cfg))
        stage_packed_words(sch, consumers, streamed, w_lane)
        sources = []
        for loop in _loops_below(sch, dec, w_lane)[:-1]:  # the lane's rows and units
            sch.unroll(loop)
        if intrin is not None:
            name, source = intrin
            sch.tensorize(sch.get_loops(dec)[-1], name)
            sources.append(source)
        else:
            sch.unroll(sch.get_loops(dec)[-1])
        return sources


def stage_words_async(sch, ko, cfg: MmaConfig, reads, unit: int, staged_bits: int):
    """``MmaConfig.stages`` > 1: every register copy of packed words (``reads``: (block, read index)
    pairs, the weights' ``staged_reads``) reads a shared-memory copy of the K step's words instead,
    which all threads of the block fill with 16-byte cp.async (``intrinsics.register_cp_async16``);
    ``pipeline_k_steps`` then runs the copies stages - 1 steps ahead. Returns the CUDA sources to
    inject."""
    import tvm

    from .intrinsics import register_cp_async16

    sources = []
    for words, index in reads:
        name = sch.get(words).reads[index].source.name
        staged = sch.cache_read(words, index, "shared")
        sch.compute_at(staged, ko)
        loops = _loops_below(sch, staged, ko)  # the block's rows x the step's words of a row (row-major)
        dtype = str(sch.get(staged).writes[0].source.dtype)
        left = 16 * 8 // tvm.DataType(dtype).bits  # elements of one 16-byte copy, taken from the inside out
        outer = list(loops)
        while left > 1 and len(outer) > 1:
            extent = int(sch.get(outer[-1]).extent)
            if left % extent == 0:
                left //= extent
                inner = outer.pop()
            elif extent % left == 0:
                out, inner = sch.split(outer.pop(), [None, left])
                outer.append(out)
                left = 1
            else:
                break
        if left > 1:
            raise ValueError(f"stages={cfg.stages}: a K step's words of a row of {name} are not whole 16-byte "
                             f"copies; use stages=1")
        copy16 = sch.blockize(inner)
        spread_over_block(sch, sch.fuse(*outer) if len(outer) > 1 else outer[0], cfg)
        intrin, source = register_cp_async16(dtype, [r.extent for r in sch.get(copy16).writes[0].region])
        sch.tensorize(copy16, intrin)
        pad = stage_row_pad(cfg, unit, staged_bits)
        if pad:  # row stride = row bytes + pad (mod 64), on the block that now writes the stage buffer
            elem = tvm.DataType(dtype).bits // 8
            row = stage_row_bytes(cfg, unit, staged_bits)
            sch.storage_align(copy16, 0, axis=0, factor=64 // elem, offset=((row + pad) % 64) // elem)
        if source not in sources:
            sources.append(source)
    return sources


def pipeline_k_steps(sch, ko, stages: int) -> None:
    """Annotate the K-step loop ``ko`` as a software pipeline: its shared-memory copies of packed words
    (``stage_words_async``; stage 0, async) run stages - 1 steps ahead of everything else of the step
    (the register copies, decode, X and mma)."""
    import tvm

    body = sch.get(ko).body
    children = list(body.seq) if isinstance(body, tvm.tirx.SeqStmt) else [body]
    copies = []
    for blk in sch.get_child_blocks(ko):
        if "_shared" in sch.get(blk).name_hint:
            below = _loops_below(sch, blk, ko)
            copies.append(sch.get(below[0]) if below else None)
    marks = [any(c is not None and c.same_as(child) for c in copies) for child in children]
    if not any(marks) or all(marks):
        raise ValueError(f"stages={stages}: the K loop has no separate shared-memory copy to pipeline")
    sch.annotate(ko, "software_pipeline_stage", [0 if mark else stages - 1 for mark in marks])
    sch.annotate(ko, "software_pipeline_order", list(range(len(children))))
    sch.annotate(ko, "software_pipeline_async_stages", [0])


def spread_over_block(sch, loop, cfg: MmaConfig):
    """Split ``loop`` over the thread block's threads (threadIdx.z = K warp, y = N warp, x = lane)."""
    _, t_z, t_y, t_x = sch.split(loop, [None, cfg.warps_k, cfg.warps_n, WARP])
    sch.bind(t_z, "threadIdx.z")
    sch.bind(t_y, "threadIdx.y")
    sch.bind(t_x, "threadIdx.x")
    return t_x


def fill_per_block(sch, block, bn, cfg: MmaConfig) -> None:
    """``block`` (a table copy) computed once per thread block (at ``bn``, its innermost block-index
    loop) by all its threads."""
    sch.compute_at(block, bn)
    spread_over_block(sch, sch.fuse(*_loops_below(sch, block, bn)), cfg)


def _read_index(sch, block, prefix):
    """Index of the read of ``block`` whose buffer name starts with ``prefix``."""
    names = [r.source.name for r in sch.get(block).reads]
    return next(i for i, nm in enumerate(names) if nm.startswith(prefix))


def decode_in_registers(sch, at, packed, lut_shared, place_table):
    """The format's decode stages in registers at loop ``at``: W_decode, its table gather (the loops
    below ``at`` unrolled) and the gather's slices. With ``lut_shared`` the gather's tables (what it
    reads besides the ``packed`` words and the slices) are cached in shared memory, each copy placed
    by ``place_table(block)`` (the rule's thread binding). Returns (W_decode, the blocks that read
    the packed words: the consumers ``stage_packed_words`` serves)."""
    dec = sch.get_sblock("W_decode")
    sch.compute_at(dec, at)
    sch.set_scope(dec, 0, "local")
    consumers = [dec]
    gather = _gather_block(sch)
    if gather is not None:
        sch.compute_at(gather, at)
        sch.set_scope(gather, 0, "local")
        for loop in _loops_below(sch, gather, at):
            sch.unroll(loop)
        consumers.append(gather)
        if lut_shared:
            skip = set(packed) | {"W_slice"}
            for idx in [i for i, r in enumerate(sch.get(gather).reads) if r.source.name not in skip]:
                place_table(sch.cache_read(gather, idx, "shared"))
        slices = _get_sblock(sch, "W_slice")
        if slices is not None:
            sch.compute_at(slices, at)
            sch.set_scope(slices, 0, "local")
            consumers.append(slices)
    return dec, consumers


def _loops_below(sch, block, anchor):
    """The loops of ``block`` nested inside loop ``anchor``."""
    loops = sch.get_loops(block)
    pos = [sch.get(lp).same_as(sch.get(anchor)) for lp in loops].index(True)
    return loops[pos + 1:]


def stage_packed_words(sch, consumers, streamed, at) -> None:
    """The packed words (``streamed`` tensors) in registers: one copy per tensor at loop ``at``,
    read by every block of ``consumers`` that needs it, with vector loads where its region has a
    constant extent (a window of data-dependent extent, QTIP's packed rows, stays a scalar copy)."""
    import tvm

    for name in streamed:
        for blk in consumers:
            names = [r.source.name for r in sch.get(blk).reads]
            if name in names:
                users = [b for b in consumers if name in [r.source.name for r in sch.get(b).reads]]
                words = sch.cache_read(blk, names.index(name), "local", consumer_blocks=users)
                sch.compute_at(words, at)
                own = _loops_below(sch, words, at)
                if all(isinstance(sch.get(lp).extent, tvm.tirx.IntImm) for lp in own):
                    vectorize_copy(sch, words, 16, len(sch.get_loops(words)) - len(own))
                break


# From M > 8 (two n8 token tiles) the activations' B fragments cost as much as the decode: four
# 16-row tiles per warp share each of them, where N leaves enough blocks of 64 rows to fill the GPU
# (at least two per SM of an H100-class GPU, 132 SMs). H100 sweep at M=16 (mma-sweep-*-h100.json):
# 28672x8192 e8p-2 60.2 us against 70.8 us (2 tiles, 8 K warps), int4-g128 67.7 against 72.3 us;
# 8192x28672 (128 such blocks) loses with it (91.7 against 63.9 us). Only for one-stage decodes: the
# residual E8P formats' second stage takes e8p-4 to 183 registers a lane with four tiles (128 with
# two), and its M=16 on 28672x8192 went from 90.2 us (2 tiles, 8 K warps) to 107 us (bench records).
WIDE_TILES_MIN_BLOCKS = 264

# On a narrow N the default's two tiles a warp leave fewer blocks of 32 rows than the GPU has SMs
# (4096 rows: 128 blocks for 132 SMs), so there the row-packed one-stage formats split K over 16 warps
# instead, with two K blocks a step for more loads in flight (where K splits so; else the shapes
# below): one tile a warp at M = 2..4, two at M = 5..16. The H100 tuning records (schedules/h100,
# tuned at ae4cd4e and before), this config against the former default (2 tiles, 8 K warps, unroll
# 1): M=4 int4-g128 4096x4096 6.14 / 8.82 us, 4096x11008 12.01 / 19.72, e8p-2 4096x4096 6.11 / 7.27,
# 4096x11008 12.59 / 14.45 (the best of 16 candidates on all four); M=16 int4-g128 4096x4096 7.79 /
# 8.53, 4096x11008 15.22 / 17.68, e8p-2 4096x4096 7.66 / 8.07, 4096x11008 16.42 / 16.76 us. Only
# below one block per SM of an H100 (132): on 8192 rows it lost at M=16 (e8p-2 8192x28672 64.13 /
# 61.08 us) and is unmeasured for int4 at M=4 (whose record there, 49.36 us, beat the former default).
NARROW_BLOCKS = 132
NARROW_SMALL_M = 4  # up to here one tile a warp, above two
NARROW_WARPS_K = 16
NARROW_UNROLL = 2


# The fragment kernel's defaults from the H100 tuning records (qtip-hyb-2, schedules/h100, 2dbd483),
# units=1 tiles=2 against the K warps / unroll of before (warps_k=8, unroll=1): at M = 1 and 4, 16 K
# warps: 4096x4096 9.0 vs 14.2 us, 4096x11008 19.9 vs 30.9, 8192x28672 73.9 vs 85.0, 12288x4096 19.3
# vs 22.1, 22016x4096 35.4 vs 36.6, 28672x8192 75.2 vs 77.3 us; at M=16, unroll 2: 13.7 vs 17.8,
# 27.9 vs 37.7, 105.2 vs 112.0, 26.8 vs 28.0 us
FRAGMENT_SMALL_M = 4
FRAGMENT_SMALL_M_WARPS_K = 16
FRAGMENT_UNROLL = 2
# 4-bit codes' words are twice as wide: with unroll 2 at M=16, ptxas spilled 12 bytes at 48 registers
FRAGMENT_UNROLL_MAX_M_WIDE = 8


def default_mma_config(n: int, k: int, m: int, unit: int, decode_stages: int = 1, fragment: bool = False,
                       code_bits: int = 2) -> MmaConfig:
    """The config qcompile uses without a tuning record: 32 columns per lane (``units``), two 16-row
    tiles per warp sharing each B fragment, 8 warps splitting K. From H100 sweeps (tc_sweep --family
    mma, e8p-2 / int4-g128 on 28672x8192 and 8192x28672): at M = 2..16 this was the best or within
    10 % of it on both shapes (e8p-2 M=4: 47.0 / 50.9 us against 58.0 / 74.2 us with one tile and 4
    K warps; M=16: 70.8 / 63.9 us), except at M > 8 on a wide N (``WIDE_TILES_MIN_BLOCKS``): four
    tiles and 4 K warps (one-stage decodes only), and at M = 2..16 on a narrow N (``NARROW_BLOCKS``):
    16 K warps, unroll 2, one tile at M <= 4 and two above. Where the
    shape refuses it: fewer K warps, then one tile, then one unit per lane.

    ``fragment``: for a fragment-native format (qcompile.kernels.mma_fragment; QTIP HYB, whose unit
    is 16 columns): the same shapes with an even number of tiles (both row-subtiles of a 32x32
    super-tile in one warp) and the per-lane table copies (lut_shared=2) where they fit in shared
    memory, else the single table; 16 K warps at M <= 4, and two K blocks a step (unroll=2) for two
    tiles above (FRAGMENT_SMALL_M_WARPS_K, FRAGMENT_UNROLL), but not above FRAGMENT_UNROLL_MAX_M_WIDE
    for ``code_bits`` (the format's bits per weight) of 4. Measured on the H100 (tc_sweep at 9b550f9,
    qtip-hyb-2 at M = 2..16 on 28672x8192, 8192x28672, 4096x11008: see
    qcompile.kernels.library.FRAGMENT_MMA_ROUTED; the tuning records of 2dbd483 for the K warps and
    unroll)."""
    # (fragment: one unit = 64-column K blocks, two super-tiles a block; with two, qtip-hyb-4's 16-byte
    # word pairs of four super-tiles made ptxas spill at M > 8 to stay at 48 registers)
    units = 1 if fragment else max(1, 32 // unit) if unit < 32 else 1
    if not fragment and decode_stages == 1 and 1 < m <= 16:
        small = m <= NARROW_SMALL_M
        if n // (2 * MMA_M) < NARROW_BLOCKS:
            cfg = MmaConfig(units=units, tiles=1 if small else 2, warps_n=1, warps_k=NARROW_WARPS_K,
                            unroll=NARROW_UNROLL, lut_shared=1)
            try:  # (a K the 16 K warps do not split: the shapes below)
                check_mma_config(cfg, n, k, m, unit, fragment=False)
                return cfg
            except ValueError:
                pass
    shapes = [(2, 8), (2, 4), (2, 2), (2, 1), (1, 8), (1, 4), (1, 2), (1, 1)]
    if m > 8 and n // (16 * 4) >= WIDE_TILES_MIN_BLOCKS and decode_stages == 1:
        shapes.insert(0, (4, 4))
    if fragment and m <= FRAGMENT_SMALL_M:
        shapes.insert(0, (2, FRAGMENT_SMALL_M_WARPS_K))
    wide_words = code_bits >= 4 and m > FRAGMENT_UNROLL_MAX_M_WIDE
    unrolls = (FRAGMENT_UNROLL, 1) if fragment and m > FRAGMENT_SMALL_M and not wide_words else (1,)
    for u in dict.fromkeys((units, 1)):
        for tiles, warps_k in shapes:
            for lut, unroll in itertools.product((2, 1) if fragment else (1,), unrolls if tiles == 2 else (1,)):
                cfg = MmaConfig(units=u, tiles=tiles, warps_n=1, warps_k=warps_k, unroll=unroll, lut_shared=lut)
                try:
                    check_mma_config(cfg, n, k, m, unit, fragment=fragment)
                except ValueError:
                    continue
                return cfg
    raise ValueError(f"no mma config tiles N={n}, K={k} in decode units of {unit}")


# The cp.async pipeline (MmaConfig.stages = 2) by default for 4-bit row-packed formats without table
# lookups (int4) at M = 5..16 on the largest layers. H100, M=16, same process
# (artifacts/bench/mma-sweep-m16-stages-h100.json, commit ed34c93): int4-g128 28672x8192 67.6 -> 57.5 us
# (tiles=4, 4 K warps), 8192x28672 66.6 -> 59.5 us (tiles=2, 8 K warps); the same tiles with the
# pipeline lost on e8p-2 (55.4 -> 57.8, 61.7 -> 66.3 us: its 2-bit words are few per decode, and its
# abs table shares the shared memory), int4 with half the rows a block (tiles=2 on 28672 rows: 82.5
# us) and int4 on smaller layers (22016x4096 25.4 -> 27.4 us, 12288x4096 15.4 -> 16.9 us), hence the
# size bound. The tuner, re-measuring the two shipped entries with this default: 61.5 / 62.5 us
# against their former best 67.5 / 66.3 us (2923f29). At M=8 (bucket 5..8; same tiles, 9848f22,
# artifacts/bench/mma-sweep-m8-stages-h100.json): 28672x8192 59.0 -> 57.1 us, 8192x28672 70.7 -> 54.5 us.
PIPELINE_MIN_M = 5
PIPELINE_BITS = 4
PIPELINE_MIN_WEIGHTS = 1 << 27
# The sign-folded table copies (lut_shared=4) for QTIP HYB's 3- and 4-bit codes at M=1: a candidate of
# the tuner's space (qcompile.tune.space), not yet the default, since the shipped records of those
# buckets were tuned against lut_shared=2 and a new default turns them off until re-tuned on the GPU
# (tests/test_records.py). H100, one process (artifacts/bench/mma-sweep-qtip-hyb-switches-h100.json),
# the default config otherwise (2 tiles, 16 K warps): qtip-hyb-3 28672x8192 59.5 -> 56.7 us, 8192x28672
# 57.5 -> 52.1; qtip-hyb-4 60.0 -> 56.6, 55.0 -> 51.3. Not for HYB-2, whose min-form copy index
# (formats.trellis.LANE_COPY_BY_MIN) on lut_shared=2 was as fast (50.7 / 46.7 us against 51.4 / 47.1
# with both), nor at M=16 (qtip-hyb-2, 4 tiles x 4 K warps: 28672x8192 88.5 -> 117.5 us; 8192x28672
# 105.0 us on its default, 183.5 with lut_shared=4)
SIGNED_LUT_BITS = (3, 4)
SIGNED_LUT_MAX_M = 1


def _hyb_fragment(fmt) -> bool:
    """Whether ``fmt`` is QTIP HYB in the kernel layout (the fragment kernel with table copies)."""
    return getattr(fmt, "fragment_native", False) and getattr(fmt, "code", None) == "hyb"


def signed_lut_candidate(fmt, m: int) -> bool:
    """Whether the tuner's space of ``fmt`` at batch ``m`` includes lut_shared=4 (SIGNED_LUT_*)."""
    return _hyb_fragment(fmt) and fmt.K in SIGNED_LUT_BITS and m <= SIGNED_LUT_MAX_M


# The 32 lane copies (lut_shared=3) for QTIP HYB at M > 1: a candidate of the tuner's space. H100, one
# process at b2d52bb (artifacts/bench/mma-sweep-qtip-hyb-lane-lut-h100.json), qtip-hyb-2 M=16:
# 8192x28672 102.6 us on its default (2 tiles, 8 K warps, unroll 2) against 95.9 with lut_shared=3 and
# 90.9 with lut_shared=3 at 16 K warps; 28672x8192 87.3 on its default (4 tiles, 4 K warps) against
# 92.6-116.5 with lut_shared=3 on four configs: it depends on the shape, which is the tuner's to find.
# Not at M=1, where it lost on all three codes (62.8 / 59.5 against 50.7 / 47.1 us for HYB-2).
LANE_LUT_MIN_M = 2


def lane_lut_candidate(fmt, m: int) -> bool:
    """Whether the tuner's space of ``fmt`` at batch ``m`` includes lut_shared=3 (LANE_LUT_MIN_M)."""
    return _hyb_fragment(fmt) and m >= LANE_LUT_MIN_M


def format_default_mma_config(fmt, n: int, k: int, m: int) -> MmaConfig:
    """``default_mma_config`` with the knobs format ``fmt`` (a Format) sets: its decode unit and stages,
    whether it is fragment-native, and (fragment-native, i.e. QTIP) its bits per weight; plus the
    two-stage cp.async pipeline where it was measured faster (PIPELINE_*)."""
    cfg = default_mma_config(n, k, m, fmt.decode_unit, fmt.decode_stages, fmt.fragment_native,
                             fmt.K if fmt.fragment_native else 2)
    if (not fmt.fragment_native and not fmt.gather_count and PIPELINE_MIN_M <= m <= 16
            and n * k >= PIPELINE_MIN_WEIGHTS and streamed_bits(fmt, n, k) == PIPELINE_BITS):
        piped = MmaConfig(**{**cfg.as_dict(), "lut_shared": 0, "stages": 2})  # no table to place
        try:
            check_mma_config(piped, n, k, m, fmt.decode_unit, staged_bits=PIPELINE_BITS)
            return piped
        except ValueError:
            pass
    return cfg


def mma_scheduled_func(fmt, n: int, k: int, m: int, cfg: MmaConfig = None, use_intrin: bool = True,
                       fragment=None, packed_a=None):
    """The scheduled PrimFunc ("main") of ``fmt``'s fused decode + matmul on mma.sync. ``fragment``:
    True = the fragment-native kernel (qcompile.kernels.mma_fragment; ``use_intrin`` does not apply,
    ``packed_a``: its A fragments as 32-bit registers, None = ``mma_fragment.PACKED_A``), False = this
    module's unit-decode kernel, None = the fragment-native one for the formats that are
    (``Format.fragment_native``: QTIP HYB)."""
    from ..formats import get as get_format

    fmt = get_format(fmt)
    if fragment is None:
        fragment = fmt.fragment_native
    if fragment:
        from .mma_fragment import fragment_mma_scheduled_func

        return fragment_mma_scheduled_func(fmt, n, k, m, cfg, packed_a)
    unit = fmt.decode_unit
    cfg = cfg or format_default_mma_config(fmt, n, k, m)
    bits = streamed_bits(fmt, n, k)
    check_mma_config(cfg, n, k, m, unit, staged_bits=bits)
    if cfg.stage_pad and len(fmt.streamed) > 1:
        raise ValueError(f"stage_pad=1 is for formats with one packed-word tensor; {fmt.name} streams "
                         f"{len(fmt.streamed)} ({', '.join(fmt.streamed)}): use stage_pad=0")
    func = inline_derived(mma_func(fmt, n, k, m, span_of(cfg, unit), k_blocks(cfg, k, unit)))
    intrin = fmt.decode_intrin("cuda") if use_intrin else None
    return schedule_mma_cuda(func, cfg, unit, intrin, fmt.streamed, bits)["main"]
