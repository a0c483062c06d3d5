"""What the qcompile kernels are timed against, on the same layer and (where possible) the same
weights: cuBLAS fp16 through ``F.linear`` on the decoded fp16 weight, and torch's int4 kernel
(``torch._weight_int4pack_mm``, tinygemm) on the same 4-bit codes and group scales.

Every method's weights live in ``RotatingWeights``: distinct copies that together exceed the L2
cache, so each timed launch reads its weights from HBM, as a real model's layers do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch

from ..formats import Format, QuantizedWeight
from ..formats import get as get_format
from .timing import rotation_copies

INT4PACK_INNER_K_TILES = 8
INT4PACK_GROUPS = (32, 64, 128, 256)  # group sizes tinygemm supports


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class RotatingWeights:
    """Distinct copies of one method's weight tensors, together at least 2x the L2 size.
    ``weights[i]`` is copy ``i % count``."""

    def __init__(self, tensors: Sequence[torch.Tensor], l2_bytes: int):
        tensors = tuple(tensors)
        self.bytes_per_copy = tensor_bytes(tensors)
        self.count = rotation_copies(self.bytes_per_copy, l2_bytes)
        self.copies: List[Tuple[torch.Tensor, ...]] = [tensors]
        self.copies += [tuple(t.clone() for t in tensors) for _ in range(self.count - 1)]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, ...]:
        return self.copies[i % self.count]


@dataclass
class TimedMethod:
    """One way to compute a layer, ready to time: ``launch(i)`` runs it on weight copy i."""

    name: str
    launch: Callable[[int], object]
    weights: RotatingWeights


def qcompile_method(kernel, X: torch.Tensor, weights: RotatingWeights, Y: torch.Tensor) -> TimedMethod:
    """A compiled qcompile kernel: kernel(X, *packed tensors in tensor_specs order, Y)."""
    return TimedMethod("qcompile", lambda i: kernel(X, *weights[i], Y), weights)


def split_method(launches: Sequence[Tuple[object, torch.Tensor, torch.Tensor]], weights: RotatingWeights) -> TimedMethod:
    """Several launches of compiled kernels over row blocks of one batch (the runtime's bucket plan):
    ``launches`` = (kernel, X block, Y block); every launch reads weight copy i."""
    def launch(i):
        for kernel, xb, yb in launches:
            kernel(xb, *weights[i], yb)
    return TimedMethod("qcompile_split", launch, weights)


def decode_cublas_method(decode_kernel, X: torch.Tensor, weights: RotatingWeights, W: torch.Tensor) -> TimedMethod:
    """The large-M route: the decode-only kernel writes the fp16 weight into ``W`` [N, K], then
    ``F.linear`` (cuBLAS) multiplies."""
    linear = torch.nn.functional.linear

    def launch(i):
        decode_kernel(*weights[i], W)
        return linear(X, W)
    return TimedMethod("qcompile_decode_cublas", launch, weights)


def decode_only_method(decode_kernel, weights: RotatingWeights, W: torch.Tensor) -> TimedMethod:
    """The decode-only kernel alone (its share of the large-M route)."""
    return TimedMethod("qcompile_decode", lambda i: decode_kernel(*weights[i], W), weights)


def cublas_fp16_method(X: torch.Tensor, weights: RotatingWeights) -> TimedMethod:
    """torch fp16 ``F.linear`` (cuBLAS) on copies of the decoded weight ([N, K])."""
    linear = torch.nn.functional.linear
    return TimedMethod("cublas_fp16", lambda i: linear(X, weights[i][0]), weights)


# --- torch int4 (tinygemm) --------------------------------------------------------------------

def int4_codes_and_scales(fmt: Format, qw: QuantizedWeight, w16: torch.Tensor):
    """(codes uint8 [N, K] in 0..15, scales [N, K/group], group, same_weights).

    For a 4-bit group-wise format these are the qcompile weight's own codes and scales
    (w = (u - 8) * scale), so both kernels compute the same function. Any other format is
    re-quantized from its decoded fp16 weight with int4-g128 (same layer, different weights)."""
    if getattr(fmt, "bits", None) == 4 and hasattr(fmt, "unpack") and fmt.group in INT4PACK_GROUPS:
        codes = fmt.unpack(qw.tensors["qweight"]).to(torch.uint8)
        return codes, qw.tensors["scales"], fmt.group, True
    int4 = get_format("int4-g128")
    q = int4.quantize(w16.to(torch.float32))
    return int4.unpack(q.tensors["qweight"]).to(torch.uint8), q.tensors["scales"], int4.group, False


def pack_torch_int4(codes: torch.Tensor, scales: torch.Tensor, group: int):
    """torch's int4 layout: two codes per byte (even column in the high nibble), tiled by
    ``_convert_weight_to_int4pack``; scales_and_zeros bf16 [K/group, N, 2] with zero 0, since
    tinygemm decodes w = (u - 8) * scale + zero."""
    nibbles = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
    packed = torch._convert_weight_to_int4pack(nibbles, INT4PACK_INNER_K_TILES)
    scales = scales.to(torch.float32)
    scales_and_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=2)  # [N, K/g, 2]
    return packed, scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)


def torch_int4_mm(x_bf16: torch.Tensor, packed: torch.Tensor, group: int,
                  scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return torch._weight_int4pack_mm(x_bf16, packed, group, scales_and_zeros)


@dataclass
class TorchInt4Weights:
    weights: RotatingWeights  # (packed, scales_and_zeros) copies
    group: int
    same_weights: bool         # the very codes and scales of the qcompile weight


def prepare_torch_int4(fmt: Format, qw: QuantizedWeight, w16: torch.Tensor, l2_bytes: int) -> TorchInt4Weights:
    """Pack the layer for torch's int4 kernel. Raises whatever torch raises where it does not run."""
    codes, scales, group, same = int4_codes_and_scales(fmt, qw, w16)
    packed, scales_and_zeros = pack_torch_int4(codes, scales, group)
    del codes
    return TorchInt4Weights(RotatingWeights((packed, scales_and_zeros), l2_bytes), group, same)


def torch_int4_method(X: torch.Tensor, int4: TorchInt4Weights) -> TimedMethod:
    """torch's int4 kernel; it takes bf16 activations (converted once, outside the timing)."""
    x_bf16 = X.to(torch.bfloat16)
    group, weights = int4.group, int4.weights
    return TimedMethod("torch_int4", lambda i: torch_int4_mm(x_bf16, weights[i][0], group, weights[i][1]),
                       weights)
