"""TIR PrimFuncs of fused decode + matmul: Y[M, N] = X[M, K] @ decode(W)[N, K]^T.

The decode is whatever the format's ``tir_decode_unit`` says; this module never looks at bits.
GEMV form (two_level=True): the weight is decoded a unit at a time (W_decode[n, c, j] = column
c*unit + j) and accumulated in two levels: fp16 partial sums over runs of FP16_RUN products (at
most a unit; the even and odd columns as the two halves of an HFMA2), then fp32 across runs and
units. Every run ends in two fp16->fp32 conversions and two FADDs, yet longer runs measured no
faster: runs of 32 cut E8P's M=1 SASS from 1112 to 1016 instructions per thread step but made it
slower (H100: 45.6 vs 44.4 us on 28672x8192, 62.2 vs 49.5 us on 8192x28672), its one
16-deep HFMA2 chain costing more in latency than the conversions saved; QTIP 3INST gained 1 %. GEMM form: one fp32 reduction, the
shape tensor-core schedules expect.
"""
from __future__ import annotations

from ..formats import Format

FP16_RUN = 8  # products summed in fp16 (4 per HFMA2 lane) before the fp32 accumulation


def format_stages(fmt: Format, n: int, k: int):
    """(params, bufs) of an [n, k] weight: the packed tensors as placeholders (``params``, in
    ``tensor_specs`` order) and, in ``bufs``, them plus every stage the format's decode reads: its
    derived tables (W_table*, ``Format.tir_tables``), the packed-word slices its gather shares
    (W_slice, ``Format.slice_count``) and its table lookups (W_gather, ``Format.gather_count``).
    Every kernel builds the format's decode from these, so none re-implements a format."""
    from tvm import te

    fmt.check_shape(n, k)
    unit = fmt.decode_unit
    if k % unit:
        raise ValueError(f"in_features {k} must be a multiple of the decode unit {unit}")
    specs = fmt.tensor_specs(n, k)
    bufs = {name: te.placeholder(spec.shape, spec.dtype, name=name) for name, spec in specs.items()}
    params = list(bufs.values())
    bufs.update(fmt.tir_tables(bufs))
    if fmt.slice_count:
        bufs["slices"] = te.compute((n, k // unit, fmt.slice_count),
                                    lambda i, c, g: fmt.tir_slice(bufs, i, c, g), name="W_slice")
    if fmt.gather_count:
        bufs["gathered"] = te.compute((n, k // unit, fmt.gather_count),
                                      lambda i, c, g: fmt.tir_gather(bufs, i, c, g), name="W_gather")
    return params, bufs


def fragment_stages(fmt: Format, n: int, k: int, lane_copies: int = 0, signed_table: bool = False):
    """(params, bufs) of an [n, k] weight of a fragment-native format (``Format.fragment_native``):
    the packed tensors as placeholders and, in ``bufs``, them plus the stages its fragment decode
    reads: the derived tables (W_table*, ``Format.tir_tables``), each lane's staged packed words per
    32x32 super-tile (W_lane_words [n/32, k/32, 32, fragment_word_count]), its stream slice per 16x16
    tile (W_lane_slice [n/16, k/16, 32]) and its 4 table words per tile (W_lane_gather [n/16, k/16,
    32, 4]); ``tir_fragment_decode(bufs, I, J, lane, e)`` then reads register e from those.
    ``lane_copies``: the table copies of a W_table_lanes stage (0: the format's default);
    ``signed_table``: the format's sign-folded tables (``Format.tir_tables(signed=True)``)."""
    from tvm import te

    fmt.check_shape(n, k)
    specs = fmt.tensor_specs(n, k)
    bufs = {name: te.placeholder(spec.shape, spec.dtype, name=name) for name, spec in specs.items()}
    params = list(bufs.values())
    bufs.update(fmt.tir_tables(bufs, lane_copies, signed_table))
    bufs["fragment_words"] = te.compute((n // 32, k // 32, 32, fmt.fragment_word_count),
                                        lambda I2, J2, lane, w: fmt.tir_fragment_word(bufs, I2, J2, lane, w),
                                        name="W_lane_words")
    bufs["fragment_slices"] = te.compute((n // 16, k // 16, 32), lambda I, J, lane: fmt.tir_fragment_slice(bufs, I, J, lane),
                                         name="W_lane_slice")
    bufs["fragment_gathered"] = te.compute((n // 16, k // 16, 32, 4),
                                           lambda I, J, lane, g: fmt.tir_fragment_gather(bufs, I, J, lane, g),
                                           name="W_lane_gather")
    return params, bufs


def matmul_func(fmt: Format, n: int, k: int, m: int, two_level: bool = True, fp16_run: int = 0):
    """PrimFunc main(X fp16[m, k], *packed tensors, Y fp16[m, n]). ``fp16_run``: products per fp16
    partial sum in the GEMV form (capped at the decode unit; 0: FP16_RUN)."""
    from tvm import te

    params, bufs = format_stages(fmt, n, k)
    unit = fmt.decode_unit
    X = te.placeholder((m, k), "float16", name="X")
    if not two_level:
        W = te.compute((n, k), lambda i, j: fmt.tir_decode(bufs, i, j), name="W_decode")
        kr = te.reduce_axis((0, k), name="k")
        acc = te.compute((m, n), lambda a, i: te.sum(X[a, kr].astype("float32") * W[i, kr].astype("float32"),
                                                    axis=kr), name="acc")
    else:
        W = te.compute((n, k // unit, unit), lambda i, c, j: fmt.tir_decode_unit(bufs, i, c, j),
                       name="W_decode")
        run = min(unit, fp16_run or FP16_RUN)
        if unit % run or run % 2:
            raise ValueError(f"decode unit {unit} must be a multiple of the fp16 run {run} (an even number)")
        # each unit as unit/run fp16 runs (axis r), each run as two interleaved half sums (axis p:
        # even and odd columns), so a schedule can vectorize p into HFMA2; all summed in fp32
        kp = te.reduce_axis((0, run // 2), name="kp")
        part = te.compute((m, n, k // unit, unit // run, 2),
                          lambda a, i, c, r, p: te.sum(X[a, c * unit + r * run + 2 * kp + p]
                                                       * W[i, c, r * run + 2 * kp + p], axis=kp),
                          name="partial")
        ko = te.reduce_axis((0, k // unit), name="ko")
        ro = te.reduce_axis((0, unit // run), name="ro")
        po = te.reduce_axis((0, 2), name="po")
        acc = te.compute((m, n), lambda a, i: te.sum(part[a, i, ko, ro, po].astype("float32"),
                                                     axis=[ko, ro, po]), name="acc")
    Y = te.compute((m, n), lambda a, i: acc[a, i].astype("float16"), name="Y")
    return te.create_prim_func([X, *params, Y]).with_attr("global_symbol", "main")
