"""The randomized Hadamard transform as compiled TVM kernels (qcompile.kernels.hadamard): the llvm
kernels against the torch reference, CUDA code generation for sm_90, and the size errors."""
import shutil

import numpy as np
import pytest
import torch

from qcompile.errors import QCompileError
from qcompile.kernels import hadamard as H
from qcompile.kernels.library import compile_fatbin, cuda_source
from qcompile.kernels.target import parse_target
from qcompile.quant.hadamard import hadamard_factor, rht_input, rht_output

REFERENCE = {"input": rht_input, "output": rht_output}
LLVM = parse_target("llvm")


def _inputs(n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=gen).to(torch.float16)
    # scaled signs, like the formats store them (±su in fp16)
    s = ((torch.randint(0, 2, (n,), generator=gen) * 2 - 1) * 1.25).to(torch.float16)
    return x, s


def run_rht(fn, x, s):
    import tvm

    k, hk = hadamard_factor(x.shape[1])
    y = tvm.runtime.tensor(np.zeros(tuple(x.shape), np.float16))
    fn(tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(s.numpy()), tvm.runtime.tensor(hk.numpy()), y)
    return torch.from_numpy(y.numpy())


def ulps_off(y, ref64):
    """|y - fp16(ref64)| in units of the fp16 spacing at the reference, where the spacing is at
    least 2^-20 of the row's largest |value|: near zero (fp16 subnormals, spacing 2^-24) the fp32
    round-off of the sums, not the fp16 rounding, is what remains (the fp32 torch reference is
    off there by the same few subnormal steps)."""
    ref16 = ref64.to(torch.float16).numpy().astype(np.float64)
    floor = np.abs(ref64.numpy()).max(axis=-1, keepdims=True) * 2.0 ** -20
    spacing = np.maximum(np.spacing(np.abs(ref16).astype(np.float16)).astype(np.float64), floor)
    return np.abs(y.numpy().astype(np.float64) - ref16) / spacing


# K_h = 1 (1024, 4096), 12 (768 = 12·64), 20 (1280 = 20·64), 28 (28·16: one radix group), 172 (172·4)
SIZES = [1024, 4096, 768, 1280, 448, 688]


@pytest.fixture(scope="module")
def llvm_kernels():
    specs = H.rht_specs(SIZES[0], (1, 3)) + [s for n in SIZES[1:] for s in H.rht_specs(n, (1, 3))]
    ex = H.build_rht(specs, LLVM)
    return {spec: ex[spec.name] for spec in specs}


@pytest.mark.parametrize("side", H.SIDES)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n", SIZES)
def test_llvm_kernel_matches_float64_reference(llvm_kernels, n, m, side):
    x, s = _inputs(n, m, seed=n + m)
    y = run_rht(llvm_kernels[H.RhtSpec(side, n, m)], x, s)
    ref64 = REFERENCE[side](x.double(), s)
    # fp32 arithmetic, one fp16 rounding: at most one fp16 step from the correctly rounded value
    assert ulps_off(y, ref64).max() <= 1.0
    k, _ = hadamard_factor(n)
    if k == 1:  # same butterflies in the same order as the fp32 torch reference: bit-identical
        assert torch.equal(y, REFERENCE[side](x.float(), s).to(torch.float16))


@pytest.mark.parametrize("groups", [[1] * 10, [4, 4, 2], [10]])
def test_any_radix_grouping_gives_the_same_bits(groups):
    """Grouping only changes which butterflies share registers, never the arithmetic."""
    import tvm

    n, m = 1024, 2
    x, s = _inputs(n, m, seed=5)
    mod = H.schedule_rht_llvm(H.rht_func(n, m, "input", groups))
    y = run_rht(tvm.compile(mod, target=LLVM.tvm_target())["main"], x, s)
    assert torch.equal(y, rht_input(x.float(), s).to(torch.float16))


@pytest.mark.parametrize("n", [1280, 4096])
def test_fp16_stage_storage_stays_close(n):
    """The fallback for large n on small-shared-memory GPUs: fp16 between radix groups."""
    import tvm

    m = 2
    x, s = _inputs(n, m, seed=9)
    mod = H.schedule_rht_llvm(H.rht_func(n, m, "output", store="float16"))
    y = run_rht(tvm.compile(mod, target=LLVM.tvm_target())["main"], x, s)
    ref64 = rht_output(x.double(), s)
    groups = len(H.rht_groups(n)) + (hadamard_factor(n)[0] > 1)
    err = (y.double() - ref64).abs().max().item()
    assert err <= groups * 2 ** -10 * ref64.abs().max().item()


def test_rht_groups_fit_the_thread_block():
    cfg = H.RhtConfig()
    for n in (256, 768, 4096, 8192, 11008, 14336, 28672, 32768):
        k, hk = hadamard_factor(n)
        groups = H.rht_groups(n, cfg)
        assert sum(groups) == (n // k).bit_length() - 1
        assert all(n >> r <= cfg.max_threads for r in groups)  # one radix unit per thread per group
    assert H.rht_groups(4096) == [3, 3, 3, 3]
    assert H.rht_groups(28672) == [5, 5]  # 28·1024: 896 threads


def test_store_dtype_follows_shared_memory():
    assert H.rht_store_dtype(28672, "sm_90") == "float32"  # 126 KiB of 227
    assert H.rht_store_dtype(28672, "sm_80") == "float32"  # of 163
    assert H.rht_store_dtype(28672, "sm_89") == "float16"  # fp32 would need 126 KiB of 99
    assert H.rht_store_dtype(4096, "sm_89") == "float32"
    with pytest.raises(QCompileError, match="shared memory"):
        H.rht_store_dtype(2 ** 17, "sm_89")


@pytest.mark.parametrize("n", [1000, 1032, 0])
def test_bad_size_names_the_nearest_supported(n):
    with pytest.raises(QCompileError) as err:
        H.rht_specs(n, (1,))
    assert "\n" not in str(err.value)
    if n > 0:
        assert "nearest supported sizes" in str(err.value)
    with pytest.raises(QCompileError):
        H.rht_func(n if n else -4, 1, "input")


def test_bad_side():
    with pytest.raises(ValueError):
        H.rht_specs(1024, (1,), sides=("middle",))


@pytest.fixture(scope="module")
def sm90_source():
    specs = [spec for n in (4096, 11008, 28672) for spec in H.rht_specs(n, (1, 16))]
    return specs, cuda_source(H.build_rht(specs, parse_target("sm_90")))


def test_cuda_codegen_sm90(sm90_source):
    specs, src = sm90_source
    for spec in specs:
        assert f"{spec.name}_kernel" in src
    assert "extern __shared__" in src  # stage buffers in dynamic shared memory
    assert "__syncthreads()" in src
    assert "__launch_bounds__(896)" in src  # 28672: 896 threads, one radix-32 unit each


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_nvcc_compiles_the_rht_kernels(sm90_source):
    _, src = sm90_source
    assert len(compile_fatbin(src, "sm_90")) > 1000


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_fp16_storage_kernel_compiles_for_sm89():
    src = cuda_source(H.build_rht(H.rht_specs(28672, (4,)), parse_target("sm_89")))
    assert len(compile_fatbin(src, "sm_89")) > 1000
