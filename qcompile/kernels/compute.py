"""TIR PrimFuncs of fused decode + matmul: Y[M, N] = X[M, K] @ decode(W)[N, K]^T.

The decode is whatever the format's ``tir_decode_unit`` says; this module never looks at bits.
GEMV form (two_level=True): the weight is decoded a unit at a time (W_decode[n, c, j] = column
c*unit + j) and accumulated in two levels: fp16 partial sums over one unit (so the inner
multiply-add is a single HFMA), then fp32 across units. GEMM form: one fp32 reduction, the shape
tensor-core schedules expect.
"""
from __future__ import annotations

from ..formats import Format


def matmul_func(fmt: Format, n: int, k: int, m: int, two_level: bool = True):
    """PrimFunc main(X fp16[m, k], *packed tensors, Y fp16[m, n])."""
    from tvm import te

    fmt.check_shape(n, k)
    unit = fmt.decode_unit
    if k % unit:
        raise ValueError(f"in_features {k} must be a multiple of the decode unit {unit}")
    X = te.placeholder((m, k), "float16", name="X")
    specs = fmt.tensor_specs(n, k)
    bufs = {name: te.placeholder(spec.shape, spec.dtype, name=name) for name, spec in specs.items()}
    if not two_level:
        W = te.compute((n, k), lambda i, j: fmt.tir_decode(bufs, i, j), name="W_decode")
        kr = te.reduce_axis((0, k), name="k")
        acc = te.compute((m, n), lambda a, i: te.sum(X[a, kr].astype("float32") * W[i, kr].astype("float32"),
                                                    axis=kr), name="acc")
    else:
        W = te.compute((n, k // unit, unit), lambda i, c, j: fmt.tir_decode_unit(bufs, i, c, j),
                       name="W_decode")
        kc = te.reduce_axis((0, unit), name="kc")
        part = te.compute((m, n, k // unit),
                          lambda a, i, c: te.sum(X[a, c * unit + kc] * W[i, c, kc], axis=kc),
                          name="partial")
        ko = te.reduce_axis((0, k // unit), name="ko")
        acc = te.compute((m, n), lambda a, i: te.sum(part[a, i, ko].astype("float32"), axis=ko), name="acc")
    Y = te.compute((m, n), lambda a, i: acc[a, i].astype("float16"), name="Y")
    return te.create_prim_func([X, *bufs.values(), Y]).with_attr("global_symbol", "main")
