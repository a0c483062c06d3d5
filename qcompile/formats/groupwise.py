"""Group-wise symmetric integer formats (int4 with one fp16 scale per group of input columns).

Layout (owned here, read by every kernel through ``tir_decode``):
  qweight int32 [N, K/8]: eight 4-bit codes u = q + 8 per word. Element j of a word (column 8w+j)
      sits at bit 16*(j % 2) + 4*(j // 2): the pair (2i, 2i+1) lands in the low and high half of
      the word at the same nibble, so one mask puts two codes into the mantissas of a half2
      (the LOP3 trick of BitBLAS/Marlin) and one shift moves to the next pair.
  scales  fp16 [N, K/g]: one scale per g consecutive input columns.
Decode: w = (u - 8) * scale, computed in fp16 (exact subtraction, one rounding in the multiply).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from ..errors import QCompileError
from .base import Format, QuantizedWeight, TensorSpec, register


class GroupwiseIntFormat(Format):
    def __init__(self, bits: int, group: int):
        if bits != 4:
            raise ValueError("only 4-bit group-wise formats are implemented")
        self.bits = bits
        self.group = group
        self.per_word = 32 // bits
        self.offset = 1 << (bits - 1)  # stored code u = q + offset
        self.qmax = (1 << (bits - 1)) - 1
        self.name = f"int{bits}-g{group}"

    # --- shapes -----------------------------------------------------------------------------
    def check_shape(self, n: int, k: int) -> None:
        if n <= 0 or k <= 0:
            raise QCompileError(f"{self.name}: weight shape {n}x{k} is empty")
        if k % self.group:
            raise QCompileError(
                f"{self.name}: in_features={k} is not a multiple of the group size {self.group}; "
                f"pad the layer or pick a format with a smaller group")

    def tensor_specs(self, n: int, k: int) -> Dict[str, TensorSpec]:
        self.check_shape(n, k)
        return {"qweight": TensorSpec((n, k // self.per_word), "int32"),
                "scales": TensorSpec((n, k // self.group), "float16")}

    def shift_of(self, j):
        """Bit position of element j (0..per_word-1) inside its int32 word."""
        return (j % 2) * 16 + (j // 2) * self.bits

    # --- quantize / pack ----------------------------------------------------------------------
    def quantize(self, W: torch.Tensor, hessian: Optional[torch.Tensor] = None, seed: int = 0,
                 scale: Optional[float] = None, rht: bool = False, ldlq: Optional[bool] = None,
                 sigma: float = 1e-2) -> QuantizedWeight:
        """Symmetric int4 with one fp16 scale per group of ``group`` input columns.

        Round to nearest (RTN) by default. With ``rht`` the weight is first rotated into a random
        Hadamard basis (SU/SV stored beside the codes). With a Hessian (and ``ldlq`` not False) the
        codes come from LDLQ with g = 1, i.e. GPTQ/OPTQ: columns are rounded last to first with
        linear feedback of the errors so far through the LDL factor of damp(H, sigma). The group
        scales are fixed up front from the (rotated) weight, exactly as RTN computes them, so LDLQ
        only changes the codes. ``meta["proxy_loss"]`` (given a Hessian) is the relative proxy loss
        tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of the stored weight under the undamped H.
        """
        W, H, aux, use_ldlq = self.prepare_input(W, hessian, seed, rht, ldlq)
        n, k = W.shape
        g = W.reshape(n, k // self.group, self.group)
        if scale is None:
            s = g.abs().amax(dim=2) / self.qmax  # no clipping: +-amax is representable
        else:
            if not scale > 0:
                raise QCompileError(f"{self.name}: scale must be a positive target RMS in code units, got {scale}")
            s = g.pow(2).mean(dim=2).sqrt() / float(scale)
        s16 = s.to(torch.float16)
        s16 = torch.where(s16 == 0, torch.ones_like(s16), s16)  # all-zero group: any scale works
        meta = {"bits": self.bits, "group": self.group}
        if use_ldlq:
            q = self._ldlq_codes(W, H, s16, sigma)
        else:
            q = torch.round(g / s16.to(torch.float32).unsqueeze(2)).clamp(-self.offset, self.qmax).reshape(n, k)
        u = (q + self.offset).to(torch.int64)
        qw = QuantizedWeight(self.name, (n, k), {"qweight": self.pack(u), "scales": s16.contiguous(), **aux}, meta)
        if rht:
            meta["rht"] = True
        if H is not None:
            meta["ldlq"] = use_ldlq
            meta["proxy_loss"] = self.relative_proxy_loss(W, self.decode_fp16(qw).to(torch.float32), H)
        return qw

    def _ldlq_codes(self, W: torch.Tensor, H: torch.Tensor, s16: torch.Tensor, sigma: float) -> torch.Tensor:
        """Integer codes q (float32 [N, K], in [-offset, qmax]) from BlockLDLQ with g = 1."""
        from ..quant.hessian import damp
        from ..quant.ldlq import block_ldlq

        n, k = W.shape
        scales = s16.to(torch.float32)
        codes = torch.empty(n, k, dtype=torch.float32, device=W.device)
        col = [k]

        def round_column(x: torch.Tensor):
            # block_ldlq rounds the columns from the last to the first, one per call (g = 1)
            col[0] -= 1
            c = col[0]
            s_col = s16[:, c // self.group]
            q = torch.round(x[:, 0] / scales[:, c // self.group]).clamp(-self.offset, self.qmax)
            codes[:, c] = q
            # what the kernels will multiply with: the fp16 product, so the feedback sees the true error
            return (q.to(torch.float16) * s_col).to(torch.float32).unsqueeze(1), c

        result = block_ldlq(W, damp(H, sigma).to(W.device), 1, round_column)
        if col[0] != 0 or result.states != list(range(k)):
            raise RuntimeError("block_ldlq did not visit the columns last to first, one at a time")
        return codes

    def pack(self, u: torch.Tensor) -> torch.Tensor:
        """Codes u (int, [N, K], 0..2^bits-1) -> int32 words [N, K/per_word] in this format's order."""
        n, k = u.shape
        u = u.to(torch.int64).reshape(n, k // self.per_word, self.per_word)
        word = torch.zeros(n, k // self.per_word, dtype=torch.int64, device=u.device)
        for j in range(self.per_word):
            word |= u[:, :, j] << self.shift_of(j)
        word = torch.where(word >= 2**31, word - 2**32, word)
        return word.to(torch.int32).contiguous()

    def unpack(self, words: torch.Tensor) -> torch.Tensor:
        """int32 words -> codes u (int64 [N, K])."""
        n, kw = words.shape
        w = words.to(torch.int64) & 0xFFFFFFFF
        cols = [(w >> self.shift_of(j)) & ((1 << self.bits) - 1) for j in range(self.per_word)]
        return torch.stack(cols, dim=2).reshape(n, kw * self.per_word)

    # --- torch reference decode ------------------------------------------------------------------
    def decode_fp16(self, qw: QuantizedWeight) -> torch.Tensor:
        self.check_qweight(qw)
        q = (self.unpack(qw.tensors["qweight"]) - self.offset).to(torch.float16)
        s = qw.tensors["scales"].repeat_interleave(self.group, dim=1)
        return q * s  # fp16 multiply: one rounding, as the kernels do

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """float32 [N, K] in the original basis: the fp16 decode, with the RHT undone if stored."""
        return self.undo_rht(qw, self.decode_fp16(qw).to(torch.float32))

    # --- TIR ------------------------------------------------------------------------------------
    @property
    def decode_unit(self) -> int:
        return self.per_word

    def tir_decode_unit(self, bufs: Mapping[str, object], n, c, j):
        from tvm import tirx

        B, S = bufs["qweight"], bufs["scales"]
        shift = (j % 2) * 16 + (j // 2) * self.bits
        code = tirx.bitwise_and(tirx.shift_right(B[n, c], shift), (1 << self.bits) - 1)
        # 0x6400 | u is the fp16 1024 + u (ulp 1 there), so subtracting 1024 + offset is exact:
        # the int->float conversion costs one LOP3 instead of an I2F.
        as_half = tirx.reinterpret("float16", tirx.Cast("uint16", tirx.bitwise_or(code, 0x6400)))
        q = as_half - tirx.const(1024 + self.offset, "float16")
        return q * S[n, c // (self.group // self.per_word)]

    streamed = ("qweight",)

    def random_weight(self, n: int, k: int, seed: int = 0, device=None) -> QuantizedWeight:
        """Random codes in every word and random scales in [-2, 2) (no RHT)."""
        self.check_shape(n, k)
        gen = torch.Generator().manual_seed(int(seed))
        words = torch.randint(-2**31, 2**31 - 1, (n, k // self.per_word), generator=gen, dtype=torch.int64)
        scales = (torch.rand(n, k // self.group, generator=gen) * 4 - 2).to(torch.float16)
        qw = QuantizedWeight(self.name, (n, k), {"qweight": words.to(torch.int32), "scales": scales})
        return qw.to(device) if device is not None else qw

    def unit_reads(self):
        # one int32 word and its group scale
        return {"qweight": ((1, 1), "int32", True), "scales": ((1, 1), "float16", False)}

    def decode_intrin(self, target_kind: str):
        if target_kind != "cuda" or self.bits != 4:
            return None
        from ..kernels.intrinsics import register_unit_decode

        name = register_unit_decode(self, "qc_decode_int4x8_f16", _CUDA_DECODE_INT4)
        return name, _CUDA_DECODE_INT4


# One int32 word -> 8 fp16 weights, two per instruction: LOP3 drops the pair (2i, 2i+1) of codes
# into the mantissas of half2(1024 + u); HSUB2 removes 1024 + 8 exactly and HMUL2 applies the
# scale with one rounding, bit-identical to the plain TIR decode.
_CUDA_DECODE_INT4 = r"""
#ifndef QC_DECODE_INT4X8_F16
#define QC_DECODE_INT4X8_F16
#include <cuda_fp16.h>  // injected ahead of TVM's own header
__device__ __forceinline__ int qc_decode_int4x8_f16(const int* __restrict__ q, const half* __restrict__ s,
                                                     half* __restrict__ w) {
  const unsigned word = *reinterpret_cast<const unsigned*>(q);
  const half2 scale = __half2half2(*s);
  const unsigned bias_bits = 0x64086408u;  // half2(1032, 1032)
  const half2 bias = *reinterpret_cast<const half2*>(&bias_bits);
  unsigned* out = reinterpret_cast<unsigned*>(w);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    unsigned h;
    asm volatile("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(h) : "r"(word >> (4 * i)), "n"(0x000F000F), "n"(0x64006400));
    half2 v = __hmul2(__hsub2(*reinterpret_cast<half2*>(&h), bias), scale);
    out[i] = *reinterpret_cast<unsigned*>(&v);
  }
  return 0;  // called as an expression statement by the generated code
}
#endif
"""


register("int4-g128", lambda: GroupwiseIntFormat(4, 128))
