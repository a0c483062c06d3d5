"""Quantized checkpoints: what ``qcompile quantize`` writes and ``qcompile build`` reads.

A checkpoint is a directory (safetensors + JSON only, never pickle)::

    config.json                  the model config plus a ``quantization_config`` block (below)
    model.safetensors            the unquantized tensors (embeddings, norms, lm_head) in fp16
    layers/layer_000.safetensors one file per decoder layer: the packed tensors of its linears as
                                 ``<module path>.<tensor>`` (e.g. ``model.layers.0.self_attn.q_proj.qweight``,
                                 ``...q_proj.SU``), their biases as ``<module path>.bias``, and in the
                                 safetensors metadata (key "qcompile", JSON) the layer index, the
                                 settings sha256 and each linear's format, shape, tensors and meta
    tokenizer files              copied from the model directory

``quantization_config``::

    {"quant_method": "qcompile", "checkpoint_version": 1, "format": "int4-g128", "rht": bool,
     "ldlq": bool, "seed": int, "sigma": float, "calibration": {...} or null,
     "source_path": <model directory or null>, "source_sha256": <sha256 of the source weights>,
     "settings_sha256": <sha256 of the settings above>, "complete": bool, "num_layers": int,
     "layers": {name: {"shape": [N, K], "bits_per_weight": float, "proxy_loss": float or null}},
     "bits_per_weight": float, "files": {relative path: sha256}}

Every layer file is written to a temporary name and renamed into place once the whole layer is
quantized, so a layer file either is complete or does not exist; ``config.json`` is written first
with ``"complete": false`` (that is what lets an interrupted run resume) and rewritten last with
the per-layer summary and the sha256 of every file, which ``load_checkpoint`` verifies.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional, Union

from ..errors import QCompileError
from ..jsonio import atomic_write_bytes, read_json_object

CHECKPOINT_VERSION = 1
CONFIG = "config.json"
UNQUANTIZED = "model.safetensors"
LAYERS_DIR = "layers"
QUANT_METHOD = "qcompile"
LAYER_METADATA_KEY = "qcompile"
# keys of quantization_config that define what the checkpoint holds (a resumed run must match them)
SETTING_KEYS = ("format", "rht", "ldlq", "seed", "sigma", "calibration", "source_sha256")

PathLike = Union[str, os.PathLike]
REQUANTIZE = "rerun qcompile quantize with the same settings to rewrite it"


def layer_file(index: int) -> str:
    """Path of decoder layer ``index``'s file, relative to the checkpoint directory."""
    return f"{LAYERS_DIR}/layer_{int(index):03d}.safetensors"


def settings_sha256(settings: dict) -> str:
    return hashlib.sha256(json.dumps({k: settings.get(k) for k in SETTING_KEYS}, sort_keys=True)
                          .encode()).hexdigest()


def completion_fields(out: Path, weights, num_layers: int) -> dict:
    """The quantization_config fields of a finished checkpoint in ``out``: per-linear shape, measured
    bits per weight and proxy loss (``weights``: (path, QuantizedWeight) in model order), the overall
    bits per weight, and the sha256 of every data file."""
    layers, bits, count = {}, 0.0, 0
    for path, qw in weights:
        n, k = qw.shape
        loss = qw.meta.get("proxy_loss")
        layers[path] = {"shape": [n, k], "bits_per_weight": round(qw.bits_per_weight, 6),
                        "proxy_loss": None if loss is None else float(loss)}
        bits += qw.bits_per_weight * n * k
        count += n * k
    files = {rel: sha256_file(Path(out) / rel) for rel in [UNQUANTIZED] + [layer_file(i) for i in range(num_layers)]}
    return {"complete": True, "bits_per_weight": round(bits / count, 6), "layers": layers, "files": files}


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- small I/O helpers ------------------------------------------------------------------------------
def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def atomic_save_safetensors(path: Path, tensors: dict, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def clean_temporaries(directory: Path) -> None:
    """Remove temporary files an interrupted writer left (``.<name>.tmp-*``)."""
    for d in (directory, directory / LAYERS_DIR):
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and ".tmp-" in p.name and p.is_file():
                    p.unlink()


# --- config ------------------------------------------------------------------------------------------
def read_config(path: PathLike) -> Optional[dict]:
    """config.json of a directory as a dict, or None when there is none; QCompileError when it
    cannot be parsed."""
    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        return None
    return read_json_object(cfg)


def is_checkpoint(path: PathLike) -> bool:
    """True when ``path`` is a qcompile quantized checkpoint (complete or not). Built artifacts
    (which also carry a qcompile quantization_config) are not checkpoints."""
    p = Path(path)
    if not p.is_dir() or (p / "manifest.json").is_file():
        return False
    try:
        raw = read_config(p)
    except QCompileError:
        return False
    q = (raw or {}).get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD and "checkpoint_version" in q


def read_checkpoint_config(path: PathLike, require_complete: bool = True) -> dict:
    """The checkpoint's config.json (with its quantization_config), validated."""
    p = Path(path)
    if not p.is_dir():
        raise QCompileError(f"checkpoint directory {p} does not exist")
    raw = read_config(p)
    if raw is None:
        raise QCompileError(f"{p} is not a qcompile checkpoint (no {CONFIG}); make one with qcompile quantize")
    q = raw.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD or "checkpoint_version" not in q:
        raise QCompileError(f"{p} is not a qcompile checkpoint (its {CONFIG} has no qcompile quantization_config); "
                            f"make one with qcompile quantize")
    if q["checkpoint_version"] != CHECKPOINT_VERSION:
        raise QCompileError(f"checkpoint {p} has version {q['checkpoint_version']}, this qcompile reads version "
                            f"{CHECKPOINT_VERSION}; requantize the model with qcompile quantize")
    for key in SETTING_KEYS + ("num_layers",):
        if key not in q:
            raise QCompileError(f"checkpoint {p} {CONFIG} has no quantization_config[{key!r}]; it is damaged, "
                                f"requantize the model with qcompile quantize")
    if require_complete and not q.get("complete"):
        have = len(existing_layer_files(p, int(q["num_layers"])))
        raise QCompileError(f"checkpoint {p} is incomplete ({have} of {q['num_layers']} layers written); rerun "
                            f"qcompile quantize with the same settings and output directory to finish it")
    return raw


def existing_layer_files(path: PathLike, num_layers: int) -> Dict[int, Path]:
    p = Path(path)
    return {i: p / layer_file(i) for i in range(num_layers) if (p / layer_file(i)).is_file()}


def model_config_without_quantization(raw: dict, where: PathLike):
    """A transformers config from a config.json dict, without the quantization_config block
    (transformers would look for a quantizer named 'qcompile')."""
    from transformers import AutoConfig

    raw = dict(raw)
    raw.pop("quantization_config", None)
    model_type = raw.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **raw)
    except Exception as err:  # transformers raises many kinds for a bad config
        raise QCompileError(f"{Path(where) / CONFIG} is not a valid {model_type} config "
                            f"({' '.join(str(err).split())})") from None


# --- layer files -------------------------------------------------------------------------------------
def write_layer_file(directory: PathLike, index: int, entries: dict, settings_digest: str) -> Path:
    """Atomically write decoder layer ``index``: ``entries`` = {module path: (QuantizedWeight, bias
    or None)}. Returns the file's path."""
    import torch

    tensors, modules = {}, {}
    for path, (qw, bias) in entries.items():
        for name, t in qw.tensors.items():
            tensors[f"{path}.{name}"] = t.detach().to("cpu").contiguous()
        if bias is not None:
            tensors[f"{path}.bias"] = bias.detach().to("cpu", torch.float32).contiguous()
        modules[path] = {"format": qw.format, "shape": [int(d) for d in qw.shape], "meta": qw.meta,
                         "tensors": list(qw.tensors), "bias": bias is not None}
    # one metadata key: safetensors writes the metadata map in hash order, so several keys would
    # make the bytes differ between identical runs
    metadata = {LAYER_METADATA_KEY: json.dumps({"checkpoint_version": CHECKPOINT_VERSION, "layer": int(index),
                                                "settings_sha256": settings_digest, "modules": modules},
                                               sort_keys=True)}
    out = Path(directory) / layer_file(index)
    atomic_save_safetensors(out, tensors, metadata)
    return out


def read_layer_file(path: PathLike, index: Optional[int] = None, settings_digest: Optional[str] = None,
                    device="cpu") -> dict:
    """{module path: (QuantizedWeight, bias or None)} of one layer file, checked against its own
    metadata and the formats; QCompileError when it is damaged or from other settings."""
    from safetensors import SafetensorError, safe_open

    from ..formats import QuantizedWeight
    from ..formats import get as get_format

    path = Path(path)
    damaged = f"checkpoint file {path} is damaged or half-written"
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise QCompileError(f"{damaged} ({' '.join(str(err).split())[:200]}); delete it and {REQUANTIZE}") from None
    try:
        info = json.loads(meta[LAYER_METADATA_KEY])
        modules = info["modules"]
        if info["checkpoint_version"] != CHECKPOINT_VERSION or not isinstance(modules, dict):
            raise ValueError("bad version")
    except (KeyError, ValueError, TypeError):
        raise QCompileError(f"{damaged} (no qcompile layer metadata); delete it and {REQUANTIZE}") from None
    if index is not None and info.get("layer") != int(index):
        raise QCompileError(f"{damaged} (it holds layer {info.get('layer')}, not {index}); delete it and {REQUANTIZE}")
    if settings_digest is not None and info.get("settings_sha256") != settings_digest:
        raise QCompileError(f"checkpoint file {path} was written with other quantization settings than its "
                            f"{CONFIG}; delete it and {REQUANTIZE}")
    out = {}
    for mpath, info in modules.items():
        try:
            fmt = get_format(info["format"])
            names = list(info["tensors"])
            qw = QuantizedWeight(fmt.name, tuple(int(d) for d in info["shape"]),
                                 {name: tensors.pop(f"{mpath}.{name}") for name in names}, dict(info["meta"]))
            fmt.check_qweight(qw)
            bias = tensors.pop(f"{mpath}.bias") if info.get("bias") else None
        except (KeyError, TypeError, ValueError) as err:
            raise QCompileError(f"{damaged} (module {mpath}: {err}); delete it and {REQUANTIZE}") from None
        except QCompileError as err:
            raise QCompileError(f"{damaged} (module {mpath}: {err}); delete it and {REQUANTIZE}") from None
        out[mpath] = (qw, bias)
    if tensors:
        raise QCompileError(f"{damaged} (unexpected tensors {sorted(tensors)[:3]}); delete it and {REQUANTIZE}")
    return out


# --- whole checkpoints -----------------------------------------------------------------------------
def load_checkpoint(path: PathLike, device="cpu", verify: bool = True):
    """(quantized, unquantized, config) of a complete checkpoint.

    ``quantized``: {module path: QuantizedWeight}; ``unquantized``: {state-dict name: tensor}, the
    embeddings, norms, lm_head and the biases of the quantized linears (``<module path>.bias``);
    ``config``: the config.json dict with its quantization_config. ``verify`` checks every file
    against the sha256 recorded in config.json.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path).absolute()
    raw = read_checkpoint_config(p)
    q = raw["quantization_config"]
    files = q.get("files")
    if not isinstance(files, dict) or UNQUANTIZED not in files:
        raise QCompileError(f"checkpoint {p} {CONFIG} lists no files; it is damaged, requantize the model")
    num_layers = int(q["num_layers"])
    for i in range(num_layers):
        if layer_file(i) not in files:
            raise QCompileError(f"checkpoint {p} {CONFIG} does not list {layer_file(i)}; it is damaged, "
                                f"requantize the model")
    for rel, digest in files.items():
        fpath = p / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise QCompileError(f"checkpoint {p} lists a file outside it ({rel!r}); it is damaged")
        if not fpath.is_file():
            raise QCompileError(f"checkpoint file {rel} is missing from {p}; {REQUANTIZE}")
        if verify and sha256_file(fpath) != digest:
            raise QCompileError(f"checkpoint file {rel} in {p} is corrupted or was modified (sha256 mismatch); "
                                f"delete it and {REQUANTIZE}")
    quantized, unquantized = {}, {}
    for i in range(num_layers):
        for mpath, (qw, bias) in read_layer_file(p / layer_file(i), i, q.get("settings_sha256"), device).items():
            if qw.format != q["format"]:
                raise QCompileError(f"checkpoint layer {mpath} is {qw.format}, not the checkpoint's {q['format']}; "
                                    f"it is damaged, requantize the model")
            quantized[mpath] = qw
            if bias is not None:
                unquantized[f"{mpath}.bias"] = bias
    try:
        unquantized.update(load_file(str(p / UNQUANTIZED), device=str(device)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise QCompileError(f"checkpoint file {p / UNQUANTIZED} is damaged ({' '.join(str(err).split())[:200]}); "
                            f"{REQUANTIZE}") from None
    return quantized, unquantized, raw


def dequantized_model(path: PathLike, dtype=None, device=None):
    """The checkpoint as a plain transformers model: every quantized linear holds
    ``format.dequantize`` of its stored weight (RHT undone), the other tensors as stored (fp16
    values). ``dtype``: default float16 on CUDA, float32 elsewhere. Attached: ``qcompile_tokenizer``
    (None without tokenizer files) and ``qcompile_checkpoint`` (the quantization_config)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..formats import get as get_format
    from .artifact import assign_state, load_tokenizer
    from .build import quiet_transformers

    p = Path(path).absolute()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    quantized, state, raw = load_checkpoint(p)
    config = model_config_without_quantization(raw, p)
    with torch.device("meta"), quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    for mpath, qw in quantized.items():
        state[f"{mpath}.weight"] = get_format(qw.format).dequantize(qw)
    assign_state(model, state, config, dtype, set(model.state_dict()), f"checkpoint {p}", "requantize the model")
    model.to(dev).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    model.qcompile_tokenizer = load_tokenizer(p)
    model.qcompile_checkpoint = raw["quantization_config"]
    return model
