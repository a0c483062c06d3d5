"""Time configs of the Hopper wgmma GEMM (qcompile.kernels.wgmma) against the routes it would replace.

    python3 -m qcompile.bench.wgmma_sweep --format int4-g128 --shapes 28672x8192,8192x28672 --m 1024 \
        --config bn=256,decode_intrin=1 --config bn=256,decode_intrin=1,prefetch=2,word_vec=4 --out FILE

Measured as ``qcompile bench`` measures (``bench_weight``, every method's weights rotated past the L2, CUDA
graphs, the median), in one process: cuBLAS fp16 (``F.linear``), the runtime's large-M route (the
decode-only kernel into an fp16 scratch, then cuBLAS), torch's int4 kernel on the same codes (4-bit
formats), and each config, whose result is first checked against float64 of the format's torch decode.
``--format fp16`` times the kernel with an fp16 B (the tensor-core side alone). Needs a Hopper GPU
(sm_90a); the kernel is not in the runtime's dispatch.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import fields, replace
from typing import List, Optional, Sequence

REL_ERR_MAX = 1e-2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m qcompile.bench.wgmma_sweep",
                                 description="Time wgmma GEMM configs against cuBLAS fp16 and decode + cuBLAS.")
    ap.add_argument("--format", default="int4-g128", help="a group-wise format (int4-g128), or fp16")
    ap.add_argument("--shapes", default="28672x8192,8192x28672", help="NxK layer shapes (out x in)")
    ap.add_argument("--m", default="1024", help="batch sizes, multiples of the M tile (default 1024)")
    ap.add_argument("--config", action="append", default=[], metavar="K=V,...",
                    help="a WgmmaConfig to time, e.g. 'bn=256,decode_intrin=1,warp_specialized=1' (fields not "
                         "given: the defaults); repeatable; none: the format's default_wgmma_config")
    ap.add_argument("--iters", type=int, default=100, help="timed launches per measurement (default 100)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed launches first (default 10)")
    ap.add_argument("--timing", choices=("graph", "events"), default="graph", help="timing mode (default graph)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    return ap


def parse_wgmma_config(text: str):
    """'bn=256,decode_intrin=1' -> WgmmaConfig (the other fields: the defaults)."""
    from ..kernels.wgmma import WgmmaConfig

    base = WgmmaConfig()
    kinds = {f.name: f.type for f in fields(base)}
    values = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key not in kinds or not value.isdigit():
            raise ValueError(f"--config: {item.strip()!r} is not FIELD=INT with FIELD one of {', '.join(kinds)}")
        values[key] = bool(int(value)) if kinds[key] in (bool, "bool") else int(value)
    return replace(base, **values)


def load_kernel(func):
    """Build for sm_90a and load: tvm.compile, export_library, load_module (the module carries CUDA source
    that the loader compiles for the local GPU, sm_90a on Hopper: wgmma needs the 'a')."""
    import tvm

    from ..kernels.wgmma import WGMMA_ARCH

    name = func.attrs["global_symbol"]
    ex = tvm.compile(tvm.IRModule({name: func}), target=tvm.target.Target({"kind": "cuda", "arch": WGMMA_ARCH}))
    lib = os.path.join(tempfile.mkdtemp(prefix="qc_wgmma_"), "k.so")
    ex.export_library(lib)
    return tvm.runtime.load_module(lib)[name]


def _label(cfg) -> str:
    return ",".join(f"{k}={int(v)}" for k, v in cfg.as_dict().items())


def run(fmt, shapes, ms, cfgs, args) -> List[dict]:
    import torch

    from ..kernels.decode import DecodeSpec
    from ..kernels.target import parse_target
    from ..kernels.wgmma import is_groupwise8, wgmma_gemm_func
    from .baselines import (RotatingWeights, cublas_fp16_method, decode_cublas_method, prepare_torch_int4,
                            torch_int4_method)
    from .harness import _Bench, bench_weight, build_kernels, check_and_time, gpu_short_name, one_line
    from .timing import l2_cache_bytes

    log = lambda text: print(text, flush=True)  # noqa: E731
    device = torch.device("cuda")
    l2_bytes = l2_cache_bytes(device)
    bench = _Bench(args.iters, args.warmup, args.timing, log)

    def median_us(method, n, k, m):  # the method's median time, or None (the failure noted by bench)
        t = bench.time(method, n, k, m)
        return None if t is None else t.median_us
    gpu = gpu_short_name(torch.cuda.get_device_name(device))
    log(f"{torch.cuda.get_device_name(device)}, format {'fp16' if fmt is None else fmt.name}")
    rows: List[dict] = []
    for n, k in shapes:
        int4 = None
        if fmt is None:
            w16 = (torch.randn(n, k, device=device) * 0.05).to(torch.float16)
            kernel_weights = RotatingWeights([w16, torch.zeros(1, device=device, dtype=torch.float16)], l2_bytes)
            decode = None
        else:
            qw = bench_weight(fmt, n, k, device)
            w16 = fmt.decode_fp16(qw)
            kernel_weights = RotatingWeights([qw.tensors[t] for t in fmt.tensor_specs(n, k)], l2_bytes)
            decode_spec = DecodeSpec(fmt.name, n, k)
            executable, failures = build_kernels([decode_spec], parse_target("auto"), log)
            decode = None if executable is None else executable[decode_spec.name]
            for spec, err in failures.items():
                log(f"warning: no decode kernel {spec.name}: {err}")
            if is_groupwise8(fmt, n, k) and getattr(fmt, "bits", None) == 4:  # torch's int4 kernel, same codes
                try:
                    int4 = prepare_torch_int4(fmt, qw, w16, l2_bytes)
                except Exception as err:  # (where torch's kernel does not run: noted, the sweep goes on)
                    log(f"warning: torch int4 baseline unavailable: {one_line(err)}")
        fp16_weights = RotatingWeights([w16], l2_bytes)
        w64_t = w16.to(torch.float64).T
        for m in ms:
            X = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = X.to(torch.float64) @ w64_t
            base = {"format": "fp16" if fmt is None else fmt.name, "N": n, "K": k, "M": m, "gpu": gpu}
            cublas_us = median_us(cublas_fp16_method(X, fp16_weights), n, k, m)
            route_us = None
            if decode is not None:
                W = torch.empty((n, k), device=device, dtype=torch.float16)
                route_us = median_us(decode_cublas_method(decode, X, kernel_weights, W), n, k, m)
                del W
            int4_us = None if int4 is None else median_us(torch_int4_method(X, int4), n, k, m)
            log(f"  N={n:>6} K={k:>6} M={m:>5} cuBLAS fp16 {cublas_us} us, decode + cuBLAS {route_us} us, "
                f"torch int4 {int4_us} us")
            for cfg in cfgs:
                row = dict(base, kernel="wgmma", cfg=cfg.as_dict(), us=None, cublas_fp16_us=cublas_us,
                           decode_cublas_us=route_us, torch_int4_us=int4_us, speedup_vs_fp16=None,
                           vs_decode_cublas=None, rel_err=None, error=None)
                rows.append(row)
                try:
                    kernel = load_kernel(wgmma_gemm_func(fmt, n, k, m, cfg))
                    Y = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)
                    kernel(X, *kernel_weights[0], Y)
                    torch.cuda.synchronize()
                except Exception as err:  # a config that does not build or launch: noted, the others go on
                    row["error"] = one_line(err)
                    log(f"    {_label(cfg)}: FAILED {row['error']}")
                    continue
                us = check_and_time(row, bench, kernel, X, kernel_weights, Y, ref, f"    {_label(cfg)}:", log,
                                    REL_ERR_MAX)
                if us is None:
                    continue
                if cublas_us:
                    row["speedup_vs_fp16"] = cublas_us / us
                if route_us:
                    row["vs_decode_cublas"] = route_us / us
                log(f"    {_label(cfg)}: {us:9.1f} us, {row['speedup_vs_fp16'] or float('nan'):.3f}x "
                    f"cuBLAS fp16, {row['vs_decode_cublas'] or float('nan'):.3f}x decode + cuBLAS, "
                    f"rel_err {row['rel_err']:.1e}")
        del kernel_weights, fp16_weights, w16, w64_t, int4
        torch.cuda.empty_cache()
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..errors import QCompileError
    from .harness import parse_ms, parse_shapes, require_cuda

    args = build_parser().parse_args(argv)
    try:
        shapes, ms = parse_shapes(args.shapes), parse_ms(args.m)
        fmt = None
        if args.format != "fp16":
            from ..formats import get as get_format

            fmt = get_format(args.format)
            for n, k in shapes:
                fmt.check_shape(n, k)
        from ..kernels.wgmma import check_wgmma_config, default_wgmma_config

        cfgs = [parse_wgmma_config(text) for text in args.config] or [default_wgmma_config(fmt, *shapes[0])]

        for n, k in shapes:  # refuse what cannot build before the GPU work starts
            for m in ms:
                for cfg in cfgs:
                    check_wgmma_config(fmt, n, k, m, cfg)
        require_cuda()
    except (QCompileError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = run(fmt, shapes, ms, cfgs, args)
    if args.out:
        from ..jsonio import write_rows_json

        write_rows_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
