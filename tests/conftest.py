"""Shared test setup: the `gpu` marker skips where torch sees no CUDA GPU, and the expensive
fixtures (the seeded default model, an llvm artifact built from it) are made once per session."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many small matrix/Viterbi ops: on a small machine shared with other jobs,
    OpenMP spinning with 2 threads makes small LAPACK and elementwise calls far slower than one.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def qcompile_cache(tmp_path_factory):
    """A private cache root, so tests neither read nor write ~/.cache/qcompile."""
    return tmp_path_factory.mktemp("qcompile-cache")


@pytest.fixture(scope="session")
def default_model(qcompile_cache):
    """Directory of the seeded default model (written once per session)."""
    from qcompile.model.default import default_model_dir

    return default_model_dir(qcompile_cache)


@pytest.fixture(scope="session")
def llvm_artifact(default_model, tmp_path_factory):
    """The default model built for the CPU (llvm) with the default buckets; treat it as read-only
    (copy it before modifying)."""
    from qcompile.model.build import build

    out = tmp_path_factory.mktemp("artifacts") / "tiny-int4-llvm"
    return build(default_model, "int4-g128", "llvm", out, progress=None)


def _dequantized_reference(model_dir, fmt_name="int4-g128", device="cpu"):
    """The fp32 torch model with each decoder linear replaced by format.dequantize of its
    quantization, and the tensors an artifact stores in fp16 rounded to fp16: what a built
    artifact must compute."""
    from transformers import AutoModelForCausalLM

    import qcompile as qc
    from qcompile.model.build import decoder_linears

    fmt = qc.formats.get(fmt_name)
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        quantized = set()
        for path, linear in decoder_linears(ref):
            linear.weight.copy_(fmt.dequantize(fmt.quantize(linear.weight)))
            quantized.add(f"{path}.weight")
        for name, p in ref.named_parameters():
            if name not in quantized:
                p.copy_(p.half().float())
    return ref.to(device)


@pytest.fixture(scope="session")
def dequantized_reference():
    """``dequantized_reference(model_dir, fmt_name="int4-g128", device="cpu")`` (see above)."""
    return _dequantized_reference


def _check_graph_replay(module, inputs, atol=1e-2, rtol=1e-2):
    """Capture ``module(x)`` in a CUDA graph for each x, replay it on new values of x, and check
    the replay equals an eager call on those values (and differs from the first output)."""
    for x in inputs:
        with torch.no_grad():
            eager = module(x)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the default stream, as capture requires
                module(x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = module(x)
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(captured, module(x), atol=atol, rtol=rtol)
            assert not torch.equal(captured, eager)


@pytest.fixture(scope="session")
def check_graph_replay():
    """``check_graph_replay(module, inputs)`` (see above)."""
    return _check_graph_replay


def _check_one_hot_decode(fn, fmt, qw, m, label=""):
    """Run kernel ``fn(X, *packed tensors, Y)`` on one-hot activation rows, which read decoded columns
    back exactly (1*w is exact, the other products are zeros, and so is their sum in fp16 or fp32):
    96 columns = every position of three 32-column decode units, against ``fmt.decode_fp16``. Values,
    not bit patterns: a decoded -0.0 comes out as +0.0 after the zero-initialised sum."""
    import torch

    n, k = qw.shape
    ref = fmt.decode_fp16(qw)
    args = [qw.tensors[name].cuda() for name in fmt.tensor_specs(n, k)]
    for start in range(0, 96, m):
        cols = torch.arange(start, start + m) * 13 % k
        X = torch.zeros(m, k, dtype=torch.float16, device="cuda")
        X[torch.arange(m), cols.cuda()] = 1.0
        Y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        fn(X, *args, Y)
        got, want = Y.cpu(), ref[:, cols].T.contiguous()
        assert torch.isfinite(got).all() and torch.equal(got, want), f"{label} columns {cols.tolist()}"


@pytest.fixture(scope="session")
def check_one_hot_decode():
    return _check_one_hot_decode


def _run_host_cpp(directory, source: str) -> None:
    """Compile ``source`` (CUDA device code behind a host shim) with the host's g++ in ``directory`` and
    run it there (its inputs and outputs are files of that directory); a compile error fails the test
    with the compiler's message. Skips where there is no host C++ compiler."""
    import shutil
    import subprocess

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to run the CUDA decode source on the CPU")
    (directory / "chk.cpp").write_text(source)
    run = subprocess.run([cxx, "-O1", "-fno-strict-aliasing", "-o", "chk", "chk.cpp"], cwd=directory,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    subprocess.run(["./chk"], cwd=directory, check=True)


@pytest.fixture(scope="session")
def run_host_cpp():
    """``run_host_cpp(directory, source)`` (see above)."""
    return _run_host_cpp
