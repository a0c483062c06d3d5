"""CUDA code generation and cross-compilation on a machine without a GPU."""
import shutil

import pytest

from qcompile.kernels.library import KernelSpec, build, compile_fatbin, cuda_source
from qcompile.kernels.target import parse_target
from qcompile.errors import QCompileError

SPECS = [KernelSpec("int4-g128", 512, 1024, m) for m in (1, 4, 16, 64, 128)]


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_codegen_for_each_arch(arch):
    src = cuda_source(build(SPECS, parse_target(arch)))
    for spec in SPECS:
        assert f"{spec.name}_kernel" in src
    assert "qc_decode_int4x8_f16(" in src  # GEMV kernels use the format's LOP3 decode intrinsic
    assert "lop3.b32" in src
    assert "mma.sync.aligned.m16n8k16" in src  # M=4..64 run on mma.sync
    assert "wmma::mma_sync" in src  # M=128 on the WMMA GEMM


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


@pytest.mark.parametrize("name, func", [("e8p-2", "qc_e8p2_decode32"), ("e8p-3", "qc_e8p3_decode32"),
                                        ("e8p-4", "qc_e8p4_decode32")])
def test_e8p_kernels_use_the_decode_intrinsic_and_compile(name, func):
    specs = [KernelSpec(name, 256, 1024, m) for m in (1, 16, 64)]
    src = cuda_source(build(specs, parse_target("sm_90")))
    assert f"{func}(" in src  # GEMV kernels decode a word pair with the hand-written §1.6 function
    assert "W_gather_local" in src  # the abs-table lookups are their own TIR stage, in registers
    assert "qc_hdot_pairs<4>(" in src  # the products of a 32-column unit in fp16 runs of 8: 4 HFMA2 each
    if shutil.which("nvcc") is not None:  # the injected device code must compile
        assert len(compile_fatbin(src, "sm_90")) > 1000
