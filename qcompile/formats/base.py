"""The Format protocol, the QuantizedWeight container and the format registry.

A format owns everything about its bits: parameters, quantization, packing, the torch reference
decode, the TIR decode expression used by every kernel, and the number of bits per weight.
Kernels only ever call ``tir_decode``; they never re-derive a layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from ..errors import QCompileError


@dataclass
class QuantizedWeight:
    """Packed tensors of one quantized [N, K] (out, in) weight plus JSON-able metadata."""

    format: str
    shape: Tuple[int, int]
    tensors: Dict[str, torch.Tensor]
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Measured from the stored tensors: every stored bit divided by N*K."""
        n, k = self.shape
        bits = sum(t.numel() * t.element_size() * 8 for t in self.tensors.values())
        return bits / float(n * k)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.format, self.shape,
                               {k: v.to(device) for k, v in self.tensors.items()}, dict(self.meta))


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one packed tensor, as the kernels and checkpoints see it."""

    shape: Tuple[int, ...]
    dtype: str  # TVM / numpy dtype name: "int32", "float16", ...

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"int32": torch.int32, "float16": torch.float16, "int16": torch.int16,
                "uint8": torch.uint8, "int64": torch.int64, "float32": torch.float32}[self.dtype]


class Format:
    """Base class of a weight format. Subclasses set ``name`` and implement the abstract methods."""

    name: str = ""

    # --- shapes -----------------------------------------------------------------------------
    def check_shape(self, n: int, k: int) -> None:
        """Raise QCompileError when an [n, k] weight cannot be stored in this format."""
        raise NotImplementedError

    def tensor_specs(self, n: int, k: int) -> Dict[str, TensorSpec]:
        """The packed tensors (name -> spec), in the order the kernels take them."""
        raise NotImplementedError

    # --- quantize / decode (torch reference) ---------------------------------------------------
    def quantize(self, W: torch.Tensor, hessian: Optional[torch.Tensor] = None, seed: int = 0,
                 scale: Optional[float] = None) -> QuantizedWeight:
        raise NotImplementedError

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """Torch reference decode -> float32 [N, K]."""
        raise NotImplementedError

    def decode_fp16(self, qw: QuantizedWeight) -> torch.Tensor:
        """The exact fp16 values the kernels multiply with (bit-exact to ``tir_decode``)."""
        raise NotImplementedError

    # --- TIR ----------------------------------------------------------------------------------
    # The decode unit: how many consecutive input columns one small packed fragment (e.g. one
    # int32 word) decodes into. Kernels decode a unit at a time and may replace that decode by the
    # format's intrinsic (decode_intrin) on targets that have one.
    decode_unit: int = 8

    def tir_decode_unit(self, bufs: Mapping[str, object], n, c, j):
        """TIR expression (float16) of element j of decode unit c of row n (column c*unit + j)."""
        raise NotImplementedError

    def tir_decode(self, bufs: Mapping[str, object], n, k):
        """TIR expression (float16) of the decoded weight at (n, k), reading te tensors ``bufs``."""
        return self.tir_decode_unit(bufs, n, k // self.decode_unit, k % self.decode_unit)

    def decode_intrin(self, target_kind: str):
        """(TensorIntrin name, CUDA source to inject) of a hand-written decode of one unit for
        ``target_kind``, or None when the plain TIR expression is used."""
        return None

    def bits_per_weight(self, n: int, k: int) -> float:
        specs = self.tensor_specs(n, k)
        bits = 0
        for s in specs.values():
            numel = 1
            for d in s.shape:
                numel *= d
            bits += numel * torch.empty((), dtype=s.torch_dtype).element_size() * 8
        return bits / float(n * k)

    def weight_bytes(self, n: int, k: int) -> int:
        """Bytes of packed weight data a kernel must read for one [n, k] layer."""
        return int(round(self.bits_per_weight(n, k) * n * k / 8))

    def check_qweight(self, qw: QuantizedWeight) -> None:
        """Raise QCompileError if ``qw`` does not have exactly the tensors this format expects."""
        if qw.format != self.name:
            raise QCompileError(f"weight is in format {qw.format!r}, not {self.name!r}")
        n, k = qw.shape
        specs = self.tensor_specs(n, k)
        if set(qw.tensors) != set(specs):
            raise QCompileError(f"{self.name} weight needs tensors {sorted(specs)}, got {sorted(qw.tensors)}")
        for name, spec in specs.items():
            t = qw.tensors[name]
            if tuple(t.shape) != spec.shape or t.dtype != spec.torch_dtype:
                raise QCompileError(
                    f"{self.name} tensor {name!r} must be {spec.dtype}{list(spec.shape)}, "
                    f"got {str(t.dtype).replace('torch.', '')}{list(t.shape)}")


_REGISTRY: Dict[str, Callable[[], Format]] = {}
_INSTANCES: Dict[str, Format] = {}


def register(name: str, factory: Callable[[], Format]) -> None:
    _REGISTRY[name] = factory


def names():
    return sorted(_REGISTRY)


def get(name: str) -> Format:
    if isinstance(name, Format):
        return name
    if name not in _REGISTRY:
        raise QCompileError(f"unknown format {name!r}; choose one of: {', '.join(names())}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]
