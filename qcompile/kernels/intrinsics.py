"""Decode TensorIntrins: a format's decode of one unit (e.g. one int32 word -> 8 fp16, or one E8P
word pair -> 32 fp16) as a small hand-written CUDA device function, swapped in by
``sch.tensorize`` for the plain TIR decode.

The intrinsic's description is built from the format's own ``tir_decode_unit``, so the
tensorize pattern is the format's decode by construction; only the implementation (a
``call_extern`` into the injected CUDA source) is hand-written, and it must be bit-identical
(tests/gpu check it on the GPU).
"""
from __future__ import annotations

import math
from typing import Dict

_REGISTERED: Dict[str, str] = {}

# TVMScript of the description / implementation, generated for the format's tensors: one buffer per
# tensor the unit reads, shaped as the region one unit reads (see Format.unit_reads), then W. The
# description states no read regions: the parser derives them from the expression in the same order
# as the kernel's own decode block has them, which tensorize compares position by position.
_SCRIPT = '''
@T.prim_func(s_tir=True)
def {fname}({handles}, w: T.handle):
{matches}
    W = T.match_buffer(w, (1, 1, {unit}), "float16", scope="local", offset_factor=1)
    with T.sblock("root"):
{root_regions}
{body}
'''
_DESC_BODY = '''        for j in range({unit}):
            with T.sblock("W_decode"):
                vj = T.axis.spatial({unit}, j)
                W[0, 0, vj] = decode_expr([{names}], vj)'''
_IMPL_BODY = '''        T.evaluate(T.call_extern("int32", "{func}", {ptrs}, W.access_ptr("w")))'''


def register_unit_decode(fmt, func_name: str, cuda_source: str) -> str:
    """Register (once) the TensorIntrin that decodes one unit of ``fmt`` into a local fp16 buffer
    [1, 1, decode_unit] by calling ``func_name(<one pointer per tensor in unit_reads order>, W)``.

    ``fmt.unit_reads()`` says which region of each kernel tensor one unit reads (its shape, dtype,
    whether the schedule stages it in registers, and optionally the region's start at unit (0, 0));
    the description evaluates ``tir_decode_unit`` at unit (0, 0) on buffers of exactly those shapes
    (indices shifted by the start), so the function gets a pointer to the start of each region.
    """
    import tvm
    from tvm.script import tirx as T

    name = f"qcompile.decode.{fmt.name}.cuda"
    if name in _REGISTERED:
        return name
    unit = fmt.decode_unit
    reads = fmt.unit_reads()
    tensor_names = list(reads)
    bufs = [f"B{i}" for i in range(len(reads))]
    matches = []
    reads = {name: (spec + (None,))[:4] for name, spec in reads.items()}  # (shape, dtype, staged, offset)
    for b, (tname, (shape, dtype, staged, _)) in zip(bufs, reads.items()):
        scope = ', scope="local"' if staged else ""
        matches.append(f'    {b} = T.match_buffer({b.lower()}, {tuple(shape)!r}, "{dtype}"{scope}, offset_factor=1)')
    common = dict(handles=", ".join(f"{b.lower()}: T.handle" for b in bufs), matches="\n".join(matches), unit=unit)

    def decode_expr(buffers, vj):
        # the very expression the kernel's decode block holds, at unit (0, 0)
        return fmt.tir_decode_unit({name: _Shifted(buf, reads[name][3]) for name, buf in zip(tensor_names, buffers)},
                                   0, 0, vj)

    env = {"T": T, "decode_expr": decode_expr}
    desc_body = _DESC_BODY.format(unit=unit, names=", ".join(bufs))
    # pass 1 lets the parser order the reads; the outer (root) block must state them in that order
    probe = tvm.script.from_source(_SCRIPT.format(fname="desc", body=desc_body, root_regions="", **common),
                                   extra_vars=env)
    block = _inner_block(probe)
    regions = [_region_text(r, block.iter_vars) for r in block.reads]
    root_regions = (f"        T.reads({', '.join(regions)})\n"
                    f"        T.writes(W[0, 0, 0:{unit}])")
    desc = tvm.script.from_source(_SCRIPT.format(fname="desc", body=desc_body, root_regions=root_regions, **common),
                                  extra_vars=env)
    ptrs = ", ".join(f'{b}.access_ptr("r")' for b in bufs)
    impl = tvm.script.from_source(_SCRIPT.format(fname="impl", body=_IMPL_BODY.format(func=func_name, ptrs=ptrs),
                                                 root_regions=root_regions, **common), extra_vars=env)
    tvm.s_tir.TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED[name] = cuda_source
    return name



def _inner_block(func):
    """The W_decode block of a parsed description."""
    import tvm

    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    return sch.get(sch.get_sblock("W_decode"))


class _Shifted:
    """A description buffer indexed as the format indexes its whole tensor at unit (0, 0): the
    index minus the region's start."""

    def __init__(self, buf, offset):
        self.buf, self.offset = buf, offset

    def __getitem__(self, idx):
        from tvm import tirx

        idx = idx if isinstance(idx, tuple) else (idx,)
        if self.offset is not None:
            idx = tuple(i - o for i, o in zip(idx, self.offset))
        return tirx.BufferLoad(self.buf, [tirx.const(i, "int32") if isinstance(i, int) else i for i in idx])


def _region_text(region, iter_vars) -> str:
    """TVMScript of a buffer region of the inner block relaxed over its iteration variables (the
    outer block's region), e.g. ``B0[0, 0, 0]`` or ``B1[0, 0, 0:4]``."""
    import tvm

    ana = tvm.sym.Analyzer()
    for iv in iter_vars:
        ana.bind(iv.var, iv.dom)
    dims = []
    for r in region.region:
        lo_b, hi_b = ana.const_int_bound(r.min), ana.const_int_bound(r.min + r.extent - 1)
        lo, hi = int(lo_b.min_value), int(hi_b.max_value)
        dims.append(str(lo) if hi == lo else f"{lo}:{hi + 1}")
    return f"{region.source.name}[{', '.join(dims)}]"


_HDOT_SOURCE = r"""
#ifndef QC_HDOT_PAIRS
#define QC_HDOT_PAIRS
#include <cuda_fp16.h>
// p[0] += x[0]w[0] + x[2]w[2] + ...; p[1] likewise over the odd columns: one HFMA2 per column pair
template <int PAIRS>
__device__ __forceinline__ int qc_hdot_pairs(const half* __restrict__ x, const half* __restrict__ w,
                                             half* __restrict__ p) {
  half2 acc = *reinterpret_cast<const half2*>(p);
#pragma unroll
  for (int q = 0; q < PAIRS; ++q)
    acc = __hfma2(reinterpret_cast<const half2*>(x)[q], reinterpret_cast<const half2*>(w)[q], acc);
  *reinterpret_cast<half2*>(p) = acc;
  return 0;
}
#endif
"""


# TVMScript of the paired-run TensorIntrin: the description and the implementation share their
# buffers and regions, so both are made from one text (as register_unit_decode does)
_HDOT_SCRIPT = """
@T.prim_func(s_tir=True)
def {fname}(x: T.handle, w: T.handle, p: T.handle):
    X = T.match_buffer(x, (1, {run}), "float16", scope="local", offset_factor=1)
    W = T.match_buffer(w, (1, 1, {run}), "float16", scope="local", offset_factor=1)
    P = T.match_buffer(p, (1, 1, 1, 1, 2), "float16", scope="local", offset_factor=1)
    with T.sblock("root"):
        T.reads(P[0, 0, 0, 0, 0:2], X[0, 0:{run}], W[0, 0, 0:{run}])
        T.writes(P[0, 0, 0, 0, 0:2])
{body}
"""
_HDOT_DESC_BODY = """        for kp, pp in T.grid({pairs}, 2):
            with T.sblock("partial_update"):
                vp = T.axis.spatial(2, pp)  # the kernel's block has its spatial axes first
                vk = T.axis.reduce({pairs}, kp)
                P[0, 0, 0, 0, vp] = P[0, 0, 0, 0, vp] + X[0, vk * 2 + vp] * W[0, 0, vk * 2 + vp]"""
_HDOT_IMPL_BODY = """        T.evaluate(T.call_extern("int32", "qc_hdot_pairs<{pairs}>", X.access_ptr("r"), W.access_ptr("r"),
                                 P.access_ptr("rw")))"""


def register_hdot_pairs(run: int = 8):
    """(name, CUDA source) of the TensorIntrin for one paired fp16 run of ``run`` products of the
    GEMV compute (qcompile.kernels.compute): partial[.., 0:2] += the even / odd column products of
    ``run`` activations and decoded weights, as run/2 HFMA2 (the plain TIR form prints as scalar
    HFMAs, twice the instructions)."""
    import tvm
    from tvm.script import tirx as T

    if run < 2 or run % 2:
        raise ValueError(f"an fp16 run must be an even number of products, got {run}")
    name = f"qcompile.hdot_pairs{run}.cuda"
    if name in _REGISTERED:
        return name, _HDOT_SOURCE

    env = {"T": T}
    fill = {"run": run, "pairs": run // 2}
    desc = tvm.script.from_source(_HDOT_SCRIPT.format(fname="desc", body=_HDOT_DESC_BODY.format(**fill), **fill),
                                  extra_vars=env)
    impl = tvm.script.from_source(_HDOT_SCRIPT.format(fname="impl", body=_HDOT_IMPL_BODY.format(**fill), **fill),
                                  extra_vars=env)
    tvm.s_tir.TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED[name] = _HDOT_SOURCE
    return name, _HDOT_SOURCE


def tvm_cuda_tensor_intrin():
    """The module tvm.s_tir.tensor_intrin.cuda (TVM's WMMA / MMA intrinsics), imported with a cheap
    ``inspect.stack``.

    Importing it registers a few hundred TVMScript intrinsics, and the TVMScript parser calls
    ``inspect.stack()`` for each; with context lines that walks ``sys.modules`` for every
    ``<frozen importlib>`` frame of the import, which took 23 s in a process that had imported torch
    (3.4 s this way). The parser reads the code line of the third frame only (is the function
    defined in a TVMScript class?) and the frames' locals, so the first frames keep their full
    FrameInfo and the rest skip the source lookup. Call it before anything else imports the module
    (dlight's matmul rules import it lazily)."""
    import contextlib
    import importlib
    import inspect
    import sys

    name = "tvm.s_tir.tensor_intrin.cuda"
    if name in sys.modules:
        return sys.modules[name]

    @contextlib.contextmanager
    def cheap_stack(full_frames=4):
        original = inspect.stack

        def stack(context=1):
            frame, frames = sys._getframe(1), []
            while frame is not None:
                if len(frames) < full_frames:
                    frames.append(inspect.FrameInfo(frame, *inspect.getframeinfo(frame, context)))
                else:
                    code = frame.f_code
                    frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
                frame = frame.f_back
            return frames

        inspect.stack = stack
        try:
            yield
        finally:
            inspect.stack = original

    with cheap_stack():
        return importlib.import_module(name)


# One 16-byte global -> shared copy issued as cp.async (L2 only: the packed words are read once), for
# the mma kernel's pipeline stages (``MmaConfig.stages``); the software pipeline that runs these
# copies ahead adds the commit / wait groups around them.
_CP_ASYNC16_SOURCE = r"""
#ifndef QC_CP_ASYNC16
#define QC_CP_ASYNC16
__device__ __forceinline__ int qc_cp_async16(void* dst, const void* src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(s), "l"(src) : "memory");
  return 0;
}
#endif
"""
_CP_SCRIPT = '''
@T.prim_func(s_tir=True)
def {fname}(g: T.handle, s: T.handle):
    G = T.match_buffer(g, {shape}, "{dtype}", offset_factor=1)
    S = T.match_buffer(s, {shape}, "{dtype}", scope="shared", offset_factor=1)
    with T.sblock("root"):
        T.reads(G[{region}])
        T.writes(S[{region}])
{body}
'''
_CP_DESC_BODY = '''{loops}
{pad}with T.sblock("copy"):
{pad}    {binding}
{pad}    S[{index}] = G[{index}]'''
_CP_IMPL_BODY = '''        T.evaluate(T.call_extern("int32", "qc_cp_async16", S.access_ptr("w"), G.access_ptr("r")))'''


def register_cp_async16(dtype: str, shape) -> tuple:
    """Register (once) the TensorIntrin that copies one 16-byte region of ``shape`` (its extents: ones,
    then the innermost dimensions, row-major contiguous, e.g. (1, 4) int32 or (1, 2, 2) int32) from
    global to shared memory with one cp.async; returns (name, CUDA source)."""
    import tvm
    from tvm.script import tirx as T

    shape = tuple(int(e) for e in shape)
    lanes = math.prod(shape)
    if lanes * tvm.DataType(dtype).bits != 128:
        raise ValueError(f"a cp.async copy is 16 bytes, not {lanes} x {dtype}")
    name = f"qcompile.cp_async16.{dtype}.{'x'.join(map(str, shape))}"
    if name in _REGISTERED:
        return name, _REGISTERED[name]
    dims = [d for d, e in enumerate(shape) if e > 1]  # one loop per dimension of the region, as blockize left them
    loops = "\n".join(" " * (8 + 4 * i) + f"for i{d} in range({shape[d]}):" for i, d in enumerate(dims))
    pad = " " * (8 + 4 * len(dims))
    index = ", ".join(f"v{d}" if e > 1 else "0" for d, e in enumerate(shape))
    binding = (f"v{dims[0]} = T.axis.spatial({shape[dims[0]]}, i{dims[0]})" if len(dims) == 1 else
               f"{', '.join(f'v{d}' for d in dims)} = T.axis.remap(\"{'S' * len(dims)}\", [{', '.join(f'i{d}' for d in dims)}])")
    body = _CP_DESC_BODY.format(loops=loops, pad=pad, binding=binding, index=index)
    fill = dict(shape=repr(shape), dtype=dtype, region=", ".join(f"0:{e}" for e in shape))
    desc = tvm.script.from_source(_CP_SCRIPT.format(fname="desc", body=body, **fill), extra_vars={"T": T})
    impl = tvm.script.from_source(_CP_SCRIPT.format(fname="impl", body=_CP_IMPL_BODY, **fill), extra_vars={"T": T})
    tvm.s_tir.TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED[name] = _CP_ASYNC16_SOURCE
    return name, _CP_ASYNC16_SOURCE
