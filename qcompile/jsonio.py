"""Reading the project's JSON files (configs, manifests, tables) with one-line errors, and the
atomic file write every writer here uses (no reader ever sees half a file)."""
from __future__ import annotations

import json
import os
import tempfile
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


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it: a reader (or an
    interrupted writer) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # (mkstemp's 0600: the file gets the mode open() would give it)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


ROW_FLOAT_DIGITS = 6  # significant digits of a float in a benchmark record (timings vary far more)


def _short_floats(value):
    """``value`` with every float rounded to ROW_FLOAT_DIGITS significant digits (NaN/inf kept, for
    the dump to refuse)."""
    if isinstance(value, float):
        return float(f"{value:.{ROW_FLOAT_DIGITS}g}")
    if isinstance(value, dict):
        return {k: _short_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_short_floats(v) for v in value]
    return value


def rows_json(doc) -> str:
    """JSON text of a benchmark record (a list of row objects, or an object some of whose values are
    such lists) with one row a line and floats to ROW_FLOAT_DIGITS significant digits: readable, and
    about a third the size of indented full-precision JSON (the repository travels to the GPU machine
    within a size limit). Raises ValueError for NaN/inf."""
    dump = lambda v: json.dumps(_short_floats(v), separators=(",", ":"), allow_nan=False)  # noqa: E731

    def rows(values) -> str:
        return "[\n" + ",\n".join(dump(r) for r in values) + "\n]"

    if isinstance(doc, list):
        return rows(doc) + "\n"
    parts = [json.dumps(key) + ":" + (rows(value) if isinstance(value, list) and value
                                      and all(isinstance(r, dict) for r in value) else dump(value))
             for key, value in doc.items()]
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_rows_json(path: Union[str, Path], doc) -> None:
    """``rows_json(doc)`` written atomically to ``path``."""
    atomic_write_bytes(path, rows_json(doc).encode())

