"""Tensor-core kernel sweep on a GPU (developer tool for picking TensorCoreConfig / MmaConfig defaults):

    python3 -m qcompile.bench.tc_sweep --format e8p-2 --shapes 28672x8192,8192x28672 --m 16,64 --out FILE.json
    python3 -m qcompile.bench.tc_sweep --family mma --format e8p-2 --m 1,4,16

For every shape and M, in one process: a handful of candidates of the family (``tensorcore``: the WMMA
kernel of qcompile.kernels.tensorcore; ``mma``: the mma.sync kernel of qcompile.kernels.mma; the
family's default config and variants of it, plus any --config given), the library's current
default kernel (``library.scheduled_func``: the family ``kernel_family`` picks, GEMV, mma.sync
(fragment-native for QTIP HYB) or WMMA, dlight's WMMA GEMM above) and cuBLAS
fp16 (``F.linear`` on the decoded weight). Each candidate is checked against a float64 reference
before it is timed; timing is qcompile.bench.timing's (CUDA graphs, weights rotated past the L2).
Prints a table (µs, speedup vs cuBLAS) and writes every row to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace
from typing import List, Optional, Sequence

REL_ERR_MAX = 1e-2
# --flag NAME: kernel switches to time against the kernel as built today, by name -> (module, attribute,
# the value the flag sets): lane-copy-min for every HYB code (on for HYB-2 by default), partials-in-table
# (off), half-a: the fragment kernel's A registers as fp16 halves, as before packed registers (bebb84e)
FLAGS = {"lane-copy-min": ("qcompile.formats.trellis", "LANE_COPY_BY_MIN", True),
         "partials-in-table": ("qcompile.kernels.mma", "FRAGMENT_PARTIALS_IN_TABLE", True),
         "half-a": ("qcompile.kernels.mma_fragment", "PACKED_A", False)}


@contextlib.contextmanager
def flags_on(names):
    """The FLAGS ``names`` set to their values while the block runs (the modules read them as they build
    kernels and check configs), then restored."""
    import importlib

    saved = []
    try:
        for name in names:
            module, attr, value = FLAGS[name]
            mod = importlib.import_module(module)
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, value)
        yield
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)


def check_flags(names) -> None:
    """ValueError (one line) naming the switches of ``names`` that FLAGS does not know."""
    unknown = sorted(set(names) - set(FLAGS))
    if unknown:
        raise ValueError(f"--flag: unknown switch(es) {', '.join(unknown)} (known: {', '.join(FLAGS)})")


def compile_main(func, target):
    """The executable of one scheduled PrimFunc, exported as "main" (``target``: a TargetInfo)."""
    import tvm

    from ..kernels.pipeline import compile_module

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main").with_attr("tirx.is_scheduled", True)})
    return compile_module(mod, target.tvm_target())


FAMILIES = ("tensorcore", "mma")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m qcompile.bench.tc_sweep",
                                 description="Time tensor-core configs of the fused decode + matmul against the "
                                             "current default kernel and cuBLAS fp16 on this GPU.")
    ap.add_argument("--format", default="e8p-2", help="weight format (default e8p-2)")
    ap.add_argument("--family", choices=FAMILIES, default="tensorcore",
                    help="tensorcore: WMMA through shared memory (TensorCoreConfig); mma: mma.sync on fragments "
                         "decoded in registers (MmaConfig)")
    ap.add_argument("--shapes", default="28672x8192,8192x28672", help="NxK layer shapes (out x in)")
    ap.add_argument("--m", default="16,64", help="batch sizes (default 16,64)")
    ap.add_argument("--config", action="append", default=[], metavar="K=V,...",
                    help="an extra config of --family to time (TensorCoreConfig, e.g. "
                         "'n_tile=128,k_tile=64,warps_k=4'; MmaConfig, e.g. 'tiles=4,warps_k=4') (fields not "
                         "given: the default config's); repeatable")
    ap.add_argument("--no-variants", action="store_true", help="time only the default and --config configs")
    ap.add_argument("--plain-decode", action="store_true",
                    help="also time the default config with the plain TIR decode instead of the format's intrinsic")
    ap.add_argument("--flag", action="append", default=[], metavar="NAME[+NAME]",
                    help="also time every config with these switches set together (configs checked and built "
                         "with them), labelled -NAME[+NAME]; repeatable. lane-copy-min: "
                         "formats.trellis.LANE_COPY_BY_MIN for every code; partials-in-table: "
                         "kernels.mma.FRAGMENT_PARTIALS_IN_TABLE; half-a: the fragment kernel's A registers as fp16 "
                         "halves (mma_fragment.PACKED_A off)")
    ap.add_argument("--iters", type=int, default=200, help="timed launches per measurement (default 200)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed launches first (default 10)")
    ap.add_argument("--resources", action="store_true",
                    help="also record each kernel's registers, static shared memory and spills (ptxas, via nvcc "
                         "on this machine: a few seconds a config) and, where nvdisasm is found, its main loop's "
                         "instructions by pipe (kernels.resources.sass_loop_mix)")
    ap.add_argument("--timing", choices=("graph", "events"), default="graph", help="timing mode (default graph)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    return ap


def parse_config(text: str, base):
    """'n_tile=128,k_tile=64' -> TensorCoreConfig (the other fields from ``base``)."""
    fields = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in base.as_dict() or not value.strip().isdigit():
            raise ValueError(f"--config: {item.strip()!r} is not FIELD=INT with FIELD one of {', '.join(base.as_dict())}")
        fields[key] = int(value)
    return replace(base, **fields)


# low-batch block shapes worth timing (n_tile, k_tile, warps_n, warps_k, stages): wide N tiles share
# the X tile, more K warps keep more loads in flight, the 2-stage pipeline overlaps steps
LOW_BATCH_SHAPES = [(64, 256, 2, 4, 1), (64, 128, 2, 4, 2), (32, 256, 2, 4, 1), (128, 64, 2, 4, 1),
                    (128, 128, 4, 2, 1), (256, 64, 4, 2, 1), (64, 128, 1, 8, 1), (32, 128, 1, 4, 2)]


def variants(cfg) -> list:
    """Configs near ``cfg``. Low batch: the LOW_BATCH_SHAPES blocks and one more unit per thread;
    GEMM: N tile halved / doubled, K step doubled, M tile halved, the 2-stage pipeline."""
    if cfg.m_tile == 16:
        out = [replace(cfg, n_tile=nt, k_tile=kt, warps_n=wn, warps_k=wk, stages=st)
               for nt, kt, wn, wk, st in LOW_BATCH_SHAPES]
        return out + [replace(cfg, units=cfg.units * 2), replace(cfg, units=max(1, cfg.units // 2))]
    out = [replace(cfg, n_tile=nt, warps_n=max(1, min(cfg.warps_n * nt // cfg.n_tile, nt // 16)))
           for nt in (cfg.n_tile // 2, cfg.n_tile * 2) if nt >= 16]
    out += [replace(cfg, k_tile=cfg.k_tile * 2), replace(cfg, stages=2), replace(cfg, warps_k=2, k_tile=cfg.k_tile * 2)]
    if cfg.m_tile > 16:
        out.append(replace(cfg, m_tile=cfg.m_tile // 2, warps_m=max(1, cfg.warps_m // 2)))
    return out


def mma_variants(cfg, fragment: bool = False) -> list:
    """mma.sync configs near ``cfg``: more or fewer K warps, two units per lane, two tiles per warp,
    two warps along N, two K blocks per loop step, K split over 2 and 4 thread blocks (half the K warps
    for 4); for a fragment-native format (QTIP HYB) also one unit per lane, the other table placements
    (lut_shared 0, 1, 2) and half the K warps with 2 K blocks a step."""
    out = [replace(cfg, warps_k=cfg.warps_k * 2), replace(cfg, warps_k=max(1, cfg.warps_k // 2)),
           replace(cfg, units=cfg.units * 2), replace(cfg, tiles=cfg.tiles * 2),
           replace(cfg, warps_n=cfg.warps_n * 2), replace(cfg, unroll=2),
           replace(cfg, blocks_k=cfg.blocks_k * 2), replace(cfg, blocks_k=cfg.blocks_k * 4,
                                                            warps_k=max(1, cfg.warps_k // 2))]
    if fragment:
        out += [replace(cfg, units=max(1, cfg.units // 2))]
        out += [replace(cfg, lut_shared=v) for v in (2, 1, 0) if v != cfg.lut_shared]
        out += [replace(cfg, warps_k=max(1, cfg.warps_k // 2), unroll=2)]
    return out


def family_api(family: str):
    """(default config of (fmt, n, k, m), variants, check, scheduled func builder) of a kernel family."""
    if family == "mma":
        from ..kernels.mma import check_mma_config, format_default_mma_config, mma_scheduled_func

        return format_default_mma_config, mma_variants, check_mma_config, mma_scheduled_func
    from ..kernels.tensorcore import check_tc_config, default_tc_config, tc_scheduled_func

    def default(fmt, n, k, m):
        return default_tc_config(n, k, m, fmt.decode_unit)

    return default, variants, check_tc_config, tc_scheduled_func


def candidates(fmt, n: int, k: int, m: int, extra: Sequence[str], with_variants: bool, plain: bool,
               family: str = "tensorcore"):
    """[(label, cfg, use_intrin)] that tile the shape: default first, no duplicates."""
    default, near, check, _ = family_api(family)
    fragment = family == "mma" and fmt.fragment_native  # QTIP HYB: qcompile.kernels.mma_fragment
    base = default(fmt, n, k, m)
    cfgs = [base] + [parse_config(t, base) for t in extra] + ((near(base, fragment) if fragment else near(base))
                                                              if with_variants else [])
    out, seen = [], set()
    prefix = "tc" if family == "tensorcore" else family
    if family == "mma":  # the pipeline stages' shared memory at the format's own bits per weight
        from ..kernels.mma import streamed_bits

        check_args = {"staged_bits": streamed_bits(fmt, n, k)}
    else:
        check_args = {}
    for i, cfg in enumerate(cfgs):
        if cfg in seen:
            continue
        try:
            check(cfg, n, k, m, fmt.decode_unit, *((True,) if fragment else ()), **check_args)
        except ValueError:
            continue
        seen.add(cfg)
        out.append((f"{prefix}-default" if i == 0 else f"{prefix}-{len(out)}", cfg, True))
    if plain and fmt.decode_intrin("cuda") is not None and not fragment:  # (no decode intrinsic there)
        out.append((f"{prefix}-default-tir", base, False))
    return out


def _variant_note(use_intrin) -> str:
    """The log's note of a candidate's "intrin" field: none for the format's intrinsic, else how it was built."""
    if use_intrin in (None, True):
        return ""
    if isinstance(use_intrin, tuple):  # ("flags", "a+b")
        return f" ({use_intrin[1]})"
    return " (TIR decode)"


def _short(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.as_dict().items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..errors import QCompileError
    from .harness import parse_ms, parse_shapes

    args = build_parser().parse_args(argv)
    try:
        shapes, ms = parse_shapes(args.shapes), parse_ms(args.m)
        from ..formats import get as get_format

        fmt = get_format(args.format)
        for n, k in shapes:
            fmt.check_shape(n, k)
        from ..kernels.mma import MmaConfig
        from ..kernels.tensorcore import TensorCoreConfig

        for text in args.config:
            parse_config(text, MmaConfig() if args.family == "mma" else TensorCoreConfig())
        check_flags(name for combo in args.flag for name in combo.split("+"))
        from .harness import require_cuda

        require_cuda()
    except (QCompileError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = run(fmt, shapes, ms, args)
    if args.out:
        from ..jsonio import write_rows_json

        write_rows_json(args.out, rows)
    return 0


def sweep_row(fmt, n: int, k: int, m: int, label: str, cfg, use_intrin, cublas_us, gpu: str) -> dict:
    """A row before its measurement: what ran (format, shape, kernel label, config, decode intrinsic or
    switches), the GPU, and for a plain config (the decode intrinsic, no switches) its kernel's
    fingerprint (``tune.records.kernel_code``), which ``qcompile tune --import-sweep`` compares."""
    from ..kernels.library import KernelSpec
    from ..tune.records import kernel_code

    row = {"format": fmt.name, "N": n, "K": k, "M": m, "kernel": label,
           "cfg": None if cfg is None else cfg.as_dict(), "intrin": use_intrin, "us": None,
           "cublas_fp16_us": cublas_us, "speedup_vs_fp16": None, "rel_err": None, "error": None, "gpu": gpu}
    if cfg is not None and use_intrin is True:
        row["code"] = kernel_code(KernelSpec(fmt.name, n, k, m), gpu, [cfg])
    return row


def run(fmt, shapes, ms, args) -> List[dict]:
    import torch

    from ..kernels.library import KernelSpec, cuda_source, scheduled_func
    from ..errors import QCompileError
    from ..kernels.resources import compile_cubin, find_nvdisasm, resources_of_report, sass_loop_mix
    from ..kernels.target import parse_target
    from .baselines import RotatingWeights, cublas_fp16_method
    from .harness import _Bench, bench_weight, check_and_time, gpu_short_name, one_line
    from .timing import l2_cache_bytes

    log = lambda text: print(text, flush=True)  # noqa: E731
    target = parse_target("auto")
    device = torch.device("cuda")
    l2_bytes = l2_cache_bytes(device)
    bench = _Bench(args.iters, args.warmup, args.timing, log)
    log(f"{torch.cuda.get_device_name(device)}, format {fmt.name}, target {target.key}")
    gpu = gpu_short_name(torch.cuda.get_device_name(device))
    rows: List[dict] = []
    for n, k in shapes:
        qw = bench_weight(fmt, n, k, device)
        w16 = fmt.decode_fp16(qw)
        w64_t = w16.to(torch.float64).T
        q_weights = RotatingWeights([qw.tensors[name] for name in fmt.tensor_specs(n, k)], l2_bytes)
        fp16_weights = RotatingWeights([w16], l2_bytes)
        for m in ms:
            X = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = X.to(torch.float64) @ w64_t
            t_fp16 = bench.time(cublas_fp16_method(X, fp16_weights), n, k, m)
            cublas_us = None if t_fp16 is None else t_fp16.median_us
            kernels = [("library-default", None, None)]
            try:
                kernels += candidates(fmt, n, k, m, args.config, not args.no_variants, args.plain_decode,
                                      args.family)
            except ValueError as err:
                log(f"warning: N={n} K={k} M={m}: {one_line(err)}")
            for combo in args.flag:
                with flags_on(combo.split("+")):
                    try:
                        flagged = candidates(fmt, n, k, m, args.config, not args.no_variants, False, args.family)
                    except ValueError:
                        flagged = []
                kernels += [(f"{label}-{combo}", cfg, ("flags", combo)) for label, cfg, _ in flagged]
            for label, cfg, use_intrin in kernels:
                row = sweep_row(fmt, n, k, m, label, cfg, use_intrin, cublas_us, gpu)
                rows.append(row)
                try:
                    if cfg is None:
                        func = scheduled_func(KernelSpec(fmt.name, n, k, m), target)
                    elif isinstance(use_intrin, tuple):  # ("flags", "a+b"): built with those switches on
                        with flags_on(use_intrin[1].split("+")):
                            func = family_api(args.family)[3](fmt, n, k, m, cfg)
                    else:
                        func = family_api(args.family)[3](fmt, n, k, m, cfg, use_intrin)
                    lib = compile_main(func, target)
                    kernel = lib["main"]
                    if args.resources:  # (nvcc here: the registers and shared memory ptxas gives each kernel)
                        source = cuda_source(lib)
                        report, cubin = compile_cubin(source, target.arch)
                        row["resources"] = {name: r.as_dict() for name, r in
                                            resources_of_report(report, target.arch).items()}
                        if find_nvdisasm():  # ... and its main loop's instruction mix (a note: never fails the row)
                            try:
                                row["loop_mix"] = {name: {"instructions": mix.instructions, "alu": mix.alu,
                                                          "fma": mix.fma, "bound_cycles": mix.bound_cycles}
                                                   for name, mix in sass_loop_mix(source, target.arch,
                                                                                  cubin=cubin).items()}
                            except QCompileError as err:
                                row["loop_mix_error"] = one_line(err)
                    Y = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)
                    kernel(X, *q_weights[0], Y)
                    torch.cuda.synchronize()
                except Exception as err:  # a config that does not build or launch: noted, the others go on
                    row["error"] = one_line(err)
                    log(f"  N={n:>6} K={k:>6} M={m:>4} {label:<16} FAILED {row['error']}")
                    continue
                us = check_and_time(row, bench, kernel, X, q_weights, Y, ref,
                                    f"  N={n:>6} K={k:>6} M={m:>4} {label:<16}", log, REL_ERR_MAX)
                if us is None:
                    continue
                if cublas_us is not None:
                    row["speedup_vs_fp16"] = cublas_us / us
                log(f"  N={n:>6} K={k:>6} M={m:>4} {label:<16} {us:9.2f} us  cublas "
                    f"{cublas_us if cublas_us is None else round(cublas_us, 2)} us  speedup "
                    f"{row['speedup_vs_fp16'] or float('nan'):.2f}x  {'' if cfg is None else _short(cfg)}"
                    f"{_variant_note(use_intrin)}")
        del q_weights, fp16_weights, qw, w16, w64_t
        torch.cuda.empty_cache()
    print_table(rows, args.family)
    return rows


def print_table(rows: List[dict], family: str = "tensorcore") -> None:
    print("\n| N | K | M | kernel | config | µs | cuBLAS µs | speedup | rel_err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        from ..kernels.mma import MmaConfig
        from ..kernels.tensorcore import TensorCoreConfig

        cls = MmaConfig if family == "mma" else TensorCoreConfig
        cfg = "" if r["cfg"] is None else _short(cls(**r["cfg"]))
        us = "FAILED" if r["us"] is None else f"{r['us']:.2f}"
        cub = "" if r["cublas_fp16_us"] is None else f"{r['cublas_fp16_us']:.2f}"
        sp = "" if r["speedup_vs_fp16"] is None else f"{r['speedup_vs_fp16']:.2f}x"
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        print(f"| {r['N']} | {r['K']} | {r['M']} | {r['kernel']} | {cfg} | {us} | {cub} | {sp} | {err} |")
    best = {}
    for r in rows:
        key = (r["N"], r["K"], r["M"])
        if r["us"] is not None and r["kernel"] != "library-default" and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    print(f"\nbest {family} config per shape:")
    for (n, k, m), r in best.items():
        print(f"  N={n} K={k} M={m}: {r['us']:.2f} us, {r['speedup_vs_fp16'] or float('nan'):.2f}x vs cuBLAS, "
              f"{json.dumps(r['cfg'])}")


if __name__ == "__main__":
    sys.exit(main())
