"""``qc.quantize_model`` / ``qcompile quantize``: a transformers model -> a quantized checkpoint.

Layer by layer: when Hessians are needed (LDLQ, on by default) the calibration tokens are run
through the model one decoder layer at a time (qcompile.quant.hessian.iter_layer_hessians: one
Hessian per distinct linear input, q/k/v and gate/up share theirs), every linear of the layer is
quantized with the format (RHT and LDLQ as asked, a seed per linear derived from ``seed`` and its
module path), and the layer's file is written atomically (qcompile.model.checkpoint). A run that
stops part-way resumes from the layers already written when it is started again with the same
settings and output directory: Hessians only depend on the original weights and the calibration
tokens, so the resumed result is bit-identical to an uninterrupted run.

Calibration (when ``calibration`` is None): ``n_calibration`` windows of ``context`` tokens at
seeded random offsets of the trained model's corpus TRAIN split: the prepared token file
(``.models-data/tinyllama/train.u16.xz``) when the model's tokenizer is the one it was made with,
else the corpus text (qcompile.model.corpus) encoded with the model's tokenizer; without either,
random token ids from a seeded generator (with a warning: fine for tests, useless for quality).
"""
from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from ..errors import QCompileError
from ..formats import Format
from ..formats import get as get_format
from ..formats.base import subseed
from . import checkpoint as ckpt

PathLike = Union[str, os.PathLike]

DEFAULT_CALIBRATION_SAMPLES = 128
DEFAULT_CALIBRATION_CONTEXT = 512
DEFAULT_SIGMA = 1e-2
CALIBRATION_BATCH = 8
PREPARED_DATA = "tinyllama"  # the trained model's prepared token data under the models-data root


class SettingsMismatch(QCompileError):
    """The output directory holds a checkpoint made with other settings."""


# --- the source model -----------------------------------------------------------------------------
def _load_source(model_or_dir, say):
    """(model, model_dir or None, raw config dict) of a directory, an nn.Module or None (default)."""
    from torch import nn

    from .build import SUPPORTED_MODEL_TYPES, load_hf_model, read_model_config

    if isinstance(model_or_dir, nn.Module):
        model = model_or_dir
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise QCompileError(f"{type(model).__name__} is not a supported transformers causal LM; qcompile "
                                f"quantizes Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)})")
        if getattr(config, "quantization_config", None):
            raise QCompileError(f"{type(model).__name__} is already quantized; quantize the unquantized model")
        raw = config.to_diff_dict()
        raw.pop("_name_or_path", None)
        name = getattr(config, "_name_or_path", "") or ""
        model_dir = Path(name) if name and (Path(name) / "config.json").is_file() else None
        return model, model_dir, raw
    if model_or_dir is None:
        from .default import find_default_model

        model_or_dir = find_default_model()
        say(f"no model given: using the default model {model_or_dir}")
    model_dir = Path(model_or_dir).absolute()
    if ckpt.is_checkpoint(model_dir):
        raise QCompileError(f"{model_dir} is already a quantized checkpoint; quantize the unquantized model, or "
                            f"compile this one with qcompile build")
    raw = read_model_config(model_dir)
    say(f"loading {raw['model_type']} model from {model_dir}")
    return load_hf_model(model_dir), model_dir, raw


def weights_sha256(model) -> str:
    """Fingerprint of a model's weights: sha256 over (name, dtype, shape, bytes) of its state dict."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def layer_linears(model) -> List[Tuple[str, List[Tuple[str, str, object]]]]:
    """Per decoder layer: (layer prefix, [(module path, name inside the layer, nn.Linear)])."""
    from torch import nn

    from ..quant.hessian import decoder_backbone
    from .build import decoder_linears

    _, layers = decoder_backbone(model)
    prefix_of = {id(m): name for name, m in model.named_modules()}
    out = []
    for layer in layers:
        prefix = prefix_of[id(layer)]
        out.append((prefix, [(f"{prefix}.{name}", name, m) for name, m in layer.named_modules()
                             if isinstance(m, nn.Linear)]))
    found = {p for _, lins in out for p, _, _ in lins}
    expected = {p for p, _ in decoder_linears(model)}
    if found != expected:
        raise QCompileError(f"{type(model).__name__}: the decoder layers' linears ({len(found)}) are not the ones "
                            f"qcompile build compiles ({len(expected)}); this architecture is not supported")
    return out


# --- calibration -----------------------------------------------------------------------------------
def _tokens_sha256(batches) -> str:
    import torch

    h = hashlib.sha256()
    for b in batches:
        h.update(b.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_user_calibration(calibration, vocab_size: Optional[int]):
    import torch

    if isinstance(calibration, torch.Tensor):
        calibration = [calibration] if calibration.dim() == 2 else [calibration]
    try:
        batches = list(calibration)
    except TypeError:
        raise QCompileError(f"calibration must be a list of token-id tensors, got {type(calibration).__name__}") from None
    if not batches:
        raise QCompileError("the calibration set is empty: give at least one tensor of token ids "
                            "(or calibration=None for the default calibration text)")
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) \
                or b.dim() not in (1, 2) or b.numel() == 0:
            what = f"{b.dtype} {list(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
            raise QCompileError(f"calibration sample {i} must be a non-empty integer tensor of token ids [seq] or "
                                f"[batch, seq], got {what}")
        b = b.to(torch.int64).cpu()
        if b.dim() == 1:
            b = b[None]
        lo, hi = int(b.min()), int(b.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            raise QCompileError(f"calibration sample {i} has token id {lo if lo < 0 else hi} outside the model's "
                                f"vocabulary [0, {vocab_size})")
        out.append(b)
    info = {"source": "user", "samples": sum(b.shape[0] for b in out), "tokens": sum(b.numel() for b in out),
            "sha256": _tokens_sha256(out)}
    return out, info


def _tokenizer_of(model_dir: Optional[Path], tokenizer=None):
    if tokenizer is not None or model_dir is None:
        return tokenizer
    if not ((model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file()):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:  # no usable tokenizer: calibration falls back to random ids
        return None


def _prepared_train_tokens(tokenizer):
    """(LongTensor, info) of the prepared TRAIN token file when it was made with this tokenizer,
    else None."""
    import numpy as np
    import torch

    from . import corpus as C

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    data_dir = C.models_data_root() / PREPARED_DATA
    try:
        with open(data_dir / "data.json") as f:
            info = json.load(f)
        want_tok = info["tokenizer"]["sha256"]
        split = info["splits"]["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if hashlib.sha256(backend.to_str(pretty=False).encode("utf-8")).hexdigest() != want_tok:
        return None
    try:
        raw = lzma.decompress((data_dir / "train.u16.xz").read_bytes())
    except (OSError, lzma.LZMAError):
        return None
    if hashlib.sha256(raw).hexdigest() != split.get("sha256"):
        return None
    ids = torch.from_numpy(np.frombuffer(raw, dtype="<u2").astype(np.int64))
    corpus = info.get("corpus") or {}
    return ids, {"source": "corpus", "corpus": "python-docs", "split": "train", "via": "prepared tokens",
                 "package": corpus.get("package"), "version": corpus.get("version"),
                 "split_sha256": split.get("sha256")}


def _corpus_train_tokens(tokenizer):
    """(LongTensor, info) of the corpus train split encoded with ``tokenizer``, else None."""
    import torch

    from . import corpus as C

    read_split = getattr(C, "read_split", None)
    encode = getattr(C, "encode_documents", None)
    if read_split is None or encode is None:
        return None
    try:
        directory = C.find_corpus("train")
        docs = read_split("train", directory)
        manifest = C.read_manifest(directory)
    except (QCompileError, OSError, ValueError, KeyError):
        return None
    ids = torch.tensor(encode(tokenizer, docs), dtype=torch.long)
    return ids, {"source": "corpus", "corpus": getattr(C, "CORPUS_NAME", "python-docs"), "split": "train",
                 "via": "text", "package": manifest.get("package"), "version": manifest.get("version"),
                 "split_sha256": ((manifest.get("splits") or {}).get("train") or {}).get("sha256")}


def default_calibration(model_dir: Optional[Path], vocab_size: int, n_samples: int, context: int, seed: int,
                        tokenizer=None):
    """(batches [[b, context] LongTensors], info) from the default calibration source (see the module doc)."""
    import torch

    gen = torch.Generator().manual_seed(subseed(seed, "calibration"))
    tok = _tokenizer_of(model_dir, tokenizer)
    stream = None
    if tok is not None:
        stream = _prepared_train_tokens(tok) or _corpus_train_tokens(tok)
    if stream is not None and stream[0].numel() > context:
        ids, info = stream
        starts = torch.randint(0, ids.numel() - context + 1, (n_samples,), generator=gen)
        rows = torch.stack([ids[s:s + context] for s in starts.tolist()])
        if int(rows.max()) >= vocab_size:
            raise QCompileError(f"the calibration text encodes to token ids beyond the model's vocabulary "
                                f"({int(rows.max())} >= {vocab_size}); the tokenizer does not match the model")
    else:
        why = "the model directory has no tokenizer" if tok is None else \
            "the corpus train split is not available (make it with python3 -m models.tinyllama.prepare)"
        warnings.warn(f"calibrating on RANDOM token ids: {why}; Hessians from random tokens make LDLQ "
                      f"no better than round-to-nearest. Pass calibration= token ids of real text.", stacklevel=3)
        rows = torch.randint(0, vocab_size, (n_samples, context), generator=gen)
        info = {"source": "random"}
    batches = list(torch.split(rows, CALIBRATION_BATCH))
    info = dict(info, samples=int(n_samples), context=int(context), tokens=int(rows.numel()), seed=int(seed),
                sha256=_tokens_sha256(batches))
    return batches, info


# --- progress --------------------------------------------------------------------------------------
class _Progress:
    """A tqdm bar over layers when tqdm is installed and progress=True, else plain lines."""

    def __init__(self, progress, total: int, initial: int):
        self.say: Callable[[str], None] = lambda msg: None
        self.bar = None
        if callable(progress):
            self.say = progress
        elif progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="layer", desc="quantizing", leave=True)
                self.say = self.bar.write
            except ImportError:
                self.say = print

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _say_fn(progress) -> Callable[[str], None]:
    if callable(progress):
        return progress
    return print if progress else (lambda msg: None)


# --- the output directory ------------------------------------------------------------------------
def _prepare_out_dir(out: Path, overwrite: bool, model_dir: Optional[Path]) -> Optional[dict]:
    """Check ``out`` before loading anything. Returns the existing checkpoint config (to resume)
    or None; removes an existing checkpoint when ``overwrite``."""
    if model_dir is not None and out.resolve() == model_dir.resolve():
        raise QCompileError(f"the output directory is the model directory {model_dir}; choose another -o")
    if not out.exists():
        return None
    if not out.is_dir():
        raise QCompileError(f"output path {out} exists and is not a directory; choose another -o")
    if ckpt.is_checkpoint(out):
        if overwrite:
            shutil.rmtree(out)
            return None
        return ckpt.read_config(out)
    if any(out.iterdir()):
        raise QCompileError(f"output directory {out} exists and is not a qcompile checkpoint; refusing to write "
                            f"into it, choose another -o")
    return None


def _settings_mismatch(old: dict, new: dict) -> List[str]:
    diffs = []
    for key in ckpt.SETTING_KEYS:
        a, b = old.get(key), new.get(key)
        if a != b:
            if key == "calibration":
                a, b = "other calibration tokens", "these"
            elif key == "source_sha256":
                a, b = "another model", "this one"
            diffs.append(f"{key} {a} vs {b}")
    return diffs


# --- the main entry point --------------------------------------------------------------------------
def quantize_model(model_or_dir=None, format: Union[str, Format] = "int4-g128", calibration=None,
                   out_dir: Optional[PathLike] = None, *, rht: bool = False, ldlq: Optional[bool] = None,
                   seed: int = 0, sigma: float = DEFAULT_SIGMA,
                   n_calibration: int = DEFAULT_CALIBRATION_SAMPLES, context: Optional[int] = None,
                   device=None, progress: Union[bool, Callable[[str], None]] = True, overwrite: bool = False,
                   capture_hessians: Optional[bool] = None, tokenizer=None) -> Path:
    """Quantize every decoder linear of a transformers Llama-family model and write a checkpoint.

    ``model_or_dir``: a model directory, an nn.Module (a transformers causal LM) or None (the
    default model). ``format``: a format name (``qc.formats.names()``). ``calibration``: a list
    of token-id tensors ([seq] or [batch, seq]), or None for the default calibration source (see
    the module doc). ``out_dir``: the checkpoint directory (default: under the qcompile cache,
    named after the model and settings). ``rht``: randomized Hadamard incoherence processing.
    ``ldlq``: Hessian-aware rounding (default on; off = round to nearest, which needs no
    calibration). ``seed``: drives the RHT signs, the calibration windows and random fallbacks.
    ``sigma``: Hessian damping (relative ridge). ``n_calibration`` / ``context``: the default
    calibration's windows (context default: min(512, max positions)). ``device``: where layers
    run and are quantized (default: CUDA if available). ``progress``: True (a tqdm bar or plain
    lines), False, or a callable taking lines. ``overwrite``: replace an existing checkpoint with
    other settings instead of refusing. ``capture_hessians``: compute Hessians even without LDLQ
    (to record proxy losses of round-to-nearest); default = ``ldlq``. ``tokenizer``: for a module
    whose directory is unknown, the tokenizer to save and to encode the calibration text with.

    Returns the checkpoint directory. Running again with the same settings and ``out_dir``
    resumes an interrupted run (or returns at once when it is complete).
    """
    import torch

    from .build import TOKENIZER_FILES, check_layer_shape, quiet_transformers

    say = _say_fn(progress)
    fmt = get_format(format)
    rht = bool(rht) or fmt.always_rht  # the checkpoint must say what the weights are
    ldlq = True if ldlq is None else bool(ldlq)
    need_hessians = ldlq if capture_hessians is None else (bool(capture_hessians) or ldlq)
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise QCompileError(f"sigma must be a finite non-negative number, got {sigma}")
    if int(n_calibration) < 1:
        raise QCompileError(f"the number of calibration samples must be at least 1, got {n_calibration}")
    if calibration is not None and not isinstance(calibration, torch.Tensor) and hasattr(calibration, "__len__") \
            and len(calibration) == 0:
        raise QCompileError("the calibration set is empty: give at least one tensor of token ids "
                            "(or calibration=None for the default calibration text)")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # cheap checks of the output directory first, then the model
    src_dir_hint = None if model_or_dir is None or isinstance(model_or_dir, torch.nn.Module) \
        else Path(model_or_dir).absolute()
    if out_dir is not None:  # refuses a foreign directory; deletes nothing yet
        _prepare_out_dir(Path(out_dir).absolute(), False, src_dir_hint)

    model, model_dir, raw_config = _load_source(model_or_dir, say)
    structure = layer_linears(model)
    for _, linears in structure:
        for path, _, lin in linears:
            check_layer_shape(fmt, path, int(lin.out_features), int(lin.in_features))
            if rht:
                from ..quant.hadamard import hadamard_factor

                for size, side in ((int(lin.in_features), "in_features"), (int(lin.out_features), "out_features")):
                    try:
                        hadamard_factor(size)
                    except QCompileError as err:
                        raise QCompileError(f"layer {path}: cannot apply the RHT to {side}={size}: {err}") from None
            if not bool(torch.isfinite(lin.weight).all()):
                raise QCompileError(f"layer {path}: {fmt.name}: weight contains NaN or Inf; fix the model weights first")
    vocab_size = int(getattr(model.config, "vocab_size", 0)) or None
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if context is None:
        context = min(DEFAULT_CALIBRATION_CONTEXT, int(max_pos)) if max_pos else DEFAULT_CALIBRATION_CONTEXT
    context = int(context)
    if context < 2 or (max_pos and context > int(max_pos)):
        raise QCompileError(f"calibration context must be between 2 and the model's {max_pos} positions, got {context}")

    batches, calib_info = None, None
    if calibration is not None and not need_hessians:
        say("round to nearest needs no calibration: the calibration set is not used")
    if need_hessians:
        if calibration is not None:
            batches, calib_info = _check_user_calibration(calibration, vocab_size)
        else:
            batches, calib_info = default_calibration(model_dir, vocab_size, int(n_calibration), context, seed,
                                                      tokenizer)
        where = calib_info["source"]
        if where == "corpus":
            where = f"{calib_info.get('corpus')} {calib_info.get('split')} split, {calib_info.get('via')}"
        say(f"calibration: {calib_info['samples']} samples, {calib_info['tokens']:,} tokens ({where})")

    settings = {"format": fmt.name, "rht": bool(rht), "ldlq": ldlq, "seed": int(seed), "sigma": float(sigma),
                "calibration": calib_info, "source_sha256": weights_sha256(model)}
    digest = ckpt.settings_sha256(settings)
    num_layers = len(structure)

    if out_dir is None:
        from .default import cache_root

        name = model_dir.name if model_dir is not None else str(raw_config.get("model_type", "model"))
        tag = fmt.name + ("-rht" if rht else "") + ("-ldlq" if ldlq else "-rtn")
        out_dir = cache_root() / "checkpoints" / f"{name}-{tag}-seed{int(seed)}-{digest[:8]}"
    out = Path(out_dir).absolute()
    existing = _prepare_out_dir(out, overwrite, model_dir)
    if existing is not None:
        q = existing.get("quantization_config") or {}
        diffs = _settings_mismatch(q, settings)
        if diffs or q.get("num_layers") != num_layers:
            raise SettingsMismatch(f"{out} holds a checkpoint quantized with other settings ({'; '.join(diffs) or 'layers'}); "
                                f"use a new output directory or pass --overwrite (overwrite=True) to replace it")
        if q.get("complete"):
            ckpt.load_checkpoint(out)  # verifies every file
            say(f"{out} is already complete")
            return out
    out.mkdir(parents=True, exist_ok=True)
    ckpt.clean_temporaries(out)

    qcfg = {"quant_method": ckpt.QUANT_METHOD, "checkpoint_version": ckpt.CHECKPOINT_VERSION, **settings,
            "source_path": str(model_dir) if model_dir is not None else None, "settings_sha256": digest,
            "complete": False, "num_layers": num_layers}
    config = dict(raw_config)
    config["quantization_config"] = qcfg
    if existing is None:
        ckpt.atomic_write_json(out / ckpt.CONFIG, config)

    # layers already written (resume): each must load and match
    done: Dict[int, dict] = {}
    for i, fpath in ckpt.existing_layer_files(out, num_layers).items():
        try:
            entries = ckpt.read_layer_file(fpath, i, digest)
        except QCompileError as err:
            say(f"layer {i}: the existing file is unusable ({err}); quantizing it again")
            fpath.unlink()
            continue
        if set(entries) != {p for p, _, _ in structure[i][1]}:
            say(f"layer {i}: the existing file holds other modules; quantizing it again")
            fpath.unlink()
            continue
        done[i] = entries
    if done:
        say(f"resuming: {len(done)} of {num_layers} layers already in {out}")
    todo = [i for i in range(num_layers) if i not in done]

    what = fmt.name + (" + RHT" if rht else "") + (" + LDLQ" if ldlq else " (round to nearest)")
    say(f"quantizing {sum(len(l) for _, l in structure)} linears in {num_layers} layers to {what} on {dev}")
    bar = _Progress(progress, num_layers, len(done))
    try:
        if need_hessians and todo:
            from ..quant.hessian import iter_layer_hessians

            source = ((lh.index, lh.hessians) for lh in iter_layer_hessians(model, batches, dev, layers=todo))
        else:
            source = ((i, None) for i in todo)
        for i, hessians in source:
            t0 = time.time()
            entries = _quantize_layer(fmt, structure[i][1], hessians, dev, rht, ldlq, seed, sigma)
            ckpt.write_layer_file(out, i, entries, digest)
            done[i] = entries
            losses = "  ".join(f"{name.rsplit('.', 1)[-1]} {_fmt_loss(qw.meta.get('proxy_loss'))}"
                               for (qw, _), (_, name, _) in zip(entries.values(), structure[i][1]))
            bar.say(f"layer {i + 1}/{num_layers}  proxy loss: {losses}  ({time.time() - t0:.1f} s)")
            bar.update()
    finally:
        bar.close()

    # the unquantized tensors, tokenizer files, then the final config
    quantized_names = {f"{p}.{t}" for _, lins in structure for p, _, _ in lins for t in ("weight", "bias")}
    unquantized = {}
    for name, t in model.state_dict().items():
        if name in quantized_names:
            continue
        t = t.detach().to("cpu")
        unquantized[name] = (t.to(torch.float16) if t.is_floating_point() else t).clone().contiguous()
    ckpt.atomic_save_safetensors(out / ckpt.UNQUANTIZED, unquantized, {"format": "pt"})  # one key: stable bytes
    if model_dir is not None:
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, out / name)
    elif tokenizer is not None:
        with quiet_transformers():
            tokenizer.save_pretrained(str(out))

    # model order, whether the layer was resumed or not
    in_order = ((path, done[i][path][0]) for i in range(num_layers) for path, _, _ in structure[i][1])
    qcfg.update(ckpt.completion_fields(out, in_order, num_layers))
    ckpt.atomic_write_json(out / ckpt.CONFIG, config)
    say(f"wrote {out} ({qcfg['bits_per_weight']:.3f} bits per weight)")
    return out


def _fmt_loss(loss) -> str:
    return "-" if loss is None else f"{float(loss):.4g}"


def _quantize_layer(fmt: Format, linears, hessians, dev, rht: bool, ldlq: bool, seed: int, sigma: float):
    """{module path: (QuantizedWeight on the CPU, bias or None)} of one decoder layer."""
    import torch

    entries = {}
    cache: Dict[int, torch.Tensor] = {}  # one Hessian per distinct input (q/k/v, gate/up share)
    with torch.no_grad():
        for path, name, lin in linears:
            H = None
            if hessians is not None:
                acc = hessians.get(name)
                if acc is None:
                    raise QCompileError(f"layer {path} got no calibration inputs; the calibration never reached it")
                if id(acc) not in cache:
                    cache[id(acc)] = acc.hessian().to(dev)
                H = cache[id(acc)]
            W = lin.weight.detach().to(dev, torch.float32)
            try:
                qw = fmt.quantize(W, hessian=H, seed=subseed(seed, path), rht=rht, ldlq=ldlq and H is not None,
                                  sigma=sigma)
            except QCompileError as err:
                raise QCompileError(f"layer {path}: {err}") from None
            bias = None if lin.bias is None else lin.bias.detach().to("cpu", torch.float32)
            entries[path] = (qw.to("cpu"), bias)
    return entries
