"""Decode TensorIntrins: a format's decode of one unit (e.g. one int32 word -> 8 fp16) as a small
hand-written CUDA device function, swapped in by ``sch.tensorize`` for the plain TIR decode.

The intrinsic's description is built from the format's own ``tir_decode_unit``, so the
tensorize pattern is the format's decode by construction; only the implementation (a
``call_extern`` into the injected CUDA source) is hand-written, and it must be bit-identical
(tests/test_kernels_cuda.py checks it on the GPU).
"""
from __future__ import annotations

from typing import Dict

_REGISTERED: Dict[str, str] = {}


def register_unit_decode(fmt, func_name: str, cuda_source: str) -> str:
    """Register (once) the TensorIntrin that decodes one unit of ``fmt`` into a local fp16 buffer.

    Unit layout assumed by the description: every packed tensor is read at one element per unit
    (int32 word and its group scale) and the unit writes ``fmt.decode_unit`` fp16 values.
    """
    import tvm
    from tvm import tirx
    from tvm.script import tirx as T

    name = f"qcompile.decode.{fmt.name}.cuda"
    if name in _REGISTERED:
        return name
    unit = fmt.decode_unit
    specs = fmt.tensor_specs(fmt.group, fmt.group)  # only the dtypes matter: one element of each is read
    (qname, qspec), (sname, sspec) = list(specs.items())
    qdtype, sdtype = qspec.dtype, sspec.dtype

    def decode_expr(Q, S, vj):
        # the very expression the kernel's decode block holds, at unit (0, 0)
        return fmt.tir_decode_unit({qname: _Single(Q), sname: _Single(S)}, 0, 0, vj)

    @T.prim_func(s_tir=True)
    def desc(q: T.handle, s: T.handle, w: T.handle):
        Q = T.match_buffer(q, (1, 1), qdtype, scope="local", offset_factor=1)
        S = T.match_buffer(s, (1, 1), sdtype, offset_factor=1)
        W = T.match_buffer(w, (1, 1, unit), "float16", scope="local", offset_factor=1)
        with T.sblock("root"):
            T.reads(Q[0, 0], S[0, 0])
            T.writes(W[0, 0, 0:unit])
            for j in range(unit):
                with T.sblock("W_decode"):
                    vj = T.axis.spatial(unit, j)
                    T.reads(Q[0, 0], S[0, 0])
                    T.writes(W[0, 0, vj])
                    W[0, 0, vj] = decode_expr(Q, S, vj)

    @T.prim_func(s_tir=True)
    def impl(q: T.handle, s: T.handle, w: T.handle):
        Q = T.match_buffer(q, (1, 1), qdtype, scope="local", offset_factor=1)
        S = T.match_buffer(s, (1, 1), sdtype, offset_factor=1)
        W = T.match_buffer(w, (1, 1, unit), "float16", scope="local", offset_factor=1)
        with T.sblock("root"):
            T.reads(Q[0, 0], S[0, 0])
            T.writes(W[0, 0, 0:unit])
            T.evaluate(T.call_extern("int32", func_name, Q.access_ptr("r"), S.access_ptr("r"),
                                     W.access_ptr("w")))

    tvm.s_tir.TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED[name] = cuda_source
    return name


class _Single:
    """Indexes a (1, 1) buffer the way the format indexes its full tensor at unit (0, 0)."""

    def __init__(self, buf):
        self.buf = buf

    def __getitem__(self, idx):
        from tvm import tirx

        return tirx.BufferLoad(self.buf, [tirx.const(i, "int32") if isinstance(i, int) else i for i in idx])
