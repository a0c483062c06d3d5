"""Randomized Hadamard transform (RHT): orthonormal U_n for n = K_h·2^p and the fast transform.

Conventions (QuIP#/QTIP, see ../shared/reference/quipsharp.md §2 and qtip.md §3.3):

* n = K_h·2^p with K_h ∈ {1, 12, 20, 28, 36, 52, 60, 108, 116, 124, 140, 156, 172}. The K_h×K_h ±1
  matrices H_K come from N. J. A. Sloane's library (``qcompile/data/hadamard_kh.txt``). They are not
  symmetric, so transposes matter.
* H_{2^p} is the natural-order Sylvester matrix, H[i, j] = (-1)^popcount(i & j).
* A vector x of length n is viewed as a [K_h][2^p] row-major array (K_h is the slow index), so the
  dense operator is the Kronecker product U_n = (H_K ⊗ H_{2^p}) / √n.
* ``had_transform(x)`` = hadU(x) = U_n·x and ``had_transform(x, transpose=True)`` = hadUt(x) = U_nᵀ·x
  (H_{2^p} is symmetric, so only H_K is transposed), both over the last dim of x.

Choice of K_h: the reference tries 172, 156, 140, 124, 116, 108, 60, 52, 36, 28, 20, 12 in that
order, takes the FIRST that divides n and then asserts that n/K_h is a power of two. We take the
first K_h that divides n AND leaves a power of two. The two rules always pick the same K_h whenever
any works (every K_h is 4·odd and the list is descending, so a K_h that divides n = K'·2^p with a
smaller K' would need an odd part dividing K''s smaller odd part); ours only turns the reference's
assertion into a clear error for sizes like 1032 = 172·6 that no K_h can factor.
"""
from __future__ import annotations

import functools
import math
from importlib import resources
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import QCompileError

# The reference's search order (largest first). K_h = 1 (pure powers of two) is the fallback.
HADAMARD_KH_ORDER: Tuple[int, ...] = (172, 156, 140, 124, 116, 108, 60, 52, 36, 28, 20, 12)
_DATA_FILE = "hadamard_kh.txt"


# --------------------------------------------------------------------------------------------
# tabulated H_K
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _tables() -> Dict[int, torch.Tensor]:
    """Parse the packed tables (hex rows, MSB = column 0, bit 1 = +1) and verify H·Hᵀ = K·I."""
    text = resources.files("qcompile").joinpath("data").joinpath(_DATA_FILE).read_text()
    tables: Dict[int, List[List[float]]] = {}
    current: Optional[int] = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("K "):
            current = int(line[2:])
            tables[current] = []
            continue
        bits = format(int(line, 16), f"0{current}b")
        tables[current].append([1.0 if b == "1" else -1.0 for b in bits])
    out = {}
    for k, rows in tables.items():
        h = torch.tensor(rows, dtype=torch.float64)
        if h.shape != (k, k) or not torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)):
            raise QCompileError(f"packaged Hadamard table for K={k} is corrupt (H·Hᵀ != K·I); reinstall qcompile")
        out[k] = h.to(torch.float32)
    missing = set(HADAMARD_KH_ORDER) - set(out)
    if missing:
        raise QCompileError(f"packaged Hadamard tables lack K={sorted(missing)}; reinstall qcompile")
    return out


def _is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def _find_kh(n: int) -> Optional[int]:
    for k in HADAMARD_KH_ORDER:
        if n % k == 0 and _is_pow2(n // k):
            return k
    return 1 if _is_pow2(n) else None


def is_supported_size(n: int) -> bool:
    """True when some K_h·2^p construction exists for n."""
    return n >= 1 and _find_kh(n) is not None


def nearest_supported_sizes(n: int) -> Tuple[Optional[int], Optional[int]]:
    """(largest supported size < n or None, smallest supported size > n)."""
    below, above = None, None
    for k in (1,) + HADAMARD_KH_ORDER:
        size = k
        while size <= 2 * max(n, 1) + k:
            if size < n and (below is None or size > below):
                below = size
            if size > n and (above is None or size < above):
                above = size
            size *= 2
    return below, above


def hadamard_factor(n: int) -> Tuple[int, torch.Tensor]:
    """(K_h, H_K) for n = K_h·2^p; H_K is a float32 CPU ±1 matrix ([[1.]] for powers of two).

    Raises QCompileError naming the nearest supported sizes when no construction exists.
    """
    n = int(n)
    k = _find_kh(n) if n >= 1 else None
    if k is None:
        if n < 1:
            raise QCompileError(f"no Hadamard construction for n={n}: the size must be positive")
        twos, odd = 0, n
        while odd % 2 == 0:
            twos, odd = twos + 1, odd // 2
        below, above = nearest_supported_sizes(n)
        near = " and ".join(str(s) for s in (below, above) if s is not None)
        raise QCompileError(
            f"no Hadamard construction for n={n} ({n} = 2^{twos}·{odd}); nearest supported sizes: {near} "
            f"(supported: K·2^p with K in {{1, {', '.join(map(str, sorted(HADAMARD_KH_ORDER)))}}})")
    if k == 1:
        return 1, torch.ones(1, 1, dtype=torch.float32)
    return k, _tables()[k].clone()


@functools.lru_cache(maxsize=64)
def _hk_on(k: int, transpose: bool, device: str, dtype: torch.dtype) -> torch.Tensor:
    h = _tables()[k]
    if transpose:
        h = h.T
    return h.contiguous().to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise QCompileError(f"the Hadamard transform needs a floating-point tensor, got {dtype}")
    # fp16/bf16 would lose bits in log2(n) butterfly sums; fp64 input keeps its precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def had_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """U_n·x (hadU) or, with ``transpose=True``, U_nᵀ·x (hadUt), over the last dim of x.

    O(n log n + n·K_h): p radix-2 butterflies (out-of-place, via reshapes) over each contiguous
    2^p chunk, then one K_h×K_h matmul across chunks, then the 1/√n scale. Computes in float32
    (float64 for float64 input) on x's device and returns x's dtype.
    """
    n = x.shape[-1]
    k, _ = hadamard_factor(n)
    p2 = n // k
    lead = x.shape[:-1]
    y = x.to(_compute_dtype(x.dtype)).reshape(-1, n).contiguous()
    rows = y.shape[0]
    half = 1
    while half < p2:
        # pairs (i, i + half) within each block of 2·half: natural (Sylvester) order, bit by bit.
        y = y.view(rows, n // (2 * half), 2, half)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        half *= 2
    y = y.reshape(rows, k, p2)
    if k > 1:
        y = torch.matmul(_hk_on(k, transpose, str(y.device), y.dtype), y)
    y = y.reshape(*lead, n) * (1.0 / math.sqrt(n))
    return y.to(x.dtype)


def _sylvester(m: int, dtype: torch.dtype) -> torch.Tensor:
    idx = torch.arange(m)
    parity = torch.zeros(m, m, dtype=torch.int64)
    anded = idx[:, None] & idx[None, :]
    while bool(anded.any()):
        parity ^= anded & 1
        anded = anded >> 1
    return (1 - 2 * parity).to(dtype)


def dense_hadamard(n: int, transpose: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The explicit orthonormal matrix U_n = (H_K ⊗ H_{2^p})/√n (or U_nᵀ), for tests and small n."""
    k, hk = hadamard_factor(n)
    hk = hk.to(torch.float64)
    if transpose:
        hk = hk.T.contiguous()  # torch.kron rejects some non-contiguous inputs
    u = torch.kron(hk, _sylvester(n // k, torch.float64)) / math.sqrt(n)
    return u.to(dtype)


def random_signs(n: int, seed: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ±1 vector of length n drawn from a CPU torch.Generator seeded with ``seed`` (device-independent)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    bits = torch.randint(0, 2, (int(n),), generator=gen)
    return (bits * 2 - 1).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# RHT of weights, Hessians and activations
#
# With U = U_n (dense_hadamard) and S_U = diag(SU) (input side, length n = in_features),
# S_V = diag(SV) (output side, length m = out_features), all as in the reference:
#   W̃ = U_mᵀ · S_V · W · S_U · U_n          (rht_weight: hadUt over both dims)
#   H̃ = U_nᵀ · S_U · H · S_U · U_n          (rht_hessian: hadUt over both dims)
#   W = S_V · U_m · W̃ · U_nᵀ · S_U          (unrht_weight, exact inverse for ±1 signs)
# so tr(W̃ H̃ W̃ᵀ) = tr(W H Wᵀ), and for the linear y = W·x:
#   y = SV ⊙ hadU_m( W̃ · hadUt_n(SU ⊙ x) )  (rht_input, then W̃, then rht_output)
# --------------------------------------------------------------------------------------------
def _check_signs(vec: torch.Tensor, size: int, name: str) -> None:
    if vec.dim() != 1 or vec.shape[0] != size:
        raise QCompileError(f"{name} must be a vector of length {size}, got shape {list(vec.shape)}")


def _had_rows_and_cols(X: torch.Tensor, transpose: bool) -> torch.Tensor:
    # over the last dim: X ↦ X·U_n (transpose) or X·U_nᵀ; then over the first dim via X.T.
    X = had_transform(X, transpose=transpose)
    return had_transform(X.T, transpose=transpose).T.contiguous()


def rht_weight(W: torch.Tensor, SU: torch.Tensor, SV: torch.Tensor) -> torch.Tensor:
    """W̃ = U_mᵀ·diag(SV)·W·diag(SU)·U_n for W [m, n] (out, in): hadUt over both dims, like the
    reference quantizer. SU (length n) is the input-side sign vector, SV (length m) the output side."""
    m, n = W.shape
    _check_signs(SU, n, "SU")
    _check_signs(SV, m, "SV")
    dt = _compute_dtype(W.dtype)
    X = W.to(dt) * SV.to(W.device, dt)[:, None] * SU.to(W.device, dt)[None, :]
    return _had_rows_and_cols(X, transpose=True)


def unrht_weight(W_tilde: torch.Tensor, SU: torch.Tensor, SV: torch.Tensor) -> torch.Tensor:
    """W = diag(SV)·U_m·W̃·U_nᵀ·diag(SU): the inverse of ``rht_weight`` for ±1 signs, and the weight
    the inference path realises for any real SU/SV (e.g. with a scale folded into SV)."""
    m, n = W_tilde.shape
    _check_signs(SU, n, "SU")
    _check_signs(SV, m, "SV")
    dt = _compute_dtype(W_tilde.dtype)
    X = _had_rows_and_cols(W_tilde.to(dt), transpose=False)
    return X * SV.to(X.device, dt)[:, None] * SU.to(X.device, dt)[None, :]


def rht_hessian(H: torch.Tensor, SU: torch.Tensor) -> torch.Tensor:
    """H̃ = U_nᵀ·diag(SU)·H·diag(SU)·U_n (hadUt over both dims), symmetrised against rounding."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise QCompileError(f"a Hessian must be square [n, n], got shape {list(H.shape)}")
    n = H.shape[0]
    _check_signs(SU, n, "SU")
    dt = _compute_dtype(H.dtype)
    s = SU.to(H.device, dt)
    X = _had_rows_and_cols(H.to(dt) * s[:, None] * s[None, :], transpose=True)
    return (X + X.T) * 0.5


def rht_input(x: torch.Tensor, SU: torch.Tensor) -> torch.Tensor:
    """Activation side at inference: x ↦ hadUt_n(SU ⊙ x) over the last dim (x [..., n])."""
    _check_signs(SU, x.shape[-1], "SU")
    dt = _compute_dtype(x.dtype)
    return had_transform(x.to(dt) * SU.to(x.device, dt), transpose=True)


def rht_output(y: torch.Tensor, SV: torch.Tensor) -> torch.Tensor:
    """Output side at inference: y ↦ SV ⊙ hadU_m(y) over the last dim (y [..., m])."""
    _check_signs(SV, y.shape[-1], "SV")
    dt = _compute_dtype(y.dtype)
    return had_transform(y.to(dt), transpose=False) * SV.to(y.device, dt)
