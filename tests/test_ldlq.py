"""BlockLDLQ: the block LDL factorisation, GPTQ equivalence at g=1, loss vs nearest rounding, errors.

Why LDLQ with g = 1 equals GPTQ/OPTQ run over the columns from last to first
-----------------------------------------------------------------------------
GPTQ (OBS form): when column j is rounded (q_j) with the columns F = {0..j-1} still free, the free
columns absorb the error optimally: w_F += (w_j − q_j)·H_jF·H_FF⁻¹. With H = C Cᵀ (C lower) and F a
leading index set, H_jF·H_FF⁻¹ = C_jF·C_FF⁻¹ = −C_jj·(C⁻¹)_jF (row j of C·C⁻¹ = I). Write
r_j = w_j − q_j and A_jk = −C_jj (C⁻¹)_jk (j > k), so w = W + r·A and Ŵ − W = −r(I − A). Since
L = C·diag(C)⁻¹ has L⁻¹ = diag(C)·C⁻¹ = I − A, r = (W − Ŵ)·L and the targets are
w = W + (W − Ŵ)(L − I): exactly LDLQ's x_k = W_k + Σ_{j>k} (W_j − Ŵ_j) L[j, k]. Same targets, so the
same roundings, for any rounding function.
"""
import pytest
import torch

from qcompile.errors import QCompileError
from qcompile.quant.hessian import damp
from qcompile.quant.ldlq import block_ldl, block_ldlq, nearest_rounding, proxy_loss

STEP = 0.25


def scalar_round(x):
    """4-bit symmetric grid with step 0.25; the state is the integer codes."""
    codes = torch.clamp(torch.round(x / STEP), -8, 7)
    return codes * STEP, codes.to(torch.int8)


def lattice_round(x):
    """Nearest point of the checkerboard lattice D_g (integer vectors with even sum), scaled by STEP."""
    y = x / STEP
    f = torch.round(y)
    odd = (f.sum(dim=1) % 2) != 0
    gap = y - f
    worst = gap.abs().argmax(dim=1)
    rows = torch.arange(y.shape[0])
    step = torch.where(gap[rows, worst] >= 0, 1.0, -1.0)
    f[rows[odd], worst[odd]] += step[odd]  # re-round the worst coordinate the other way
    return f * STEP, None


def correlated_hessian(n, seed, rank=None):
    gen = torch.Generator().manual_seed(seed)
    rank = rank or n // 4
    Z = torch.randn(4 * n, rank, dtype=torch.float64, generator=gen)
    X = Z @ torch.randn(rank, n, dtype=torch.float64, generator=gen)
    X += 0.05 * torch.randn(4 * n, n, dtype=torch.float64, generator=gen)
    X *= torch.rand(n, dtype=torch.float64, generator=gen) * 2 + 0.1  # uneven input scales
    return damp(X.T @ X / X.shape[0])


def random_weight(m, n, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(m, n, generator=gen) * 0.6


@pytest.mark.parametrize("g", [1, 4, 8, 16])
def test_block_ldl_factorises(g):
    H = correlated_hessian(32, seed=g)
    L, D = block_ldl(H, g)
    n, nb = 32, 32 // g
    assert D.shape == (nb, g, g)
    blocks = L.double().view(nb, g, nb, g)
    for i in range(nb):
        assert torch.equal(blocks[i, :, i, :], torch.eye(g, dtype=torch.float64))
        for k in range(i + 1, nb):
            assert not blocks[i, :, k, :].any()
    Dfull = torch.block_diag(*D.double().unbind(0))
    assert torch.allclose(L.double() @ Dfull @ L.double().T, H, rtol=1e-4, atol=1e-5)
    assert torch.allclose(D.double(), D.double().transpose(1, 2))


def gptq_obs_reference(W, H, round_fn):
    """Straight OBS-form GPTQ over columns n-1 .. 0 in float64 (no factorisation tricks)."""
    w = W.double().clone()
    Hd = H.double()
    q = torch.empty_like(w)
    for j in reversed(range(w.shape[1])):
        q[:, j] = round_fn(w[:, j:j + 1])[0][:, 0].double()
        if j:
            coef = torch.linalg.solve(Hd[:j, :j], Hd[:j, j])  # H_FF⁻¹ H_Fj (H symmetric)
            w[:, :j] += (w[:, j] - q[:, j])[:, None] * coef[None, :]
    return q


def gptq_cholesky_reference(W, H, round_fn):
    """The usual GPTQ loop (upper Cholesky of H⁻¹), run on the column-reversed problem."""
    rev = torch.arange(W.shape[1] - 1, -1, -1)
    w = W.double()[:, rev].clone()
    Hr = H.double()[rev][:, rev]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hr)), upper=True)
    q = torch.empty_like(w)
    for i in range(w.shape[1]):
        q[:, i] = round_fn(w[:, i:i + 1])[0][:, 0].double()
        err = (w[:, i] - q[:, i]) / U[i, i]
        w[:, i + 1:] -= err[:, None] * U[i, i + 1:][None, :]
    return q[:, rev.argsort()]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 8, 128])
def test_g1_equals_gptq(seed, chunk):
    m, n = 16, 24
    H = correlated_hessian(n, seed)
    W = random_weight(m, n, seed)
    res = block_ldlq(W, H, 1, scalar_round, chunk_size=chunk)
    ref_obs = gptq_obs_reference(W, H, scalar_round)
    ref_chol = gptq_cholesky_reference(W, H, scalar_round)
    assert torch.equal(ref_obs, ref_chol)
    # fp32 vs fp64 can flip a rounding that sits on a grid boundary; allow a stray one.
    assert (res.W_hat.double() != ref_obs).sum() <= 1
    assert abs(res.proxy_loss - proxy_loss(W, ref_obs, H)) <= 0.05 * res.proxy_loss


@pytest.mark.parametrize("g,round_fn", [(1, scalar_round), (8, scalar_round), (16, scalar_round),
                                        (8, lattice_round), (16, lattice_round)])
def test_ldlq_beats_nearest_rounding(g, round_fn):
    m, n = 32, 64
    for seed in range(4):
        H = correlated_hessian(n, seed)
        W = random_weight(m, n, seed)
        res = block_ldlq(W, H, g, round_fn, chunk_size=32)
        nearest = proxy_loss(W, nearest_rounding(W, g, round_fn), H)
        assert res.proxy_loss <= nearest, (seed, res.proxy_loss, nearest)
        assert res.proxy_loss == pytest.approx(proxy_loss(W, res.W_hat, H))
        # the weight is really on the grid the rounder defines
        codes = res.W_hat / STEP
        assert torch.equal(codes, torch.round(codes))
    # on these strongly correlated Hessians feedback should help a lot, not marginally
    assert res.proxy_loss < 0.8 * nearest


def test_states_in_block_order_and_determinism():
    m, n, g = 8, 48, 16
    H = correlated_hessian(n, 5)
    W = random_weight(m, n, 5)
    a = block_ldlq(W, H, g, scalar_round)
    b = block_ldlq(W.clone(), H.clone(), g, scalar_round)
    assert torch.equal(a.W_hat, b.W_hat) and a.proxy_loss == b.proxy_loss
    assert len(a.states) == n // g
    assert torch.equal(torch.cat(a.states, dim=1).float() * STEP, a.W_hat)
    assert a.factor_dtype == torch.float32


def test_chunking_matches_direct_feedback_formula():
    m, n, g = 12, 64, 8
    H = correlated_hessian(n, 9)
    W = random_weight(m, n, 9)
    L, _ = block_ldl(H, g)
    L = L.double()
    W_hat = torch.zeros(m, n, dtype=torch.float64)
    for b0 in range(n - g, -1, -g):  # x_k = W_k + (W − Ŵ)[:, >k] · L[>k, k]
        x = W.double()[:, b0:b0 + g] + (W.double() - W_hat)[:, b0 + g:] @ L[b0 + g:, b0:b0 + g]
        W_hat[:, b0:b0 + g] = scalar_round(x.float())[0].double()
    for chunk in (8, 24, 64, 1000):
        res = block_ldlq(W, H, g, scalar_round, chunk_size=chunk)
        assert (res.W_hat.double() != W_hat).sum() <= 1, chunk


def test_float64_fallback_when_float32_cholesky_fails():
    # 2×2 blocks [[1, 1-1e-9], [1-1e-9, 1]]: positive definite in float64, singular in float32.
    n = 16
    blk = torch.tensor([[1.0, 1 - 1e-9], [1 - 1e-9, 1.0]], dtype=torch.float64)
    H = torch.block_diag(*[blk] * (n // 2))
    assert torch.linalg.cholesky_ex(H.float())[1] != 0
    res = block_ldlq(random_weight(4, n, 0), H, 1, scalar_round)
    assert res.factor_dtype == torch.float64
    assert torch.isfinite(res.W_hat).all()


@pytest.mark.parametrize("kind", ["nan", "inf", "1d"])
def test_bad_weights_raise(kind):
    H = correlated_hessian(16, 0)
    W = random_weight(4, 16, 0)
    if kind == "nan":
        W[1, 2] = float("nan")
    elif kind == "inf":
        W[0, 0] = float("inf")
    else:
        W = W[0]
    with pytest.raises(QCompileError):
        block_ldlq(W, H, 8, scalar_round)


def test_bad_hessians_raise():
    W = random_weight(4, 16, 0)
    H = correlated_hessian(16, 0)
    with pytest.raises(QCompileError, match="16 input columns"):
        block_ldlq(W, correlated_hessian(32, 0), 8, scalar_round)
    with pytest.raises(QCompileError, match="square"):
        block_ldlq(W, H[:, :8], 8, scalar_round)
    with pytest.raises(QCompileError, match="positive semidefinite"):
        block_ldlq(W, H - 2.0 * torch.eye(16, dtype=torch.float64), 8, scalar_round)
    asym = H.clone()
    asym[0, 5] += 0.5
    with pytest.raises(QCompileError, match="symmetric"):
        block_ldlq(W, asym, 8, scalar_round)
    with pytest.raises(QCompileError, match="not positive definite even in float64"):
        block_ldlq(W, torch.zeros(16, 16), 8, scalar_round)  # undamped singular: damp() it
    with pytest.raises(QCompileError, match="divisor"):
        block_ldlq(W, H, 5, scalar_round)
    with pytest.raises(QCompileError, match="round_fn"):
        block_ldlq(W, H, 8, lambda x: (x[:, :1], None))


def test_proxy_loss_definition():
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(5, 8, dtype=torch.float64, generator=gen)
    dW = torch.randn(5, 8, dtype=torch.float64, generator=gen) * 0.1
    H = correlated_hessian(8, 4)
    expect = torch.trace(dW @ H @ dW.T) / torch.trace(W @ H @ W.T)
    assert proxy_loss(W, W + dW, H) == pytest.approx(float(expect), rel=1e-12)
    assert proxy_loss(W, W, H) == 0.0
