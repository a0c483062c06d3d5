"""QuantLinear with the RHT in compiled CUDA kernels (qcompile::quant_linear_rht) on a 4096x4096
e8p-2 layer: the same outputs as the torch transforms, and CUDA-graph capture."""
import pytest
import torch

import qcompile as qc
from qcompile.kernels import library
from qcompile.kernels.library import KernelSpec, rht_kernel_specs
from qcompile.kernels.target import parse_target
from qcompile.runtime.linear import QuantLinear, kernel_module
from qcompile.runtime.module import load_kernels

pytestmark = pytest.mark.gpu
FORMAT = "e8p-2"
N = K = 4096
BUCKETS = (1, 16)


def random_e8p_weight(seed=0):
    """Random codes (quantizing 16M weights would take minutes): any codes are a valid weight."""
    fmt = qc.formats.get(FORMAT)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 65536, (N, K // 8), generator=gen)
    su = (torch.randint(0, 2, (K,), generator=gen) * 2 - 1).half()
    sv = (torch.randint(0, 2, (N,), generator=gen) * 2 - 1).half() * 0.03125
    return qc.formats.QuantizedWeight(FORMAT, (N, K), {**fmt.tensors_from_codes(codes), "SU": su, "SV": sv})


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    target = parse_target("auto")
    if target.kind != "cuda":
        pytest.skip("no CUDA target here")
    out = tmp_path_factory.mktemp("rht-gpu")
    specs = [KernelSpec(FORMAT, N, K, m) for m in BUCKETS]
    rht = rht_kernel_specs([(N, K)], BUCKETS)
    library.export(library.build(specs, target, rht=rht), target, str(out))
    module = load_kernels(str(out / "kernels.so"), str(out / "kernels.fatbin"), str(out / "kernels.cu"))
    qw = random_e8p_weight()
    lin = QuantLinear(qw, module, buckets=BUCKETS).cuda()
    assert lin.compiled_rht and kernel_module(lin.kernel_handle).device_type == "cuda"
    twin = QuantLinear(qw, lin.kernel_handle, compiled_rht=False).cuda()
    return lin, twin


@pytest.mark.parametrize("m", [1, 5, 16])
def test_compiled_rht_matches_torch_rht(layers, m):
    lin, twin = layers
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).half().cuda()
    with torch.no_grad():
        y, ref = lin(x), twin(x)
    torch.cuda.synchronize()
    assert y.shape == (m, N) and y.dtype == torch.float16 and not torch.isnan(y).any()
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-3, atol=2e-3 * scale)


def test_cuda_graph_capture(layers, check_graph_replay):
    lin, _ = layers
    # exact bucket, padded bucket, exact bucket
    check_graph_replay(lin, [torch.randn(m, K, device="cuda", dtype=torch.float16) for m in (1, 5, 16)])
