"""Time the quantization front end on one Llama-2-7B-shaped layer (down_proj: out 4096, in 11008):
Hessian capture over synthetic activations, damping, RHT, and BlockLDLQ through the int4-g128 format
(g=1) — ``python -m qcompile.bench.frontend_timing [--tokens N] [--device cuda]``."""
from __future__ import annotations

import argparse
import json
import time

import torch

from ..formats import get as get_format
from ..quant.hessian import HessianAccumulator, damp


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-features", type=int, default=4096)
    ap.add_argument("--in-features", type=int, default=11008)
    ap.add_argument("--tokens", type=int, default=256 * 2048, help="calibration tokens (256 x 2048 default)")
    ap.add_argument("--batch", type=int, default=8192, help="tokens per Hessian update")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    n, k = args.out_features, args.in_features
    gen = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(n, k, device=dev, generator=gen) * 0.02
    # synthetic correlated activations: a fixed random mixing of Gaussian features (fp16, as a model gives)
    mix = torch.randn(k, k, device=dev, generator=gen, dtype=torch.float32) / k ** 0.5
    acc = HessianAccumulator(k, device=dev)
    _sync(dev)
    t0 = time.perf_counter()
    for start in range(0, args.tokens, args.batch):
        rows = min(args.batch, args.tokens - start)
        x = (torch.randn(rows, k, device=dev, generator=gen) @ mix).half()
        acc.add(x)
    _sync(dev)
    t_capture = time.perf_counter() - t0
    H = damp(acc.hessian())
    fmt = get_format("int4-g128")
    timings = {"capture_s": t_capture}
    for rht in (False, True):
        _sync(dev)
        t0 = time.perf_counter()
        qw = fmt.quantize(W, hessian=H, rht=rht)
        _sync(dev)
        timings[f"quantize_ldlq{'_rht' if rht else ''}_s"] = time.perf_counter() - t0
        timings[f"proxy_loss{'_rht' if rht else ''}"] = float(qw.meta.get("proxy_loss", float("nan")))
    _sync(dev)
    t0 = time.perf_counter()
    qw = fmt.quantize(W)
    _sync(dev)
    timings["quantize_rtn_s"] = time.perf_counter() - t0
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "N": n, "K": k,
              "tokens": args.tokens, **timings}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
