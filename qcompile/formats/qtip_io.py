"""Reading and writing QTIP-format Hugging Face checkpoints (../shared/reference/qtip.md §4.2).

A QTIP HF checkpoint is a Llama config.json with a ``quip_params`` block plus safetensors holding,
per quantized linear ``<path>`` (e.g. ``model.layers.0.self_attn.q_proj``):

    <path>.trellis  int16 [(out/16)·(in/16), 16·K]   kernel layout for HYB, generic for 1MAD/3INST
    <path>.SU       [in]    input-side vector (±1, real-valued after fine-tuning)
    <path>.SV       [out]   output-side vector, Wscale folded in
    <path>.tlut     [512, 2] HYB table (per layer, fine-tuned)
    <path>.rcp, <path>.tp_rank  optional int64 scalars (tensor-parallel split; only rcp = 0 is supported)

and the unquantized tensors (embeddings, norms, lm_head). The reference forward is
y = 32·SV ⊙ hadU(Ŵ · hadUt(SU ⊙ x)/32). Our weights store SU/32 and 32·SV (the same product; both
exact in fp16 whenever SU/32 and 32·SV are, checked per layer — otherwise the layer keeps the
unscaled vectors and meta["runtime_scale"] = 1). The trellis bytes are copied unchanged: our stored
layouts are the reference's (qcompile.formats.trellis). Only safetensors are read; a checkpoint
that only has pickled ``*.bin`` files is refused (qcompile never unpickles).

Checkpoint-level helpers convert to and from qcompile's own checkpoint directory format
(qcompile.model.checkpoint): ``import_checkpoint(src, out)``, ``export_checkpoint(ckpt, out)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from ..errors import QCompileError
from ..jsonio import read_json_object
from .base import QuantizedWeight
from .trellis import BITS, CODES, L_BITS, Q_BITS, RUNTIME_SCALE, TILE, qw_format, repack, variant

PathLike = Union[str, os.PathLike]

DECODE_MODES = {"quantlut_sym": "hyb", "1mad": "1mad", "3inst": "3inst"}
MODE_OF_CODE = {code: mode for mode, code in DECODE_MODES.items()}
REFERENCE_LAYOUT = {"hyb": ("mma", "kernel"), "1mad": ("row", "tiles"), "3inst": ("row", "tiles")}
QTIP_TENSORS = ("trellis", "SU", "SV", "tlut", "rcp", "tp_rank")
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


# --- reading ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    return read_json_object(path)


def safetensors_files(src: Path):
    """The safetensors files of a HF model directory (refuses pickled-only checkpoints)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise QCompileError(f"{index} has no weight_map; the checkpoint is damaged")
        files = sorted({src / f for f in weight_map.values()})
    else:
        files = sorted(src.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
        if pickled:
            raise QCompileError(f"{src} only has pickled PyTorch files ({', '.join(pickled[:3])}); qcompile never "
                                f"unpickles (it can run code): convert them to safetensors where you trust them, "
                                f"e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), ...)")
        raise QCompileError(f"{src} has no *.safetensors weight files")
    for f in files:
        if not f.is_file():
            raise QCompileError(f"{src}: weight file {f.name} is missing")
    return files


def parse_quip_params(config: dict, where: PathLike = "config.json") -> dict:
    """Validate ``quip_params`` -> {"code", "K", "K_v_proj", "L", "V", "tlut_bits"} (QCompileError if
    qcompile cannot hold it)."""
    qp = config.get("quip_params")
    if not isinstance(qp, dict):
        raise QCompileError(f"{where} has no quip_params block: not a QTIP checkpoint")
    if qp.get("codebook", "bitshift") != "bitshift":
        raise QCompileError(f"{where}: quip_params codebook {qp.get('codebook')!r} is not the QTIP bitshift "
                            f"trellis (QuIP# codebooks are other formats)")
    mode = qp.get("decode_mode")
    if mode not in DECODE_MODES:
        raise QCompileError(f"{where}: decode_mode {mode!r} is not supported; qcompile reads "
                            f"{', '.join(DECODE_MODES)}")
    code = DECODE_MODES[mode]
    try:
        L, V, K = int(qp["L"]), int(qp["V"]), int(qp["K"])
        tdx, tdy = int(qp.get("td_x", 16)), int(qp.get("td_y", 16))
    except (KeyError, TypeError, ValueError):
        raise QCompileError(f"{where}: quip_params needs integer K, L and V") from None
    if L != L_BITS:
        raise QCompileError(f"{where}: trellis L={L} is not supported (qcompile's QTIP formats use L=16)")
    if V != CODES[code]:
        raise QCompileError(f"{where}: V={V} is not supported with decode_mode {mode} (needs V={CODES[code]})")
    if (tdx, tdy) != (TILE, TILE):
        raise QCompileError(f"{where}: tiles td_x={tdx}, td_y={tdy} are not supported (only 16x16)")
    Kv = qp.get("K_v_proj", K)
    for kk in (K, Kv):
        if kk not in BITS:
            raise QCompileError(f"{where}: K={kk} bits per weight is not supported "
                                f"(choose {', '.join(map(str, BITS))})")
    tlut_bits = int(qp.get("tlut_bits", Q_BITS))
    if code == "hyb" and tlut_bits != Q_BITS:
        raise QCompileError(f"{where}: tlut_bits={tlut_bits} is not supported (HYB uses Q=9)")
    if qp.get("split_for_tp"):
        raise QCompileError(f"{where}: split_for_tp checkpoints (per-shard RHT and Wscale) are not supported")
    return {"code": code, "K": K, "K_v_proj": int(Kv), "L": L, "V": V, "tlut_bits": tlut_bits}


def _load_tensors(files) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out = {}
    for f in files:
        try:
            out.update(load_file(str(f), device="cpu"))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise QCompileError(f"cannot read {f}: {' '.join(str(err).split())[:200]}") from None
    return out


def _scaled(vec: torch.Tensor, factor: float) -> Optional[torch.Tensor]:
    """fp16(vec·factor) when that is exact and finite, else None."""
    v32 = vec.to(torch.float32)
    out = (v32 * factor).to(torch.float16)
    ok = torch.isfinite(out).all() and torch.equal(out.to(torch.float32) / factor, v32)
    return out if bool(ok) else None


def qtip_layer_to_qweight(path: str, t: Dict[str, torch.Tensor], code: str, K: int) -> QuantizedWeight:
    """One QTIP linear's tensors (trellis, SU, SV, [tlut], [rcp, tp_rank]) -> QuantizedWeight."""
    fmt = variant(f"qtip-{code}-{K}", *REFERENCE_LAYOUT[code])
    where = f"QTIP layer {path}"
    for name in ("trellis", "SU", "SV") + (("tlut",) if code == "hyb" else ()):
        if name not in t:
            raise QCompileError(f"{where} has no {name!r} tensor")
    SU, SV, tr = t["SU"], t["SV"], t["trellis"]
    if SU.dim() != 1 or SV.dim() != 1 or not SU.is_floating_point() or not SV.is_floating_point():
        raise QCompileError(f"{where}: SU and SV must be float vectors, got {list(SU.shape)} and {list(SV.shape)}")
    n, k = int(SV.shape[0]), int(SU.shape[0])
    try:
        fmt.check_shape(n, k)
    except QCompileError as err:
        raise QCompileError(f"{where}: {err}") from None
    want = ((n // TILE) * (k // TILE), TILE * K)
    if tr.dtype != torch.int16 or tuple(tr.shape) != want:
        raise QCompileError(f"{where}: trellis must be int16{list(want)} for a {n}x{k} K={K} layer, got "
                            f"{str(tr.dtype).replace('torch.', '')}{list(tr.shape)}")
    rcp = int(t["rcp"]) if "rcp" in t else 0
    if rcp != 0:
        raise QCompileError(f"{where}: rcp={rcp} (a tensor-parallel split layer) is not supported")
    info = {"SU_dtype": str(SU.dtype).replace("torch.", ""), "SV_dtype": str(SV.dtype).replace("torch.", "")}
    if "rcp" in t:
        info["rcp"] = rcp
    if "tp_rank" in t:
        info["tp_rank"] = int(t["tp_rank"])
    su, sv = _scaled(SU, 1.0 / RUNTIME_SCALE), _scaled(SV, float(RUNTIME_SCALE))
    runtime_scale = RUNTIME_SCALE
    if su is None or sv is None:  # keep the vectors as they are (fp16) rather than lose bits
        su, sv, runtime_scale = SU.to(torch.float16), SV.to(torch.float16), 1
    tensors = {"trellis": tr.reshape(fmt.tensor_specs(n, k)["trellis"].shape).contiguous()}
    if code == "hyb":
        tlut = t["tlut"]
        if tuple(tlut.shape) != (1 << Q_BITS, 2) or not tlut.is_floating_point():
            raise QCompileError(f"{where}: tlut must be float [512, 2], got {list(tlut.shape)}")
        info["tlut_dtype"] = str(tlut.dtype).replace("torch.", "")
        tensors["tlut"] = tlut.to(torch.float16).contiguous()
    tensors["SU"], tensors["SV"] = su.contiguous(), sv.contiguous()
    meta = {"code": code, "K": K, "V": CODES[code], "L": L_BITS, "layout": fmt.layout, "rht": True,
            "runtime_scale": runtime_scale, "imported_from": "qtip", "qtip": info}
    if code == "hyb":
        meta["tlut_bits"] = Q_BITS
    qw = QuantizedWeight(fmt.name, (n, k), tensors, meta)
    fmt.check_qweight(qw)
    return qw


def import_qtip(src_dir: PathLike) -> Tuple[Dict[str, QuantizedWeight], Dict[str, torch.Tensor], dict]:
    """Read a QTIP HF checkpoint directory.

    Returns (quantized {module path: QuantizedWeight}, unquantized {state-dict name: tensor}, config
    dict (with its quip_params)). Formats: qtip-hyb-K / qtip-1mad-K / qtip-3inst-K (v_proj uses
    K_v_proj when the config sets it)."""
    src = Path(src_dir)
    if not src.is_dir():
        raise QCompileError(f"QTIP checkpoint directory {src} does not exist")
    if not (src / "config.json").is_file():
        raise QCompileError(f"{src} has no config.json: not a QTIP checkpoint")
    config = _read_json(src / "config.json")
    qp = parse_quip_params(config, src / "config.json")
    tensors = _load_tensors(safetensors_files(src))
    prefixes = sorted(name[:-len(".trellis")] for name in tensors if name.endswith(".trellis"))
    if not prefixes:
        raise QCompileError(f"{src} holds no quantized linears (no *.trellis tensors)")
    quantized = {}
    for path in prefixes:
        t = {name: tensors.pop(f"{path}.{name}") for name in QTIP_TENSORS if f"{path}.{name}" in tensors}
        K = qp["K_v_proj"] if path.endswith("v_proj") else qp["K"]
        quantized[path] = qtip_layer_to_qweight(path, t, qp["code"], K)
    return quantized, tensors, config


# --- writing ---------------------------------------------------------------------------------------------
def qweight_to_qtip(qw: QuantizedWeight) -> Dict[str, torch.Tensor]:
    """Our QuantizedWeight -> the QTIP tensors of one linear (reference layout and scales)."""
    fmt = qw_format(qw)
    fmt.check_qweight(qw)
    if (fmt.order, fmt.packing) != REFERENCE_LAYOUT[fmt.code]:
        if fmt.order != REFERENCE_LAYOUT[fmt.code][0]:
            raise QCompileError(f"cannot export {fmt.name}: QTIP stores {fmt.code} weights in the "
                                f"{REFERENCE_LAYOUT[fmt.code][0]} in-tile order; requantize it as {fmt.base_name}")
        qw = repack(qw, REFERENCE_LAYOUT[fmt.code][1])
    n, k = qw.shape
    info = qw.meta.get("qtip") or {}
    rs = float(qw.meta.get("runtime_scale", RUNTIME_SCALE))
    su = qw.tensors["SU"].to(torch.float32) * rs
    sv = qw.tensors["SV"].to(torch.float32) / rs
    out = {"trellis": qw.tensors["trellis"].reshape((n // TILE) * (k // TILE), TILE * fmt.K).contiguous(),
           "SU": su.to(_DTYPES.get(info.get("SU_dtype"), torch.float16)).contiguous(),
           "SV": sv.to(_DTYPES.get(info.get("SV_dtype"), torch.float16)).contiguous()}
    if fmt.code == "hyb":
        out["tlut"] = qw.tensors["tlut"].to(_DTYPES.get(info.get("tlut_dtype"), torch.float16)).contiguous()
    if "rcp" in info or not info:
        out["rcp"] = torch.tensor(int(info.get("rcp", 0)), dtype=torch.int64)
    if "tp_rank" in info or not info:
        out["tp_rank"] = torch.tensor(int(info.get("tp_rank", 8)), dtype=torch.int64)
    return out


def quip_params_for(quantized: Dict[str, QuantizedWeight]) -> dict:
    """The ``quip_params`` block describing a set of weights (one code and K; v_proj may differ in K)."""
    codes, ks, kvs = set(), set(), set()
    for path, qw in quantized.items():
        fmt = qw_format(qw)
        codes.add(fmt.code)
        (kvs if path.endswith("v_proj") else ks).add(fmt.K)
    if len(codes) != 1:
        raise QCompileError(f"a QTIP checkpoint has one trellis code; these weights use {sorted(codes)}")
    if len(ks) > 1 or len(kvs) > 1:
        raise QCompileError(f"a QTIP checkpoint has one K (plus K_v_proj); these weights use K={sorted(ks | kvs)}")
    code = codes.pop()
    K = ks.pop() if ks else kvs.copy().pop()
    qp = {"K": K, "L": L_BITS, "V": CODES[code], "codebook": "bitshift", "codebook_version": 0,
          "decode_mode": MODE_OF_CODE[code], "td_x": TILE, "td_y": TILE, "tlut_bits": Q_BITS,
          "skip_list": [], "split_for_tp": False}
    if kvs and kvs != {K}:
        qp["K_v_proj"] = kvs.pop()
    return qp


def export_qtip(quantized: Dict[str, QuantizedWeight], unquantized: Dict[str, torch.Tensor], config: dict,
                out_dir: PathLike, overwrite: bool = False) -> Path:
    """Write a QTIP HF checkpoint: config.json (``config`` without any quantization_config, plus
    quip_params) and one model.safetensors with the unquantized tensors and every linear's QTIP
    tensors. Returns the directory."""
    from safetensors.torch import save_file

    from ..model.checkpoint import atomic_write_json

    if not quantized:
        raise QCompileError("nothing to export: no quantized weights")
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    tensors = {}
    for name, t in unquantized.items():
        tensors[name] = t.detach().to("cpu").contiguous()
    for path, qw in quantized.items():
        for name, t in qweight_to_qtip(qw.to("cpu")).items():
            key = f"{path}.{name}"
            if key in tensors:
                raise QCompileError(f"tensor {key} is both quantized and unquantized")
            tensors[key] = t
    seen = set()
    for key, t in list(tensors.items()):  # safetensors refuses shared storage (tied embeddings)
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[key] = t.clone()
        seen.add(ptr)
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "quip_params")}
    cfg["quip_params"] = quip_params_for(quantized)
    cfg.setdefault("torch_dtype", "float16")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(out / "config.json", cfg)
    return out


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise QCompileError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise QCompileError(f"output directory {out} is not empty; choose another one or pass overwrite=True")
            shutil.rmtree(out)


# --- qcompile checkpoints <-> QTIP checkpoints --------------------------------------------------------------
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_index(path: str) -> int:
    m = _LAYER_RE.search(path)
    if m is None:
        raise QCompileError(f"quantized linear {path} is not inside a decoder layer (no 'layers.<i>.' in its name)")
    return int(m.group(1))


def _files_sha256(files) -> str:
    from ..model.checkpoint import sha256_file

    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def import_checkpoint(src_dir: PathLike, out_checkpoint_dir: PathLike, overwrite: bool = False,
                      progress=None) -> Path:
    """A QTIP HF checkpoint -> a qcompile checkpoint directory (qcompile.model.checkpoint), ready for
    ``qcompile build``. One format for the whole model (a K_v_proj different from K is refused)."""
    from ..model import checkpoint as ckpt
    from ..model.build import TOKENIZER_FILES

    say = progress if callable(progress) else (print if progress else (lambda msg: None))
    src = Path(src_dir).absolute()
    quantized, unquantized, config = import_qtip(src)
    formats = {qw.format for qw in quantized.values()}
    if len(formats) != 1:
        raise QCompileError(f"{src} mixes formats {sorted(formats)} (K_v_proj); a qcompile checkpoint holds one format")
    fmt_name = formats.pop()
    try:
        num_layers = int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise QCompileError(f"{src}/config.json has no num_hidden_layers") from None
    by_layer: Dict[int, dict] = {i: {} for i in range(num_layers)}
    for path, qw in quantized.items():
        i = _layer_index(path)
        if i not in by_layer:
            raise QCompileError(f"{src}: {path} is outside the config's {num_layers} layers")
        bias = unquantized.pop(f"{path}.bias", None)
        by_layer[i][path] = (qw, bias)
    out = Path(out_checkpoint_dir).absolute()
    if out.exists() and out.resolve() == src.resolve():
        raise QCompileError(f"the output directory is the QTIP checkpoint {src}; choose another one")
    _prepare_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"format": fmt_name, "rht": True, "ldlq": True, "seed": None, "sigma": None,
                "calibration": {"source": "qtip-import"},
                "source_sha256": _files_sha256(safetensors_files(src))}
    digest = ckpt.settings_sha256(settings)
    model_cfg = {k: v for k, v in config.items() if k not in ("quip_params", "quantization_config")}
    qcfg = {"quant_method": ckpt.QUANT_METHOD, "checkpoint_version": ckpt.CHECKPOINT_VERSION, **settings,
            "source_path": str(src), "settings_sha256": digest, "complete": False, "num_layers": num_layers,
            "imported": {"from": "qtip", "quip_params": config["quip_params"]}}
    cfg = dict(model_cfg, quantization_config=qcfg)
    ckpt.atomic_write_json(out / ckpt.CONFIG, cfg)
    for i in range(num_layers):
        ckpt.write_layer_file(out, i, by_layer[i], digest)
        say(f"layer {i + 1}/{num_layers}: {len(by_layer[i])} linears")
    unq = {k: (t.to(torch.float16) if t.is_floating_point() else t).contiguous() for k, t in unquantized.items()}
    seen = set()
    for key, t in list(unq.items()):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            unq[key] = t.clone()
        seen.add(ptr)
    ckpt.atomic_save_safetensors(out / ckpt.UNQUANTIZED, unq, {"format": "pt"})
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    qcfg.update(ckpt.completion_fields(out, quantized.items(), num_layers))
    ckpt.atomic_write_json(out / ckpt.CONFIG, cfg)
    say(f"wrote {out} ({fmt_name}, {len(quantized)} linears, {qcfg['bits_per_weight']:.3f} bits per weight)")
    return out


def export_checkpoint(checkpoint_dir: PathLike, out_dir: PathLike, overwrite: bool = False) -> Path:
    """A qcompile checkpoint quantized to a qtip-* format -> a QTIP HF checkpoint directory."""
    from ..model.build import TOKENIZER_FILES
    from ..model.checkpoint import load_checkpoint

    src = Path(checkpoint_dir).absolute()
    quantized, unquantized, raw = load_checkpoint(src)
    for path, qw in quantized.items():
        if not qw.format.startswith("qtip-"):
            raise QCompileError(f"checkpoint {src} is quantized to {qw.format}; only qtip-* formats export to QTIP")
        bias = unquantized.get(f"{path}.bias")
        if bias is not None:
            raise QCompileError(f"{path} has a bias; QTIP checkpoints (Llama) have none")
    config = dict(raw)
    imported = (raw.get("quantization_config") or {}).get("imported") or {}
    if Path(out_dir).exists() and Path(out_dir).resolve() == src.resolve():
        raise QCompileError(f"the output directory is the checkpoint {src}; choose another one")
    out = export_qtip(quantized, unquantized, config, out_dir, overwrite)
    if imported.get("from") == "qtip" and isinstance(imported.get("quip_params"), dict):
        # keep the source's own quip_params keys (e.g. no skip_list in old configs)
        cfg_path = Path(out) / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if {k: cfg["quip_params"][k] for k in ("K", "L", "V", "decode_mode")} == \
                {k: imported["quip_params"].get(k) for k in ("K", "L", "V", "decode_mode")}:
            cfg["quip_params"] = imported["quip_params"]
            from ..model.checkpoint import atomic_write_json

            atomic_write_json(cfg_path, cfg)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, Path(out) / name)
    return Path(out)


__all__ = ["import_qtip", "export_qtip", "import_checkpoint", "export_checkpoint", "parse_quip_params",
           "qtip_layer_to_qweight", "qweight_to_qtip", "quip_params_for"]
