"""The qcompile command line: quantize, build, tune, inspect, run, eval, bench.

User errors (QCompileError) print ``error: <message>`` on one line to stderr and exit with 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, List, Optional

from .errors import QCompileError

if TYPE_CHECKING:  # the kernel library imports TVM; the command line loads it only where needed
    from .kernels.library import KernelSpec

EXIT_USER_ERROR = 2


def parser() -> argparse.ArgumentParser:
    from .kernels.library import (DEFAULT_BUCKETS, FRAGMENT_DECODE_MIN_M, GEMV_MAX_M, MMA_DECODE_MIN_M,
                                  MMA_DECODE_MIN_M_M16, MMA_EXTRA_BUCKETS)

    p = argparse.ArgumentParser(prog="qcompile", description=(
        "Compile 2-4 bit quantized LLM weights into fused dequantize + GEMV/GEMM kernels."))
    from . import __version__

    p.add_argument("--version", action="version", version=f"qcompile {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    q = sub.add_parser("quantize", help="quantize a model layer by layer into a checkpoint directory",
                       description="Quantize every decoder linear of a Hugging Face Llama-family model (optionally "
                                   "with the randomized Hadamard transform and Hessian-aware LDLQ rounding) into a "
                                   "checkpoint directory that qcompile build accepts. An interrupted run resumes "
                                   "when started again with the same settings and -o.")
    q.add_argument("model_dir", nargs="?", default=None,
                   help="Hugging Face model directory (default: the built-in default model)")
    q.add_argument("--format", "-f", required=True, help="weight format, e.g. int4-g128 (see qcompile.formats.names())")
    q.add_argument("--rht", action="store_true", help="randomized Hadamard transform (incoherence processing)")
    q.add_argument("--ldlq", action=argparse.BooleanOptionalAction, default=True,
                   help="Hessian-aware rounding from calibration text (default: on; --no-ldlq rounds to nearest "
                        "and needs no calibration)")
    q.add_argument("--seed", type=int, default=0, help="seed of the RHT signs and calibration windows (default: 0)")
    q.add_argument("--sigma", type=float, default=1e-2, help="Hessian damping, relative ridge (default: %(default)s)")
    q.add_argument("--calibration-samples", type=int, default=None,
                   help="calibration windows from the corpus train split (default: 128)")
    q.add_argument("--context", type=int, default=None,
                   help="tokens per calibration window (default: min(512, the model's positions))")
    q.add_argument("--device", default=None, help="torch device to run layers on (default: cuda if available)")
    q.add_argument("-o", "--output", required=True, help="checkpoint directory to write (or resume)")
    q.add_argument("--overwrite", action="store_true", help="replace a checkpoint made with other settings")
    q.add_argument("--quiet", "-q", action="store_true", help="no progress output")

    b = sub.add_parser("build", help="quantize a model and compile its kernels into an artifact directory",
                       description="Quantize every decoder linear of a Hugging Face Llama-family model (or take "
                                   "the weights of a qcompile quantize checkpoint) and compile its kernels into an "
                                   "artifact directory.")
    b.add_argument("model_dir", nargs="?", default=None,
                   help="Hugging Face model directory or qcompile checkpoint (default: the built-in tiny model)")
    b.add_argument("--format", "-f", default=None,
                   help="weight format, e.g. int4-g128 (see qcompile.formats.names()); required for a model "
                        "directory, optional for a checkpoint (which carries its format)")
    b.add_argument("--target", "-t", default="auto",
                   help="auto (the local GPU, else the CPU), llvm, sm_XX or a GPU name such as h100 (default: auto)")
    b.add_argument("-o", "--output", required=True, help="artifact directory to write")
    b.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    b.add_argument("--buckets", default=None,
                   help="batch-size buckets to compile kernels for (default: "
                        f"{','.join(str(m) for m in DEFAULT_BUCKETS)}, and {','.join(str(m) for m in MMA_EXTRA_BUCKETS)} "
                        "for int4 and E8P on a GPU)")
    b.add_argument("--decode-min-m", type=int, default=None, metavar="M",
                   help="batch size from which layers decode their weight to fp16 once and multiply with cuBLAS "
                        f"(default: {MMA_DECODE_MIN_M} for int4 and E8P with the 64 bucket, else {MMA_DECODE_MIN_M_M16}; "
                        f"{FRAGMENT_DECODE_MIN_M} for QTIP HYB, {GEMV_MAX_M + 1} for QTIP 1MAD/3INST; 0: never, "
                        f"the fused kernels at every M)")
    b.add_argument("--records", default=None, metavar="DIR",
                   help="tuning records directory (<gpu>/<format>.json) to take tuned schedules from "
                        "(default: $QCOMPILE_SCHEDULES, else the repository's schedules/); they apply when "
                        "the target is the local GPU or names it (--target h100)")
    b.add_argument("--no-records", action="store_true", help="default schedules only; ignore tuning records")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress messages")

    from .kernels.library import GEMV_MAX_M
    from .kernels.mma import MMA_MAX_M
    from .tune.driver import DEFAULT_BUDGET, ORDERS

    t = sub.add_parser("tune", help="tune the GEMV and low-batch tensor-core kernels of a model, a checkpoint or "
                                    "some layer shapes on the local GPU",
                       description="Measure schedule candidates for each kernel (format, N, K, M) on the local "
                                   f"CUDA GPU, in the family that runs its bucket (the GEMV, the mma.sync or the WMMA "
                                   f"tensor-core kernel, up to M={GEMV_MAX_M}; int4/E8P's mma.sync up to M={MMA_MAX_M}), and keep the "
                                   "results in the tuning records "
                                   "(<records>/<gpu>/<format>.json), which qcompile build then uses. The kernels are "
                                   "those qcompile build compiles for MODEL_OR_CHECKPOINT (at the --m buckets), or "
                                   "--shapes. Resumable: an interrupted run loses at most one measurement, and a run "
                                   "never measures a candidate twice.")
    t.add_argument("model", nargs="?", default=None, metavar="MODEL_OR_CHECKPOINT",
                   help="Hugging Face Llama-family model directory (with --format: the format it is built with) or "
                        "qcompile checkpoint (its format); instead of --shapes")
    t.add_argument("--format", "-f", default=None,
                   help="weight format, e.g. int4-g128; required with a model directory or --shapes (with --shapes "
                        "also a list, e.g. int4-g128,e8p-2,qtip-hyb-2), optional for a checkpoint (which carries its format)")
    t.add_argument("--shapes", default=None,
                   help="layer shapes NxK, out x in features (e.g. 4096x4096,11008x4096), or model presets with "
                        "every linear shape, fused qkv and gate/up included (llama-2-7b, llama-2-13b, llama-2-70b, "
                        "llama-3-8b); instead of a model")
    t.add_argument("--m", default=None,
                   help=f"batch sizes (M buckets) to tune: the GEMV, mma.sync and WMMA buckets (up to M={GEMV_MAX_M}; int4 and E8P "
                        f"up to {MMA_MAX_M} on mma.sync); the GEMM kernels above have no tuning space yet "
                        f"(default: the buckets qcompile build compiles, 1,4,16 and 32,64 for int4 and E8P)")
    t.add_argument("--dry-run", action="store_true", help="print the kernels it would tune and exit (needs no GPU)")
    t.add_argument("--target", "-t", default="auto", help="the local GPU: auto, its sm_XX or its name (default: auto)")
    t.add_argument("--records", default=None, metavar="DIR",
                   help="records directory to read and extend (default: $QCOMPILE_SCHEDULES, else the "
                        "repository's schedules/, else ./schedules)")
    t.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                   help="candidates per kernel, counting earlier runs (default: %(default)s)")
    t.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall time per kernel (default: none)")
    t.add_argument("--alternatives", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the other kernel families that can run a bucket (at M=1 the mma.sync kernel "
                        "or the GEMV, whichever is not the default; the GEMV or WMMA kernel at QTIP 1MAD/3INST's "
                        "M=2..7), each with a quarter of the budget; build takes one where it measured faster "
                        "than the bucket's default family (default: on)")
    t.add_argument("--merge", default=None, metavar="DIR",
                   help="add the records under DIR (<gpu>/<format>.json, e.g. tuned on another machine with "
                        "--records DIR) to the records directory, then exit: no GPU needed; where both measured "
                        "a candidate, DIR's time is kept")
    t.add_argument("--import-sweep", default=None, metavar="FILE",
                   help="add the measured rows of a tc_sweep JSON file (python -m qcompile.bench.tc_sweep --out) "
                        "to the records, then exit: no GPU needed; rows built with kernel switches are left out, "
                        "and each kernel's rows must time today's default config")
    t.add_argument("--gpu", default=None, metavar="NAME",
                   help="with --import-sweep: the GPU that ran the sweep (e.g. h100), for rows that do not say")
    t.add_argument("--jobs", "-j", type=int, default=None,
                   help="candidates compiled in parallel while the GPU measures (default: the CPUs, at most 8)")
    t.add_argument("--order", choices=ORDERS, default="model",
                   help="model: XGBoost cost model orders the candidates after the first measurements; "
                        "space: nearest the default config first (default: %(default)s)")

    i = sub.add_parser("inspect", help="print an artifact's manifest summary")
    i.add_argument("artifact_dir")
    i.add_argument("--verify", action="store_true", help="also check every file's sha256")

    r = sub.add_parser("run", help="load an artifact and generate text")
    r.add_argument("artifact_dir")
    r.add_argument("--prompt", "-p", required=True)
    r.add_argument("--max-new-tokens", "-n", type=int, default=32)
    r.add_argument("--device", default=None, help="torch device (default: the artifact's target)")

    e = sub.add_parser("eval", help="quality: perplexity of a model, checkpoint or artifact; the quality table")
    esub = e.add_subparsers(dest="eval_command", metavar="WHAT")
    esub.required = True
    ep = esub.add_parser("ppl", help="perplexity on the corpus's held-out test split")
    ep.add_argument("path", nargs="?", default=None,
                    help="model directory, qcompile checkpoint (evaluated dequantized) or artifact "
                         "(default: the trained small model)")
    ep.add_argument("--context", type=int, default=None, help="window length in tokens (default: 256)")
    ep.add_argument("--stride", type=int, default=None, help="window stride in tokens (default: 128)")
    ep.add_argument("--device", default=None, help="torch device (default: cuda if available / the artifact's target)")
    ep.add_argument("--max-tokens", type=int, default=None, help="score only the first N test tokens")
    ep.add_argument("--json", action="store_true", help="print the result as JSON")
    eq = esub.add_parser("quality", help="quantize the trained model with each configuration and write the "
                                         "perplexity table (artifacts/bench/quality.json)")
    eq.add_argument("--model", default=None, help="unquantized model directory (default: the trained small model)")
    eq.add_argument("--formats", nargs="+", default=None, help="formats to measure (default: int4-g128)")
    eq.add_argument("--out", default="artifacts/bench/quality.json", help="table to write (default: %(default)s)")
    eq.add_argument("--context", type=int, default=None, help="perplexity window (default: 256)")
    eq.add_argument("--stride", type=int, default=None, help="perplexity stride (default: 128)")
    eq.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    eq.add_argument("--max-tokens", type=int, default=None, help="score only the first N test tokens")
    eq.add_argument("--calibration-samples", type=int, default=None, help="calibration windows (default: 128)")
    eq.add_argument("--calibration-context", type=int, default=None, help="tokens per calibration window")
    eq.add_argument("--seed", type=int, default=0)
    eq.add_argument("--work-dir", default=None,
                    help="where the checkpoints go (default: ~/.cache/qcompile/quality/<model>)")
    eq.add_argument("--markdown", action="store_true", help="also print the table as Markdown")

    im = sub.add_parser("import", help="read a reference-format checkpoint (QuIP#, QTIP) into a qcompile checkpoint")
    im.add_argument("src_dir", help="Hugging Face directory of a QuIP# or QTIP quantized model")
    im.add_argument("-o", "--output", required=True, help="qcompile checkpoint directory to write")
    ex = sub.add_parser("export", help="write a qcompile checkpoint in a reference layout")
    ex.add_argument("checkpoint_dir")
    ex.add_argument("--layout", required=True, choices=sorted(REFERENCE_LAYOUTS))
    ex.add_argument("-o", "--output", required=True, help="directory to write")
    ex.add_argument("--allow-unfused", action="store_true",
                    help="write separately quantized q/k/v and gate/up (the reference loader expects fused ones)")

    sub.add_parser("bench", help="benchmark kernels against baselines (see qcompile bench --help)",
                   add_help=False)
    return p


# layout name -> module with import_checkpoint / export_checkpoint / detect
REFERENCE_LAYOUTS = {"quip-sharp": "qcompile.formats.quipsharp_io", "qtip": "qcompile.formats.qtip_io"}


def _layout_module(name):
    import importlib

    return importlib.import_module(REFERENCE_LAYOUTS[name])


def cmd_import(args) -> int:
    import json
    from pathlib import Path

    cfg_path = Path(args.src_dir) / "config.json"
    if not cfg_path.is_file():
        raise QCompileError(f"{args.src_dir} has no config.json; give a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as err:
        raise QCompileError(f"cannot read {cfg_path}: {err}") from None
    params = cfg.get("quip_params") if isinstance(cfg, dict) else None
    if not isinstance(params, dict):
        raise QCompileError(f"{args.src_dir} is not a QuIP#/QTIP checkpoint (config.json has no quip_params)")
    layout = "qtip" if _is_qtip(params) else "quip-sharp"
    _layout_module(layout).import_checkpoint(args.src_dir, args.output)
    print(f"imported {args.src_dir} ({layout} layout) into {args.output}")
    return 0


def _is_qtip(params: dict) -> bool:
    """QTIP checkpoints describe a bitshift trellis (codebook "bitshift", L, decode_mode); QuIP#
    ones an E8P codebook id."""
    return params.get("codebook") == "bitshift" or any(key in params for key in ("L", "decode_mode"))


def cmd_export(args) -> int:
    kwargs = {"allow_unfused": args.allow_unfused} if args.layout == "quip-sharp" else {}
    _layout_module(args.layout).export_checkpoint(args.checkpoint_dir, args.output, **kwargs)
    print(f"wrote {args.output} ({args.layout} layout)")
    return 0


def cmd_quantize(args) -> int:
    from .model.quantize import DEFAULT_CALIBRATION_SAMPLES, quantize_model

    quantize_model(args.model_dir, args.format, out_dir=args.output, rht=args.rht, ldlq=args.ldlq, seed=args.seed,
                   sigma=args.sigma, n_calibration=args.calibration_samples or DEFAULT_CALIBRATION_SAMPLES,
                   context=args.context, device=args.device, progress=not args.quiet, overwrite=args.overwrite)
    return 0


def cmd_eval(args) -> int:
    import json

    if args.eval_command == "quality":
        from .model.quality import markdown_table, quality_table

        table = quality_table(args.model, args.formats, out=args.out, context=args.context, stride=args.stride,
                              device=args.device, work_dir=args.work_dir, n_calibration=args.calibration_samples,
                              calibration_context=args.calibration_context, seed=args.seed,
                              max_tokens=args.max_tokens)
        if args.markdown:
            print(markdown_table(table))
        return 0
    from .model.checkpoint import is_checkpoint

    try:
        from .model import evaluate
    except ImportError as err:
        raise QCompileError(f"perplexity evaluation is not available in this install ({err})") from None
    kwargs = {"context": args.context if args.context is not None else evaluate.DEFAULT_CONTEXT,
              "stride": args.stride if args.stride is not None else evaluate.DEFAULT_STRIDE,
              "device": args.device, "max_tokens": args.max_tokens}
    if args.path is not None and is_checkpoint(args.path):
        from .model.quality import eval_checkpoint_ppl

        result = eval_checkpoint_ppl(args.path, **kwargs)
    else:
        result = evaluate.eval_ppl(args.path, **kwargs)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        fmt = getattr(evaluate, "format_result", None)
        print(fmt(result) if fmt else f"ppl {result['ppl']:.3f}")
    return 0


def cmd_build(args) -> int:
    from .model.build import build

    records = False if args.no_records else (args.records if args.records is not None else True)
    build(args.model_dir, args.format, args.target, args.output, buckets=args.buckets,
          progress=None if args.quiet else print, overwrite=args.overwrite, records=records,
          warn=lambda text: print(f"warning: {text}", file=sys.stderr), decode_min_m=args.decode_min_m)
    return 0


def tune_kernels(args) -> List[KernelSpec]:
    """The kernels ``qcompile tune`` measures: the (format, N, K) of MODEL_OR_CHECKPOINT as
    ``qcompile build`` compiles them (``model.build.kernel_shapes``), or of --format and --shapes,
    times the tunable M buckets of --m (the GEMV, mma.sync and WMMA buckets: ``kernel_family`` not GEMM;
    default: the buckets ``qcompile build`` compiles by default, ``library.default_buckets``).
    Validates everything on the way (one-line QCompileError); needs no GPU."""
    from .bench.harness import parse_ms, parse_shapes
    from .formats import get as get_format
    from .kernels.library import GEMM_FAMILY, GEMV_MAX_M, KernelSpec, default_buckets, kernel_family
    from .kernels.mma import MMA_MAX_M

    if args.model is not None and args.shapes is not None:
        raise QCompileError("give a model directory or checkpoint, or --shapes, not both")
    if args.model is None and args.shapes is None:
        raise QCompileError("give a model directory or checkpoint (qcompile tune MODEL_OR_CHECKPOINT) or "
                            "--format F --shapes NxK,...")
    if args.shapes is not None:
        if args.format is None:
            raise QCompileError("--shapes needs --format (e.g. --format int4-g128)")
        # with --shapes, several formats at once (a,b,...): one records file each
        formats = [get_format(name.strip()) for name in dict.fromkeys(args.format.split(",")) if name.strip()]
        shapes = list(dict.fromkeys(parse_shapes(args.shapes)))
        for fmt in formats:
            for n, k in shapes:
                fmt.check_shape(n, k)
        kernel_shapes = [(fmt.name, n, k) for fmt in formats for n, k in shapes]
    else:
        from .model.build import kernel_shapes as model_kernel_shapes

        kernel_shapes = model_kernel_shapes(args.model, args.format)
    if args.m is None:  # the buckets build compiles by default (1, 4, 16; int4/E8P also 32, 64): a
        # bucket it does not compile (e.g. 2, which runs padded to 4) is tuned only when asked for
        specs = [KernelSpec(f, n, k, m) for f, n, k in kernel_shapes for m in default_buckets(f)]
    else:
        ms = list(dict.fromkeys(parse_ms(args.m)))
        specs = [KernelSpec(f, n, k, m) for f, n, k in kernel_shapes for m in ms]
    tunable = [s for s in specs if kernel_family(s.format, s.m) != GEMM_FAMILY]
    gemm = sorted({s.m for s in specs} - {s.m for s in tunable})
    if not tunable:
        raise QCompileError(f"--m {args.m}: only the GEMV, mma.sync and WMMA buckets can be tuned (M <= {GEMV_MAX_M}; "
                            f"int4 and E8P up to M={MMA_MAX_M}); the GEMM kernels have no tuning space yet "
                            f"(e.g. --m 1,2,4,16)")
    if gemm:
        print(f"note: M {','.join(map(str, gemm))} run GEMM kernels with no tuning space yet "
              f"(build uses their default schedule); not tuned")
    return tunable


def describe_kernels(specs, source: str, alternatives: bool = False) -> str:
    """The list ``qcompile tune`` prints before it starts: one line per (format, N, K) with its Ms
    by kernel family, e.g. ``M=1,2,4 gemv  M=16 tensorcore``; with ``alternatives``, the families
    measured for a bucket joined by "+" (``M=1 gemv+mma``)."""
    from .kernels.library import family_options, kernel_family

    by_shape = {}
    for spec in specs:
        families = by_shape.setdefault((spec.format, spec.n, spec.k), {})
        label = ("+".join(family_options(spec.format, spec.m)) if alternatives
                 else kernel_family(spec.format, spec.m))
        families.setdefault(label, []).append(spec.m)
    lines = [f"{len(specs)} kernels to tune ({len(by_shape)} shapes) from {source}:"]
    for (fmt, n, k), families in by_shape.items():
        ms = "  ".join(f"M={','.join(map(str, ms))} {family}" for family, ms in families.items())
        lines.append(f"  {fmt:<12} N={n:>6} K={k:>6}  {ms}")
    return "\n".join(lines)


def describe_records(specs, records, gpu: str, alternatives: bool = False) -> str:
    """What ``qcompile tune --dry-run`` adds where it knows the GPU: each kernel's record in the
    records directory and what a tuning run and a build would do with it (``records.kernel_code``:
    an entry of today's kernels is resumed and applied; one of since-changed kernels is measured anew
    and not applied; one without a fingerprint is measured anew and applied meanwhile)."""
    from .errors import QCompileError
    from .kernels.library import family_options, kernel_family
    from .tune.records import applies_today
    from .tune.space import FAMILIES, family_of

    lines = [f"records for {gpu} ({records.root / gpu}):"]
    counts = {"applied": 0, "not applied": 0, "none": 0}
    for spec in specs:
        families = family_options(spec.format, spec.m) if alternatives else (kernel_family(spec.format, spec.m),)
        chosen = records.config_for(spec, gpu)  # (what build applies to the kernel: one family's best or none)
        has_entry = False
        for family in [f for f in families if f in FAMILIES]:
            label = f"  {spec.format:<12} N={spec.n:>6} K={spec.k:>6} M={spec.m:>4} {family:<10}: "
            try:
                entry = records.entry(spec, gpu, family)
            except QCompileError as err:
                lines.append(label + str(err))
                continue
            best = entry.best() if entry is not None else None
            if best is None:
                lines.append(label + "none")
                continue
            has_entry = True
            applied = chosen is not None and family_of(chosen) == family
            build = "build applies it" if applied else "build does not apply it"
            if applied or entry.stale_code():
                why = ""
            elif not applies_today(entry, spec):
                why = " (tuned against another default)"
            elif chosen is not None:
                why = " (another family's best is faster)"
            elif family != families[0]:
                why = " (beside no applicable entry of the default family)"
            else:
                why = ""
            if entry.code is None:
                state = f"no fingerprint; {build}{why}; a tuning run measures it anew"
            elif entry.stale_code():
                state = "kernels changed since; build does not apply it; a tuning run measures it anew"
            else:
                state = f"today's kernels; {build}{why}; a tuning run resumes it"
            lines.append(label + f"{entry.tried_count} tried, best {best[1]:.2f} us; {state}")
        counts["applied" if chosen is not None else "not applied" if has_entry else "none"] += 1
    lines.append(f"{len(specs)} kernels: build applies a record to {counts['applied']}; "
                 f"{counts['not applied']} have records it does not apply; {counts['none']} have none")
    return "\n".join(lines)


def _tuning_options_given(args) -> list:
    """The options of a tuning run given to ``qcompile tune`` (which --merge and --import-sweep refuse)."""
    return [flag for flag, given in (("a model or checkpoint", args.model is not None),
                                     ("--shapes", args.shapes is not None), ("--format", args.format is not None),
                                     ("--m", args.m is not None), ("--dry-run", args.dry_run)) if given]


def cmd_tune(args) -> int:
    from pathlib import Path

    from .kernels.target import local_cuda_arch, parse_target
    from .tune.driver import default_jobs, tune
    from .tune.measure import CudaMeasure, require_cuda
    from .tune.records import default_records_dir, local_gpu_name

    records_dir = Path(args.records) if args.records else (default_records_dir() or Path("schedules"))
    if args.gpu is not None and args.import_sweep is None:
        raise QCompileError("--gpu names the GPU of an --import-sweep file; the tuner itself measures the local GPU")
    if args.import_sweep is not None:  # no kernels, no GPU: a sweep's measured rows join the records
        from .tune.records import TuningRecords
        from .tune.sweep_import import import_sweep, read_sweep_rows

        others = _tuning_options_given(args) + (["--merge"] if args.merge is not None else [])
        if others:
            raise QCompileError(f"--import-sweep takes no {', '.join(others)}; run it alone (with --records for "
                                f"the destination, --gpu for rows that do not name their GPU)")
        for line in import_sweep(TuningRecords(records_dir), read_sweep_rows(args.import_sweep), args.gpu):
            print(line)
        return 0
    if args.merge is not None:  # no kernels, no GPU: records measured elsewhere join these
        from .tune.records import TuningRecords

        others = _tuning_options_given(args)
        if others:
            raise QCompileError(f"--merge only merges records and takes no {', '.join(others)}; run the merge "
                                f"alone (with --records for the destination)")
        for path, count in TuningRecords(records_dir).merge(args.merge):
            print(f"{path}: {count} entries merged from {args.merge}")
        return 0
    specs = tune_kernels(args)
    target = parse_target(args.target)
    source = args.model if args.model is not None else "--shapes"
    if args.jobs is not None and args.jobs < 1:
        raise QCompileError(f"--jobs {args.jobs}: give at least 1 compile job (or leave it out: the CPUs, at most 8)")
    if args.dry_run:
        print(describe_kernels(specs, source, args.alternatives))
        from .kernels.target import GPU_ARCH
        from .tune.records import TuningRecords

        gpu = target.name if target.name in GPU_ARCH else local_gpu_name()
        if gpu is not None:
            print(describe_records(specs, TuningRecords(records_dir, warn=lambda message: None), gpu,
                                   args.alternatives))
        return 0
    require_cuda()
    if target.kind != "cuda" or target.arch != local_cuda_arch():
        raise QCompileError(f"qcompile tune measures on the local GPU ({local_cuda_arch()}); target "
                            f"{args.target!r} is not it (use --target auto)")
    gpu = local_gpu_name()
    if target.name not in (target.arch, gpu):  # e.g. --target h200 on an H100
        raise QCompileError(f"--target {args.target} names another GPU than this one ({gpu})")
    jobs = default_jobs() if args.jobs is None else args.jobs
    print(describe_kernels(specs, source, args.alternatives), flush=True)
    measure = CudaMeasure()
    formats = list(dict.fromkeys(spec.format for spec in specs))
    results = []
    for fmt_name in formats:  # one records file per format
        if len(formats) > 1:
            print(f"\n{fmt_name}:", flush=True)
        results.append((fmt_name, tune([s for s in specs if s.format == fmt_name], target, measure, records_dir,
                                       budget=args.budget, time_budget_s=args.time_budget, gpu=gpu,
                                       order=args.order, log=lambda text: print(text, flush=True),
                                       jobs=jobs, alternatives=args.alternatives)))
    for fmt_name, fmt_results in results:
        print(f"\nrecords: {records_dir / gpu / (fmt_name + '.json')}")
        for result in fmt_results:
            spec = result.spec
            best = result.best
            if best is None:
                print(f"  N={spec.n:>6} K={spec.k:>6} M={spec.m:>4}: {result.skipped or 'no candidate ran'}")
                continue
            default_us = result.entry.default_us
            gain = f"  default {default_us:8.2f} us  {default_us / best[1]:.2f}x" if default_us else ""
            print(f"  N={spec.n:>6} K={spec.k:>6} M={spec.m:>4} {result.entry.kernel:<10}: {best[1]:8.2f} us{gain}  "
                  f"({result.measured_now} measured now)")
    return 0


def cmd_inspect(args) -> int:
    from .model.artifact import read_manifest, verify_files

    manifest = read_manifest(args.artifact_dir)
    if args.verify:
        verify_files(args.artifact_dir, manifest)
    print(format_manifest(manifest, verified=args.verify))
    return 0


def format_manifest(manifest: dict, verified: bool = False) -> str:
    layers = manifest["layers"]
    shapes = {}
    for layer in layers:
        shapes.setdefault(tuple(layer["shape"]), []).append(layer["name"].rsplit(".", 1)[-1])
    n_kernels = sum(len(layer["kernels"]) for layer in {tuple(l["shape"]): l for l in layers}.values())
    lines = [
        f"target          {manifest['target']}",
        f"format          {manifest.get('format')} ({manifest.get('bits_per_weight', 0):.3f} bits/weight measured)",
        f"model type      {manifest.get('model_type')}",
        f"versions        qcompile {manifest.get('qcompile_version')}, TVM {manifest['tvm_version']}",
        f"batch buckets   {', '.join(str(m) for m in manifest['buckets'])}",
        "decode + cuBLAS " + (", ".join(f"{f}: M >= {m}" for f, m in sorted(manifest["decode_min_m"].items()))
                              if manifest.get("decode_min_m") else "never (fused kernels at every M)"),
        f"layers          {len(layers)} quantized linears, {len(shapes)} shapes, {n_kernels} kernels",
    ]
    for (n, k), names in sorted(shapes.items()):
        kinds = ", ".join(sorted(set(names)))
        lines.append(f"  {n:>6} x {k:<6} {len(names):>4} layers  ({kinds})")
    fused = [layer for layer in layers if layer.get("fused")]
    if fused:
        parts = sorted({"/".join(layer["fused"]["parts"]) for layer in fused})
        lines.append(f"fused layers    {len(fused)} ({', '.join(parts)}: one product per call, split at run time)")
    rht_kernels = {name for layer in layers for name in layer.get("rht_kernels", ())}
    if rht_kernels:
        lines.append(f"rht kernels     {len(rht_kernels)} (the Hadamard transforms around the RHT layers)")
    tuned = manifest.get("tuned_kernels") or {}
    lines.append(f"tuned kernels   {len(tuned)} of {n_kernels} (the others use the default schedules)")
    lines.append("files" + ("           (sha256 verified)" if verified else ""))
    for name, entry in sorted(manifest["files"].items()):
        lines.append(f"  {name:<24} {entry.get('bytes', 0):>12,} B  {entry.get('sha256', '')[:16]}")
    return "\n".join(lines)


def cmd_run(args) -> int:
    import torch

    from .model.artifact import load_artifact

    if args.max_new_tokens < 1:
        raise QCompileError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model = load_artifact(args.artifact_dir, device=args.device)
    tokenizer = model.qcompile_tokenizer
    if tokenizer is None:
        raise QCompileError(f"artifact {args.artifact_dir} has no tokenizer files; rebuild it from a model "
                            f"directory that has them")
    device = next(model.buffers()).device
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False)
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


def cmd_bench(argv: List[str]) -> int:
    try:
        from .bench import harness
    except ImportError as err:
        raise QCompileError(f"the benchmark harness is not available in this install ({err})") from None
    result = harness.main(argv)
    return result if isinstance(result, int) else 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":  # the harness parses its own options (and --help)
            return cmd_bench(argv[1:])
        args = parser().parse_args(argv)
        return {"build": cmd_build, "inspect": cmd_inspect, "run": cmd_run, "quantize": cmd_quantize,
                "import": cmd_import, "export": cmd_export, "tune": cmd_tune,
                "eval": cmd_eval}[args.command](args)
    except QCompileError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
