"""``qcompile bench``: time the compiled kernels against cuBLAS fp16 and torch's int4 kernel.

For every layer shape (N out x K in) and batch M, in one process on one GPU: the qcompile kernel,
torch fp16 ``F.linear`` and ``torch._weight_int4pack_mm`` (where it runs), each timed the same way
(qcompile.bench.timing) with its weights rotated through more than 2x the L2 cache, plus one
device-to-device copy whose bandwidth (read + write) is the yardstick of ``bandwidth_fraction``.
Writes ``<out-dir>/<name>.json`` (schema in RECORD_FIELDS / DOCUMENT_FIELDS), a PNG plot and
prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import QCompileError

DEFAULT_FORMAT = "int4-g128"
DEFAULT_SHAPES = "4096x4096,11008x4096,4096x11008,28672x8192,8192x28672"
DEFAULT_MS = "1,4,16,32,64,128,256,1024"  # every route: fused, split, decode + cuBLAS
SPLIT_MAX_M = 256  # M above GEMV_MAX_M up to which the bench also times the bucket plan's launches
DEFAULT_OUT_DIR = os.path.join("artifacts", "bench")
DEFAULT_ITERS = 200
DEFAULT_WARMUP = 10
REL_ERR_WARN = 1e-2        # fp16 kernel vs float64 reference
INT4_REL_ERR_WARN = 5e-2   # torch int4 on the same codes (bf16 activations and scales)

# The JSON schema other checks read: these keys, these types (extra keys may follow).
DOCUMENT_FIELDS = {"device": (str,), "commit": (str,), "copy_bandwidth_GBps": (float,), "records": (list,)}
RECORD_FIELDS = {"format": (str,), "N": (int,), "K": (int,), "M": (int,), "us": (float,),
                 "cublas_fp16_us": (float,), "torch_int4_us": (float, type(None)),
                 "speedup_vs_fp16": (float,), "bandwidth_fraction": (float,)}


# --- arithmetic and records (pure: no GPU) ---------------------------------------------------

def kernel_bytes(weight_bytes: int, n: int, k: int, m: int) -> int:
    """Bytes one launch must move: the packed weight, fp16 activations in, fp16 output out."""
    return int(weight_bytes) + m * k * 2 + m * n * 2


def bandwidth_fraction(nbytes: int, us: float, copy_bandwidth_GBps: float) -> float:
    """Achieved bytes per second over the measured copy bandwidth."""
    return nbytes / (us * 1e-6) / (copy_bandwidth_GBps * 1e9)


def make_record(fmt: str, n: int, k: int, m: int, us: float, cublas_fp16_us: float,
                torch_int4_us: Optional[float], weight_bytes: int, copy_bandwidth_GBps: float,
                **extra) -> dict:
    """One JSON record; ``extra`` keys (rel_err, ...) follow the schema keys."""
    nbytes = kernel_bytes(weight_bytes, n, k, m)
    record = {
        "format": str(fmt), "N": int(n), "K": int(k), "M": int(m),
        "us": float(us), "cublas_fp16_us": float(cublas_fp16_us),
        "torch_int4_us": None if torch_int4_us is None else float(torch_int4_us),
        "speedup_vs_fp16": float(cublas_fp16_us) / float(us),
        "bandwidth_fraction": float(bandwidth_fraction(nbytes, us, copy_bandwidth_GBps)),
        "bytes": nbytes,
    }
    for key, value in extra.items():
        if key in record:
            raise ValueError(f"extra record key {key!r} would overwrite a schema key")
        record[key] = value
    return record


def bench_document(device: str, commit: str, copy_bandwidth_GBps: float, records: List[dict],
                   **extra) -> dict:
    doc = {"device": str(device), "commit": str(commit),
           "copy_bandwidth_GBps": float(copy_bandwidth_GBps), "records": list(records)}
    for key, value in extra.items():
        if key in doc:
            raise ValueError(f"extra document key {key!r} would overwrite a schema key")
        doc[key] = value
    return doc


def _type_ok(value, types) -> bool:
    if isinstance(value, bool):  # bool is an int in Python, never a valid field here
        return False
    if float in types and isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, types)


def check_bench_document(doc: dict) -> None:
    """Raise ValueError (one line) unless ``doc`` has every schema key with the schema's type."""
    problems = []
    for key, types in DOCUMENT_FIELDS.items():
        if key not in doc:
            problems.append(f"missing {key!r}")
        elif not _type_ok(doc[key], types):
            problems.append(f"{key!r} is {doc[key]!r}")
    for i, record in enumerate(doc.get("records") or []):
        if not isinstance(record, dict):
            problems.append(f"records[{i}] is not an object")
            continue
        for key, types in RECORD_FIELDS.items():
            if key not in record:
                problems.append(f"records[{i}] missing {key!r}")
            elif not _type_ok(record[key], types):
                problems.append(f"records[{i}][{key!r}] is {record[key]!r}")
    if problems:
        raise ValueError("bench JSON does not match the schema: " + "; ".join(problems[:10]))


def _json_safe(value):
    """Non-finite floats become null (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_bench_json(path, doc: dict) -> None:
    check_bench_document(doc)
    from ..jsonio import write_rows_json

    write_rows_json(path, _json_safe(doc))


def _fmt_us(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(doc: dict) -> str:
    header = (f"{'N':>6} {'K':>6} {'M':>4} {'qcompile us':>12} {'cublas us':>10} {'int4 us':>9} "
              f"{'speedup':>8} {'bw frac':>8} {'rel err':>8}  route")
    lines = [f"qcompile bench on {doc['device']} (commit {doc['commit']})", header]
    for r in doc["records"]:
        err = r.get("rel_err")
        lines.append(
            f"{r['N']:>6} {r['K']:>6} {r['M']:>4} {_fmt_us(r['us']):>12} {_fmt_us(r['cublas_fp16_us']):>10} "
            f"{_fmt_us(r['torch_int4_us']):>9} {r['speedup_vs_fp16']:>7.2f}x {r['bandwidth_fraction']:>8.3f} "
            f"{'n/a' if err is None else f'{err:.1e}':>8}  {r.get('route') or ''}")
    lines.append(f"copy bandwidth: {doc['copy_bandwidth_GBps']:.0f} GB/s "
                 f"(device-to-device copy, bytes read + written)")
    return "\n".join(lines)


# --- names and provenance --------------------------------------------------------------------

_VENDOR_WORDS = re.compile(r"^(nvidia|geforce|tesla|quadro)$")
_VARIANT_WORDS = re.compile(r"^(\d+gb|pcie|sxm\d*|hbm\d*e?|nvl|mig|generation|laptop|gpu)$")


def gpu_short_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA A100-SXM4-80GB' -> 'a100',
    'NVIDIA GeForce RTX 4090' -> 'rtx4090'."""
    kept = []
    for token in re.split(r"[\s\-_]+", device_name.lower()):
        if not token or _VENDOR_WORDS.match(token):
            continue
        if _VARIANT_WORDS.match(token):
            break
        kept.append(re.sub(r"[^0-9a-z]", "", token))
    return "".join(kept) or "gpu"


def source_commit(repo_dir=None) -> str:
    """Short commit of the source tree (+ '-dirty' with uncommitted tracked changes), else
    'unknown' (no git, or a copy of the tree without .git, as on the device machine)."""
    override = os.environ.get("QCOMPILE_COMMIT", "").strip()
    if override:  # a copy of the tree without .git (the device machine) is told its commit
        return override
    repo_dir = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parents[2]
    if not (repo_dir / ".git").exists():  # never describe an unrelated repository further up
        return "unknown"
    git = ["git", "--no-optional-locks", "-C", str(repo_dir)]
    try:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=20)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = status.returncode == 0 and status.stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type, first line and (for long TVM errors) last line."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text += " ... " + lines[-1]
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- arguments -------------------------------------------------------------------------------

def _llama_shapes(hidden: int, intermediate: int, kv: int) -> Tuple[Tuple[int, int], ...]:
    """The linears of a Llama-family decoder layer as (out, in): q and o, k and v (GQA: ``kv``
    outputs), gate and up, down; then the fused qkv and gate/up of QuIP#/QTIP checkpoints."""
    return ((hidden, hidden), (kv, hidden), (intermediate, hidden), (hidden, intermediate),
            (hidden + 2 * kv, hidden), (2 * intermediate, hidden))


# --shapes presets: every distinct layer shape of these models, as built from Hugging Face weights
# (one kernel per linear) and as imported from fused QuIP#/QTIP checkpoints
MODEL_SHAPES: Dict[str, Tuple[Tuple[int, int], ...]] = {
    "llama-2-7b": _llama_shapes(4096, 11008, 4096),
    "llama-2-13b": _llama_shapes(5120, 13824, 5120),
    "llama-2-70b": _llama_shapes(8192, 28672, 1024),
    "llama-3-8b": _llama_shapes(4096, 14336, 1024),
}


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    """NxK items and model presets (``MODEL_SHAPES``: e.g. llama-2-7b), comma-separated; in order,
    each shape once."""
    shapes = []
    for item in str(text).split(","):
        name = item.strip().lower()
        if name in MODEL_SHAPES:
            shapes.extend(MODEL_SHAPES[name])
            continue
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
            raise QCompileError(f"--shapes: {item.strip()!r} is not NxK (out x in features, e.g. 11008x4096) "
                                f"or a model ({', '.join(MODEL_SHAPES)})")
        shapes.append((int(m.group(1)), int(m.group(2))))
    return list(dict.fromkeys(shapes))


def parse_ms(text: str) -> List[int]:
    ms = []
    for item in str(text).split(","):
        if not item.strip().isdigit() or int(item) <= 0:
            raise QCompileError(f"--m: {item.strip()!r} is not a positive batch size (e.g. --m 1,4,16)")
        ms.append(int(item))
    return ms


@dataclass(frozen=True)
class BenchPlan:
    """What ``qcompile bench`` times for a format at its Ms, as ``qcompile build`` would run them on a
    GPU: the buckets build compiles (``library.default_buckets``), the decode + cuBLAS threshold for
    those buckets (``library.default_decode_min_m``), the bucket kernels the split Ms launch
    (``runtime.dispatch.plan_rows``) and the Ms the GEMM family serves (for --fused-gemm)."""

    buckets: Tuple[int, ...]
    decode_from: int          # 0: no decode route
    large: Tuple[int, ...]    # Ms above GEMV_MAX_M
    split_ms: Tuple[int, ...]  # large Ms also timed as the bucket plan's launches (<= SPLIT_MAX_M)
    bucket_ms: Tuple[int, ...]  # bucket kernels to compile: the small Ms and the split plans' buckets
    gemm_ms: Tuple[int, ...]  # large Ms of the GEMM family

    def route(self, m: int) -> str:
        """The runtime's route at M: "fused" (one low-batch launch), "split" (the bucket plan's
        launches) or "decode_cublas"."""
        from ..kernels.library import GEMV_MAX_M

        if self.decode_from and m >= self.decode_from:  # (the runtime's test, whatever the threshold)
            return "decode_cublas"
        return "fused" if m <= GEMV_MAX_M else "split"


def bench_plan(fmt, ms: Sequence[int], decode_min_m: Optional[int] = None) -> BenchPlan:
    """The BenchPlan of format ``fmt`` at ``ms`` (``decode_min_m``: None = build's default, 0 = never)."""
    from ..formats import get as get_format
    from ..kernels.library import GEMM_FAMILY, GEMV_MAX_M, default_buckets, default_decode_min_m, kernel_family
    from ..runtime.dispatch import plan_rows

    fmt = get_format(fmt)
    buckets = default_buckets(fmt)  # the buckets qcompile build compiles for the format (GPU)
    decode_from = default_decode_min_m(fmt, buckets) if decode_min_m is None else decode_min_m
    small = [m for m in ms if m <= GEMV_MAX_M]
    large = [m for m in ms if m > GEMV_MAX_M]
    split_ms = [m for m in large if m <= SPLIT_MAX_M]
    bucket_ms = sorted(set(small) | {b for m in split_ms for _, _, b in plan_rows(m, buckets)})
    gemm_ms = [m for m in large if kernel_family(fmt, m) == GEMM_FAMILY]  # (int4/E8P M <= 64: mma.sync)
    return BenchPlan(tuple(buckets), decode_from, tuple(large), tuple(split_ms), tuple(bucket_ms), tuple(gemm_ms))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qcompile bench",
        description="Time the compiled kernels against cuBLAS fp16 and torch's int4 kernel on this GPU.")
    ap.add_argument("--format", default=DEFAULT_FORMAT,
                    help=f"weight format, a comma list of them (one JSON and PNG each, and a roofline PNG "
                         f"of all) or 'all' (default {DEFAULT_FORMAT})")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES,
                    help=f"layer shapes NxK, out x in features, or model presets ({', '.join(MODEL_SHAPES)}) "
                         f"(default {DEFAULT_SHAPES})")
    ap.add_argument("--m", default=DEFAULT_MS, help=f"batch sizes (default {DEFAULT_MS})")
    ap.add_argument("--name", default=None, help="output name (default <format>-<gpu>, e.g. int4-g128-h100)")
    ap.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"where the JSON and PNG go (default {DEFAULT_OUT_DIR})")
    ap.add_argument("--iters", type=int, default=DEFAULT_ITERS, help=f"timed launches per measurement (default {DEFAULT_ITERS})")
    ap.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed launches first (default {DEFAULT_WARMUP})")
    ap.add_argument("--records", default=None, metavar="DIR",
                    help="build with the tuned GEMV and tensor-core configs in DIR (qcompile tune); "
                         "default: untuned defaults")
    ap.add_argument("--no-untuned", action="store_true",
                    help="with --records: do not also time the default configs of the kernels a record "
                         "tunes (by default each such row gets untuned_us, measured in the same process)")
    ap.add_argument("--decode-min-m", type=int, default=None, metavar="M",
                    help="M from which the timed route is decode + cuBLAS (default: the format's default of "
                         "qcompile build; 0: never)")
    ap.add_argument("--fused-gemm", action="store_true",
                    help="also time the fused WMMA GEMM kernel compiled for each M the GEMM family serves "
                         "(M > 16; int4/E8P: M > 64) (slow to compile)")
    ap.add_argument("--timing", choices=("graph", "events"), default="graph",
                    help="graph: CUDA graphs of launches, timed per replay (default); events: events around each launch")
    return ap


# --- the GPU run ---------------------------------------------------------------------------

def require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise QCompileError(
            f"qcompile bench needs a CUDA GPU; torch {torch.__version__} sees none here "
            f"(run it on a machine with an NVIDIA GPU)")
    return torch


def relative_error(out, ref) -> Optional[float]:
    """||out - ref|| / ||ref|| in float64; None where out has NaN/Inf (e.g. unwritten elements)."""
    import torch

    out = out.to(torch.float64)
    if not torch.isfinite(out).all():
        return None
    return float((out - ref).norm() / ref.norm())


def build_kernels(specs, target, log: Callable[[str], None], config_for=None):
    """One module for every kernel that schedules and compiles; (executable, {spec: error}).
    ``specs``: KernelSpecs and DecodeSpecs (qcompile.kernels.decode). ``config_for(spec)``: a tuned
    config of a KernelSpec's kernel family or None (the default schedule)."""
    from ..kernels.decode import DecodeSpec
    from ..kernels.library import build as build_all, scheduled_decode_func, scheduled_func

    def build(specs_, target_):
        matmuls = [s for s in specs_ if not isinstance(s, DecodeSpec)]
        decodes = [s for s in specs_ if isinstance(s, DecodeSpec)]
        return build_all(matmuls, target_, config_for, decode=decodes)

    failures: Dict[object, str] = {}
    schedulable = []
    for spec in specs:
        try:
            if isinstance(spec, DecodeSpec):
                scheduled_decode_func(spec, target)
            else:
                scheduled_func(spec, target, config_for(spec) if config_for else None)
            schedulable.append(spec)
        except Exception as err:  # a schedule that does not apply must not stop the others
            failures[spec] = one_line(err)
    if not schedulable:
        return None, failures
    try:
        return build(schedulable, target), failures
    except Exception as err:
        log(f"warning: compiling all kernels in one module failed ({one_line(err)}); "
            f"compiling them one by one to find the broken ones")
    good = []
    for spec in schedulable:
        try:
            build([spec], target)
            good.append(spec)
        except Exception as err:
            failures[spec] = one_line(err)
    return (build(good, target) if good else None), failures


def check_and_time(row: dict, bench, kernel, X, weights, Y, ref, where: str, log: Callable[[str], None],
                   rel_err_max: float) -> Optional[float]:
    """A sweep row's measurement of ``kernel`` after one launch into ``Y``: its error against ``ref``
    (row["rel_err"]; above ``rel_err_max`` the row gets an error and no time), then its median time
    (row["us"], µs) as qcompile_method times it over the rotated ``weights``; None when it has no time."""
    from .baselines import qcompile_method

    row["rel_err"] = relative_error(Y, ref)
    if row["rel_err"] is None or row["rel_err"] > rel_err_max:
        row["error"] = f"wrong result (rel_err {row['rel_err']})"
        log(f"{where} WRONG rel_err {row['rel_err']}")
        return None
    t = bench.time(qcompile_method(kernel, X, weights, Y), row["N"], row["K"], row["M"])
    if t is None:
        row["error"] = "not timed"
        return None
    row["us"] = t.median_us
    return t.median_us


class _Bench:
    """State of one run: settings, the failure list, and warnings said once."""

    def __init__(self, iters: int, warmup: int, timing_mode: str, log: Callable[[str], None]):
        self.iters, self.warmup, self.timing_mode, self.log = iters, warmup, timing_mode, log
        self.failures: List[dict] = []
        self._said = set()

    def warn_once(self, text: str) -> None:
        if text not in self._said:
            self._said.add(text)
            self.log(f"warning: {text}")

    def fail(self, method: str, n: int, k: int, m: Optional[int], err: str) -> None:
        self.failures.append({"method": method, "N": n, "K": k, "M": m, "error": err})

    def time(self, method, n: int, k: int, m: int):
        """Timing of one method, or None (failure noted). A graph capture that fails falls back
        to per-launch events for that method; the record says which mode each method used."""
        from .timing import time_cuda

        modes = [self.timing_mode] + (["events"] if self.timing_mode == "graph" else [])
        for mode in modes:
            try:
                return time_cuda(method.launch, self.iters, self.warmup, mode, period=method.weights.count)
            except Exception as err:
                reason = one_line(err)
                if mode == "graph" and "events" in modes:
                    self.warn_once(f"{method.name}: CUDA graph timing failed ({reason}); timing with events")
                    continue
                self.warn_once(f"{method.name} not timed: {reason}")
                self.fail(method.name, n, k, m, reason)
        return None


def bench_weight(fmt, n: int, k: int, device):
    """The layer's weight: a quantized Gaussian matrix for group-wise formats (fast to make, and the
    torch int4 baseline then runs on the very same codes); random codes for the RHT formats, whose
    quantizers (E8P lattice search, Viterbi) would take minutes on large layers and whose kernels
    do the same work whatever the codes are."""
    import torch

    if fmt.always_rht:
        return fmt.random_weight(n, k, seed=n * 131 + k, device=device)
    W = torch.randn(n, k, device=device) * 0.02
    return fmt.quantize(W).to(device)


def run_bench(fmt_name: str = DEFAULT_FORMAT, shapes: Sequence[Tuple[int, int]] = None,
              ms: Sequence[int] = None, iters: int = DEFAULT_ITERS, warmup: int = DEFAULT_WARMUP,
              timing_mode: str = "graph", log: Callable[[str], None] = None, records_dir=None,
              fused_gemm: bool = False, decode_min_m: Optional[int] = None, untuned: bool = True) -> dict:
    """Run the benchmark on the local GPU and return the JSON document (not yet written).
    ``records_dir``: build the GEMV and tensor-core kernels with the tuned configs found there (qcompile tune);
    ``untuned`` (with it): also build those kernels with their default configs and time them on the
    same rows (``untuned_us``, where the route's kernels include a tuned one), so a record shows what
    tuning bought in one process.

    M <= GEMV_MAX_M: the kernel compiled for that M. Larger M: what the runtime does with the default
    buckets (qcompile.runtime.linear): from ``decode_min_m`` (None: the format's default; 0: never)
    the decode kernel + cuBLAS, below it the bucket plan's launches (``plan_rows``); the record's
    ``route`` says which one ``us`` is, and both are recorded where measured (the bucket plan up to
    SPLIT_MAX_M). ``fused_gemm``: also time the fused GEMM kernel compiled for exactly M."""
    from ..formats import get as get_format

    log = log or (lambda text: print(text, flush=True))
    shapes = list(shapes or parse_shapes(DEFAULT_SHAPES))
    ms = list(ms or parse_ms(DEFAULT_MS))
    fmt = get_format(fmt_name)
    for n, k in shapes:
        fmt.check_shape(n, k)
    torch = require_cuda()

    import tvm

    from ..kernels.decode import DecodeSpec
    from ..kernels.library import GEMV_MAX_M, KernelSpec
    from ..kernels.target import parse_target
    from ..runtime.dispatch import plan_rows
    from .baselines import (RotatingWeights, cublas_fp16_method, decode_cublas_method, decode_only_method,
                            prepare_torch_int4, qcompile_method, split_method, torch_int4_method)
    from .timing import copy_bandwidth_GBps, copy_test_bytes, l2_cache_bytes

    device = torch.device("cuda")
    device_name = torch.cuda.get_device_name(device)
    l2_bytes = l2_cache_bytes(device)
    free_bytes, _ = torch.cuda.mem_get_info(device)
    copy_bytes = copy_test_bytes(l2_bytes, free_bytes)
    copy_bw = copy_bandwidth_GBps(copy_bytes)
    log(f"{device_name}: L2 {l2_bytes / 2**20:.0f} MiB, copy bandwidth {copy_bw:.0f} GB/s "
        f"({copy_bytes / 2**30:.2f} GiB copy, read + written)")

    bench = _Bench(iters, warmup, timing_mode, log)
    target = parse_target("auto")
    plan = bench_plan(fmt, ms, decode_min_m)
    large, split_ms = plan.large, plan.split_ms
    buckets, bucket_ms, gemm_ms = plan.buckets, plan.bucket_ms, plan.gemm_ms
    specs = [KernelSpec(fmt.name, n, k, m) for n, k in shapes for m in bucket_ms]
    if fused_gemm:
        specs += [KernelSpec(fmt.name, n, k, m) for n, k in shapes for m in gemm_ms if m not in bucket_ms]
    if large or any(plan.route(m) == "decode_cublas" for m in ms):
        specs += [DecodeSpec(fmt.name, n, k) for n, k in shapes]
    t0 = time.perf_counter()
    config_for, tuned = None, {}
    if records_dir is not None:
        from ..tune.records import TuningRecords, records_gpu

        lookup = TuningRecords(Path(records_dir), warn=log).lookup(records_gpu(target))
        tuned = {spec: lookup(spec) for spec in specs if isinstance(spec, KernelSpec)}
        config_for = tuned.get
        log(f"tuned configs from {records_dir} for {sum(c is not None for c in tuned.values())} of {len(specs)} kernels")
    executable, build_failures = build_kernels(specs, target, log, config_for)
    built = set() if executable is None else {spec for spec in specs if spec not in build_failures}
    build_s = time.perf_counter() - t0
    log(f"compiled {len(specs) - len(build_failures)} of {len(specs)} kernels for {target.key} in {build_s:.1f} s")
    for spec, err in build_failures.items():
        log(f"warning: no kernel {spec.name}: {err}")
        bench.fail("qcompile", spec.n, spec.k, getattr(spec, "m", None), err)
    # the tuned kernels once more with their default configs (their own module: same names)
    untuned_specs = [spec for spec, cfg in tuned.items() if cfg is not None and spec in built] if untuned else []
    tuned_specs = set(untuned_specs)
    untuned_exec, untuned_built = None, set()
    if untuned_specs:
        untuned_exec, untuned_failures = build_kernels(untuned_specs, target, log, None)
        untuned_built = set() if untuned_exec is None else set(untuned_specs) - set(untuned_failures)
        for spec, err in untuned_failures.items():
            log(f"warning: no default-config kernel {spec.name}: {err}")
            bench.fail("qcompile_untuned", spec.n, spec.k, spec.m, err)
        log(f"compiled {len(untuned_built)} default-config twins of the tuned kernels")

    torch.manual_seed(0)
    records = []
    for n, k in shapes:
        qw = bench_weight(fmt, n, k, device)
        w16 = fmt.decode_fp16(qw)  # the exact values the kernels multiply with
        w64_t = w16.to(torch.float64).T
        q_weights = RotatingWeights([qw.tensors[name] for name in fmt.tensor_specs(n, k)], l2_bytes)
        fp16_weights = RotatingWeights([w16], l2_bytes)
        int4 = None
        try:
            int4 = prepare_torch_int4(fmt, qw, w16, l2_bytes)
            torch.cuda.synchronize()
        except Exception as err:
            bench.warn_once(f"torch int4 baseline unavailable: {one_line(err)}")
            bench.fail("torch_int4", n, k, None, one_line(err))
        weight_bytes = fmt.weight_bytes(n, k)

        decode_name = DecodeSpec(fmt.name, n, k).name
        has_decode = DecodeSpec(fmt.name, n, k) in built
        W_scratch = torch.empty((n, k), device=device, dtype=torch.float16) if has_decode else None
        t_decode, decode_exact = None, None
        if has_decode:
            executable[decode_name](*q_weights[0], W_scratch)
            decode_exact = bool(torch.equal(W_scratch, w16))  # the format's torch decode, bit for bit
            if not decode_exact:
                log(f"warning: the decode kernel of N={n} K={k} differs from the format's torch decode")
            t_decode = bench.time(decode_only_method(executable[decode_name], q_weights, W_scratch), n, k, None)

        def kernel_of(m_, default_config=False):
            """The kernel of bucket m_: as built (tuned where a record applies), or with
            ``default_config`` its default-config twin (the same kernel where nothing was tuned)."""
            spec_ = KernelSpec(fmt.name, n, k, m_)
            if default_config and spec_ in untuned_built:
                return untuned_exec[spec_.name]
            return executable[spec_.name] if spec_ in built else None

        def split_launches(X, Y, rows, default_config=False):
            """(kernel, X rows, Y rows) of the bucket plan's launches ``rows``, padded tails as the
            runtime pads them (their copies left out of the timing)."""
            launches = []
            for start, used, b in rows:
                kern = kernel_of(b, default_config)
                if used == b:
                    launches.append((kern, X[start:start + used], Y[start:start + used]))
                else:
                    xb = torch.zeros((b, k), device=device, dtype=torch.float16)
                    xb[:used].copy_(X[start:start + used])
                    launches.append((kern, xb, torch.empty((b, n), device=device, dtype=torch.float16)))
            return launches

        for m in ms:
            X = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = X.to(torch.float64) @ w64_t
            # the ways this qcompile build computes the layer at this M: route -> TimedMethod
            methods = {}
            route = plan.route(m)
            if m <= GEMV_MAX_M:
                if kernel_of(m) is not None:
                    Y = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)  # poison
                    methods["fused"] = (qcompile_method(kernel_of(m), X, q_weights, Y), Y, ())
                    if KernelSpec(fmt.name, n, k, m) in untuned_built and route == "fused":
                        Yu = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)
                        methods["untuned"] = (qcompile_method(kernel_of(m, True), X, q_weights, Yu), Yu, ())
            else:
                if fused_gemm and m in gemm_ms and kernel_of(m) is not None:
                    Y = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)
                    methods["fused_gemm"] = (qcompile_method(kernel_of(m), X, q_weights, Y), Y, ())
                rows = plan_rows(m, buckets) if m in split_ms else []
                if rows and all(kernel_of(b) is not None for _, _, b in rows):
                    Y = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)
                    launches = split_launches(X, Y, rows)
                    methods["split"] = (split_method(launches, q_weights), Y, list(zip(launches, rows)))
                    tuned_rows = {KernelSpec(fmt.name, n, k, b) for _, _, b in rows} & tuned_specs
                    if route == "split" and tuned_rows and tuned_rows <= untuned_built:  # every tuned launch's twin
                        Y = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)
                        launches = split_launches(X, Y, rows, True)
                        methods["untuned"] = (split_method(launches, q_weights), Y, list(zip(launches, rows)))
            if has_decode and (m > GEMV_MAX_M or route == "decode_cublas"):  # (a --decode-min-m <= 16)
                methods["decode_cublas"] = (decode_cublas_method(executable[decode_name], X, q_weights, W_scratch),
                                            None, ())
            if not methods:
                continue
            if route not in methods:
                route = next(iter(methods))
            times, errs = {}, {}
            for name, (method, Y, blocks) in methods.items():
                try:
                    out = method.launch(0)
                    torch.cuda.synchronize()
                except Exception as err:
                    bench.warn_once(f"qcompile {name} N={n} K={k} M={m} failed: {one_line(err)}")
                    bench.fail(f"qcompile_{name}", n, k, m, one_line(err))
                    continue
                for (_, _, yb), (start, used, b) in blocks:  # padded tails: their rows back into Y
                    if used != b:
                        Y[start:start + used].copy_(yb[:used])
                errs[name] = relative_error(out if Y is None else Y, ref)
                if errs[name] is None or errs[name] > REL_ERR_WARN:
                    log(f"warning: qcompile {name} N={n} K={k} M={m} rel_err "
                        f"{'NaN/unwritten output' if errs[name] is None else f'{errs[name]:.2e}'} > {REL_ERR_WARN:g}")
                timing = bench.time(method, n, k, m)
                if timing is not None:
                    times[name] = timing
            if route not in times:
                continue
            t_q, rel_err = times[route], errs[route]
            t_fp16 = bench.time(cublas_fp16_method(X, fp16_weights), n, k, m)
            if t_q is None or t_fp16 is None:
                continue
            t_int4, int4_err = None, None
            if int4 is not None:
                try:
                    int4_call = torch_int4_method(X, int4)
                    int4_err = relative_error(int4_call.launch(0), ref)
                    torch.cuda.synchronize()
                    t_int4 = bench.time(int4_call, n, k, m)
                except Exception as err:
                    bench.warn_once(f"torch int4 baseline failed: {one_line(err)}")
                    bench.fail("torch_int4", n, k, m, one_line(err))
                if int4.same_weights and t_int4 is not None and (int4_err is None or int4_err > INT4_REL_ERR_WARN):
                    bench.warn_once(f"torch int4 output differs from the reference (rel_err {int4_err}); "
                                    f"its packing may not match this torch version")
            records.append(make_record(
                fmt.name, n, k, m, t_q.median_us, t_fp16.median_us,
                None if t_int4 is None else t_int4.median_us, weight_bytes, copy_bw,
                rel_err=rel_err, torch_int4_rel_err=int4_err,
                torch_int4_same_weights=None if int4 is None else int4.same_weights,
                us_p10=t_q.p10_us, us_p90=t_q.p90_us, route=route,
                **{f"{name}_us": t.median_us for name, t in times.items() if name != route},
                **({"untuned_rel_err": errs.get("untuned")} if "untuned" in times else {}),
                decode_us=None if m <= GEMV_MAX_M or t_decode is None else t_decode.median_us,
                decode_exact=None if m <= GEMV_MAX_M else decode_exact,
                tuned_config=(None if route != "fused" or tuned.get(KernelSpec(fmt.name, n, k, m)) is None
                              else tuned[KernelSpec(fmt.name, n, k, m)].as_dict()),
                timing_modes={"qcompile": t_q.mode, "cublas_fp16": t_fp16.mode,
                              "torch_int4": None if t_int4 is None else t_int4.mode},
                weight_copies={"qcompile": q_weights.count, "cublas_fp16": fp16_weights.count,
                               "torch_int4": None if int4 is None else int4.weights.count}))
            r = records[-1]
            others = "".join(f"  {name} {t.median_us:.1f} us" for name, t in times.items() if name != route)
            log(f"  N={n:>6} K={k:>6} M={m:>4}: {r['us']:8.2f} us ({route})  cublas {r['cublas_fp16_us']:8.2f} us  "
                f"int4 {_fmt_us(r['torch_int4_us']):>8} us  speedup {r['speedup_vs_fp16']:.2f}x  "
                f"bw {r['bandwidth_fraction']:.3f}{others}")
        del q_weights, fp16_weights, int4, qw, w16, w64_t, W_scratch
        torch.cuda.empty_cache()

    return bench_document(
        device_name, source_commit(), copy_bw, records,
        format=fmt.name, target=target.key,
        tvm_version=tvm.__version__, torch_version=torch.__version__, cuda_version=torch.version.cuda,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        l2_bytes=l2_bytes, copy_bytes=copy_bytes, build_s=build_s,
        tuning_records=None if records_dir is None else str(records_dir),
        timing={"mode": timing_mode, "iters": iters, "warmup": warmup, "statistic": "median",
                "rotation": "weights of every method rotated through >= 2x L2 of distinct copies",
                "activations": "one X per (shape, M), reused (stays in L2, as between real layers)"},
        failures=bench.failures)


def default_name(fmt_name: str, device_name: str) -> str:
    return f"{fmt_name}-{gpu_short_name(device_name)}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``qcompile bench`` (also ``python -m qcompile.bench.harness``)."""

    args = build_parser().parse_args(argv)
    shapes = parse_shapes(args.shapes)
    ms = parse_ms(args.m)
    if args.iters < 1 or args.warmup < 0:
        raise QCompileError("--iters must be >= 1 and --warmup >= 0")
    if args.name is not None and not re.fullmatch(r"[0-9A-Za-z._-]+", args.name):
        raise QCompileError(f"--name {args.name!r} may only hold letters, digits, '.', '_' and '-'")
    fmts = parse_formats(args.format)
    if args.name is not None and len(fmts) > 1:
        raise QCompileError(f"--name names one output, but --format lists {len(fmts)} formats; leave --name out "
                            f"(each format writes <format>-<gpu>.json)")
    for fmt in fmts:
        for n, k in shapes:
            fmt.check_shape(n, k)
    if args.no_untuned and args.records is None:
        raise QCompileError("--no-untuned only applies with --records DIR (without records every kernel is untuned)")
    if args.decode_min_m is not None and args.decode_min_m < 0:
        raise QCompileError("--decode-min-m must be >= 1, or 0 for no decode route")
    require_cuda()

    from .plot import plot_bench, plot_roofline

    docs = []
    for fmt in fmts:  # one document each, as `--format F` alone writes it
        if len(fmts) > 1:
            print(f"\n{fmt.name}:", flush=True)
        doc = run_bench(fmt.name, shapes, ms, args.iters, args.warmup, args.timing, records_dir=args.records,
                        fused_gemm=args.fused_gemm, decode_min_m=args.decode_min_m, untuned=not args.no_untuned)
        name = args.name or default_name(fmt.name, doc["device"])
        json_path = Path(args.out_dir) / f"{name}.json"
        png_path = Path(args.out_dir) / f"{name}.png"
        write_bench_json(json_path, doc)
        plot_bench(doc, png_path)
        print(format_table(doc))
        if doc["failures"]:
            print(f"{len(doc['failures'])} measurement(s) failed; see 'failures' in {json_path}")
        print(f"wrote {json_path} and {png_path}")
        docs.append(doc)
    if sum(1 for doc in docs if doc["records"]) > 1:  # the formats side by side: bandwidth fraction, speedup
        roofline = Path(args.out_dir) / f"roofline-{gpu_short_name(docs[0]['device'])}.png"
        print(f"wrote {plot_roofline(docs, roofline)}")
    return 0


def parse_formats(text: str) -> list:
    """The Formats of ``--format``: one name, a comma list (``int4-g128,e8p-2``) or ``all`` (every
    registered format); QCompileError (one line) for an unknown name or an empty list."""
    from ..formats import get as get_format
    from ..formats import names as format_names

    if text.strip() == "all":
        return [get_format(name) for name in format_names()]
    picked = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not picked:
        raise QCompileError(f"--format {text!r} names no format; give one or more, e.g. int4-g128,e8p-2, or all")
    return [get_format(name) for name in picked]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except QCompileError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
