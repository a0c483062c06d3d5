"""The GEMV search space: every ``GemvConfig`` worth measuring for one kernel (format, N, K, M).

A candidate is a GemvConfig that tiles the shape (rows * row_tile divides N; threads_k * chunks
divides K / decode_unit, or leaves a ragged last K step with at most MAX_RAGGED_IDLE of the step
slots idle, as for K = 11008 = 344 E8P units = 8 * 43; unroll divides the K steps), pruned to blocks
of MIN_THREADS..MAX_THREADS threads. The space is explicit and small (a few hundred configs), so the
driver measures candidates from it directly; TVM's meta-schedule could drive the same knobs
through a ScheduleFn space, but its generic CUDA space does not know a dequantizing GEMV (see
../shared/TVM-0.27.md), and our knobs already describe the whole schedule.

The knobs are read from ``dataclasses.fields(GemvConfig)``: a field without an entry in
KNOB_VALUES stays at its default, so a new knob added to GemvConfig never breaks the space.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import fields
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import QCompileError
from ..formats import get as get_format
from ..kernels.library import GEMV_MAX_M, TC_MIN_M, KernelSpec, default_gemv_config, serves_gemv
from ..kernels.schedules import MAX_RAGGED_IDLE, GemvConfig, k_steps, ragged_idle

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


def knob_names() -> Tuple[str, ...]:
    """GemvConfig's fields, in declaration order (the order of a config key)."""
    return tuple(f.name for f in fields(GemvConfig))


def config_key(cfg: GemvConfig) -> str:
    """A stable text key of a config, e.g. ``rows=4,threads_k=64,chunks=2,unroll=2,row_tile=1``."""
    return ",".join(f"{name}={getattr(cfg, name)}" for name in knob_names())


def config_from_dict(values: Mapping[str, object]) -> GemvConfig:
    """A GemvConfig from a {knob: value} mapping; missing knobs take their defaults (a record written
    before a knob existed means that knob's default). ValueError (one line) for an unknown knob or
    a value of the wrong type (the searched knobs are positive integers; any other knob must have
    the type of its default)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"a GEMV config must be an object of knobs, got {type(values).__name__}")
    known = set(knob_names())
    unknown = sorted(map(str, set(values) - known))
    if unknown:
        raise ValueError(f"unknown GEMV knob(s) {', '.join(unknown)} (known: {', '.join(knob_names())})")
    defaults = GemvConfig()
    for name, value in values.items():
        default = getattr(defaults, name)
        if name in KNOB_VALUES or (isinstance(default, int) and not isinstance(default, bool)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name in KNOB_VALUES else 0):
                raise ValueError(f"GEMV knob {name} must be a {'positive' if name in KNOB_VALUES else 'non-negative'} "
                                 f"integer, got {value!r}")
        elif type(value) is not type(default):
            raise ValueError(f"GEMV knob {name} must be a {type(default).__name__}, got {value!r}")
    return GemvConfig(**dict(values))


def _parse_value(text: str):
    text = text.strip()
    if text.isdigit():
        return int(text)
    return {"True": True, "False": False}.get(text, text)


def config_from_key(key: str) -> GemvConfig:
    """The inverse of config_key; ValueError (one line) for a malformed key."""
    values = {}
    for item in str(key).split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"malformed GEMV config key {key!r} (expected e.g. {config_key(GemvConfig())!r})")
        values[name.strip()] = _parse_value(value)
    return config_from_dict(values)


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


def in_space(cfg: GemvConfig, n: int, k: int, unit: int) -> bool:
    """True when ``cfg`` tiles the shape and passes the pruning rules (block size)."""
    threads = cfg.rows * cfg.threads_k
    return tiling_error(cfg, n, k, unit) is None and MIN_THREADS <= threads <= MAX_THREADS


def _check_gemv(spec: KernelSpec):
    """The spec's format; QCompileError for a spec outside the GEMV family or a bad shape."""
    if spec.m >= 1 and not serves_gemv(spec.format, spec.m):
        family = f"GEMM family (M > {GEMV_MAX_M})" if spec.m > GEMV_MAX_M else \
            f"low-batch tensor-core family ({TC_MIN_M} <= M <= {GEMV_MAX_M})"
        raise QCompileError(f"M={spec.m} of {spec.format} is served by the {family}; only GEMV kernels "
                            f"(M < {TC_MIN_M}; every M for QTIP HYB) have a search space so far")
    if spec.m < 1:
        raise QCompileError(f"M must be >= 1, got {spec.m}")
    fmt = get_format(spec.format)
    fmt.check_shape(spec.n, spec.k)
    return fmt


def default_config(spec: KernelSpec) -> GemvConfig:
    """The config ``qcompile build`` uses without a record."""
    fmt = _check_gemv(spec)
    return default_gemv_config(spec.n, spec.k, spec.m, fmt.decode_unit, fmt.gemv_tile)


def _distance(cfg: GemvConfig, ref: GemvConfig) -> Tuple[int, float]:
    """(knobs that differ, total log2 distance): near the hand-picked default first, since the
    default came from sweeps and its neighbours are the likeliest improvements."""
    differ, spread = 0, 0.0
    for name in knob_names():
        a, b = getattr(cfg, name), getattr(ref, name)
        if a != b:
            differ += 1
            numeric = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (a, b))
            spread += abs(math.log2(a) - math.log2(b)) if numeric else 1.0
    return differ, spread


def _sortable(value) -> Tuple[int, object]:
    return (0, value) if isinstance(value, int) and not isinstance(value, bool) else (1, str(value))


def candidates(spec: KernelSpec) -> List[GemvConfig]:
    """Every candidate of the spec's GEMV space in a deterministic order: the default config first
    (even where it falls outside the pruned space: it is the baseline), then the others by
    distance from it (number of knobs changed, then log2 distance, then knob values)."""
    fmt = _check_gemv(spec)
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
