"""build -> artifact -> load on the CPU (llvm), input validation, tampering, cross-compiling for sm_90."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qcompile as qc
from qcompile.kernels.library import MMA_DECODE_MIN_M_M16
from qcompile.cli import main as cli_main
from qcompile.model import build as build_module
from qcompile.model.build import build
from qcompile.model.default import SEEDED_NAME, TRAINED_NAME, find_default_model, seeded_model, seeded_tokenizer

REPO = Path(__file__).resolve().parents[1]
FORMAT = "int4-g128"
LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def leftovers(parent: Path):
    """Temporary or moved-aside directories a build may leave next to its output."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- the default model ------------------------------------------------------------------------------------
def test_default_model_is_deterministic():
    a, b = seeded_model().state_dict(), seeded_model().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = seeded_tokenizer()
    ids = tok("héllo").input_ids
    assert ids == [256, 104, 195, 169, 108, 108, 111]  # <s> then the UTF-8 bytes
    assert tok.decode(ids, skip_special_tokens=True) == "héllo"


def test_find_default_model_prefers_trained(tmp_path, monkeypatch, default_model):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(default_model.parents[1]))
    assert find_default_model() == default_model
    trained = default_model.parent / TRAINED_NAME
    trained.mkdir()
    try:
        (trained / "config.json").write_text("{}")
        assert find_default_model() == trained
    finally:
        shutil.rmtree(trained)


# --- a good build ---------------------------------------------------------------------------------------------
def test_artifact_contents(llvm_artifact):
    files = sorted(os.listdir(llvm_artifact))
    for name in ("manifest.json", "kernels.so", "model.safetensors", "config.json", "tokenizer.json"):
        assert name in files
    assert not leftovers(llvm_artifact.parent)
    manifest = json.loads((llvm_artifact / "manifest.json").read_text())
    assert manifest["target"] == "llvm" and manifest["format"] == FORMAT
    assert manifest["buckets"] == [1, 4, 16]
    # the large-M route (qcompile.kernels.decode); the llvm build has buckets 1, 4, 16 (no 64), so its
    # crossover is the M=16-block one
    assert manifest["decode_min_m"] == {FORMAT: MMA_DECODE_MIN_M_M16}
    assert manifest["qcompile_version"] == qc.__version__ and manifest["tvm_version"]
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    layers = manifest["layers"]
    assert len(layers) == 2 * 7 and {layer["name"].rsplit(".", 1)[1] for layer in layers} == LINEAR_NAMES
    q0 = next(layer for layer in layers if layer["name"] == "model.layers.0.self_attn.q_proj")
    assert q0["shape"] == [256, 256] and q0["kernels"][0] == "int4_g128_n256_k256_m1"
    assert q0["decode_kernel"] == "decode_int4_g128_n256_k256"

    config = json.loads((llvm_artifact / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == "qcompile" and qcfg["format"] == FORMAT
    assert qcfg["bits_per_weight"] == pytest.approx(4.125)  # 4-bit codes + one fp16 scale per 128
    assert len(qcfg["modules"]) == 14

    with safe_open(str(llvm_artifact / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    assert "model.layers.0.self_attn.q_proj.qweight" in keys and "model.layers.1.mlp.down_proj.scales" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert {"lm_head.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"} <= keys


def test_logits_match_dequantized_model(llvm_artifact, default_model, dequantized_reference):
    model = qc.load(llvm_artifact)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    tok = model.qcompile_tokenizer
    ids = tok(["The quick brown fox", "jumps over the dog!"], return_tensors="pt").input_ids  # M = 2 x 20
    ref = dequantized_reference(default_model)
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
        unquantized = type(ref).from_pretrained(str(default_model), dtype=torch.float32).eval()(ids).logits
    # What differs from the reference: activations rounded to fp16 before each linear, outputs
    # rounded to fp16 after it, fp16 sums of 8 products inside the kernels; 14 layers of that.
    # Logits here have std ~1 and int4 rounding itself moves them by ~1, so 0.03 is ~30x tighter
    # than the quantization error: a wrong layer, scale or bucket would fail.
    quant_error = (unquantized - want).abs().max().item()
    err = (got - want).abs().max().item()
    assert err < 0.03, err
    assert quant_error > 10 * err, (quant_error, err)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_generate_and_cli(llvm_artifact, capsys):
    model = qc.load(llvm_artifact)
    tok = model.qcompile_tokenizer
    ids = tok("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 4 and torch.equal(out[0, :ids.shape[1]], ids[0])
    assert model.qcompile_manifest["target"] == "llvm"

    assert cli_main(["inspect", str(llvm_artifact), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "llvm" in text and "int4-g128" in text and "sha256 verified" in text
    assert cli_main(["run", str(llvm_artifact), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("hello")


def test_default_model_and_overwrite(llvm_artifact, default_model, tmp_path, monkeypatch):
    out = copy_artifact(llvm_artifact, tmp_path / "art")
    with pytest.raises(qc.QCompileError, match="already exists"):
        build(default_model, FORMAT, "llvm", out, progress=None)
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(default_model.parents[1]))
    messages = []
    build(None, FORMAT, "llvm", out, buckets=(1, 8), progress=messages.append, overwrite=True)
    assert any(SEEDED_NAME in m for m in messages)
    assert json.loads((out / "manifest.json").read_text())["buckets"] == [1, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    model = qc.load(out)
    with torch.no_grad():  # M = 11 runs as one padded block of 8 plus a padded block of 8 (3 rows)
        assert model(torch.arange(11)[None]).logits.shape == (1, 11, 258)


def test_overwrite_refuses_a_foreign_directory(default_model, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(qc.QCompileError, match="not a qcompile artifact"):
        build(default_model, FORMAT, "llvm", out, progress=None, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_failure_late_in_build_leaves_nothing(default_model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build_module, "write_manifest", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build(default_model, FORMAT, "llvm", tmp_path / "out", buckets=(1,), progress=None)
    assert list(tmp_path.iterdir()) == []


# --- bad input ----------------------------------------------------------------------------------------------
def gpt2_dir(root: Path) -> Path:
    d = root / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    return d


def hidden96_dir(root: Path) -> Path:
    from transformers import LlamaConfig

    d = root / "llama96"
    LlamaConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64).save_pretrained(d)
    return d


BAD_INPUTS = {
    "missing dir": (lambda root, good: root / "no-such-model", {}, "does not exist"),
    "not a dir": (lambda root, good: good / "config.json", {}, "not a directory"),
    "gpt2 config": (lambda root, good: gpt2_dir(root), {}, "'gpt2' model"),
    "unknown format": (lambda root, good: good, {"format": "int5-g7"}, "unknown format 'int5-g7'"),
    "unknown target": (lambda root, good: good, {"target": "tpu-v5"}, "unknown target 'tpu-v5'"),
    "old gpu": (lambda root, good: good, {"target": "sm_70"}, "older than sm_80"),
    "bad buckets": (lambda root, good: good, {"buckets": "1,x"}, "invalid M buckets"),
    "hidden 96": (lambda root, good: hidden96_dir(root), {},
                  r"layer model\.layers\.0\.self_attn\.q_proj \(96x96\).*in_features=96 is not a multiple of"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error(case, tmp_path, default_model):
    make_dir, overrides, message = BAD_INPUTS[case]
    model_dir = make_dir(tmp_path, default_model)
    out_root = tmp_path / "outputs"
    out_root.mkdir()
    kwargs = {"format": FORMAT, "target": "llvm", "buckets": (1, 4), **overrides}
    with pytest.raises(qc.QCompileError, match=message) as info:
        build(model_dir, kwargs.pop("format"), kwargs.pop("target"), out_root / "out", progress=None, **kwargs)
    assert "\n" not in str(info.value)
    assert list(out_root.iterdir()) == []  # no out_dir, no temp dir


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qcompile", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_user_errors_exit_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("build", str(tmp_path / "missing"), "--format", FORMAT, "--target", "llvm", "-o", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model directory {tmp_path / 'missing'} does not exist"]
    proc = run_cli("build", str(gpt2_dir(tmp_path)), "--format", FORMAT, "--target", "llvm", "-o", str(out))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: ") and "gpt2" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_cli_errors_in_process(tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no manifest.json" in err and err.count("\n") == 1
    assert cli_main(["build", "-f", FORMAT, "-t", "llvm", "-o", str(tmp_path / "o"), "--buckets", "0"]) == 2


# --- loading refuses damaged or foreign artifacts -------------------------------------------------------------
def test_tampered_weights_are_refused(llvm_artifact, tmp_path):
    art = copy_artifact(llvm_artifact, tmp_path / "art")
    weights = art / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(qc.QCompileError, match=r"artifact file model\.safetensors is corrupted or was modified "
                                              r"\(sha256 mismatch\); rebuild it with qcompile build"):
        qc.load(art)


def test_missing_or_broken_manifest(llvm_artifact, tmp_path):
    with pytest.raises(qc.QCompileError, match="does not exist"):
        qc.load(tmp_path / "nothing")
    art = copy_artifact(llvm_artifact, tmp_path / "art")
    (art / "kernels.so").unlink()
    with pytest.raises(qc.QCompileError, match="kernels.so is missing"):
        qc.load(art)
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(qc.QCompileError, match="not valid JSON"):
        qc.load(art)
    (art / "manifest.json").unlink()
    with pytest.raises(qc.QCompileError, match="not a qcompile artifact"):
        qc.load(art)


def test_target_mismatch_is_refused(llvm_artifact, tmp_path):
    art = copy_artifact(llvm_artifact, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    local = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        local = f"sm_{major}{minor}"
    arch = "sm_90" if local != "sm_90" else "sm_80"
    manifest["target"] = f"cuda-{arch}"
    (art / "manifest.json").write_text(json.dumps(manifest))
    here = "no CUDA GPU" if local is None else local
    with pytest.raises(qc.QCompileError, match=f"built for {arch} GPUs but .*{here}") as info:
        qc.load(art)
    assert "\n" not in str(info.value)
    with pytest.raises(qc.QCompileError, match="built for the CPU"):
        qc.load(llvm_artifact, device="cuda")


# --- cross-compiling for a GPU on this machine ---------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="nvcc is not installed (needed to compile the fatbin)")
def test_cross_compile_for_sm90(default_model, tmp_path, monkeypatch):
    if shutil.which("nvcc") is None:
        monkeypatch.setenv("PATH", "/usr/local/cuda/bin" + os.pathsep + os.environ["PATH"])
    # a GEMV and an mma.sync bucket (int4 M=64: one launch), a fraction of the default's compile time
    out = build(default_model, FORMAT, "sm_90", tmp_path / "art-sm90", buckets=(1, 64), progress=None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "cuda-sm_90" and manifest["buckets"] == [1, 64]
    assert manifest["decode_min_m"] == {FORMAT: 128}  # the 64 bucket is there: decode + cuBLAS from 128
    assert manifest["kernels"] == {"library": "kernels.so", "fatbin": "kernels.fatbin", "source": "kernels.cu"}
    assert {"kernels.so", "kernels.fatbin", "kernels.cu"} <= set(manifest["files"])
    assert (out / "kernels.fatbin").stat().st_size > 1000
    source = (out / "kernels.cu").read_text()
    for layer in manifest["layers"]:
        for name in layer["kernels"]:
            assert name in source
    if not torch.cuda.is_available():  # and here it refuses to load, saying why
        with pytest.raises(qc.QCompileError, match="built for sm_90 GPUs but this machine has no CUDA GPU"):
            qc.load(out)
