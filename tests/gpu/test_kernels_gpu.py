"""The compiled CUDA kernels on the GPU: the decode (the LOP3 intrinsic) is bit-exact against the
torch reference, and every batch family matches a float64 reference."""
import pytest
import torch

import qcompile as qc
from qcompile.kernels.library import KernelSpec, build
from qcompile.kernels.target import parse_target

pytestmark = pytest.mark.gpu
FMT = "int4-g128"


@pytest.fixture(scope="module")
def target():
    return parse_target("auto")


def random_packed(fmt, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(-2**31, 2**31 - 1, (n, k // 8), generator=gen, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(n, k // 128, generator=gen) * 4 - 2).to(torch.float16)
    return qc.formats.QuantizedWeight(fmt.name, (n, k), {"qweight": words, "scales": scales})


@pytest.mark.parametrize("m", [1, 4, 16])
def test_cuda_decode_bit_exact_through_the_kernel(target, m):
    """One-hot activation rows read decoded columns back exactly (1*w is exact in fp16, the other
    products are zeros), so this checks the decode intrinsic's values, every nibble position."""
    fmt = qc.formats.get(FMT)
    n, k = 256, 1024
    qw = random_packed(fmt, n, k, seed=m).to("cuda")
    spec = KernelSpec(FMT, n, k, m)
    fn = build([spec], target)[spec.name]
    ref = fmt.decode_fp16(qw.to("cpu"))
    for start in range(0, 64, m):  # columns 0..63: all 8 positions in 8 words and several groups
        cols = torch.arange(start, start + m) * 13 % k
        X = torch.zeros(m, k, dtype=torch.float16, device="cuda")
        X[torch.arange(m), cols.cuda()] = 1.0
        Y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        fn(X, qw.tensors["qweight"], qw.tensors["scales"], Y)
        # exact equality of values (a decoded -0.0 comes out as +0.0 after the zero-initialised sum;
        # the bit pattern of the decode itself is checked on llvm)
        got, want = Y.cpu(), ref[:, cols].T.contiguous()
        assert torch.isfinite(got).all() and torch.equal(got, want), f"columns {cols.tolist()}"


@pytest.mark.parametrize("n, k", [(4096, 4096), (11008, 4096), (768, 256)])
def test_cuda_fused_matmul_matches_float64(target, n, k):
    fmt = qc.formats.get(FMT)
    gen = torch.Generator().manual_seed(n + k)
    qw = fmt.quantize(torch.randn(n, k, generator=gen) * 0.05).to("cuda")
    ms = [1, 2, 4, 8, 16, 32, 64, 256]
    specs = [KernelSpec(FMT, n, k, m) for m in ms]
    ex = build(specs, target)
    W = fmt.decode_fp16(qw).double()
    for spec in specs:
        X = torch.randn(spec.m, k, device="cuda", dtype=torch.float16)
        Y = torch.full((spec.m, n), float("nan"), dtype=torch.float16, device="cuda")
        ex[spec.name](X, qw.tensors["qweight"], qw.tensors["scales"], Y)
        ref = X.double() @ W.T
        err = ((Y.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-3, (spec.name, err)
