"""BlockLDLQ: adaptive rounding with linear feedback from a g-block LDL factorisation of H.

Math (QuIP# §4 / QTIP §3.2, re-derived here). For one weight row w (1×n) with error Δ = ŵ − w the
proxy loss is Δ H Δᵀ. Factor H = L D Lᵀ with L unit block-lower-triangular (g×g identity blocks on
the diagonal) and D block diagonal. Then Δ H Δᵀ = Σ_k e_k D_k e_kᵀ with e = Δ L, i.e.
e_k = Δ_k + Σ_{j>k} Δ_j L[j, k]. Rounding the blocks from the LAST to the first with

    x_k = W_k + Σ_{j>k} (W_j − Ŵ_j) · L[j, k],      Ŵ_k = round_fn(x_k)

makes e_k = Ŵ_k − x_k, exactly the rounding error of block k: each block only has to round well
in its own D_k metric, and errors of later blocks are compensated by the feedback. For g = 1 and a
scalar grid this is OPTQ/GPTQ run over the columns in reverse order (tests check it).

Factorisation from Cholesky: H = C Cᵀ (C lower). With B_k the k-th g×g diagonal block of C,
L = C · blockdiag(B_k)⁻¹ (unit diagonal blocks, still lower) and D_k = B_k B_kᵀ.

Efficiency: blocks are rounded in chunks of ``chunk_size`` columns (lazy batch updates): inside a
chunk the feedback uses small matmuls, and when a chunk is done its error is pushed into all
earlier columns with one [m × chunk] · [chunk × rest] GEMM. Rows are fully vectorised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch

from ..errors import QCompileError
from .hessian import check_hessian

RoundFn = Callable[[torch.Tensor], Tuple[torch.Tensor, object]]


@dataclass
class LDLQResult:
    """Output of ``block_ldlq``.

    ``W_hat``: the rounded weight (float32, W's device). ``states``: what ``round_fn`` returned
    beside each rounded block, in column-block order (block 0 = columns 0..g-1). ``proxy_loss``:
    tr(ΔW H ΔWᵀ)/tr(W H Wᵀ). ``factor_dtype``: the dtype the Cholesky succeeded in.
    """

    W_hat: torch.Tensor
    states: List[object]
    proxy_loss: float
    factor_dtype: torch.dtype


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of H: float32 first (fast), float64 when that fails or is not finite."""
    for dtype in (torch.float32, torch.float64):
        C, info = torch.linalg.cholesky_ex(H.to(dtype))
        if int(info) == 0 and bool(torch.isfinite(C).all()):
            return C
    eig = torch.linalg.eigvalsh(H.to("cpu", torch.float64)) if H.shape[0] <= 4096 else None
    detail = "" if eig is None else f" (eigenvalues from {float(eig.min()):.3g} to {float(eig.max()):.3g})"
    raise QCompileError(f"Hessian is not positive definite even in float64{detail}; damp it with "
                        f"qcompile.quant.damp(H, sigma) and raise sigma if it still fails")


def _block_ldl(H: torch.Tensor, g: int) -> Tuple[torch.Tensor, torch.Tensor]:
    n = H.shape[0]
    if g < 1 or n % g:
        raise QCompileError(f"block size {g} must be a positive divisor of the Hessian size {n}")
    C = _cholesky(H)
    nb = n // g
    B = C.view(nb, g, nb, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [nb, g, g] diagonal blocks
    eye = torch.eye(g, dtype=C.dtype, device=C.device).expand(nb, g, g)
    B_inv = torch.linalg.solve_triangular(B, eye, upper=False)
    L = torch.einsum("iakb,kbc->iakc", C.view(nb, g, nb, g), B_inv).reshape(n, n)
    L = torch.tril(L)  # exact zeros above the diagonal (the product can leave rounding dust there)
    L.view(nb, g, nb, g).diagonal(dim1=0, dim2=2).copy_(eye.permute(1, 2, 0))
    return L, B @ B.transpose(1, 2)


def block_ldl(H: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L, D_blocks) with H = L·blockdiag(D_blocks)·Lᵀ: L [n, n] unit block-lower-triangular (g×g
    identity diagonal blocks), D_blocks [n/g, g, g] symmetric positive definite.

    Returned in the dtype the Cholesky factorisation succeeded in (float32, else float64).
    """
    check_hessian(H)
    return _block_ldl(H, int(block_size))


def proxy_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with ΔW = Ŵ − W (0 when W H Wᵀ vanishes and ΔW = 0)."""
    if W.shape != W_hat.shape:
        raise QCompileError(f"proxy loss needs equal shapes, got {list(W.shape)} and {list(W_hat.shape)}")
    dt = torch.float64 if torch.float64 in (W.dtype, W_hat.dtype, H.dtype) else torch.float32
    dev = W.device
    W = W.to(dt)
    Hd = H.to(dev, dt)
    delta = W_hat.to(dev, dt) - W
    num = float(((delta @ Hd) * delta).sum(dtype=torch.float64))
    den = float(((W @ Hd) * W).sum(dtype=torch.float64))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def block_ldlq(W: torch.Tensor, H: torch.Tensor, block_size: int, round_fn: RoundFn, *,
               chunk_size: int = 128) -> LDLQResult:
    """Round W [m, n] (out, in; already RHT'd and scaled) column block by column block with
    BlockLDLQ under the (damped) Hessian H [n, n].

    ``round_fn(x)`` gets x [m, g] float32 and returns (x_hat [m, g], state); state is whatever the
    format needs later (codes, trellis states) and is collected in ``LDLQResult.states``. g =
    ``block_size`` (8 for E8P, 16 for the QTIP trellis, 1 for scalar grids = GPTQ). ``chunk_size``
    (a multiple of g) is the lazy-update width. Work runs on W's device in float32.
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise QCompileError(f"LDLQ needs a 2-D weight [out, in], got {list(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__}")
    m, n = W.shape
    g = int(block_size)
    if g < 1 or n % g:
        raise QCompileError(f"block size {block_size} must be a positive divisor of the input dim {n}")
    if not W.dtype.is_floating_point or not bool(torch.isfinite(W).all()):
        raise QCompileError("weight contains NaN/Inf (or is not floating point); cannot quantize it")
    check_hessian(H, n)
    chunk = max(g, (int(chunk_size) // g) * g)
    dev = W.device

    L, _ = _block_ldl(H.to(dev), g)
    factor_dtype = L.dtype
    L = L.to(torch.float32)
    Wf = W.to(torch.float32)
    target = Wf.clone()          # W plus feedback from every finished chunk
    W_hat = torch.empty_like(Wf)
    err = torch.empty_like(Wf)   # W − Ŵ for finished blocks
    states: List[object] = [None] * (n // g)

    for c1 in range(n, 0, -chunk):
        c0 = max(0, c1 - chunk)
        for b1 in range(c1, c0, -g):
            b0 = b1 - g
            x = target[:, b0:b1]
            if b1 < c1:  # feedback from the finished blocks of this chunk
                x = x + err[:, b1:c1] @ L[b1:c1, b0:b1]
            x_hat, state = round_fn(x.contiguous())
            if not isinstance(x_hat, torch.Tensor) or tuple(x_hat.shape) != (m, b1 - b0):
                raise QCompileError(f"round_fn must return a [{m}, {b1 - b0}] tensor, got "
                                    f"{list(x_hat.shape) if isinstance(x_hat, torch.Tensor) else type(x_hat).__name__}")
            W_hat[:, b0:b1] = x_hat
            err[:, b0:b1] = Wf[:, b0:b1] - W_hat[:, b0:b1]
            states[b0 // g] = state
        if c0 > 0:  # one GEMM pushes this chunk's error into all earlier columns
            target[:, :c0].addmm_(err[:, c0:c1], L[c0:c1, :c0])
    if not bool(torch.isfinite(W_hat).all()):
        raise QCompileError("LDLQ produced NaN/Inf: the Hessian is too ill-conditioned; damp it more")
    # float32 H keeps the loss a fast GEMM on GPUs with slow float64
    return LDLQResult(W_hat, states, proxy_loss(Wf, W_hat, H.to(dev, torch.float32)), factor_dtype)


def nearest_rounding(W: torch.Tensor, block_size: int, round_fn: RoundFn) -> torch.Tensor:
    """Round every g-column block independently (no feedback): the baseline LDLQ improves on."""
    m, n = W.shape
    g = int(block_size)
    if g < 1 or n % g:
        raise QCompileError(f"block size {block_size} must be a positive divisor of the input dim {n}")
    Wf = W.to(torch.float32)
    return torch.cat([round_fn(Wf[:, b:b + g].contiguous())[0] for b in range(0, n, g)], dim=1)
