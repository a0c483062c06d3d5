"""An XGBoost cost model that orders the untried candidates of a tuning run.

Features of a (kernel, config) pair: log2 of every integer knob of the config's family (bools as
0/1), log2 N, K and M, and derived quantities the schedule's speed depends on (GEMV: threads per
block, thread blocks, K steps per thread, outputs per block; tensor cores: threads, blocks, K
steps, decode units and WMMA products per thread or warp and step, shared-memory bytes). A model
only ever sees one family (the driver's neighbours are entries of the same family), so the
feature vectors of one fit have one length. The target is log(µs / the default config's µs of
the same kernel), so measurements of other shapes (same GPU, format and versions) teach the model
which knob changes help, not how large a layer is. Deterministic: one thread, fixed seed.

TVM's meta-schedule has its own XGBModel over generic loop features; our space is a handful of
named knobs, so a small regressor on the knobs themselves is enough and needs no TIR feature
extraction.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Sequence, Tuple

from ..formats import get as get_format
from ..kernels.library import MMA_FAMILY, TC_FAMILY, KernelConfig, KernelSpec
from ..kernels.tensorcore import FRAG
from .space import config_from_key, family_of, knob_names

MIN_TRAINING_POINTS = 8  # fewer measurements than this and the model orders nothing


def _log2(x: float) -> float:
    return math.log2(x) if x > 0 else -1.0


def features(spec: KernelSpec, cfg: KernelConfig) -> List[float]:
    """The model's input for one candidate of one kernel (either family)."""
    family = family_of(cfg)
    out = []
    for name in knob_names(family):
        value = getattr(cfg, name)
        if isinstance(value, bool):
            out.append(float(value))
        elif isinstance(value, int):
            out.append(_log2(value))
        else:  # a non-numeric knob: a stable number per value, enough for a tree to split on
            out.append(float(sum(map(ord, str(value))) % 997))
    unit = get_format(spec.format).decode_unit
    if family == TC_FAMILY:
        warps = cfg.warps_m * cfg.warps_n * cfg.warps_k
        return out + [_log2(spec.n), _log2(spec.k), _log2(spec.m),
                      _log2(32 * warps),                                                # threads per block
                      _log2(spec.n // cfg.n_tile * -(-spec.m // cfg.m_tile) or 1),      # thread blocks
                      _log2(spec.k // cfg.k_tile or 1),                                 # K steps
                      _log2(cfg.n_tile * cfg.k_tile // (unit * cfg.units * 32 * warps) or 1),  # unit groups/thread
                      _log2(cfg.m_tile * cfg.n_tile * cfg.k_tile // (FRAG ** 3 * warps) or 1),  # MMAs per warp
                      _log2(cfg.operand_bytes() + cfg.partial_bytes())]                 # shared memory
    if family == MMA_FAMILY:
        span = cfg.units * unit
        return out + [_log2(spec.n), _log2(spec.k), _log2(spec.m),
                      _log2(cfg.threads),                                               # threads per block
                      _log2(max(1, spec.n // (16 * cfg.tiles * cfg.warps_n))),          # thread blocks
                      _log2(max(1, spec.k // (4 * span * cfg.warps_k))),                # K blocks per warp
                      _log2(cfg.tiles * -(-spec.m // 8) * span // 4)]                   # mma per K block
    rows = getattr(cfg, "rows", 1) * getattr(cfg, "row_tile", 1)
    per_step = getattr(cfg, "threads_k", 1) * getattr(cfg, "chunks", 1)
    out += [_log2(spec.n), _log2(spec.k), _log2(spec.m),
            _log2(getattr(cfg, "rows", 1) * getattr(cfg, "threads_k", 1)),  # threads per block
            _log2(max(1, spec.n // rows)),                                 # thread blocks
            _log2(max(1, spec.k // unit // per_step)),                     # K steps per thread
            _log2(rows * spec.m)]                                          # outputs per block
    return out


def training_set(entries: Iterable) -> Tuple[List[List[float]], List[float]]:
    """(features, log time relative to the entry's baseline) of every measured candidate of the
    given TuningEntry objects. The baseline is the default config's time, else the fastest."""
    xs, ys = [], []
    for entry in entries:
        if not entry.measured_us:
            continue
        base = entry.default_us or min(entry.measured_us.values())
        spec = entry.spec
        for key, us in entry.measured_us.items():
            try:
                cfg = config_from_key(key, entry.kernel)
            except ValueError:  # a key of another space version: nothing to learn from it
                continue
            xs.append(features(spec, cfg))
            ys.append(math.log(us / base))
    return xs, ys


class CostModel:
    """Gradient-boosted trees predicting relative log time; lower is better."""

    def __init__(self, seed: int = 0, rounds: int = 60, max_depth: int = 4):
        self.seed, self.rounds, self.max_depth = seed, rounds, max_depth
        self._booster = None

    def fit(self, xs: Sequence[Sequence[float]], ys: Sequence[float]) -> bool:
        """Fit on the measurements; False (and no model) with fewer than MIN_TRAINING_POINTS."""
        if len(xs) < MIN_TRAINING_POINTS:
            self._booster = None
            return False
        import numpy as np
        import xgboost as xgb

        data = xgb.DMatrix(np.asarray(xs, dtype=np.float64), label=np.asarray(ys, dtype=np.float64))
        params = {"objective": "reg:squarederror", "max_depth": self.max_depth, "eta": 0.2,
                  "subsample": 1.0, "min_child_weight": 1.0, "seed": self.seed, "nthread": 1,
                  "tree_method": "exact", "verbosity": 0}
        self._booster = xgb.train(params, data, num_boost_round=self.rounds)
        return True

    @property
    def fitted(self) -> bool:
        return self._booster is not None

    def predict(self, xs: Sequence[Sequence[float]]) -> List[float]:
        import numpy as np
        import xgboost as xgb

        if self._booster is None:
            raise RuntimeError("the cost model is not fitted")
        if not xs:
            return []
        return [float(v) for v in self._booster.predict(xgb.DMatrix(np.asarray(xs, dtype=np.float64)))]

    def rank(self, spec: KernelSpec, configs: Sequence[KernelConfig]) -> List[KernelConfig]:
        """``configs`` fastest-predicted first; ties keep the given order."""
        scores = self.predict([features(spec, c) for c in configs])
        order = sorted(range(len(configs)), key=lambda i: (scores[i], i))
        return [configs[i] for i in order]
