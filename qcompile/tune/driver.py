"""The tuning loop: for each kernel, build and measure candidates of its search space and keep every
result in the records (``qcompile tune``). A kernel is tuned in the family that runs its bucket
(``library.kernel_family``): the CUDA-core GEMV (``GemvConfig``), the mma.sync kernel (``MmaConfig``)
or the WMMA tensor-core kernel (``TensorCoreConfig``); GEMM buckets (above 16; int4/E8P above
64) have no space yet and are skipped with a log line.

Per kernel (format, N, K, M): the default config is measured first (it is the baseline and what
``qcompile build`` uses without a record), then candidates in the order of the space
(``space.candidates``: nearest the default first) or, once enough measurements exist, in the order
an XGBoost cost model predicts (``cost_model``; every EXPLORE_EVERY-th pick still follows the
space, so a wrong model cannot hide a region). Each result is saved at once, atomically, so an
interrupted run loses at most the candidate in flight, and a second run measures only what is
missing: candidates already measured (or that failed) are never tried again, and the budget
counts them.

The measuring is pluggable: ``measure(spec, config, kernel) -> µs`` gets the compiled kernel
(a TVM function taking X, the packed tensors, Y; the same for every family);
``qcompile.tune.measure.CudaMeasure`` times it on the local GPU. It raises ``CandidateError`` for a
candidate that runs but is wrong or cannot launch (recorded as failed); any other exception stops
the run (a broken GPU must not mark every later candidate as failed).

TVM's meta-schedule (``tvm.s_tir.meta_schedule``) could drive the same knobs as a ScheduleFn
space with its own XGBoost model and database; it is not used here because the knob space is
explicit and small, the records must be readable and keyed by GPU and versions, and its generic
database/builders added little but overhead for a space of a few hundred configs.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Union

from ..errors import QCompileError
from ..kernels.library import SCHEDULE_LOCK, KernelConfig, KernelSpec, family_options, scheduled_func
from ..kernels.pipeline import compile_module
from ..kernels.target import TargetInfo, parse_target
from . import space
from .cost_model import CostModel, training_set
from .records import TuningEntry, TuningRecords, records_gpu

# candidates per kernel, counting those measured by earlier runs. 16: on the H100 (2dbd483's records,
# 54 int4/E8P/HYB kernels of 9 shapes, budgets 12-16) the best came within the first 8 candidates in 47
# and within 8 % of the final best in all; a Llama-2-7B/70B shape took 42-50 s (int4, e8p-2) and
# 82-118 s (qtip-hyb-2) at buckets 1, 4, 16 with the M=1 alternative, under the 3-minute target
DEFAULT_BUDGET = 16
ALTERNATIVE_BUDGET_DIVISOR = 4  # an alternative family's budget: the kernel's over this
REFIT_EVERY = 4          # new measurements between cost-model refits
EXPLORE_EVERY = 4        # every n-th pick follows the space order instead of the model
ORDERS = ("model", "space")

Measure = Callable[[KernelSpec, KernelConfig, object], float]


class CandidateError(Exception):
    """Raised by a measure function when the candidate itself is at fault (wrong result, launch
    failure); the driver records it as failed and goes on."""


@dataclass
class TuneResult:
    """What happened to one kernel in a tuning run."""

    spec: KernelSpec
    entry: Optional[TuningEntry]   # None when the kernel was skipped
    measured_now: int = 0          # candidates tried in this run (measured or failed)
    skipped: Optional[str] = None  # why the kernel was not tuned

    @property
    def best(self):
        return None if self.entry is None else self.entry.best()


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type, first line and (for long TVM errors) last line."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text += " ... " + lines[-1]
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def default_jobs() -> int:
    """Compile threads of ``qcompile tune`` by default: the CPUs this process may run on, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not on every platform)
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def compile_candidate(spec: KernelSpec, target: TargetInfo, config: KernelConfig):
    """The kernel of ``spec`` scheduled with ``config``, compiled alone: a callable TVM function
    ``f(X, *packed tensors, Y)``. Safe to call from several threads at once."""
    import tvm

    with SCHEDULE_LOCK:
        func = scheduled_func(spec, target, config)
    executable = compile_module(tvm.IRModule({spec.name: func}), target.tvm_target())
    return executable[spec.name]


def _shape(spec: KernelSpec) -> str:
    return f"N={spec.n} K={spec.k} M={spec.m}"


class _Picker:
    """Which untried candidate comes next: the default, then the space order or the model's."""

    def __init__(self, spec: KernelSpec, order: str, entry: TuningEntry, neighbours: List[TuningEntry]):
        self.spec, self.order, self.entry, self.neighbours = spec, order, entry, neighbours
        self.model = CostModel()
        self.fitted_at = -1  # measurements the model last saw
        self.picks = 0

    def _refit(self) -> None:
        seen = sum(len(e.measured_us) for e in self.neighbours) + len(self.entry.measured_us)
        if self.fitted_at >= 0 and seen - self.fitted_at < REFIT_EVERY:
            return
        xs, ys = training_set(list(self.neighbours) + [self.entry])
        self.model.fit(xs, ys)
        self.fitted_at = seen

    def next(self, todo: List[KernelConfig]) -> KernelConfig:
        self.picks += 1
        if self.entry.default in todo:
            return self.entry.default
        if self.order == "model" and self.picks % EXPLORE_EVERY != 0:
            self._refit()
            if self.model.fitted:
                return self.model.rank(self.spec, todo)[0]
        return todo[0]


def tune(specs: Iterable[KernelSpec], target: Union[str, TargetInfo], measure: Measure,
         records_dir: Union[str, Path], budget: int = DEFAULT_BUDGET, time_budget_s: Optional[float] = None,
         gpu: Optional[str] = None, order: str = "model", log: Optional[Callable[[str], None]] = print,
         clock: Callable[[], float] = time.monotonic, jobs: int = 1,
         alternatives: bool = False) -> List[TuneResult]:
    """Tune every GEMV and low-batch tensor-core kernel of ``specs`` for ``target`` on ``gpu``
    (default: the GPU the target names, else the local one) and keep the results in
    ``records_dir/<gpu>/<format>.json``.

    ``budget``: candidates per kernel in all (earlier runs' count); ``time_budget_s``: wall time per
    kernel, checked between candidates; ``order``: "model" (XGBoost-ordered after the first
    measurements) or "space" (the space's own order); ``jobs``: compile threads. With jobs > 1 the
    candidates after the default are picked ``jobs`` at a time (the model ranks a batch at once),
    compiled in parallel, then measured one by one on the GPU (no compile runs during a measurement);
    jobs=1 compiles each just before it is measured (in the pool's one thread). ``alternatives``: also tune the other families
    that can run a bucket (``library.family_options``: mma.sync at M=1, the GEMV or WMMA kernel at
    QTIP 1MAD/3INST's M = 2..7), each with a quarter of ``budget``, into their own entries; build
    then takes an alternative where it measured faster than the default family's best
    (``TuningRecords.config_for``). One TuneResult per tuned (spec, family). GEMM kernels (``kernel_family``) are skipped with
    a log line: their search space is still to come. Returns one TuneResult per distinct spec."""
    say = log or (lambda text: None)
    target = parse_target(target) if isinstance(target, str) else target
    if target.kind != "cuda":
        raise QCompileError(f"tuning is for CUDA targets; {target.name} has no kernel knobs to tune")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise QCompileError(f"the tuning budget must be a positive number of candidates, got {budget!r}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise QCompileError(f"the time budget must be positive seconds, got {time_budget_s!r}")
    if order not in ORDERS:
        raise QCompileError(f"unknown candidate order {order!r}; use {' or '.join(ORDERS)}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise QCompileError(f"the number of compile jobs must be a positive int, got {jobs!r}")
    gpu = gpu or records_gpu(target)
    if gpu is None:
        raise QCompileError(f"cannot tell which GPU the records of target {target.name} are for; "
                            f"name it (e.g. --target h100) or run on the GPU itself")
    records = TuningRecords(records_dir)
    results: List[TuneResult] = []
    seen = set()
    for spec in specs:
        if spec in seen:
            continue
        seen.add(spec)
        if space.spec_family(spec) not in space.FAMILIES:
            reason = "GEMM kernels have no tuning space yet; build uses the default"
            say(f"skip {_shape(spec)}: {reason}")
            results.append(TuneResult(spec, None, skipped=reason))
            continue
        families = [f for f in family_options(spec.format, spec.m) if f in space.FAMILIES]
        for i, family in enumerate(families[:len(families) if alternatives else 1]):
            # an alternative family gets a quarter of the budget: its default and nearest neighbours
            family_budget = budget if i == 0 else max(1, budget // ALTERNATIVE_BUDGET_DIVISOR)
            pool = ThreadPoolExecutor(jobs)
            try:
                results.append(_tune_one(spec, target, measure, records, gpu, family_budget, time_budget_s, order,
                                         say, clock, pool, jobs, None if i == 0 else family))
            finally:  # an interrupt or a stopped run drops the compiles not yet started
                pool.shutdown(wait=True, cancel_futures=True)
    return results


def _tune_one(spec, target, measure, records: TuningRecords, gpu, budget, time_budget_s, order, say,
              clock, pool, jobs, family=None) -> TuneResult:
    candidates = space.candidates(spec, family)  # QCompileError for a shape the format cannot take
    stored = records.entry(spec, gpu, space.family_of(candidates[0]))
    entry = records.open_entry(spec, gpu, candidates[0])
    path = records.path(gpu, spec.format)
    planned = min(budget, len(candidates))
    todo = [c for c in candidates if not entry.tried(c)]
    label = _label(spec, entry)
    if stored is not None and stored.tried_count and not entry.tried_count:
        why = "kernels the library has since changed" if stored.code else "kernels it did not record"
        say(f"{label}: the {stored.tried_count} stored measurements are of {why}; measuring anew")
    if entry.tried_count:
        say(f"{label}: {entry.tried_count} candidates already tried ({path})")
    # the cost model learns from the other shapes' entries of the same versions and family
    neighbours = [e for key, e in records.entries(gpu, spec.format).items()
                  if key != entry.key and key[3:] == entry.key[3:]] if order == "model" else []
    picker = _Picker(spec, order, entry, neighbours)
    start = clock()
    measured_now = 0
    out_of_time = False
    while todo and entry.tried_count < planned and not out_of_time:
        # a batch: the default alone (it is the baseline, and its compile registers the intrinsics),
        # then up to `jobs` candidates compiled together
        size = 1 if entry.default in todo else min(jobs, planned - entry.tried_count, len(todo))
        batch = []
        for _ in range(size):
            batch.append(picker.next(todo))
            todo.remove(batch[-1])
        compiled: List[Future] = [pool.submit(compile_candidate, spec, target, cfg) for cfg in batch]
        # measure with no compile running: a thread holding the GIL between an event's record and the
        # graph replay would land in that candidate's time
        wait(compiled)
        for i, cfg in enumerate(batch):
            if time_budget_s is not None and clock() - start >= time_budget_s:
                say(f"{label}: time budget of {time_budget_s:g} s reached")
                for fut in compiled[i:]:
                    fut.cancel()
                out_of_time = True
                break
            key = space.config_key(cfg)
            try:
                kernel = compiled[i].result()
            except Exception as err:  # a config TVM cannot schedule or compile: never retried
                entry.add_failure(cfg, f"compile: {one_line(err)}")
            else:
                try:
                    us = measure(spec, cfg, kernel)
                except CandidateError as err:
                    entry.add_failure(cfg, f"measure: {err}")
                except Exception as err:
                    for fut in compiled[i + 1:]:
                        fut.cancel()
                    raise QCompileError(f"measuring {label} {key} failed ({one_line(err)}); the results so "
                                        f"far are in {path}; fix the cause and run again to resume") from None
                else:
                    if isinstance(us, bool) or not isinstance(us, (int, float)) or not math.isfinite(us) or us <= 0:
                        raise QCompileError(f"the measure function returned {us!r} for {label} {key}; "
                                            f"it must return a positive time in microseconds")
                    entry.add_measurement(cfg, float(us))
            records.save(entry)
            measured_now += 1
            say(_progress(spec, entry, cfg, planned))
    best = entry.best()
    if best is None:
        say(f"{label}: no candidate ran; build keeps the default config")
    else:
        default_us = entry.default_us
        gain = f", default {default_us:.2f} us ({default_us / best[1]:.2f}x)" if default_us else ""
        say(f"{label}: best {space.config_key(best[0])} {best[1]:.2f} us{gain}; "
            f"{entry.tried_count} of {len(candidates)} candidates tried")
    return TuneResult(spec, entry, measured_now)


def _label(spec: KernelSpec, entry: TuningEntry) -> str:
    """``N=.. K=.. M=.. gemv`` / ``... tensorcore``: the kernel and the family tuned."""
    return f"{_shape(spec)} {entry.kernel}"


def _progress(spec: KernelSpec, entry: TuningEntry, cfg: KernelConfig, planned: int) -> str:
    key = space.config_key(cfg)
    head = f"[{entry.tried_count}/{planned}] {_label(spec, entry)} {key}"
    if key in entry.failed:
        return f"{head} failed: {entry.failed[key]}"
    best = entry.best()
    return f"{head} {entry.measured_us[key]:.2f} us (best {best[1]:.2f} us)"
