"""Weight formats: ``qc.formats.names()``, ``qc.formats.get(name)``."""
from .base import Format, QuantizedWeight, TensorSpec, get, names, register  # noqa: F401
from . import groupwise  # noqa: F401  (registers int4-g128)
