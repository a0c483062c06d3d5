"""The RHT kernels (qcompile.kernels.hadamard) on the GPU against the torch reference: within one
fp16 step of the float64 result, and bit-identical to the fp32 reference where K_h = 1."""
import numpy as np
import pytest
import torch

from qcompile.kernels import hadamard as H
from qcompile.kernels.target import parse_target
from qcompile.quant.hadamard import hadamard_factor, rht_input, rht_output

pytestmark = pytest.mark.gpu
REFERENCE = {"input": rht_input, "output": rht_output}
SIZES = (4096, 11008, 28672)  # K_h = 1, 172 (172·64), 28 (28·1024: the largest shared-memory row)
BUCKETS = (1, 16)


@pytest.fixture(scope="module")
def kernels():
    specs = [spec for n in SIZES for spec in H.rht_specs(n, BUCKETS)]
    ex = H.build_rht(specs, parse_target("auto"))
    return {spec: ex[spec.name] for spec in specs}


def ulps_off(y, ref64):
    """As in tests/test_rht_kernels.py: fp16 steps from the rounded float64 value, the step at
    least 2^-20 of the row's largest |value| (fp32 round-off near zero)."""
    ref16 = ref64.to(torch.float16).numpy().astype(np.float64)
    floor = np.abs(ref64.numpy()).max(axis=-1, keepdims=True) * 2.0 ** -20
    spacing = np.maximum(np.spacing(np.abs(ref16).astype(np.float16)).astype(np.float64), floor)
    return np.abs(y.numpy().astype(np.float64) - ref16) / spacing


@pytest.mark.parametrize("side", H.SIDES)
@pytest.mark.parametrize("m", BUCKETS)
@pytest.mark.parametrize("n", SIZES)
def test_cuda_rht_matches_reference(kernels, n, m, side):
    if parse_target("auto").kind != "cuda":
        pytest.skip("no CUDA target here")
    gen = torch.Generator().manual_seed(n * 31 + m)
    x = torch.randn(m, n, generator=gen).to(torch.float16)
    s = ((torch.randint(0, 2, (n,), generator=gen) * 2 - 1) * 1.25).to(torch.float16)
    k, hk = hadamard_factor(n)
    y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
    kernels[H.RhtSpec(side, n, m)](x.cuda(), s.cuda(), hk.cuda(), y)
    torch.cuda.synchronize()
    y = y.cpu()
    assert not torch.isnan(y).any()
    ref64 = REFERENCE[side](x.double(), s)
    assert ulps_off(y, ref64).max() <= 1.0
    if k == 1:
        assert torch.equal(y, REFERENCE[side](x.float(), s).to(torch.float16))


@pytest.mark.parametrize("n", SIZES)
def test_cuda_rht_round_trip(kernels, n):
    """hadU(hadUt(x)) = x through the two kernels (unit signs), to fp16 accuracy."""
    if parse_target("auto").kind != "cuda":
        pytest.skip("no CUDA target here")
    m = 16
    x = torch.randn(m, n, generator=torch.Generator().manual_seed(n)).to(torch.float16).cuda()
    ones = torch.ones(n, dtype=torch.float16, device="cuda")
    hk = hadamard_factor(n)[1].cuda()
    mid = torch.empty_like(x)
    back = torch.empty_like(x)
    kernels[H.RhtSpec("input", n, m)](x, ones, hk, mid)
    kernels[H.RhtSpec("output", n, m)](mid, ones, hk, back)
    torch.cuda.synchronize()
    assert (back.float() - x.float()).abs().max().item() < 4e-2 * x.float().abs().max().item()
