"""Measuring a tuning candidate on the local CUDA GPU (the ``measure`` of ``qcompile.tune.driver``).

For each layer (format, N, K) one weight is made as ``qcompile bench`` makes it
(``harness.bench_weight``: a quantized Gaussian matrix for group-wise formats, the format's valid
random codes for the RHT formats, whose quantizers would take minutes on a large layer) and copied
until the copies hold more than twice the L2 cache (``RotatingWeights``), so every timed launch
reads its weights from HBM as a real model's layers do. A candidate first runs once into a NaN-poisoned output, which must match the
float64 reference (X times the format's exact fp16 decode) to REL_ERR_MAX; then it is timed with
``qcompile.bench.timing.time_cuda`` (CUDA graphs of launches, CUDA events, median), falling back
to per-launch events where graph capture fails. This module needs torch with CUDA; nothing here
runs on a machine without a GPU.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from ..errors import QCompileError
from ..kernels.library import KernelConfig, KernelSpec
from .driver import CandidateError, one_line

REL_ERR_MAX = 1e-2  # fp16 kernel vs float64 reference (as qcompile bench warns)


def require_cuda():
    """torch, when it sees a CUDA GPU; else a one-line QCompileError."""
    import torch

    if not torch.cuda.is_available():
        raise QCompileError(f"qcompile tune measures candidates on a CUDA GPU; torch {torch.__version__} sees "
                            f"none here (run it on the GPU the records are for)")
    return torch


class CudaMeasure:
    """``measure(spec, config, kernel) -> median µs`` on the local GPU. Keeps the weights of one
    layer at a time (the driver goes kernel by kernel, and the M buckets of a layer share them).
    Generic over the kernel family: every family's kernel is ``f(X, *packed tensors, Y)`` with X
    [M, K] and Y [M, N] (the tensor-core kernel pads M to its tile inside), and ``config`` is only
    the candidate's name here."""

    def __init__(self, iters: int = 200, warmup: int = 10, timing_mode: str = "graph", seed: int = 0,
                 rel_err_max: float = REL_ERR_MAX):
        self.torch = require_cuda()
        self.iters, self.warmup, self.timing_mode = iters, warmup, timing_mode
        self.seed, self.rel_err_max = seed, rel_err_max
        self.device = self.torch.device("cuda")
        self._layer_key: Optional[Tuple[str, int, int]] = None
        self._layer = None   # (RotatingWeights of the kernel tensors, decoded weight float64 [K, N])
        self._inputs: Dict[int, tuple] = {}  # m -> (X, reference, Y) for the current layer

    def _prepare(self, spec: KernelSpec):
        """(rotating weights, X, reference output, Y) of ``spec``, made once per layer and M."""
        torch = self.torch
        from ..bench.baselines import RotatingWeights
        from ..bench.harness import bench_weight
        from ..bench.timing import l2_cache_bytes
        from ..formats import get as get_format

        layer_key = (spec.format, spec.n, spec.k)
        if layer_key != self._layer_key:
            self._layer = self._inputs = None
            self._layer_key = None
            torch.cuda.empty_cache()
            fmt = get_format(spec.format)
            torch.manual_seed(self.seed)
            qw = bench_weight(fmt, spec.n, spec.k, self.device)
            w64_t = fmt.decode_fp16(qw).to(torch.float64).T.contiguous()
            tensors = [qw.tensors[name] for name in fmt.tensor_specs(spec.n, spec.k)]
            self._layer = (RotatingWeights(tensors, l2_cache_bytes(self.device)), w64_t)
            self._inputs = {}
            self._layer_key = layer_key
        weights, w64_t = self._layer
        if spec.m not in self._inputs:
            gen = torch.Generator(device=self.device).manual_seed(self.seed + spec.m)
            X = torch.randn(spec.m, spec.k, device=self.device, generator=gen).to(torch.float16)
            ref = X.to(torch.float64) @ w64_t
            Y = torch.empty(spec.m, spec.n, device=self.device, dtype=torch.float16)
            self._inputs[spec.m] = (X, ref, Y)
        X, ref, Y = self._inputs[spec.m]
        return weights, X, ref, Y

    def __call__(self, spec: KernelSpec, config: KernelConfig, kernel) -> float:
        from ..bench.timing import time_cuda

        torch = self.torch
        weights, X, ref, Y = self._prepare(spec)
        torch.cuda.synchronize()  # an earlier failure surfaces here, not as this candidate's fault
        try:
            Y.fill_(float("nan"))
            kernel(X, *weights[0], Y)
            torch.cuda.synchronize()
        except Exception as err:
            raise CandidateError(f"launch failed: {one_line(err)}") from None
        out = Y.to(torch.float64)
        if not torch.isfinite(out).all():
            raise CandidateError("output has NaN/Inf (elements left unwritten?)")
        rel_err = float((out - ref).norm() / ref.norm())
        if rel_err > self.rel_err_max:
            raise CandidateError(f"wrong result: relative error {rel_err:.2e} > {self.rel_err_max:g}")

        def launch(i):
            kernel(X, *weights[i], Y)

        modes = [self.timing_mode] + (["events"] if self.timing_mode == "graph" else [])
        for mode in modes:
            try:
                return time_cuda(launch, self.iters, self.warmup, mode, period=weights.count).median_us
            except Exception as err:
                if mode == modes[-1]:
                    raise CandidateError(f"timing failed: {one_line(err)}") from None
        raise AssertionError("unreachable")
