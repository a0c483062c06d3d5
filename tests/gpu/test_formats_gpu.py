"""Every format's compiled kernels on the GPU: decoded values bit-exact against the torch reference
(through the kernel, with one-hot activations) and fused products against float64, for the GEMV
(M <= 16) and tensor-core (M > 16) families. Random codes cover every packed bit pattern."""
import pytest
import torch

import qcompile as qc
from qcompile.kernels.library import KernelSpec, build
from qcompile.kernels.target import parse_target

pytestmark = pytest.mark.gpu
FORMATS = ["int4-g128", "e8p-2", "e8p-3", "e8p-4", "qtip-hyb-2", "qtip-3inst-2", "qtip-1mad-2"]


@pytest.fixture(scope="module")
def target():
    return parse_target("auto")


def kernel_args(fmt, qw):
    return [qw.tensors[name] for name in fmt.tensor_specs(*qw.shape)]


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("m", [1, 4, 16])
def test_decode_bit_exact_through_the_kernel(target, name, m, check_one_hot_decode):
    """The decode (intrinsic or TIR) at every position of a unit, through the kernel of bucket m."""
    fmt = qc.formats.get(name)
    qw = fmt.random_weight(256, 1024, seed=m)
    spec = KernelSpec(name, 256, 1024, m)
    check_one_hot_decode(build([spec], target)[spec.name], fmt, qw, m, f"{name} m={m}")


@pytest.mark.parametrize("name", FORMATS)
def test_fused_matmul_matches_float64(target, name):
    fmt = qc.formats.get(name)
    n, k = 1024, 2048
    qw = fmt.random_weight(n, k, seed=3)
    ms = [1, 2, 4, 8, 16, 32, 64]
    specs = [KernelSpec(name, n, k, m) for m in ms]
    ex = build(specs, target)
    W = fmt.decode_fp16(qw).double().cuda()
    args = kernel_args(fmt, qw.to("cuda"))
    for spec in specs:
        X = (torch.randn(spec.m, k, device="cuda") / 8).to(torch.float16)
        Y = torch.full((spec.m, n), float("nan"), dtype=torch.float16, device="cuda")
        ex[spec.name](X, *args, Y)
        ref = X.double() @ W.T
        err = ((Y.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-3, (spec.name, err)


# K whose decode-unit count has a large odd factor (11008 = 344 E8P units = 688 QTIP tile rows = 1376
# int4 words, all 2^k * 43; 11136 = 1392 int4 words = 16 * 87): the default GEMV config keeps its
# threads along K and masks the units past K in a ragged last step
RAGGED_K = [("e8p-2", 11008), ("qtip-3inst-2", 11008), ("int4-g128", 11008), ("int4-g128", 11136)]


@pytest.mark.parametrize("name, k", RAGGED_K)
def test_ragged_k_gemv_matches_float64(target, name, k):
    from qcompile.kernels.library import default_gemv_config

    fmt = qc.formats.get(name)
    n = 256
    units = k // fmt.decode_unit
    specs = [KernelSpec(name, n, k, m) for m in (1, 2, 4)]
    cfgs = [default_gemv_config(n, k, spec.m, fmt.decode_unit, fmt.gemv_tile) for spec in specs]
    assert any(units % (cfg.threads_k * cfg.chunks) for cfg in cfgs)  # a ragged last K step
    qw = fmt.random_weight(n, k, seed=5)
    ex = build(specs, target)
    W = fmt.decode_fp16(qw).double().cuda()
    args = kernel_args(fmt, qw.to("cuda"))
    for spec, cfg in zip(specs, cfgs):
        # the activations end a NaN run early in one buffer: a unit past K read and summed would be NaN
        buf = torch.full((spec.m * k + 4096,), float("nan"), dtype=torch.float16, device="cuda")
        X = buf[:spec.m * k].view(spec.m, k)
        X.copy_((torch.randn(spec.m, k, device="cuda") / 8).to(torch.float16))
        Y = torch.full((spec.m, n), float("nan"), dtype=torch.float16, device="cuda")
        ex[spec.name](X, *args, Y)
        ref = X.double() @ W.T
        assert torch.isfinite(Y).all(), (spec.name, cfg)
        err = ((Y.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-3, (spec.name, cfg, err)
