"""QuIP#-layout checkpoints: reading a hand-built reference checkpoint, export → import round trips
(also through a qcompile checkpoint), fused qkv / upgate, and bad inputs."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qcompile as qc
from qcompile.errors import QCompileError
from qcompile.formats import e8p
from qcompile.formats import quipsharp_io as qio

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128,
          "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
          "num_hidden_layers": 2, "vocab_size": 64, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
          "tie_word_embeddings": False}


def quip_params(codebook="E8P12", version=1, override=-1):
    return {"codebook": codebook, "codebook_version": version, "codesz": 8, "idx_dtype": "torch.int64",
            "packsz": 4, "lora_rank": 0, "rescale_WH": False, "resid_scale_override": override, "model_version": 1}


def model_weights(fmt_name, seed=0):
    """({module path: QuantizedWeight}, unquantized) of a 2-layer toy Llama with fused qkv / upgate."""
    gen = torch.Generator().manual_seed(seed)
    quantized, unq = {}, {}
    for i in range(2):
        p = f"model.layers.{i}"
        quantized[f"{p}.self_attn.qkv_proj"] = qio.quantize_fused(
            fmt_name, [("q_proj", torch.randn(128, 128, generator=gen)), ("k_proj", 2 * torch.randn(64, 128, generator=gen)),
                       ("v_proj", 0.5 * torch.randn(64, 128, generator=gen))], seed=i)
        quantized[f"{p}.mlp.upgate_proj"] = qio.quantize_fused(
            fmt_name, [("up_proj", torch.randn(128, 128, generator=gen)), ("gate_proj", 3 * torch.randn(128, 128, generator=gen))],
            seed=10 + i)
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            quantized[f"{p}.{name}"] = qc.formats.get(fmt_name).quantize(torch.randn(128, 128, generator=gen), seed=20 + i)
        unq[f"{p}.input_layernorm.weight"] = torch.ones(128, dtype=torch.float16)
        unq[f"{p}.post_attention_layernorm.weight"] = torch.ones(128, dtype=torch.float16)
    unq["model.embed_tokens.weight"] = torch.randn(64, 128, generator=gen).half()
    unq["model.norm.weight"] = torch.ones(128, dtype=torch.float16)
    unq["lm_head.weight"] = torch.randn(64, 128, generator=gen).half()
    return quantized, unq


@pytest.fixture(scope="module")
def ref_e8p2(tmp_path_factory):
    quantized, unq = model_weights("e8p-2")
    out = tmp_path_factory.mktemp("quip") / "e8p2"
    qio.export_quipsharp(out, dict(CONFIG), quantized, unq)
    (out / "tokenizer.json").write_text("{}")
    return out, quantized, unq


def assert_same_weight(a, b):
    assert a.format == b.format and a.shape == b.shape and set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].dtype == b.tensors[name].dtype and torch.equal(a.tensors[name], b.tensors[name]), name
    assert a.meta.get("fused") == b.meta.get("fused")
    fmt = qc.formats.get(a.format)
    assert torch.equal(fmt.decode_fp16(a), fmt.decode_fp16(b))
    assert torch.equal(fmt.dequantize(a), fmt.dequantize(b))


# --- reading a reference checkpoint built by hand from the §1.5 / §5 description -------------------
def test_import_of_a_hand_built_reference_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(1)
    n, k = 32, 128
    codes = torch.randint(0, 65536, (n, k // 8), generator=gen)
    su = (torch.randint(0, 2, (k,), generator=gen) * 2 - 1).half()
    sv = (torch.rand(n, generator=gen) + 0.5).half()
    t = {"model.layers.0.self_attn.o_proj.Qidxs": e8p.reference_pack_e8p(codes),
         "model.layers.0.self_attn.o_proj.SU": su, "model.layers.0.self_attn.o_proj.SV": sv,
         "model.layers.0.self_attn.o_proj.Wscale": torch.tensor(2.0),
         "model.layers.0.self_attn.o_proj.codebook_id": torch.tensor(7),
         "model.norm.weight": torch.ones(4, dtype=torch.float16)}
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": 1, "quip_params": quip_params()}))
    config, quantized, unq = qio.import_quipsharp(tmp_path)
    qw = quantized["model.layers.0.self_attn.o_proj"]
    fmt = qc.formats.get("e8p-2")
    assert qw.format == "e8p-2" and qw.shape == (n, k) and set(unq) == {"model.norm.weight"}
    assert torch.equal(fmt.decode_fp16(qw), e8p.e8p_full_grid(dtype=torch.float16)[codes].reshape(n, k))
    assert torch.equal(qw.tensors["SV"], (sv.float() * 2).half())  # legacy Wscale folded into SV
    assert config["quip_params"]["codebook"] == "E8P12"


# --- round trips ----------------------------------------------------------------------------------
def test_export_import_round_trip_e8p2(ref_e8p2):
    out, quantized, unq = ref_e8p2
    raw = load_file(str(out / "model.safetensors"))
    q = raw["model.layers.0.self_attn.qkv_proj.Qidxs"]
    assert q.dtype == torch.int64 and q.shape == (256, 128 // 32)
    assert raw["model.layers.0.self_attn.qkv_proj.codebook_id"].item() == 7
    assert raw["model.layers.0.self_attn.qkv_proj.fuse_scales"].dtype == torch.float32
    assert "model.layers.0.self_attn.o_proj.fuse_scales" not in raw
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quip_params"]["codebook"] == "E8P12" and cfg["quip_params"]["codebook_version"] == 1
    config, back, unq2 = qio.import_quipsharp(out)
    assert set(back) == set(quantized) and set(unq2) == set(unq)
    for path in quantized:
        assert_same_weight(quantized[path], back[path])
    for name in unq:
        assert torch.equal(unq[name], unq2[name])


@pytest.mark.parametrize("name, override", [("e8p-3", -1), ("e8p-4", -1), ("e8p-4", 3.6)])
def test_linear_round_trip_rvq(name, override):
    fmt = qc.formats.get(name)
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    if override > 0:
        fmt = qc.formats.get(name)
        resid = fmt.inv_scale16(override)
        _, c1, c2 = fmt.round_vectors(torch.randn(32 * 16, 8), resid)
        qw = qc.formats.QuantizedWeight(name, (32, 128), {**fmt.tensors_from_codes(c1.reshape(32, 16), c2.reshape(32, 16), resid),
                                                          "SU": torch.ones(128).half(), "SV": torch.ones(32).half()},
                                        {"resid_scale": override})
    else:
        qw = fmt.quantize(W, seed=4)
    codebook = qio.FORMAT_TO_CODEBOOK[name]
    ref = qio.to_reference_linear(qw)
    assert ref["Qidxs"].shape == (32, qio.qidxs_columns(name, 128)) and ref["codebook_id"].item() == qio.CODEBOOKS[codebook]["id"]
    back = qio.from_reference_linear("x", ref, codebook, qio.resid_scale_of(qw))
    assert_same_weight(qw, back)


def test_rvq_checkpoint_with_resid_scale_override(tmp_path):
    quantized, unq = model_weights("e8p-4", seed=3)
    # a model-wide residual scale other than the default (3.6, as some reference 4-bit scripts used):
    # re-tag every weight (the round trip only cares about the stored 1/s and the meta)
    fmt = qc.formats.get("e8p-4")
    for qw in quantized.values():
        qw.tensors["resid_inv_scale"] = fmt.inv_scale16(3.6)
        qw.meta["resid_scale"] = 3.6
    qio.export_quipsharp(tmp_path / "q", dict(CONFIG), quantized, unq)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quip_params"]
    assert cfg["codebook"] == "E8P12RVQ4B" and cfg["resid_scale_override"] == 3.6 and cfg["packsz"] == 2
    _, back, _ = qio.import_quipsharp(tmp_path / "q")
    for path, qw in quantized.items():
        assert_same_weight(qw, back[path])


def test_qcompile_checkpoint_round_trip(ref_e8p2, tmp_path):
    from qcompile.model.checkpoint import load_checkpoint

    src, quantized, unq = ref_e8p2
    ck = qio.import_checkpoint(src, tmp_path / "ck")
    q2, unq2, raw = load_checkpoint(ck)  # verifies the sha256 of every file
    qcfg = raw["quantization_config"]
    assert qcfg["format"] == "e8p-2" and qcfg["complete"] and qcfg["num_layers"] == 2
    assert qcfg["imported_from"]["layout"] == "quip-sharp" and "quip_params" not in raw
    assert (ck / "tokenizer.json").is_file()
    for path in quantized:
        assert_same_weight(quantized[path], q2[path])
    out = qio.export_checkpoint(ck, tmp_path / "again")
    a = load_file(str(src / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads((out / "config.json").read_text())["quip_params"] == json.loads((src / "config.json").read_text())["quip_params"]


# --- fused linears --------------------------------------------------------------------------------
def test_fused_weights_split_and_fold():
    gen = torch.Generator().manual_seed(5)
    parts = [("up_proj", torch.randn(128, 128, generator=gen)), ("gate_proj", 5 * torch.randn(128, 128, generator=gen))]
    qw = qio.quantize_fused("e8p-2", parts, seed=1)
    assert qw.meta["fused"]["sizes"] == [128, 128] and qw.meta["fused"]["parts"] == ["up_proj", "gate_proj"]
    assert qw.meta["fused"]["fuse_scales"][1] == pytest.approx(5 * qw.meta["fused"]["fuse_scales"][0], rel=0.05)
    split = qio.split_dequantized(qw)
    for name, W in parts:
        rel = ((split[name] - W).pow(2).mean() / W.pow(2).mean()).item()
        assert rel < 0.11, (name, rel)
    folded = qio.fold_fuse_scales(qw)
    assert "fused" not in folded.meta
    fmt = qc.formats.get("e8p-2")
    assert torch.allclose(fmt.dequantize(folded), fmt.dequantize(qw), rtol=1e-3, atol=1e-3)


# --- bad inputs -----------------------------------------------------------------------------------
def edited(src, tmp_path, tensors=None, drop=(), params=None):
    out = tmp_path / "edited"
    shutil.copytree(src, out)
    t = load_file(str(out / "model.safetensors"))
    for name in drop:
        t.pop(name)
    t.update(tensors or {})
    save_file(t, str(out / "model.safetensors"))
    if params is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg["quip_params"].update(params)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


M = "model.layers.1.self_attn.o_proj"


@pytest.mark.parametrize("change, msg", [
    (dict(tensors={f"{M}.Qidxs": torch.zeros(128, 4, dtype=torch.int32)}), "must be int64\\[128, 4\\].*got int32"),
    (dict(tensors={f"{M}.Qidxs": torch.zeros(128, 8, dtype=torch.int64)}), "must be int64\\[128, 4\\].*got int64\\[128, 8\\]"),
    (dict(tensors={f"{M}.codebook_id": torch.tensor(99)}), "unknown codebook_id 99"),
    (dict(tensors={f"{M}.codebook_id": torch.tensor(17)}), "codebook_id 17 \\(E8P12RVQ4B\\).*E8P12"),
    (dict(params={"codebook_version": 0}), "codebook_version 0 does not match E8P12 version 1"),
    (dict(params={"codebook": "D4"}), "unknown QuIP# codebook 'D4'"),
    (dict(drop=[f"{M}.SU"]), "has no SU tensor"),
    (dict(tensors={f"{M}.A": torch.ones(2, 2)}), "low-rank"),
    (dict(tensors={f"{M}.SV": torch.ones(120, dtype=torch.float16)}), "out_features % 16"),
    (dict(params={"lora_rank": 8}), "lora_rank"),
])
def test_bad_reference_checkpoints(ref_e8p2, tmp_path, change, msg):
    src = edited(ref_e8p2[0], tmp_path, **change)
    with pytest.raises(QCompileError, match=msg) as err:
        qio.import_quipsharp(src)
    assert "\n" not in str(err.value)


def test_missing_or_pickled_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "quip_params": quip_params()}))
    with pytest.raises(QCompileError, match="no model.safetensors"):
        qio.import_quipsharp(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(QCompileError, match="never unpickles"):
        qio.import_quipsharp(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(QCompileError, match="no quip_params"):
        qio.import_quipsharp(tmp_path)
    with pytest.raises(QCompileError, match="does not exist"):
        qio.import_quipsharp(tmp_path / "nope")


def test_export_refuses_separately_quantized_parts(tmp_path):
    fmt = qc.formats.get("e8p-2")
    gen = torch.Generator().manual_seed(6)
    quantized = {"model.layers.0.self_attn.q_proj": fmt.quantize(torch.randn(128, 128, generator=gen)),
                 "model.layers.0.self_attn.o_proj": fmt.quantize(torch.randn(128, 128, generator=gen))}
    with pytest.raises(QCompileError, match="quantize_fused"):
        qio.export_quipsharp(tmp_path / "a", dict(CONFIG), quantized, {})
    out = qio.export_quipsharp(tmp_path / "b", {**CONFIG, "num_hidden_layers": 1}, quantized, {}, allow_unfused=True)
    _, back, _ = qio.import_quipsharp(out)
    for path, qw in quantized.items():
        assert_same_weight(qw, back[path])
    with pytest.raises(QCompileError, match="e8p-2/3/4"):
        qio.export_quipsharp(tmp_path / "c", dict(CONFIG), {"x": qc.formats.get("int4-g128").quantize(torch.randn(8, 128))}, {})


def test_cli_import_export_round_trip(ref_e8p2, tmp_path):
    """`qcompile import` detects the QuIP# layout; `qcompile export --layout quip-sharp` writes it back."""
    from qcompile.cli import main

    src, _, _ = ref_e8p2
    assert main(["import", str(src), "-o", str(tmp_path / "ck")]) == 0
    assert main(["export", str(tmp_path / "ck"), "--layout", "quip-sharp", "-o", str(tmp_path / "out")]) == 0
    a = load_file(str(src / "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_cli_import_refuses_a_plain_model(tmp_path, capsys):
    from qcompile.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["import", str(tmp_path), "-o", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no quip_params" in err[0]
