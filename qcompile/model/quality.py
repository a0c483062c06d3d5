"""The quality table: perplexity of each format × {RHT, LDLQ} on the held-out corpus split.

``qcompile eval quality`` quantizes the trained small model (qcompile.model.quantize) with every
configuration, evaluates each checkpoint's dequantized torch model (the reference decode, so the
numbers measure the quantization, not the kernels) with the sliding-window perplexity of
qcompile.model.evaluate, and writes ``artifacts/bench/quality.json``::

    {"model": str, "context": int, "rows": [{"format": str, "rht": bool, "ldlq": bool,
                                             "ppl": float, "bits_per_weight": float, ...}], ...}

Rows: "fp16" (the unquantized model with its weights rounded to fp16), then per format the
configurations of ``QUALITY_CONFIGS`` (int4-g128: RTN, +RHT, +LDLQ, +RHT+LDLQ). Every row records
the mean relative proxy loss of its layers (Hessians are captured for the RTN rows too). Running
it for some formats keeps the rows of the others already in the file (same model, context, stride
and test tokens). Checkpoints are kept under the work directory, so a rerun reuses them.
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import QCompileError
from ..jsonio import read_json_object

PathLike = Union[str, os.PathLike]

DEFAULT_OUT = Path("artifacts") / "bench" / "quality.json"
# (rht, ldlq) rows per format, in table order; formats not listed get DEFAULT_CONFIGS
QUALITY_CONFIGS: Dict[str, List[Tuple[bool, bool]]] = {
    "int4-g128": [(False, False), (True, False), (False, True), (True, True)],
}
DEFAULT_CONFIGS: List[Tuple[bool, bool]] = [(True, True)]


def configs_for(fmt: str) -> List[Tuple[bool, bool]]:
    return list(QUALITY_CONFIGS.get(fmt, DEFAULT_CONFIGS))


# --- perplexity of a checkpoint ----------------------------------------------------------------------
def _corpus_info(split: str) -> dict:
    from . import corpus as C

    manifest = C.read_manifest(C.find_corpus(split))
    return {"package": manifest.get("package"), "version": manifest.get("version"),
            "split_sha256": manifest["splits"][split]["sha256"]}


def model_perplexity(model, tokenizer, context: int, stride: int, batch_size: int = 8,
                     max_tokens: Optional[int] = None, split: str = "test") -> dict:
    """evaluate.perplexity of a loaded model on the corpus split, as a dict."""
    from dataclasses import asdict

    from . import evaluate as E

    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and context > max_pos:
        raise QCompileError(f"context {context} is longer than the model's {max_pos} positions; pass a smaller context")
    ids = E.load_test_tokens(tokenizer, split, max_tokens)
    return asdict(E.perplexity(model, ids, context, stride, batch_size=batch_size))


def eval_checkpoint_ppl(path: PathLike, context: Optional[int] = None, stride: Optional[int] = None, device=None,
                        batch_size: int = 8, max_tokens: Optional[int] = None, split: str = "test") -> dict:
    """Perplexity of a quantized checkpoint's dequantized torch model on the corpus's held-out
    split: the dict of ``evaluate.eval_ppl`` with kind "checkpoint"."""
    from . import evaluate as E
    from .checkpoint import dequantized_model

    t0 = time.time()
    context = E.DEFAULT_CONTEXT if context is None else int(context)
    stride = E.DEFAULT_STRIDE if stride is None else int(stride)
    import torch

    corpus = _corpus_info(split)  # fail early when the corpus is not there
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = dequantized_model(path, device=device)
    r = model_perplexity(model, model.qcompile_tokenizer, context, stride, batch_size, max_tokens, split)
    r.update({"split": split, "path": str(path), "kind": "checkpoint", "device": str(E._device_of(model)),
              "corpus": corpus, "truncated_to": max_tokens, "seconds": round(time.time() - t0, 2)})
    return r


# --- the table -----------------------------------------------------------------------------------------
def _fp16_model(model_dir: Path, device):
    import torch

    from .evaluate import load_for_eval

    model, tokenizer, _ = load_for_eval(model_dir, device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().to(p.dtype))
    return model, tokenizer


def _mean_proxy_loss(qcfg: dict) -> Optional[float]:
    losses = [v.get("proxy_loss") for v in (qcfg.get("layers") or {}).values()]
    losses = [float(x) for x in losses if x is not None]
    return sum(losses) / len(losses) if losses else None


def quality_table(model_dir: Optional[PathLike] = None, formats: Optional[Sequence[str]] = None,
                  out: Optional[PathLike] = DEFAULT_OUT, context: Optional[int] = None,
                  stride: Optional[int] = None, device=None, work_dir: Optional[PathLike] = None,
                  calibration=None, n_calibration: Optional[int] = None, calibration_context: Optional[int] = None,
                  seed: int = 0, max_tokens: Optional[int] = None, batch_size: int = 8,
                  progress: Optional[Callable[[str], None]] = print, merge: bool = True) -> dict:
    """Quantize ``model_dir`` (default: the trained small model) with every configuration of each
    format, measure perplexities and write the table to ``out`` (None: do not write). Returns it."""
    import torch

    from ..formats import get as get_format
    from . import evaluate as E
    from .build import load_hf_model
    from .checkpoint import dequantized_model, read_checkpoint_config
    from .default import cache_root
    from .quantize import DEFAULT_CALIBRATION_SAMPLES, SettingsMismatch, quantize_model

    say = progress or (lambda msg: None)
    context = E.DEFAULT_CONTEXT if context is None else int(context)
    stride = E.DEFAULT_STRIDE if stride is None else int(stride)
    formats = list(formats) if formats else ["int4-g128"]
    for f in formats:
        get_format(f)  # unknown names: a clear error before any work
    model_path, kind = E.resolve_model_path(model_dir)
    if kind != "model":
        raise QCompileError(f"{model_path} is a built artifact; the quality table needs the unquantized model directory")
    corpus = _corpus_info("test")
    work = Path(work_dir) if work_dir is not None else cache_root() / "quality" / model_path.name
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.time()

    say(f"fp16: evaluating {model_path}")
    model, tokenizer = _fp16_model(model_path, dev)
    base = model_perplexity(model, tokenizer, context, stride, batch_size, max_tokens)
    del model
    rows = [{"format": "fp16", "rht": False, "ldlq": False, "ppl": base["ppl"], "bits_per_weight": 16.0,
             "nll": base["nll"], "proxy_loss_mean": 0.0}]
    say(f"fp16: ppl {base['ppl']:.3f}")

    source = load_hf_model(model_path)  # quantize_model reads it; loaded once for every row
    calib_info = None
    for fmt in formats:
        for rht, ldlq in configs_for(fmt):
            label = f"{fmt}{' +RHT' if rht else ''}{' +LDLQ' if ldlq else ' RTN' if not rht else ''}"
            ck = work / f"{fmt}{'-rht' if rht else ''}{'-ldlq' if ldlq else '-rtn'}-seed{seed}"
            say(f"{label}: quantizing into {ck}")
            kwargs = dict(calibration=calibration, out_dir=ck, rht=rht, ldlq=ldlq, seed=seed,
                          n_calibration=n_calibration or DEFAULT_CALIBRATION_SAMPLES, context=calibration_context,
                          device=dev, progress=False, capture_hessians=True, tokenizer=tokenizer)
            try:  # reuses (or resumes) a checkpoint made with the same settings
                quantize_model(source, fmt, **kwargs)
            except SettingsMismatch:
                quantize_model(source, fmt, overwrite=True, **kwargs)
            qcfg = read_checkpoint_config(ck)["quantization_config"]
            calib_info = qcfg.get("calibration") or calib_info
            qmodel = dequantized_model(ck, device=dev)
            r = model_perplexity(qmodel, tokenizer, context, stride, batch_size, max_tokens)
            del qmodel
            row = {"format": fmt, "rht": rht, "ldlq": ldlq, "ppl": r["ppl"],
                   "bits_per_weight": qcfg["bits_per_weight"], "nll": r["nll"],
                   "proxy_loss_mean": _mean_proxy_loss(qcfg), "checkpoint": str(ck)}
            rows.append(row)
            say(f"{label}: ppl {r['ppl']:.3f}, {row['bits_per_weight']:.3f} bits/weight, "
                f"mean proxy loss {row['proxy_loss_mean']:.4g}" if row["proxy_loss_mean"] is not None else
                f"{label}: ppl {r['ppl']:.3f}, {row['bits_per_weight']:.3f} bits/weight")

    table = {"model": model_path.name, "context": context, "stride": stride, "tokens": base["tokens"],
             "split": "test", "corpus": corpus, "model_path": str(model_path), "device": str(dev),
             "seed": seed, "calibration": calib_info, "truncated_to": max_tokens,
             "date": datetime.date.today().isoformat(), "seconds": round(time.time() - t_start, 1),
             "rows": rows}
    if out is not None:
        out = Path(out)
        if merge and out.is_file():
            table = merge_tables(read_table(out), table)
        write_table(out, table)
        say(f"wrote {out}")
    return table


def read_table(path: PathLike) -> dict:
    table = read_json_object(path, "write a new one with qcompile eval quality")
    if not isinstance(table.get("rows"), list):
        raise QCompileError(f"{path} is not a quality table (no rows)")
    return table


def merge_tables(old: dict, new: dict) -> dict:
    """``new``, plus the rows of ``old`` for formats ``new`` did not measure, when both measured
    the same model on the same tokens (else just ``new``)."""
    same = all(old.get(k) == new.get(k) for k in ("model", "context", "stride", "tokens", "corpus"))
    if not same:
        return new
    measured = {r["format"] for r in new["rows"]}
    kept = [r for r in old["rows"] if r.get("format") not in measured]
    merged = dict(new)
    merged["rows"] = [r for r in new["rows"] if r["format"] == "fp16"] + \
        [r for r in kept if r.get("format") != "fp16"] + [r for r in new["rows"] if r["format"] != "fp16"]
    return merged


def write_table(path: PathLike, table: dict) -> None:
    from .checkpoint import atomic_write_json

    atomic_write_json(Path(path), table)


def markdown_table(table: dict) -> str:
    """The table as Markdown (for the README)."""
    lines = [f"Perplexity of {table['model']} on {table.get('tokens', 0):,} held-out tokens "
             f"(context {table['context']}, stride {table.get('stride')}):", "",
             "| format | RHT | LDLQ | bits/weight | ppl | mean proxy loss |",
             "|---|:-:|:-:|--:|--:|--:|"]
    for r in table["rows"]:
        loss = r.get("proxy_loss_mean")
        lines.append(f"| {r['format']} | {'yes' if r['rht'] else '-'} | {'yes' if r['ldlq'] else '-'} | "
                     f"{r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {'-' if loss is None else f'{loss:.4f}'} |")
    return "\n".join(lines)
