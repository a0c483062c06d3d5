"""qcompile bench on a real GPU: a small run writes a valid JSON whose kernels are correct."""
import json

import pytest
import torch

from qcompile.bench import harness

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_small_bench_writes_valid_json(tmp_path, capsys):
    """M=1 and 16 (one kernel each), 48 (the bucket plan's launches) and 256 (decode + cuBLAS): every
    route of the harness runs and is checked."""
    rc = harness.main(["--shapes", "4096x4096", "--m", "1,16,48,256", "--iters", "30", "--warmup", "3",
                       "--name", "small", "--out-dir", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "small.json").read_text())
    harness.check_bench_document(doc)
    assert (tmp_path / "small.png").read_bytes()[:4] == b"\x89PNG"
    assert doc["copy_bandwidth_GBps"] > 100  # any datacenter GPU copies far faster
    assert [(r["N"], r["K"], r["M"]) for r in doc["records"]] == [(4096, 4096, m) for m in (1, 16, 48, 256)]
    for r in doc["records"]:
        assert r["format"] == "int4-g128"
        assert r["rel_err"] is not None and r["rel_err"] < 1e-2
        assert 0 < r["us"] < 10_000 and 0 < r["cublas_fp16_us"] < 10_000
        assert 0 < r["bandwidth_fraction"] < 1.5
        if r["torch_int4_us"] is not None:  # where torch's int4 kernel runs, it runs our codes
            assert r["torch_int4_rel_err"] < 5e-2
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "4096" in out


def test_bench_of_several_formats_writes_each_and_a_roofline(tmp_path):
    rc = harness.main(["--format", "int4-g128,e8p-2", "--shapes", "4096x4096", "--m", "1", "--iters", "20",
                       "--warmup", "2", "--out-dir", str(tmp_path)])
    assert rc == 0
    docs = sorted(tmp_path.glob("*.json"))
    assert len(docs) == 2 and len(list(tmp_path.glob("roofline-*.png"))) == 1
    for path in docs:
        doc = json.loads(path.read_text())
        harness.check_bench_document(doc)
        assert path.name.startswith(doc["format"] + "-") and path.with_suffix(".png").is_file()
        assert all(r["rel_err"] is not None and r["rel_err"] < 1e-2 for r in doc["records"])


def test_tc_sweep_times_a_switch_and_records_kernel_resources(tmp_path):
    """tc_sweep on the GPU: the default mma config of qtip-hyb-2 at M=1 and the same with --flag half-a,
    both correct, each row with its kernels' registers and static shared memory (--resources)."""
    from qcompile.bench import tc_sweep

    out = tmp_path / "sweep.json"
    rc = tc_sweep.main(["--family", "mma", "--format", "qtip-hyb-2", "--m", "1", "--shapes", "256x1024",
                        "--no-variants", "--flag", "half-a", "--resources", "--iters", "5", "--warmup", "1",
                        "--out", str(out)])
    assert rc == 0
    rows = [r for r in json.loads(out.read_text()) if r["cfg"] is not None]
    assert [r["kernel"] for r in rows] == ["mma-default", "mma-default-half-a"]
    for r in rows:
        assert r["error"] is None and r["rel_err"] < 1e-2, r
        (res,) = r["resources"].values()
        assert res["registers"] > 0 and res["shared_bytes"] == 32768 and res["spill_bytes"] == 0, r
