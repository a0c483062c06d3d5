"""Perplexity on the held-out test split of the corpus (see qcompile.model.corpus), for a
transformers model directory or a qcompile artifact: what ``qcompile eval ppl`` reports.

Sliding windows: windows of ``context`` tokens start every ``stride`` tokens; every token after the
first is scored exactly once, by the first window that reaches it, so each scored token has at
least ``context - stride`` tokens of left context (all tokens before it near the start). The
test text is the split's documents as one stream of ``<s> text </s>`` (the training format).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

from ..errors import QCompileError
from . import corpus as C

PathLike = Union[str, os.PathLike]

DEFAULT_CONTEXT = 256
DEFAULT_STRIDE = 128
TRAINED_NAME = "tiny-llama-trained"
PRODUCE_COMMAND = (f"{C.PREPARE_COMMAND} && {C.TRAIN_COMMAND} (from the qcompile source checkout; "
                   f"see models/README.md)")


@dataclass
class Perplexity:
    ppl: float  # exp(nll)
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood per scored token (nats)
    context: int
    stride: int
    windows: int


def sliding_windows(n: int, context: int, stride: int) -> List[Tuple[int, int, int]]:
    """(begin, end, first_target) of each window over ``n`` tokens: the window feeds tokens
    [begin, end) and scores targets t in [first_target, end), each predicted from tokens < t."""
    if context < 2:
        raise QCompileError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride < context:
        raise QCompileError(f"stride must be at least 1 and less than the context ({context}), got {stride}")
    if n < 2:
        raise QCompileError(f"need at least 2 tokens to measure perplexity, got {n}")
    windows = []
    begin, scored_to = 0, 0
    while True:
        end = min(begin + context, n)
        windows.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n:
            return windows
        begin += stride


def _device_of(model):
    import torch

    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def perplexity(model, token_ids, context: int = DEFAULT_CONTEXT, stride: int = DEFAULT_STRIDE,
               batch_size: int = 8, device=None, progress=None) -> Perplexity:
    """Sliding-window perplexity of a causal LM (``model(input_ids).logits``) on one token stream.

    Returns ``Perplexity(ppl, tokens, nll, context, stride, windows)``; ``tokens`` is the number of
    tokens scored (len(token_ids) - 1). Log-probabilities are taken in fp32 and summed in fp64.
    """
    import torch

    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().cpu()
    windows = sliding_windows(int(ids.numel()), int(context), int(stride))
    dev = torch.device(device) if device is not None else _device_of(model)
    total, count = 0.0, 0
    # windows of one length go together (all but maybe the last have length `context`)
    groups = {}
    for w in windows:
        groups.setdefault(w[1] - w[0], []).append(w)
    done = 0
    with torch.inference_mode():
        for length, ws in groups.items():
            for i in range(0, len(ws), max(1, int(batch_size))):
                batch = ws[i:i + batch_size]
                x = torch.stack([ids[b:e] for b, e, _ in batch]).to(dev)
                out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                nll = -logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, length-1]: target j+1
                pos = torch.arange(1, length, device=dev).unsqueeze(0)  # target positions in the window
                first = torch.tensor([f - b for b, _, f in batch], device=dev).unsqueeze(1)
                mask = pos >= first
                total += float(nll[mask].double().sum())
                count += int(mask.sum())
                done += len(batch)
                if progress:
                    progress(done, len(windows))
    assert count == ids.numel() - 1, (count, ids.numel())
    nll_mean = total / count
    return Perplexity(ppl=math.exp(nll_mean), tokens=count, nll=nll_mean, context=int(context),
                      stride=int(stride), windows=len(windows))


def load_test_tokens(tokenizer, split: str = "test", max_tokens: Optional[int] = None):
    """The held-out split as one token stream (``<s> doc </s>`` per document, documents sorted by
    path), from the corpus cache or the carried prepared data; a LongTensor."""
    import torch

    if tokenizer is None:
        raise QCompileError("no tokenizer to encode the test split with (the model or artifact has no tokenizer files)")
    docs = C.read_split(split)
    ids = torch.tensor(C.encode_documents(tokenizer, docs), dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max(2, int(max_tokens))]
    return ids


def trained_model_dir() -> Path:
    return C.cache_root() / "models" / TRAINED_NAME


def missing_model_error(path: Path) -> QCompileError:
    return QCompileError(f"the trained model is not in {path}; produce it with {PRODUCE_COMMAND}")


def is_artifact(path: Path) -> bool:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        with open(manifest) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "artifact_version" in data


def resolve_model_path(path: Optional[PathLike] = None) -> Tuple[Path, str]:
    """(directory, kind) with kind "artifact" or "model"; ``path=None`` is the trained small model
    in the cache. A one-line QCompileError (saying how to make it) when it is not there."""
    p = Path(path) if path is not None else trained_model_dir()
    if is_artifact(p):
        return p, "artifact"
    if (p / "config.json").is_file():
        return p, "model"
    if path is None or p.name == TRAINED_NAME:
        raise missing_model_error(p)
    if not p.is_dir():
        raise QCompileError(f"{p} does not exist; pass a transformers model directory or a qcompile artifact")
    raise QCompileError(f"{p} is neither a model directory (no config.json) nor a qcompile artifact (no manifest.json)")


def load_for_eval(path: Optional[PathLike] = None, device=None):
    """(model, tokenizer, kind) for a transformers model directory (kind "model", loaded in fp16 on
    CUDA and fp32 on the CPU, as qcompile.load runs artifacts) or a qcompile artifact (kind
    "artifact", through qcompile.load); ``path=None`` is the trained small model in the cache."""
    import torch

    p, kind = resolve_model_path(path)
    if kind == "artifact":
        import qcompile

        model = qcompile.load(p, device=device)
        return model, getattr(model, "qcompile_tokenizer", None), kind
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .build import quiet_transformers

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    try:
        with quiet_transformers():
            try:
                model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
            except TypeError:  # transformers < 4.56
                model = AutoModelForCausalLM.from_pretrained(str(p), torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise QCompileError(f"cannot load the model in {p}: {' '.join(str(err).split())}") from None
    model.to(dev).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as err:
        raise QCompileError(f"cannot load the tokenizer of {p}: {' '.join(str(err).split())}") from None
    return model, tokenizer, kind


def eval_ppl(path: Optional[PathLike] = None, context: int = DEFAULT_CONTEXT, stride: int = DEFAULT_STRIDE,
             device=None, batch_size: int = 8, max_tokens: Optional[int] = None, split: str = "test",
             progress=None) -> dict:
    """Perplexity of a model directory or artifact on the corpus's held-out split.

    Returns a dict: ppl, nll, tokens, windows, context, stride, split, path, kind ("model" or
    "artifact"), device, corpus (package, version, split sha256), seconds. ``format_result`` makes
    it one line."""
    t0 = time.time()
    resolve_model_path(path)  # fail early, before loading anything: the model, then the corpus
    corpus_dir = C.find_corpus(split)
    model, tokenizer, kind = load_for_eval(path, device)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and context > max_pos:
        raise QCompileError(f"context {context} is longer than the model's {max_pos} positions; pass a smaller context")
    ids = load_test_tokens(tokenizer, split, max_tokens)
    result = perplexity(model, ids, context, stride, batch_size=batch_size, progress=progress)
    manifest = C.read_manifest(corpus_dir)
    out = asdict(result)
    out.update({
        "split": split, "path": str(Path(path) if path is not None else trained_model_dir()), "kind": kind,
        "device": str(_device_of(model)),
        "corpus": {"package": manifest.get("package"), "version": manifest.get("version"),
                   "split_sha256": manifest["splits"][split]["sha256"]},
        "truncated_to": max_tokens, "seconds": round(time.time() - t0, 2),
    })
    return out


def format_result(r: dict) -> str:
    corpus = r.get("corpus") or {}
    cut = f", first {r['truncated_to']:,} tokens" if r.get("truncated_to") else ""
    return (f"ppl {r['ppl']:.3f} on {r['tokens']:,} {r['split']} tokens of {corpus.get('package')} "
            f"{corpus.get('version')}{cut} (context {r['context']}, stride {r['stride']}, {r['kind']} on "
            f"{r['device']}, {r['seconds']:.1f} s)")
