"""The decode-only kernel (qcompile.kernels.decode) and the large-M decode + cuBLAS route of the runtime."""
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

import qcompile as qc
from qcompile.kernels import library
from qcompile.kernels.decode import (DecodeConfig, DecodeSpec, block_threads, check_decode_config, decode_func,
                                     decode_scheduled_func, schedule_decode_cuda)
from qcompile.kernels.hadamard import rht_specs
from qcompile.kernels.library import (GEMV_MAX_M, MMA_DECODE_MIN_M, MMA_DECODE_MIN_M_M16, KernelSpec,
                                      default_decode_min_m)
from qcompile.kernels.pipeline import compile_module
from qcompile.kernels.target import parse_target
from qcompile.runtime.linear import QuantLinear, kernel_module, register_kernel_module


def _weight(fmt, n, k, seed=0):
    if fmt.always_rht:
        return fmt.random_weight(n, k, seed=seed)
    return fmt.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02)


def _run_llvm_decode(fmt, n, k, qw):
    import tvm

    ex = compile_module(tvm.IRModule({"main": decode_scheduled_func(fmt, n, k, "llvm")}), tvm.target.Target("llvm"))
    W = torch.full((n, k), float("nan"), dtype=torch.float16)
    ex["main"](*[qw.tensors[name].contiguous() for name in fmt.tensor_specs(n, k)], W)
    return W


@pytest.mark.parametrize("name", qc.formats.names())
def test_llvm_decode_is_the_torch_decode_bit_for_bit(name):
    fmt = qc.formats.get(name)
    n, k = 64, 512
    qw = _weight(fmt, n, k, seed=3)
    W = _run_llvm_decode(fmt, n, k, qw)
    assert torch.equal(W.view(torch.int16), fmt.decode_fp16(qw).view(torch.int16))


@pytest.mark.parametrize("name", ["int4-g128", "e8p-2", "e8p-4", "e8p-3", "qtip-hyb-2", "qtip-3inst-3", "qtip-1mad-4"])
def test_cuda_decode_compiles_for_sm90(name):
    import tvm

    fmt = qc.formats.get(name)
    n, k = 256, 1024
    ex = compile_module(tvm.IRModule({"main": decode_scheduled_func(fmt, n, k, "cuda")}),
                        tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    src = library.cuda_source(ex)
    intrin = fmt.decode_intrin("cuda")
    if intrin is not None:  # the format's hand-written unit decode is what runs
        body = src.split("__global__", 2)[2]
        assert re.search(r"\bqc_\w+\(", body)  # (names may come from the source's macros)
    # the decoded unit leaves registers in 16-byte stores
    assert "*(uint4*)(W_ptr" in src


def test_row_packed_words_are_vector_loads():
    import tvm

    ex = compile_module(tvm.IRModule({"main": decode_scheduled_func("e8p-2", 128, 1024, "cuda")}),
                        tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    body = library.cuda_source(ex).split("__global__", 2)[2]
    assert "*(int2*)(qidxs_local_ptr" in body  # one 8-byte load of a unit's four codes
    # staged stores: the block's tile in shared memory, then 16 bytes per lane at consecutive addresses
    assert "__shared__ alignas(64) uint4 W_shared" in body and "__syncthreads()" in body
    assert re.search(r"\*\(uint4\*\)\(W_ptr \+ .*\(\(int\)threadIdx.x\) \* 8\)\)\) = W_shared_ptr", body)


@pytest.mark.parametrize("name", ["qtip-hyb-2", "qtip-1mad-2", "e8p-2"])
def test_lut_shared_copies_tables_never_the_packed_weight(name):
    # regression: QTIP's trellis (not streamed into registers) was taken for a table and "copied" to
    # shared memory, a region of hundreds of MB that ptxas refused
    import tvm

    fmt = qc.formats.get(name)
    ex = compile_module(tvm.IRModule({"main": decode_scheduled_func(fmt, 256, 1024, "cuda",
                                                                  DecodeConfig(threads=128, units=2, lut_shared=1))}),
                        tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    shared = re.findall(r"__shared__ alignas\(\d+\) \w+ (\w+)\[(\d+)\]", library.cuda_source(ex))
    packed = set(fmt.streamed)
    assert not [buf for buf, _ in shared if buf.rsplit("_shared", 1)[0] in packed]
    assert sum(int(size) for _, size in shared) * 4 <= 48 * 1024  # fits a block's static shared memory
    if name == "qtip-hyb-2":  # the one table it has: HYB's 512x2 fp16 tlut
        assert [buf for buf, _ in shared if buf.startswith("tlut")]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("name", ["int4-g128", "e8p-2", "e8p-4", "qtip-hyb-2", "qtip-3inst-2", "qtip-1mad-3"])
def test_decode_knob_grid_compiles_for_sm90_with_nvcc(name):
    # the whole space the decode sweep times (python -m qcompile.bench.decode_sweep) must get through
    # ptxas: a config it refuses fails on the GPU machine only, as lut_shared did for QTIP
    import itertools

    import tvm

    fmt = qc.formats.get(name)
    funcs = {}
    for i, (t, u, lu, st) in enumerate(itertools.product((128, 256), (1, 2), (0, 1), (0, 1))):
        cfg = DecodeConfig(threads=t, units=u, lut_shared=lu, stage=st)
        funcs[f"c{i}"] = decode_scheduled_func(fmt, 256, 1024, "cuda", cfg).with_attr("global_symbol", f"c{i}")
    src = library.cuda_source(compile_module(tvm.IRModule(funcs), tvm.target.Target({"kind": "cuda", "arch": "sm_90"})))
    assert len(library.compile_fatbin(src, "sm_90")) > 1000


def test_default_decode_config_per_layout():
    from qcompile.kernels.decode import default_decode_config

    assert default_decode_config(qc.formats.get("e8p-2")).stage == 1
    assert default_decode_config(qc.formats.get("int4-g128")).stage == 1
    assert default_decode_config(qc.formats.get("qtip-hyb-2")) == DecodeConfig(stage=0, lut_shared=1)


def test_decode_config_errors():
    for cfg, msg in [(DecodeConfig(threads=48), "multiple of 32"), (DecodeConfig(threads=2048), "at most 1024"),
                     (DecodeConfig(units=0), "positive"), (DecodeConfig(lut_shared=2), "lut_shared"),
                     (DecodeConfig(stage=-1), "stage"),
                     (DecodeConfig(units=3), "units=3")]:
        with pytest.raises(ValueError, match=msg):
            check_decode_config(cfg, 64, 512, 32)
    # 3 rows x 3 units: no block of 32..256 threads divides them; staged, one row per block does
    with pytest.raises(ValueError, match="do not split"):
        check_decode_config(DecodeConfig(stage=0), 3, 96, 32)
    assert block_threads(DecodeConfig(), 3, 3) == 3
    # E8P, K = 11008: 344 units a row; staged blocks hold one row, unstaged ones any 256 units
    assert block_threads(DecodeConfig(), 64, 344) == 344 and block_threads(DecodeConfig(stage=0), 64, 344) == 256
    assert block_threads(DecodeConfig(), 64, 256) == 256 and block_threads(DecodeConfig(), 64, 128) == 256
    # int4, K = 11008: 1376 units a row (2^5 x 43): half a row per block, not 32-thread blocks
    assert block_threads(DecodeConfig(), 4096, 1376) == 688
    assert block_threads(DecodeConfig(), 16, 1100) == 550 and block_threads(DecodeConfig(), 4, 2 * 1021) == 1021
    assert block_threads(DecodeConfig(), 4, 32 * 1031) == 32
    with pytest.raises(ValueError, match="whole rows"):
        check_decode_config(DecodeConfig(), 16, 1031 * 32, 32)  # 1031 units a row: no whole rows, no part
    func = decode_func(qc.formats.get("e8p-2"), 16, 128)
    with pytest.raises(ValueError, match="units=3"):
        schedule_decode_cuda(func, DecodeConfig(units=3), 32)
    with pytest.raises(qc.QCompileError, match="group size"):
        decode_func(qc.formats.get("int4-g128"), 64, 100)  # the format's own shape check


def test_decode_spec_names_and_defaults():
    assert DecodeSpec("e8p-2", 4096, 11008).name == "decode_e8p_2_n4096_k11008"
    assert default_decode_min_m("int4-g128") == default_decode_min_m("e8p-2") == MMA_DECODE_MIN_M
    assert default_decode_min_m("qtip-3inst-2") == GEMV_MAX_M + 1
    assert default_decode_min_m("qtip-hyb-2") == 65  # on its fragment-native mma.sync kernel
    with pytest.raises(qc.QCompileError):
        default_decode_min_m("int5")


# --- the runtime route -------------------------------------------------------------------------------------
N, K = 128, 256
BUCKETS = (1, 4, 16)


def _module(tmp_path, fmt, rht=False):
    from qcompile.runtime.module import load_kernels

    target = parse_target("llvm")
    specs = [KernelSpec(fmt, N, K, m) for m in BUCKETS]
    rht_list = [*rht_specs(K, BUCKETS, ("input",)), *rht_specs(N, BUCKETS, ("output",))] if rht else []
    ex = library.build(specs, target, rht=rht_list, decode=[DecodeSpec(fmt, N, K)])
    library.export(ex, target, str(tmp_path))
    return load_kernels(str(tmp_path / "kernels.so"))


class _Counting:
    """Wraps a compiled function and counts its calls."""

    def __init__(self, func):
        self.func, self.calls = func, 0

    def __call__(self, *args):
        self.calls += 1
        return self.func(*args)


def test_quant_linear_takes_the_decode_route_from_its_threshold(tmp_path):
    fmt = qc.formats.get("int4-g128")
    module = _module(tmp_path, fmt.name)
    qw = _weight(fmt, N, K, seed=1)
    lin = QuantLinear(qw, module, buckets=BUCKETS, decode_min_m={fmt.name: 20})
    entry = kernel_module(lin.kernel_handle)
    decode = entry._decode[(fmt.name, N, K)] = _Counting(entry.decode_kernel(fmt.name, N, K))
    w = fmt.decode_fp16(qw).float()
    for m, decoded in [(19, 0), (20, 1), (300, 2)]:
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).half()
        with torch.no_grad():
            y = lin(x)
        assert decode.calls == decoded  # below the threshold the fused kernels, from it one decode per call
        ref = F.linear(x.float(), w)
        torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    assert entry.decodes(fmt.name, 20) and not entry.decodes(fmt.name, 19) and not entry.decodes("e8p-2", 10**6)
    # the same module object again: its settings must agree
    with pytest.raises(ValueError, match="decode_min_m"):
        register_kernel_module(module, BUCKETS, decode_min_m={fmt.name: 64})
    for bad in ({fmt.name: 0}, {fmt.name: True}, {3: 4}):
        with pytest.raises(ValueError, match="decode_min_m"):
            register_kernel_module(object(), BUCKETS, "cpu", decode_min_m=bad)


def test_decode_route_with_compiled_rht_matches_the_fused_route(tmp_path):
    fmt = qc.formats.get("e8p-2")
    module = _module(tmp_path, fmt.name, rht=True)
    qw = fmt.random_weight(N, K, seed=5)
    fused = QuantLinear(qw, module, buckets=BUCKETS, decode_min_m={fmt.name: 24})
    assert fused.compiled_rht
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(0)).half()
    with torch.no_grad():
        y_decode = fused(x)
        y_fused = torch.cat([fused(x[i:i + 20]) for i in (0, 20)])  # 20 rows: below the threshold
    ref = y_fused.float()
    torch.testing.assert_close(y_decode.float(), ref, rtol=3e-3, atol=3e-3 * ref.abs().max().item())


def test_missing_decode_kernel_is_a_clear_error(tmp_path):
    from qcompile.runtime.module import load_kernels

    target = parse_target("llvm")
    library.export(library.build([KernelSpec("int4-g128", N, K, m) for m in BUCKETS], target), target, str(tmp_path))
    module = load_kernels(str(tmp_path / "kernels.so"))
    fmt = qc.formats.get("int4-g128")
    lin = QuantLinear(_weight(fmt, N, K), module, buckets=BUCKETS, decode_min_m={fmt.name: 32})
    with pytest.raises(qc.QCompileError, match="decode_int4_g128_n128_k256 is not in the loaded module"):
        lin(torch.randn(32, K).half())


# --- build and load ---------------------------------------------------------------------------------------
def test_build_without_decode_route(default_model, tmp_path):
    from qcompile.model.build import build

    out = build(default_model, "int4-g128", "llvm", tmp_path / "art", progress=None, decode_min_m=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decode_min_m"] == {}
    assert all("decode_kernel" not in layer for layer in manifest["layers"])
    model = qc.load(out, device="cpu")
    lin = next(m for m in model.modules() if isinstance(m, QuantLinear))
    assert kernel_module(lin.kernel_handle).decode_min_m == {}
    with pytest.raises(qc.QCompileError, match="decode_min_m"):
        build(default_model, "int4-g128", "llvm", tmp_path / "bad", progress=None, decode_min_m=-1)
    assert not (tmp_path / "bad").exists()


def test_loaded_artifact_decodes_large_batches(llvm_artifact, tmp_path):
    model = qc.load(llvm_artifact, device="cpu")
    lin = next(m for m in model.modules() if isinstance(m, QuantLinear))
    entry = kernel_module(lin.kernel_handle)
    assert entry.decode_min_m == {"int4-g128": MMA_DECODE_MIN_M_M16}  # llvm: buckets 1, 4, 16, no 64
    w = qc.formats.get(lin.format).decode_fp16(lin.quantized_weight()).float()
    x = torch.randn(MMA_DECODE_MIN_M_M16 + 3, lin.in_features).half()
    with torch.no_grad():
        y = lin(x)
    ref = F.linear(x.float(), w, None if lin.bias is None else lin.bias.float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())


def test_malformed_decode_setting_in_manifest(llvm_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(llvm_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["decode_min_m"] = {"int4-g128": "many"}
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(qc.QCompileError, match="malformed"):
        qc.load(art, device="cpu")
