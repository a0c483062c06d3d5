"""The RHT of RHT weights in the compiled kernels: qcompile build puts the Hadamard transform kernels
of every (side, size, M bucket) into the model's module, QuantLinear runs them through the custom op
qcompile::quant_linear_rht, and modules without them keep the torch transforms."""
import json

import pytest
import torch

import qcompile as qc
from qcompile.cli import format_manifest
from qcompile.errors import QCompileError
from qcompile.kernels import library
from qcompile.kernels.hadamard import RhtSpec
from qcompile.kernels.library import KernelSpec, rht_kernel_specs
from qcompile.kernels.target import parse_target
from qcompile.model.build import build
from qcompile.runtime.linear import QuantLinear, kernel_module
from qcompile.runtime.module import load_kernels

FORMAT = "e8p-2"  # always RHT
BUCKETS = (1, 4, 16)  # M = 1, 3, 5: an exact bucket and two padded ones
# the default model's linears: q/o 256x256 and k/v 128x256 (K_h = 1), gate/up 768x256 and down
# 256x768 (768 = 12·64: K_h = 12 on one side)
LAYERS = ["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def rht_artifact(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("rht-artifacts") / "tiny-e8p2-llvm"
    return build(default_model, FORMAT, "llvm", out, buckets=BUCKETS, progress=None)


@pytest.fixture(scope="module")
def rht_model(rht_artifact):
    return qc.load(rht_artifact)


def layer(model, path, index=0):
    return model.model.layers[index].get_submodule(path)


def torch_rht_twin(lin):
    """The same weight and kernels, with the transforms in torch (the fallback path)."""
    twin = QuantLinear(lin.quantized_weight(), lin.kernel_handle, compiled_rht=False)
    assert twin.rht and not twin.compiled_rht
    return twin


def assert_close_fp16(y, ref):
    # both paths round x' (the matmul input) to fp16; the compiled one also rounds the fp32 input to
    # fp16 before the transform and its output to fp16: a few fp16 steps of the largest values
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-3, atol=2e-3 * scale)


# --- build ---------------------------------------------------------------------------------------------------
def test_rht_kernel_specs_one_per_side_size_bucket():
    specs = rht_kernel_specs([(256, 256), (128, 256), (768, 256), (256, 768), (256, 256)], (1, 4))
    assert len(specs) == len(set(specs)) == (2 + 3) * 2
    assert {(s.side, s.n) for s in specs} == {("input", 256), ("input", 768), ("output", 128), ("output", 256),
                                              ("output", 768)}
    assert RhtSpec("input", 768, 4) in specs and rht_kernel_specs([], (1,)) == []


def test_artifact_module_holds_the_rht_kernels(rht_artifact, rht_model):
    manifest = json.loads((rht_artifact / "manifest.json").read_text())
    module = kernel_module(layer(rht_model, LAYERS[0]).kernel_handle).module
    names = set()
    for entry in manifest["layers"]:
        n, k = entry["shape"]
        assert entry["rht"] is True
        assert entry["rht_kernels"] == ([RhtSpec("input", k, m).name for m in BUCKETS]
                                        + [RhtSpec("output", n, m).name for m in BUCKETS])
        names.update(entry["rht_kernels"])
    assert len(names) == (2 + 3) * len(BUCKETS)  # inputs 256, 768; outputs 128, 256, 768; deduplicated
    for name in names:
        assert module.implements_function(name)
    assert "rht kernels     15" in format_manifest(manifest)
    for index in range(2):
        for path in LAYERS:
            assert layer(rht_model, path, index).compiled_rht


def test_layers_without_rht_list_no_rht_kernels(llvm_artifact):
    manifest = json.loads((llvm_artifact / "manifest.json").read_text())
    assert all("rht_kernels" not in entry and not entry["rht"] for entry in manifest["layers"])
    assert "rht kernels" not in format_manifest(manifest)


# --- runtime -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", LAYERS)
def test_compiled_rht_matches_torch_rht(rht_model, path):
    lin = layer(rht_model, path)
    twin = torch_rht_twin(lin)
    for m in (1, 3, 5):
        x = torch.randn(m, lin.in_features, generator=torch.Generator().manual_seed(m))
        with torch.no_grad():
            y, ref = lin(x), twin(x)
        assert y.shape == (m, lin.out_features) and y.dtype == x.dtype
        assert_close_fp16(y, ref)
        with torch.no_grad():  # fp16 input: the same result in fp16
            assert_close_fp16(lin(x.half()), ref)


def test_compiled_rht_batches_and_empty_input(rht_model):
    lin = layer(rht_model, "mlp.down_proj")
    twin = torch_rht_twin(lin)
    x = torch.randn(2, 13, lin.in_features, generator=torch.Generator().manual_seed(7))  # M = 26: 16 + 16 padded
    with torch.no_grad():
        assert_close_fp16(lin(x), twin(x))
        assert lin(torch.empty(0, lin.in_features)).shape == (0, lin.out_features)


@pytest.fixture(scope="module")
def matmul_only_module(tmp_path_factory):
    """A module with the matmul kernels of a 256x768 e8p-2 layer and no RHT kernels, like an
    artifact built before the RHT was compiled."""
    target = parse_target("llvm")
    out = tmp_path_factory.mktemp("matmul-only")
    library.export(library.build([KernelSpec(FORMAT, 256, 768, m) for m in BUCKETS], target), target, str(out))
    return load_kernels(str(out / "kernels.so"))


def test_torch_rht_when_the_module_lacks_rht_kernels(rht_model, matmul_only_module):
    lin = layer(rht_model, "mlp.down_proj")
    qw = lin.quantized_weight()
    old = QuantLinear(qw, matmul_only_module, buckets=BUCKETS)
    assert old.rht and not old.compiled_rht
    assert not kernel_module(old.kernel_handle).has_rht(256, 768)
    x = torch.randn(5, 768, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close_fp16(old(x), lin(x))
    with pytest.raises(QCompileError, match="no RHT kernels"):
        QuantLinear(qw, old.kernel_handle, compiled_rht=True)


def test_custom_op_fake_shape_and_opcheck(rht_model):
    from torch._subclasses.fake_tensor import FakeTensorMode

    lin = layer(rht_model, "mlp.up_proj")
    args = (lin.packed(), lin.SU, lin.SV, lin._hk_in, lin._hk_out, lin.kernel_handle, FORMAT, lin.out_features)
    assert lin._hk_in.dtype == lin._hk_out.dtype == torch.float32
    assert tuple(lin._hk_out.shape) == (12, 12) and tuple(lin._hk_in.shape) == (1, 1)
    with FakeTensorMode() as mode:
        x = torch.empty(7, lin.in_features, dtype=torch.float16)
        fake = [[mode.from_tensor(t) for t in args[0]]] + [mode.from_tensor(t) for t in args[1:5]]
        y = torch.ops.qcompile.quant_linear_rht(x, *fake, *args[5:])
    assert y.shape == (7, lin.out_features) and y.dtype == torch.float16
    x = torch.randn(5, lin.in_features, dtype=torch.float16)
    torch.library.opcheck(torch.ops.qcompile.quant_linear_rht.default, (x, *args),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(rht_model):
    lin = layer(rht_model, "mlp.down_proj")
    compiled = torch.compile(lin, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for m in (3, 20):
            x = torch.randn(m, lin.in_features)
            torch.testing.assert_close(compiled(x), lin(x))
