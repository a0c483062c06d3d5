"""Import and export of QuIP#-layout checkpoints (E8P12 / E8P12RVQ3B / E8P12RVQ4B).

Written from the layout facts in ../shared/reference/quipsharp.md §1.5, §1.8 and §5 (no reference
code). A QuIP# checkpoint is a transformers directory: ``config.json`` with a ``quip_params`` block,
safetensors weights (one file or shards with ``model.safetensors.index.json``; PyTorch ``.bin``
pickles are refused: qcompile never unpickles) and tokenizer files. Per quantized linear
``<path>``: ``Qidxs`` int64, ``SU`` fp16 [in], ``SV`` fp16 [out] (weight scale folded in),
``Wscale`` fp32 () (legacy, applied to SV at load), ``codebook_id`` int64 (), and for fused linears
``fuse_scales`` fp32 [parts].

Fused linears (``self_attn.qkv_proj`` = q,k,v and ``mlp.upgate_proj`` = up,gate, up first) are
kept fused: one QuantizedWeight over the concatenated output dim with
``meta["fused"] = {"parts": [...], "sizes": [...], "fuse_scales": [...]}``. Splitting them is
impossible without requantizing: the output-side RHT (U_m, SV) mixes all rows of the concatenated
dimension, so no part's weight is an E8P grid matrix in its own m_i-dimensional Hadamard basis.
The runtime (qcompile.runtime.fused; ``qcompile build`` lists the parts, sizes and fuse scales in the
artifact manifest) computes the fused product once and splits its output (then multiplies part i by
fuse_scales[i]); ``E8PFormat.dequantize`` applies the fuse scales, ``fold_fuse_scales`` folds them
into an fp16 SV for a runtime that does not know about parts (≤ 2^-11 relative rounding per row),
and ``split_dequantized`` gives the per-part float weights.

The reverse holds for export: the reference Llama model loads fused qkv/upgate, and per-linear
q/k/v (or up/gate) weights quantized with separate RHTs cannot be fused. ``quantize_fused``
quantizes parts the way the reference does (each part divided by its RMS → fuse_scales, one RHT over
the concatenation); ``export_quipsharp`` refuses unfused q/k/v/up/gate weights unless
``allow_unfused=True`` (then they are written per linear, a layout only a per-linear loader reads).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..errors import QCompileError
from .base import QuantizedWeight
from .base import get as get_format
from .e8p import (E8PFormat, e81b_from_reference, e81b_to_reference, e8p_from_reference, e8p_to_reference)

# codebook name -> our format, codebook_id, codebook_version, packsz (Qidxs int64 columns = in·... / 8 / packsz)
CODEBOOKS = {
    "E8P12": {"format": "e8p-2", "id": 7, "version": 1, "packsz": 4},
    "E8P12RVQ3B": {"format": "e8p-3", "id": 18, "version": 0, "packsz": 8 / 3},
    "E8P12RVQ4B": {"format": "e8p-4", "id": 17, "version": 1, "packsz": 2},
}
FORMAT_TO_CODEBOOK = {v["format"]: k for k, v in CODEBOOKS.items()}
ID_TO_CODEBOOK = {v["id"]: k for k, v in CODEBOOKS.items()}
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "upgate_proj": ("up_proj", "gate_proj")}
PART_TO_FUSED = {p: f for f, parts in FUSED_PARTS.items() for p in parts}
LINEAR_TENSORS = ("Qidxs", "SU", "SV", "Wscale", "codebook_id", "fuse_scales")
UNSUPPORTED_TENSORS = ("A", "B", "scaleWH")
# non-persistent in the reference, tolerated if a converter saved them: rebuilt from the shapes
IGNORED_TENSORS = ("had_left", "had_right", "had_left_T", "had_right_T", "K_left", "K_right")
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


# =============================================================================================
# one linear
# =============================================================================================
def qidxs_columns(fmt_name: str, k: int) -> int:
    """Columns of the reference int64 Qidxs for in_features k."""
    return {"e8p-2": k // 32, "e8p-4": k // 16, "e8p-3": 3 * k // 64}[fmt_name]


def to_reference_qidxs(qw: QuantizedWeight) -> torch.Tensor:
    """Our kernel tensors → the reference Qidxs int64 [N, …] (§1.5 tiles; RVQ halves side by side)."""
    parts = [e8p_to_reference(qw.tensors["qidxs"])]
    if qw.format == "e8p-4":
        parts.append(e8p_to_reference(qw.tensors["qidxs_resid"]))
    elif qw.format == "e8p-3":
        parts.append(e81b_to_reference(qw.tensors["qidxs_resid"]))
    return torch.cat(parts, dim=1).contiguous()


def from_reference_qidxs(fmt_name: str, qidxs: torch.Tensor, n: int, k: int, where: str = "Qidxs") -> Dict[str, torch.Tensor]:
    """The reference Qidxs int64 → our {qidxs, qidxs_resid} tensors (checked dtype and shape)."""
    want = (n, qidxs_columns(fmt_name, k))
    if not isinstance(qidxs, torch.Tensor) or qidxs.dtype != torch.int64 or tuple(qidxs.shape) != want:
        got = f"{str(qidxs.dtype).replace('torch.', '')}{list(qidxs.shape)}" if isinstance(qidxs, torch.Tensor) \
            else type(qidxs).__name__
        raise QCompileError(f"{where} must be int64{list(want)} for {FORMAT_TO_CODEBOOK[fmt_name]} with "
                            f"{n}x{k} weights, got {got}")
    q = qidxs.contiguous()
    out = {"qidxs": e8p_from_reference(q[:, :k // 32].contiguous())}
    if fmt_name == "e8p-4":
        out["qidxs_resid"] = e8p_from_reference(q[:, k // 32:].contiguous())
    elif fmt_name == "e8p-3":
        out["qidxs_resid"] = e81b_from_reference(q[:, k // 32:].contiguous())
    return out


def resid_scale_of(qw: QuantizedWeight) -> Optional[float]:
    """The residual divisor s of an RVQ weight (meta, checked against its fp16 1/s tensor)."""
    fmt = get_format(qw.format)
    if fmt.residual is None:
        return None
    r = qw.tensors["resid_inv_scale"].to(torch.float16).cpu()
    s = qw.meta.get("resid_scale") if isinstance(qw.meta, dict) else None
    if s is None:
        s = 1.0 / float(r[0])
    if not torch.equal(fmt.inv_scale16(float(s)), r):
        raise QCompileError(f"{qw.format} weight: meta resid_scale {s} does not match its resid_inv_scale "
                            f"tensor {float(r[0])}")
    return float(s)


def to_reference_linear(qw: QuantizedWeight) -> Dict[str, torch.Tensor]:
    """One QuantizedWeight → the reference tensors of its module (names without the module path)."""
    if qw.format not in FORMAT_TO_CODEBOOK:
        raise QCompileError(f"the QuIP# layout holds e8p-2/3/4 weights, not {qw.format!r}")
    fmt = get_format(qw.format)
    fmt.check_qweight(qw)
    cb = CODEBOOKS[FORMAT_TO_CODEBOOK[qw.format]]
    out = {"Qidxs": to_reference_qidxs(qw).cpu(),
           "SU": qw.tensors["SU"].to("cpu", torch.float16).contiguous(),
           "SV": qw.tensors["SV"].to("cpu", torch.float16).contiguous(),
           "Wscale": torch.tensor(1.0, dtype=torch.float32),
           "codebook_id": torch.tensor(cb["id"], dtype=torch.int64)}
    fused = qw.meta.get("fused") if isinstance(qw.meta, dict) else None
    if fused:
        out["fuse_scales"] = torch.tensor([float(f) for f in fused["fuse_scales"]], dtype=torch.float32)
    return out


def from_reference_linear(path: str, tensors: Dict[str, torch.Tensor], codebook: str,
                          resid_scale: Optional[float], part_sizes: Optional[Sequence[int]] = None,
                          part_names: Optional[Sequence[str]] = None) -> QuantizedWeight:
    """The reference tensors of one module (names without the path) → a QuantizedWeight of our format."""
    cb = CODEBOOKS[codebook]
    fmt: E8PFormat = get_format(cb["format"])
    for name in ("Qidxs", "SU", "SV", "codebook_id"):
        if name not in tensors:
            raise QCompileError(f"QuIP# linear {path} has no {name} tensor; the checkpoint is incomplete")
    for name in UNSUPPORTED_TENSORS:
        t = tensors.get(name)
        if t is not None and t.numel() > 0:
            raise QCompileError(f"QuIP# linear {path} has a {name} tensor (low-rank / rescale_WH models are not "
                                f"supported); use a checkpoint quantized without them")
    unknown = sorted(set(tensors) - set(LINEAR_TENSORS) - set(UNSUPPORTED_TENSORS) - set(IGNORED_TENSORS) - {"bias"})
    if unknown:
        raise QCompileError(f"QuIP# linear {path} has unknown tensors {unknown}; not a supported QuIP# checkpoint")
    cid = tensors["codebook_id"]
    if cid.numel() != 1 or cid.dtype.is_floating_point:
        raise QCompileError(f"QuIP# linear {path}: codebook_id must be an integer scalar, got {cid.dtype} {list(cid.shape)}")
    cid = int(cid.reshape(()).item())
    if cid not in ID_TO_CODEBOOK:
        raise QCompileError(f"QuIP# linear {path}: unknown codebook_id {cid}; supported: "
                            f"{', '.join(f'{i} ({c})' for i, c in sorted(ID_TO_CODEBOOK.items()))}")
    if ID_TO_CODEBOOK[cid] != codebook:
        raise QCompileError(f"QuIP# linear {path} has codebook_id {cid} ({ID_TO_CODEBOOK[cid]}), but config.json "
                            f"quip_params says {codebook}")
    SU, SV = tensors["SU"], tensors["SV"]
    for name, t in (("SU", SU), ("SV", SV)):
        if t.dim() != 1 or not t.dtype.is_floating_point:
            raise QCompileError(f"QuIP# linear {path}: {name} must be a floating-point vector, got "
                                f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}")
    n, k = SV.shape[0], SU.shape[0]
    try:
        fmt.check_shape(n, k)
    except QCompileError as err:
        raise QCompileError(f"QuIP# linear {path}: {err}") from None
    SU16 = SU.to(torch.float16)
    SV16 = SV.to(torch.float16)
    ws = tensors.get("Wscale")
    if ws is not None:
        if ws.numel() != 1 or not ws.dtype.is_floating_point:
            raise QCompileError(f"QuIP# linear {path}: Wscale must be a float scalar, got {ws.dtype} {list(ws.shape)}")
        if float(ws.reshape(())) != 1.0:  # legacy: the reference multiplies SV by it at load time (in fp16)
            SV16 = (SV16.to(torch.float32) * float(ws.reshape(()))).to(torch.float16)
    if not (torch.isfinite(SU16).all() and torch.isfinite(SV16).all()):
        raise QCompileError(f"QuIP# linear {path}: SU/SV contain NaN/Inf (or overflow fp16)")
    kernel = from_reference_qidxs(cb["format"], tensors["Qidxs"], n, k, where=f"QuIP# linear {path}: Qidxs")
    kernel.update(fmt.table_tensors(fmt.inv_scale16(resid_scale) if fmt.residual else None))
    kernel = {name: kernel[name] for name in fmt.tensor_specs(n, k)}  # the kernels' order
    meta: Dict[str, object] = {"codebook": codebook, "rht": True, "source": "quip-sharp"}
    if fmt.residual is not None:
        meta["resid_scale"] = float(resid_scale if resid_scale is not None else fmt.resid_scale)
    fs = tensors.get("fuse_scales")
    if fs is not None:
        if fs.dim() != 1 or not fs.dtype.is_floating_point:
            raise QCompileError(f"QuIP# linear {path}: fuse_scales must be a float vector, got {fs.dtype} {list(fs.shape)}")
        if part_sizes is None or len(part_sizes) != fs.shape[0] or sum(part_sizes) != n:
            raise QCompileError(f"QuIP# linear {path}: cannot split its {n} outputs into {fs.shape[0]} fused parts "
                                f"(sizes from config.json: {None if part_sizes is None else list(part_sizes)})")
        names = list(part_names) if part_names is not None else [f"part{i}" for i in range(len(part_sizes))]
        meta["fused"] = {"parts": names, "sizes": [int(s) for s in part_sizes],
                         "fuse_scales": [float(v) for v in fs.to(torch.float32)]}
    qw = QuantizedWeight(fmt.name, (n, k), {**kernel, "SU": SU16.contiguous(), "SV": SV16.contiguous()}, meta)
    fmt.check_qweight(qw)
    return qw


# =============================================================================================
# fused linears
# =============================================================================================
def quantize_fused(fmt_name: str, parts: Sequence[Tuple[str, torch.Tensor]], hessian: Optional[torch.Tensor] = None,
                   seed: int = 0, scale: Optional[float] = None, ldlq: Optional[bool] = None,
                   sigma: float = 1e-2) -> QuantizedWeight:
    """Quantize linears that share their input as one fused weight, like the reference's qkv/upgate:
    part i is divided by its RMS (→ fuse_scales[i]), the parts are concatenated along the output dim
    and quantized as one matrix with one RHT. ``parts``: [(name, W_i [N_i, K])], in the reference
    order (q, k, v / up, gate). meta["proxy_loss"] refers to the RMS-normalised concatenation."""
    fmt = get_format(fmt_name)
    if not isinstance(fmt, E8PFormat):
        raise QCompileError(f"fused QuIP# linears are e8p-2/3/4, not {fmt_name!r}")
    if not parts:
        raise QCompileError("quantize_fused needs at least one part")
    ks = {int(W.shape[-1]) for _, W in parts}
    if len(ks) != 1 or any(W.dim() != 2 for _, W in parts):
        raise QCompileError(f"fused parts must be 2-D with the same in_features, got {[list(W.shape) for _, W in parts]}")
    scales, normed = [], []
    for name, W in parts:
        rms = float(W.detach().to(torch.float64).pow(2).mean().sqrt())
        rms = float(torch.tensor(rms if rms > 0 else 1.0, dtype=torch.float32))
        scales.append(rms)
        normed.append(W.detach().to(torch.float32) / rms)
    qw = fmt.quantize(torch.cat(normed, dim=0), hessian=hessian, seed=seed, scale=scale, ldlq=ldlq, sigma=sigma)
    qw.meta["fused"] = {"parts": [str(n) for n, _ in parts], "sizes": [int(W.shape[0]) for _, W in parts],
                        "fuse_scales": scales}
    return qw


def fold_fuse_scales(qw: QuantizedWeight) -> QuantizedWeight:
    """A copy with the fuse scales multiplied into SV (fp16, one rounding per row) and no "fused"
    meta, for runtimes that only know SV; unfused weights are returned unchanged."""
    fused = qw.meta.get("fused") if isinstance(qw.meta, dict) else None
    if not fused:
        return qw
    rows = torch.cat([torch.full((int(s),), float(f), dtype=torch.float32)
                      for s, f in zip(fused["sizes"], fused["fuse_scales"])]).to(qw.tensors["SV"].device)
    tensors = dict(qw.tensors)
    tensors["SV"] = (tensors["SV"].to(torch.float32) * rows).to(torch.float16)
    meta = {k: v for k, v in qw.meta.items() if k != "fused"}
    meta["folded_parts"] = {"parts": list(fused["parts"]), "sizes": list(fused["sizes"])}
    return QuantizedWeight(qw.format, qw.shape, tensors, meta)


def split_dequantized(qw: QuantizedWeight) -> Dict[str, torch.Tensor]:
    """{part name: float32 weight [N_i, K]} of a fused weight (fuse scales applied)."""
    fused = qw.meta.get("fused") if isinstance(qw.meta, dict) else None
    if not fused:
        raise QCompileError("split_dequantized needs a fused weight (meta['fused'])")
    W = get_format(qw.format).dequantize(qw)
    return dict(zip(fused["parts"], torch.split(W, [int(s) for s in fused["sizes"]], dim=0)))


def fused_part_sizes(config: dict, fused_name: str) -> Optional[Tuple[int, ...]]:
    """Output sizes of the parts of ``qkv_proj`` / ``upgate_proj`` from a Llama-style config."""
    try:
        if fused_name == "qkv_proj":
            heads = int(config["num_attention_heads"])
            kv = int(config.get("num_key_value_heads") or heads)
            hd = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
            return heads * hd, kv * hd, kv * hd
        if fused_name == "upgate_proj":
            inter = int(config["intermediate_size"])
            return inter, inter
    except (KeyError, TypeError, ValueError):
        return None
    return None


# =============================================================================================
# whole checkpoints in the QuIP# layout
# =============================================================================================
def _quip_params(config: dict, where: Path) -> dict:
    qp = config.get("quip_params")
    if not isinstance(qp, dict):
        raise QCompileError(f"{where / 'config.json'} has no quip_params block; not a QuIP# checkpoint")
    codebook = qp.get("codebook")
    if codebook not in CODEBOOKS:
        raise QCompileError(f"{where}: unknown QuIP# codebook {codebook!r}; supported: {', '.join(CODEBOOKS)}")
    cb = CODEBOOKS[codebook]
    version = qp.get("codebook_version")
    if version != cb["version"]:
        raise QCompileError(f"{where}: codebook_version {version!r} does not match {codebook} version {cb['version']} "
                            f"(version-0 E8P12 checkpoints use the old int16 layout; re-download or requantize)")
    if qp.get("idx_dtype", "torch.int64") != "torch.int64":
        raise QCompileError(f"{where}: idx_dtype {qp.get('idx_dtype')!r} is not supported (only torch.int64 tiles)")
    if int(qp.get("codesz", 8)) != 8:
        raise QCompileError(f"{where}: codesz {qp.get('codesz')} is not supported (E8P has codesz 8)")
    if int(qp.get("lora_rank", 0) or 0) != 0:
        raise QCompileError(f"{where}: lora_rank {qp.get('lora_rank')} models are not supported")
    if qp.get("rescale_WH"):
        raise QCompileError(f"{where}: rescale_WH models are not supported")
    return qp


def _read_weights(src: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (src / INDEX_FILE).is_file():
        try:
            index = json.loads((src / INDEX_FILE).read_text())
            files = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise QCompileError(f"cannot read {src / INDEX_FILE}: {' '.join(str(err).split())}") from None
    elif (src / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        if any(src.glob("*.bin")) or any(src.glob("*.pt")):
            raise QCompileError(f"{src} holds PyTorch pickle weights (.bin/.pt); qcompile never unpickles. Convert it to "
                                f"safetensors first (save_pretrained(..., safe_serialization=True))")
        raise QCompileError(f"{src} has no {WEIGHTS_FILE} or {INDEX_FILE}; not a safetensors checkpoint")
    tensors: Dict[str, torch.Tensor] = {}
    for name in files:
        path = src / name
        if ".." in Path(name).parts or not path.is_file():
            raise QCompileError(f"weight shard {name} listed in {src / INDEX_FILE} is missing")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise QCompileError(f"cannot read {path}: {' '.join(str(err).split())[:200]}") from None
    return tensors


def import_quipsharp(src_dir) -> Tuple[dict, Dict[str, QuantizedWeight], Dict[str, torch.Tensor]]:
    """Read a QuIP#-layout checkpoint directory → (config.json dict, {module path: QuantizedWeight},
    {name: tensor} of everything else: embeddings, norms, lm_head, biases as ``<path>.bias``).
    Fused qkv_proj / upgate_proj stay fused (see the module doc)."""
    src = Path(src_dir)
    if not src.is_dir():
        raise QCompileError(f"QuIP# checkpoint directory {src} does not exist")
    cfg_path = src / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise QCompileError(f"{src} has no config.json; not a QuIP# checkpoint") from None
    except (OSError, ValueError) as err:
        raise QCompileError(f"cannot read {cfg_path}: {' '.join(str(err).split())}") from None
    if not isinstance(config, dict):
        raise QCompileError(f"{cfg_path} is not a JSON object")
    qp = _quip_params(config, src)
    codebook = qp["codebook"]
    fmt: E8PFormat = get_format(CODEBOOKS[codebook]["format"])
    override = qp.get("resid_scale_override", -1)
    resid_scale = None
    if fmt.residual is not None:
        resid_scale = float(override) if override is not None and float(override) > 0 else fmt.resid_scale
    tensors = _read_weights(src)
    modules = sorted({name[:-len(".Qidxs")] for name in tensors if name.endswith(".Qidxs")})
    if not modules:
        raise QCompileError(f"{src} has no quantized linears (no '<module>.Qidxs' tensors)")
    quantized: Dict[str, QuantizedWeight] = {}
    for path in modules:
        prefix = path + "."
        own = {name[len(prefix):]: tensors.pop(name) for name in list(tensors)
               if name.startswith(prefix) and "." not in name[len(prefix):]}
        bias = own.pop("bias", None)
        last = path.rsplit(".", 1)[-1]
        sizes = fused_part_sizes(config, last) if "fuse_scales" in own else None
        names = FUSED_PARTS.get(last) if "fuse_scales" in own else None
        quantized[path] = from_reference_linear(path, own, codebook, resid_scale, sizes, names)
        if bias is not None:
            tensors[f"{path}.bias"] = bias
    return config, quantized, tensors


def export_quipsharp(out_dir, config: dict, quantized: Dict[str, QuantizedWeight],
                     unquantized: Dict[str, torch.Tensor], *, allow_unfused: bool = False,
                     copy_files_from=None) -> Path:
    """Write a QuIP#-layout checkpoint: config.json (``config`` plus ``quip_params``; any
    ``quantization_config`` dropped) and one model.safetensors (quantized modules as
    ``<path>.Qidxs`` … plus the ``unquantized`` tensors). ``copy_files_from``: a directory whose
    tokenizer files are copied. Every weight must be one format among e8p-2/3/4."""
    from safetensors.torch import save_file

    from ..model.build import TOKENIZER_FILES

    if not quantized:
        raise QCompileError("nothing to export: no quantized linears")
    formats = {qw.format for qw in quantized.values()}
    if len(formats) != 1 or next(iter(formats)) not in FORMAT_TO_CODEBOOK:
        raise QCompileError(f"the QuIP# layout needs one format among e8p-2/3/4 for the whole model, got {sorted(formats)}")
    fmt: E8PFormat = get_format(next(iter(formats)))
    codebook = FORMAT_TO_CODEBOOK[fmt.name]
    cb = CODEBOOKS[codebook]
    scales = {resid_scale_of(qw) for qw in quantized.values()}
    if len(scales) > 1:
        raise QCompileError(f"the QuIP# layout has one residual scale per model; these weights use {sorted(scales)}")
    s = next(iter(scales))
    override = -1 if s is None or s == fmt.resid_scale else s
    out_tensors: Dict[str, torch.Tensor] = {}
    for path, qw in sorted(quantized.items()):
        last = path.rsplit(".", 1)[-1]
        fused = qw.meta.get("fused") if isinstance(qw.meta, dict) else None
        if last in PART_TO_FUSED and not fused and not allow_unfused:
            raise QCompileError(f"{path} was quantized on its own, but the QuIP# Llama model loads fused "
                                f"{PART_TO_FUSED[last]} weights (one RHT over the concatenated outputs) that separately "
                                f"quantized parts cannot be turned into; quantize the parts together "
                                f"(qcompile.formats.quipsharp_io.quantize_fused) or export with allow_unfused=True "
                                f"(a per-linear layout the reference model does not load)")
        for name, t in to_reference_linear(qw).items():
            out_tensors[f"{path}.{name}"] = t
    for name, t in unquantized.items():
        if name in out_tensors:
            raise QCompileError(f"tensor {name} is both a quantized module tensor and an unquantized one")
        out_tensors[name] = t.detach().to("cpu").contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg["quip_params"] = {"codebook": codebook, "codebook_version": cb["version"], "codesz": 8,
                          "idx_dtype": "torch.int64", "packsz": cb["packsz"], "lora_rank": 0,
                          "rescale_WH": False, "resid_scale_override": override, "model_version": 1}
    save_file(out_tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if copy_files_from is not None:
        for name in TOKENIZER_FILES:
            p = Path(copy_files_from) / name
            if p.is_file():
                shutil.copyfile(p, out / name)
    return out


# =============================================================================================
# bridges to qcompile checkpoints (qcompile.model.checkpoint)
# =============================================================================================
def _layer_index(path: str) -> int:
    parts = path.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    raise QCompileError(f"quantized module {path} is not inside a decoder layer (…layers.<i>.…); cannot place it "
                        f"in a qcompile checkpoint")


def import_checkpoint(src_dir, out_checkpoint_dir) -> Path:
    """Convert a QuIP#-layout checkpoint into a qcompile checkpoint directory (see
    qcompile.model.checkpoint). Fused qkv_proj / upgate_proj are stored as fused modules (with
    meta["fused"]). Returns the output directory."""
    from ..model import checkpoint as ckpt
    from ..model.build import TOKENIZER_FILES

    src = Path(src_dir).absolute()
    out = Path(out_checkpoint_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise QCompileError(f"output directory {out} exists and is not empty; choose a new one")
    config, quantized, unquantized = import_quipsharp(src)
    fmt_name = next(iter({qw.format for qw in quantized.values()}))
    layers: Dict[int, Dict[str, tuple]] = {}
    for path, qw in quantized.items():
        layers.setdefault(_layer_index(path), {})[path] = (qw, unquantized.pop(f"{path}.bias", None))
    num_layers = max(layers) + 1
    declared = config.get("num_hidden_layers")
    if declared is not None and int(declared) != num_layers:
        raise QCompileError(f"{src}: config.json says {declared} layers, the weights have quantized linears in {num_layers}")
    missing = [i for i in range(num_layers) if i not in layers]
    if missing:
        raise QCompileError(f"{src}: decoder layers {missing[:5]} have no quantized linears")
    source_files = sorted(p for p in src.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    import hashlib

    h = hashlib.sha256()
    for p in source_files:
        h.update(p.name.encode())
        h.update(ckpt.sha256_file(p).encode())
    qp = config.get("quip_params")
    settings = {"format": fmt_name, "rht": True, "ldlq": None, "seed": None, "sigma": None, "calibration": None,
                "source_sha256": h.hexdigest()}
    digest = ckpt.settings_sha256(settings)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(num_layers):
        ckpt.write_layer_file(out, i, layers[i], digest)
    unq = {k: v.detach().to("cpu").contiguous() for k, v in unquantized.items()}
    ckpt.atomic_save_safetensors(out / ckpt.UNQUANTIZED, unq, {"format": "pt"})
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    in_order = ((path, qw) for i in range(num_layers) for path, (qw, _) in sorted(layers[i].items()))
    raw = {k: v for k, v in config.items() if k != "quip_params"}
    raw["quantization_config"] = {
        "quant_method": ckpt.QUANT_METHOD, "checkpoint_version": ckpt.CHECKPOINT_VERSION, **settings,
        "source_path": str(src), "settings_sha256": digest, "num_layers": num_layers,
        **ckpt.completion_fields(out, in_order, num_layers),
        "imported_from": {"layout": "quip-sharp", "quip_params": qp}}
    ckpt.atomic_write_json(out / ckpt.CONFIG, raw)
    return out


def export_checkpoint(checkpoint_dir, out_dir, *, allow_unfused: bool = False) -> Path:
    """Write a qcompile checkpoint of an e8p-2/3/4 model in the QuIP# layout (see export_quipsharp)."""
    from ..model.checkpoint import load_checkpoint

    src = Path(checkpoint_dir).absolute()
    quantized, unquantized, raw = load_checkpoint(src)
    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise QCompileError(f"output directory {out} exists and is not empty; choose a new one")
    return export_quipsharp(out, raw, quantized, unquantized, allow_unfused=allow_unfused, copy_files_from=src)
