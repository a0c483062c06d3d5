"""Markdown table of a bench document (the README's "Measured" tables are printed by this, so every
number there is one in a record): per layer shape, M=1 time, cuBLAS fp16 time, speedup and
bandwidth fraction, then the speedup at every other M with the runtime's route.

    python -m qcompile.bench.table artifacts/bench/e8p-2-h100.json [...]
"""
from __future__ import annotations

import argparse
import json
import sys

from .plot import _by_shape

ROUTE_MARK = {"fused": "", "split": "ˢ", "decode_cublas": "ᵈ"}


def _cell(r) -> str:
    return f"{r['speedup_vs_fp16']:.2f}×{ROUTE_MARK.get(r.get('route') or 'fused', '?')}"


def markdown(doc: dict) -> str:
    records = [r for r in doc["records"] if r.get("us") is not None]
    ms = sorted({r["M"] for r in records if r["M"] != 1})
    head = ["N × K", "M=1", "cuBLAS fp16", "speedup", "bw fraction"] + [f"M={m}" for m in ms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (n, k), rows in _by_shape(records).items():
        by_m = {r["M"]: r for r in rows}
        one = by_m.get(1)
        first = ([f"{one['us']:.1f} µs", f"{one['cublas_fp16_us']:.1f} µs", f"{one['speedup_vs_fp16']:.2f}×",
                  f"{one['bandwidth_fraction']:.2f}"] if one else ["–"] * 4)
        lines.append("| " + " | ".join([f"{n} × {k}"] + first + [_cell(by_m[m]) if m in by_m else "–" for m in ms])
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qcompile.bench.table", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    for path in args.files:
        try:
            with open(path) as f:
                doc = json.load(f)
            table = markdown(doc)
        except (OSError, ValueError, KeyError) as err:
            print(f"error: {path} is not a readable bench record ({type(err).__name__}: {err})", file=sys.stderr)
            return 2
        print(f"{doc.get('format')} ({path}, commit {doc.get('commit')}, {doc.get('device')}; "
              f"ˢ the bucket plan's launches (M=16 blocks; int4/E8P: 32/64-row mma.sync launches since 2f71ae5), "
              f"ᵈ decode + cuBLAS)\n")
        print(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
