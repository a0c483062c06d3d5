"""Kernel sweep on a GPU: correctness vs the torch reference decode and time vs cuBLAS fp16 for a
set of GEMV/GEMM configs. Developer tool for picking schedule defaults (python -m qcompile.bench.sweep)."""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from ..formats import get as get_format
from ..kernels.compute import matmul_func
from ..kernels.library import KernelSpec, default_gemv_config, scheduled_func, serves_gemv
from ..kernels.pipeline import compile_module
from ..kernels.schedules import GemvConfig, schedule_gemv_cuda
from ..kernels.target import parse_target
from .harness import bench_weight
from .tc_sweep import check_flags, flags_on


def _time(fn, iters=200):
    for _ in range(10):
        fn(0)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn(i)
        ends[i].record()
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
    return ts[len(ts) // 2]


def main():
    import tvm

    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="int4-g128")
    ap.add_argument("--shapes", default="28672x8192,8192x28672,4096x4096")
    ap.add_argument("--m", default="1")
    ap.add_argument("--configs", default="default", help="default, or all (the --grid product)")
    ap.add_argument("--grid", default="rows=2,4,8;threads_k=32,64;chunks=1,2,4;unroll=1,2,4;row_tile=1",
                    help="GemvConfig knob values, e.g. 'rows=4;threads_k=64;chunks=2;unroll=1;row_tile=1,2'")
    ap.add_argument("--fp16-runs", default="0",
                    help="products per fp16 partial sum to compare (compute.FP16_RUN; 0: the default), e.g. 8,32")
    ap.add_argument("--flag", action="append", default=[], metavar="NAME[+NAME]",
                    help="also time every config with these kernel switches set together (tc_sweep's FLAGS, "
                         "e.g. lane-copy-min), labelled by the row's 'flag'; repeatable")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    flag_sets = [()] + [tuple(f.split("+")) for f in args.flag]
    for names in flag_sets:
        check_flags(names)
    fmt = get_format(args.format)
    target = parse_target("auto")
    dev = torch.device("cuda")
    rows = []
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        w_bytes = fmt.weight_bytes(n, k)
        copies = max(2, int(200e6 // (n * k * 2)) + 1)  # rotate > L2 for the fp16 baseline too
        qws = [bench_weight(fmt, n, k, dev)]
        qcopies = max(2, int(200e6 // w_bytes) + 1)
        qsets = [{kk: qws[0].tensors[kk].clone() for kk in fmt.tensor_specs(n, k)} for _ in range(qcopies)]
        w16 = [fmt.decode_fp16(qws[0]).clone() for _ in range(copies)]
        for m in map(int, args.m.split(",")):
            X = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = (X.double() @ w16[0].double().T)
            t_fp16 = _time(lambda i: torch.nn.functional.linear(X, w16[i % copies]))
            if args.configs == "default" or m > 16:
                cfgs = [None]
            else:
                grid = dict((kv.split("=")[0], [int(v) for v in kv.split("=")[1].split(",")])
                            for kv in args.grid.split(";"))
                cfgs = [None] + [GemvConfig(**dict(zip(grid, c))) for c in itertools.product(*grid.values())]
            runs = [int(r) for r in args.fp16_runs.split(",")]
            for cfg, run, names in itertools.product(cfgs, runs, flag_sets):
                spec = KernelSpec(fmt.name, n, k, m)
                try:
                    with flags_on(names):
                        if cfg is None and (run == 0 or not serves_gemv(fmt, m)):
                            func = scheduled_func(spec, target)
                        else:
                            gemv_cfg = cfg or default_gemv_config(n, k, m, fmt.decode_unit, fmt.gemv_tile)
                            func = schedule_gemv_cuda(matmul_func(fmt, n, k, m, fp16_run=run), gemv_cfg,
                                                      fmt.decode_intrin("cuda"), fmt.streamed)["main"]
                        # compile_module: the pipeline the library's kernels need (mma.sync's warp memory)
                        ex = compile_module(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                                            target.tvm_target())
                    f = ex["main"]
                except Exception:  # config does not tile this shape
                    continue
                Y = torch.empty(m, n, device=dev, dtype=torch.float16)
                f(X, *qsets[0].values(), Y)
                torch.cuda.synchronize()
                err = ((Y.double() - ref).norm() / ref.norm()).item()
                t = _time(lambda i: f(X, *qsets[i % qcopies].values(), Y))
                row = {"N": n, "K": k, "M": m, "cfg": None if cfg is None else cfg.as_dict(), "fp16_run": run,
                       "flag": "+".join(names), "us": t,
                       "cublas_us": t_fp16, "speedup": t_fp16 / t, "GBps": w_bytes / t / 1e3, "rel_err": err}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        from ..jsonio import write_rows_json

        write_rows_json(args.out, rows)
    best = {}
    for r in rows:
        key = (r["N"], r["K"], r["M"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print("\nbest per shape:")
    for key, r in best.items():
        print(key, f"{r['us']:.1f}us cublas {r['cublas_us']:.1f}us speedup {r['speedup']:.2f}x "
              f"{r['GBps']:.0f}GB/s err {r['rel_err']:.1e}", r["cfg"], "fp16_run", r["fp16_run"], "flag", r["flag"])


if __name__ == "__main__":
    main()
