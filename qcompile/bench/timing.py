"""Timing GPU work the same way for every method: warm-up, many launches, CUDA events, median.

Two modes, the same for all methods of one run:
  graph  (default) a CUDA graph holds a loop of launches; each replay is timed with events and
         divided by its launch count. Host launch overhead (Python, FFI, dispatcher) is not timed,
         which matters for kernels of a few microseconds.
  events one event pair around every launch, with the GPU held busy first so that the host can
         queue all launches ahead of it (again keeping host overhead out of the numbers).
Weights are rotated through distinct copies larger than the L2 cache: ``launch(i)`` must use
copy ``i % copies``; a graph holds a whole number of rotations so every replay starts cold.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, List

DEFAULT_L2_BYTES = 50 * 1024 * 1024  # H100's L2, assumed where the driver does not report it
L2_MULTIPLE = 2.0                     # rotate through at least this many L2s of distinct copies
MIN_LAUNCHES_PER_GRAPH = 10
MIN_SAMPLES = 20                      # timed replays (graph) or launches (events) at least
SLEEP_CLOCK_HZ = 2.0e9                # converts a wanted GPU hold time to torch.cuda._sleep cycles
MAX_HOLD_S = 0.2


@dataclass(frozen=True)
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    launches: int   # timed launches in all
    mode: str       # "graph" or "events"

    def as_dict(self):
        return {"median_us": self.median_us, "p10_us": self.p10_us, "p90_us": self.p90_us,
                "launches": self.launches, "mode": self.mode}


def l2_cache_bytes(device=None) -> int:
    """The GPU's L2 size in bytes as torch reports it, else DEFAULT_L2_BYTES."""
    try:
        import torch

        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    except Exception:  # no GPU, or a torch without the field: assume an H100
        size = 0
    return size if size > 0 else DEFAULT_L2_BYTES


def rotation_copies(bytes_per_copy: int, l2_bytes: int, l2_multiple: float = L2_MULTIPLE,
                    min_copies: int = 2) -> int:
    """Distinct copies of one method's weights so that together they hold >= l2_multiple x L2.

    At least two, so that even a weight larger than the L2 never follows itself (the tail of
    one launch would still be cached at the start of the next)."""
    if bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy must be positive, got {bytes_per_copy}")
    return max(min_copies, math.ceil(l2_multiple * l2_bytes / bytes_per_copy))


def launches_per_graph(period: int, minimum: int = MIN_LAUNCHES_PER_GRAPH) -> int:
    """A whole number of rotations of ``period`` copies, at least ``minimum`` launches."""
    period = max(1, int(period))
    return period * math.ceil(minimum / period)


def percentile(sorted_values: List[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in [0, 1])."""
    idx = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[idx]


def summarize(samples_us: List[float], launches: int, mode: str) -> Timing:
    s = sorted(samples_us)
    return Timing(percentile(s, 0.5), percentile(s, 0.1), percentile(s, 0.9), launches, mode)


def _ffi_stream(torch_context=None):
    """Make TVM kernels launch on torch's current stream (the capture stream inside a graph)."""
    try:
        import tvm_ffi

        return tvm_ffi.use_torch_stream(torch_context)
    except (ImportError, AttributeError):
        return torch_context if torch_context is not None else contextlib.nullcontext()


def _time_graph(launch: Callable[[int], object], iters: int, warmup: int, period: int) -> Timing:
    import torch

    for i in range(warmup):
        launch(i)
    torch.cuda.synchronize()
    per_graph = launches_per_graph(period)
    graph = torch.cuda.CUDAGraph()
    with _ffi_stream(torch.cuda.graph(graph)):
        for i in range(per_graph):
            launch(i)
    torch.cuda.synchronize()
    replays = max(MIN_SAMPLES, math.ceil(iters / per_graph))
    graph.replay()  # first replay uploads the graph
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for r in range(replays):
        starts[r].record()
        graph.replay()
        ends[r].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e3 / per_graph for s, e in zip(starts, ends)]
    del graph
    return summarize(samples, replays * per_graph, "graph")


def _hold_gpu(seconds: float) -> None:
    """Keep the GPU busy so the host can queue launches ahead of it (a private torch helper:
    where it is missing, host overhead may show in event timings of very short kernels)."""
    import torch

    try:
        torch.cuda._sleep(int(min(seconds, MAX_HOLD_S) * SLEEP_CLOCK_HZ))
    except (AttributeError, RuntimeError):
        pass


def _time_events(launch: Callable[[int], object], iters: int, warmup: int) -> Timing:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup):
        launch(i)
    host_per_launch = (time.perf_counter() - t0) / max(1, warmup)
    torch.cuda.synchronize()
    iters = max(MIN_SAMPLES, iters)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    _hold_gpu(2.0 * iters * host_per_launch + 1e-3)
    for i in range(iters):
        starts[i].record()
        launch(i)
        ends[i].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return summarize(samples, iters, "events")


def time_cuda(launch: Callable[[int], object], iters: int = 200, warmup: int = 10,
              mode: str = "graph", period: int = 1) -> Timing:
    """Median time of one ``launch(i)`` in microseconds; ``period`` is the number of weight
    copies ``launch`` cycles through. Raises whatever the launch or a graph capture raises."""
    if mode not in ("graph", "events"):
        raise ValueError(f"unknown timing mode {mode!r}; use graph or events")
    with _ffi_stream():
        if mode == "graph":
            return _time_graph(launch, iters, warmup, period)
        return _time_events(launch, iters, warmup)


def copy_bandwidth_GBps(nbytes: int, iters: int = 20, device="cuda") -> float:
    """Device-to-device copy bandwidth of one large copy, counting bytes read plus written."""
    import torch

    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = _time_events(lambda i: dst.copy_(src), iters=iters, warmup=3)
    del src, dst
    torch.cuda.empty_cache()
    return 2.0 * nbytes / (timing.median_us * 1e-6) / 1e9


def copy_test_bytes(l2_bytes: int, free_bytes: int) -> int:
    """A copy far larger than the L2 (8x, at least 1 GiB) that still fits in a quarter of the
    free memory (source and destination both)."""
    want = max(8 * l2_bytes, 1 << 30)
    return int(max(l2_bytes * 4, min(want, free_bytes // 4)))
