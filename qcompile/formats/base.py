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

    @property
    def rht(self) -> bool:
        """True when the weight is stored in a randomized-Hadamard basis (it carries SU / SV)."""
        return any(name in self.tensors for name in RHT_TENSORS)

    def kernel_tensors(self) -> Dict[str, torch.Tensor]:
        """The tensors the compiled kernels take (everything but the RHT sign vectors)."""
        return {k: v for k, v in self.tensors.items() if k not in RHT_TENSORS}

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.format, self.shape,
                               {k: v.to(device) for k, v in self.tensors.items()}, dict(self.meta))


# Incoherence processing (qcompile.quant.hadamard) wraps any format: a weight quantized with rht=True
# stores W~ = U_N^T diag(SV) W diag(SU) U_K in the format's own tensors, plus the sign vectors
# SU (fp16 [K], input side) and SV (fp16 [N], output side). The kernels multiply with W~; the runtime
# applies x -> hadUt(SU * x) before and y -> SV * hadU(y) after them.
RHT_TENSORS = ("SU", "SV")


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
    # formats whose codebooks assume incoherent (Gaussian-like) weights quantize in the RHT basis
    # whatever the caller asks (E8P, the QTIP trellises); their checkpoints record rht=True
    always_rht: bool = False

    # --- shapes -----------------------------------------------------------------------------
    def check_shape(self, n: int, k: int) -> None:
        """Raise QCompileError when an [n, k] weight cannot be stored in this format."""
        raise NotImplementedError

    def tensor_specs(self, n: int, k: int) -> Dict[str, TensorSpec]:
        """The packed tensors (name -> spec), in the order the kernels take them."""
        raise NotImplementedError

    def aux_specs(self, n: int, k: int, rht: bool) -> Dict[str, TensorSpec]:
        """Tensors stored beside the kernel tensors but applied outside the kernels: the RHT sign
        vectors SU (fp16 [k]) and SV (fp16 [n]) when ``rht``, else none."""
        if not rht:
            return {}
        return {"SU": TensorSpec((k,), "float16"), "SV": TensorSpec((n,), "float16")}

    def stored_specs(self, n: int, k: int, rht: bool) -> Dict[str, TensorSpec]:
        """Every tensor a stored weight has: the kernel tensors, then the auxiliary ones."""
        return {**self.tensor_specs(n, k), **self.aux_specs(n, k, rht)}

    # --- quantize / decode (torch reference) ---------------------------------------------------
    def quantize(self, W: torch.Tensor, hessian: Optional[torch.Tensor] = None, seed: int = 0,
                 scale: Optional[float] = None, rht: bool = False, ldlq: Optional[bool] = None,
                 sigma: float = 1e-2) -> QuantizedWeight:
        """W float [N, K] (out, in) -> QuantizedWeight.

        ``hessian``: E[x xᵀ] of the layer's inputs [K, K] (raw; damped here with ``sigma``).
        ``rht``: quantize in a randomized Hadamard basis (signs drawn from ``seed``; stores SU/SV).
        ``ldlq``: Hessian-aware rounding (BlockLDLQ); None = on when a Hessian is given.
        ``scale``: target RMS in code units, None = the format default.
        """
        raise NotImplementedError

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """Torch reference decode -> float32 [N, K], in the original basis (RHT undone)."""
        return self.undo_rht(qw, self.decode_fp16(qw).to(torch.float32))

    def decode_fp16(self, qw: QuantizedWeight) -> torch.Tensor:
        """The exact fp16 values the kernels multiply with (bit-exact to ``tir_decode``); for an
        RHT weight these are in the Hadamard basis (see ``dequantize`` for the original one)."""
        raise NotImplementedError

    def random_weight(self, n: int, k: int, seed: int = 0, device=None) -> QuantizedWeight:
        """A valid stored weight of random codes (every packed word pattern the format allows), for
        kernel tests and benchmarks where quantizing a real matrix would only cost time."""
        raise NotImplementedError(f"{self.name} has no random_weight")

    def _random_rht(self, n: int, k: int, gen: torch.Generator, su: float = 1.0, sv: float = 1.0):
        """Random SU (±su, fp16 [k]) and SV (±sv, fp16 [n])."""
        signs = lambda size: (torch.randint(0, 2, (size,), generator=gen) * 2 - 1).to(torch.float32)  # noqa: E731
        return {"SU": (signs(k) * su).to(torch.float16), "SV": (signs(n) * sv).to(torch.float16)}

    # --- shared front end: incoherence processing, Hessian checks, proxy loss ----------------------
    def prepare_input(self, W: torch.Tensor, hessian: Optional[torch.Tensor], seed: int, rht: bool,
                      ldlq: Optional[bool]):
        """Validate W (and H), apply the RHT when asked. Returns (W_work float32 [N, K],
        H_work float64 [K, K] or None, aux tensors {"SU", "SV"} or {}, use_ldlq).

        W_work = rht_weight(W, SU, SV) and H_work = rht_hessian(H, SU) with SU = random_signs(K,
        sub-seed "SU" of ``seed``) and SV = random_signs(N, sub-seed "SV"); without RHT they are
        W and H. A K or N with no Hadamard construction raises the QCompileError of hadamard.py.
        """
        from ..quant.hessian import check_hessian

        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            shape = list(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
            raise QCompileError(f"{self.name}: weight must be 2-D [out, in], got shape {shape}")
        n, k = W.shape
        self.check_shape(n, k)
        if not W.dtype.is_floating_point:
            raise QCompileError(f"{self.name}: weight must be floating point, got {W.dtype}")
        W = W.detach().to(torch.float32)
        if not torch.isfinite(W).all():
            raise QCompileError(f"{self.name}: weight contains NaN or Inf; fix the model weights first")
        if ldlq is None:
            ldlq = hessian is not None
        if ldlq and hessian is None:
            raise QCompileError(f"{self.name}: LDLQ needs a Hessian; pass hessian=E[x xᵀ] of the layer inputs "
                                f"or quantize with ldlq=False (round to nearest)")
        H = None
        if hessian is not None:
            check_hessian(hessian, k)
            H = hessian.detach().to(W.device, torch.float64)
        aux: Dict[str, torch.Tensor] = {}
        if rht:
            from ..quant.hadamard import hadamard_factor, random_signs, rht_hessian, rht_weight

            for size, side in ((k, "in_features"), (n, "out_features")):
                try:
                    hadamard_factor(size)
                except QCompileError as err:
                    raise QCompileError(f"{self.name}: cannot apply the RHT to {side}={size}: {err}") from None
            SU = random_signs(k, subseed(seed, "SU"), device=W.device)
            SV = random_signs(n, subseed(seed, "SV"), device=W.device)
            W = rht_weight(W, SU, SV)
            if H is not None:
                H = rht_hessian(H, SU)
            aux = {"SU": SU.to(torch.float16), "SV": SV.to(torch.float16)}
        return W, H, aux, bool(ldlq)

    def undo_rht(self, qw: QuantizedWeight, W_work: torch.Tensor) -> torch.Tensor:
        """A weight in the stored (kernel) basis -> the original basis (float32)."""
        if not qw.rht:
            return W_work.to(torch.float32)
        from ..quant.hadamard import unrht_weight

        dev = W_work.device
        return unrht_weight(W_work.to(torch.float32), qw.tensors["SU"].to(dev, torch.float32),
                            qw.tensors["SV"].to(dev, torch.float32))

    @staticmethod
    def relative_proxy_loss(W_work: torch.Tensor, W_hat_work: torch.Tensor, H_work: torch.Tensor) -> float:
        """tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of the undamped Hessian. Computed in the RHT basis when the weight
        is RHT'd: with W̃, H̃ transformed by the same orthogonal maps the ratio equals the one in the
        original basis (up to float rounding), so no transform back is needed."""
        from ..quant.ldlq import proxy_loss

        # float32 keeps this a fast GEMM (float64 is slow on most GPUs); H is normalised first
        H = H_work / H_work.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
        return proxy_loss(W_work.to(torch.float32), W_hat_work.to(torch.float32), H.to(torch.float32))

    # --- TIR ----------------------------------------------------------------------------------
    # The decode unit: how many consecutive input columns one small packed fragment (e.g. one
    # int32 word) decodes into. Kernels decode a unit at a time and may replace that decode by the
    # format's intrinsic (decode_intrin) on targets that have one.
    decode_unit: int = 8

    def tir_decode_unit(self, bufs: Mapping[str, object], n, c, j):
        """TIR expression (float16) of element j of decode unit c of row n (column c*unit + j)."""
        raise NotImplementedError

    # Table gathers: a format whose decode looks words up in a table indexed by packed bits (E8P's
    # abs table) states the lookups as a separate stage, W_gather[n, c, g] = tir_gather(bufs, n, c, g)
    # for g < gather_count, which tir_decode_unit reads as bufs["gathered"][n, c, g]. Kernels then
    # place the gather as they like (registers; the table in global or shared memory) and a decode
    # intrinsic sees only register words (tensorize cannot match data-dependent indices).
    gather_count: int = 0

    def tir_gather(self, bufs: Mapping[str, object], n, c, g):
        """TIR expression of gathered word g of unit c of row n."""
        raise NotImplementedError

    # Derived tables: te stages computed from the kernel tensors once per kernel (per thread block on a
    # GPU), e.g. QTIP HYB's tlut repacked as one uint32 word per entry. Stage names start with
    # "W_table"; a stage named "W_table_lanes" holds one copy per warp lane (GemvConfig.lut_lanes).
    # tir_gather / tir_decode_unit read them from ``bufs`` by name when present, else inline them.
    def tir_tables(self, bufs: Mapping[str, object], lane_copies: int = 0,
                   signed: bool = False) -> Dict[str, object]:
        """{bufs name: te tensor} of the format's derived tables, computed from the te placeholders
        in ``bufs`` (default: none). ``lane_copies``: copies in a W_table_lanes stage (0: the
        format's default); ``signed``: the format's sign-folded table form, where it has one (QTIP
        HYB: 1024 entries, the sign bit part of the index)."""
        return {}

    # Stream slices: packed-word slices that several gathered words share (QTIP HYB: 4 per unit for 8
    # table words), as their own stage W_slice[n, c, g] = tir_slice(bufs, n, c, g) for g <
    # slice_count, which tir_gather reads as bufs["slices"] when present, so each is computed once.
    slice_count: int = 0

    def tir_slice(self, bufs: Mapping[str, object], n, c, g):
        """TIR expression of slice g of unit c of row n."""
        raise NotImplementedError

    def gathered(self, bufs: Mapping[str, object]):
        """bufs["gathered"] when a kernel computed the gather stage, else the gather inlined."""
        if "gathered" in bufs:
            return bufs["gathered"]
        fmt = self

        class _Inline:
            def __getitem__(self, idx):
                return fmt.tir_gather(bufs, *idx)

        return _Inline()

    def tir_decode(self, bufs: Mapping[str, object], n, k):
        """TIR expression (float16) of the decoded weight at (n, k), reading te tensors ``bufs``."""
        return self.tir_decode_unit(bufs, n, k // self.decode_unit, k % self.decode_unit)

    def decode_intrin(self, target_kind: str):
        """(TensorIntrin name, CUDA source to inject) of a hand-written decode of one unit for
        ``target_kind``, or None when the plain TIR expression is used."""
        return None

    # Kernel tensors read afresh for every unit (the packed words): schedules stage these in
    # registers with vector loads. The others (scales, tables) are read in place.
    streamed: Tuple[str, ...] = ()
    # GEMV granularity (rows, decode units): the block of a row tile whose packed words are one
    # contiguous region (a QTIP tile's 16 rows; HYB's 32x32 super-tiles: 32 rows x 2 units). A GEMV
    # thread that holds whole blocks reads them with vector loads and indexes them by constants.
    gemv_tile: Tuple[int, int] = (1, 1)

    @property
    def row_packed(self) -> bool:
        """True when a row's packed words are its own (``gemv_tile`` (1, 1): int4, E8P): a unit's words
        are a fixed region of its row, which kernels load into registers with vector loads."""
        return tuple(self.gemv_tile) == (1, 1)
    # codebook stages a unit's decode sums (2 for the residual E8P formats): a register cost that
    # kernel defaults weigh (qcompile.kernels.mma.default_mma_config)
    decode_stages: int = 1

    # Fragment-native formats store each 16x16 tile in the PTX mma.m16n8k16 A-fragment order (QTIP HYB
    # in the reference's kernel layout): lane l's packed bytes decode to exactly its own A registers.
    # They decode per (tile (I, J), lane, register e) instead of per unit (``tir_fragment_decode``;
    # qcompile.kernels.mma_fragment builds the mma.sync kernel from these, see TrellisFormat).
    fragment_native: bool = False

    def layout_variant(self, layout: str) -> "Format":
        """This format with its packed data in another layout (``formats.get("<name>@<layout>")``):
        unregistered variants that kernels may prefer (QTIP: ``trellis.variant``)."""
        raise QCompileError(f"{self.name} has no layout variants (asked for {self.name}@{layout})")

    def unit_reads(self) -> Dict[str, Tuple[Tuple[int, ...], str, bool]]:
        """For a decode intrinsic: name -> (shape, dtype, staged[, offset]) of the region of each
        kernel tensor that one decode unit reads (the same number of dimensions as the tensor;
        indices of unit (0, 0) fall inside it), in the order the intrinsic's function takes them;
        staged = the tensor is in ``streamed`` or is the gather stage (the schedule holds it in
        registers); offset = the region's start at unit (0, 0)."""
        raise NotImplementedError(f"{self.name} has no decode intrinsic")

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
        """Raise QCompileError if ``qw`` does not have exactly the tensors this format expects
        (the kernel tensors, plus SU and SV for an RHT weight)."""
        if qw.format != self.name:
            raise QCompileError(f"weight is in format {qw.format!r}, not {self.name!r}")
        n, k = qw.shape
        specs = self.stored_specs(n, k, qw.rht)
        if set(qw.tensors) != set(specs):
            raise QCompileError(f"{self.name} weight needs tensors {sorted(specs)}, got {sorted(qw.tensors)}")
        for name, spec in specs.items():
            t = qw.tensors[name]
            if tuple(t.shape) != spec.shape or t.dtype != spec.torch_dtype:
                raise QCompileError(
                    f"{self.name} tensor {name!r} must be {spec.dtype}{list(spec.shape)}, "
                    f"got {str(t.dtype).replace('torch.', '')}{list(t.shape)}")


def tir_word_half(word, lo):
    """fp16 TIR value of half ``lo`` (0: bits 0-15, 1: bits 16-31) of uint32 TIR expression ``word``
    (two fp16 values packed in a word, the first in the low half: a table word, an mma A register)."""
    from tvm import tirx

    half = tirx.bitwise_and(tirx.shift_right(word, tirx.Cast("uint32", 16 * lo)), tirx.const(0xFFFF, "uint32"))
    return tirx.reinterpret("float16", tirx.Cast("uint16", half))


def subseed(seed: int, tag: str) -> int:
    """A 63-bit seed derived from ``seed`` and a tag (e.g. "SU", or a layer name), stable across
    processes and platforms (sha256, not Python's salted hash)."""
    import hashlib

    digest = hashlib.sha256(f"qcompile-seed-v1:{int(seed)}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


_REGISTRY: Dict[str, Callable[[], Format]] = {}
_INSTANCES: Dict[str, Format] = {}


def register(name: str, factory: Callable[[], Format]) -> None:
    _REGISTRY[name] = factory


def names():
    return sorted(_REGISTRY)


def get(name: str) -> Format:
    """The registered format ``name``, or an unregistered layout variant named
    ``<registered name>@<layout>`` (``Format.layout_variant``, e.g. "qtip-3inst-2@mma-kernel")."""
    if isinstance(name, Format):
        return name
    if name not in _REGISTRY and isinstance(name, str) and "@" in name:
        base, layout = name.split("@", 1)
        if base in _REGISTRY:
            return get(base).layout_variant(layout)
    if name not in _REGISTRY:
        raise QCompileError(f"unknown format {name!r}; choose one of: {', '.join(names())}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]
