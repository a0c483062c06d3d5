"""Sweep rows as tuning records: ``qcompile tune --import-sweep FILE``.

``python -m qcompile.bench.tc_sweep --out FILE`` times hand-picked configs against the default in one
process, the same way the tuner measures (``harness.bench_weight``, weights rotated past the L2, CUDA
graphs, the median; a result checked against float64 first). Where such a sweep found a config outside
what the tuner has measured, these rows join the records as the tuner's own measurements would, so
that build applies the winner without measuring it again. Only plain rows count: the library's
default (whatever records chose then), rows built with a kernel switch or without the decode intrinsic
(``intrin`` other than true: ``--flag``, ``--plain-decode``), failed or wrong rows are left out. A row's GPU comes from the row (``gpu``, written by
tc_sweep since this module) or from ``--gpu``; a row that carries its kernel's fingerprint
(``code``) counts only while the library generates that kernel today. Each kernel's rows must time
today's default config (the entry's reference), and a config the records already measured keeps
its recorded time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import QCompileError
from ..kernels.library import KernelSpec
from .records import TuningRecords, check_gpu_name, kernel_code
from .space import CONFIG_CLASS, config_from_dict, default_config, knob_names


def _family_of_values(values: dict) -> Optional[str]:
    """The kernel family whose knobs are exactly the row's config keys (None: no family's)."""
    for family in CONFIG_CLASS:
        if set(values) == set(knob_names(family)):
            return family
    return None


def read_sweep_rows(path) -> List[dict]:
    """The rows of a tc_sweep JSON file (a list of objects); QCompileError (one line) otherwise."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        raise QCompileError(f"--import-sweep: no file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QCompileError(f"--import-sweep: {path} is not a JSON file of sweep rows ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise QCompileError(f"--import-sweep: {path} is not a list of sweep rows (write one with "
                            f"python -m qcompile.bench.tc_sweep --out FILE)")
    return rows


def import_sweep(records: TuningRecords, rows: List[dict], gpu: Optional[str] = None) -> List[str]:
    """Add the plain measured rows to ``records`` (see the module's note); returns one line a kernel
    saying what was added or why nothing was."""
    if gpu is not None:
        check_gpu_name(gpu)
    groups: Dict[Tuple[KernelSpec, str, str], List[Tuple[object, float]]] = {}
    lines: List[str] = []
    for index, row in enumerate(rows):
        if (row.get("kernel") == "library-default" or row.get("cfg") is None or row.get("intrin") is not True
                or row.get("error") is not None or not isinstance(row.get("us"), (int, float))):
            continue
        try:
            spec = KernelSpec(str(row["format"]), int(row["N"]), int(row["K"]), int(row["M"]))
        except (KeyError, TypeError, ValueError):
            raise QCompileError(f"--import-sweep: row {index} lacks format, N, K or M") from None
        row_gpu = row.get("gpu", gpu)
        if row_gpu is None:
            raise QCompileError("--import-sweep: the rows do not say which GPU measured them; give --gpu "
                                "(e.g. --gpu h100)")
        if gpu is not None and row_gpu != gpu:
            raise QCompileError(f"--import-sweep: row {index} was measured on {row_gpu}, not --gpu {gpu}")
        family = _family_of_values(row["cfg"])
        if family is None:
            raise QCompileError(f"--import-sweep: row {index}'s config {row['cfg']} is of no kernel family")
        try:
            cfg = config_from_dict(row["cfg"], family)
        except ValueError as err:
            raise QCompileError(f"--import-sweep: row {index}: {err}") from None
        if row.get("code") is not None and row["code"] != kernel_code(spec, check_gpu_name(row_gpu), [cfg]):
            lines.append(f"{spec.format} N={spec.n} K={spec.k} M={spec.m}: skipped {row.get('kernel')} "
                         f"(timed on a kernel the library no longer generates)")
            continue
        groups.setdefault((spec, family, row_gpu), []).append((cfg, float(row["us"])))
    for (spec, family, row_gpu), timed in groups.items():
        name = f"{spec.format} N={spec.n} K={spec.k} M={spec.m} ({family})"
        try:
            default = default_config(spec, family)
        except QCompileError as err:
            lines.append(f"{name}: not imported ({err})")
            continue
        if all(cfg != default for cfg, _ in timed):
            lines.append(f"{name}: not imported (the sweep did not time today's default config, "
                         f"the entry's reference)")
            continue
        entry = records.open_entry(spec, check_gpu_name(row_gpu), default)
        added = 0
        for cfg, us in timed:
            if not entry.tried(cfg):
                entry.add_measurement(cfg, us)
                added += 1
        if added:
            records.save(entry)
        best = entry.best()
        lines.append(f"{name}: {added} measurement(s) added, {entry.tried_count} in the entry; best "
                     f"{best[1]:.1f} us" if best else f"{name}: nothing added")
    return lines
