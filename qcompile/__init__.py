"""qcompile: compiler-backed fused dequantize + GEMV/GEMM kernels for 2-4 bit LLM weights."""
__version__ = "0.1.0"

from . import formats  # noqa: F401,E402
from .errors import QCompileError  # noqa: F401,E402


def load(path, device=None):
    """Load a built artifact directory and return a transformers model that runs its kernels."""
    from .model.artifact import load_artifact

    return load_artifact(path, device=device)
