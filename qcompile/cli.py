"""The qcompile command line: build, inspect, run, bench.

User errors (QCompileError) print ``error: <message>`` on one line to stderr and exit with 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .errors import QCompileError

EXIT_USER_ERROR = 2


def parser() -> argparse.ArgumentParser:
    from .kernels.library import DEFAULT_BUCKETS

    p = argparse.ArgumentParser(prog="qcompile", description=(
        "Compile 2-4 bit quantized LLM weights into fused dequantize + GEMV/GEMM kernels."))
    from . import __version__

    p.add_argument("--version", action="version", version=f"qcompile {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser("build", help="quantize a model and compile its kernels into an artifact directory",
                       description="Quantize every decoder linear of a Hugging Face Llama-family model and "
                                   "compile its kernels into an artifact directory.")
    b.add_argument("model_dir", nargs="?", default=None,
                   help="Hugging Face model directory (default: the built-in tiny model)")
    b.add_argument("--format", "-f", required=True, help="weight format, e.g. int4-g128 (see qcompile.formats.names())")
    b.add_argument("--target", "-t", default="auto",
                   help="auto (the local GPU, else the CPU), llvm, sm_XX or a GPU name such as h100 (default: auto)")
    b.add_argument("-o", "--output", required=True, help="artifact directory to write")
    b.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    b.add_argument("--buckets", default=",".join(str(m) for m in DEFAULT_BUCKETS),
                   help="batch-size buckets to compile kernels for (default: %(default)s)")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress messages")

    i = sub.add_parser("inspect", help="print an artifact's manifest summary")
    i.add_argument("artifact_dir")
    i.add_argument("--verify", action="store_true", help="also check every file's sha256")

    r = sub.add_parser("run", help="load an artifact and generate text")
    r.add_argument("artifact_dir")
    r.add_argument("--prompt", "-p", required=True)
    r.add_argument("--max-new-tokens", "-n", type=int, default=32)
    r.add_argument("--device", default=None, help="torch device (default: the artifact's target)")

    sub.add_parser("bench", help="benchmark kernels against baselines (see qcompile bench --help)",
                   add_help=False)
    return p


def cmd_build(args) -> int:
    from .model.build import build

    build(args.model_dir, args.format, args.target, args.output, buckets=args.buckets,
          progress=None if args.quiet else print, overwrite=args.overwrite)
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
        f"layers          {len(layers)} quantized linears, {len(shapes)} shapes, {n_kernels} kernels",
    ]
    for (n, k), names in sorted(shapes.items()):
        kinds = ", ".join(sorted(set(names)))
        lines.append(f"  {n:>6} x {k:<6} {len(names):>4} layers  ({kinds})")
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
        return {"build": cmd_build, "inspect": cmd_inspect, "run": cmd_run}[args.command](args)
    except QCompileError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
