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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
