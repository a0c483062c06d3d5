"""The search spaces of the tunable kernel families: every config worth measuring for one kernel
(format, N, K, M). The family is the one that serves the bucket (``library.kernel_family``):
``GemvConfig`` for the CUDA-core GEMV, ``MmaConfig`` for the mma.sync kernel (M = 2..64 of the
row-packed formats, 1..16 of QTIP HYB on its fragment-native variant), ``TensorCoreConfig`` for the
WMMA kernel (M = 8..16 of QTIP 1MAD, 4..16 of 3INST); the GEMM above those has no space yet.
Each family has one key scheme (``config_key``: ``knob=value`` pairs in the field order of its
config class, which ``config_from_key(key, family)`` reads back) and its own fit check
(``fit_error``); a tuning record names its family (the tensor-core and mma.sync families share
knob names such as ``warps_k``), so a key is always read in its own family.

GEMV:

A candidate is a GemvConfig that tiles the shape (rows * row_tile divides N; threads_k * chunks
divides K / decode_unit, or leaves a ragged last K step with at most MAX_RAGGED_IDLE of the step
slots idle, as for K = 11008 = 344 E8P units = 8 * 43; unroll divides the K steps), pruned to blocks
of MIN_THREADS..MAX_THREADS threads. The space is explicit and small (a few hundred configs), so the
driver measures candidates from it directly; TVM's meta-schedule could drive the same knobs
through a ScheduleFn space, but its generic CUDA space does not know a dequantizing GEMV (see
../shared/TVM-0.27.md), and our knobs already describe the whole schedule.

The knobs are read from ``dataclasses.fields(GemvConfig)``: a field without an entry in
KNOB_VALUES stays at its default, so a new knob added to GemvConfig never breaks the space.

Tensor cores (``tc_candidates``): TensorCoreConfigs around the shape's default
(``tensorcore.default_tc_config``): one 16-row M tile (warps_m 1, 16-byte copies), N tiles of
16..256 columns over 1..4 warps, K steps of 32..512 columns split over 1..8 warps (2..8 warps per
block), 1..4 decode units per thread (at most 64 columns) and 1 or 2 pipeline stages, kept where
``check_tensorcore_config`` passes (the tiles divide the shape, at most 48 KiB of shared memory);
the default first, then by distance from it, at most MAX_TC_CANDIDATES.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import fields, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import QCompileError
from ..formats import get as get_format
from ..kernels.mma import MMA_MAX_M, _hyb_fragment, lane_lut_candidate, signed_lut_candidate
from ..kernels.library import (GEMV_FAMILY, GEMV_MAX_M, MMA_FAMILY, TC_FAMILY, KernelSpec, default_gemv_config,
                               family_options, kernel_family)
from ..kernels.schedules import MAX_RAGGED_IDLE, GemvConfig, k_steps, ragged_idle
from ..kernels.mma import STAGED_BITS, MmaConfig, check_mma_config, format_default_mma_config, streamed_bits
from ..kernels.tensorcore import TensorCoreConfig, check_tc_config, default_tc_config

FAMILIES = (GEMV_FAMILY, TC_FAMILY, MMA_FAMILY)  # the tunable kernel families (a tuning record's "kernel")
CONFIG_CLASS = {GEMV_FAMILY: GemvConfig, TC_FAMILY: TensorCoreConfig, MMA_FAMILY: MmaConfig}
TITLE = {GEMV_FAMILY: "GEMV", TC_FAMILY: "tensor-core", MMA_FAMILY: "mma.sync"}

# values each knob takes in the search (all powers of two)
KNOB_VALUES: Dict[str, Tuple[int, ...]] = {
    "rows": (1, 2, 4, 8),
    "threads_k": (8, 16, 32, 64, 128),
    "chunks": (1, 2, 4),
    "unroll": (1, 2, 4),
    "row_tile": (1, 2, 4),
}
MIN_THREADS = 32   # a block smaller than a warp leaves lanes idle
MAX_THREADS = 512  # larger blocks only cut the number of resident blocks per SM

# the tensor-core space (M <= GEMV_MAX_M: one 16-row M tile; m_tile, warps_m and vec stay at the
# default's): values of the searched knobs, all powers of two
TC_KNOB_VALUES: Dict[str, Tuple[int, ...]] = {
    "n_tile": (16, 32, 64, 128, 256),
    "k_tile": (32, 64, 128, 256, 512),
    "warps_n": (1, 2, 4),
    "warps_k": (1, 2, 4, 8),
    "units": (1, 2, 4),
    "stages": (1, 2),
}
TC_MIN_WARPS, TC_MAX_WARPS = 2, 8  # warps per block (the measured good configs have 4-8)
TC_MAX_UNIT_COLUMNS = 64           # units x decode unit: a thread's packed words stay one 16-byte load at 2 bits
MAX_TC_CANDIDATES = 128            # nearest the default first; a bounded count

# the mma.sync space (``mma_candidates``): values of every knob of MmaConfig
MMA_KNOB_VALUES: Dict[str, Tuple[int, ...]] = {
    "units": (1, 2, 4, 8),
    "tiles": (1, 2, 4),
    "warps_n": (1, 2),
    "warps_k": (1, 2, 4, 8, 16),
    "unroll": (1, 2),
    "stages": (1, 2),
    "blocks_k": (1, 2, 4),
}
MMA_MIN_WARPS, MMA_MAX_WARPS = 2, 16  # warps per block
# Above this M (int4 / E8P's single-launch buckets 32 and 64) the space also takes 4 warps along N. Each
# thread block reads the whole activation tile (M x K fp16) through L2 once per warp row group, so the
# defaults' 32-row blocks move (N / 32) x M x K x 2 bytes: e8p-2 at M=64 on 28672 x 8192 0.94 GB, ~170 us
# at ~5.5 TB/s, against 183.6 us measured (and M=32: 0.47 GB, ~85 us, against 80.3 us; the same on
# 8192 x 28672: 0.94 GB against 165.0 us; H100 at 9b550f9, mma-sweep-m64-e8p-2-h100.json, warps_n=1
# only). More warps across N share one block's reads (through L1): 128 rows a block cut that traffic 4x.
# At M=16 (4-tile blocks of 64 rows: 0.12 GB) more warps across N measured slower (README), so this
# stays above GEMV_MAX_M; not yet timed at 32 / 64.
MMA_WIDE_N_MIN_M = GEMV_MAX_M + 1
MMA_WIDE_N_WARPS = (1, 2, 4)
# the fragment kernel's cp.async pipeline (MmaConfig.stages > 1 for QTIP HYB): in the space since it
# passed the GPU suite (H100, 70ea965: bit-exact one-hot reads through the stages of HYB-2/3/4, the
# float64 checks of its configs); at M=1, 8 K warps, unroll 1, two stages took qtip-hyb-2 from 70.3 to
# 66.7 us on 28672x8192 and from 80.4 to 70.1 us on 8192x28672 (same process,
# artifacts/bench/mma-sweep-qtip-hyb-2-m1-lut-stages-h100.json), while the best one-stage configs
# (63.4 / 67.3 us) stayed ahead: a candidate, not a default. Three stages fit beside the 16 lane
# copies only where the partials are small; MMA_KNOB_VALUES stops at two.
FRAGMENT_MAX_TUNED_STAGES = 2
# Configs outside the regular grid that won somewhere, measured right after the default so that a
# small budget reaches them: QTIP HYB's knob overrides of the default, by batch. H100, one
# process at c67c318 (artifacts/bench/mma-sweep-qtip-hyb-2-lut5-xstaged-h100.json), qtip-hyb-2:
# M=1, the sign-folded 32 lane copies at 32 K warps (1024 threads, over MMA_MAX_WARPS): 8192x28672
# 47.2 -> 40.0 us (unroll 2) / 41.1 (unroll 1), but 28672x8192 50.4 -> 54.3 / 55.1;
# M=16, the activations staged beside the 32 lane copies, 2 tiles x 16 K warps, unroll 2: 8192x28672
# 103.7 -> 73.8 us, 28672x8192 86.8 -> 79.5; 64-row blocks split over K in two: 8192x28672 88.3.
# Shape-dependent, so candidates (the tuner picks per shape), not defaults.
HYB_SEEDS_M1 = ({"lut_shared": 5, "warps_k": 32, "unroll": 2}, {"lut_shared": 5, "warps_k": 32, "unroll": 1})
HYB_SEEDS_MULTI = ({"tiles": 2, "warps_k": 16, "unroll": 2, "lut_shared": 3, "x_staged": 1},
                   {"tiles": 2, "warps_k": 16, "unroll": 1, "lut_shared": 3, "x_staged": 1},
                   {"tiles": 4, "warps_k": 4, "unroll": 2, "blocks_k": 2})
MMA_MAX_SPAN = 64                     # units x decode unit columns per lane (two rows: 16 registers at 64)
MAX_MMA_CANDIDATES = 96


def _family(family: str) -> str:
    if family not in CONFIG_CLASS:
        raise ValueError(f"unknown kernel family {family!r} (known: {', '.join(FAMILIES)})")
    return family


def family_of(cfg) -> str:
    """The kernel family of a config object ("gemv" / "tensorcore" / "mma"); ValueError for anything else."""
    for family, cls in CONFIG_CLASS.items():
        if type(cfg) is cls:
            return family
    raise ValueError(f"not a kernel config: {type(cfg).__name__} (expected GemvConfig, TensorCoreConfig or MmaConfig)")


def spec_family(spec: KernelSpec) -> str:
    """The family that runs ``spec`` (``library.kernel_family``; "gemm" has no space)."""
    return kernel_family(spec.format, spec.m)


def knob_names(family: str = GEMV_FAMILY) -> Tuple[str, ...]:
    """The family's config fields, in declaration order (the order of a config key)."""
    return tuple(f.name for f in fields(CONFIG_CLASS[_family(family)]))


# knobs added after records were shipped (schedules/h100): a key names one only where it differs from
# its default, so the keys already written stay the same strings (and the files the same bytes)
LATE_KNOBS: Dict[str, Tuple[str, ...]] = {"mma": ("blocks_k", "min_blocks", "x_staged")}


def config_values(cfg) -> Dict[str, object]:
    """{knob: value} of a config as records store it (a LATE_KNOBS knob only where it is not its default)."""
    family = family_of(cfg)
    late, defaults = LATE_KNOBS.get(family, ()), CONFIG_CLASS[family]()
    return {name: getattr(cfg, name) for name in knob_names(family)
            if name not in late or getattr(cfg, name) != getattr(defaults, name)}


def config_key(cfg) -> str:
    """A stable text key of a config of either family, e.g. GEMV
    ``rows=4,threads_k=64,chunks=2,unroll=2,row_tile=1,lut_shared=1,lut_lanes=0`` or tensor-core
    ``m_tile=16,n_tile=32,k_tile=256,warps_m=1,warps_n=2,warps_k=4,vec=8,units=4,stages=1`` (a
    LATE_KNOBS knob only where it is not its default)."""
    return ",".join(f"{name}={value}" for name, value in config_values(cfg).items())


def config_from_dict(values: Mapping[str, object], family: str = GEMV_FAMILY):
    """A config of ``family`` (GemvConfig by default) from a {knob: value} mapping; missing knobs
    take their defaults (a record written before a knob existed means that knob's default).
    ValueError (one line) for an unknown knob or a value of the wrong type (the searched knobs and
    every tensor-core knob are positive integers; any other knob must have the type of its
    default)."""
    cls, title = CONFIG_CLASS[_family(family)], TITLE[family]
    if not isinstance(values, Mapping):
        raise ValueError(f"a {title} config must be an object of knobs, got {type(values).__name__}")
    names = knob_names(family)
    unknown = sorted(map(str, set(values) - set(names)))
    if unknown:
        raise ValueError(f"unknown {title} knob(s) {', '.join(unknown)} (known: {', '.join(names)})")
    defaults = cls()
    for name, value in values.items():
        default = getattr(defaults, name)
        positive = family == TC_FAMILY or name in {GEMV_FAMILY: KNOB_VALUES, MMA_FAMILY: MMA_KNOB_VALUES}[family]
        if positive or (isinstance(default, int) and not isinstance(default, bool)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
                raise ValueError(f"{title} knob {name} must be a {'positive' if positive else 'non-negative'} "
                                 f"integer, got {value!r}")
        elif type(value) is not type(default):
            raise ValueError(f"{title} knob {name} must be a {type(default).__name__}, got {value!r}")
    return cls(**dict(values))


def _parse_value(text: str):
    text = text.strip()
    if text.isdigit():
        return int(text)
    return {"True": True, "False": False}.get(text, text)


def config_from_key(key: str, family: str = GEMV_FAMILY):
    """The inverse of config_key for a key of ``family``; ValueError (one line) for a malformed key."""
    cls = CONFIG_CLASS[_family(family)]
    values = {}
    for item in str(key).split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"malformed {TITLE[family]} config key {key!r} (expected e.g. {config_key(cls())!r})")
        values[name.strip()] = _parse_value(value)
    return config_from_dict(values, family)


def tiling_error(cfg: GemvConfig, n: int, k: int, unit: int) -> Optional[str]:
    """Why ``cfg`` cannot schedule an [n, k] weight with decode units of ``unit`` columns, or None."""
    if k % unit:
        return f"K={k} is not a multiple of the decode unit {unit}"
    units = k // unit
    if n % (cfg.rows * cfg.row_tile):
        return f"rows*row_tile={cfg.rows * cfg.row_tile} does not divide N={n}"
    per_step = cfg.threads_k * cfg.chunks
    if per_step > units:
        return f"threads_k*chunks={per_step} exceeds K/{unit}={units}"
    idle = ragged_idle(units, cfg.threads_k, cfg.chunks)  # a ragged last step: the schedule masks it
    if idle > MAX_RAGGED_IDLE:
        return (f"threads_k*chunks={per_step} leaves {idle:.1%} of the K steps idle past K/{unit}={units} "
                f"(at most {MAX_RAGGED_IDLE:.1%})")
    steps = k_steps(units, cfg.threads_k, cfg.chunks)
    if steps % cfg.unroll:
        return f"unroll={cfg.unroll} does not divide the {steps} K steps"
    return None


def check_tensorcore_config(cfg: TensorCoreConfig, n: int, k: int, m: int, unit: int) -> Optional[str]:
    """Why ``cfg`` cannot schedule the tensor-core kernel of an [n, k] weight at batch m with decode
    units of ``unit`` columns (``tensorcore.check_tc_config``'s one line), or None."""
    try:
        check_tc_config(cfg, n, k, m, unit)
    except ValueError as err:
        return str(err)
    return None


def check_mma(cfg: MmaConfig, n: int, k: int, m: int, unit: int, fragment: bool = False,
              staged_bits: int = STAGED_BITS) -> Optional[str]:
    """Why ``cfg`` cannot schedule the mma.sync kernel (``mma.check_mma_config``'s one line; ``fragment``:
    of a fragment-native format; ``staged_bits``: ``mma.streamed_bits`` of the format), or None."""
    try:
        check_mma_config(cfg, n, k, m, unit, fragment, staged_bits)
    except ValueError as err:
        return str(err)
    return None


def fit_error(cfg, n: int, k: int, m: int, unit: int, fragment: bool = False,
              staged_bits: int = STAGED_BITS) -> Optional[str]:
    """Why a config of any family cannot schedule the (n, k, m) kernel, or None: the GEMV's
    ``tiling_error``, the tensor-core ``check_tensorcore_config`` or ``check_mma`` (``fragment``: of
    a fragment-native format, QTIP HYB)."""
    if family_of(cfg) == TC_FAMILY:
        return check_tensorcore_config(cfg, n, k, m, unit)
    if family_of(cfg) == MMA_FAMILY:
        return check_mma(cfg, n, k, m, unit, fragment, staged_bits)
    return tiling_error(cfg, n, k, unit)


def in_space(cfg: GemvConfig, n: int, k: int, unit: int) -> bool:
    """True when ``cfg`` tiles the shape and passes the pruning rules (block size)."""
    threads = cfg.rows * cfg.threads_k
    return tiling_error(cfg, n, k, unit) is None and MIN_THREADS <= threads <= MAX_THREADS


def _check_spec(spec: KernelSpec, family: Optional[str] = None):
    """(the spec's format, the family: ``family`` or the one that runs the bucket); QCompileError for
    a spec of no tunable family, a family that cannot run the bucket (``library.family_options``) or a
    bad shape."""
    if spec.m < 1:
        raise QCompileError(f"M must be >= 1, got {spec.m}")
    if family is not None and family not in family_options(spec.format, spec.m):
        raise QCompileError(f"M={spec.m} of {spec.format} cannot run on the {family} family (it can on: "
                            f"{', '.join(family_options(spec.format, spec.m))})")
    family = family or spec_family(spec)
    if family not in FAMILIES:
        raise QCompileError(f"M={spec.m} of {spec.format} is served by the GEMM family, which has no search "
                            f"space so far (the GEMV, mma.sync and tensor-core families: M <= {GEMV_MAX_M}, "
                            f"and the mma.sync buckets of int4 and E8P up to M={MMA_MAX_M})")
    fmt = get_format(spec.format)
    fmt.check_shape(spec.n, spec.k)
    return fmt, family


def default_config(spec: KernelSpec, family: Optional[str] = None):
    """The config ``qcompile build`` uses without a record: a GemvConfig, TensorCoreConfig or
    MmaConfig, the family of the spec's bucket (or of ``family``, one of ``library.family_options``:
    that family's default for the bucket)."""
    fmt, family = _check_spec(spec, family)
    if family == TC_FAMILY:
        return _default_tc(spec, fmt)
    if family == MMA_FAMILY:
        return _default_mma(spec, fmt)
    return default_gemv_config(spec.n, spec.k, spec.m, fmt.decode_unit, fmt.gemv_tile)


def _default_tc(spec: KernelSpec, fmt) -> TensorCoreConfig:
    try:
        return default_tc_config(spec.n, spec.k, spec.m, fmt.decode_unit)
    except ValueError as err:
        raise QCompileError(str(err)) from None


def _default_mma(spec: KernelSpec, fmt) -> MmaConfig:
    try:
        return format_default_mma_config(fmt, spec.n, spec.k, spec.m)
    except ValueError as err:
        raise QCompileError(str(err)) from None


def _distance(cfg, ref) -> Tuple[int, float]:
    """(knobs that differ, total log2 distance): near the hand-picked default first, since the
    default came from sweeps and its neighbours are the likeliest improvements."""
    differ, spread = 0, 0.0
    for name in knob_names(family_of(cfg)):
        a, b = getattr(cfg, name), getattr(ref, name)
        if a != b:
            differ += 1
            numeric = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (a, b))
            spread += abs(math.log2(a) - math.log2(b)) if numeric else 1.0
    return differ, spread


def _sortable(value) -> Tuple[int, object]:
    return (0, value) if isinstance(value, int) and not isinstance(value, bool) else (1, str(value))


def candidates(spec: KernelSpec, family: Optional[str] = None) -> list:
    """Every candidate of the spec's space (its bucket's family, or ``family``, one of
    ``library.family_options``: ``gemv_candidates``, ``tc_candidates`` or ``mma_candidates``) in a
    deterministic order, the default config first. QCompileError for a GEMM bucket (no space yet),
    a family that cannot run the bucket or a shape the format cannot take."""
    fmt, family = _check_spec(spec, family)
    if family == TC_FAMILY:
        return tc_candidates(spec, fmt)
    return mma_candidates(spec, fmt) if family == MMA_FAMILY else gemv_candidates(spec, fmt)


def gemv_candidates(spec: KernelSpec, fmt) -> List[GemvConfig]:
    """Every candidate of the spec's GEMV space in a deterministic order: the default config first
    (even where it falls outside the pruned space: it is the baseline), then the others by
    distance from it (number of knobs changed, then log2 distance, then knob values)."""
    unit = fmt.decode_unit
    default = default_gemv_config(spec.n, spec.k, spec.m, unit, fmt.gemv_tile)
    names = knob_names()
    values = dict(KNOB_VALUES)
    if tuple(fmt.gemv_tile) != (1, 1):  # a thread holds exactly one block of rows (Format.gemv_tile)
        values["row_tile"], values["chunks"] = (fmt.gemv_tile[0],), (fmt.gemv_tile[1],)
    axes: List[Sequence[int]] = [values.get(name, (getattr(default, name),)) for name in names]
    space = []
    for values in itertools.product(*axes):
        cfg = GemvConfig(**dict(zip(names, values)))
        if cfg != default and in_space(cfg, spec.n, spec.k, unit):
            space.append(cfg)
    space.sort(key=lambda c: (_distance(c, default), tuple(_sortable(getattr(c, name)) for name in names)))
    return [default] + space


def tc_candidates(spec: KernelSpec, fmt) -> List[TensorCoreConfig]:
    """The spec's tensor-core space in a deterministic order: the default config
    (``default_tc_config``) first, then every config of TC_KNOB_VALUES around it that passes the
    pruning rules (TC_MIN_WARPS..TC_MAX_WARPS warps, at most TC_MAX_UNIT_COLUMNS columns of units
    per thread) and ``check_tc_config``, by distance from the default; at most MAX_TC_CANDIDATES."""
    unit = fmt.decode_unit
    default = _default_tc(spec, fmt)
    names = knob_names(TC_FAMILY)
    axes: List[Sequence[int]] = [TC_KNOB_VALUES.get(name, (getattr(default, name),)) for name in names]
    space = []
    for values in itertools.product(*axes):
        cfg = TensorCoreConfig(**dict(zip(names, values)))
        if (cfg == default or not TC_MIN_WARPS <= cfg.warps_m * cfg.warps_n * cfg.warps_k <= TC_MAX_WARPS
                or cfg.units * unit > TC_MAX_UNIT_COLUMNS):
            continue
        if check_tensorcore_config(cfg, spec.n, spec.k, spec.m, unit) is None:
            space.append(cfg)
    space.sort(key=lambda c: (_distance(c, default), tuple(getattr(c, name) for name in names)))
    return [default] + space[:MAX_TC_CANDIDATES - 1]


def mma_candidates(spec: KernelSpec, fmt) -> List[MmaConfig]:
    """The spec's mma.sync space in a deterministic order: the default config (``format_default_mma_config``)
    first, then every config of MMA_KNOB_VALUES with MMA_MIN_WARPS..MMA_MAX_WARPS warps per block and
    at most MMA_MAX_SPAN columns per lane that passes ``check_mma_config``, by distance from the
    default; at most MAX_MMA_CANDIDATES. From MMA_WIDE_N_MIN_M on, warps_n also 4, and the default's
    twins with 2 and 4 warps across N come right after it. lut_shared stays the default's, but for QTIP
    HYB-3/4 at M=1
    also 4 (the sign-folded table copies: ``mma.signed_lut_candidate``) and for QTIP HYB at M > 1 also 3
    (the 32 lane copies: ``mma.lane_lut_candidate``). For QTIP HYB up to M=16 the measured off-grid
    winners (HYB_SEEDS_*) come right after the default."""
    unit = fmt.decode_unit
    default = _default_mma(spec, fmt)
    bits = streamed_bits(fmt, spec.n, spec.k)
    names = knob_names(MMA_FAMILY)
    axes: List[Sequence[int]] = [MMA_KNOB_VALUES.get(name, (getattr(default, name),)) for name in names]
    if signed_lut_candidate(fmt, spec.m) and default.lut_shared == 2:  # (HYB-3/4 at M=1: mma.SIGNED_LUT_*)
        axes[names.index("lut_shared")] = (2, 4)
    if lane_lut_candidate(fmt, spec.m) and default.lut_shared == 2:  # (HYB at M > 1: mma.LANE_LUT_MIN_M)
        axes[names.index("lut_shared")] = (2, 3)
    if spec.m >= MMA_WIDE_N_MIN_M:  # (the activation tile's L2 reads: MMA_WIDE_N_*)
        axes[names.index("warps_n")] = MMA_WIDE_N_WARPS
    space = []
    for values in itertools.product(*axes):
        cfg = MmaConfig(**dict(zip(names, values)))
        if (cfg == default or not MMA_MIN_WARPS <= cfg.warps_n * cfg.warps_k <= MMA_MAX_WARPS
                or cfg.units * unit > MMA_MAX_SPAN):
            continue
        if fmt.fragment_native and cfg.stages > FRAGMENT_MAX_TUNED_STAGES:
            continue
        if check_mma(cfg, spec.n, spec.k, spec.m, unit, fmt.fragment_native, bits) is None:
            space.append(cfg)
    space.sort(key=lambda c: (_distance(c, default), tuple(getattr(c, name) for name in names)))
    if spec.m >= MMA_WIDE_N_MIN_M:  # the default's wide-N twins right after it (its other knobs, the most
        # K warps whose partial sums fit beside them), so that a small budget measures them
        twins = []
        for warps_n in MMA_WIDE_N_WARPS[1:]:
            same = [c for c in space if c.warps_n == warps_n and all(
                getattr(c, name) == getattr(default, name) for name in names if name not in ("warps_n", "warps_k"))]
            if same:
                twins.append(max(same, key=lambda c: c.warps_k))
        space = twins + [c for c in space if c not in twins]
    seeds = [c for c in _hyb_seeds(spec, fmt, default) if c != default]
    space = seeds + [c for c in space if c not in seeds]
    return [default] + space[:MAX_MMA_CANDIDATES - 1]


def _hyb_seeds(spec: KernelSpec, fmt, default: MmaConfig) -> List[MmaConfig]:
    """HYB_SEEDS_* applied to the default, those that ``check_mma`` accepts for the spec (in order); for
    QTIP HYB in its kernel layout up to M=16 only."""
    if not _hyb_fragment(fmt) or spec.m > GEMV_MAX_M:
        return []
    seeds = []
    for override in HYB_SEEDS_M1 if spec.m == 1 else HYB_SEEDS_MULTI:
        cfg = replace(default, **override)
        if cfg not in seeds and check_mma(cfg, spec.n, spec.k, spec.m, fmt.decode_unit, fmt.fragment_native,
                                          streamed_bits(fmt, spec.n, spec.k)) is None:
            seeds.append(cfg)
    return seeds
