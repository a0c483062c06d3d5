"""Build one fused decode + matmul kernel (a format, a layer shape, a batch size, a config) and launch
it a few times, for a profiler to watch (Nsight Compute: the kernels are named ``main_kernel``)::

    ncu --clock-control none -k regex:main_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats \\
        python3 -m qcompile.bench.profile_one --format qtip-hyb-2 --shape 28672x8192 --m 1

Where time goes inside one kernel is what the sweeps (``tc_sweep``) cannot say: which pipe is busy,
how often a warp waits on shared memory, how many bank conflicts its table lookups take.
``--compile-only`` builds the CUDA (any machine with nvcc's headers; no GPU) and prints its size, what
ptxas gives each kernel and, where nvdisasm is found (``kernels.resources.find_nvdisasm``), the
instruction mix of its main loop.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

FAMILIES = ("library", "mma", "tensorcore")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m qcompile.bench.profile_one",
                                 description="Build one fused decode + matmul kernel and launch it a few times "
                                             "(for ncu or another profiler).")
    ap.add_argument("--format", required=True, help="weight format, e.g. qtip-hyb-2")
    ap.add_argument("--shape", required=True, help="NxK layer shape (out x in), e.g. 28672x8192")
    ap.add_argument("--m", type=int, default=1, help="batch size (default 1)")
    ap.add_argument("--family", choices=FAMILIES, default="library",
                    help="library: the kernel qcompile build picks without tuning records; mma / tensorcore: "
                         "that family's kernel with --config (default: its default config)")
    ap.add_argument("--config", default="", metavar="K=V,...",
                    help="config fields of --family over its default config (e.g. 'warps_k=8,lut_shared=4')")
    ap.add_argument("--flag", default="", metavar="NAME[+NAME]",
                    help="kernel switches set on while building (the names of qcompile.bench.tc_sweep --flag)")
    ap.add_argument("--launches", type=int, default=5, help="launches (default 5; skip the first for warm caches)")
    ap.add_argument("--compile-only", action="store_true", help="build the CUDA and stop (no GPU needed)")
    return ap


def build_func(fmt, n: int, k: int, m: int, family: str, config: str, target):
    """(label, scheduled PrimFunc "main") of the kernel to profile (``target``: a kernels.target TargetInfo)."""
    from .tc_sweep import family_api, parse_config

    if family == "library":
        from ..kernels.library import KernelSpec, scheduled_func

        if config:
            raise ValueError("--config needs --family mma or tensorcore (the library kernel is the default config)")
        return "library default", scheduled_func(KernelSpec(fmt.name, n, k, m), target)
    default, _, _, builder = family_api(family)
    cfg = parse_config(config, default(fmt, n, k, m))
    return f"{family} {' '.join(f'{key}={v}' for key, v in cfg.as_dict().items())}", builder(fmt, n, k, m, cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..errors import QCompileError
    from ..formats import get as get_format
    from .harness import parse_shapes
    from .tc_sweep import check_flags, compile_main, flags_on

    args = build_parser().parse_args(argv)
    try:
        shapes = parse_shapes(args.shape)
        if len(shapes) != 1:
            raise ValueError(f"--shape: {args.shape!r} is {len(shapes)} shapes; give one NxK")
        (n, k), = shapes
        fmt = get_format(args.format)
        fmt.check_shape(n, k)
        if args.m < 1 or args.launches < 1:
            raise ValueError("--m and --launches must be positive")
        flags = [name for name in args.flag.split("+") if name]
        check_flags(flags)
        from ..kernels.target import parse_target

        target = parse_target("sm_90" if args.compile_only else "auto")
        if target.kind != "cuda":
            raise ValueError("no CUDA GPU here: run it on one, or pass --compile-only")
        with flags_on(flags):
            label, func = build_func(fmt, n, k, args.m, args.family, args.config, target)
            lib = compile_main(func, target)
    except (QCompileError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if args.compile_only:
        import shutil

        from ..kernels.library import cuda_source

        source = cuda_source(lib)
        print(f"{fmt.name} N={n} K={k} M={args.m} {label}: {len(source)} bytes of CUDA")
        if shutil.which("nvcc"):  # what ptxas gives each kernel (one nvcc compile for both reports)
            from ..kernels.resources import compile_cubin, find_nvdisasm, resources_of_report, sass_loop_mix

            try:
                report, cubin = compile_cubin(source, target.arch)
                for name, r in resources_of_report(report, target.arch).items():
                    print(f"  {name}: {r.registers} registers, {r.shared_bytes} bytes static shared memory, "
                          f"{r.spill_bytes} bytes spilled")
                if find_nvdisasm():  # and its main loop's instruction mix
                    for name, mix in sass_loop_mix(source, target.arch, cubin=cubin).items():
                        top = ", ".join(f"{op} {c}" for op, c in list(mix.by_opcode.items())[:8])
                        print(f"  {name} loop: {mix.instructions} instructions, {mix.alu} on the ALU pipe, "
                              f"{mix.fma} on the FMA pipe (at least {mix.bound_cycles} cycles a pass); {top}")
            except QCompileError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        return 0
    import torch

    from .harness import bench_weight

    device = torch.device("cuda")
    qw = bench_weight(fmt, n, k, device)
    X = torch.randn(args.m, k, device=device, dtype=torch.float16)
    Y = torch.empty(args.m, n, device=device, dtype=torch.float16)
    kernel = lib["main"]
    for _ in range(args.launches):
        kernel(X, *[qw.tensors[name] for name in fmt.tensor_specs(n, k)], Y)
    torch.cuda.synchronize()
    print(f"{fmt.name} N={n} K={k} M={args.m} {label}: {args.launches} launches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
