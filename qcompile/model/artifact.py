"""Loading a built artifact (see qcompile.model.build) as a transformers model that runs its kernels.

Checks before anything runs: the manifest is there and readable, every file matches its sha256,
the artifact's target fits this machine (a cuda-sm_XX artifact needs an sm_XX GPU; llvm runs on
the CPU) and the TVM version it was compiled with is the installed one.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Optional, Union

from ..errors import QCompileError
from ..jsonio import read_json_object
from .build import (ARTIFACT_VERSION, CONFIG, KERNELS_LIB, MANIFEST, WEIGHTS, PathLike, quiet_transformers,
                    sha256_file)

REBUILD = "rebuild it with qcompile build"


def read_manifest(path: PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise QCompileError(f"artifact directory {path} does not exist; build one with qcompile build")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise QCompileError(f"{path} is not a qcompile artifact (no {MANIFEST}); {REBUILD}")
    manifest = read_json_object(mpath, REBUILD)
    if not isinstance(manifest.get("files"), dict):
        raise QCompileError(f"artifact manifest {mpath} is malformed; {REBUILD}")
    version = manifest.get("artifact_version")
    if version != ARTIFACT_VERSION:
        raise QCompileError(f"artifact {path} has format version {version}, this qcompile reads version "
                            f"{ARTIFACT_VERSION}; {REBUILD}")
    for key in ("target", "buckets", "layers", "tvm_version"):
        if key not in manifest:
            raise QCompileError(f"artifact manifest {mpath} has no {key!r}; {REBUILD}")
    return manifest


def verify_files(path: PathLike, manifest: dict) -> None:
    """Every listed file exists and matches its sha256; the files loading needs are listed."""
    path = Path(path)
    files = manifest["files"]
    for name in (KERNELS_LIB, WEIGHTS, CONFIG):
        if name not in files:
            raise QCompileError(f"artifact manifest of {path} does not list {name}; {REBUILD}")
    for name, entry in files.items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise QCompileError(f"artifact manifest of {path} lists a file outside the artifact ({name!r}); {REBUILD}")
        fpath = path / name
        if not fpath.is_file():
            raise QCompileError(f"artifact file {name} is missing from {path}; {REBUILD}")
        if sha256_file(fpath) != entry.get("sha256"):
            raise QCompileError(f"artifact file {name} is corrupted or was modified (sha256 mismatch); {REBUILD}")


def check_target(target_key: str, device=None):
    """The torch device an artifact built for ``target_key`` runs on here; QCompileError if none."""
    import torch

    if target_key == "llvm":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type != "cpu":
            raise QCompileError(f"artifact was built for the CPU (llvm) and cannot run on {dev}; "
                                f"load it with device='cpu' or rebuild it with --target auto on the GPU machine")
        return dev
    match = re.fullmatch(r"cuda-(sm_\d+)", str(target_key))
    if not match:
        raise QCompileError(f"artifact has an unknown target {target_key!r}; {REBUILD}")
    arch = match.group(1)
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        raise QCompileError(f"artifact was built for {arch} GPUs and cannot run on {dev}; "
                            f"rebuild it with --target llvm to run on the CPU")
    if not torch.cuda.is_available():
        raise QCompileError(f"artifact was built for {arch} GPUs but this machine has no CUDA GPU; "
                            f"rebuild it with --target llvm to run on the CPU")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    local = f"sm_{major}{minor}"
    if local != arch:
        raise QCompileError(f"artifact was built for {arch} GPUs but the GPU here is "
                            f"{torch.cuda.get_device_name(index)} ({local}); rebuild it with --target auto on this machine")
    return torch.device("cuda", index)


def check_tvm_version(manifest: dict) -> None:
    import tvm

    built, here = str(manifest["tvm_version"]), str(tvm.__version__)
    if built.split(".")[:2] != here.split(".")[:2]:
        raise QCompileError(f"artifact kernels were compiled with TVM {built} but TVM {here} is installed; {REBUILD}")


def load_artifact(path: PathLike, device: Optional[Union[str, "torch.device"]] = None):
    """A transformers causal LM (eval mode, on ``device``) whose decoder linears run the artifact's
    kernels. Attached: ``qcompile_manifest``, ``qcompile_tokenizer`` (None if the artifact has no
    tokenizer) and ``qcompile_path``."""
    import torch

    from ..formats import get as get_format
    from ..kernels.library import KernelSpec
    from ..runtime.linear import register_kernel_module
    from ..runtime.module import load_kernels

    path = Path(path).absolute()
    manifest = read_manifest(path)
    verify_files(path, manifest)
    dev = check_target(manifest["target"], device)
    check_tvm_version(manifest)
    for layer in manifest["layers"]:
        get_format(layer["format"])  # an artifact of a format this qcompile does not know: clear error

    kernels = manifest.get("kernels") or {}
    fatbin, source = kernels.get("fatbin"), kernels.get("source")
    module = load_kernels(str(path / KERNELS_LIB), str(path / fatbin) if fatbin else None,
                          str(path / source) if source else None)
    decode_min_m = manifest.get("decode_min_m") or {}  # (older artifacts: no decode route)
    try:
        handle = register_kernel_module(module, manifest["buckets"], dev.type, decode_min_m)
    except ValueError as err:
        raise QCompileError(f"artifact manifest of {path} is malformed ({err}); {REBUILD}") from None
    for layer in manifest["layers"]:  # every kernel the manifest names is in the module
        n, k = layer["shape"]
        names = [KernelSpec(layer["format"], n, k, m).name for m in manifest["buckets"]]
        # RHT layers of newer artifacts also list their Hadamard transform kernels (older ones
        # list none and run the transforms in torch)
        if layer["format"] in decode_min_m:
            from ..kernels.decode import DecodeSpec

            names.append(DecodeSpec(layer["format"], n, k).name)
        for name in names + list(layer.get("rht_kernels", ())):
            if not module.implements_function(name):
                raise QCompileError(f"artifact kernels.so has no kernel {name}; {REBUILD}")

    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = assemble_model(path, manifest, handle, dtype)
    model.to(dev).eval()
    model.qcompile_manifest = manifest
    model.qcompile_path = str(path)
    model.qcompile_tokenizer = load_tokenizer(path)
    return model


def model_config(path: Path):
    """The transformers config of the artifact, without the quantization_config block (transformers
    would look for a quantizer named 'qcompile')."""
    from transformers import AutoConfig

    with open(path / CONFIG) as f:
        raw = json.load(f)
    raw.pop("quantization_config", None)
    model_type = raw.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **raw)
    except Exception as err:  # transformers raises many kinds for a bad config
        raise QCompileError(f"artifact {CONFIG} is not a valid {model_type} config ({err}); {REBUILD}") from None


def assemble_model(path: Path, manifest: dict, handle: int, dtype):
    """Build the model skeleton on the meta device (no memory for weights that are replaced), put
    QuantLinear in place of every quantized linear (for a fused layer, a FusedQuantLinear and its
    parts: qcompile.runtime.fused), then assign the stored tensors."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ..formats import QuantizedWeight
    from ..formats import get as get_format
    from ..formats.quipsharp_io import FUSED_PARTS
    from ..runtime.fused import FusedQuantLinear, check_fused_meta, install_fused
    from ..runtime.linear import QuantLinear

    config = model_config(path)
    with torch.device("meta"), quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    state = load_file(str(path / WEIGHTS), device="cpu")

    for layer in manifest["layers"]:
        name = layer["name"]
        n, k = layer["shape"]
        fmt = get_format(layer["format"])
        try:
            tensors = {t: state.pop(f"{name}.{t}") for t in fmt.stored_specs(n, k, bool(layer.get("rht")))}
        except KeyError as err:
            raise QCompileError(f"artifact {WEIGHTS} has no tensor {err.args[0]}; {REBUILD}") from None
        bias = state.pop(f"{name}.bias", None)
        fused = layer.get("fused")
        if fused is not None:  # QuIP# qkv_proj / upgate_proj: one weight for several of the model's linears
            where = f"artifact layer {name}"
            parts, sizes, scales = check_fused_meta(fused, n, where)
            meta = {"fused": {"parts": parts, "sizes": sizes, "fuse_scales": scales}}
            try:
                qlinear = FusedQuantLinear(QuantizedWeight(fmt.name, (n, k), tensors, meta), handle, bias=bias)
            except (QCompileError, ValueError) as err:
                raise QCompileError(f"{where} has bad tensors ({err}); {REBUILD}") from None
            install_fused(model, name, qlinear, where)
            continue
        try:
            qlinear = QuantLinear(QuantizedWeight(fmt.name, (n, k), tensors), handle, bias=bias)
        except (QCompileError, ValueError) as err:
            raise QCompileError(f"artifact layer {name} has bad tensors ({err}); {REBUILD}") from None
        if name.rpartition(".")[2] in FUSED_PARTS and not has_submodule(model, name):
            raise QCompileError(f"artifact layer {name} is a fused QuIP# linear but the manifest does not list its "
                                f"parts (built by an older qcompile); {REBUILD}")
        set_submodule(model, name, qlinear)

    expected = {key for key in model.state_dict() if not is_quantlinear_key(model, key)}
    assign_state(model, state, config, dtype, expected, f"artifact {WEIGHTS}", REBUILD)
    for p in model.parameters():
        p.requires_grad_(False)

    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


def is_quantlinear_key(model, key: str) -> bool:
    from ..runtime.linear import QuantLinear

    owner = key.rsplit(".", 1)[0]
    try:
        return isinstance(model.get_submodule(owner), QuantLinear)
    except AttributeError:
        return False


def has_submodule(model, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def set_submodule(model, name: str, module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise QCompileError(f"artifact layer {name} is not in the {model.config.model_type} model; {REBUILD}")
    setattr(parent, child, module)


def assign_state(model, state: dict, config, dtype, expected: set, source: str, remedy: str) -> None:
    """Load ``state`` into a model built on the meta device: it must hold exactly the ``expected``
    keys (a tied lm_head may be absent); floats are cast to ``dtype``; tied embeddings are re-tied
    (assign=True loads two stored copies as separate tensors) and RoPE buffers rebuilt."""
    tied = getattr(config, "tie_word_embeddings", False)
    missing = sorted(expected - set(state) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise QCompileError(f"{source} does not match its {CONFIG} (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); {remedy}")
    state = {key: t.to(dtype) if t.is_floating_point() else t for key, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    materialize_meta_buffers(model)


def materialize_meta_buffers(model) -> None:
    """Non-persistent buffers (RoPE inverse frequencies) are not in the checkpoint: rebuild the
    modules that own them on the CPU, as transformers' own loader does."""
    for name, module in list(model.named_modules()):
        own_meta = [b for b in module.buffers(recurse=False) if b.is_meta]
        if not own_meta:
            continue
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "config"):
            set_submodule(model, name, type(module)(module.config))
        else:
            raise QCompileError(f"artifact model has uninitialised buffers in {name}; {REBUILD}")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise QCompileError(f"artifact model tensor {name} was not loaded; {REBUILD}")


def load_tokenizer(path: Path):
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # the model still runs on token ids without its tokenizer
        warnings.warn(f"could not load the tokenizer of {path}: {err}")
        return None
