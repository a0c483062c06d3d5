"""QuIP# E8P12 lattice formats: ``e8p-2`` (E8P), ``e8p-3`` (E8P + E81B residual), ``e8p-4`` (E8P + E8P).

Written from the math and the facts in ../shared/reference/quipsharp.md (§1, §2, §5); no reference
code was used.

Codebook E8P12 (§1.1-1.3)
  S = 256 absolute-value vectors: the 227 elements of |D̂8| (positive half-integer vectors) with
  ‖s‖² ≤ 10 in lexicographic order, then 29 norm² 12 pads (five 3/2, three ½) in the listed order.
  A 16-bit code is ``abs_idx << 8 | sgn``. Decode: p = popcount(sgn) & 1; sgn ^= p (bit 0 only);
  v = base[abs_idx] (s with coordinate 7 negated when sum(s) is odd, so v ∈ D̂8); sign bit i flips
  coordinate PERM[i] (PERM = [0,2,4,6,1,3,5,7]); v += ¼ (p = 0) or −¼ (p = 1). The 2^16 points are
  distinct points of E8+¼, all coordinates odd multiples of ¼ in [−2.75, 2.75] (exact in fp16).
  ``grid_packed_abs`` (int32[256]) holds base[] as eight nibbles 2·v+8 in PERM order.

Encoder (exact): E8P = (D̂8_S + ¼) ∪ (D̂8_S − ¼) with D̂8_S the D̂8 points whose abs vector is in S.
  For one coset, z = x ∓ ¼; for a fixed abs vector s the best signs are sign(z), and if their
  parity is wrong for s (a point of D̂8 has #negatives ≡ sum(s) mod 2) the cheapest fix flips the
  coordinate with the smallest s_i·|z_i| (cost 4·s_i·|z_i|). So
  ‖z − y*(s)‖² = ‖z‖² + ‖s‖² − 2·⟨s, |z|⟩ + 4·[parity wrong]·min_i s_i|z_i|, minimised over the 256
  abs vectors and the two cosets: 512 candidates instead of 65536, still exact (ties: the lower abs
  index, then the +¼ coset). ``e8p_encode_bruteforce`` is the plain argmax of 2⟨x,c⟩ − ‖c‖² over all
  2^16 points, for tests.

RVQ (§1.8): ``e8p-4`` Ŵ = E8P(q1) + E8P(q2)/s, s = 3.45; ``e8p-3`` Ŵ = E8P(q1) + E81B(q2)/s, s = 2.04
  (E81B: the 256-point 1-bit E8 codebook built exactly as §1.8 says). The decoded fp16 value is
  fp16(a + b·r) with r = fp16(1/s) (tensor ``resid_inv_scale``): a, b are small dyadic numbers and r
  has 11 significant bits, so a + b·r is exact in fp32 and the single rounding to fp16 gives the same
  value on every path (torch, TIR on llvm, an HFMA on the GPU). The encoder's stage-2 input is
  (x − a)/r so quantization and decode agree exactly.

Our kernel-facing layout (row-major word pairs; the reference tiles are converted at import/export):
  qidxs int32 [N, K/32, 2]: word pair w of row n holds the four codes of columns 32w…32w+31 in the
      reference word format (§1.5/§1.6): [..., 0] = four 8-bit abs indices (code i at byte i),
      [..., 1] = sign bits interleaved (bit 4j+i = sign bit j of code i). One pair decodes into 32
      consecutive weights of one row with the §1.6 bit trick, so a GEMV thread reads each word once
      and never needs the next row (the reference 16×64 tiles put two rows in a word for its mma
      fragments). ``pack_e8p_tiles`` / ``e8p_to_reference`` give the reference int64 tiles
      (a tile word viewed as int64, little-endian, IS the reference Qidxs word).
  qidxs_resid: ``e8p-4``: as qidxs (stage 2); ``e8p-3``: int32 [N, K/32], byte b of word w = E81B
      code of columns 8(4w+b)…+7 (the reference's row-major E81B packing, viewed as int32).
  grid_packed_abs int32[256]: the 1 KiB abs table (§1.2), a kernel input passed per layer.
  grid_e81b int32[256] (``e8p-3``): E81B point i as eight nibbles 2·v+8, coordinate j at bits 4j.
  resid_inv_scale fp16[1] (RVQ): r = fp16(1/s).
  SU fp16 [K], SV fp16 [N]: RHT signs (always on for E8P); SV carries the weight scale:
      SV = fp16(sign · Wscale) with Wscale = fp16(RMS(W̃)/ρ) (exact: ±1 times an fp16 number).

decode_unit = 32: one word pair (plus its residual words) → 32 consecutive weights of one row.

Default ρ (target RMS of W̃ in grid units; ``scale`` overrides it), measured here (report numbers):
  e8p-2: 0.9, the reference's recommended value for real weights with LDLQ (paper F.5). The
      Gaussian-MSE optimum without feedback is ρ ≈ 1.03 (MSE 0.0913 vs 0.0989 at 0.9), but with
      BlockLDLQ the proxy loss is flat between 0.9 and 1.03 (the feedback widens the input).
  e8p-3: 0.98 (the reference default; also the Gaussian optimum and the LDLQ optimum here).
  e8p-4: 0.93, NOT the reference's 1.03: both the Gaussian MSE (0.00863 vs 0.00960) and the BlockLDLQ
      proxy loss (0.00415 vs 0.00468 on a 256x1024 test) are ~11% lower at 0.93.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from ..errors import QCompileError
from .base import Format, QuantizedWeight, TensorSpec, register

PERM = (0, 2, 4, 6, 1, 3, 5, 7)       # sign bit / nibble k acts on coordinate PERM[k]
INV_PERM = (0, 4, 1, 5, 2, 6, 3, 7)   # coordinate j is sign bit / nibble INV_PERM[j] = (j>>1) + 4(j&1)
# the 29 norm² 12 pads: positions that hold ½ (the other five hold 3/2), in the reference order
NORM12_HALF_POSITIONS = ("123 023 013 012 367 357 347 356 346 345 267 257 247 256 246 245 167 157 "
                         "147 156 146 045 067 057 047 056 046 014 237").split()
E8P_VALUES = tuple(v / 4 for v in range(-11, 12, 2))  # the value alphabet ±¼ … ±11/4
CODEBOOK_NAMES = {"e8p-2": "E8P12", "e8p-3": "E8P12RVQ3B", "e8p-4": "E8P12RVQ4B"}


# =============================================================================================
# E8P12 codebook
# =============================================================================================
@functools.lru_cache(maxsize=None)
def _abs_grid_np() -> np.ndarray:
    halves = (0.5, 1.5, 2.5, 3.5)
    small = sorted(v for v in itertools.product(halves, repeat=8) if sum(c * c for c in v) <= 10)
    if len(small) != 227:
        raise RuntimeError(f"expected 227 abs vectors of norm² ≤ 10, got {len(small)}")
    pads = []
    for spec in NORM12_HALF_POSITIONS:
        v = [1.5] * 8
        for ch in spec:
            v[int(ch)] = 0.5
        pads.append(tuple(v))
    grid = np.array(small + pads, dtype=np.float64)
    assert grid.shape == (256, 8) and len({tuple(r) for r in grid}) == 256
    return grid


def e8p_abs_grid() -> torch.Tensor:
    """float32 [256, 8]: the abs vectors S in abs-index order."""
    return torch.from_numpy(_abs_grid_np().astype(np.float32))


def e8p_abs_odd() -> torch.Tensor:
    """bool [256]: abs vector sum is odd (coordinate 7 is stored negated; odd #negatives needed)."""
    return torch.from_numpy((_abs_grid_np().sum(1) % 2) == 1)


def e8p_base_grid() -> torch.Tensor:
    """float32 [256, 8]: base[] in natural coordinate order: S with coordinate 7 negated when the
    abs sum is odd, so every row lies in D̂8."""
    g = e8p_abs_grid().clone()
    g[e8p_abs_odd(), 7] *= -1
    return g


@functools.lru_cache(maxsize=None)
def _packed_abs_np() -> np.ndarray:
    base = e8p_base_grid().numpy().astype(np.float64)
    words = np.zeros(256, dtype=np.int64)
    for k, coord in enumerate(PERM):
        nib = (2 * base[:, coord] + 8).astype(np.int64)
        assert ((nib >= 0) & (nib < 16) & (nib % 2 == 1)).all()
        words |= nib << (4 * k)
    return np.where(words >= 2**31, words - 2**32, words).astype(np.int32)


def e8p_packed_abs() -> torch.Tensor:
    """int32 [256]: ``grid_packed_abs`` (§1.2): nibble k = 2·base[PERM[k]] + 8."""
    return torch.from_numpy(_packed_abs_np().copy())


@functools.lru_cache(maxsize=None)
def _full_grid_cpu() -> torch.Tensor:
    base = e8p_base_grid()  # [256, 8]
    codes = torch.arange(65536)
    abs_idx, sgn = codes >> 8, codes & 255
    p = _popcount8(sgn) & 1
    sgn = sgn ^ p
    flips = torch.zeros(65536, 8, dtype=torch.bool)
    for bit, coord in enumerate(PERM):
        flips[:, coord] = ((sgn >> bit) & 1).bool()
    v = base[abs_idx] * torch.where(flips, -1.0, 1.0)
    return (v + torch.where(p.bool(), -0.25, 0.25)[:, None]).contiguous()


def _popcount8(x: torch.Tensor) -> torch.Tensor:
    c = torch.zeros_like(x)
    for b in range(8):
        c = c + ((x >> b) & 1)
    return c


_DEVICE_CACHE: Dict[Tuple[str, str], torch.Tensor] = {}


def _on(name: str, t_fn, device) -> torch.Tensor:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (name, str(dev))
    if key not in _DEVICE_CACHE:
        _DEVICE_CACHE[key] = t_fn().to(dev)
    return _DEVICE_CACHE[key]


def e8p_full_grid(device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[65536, 8]: the decoded point of every 16-bit code (cached per device and dtype; exact in fp16)."""
    return _on(f"e8p_full_{dtype}", lambda: _full_grid_cpu().to(dtype), device)


def e8p_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes (int, any shape, 0..65535) → points [..., 8] by table lookup."""
    return e8p_full_grid(codes.device, dtype)[codes.to(torch.int64)]


def e8p_codes_from_signs(abs_idx: torch.Tensor, neg: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
    """The 16-bit code of the point ``s ⊙ σ ± ¼``: abs index [B], neg = (σ < 0) bool [B, 8] (a valid
    D̂8 sign pattern for s), minus = the −¼ coset bool [B]."""
    odd = _on("e8p_odd", e8p_abs_odd, abs_idx.device)[abs_idx]
    flip = neg.clone()
    flip[:, 7] ^= odd  # base[] already has coordinate 7 negated when the sum is odd
    sgn = torch.zeros_like(abs_idx)
    for bit, coord in enumerate(PERM):
        sgn |= flip[:, coord].to(torch.int64) << bit
    sgn ^= minus.to(torch.int64)  # parity of the stored signs selects the coset
    return (abs_idx << 8) | sgn


def e8p_encode(x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Exact nearest E8P point of every 8-vector of x [..., 8] → int64 codes [...] (see module doc).
    Runs on x's device (CPU or CUDA), float32."""
    if x.shape[-1] != 8:
        raise QCompileError(f"E8P encodes 8-vectors, got last dim {x.shape[-1]}")
    lead = x.shape[:-1]
    xf = x.reshape(-1, 8).to(torch.float32)
    dev = xf.device
    S = _on("e8p_abs", e8p_abs_grid, dev)
    S2 = _on("e8p_abs_norm2", lambda: e8p_abs_grid().pow(2).sum(1), dev)
    odd = _on("e8p_odd", e8p_abs_odd, dev)
    out = torch.empty(xf.shape[0], dtype=torch.int64, device=dev)
    for i0 in range(0, xf.shape[0], chunk):
        xc = xf[i0:i0 + chunk]
        c = xc.shape[0]
        # both cosets at once: rows [0, c) are z = x − ¼ (+¼ coset), rows [c, 2c) z = x + ¼ (−¼ coset)
        z = torch.cat((xc - 0.25, xc + 0.25))
        az, neg = z.abs(), z < 0
        wrong = (neg.sum(1) & 1).bool()[:, None] != odd[None, :]             # [2c, 256]
        dot = az @ S.T                                                       # ⟨s, |z|⟩
        mn = az[:, :1] * S[None, :, 0]                                       # min_i s_i·|z_i|
        for i in range(1, 8):
            mn = torch.minimum(mn, az[:, i:i + 1] * S[None, :, i])
        score = S2[None, :] - 2 * dot + 4 * torch.where(wrong, mn, torch.zeros_like(mn))
        sc, si = score.min(dim=1)
        d = sc + z.pow(2).sum(1)
        r = torch.arange(2 * c, device=dev)
        fix = wrong[r, si]
        mi = (az * S[si]).argmin(dim=1)
        neg[r[fix], mi[fix]] ^= True
        minus = torch.cat((torch.zeros(c, dtype=torch.bool, device=dev), torch.ones(c, dtype=torch.bool, device=dev)))
        codes = e8p_codes_from_signs(si, neg, minus)
        take = d[c:] < d[:c]  # ties keep the +¼ coset
        out[i0:i0 + c] = torch.where(take, codes[c:], codes[:c])
    return out.reshape(lead)


def nearest_bruteforce(x: torch.Tensor, points: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """argmax_c 2⟨x, c⟩ − ‖c‖² over ``points`` [P, 8] for x [..., 8] (first index on ties)."""
    lead = x.shape[:-1]
    xf = x.reshape(-1, 8).to(torch.float32)
    pts = points.to(xf.device, torch.float32)
    n2 = pts.pow(2).sum(1)
    out = torch.empty(xf.shape[0], dtype=torch.int64, device=xf.device)
    for i0 in range(0, xf.shape[0], chunk):
        out[i0:i0 + chunk] = (2 * xf[i0:i0 + chunk] @ pts.T - n2).argmax(dim=1)
    return out.reshape(lead)


def e8p_encode_bruteforce(x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Nearest E8P code by exhaustive search over all 2^16 points (slow; for tests)."""
    return nearest_bruteforce(x, e8p_full_grid(x.device), chunk)


def in_e8_plus_quarter(points: torch.Tensor) -> torch.Tensor:
    """bool [...]: point [..., 8] ∈ E8 + ¼·1, where E8 = D8 ∪ (D8 + ½), D8 = even-sum integer vectors.
    With u = 4·x: every u must be an integer ≡ 1 (mod 4) (y = x − ¼ integer) or every u ≡ 3 (mod 4)
    (y half-integer), and Σ y = Σ (u − 1)/4 must be an even integer."""
    u = points.to(torch.float64) * 4
    ui = torch.round(u)
    integral = (u == ui).all(-1)
    ui = ui.to(torch.int64)
    m = ui % 4
    same = ((m == 1).all(-1)) | ((m == 3).all(-1))
    total = (ui - 1).sum(-1)  # 4·Σy
    return integral & same & (total % 8 == 0)


# =============================================================================================
# E81B (1-bit E8 codebook of the 3-bit residual, §1.8)
# =============================================================================================
@functools.lru_cache(maxsize=None)
def _e81b_np() -> np.ndarray:
    # {−4..3}^8 in itertools.product order is lexicographic; only |coord| ≤ √2 can reach norm² ≤ 2,
    # so enumerating the subset {−1,0,1} (resp. {−½,½}) in product order keeps the same order.
    pts = []
    for values in ((-1.0, 0.0, 1.0), (-0.5, 0.5)):
        for v in itertools.product(values, repeat=8):
            if sum(v) % 2 == 0 and sum(c * c for c in v) <= 2:
                pts.append(v)
    if len(pts) != 241:
        raise RuntimeError(f"expected 241 E8 points of norm² ≤ 2, got {len(pts)}")
    for sign, count in ((2.0, 8), (-2.0, 7)):
        for i in range(count):
            v = [0.0] * 8
            v[i] = sign
            pts.append(tuple(v))
    return np.array(pts, dtype=np.float64)


def e81b_grid() -> torch.Tensor:
    """float32 [256, 8]: the E81B codebook in code order."""
    return torch.from_numpy(_e81b_np().astype(np.float32))


def e81b_packed() -> torch.Tensor:
    """int32 [256]: ``grid_e81b``: coordinate j of point i as the nibble 2·v+8 at bits 4j."""
    g = _e81b_np()
    words = np.zeros(256, dtype=np.int64)
    for j in range(8):
        words |= (2 * g[:, j] + 8).astype(np.int64) << (4 * j)
    return torch.from_numpy(np.where(words >= 2**31, words - 2**32, words).astype(np.int32))


def e81b_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest E81B code (exhaustive over the 256 points) of x [..., 8] → int64 [...]."""
    return nearest_bruteforce(x, _on("e81b", e81b_grid, x.device), chunk=16384)


def e81b_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _on(f"e81b_{dtype}", lambda: e81b_grid().to(dtype), codes.device)[codes.to(torch.int64)]


# =============================================================================================
# the §1.6 kernel bit trick, as a NumPy reference (the CUDA decode will follow it)
# =============================================================================================
def bit_trick_decode(abs32: np.ndarray, sign32: np.ndarray, table: Optional[np.ndarray] = None) -> np.ndarray:
    """One packed word (low 32 bits ``abs32``, high 32 bits ``sign32``; any shape) → float16 [..., 4, 8]
    (code i, coordinate j) computed with the XOR-nibble / fp16-bias construction of §1.6."""
    tbl = (_packed_abs_np() if table is None else np.asarray(table)).astype(np.int64) & 0xFFFFFFFF
    a = np.asarray(abs32).astype(np.int64) & 0xFFFFFFFF
    b = np.asarray(sign32).astype(np.int64) & 0xFFFFFFFF
    s = b ^ (b >> 4)
    s ^= s >> 8
    s ^= s >> 16
    sb = s & 15                       # bit i: parity of code i's sign bits
    s = b ^ sb                        # flip sign bit 0 (coordinate 0) of the odd-parity codes
    out = np.empty(a.shape + (4, 8), dtype=np.float16)

    def halves(word):  # uint32 → (low fp16, high fp16)
        lo = (word & 0xFFFF).astype(np.uint16).view(np.float16)
        hi = ((word >> 16) & 0xFFFF).astype(np.uint16).view(np.float16)
        return lo, hi

    o_lo, o_hi = halves(np.array(0xD080D080, dtype=np.int64))  # half2(−36, −36)
    for i in range(4):
        if i == 2:
            s = s >> 2
        # every nibble is odd, so n − p = n ^ p: the parity goes into bit 0 of each nibble, beside
        # the sign's 0b1110, and the offset is −36 for every code
        x = tbl[(a >> (8 * i)) & 255] ^ ((s & (0x11111111 << (i & 1))) * (14 >> (i & 1)) + ((sb >> i) & 1) * 0x11111111)
        for j, sh in enumerate((-4, 0, 4, 8)):  # x<<4, x, x>>4, x>>8
            xs = ((x << 4) if sh < 0 else (x >> sh)) & 0xFFFFFFFF
            w_lo, w_hi = halves((xs & 0x00F000F0) | 0x50085008)
            out[..., i, 2 * j] = w_lo + o_lo      # fp16 adds, exact here
            out[..., i, 2 * j + 1] = w_hi + o_hi
    return out


# =============================================================================================
# layouts: codes ↔ our int32 tiles ↔ the reference int64 tiles
# =============================================================================================
def _check_codes(codes: torch.Tensor, what: str = "codes") -> Tuple[int, int]:
    if codes.dim() != 2 or codes.shape[0] % 16 or codes.shape[1] % 8:
        raise QCompileError(f"E8P {what} must be [N, K/8] with N % 16 == 0 and K % 64 == 0, got {list(codes.shape)}")
    return codes.shape[0], codes.shape[1] * 8


def _pack_words(c: torch.Tensor) -> torch.Tensor:
    """Codes int64 [..., 4] → int32 word pairs [..., 2]: [0] the four abs bytes (code i at byte i),
    [1] the sign bits interleaved (bit 4j+i = sign bit j of code i), as §1.5 / §1.6 want them."""
    abs32 = torch.zeros(c.shape[:-1], dtype=torch.int64, device=c.device)
    sign32 = torch.zeros_like(abs32)
    for i in range(4):
        abs32 |= ((c[..., i] >> 8) & 255) << (8 * i)
        for j in range(8):
            sign32 |= ((c[..., i] >> j) & 1) << (4 * j + i)
    words = torch.stack((abs32, sign32), dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def pack_e8p(codes: torch.Tensor) -> torch.Tensor:
    """16-bit codes [N, K/8] (code column c = weight columns 8c…8c+7) → qidxs int32 [N, K/32, 2] (the
    kernel layout: word pair w of row n holds codes 4w…4w+3; [0] their abs bytes, [1] their sign bits
    interleaved, bit 4j+i = sign bit j of code i)."""
    n, k = _check_codes(codes)
    c = codes.to(torch.int64).reshape(n, k // 32, 4)
    return _pack_words(c)


def _unpack_words(w: torch.Tensor) -> torch.Tensor:
    """int32 word pairs [..., 2] → the four 16-bit codes of each pair, int64 [..., 4]."""
    w = w.to(torch.int64) & 0xFFFFFFFF
    abs32, sign32 = w[..., 0], w[..., 1]
    codes = []
    for i in range(4):
        sgn = torch.zeros_like(abs32)
        for j in range(8):
            sgn |= ((sign32 >> (4 * j + i)) & 1) << j
        codes.append((((abs32 >> (8 * i)) & 255) << 8) | sgn)
    return torch.stack(codes, dim=-1)


def unpack_e8p(qidxs: torch.Tensor) -> torch.Tensor:
    """qidxs int32 [N, K/32, 2] → 16-bit codes int64 [N, K/8]."""
    n, kw = qidxs.shape[0], qidxs.shape[1]
    return _unpack_words(qidxs).reshape(n, kw * 4).contiguous()


def pack_e8p_tiles(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K/8] → the reference tile words as int32 pairs [N/16, K/64, 8, 4, 2] (§1.5): tile
    (rt, ct) of 16 rows × 64 columns, position [g][t] covers rows 16rt+2g+{0,1} and code columns
    8ct+2t+{0,1}; code i of a word is row 16rt+2g+(i&1), code column 8ct+2t+(i>>1). Same word
    format as ``pack_e8p``; viewed as int64 (little-endian) this IS the reference Qidxs."""
    n, k = _check_codes(codes)
    c = codes.to(torch.int64).reshape(n // 16, 8, 2, k // 64, 4, 2)      # rt, g, ri, ct, t, ci
    c = c.permute(0, 3, 1, 4, 5, 2).reshape(n // 16, k // 64, 8, 4, 4)   # rt, ct, g, t, i = 2ci + ri
    return _pack_words(c)


def unpack_e8p_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Reference tile words int32 [N/16, K/64, 8, 4, 2] → 16-bit codes int64 [N, K/8]."""
    rt, ct = tiles.shape[0], tiles.shape[1]
    c = _unpack_words(tiles).reshape(rt, ct, 8, 4, 2, 2)                 # rt, ct, g, t, ci, ri
    return c.permute(0, 2, 5, 1, 3, 4).reshape(rt * 16, ct * 8).contiguous()


def e8p_to_reference(qidxs: torch.Tensor) -> torch.Tensor:
    """Our qidxs int32 [N, K/32, 2] → the reference Qidxs int64 [N, K/32] (§1.5 tiles)."""
    n, kw = qidxs.shape[0], qidxs.shape[1]
    w = pack_e8p_tiles(unpack_e8p(qidxs)).to(torch.int64)
    words = (w[..., 1] << 32) | (w[..., 0] & 0xFFFFFFFF)  # high word signed: two's complement int64
    return words.reshape(n, kw).contiguous()


def e8p_from_reference(qidxs64: torch.Tensor) -> torch.Tensor:
    """The reference Qidxs int64 [N, K/32] → our qidxs int32 [N, K/32, 2]."""
    n, kw = qidxs64.shape
    w = qidxs64.to(torch.int64).reshape(n // 16, kw // 2, 8, 4)
    lo = w & 0xFFFFFFFF
    hi = (w >> 32) & 0xFFFFFFFF
    words = torch.stack((lo, hi), dim=-1)
    tiles = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return pack_e8p(unpack_e8p_tiles(tiles))


def reference_pack_e8p(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K/8] → reference Qidxs int64 [N, K/32], written straight from the §1.5 description
    (word index (rt·K/64 + ct)·32 + 4g + t; q0..q3 = C[r0, c0], C[r0+1, c0], C[r0, c0+1],
    C[r0+1, c0+1]); an independent check of ``pack_e8p`` + ``e8p_to_reference``."""
    n, k = _check_codes(codes)
    C = codes.to(torch.int64)
    flat = torch.zeros(n * k // 32, dtype=torch.int64)
    for rt in range(n // 16):
        for ct in range(k // 64):
            for g in range(8):
                for t in range(4):
                    r0, c0 = 16 * rt + 2 * g, 8 * ct + 2 * t
                    q = [int(C[r0, c0]), int(C[r0 + 1, c0]), int(C[r0, c0 + 1]), int(C[r0 + 1, c0 + 1])]
                    lo = sum((qi >> 8) << (8 * i) for i, qi in enumerate(q))
                    hi = sum(((qi >> j) & 1) << (4 * j + i) for i, qi in enumerate(q) for j in range(8))
                    word = (hi << 32) | lo
                    if word >= 2**63:
                        word -= 2**64
                    flat[(rt * (k // 64) + ct) * 32 + 4 * g + t] = word
    return flat.reshape(n, k // 32)


def pack_e81b(codes: torch.Tensor) -> torch.Tensor:
    """8-bit codes [N, K/8] → int32 [N, K/32] (code 4w+b at byte b of word w)."""
    n, kc = codes.shape
    c = codes.to(torch.int64).reshape(n, kc // 4, 4)
    w = c[..., 0] | (c[..., 1] << 8) | (c[..., 2] << 16) | (c[..., 3] << 24)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).contiguous()


def unpack_e81b(words: torch.Tensor) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(w >> (8 * b)) & 255 for b in range(4)], dim=-1).reshape(w.shape[0], -1)


def e81b_to_reference(words: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/32] → the reference int64 [N, K/64] (byte i of column j = code 8j+i)."""
    w = words.to(torch.int64).reshape(words.shape[0], -1, 2)
    return ((w[..., 1] << 32) | (w[..., 0] & 0xFFFFFFFF)).contiguous()


def e81b_from_reference(q64: torch.Tensor) -> torch.Tensor:
    w = q64.to(torch.int64)
    words = torch.stack((w & 0xFFFFFFFF, (w >> 32) & 0xFFFFFFFF), dim=-1).reshape(w.shape[0], -1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


# =============================================================================================
# the formats
# =============================================================================================
class E8PFormat(Format):
    """QuIP# E8P12 (``residual=None``), E8P12RVQ4B (``residual="e8p"``) or E8P12RVQ3B (``"e81b"``)."""

    decode_unit = 32  # one word pair: four codes = 32 consecutive weights of one row
    always_rht = True

    def __init__(self, name: str, residual: Optional[str], rho: float, resid_scale: Optional[float]):
        self.name = name
        self.residual = residual
        self.default_rho = float(rho)
        self.resid_scale = resid_scale
        self.codebook = CODEBOOK_NAMES[name]
        self.bits = {None: 2, "e81b": 3, "e8p": 4}[residual]
        self.decode_stages = 1 if residual is None else 2

    # --- shapes -----------------------------------------------------------------------------
    def check_shape(self, n: int, k: int) -> None:
        from ..quant.hadamard import hadamard_factor

        if n <= 0 or k <= 0 or n % 16 or k % 64:
            raise QCompileError(f"{self.name}: weight shape {n}x{k} must have out_features % 16 == 0 and "
                                f"in_features % 64 == 0 (the 16x64 E8P tiles); pad the layer or use another format")
        for size, side in ((k, "in_features"), (n, "out_features")):
            try:
                hadamard_factor(size)
            except QCompileError as err:
                raise QCompileError(f"{self.name} always uses the RHT, which cannot take {side}={size}: {err}") from None

    def tensor_specs(self, n: int, k: int) -> Dict[str, TensorSpec]:
        self.check_shape(n, k)
        words = TensorSpec((n, k // 32, 2), "int32")
        specs = {"qidxs": words}
        if self.residual == "e8p":
            specs["qidxs_resid"] = words
        elif self.residual == "e81b":
            specs["qidxs_resid"] = TensorSpec((n, k // 32), "int32")
        specs["grid_packed_abs"] = TensorSpec((256,), "int32")
        if self.residual == "e81b":
            specs["grid_e81b"] = TensorSpec((256,), "int32")
        if self.residual is not None:
            specs["resid_inv_scale"] = TensorSpec((1,), "float16")
        return specs

    def aux_specs(self, n: int, k: int, rht: bool) -> Dict[str, TensorSpec]:
        return super().aux_specs(n, k, True)  # E8P weights always carry SU / SV

    def check_qweight(self, qw: QuantizedWeight) -> None:
        super().check_qweight(qw)
        if not qw.rht:
            raise QCompileError(f"{self.name} weight must carry SU and SV (E8P is always stored in the RHT basis)")
        if not torch.equal(qw.tensors["grid_packed_abs"].cpu(), e8p_packed_abs()):
            raise QCompileError(f"{self.name} tensor 'grid_packed_abs' is not the E8P12 abs table")
        if self.residual == "e81b" and not torch.equal(qw.tensors["grid_e81b"].cpu(), e81b_packed()):
            raise QCompileError(f"{self.name} tensor 'grid_e81b' is not the E81B table")
        if self.residual is not None:
            r = float(qw.tensors["resid_inv_scale"][0])
            if not (math.isfinite(r) and r > 0):
                raise QCompileError(f"{self.name} tensor 'resid_inv_scale' must be a positive number, got {r}")

    # --- codebook rounding ----------------------------------------------------------------------
    def inv_scale16(self, resid_scale: Optional[float] = None) -> torch.Tensor:
        """fp16 [1]: r = fp16(1/s) of the residual stage."""
        s = self.resid_scale if resid_scale is None else float(resid_scale)
        if not (math.isfinite(s) and s > 0):
            raise QCompileError(f"{self.name}: residual scale must be positive, got {s}")
        return torch.tensor([1.0 / s], dtype=torch.float16)

    def round_vectors(self, x: torch.Tensor, resid_inv: Optional[torch.Tensor] = None):
        """x [B, 8] float32 (grid units) → (x_hat [B, 8] float32 = the exact decoded fp16 values,
        codes [B], residual codes [B] or None)."""
        c1 = e8p_encode(x)
        a = e8p_decode(c1)
        if self.residual is None:
            return a, c1, None
        r = (resid_inv if resid_inv is not None else self.inv_scale16()).to(x.device, torch.float32)
        target = (x - a) / r
        if self.residual == "e8p":
            c2 = e8p_encode(target)
            b = e8p_decode(c2)
        else:
            c2 = e81b_encode(target)
            b = e81b_decode(c2)
        return (a + b * r).to(torch.float16).to(torch.float32), c1, c2

    # --- quantize ---------------------------------------------------------------------------------
    def quantize(self, W: torch.Tensor, hessian: Optional[torch.Tensor] = None, seed: int = 0,
                 scale: Optional[float] = None, rht: bool = True, ldlq: Optional[bool] = None,
                 sigma: float = 1e-2) -> QuantizedWeight:
        """E8P quantization of W [N, K] (out, in), always in a randomized Hadamard basis (``rht`` is
        accepted for the common signature but the RHT is applied whatever it says).

        W̃ = RHT(W) is scaled to RMS ρ in grid units (ρ = ``scale`` or the format default):
        Wscale = fp16(RMS(W̃)/ρ), the codebook sees W̃/Wscale and SV·Wscale is stored as SV (exact in
        fp16: SV = ±1). With a Hessian (and ``ldlq`` not False) the 8-column blocks are rounded by
        BlockLDLQ (g = 8) under damp(H̃, sigma); otherwise each block goes to its nearest point.
        meta: codebook, rho, wscale, resid_scale (RVQ), rht, and ldlq / proxy_loss given a Hessian.
        """
        Wt, H, aux, use_ldlq = self.prepare_input(W, hessian, seed, True, ldlq)
        n, k = Wt.shape
        rho = self.default_rho if scale is None else float(scale)
        if not (math.isfinite(rho) and rho > 0):
            raise QCompileError(f"{self.name}: scale must be a positive target RMS in grid units, got {scale}")
        wscale = wscale16(Wt, rho, self.name)
        X = Wt / wscale if wscale > 0 else torch.zeros_like(Wt)
        resid_inv = self.inv_scale16() if self.residual is not None else None
        if use_ldlq:
            from ..quant.hessian import damp
            from ..quant.ldlq import block_ldlq

            def round_fn(x):
                x_hat, c1, c2 = self.round_vectors(x, resid_inv)
                return x_hat, (c1, c2)

            res = block_ldlq(X, damp(H, sigma).to(X.device), 8, round_fn)
            c1 = torch.stack([s[0] for s in res.states], dim=1)
            c2 = torch.stack([s[1] for s in res.states], dim=1) if self.residual is not None else None
        else:
            _, c1, c2 = self.round_vectors(X.reshape(-1, 8), resid_inv)
            c1 = c1.reshape(n, k // 8)
            c2 = c2.reshape(n, k // 8) if c2 is not None else None
        tensors = self.tensors_from_codes(c1, c2, resid_inv)
        aux = dict(aux)
        aux["SV"] = (aux["SV"].to(torch.float32) * wscale).to(torch.float16)
        meta = {"codebook": self.codebook, "rho": rho, "wscale": wscale, "rht": True}
        if self.residual is not None:
            meta["resid_scale"] = float(self.resid_scale)
        qw = QuantizedWeight(self.name, (n, k), {**{t: v.to(Wt.device) for t, v in tensors.items()}, **aux}, meta)
        if H is not None:
            meta["ldlq"] = use_ldlq
            meta["proxy_loss"] = self.relative_proxy_loss(Wt, self.decode_fp16(qw).to(torch.float32) * wscale, H)
        return qw

    def random_weight(self, n: int, k: int, seed: int = 0, device=None) -> QuantizedWeight:
        """Uniformly random codes in both stages (every 16-bit E8P code is a codebook point), random
        ±1 SU / SV."""
        self.check_shape(n, k)
        gen = torch.Generator().manual_seed(int(seed))
        c1 = torch.randint(0, 1 << 16, (n, k // 8), generator=gen)
        c2 = None
        if self.residual is not None:
            c2 = torch.randint(0, 1 << (16 if self.residual == "e8p" else 8), (n, k // 8), generator=gen)
        tensors = {**self.tensors_from_codes(c1, c2), **self._random_rht(n, k, gen)}
        meta = {"codebook": self.codebook, "rht": True, "random": True}
        if self.residual is not None:
            meta["resid_scale"] = float(self.resid_scale)
        qw = QuantizedWeight(self.name, (n, k), tensors, meta)
        return qw.to(device) if device is not None else qw

    def tensors_from_codes(self, c1: torch.Tensor, c2: Optional[torch.Tensor] = None,
                           resid_inv: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The kernel tensors from codes [N, K/8] (stage 1) and [N, K/8] (stage 2, RVQ only)."""
        out = {"qidxs": pack_e8p(c1)}
        if self.residual == "e8p":
            out["qidxs_resid"] = pack_e8p(c2)
        elif self.residual == "e81b":
            out["qidxs_resid"] = pack_e81b(c2)
        out.update({k: v.to(c1.device) for k, v in self.table_tensors(resid_inv).items()})
        return out

    def table_tensors(self, resid_inv: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The constant kernel inputs: grid_packed_abs, grid_e81b (3-bit), resid_inv_scale (RVQ)."""
        out = {"grid_packed_abs": e8p_packed_abs()}
        if self.residual == "e81b":
            out["grid_e81b"] = e81b_packed()
        if self.residual is not None:
            out["resid_inv_scale"] = (resid_inv if resid_inv is not None else self.inv_scale16()).cpu()
        return out

    def codes(self, qw: QuantizedWeight) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(stage-1 codes int64 [N, K/8], stage-2 codes [N, K/8] or None)."""
        c1 = unpack_e8p(qw.tensors["qidxs"])
        if self.residual == "e8p":
            return c1, unpack_e8p(qw.tensors["qidxs_resid"])
        if self.residual == "e81b":
            return c1, unpack_e81b(qw.tensors["qidxs_resid"])
        return c1, None

    # --- torch reference decode ------------------------------------------------------------------
    def decode_fp16(self, qw: QuantizedWeight) -> torch.Tensor:
        """Grid values [N, K] fp16 (RHT basis, Wscale not applied: it lives in SV)."""
        self.check_qweight(qw)
        n, k = qw.shape
        c1, c2 = self.codes(qw)
        a = e8p_decode(c1, torch.float16).reshape(n, k)
        if self.residual is None:
            return a
        b = (e8p_decode(c2) if self.residual == "e8p" else e81b_decode(c2)).reshape(n, k)
        r = qw.tensors["resid_inv_scale"].to(torch.float32)
        return (a.to(torch.float32) + b * r).to(torch.float16)  # exact in fp32, one rounding

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """float32 [N, K] in the original basis (RHT undone, Wscale applied through SV, and the
        per-part ``fuse_scales`` of an imported fused linear applied to its rows)."""
        W = self.undo_rht(qw, self.decode_fp16(qw).to(torch.float32))
        fused = qw.meta.get("fused") if isinstance(qw.meta, dict) else None
        if fused:
            scales = torch.cat([torch.full((int(sz),), float(fs), dtype=torch.float32)
                                for sz, fs in zip(fused["sizes"], fused["fuse_scales"])]).to(W.device)
            W = W * scales[:, None]
        return W

    # --- TIR ------------------------------------------------------------------------------------
    @property
    def gather_count(self) -> int:
        # the abs-table words of the four codes (and of the four residual codes)
        return 8 if self.residual else 4

    def tir_gather(self, bufs: Mapping[str, object], n, c, g):
        """Table word g of unit (n, c): g < 4: grid_packed_abs[abs byte g of the word pair]; g ≥ 4: the
        residual's table word of code g − 4 (E8P abs table, or the E81B table for ``e8p-3``)."""
        from tvm import tirx

        band, shr = tirx.bitwise_and, tirx.shift_right

        def stage1(i):
            return bufs["grid_packed_abs"][band(shr(bufs["qidxs"][n, c, 0], i * 8), 255)]

        def stage2(i):
            if self.residual == "e8p":
                return bufs["grid_packed_abs"][band(shr(bufs["qidxs_resid"][n, c, 0], i * 8), 255)]
            return bufs["grid_e81b"][band(shr(bufs["qidxs_resid"][n, c], i * 8), 255)]

        if isinstance(g, int):
            return stage1(g) if g < 4 else stage2(g - 4)
        if not self.residual:  # the kernel's gather stage: g is a loop variable
            return stage1(g)
        i = tirx.floormod(g, 4)
        return tirx.Select(g < 4, stage1(i), stage2(i))

    def tir_decode_unit(self, bufs: Mapping[str, object], n, c, j):
        """fp16 weight (n, 32c + j): code j // 8 of word pair (n, c), coordinate j % 8."""
        from tvm import tirx

        G = self.gathered(bufs)
        i = j // 8
        a = _tir_e8p(bufs["qidxs"], G[n, c, i], n, c, j)
        if self.residual is None:
            return a
        R = bufs["resid_inv_scale"]
        if self.residual == "e8p":
            b = _tir_e8p(bufs["qidxs_resid"], G[n, c, i + 4], n, c, j).astype("float32")
        else:
            nib = tirx.bitwise_and(tirx.shift_right(G[n, c, i + 4], (j % 8) * 4), 15)
            b = (nib - 8).astype("float32") * tirx.const(0.5, "float32")
        return (a.astype("float32") + b * R[0].astype("float32")).astype("float16")

    @property
    def streamed(self):
        return ("qidxs", "qidxs_resid") if self.residual else ("qidxs",)

    def unit_reads(self):
        # after the gather, the decode block reads the sign word(s) ([..., 1]) and the gathered table
        # words, all in registers
        sign = ((1, 1, 1), "int32", True, (0, 0, 1))
        reads = {"qidxs": sign}
        if self.residual == "e8p":
            reads["qidxs_resid"] = sign
        reads["gathered"] = ((1, 1, self.gather_count), "int32", True)
        if self.residual is not None:
            reads["resid_inv_scale"] = ((1,), "float16", False)
        return reads

    def decode_intrin(self, target_kind: str):
        if target_kind != "cuda":
            return None
        from ..kernels.intrinsics import register_unit_decode

        func = {None: "qc_e8p2_decode32", "e8p": "qc_e8p4_decode32", "e81b": "qc_e8p3_decode32"}[self.residual]
        source = _CUDA_E8P
        return register_unit_decode(self, func, source), source


def _tir_e8p(Q, tword, n, c, j):
    """fp16 value of weight 32c + j of row n from qidxs word pairs Q [N, K/32, 2] and ``tword``, the
    abs-table word of its code (grid_packed_abs[abs byte]), by the §1.6 construction (XOR of the nibble with 0b1110 negates it about 8; fp16
    0x5008 | n<<4 = 32.25 + n/2; the nibbles are odd, so the ∓¼ coset of an odd-parity code is
    n ^ 1 = n − 1, and adding −36 gives (n−8)/2 ± ¼; every step exact)."""
    from tvm import tirx

    band, shr, bor, bxor = tirx.bitwise_and, tirx.shift_right, tirx.bitwise_or, tirx.bitwise_xor
    i = j // 8                                           # code of the word pair
    jj = j % 8                                           # coordinate
    B = Q[n, c, 1]
    s = bxor(B, shr(B, 4))
    s = bxor(s, shr(s, 8))
    s = bxor(s, shr(s, 16))                              # bits 0..3: sign parity of codes 0..3
    p = band(shr(s, i), 1)
    kk = (jj // 2) + (jj % 2) * 4                        # nibble / sign bit of coordinate jj
    flip = band(shr(bxor(B, tirx.shift_left(p, i)), kk * 4 + i), 1)  # sign bit 0 flipped by the parity
    nib = band(shr(tword, kk * 4), 15)
    nib = bxor(nib, flip * 14 + p)                       # nibbles are odd: n ^ p = n − p
    w = tirx.reinterpret("float16", tirx.Cast("uint16", bor(tirx.shift_left(nib, 4), 0x5008)))
    return w + tirx.const(-36.0, "float16")


# The §1.6 decode of one word pair (four codes, 32 weights of one row) in 16 half2, as
# ``bit_trick_decode`` spells it: parity of each code's sign bits by three XOR-folds; the odd codes
# get sign bit 0 flipped; per code one table load, one XOR that negates the signed nibbles about 8
# (x ^ 0b1110) and takes the odd-parity codes to the −¼ coset (bit 0: every nibble is odd, so
# n ^ 1 = n − 1), then per coordinate pair a shift, one LOP3 into the mantissas of half2(32.25 + n/2)
# and one HADD2 of −36. (Parity through the XOR instead of a per-code −36 / −36.5 offset: 3 fewer
# instructions per 32 weights in the sm_90 SASS of a decode + dot loop; the parities spread once per
# word pair saved 6 but made e8p-2's four-tile M=16 mma kernel spill.) Every step is exact, so the values are
# bit-identical to the TIR decode. The RVQ variants add the second stage with one HFMA2 (fp16 fma of
# exact operands = one rounding of a + b·r, as the TIR decode's fp32 sum rounded once).
_CUDA_E8P = r"""
#ifndef QC_E8P_DECODE32
#define QC_E8P_DECODE32
#include <cuda_fp16.h>  // injected ahead of TVM's own header
#ifndef QC_E8P_SHR  // (see E8P_SHIFT_BY_MULHI)
#define QC_E8P_SHR(x, s) ((x) >> (s))
#endif
// b: the sign word of a word pair; t: the four gathered abs-table words of its codes
__device__ __forceinline__ void qc_e8p_pairs(unsigned b, const int* __restrict__ t, unsigned* __restrict__ out) {
  unsigned s = b ^ QC_E8P_SHR(b, 4);
  s ^= QC_E8P_SHR(s, 8);
  s ^= QC_E8P_SHR(s, 16);
  const unsigned sb = s & 15u;  // bit i: parity of code i's sign bits
  s = b ^ sb;                   // flip sign bit 0 of the odd codes
  const unsigned o_bits = 0xD080D080u;  // half2(-36, -36)
  const half2 o = *reinterpret_cast<const half2*>(&o_bits);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned si = (i >= 2) ? QC_E8P_SHR(s, 2) : s;
    // sign: 0b1110 into the flipped nibbles (x ^ 14 negates about 8); parity: bit 0 of every nibble
    // (the nibbles are odd, so n ^ 1 = n - 1, the -1/4 coset); one XOR for both
    const unsigned x = static_cast<unsigned>(t[i]) ^ ((si & (0x11111111u << (i & 1))) * (14u >> (i & 1)) + ((sb >> i) & 1u) * 0x11111111u);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const unsigned xs = (j == 0) ? (x << 4) : (j == 1) ? x : QC_E8P_SHR(x, 4 * (j - 1));
      unsigned h;
      asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(h) : "r"(xs), "n"(0x00F000F0), "n"(0x50085008));
      const half2 v = __hadd2(*reinterpret_cast<const half2*>(&h), o);
      out[4 * i + j] = *reinterpret_cast<const unsigned*>(&v);
    }
  }
}
__device__ __forceinline__ int qc_e8p2_decode32(const int* __restrict__ sign, const int* __restrict__ t,
                                                half* __restrict__ w) {
  qc_e8p_pairs(static_cast<unsigned>(sign[0]), t, reinterpret_cast<unsigned*>(w));
  return 0;  // called as an expression statement by the generated code
}
__device__ __forceinline__ int qc_e8p4_decode32(const int* __restrict__ sign, const int* __restrict__ sign2,
                                                const int* __restrict__ t, const half* __restrict__ r,
                                                half* __restrict__ w) {
  unsigned a[16], b[16];
  qc_e8p_pairs(static_cast<unsigned>(sign[0]), t, a);
  qc_e8p_pairs(static_cast<unsigned>(sign2[0]), t + 4, b);
  const half2 r2 = __half2half2(*r);
  unsigned* out = reinterpret_cast<unsigned*>(w);
#pragma unroll
  for (int q = 0; q < 16; ++q) {
    const half2 v = __hfma2(*reinterpret_cast<const half2*>(&b[q]), r2, *reinterpret_cast<const half2*>(&a[q]));
    out[q] = *reinterpret_cast<const unsigned*>(&v);
  }
  return 0;
}
// t[4 + i]: the E81B table word of residual code i (nibble j = 2·v_j + 8)
__device__ __forceinline__ int qc_e8p3_decode32(const int* __restrict__ sign, const int* __restrict__ t,
                                                const half* __restrict__ r, half* __restrict__ w) {
  unsigned a[16];
  qc_e8p_pairs(static_cast<unsigned>(sign[0]), t, a);
  const half2 r2 = __half2half2(*r);
  const unsigned bias_bits = 0x50805080u;  // half2(36, 36)
  const half2 bias = *reinterpret_cast<const half2*>(&bias_bits);
  unsigned* out = reinterpret_cast<unsigned*>(w);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned x = static_cast<unsigned>(t[4 + i]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // coordinates 2j, 2j+1 (nibbles at bits 8j, 8j+4) into the mantissas of half2(32 + n/2), minus 36
      const unsigned h = (((x >> (8 * j)) & 15u) << 4) | (((x >> (8 * j + 4)) & 15u) << 20) | 0x50005000u;
      const half2 bv = __hsub2(*reinterpret_cast<const half2*>(&h), bias);
      const half2 v = __hfma2(bv, r2, *reinterpret_cast<const half2*>(&a[4 * i + j]));
      out[4 * i + j] = *reinterpret_cast<const unsigned*>(&v);
    }
  }
  return 0;
}
#endif
"""


# E8P_SHIFT_BY_MULHI (refuted and removed): QC_E8P_SHR above could be defined as __umulhi by powers of two,
# which nvcc issues as IMAD.HI on the FMA pipe instead of SHF on the ALU pipe (229 -> 185 ALU instructions
# in the M=1 mma.sync loop). On the H100 at c67c318 every e8p-2 kernel was slower with it, e.g. 28672x8192
# mma.sync M=1 41.8 -> 43.7 us, the M=1 GEMV 42.6 -> 46.2 us (artifacts/bench/mma-sweep-e8p-2-mulhi-h100.json,
# gemv-sweep-e8p-2-mulhi-h100.json). The macro stays, with its plain-shift default, because the tuning
# records' kernel fingerprints hash this source text.


def wscale16(Wt: torch.Tensor, rho: float, name: str = "e8p") -> float:
    """fp16(RMS(W̃)/ρ) as a Python float, at least the smallest fp16 (2^-24); 0.0 for an all-zero
    weight (E8P has no zero point; SV = 0 then makes the stored weight exactly zero)."""
    rms = float(Wt.to(torch.float64).pow(2).mean().sqrt())
    if rms == 0.0:
        return 0.0
    ws = float(torch.tensor(rms / rho, dtype=torch.float32).to(torch.float16))
    if not math.isfinite(ws):
        raise QCompileError(f"{name}: weight RMS {rms:.3g} is too large for an fp16 scale; rescale the layer")
    return max(ws, 2.0 ** -24)


# =============================================================================================
# Gaussian-source MSE (paper Fig. 3)
# =============================================================================================
def gaussian_mse(fmt_name: str, n_vectors: int = 1 << 15, seed: int = 0, scale: Optional[float] = None,
                 return_scale: bool = False):
    """Element-wise MSE of the codebook on i.i.d. N(0, 1) 8-vectors at the best ρ (the RMS of the
    source in grid units): a grid around the format default ±20% in 4% steps, refined by 1%
    steps around the best; or at ρ = ``scale`` when given. No RHT (a Gaussian source needs none).
    Returns the MSE, or (MSE, ρ) with ``return_scale``."""
    from .base import get

    fmt = get(fmt_name)
    if not isinstance(fmt, E8PFormat):
        raise QCompileError(f"gaussian_mse measures the E8P formats, not {fmt_name!r}")
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(int(n_vectors), 8, generator=gen)

    def mse(rho: float) -> float:
        ws = 1.0 / rho
        x_hat, _, _ = fmt.round_vectors(x / ws)
        return float((x - x_hat * ws).pow(2).mean())

    if scale is not None:
        best = (mse(float(scale)), float(scale))
    else:
        d = fmt.default_rho
        cands = {round(d * (0.8 + 0.04 * i), 6): None for i in range(11)}
        for r in cands:
            cands[r] = mse(r)
        r0 = min(cands, key=cands.get)
        for i in range(-3, 4):
            r = round(r0 * (1 + 0.01 * i), 6)
            if r not in cands:
                cands[r] = mse(r)
        r_best = min(cands, key=cands.get)
        best = (cands[r_best], r_best)
    return best if return_scale else best[0]


register("e8p-2", lambda: E8PFormat("e8p-2", None, 0.9, None))
register("e8p-3", lambda: E8PFormat("e8p-3", "e81b", 0.98, 2.04))
register("e8p-4", lambda: E8PFormat("e8p-4", "e8p", 0.93, 3.45))
