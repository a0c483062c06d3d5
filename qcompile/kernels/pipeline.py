"""The TIR lowering pipeline qcompile compiles CUDA modules with: TVM 0.27's default ("s_tir"), with
two repairs for kernels that keep mma.sync fragments in "warp" buffers (qcompile.kernels.mma):

- LowerWarpMemory lowers only the first warp buffer of a statement sequence (it hands the rest of
  the sequence, the other warp allocations included, to the rewriter of that one buffer), so a kernel
  with A, B and C fragments kept two of them as whole-warp arrays in every thread. The device
  finalization runs it until no warp buffer is left.
- Common-subexpression elimination runs before LowerWarpMemory and can move ``threadIdx.x * 4`` of a
  fragment store into a let variable, where LowerWarpMemory no longer sees the lane (it then refuses
  the store, or worse, splits an mma operand's offset wrongly). Functions with warp buffers are
  lowered without it (nvcc eliminates the common subexpressions of the CUDA source anyway); the other
  functions of the module get the default pipeline unchanged.
"""
from __future__ import annotations

PIPELINE = "qcompile"


# the attribute a schedule sets on a PrimFunc that keeps mma fragments in warp buffers
WARP_ATTR = "qcompile.warp_fragments"
# a PrimFunc's minimum resident blocks per SM for its kernels' __launch_bounds__ (MmaConfig.min_blocks):
# TVM 0.27's CUDA codegen prints it from the device function's attribute LAUNCH_BOUNDS_ATTR, which the
# device functions split off a PrimFunc (<symbol>_kernel, <symbol>_kernel_1, ...) do not inherit, so
# the pipeline copies it over
MIN_BLOCKS_ATTR = "qcompile.min_blocks_per_sm"
LAUNCH_BOUNDS_ATTR = "tirx.launch_bounds_min_blocks_per_sm"
# LowerWarpMemory passes: one lowers one warp buffer per statement sequence (A, B and C fragments of
# the mma kernels, with room to spare); a pass over a function without warp buffers changes nothing
WARP_PASSES = 4


def has_warp_fragments(func) -> bool:
    return bool(func.attrs is not None and func.attrs.get(WARP_ATTR, False))


def _pipeline_factory():
    import tvm
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    base, finalize_host, finalize_device = default_s_tir_pipeline()
    min_blocks = {}  # global symbol -> MIN_BLOCKS_ATTR, for the device functions of this build

    @tvm.transform.module_pass(opt_level=0, name="qcompile.Pipeline")
    def pipeline(mod, _ctx):
        for gv, f in mod.functions.items():
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and MIN_BLOCKS_ATTR in f.attrs:
                min_blocks[str(f.attrs.get("global_symbol", gv.name_hint))] = int(f.attrs[MIN_BLOCKS_ATTR])
        warp = {gv for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and has_warp_fragments(f)}
        if not warp:
            return base(mod)
        plain = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in warp})
        special = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv in warp})
        ctx = tvm.transform.PassContext.current()
        config = dict(ctx.config)
        config["tirx.disable_cse_tir"] = True
        with tvm.transform.PassContext(opt_level=ctx.opt_level, config=config,
                                       required_pass=list(ctx.required_pass),
                                       disabled_pass=list(ctx.disabled_pass)):
            special = base(special)
        out = base(plain) if len(plain.functions) else tvm.IRModule({})
        out.update(special)
        return out

    @tvm.transform.module_pass(opt_level=0, name="qcompile.LaunchBounds")
    def launch_bounds(mod, _ctx):
        if not min_blocks:
            return mod
        out = {}
        for gv, f in mod.functions.items():
            symbol = next((s for s in min_blocks if gv.name_hint.startswith(s + "_kernel")), None)
            if isinstance(f, tvm.tirx.PrimFunc) and symbol is not None:
                f = f.with_attr(LAUNCH_BOUNDS_ATTR, min_blocks[symbol])
            out[gv] = f
        return tvm.IRModule(out, attrs=mod.attrs)

    def finalize_device_repeated():
        lower = [tvm.tirx.transform.LowerWarpMemory() for _ in range(WARP_PASSES)]
        return tvm.transform.Sequential([*lower, launch_bounds, finalize_device()])

    return pipeline, finalize_host, finalize_device_repeated


def register() -> str:
    """Register the pipeline with TVM (once) and return its name for ``tvm.compile(tir_pipeline=...)``."""
    from tvm.tirx import compilation_pipeline as cp

    if PIPELINE not in cp.PIPELINE_MAP:
        cp.register_tir_pipeline(PIPELINE, _pipeline_factory)
    return PIPELINE


def compile_module(mod, tvm_target):
    """``tvm.compile`` of an IRModule of scheduled kernels with this pipeline (the default one for
    every function without mma fragments)."""
    import tvm

    return tvm.compile(mod, target=tvm_target, tir_pipeline=register())
