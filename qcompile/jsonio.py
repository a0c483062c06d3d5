"""Reading the project's JSON files (configs, manifests, tables) with one-line errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from .errors import QCompileError


def read_json_object(path: Union[str, Path], remedy: str = "") -> dict:
    """The JSON object in ``path``; QCompileError (one line, ending in ``remedy``) when the file
    cannot be read, is not JSON, or holds something other than an object."""
    tail = f"; {remedy}" if remedy else ""
    try:
        with open(path) as f:
            raw = json.load(f)
    except ValueError as err:
        raise QCompileError(f"{path} is not valid JSON ({' '.join(str(err).split())}){tail}") from None
    except OSError as err:
        raise QCompileError(f"cannot read {path}: {' '.join(str(err).split())}{tail}") from None
    if not isinstance(raw, dict):
        raise QCompileError(f"{path} is not a JSON object{tail}")
    return raw
