"""QuantLinear: an nn.Module that runs a layer's compiled decode + matmul kernels on torch tensors.

The call goes through the torch custom op ``qcompile::quant_linear`` (with a fake implementation),
so models using it work under torch.compile and CUDA-graph capture. A custom op can only take
tensors and plain values, so loaded kernel modules live in a process-wide registry and the op
receives an int handle to one of them.

Kernel calling convention (qcompile.kernels.compute): ``f(X fp16[bucket, K], *packed tensors in
format.tensor_specs order, Y fp16[bucket, N])``; torch tensors go in directly (DLPack, zero-copy),
and tvm-ffi launches CUDA kernels on torch's current stream.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import QCompileError
from ..formats import QuantizedWeight
from ..formats import get as get_format
from ..kernels.library import DEFAULT_BUCKETS, KernelSpec
from ..quant.hadamard import hadamard_factor
from .dispatch import check_buckets, plan_rows


# --- registry of loaded kernel modules ----------------------------------------------------------
@dataclass
class KernelModule:
    """A loaded TVM module, the M buckets compiled into it, and the device its kernels run on."""

    module: object
    buckets: Tuple[int, ...]
    device_type: str  # "cuda" or "cpu"
    _kernels: Dict[Tuple[str, int, int], Dict[int, object]] = field(default_factory=dict)

    def kernels(self, fmt: str, n: int, k: int) -> Dict[int, object]:
        """bucket -> compiled function of the (format, N, K) layer (looked up once, then cached)."""
        key = (fmt, n, k)
        found = self._kernels.get(key)
        if found is None:
            found = {}
            for m in self.buckets:
                name = KernelSpec(fmt, n, k, m).name
                if not self.module.implements_function(name):
                    raise QCompileError(
                        f"kernel {name} is not in the loaded module; the artifact does not match its "
                        f"model (rebuild it with qcompile build)")
                found[m] = self.module[name]
            self._kernels[key] = found
        return found


_MODULES: Dict[int, KernelModule] = {}
_HANDLES_BY_ID: Dict[int, int] = {}
_REGISTRY_LOCK = threading.Lock()


def module_device_type(module) -> str:
    """'cuda' when the module carries CUDA kernels, else 'cpu' (an llvm module)."""
    kinds = {m.kind for m in getattr(module, "imports", [])}
    return "cuda" if "cuda" in kinds else "cpu"


def register_kernel_module(module, buckets: Sequence[int] = DEFAULT_BUCKETS,
                           device_type: Optional[str] = None) -> int:
    """Register a module returned by qcompile.runtime.module.load_kernels; return its handle.
    Registering the same module object again returns the same handle."""
    buckets = check_buckets(buckets)
    with _REGISTRY_LOCK:
        handle = _HANDLES_BY_ID.get(id(module))
        if handle is not None and _MODULES[handle].module is module:
            if _MODULES[handle].buckets != buckets:
                raise ValueError(f"module already registered with buckets {_MODULES[handle].buckets}")
            return handle
        handle = len(_MODULES) + 1
        _MODULES[handle] = KernelModule(module, buckets, device_type or module_device_type(module))
        _HANDLES_BY_ID[id(module)] = handle  # modules stay registered (and alive) for the process
        return handle


def kernel_module(handle: int) -> KernelModule:
    try:
        return _MODULES[handle]
    except KeyError:
        raise QCompileError(f"no kernel module is registered under handle {handle}; load the artifact "
                            f"in this process (qcompile.load) before running the model") from None


# --- the custom op --------------------------------------------------------------------------------
@torch.library.custom_op("qcompile::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, packed: List[torch.Tensor], handle: int, fmt: str, n: int) -> torch.Tensor:
    """Y fp16[M, n] = X fp16[M, K] @ decode(W)^T, with W's packed tensors in the format's order.
    Kernels are the module's KernelSpec(fmt, n, K, bucket) functions; M is served by plan_rows."""
    entry = kernel_module(handle)
    if x.device.type != entry.device_type:
        raise QCompileError(f"the kernels were compiled for {entry.device_type} but the input is on "
                            f"{x.device}; move the model to {entry.device_type}")
    if x.dtype != torch.float16 or x.dim() != 2:
        raise ValueError(f"quant_linear takes fp16 [M, K] input, got {x.dtype} {list(x.shape)}")
    x = x.contiguous()
    m, k = x.shape
    kernels = entry.kernels(fmt, n, k)
    y = torch.empty((m, n), dtype=torch.float16, device=x.device)
    for start, used, bucket in plan_rows(m, entry.buckets):
        end = start + used
        if used == bucket:  # a full block: contiguous row slices, no copy
            kernels[bucket](x[start:end], *packed, y[start:end])
        else:  # pad the rows into a small scratch block; rows are independent, the pad is discarded
            x_pad = torch.zeros((bucket, k), dtype=torch.float16, device=x.device)
            x_pad[:used].copy_(x[start:end])
            y_pad = torch.empty((bucket, n), dtype=torch.float16, device=x.device)
            kernels[bucket](x_pad, *packed, y_pad)
            y[start:end].copy_(y_pad[:used])
    return y


@quant_linear.register_fake
def _quant_linear_fake(x, packed, handle, fmt, n):
    return x.new_empty((x.shape[0], n))


# --- the RHT around the kernels ---------------------------------------------------------------------------
def _hadamard(x: torch.Tensor, hk: Optional[torch.Tensor]) -> torch.Tensor:
    """U·x over the last dim of float32 x, with U = (H_K ⊗ H_2^p)/√n and ``hk`` the (possibly
    transposed) K×K factor, None for K = 1: the same butterflies and order as
    qcompile.quant.hadamard.had_transform, but with H_K passed in (a module buffer) so that
    torch.compile(fullgraph=True) traces it without reading the packaged tables."""
    n = x.shape[-1]
    k = 1 if hk is None else hk.shape[0]
    p2 = n // k
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    rows = y.shape[0]
    half = 1
    while half < p2:
        y = y.reshape(rows, n // (2 * half), 2, half)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        half *= 2
    y = y.reshape(rows, k, p2)
    if hk is not None:
        y = torch.matmul(hk.to(y.dtype), y)
    return y.reshape(*lead, n) * (1.0 / (n ** 0.5))


# --- the module -------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """Drop-in for nn.Linear over a QuantizedWeight: buffers are the packed tensors (named as the
    format names them, so the state dict keys are ``<path>.<tensor name>``) and an optional bias.

    A weight quantized with the randomized Hadamard transform also carries the sign vectors SU [K]
    and SV [N] (buffers "SU", "SV"); forward then computes y = SV ⊙ hadU(kernel(hadUt(SU ⊙ x))) with
    the transforms in float32 torch code around the custom op, so torch.compile traces them too.
    """

    def __init__(self, qweight: QuantizedWeight, kernels, bias: Optional[torch.Tensor] = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS):
        """kernels: a handle from register_kernel_module, or a module from load_kernels (registered
        here with ``buckets``)."""
        super().__init__()
        fmt = get_format(qweight.format)
        fmt.check_qweight(qweight)
        self.format = fmt.name
        self.out_features, self.in_features = (int(d) for d in qweight.shape)
        self.tensor_names = tuple(fmt.tensor_specs(self.out_features, self.in_features))
        for name in self.tensor_names:
            if name == "bias" or hasattr(self, name):
                raise ValueError(f"format {fmt.name} names a tensor {name!r}, which clashes with a module attribute")
            self.register_buffer(name, qweight.tensors[name].contiguous())
        self.rht = qweight.rht
        hk_in = hk_out = None
        if self.rht:
            for name in fmt.aux_specs(self.out_features, self.in_features, True):
                self.register_buffer(name, qweight.tensors[name].contiguous())
            # the K_h factors of U_K (input side, transposed: hadUt) and U_N (output side: hadU);
            # not in the state dict, rebuilt from the shapes
            k_in, h = hadamard_factor(self.in_features)
            hk_in = h.T.contiguous() if k_in > 1 else None
            k_out, h = hadamard_factor(self.out_features)
            hk_out = h.contiguous() if k_out > 1 else None
        self.register_buffer("_hk_in", hk_in, persistent=False)
        self.register_buffer("_hk_out", hk_out, persistent=False)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape [{self.out_features}], got {list(bias.shape)}")
            self.register_buffer("bias", bias.detach().to(torch.float16).contiguous())
        else:
            self.bias = None
        self.kernel_handle = kernels if isinstance(kernels, int) else register_kernel_module(kernels, buckets)
        self.meta = dict(qweight.meta)

    def packed(self) -> List[torch.Tensor]:
        return [getattr(self, name) for name in self.tensor_names]

    def quantized_weight(self) -> QuantizedWeight:
        tensors = {name: getattr(self, name) for name in self.tensor_names}
        if self.rht:
            tensors.update(SU=self.SU, SV=self.SV)
        return QuantizedWeight(self.format, (self.out_features, self.in_features), tensors, dict(self.meta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got {list(x.shape)}")
        x2 = x.reshape(-1, self.in_features)
        if self.rht:
            # x' = hadUt(SU ⊙ x) in float32 (qcompile.quant.hadamard.rht_input)
            # TODO: a compiled TVM FWHT kernel (fused with the sign flips) instead of torch code
            x2 = _hadamard(x2.to(torch.float32) * self.SU.to(torch.float32), self._hk_in)
        y = torch.ops.qcompile.quant_linear(x2.to(torch.float16), self.packed(), self.kernel_handle, self.format,
                                            self.out_features)
        if self.rht:
            # y = SV ⊙ hadU(y') (qcompile.quant.hadamard.rht_output)
            y = _hadamard(y.to(torch.float32), self._hk_out) * self.SV.to(torch.float32)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"rht={self.rht}, bias={self.bias is not None}")
