"""QTIP trellis numbers on a GPU: Gaussian-source MSE (L=16, two-pass tail-biting Viterbi, i.i.d. N(0,1)
sequences of 256) per code and bit width, Viterbi throughput, and the time to quantize a
Llama-2-7B-shaped layer — ``python -m qcompile.bench.trellis_numbers --json out.json``."""
from __future__ import annotations

import argparse
import json
import time

import torch

from ..formats import get as get_format
from ..formats.trellis import gaussian_mse

# best scales seen on the CPU at reduced size (2 bits: ~1.0, 3 bits: 0.9-0.95, 4 bits: 0.8-0.85)
SCALES = {2: (0.95, 1.0, 1.05), 3: (0.9, 0.95), 4: (0.8, 0.85)}


def time_layer_quantize(names, n: int, k: int, extra=None, **quantize_kwargs):
    """Seconds to quantize one random [n, k] layer (weights N(0, 0.02²)) in each format of ``names``,
    without and with a Hessian from 8192 random activation rows (BlockLDLQ), on CUDA when available.
    ``quantize_kwargs`` go to each format's ``quantize``. Rows {"format", "N", "K", "ldlq", "seconds",
    "proxy_loss"} (plus ``extra``), each printed as it lands."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(n, k, device=dev, generator=gen) * 0.02
    X = torch.randn(8192, k, device=dev, generator=gen)
    H = (X.T @ X / X.shape[0]).double()
    rows = []
    for name in names:
        fmt = get_format(name)
        for hessian in (None, H):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            qw = fmt.quantize(W, hessian=hessian, **quantize_kwargs)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            row = {"format": name, **(extra or {}), "N": n, "K": k, "ldlq": hessian is not None,
                   "seconds": time.perf_counter() - t0, "proxy_loss": qw.meta.get("proxy_loss")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=4096)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--codes", default="1mad,3inst,hyb")
    ap.add_argument("--layer", default="4096x4096", help="N x K of the layer to quantize ('' to skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "mse": [], "layer": []}
    for bits in map(int, args.bits.split(",")):
        for code in args.codes.split(","):
            name = f"qtip-{code}-{bits}"
            r = gaussian_mse(name, n_sequences=args.sequences, scales=SCALES[bits])
            weights = args.sequences * 256 * len(SCALES[bits])
            r["viterbi_weights_per_s"] = weights / r["seconds"]
            out["mse"].append(r)
            print(f"{name}: mse {r['mse']:.5f} at rho {r['scale']} ({args.sequences} seqs; {r['seconds']:.1f} s for "
                  f"{len(SCALES[bits])} scales = {r['viterbi_weights_per_s'] / 1e6:.2f} M weights/s)", flush=True)
    if args.layer:
        n, k = map(int, args.layer.split("x"))
        out["layer"] += time_layer_quantize(("qtip-hyb-2", "qtip-3inst-2"), n, k)
    if args.json:  # (the project's atomic write: no reader sees half a file)
        from ..jsonio import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(out, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
