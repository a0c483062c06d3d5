"""qcompile bench without a GPU: the JSON schema, the byte and bandwidth arithmetic, the L2
rotation arithmetic, the plot, the names, and the one-line error where there is no GPU."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import qcompile as qc
from qcompile.bench import harness, timing
from qcompile.bench.harness import (bandwidth_fraction, bench_document, check_bench_document, format_table,
                                    gpu_short_name, kernel_bytes, make_record, parse_ms, parse_shapes,
                                    source_commit, write_bench_json)
from qcompile.bench.plot import plot_bench
from qcompile.errors import QCompileError
from qcompile.formats import get as get_format

COPY_BW = 3000.0  # GB/s


def synthetic_records():
    fmt = get_format("int4-g128")
    records = []
    for n, k in [(4096, 4096), (28672, 8192)]:
        for m, us, fp16_us, int4_us in [(1, 7.5, 15.6, 6.8), (16, 9.0, 15.9, None), (256, 60.0, 30.0, 80.0)]:
            records.append(make_record(fmt.name, n, k, m, us, fp16_us, int4_us, fmt.weight_bytes(n, k), COPY_BW,
                                       rel_err=3e-4, timing_modes={"qcompile": "graph"}))
    return records


def synthetic_doc():
    return bench_document("NVIDIA H100 80GB HBM3", "abc1234-dirty", COPY_BW, synthetic_records(),
                          format="int4-g128", tvm_version="0.27.0")


def test_json_has_exactly_the_schema_types(tmp_path):
    path = tmp_path / "b.json"
    write_bench_json(path, synthetic_doc())
    doc = json.loads(path.read_text())
    assert isinstance(doc["device"], str) and isinstance(doc["commit"], str)
    assert type(doc["copy_bandwidth_GBps"]) is float
    assert len(doc["records"]) == 6
    required = {"format": str, "N": int, "K": int, "M": int, "us": float, "cublas_fp16_us": float,
                "speedup_vs_fp16": float, "bandwidth_fraction": float}
    for r in doc["records"]:
        for key, typ in required.items():
            assert type(r[key]) is typ, (key, r[key])
        assert r["torch_int4_us"] is None or type(r["torch_int4_us"]) is float
        assert r["rel_err"] == 3e-4  # extra keys survive
    assert [r["torch_int4_us"] for r in doc["records"][:3]] == [6.8, None, 80.0]
    check_bench_document(doc)


def test_schema_check_rejects_wrong_types():
    doc = synthetic_doc()
    doc["records"][0]["N"] = 4096.0
    with pytest.raises(ValueError, match="N"):
        check_bench_document(doc)
    doc = synthetic_doc()
    del doc["records"][1]["cublas_fp16_us"]
    with pytest.raises(ValueError, match="cublas_fp16_us"):
        check_bench_document(doc)
    doc = synthetic_doc()
    doc["records"][2]["us"] = float("nan")
    with pytest.raises(ValueError):
        check_bench_document(doc)
    with pytest.raises(ValueError, match="overwrite"):
        make_record("int4-g128", 1, 128, 1, 1.0, 1.0, None, 64, COPY_BW, speedup_vs_fp16=2.0)


def test_bytes_and_bandwidth_fraction():
    fmt = get_format("int4-g128")
    weight = fmt.weight_bytes(4096, 4096)
    assert weight == 4096 * 4096 // 2 + 4096 * (4096 // 128) * 2  # int4 codes + fp16 group scales
    assert kernel_bytes(weight, 4096, 4096, 16) == weight + 16 * 4096 * 2 + 16 * 4096 * 2
    assert kernel_bytes(100, n=10, k=20, m=3) == 100 + 3 * 20 * 2 + 3 * 10 * 2
    # 3 GB in one second against a 3000 GB/s copy is one thousandth
    assert bandwidth_fraction(3_000_000_000, 1e6, 3000.0) == pytest.approx(1e-3)
    assert bandwidth_fraction(3_000_000, 1.0, 3000.0) == pytest.approx(1.0)
    r = make_record("int4-g128", 4096, 4096, 1, 5.0, 15.0, 7.0, weight, COPY_BW)
    assert r["speedup_vs_fp16"] == pytest.approx(3.0)
    assert r["bytes"] == weight + 4096 * 2 + 4096 * 2
    assert r["bandwidth_fraction"] == pytest.approx(r["bytes"] / 5e-6 / 3000e9)


def test_rotation_copies_cover_twice_the_l2():
    l2 = 50 * 2**20
    fp16_4096 = 4096 * 4096 * 2  # 32 MiB: 100 MiB needs 4 copies
    assert timing.rotation_copies(fp16_4096, l2) == 4
    assert timing.rotation_copies(25 * 2**20, l2) == 4  # exact multiple: no extra copy
    assert timing.rotation_copies(25 * 2**20 - 1, l2) == 5
    int4_4096 = get_format("int4-g128").weight_bytes(4096, 4096)  # ~8.25 MiB
    n = timing.rotation_copies(int4_4096, l2)
    assert n * int4_4096 >= 2 * l2 > (n - 1) * int4_4096
    assert timing.rotation_copies(28672 * 8192 * 2, l2) == 2  # larger than the L2: still two
    with pytest.raises(ValueError):
        timing.rotation_copies(0, l2)
    # a graph holds whole rotations, so every replay starts on a cold copy
    assert timing.launches_per_graph(1) == 10
    assert timing.launches_per_graph(4) == 12
    assert timing.launches_per_graph(13) == 13


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where no GPU reports an L2")
def test_l2_defaults_to_50_mb_without_gpu():
    assert timing.l2_cache_bytes() == 50 * 2**20


def test_timing_summary_is_the_median():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0], launches=5, mode="events")
    assert (t.median_us, t.p10_us, t.p90_us) == (3.0, 1.0, 5.0)
    assert timing.copy_test_bytes(50 * 2**20, 80 * 2**30) == 1 << 30
    assert timing.copy_test_bytes(50 * 2**20, 512 * 2**20) == 200 * 2**20  # little free memory: 4x L2


def test_plot_writes_png(tmp_path):
    path = plot_bench(synthetic_doc(), tmp_path / "sub" / "b.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from PIL import Image

    with Image.open(path) as img:  # a palette image (a third of the RGBA bytes), no temp file left
        assert img.mode == "P" and img.size[0] > 500
    assert [p.name for p in path.parent.iterdir()] == ["b.png"]
    empty = bench_document("NVIDIA H100", "unknown", COPY_BW, [])
    assert plot_bench(empty, tmp_path / "empty.png").exists()


def test_table_lists_every_record():
    text = format_table(synthetic_doc())
    lines = text.splitlines()
    assert len(lines) == 2 + 6 + 1
    assert "n/a" in lines[3]  # the record without a torch int4 time
    assert "3000 GB/s" in lines[-1]


def test_names():
    assert gpu_short_name("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_short_name("NVIDIA H200") == "h200"
    assert gpu_short_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_short_name("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert gpu_short_name("NVIDIA H100 PCIe") == "h100"
    assert harness.default_name("int4-g128", "NVIDIA H100 80GB HBM3") == "int4-g128-h100"


def test_commit_is_unknown_without_git(tmp_path):
    assert source_commit(tmp_path) == "unknown"


def test_model_shape_presets_are_every_linear_fused_and_not():
    """--shapes llama-2-7b etc.: q/o, k/v (GQA), gate/up, down and the fused qkv and gate/up of the
    QuIP#/QTIP checkpoints, each distinct shape once, mixable with NxK items."""
    assert parse_shapes("llama-2-7b") == [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096)]
    assert parse_shapes("Llama-3-8B") == [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (6144, 4096),
                                          (28672, 4096)]
    assert parse_shapes("llama-2-70b")[-2:] == [(10240, 8192), (57344, 8192)]
    assert (13824, 5120) in parse_shapes("llama-2-13b") and (27648, 5120) in parse_shapes("llama-2-13b")
    assert parse_shapes("4096x4096,llama-2-7b")[:2] == [(4096, 4096), (11008, 4096)]
    assert len(parse_shapes("llama-2-7b,llama-2-13b,llama-2-70b,llama-3-8b")) == 21
    with pytest.raises(QCompileError, match="or a model \\(llama-2-7b, "):
        parse_shapes("llama-9b")
    for fmt_name in ("int4-g128", "e8p-2", "qtip-hyb-2"):  # every preset shape is one the formats take
        fmt = qc.formats.get(fmt_name)
        for n, k in parse_shapes("llama-2-7b,llama-2-13b,llama-2-70b,llama-3-8b"):
            fmt.check_shape(n, k)


def test_bench_plan_times_the_routes_build_compiles():
    """The bench times what a GPU build of the format runs: int4/E8P compile 32 and 64 (one mma.sync
    launch each; M=128 then takes the decode route), QTIP HYB splits M=32 and 64 into M=16 launches and
    decodes from 65, 1MAD/3INST decode from 17; --fused-gemm only where the GEMM family serves."""
    ms = [1, 4, 16, 32, 64, 128, 256, 1024]
    p = harness.bench_plan("e8p-2", ms)
    assert p.buckets == (1, 4, 16, 32, 64) and p.decode_from == 128
    assert p.bucket_ms == (1, 4, 16, 32, 64) and p.gemm_ms == (128, 256, 1024)
    assert [p.route(m) for m in ms] == ["fused"] * 3 + ["split"] * 2 + ["decode_cublas"] * 3
    h = harness.bench_plan("qtip-hyb-2", ms)
    assert h.buckets == (1, 4, 16) and h.decode_from == 65 and h.bucket_ms == (1, 4, 16)
    assert [h.route(m) for m in (16, 32, 64, 128)] == ["fused", "split", "split", "decode_cublas"]
    assert harness.bench_plan("qtip-3inst-2", ms).route(32) == "decode_cublas"
    assert harness.bench_plan("int4-g128", ms, decode_min_m=0).route(1024) == "split"
    assert harness.bench_plan("int4-g128", [96], decode_min_m=0).bucket_ms == (32, 64)  # 96 = 64 + 32
    # a threshold at or below 16 moves small Ms to the decode route, as the runtime's KernelModule.decodes
    low = harness.bench_plan("qtip-hyb-2", [1, 4, 8, 16], decode_min_m=4)
    assert [low.route(m) for m in (1, 4, 8, 16)] == ["fused", "decode_cublas", "decode_cublas", "decode_cublas"]


def test_argument_errors_are_one_line():
    assert parse_shapes("4096x4096, 11008X4096") == [(4096, 4096), (11008, 4096)]
    assert parse_ms("1,4,16") == [1, 4, 16]
    for bad in ("4096", "4096x", "0x128", "axb"):
        with pytest.raises(QCompileError) as err:
            parse_shapes(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(QCompileError):
        parse_ms("1,0")
    with pytest.raises(QCompileError, match="group size"):
        harness.main(["--shapes", "4096x100"])
    with pytest.raises(QCompileError, match="unknown format"):
        harness.main(["--format", "int3-g7"])
    # several formats: each checked before anything runs; --name names one output only
    assert [f.name for f in harness.parse_formats("e8p-2, int4-g128,e8p-2 ")] == ["e8p-2", "int4-g128"]
    assert [f.name for f in harness.parse_formats("all")] == qc.formats.names()
    with pytest.raises(QCompileError, match="names no format"):
        harness.parse_formats(" , ")
    with pytest.raises(QCompileError, match="unknown format"):
        harness.main(["--format", "int4-g128,int3-g7"])
    with pytest.raises(QCompileError, match="--name names one output"):
        harness.main(["--format", "int4-g128,e8p-2", "--name", "x"])
    with pytest.raises(QCompileError, match="e8p-2: weight shape 4104x128"):  # int4 takes it, E8P does not
        harness.main(["--format", "int4-g128,e8p-2", "--shapes", "4104x128"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_bench_without_gpu_is_a_one_line_error(tmp_path):
    with pytest.raises(QCompileError) as err:
        harness.main(["--shapes", "4096x4096", "--m", "1", "--out-dir", str(tmp_path)])
    message = str(err.value)
    assert message.startswith("qcompile bench needs a CUDA GPU;") and "\n" not in message
    assert not any(tmp_path.iterdir())  # nothing written

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "qcompile.bench.harness", "--m", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: qcompile bench needs a CUDA GPU;")


def test_roofline_plot_across_formats(tmp_path):
    from qcompile.bench.plot import plot_roofline

    a, b = synthetic_doc(), synthetic_doc()
    for r in b["records"]:
        r["format"] = "e8p-2"
    b["format"] = "e8p-2"
    assert plot_roofline([a, b], tmp_path / "r.png").stat().st_size > 1000
    b["records"] = [dict(r, N=r["N"] + 16) for r in b["records"]]  # no shape in common
    with pytest.raises(ValueError, match="share no layer shape"):
        plot_roofline([a, b], tmp_path / "r2.png")


def test_markdown_table_of_a_bench_record(tmp_path, capsys):
    from qcompile.bench import table

    rec = dict(format="e8p-2", N=256, K=512, cublas_fp16_us=20.0, bandwidth_fraction=0.5)
    doc = {"format": "e8p-2", "commit": "abc1234", "device": "GPU", "records": [
        dict(rec, M=1, us=5.0, speedup_vs_fp16=4.0, route="fused"),
        dict(rec, M=32, us=10.0, speedup_vs_fp16=2.0, route="split"),
        dict(rec, M=1024, us=40.0, speedup_vs_fp16=0.5, route="decode_cublas"),
        dict(rec, M=64, us=None, speedup_vs_fp16=None, route="split")]}  # a failed measurement: no cell
    rows = table.markdown(doc).splitlines()
    assert rows[0] == "| N × K | M=1 | cuBLAS fp16 | speedup | bw fraction | M=32 | M=1024 |"
    assert rows[2] == "| 256 × 512 | 5.0 µs | 20.0 µs | 4.00× | 0.50 | 2.00×ˢ | 0.50×ᵈ |"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    assert table.main([str(path)]) == 0 and "commit abc1234" in capsys.readouterr().out
    path.write_text("{not json")
    assert table.main([str(path)]) == 2
    assert "not a readable bench record" in capsys.readouterr().err


def test_bench_records_are_written_one_row_a_line(tmp_path):
    """rows_json: a list of rows, or an object holding lists of rows, reads back equal, one row a line
    (the records stay readable and small); NaN is refused, not written."""
    import math

    from qcompile.jsonio import rows_json, write_rows_json

    doc = {"device": "H100", "copy_bandwidth_GBps": 3006.4, "records": [{"N": 1, "us": 2.5}, {"N": 2, "us": None}],
           "empty": [], "meta": {"a": [1, 2]}}
    path = tmp_path / "b.json"
    write_rows_json(path, doc)
    text = path.read_text()
    assert json.loads(text) == doc
    assert '\n{"N":1,"us":2.5},\n{"N":2,"us":null}\n' in text
    assert json.loads(rows_json([{"x": 1}])) == [{"x": 1}] and rows_json([{"x": 1}]).count("\n") == 3
    # floats to 6 significant digits, ints and strings as they are
    assert json.loads(rows_json([{"us": 54.27839756011963, "err": 0.00020430282751957962, "n": 28672, "f": "a"}])) \
        == [{"us": 54.2784, "err": 0.000204303, "n": 28672, "f": "a"}]
    with pytest.raises(ValueError):
        rows_json([{"x": math.nan}])


def test_profile_one_builds_the_kernel_it_names_and_refuses_bad_input_in_one_line(capsys):
    """qcompile.bench.profile_one --compile-only: the library default and an mma config with a switch
    build to CUDA (no GPU); a bad config field, shape list, switch or --config on the library kernel is
    one line on stderr and exit status 2."""
    from qcompile.bench import profile_one

    assert profile_one.main(["--format", "qtip-hyb-2", "--shape", "256x1024", "--compile-only"]) == 0
    assert profile_one.main(["--format", "qtip-hyb-3", "--shape", "256x1024", "--family", "mma",
                             "--config", "lut_shared=4", "--flag", "lane-copy-min", "--compile-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    out = [line for line in lines if not line.startswith("  ")]  # (indented: ptxas's resources, where nvcc is)
    assert out[0].startswith("qtip-hyb-2 N=256 K=1024 M=1 library default: ") and out[0].endswith(" bytes of CUDA")
    assert "mma units=1" in out[1] and "lut_shared=4" in out[1]
    if shutil.which("nvcc"):
        assert any(re.fullmatch(r"  main_kernel: \d+ registers, \d+ bytes static shared memory, 0 bytes spilled", line)
                   for line in lines), lines
    base = ["--format", "qtip-hyb-2", "--compile-only"]
    for argv, problem in ((["--shape", "256x1024", "--family", "mma", "--config", "bogus=1"], "not FIELD=INT"),
                          (["--shape", "256x1024,512x1024"], "2 shapes"),
                          (["--shape", "256x1024", "--flag", "nope"], "unknown switch"),
                          (["--shape", "256x1024", "--config", "tiles=2"], "needs --family mma")):
        assert profile_one.main(base + argv) == 2, argv
        err = capsys.readouterr().err
        assert problem in err and err.count("\n") == 1, (argv, err)


PTXAS_REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'main_kernel_1' for 'sm_90'
ptxas info    : Function properties for main_kernel_1
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 384 bytes cmem[0]
ptxas info    : Compiling entry function 'main_kernel' for 'sm_90'
ptxas info    : Function properties for main_kernel
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 63 registers, used 1 barriers, 32768 bytes smem, 400 bytes cmem[0]
"""


def test_ptxas_report_parses_per_kernel():
    """kernels.resources.parse_ptxas_report: registers, static shared memory, stack and spills (stores +
    loads) per kernel; a kernel without shared memory has 0."""
    from qcompile.kernels.resources import KernelResources, parse_ptxas_report

    assert parse_ptxas_report(PTXAS_REPORT) == {"main_kernel_1": KernelResources(12, 0, 0, 0),
                                                "main_kernel": KernelResources(63, 32768, 8, 8)}
    assert parse_ptxas_report("no kernels here") == {}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas) for the resources")
def test_kernel_resources_of_a_compiled_kernel_and_bad_source_in_one_line():
    """kernel_resources compiles generated CUDA with nvcc: the HYB-2 M=1 fragment kernel with its 16 lane
    copies reports 32 KiB of static shared memory and no spills; source nvcc rejects is one line."""
    import tvm

    from qcompile.errors import QCompileError
    from qcompile.kernels.library import cuda_source
    from qcompile.kernels.mma import MmaConfig, mma_scheduled_func
    from qcompile.kernels.pipeline import compile_module
    from qcompile.kernels.resources import kernel_resources

    func = mma_scheduled_func("qtip-hyb-2", 256, 1024, 1, MmaConfig(units=1, tiles=2, warps_k=4, lut_shared=2))
    mod = tvm.IRModule({"k": func.with_attr("global_symbol", "k").with_attr("tirx.is_scheduled", True)})
    res = kernel_resources(cuda_source(compile_module(mod, tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))))
    assert set(res) == {"k_kernel"} and res["k_kernel"].shared_bytes == 32768 and res["k_kernel"].spill_bytes == 0
    assert 16 <= res["k_kernel"].registers <= 255
    with pytest.raises(QCompileError, match="nvcc could not compile") as info:
        kernel_resources("this is not CUDA")
    assert "\n" not in str(info.value)


# what nvdisasm -c prints for one kernel (abridged): a loop from .L_x_1 back to it, a short one inside it,
# and a forward branch
SASS_TEXT = """
        .section        .text.main_kernel,"ax",@progbits
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0020*/                   LDG.E.CONSTANT R2, desc[UR4][R4.64] ;
        /*0030*/                   SHF.R.U32.HI R3, RZ, 0x4, R2 ;
        /*0040*/                   LOP3.LUT R3, R3, 0xf0, RZ, 0xc0, !PT ;
.L_x_2:
        /*0050*/                   IMAD.HI.U32 R5, R2, 0x10000000, RZ ;
        /*0060*/                   HADD2 R6, R5, R3 ;
        /*0070*/               @P0 BRA `(.L_x_2) ;
        /*0080*/                   HMMA.16816.F32 R8, R12, R14, R8 ;
        /*0090*/                   IMAD R7, R7, 0x2, R7 ;
        /*00a0*/              @!P1 BRA `(.L_x_3) ;
        /*00b0*/                   ISETP.NE.AND P1, PT, R7, RZ, PT ;
        /*00c0*/               @P1 BRA `(.L_x_1) ;
.L_x_3:
        /*00d0*/                   EXIT ;
        .section        .text.other_kernel,"ax",@progbits
        /*0000*/                   EXIT ;
"""


def test_sass_loop_mix_counts_the_longest_loop_by_pipe(monkeypatch):
    """parse_sass_loop takes the widest backward branch (.L_x_1 .. its BRA, not the inner .L_x_2 loop nor
    the forward branch), strips predicates, and counts the ALU pipe (SHF, LOP3, ISETP) and the FMA pipe
    (IMAD, IMAD.HI); the ALU pipe's half rate bounds the pass. A kernel without a loop has none; without
    nvdisasm the loop mix is one clear error."""
    from qcompile.errors import QCompileError
    from qcompile.kernels import resources
    from qcompile.kernels.resources import _kernel_bodies, parse_sass_loop

    bodies = _kernel_bodies(SASS_TEXT)
    assert set(bodies) == {"main_kernel", "other_kernel"}
    mix = parse_sass_loop(bodies["main_kernel"])
    assert mix.instructions == 11 and mix.alu == 3 and mix.fma == 2
    assert mix.by_opcode["BRA"] == 3 and mix.by_opcode["IMAD.HI.U32"] == 1 and "MOV" not in mix.by_opcode
    assert mix.bound_cycles == 11
    assert parse_sass_loop(bodies["other_kernel"]) is None
    monkeypatch.setattr(resources, "find_nvdisasm", lambda: None)
    with pytest.raises(QCompileError, match="needs nvdisasm") as info:
        resources.sass_loop_mix("__global__ void k() {}")
    assert "\n" not in str(info.value)


def test_device_run_plan_runs_each_line_logs_failures_and_goes_on(tmp_path):
    """tests/gpu/device_run.sh plan FILE LIMIT_S (what one device call of the next GPU session runs): every
    step in turn under the time left, comments and blank lines skipped, a failing step logged with its
    exit status and the plan going on, each step's files in $OUT. (The steps here need no GPU.)"""
    plan = tmp_path / "t.plan"
    plan.write_text("# a comment\n\nviterbi v1 --formats qtip-3inst-2 --sequences 2 --engines tir\n"
                    "sweep bad --no-such-option\n"
                    "viterbi v2 --formats qtip-3inst-2 --sequences 2 --engines tir-min\n")
    out = tmp_path / "out"
    script = os.path.join(os.path.dirname(__file__), "gpu", "device_run.sh")
    run = subprocess.run(["bash", script, "plan", str(plan), "300"], env={**os.environ, "OUT": str(out)},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    log = (out / "plan.log").read_text()
    steps = [line for line in log.splitlines() if line.startswith("== ") and "left):" in line]
    assert [s.split("left): ")[1].split()[0:2] for s in steps] == [["viterbi", "v1"], ["sweep", "bad"], ["viterbi", "v2"]]
    rcs = [line.split()[2] for line in log.splitlines() if line.startswith("== rc ")]
    assert rcs[0] == "0" and rcs[1] != "0" and rcs[2] == "0"
    for name in ("v1", "v2"):
        assert json.loads((out / f"{name}.json").read_text())["rows"][0]["format"] == "qtip-3inst-2"


def test_check_and_time_times_only_right_results():
    """harness.check_and_time (tc_sweep's and wgmma_sweep's rows): a wrong or unwritten result gets an
    error and is not timed; a right one gets its median time."""
    from types import SimpleNamespace

    class Bench:  # records what it was asked to time
        def __init__(self):
            self.timed = []

        def time(self, method, n, k, m):
            self.timed.append((method.name, n, k, m))
            return SimpleNamespace(median_us=12.5)

    ref = torch.randn(4, 8, dtype=torch.float64)
    said = []
    for Y, expect in ((ref.to(torch.float16), 12.5), (ref.to(torch.float16) * 2, None),
                      (torch.full((4, 8), float("nan"), dtype=torch.float16), None)):
        row, bench = {"N": 8, "K": 16, "M": 4}, Bench()
        us = harness.check_and_time(row, bench, None, torch.zeros(4, 16), None, Y, ref, "here:", said.append, 1e-2)
        assert us == expect and row.get("us") == expect
        assert bench.timed == ([("qcompile", 8, 16, 4)] if expect else [])
        assert ("error" in row) == (expect is None)
    assert len(said) == 2 and abs(float(said[0].rsplit(" ", 1)[1]) - 1) < 1e-3 and said[1] == "here: WRONG rel_err None"
