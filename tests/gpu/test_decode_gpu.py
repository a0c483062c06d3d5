"""The decode-only kernel (qcompile.kernels.decode) on the GPU: the decoded weight equals the format's
torch decode bit for bit, for every format, at a small shape and at Llama shapes with an odd K
(11008 = 344 E8P units = 8 * 43); and QuantLinear's decode + cuBLAS route against its fused kernels
(bucket-16 launches, checked against float64 in test_mma_gpu / test_tensorcore_gpu)."""
import pytest
import torch

import qcompile as qc
from qcompile.kernels.decode import DecodeConfig, decode_scheduled_func
from qcompile.kernels.pipeline import compile_module

pytestmark = pytest.mark.gpu


def build(funcs):
    import tvm

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
                        for name, f in funcs.items()})
    major, minor = torch.cuda.get_device_capability(0)
    return compile_module(mod, tvm.target.Target({"kind": "cuda", "arch": f"sm_{major}{minor}"}))


def decoded(fn, fmt, qw):
    n, k = qw.shape
    W = torch.full((n, k), float("nan"), dtype=torch.float16, device="cuda")
    fn(*[qw.tensors[name] for name in fmt.tensor_specs(n, k)], W)
    torch.cuda.synchronize()
    return W


@pytest.mark.parametrize("name", qc.formats.names())
def test_decode_kernel_is_bit_exact(name):
    fmt = qc.formats.get(name)
    shapes = [(256, 1024), (4096, 11008)] if tuple(fmt.gemv_tile) == (1, 1) else [(256, 1024), (1024, 4096)]
    configs = {"default": None, "units2_lut1": DecodeConfig(threads=128, units=2, lut_shared=1),
               "unstaged": DecodeConfig(stage=0)}
    ex = build({f"{tag}_{n}_{k}": decode_scheduled_func(fmt, n, k, "cuda", cfg)
                for n, k in shapes for tag, cfg in configs.items()})
    for n, k in shapes:
        qw = fmt.random_weight(n, k, seed=n + k).to("cuda")
        ref = fmt.decode_fp16(qw)
        for tag in configs:
            W = decoded(ex[f"{tag}_{n}_{k}"], fmt, qw)
            bad = (W.view(torch.int16) != ref.view(torch.int16)).nonzero()
            assert len(bad) == 0, (name, n, k, tag, len(bad), bad[:4].tolist(),
                                   W[tuple(bad[0])].item(), ref[tuple(bad[0])].item())


@pytest.mark.parametrize("name", ["int4-g128", "e8p-2", "qtip-hyb-2"])
def test_quant_linear_decode_route_matches_float64(name, tmp_path):
    from qcompile.kernels import library
    from qcompile.kernels.decode import DecodeSpec
    from qcompile.kernels.library import KernelSpec
    from qcompile.kernels.target import parse_target
    from qcompile.runtime.linear import QuantLinear, kernel_module
    from qcompile.runtime.module import load_kernels

    fmt = qc.formats.get(name)
    n, k, buckets = 1024, 2048, (1, 4, 16)
    target = parse_target("auto")
    ex = library.build([KernelSpec(name, n, k, m) for m in buckets], target, decode=[DecodeSpec(name, n, k)])
    library.export(ex, target, str(tmp_path))
    def load():  # a module object per QuantLinear: each registers its own decode setting
        return load_kernels(str(tmp_path / "kernels.so"), str(tmp_path / "kernels.fatbin"), str(tmp_path / "kernels.cu"))

    qw = fmt.random_weight(n, k, seed=7)
    decode = QuantLinear(qw, load(), buckets=buckets, decode_min_m={name: 64}).cuda()
    fused = QuantLinear(qw, load(), buckets=buckets).cuda()  # bucket-16 launches at every M
    assert kernel_module(decode.kernel_handle).decodes(name, 200)
    assert not kernel_module(fused.kernel_handle).decodes(name, 200)
    for m in (64, 200):
        x = (torch.randn(m, k, device="cuda") / 8).half()
        with torch.no_grad():
            y, ref = decode(x).double(), fused(x).double()
        assert torch.isfinite(y).all()
        assert ((y - ref).norm() / ref.norm()).item() < 2e-3, (name, m)
