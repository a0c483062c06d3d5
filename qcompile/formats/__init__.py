"""Weight formats: ``qc.formats.names()``, ``qc.formats.get(name)``."""
from .base import Format, QuantizedWeight, TensorSpec, get, names, register  # noqa: F401
from . import groupwise  # noqa: F401  (registers int4-g128)
from . import e8p  # noqa: F401  (registers e8p-2/3/4 when implemented)
from . import trellis  # noqa: F401  (registers qtip-* when implemented)
