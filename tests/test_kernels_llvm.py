"""The same TIR the GPU runs, compiled for llvm: the decode is bit-exact against the torch
reference and the fused GEMV/GEMM matches a float64 reference within fp16 accumulation bounds."""
import pytest
import torch

import qcompile as qc
from qcompile.kernels.compute import matmul_func
from qcompile.kernels.library import KernelSpec, build, default_gemv_config
from qcompile.kernels.target import parse_target
from qcompile.errors import QCompileError

FMT = "int4-g128"


def random_packed(fmt, n, k, seed):
    """Random words (all 2^32 bit patterns possible, negative int32 included) and random scales."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(-2**31, 2**31 - 1, (n, k // 8), generator=gen, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(n, k // 128, generator=gen) * 4 - 2).to(torch.float16)
    return qc.formats.QuantizedWeight(fmt.name, (n, k), {"qweight": words, "scales": scales})


def test_tir_decode_is_bit_exact_on_llvm():
    import tvm
    from tvm import te

    fmt = qc.formats.get(FMT)
    n, k = 64, 512
    qw = random_packed(fmt, n, k, seed=3)
    bufs = {name: te.placeholder(spec.shape, spec.dtype, name=name)
            for name, spec in fmt.tensor_specs(n, k).items()}
    W = te.compute((n, k), lambda i, j: fmt.tir_decode(bufs, i, j), name="W")
    ex = tvm.compile(te.create_prim_func([*bufs.values(), W]), target=parse_target("llvm").tvm_target())
    out = torch.empty(n, k, dtype=torch.float16)
    ex["main"](qw.tensors["qweight"], qw.tensors["scales"], out)
    ref = fmt.decode_fp16(qw)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("m", [1, 3, 16, 64])
def test_fused_matmul_llvm_matches_float64(m):
    fmt = qc.formats.get(FMT)
    n, k = 96, 1024
    gen = torch.Generator().manual_seed(m)
    qw = fmt.quantize(torch.randn(n, k, generator=gen))
    X = torch.randn(m, k, generator=gen).half()
    spec = KernelSpec(FMT, n, k, m)
    ex = build([spec], parse_target("llvm"))
    Y = torch.full((m, n), float("nan"), dtype=torch.float16)
    ex[spec.name](X, qw.tensors["qweight"], qw.tensors["scales"], Y)
    ref = X.double() @ fmt.decode_fp16(qw).double().T
    err = ((Y.double() - ref).norm() / ref.norm()).item()
    # fp16 partial sums over 8 products (unit roundoff 2^-11 each) then fp32: well under 1e-3
    assert err < 1e-3


def test_gemv_configs_tile_real_shapes():
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672), (768, 256),
                 (128, 256), (13824, 5120), (10, 8 * 96)]:
        for m in (1, 4, 16):
            cfg = default_gemv_config(n, k, m)
            assert n % (cfg.rows * cfg.row_tile) == 0 and (k // 8) % (cfg.threads_k * cfg.chunks) == 0
            assert ((k // 8) // (cfg.threads_k * cfg.chunks)) % cfg.unroll == 0


def test_matmul_func_rejects_shapes_the_format_cannot_take():
    with pytest.raises(QCompileError, match="multiple of the group size"):
        matmul_func(qc.formats.get(FMT), 64, 200, 1)
