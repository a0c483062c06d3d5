"""transformers integration: the default model, building artifacts (qcompile.model.build.build) and
loading them (load_artifact, also qcompile.load). The submodule names stay unshadowed, so
``qcompile.model.build`` is the module."""
from .artifact import load_artifact  # noqa: F401
from .default import default_model_dir, find_default_model  # noqa: F401
