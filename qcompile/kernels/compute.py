"""TIR PrimFuncs of fused decode + matmul: Y[M, N] = X[M, K] @ decode(W)[N, K]^T.

The decode is whatever the format's ``tir_decode`` says; this module never looks at bits.
Accumulation is two-level: fp16 partial sums over CHUNK consecutive input columns (the
products of one packed word), then fp32 across chunks. That keeps the inner multiply-add a
single HFMA while the long reduction stays in fp32.
"""
from __future__ import annotations

from ..formats import Format

CHUNK = 8  # input columns per fp16 partial sum


def matmul_func(fmt: Format, n: int, k: int, m: int, two_level: bool = True):
    """PrimFunc main(X fp16[m, k], *packed tensors, Y fp16[m, n]).

    two_level=False gives a single fp32 reduction (the form tensor-core GEMM schedules expect).
    """
    from tvm import te

    fmt.check_shape(n, k)
    if k % CHUNK:
        raise ValueError(f"in_features {k} must be a multiple of {CHUNK}")
    X = te.placeholder((m, k), "float16", name="X")
    specs = fmt.tensor_specs(n, k)
    bufs = {name: te.placeholder(spec.shape, spec.dtype, name=name) for name, spec in specs.items()}
    W = te.compute((n, k), lambda i, j: fmt.tir_decode(bufs, i, j), name="W_decode")
    if not two_level:
        kr = te.reduce_axis((0, k), name="k")
        acc = te.compute((m, n), lambda a, i: te.sum(X[a, kr].astype("float32") * W[i, kr].astype("float32"),
                                                    axis=kr), name="acc")
        Y = te.compute((m, n), lambda a, i: acc[a, i].astype("float16"), name="Y")
        return te.create_prim_func([X, *bufs.values(), Y]).with_attr("global_symbol", "main")
    kc = te.reduce_axis((0, CHUNK), name="kc")
    part = te.compute(
        (m, n, k // CHUNK),
        lambda a, i, c: te.sum(X[a, c * CHUNK + kc] * W[i, c * CHUNK + kc], axis=kc),
        name="partial")
    ko = te.reduce_axis((0, k // CHUNK), name="ko")
    acc = te.compute((m, n), lambda a, i: te.sum(part[a, i, ko].astype("float32"), axis=ko), name="acc")
    Y = te.compute((m, n), lambda a, i: acc[a, i].astype("float16"), name="Y")
    func = te.create_prim_func([X, *bufs.values(), Y])
    return func.with_attr("global_symbol", "main")
