"""QuantLinear: an nn.Module that runs a layer's compiled decode + matmul kernels on torch tensors.

The call goes through the torch custom op ``qcompile::quant_linear`` (with a fake implementation),
so models using it work under torch.compile and CUDA-graph capture. A custom op can only take
tensors and plain values, so loaded kernel modules live in a process-wide registry and the op
receives an int handle to one of them.

Kernel calling convention (qcompile.kernels.compute): ``f(X fp16[bucket, K], *packed tensors in
format.tensor_specs order, Y fp16[bucket, N])``; torch tensors go in directly (DLPack, zero-copy),
and tvm-ffi launches CUDA kernels on torch's current stream.

Large batches: a module built with a decode route for a format (``decode_min_m``, format -> M) holds
a decode-only kernel per layer shape (qcompile.kernels.decode.DecodeSpec); from that M on the op
decodes the weight into an fp16 scratch tensor (N x K x 2 bytes, from torch's caching allocator)
and multiplies it with ``F.linear`` (cuBLAS) in one launch for all M rows, instead of bucket-sized
launches of the fused kernels.

RHT weights: when the module also holds the Hadamard transform kernels (qcompile.kernels.hadamard,
``f(X fp16[bucket, n], S fp16[n], HK fp32[K_h, K_h], Y fp16[bucket, n])``) for the layer's sizes,
the op ``qcompile::quant_linear_rht`` runs input RHT, matmul and output RHT per row block in one
call. Modules without them (artifacts built before qcompile compiled the RHT) run the transforms
in torch around ``qcompile::quant_linear``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import QCompileError
from ..formats import QuantizedWeight
from ..formats import get as get_format
from ..kernels.decode import DecodeSpec
from ..kernels.hadamard import RhtSpec
from ..kernels.library import DEFAULT_BUCKETS, KernelSpec
from ..quant.hadamard import hadamard_factor
from .dispatch import check_buckets, plan_rows


# --- registry of loaded kernel modules ----------------------------------------------------------
@dataclass
class KernelModule:
    """A loaded TVM module, the M buckets compiled into it, the device its kernels run on, and the M
    from which each format takes the decode + cuBLAS route (formats not in ``decode_min_m``: never)."""

    module: object
    buckets: Tuple[int, ...]
    device_type: str  # "cuda" or "cpu"
    decode_min_m: Dict[str, int] = field(default_factory=dict)
    _decode: Dict[Tuple[str, int, int], object] = field(default_factory=dict)
    _kernels: Dict[Tuple[str, int, int], Dict[int, object]] = field(default_factory=dict)
    _rht: Dict[Tuple[str, int], Optional[Dict[int, object]]] = field(default_factory=dict)

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

    def decode_kernel(self, fmt: str, n: int, k: int):
        """The compiled decode-only kernel of the (format, N, K) layer (QCompileError when missing)."""
        key = (fmt, n, k)
        found = self._decode.get(key)
        if found is None:
            name = DecodeSpec(fmt, n, k).name
            if not self.module.implements_function(name):
                raise QCompileError(f"kernel {name} is not in the loaded module; the artifact does not match its "
                                    f"model (rebuild it with qcompile build)")
            found = self._decode[key] = self.module[name]
        return found

    def decodes(self, fmt: str, m: int) -> bool:
        """True when a batch of ``m`` rows of format ``fmt`` takes the decode + cuBLAS route."""
        threshold = self.decode_min_m.get(fmt)
        return threshold is not None and m >= threshold

    def rht_kernels(self, side: str, n: int) -> Optional[Dict[int, object]]:
        """bucket -> compiled RHT kernel of (side, size n), or None when the module lacks any of them."""
        key = (side, n)
        if key not in self._rht:
            names = {m: RhtSpec(side, n, m).name for m in self.buckets}
            found = all(self.module.implements_function(name) for name in names.values())
            self._rht[key] = {m: self.module[name] for m, name in names.items()} if found else None
        return self._rht[key]

    def has_rht(self, n: int, k: int) -> bool:
        """True when the module holds the RHT kernels of an N x K layer (input side K, output side N)."""
        return self.rht_kernels("input", k) is not None and self.rht_kernels("output", n) is not None


_MODULES: Dict[int, KernelModule] = {}
_HANDLES_BY_ID: Dict[int, int] = {}
_REGISTRY_LOCK = threading.Lock()


def module_device_type(module) -> str:
    """'cuda' when the module carries CUDA kernels, else 'cpu' (an llvm module)."""
    kinds = {m.kind for m in getattr(module, "imports", [])}
    return "cuda" if "cuda" in kinds else "cpu"


def check_decode_min_m(decode_min_m: Optional[Mapping[str, int]]) -> Dict[str, int]:
    """{format: M >= 1}; ValueError (one line) otherwise."""
    out = {}
    for fmt, m in dict(decode_min_m or {}).items():
        if not isinstance(fmt, str) or isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"decode_min_m maps format names to batch sizes >= 1, got {fmt!r}: {m!r}")
        out[fmt] = m
    return out


def register_kernel_module(module, buckets: Sequence[int] = DEFAULT_BUCKETS,
                           device_type: Optional[str] = None,
                           decode_min_m: Optional[Mapping[str, int]] = None) -> int:
    """Register a module returned by qcompile.runtime.module.load_kernels; return its handle.
    ``decode_min_m``: format -> the M from which its layers run decode + cuBLAS (the module must
    hold their DecodeSpec kernels); None or {} = the fused kernels at every M. Registering the same
    module object again returns the same handle."""
    buckets = check_buckets(buckets)
    decode_min_m = check_decode_min_m(decode_min_m)
    with _REGISTRY_LOCK:
        handle = _HANDLES_BY_ID.get(id(module))
        if handle is not None and _MODULES[handle].module is module:
            if _MODULES[handle].buckets != buckets:
                raise ValueError(f"module already registered with buckets {_MODULES[handle].buckets}")
            if _MODULES[handle].decode_min_m != decode_min_m:
                raise ValueError(f"module already registered with decode_min_m {_MODULES[handle].decode_min_m}")
            return handle
        handle = len(_MODULES) + 1
        _MODULES[handle] = KernelModule(module, buckets, device_type or module_device_type(module), decode_min_m)
        _HANDLES_BY_ID[id(module)] = handle  # modules stay registered (and alive) for the process
        return handle


def kernel_module(handle: int) -> KernelModule:
    try:
        return _MODULES[handle]
    except KeyError:
        raise QCompileError(f"no kernel module is registered under handle {handle}; load the artifact "
                            f"in this process (qcompile.load) before running the model") from None


# --- the custom ops --------------------------------------------------------------------------------
def _checked_entry(handle: int, x: torch.Tensor, op: str) -> KernelModule:
    entry = kernel_module(handle)
    if x.device.type != entry.device_type:
        raise QCompileError(f"the kernels were compiled for {entry.device_type} but the input is on "
                            f"{x.device}; move the model to {entry.device_type}")
    if x.dtype != torch.float16 or x.dim() != 2:
        raise ValueError(f"{op} takes fp16 [M, K] input, got {x.dtype} {list(x.shape)}")
    return entry


def _run_row_blocks(x: torch.Tensor, n: int, buckets: Sequence[int],
                    launch: Callable[[int, torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """Y fp16[M, n] from contiguous X fp16[M, K], one ``launch(bucket, X block, Y block)`` per row
    block of plan_rows; both blocks have exactly ``bucket`` contiguous rows."""
    m, k = x.shape
    y = torch.empty((m, n), dtype=torch.float16, device=x.device)
    for start, used, bucket in plan_rows(m, buckets):
        end = start + used
        if used == bucket:  # a full block: contiguous row slices, no copy
            launch(bucket, x[start:end], y[start:end])
        else:  # pad the rows with zeros into a small scratch block; rows are independent, the pad is discarded
            x_pad = torch.zeros((bucket, k), dtype=torch.float16, device=x.device)
            x_pad[:used].copy_(x[start:end])
            y_pad = torch.empty((bucket, n), dtype=torch.float16, device=x.device)
            launch(bucket, x_pad, y_pad)
            y[start:end].copy_(y_pad[:used])
    return y


def _decode_matmul(entry: KernelModule, x: torch.Tensor, packed: List[torch.Tensor], fmt: str, n: int) -> torch.Tensor:
    """X @ decode(W)^T for a large batch: the module's decode kernel writes W fp16[n, K] into a
    scratch tensor, F.linear (cuBLAS on CUDA) multiplies all M rows at once."""
    w = torch.empty((n, x.shape[1]), dtype=torch.float16, device=x.device)
    entry.decode_kernel(fmt, n, x.shape[1])(*packed, w)
    return torch.nn.functional.linear(x, w)


@torch.library.custom_op("qcompile::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, packed: List[torch.Tensor], handle: int, fmt: str, n: int) -> torch.Tensor:
    """Y fp16[M, n] = X fp16[M, K] @ decode(W)^T, with W's packed tensors in the format's order.
    Kernels are the module's KernelSpec(fmt, n, K, bucket) functions; M is served by plan_rows."""
    entry = _checked_entry(handle, x, "quant_linear")
    x = x.contiguous()
    if entry.decodes(fmt, x.shape[0]):
        return _decode_matmul(entry, x, packed, fmt, n)
    kernels = entry.kernels(fmt, n, x.shape[1])

    def launch(bucket, xb, yb):
        kernels[bucket](xb, *packed, yb)

    return _run_row_blocks(x, n, entry.buckets, launch)


@quant_linear.register_fake
def _quant_linear_fake(x, packed, handle, fmt, n):
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("qcompile::quant_linear_rht", mutates_args=())
def quant_linear_rht(x: torch.Tensor, packed: List[torch.Tensor], su: torch.Tensor, sv: torch.Tensor,
                     hk_in: torch.Tensor, hk_out: torch.Tensor, handle: int, fmt: str, n: int) -> torch.Tensor:
    """Y fp16[M, n] = SV ⊙ hadU(hadUt(SU ⊙ X) @ decode(W)^T) for an RHT weight, all three steps in
    the module's compiled kernels: per row block of plan_rows (padded rows are zeros), the input
    RHT kernel RhtSpec("input", K, bucket), the matmul kernel, then RhtSpec("output", n, bucket).
    su fp16[K], sv fp16[n]; hk_in / hk_out: fp32 hadamard_factor(K)[1] / hadamard_factor(n)[1],
    both untransposed ([[1.]] where K_h = 1)."""
    entry = _checked_entry(handle, x, "quant_linear_rht")
    x = x.contiguous()
    k = x.shape[1]
    kernels = entry.kernels(fmt, n, k)
    rht_in, rht_out = entry.rht_kernels("input", k), entry.rht_kernels("output", n)
    if rht_in is None or rht_out is None:
        raise QCompileError(f"the loaded module has no RHT kernels for a {n}x{k} layer; the artifact does not "
                            f"match its model (rebuild it with qcompile build)")
    if entry.decodes(fmt, x.shape[0]):  # RHTs per row block, one decode + cuBLAS for all rows between
        xr = _run_row_blocks(x, k, entry.buckets, lambda b, xb, yb: rht_in[b](xb, su, hk_in, yb))
        yr = _decode_matmul(entry, xr, packed, fmt, n)
        return _run_row_blocks(yr, n, entry.buckets, lambda b, xb, yb: rht_out[b](xb, sv, hk_out, yb))
    scratch: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # per bucket: X' and Y' blocks

    def launch(bucket, xb, yb):
        if bucket not in scratch:
            scratch[bucket] = (torch.empty((bucket, k), dtype=torch.float16, device=x.device),
                               torch.empty((bucket, n), dtype=torch.float16, device=x.device))
        xr, yr = scratch[bucket]
        rht_in[bucket](xb, su, hk_in, xr)
        kernels[bucket](xr, *packed, yr)
        rht_out[bucket](yr, sv, hk_out, yb)

    return _run_row_blocks(x, n, entry.buckets, launch)


@quant_linear_rht.register_fake
def _quant_linear_rht_fake(x, packed, su, sv, hk_in, hk_out, handle, fmt, n):
    return x.new_empty((x.shape[0], n))


# --- the RHT around the kernels ---------------------------------------------------------------------------
def _hadamard(x: torch.Tensor, hk: Optional[torch.Tensor]) -> torch.Tensor:
    """U·x over the last dim of float32 x, with U = (H_K ⊗ H_2^p)/√n and ``hk`` the (possibly
    transposed) K×K factor, None for K = 1 (the torch fallback of the RHT kernels): the same
    butterflies and order as qcompile.quant.hadamard.had_transform, but with H_K passed in (a
    module buffer) so that torch.compile(fullgraph=True) traces it without reading the packaged
    tables."""
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
    and SV [N] (buffers "SU", "SV"); forward then computes y = SV ⊙ hadU(kernel(hadUt(SU ⊙ x))):
    with the module's compiled RHT kernels when it has them (``compiled_rht``, the custom op
    qcompile::quant_linear_rht), else with the transforms in float32 torch code around
    qcompile::quant_linear. Either way torch.compile(fullgraph=True) traces the whole forward.
    """

    def __init__(self, qweight: QuantizedWeight, kernels, bias: Optional[torch.Tensor] = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, compiled_rht: Optional[bool] = None,
                 decode_min_m: Optional[Mapping[str, int]] = None):
        """kernels: a handle from register_kernel_module, or a module from load_kernels (registered
        here with ``buckets`` and ``decode_min_m``). compiled_rht (RHT weights only): None = use the module's RHT kernels
        when it has them, else the torch transforms; False = always the torch transforms; True =
        the module's kernels (QCompileError when it lacks them)."""
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
            # the K_h factors of U_K (input side) and U_N (output side), fp32 and untransposed as the
            # RHT kernels take them ([[1.]] for K_h = 1; the torch path transposes hk_in itself);
            # not in the state dict, rebuilt from the shapes
            hk_in = hadamard_factor(self.in_features)[1].to(torch.float32).contiguous()
            hk_out = hadamard_factor(self.out_features)[1].to(torch.float32).contiguous()
        self.register_buffer("_hk_in", hk_in, persistent=False)
        self.register_buffer("_hk_out", hk_out, persistent=False)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape [{self.out_features}], got {list(bias.shape)}")
            self.register_buffer("bias", bias.detach().to(torch.float16).contiguous())
        else:
            self.bias = None
        if not isinstance(kernels, int):
            kernels = register_kernel_module(kernels, buckets, decode_min_m=decode_min_m)
        self.kernel_handle = kernels
        self.meta = dict(qweight.meta)
        # Fallback: modules built before the RHT was compiled (older artifacts) lack the RHT kernels;
        # their layers keep the torch transforms. Fixed here, so forward's branch is static for torch.compile.
        self.compiled_rht = False
        if self.rht and compiled_rht is not False:
            has = kernel_module(self.kernel_handle).has_rht(self.out_features, self.in_features)
            if compiled_rht and not has:
                raise QCompileError(f"the kernel module has no RHT kernels for a {self.out_features}x"
                                    f"{self.in_features} layer; rebuild the artifact with qcompile build")
            self.compiled_rht = has

    def packed(self) -> List[torch.Tensor]:
        return [getattr(self, name) for name in self.tensor_names]

    def quantized_weight(self) -> QuantizedWeight:
        tensors = {name: getattr(self, name) for name in self.tensor_names}
        if self.rht:
            tensors.update(SU=self.SU, SV=self.SV)
        return QuantizedWeight(self.format, (self.out_features, self.in_features), tensors, dict(self.meta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.product(self.flat_input(x)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def flat_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] as [M, in_features] (ValueError for another feature count)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got {list(x.shape)}")
        return x.reshape(-1, self.in_features)

    def product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] @ W^T as [M, N], without the bias: fp16 from the kernels, float32 where the
        torch RHT fallback applies the output transform."""
        if self.compiled_rht:
            # input RHT, matmul and output RHT in the module's kernels (.to: no-ops unless the module
            # was cast, e.g. by .half(); the ±1 tables and the fp16 signs survive casts exactly)
            return torch.ops.qcompile.quant_linear_rht(
                x2.to(torch.float16), self.packed(), self.SU.to(torch.float16), self.SV.to(torch.float16),
                self._hk_in.to(torch.float32), self._hk_out.to(torch.float32), self.kernel_handle, self.format,
                self.out_features)
        if self.rht:
            # torch fallback: x' = hadUt(SU ⊙ x) in float32 (qcompile.quant.hadamard.rht_input)
            x2 = _hadamard(x2.to(torch.float32) * self.SU.to(torch.float32), self._hk_t(self._hk_in, True))
        y = torch.ops.qcompile.quant_linear(x2.to(torch.float16), self.packed(), self.kernel_handle, self.format,
                                            self.out_features)
        if self.rht:
            # y = SV ⊙ hadU(y') (qcompile.quant.hadamard.rht_output)
            y = _hadamard(y.to(torch.float32), self._hk_t(self._hk_out, False)) * self.SV.to(torch.float32)
        return y

    @staticmethod
    def _hk_t(hk: torch.Tensor, transpose: bool) -> Optional[torch.Tensor]:
        """The K_h factor as _hadamard takes it: transposed for hadUt, None for K_h = 1."""
        if hk.shape[0] == 1:
            return None
        return hk.T if transpose else hk

    def extra_repr(self) -> str:
        rht = f"rht={self.rht}" + (f", compiled_rht={self.compiled_rht}" if self.rht else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"{rht}, bias={self.bias is not None}")
