"""The same TIR the GPU runs, compiled for llvm: the decode is bit-exact against the torch
reference and the fused GEMV/GEMM matches a float64 reference within fp16 accumulation bounds."""
import re
import shutil

import pytest
import torch

import qcompile as qc
from qcompile.kernels.compute import matmul_func
from qcompile.kernels.library import (KernelSpec, build, compile_fatbin, cuda_source, default_gemv_config,
                                      scheduled_func, serves_gemv)
from qcompile.kernels.schedules import MAX_RAGGED_IDLE, GemvConfig, k_steps, ragged_idle, schedule_gemv_cuda
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
            units = k // 8
            # N exactly; K exactly or with a ragged last step that leaves few slots idle
            assert n % (cfg.rows * cfg.row_tile) == 0 and cfg.threads_k * cfg.chunks <= units
            assert ragged_idle(units, cfg.threads_k, cfg.chunks) <= MAX_RAGGED_IDLE
            assert k_steps(units, cfg.threads_k, cfg.chunks) % cfg.unroll == 0


# (decode unit, n, k, m) -> the config the H100 sweeps picked, for shapes whose K tiles exactly
EXACT_DEFAULTS = {
    (8, 4096, 4096, 1): GemvConfig(rows=4, threads_k=64, chunks=2, unroll=2, row_tile=1),
    (8, 4096, 4096, 4): GemvConfig(rows=4, threads_k=32, chunks=2, unroll=1, row_tile=2),
    (8, 4096, 11008, 4): GemvConfig(rows=4, threads_k=32, chunks=1, unroll=1, row_tile=2),
    (8, 768, 256, 1): GemvConfig(rows=4, threads_k=32, chunks=1, unroll=1, row_tile=1),
    (16, 4096, 4096, 1): GemvConfig(rows=4, threads_k=64, chunks=2, unroll=2, row_tile=1),
    (32, 28672, 8192, 1): GemvConfig(rows=2, threads_k=64, chunks=1, unroll=2, row_tile=4),
    (32, 8192, 28672, 1): GemvConfig(rows=1, threads_k=128, chunks=1, unroll=1, row_tile=4),
    (32, 4096, 4096, 4): GemvConfig(rows=4, threads_k=32, chunks=1, unroll=1, row_tile=4),
    (32, 4096, 4096, 16): GemvConfig(rows=4, threads_k=32, chunks=1, unroll=1, row_tile=2),
}


@pytest.mark.parametrize("n, k", [(28672, 8192), (8192, 28672), (4096, 11008), (4096, 4096), (11008, 4096)])
def test_e8p_default_fills_the_gpu_with_threads_along_k(n, k):
    """32-column units: as many threads along K as it takes to reach TARGET_GEMV_THREADS in flight
    (up to 128), in blocks of 128 threads."""
    from qcompile.kernels.library import TARGET_GEMV_THREADS

    cfg = default_gemv_config(n, k, 1, 32)
    in_flight = (n // cfg.row_tile) * cfg.threads_k
    assert in_flight >= TARGET_GEMV_THREADS or cfg.threads_k == 128
    assert cfg.threads_k == 32 or (n // cfg.row_tile) * cfg.threads_k // 2 < TARGET_GEMV_THREADS
    assert cfg.rows * cfg.threads_k == 128


@pytest.mark.parametrize("name", ["qtip-3inst-2", "qtip-hyb-2"])
def test_tiled_default_is_128_threads_along_k_and_32_rows_per_block(name):
    fmt = qc.formats.get(name)
    for n, k in [(28672, 8192), (8192, 28672), (4096, 4096)]:
        cfg = default_gemv_config(n, k, 1, fmt.decode_unit, fmt.gemv_tile)
        assert (cfg.row_tile, cfg.chunks) == fmt.gemv_tile
        assert cfg.threads_k == 128 and cfg.rows * cfg.row_tile == 32
        at_m4 = default_gemv_config(n, k, 4, fmt.decode_unit, fmt.gemv_tile)  # M > 2: 2 groups per block
        assert at_m4.threads_k == 128 // fmt.gemv_tile[1] and at_m4.rows == 2


@pytest.mark.parametrize("key", sorted(EXACT_DEFAULTS))
def test_default_gemv_config_of_exact_shapes_is_unchanged(key):
    unit, n, k, m = key
    assert default_gemv_config(n, k, m, unit) == EXACT_DEFAULTS[key]


@pytest.mark.parametrize("m", [1, 4, 16])
def test_ragged_k_keeps_the_preferred_threads_k(m):
    """4096x11008 E8P (Llama-2-7B down_proj): 344 units = 8 * 43 tile only with 8 threads along K;
    the default takes 32 threads and a ragged last step (11 steps, 8 of 352 slots idle)."""
    cfg = default_gemv_config(4096, 11008, m, 32)
    assert cfg.threads_k >= 32 and 344 % (cfg.threads_k * cfg.chunks) != 0
    assert ragged_idle(344, cfg.threads_k, cfg.chunks) <= MAX_RAGGED_IDLE
    # int4 (8-column units): 1376 = 32 * 43 units; M <= 2 prefers 64 threads x 2 words, ragged
    assert default_gemv_config(4096, 11008, 1, 8).threads_k == 64


def _unguarded_global_loads(kernel_src, tensors):
    """Lines of one kernel that read one of ``tensors`` from global memory outside an ``if``."""
    lines = kernel_src.splitlines()
    pattern = re.compile(r"=.*\b(" + "|".join(tensors) + r")_ptr\b")
    return [line for prev, line in zip(lines, lines[1:])
            if pattern.search(line) and not prev.strip().startswith("if (")]


def _kernels(src):
    """{kernel name: its definition} of a CUDA source (names from the ``extern "C" __global__`` lines)."""
    heads = list(re.finditer(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)_kernel\([^;{]*\{', src))
    return {h.group(1): src[h.end():(heads[i + 1].start() if i + 1 < len(heads) else len(src))]
            for i, h in enumerate(heads)}


# K whose decode-unit count has a large odd factor: 11008 = 344 E8P units = 688 QTIP tile rows (16 * 43);
# 11136 = 1392 int4 words = 16 * 87 (ragged for int4 at every M, 11008 only at M <= 2)
RAGGED = [("e8p-2", 4096, 11008), ("int4-g128", 4096, 11136), ("qtip-3inst-2", 4096, 11008)]


@pytest.mark.parametrize("name, n, k", RAGGED)
def test_ragged_k_gemv_compiles_for_sm90_with_masked_loads(name, n, k):
    """The CUDA GEMV schedule with the default (ragged) config: the units past K are masked by a
    predicate on every global load of the streamed words and the activations (and so on their decode
    and products); the same loads of a K that tiles exactly carry no guard."""
    fmt = qc.formats.get(name)
    units = k // fmt.decode_unit
    sm90 = parse_target("sm_90")
    specs = [KernelSpec(name, n, k, m) for m in (1, 2, 4) if serves_gemv(name, m)]  # the GEMV buckets
    for spec in specs:
        cfg = default_gemv_config(n, k, spec.m, fmt.decode_unit, fmt.gemv_tile)
        assert units % (cfg.threads_k * cfg.chunks), cfg  # ragged
        script = scheduled_func(spec, sm90).script()
        assert re.search(rf"T\.where\(.*< {units}\)", script), "no predicate on the units past K"
    exact = KernelSpec(name, n, 4096, 1)
    src = cuda_source(build(specs + [exact], sm90))
    kernels = _kernels(src)
    tensors = ("X",) + tuple(fmt.streamed or list(fmt.tensor_specs(n, k))[:1])
    for spec in specs:
        body = kernels[spec.name]
        assert _unguarded_global_loads(body, tensors) == [], spec.name
        assert re.search(r"\b(" + "|".join(tensors[1:]) + r")_ptr\b", body)  # the words are read at all
    assert _unguarded_global_loads(kernels[exact.name], tensors)  # no guard where K tiles exactly
    if shutil.which("nvcc") is not None:
        assert len(compile_fatbin(src, "sm_90")) > 1000


def test_schedule_refuses_more_threads_along_k_than_units():
    fmt = qc.formats.get(FMT)
    with pytest.raises(ValueError, match="does not tile"):
        schedule_gemv_cuda(matmul_func(fmt, 64, 256, 1), GemvConfig(rows=4, threads_k=64, chunks=1), None)


def test_matmul_func_rejects_shapes_the_format_cannot_take():
    with pytest.raises(QCompileError, match="multiple of the group size"):
        matmul_func(qc.formats.get(FMT), 64, 200, 1)
