"""Sweep the knobs of the decode-only kernel (qcompile.kernels.decode.DecodeConfig) on the local GPU.

``python -m qcompile.bench.decode_sweep --format e8p-2 --shapes 28672x8192 -o OUT.json``: every config
of the grid, timed as ``qcompile bench`` times kernels (CUDA graphs, weights rotated through > 2x L2),
checked bit for bit against the format's torch decode, with the bandwidth it reaches on the bytes it
must move (packed weight read + fp16 weight written) as a fraction of the measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import sys

from .harness import DEFAULT_ITERS, DEFAULT_WARMUP, bench_weight, one_line, parse_shapes, require_cuda, source_commit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qcompile.bench.decode_sweep")
    ap.add_argument("--format", default="e8p-2")
    ap.add_argument("--shapes", default="28672x8192,8192x28672")
    ap.add_argument("--threads", default="128,256,512")
    ap.add_argument("--units", default="1,2,4")
    ap.add_argument("--lut", default="0,1")
    ap.add_argument("--stage", default="0,1")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args(argv)
    torch = require_cuda()
    import tvm

    from ..formats import get as get_format
    from ..kernels.decode import DecodeConfig, check_decode_config, decode_scheduled_func
    from ..kernels.pipeline import compile_module
    from .baselines import RotatingWeights, decode_only_method
    from .timing import copy_bandwidth_GBps, copy_test_bytes, l2_cache_bytes, time_cuda

    fmt = get_format(args.format)
    device = torch.device("cuda")
    l2 = l2_cache_bytes(device)
    copy_bw = copy_bandwidth_GBps(copy_test_bytes(l2, torch.cuda.mem_get_info(device)[0]))
    major, minor = torch.cuda.get_device_capability(0)
    target = tvm.target.Target({"kind": "cuda", "arch": f"sm_{major}{minor}"})
    grid = [DecodeConfig(threads=t, units=u, lut_shared=lu, stage=st)
            for t, u, lu, st in itertools.product(*(map(int, v.split(",")) for v in
                                                    (args.threads, args.units, args.lut, args.stage)))]
    rows = []
    for n, k in parse_shapes(args.shapes):
        qw = bench_weight(fmt, n, k, device)
        ref = fmt.decode_fp16(qw)
        weights = RotatingWeights([qw.tensors[name] for name in fmt.tensor_specs(n, k)], l2)
        W = torch.empty((n, k), device=device, dtype=torch.float16)
        funcs = {}
        for i, cfg in enumerate(grid):
            try:
                check_decode_config(cfg, n, k, fmt.decode_unit)
                funcs[f"c{i}"] = decode_scheduled_func(fmt, n, k, "cuda", cfg).with_attr("global_symbol", f"c{i}")
            except ValueError as err:
                rows.append({"N": n, "K": k, "config": cfg.as_dict(), "error": one_line(err)})
        ex = compile_module(tvm.IRModule(funcs), target)
        nbytes = fmt.weight_bytes(n, k) + 2 * n * k
        for name in funcs:
            cfg = grid[int(name[1:])]
            W.fill_(float("nan"))
            ex[name](*weights[0], W)
            exact = bool(torch.equal(W, ref))
            t = time_cuda(decode_only_method(ex[name], weights, W).launch, DEFAULT_ITERS, DEFAULT_WARMUP, "graph",
                          period=weights.count)
            frac = nbytes / (t.median_us * 1e-6) / (copy_bw * 1e9)
            rows.append({"N": n, "K": k, "config": cfg.as_dict(), "us": t.median_us, "exact": exact,
                         "bandwidth_fraction": frac})
            print(f"{n}x{k} {cfg.as_dict()}: {t.median_us:8.2f} us  bw {frac:.3f}  exact {exact}", flush=True)
        del weights, W, ref, qw
        torch.cuda.empty_cache()
    from ..jsonio import write_rows_json

    write_rows_json(args.out, {"device": torch.cuda.get_device_name(0), "commit": source_commit(), "format": fmt.name,
                               "copy_bandwidth_GBps": copy_bw, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
