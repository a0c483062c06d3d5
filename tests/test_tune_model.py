"""`qcompile tune MODEL_OR_CHECKPOINT` (CPU side): the kernels it derives are the ones `qcompile build`
compiles, bad argument combinations are one-line errors, and with a fake measurer the model path
tunes exactly the derived kernels."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qcompile.cli import main as cli_main
from qcompile.kernels.library import GEMV_MAX_M, TC_MIN_M, KernelSpec
from qcompile.model.build import build, kernel_shapes, model_layers
from qcompile.tune import space
from qcompile.tune.records import TuningRecords

FORMAT = "int4-g128"
REPO = Path(__file__).resolve().parents[1]


def manifest_of(artifact):
    return json.loads((Path(artifact) / "manifest.json").read_text())


def manifest_shapes(manifest):
    return sorted({(layer["format"], *layer["shape"]) for layer in manifest["layers"]})


def manifest_kernel_names(manifest):
    return {name for layer in manifest["layers"] for name in layer["kernels"]}


@pytest.fixture(scope="module")
def checkpoint(default_model, tmp_path_factory):
    """A round-to-nearest int4-g128 checkpoint of the default model (no calibration needed)."""
    from qcompile.model.quantize import quantize_model

    out = tmp_path_factory.mktemp("ck") / "tiny-int4-rtn"
    return quantize_model(default_model, FORMAT, out_dir=out, ldlq=False, progress=False)


def test_model_shapes_are_the_build_manifest_shapes(default_model, llvm_artifact):
    shapes = kernel_shapes(default_model, FORMAT)
    manifest = manifest_of(llvm_artifact)
    assert shapes == manifest_shapes(manifest) and len(shapes) > 1
    expected = {KernelSpec(f, n, k, m).name for f, n, k in shapes for m in manifest["buckets"]}
    assert expected == manifest_kernel_names(manifest)
    fmt, layers = model_layers(default_model, FORMAT)
    assert fmt.name == FORMAT
    assert sorted(layers) == sorted(layer["name"] for layer in manifest["layers"])


def test_checkpoint_shapes_are_the_build_manifest_shapes(default_model, checkpoint, tmp_path):
    from qcompile.model.checkpoint import load_checkpoint

    shapes = kernel_shapes(checkpoint)  # the format comes from the checkpoint
    assert shapes == kernel_shapes(checkpoint, FORMAT) == kernel_shapes(default_model, FORMAT)
    quantized, _, _ = load_checkpoint(checkpoint)
    assert model_layers(checkpoint)[1] == {p: (qw.format, *qw.shape) for p, qw in quantized.items()}
    out = build(checkpoint, None, "llvm", tmp_path / "art", buckets=(1,), progress=None, records=False)
    manifest = manifest_of(out)
    assert manifest_shapes(manifest) == shapes
    assert manifest_kernel_names(manifest) == {KernelSpec(f, n, k, 1).name for f, n, k in shapes}


def bad_cases(model, ck, artifact):
    return {
        "nothing": (["tune"], "give a model directory or checkpoint"),
        "both": (["tune", model, "-f", FORMAT, "--shapes", "256x1024"], "not both"),
        "shapes without format": (["tune", "--shapes", "256x1024"], "--shapes needs --format"),
        "model without format": (["tune", model], "--format is required"),
        "model, unknown format": (["tune", model, "-f", "int4-g99"], "unknown format"),
        "checkpoint, other format": (["tune", ck, "-f", "e8p-2"], "quantized to int4-g128, not e8p-2"),
        "missing directory": (["tune", str(Path(model) / "nope"), "-f", FORMAT], "does not exist"),
        "artifact": (["tune", artifact, "-f", FORMAT], "built qcompile artifact"),
        "only GEMM buckets": (["tune", model, "-f", FORMAT, "--m", "128,256"], "only the GEMV, mma.sync and WMMA buckets"),
        "bad m": (["tune", ck, "--m", "1,x"], "--m"),
        "bad target": (["tune", ck, "--target", "tpu", "--dry-run"], "unknown target"),
    }


def test_bad_combinations_are_one_line_errors(default_model, checkpoint, llvm_artifact, capsys):
    cases = bad_cases(str(default_model), str(checkpoint), str(llvm_artifact))
    for name, (argv, expected) in cases.items():
        assert cli_main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, (name, err)


def test_dry_run_lists_the_derived_kernels(default_model, checkpoint, capsys):
    """GEMV and mma.sync buckets are both tuned (each named with its family); GEMM buckets are not."""
    shapes = kernel_shapes(default_model, FORMAT)
    for argv in (["tune", str(default_model), "-f", FORMAT], ["tune", str(checkpoint)],
                 ["tune", str(checkpoint), "-f", FORMAT]):
        assert cli_main(argv + ["--m", f"1,4,{TC_MIN_M},16,64,128", "--dry-run"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith("note: M 128 run GEMM kernels with no tuning space yet")
        assert out[1].startswith(f"{5 * len(shapes)} kernels to tune ({len(shapes)} shapes) from ")
        assert [re.sub(r"=\s+", "=", line).split() for line in out[2:]] == [
            [f, f"N={n}", f"K={k}", "M=1", "gemv+mma", f"M=4,{TC_MIN_M},16,64", "mma"] for f, n, k in shapes]
    # the default --m: the buckets build compiles (1, 4, 16 and int4's 32, 64 on mma.sync)
    assert cli_main(["tune", str(checkpoint), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{5 * len(shapes)} kernels to tune")
    assert out[1].split()[-4:] == ["M=1", "gemv+mma", "M=4,16,32,64", "mma"]
    # QTIP HYB: M=1 on mma.sync too (the GEMV its alternative), up to 16, so M=32 is a GEMM bucket there
    # (noted, not tuned)
    assert cli_main(["tune", "--format", "qtip-hyb-2", "--shapes", "256x512", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-4:] == ["M=1", "mma+gemv", "M=4,16", "mma"]
    assert cli_main(["tune", "--format", "qtip-hyb-2", "--shapes", "256x512", "--no-alternatives", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-2:] == ["M=1,4,16", "mma"]
    assert cli_main(["tune", "--format", "qtip-hyb-2", "--shapes", "256x512", "--m", "4,32", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("note: M 32 run GEMM kernels") and out[1].startswith("1 kernels to tune")
    # several formats with --shapes (one records file each), model presets for the shapes
    assert cli_main(["tune", "--format", "e8p-2,qtip-hyb-2", "--shapes", "llama-2-7b", "--m", "1,16", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("20 kernels to tune (10 shapes) from --shapes")
    assert [line.split()[0] for line in out[1:]] == ["e8p-2"] * 5 + ["qtip-hyb-2"] * 5
    # the families measured per bucket (--alternatives, the default)
    assert cli_main(["tune", "--format", "qtip-1mad-2", "--shapes", "256x512", "--m", "1,2,4,16", "--alternatives",
                     "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-6:] == [
        "M=1", "gemv", "M=2,4", "gemv+tensorcore", "M=16", "tensorcore"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_validation_comes_first_then_the_cuda_line(default_model):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "qcompile", "tune", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    proc = run(str(default_model), "-f", FORMAT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: qcompile tune measures candidates on a CUDA GPU")
    proc = run(str(default_model))  # bad input gets its own error, not the GPU one
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: ") and "--format is required" in proc.stderr


def fake_us(cfg) -> float:
    if space.family_of(cfg) == "tensorcore":
        return 5.0 + cfg.n_tile / 64 + cfg.stages * 0.1
    if space.family_of(cfg) == "mma":
        return 4.0 + cfg.tiles * 0.1 + cfg.warps_k * 0.01
    return 10.0 + abs(cfg.rows - 2) + cfg.chunks * 0.1


def test_model_path_tunes_exactly_the_derived_kernels(default_model, tmp_path, monkeypatch, capsys):
    import qcompile.kernels.target as target_mod
    import qcompile.tune.measure as measure_mod
    import qcompile.tune.records as records_mod

    calls = []

    class FakeMeasure:
        def __call__(self, spec, cfg, kernel):
            assert callable(kernel)
            calls.append((spec, space.config_key(cfg)))
            return fake_us(cfg)

    monkeypatch.setattr(measure_mod, "require_cuda", lambda: None)
    monkeypatch.setattr(measure_mod, "CudaMeasure", FakeMeasure)
    monkeypatch.setattr(target_mod, "local_cuda_arch", lambda: "sm_90")
    monkeypatch.setattr(records_mod, "local_gpu_name", lambda: "h100")
    records = tmp_path / "rec"
    argv = ["tune", str(default_model), "-f", FORMAT, "-t", "sm_90", "--m", "1,4,16,64,128", "--budget", "1",
            "--order", "space", "--records", str(records), "--no-alternatives"]
    assert cli_main(argv) == 0
    expected = [KernelSpec(f, n, k, m) for f, n, k in kernel_shapes(default_model, FORMAT) for m in (1, 4, 16, 64)]
    assert [spec for spec, _ in calls] == expected  # each once, GEMM buckets left out
    assert all(key == space.config_key(space.default_config(spec)) for spec, key in calls)
    assert {space.config_key(space.default_config(spec)).split("=")[0] for spec in expected} == {"rows", "units"}
    stored = TuningRecords(records)
    assert all(stored.entry(spec, "h100").tried_count == 1 for spec in expected)
    doc = json.loads((records / "h100" / f"{FORMAT}.json").read_text())
    assert sorted((e["n"], e["k"], e["m"], e["kernel"]) for e in doc["entries"]) == sorted(
        (s.n, s.k, s.m, "mma" if s.m > 1 else "gemv") for s in expected)
    out = capsys.readouterr().out
    assert f"{len(expected)} kernels to tune" in out and f"records: {records / 'h100' / (FORMAT + '.json')}" in out
    assert " M=16 mma units=" in out and " M=1 gemv rows=" in out  # progress names the family


def test_a_checkpoint_missing_a_layer_file_is_one_line(checkpoint, tmp_path, capsys):
    import shutil

    broken = tmp_path / "ck"
    shutil.copytree(checkpoint, broken)
    (broken / "layers" / "layer_000.safetensors").unlink()
    assert cli_main(["tune", str(broken), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layers/layer_000.safetensors is missing" in err
    (broken / "layers" / "layer_000.safetensors").write_bytes(b"not safetensors")
    assert cli_main(["tune", str(broken), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is damaged" in err
