"""Experiment (refuted, kept to reproduce the README's number): the large-M route as row chunks.

    python3 -m qcompile.bench.chunked_decode FORMATS SHAPES [M] [CHUNK_ROWS]
    e.g. python3 -m qcompile.bench.chunked_decode int4-g128 28672x8192 1024 2048,4096

Times, in one process on the GPU (CUDA events, median of 15): cuBLAS fp16 alone, the decode-only
kernel, one whole decode + cuBLAS (the shipped route), and per chunk size C: the weight decoded C rows
at a time into a reused scratch (two buffers) with cuBLAS writing Y[:, rows] after each chunk, on one
stream ("seq") and with the decodes on a second stream ahead of cuBLAS ("2s"). A chunk's packed
tensors are the rows of the whole weight's (every format's kernel tensors are row-major in N; the
tables pass whole). Prints each time and its ratio to cuBLAS, and the max abs difference of both
chunked results from the whole route's.
"""
import sys

from ..formats import get
from ..kernels.decode import DecodeSpec
from ..kernels.library import build
from ..kernels.target import parse_target


def main(argv):
    import torch

    if len(argv) < 2:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    fmts = argv[0].split(","); shapes = [tuple(map(int, s.split("x"))) for s in argv[1].split(",")]
    M = int(argv[2]) if len(argv) > 2 else 1024
    CH = [int(c) for c in (argv[3] if len(argv) > 3 else "1024,2048,4096").split(",")]
    t = parse_target("sm_90")
    lin = torch.nn.functional.linear

    def tm(fn, it=15):
        for _ in range(3): fn()
        torch.cuda.synchronize(); ts = []
        for _ in range(it):
            a, b = torch.cuda.Event(True), torch.cuda.Event(True)
            a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1e3)
        ts.sort(); return ts[len(ts) // 2]

    for f in fmts:
        fmt = get(f)
        for n, k in shapes:
            chunks = [c for c in CH if n % c == 0 and c < n]
            ex = build([], t, decode=[DecodeSpec(f, n, k)] + [DecodeSpec(f, c, k) for c in chunks])
            qw = fmt.random_weight(n, k, seed=1, device="cuda")
            names = list(fmt.tensor_specs(n, k))
            packed = [qw.tensors[x] for x in names]
            X = torch.randn(M, k, device="cuda", dtype=torch.float16)
            W = torch.empty(n, k, device="cuda", dtype=torch.float16)
            dec = ex[DecodeSpec(f, n, k).name]
            dec(*packed, W); w16 = W.clone(); ref = lin(X, w16)
            r = {}
            r["cublas"] = tm(lambda: lin(X, w16))
            r["decode"] = tm(lambda: dec(*packed, W))
            r["whole"] = tm(lambda: (dec(*packed, W), lin(X, W)))
            Y = torch.empty(M, n, device="cuda", dtype=torch.float16)
            for c in chunks:
                dc = ex[DecodeSpec(f, c, k).name]
                cs = fmt.tensor_specs(c, k)
                def part(i, c=c):
                    out = []
                    for x, p in zip(names, packed):
                        if tuple(cs[x].shape) == tuple(p.shape): out.append(p)
                        else:
                            rows = cs[x].shape[0]; out.append(p[i * rows:(i + 1) * rows])
                    return out
                parts = [part(i) for i in range(n // c)]
                bufs = [torch.empty(c, k, device="cuda", dtype=torch.float16) for _ in range(2)]
                def seq():
                    for i, pp in enumerate(parts):
                        b = bufs[i % 2]; dc(*pp, b); torch.mm(X, b.t(), out=Y[:, i * c:(i + 1) * c])
                seq(); err = (Y.float() - ref.float()).abs().max().item()
                r[f"seq{c}"] = tm(seq)
                s2 = torch.cuda.Stream(); main = torch.cuda.current_stream()
                evs = [torch.cuda.Event() for _ in parts]; done = [torch.cuda.Event() for _ in parts]
                def two():
                    s2.wait_stream(main)
                    for i, pp in enumerate(parts):
                        with torch.cuda.stream(s2):
                            if i >= 2: s2.wait_event(done[i - 2])
                            dc(*pp, bufs[i % 2]); evs[i].record(s2)
                        main.wait_event(evs[i]); torch.mm(X, bufs[i % 2].t(), out=Y[:, i * c:(i + 1) * c]); done[i].record(main)
                two(); torch.cuda.synchronize(); err2 = (Y.float() - ref.float()).abs().max().item()
                r[f"2s{c}"] = tm(two)
                r[f"err{c}"] = (err, err2)
            cb = r["cublas"]
            print(f, f"{n}x{k}", f"M={M}", " ".join(f"{a}={v:.1f}({cb / v:.2f}x)" if not a.startswith("err") else f"{a}={v}" for a, v in r.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
