"""Viterbi engines side by side on one device: Gaussian-source MSE and encoding throughput of the QTIP
codes (L=16, two-pass tail-biting, i.i.d. N(0,1) sequences of 256) per engine, in one process.

    python -m qcompile.bench.viterbi_speed [--formats qtip-hyb-2,qtip-3inst-2] [--sequences 4096]
        [--engines torch,tir-min] [--layer 4096x4096] [--json OUT.json]

Per format and engine: ``gaussian_mse`` at the format's best scale from ``trellis_numbers.SCALES`` run
twice; the first run's seconds include compiling the engine's kernels, the second is the throughput.
The MSEs of the engines should agree to about 1e-6 (their paths differ only on fp32 near-ties).
With ``--layer``, one layer of that shape is quantized in each format with each engine
(``quantize(..., viterbi_engine=)``), without and with a Hessian (BlockLDLQ), as ``trellis_numbers``
times it.
"""
from __future__ import annotations

import argparse
import json

import torch

from ..formats.trellis import gaussian_mse, trellis_format
from .trellis_numbers import SCALES, time_layer_quantize


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--formats", default="qtip-hyb-2,qtip-3inst-2,qtip-1mad-2")
    ap.add_argument("--sequences", type=int, default=4096)
    ap.add_argument("--engines", default="torch,tir-min")
    ap.add_argument("--layer", default="", help="N x K of a layer to quantize with each engine ('' to skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engines = args.engines.split(",")
    out = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
           "sequences": args.sequences, "rows": [], "layer": []}
    for name in args.formats.split(","):
        fmt = trellis_format(name)
        scale = SCALES[fmt.K][len(SCALES[fmt.K]) // 2]
        for engine in engines:
            first = gaussian_mse(name, n_sequences=args.sequences, scales=(scale,), device=dev, engine=engine)
            second = gaussian_mse(name, n_sequences=args.sequences, scales=(scale,), device=dev, engine=engine)
            row = {"format": name, "engine": engine, "scale": scale, "mse": second["mse"],
                   "first_seconds": first["seconds"], "seconds": second["seconds"],
                   "weights_per_s": args.sequences * 256 / second["seconds"]}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.layer:
        n, k = map(int, args.layer.split("x"))
        for engine in engines:
            out["layer"] += time_layer_quantize(args.formats.split(","), n, k, extra={"engine": engine},
                                                viterbi_engine=engine)
    if args.json:  # (the project's atomic write: no reader sees half a file)
        from ..jsonio import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(out, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
