"""Model quantization: RHT and LDLQ in int4-g128, checkpoints (determinism, resume, damage),
``qcompile build`` from a checkpoint, the quantize / eval CLI wiring and the quality table."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import qcompile as qc
from qcompile.cli import main as cli_main
from qcompile.errors import QCompileError
from qcompile.formats.base import QuantizedWeight
from qcompile.model import checkpoint as ckpt
from qcompile.model import quality as Q
from qcompile.model.build import build
from qcompile.model.checkpoint import dequantized_model, load_checkpoint
from qcompile.quant.hadamard import random_signs, rht_hessian, rht_weight, unrht_weight
from qcompile.quant.ldlq import proxy_loss

FMT = "int4-g128"
VOCAB = 100


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No corpus, no prepared data, no cache: the default calibration falls back to random ids."""
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("QCOMPILE_MODELS_DATA", str(tmp_path / "no-models-data"))


def tiny_config(**overrides):
    from transformers import LlamaConfig

    # intermediate 384 = 12·32: the MLP exercises a Hadamard size with a tabulated K_h factor
    kw = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(**overrides):
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config(**overrides))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # unit-variance outputs, so int4 errors show in the logits
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / (1.0 if "embed" in name else p.shape[1] ** 0.5))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "tiny"
    tiny_model().save_pretrained(d)
    return d


def calibration(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 32), generator=gen), torch.randint(0, VOCAB, (48,), generator=gen)]


@pytest.fixture(scope="module")
def rht_checkpoint(tiny_dir, tmp_path_factory):
    """A complete RHT + LDLQ checkpoint of the tiny model (read-only)."""
    out = tmp_path_factory.mktemp("ck") / "rht-ldlq"
    return qc.quantize_model(tiny_dir, FMT, calibration=calibration(), out_dir=out, rht=True, seed=3, progress=False)


def files_of(d: Path):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def correlated_hessian(k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) * 0.3 + torch.eye(k)
    X = torch.randn(2 * k, k, generator=gen) @ mix + 0.5 * torch.randn(1, k, generator=gen)
    return (X.T @ X / X.shape[0]).double()


# --- the format: RTN unchanged, RHT, LDLQ ---------------------------------------------------------------
def reference_rtn(W, scale=None, group=128):
    """int4-g128 round to nearest as it was before RHT/LDLQ existed (bit-exact reference)."""
    fmt = qc.formats.get(FMT)
    n, k = W.shape
    W = W.detach().to(torch.float32)
    g = W.reshape(n, k // group, group)
    s = g.abs().amax(dim=2) / 7 if scale is None else g.pow(2).mean(dim=2).sqrt() / float(scale)
    s16 = s.to(torch.float16)
    s16 = torch.where(s16 == 0, torch.ones_like(s16), s16)
    q = torch.round(g / s16.to(torch.float32).unsqueeze(2)).clamp(-8, 7)
    u = (q + 8).to(torch.int64).reshape(n, k)
    return fmt.pack(u), s16


@pytest.mark.parametrize("scale", [None, 2.0])
def test_rtn_path_is_bit_identical(scale):
    fmt = qc.formats.get(FMT)
    W = torch.randn(48, 384, generator=torch.Generator().manual_seed(7)) * 0.05
    W[3, :128] = 0.0  # an all-zero group
    qw = fmt.quantize(W, scale=scale)
    qweight, scales = reference_rtn(W, scale)
    assert set(qw.tensors) == {"qweight", "scales"} and not qw.rht
    assert torch.equal(qw.tensors["qweight"], qweight) and torch.equal(qw.tensors["scales"], scales)
    assert qw.meta == {"bits": 4, "group": 128}


def test_rht_round_trip():
    fmt = qc.formats.get(FMT)
    n, k = 96, 384  # 96 = 12·8 and 384 = 12·32: both sides use the K_h = 12 factor
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(2))
    qw = fmt.quantize(W, rht=True, seed=5)
    assert qw.rht and qw.meta["rht"] is True
    SU, SV = qw.tensors["SU"], qw.tensors["SV"]
    assert SU.dtype == SV.dtype == torch.float16 and SU.shape == (k,) and SV.shape == (n,)
    assert set(SU.abs().tolist()) == {1.0} and not torch.equal(SU[:n], SV)  # ±1, different draws
    fmt.check_qweight(qw)
    # dequantize = the stored decode taken back to the original basis, exactly
    W_hat = fmt.dequantize(qw)
    assert W_hat.dtype == torch.float32
    assert torch.equal(W_hat, unrht_weight(fmt.decode_fp16(qw).float(), SU.float(), SV.float()))
    rel = ((W_hat - W).pow(2).mean() / W.pow(2).mean()).item()
    assert rel < 0.02  # int4 accuracy (Gaussian: ~0.014)
    # the codes are those of RTN on the rotated weight
    qweight, scales = reference_rtn(rht_weight(W, SU.float(), SV.float()))
    assert torch.equal(qw.tensors["qweight"], qweight) and torch.equal(qw.tensors["scales"], scales)
    # bits per weight count the sign vectors: 4.125 + 16 (n + k) / (n k)
    assert qw.bits_per_weight == pytest.approx(4.125 + 16 * (n + k) / (n * k))
    # deterministic in the seed
    again, other = fmt.quantize(W, rht=True, seed=5), fmt.quantize(W, rht=True, seed=6)
    assert all(torch.equal(again.tensors[t], qw.tensors[t]) for t in qw.tensors)
    assert not torch.equal(other.tensors["SU"], SU)


def test_ldlq_beats_rtn_and_keeps_the_scales():
    fmt = qc.formats.get(FMT)
    n, k = 64, 256
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    H = correlated_hessian(k)
    for rht in (False, True):
        rtn = fmt.quantize(W, hessian=H, ldlq=False, rht=rht, seed=1)
        ldlq = fmt.quantize(W, hessian=H, rht=rht, seed=1)  # ldlq defaults to on with a Hessian
        assert rtn.meta["ldlq"] is False and ldlq.meta["ldlq"] is True
        assert ldlq.meta["proxy_loss"] < 0.9 * rtn.meta["proxy_loss"], (rht, ldlq.meta, rtn.meta)
        assert torch.equal(ldlq.tensors["scales"], rtn.tensors["scales"])  # LDLQ only changes the codes
        # the recorded loss (computed in the RHT basis) is the loss in the original basis
        direct = proxy_loss(W.double(), fmt.dequantize(ldlq).double(), H)
        assert ldlq.meta["proxy_loss"] == pytest.approx(direct, rel=1e-3)
    # RTN with a Hessian: same codes as without one, the loss recorded
    assert torch.equal(fmt.quantize(W, hessian=H, ldlq=False).tensors["qweight"], fmt.quantize(W).tensors["qweight"])


def test_rht_hessian_is_the_consistent_transform():
    k = 128
    H = correlated_hessian(k, seed=4)
    SU = random_signs(k, 9)
    W = torch.randn(8, k, dtype=torch.float64)
    SV = random_signs(8, 10)
    a = torch.trace(W @ H @ W.T)
    Wt = rht_weight(W, SU, SV)
    assert torch.trace(Wt @ rht_hessian(H, SU) @ Wt.T).item() == pytest.approx(a.item(), rel=1e-9)


BAD_FORMAT_INPUTS = {
    "nan weight": (lambda: (torch.full((8, 128), float("nan")), {"rht": True}), "NaN or Inf"),
    "inf weight": (lambda: (torch.tensor([[float("inf")] + [0.0] * 127]), {}), "NaN or Inf"),
    "hessian shape": (lambda: (torch.randn(8, 128), {"hessian": torch.eye(64)}), "64x64 but the weight has 128"),
    "hessian not square": (lambda: (torch.randn(8, 128), {"hessian": torch.ones(128, 64)}), "square"),
    "hessian not psd": (lambda: (torch.randn(8, 128), {"hessian": -torch.eye(128, dtype=torch.float64)}),
                        "not positive semidefinite"),
    "hessian nan": (lambda: (torch.randn(8, 128), {"hessian": torch.full((128, 128), float("nan"))}), "NaN"),
    "rht dim": (lambda: (torch.randn(10, 128), {"rht": True}), r"out_features=10: no Hadamard construction for n=10"),
    "ldlq without hessian": (lambda: (torch.randn(8, 128), {"ldlq": True}), "LDLQ needs a Hessian"),
}


@pytest.mark.parametrize("case", list(BAD_FORMAT_INPUTS))
def test_bad_format_inputs_are_clear_errors(case):
    make, msg = BAD_FORMAT_INPUTS[case]
    W, kwargs = make()
    with pytest.raises(QCompileError, match=msg) as info:
        qc.formats.get(FMT).quantize(W, **kwargs)
    assert "\n" not in str(info.value)


def test_check_qweight_wants_both_signs():
    fmt = qc.formats.get(FMT)
    qw = fmt.quantize(torch.randn(16, 128), rht=True)
    bad = QuantizedWeight(qw.format, qw.shape, {k: v for k, v in qw.tensors.items() if k != "SV"})
    with pytest.raises(QCompileError, match="SV"):
        fmt.check_qweight(bad)
    bad = QuantizedWeight(qw.format, qw.shape, dict(qw.tensors, SU=qw.tensors["SU"][:64]))
    with pytest.raises(QCompileError, match="SU"):
        fmt.dequantize(bad)


# --- checkpoints: layout, determinism, resume ---------------------------------------------------------------
def test_checkpoint_layout(rht_checkpoint, tiny_dir):
    names = set(files_of(rht_checkpoint))
    assert {"config.json", "model.safetensors", "layers/layer_000.safetensors", "layers/layer_001.safetensors"} <= names
    assert not [n for n in names if ".tmp-" in n]
    config = json.loads((rht_checkpoint / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "qcompile" and q["format"] == FMT and q["complete"] is True
    assert q["rht"] is True and q["ldlq"] is True and q["seed"] == 3 and q["sigma"] == 0.01
    assert q["calibration"]["source"] == "user" and q["calibration"]["tokens"] == 4 * 32 + 48
    assert len(q["layers"]) == 14 and config["hidden_size"] == 128
    q0 = q["layers"]["model.layers.0.mlp.down_proj"]
    assert q0["shape"] == [128, 384] and 0 < q0["proxy_loss"] < 0.05
    assert q0["bits_per_weight"] == pytest.approx(4.125 + 16 * (128 + 384) / (128 * 384))
    quantized, state, _ = load_checkpoint(rht_checkpoint)
    assert set(quantized) == set(q["layers"]) and all(qw.rht for qw in quantized.values())
    assert "model.embed_tokens.weight" in state and "lm_head.weight" in state
    assert not any(k.endswith("proj.weight") for k in state)
    # the dequantized model is close to the original one
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = dequantized_model(rht_checkpoint)(ids).logits
        want = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()(ids).logits
    assert (got - want).abs().max() < 0.3 * want.abs().max()


def test_same_seed_same_bytes(rht_checkpoint, tiny_dir, tmp_path):
    again = qc.quantize_model(tiny_dir, FMT, calibration=calibration(), out_dir=tmp_path / "again", rht=True, seed=3,
                              progress=False)
    assert files_of(again) == files_of(rht_checkpoint)
    other = qc.quantize_model(tiny_dir, FMT, calibration=calibration(), out_dir=tmp_path / "other", rht=True, seed=4,
                              progress=False)
    assert files_of(other)["layers/layer_000.safetensors"] != files_of(again)["layers/layer_000.safetensors"]


def test_resume_after_interruption(rht_checkpoint, tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "ck"
    real_write = ckpt.write_layer_file

    def write_then_die(directory, index, entries, digest):
        if index == 1:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while layer 1 was being written
        return real_write(directory, index, entries, digest)

    monkeypatch.setattr(ckpt, "write_layer_file", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        qc.quantize_model(tiny_dir, FMT, calibration=calibration(), out_dir=out, rht=True, seed=3, progress=False)
    monkeypatch.setattr(ckpt, "write_layer_file", real_write)
    assert sorted(p.name for p in (out / "layers").iterdir()) == ["layer_000.safetensors"]
    with pytest.raises(QCompileError, match=r"incomplete \(1 of 2 layers written\)"):
        load_checkpoint(out)
    with pytest.raises(QCompileError, match="incomplete"):
        build(out, None, "llvm", tmp_path / "art", progress=None)

    fmt = qc.formats.get(FMT)
    calls = []
    real_quantize = fmt.quantize

    def counting(W, *args, **kwargs):
        calls.append(tuple(W.shape))
        return real_quantize(W, *args, **kwargs)

    monkeypatch.setattr(fmt, "quantize", counting)
    lines = []
    qc.quantize_model(tiny_dir, FMT, calibration=calibration(), out_dir=out, rht=True, seed=3, progress=lines.append)
    assert len(calls) == 7  # only layer 1's linears
    assert any("resuming: 1 of 2 layers" in line for line in lines)
    assert files_of(out) == files_of(rht_checkpoint)  # bit-identical to the uninterrupted run
    # a complete checkpoint with the same settings: nothing to do
    calls.clear()
    qc.quantize_model(tiny_dir, FMT, calibration=calibration(), out_dir=out, rht=True, seed=3, progress=False)
    assert calls == []


def test_damaged_layer_file_is_reported_and_requantized_on_resume(rht_checkpoint, tiny_dir, tmp_path):
    out = tmp_path / "ck"
    shutil.copytree(rht_checkpoint, out)
    layer = out / "layers" / "layer_001.safetensors"
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(QCompileError, match=r"layers/layer_001\.safetensors .* corrupted or was modified") as info:
        load_checkpoint(out)
    assert "\n" not in str(info.value)
    layer.write_bytes(bytes(data[:100]))  # half-written (e.g. copied by hand)
    with pytest.raises(QCompileError, match="damaged or half-written"):
        ckpt.read_layer_file(layer, 1)
    # an incomplete checkpoint with a damaged layer file: the resumed run redoes that layer
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["complete"] = False
    (out / "config.json").write_text(json.dumps(config))
    lines = []
    qc.quantize_model(tiny_dir, FMT, calibration=calibration(), out_dir=out, rht=True, seed=3, progress=lines.append)
    assert any("layer 1: the existing file is unusable" in line for line in lines)
    assert files_of(out) == files_of(rht_checkpoint)


def test_other_settings_are_refused_unless_overwrite(rht_checkpoint, tiny_dir, tmp_path):
    out = tmp_path / "ck"
    shutil.copytree(rht_checkpoint, out)
    with pytest.raises(QCompileError, match=r"other settings \(rht True vs False.*--overwrite") as info:
        qc.quantize_model(tiny_dir, FMT, calibration=calibration(), out_dir=out, rht=False, seed=3, progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(QCompileError, match="calibration"):
        qc.quantize_model(tiny_dir, FMT, calibration=calibration(2), out_dir=out, rht=True, seed=3, progress=False)
    qc.quantize_model(tiny_dir, FMT, out_dir=out, ldlq=False, progress=False, overwrite=True)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["ldlq"] is False and q["rht"] is False and q["calibration"] is None and q["complete"]
    assert all(v["proxy_loss"] is None for v in q["layers"].values())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(QCompileError, match="not a qcompile checkpoint"):
        qc.quantize_model(tiny_dir, FMT, out_dir=foreign, ldlq=False, progress=False, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep"


def test_bad_model_inputs_are_clear_errors(tiny_dir, tmp_path):
    cases = [
        (lambda: qc.quantize_model(tiny_dir, FMT, calibration=[], out_dir=tmp_path / "a", progress=False),
         "calibration set is empty"),
        (lambda: qc.quantize_model(tiny_dir, FMT, calibration=[torch.tensor([1, 2, VOCAB])], out_dir=tmp_path / "a",
                                   progress=False), r"token id 100 outside the model's vocabulary \[0, 100\)"),
        (lambda: qc.quantize_model(tiny_dir, FMT, calibration=[torch.rand(2, 8)], out_dir=tmp_path / "a",
                                   progress=False), "integer tensor of token ids"),
        (lambda: qc.quantize_model(tiny_model(intermediate_size=128 * 11), FMT, ldlq=False, rht=True,
                                   out_dir=tmp_path / "a", progress=False),
         r"layer model\.layers\.0\.mlp\.gate_proj: cannot apply the RHT to out_features=1408: no Hadamard"),
        (lambda: qc.quantize_model(tiny_model(hidden_size=96, num_attention_heads=4), FMT, ldlq=False,
                                   out_dir=tmp_path / "a", progress=False), "not a multiple of the group size 128"),
        (lambda: qc.quantize_model(tiny_dir, "int5-g7", out_dir=tmp_path / "a", progress=False), "unknown format"),
        (lambda: qc.quantize_model(tiny_dir, FMT, out_dir=tmp_path / "a", context=4096, progress=False),
         "context must be between 2 and the model's 128 positions"),
    ]
    nan_model = tiny_model()
    with torch.no_grad():
        nan_model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    cases.append((lambda: qc.quantize_model(nan_model, FMT, ldlq=False, out_dir=tmp_path / "a", progress=False),
                  r"layer model\.layers\.1\.self_attn\.o_proj: int4-g128: weight contains NaN or Inf"))
    for run, msg in cases:
        with pytest.raises(QCompileError, match=msg) as info:
            run()
        assert "\n" not in str(info.value)
    assert not (tmp_path / "a" / "layers").exists()


def test_default_calibration_without_a_corpus_warns(tiny_dir, tmp_path):
    with pytest.warns(UserWarning, match="RANDOM token ids"):
        out = qc.quantize_model(tiny_dir, FMT, out_dir=tmp_path / "ck", n_calibration=4, context=16, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["calibration"]["source"] == "random" and q["calibration"]["tokens"] == 64 and q["ldlq"] is True


# --- build from a checkpoint ----------------------------------------------------------------------------
@pytest.mark.parametrize("rht", [False, True])
def test_build_from_checkpoint_matches_dequantized_model(rht, rht_checkpoint, tiny_dir, tmp_path):
    if rht:
        ck = rht_checkpoint
    else:
        ck = qc.quantize_model(tiny_dir, FMT, calibration=calibration(), out_dir=tmp_path / "ck", progress=False)
    if rht:
        art = build(ck, None, "llvm", tmp_path / "art", buckets=(1, 16), progress=None)
    else:  # through the CLI: no --format, the checkpoint carries it
        art = tmp_path / "art"
        assert cli_main(["build", str(ck), "-t", "llvm", "-o", str(art), "--buckets", "1,16", "-q"]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert all(layer["rht"] is rht for layer in manifest["layers"])
    config = json.loads((art / "config.json").read_text())["quantization_config"]
    assert config["rht"] is rht and config["checkpoint"]["ldlq"] is True
    model = qc.load(art)
    lin = model.model.layers[0].mlp.down_proj
    assert type(lin).__name__ == "QuantLinear" and lin.rht is rht
    ref = dequantized_model(ck)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    err = (got - want).abs().max().item()
    assert err < 0.03, err  # the tolerance of test_build.py: fp16 activations and kernel sums
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
    if rht:  # the RHT runs inside torch.compile(fullgraph=True) too
        compiled = torch.compile(lin, backend="aot_eager", fullgraph=True, dynamic=True)
        x = torch.randn(3, 384)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), lin(x))


def test_build_checkpoint_format_rules(rht_checkpoint, tiny_dir, tmp_path):
    from qcompile.formats.groupwise import GroupwiseIntFormat

    other = GroupwiseIntFormat(4, 128)
    other.name = "int4-other"
    with pytest.raises(QCompileError, match="is quantized to int4-g128, not int4-other; drop --format"):
        build(rht_checkpoint, other, "llvm", tmp_path / "art", progress=None)
    with pytest.raises(QCompileError, match="--format is required"):
        build(tiny_dir, None, "llvm", tmp_path / "art", progress=None)
    with pytest.raises(QCompileError, match="already a quantized checkpoint"):
        qc.quantize_model(rht_checkpoint, FMT, out_dir=tmp_path / "ck2", progress=False)
    assert cli_main(["build", str(tiny_dir), "-t", "llvm", "-o", str(tmp_path / "art")]) == 2
    assert not (tmp_path / "art").exists()


# --- CLI ---------------------------------------------------------------------------------------------------
def test_cli_quantize_and_eval_ppl(tiny_dir, tmp_path, monkeypatch, capsys):
    from qcompile.model import evaluate as E

    out = tmp_path / "ck"
    assert cli_main(["quantize", str(tiny_dir), "--format", FMT, "--rht", "--no-ldlq", "--seed", "2", "-o", str(out),
                     "--quiet"]) == 0
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["rht"] is True and q["ldlq"] is False and q["seed"] == 2 and q["complete"]
    assert cli_main(["quantize", str(tiny_dir), "--format", FMT, "-o", str(out), "--quiet", "--no-ldlq"]) == 2
    assert "--overwrite" in capsys.readouterr().err

    # eval ppl of a checkpoint: the dequantized model on (here: stand-in) test tokens
    ids = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(E, "load_test_tokens", lambda tok, split="test", max_tokens=None: ids)
    monkeypatch.setattr(Q, "_corpus_info", lambda split: {"package": "stand-in", "version": "0", "split_sha256": "x"})
    assert cli_main(["eval", "ppl", str(out), "--context", "64", "--stride", "32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    want = E.perplexity(dequantized_model(out), ids, 64, 32)
    assert r["kind"] == "checkpoint" and r["ppl"] == pytest.approx(want.ppl, rel=1e-6) and r["tokens"] == 299
    assert cli_main(["eval", "ppl", str(out), "--context", "64", "--stride", "32"]) == 0
    assert "ppl" in capsys.readouterr().out

    # anything else goes to evaluate.eval_ppl
    seen = {}

    def fake_eval_ppl(path=None, **kwargs):
        seen.update(kwargs, path=path)
        return {"ppl": 12.5, "nll": math.log(12.5), "tokens": 10, "windows": 1, "context": kwargs["context"],
                "stride": kwargs["stride"], "split": "test", "path": str(path), "kind": "model", "device": "cpu",
                "corpus": {}, "truncated_to": None, "seconds": 0.0}

    monkeypatch.setattr(E, "eval_ppl", fake_eval_ppl)
    assert cli_main(["eval", "ppl", str(tiny_dir), "--context", "128", "--max-tokens", "50"]) == 0
    assert seen["path"] == str(tiny_dir) and seen["context"] == 128 and seen["stride"] == E.DEFAULT_STRIDE
    assert seen["max_tokens"] == 50 and "12.5" in capsys.readouterr().out


# --- quality table -----------------------------------------------------------------------------------------
def test_quality_table(tmp_path, monkeypatch):
    from qcompile.model import evaluate as E
    from qcompile.model.default import seeded_tokenizer

    model_dir = tmp_path / "tiny-tok"
    tiny_model(vocab_size=258).save_pretrained(model_dir)
    seeded_tokenizer().save_pretrained(model_dir)
    ids = torch.randint(0, 258, (200,), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(E, "load_test_tokens", lambda tok, split="test", max_tokens=None: ids)
    monkeypatch.setattr(Q, "_corpus_info", lambda split: {"package": "stand-in", "version": "0", "split_sha256": "x"})
    out = tmp_path / "bench" / "quality.json"
    old = {"model": "tiny-tok", "context": 64, "stride": 32, "tokens": 199,
           "corpus": {"package": "stand-in", "version": "0", "split_sha256": "x"},
           "rows": [{"format": "fp16", "rht": False, "ldlq": False, "ppl": 1.0, "bits_per_weight": 16.0},
                    {"format": "e8p-2", "rht": True, "ldlq": True, "ppl": 9.0, "bits_per_weight": 2.0}]}
    out.parent.mkdir()
    out.write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="RANDOM"):
        table = Q.quality_table(model_dir, [FMT], out=out, context=64, stride=32, work_dir=tmp_path / "work",
                                n_calibration=4, calibration_context=32, progress=None)
    saved = json.loads(out.read_text())
    assert saved == table and saved["model"] == "tiny-tok" and saved["context"] == 64
    rows = [(r["format"], r["rht"], r["ldlq"]) for r in saved["rows"]]
    assert rows == [("fp16", False, False), ("e8p-2", True, True), (FMT, False, False), (FMT, True, False),
                    (FMT, False, True), (FMT, True, True)]
    fp16 = saved["rows"][0]
    assert fp16["ppl"] != 1.0 and fp16["bits_per_weight"] == 16.0
    for r in saved["rows"][2:]:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and r["proxy_loss_mean"] > 0
        assert r["bits_per_weight"] == pytest.approx(4.125, abs=0.3)
    by = {(r["rht"], r["ldlq"]): r for r in saved["rows"][2:]}
    assert by[(False, True)]["proxy_loss_mean"] < by[(False, False)]["proxy_loss_mean"]
    md = Q.markdown_table(saved)
    assert "| int4-g128 | yes | yes |" in md and "| fp16 |" in md
    # a rerun reuses the four checkpoints (same settings)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("layer_000.safetensors")}
    assert len(stamps) == 4
    with pytest.warns(UserWarning, match="RANDOM"):
        Q.quality_table(model_dir, [FMT], out=None, context=64, stride=32, work_dir=tmp_path / "work",
                        n_calibration=4, calibration_context=32, progress=None)
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_cli_eval_quality_wiring(tmp_path, monkeypatch, capsys):
    seen = {}
    table = {"model": "m", "context": 64, "stride": 32, "tokens": 10,
             "rows": [{"format": "fp16", "rht": False, "ldlq": False, "ppl": 3.0, "bits_per_weight": 16.0}]}

    def fake(model_dir, formats, **kwargs):
        seen.update(kwargs, model_dir=model_dir, formats=formats)
        return table

    monkeypatch.setattr(Q, "quality_table", fake)
    out = tmp_path / "q.json"
    assert cli_main(["eval", "quality", "--formats", FMT, "--out", str(out), "--context", "64",
                     "--calibration-samples", "8", "--markdown"]) == 0
    assert seen["formats"] == [FMT] and seen["out"] == str(out) and seen["context"] == 64
    assert seen["n_calibration"] == 8 and seen["model_dir"] is None
    assert "| fp16 | - | - | 16.000 | 3.000 | - |" in capsys.readouterr().out


REPO = Path(__file__).resolve().parents[1]
PREPARED = REPO / ".models-data" / "tinyllama"


@pytest.mark.skipif(not (PREPARED / "data.json").is_file(), reason="no prepared token data (.models-data/tinyllama)")
def test_default_calibration_uses_the_prepared_train_tokens(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("QCOMPILE_MODELS_DATA", str(REPO / ".models-data"))
    model_dir = tmp_path / "tiny-4096"
    tiny_model(vocab_size=4096).save_pretrained(model_dir)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(PREPARED / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(model_dir)
    out = qc.quantize_model(model_dir, FMT, out_dir=tmp_path / "ck", n_calibration=4, context=32, progress=False)
    calib = json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]
    assert calib["source"] == "corpus" and calib["split"] == "train" and calib["via"] == "prepared tokens"
    assert calib["samples"] == 4 and calib["tokens"] == 128
    assert (out / "tokenizer.json").is_file()


def test_formats_that_always_use_the_rht_record_it(tiny_dir, tmp_path):
    """E8P and the QTIP trellises quantize in the RHT basis whatever is asked; the checkpoint says so."""
    import json

    from qcompile.model.quantize import quantize_model

    out = quantize_model(tiny_dir, "e8p-2", calibration=calibration(), out_dir=tmp_path / "ck",
                         rht=False, ldlq=False, progress=False)
    qcfg = json.loads((Path(out) / "config.json").read_text())["quantization_config"]
    assert qcfg["rht"] is True
