"""qcompile: compiler-backed fused dequantize + GEMV/GEMM kernels for 2-4 bit LLM weights."""
__version__ = "0.1.0"

from . import formats  # noqa: F401,E402
from .errors import QCompileError  # noqa: F401,E402


def load(path, device=None):
    """Load a built artifact directory and return a transformers model that runs its kernels."""
    from .model.artifact import load_artifact

    return load_artifact(path, device=device)


def quantize_model(model_or_dir=None, format="int4-g128", calibration=None, out_dir=None, **kwargs):
    """Quantize a transformers model layer by layer into a checkpoint directory (see
    qcompile.model.quantize.quantize_model); returns the directory. ``qcompile build`` accepts it."""
    from .model.quantize import quantize_model as _quantize_model

    return _quantize_model(model_or_dir, format, calibration, out_dir, **kwargs)
