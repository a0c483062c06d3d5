"""The tensor-core rule (qcompile.kernels.tensorcore) on a machine without a GPU: every format's fused
decode + matmul schedules and compiles for sm_90 with the default config and with non-default ones,
the CUDA source runs on tensor cores (WMMA) and uses the format's decode intrinsic, and configs that
do not fit a shape are refused with a one-line ValueError. (Values are checked on the GPU:
tests/gpu/test_tensorcore_gpu.py.)"""
import shutil

import pytest

import qcompile as qc
from qcompile.kernels.tensorcore import (TensorCoreConfig, check_tc_config, default_tc_config, schedule_tc_cuda,
                                         tc_scheduled_func)

N, K = 256, 512
MS = (2, 16, 64)
MS_FULL = (2, 4, 16, 64)  # for one format of each family (the slow QTIP-hyb decodes keep to MS)
FULL = ("int4-g128", "e8p-2", "qtip-3inst-2")
INTRIN_FUNC = {"int4-g128": "qc_decode_int4x8_f16", "e8p-2": "qc_e8p2_decode32", "e8p-3": "qc_e8p3_decode32",
               "e8p-4": "qc_e8p4_decode32"}


def compile_sm90(funcs):
    """CUDA source of the named scheduled funcs, compiled (TVM codegen) for sm_90."""
    import tvm

    from qcompile.kernels.library import cuda_source

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    return cuda_source(tvm.compile(mod, target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"})))


@pytest.mark.parametrize("name", qc.formats.names())
def test_every_format_compiles_on_tensor_cores(name):
    fmt = qc.formats.get(name)
    funcs = {f"k_m{m}": tc_scheduled_func(fmt, N, K, m) for m in (MS_FULL if name in FULL else MS)}
    src = compile_sm90(funcs)
    for fname in funcs:
        assert f"{fname}_kernel" in src
    assert "nvcuda::wmma::mma_sync" in src and "load_matrix_sync" in src
    if name in INTRIN_FUNC:  # the decode runs through the format's hand-written intrinsic
        assert f"{INTRIN_FUNC[name]}(" in src


@pytest.mark.parametrize("name", ["qtip-hyb-2", "qtip-3inst-2", "e8p-3"])
def test_kernel_takes_only_the_format_tensors(name):
    """The format's derived stages (HYB's uint32 tables, its stream slices) live inside the kernel: a
    stage left at the root became a global buffer of its own that nothing wrote (qtip-hyb-2 crashed
    the H100 that way). The one kernel's parameters are X, Y and the format's packed tensors."""
    import re

    fmt = qc.formats.get(name)
    src = compile_sm90({"k": tc_scheduled_func(fmt, N, K, 16)})
    (params,) = set(re.findall(r'extern "C" __global__ void __launch_bounds__\(\d+\) \w+\(([^)]*)\)', src))
    names = {p.strip().split()[-1].removesuffix("_ptr") for p in params.split(",")}
    assert names == {"X", "Y", *fmt.tensor_specs(N, K)}, params


@pytest.mark.parametrize("name", ["int4-g128", "e8p-2", "qtip-3inst-2"])
def test_plain_tir_decode_compiles(name):
    src = compile_sm90({"k": tc_scheduled_func(name, N, K, 16, use_intrin=False)})
    assert "wmma::mma_sync" in src
    assert "qc_decode" not in src and "qc_e8p" not in src


@pytest.mark.parametrize("name, m, cfg", [
    ("int4-g128", 16, TensorCoreConfig(n_tile=64, k_tile=128, warps_n=2, warps_k=2, units=4)),
    ("int4-g128", 4, TensorCoreConfig(n_tile=32, k_tile=128, warps_n=1, warps_k=4, stages=2)),
    ("e8p-2", 16, TensorCoreConfig(n_tile=64, k_tile=128, warps_n=4, warps_k=2, units=1)),
    ("e8p-4", 64, TensorCoreConfig(m_tile=64, n_tile=64, k_tile=64, warps_m=2, warps_n=2, warps_k=1)),
    ("int4-g128", 64, TensorCoreConfig(m_tile=16, n_tile=64, k_tile=64, warps_n=2, warps_k=2)),  # 4 M tiles
    ("int4-g128", 20, TensorCoreConfig(m_tile=16, n_tile=64, k_tile=64, warps_n=2, warps_k=2)),  # padded to 32
    ("qtip-hyb-2", 128, TensorCoreConfig(m_tile=128, n_tile=64, k_tile=32, warps_m=2, warps_n=2, warps_k=1)),
])
def test_non_default_configs_compile(name, m, cfg):
    src = compile_sm90({"k": tc_scheduled_func(name, N, K, m, cfg)})
    assert "wmma::mma_sync" in src


def test_gemm_default_compiles_and_nvcc_accepts_it():
    """Large M (two 128-row tiles, fp32 partial tile in dynamic shared memory) on a bigger shape."""
    from qcompile.kernels.library import compile_fatbin

    funcs = {"g": tc_scheduled_func("int4-g128", 1024, 1024, 256), "l": tc_scheduled_func("e8p-2", 1024, 2048, 8)}
    src = compile_sm90(funcs)
    assert "wmma::mma_sync" in src
    if shutil.which("nvcc") is not None:  # the generated CUDA (and the injected decode) must build
        assert len(compile_fatbin(src, "sm_90")) > 1000


def test_default_configs_tile_the_shapes():
    for n, k, m, unit in [(28672, 8192, 16, 32), (8192, 28672, 16, 32), (28672, 8192, 2, 8), (4096, 11008, 4, 16),
                          (8192, 28672, 64, 8), (11008, 4096, 1024, 8)]:
        cfg = default_tc_config(n, k, m, unit)
        check_tc_config(cfg, n, k, m, unit)
        assert (cfg.m_tile == 16) == (m <= 16)
        assert cfg.as_dict()["n_tile"] == cfg.n_tile and TensorCoreConfig(**cfg.as_dict()) == cfg


@pytest.mark.parametrize("cfg, n, k, words", [
    (TensorCoreConfig(n_tile=48), N, K, "n_tile 48"),
    (TensorCoreConfig(k_tile=96), N, K, "k_tile 96"),
    (TensorCoreConfig(warps_m=2, warps_n=4, warps_k=8, m_tile=32), N, K, "threads per block"),
    (TensorCoreConfig(n_tile=128, k_tile=512), N, 1024, "shared memory"),
    (TensorCoreConfig(vec=3), N, K, "vec 3"),
    (TensorCoreConfig(stages=3), N, K, "stages 3"),
    (TensorCoreConfig(m_tile=0), N, K, "m_tile must be a positive int"),
    (TensorCoreConfig(), 200, K, "does not divide N=200"),
])
def test_bad_config_raises_one_line(cfg, n, k, words):
    from qcompile.kernels.compute import matmul_func

    fmt = qc.formats.get("int4-g128")
    with pytest.raises(ValueError) as err:
        schedule_tc_cuda(matmul_func(fmt, n, k, 16, two_level=False), cfg, None, fmt.streamed, fmt.decode_unit)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_no_config_for_untileable_shape():
    with pytest.raises(ValueError, match="no tensor-core config tiles N=200"):
        default_tc_config(200, 512, 4, 8)


@pytest.mark.parametrize("name", ["qtip-3inst-2", "qtip-1mad-3"])
def test_library_routes_low_batch_to_tensor_cores_from_tc_min_m(name):
    """QTIP 1MAD/3INST: bucket M < tc_min_m (8; 3INST: 4) is a GEMV and M >= it (up to GEMV_MAX_M) a
    WMMA kernel. (The row-packed formats and QTIP HYB run M >= 2 on mma.sync: tests/test_mma_schedule.py.)"""
    from qcompile.kernels.library import GEMV_MAX_M, TC_MIN_M, KernelSpec, scheduled_func, tc_min_m
    from qcompile.kernels.target import parse_target

    assert tc_min_m(name) == {"qtip-3inst-2": 4, "qtip-1mad-3": TC_MIN_M}[name]  # 3INST's M=4: measured
    target = parse_target("sm_90")
    for m in (tc_min_m(name) - 1, tc_min_m(name), GEMV_MAX_M):
        text = scheduled_func(KernelSpec(name, N, K, m), target).script()
        assert ("wmma.matrix_a" in text) == (m >= tc_min_m(name)), (name, m)


def test_cuda_tensor_intrinsics_import_restores_inspect_stack():
    """The cheap-stack import of TVM's CUDA intrinsics leaves inspect.stack as it found it and gives
    the module with the WMMA intrinsics registered."""
    import inspect

    import tvm

    from qcompile.kernels.intrinsics import tvm_cuda_tensor_intrin

    original = inspect.stack
    module = tvm_cuda_tensor_intrin()
    assert inspect.stack is original
    group = module.get_wmma_intrin_group(load_scope="shared", store_scope="shared.dyn", in_dtype="float16",
                                         out_dtype="float32", trans_b=True)
    assert tvm.s_tir.TensorIntrin.get(group["compute"]) is not None
