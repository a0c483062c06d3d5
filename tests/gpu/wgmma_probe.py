#!/usr/bin/env python3
"""GPU harness of qcompile.kernels.wgmma (the Hopper wgmma GEMM with the weight decoded in its B staging).

Without --check it builds a config for sm_90a on a CPU machine and prints the wgmma / cp.async lines of the
generated CUDA and ptxas's registers and spills. With --check (a CUDA GPU; device_run.sh py) it verifies
against torch (fp32 reference from the same fp16 inputs, or the format's torch decode) and times against
cuBLAS fp16 (F.linear) in the same process: first a 256 x 512 x 512 problem for every config, then
M=1024 on the 70B MLP shapes. --sweep adds SWEEP (fp16) or QSWEEP (--quant) configs. The kernel itself,
its layout notes and its config space are in qcompile/kernels/wgmma.py.

    python3 tests/gpu/wgmma_probe.py [--quant int4-g128] [--bn 256] [--ws 1] ...   # compile only
    python3 -u tests/gpu/wgmma_probe.py --check --quant int4-g128 --bn 256 --qintrin 1 --sweep
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import tvm

from qcompile.kernels.wgmma import SW128, WGMMA_ARCH, WgmmaConfig, layout_selftest as _layout_selftest, wgmma_gemm_func

TARGET = {"kind": "cuda", "arch": WGMMA_ARCH}


def build(M, N, K, BN=128, NWG=2, stages=4, wg_inflight=1, swizzle=SW128, out_dtype="float16", name="wgmma_gemm",
          quant=None, qprefetch=1, qintrin=0, qvec=1, ws=0):
    """The library's PrimFunc for the probe's (historical) argument names; quant is a format name."""
    from qcompile import formats as qc_formats

    cfg = WgmmaConfig(bn=BN, warpgroups=NWG, stages=stages, wg_inflight=wg_inflight, swizzle=swizzle,
                      prefetch=qprefetch, word_vec=qvec, decode_intrin=bool(qintrin), warp_specialized=bool(ws))
    return wgmma_gemm_func(None if quant is None else qc_formats.get(quant), N, K, M, cfg, out_dtype, name)


# ----------------------------------------------------------------------------------------
# Build helpers
# ----------------------------------------------------------------------------------------


def compile_func(func):
    mod = tvm.IRModule({func.attrs["global_symbol"]: func})
    return tvm.compile(mod, target=tvm.target.Target(TARGET))


def cuda_source(ex):
    return ex.mod.imports[0].inspect_source()


def ptxas_report(src, arch=WGMMA_ARCH):
    """(ok, ptxas's -v report or nvcc's error, a folder holding k.cubin) of the generated CUDA
    (``kernels.resources.compile_cubin``)."""
    from qcompile.errors import QCompileError
    from qcompile.kernels.resources import compile_cubin

    try:
        report, cubin = compile_cubin(src, arch)
    except QCompileError as err:
        return False, str(err), None
    d = tempfile.mkdtemp(prefix="wgmma_")
    with open(os.path.join(d, "k.cubin"), "wb") as f:
        f.write(cubin)
    return True, report, d


def disassemble(cubin):
    """SASS text of a cubin via cuobjdump or nvdisasm, whichever is on PATH (None if neither)."""
    import shutil

    for tool, extra in (("cuobjdump", ["-sass"]), ("nvdisasm", [])):
        exe = shutil.which(tool)
        if exe:
            p = subprocess.run([exe, *extra, cubin], capture_output=True, text=True)
            if p.returncode == 0:
                return p.stdout
    return None


def layout_selftest():
    ok = _layout_selftest()
    print("layout selftest:", "PASS" if ok else "FAIL")
    return ok


SWEEP = [  # (BN, NWG, stages, wg_inflight); smem = stages*(64*NWG + BN)*128 + 1024 bytes
    (128, 2, 4, 1),
    (128, 2, 3, 1),
    (128, 2, 3, 0),
    (256, 2, 3, 1),
    (256, 2, 4, 1),
    (256, 1, 4, 1),
]


# --quant: overrides of the command line's config. 14843f4 on the H100 (M=1024, 70B MLP shapes, % of cuBLAS):
# BN=128 4 stages, words loaded where decoded 39-40 %; prefetched a k tile ahead 47 / 50 %, with the decode
# intrinsic 52 / 57 %; BN=256 4 stages 53 / 55 %, with the intrinsic 63 / 66 % (the base of this sweep:
# --bn 256 --qintrin 1); BN=256 3 stages 51 %; BN=128 3 stages, no wgmma group in flight 58 %.
QSWEEP = [
    dict(qprefetch=2),  # the words two k tiles ahead
    dict(qvec=4),  # one 16-byte load and one scale per four words
    dict(qprefetch=2, qvec=4),
    dict(BN=128, qprefetch=2, qvec=4),
    dict(BN=128, stages=3, wg_inflight=0, qprefetch=2, qvec=4),
    dict(ws=1),  # a producer warpgroup decodes; the two others only issue wgmma
    dict(ws=1, qprefetch=2, qvec=4),
    dict(ws=1, BN=128, qprefetch=2, qvec=4),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="run on a CUDA GPU: verify + benchmark")
    ap.add_argument("--M", type=int, default=1024)
    ap.add_argument("--N", type=int, default=28672)
    ap.add_argument("--K", type=int, default=8192)
    ap.add_argument("--bn", type=int, default=128)
    ap.add_argument("--nwg", type=int, default=2)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--wg-inflight", type=int, default=1)
    ap.add_argument("--swizzle", type=int, default=128, choices=(0, 128))
    ap.add_argument("--out", default="f16", choices=("f16", "f32"))
    ap.add_argument("--save-src", default="")
    ap.add_argument("--show-all-asm", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="with --check: time the SWEEP configs too")
    ap.add_argument("--quant", default=None, help="a qcompile group-wise format (int4-g128): B decoded in the kernel")
    ap.add_argument("--qintrin", type=int, default=0, choices=(0, 1),
                    help="quant: decode with the format's CUDA decode intrinsic (1) or its TIR decode (0)")
    ap.add_argument("--ws", type=int, default=0, choices=(0, 1),
                    help="warp-specialised: a producer warpgroup loads/decodes, the others only issue wgmma")
    ap.add_argument("--qvec", type=int, default=1, choices=(1, 2, 4, 8), help="quant: words a thread loads at once")
    ap.add_argument("--qprefetch", type=int, default=1, choices=(0, 1, 2),
                    help="quant: load the words into registers d = 1, 2 k tiles ahead, or where decoded (0)")
    return ap.parse_args(argv)


def cfg_kwargs(args):
    return dict(
        BN=args.bn,
        NWG=args.nwg,
        stages=args.stages,
        wg_inflight=args.wg_inflight,
        swizzle=args.swizzle,
        out_dtype="float16" if args.out == "f16" else "float32",
        quant=args.quant,
        qprefetch=args.qprefetch,
        qintrin=args.qintrin,
        qvec=args.qvec,
        ws=args.ws,
    )


def compile_only(args):
    layout_selftest()
    f = build(args.M, args.N, args.K, **cfg_kwargs(args))
    ex = compile_func(f)
    src = cuda_source(ex)
    if args.save_src:
        with open(args.save_src, "w") as fh:
            fh.write(src)
        print(f"[saved generated CUDA to {args.save_src}]")
    print("=== wgmma / cp.async / fence lines in the generated CUDA source ===")
    for line in src.splitlines():
        if re.search(r"wgmma|cp\.async|fence\.proxy", line) and ("asm" in line or "tvm_builtin" in line):
            s = line.strip()
            print("  " + (s if len(s) < 400 or args.show_all_asm else s[:200] + " ... " + s[-160:]))
    ok, rep, d = ptxas_report(src)
    print("=== nvcc/ptxas ===")
    print(rep)
    if ok:
        sass = disassemble(os.path.join(d, "k.cubin"))
        if sass is None:
            print("=== (no cuobjdump/nvdisasm on PATH: SASS not inspected) ===")
            return ok
        n_hgmma = len(re.findall(r"HGMMA", sass))
        n_depbar = len(re.findall(r"WARPGROUP\.DEPBAR|WARPGROUP\.ARRIVE|WARPSYNC", sass))
        n_ldgsts = len(re.findall(r"LDGSTS", sass))
        print(f"=== SASS: {n_hgmma} HGMMA, {n_ldgsts} LDGSTS, {n_depbar} warpgroup arrive/depbar ===")
        for l in sass.splitlines():
            if "HGMMA" in l:
                print("  " + l.strip())
                break
    return ok


# ----------------------------------------------------------------------------------------
# --check: run on a GPU (not runnable on the CPU build box)
# ----------------------------------------------------------------------------------------


def _load(func):
    """The kernel built for sm_90a and loaded (``qcompile.bench.wgmma_sweep.load_kernel``)."""
    from qcompile.bench.wgmma_sweep import load_kernel

    return load_kernel(func)


def _bench(fnc, iters=50, warmup=5):
    import torch

    for _ in range(warmup):
        fnc()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(iters):
        fnc()
    en.record()
    torch.cuda.synchronize()
    return st.elapsed_time(en) / iters * 1e-3  # seconds


def _weights(N, K, dev, quant):
    """(B, S) for the kernel: fp16 B with a dummy S, or a format's random packed weight and scales."""
    import torch

    if quant is None:
        return (torch.randn(N, K, device=dev) * 0.5).half(), torch.zeros(1, device=dev, dtype=torch.float16)
    from qcompile import formats as qc_formats

    qw = qc_formats.get(quant).random_weight(N, K, seed=N + K, device=dev)
    return qw.tensors["qweight"], qw.tensors["scales"]


def _verify(fn, M, N, K, out_dtype, dev, quant=None):
    import torch

    tdt = torch.float16 if out_dtype == "float16" else torch.float32
    a = (torch.randn(M, K, device=dev) * 0.5).half()
    b, sc = _weights(N, K, dev, quant)
    w16 = b if quant is None else qc_decode(quant, b, sc)  # (the format's torch reference decode)
    c = torch.full((M, N), float("nan"), device=dev, dtype=tdt)  # NaN: unwritten outputs fail
    fn(a, b, sc, c)  # torch tensors go straight in (DLPack, zero-copy)
    torch.cuda.synchronize()
    ref = a.float() @ w16.float().T  # fp32 reference from the same fp16 inputs
    err = (c.float() - ref).abs()
    tol = 1e-2 * ref.abs().max().item() + (2e-2 if tdt == torch.float16 else 1e-3)
    rel = (err.nan_to_num(float("inf")).norm() / ref.norm()).item()
    ok = bool(torch.isfinite(c.float()).all()) and err.max().item() <= tol and rel < 5e-3
    print(f"    check M={M} N={N} K={K}: max|err|={err.max().item():.4g} (tol {tol:.3g}) "
          f"rel_fro={rel:.3e} -> {'PASS' if ok else 'FAIL'}")
    if not ok:
        bad = (~(err <= tol)).nonzero()
        print("    first bad (row, col):", bad[:8].tolist(), " count:", bad.shape[0])
        # Where inside the 64 x BN warpgroup tile do errors sit? (layout debugging)
        print("    bad rows mod 64 :", sorted(set((bad[:, 0] % 64).tolist()))[:64])
        print("    bad cols mod 128:", sorted(set((bad[:, 1] % 128).tolist()))[:128])
    return ok, (a, b, sc, c)


def qc_decode(quant, qweight, scales):
    """The format's torch reference decode of (qweight, scales) as fp16 [N, K]."""
    from qcompile import formats as qc_formats
    from qcompile.formats.base import QuantizedWeight

    fmt = qc_formats.get(quant)
    n = qweight.shape[0]
    return fmt.decode_fp16(QuantizedWeight(quant, (n, qweight.shape[1] * 8), {"qweight": qweight, "scales": scales}))


def check(args):
    import torch

    assert torch.cuda.is_available(), "--check needs a CUDA GPU"
    print("device:", torch.cuda.get_device_name(), " torch", torch.__version__, " tvm", tvm.__version__)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    layout_selftest()
    kw = cfg_kwargs(args)
    shapes = [(args.M, args.N, args.K)] if not args.default_shapes else [
        (1024, 28672, 8192),
        (1024, 8192, 28672),
    ]
    cfgs = [kw]
    if args.sweep:
        overrides = ([dict(BN=bn, NWG=nwg, stages=st, wg_inflight=wi) for (bn, nwg, st, wi) in SWEEP]
                     if kw["quant"] is None else [o for o in QSWEEP if o.get("ws", 0) == kw["ws"]])
        for o in overrides:
            c = dict(kw, **o)
            if c not in cfgs:
                cfgs.append(c)

    all_ok = True
    # 1) small problem first: cheap to debug if the layout is wrong (several CTAs, several k tiles)
    small = (256, 512, 512)
    for cfg in cfgs:
        fn = _load(build(*small, **cfg))
        ok, _ = _verify(fn, *small, cfg["out_dtype"], dev, cfg["quant"])
        print(f"      cfg={cfg}")
        all_ok &= ok

    # 2) the real shapes: correctness + TFLOPS vs cuBLAS (torch.nn.functional.linear)
    for (M, N, K) in shapes:
        flops = 2.0 * M * N * K
        print(f"--- M={M} N={N} K={K}")
        a = (torch.randn(M, K, device=dev) * 0.5).half()
        b = (torch.randn(N, K, device=dev) * 0.5).half()
        t_cublas = _bench(lambda: torch.nn.functional.linear(a, b))
        print(f"    cuBLAS (F.linear fp16)      : {t_cublas * 1e6:9.1f} us  {flops / t_cublas / 1e12:7.1f} TFLOPS")
        for cfg in cfgs:
            func = build(M, N, K, **cfg)
            fn = _load(func)
            ok, (a2, b2, s2, c2) = _verify(fn, M, N, K, cfg["out_dtype"], dev, cfg["quant"])
            all_ok &= ok
            t = _bench(lambda: fn(a2, b2, s2, c2))
            tag = (f"BN={cfg['BN']} NWG={cfg['NWG']} S={cfg['stages']} infl={cfg['wg_inflight']} sw={cfg['swizzle']}"
                   f"{' ' + cfg['quant'] + ' pf=' + str(cfg['qprefetch']) + ' intrin=' + str(cfg['qintrin']) + ' vec=' + str(cfg['qvec']) if cfg['quant'] else ''}")
            print(f"    TVM wgmma {tag:34s}: {t * 1e6:9.1f} us  {flops / t / 1e12:7.1f} TFLOPS"
                  f"  ({t_cublas / t * 100:5.1f}% of cuBLAS){'' if ok else '  [WRONG RESULTS]'}")
    print("ALL PASS" if all_ok else "SOME CHECKS FAILED")
    return all_ok


def main(argv=None):
    args = parse_args(argv)
    if args.check:
        argl = argv if argv is not None else sys.argv[1:]
        args.default_shapes = not any(x in argl for x in ("--M", "--N", "--K"))
        sys.exit(0 if check(args) else 1)
    else:
        ok = compile_only(args)
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
