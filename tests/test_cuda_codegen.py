"""CUDA code generation and cross-compilation on a machine without a GPU."""
import shutil

import pytest

from qcompile.kernels.library import KernelSpec, build, compile_fatbin, cuda_source
from qcompile.kernels.target import parse_target
from qcompile.errors import QCompileError

SPECS = [KernelSpec("int4-g128", 512, 1024, m) for m in (1, 4, 16, 64)]


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_codegen_for_each_arch(arch):
    src = cuda_source(build(SPECS, parse_target(arch)))
    for spec in SPECS:
        assert f"{spec.name}_kernel" in src
    assert "qc_decode_int4x8_f16(" in src  # GEMV kernels use the format's LOP3 decode intrinsic
    assert "lop3.b32" in src
    assert "wmma::mma_sync" in src  # M=64 runs on tensor cores


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_nvcc_compiles_a_fatbin_for_sm90():
    binary = compile_fatbin(cuda_source(build(SPECS[:2], parse_target("h100"))), "sm_90")
    assert len(binary) > 1000


@pytest.mark.parametrize("name, key", [("h100", "cuda-sm_90"), ("sm_89", "cuda-sm_89"), ("a100", "cuda-sm_80"),
                                       ("llvm", "llvm"), ("SM_90a", "cuda-sm_90")])
def test_target_names(name, key):
    assert parse_target(name).key == key


@pytest.mark.parametrize("name", ["tpu", "sm_70", "cuda"])
def test_bad_targets(name):
    with pytest.raises(QCompileError):
        parse_target(name)
