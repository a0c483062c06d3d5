"""Randomized Hadamard transform: tables, fast vs dense transform, K_h search order, RHT identities."""
import math
import os

import pytest
import torch

from qcompile.errors import QCompileError
from qcompile.quant import hadamard as had

SHARED_TABLES = "/work/shared/data/hadamard"


def _sizes():
    sizes = [k * 2 ** p for k in had.HADAMARD_KH_ORDER for p in (0, 1, 2)]
    return sizes + [2 ** p for p in range(0, 8)]


@pytest.mark.parametrize("k", had.HADAMARD_KH_ORDER)
def test_packaged_tables_are_hadamard(k):
    kh, hk = had.hadamard_factor(k)
    assert kh == k and hk.shape == (k, k)
    assert set(hk.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(hk.double() @ hk.double().T, k * torch.eye(k, dtype=torch.float64))


@pytest.mark.skipif(not os.path.isdir(SHARED_TABLES), reason="source tables not available")
@pytest.mark.parametrize("k", had.HADAMARD_KH_ORDER)
def test_packaged_tables_match_source_text(k):
    with open(os.path.join(SHARED_TABLES, f"had{k}.txt")) as f:
        rows = [line.strip() for line in f if line.strip()]
    src = torch.tensor([[1.0 if c == "+" else -1.0 for c in r] for r in rows])
    assert torch.equal(had.hadamard_factor(k)[1], src)


def test_h12_is_not_symmetric():
    # The transposes in hadU/hadUt only matter because the tabulated H_K are not symmetric.
    _, h12 = had.hadamard_factor(12)
    assert not torch.equal(h12, h12.T)
    assert not torch.allclose(had.dense_hadamard(24), had.dense_hadamard(24, transpose=True))


@pytest.mark.parametrize("n", _sizes())
def test_dense_is_orthonormal_and_fast_matches_dense(n):
    U = had.dense_hadamard(n)
    assert torch.allclose(U @ U.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(had.dense_hadamard(n, transpose=True), U.T)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(had.had_transform(x), x @ U.T, atol=1e-12)            # hadU(x) = U x
    assert torch.allclose(had.had_transform(x, transpose=True), x @ U, atol=1e-12)  # hadUt(x) = Uᵀ x
    # fp32 path and round trip hadUt(hadU(x)) = x
    x32 = x.float()
    assert torch.allclose(had.had_transform(x32).double(), x @ U.T, atol=1e-5)
    assert torch.allclose(had.had_transform(had.had_transform(x32), transpose=True), x32, atol=1e-5)


def test_dense_layout_is_kron_with_kh_slow_and_natural_sylvester():
    n, k, p2 = 48, 12, 4
    U = had.dense_hadamard(n) * math.sqrt(n)
    _, hk = had.hadamard_factor(k)
    for r in range(n):
        for c in range(n):
            sylvester = (-1) ** bin((r % p2) & (c % p2)).count("1")
            assert U[r, c] == hk[r // p2, c // p2] * sylvester


def test_dtype_shape_and_batch_dims_are_kept():
    x = torch.randn(2, 3, 40)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        y = had.had_transform(x.to(dt))
        assert y.dtype == dt and y.shape == x.shape
    ref = x.double() @ had.dense_hadamard(40).T
    assert torch.allclose(had.had_transform(x.to(torch.bfloat16)).double(), ref, atol=5e-2)
    with pytest.raises(QCompileError):
        had.had_transform(torch.ones(4, 8, dtype=torch.int32))


@pytest.mark.parametrize("n,kh", [(4096, 1), (8192, 1), (11008, 172), (12288, 12), (13824, 108), (5120, 20),
                                  (14336, 28), (28672, 28), (22016, 172), (10240, 20), (15360, 60),
                                  (57344, 28), (53248, 52)])
def test_reference_llama_sizes(n, kh):
    assert had.hadamard_factor(n)[0] == kh
    assert had.is_supported_size(n)


def test_search_order_when_several_kh_divide():
    # 240 = 60·4 = 20·12 = 12·20: 60, 20 and 12 all divide, only 60 leaves a power of two and it
    # also comes first in the reference order.
    assert had.hadamard_factor(240)[0] == 60
    # 172 divides 1032 but leaves 6; 12 divides too but leaves 86: no construction.
    with pytest.raises(QCompileError, match="n=1032"):
        had.hadamard_factor(1032)


def test_unsupported_sizes_name_the_nearest_supported_ones():
    with pytest.raises(QCompileError) as err:
        had.hadamard_factor(10920)
    msg = str(err.value)
    assert "n=10920" in msg and "2^3·1365" in msg and "nearest supported sizes: 10240 and 11008" in msg
    assert "\n" not in msg
    assert had.nearest_supported_sizes(10920) == (10240, 11008)
    for bad in (6, 10, 100, 10920):
        below, above = had.nearest_supported_sizes(bad)
        assert had.is_supported_size(below) and had.is_supported_size(above) and below < bad < above
        assert not any(had.is_supported_size(s) for s in range(below + 1, above))
    with pytest.raises(QCompileError):
        had.hadamard_factor(0)
    with pytest.raises(QCompileError, match="n=6"):
        had.had_transform(torch.ones(6))


def test_random_signs_deterministic_pm1():
    a = had.random_signs(1000, seed=3)
    assert torch.equal(a, had.random_signs(1000, seed=3))
    assert not torch.equal(a, had.random_signs(1000, seed=4))
    assert set(a.unique().tolist()) == {-1.0, 1.0} and a.dtype == torch.float32
    assert abs(float(a.mean())) < 0.15


def _signs(m, n):
    return had.random_signs(n, 1, dtype=torch.float64), had.random_signs(m, 2, dtype=torch.float64)


@pytest.mark.parametrize("m,n", [(24, 40), (16, 64), (56, 12)])
def test_rht_weight_matches_reference_formula_and_round_trips(m, n):
    gen = torch.Generator().manual_seed(m * n)
    W = torch.randn(m, n, dtype=torch.float64, generator=gen)
    SU, SV = _signs(m, n)
    Um, Un = had.dense_hadamard(m), had.dense_hadamard(n)
    Wt = had.rht_weight(W, SU, SV)
    # W̃ = U_mᵀ diag(SV) W diag(SU) U_n
    assert torch.allclose(Wt, Um.T @ torch.diag(SV) @ W @ torch.diag(SU) @ Un, atol=1e-12)
    assert torch.allclose(had.unrht_weight(Wt, SU, SV), W, atol=1e-12)
    assert torch.allclose(had.unrht_weight(had.rht_weight(W.float(), SU, SV), SU, SV).double(), W, atol=1e-5)


@pytest.mark.parametrize("m,n", [(24, 40), (56, 12)])
def test_rht_hessian_preserves_proxy_trace_and_linear_output(m, n):
    gen = torch.Generator().manual_seed(7)
    W = torch.randn(m, n, dtype=torch.float64, generator=gen)
    X = torch.randn(100, n, dtype=torch.float64, generator=gen)
    H = X.T @ X / 100
    SU, SV = _signs(m, n)
    Un = had.dense_hadamard(n)
    Ht = had.rht_hessian(H, SU)
    assert torch.allclose(Ht, Un.T @ torch.diag(SU) @ H @ torch.diag(SU) @ Un, atol=1e-12)
    Wt = had.rht_weight(W, SU, SV)
    assert torch.allclose(torch.trace(Wt @ Ht @ Wt.T), torch.trace(W @ H @ W.T))
    # inference: y = SV ⊙ hadU_m(W̃ · hadUt_n(SU ⊙ x)) equals x Wᵀ
    x = torch.randn(5, n, dtype=torch.float64, generator=gen)
    y = had.rht_output(had.rht_input(x, SU) @ Wt.T, SV)
    assert torch.allclose(y, x @ W.T, atol=1e-12)
    # with a scale folded into SV (what checkpoints store), unrht_weight is the realised weight
    scaled = had.unrht_weight(Wt, SU, SV * 3.0)
    assert torch.allclose(had.rht_output(had.rht_input(x, SU) @ Wt.T, SV * 3.0), x @ scaled.T, atol=1e-12)


def test_rht_rejects_wrong_sign_lengths():
    W = torch.randn(8, 16)
    with pytest.raises(QCompileError, match="SU"):
        had.rht_weight(W, torch.ones(8), torch.ones(8))
    with pytest.raises(QCompileError, match="SV"):
        had.rht_weight(W, torch.ones(16), torch.ones(16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(4, 11008)
    for t in (False, True):
        ref = had.had_transform(x.double(), transpose=t)
        got = had.had_transform(x.cuda(), transpose=t).cpu().double()
        assert torch.allclose(got, ref, atol=1e-4)
