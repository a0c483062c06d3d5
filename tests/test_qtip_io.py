"""Reading and writing QTIP-format HF checkpoints (qcompile.formats.qtip_io)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qcompile as qc
from qcompile.errors import QCompileError
from qcompile.formats import qtip_io
from qcompile.formats import trellis as tr
from qcompile.quant.hadamard import rht_input, rht_output

HIDDEN, INTER, VOCAB = 64, 128, 48
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
MODES = {"hyb": ("quantlut_sym", 2), "1mad": ("1mad", 1), "3inst": ("3inst", 1)}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def make_qtip(path, code="hyb", K=2, layers=2, K_v=None, dtype=torch.float16, rcp=True, extra_qp=None):
    """A synthetic QTIP HF checkpoint: random trellis words (every bit pattern is a valid stream),
    fine-tuned-looking SU/SV, a random tlut, fp16 embeddings/norms/lm_head."""
    gen = torch.Generator().manual_seed(K + layers)
    mode, V = MODES[code]
    qp = {"K": K, "L": 16, "V": V, "codebook": "bitshift", "codebook_version": 0, "decode_mode": mode,
          "td_x": 16, "td_y": 16, "tlut_bits": 9}
    if K_v is not None:
        qp["K_v_proj"] = K_v
    qp.update(extra_qp or {})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "torch_dtype": "float16", "quip_params": qp}
    t = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen).half(),
         "model.norm.weight": torch.ones(HIDDEN).half(),
         "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=gen).half()}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).half()
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).half()
        for name, (n, k) in LINEARS.items():
            kk = K_v if (K_v is not None and name.endswith("v_proj")) else K
            q = p + name + "."
            shape = ((n // 16) * (k // 16), 16 * kk)
            t[q + "trellis"] = torch.randint(-2 ** 15, 2 ** 15, shape, generator=gen).to(torch.int16)
            t[q + "SU"] = (torch.randn(k, generator=gen).sign() * (1 + 0.05 * torch.randn(k, generator=gen))).to(dtype)
            t[q + "SV"] = (torch.randn(n, generator=gen) * 0.02).to(dtype)
            if code == "hyb":
                t[q + "tlut"] = (torch.randn(512, 2, generator=gen) * 0.97).half()
            if rcp:
                t[q + "rcp"] = torch.tensor(0, dtype=torch.int64)
                t[q + "tp_rank"] = torch.tensor(8, dtype=torch.int64)
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return t, config


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8) if a.dim() else a,
                                                                        b.view(-1).view(torch.uint8) if b.dim() else b)


@pytest.mark.parametrize("code, K", [("hyb", 2), ("hyb", 4), ("3inst", 3), ("1mad", 2)])
def test_import_then_export_is_byte_identical(tmp_path, code, K):
    src, out = tmp_path / "src", tmp_path / "out"
    tensors, config = make_qtip(src, code, K)
    quantized, unquantized, cfg = qtip_io.import_qtip(src)
    assert set(quantized) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    assert set(unquantized) == {k for k in tensors if not k.split(".")[-1] in qtip_io.QTIP_TENSORS}
    qw = quantized["model.layers.1.mlp.down_proj"]
    assert qw.format == f"qtip-{code}-{K}" and qw.shape == (HIDDEN, INTER) and qw.rht
    assert qw.tensors["trellis"].shape == qc.formats.get(qw.format).tensor_specs(HIDDEN, INTER)["trellis"].shape
    assert qw.tensors["trellis"].numel() == HIDDEN * INTER * K // 16  # same bytes, 3-D
    assert torch.equal(qw.tensors["trellis"].reshape(-1), tensors["model.layers.1.mlp.down_proj.trellis"].reshape(-1))
    assert qw.meta["runtime_scale"] == 32  # SU/32 and 32·SV are exact here
    assert torch.equal(qw.tensors["SU"].float() * 32, tensors["model.layers.1.mlp.down_proj.SU"].float())
    qtip_io.export_qtip(quantized, unquantized, cfg, out)
    back = load_file(str(out / "model.safetensors"))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert same(back[name], t), name
    mode = json.loads((out / "config.json").read_text())["quip_params"]["decode_mode"]
    assert mode == config["quip_params"]["decode_mode"]
    again, _, _ = qtip_io.import_qtip(out)
    assert all(torch.equal(again[p].tensors[n], quantized[p].tensors[n])
               for p in quantized for n in quantized[p].tensors)


def test_imported_weight_computes_the_reference_forward(tmp_path):
    """y = 32·SV ⊙ hadU(Ŵ · hadUt(SU ⊙ x)/32) (qtip.md §4.3) equals dequantize(W)·x."""
    tensors, _ = make_qtip(tmp_path, "hyb", 3, layers=1)
    quantized, _, _ = qtip_io.import_qtip(tmp_path)
    path = "model.layers.0.mlp.gate_proj"
    qw = quantized[path]
    fmt = qc.formats.get(qw.format)
    W_hat = fmt.decode_fp16(qw).double()
    SU, SV = tensors[path + ".SU"].double(), tensors[path + ".SV"].double()
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y_ref = 32 * rht_output((rht_input(x, SU) / 32) @ W_hat.T, SV)
    y = x @ fmt.dequantize(qw).double().T
    assert torch.allclose(y, y_ref, rtol=1e-4, atol=1e-5)


def test_vectors_that_do_not_scale_exactly_keep_runtime_scale_1(tmp_path):
    tensors, _ = make_qtip(tmp_path / "src", "hyb", 2, layers=1)
    su = tensors["model.layers.0.self_attn.q_proj.SU"]
    su[0] = 2 ** -20  # a subnormal fp16: SU/32 would lose its bits
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    quantized, unq, cfg = qtip_io.import_qtip(tmp_path / "src")
    assert quantized["model.layers.0.self_attn.q_proj"].meta["runtime_scale"] == 1
    assert quantized["model.layers.0.self_attn.k_proj"].meta["runtime_scale"] == 32
    qtip_io.export_qtip(quantized, unq, cfg, tmp_path / "out")
    assert same(load_file(str(tmp_path / "out" / "model.safetensors"))["model.layers.0.self_attn.q_proj.SU"], su)


def test_fp32_vectors_and_old_checkpoints_without_rcp(tmp_path):
    tensors, _ = make_qtip(tmp_path / "src", "hyb", 2, layers=1, dtype=torch.float32, rcp=False)
    for name in list(tensors):  # fp16-representable values, so the fp16 storage is lossless
        if name.endswith((".SU", ".SV")):
            tensors[name] = tensors[name].half().float()
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    quantized, unq, cfg = qtip_io.import_qtip(tmp_path / "src")
    qw = quantized["model.layers.0.mlp.up_proj"]
    assert qw.tensors["SU"].dtype == torch.float16 and qw.meta["qtip"]["SU_dtype"] == "float32"
    qtip_io.export_qtip(quantized, unq, cfg, tmp_path / "out")
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(back) == set(tensors)  # no rcp/tp_rank added to an old checkpoint
    assert all(same(back[k], v) for k, v in tensors.items())


def test_our_quantized_weights_export_and_import(tmp_path):
    fmt = qc.formats.get("qtip-hyb-2")
    W = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)) * 0.05
    qw = fmt.quantize(W)
    qtip_io.export_qtip({"model.layers.0.mlp.up_proj": qw}, {}, {"model_type": "llama"}, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quip_params"] == {"K": 2, "L": 16, "V": 2, "codebook": "bitshift", "codebook_version": 0,
                                  "decode_mode": "quantlut_sym", "td_x": 16, "td_y": 16, "tlut_bits": 9,
                                  "skip_list": [], "split_for_tp": False}
    t = load_file(str(tmp_path / "model.safetensors"))
    assert t["model.layers.0.mlp.up_proj.trellis"].shape == (8, 32) and int(t["model.layers.0.mlp.up_proj.rcp"]) == 0
    assert torch.equal(t["model.layers.0.mlp.up_proj.SU"].abs(), torch.ones(32).half())
    back = qtip_io.import_qtip(tmp_path)[0]["model.layers.0.mlp.up_proj"]
    assert torch.equal(fmt.dequantize(back), fmt.dequantize(qw))
    # a variant in another packing is repacked on export; another in-tile order cannot be
    tiles = tr.repack(qw, "tiles")
    qtip_io.export_qtip({"model.layers.0.mlp.up_proj": tiles}, {}, {}, tmp_path / "b")
    assert torch.equal(load_file(str(tmp_path / "b" / "model.safetensors"))["model.layers.0.mlp.up_proj.trellis"],
                       t["model.layers.0.mlp.up_proj.trellis"])
    row = tr.variant("qtip-hyb-2", "row", "tiles")
    qrow = qc.formats.QuantizedWeight(row.name, (64, 32), dict(tiles.tensors, trellis=tiles.tensors["trellis"]))
    with pytest.raises(QCompileError, match="in-tile order"):
        qtip_io.export_qtip({"model.layers.0.mlp.up_proj": qrow}, {}, {}, tmp_path / "c")


def test_checkpoint_import_build_ready_and_export_round_trip(tmp_path):
    from qcompile.model.checkpoint import dequantized_model, load_checkpoint

    src = tmp_path / "src"
    tensors, config = make_qtip(src, "hyb", 2, layers=2)
    (src / "generation_config.json").write_text("{}")
    ck = qtip_io.import_checkpoint(src, tmp_path / "ck")
    quantized, unquantized, raw = load_checkpoint(ck)
    q = raw["quantization_config"]
    assert q["format"] == "qtip-hyb-2" and q["complete"] and q["rht"] and q["num_layers"] == 2
    assert "quip_params" not in raw and q["imported"]["quip_params"] == config["quip_params"]
    assert (ck / "generation_config.json").is_file() and len(quantized) == 14
    nk = sum(qw.shape[0] * qw.shape[1] for qw in quantized.values())
    bits = sum(qw.bits_per_weight * qw.shape[0] * qw.shape[1] for qw in quantized.values())
    assert q["bits_per_weight"] == pytest.approx(bits / nk, abs=1e-6)
    assert bits / nk == pytest.approx(2 + 14 * (16 * 1024) / nk + 2 * 16 * (4 * 128 + 3 * 192) / nk)
    model = dequantized_model(ck)  # a plain transformers Llama with the dequantized weights
    lin = model.model.layers[1].mlp.down_proj
    assert torch.equal(lin.weight, qc.formats.get("qtip-hyb-2").dequantize(quantized["model.layers.1.mlp.down_proj"]))
    out = qtip_io.export_checkpoint(ck, tmp_path / "qtip")
    back = load_file(str(out / "model.safetensors"))
    assert set(back) == set(tensors) and all(same(back[k], v) for k, v in tensors.items())
    assert json.loads((out / "config.json").read_text())["quip_params"] == config["quip_params"]
    assert (out / "generation_config.json").is_file()
    with pytest.raises(QCompileError, match="not empty"):
        qtip_io.export_checkpoint(ck, tmp_path / "qtip")


def test_k_v_proj_imports_per_layer_but_not_into_one_checkpoint(tmp_path):
    make_qtip(tmp_path, "hyb", 2, layers=1, K_v=4)
    quantized, _, _ = qtip_io.import_qtip(tmp_path)
    assert quantized["model.layers.0.self_attn.v_proj"].format == "qtip-hyb-4"
    assert quantized["model.layers.0.self_attn.q_proj"].format == "qtip-hyb-2"
    assert qtip_io.quip_params_for(quantized)["K_v_proj"] == 4
    with pytest.raises(QCompileError, match="mixes formats"):
        qtip_io.import_checkpoint(tmp_path, tmp_path / "ck")


@pytest.mark.parametrize("extra, msg", [
    ({"L": 12}, "L=12 is not supported"),
    ({"decode_mode": "lut"}, "decode_mode 'lut' is not supported"),
    ({"V": 1}, "V=1 is not supported"),
    ({"K": 5}, "K=5 bits per weight is not supported"),
    ({"tlut_bits": 8}, "tlut_bits=8"),
    ({"td_x": 32}, "only 16x16"),
    ({"split_for_tp": True}, "split_for_tp"),
    ({"codebook": "E8P12"}, "not the QTIP bitshift"),
])
def test_unsupported_quip_params(tmp_path, extra, msg):
    make_qtip(tmp_path, "hyb", 2, layers=1, extra_qp=extra)
    with pytest.raises(QCompileError, match=msg) as err:
        qtip_io.import_qtip(tmp_path)
    assert "\n" not in str(err.value)


def test_bad_tensors_and_files(tmp_path):
    src = tmp_path / "src"
    tensors, config = make_qtip(src, "hyb", 2, layers=1)
    p = "model.layers.0.self_attn.q_proj."
    cases = [
        ({p + "trellis": tensors[p + "trellis"].to(torch.int32)}, "trellis must be int16\\[16, 32\\]"),
        ({p + "trellis": tensors[p + "trellis"].reshape(8, 64)}, "trellis must be int16\\[16, 32\\]"),
        ({p + "rcp": torch.tensor(1)}, "rcp=1"),
        ({p + "tlut": torch.zeros(256, 2).half()}, "tlut must be float \\[512, 2\\]"),
    ]
    for change, msg in cases:
        save_file(dict(tensors, **change), str(src / "model.safetensors"))
        with pytest.raises(QCompileError, match=msg):
            qtip_io.import_qtip(src)
    save_file({k: v for k, v in tensors.items() if k != p + "tlut"}, str(src / "model.safetensors"))
    with pytest.raises(QCompileError, match="has no 'tlut' tensor"):
        qtip_io.import_qtip(src)
    # pickled checkpoints are refused, never loaded
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(QCompileError, match="never unpickles"):
        qtip_io.import_qtip(src)
    (src / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quip_params"}))
    with pytest.raises(QCompileError, match="no quip_params"):
        qtip_io.import_qtip(src)
    with pytest.raises(QCompileError, match="does not exist"):
        qtip_io.import_qtip(tmp_path / "nope")


def test_imported_checkpoint_builds_and_runs_on_llvm(tmp_path):
    """End to end: QTIP checkpoint -> qcompile checkpoint -> llvm artifact (the format's TIR decode in
    the fused kernels, SU/SV around them) -> the same logits as the dequantized model."""
    from qcompile.model.build import build
    from qcompile.model.checkpoint import dequantized_model

    make_qtip(tmp_path / "src", "hyb", 2, layers=1)
    ck = qtip_io.import_checkpoint(tmp_path / "src", tmp_path / "ck")
    art = build(ck, None, "llvm", tmp_path / "art", progress=None)
    model, ref = qc.load(str(art)), dequantized_model(ck)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        a, b = model(ids).logits.float(), ref(ids).logits.float()
    assert float((a - b).norm() / b.norm()) < 1e-3


def test_refuses_to_write_over_its_source(tmp_path):
    make_qtip(tmp_path / "src", "3inst", 2, layers=1)
    with pytest.raises(QCompileError, match="is the QTIP checkpoint"):
        qtip_io.import_checkpoint(tmp_path / "src", tmp_path / "src", overwrite=True)
    ck = qtip_io.import_checkpoint(tmp_path / "src", tmp_path / "ck")
    with pytest.raises(QCompileError, match="is the checkpoint"):
        qtip_io.export_checkpoint(ck, ck, overwrite=True)
    assert (tmp_path / "src" / "model.safetensors").is_file() and (ck / "config.json").is_file()


def test_quantize_model_to_qtip_then_export(tmp_path):
    """qcompile's own front end (Hessians, RHT, BlockLDLQ + Viterbi) -> checkpoint -> QTIP files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qcompile.model.checkpoint import load_checkpoint
    from qcompile.model.quantize import quantize_model

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    calib = [torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))]
    ck = quantize_model(model, "qtip-hyb-2", calibration=calib, out_dir=tmp_path / "ck", rht=True, progress=False,
                        device="cpu")
    quantized, _, raw = load_checkpoint(ck)
    qw = quantized["model.layers.0.mlp.down_proj"]
    assert qw.format == "qtip-hyb-2" and qw.meta["ldlq"] and 0 < qw.meta["proxy_loss"] < 0.2
    out = qtip_io.export_checkpoint(ck, tmp_path / "qtip")
    back, _, cfg_back = qtip_io.import_qtip(out)
    assert cfg_back["quip_params"]["K"] == 2 and set(back) == set(quantized)
    fmt = qc.formats.get("qtip-hyb-2")
    assert torch.equal(fmt.dequantize(back["model.layers.0.mlp.down_proj"]), fmt.dequantize(qw))


def test_cli_import_detects_qtip_and_export_round_trips(tmp_path):
    from safetensors.torch import load_file

    from qcompile.cli import main

    src = tmp_path / "qtip"
    make_qtip(src, code="hyb", K=2, layers=1)
    assert main(["import", str(src), "-o", str(tmp_path / "ck")]) == 0
    assert main(["export", str(tmp_path / "ck"), "--layout", "qtip", "-o", str(tmp_path / "out")]) == 0
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
