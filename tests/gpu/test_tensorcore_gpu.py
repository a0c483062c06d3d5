"""The tensor-core kernels (qcompile.kernels.tensorcore) on the GPU, for every format: fused products
against float64 at M = 2, 8, 16, 64 (default configs and a few others), and the decoded values read
back exactly through the kernel with one-hot activations. Random codes cover every packed bit pattern."""
import pytest
import torch

import qcompile as qc
from qcompile.kernels.tensorcore import TensorCoreConfig, check_tc_config, tc_scheduled_func

pytestmark = pytest.mark.gpu
MS = (2, 8, 16, 64)
N, K = 1024, 2048


def build(funcs):
    """{name: scheduled PrimFunc} -> the compiled module's functions (as library.build names them)."""
    import tvm

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
                        for name, f in funcs.items()})
    major, minor = torch.cuda.get_device_capability(0)
    return tvm.compile(mod, target=tvm.target.Target({"kind": "cuda", "arch": f"sm_{major}{minor}"}))


def kernel_args(fmt, qw):
    return [qw.tensors[name] for name in fmt.tensor_specs(*qw.shape)]


def rel_err(fn, fmt, qw, m, seed=0):
    k = qw.shape[1]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    X = (torch.randn(m, k, device="cuda", generator=gen) / 8).to(torch.float16)
    Y = torch.full((m, qw.shape[0]), float("nan"), dtype=torch.float16, device="cuda")
    fn(X, *kernel_args(fmt, qw), Y)
    ref = X.double() @ fmt.decode_fp16(qw).double().T
    assert torch.isfinite(Y).all(), "unwritten or non-finite outputs"
    return ((Y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", qc.formats.names())
def test_fused_matmul_matches_float64(name):
    fmt = qc.formats.get(name)
    qw = fmt.random_weight(N, K, seed=5).to("cuda")
    ex = build({f"m{m}": tc_scheduled_func(fmt, N, K, m) for m in MS})
    for m in MS:
        err = rel_err(ex[f"m{m}"], fmt, qw, m, seed=m)
        assert err < 2e-3, (name, m, err)


CONFIGS = [
    TensorCoreConfig(n_tile=64, k_tile=128, warps_n=2, warps_k=2, units=4),
    TensorCoreConfig(n_tile=32, k_tile=128, warps_n=1, warps_k=4, stages=2),
    TensorCoreConfig(n_tile=64, k_tile=128, warps_n=4, warps_k=2),
    TensorCoreConfig(m_tile=16, n_tile=64, k_tile=64, warps_n=2, warps_k=2),  # several M tiles at M=64
    TensorCoreConfig(m_tile=64, n_tile=64, k_tile=64, warps_m=2, warps_n=2, warps_k=1),
    TensorCoreConfig(m_tile=128, n_tile=64, k_tile=32, warps_m=2, warps_n=2, warps_k=1, units=2),
]


CONFIG_MS = (8, 20, 64)  # 20: padded up to the next M tile


def _fits(name, cfg, m):
    try:
        check_tc_config(cfg, N, K, m, qc.formats.get(name).decode_unit)
        return True
    except ValueError:  # e.g. units x decode unit over the 16-byte copies of a 32-column format
        return False


# only the (format, config) pairs the config tiles at some M, so that no case skips
CONFIG_CASES = [pytest.param(name, cfg, id=f"{name}-" + "-".join(f"{v}" for v in cfg.as_dict().values()))
                for cfg in CONFIGS for name in ["int4-g128", "e8p-2", "e8p-4", "qtip-hyb-2", "qtip-1mad-3"]
                if any(_fits(name, cfg, m) for m in CONFIG_MS)]


@pytest.mark.parametrize("name, cfg", CONFIG_CASES)
def test_configs_match_float64(name, cfg):
    fmt = qc.formats.get(name)
    qw = fmt.random_weight(N, K, seed=7).to("cuda")
    funcs = {f"m{m}": tc_scheduled_func(fmt, N, K, m, cfg) for m in CONFIG_MS if _fits(name, cfg, m)}
    ex = build(funcs)
    for fname in funcs:
        m = int(fname[1:])
        err = rel_err(ex[fname], fmt, qw, m, seed=m)
        assert err < 2e-3, (name, cfg, m, err)


@pytest.mark.parametrize("name", qc.formats.names())
@pytest.mark.parametrize("use_intrin", [True, False])
def test_decode_bit_exact_through_the_kernel(name, use_intrin, check_one_hot_decode):
    """Every position of a unit through the tensor-core kernel (the fp32 sum of zeros and one weight
    is exact too), with the format's intrinsic and with the TIR decode."""
    fmt = qc.formats.get(name)
    n, k, m = 256, 1024, 16
    qw = fmt.random_weight(n, k, seed=11)
    fn = build({"k": tc_scheduled_func(fmt, n, k, m, use_intrin=use_intrin)})["k"]
    check_one_hot_decode(fn, fmt, qw, m, f"{name} intrin={use_intrin}")
