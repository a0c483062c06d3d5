"""PNG of a bench document: speedup over cuBLAS fp16 against M per layer shape (qcompile solid,
torch int4 dashed) and the fraction of the copy bandwidth the qcompile kernel reaches."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path


def _by_shape(records):
    shapes = OrderedDict()
    for r in records:
        shapes.setdefault((r["N"], r["K"]), []).append(r)
    for rows in shapes.values():
        rows.sort(key=lambda r: r["M"])
    return shapes


def _save_png(fig, path) -> Path:
    """``fig`` as a 256-colour palette PNG at ``path`` (written beside it, then renamed): the plots have
    a few flat colours, so the palette loses nothing visible and takes about a third of the RGBA
    bytes (the repository travels to the GPU machine within a size limit)."""
    import io
    import os

    from PIL import Image

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path


def plot_bench(doc: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_speed, ax_bw) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for idx, ((n, k), rows) in enumerate(_by_shape(doc["records"]).items()):
        color = colors[idx % len(colors)]
        ms = [r["M"] for r in rows]
        ax_speed.plot(ms, [r["speedup_vs_fp16"] for r in rows], "o-", color=color, label=f"{n}x{k} qcompile")
        int4 = [(r["M"], r["cublas_fp16_us"] / r["torch_int4_us"]) for r in rows if r.get("torch_int4_us")]
        if int4:
            ax_speed.plot(*zip(*int4), "x--", color=color, alpha=0.6, label=f"{n}x{k} torch int4")
        ax_bw.plot(ms, [r["bandwidth_fraction"] for r in rows], "o-", color=color, label=f"{n}x{k}")

    fmt = doc.get("format") or (doc["records"][0]["format"] if doc["records"] else "")
    all_ms = sorted({r["M"] for r in doc["records"]})
    for ax in (ax_speed, ax_bw):
        ax.set_xscale("log", base=2)
        if all_ms:  # label the measured batch sizes themselves, not powers of two
            ax.set_xticks(all_ms)
            ax.set_xticklabels([str(m) for m in all_ms])
            ax.minorticks_off()
        ax.set_xlabel("batch M")
        ax.grid(True, which="both", alpha=0.3)
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_speed.set_ylabel("speedup vs cuBLAS fp16 (x)")
    ax_speed.set_title(f"{fmt}: speedup over cuBLAS fp16")
    ax_bw.set_ylim(bottom=0)
    ax_bw.set_ylabel("bytes moved / time / copy bandwidth")
    ax_bw.set_title(f"bandwidth fraction (copy {doc['copy_bandwidth_GBps']:.0f} GB/s)")
    if doc["records"]:
        ax_speed.legend(fontsize=7, ncol=2)
        ax_bw.legend(fontsize=7)
    fig.suptitle(f"qcompile bench: {doc['device']}, commit {doc['commit']}", fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def plot_roofline(docs, path, shape=None) -> Path:
    """One PNG comparing formats (one bench document each, e.g. artifacts/bench/*-h100.json):
    achieved fraction of the copy bandwidth against M on one layer shape (default: the shape with
    the most weights that every document measured), and the speedup over cuBLAS fp16 beside it.
    The bytes counted are each format's own (packed weights + activations + outputs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [d for d in docs if d["records"]]
    if not docs:
        raise ValueError("no bench records to plot")
    if shape is None:
        common = set.intersection(*({(r["N"], r["K"]) for r in d["records"]} for d in docs))
        if not common:
            raise ValueError("the bench documents share no layer shape; pass shape=(N, K)")
        shape = max(common, key=lambda nk: (nk[0] * nk[1], nk))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_bw, ax_speed) = plt.subplots(1, 2, figsize=(13, 5))
    all_ms = set()
    for doc in docs:
        rows = sorted((r for r in doc["records"] if (r["N"], r["K"]) == tuple(shape)), key=lambda r: r["M"])
        if not rows:
            continue
        label = f"{doc.get('format') or rows[0]['format']} ({doc['commit']})"
        ms = [r["M"] for r in rows]
        all_ms.update(ms)
        ax_bw.plot(ms, [r["bandwidth_fraction"] for r in rows], "o-", label=label)
        ax_speed.plot(ms, [r["speedup_vs_fp16"] for r in rows], "o-", label=label)
    for ax in (ax_bw, ax_speed):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_ms))
        ax.set_xticklabels([str(m) for m in sorted(all_ms)])
        ax.minorticks_off()
        ax.set_xlabel("batch M")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_bw.set_ylim(0, 1)
    ax_bw.set_ylabel("bytes moved / time / copy bandwidth")
    ax_bw.set_title(f"{shape[0]}x{shape[1]}: fraction of copy bandwidth")
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_speed.set_yscale("log", base=2)
    ax_speed.set_ylabel("speedup vs cuBLAS fp16 (x)")
    ax_speed.set_title(f"{shape[0]}x{shape[1]}: speedup over cuBLAS fp16")
    devices = sorted({d["device"] for d in docs})
    fig.suptitle(f"qcompile formats on {', '.join(devices)}", fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    """python -m qcompile.bench.plot --roofline A.json B.json ... -o OUT.png [--shape NxK]"""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m qcompile.bench.plot",
                                 description="Roofline PNG comparing the formats of several bench JSON files.")
    ap.add_argument("--roofline", nargs="+", required=True, metavar="JSON", help="bench documents (one per format)")
    ap.add_argument("-o", "--out", required=True, help="PNG to write")
    ap.add_argument("--shape", default=None, help="layer shape NxK (default: the largest shared one)")
    args = ap.parse_args(argv)
    docs = []
    for name in args.roofline:
        with open(name) as f:
            docs.append(json.load(f))
    shape = tuple(int(v) for v in args.shape.lower().split("x")) if args.shape else None
    print(f"wrote {plot_roofline(docs, args.out, shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
