"""Runtime: batch dispatch plans, QuantLinear on llvm kernels, and the qcompile::quant_linear op."""
import pytest
import torch
import torch.nn.functional as F

import qcompile as qc
from qcompile.kernels import library
from qcompile.kernels.library import DEFAULT_BUCKETS, GEMV_MAX_M, TUNED_BUCKETS, KernelSpec
from qcompile.kernels.target import parse_target
from qcompile.runtime.dispatch import check_buckets, plan_rows
from qcompile.runtime.linear import QuantLinear, kernel_module, register_kernel_module
from qcompile.runtime.module import load_kernels

FORMAT = "int4-g128"
N, K = 128, 256


# --- dispatch ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,plan", [
    (1, [(0, 1, 1)]),
    (3, [(0, 3, 4)]),
    (5, [(0, 5, 16)]),
    (16, [(0, 16, 16)]),
    (17, [(0, 17, 64)]),
    (300, [(0, 256, 256), (256, 44, 64)]),
    (130, [(0, 64, 64), (64, 64, 64), (128, 2, 4)]),  # 132 rows in 3 launches beat 256 rows in one
    # the 232-row tail: one padded 256 launch, not 64 + 64 + 64 + 40 (same rows, four weight reads)
    (1000, [(0, 256, 256), (256, 256, 256), (512, 256, 256), (768, 232, 256)]),
])
def test_plan_gemm_buckets(m, plan):
    # the fused GEMM buckets of --buckets 1,4,16,64,256 (the default before the decode + cuBLAS route)
    assert plan_rows(m, (1, 4, 16, 64, 256)) == plan


def test_default_buckets_are_the_low_batch_families():
    # above 16 rows: bucket-16 launches, then decode + cuBLAS (qcompile.runtime.linear)
    assert DEFAULT_BUCKETS == (1, 4, 16)
    assert plan_rows(40, DEFAULT_BUCKETS) == [(0, 16, 16), (16, 16, 16), (32, 8, 16)]


@pytest.mark.parametrize("m,plan", [
    (1, [(0, 1, 1)]), (2, [(0, 2, 2)]), (3, [(0, 3, 4)]), (5, [(0, 5, 8)]), (9, [(0, 9, 16)]),
    (16, [(0, 16, 16)]),
    (17, [(0, 17, 32)]),                       # past the GEMV family: the smallest GEMM bucket
    (48, [(0, 48, 64)]),
    (80, [(0, 64, 64), (64, 16, 16)]),          # 80 rows in two launches beat 128 in one
    (100, [(0, 100, 128)]),                     # 128 in one launch beat 64 + 32 + 4
    (512, [(0, 512, 512)]),
    (513, [(0, 512, 512), (512, 1, 1)]),        # >= 512: blocks of 512, then the tail
    (1000, [(0, 512, 512), (512, 488, 512)]),
    (1100, [(0, 512, 512), (512, 512, 512), (1024, 64, 64), (1088, 12, 16)]),
])
def test_plan_tuned_buckets(m, plan):
    assert TUNED_BUCKETS == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert plan_rows(m, TUNED_BUCKETS) == plan


@pytest.mark.parametrize("buckets", [DEFAULT_BUCKETS, TUNED_BUCKETS, (1, 4, 16), (1, 4), (8,), (2, 32, 128)])
def test_plan_covers_every_row_once(buckets):
    for m in range(0, 1100):
        plan = plan_rows(m, buckets)
        row = 0
        for start, used, bucket in plan:
            assert start == row and 0 < used <= bucket and bucket in buckets
            row += used
        assert row == m
        assert all(used == bucket for _, used, bucket in plan[:-1])  # only the last block is padded
        if 0 < m <= GEMV_MAX_M and m <= max(buckets):
            assert len(plan) == 1


def test_plan_without_gemm_buckets_splits_by_largest():
    assert plan_rows(100, (1, 4, 16)) == [(i * 16, 16, 16) for i in range(6)] + [(96, 4, 4)]
    assert plan_rows(10, (1, 4)) == [(0, 4, 4), (4, 4, 4), (8, 2, 4)]


def test_check_buckets():
    assert check_buckets([16, 1, 4, 4]) == (1, 4, 16)
    for bad in ([], [0, 4], [-1]):
        with pytest.raises(ValueError):
            check_buckets(bad)
    with pytest.raises(ValueError):
        plan_rows(-1, DEFAULT_BUCKETS)


# --- QuantLinear on llvm kernels ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    target = parse_target("llvm")
    specs = [KernelSpec(FORMAT, N, K, m) for m in DEFAULT_BUCKETS]
    out = tmp_path_factory.mktemp("kernels")
    library.export(library.build(specs, target), target, str(out))
    return load_kernels(str(out / "kernels.so"))


@pytest.fixture(scope="module")
def layer(kernels):
    fmt = qc.formats.get(FORMAT)
    gen = torch.Generator().manual_seed(0)
    qw = fmt.quantize(torch.randn(N, K, generator=gen))
    bias = torch.randn(N, generator=gen)
    return QuantLinear(qw, kernels, bias=bias), fmt.decode_fp16(qw).float(), bias.half().float()


def reference(x, w, bias):
    # what the kernels compute: fp16 activations times the fp16 decoded weights, fp16 bias
    return F.linear(x.half().float(), w, bias)


def assert_close_fp16(y, ref):
    # The kernels round the output to fp16 (relative 2^-11) and sum each 8-column chunk in fp16
    # before the fp32 accumulation: a few fp16 ulps of the largest partial sums.
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3 * scale)


@pytest.mark.parametrize("shape", [(1, K), (3, K), (5, K), (16, K), (17, K), (300, K), (2, 5, K), (2, 3, 4, K)])
def test_quant_linear_matches_decoded_weights(layer, shape):
    lin, w, bias = layer
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape) * 1000 + shape[0]))
    with torch.no_grad():
        y = lin(x)
    assert y.shape == (*shape[:-1], N) and y.dtype == x.dtype
    assert_close_fp16(y, reference(x, w, bias))


def test_quant_linear_dtypes_and_empty_batch(layer):
    lin, w, bias = layer
    x = torch.randn(4, K)
    with torch.no_grad():
        y16 = lin(x.half())
        assert y16.dtype == torch.float16
        assert_close_fp16(y16, reference(x, w, bias))
        assert lin(torch.empty(0, K)).shape == (0, N)
        with pytest.raises(ValueError, match="features"):
            lin(torch.randn(2, K + 8))


def test_quant_linear_state_dict_names(layer):
    lin, _, _ = layer
    assert list(lin.state_dict()) == ["qweight", "scales", "bias"]
    assert lin.quantized_weight().shape == (N, K)


def test_registry_reuses_handles(kernels, layer):
    lin, _, _ = layer
    assert register_kernel_module(kernels) == lin.kernel_handle
    entry = kernel_module(lin.kernel_handle)
    assert entry.device_type == "cpu" and entry.buckets == DEFAULT_BUCKETS
    with pytest.raises(qc.QCompileError, match="no kernel module"):
        kernel_module(10**6)
    with pytest.raises(qc.QCompileError, match="not in the loaded module"):
        entry.kernels(FORMAT, N, K * 2)


# --- the custom op -----------------------------------------------------------------------------------------
def test_custom_op_fake_shape(layer):
    from torch._subclasses.fake_tensor import FakeTensorMode

    lin, _, _ = layer
    assert hasattr(torch.ops.qcompile, "quant_linear")
    with FakeTensorMode() as mode:
        x = torch.empty(7, K, dtype=torch.float16)
        packed = [mode.from_tensor(t) for t in lin.packed()]
        y = torch.ops.qcompile.quant_linear(x, packed, lin.kernel_handle, FORMAT, N)
    assert y.shape == (7, N) and y.dtype == torch.float16


def test_custom_op_opcheck(layer):
    lin, _, _ = layer
    x = torch.randn(5, K, dtype=torch.float16)
    torch.library.opcheck(torch.ops.qcompile.quant_linear.default,
                          (x, lin.packed(), lin.kernel_handle, FORMAT, N),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile(layer):
    # aot_eager traces through the fake impl like inductor does, without needing a C++ toolchain
    lin, w, bias = layer
    compiled = torch.compile(lin, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for m in (3, 20):
            x = torch.randn(m, K)
            assert_close_fp16(compiled(x), reference(x, w, bias))
