"""`qcompile build`: a Hugging Face Llama-family model -> a self-contained artifact directory.

Artifact files (see DESIGN.md):
  kernels.so          every (layer shape x M bucket) kernel of the model in one TVM module, and for
                      RHT weights the Hadamard transform kernels of every (side, size, M bucket)
  kernels.cu/.fatbin  CUDA targets: the kernel source and its compiled fatbin (loading needs no compiler)
  model.safetensors   packed weights as ``<linear path>.<tensor name>`` + unquantized tensors in fp16
  config.json         the model config with a ``quantization_config`` block; tokenizer files beside it
  manifest.json       written last: versions, target, layers and kernels, sha256 of every other file

Everything is written into a temporary directory beside out_dir and renamed into place at the end;
any failure removes it, so there is never a partial artifact.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import QCompileError
from ..jsonio import read_json_object
from .checkpoint import sha256_file  # noqa: F401  (also used by artifact.py)
from ..formats import Format
from ..formats import get as get_format
from ..kernels.hadamard import RhtSpec
from ..kernels.decode import DecodeSpec
from ..kernels.library import KernelSpec, default_buckets, default_decode_min_m, rht_kernel_specs
from ..kernels.target import TargetInfo, parse_target

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ARTIFACT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
KERNELS_LIB, KERNELS_FATBIN, KERNELS_SOURCE = "kernels.so", "kernels.fatbin", "kernels.cu"
# copied from the model directory when present (generation_config.json is not a tokenizer file,
# but generate() needs it just as much)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")

PathLike = Union[str, os.PathLike]


def build(model_dir: Optional[PathLike], format: Union[str, Format, None], target: str, out_dir: PathLike,
          buckets: Optional[Sequence[int]] = None, progress: Optional[Callable[[str], None]] = print,
          overwrite: bool = False, records: Union[PathLike, bool, None] = True,
          warn: Optional[Callable[[str], None]] = None, decode_min_m: Optional[int] = None) -> Path:
    """Quantize every decoder linear of the model with ``format``, compile its kernels for ``target``
    and write the artifact to ``out_dir``. ``model_dir=None`` builds the default model. A checkpoint
    written by ``qcompile quantize`` (qcompile.model.checkpoint) is built from its stored weights
    (RHT sign vectors included); its format is used, and ``format`` may be None or must match it.

    ``records``: tuning records to take GEMV configs from (qcompile.tune.records): True = the
    default directory (``$QCOMPILE_SCHEDULES``, else the repository's ``schedules/``), a path, or
    False/None for the default configs only. They apply to CUDA targets that name their GPU
    (``h100``) or are the local GPU; build never tunes. ``warn`` receives the one-line warning of a
    damaged records file (default: ``warnings.warn``). ``decode_min_m``: the batch size from which
    layers decode their weight and multiply with cuBLAS (qcompile.kernels.decode; None = the format's
    default, ``default_decode_min_m``; 0 = never, the fused kernels at every M). Returns out_dir."""
    from .checkpoint import is_checkpoint

    say = progress or (lambda msg: None)
    out = Path(out_dir).absolute()
    fmt = get_format(format) if format is not None else None
    tinfo = parse_target(target)
    buckets = None if buckets is None else parse_buckets(buckets)
    if decode_min_m is not None and (isinstance(decode_min_m, bool) or not isinstance(decode_min_m, int)
                                     or decode_min_m < 0):
        raise QCompileError(f"decode_min_m must be a batch size >= 1, or 0 for no decode route; got {decode_min_m!r}")
    check_out_dir(out, overwrite)
    config_for, records_note = tuned_configs(tinfo, records, warn)
    if model_dir is None:
        from .default import find_default_model

        model_dir = find_default_model()
        say(f"no model given: using the default model {model_dir}")
    model_dir = Path(model_dir).absolute()
    if model_dir.resolve() == out.resolve() or model_dir.resolve() in out.resolve().parents:
        raise QCompileError(f"output directory {out} is inside the model directory {model_dir}; choose another -o")
    # the format, model type and every layer shape are checked here, as qcompile tune derives them
    fmt, layers = model_layers(model_dir, fmt)
    if is_checkpoint(model_dir):
        raw_config, unquantized, quantized = load_checkpoint_for_build(model_dir, fmt, say)
        loaded = {path: (qw.format, *qw.shape) for path, (qw, _) in quantized.items()}
        if loaded != layers:
            raise QCompileError(f"checkpoint {model_dir}: the loaded layers differ from the layer files' metadata; "
                                f"it is damaged, requantize the model")
    else:
        raw_config = read_model_config(model_dir)
        say(f"loading {raw_config['model_type']} model from {model_dir}")
        unquantized = load_hf_model(model_dir)
        say(f"quantizing {len(layers)} linears to {fmt.name}")
        quantized = quantize_linears(unquantized, fmt, list(layers))
    shapes = distinct_shapes(layers)
    if buckets is None:
        buckets = default_buckets(fmt, tinfo.kind)
    specs = [KernelSpec(f, n, k, m) for (f, n, k) in shapes for m in buckets]
    rht = rht_kernel_specs(sorted({qw.shape for qw, _ in quantized.values() if qw.rht}), buckets)
    decode_at = {} if decode_min_m == 0 else {
        f: decode_min_m or default_decode_min_m(f, buckets) for f in sorted({f for (f, _, _) in shapes})}
    decode = [DecodeSpec(f, n, k) for (f, n, k) in shapes if f in decode_at]
    say(f"compiling {len(specs)} kernels ({len(shapes)} shapes x {len(buckets)} batch buckets) for {tinfo.key}"
        + (f", {len(rht)} RHT kernels" if rht else "")
        + (f", {len(decode)} decode kernels (decode + cuBLAS from M = "
           f"{', '.join(str(m) for m in sorted(set(decode_at.values())))})" if decode else ""))
    tuned = tuned_kernels(specs, config_for)
    if records_note and config_for is None:
        say(f"default schedules: {records_note}")
    elif records_note:
        say(f"tuned schedules for {len(tuned)} of {len(specs)} kernels, default schedules for the rest "
            f"({records_note})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        kernel_files = compile_kernels(specs, tinfo, tmp, config_for, rht, decode)
        write_weights(tmp / WEIGHTS, unquantized, quantized)
        write_config(tmp / CONFIG, raw_config, fmt, quantized)
        copied = copy_tokenizer_files(model_dir, tmp)
        write_manifest(tmp, fmt=fmt, target=tinfo, buckets=buckets, model_type=raw_config["model_type"],
                       quantized=quantized, kernel_files=kernel_files,
                       files=kernel_files + [WEIGHTS, CONFIG] + copied, tuned=tuned, decode_min_m=decode_at)
        install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out}")
    return out


def load_checkpoint_for_build(path: Path, fmt: Format, say):
    """(raw config, unquantized tensors, {linear path: (QuantizedWeight, bias)}) of a quantized
    checkpoint whose format and layers ``model_layers`` has already checked (``fmt``: its format);
    its config keeps the checkpoint's settings under quantization_config."""
    from .checkpoint import load_checkpoint

    quantized, unquantized, raw = load_checkpoint(path)
    qcfg = raw["quantization_config"]
    say(f"using the {fmt.name} checkpoint {path} ({'RHT, ' if qcfg.get('rht') else ''}"
        f"{'LDLQ' if qcfg.get('ldlq') else 'round to nearest'}, {len(quantized)} linears)")
    entries = {p: (qw, unquantized.pop(f"{p}.bias", None)) for p, qw in quantized.items()}
    return raw, unquantized, entries


# --- the layers and kernel shapes of a model ---------------------------------------------------------
LayerShapes = Dict[str, Tuple[str, int, int]]  # linear path -> (format name, N, K)


def kernel_shapes(model_dir: PathLike, format: Union[str, Format, None] = None) -> List[Tuple[str, int, int]]:
    """The distinct (format, N, K) whose kernels ``qcompile build model_dir --format format`` compiles
    (one per M bucket each), sorted; what ``qcompile tune MODEL_OR_CHECKPOINT`` tunes. Cheap: reads
    configs and file headers only. Same rules as build (see ``model_layers``)."""
    return distinct_shapes(model_layers(model_dir, format)[1])


def distinct_shapes(layers: LayerShapes) -> List[Tuple[str, int, int]]:
    return sorted(set(layers.values()))


def model_layers(model_dir: PathLike, format: Union[str, Format, None] = None) -> Tuple[Format, LayerShapes]:
    """(format, {linear path: (format name, N, K)}) of every decoder linear ``qcompile build``
    quantizes (a Hugging Face model directory: ``format`` is required; shapes from its config, on
    meta tensors) or takes quantized (a ``qcompile quantize`` checkpoint: its format, which
    ``format`` may repeat; each layer's format and shape from its layer file's metadata, fused
    layers as stored). Every layer is checked against its format; QCompileError (one line) for
    anything build would refuse on the same grounds."""
    from .checkpoint import is_checkpoint

    path = Path(model_dir).absolute()
    fmt = get_format(format) if format is not None else None
    if (path / MANIFEST).is_file():
        raise QCompileError(f"{path} is a built qcompile artifact; give the model directory or checkpoint it was "
                            f"built from")
    if is_checkpoint(path):
        fmt, layers = checkpoint_layers(path, fmt)
    else:
        if fmt is None:
            raise QCompileError(f"{path} is not a quantized checkpoint, so --format is required "
                                f"(e.g. --format int4-g128); or quantize it first with qcompile quantize")
        read_model_config(path)
        layers = {p: (fmt.name, n, k) for p, (n, k) in decoder_linear_shapes(path).items()}
    for p, (f, n, k) in layers.items():
        check_layer_shape(get_format(f), p, n, k)
    return fmt, layers


def checkpoint_layers(path: Path, fmt: Optional[Format]) -> Tuple[Format, LayerShapes]:
    """A complete checkpoint's format and layers, from its config and the metadata of its layer files
    (no tensors are read; ``load_checkpoint`` checks the same metadata against the tensors)."""
    from safetensors import SafetensorError, safe_open

    from .checkpoint import LAYER_METADATA_KEY, layer_file, read_checkpoint_config

    raw = read_checkpoint_config(path)
    q = raw["quantization_config"]
    ck_fmt = get_format(q["format"])
    if fmt is not None and fmt.name != ck_fmt.name:
        raise QCompileError(f"checkpoint {path} is quantized to {ck_fmt.name}, not {fmt.name}; drop --format or "
                            f"requantize the model with qcompile quantize --format {fmt.name}")
    if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise QCompileError(f"checkpoint {path} holds a {raw.get('model_type')!r} model; qcompile build supports "
                            f"Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)})")
    layers: LayerShapes = {}
    for i in range(int(q["num_layers"])):
        file = path / layer_file(i)
        if not file.is_file():
            raise QCompileError(f"checkpoint file {layer_file(i)} is missing from {path}; rerun qcompile quantize "
                                f"with the same settings to rewrite it")
        try:
            with safe_open(str(file), "pt") as f:
                modules = json.loads((f.metadata() or {})[LAYER_METADATA_KEY])["modules"]
            for mpath, info in modules.items():
                n, k = (int(d) for d in info["shape"])
                layers[mpath] = (str(info["format"]), n, k)
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, AttributeError):
            raise QCompileError(f"checkpoint file {file} is damaged (no readable qcompile layer metadata); "
                                f"delete it and rerun qcompile quantize with the same settings") from None
    for mpath, (f, _, _) in layers.items():
        if f != ck_fmt.name:
            raise QCompileError(f"checkpoint layer {mpath} is {f}, not the checkpoint's {ck_fmt.name}; it is "
                                f"damaged, requantize the model")
    if not layers:
        raise QCompileError(f"checkpoint {path} holds no quantized layers; requantize the model")
    return ck_fmt, layers


# --- validation -------------------------------------------------------------------------------------
def parse_buckets(buckets) -> Tuple[int, ...]:
    """Buckets from a sequence of ints or a string "1,4,16"; sorted and distinct."""
    from ..runtime.dispatch import check_buckets

    try:
        if isinstance(buckets, str):
            buckets = [int(b) for b in buckets.split(",") if b.strip()]
        return check_buckets(buckets)
    except (TypeError, ValueError):
        raise QCompileError(f"invalid M buckets {buckets!r}; give positive integers, e.g. 1,4,16,64,256") from None


def check_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise QCompileError(f"output path {out} exists and is not a directory; choose another -o")
    if not overwrite:
        raise QCompileError(f"output directory {out} already exists; pass --overwrite to replace it or choose another -o")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise QCompileError(f"output directory {out} is not a qcompile artifact (no {MANIFEST}); "
                            f"refusing to replace it, choose another -o")


def read_model_config(model_dir: Path) -> dict:
    """config.json of a supported transformers model directory, as a dict."""
    if not model_dir.exists():
        raise QCompileError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise QCompileError(f"model path {model_dir} is not a directory; give a Hugging Face model directory")
    cfg_path = model_dir / CONFIG
    if not cfg_path.is_file():
        raise QCompileError(f"{model_dir} has no {CONFIG}; give a Hugging Face transformers model directory")
    raw = read_json_object(cfg_path, "give a Hugging Face transformers model directory")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QCompileError(f"{model_dir} holds a {model_type!r} model; qcompile build supports "
                            f"Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)})")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise QCompileError(f"{model_dir} is already quantized ({method}); build from the unquantized model")
    return raw


def decoder_linear_shapes(model_dir: Path) -> Dict[str, Tuple[int, int]]:
    """{linear path: (out, in)} of every decoder linear, from the config alone (meta tensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except Exception as err:  # transformers raises many kinds for a bad config
        raise QCompileError(f"cannot parse {model_dir / CONFIG}: {one_line(err)}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, AttributeError) as err:  # an inconsistent config
        raise QCompileError(f"cannot build a {config.model_type} model from {model_dir / CONFIG}: "
                            f"{one_line(err)}") from None
    shapes = {path: (int(m.out_features), int(m.in_features)) for path, m in decoder_linears(model)}
    if not shapes:
        raise QCompileError(f"found no decoder linear layers in the {config.model_type} model at {model_dir}")
    return shapes


def decoder_linears(model):
    """(path, nn.Linear) of every linear inside the decoder layers: attention q/k/v/o and MLP
    gate/up/down. lm_head and the embeddings stay unquantized."""
    from torch import nn

    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and path.startswith("model.layers."):
            yield path, module


def check_layer_shape(fmt: Format, path: str, n: int, k: int) -> None:
    try:
        fmt.check_shape(n, k)
    except QCompileError as err:
        raise QCompileError(f"layer {path} ({n}x{k}) cannot be stored as {fmt.name}: {err}") from None


# --- the steps ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_transformers():
    """No progress bars from transformers while we print our own progress."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_hf_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            try:
                model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
            except TypeError:  # transformers < 4.56 names it torch_dtype
                model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise QCompileError(f"cannot load the model weights from {model_dir}: {one_line(err)}") from None
    return model.eval()


def quantize_linears(model, fmt: Format, paths: List[str]):
    """{path: (QuantizedWeight, bias or None)} for the given linears (weights on the CPU)."""
    import torch

    modules = dict(model.named_modules())
    out = {}
    with torch.no_grad():
        for path in paths:
            linear = modules[path]
            try:
                qw = fmt.quantize(linear.weight.detach().float().cpu())
            except QCompileError as err:
                raise QCompileError(f"layer {path}: {err}") from None
            bias = None if linear.bias is None else linear.bias.detach().cpu()
            out[path] = (qw, bias)
    return out


def tuned_configs(target: TargetInfo, records, warn) -> Tuple[Optional[Callable], Optional[str]]:
    """(lookup spec -> tuned config or None: a GemvConfig or TensorCoreConfig, the family of the spec's
    bucket; which records it reads) for a build; (None, None)
    without records. An explicit records directory that does not exist is an error."""
    from ..tune.records import TuningRecords, default_records_dir, records_gpu

    if records is None or records is False:
        return None, None
    root = default_records_dir() if records is True else Path(records)
    if root is None:
        return None, None
    if records is not True and not root.is_dir():
        raise QCompileError(f"tuning records directory {root} does not exist; give the directory that holds "
                            f"<gpu>/<format>.json (e.g. schedules) or leave --records out")
    gpu = records_gpu(target)
    if gpu is None:  # say so only when records were asked for by name
        return None, (None if records is True else
                      f"target {target.name} names no GPU, so no records apply; use e.g. --target h100")
    return TuningRecords(root, warn=warn).lookup(gpu), f"records for {gpu} in {root}"


def tuned_kernels(specs: List[KernelSpec], config_for) -> Dict[str, str]:
    """{kernel name: config key} of the kernels that get a tuned config (``space.config_key``: GEMV
    knobs ``rows=...`` or tensor-core knobs ``m_tile=...``)."""
    from ..tune.space import config_key

    tuned = {}
    for spec in specs:
        cfg = config_for(spec) if config_for is not None else None
        if cfg is not None:
            tuned[spec.name] = config_key(cfg)
    return tuned


def compile_kernels(specs: List[KernelSpec], target: TargetInfo, out_dir: Path,
                    config_for: Optional[Callable] = None, rht: Sequence[RhtSpec] = (),
                    decode: Sequence[DecodeSpec] = ()) -> List[str]:
    """Compile the matmul kernels, the RHT kernels (``rht``) and the decode kernels (``decode``) into
    one module; write its files."""
    from ..kernels import library

    try:
        executable = library.build(specs, target, config_for, rht=rht, decode=decode)
    except ValueError as err:  # a shape the kernel schedules cannot tile
        raise QCompileError(f"cannot compile the kernels for {target.key}: {one_line(err)}") from None
    return library.export(executable, target, str(out_dir))


def write_weights(path: Path, model, quantized) -> None:
    """Packed tensors as ``<path>.<tensor>`` (RHT sign vectors ``SU``/``SV`` included), biases and
    every unquantized tensor in fp16. ``model``: the source module, or a dict of its unquantized
    tensors (from a checkpoint)."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for lin_path, (qw, bias) in quantized.items():
        for name, t in qw.tensors.items():
            tensors[f"{lin_path}.{name}"] = t.detach().cpu().contiguous()
        if bias is not None:
            tensors[f"{lin_path}.bias"] = bias.to(torch.float16).contiguous()
    skip = {f"{p}.weight" for p in quantized} | {f"{p}.bias" for p in quantized}
    state = model if isinstance(model, dict) else model.state_dict()
    seen = set()  # storages already written: safetensors refuses shared tensors (tied embeddings)
    for name, t in state.items():
        if name in skip:
            continue
        t = t.detach().cpu().to(torch.float16 if t.is_floating_point() else t.dtype)
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "producer": "qcompile"})


def measured_bits_per_weight(quantized) -> float:
    bits = sum(qw.bits_per_weight * qw.shape[0] * qw.shape[1] for qw, _ in quantized.values())
    weights = sum(qw.shape[0] * qw.shape[1] for qw, _ in quantized.values())
    return bits / weights


def write_config(path: Path, raw_config: dict, fmt: Format, quantized) -> None:
    config = dict(raw_config)
    checkpoint = config.pop("quantization_config", None)
    config["quantization_config"] = {
        "quant_method": "qcompile",
        "format": fmt.name,
        "bits_per_weight": round(measured_bits_per_weight(quantized), 6),
        "rht": any(qw.rht for qw, _ in quantized.values()),
        "modules": list(quantized),
    }
    if checkpoint:  # built from a quantized checkpoint: keep how it was made
        config["quantization_config"]["checkpoint"] = {
            k: checkpoint.get(k) for k in ("format", "rht", "ldlq", "seed", "sigma", "calibration", "source_sha256",
                                           "settings_sha256")}
    write_json(path, config)


def copy_tokenizer_files(model_dir: Path, out_dir: Path) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = model_dir / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    return copied


def write_manifest(out_dir: Path, fmt: Format, target: TargetInfo, buckets, model_type: str, quantized,
                   kernel_files: List[str], files: List[str], tuned: Optional[Dict[str, str]] = None,
                   decode_min_m: Optional[Dict[str, int]] = None) -> None:
    import tvm

    from .. import __version__

    layers = []
    for path, (qw, bias) in quantized.items():
        n, k = qw.shape
        entry = {"name": path, "format": qw.format, "shape": [n, k], "bias": bias is not None,
                 "rht": qw.rht, "kernels": [KernelSpec(qw.format, n, k, m).name for m in buckets]}
        if qw.format in (decode_min_m or {}):  # the large-M route's decode-only kernel
            entry["decode_kernel"] = DecodeSpec(qw.format, n, k).name
        if qw.rht:  # the compiled RHT around the matmul: input side at K, output side at N
            entry["rht_kernels"] = [spec.name for spec in rht_kernel_specs([(n, k)], buckets)]
        if isinstance(qw.meta, dict) and qw.meta.get("fused"):  # QuIP# qkv/upgate: parts, sizes, fuse scales
            entry["fused"] = qw.meta["fused"]
        layers.append(entry)
    manifest = {
        "artifact_version": ARTIFACT_VERSION,
        "qcompile_version": __version__,
        "tvm_version": tvm.__version__,
        "target": target.key,
        "target_name": target.name,
        "format": fmt.name,
        "bits_per_weight": round(measured_bits_per_weight(quantized), 6),
        "model_type": model_type,
        "buckets": list(buckets),
        # format -> the M from which its layers run decode + cuBLAS ({}: fused kernels at every M)
        "decode_min_m": dict(decode_min_m or {}),
        "kernels": {"library": KERNELS_LIB,
                    "fatbin": KERNELS_FATBIN if KERNELS_FATBIN in kernel_files else None,
                    "source": KERNELS_SOURCE if KERNELS_SOURCE in kernel_files else None},
        "layers": layers,
        "tuned_kernels": dict(tuned or {}),  # kernel name -> key of the tuned config (GEMV or tensor-core)
        "files": {name: {"sha256": sha256_file(out_dir / name), "bytes": (out_dir / name).stat().st_size}
                  for name in files},
    }
    write_json(out_dir / MANIFEST, manifest)


def install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished artifact into place; an existing one is moved aside, then deleted."""
    check_out_dir(out, overwrite)  # again: something may have appeared while we compiled
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- helpers ------------------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."
