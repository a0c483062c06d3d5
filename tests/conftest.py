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
