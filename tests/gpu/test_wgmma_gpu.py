"""The Hopper wgmma GEMM (qcompile.kernels.wgmma) on the GPU: every weight read back exactly through the kernel
(one-hot activations: each output is one decoded weight times 1, exact in fp32 and in the fp16 store) and
random activations against float64, for fp16, int4's variants and the E8P / QTIP formats (their TIR decode
in the B staging), with and without warp specialisation."""
import pytest
import torch

import qcompile as qc
from qcompile.kernels.wgmma import WgmmaConfig, wgmma_gemm_func

pytestmark = pytest.mark.gpu

M, N, K = 256, 512, 1024
CONFIGS = [
    (None, WgmmaConfig(bn=128, stages=4)),
    ("int4-g128", WgmmaConfig(bn=128, stages=4, prefetch=0)),
    ("int4-g128", WgmmaConfig(bn=256, stages=4, prefetch=1, decode_intrin=True)),
    ("int4-g128", WgmmaConfig(bn=256, stages=4, prefetch=2, word_vec=4, decode_intrin=True)),
    ("int4-g128", WgmmaConfig(bn=128, stages=3, wg_inflight=0, prefetch=2, word_vec=4, decode_intrin=True)),
    (None, WgmmaConfig(bn=256, stages=4, warp_specialized=True)),
    ("int4-g128", WgmmaConfig(bn=256, stages=4, prefetch=2, word_vec=4, decode_intrin=True, warp_specialized=True)),
    ("int4-g128", WgmmaConfig(bn=128, stages=3, prefetch=1, warp_specialized=True)),
    # any other format: its own tensors, its TIR decode where the unit is loaded
    ("e8p-2", WgmmaConfig(bn=128, prefetch=0)),
    ("e8p-4", WgmmaConfig(bn=256, prefetch=0, warp_specialized=True)),
    ("qtip-hyb-2", WgmmaConfig(bn=128, prefetch=0)),
    ("qtip-3inst-2", WgmmaConfig(bn=256, prefetch=0, warp_specialized=True)),
    ("qtip-1mad-3", WgmmaConfig(bn=128, prefetch=0)),
    # ... and with their decode intrinsics (gathered words staged in registers, the rest by pointer)
    ("e8p-2", WgmmaConfig(bn=256, prefetch=0, decode_intrin=True)),
    ("e8p-3", WgmmaConfig(bn=128, prefetch=0, decode_intrin=True)),
    ("e8p-4", WgmmaConfig(bn=256, prefetch=0, decode_intrin=True, warp_specialized=True)),
    ("qtip-hyb-2", WgmmaConfig(bn=256, prefetch=0, decode_intrin=True, warp_specialized=True)),
    ("qtip-3inst-2", WgmmaConfig(bn=128, prefetch=0, decode_intrin=True)),
    ("qtip-1mad-2", WgmmaConfig(bn=128, prefetch=0, decode_intrin=True)),
]


def _hopper():
    major, _ = torch.cuda.get_device_capability(0)
    if major != 9:
        pytest.skip("wgmma needs a Hopper GPU (sm_90a)")


@pytest.mark.parametrize("name,cfg", CONFIGS, ids=lambda c: c if isinstance(c, str) or c is None else
                         "-".join(f"{k}{int(v)}" for k, v in c.as_dict().items()))
def test_wgmma_reads_every_weight_back_and_matches_float64(name, cfg):
    from qcompile.bench.wgmma_sweep import load_kernel

    _hopper()
    fmt = qc.formats.get(name) if name else None
    if fmt is None:
        W = (torch.randn(N, K, device="cuda") / 4).to(torch.float16)
        args = [W, torch.zeros(1, device="cuda", dtype=torch.float16)]
    else:
        qw = fmt.random_weight(N, K, seed=3).to("cuda")  # random codes: every bit pattern of a word
        W = fmt.decode_fp16(qw)
        args = [qw.tensors[t] for t in fmt.tensor_specs(N, K)]
    kernel = load_kernel(wgmma_gemm_func(fmt, N, K, M, cfg))
    rows = torch.arange(M, device="cuda")
    for offset in range(K // M):  # row i picks column i * (K // M) + offset: all K columns over the offsets
        X = torch.zeros(M, K, device="cuda", dtype=torch.float16)
        cols = rows * (K // M) + offset
        X[rows, cols] = 1
        Y = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
        kernel(X, *args, Y)
        torch.cuda.synchronize()
        assert torch.equal(Y.view(torch.int16), W[:, cols].T.contiguous().view(torch.int16)), (name, cfg, offset)
    X = (torch.randn(M, K, device="cuda") / 8).to(torch.float16)
    Y = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
    kernel(X, *args, Y)
    torch.cuda.synchronize()
    ref = X.double() @ W.double().T
    assert torch.isfinite(Y).all()
    assert ((Y.double() - ref).norm() / ref.norm()).item() < 2e-3, (name, cfg)
