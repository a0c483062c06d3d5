"""Tuning records: the measured configs of each kernel, per GPU, readable and resumable.

One JSON file per GPU and format, ``<records dir>/<gpu>/<format>.json`` (e.g.
``schedules/h100/int4-g128.json``), pretty-printed with sorted keys::

    {"schema": "qcompile-tuning-records/2", "gpu": "h100", "format": "int4-g128",
     "entries": [{"n": 4096, "k": 4096, "m": 1, "kernel": "gemv",
                  "qcompile_version": "0.1.0", "tvm_version": "0.27.0.post1",
                  "best":    {"config": {"rows": 4, ...}, "us": 11.9},
                  "default": {"config": {"rows": 4, ...}, "us": 12.3},
                  "knobs": "rows,threads_k,chunks,unroll,row_tile,lut_shared,lut_lanes",
                  "measured_us": {"4,64,2,2,1,1,0": 12.3, ...},
                  "failed": {"8,64,1,1,1,1,0": "compile: ValueError: ..."}}, ...]}

``measured_us`` and ``failed`` hold every candidate ever tried for the entry, so a resumed tuning
run never measures one twice; each candidate is keyed by its knob values in the order of ``knobs``
(schema 1, still read, keyed them ``name=value,...`` as ``space.config_key`` does: the names were
half of the shipped files, which travel to the GPU machine within a size limit); ``best`` (the
fastest of ``measured_us``) and ``default`` (the config ``qcompile build`` uses without a record,
and its time when measured) are summaries, checked against ``measured_us`` on load.

Families: ``kernel`` names the kernel family whose knobs the entry holds: "gemv" (``GemvConfig``,
the CUDA-core GEMV), "tensorcore" (``TensorCoreConfig``, the low-batch WMMA kernel) or "mma"
(``MmaConfig``, the mma.sync kernel); an entry without the field (files written before it existed) is
"gemv". Config keys are the family's (``space.config_key``), and the best and default configs
must fit the entry's shape (``space.fit_error``: the GEMV tiling rules, ``check_tc_config``,
``check_mma_config``).
The family is part of the entry's key, and a record applies only where its family runs the bucket
(``library.kernel_family``): a GEMV record of a bucket that now runs on tensor cores (M=16,
measured before the tensor-core kernel existed) stays in the file but is never applied.

Keying: a record applies to exactly one (format, N, K, M bucket, kernel family, GPU, qcompile
version, TVM version). Versions compare as exact strings (``qcompile.__version__``,
``tvm.__version__``): a new TVM may generate different code for the same config, and a qcompile
release may change what a knob does, so records of other versions are kept in the file but never
applied; tune again (a run measures only what the current versions have not measured).

Code: an entry tuned since fingerprints exist carries ``code``, the fingerprint of the kernel its
default config generates (``kernel_code``: a hash of the scheduled TensorIR, the hand-written decode
sources included). The library changes its kernels between releases of one
version (a decode trick, a register layout), and a time measured on one kernel says nothing about
another: an entry whose fingerprint is not today's is stale, never applied (``TuningRecords.config_for``
warns once per file), and ``qcompile tune`` measures it anew instead of resuming it. Entries without
the field (tuned before it existed) cannot be checked; they apply as before, and ``qcompile tune``
re-measures them too (``open_entry``).

Damage: a file that is not JSON or breaks the schema is never applied. ``config_for`` (what
``qcompile build`` calls) reports it with one warning line naming the file and the problem and
falls back to the default configs; the tuner (which would overwrite the file) refuses it with a
one-line ``RecordsError`` instead. Writes are atomic (a temporary file renamed over the old one)
and serialised between processes with an flock on the GPU's directory.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

from ..errors import QCompileError
from ..jsonio import atomic_write_bytes
from ..kernels.library import (GEMV_FAMILY, GEMV_MAX_M, MMA_FAMILY, KernelConfig, KernelSpec, family_options,
                               kernel_family, mma_max_m)
from ..kernels.mma import MMA_MAX_M
from .space import (CONFIG_CLASS, FAMILIES, TITLE, config_from_dict, config_from_key, config_key, config_values,
                    family_of, fit_error, knob_names)

SCHEMA = "qcompile-tuning-records/2"
SCHEMA_NAMED_KEYS = "qcompile-tuning-records/1"  # read too: candidates keyed name=value,... (no "knobs")
RECORDS_ENV = "QCOMPILE_SCHEDULES"  # overrides the default records directory
GPU_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
CODE = re.compile(r"[0-9a-f]{16}")  # an entry's kernel-code fingerprint (kernel_code)
PathLike = Union[str, Path]
EntryKey = Tuple[int, int, int, str, str, str]  # (n, k, m, qcompile_version, tvm_version, kernel family)


class RecordsError(QCompileError):
    """A records file that cannot be used; the message is one line and names the file."""


class TuningRecordsWarning(UserWarning):
    """A records file was ignored (damaged or of another schema); the default configs are used."""


def current_versions() -> Tuple[str, str]:
    """(qcompile version, TVM version) that records must carry to be applied."""
    import tvm

    from .. import __version__

    return str(__version__), str(tvm.__version__)


# --- which GPU, which directory ------------------------------------------------------------------

def check_gpu_name(name: str) -> str:
    """A GPU short name usable as a directory (``h100``, ``a100``, ``rtx4090``)."""
    if not isinstance(name, str) or not GPU_NAME.fullmatch(name):
        raise QCompileError(f"invalid GPU name {name!r} for tuning records; use lower-case letters, digits, "
                            f"'.', '_' or '-' (e.g. h100)")
    return name


def local_gpu_name() -> Optional[str]:
    """Short name of the local CUDA GPU (``h100``), or None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        from ..bench.harness import gpu_short_name

        return gpu_short_name(torch.cuda.get_device_name(0))
    except Exception:  # a broken driver is the same as no GPU here
        return None


def records_gpu(target) -> Optional[str]:
    """The GPU whose records apply to a build for ``target`` (a TargetInfo): the GPU named by the
    target (``--target h100``), else the local GPU when the target is its arch (``--target auto``
    or its ``sm_XX``), else None: an ``sm_XX`` alone does not say which GPU (H100 and H200 are both
    sm_90), so a cross-compile uses records only when the GPU is named."""
    from ..kernels.target import GPU_ARCH, local_cuda_arch

    if target.kind != "cuda":
        return None
    if target.name in GPU_ARCH:
        return target.name
    local = local_gpu_name()
    if local is not None and local_cuda_arch() == target.arch:
        return local
    return None


def default_records_dir() -> Optional[Path]:
    """Where ``qcompile build`` looks for records without ``--records``: ``$QCOMPILE_SCHEDULES``
    when set, else the ``schedules/`` directory of the source tree this package runs from (the
    records shipped in the repository), else None."""
    env = os.environ.get(RECORDS_ENV, "").strip()
    if env:
        return Path(env)
    shipped = Path(__file__).resolve().parents[2] / "schedules"
    return shipped if shipped.is_dir() else None


# --- which kernel code ---------------------------------------------------------------------------

def kernel_code(spec: KernelSpec, gpu: str, configs: Iterable[KernelConfig]) -> Optional[str]:
    """Fingerprint of the kernels ``configs`` generate for ``spec`` today: the first 16 hex digits of
    the SHA-256 of their scheduled TensorIR as TVMScript (the hand-written decode sources ride in it,
    as pragma_import_c annotations), for the GPU's arch (sm_90 for a GPU the library does not name).
    None when a config no longer schedules (it then matches no stored fingerprint)."""
    from ..kernels.library import SCHEDULE_LOCK, scheduled_func
    from ..kernels.target import GPU_ARCH, parse_target

    target = parse_target(gpu if gpu in GPU_ARCH else "sm_90")
    digest = hashlib.sha256()
    try:
        with SCHEDULE_LOCK:
            for cfg in configs:
                digest.update(scheduled_func(spec, target, cfg).script().encode())
    except Exception:  # (whatever TVM raises for a config it no longer schedules: build must go on)
        return None
    return digest.hexdigest()[:16]


# --- one entry -----------------------------------------------------------------------------------

@dataclass
class TuningEntry:
    """Everything measured for one kernel on one GPU with one pair of versions, in one kernel family
    (``kernel``: the family of ``default``, a GemvConfig, TensorCoreConfig or MmaConfig)."""

    format: str
    gpu: str
    n: int
    k: int
    m: int
    qcompile_version: str
    tvm_version: str
    default: KernelConfig
    measured_us: Dict[str, float] = field(default_factory=dict)  # config key -> median µs
    failed: Dict[str, str] = field(default_factory=dict)         # config key -> one-line error
    code: Optional[str] = None  # kernel_code of the default config when measured; None: not recorded
    _code_cache: Dict[str, Optional[str]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def kernel(self) -> str:
        """The kernel family of the entry's configs ("gemv", "tensorcore" or "mma")."""
        return family_of(self.default)

    @property
    def key(self) -> EntryKey:
        """The entry's key inside its file (the file itself is the GPU's and the format's)."""
        return (self.n, self.k, self.m, self.qcompile_version, self.tvm_version, self.kernel)

    @property
    def spec(self) -> KernelSpec:
        return KernelSpec(self.format, self.n, self.k, self.m)

    def tried(self, cfg: KernelConfig) -> bool:
        key = config_key(cfg)
        return key in self.measured_us or key in self.failed

    @property
    def tried_count(self) -> int:
        return len(self.measured_us) + len(self.failed)

    def add_measurement(self, cfg: KernelConfig, us: float) -> None:
        key = config_key(cfg)
        self.failed.pop(key, None)
        self.measured_us[key] = float(us)

    def add_failure(self, cfg: KernelConfig, error: str) -> None:
        self.failed[config_key(cfg)] = " ".join(str(error).split())[:500]

    def best(self) -> Optional[Tuple[KernelConfig, float]]:
        """(config, µs) of the fastest measured candidate (ties: the smaller key), or None."""
        if not self.measured_us:
            return None
        key, us = min(self.measured_us.items(), key=lambda item: (item[1], item[0]))
        return config_from_key(key, self.kernel), us

    @property
    def default_us(self) -> Optional[float]:
        return self.measured_us.get(config_key(self.default))

    def code_today(self) -> Optional[str]:
        """``kernel_code`` of the entry's default config as the library generates it today (cached):
        the kernel every tuning run of the entry measures first. A fixed probe, so that two runs on
        the same kernels stamp the same fingerprint whatever else each measured; a change that
        alters only other configs' kernels goes unseen."""
        key = config_key(self.default)
        if key not in self._code_cache:
            self._code_cache[key] = kernel_code(self.spec, self.gpu, [self.default])
        return self._code_cache[key]

    def stamp_code(self) -> None:
        """Record that the measurements are of today's kernels (``qcompile tune`` does, as it saves)."""
        self.code = self.code_today()

    def stale_code(self) -> bool:
        """The entry carries a fingerprint and it is not today's: its times are of other kernels."""
        return self.code is not None and self.code != self.code_today()

    def to_json(self) -> dict:
        best = self.best()
        code = {} if self.code is None else {"code": self.code}
        return {
            **code, "n": self.n, "k": self.k, "m": self.m, "kernel": self.kernel,
            "qcompile_version": self.qcompile_version, "tvm_version": self.tvm_version,
            "best": None if best is None else {"config": config_values(best[0]), "us": _round_us(best[1])},
            "default": {"config": config_values(self.default), "us": _round_us(self.default_us)},
            "knobs": ",".join(knob_names(self.kernel)),
            "measured_us": {positional_key(key, self.kernel): _round_us(us) for key, us in self.measured_us.items()},
            "failed": {positional_key(key, self.kernel): error for key, error in self.failed.items()},
        }


def positional_key(key: str, family: str) -> str:
    """A candidate's key as records store it: its knob values in ``knob_names(family)`` order, e.g.
    ``4,64,2,2,1,1,0`` for the GEMV config ``space.config_key`` writes ``rows=4,threads_k=64,...``."""
    cfg = config_from_key(key, family)
    return ",".join(str(getattr(cfg, name)) for name in knob_names(family))


def _named_key(key: str, knobs: List[str]) -> str:
    """A stored positional key as ``name=value,...`` (ValueError when the counts differ)."""
    values = str(key).split(",")
    if len(values) != len(knobs):
        raise ValueError(f"candidate {key!r} has {len(values)} values for {len(knobs)} knobs")
    return ",".join(f"{name}={value}" for name, value in zip(knobs, values))


def named_candidates(obj: dict, what: str = "measured_us") -> dict:
    """A stored entry's (JSON form) ``measured_us`` or ``failed`` keyed by ``space.config_key``."""
    knobs = obj["knobs"].split(",")
    return {config_key(config_from_key(_named_key(key, knobs), obj["kernel"])): value
            for key, value in obj[what].items()}


def _round_us(us: Optional[float]) -> Optional[float]:
    return None if us is None else round(float(us), 4)


def _entry_from_json(obj, index: int, gpu: str, format_name: str, unit: Optional[int],
                     positional: bool = True) -> TuningEntry:
    """One entry from its JSON form; ValueError (one line, says which entry) on any violation.
    ``positional``: candidates keyed by knob values in the order of the entry's "knobs" (schema 2),
    else by ``name=value,...`` (schema 1)."""
    where = f"entry {index}"
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is not an object")
    required = {"n", "k", "m", "qcompile_version", "tvm_version", "best", "default", "measured_us", "failed"}
    if positional:
        required.add("knobs")
    missing = sorted(required - set(obj))
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    for name in ("n", "k", "m"):
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    kernel = obj.get("kernel", GEMV_FAMILY)  # files written before the field: GEMV entries
    if kernel not in FAMILIES:
        raise ValueError(f"entry {index}: kernel must be one of {', '.join(FAMILIES)}, got {kernel!r}")
    where = f"entry {index} ({kernel} N={obj['n']} K={obj['k']} M={obj['m']})"
    max_m = GEMV_MAX_M
    if kernel == MMA_FAMILY:
        try:
            max_m = mma_max_m(format_name)
        except QCompileError:  # (an unknown format name: the file's own check says so)
            max_m = MMA_MAX_M
    if obj["m"] > max_m:
        raise ValueError(f"{where}: M > {max_m} has no {TITLE[kernel]} config")
    for name in ("qcompile_version", "tvm_version"):
        if not isinstance(obj[name], str) or not obj[name]:
            raise ValueError(f"{where}: {name} must be a non-empty string")
    code = obj.get("code")
    if code is not None and not (isinstance(code, str) and CODE.fullmatch(code)):
        raise ValueError(f"{where}: code must be 16 lower-case hex digits, got {code!r}")

    def config(value, what) -> KernelConfig:
        try:
            cfg = config_from_dict(value, kernel)
        except ValueError as err:
            raise ValueError(f"{where}: {what}: {err}") from None
        if unit is not None:
            problem = fit_error(cfg, obj["n"], obj["k"], obj["m"], unit, _fragment_native(format_name),
                                _staged_bits(format_name, obj["n"], obj["k"]))
            if problem:
                raise ValueError(f"{where}: {what} {config_key(cfg)} does not fit the shape ({problem})")
        return cfg

    knobs: List[str] = []
    if positional:
        if not isinstance(obj["knobs"], str) or not obj["knobs"]:
            raise ValueError(f"{where}: knobs must be a non-empty string of knob names")
        knobs = obj["knobs"].split(",")
        unknown = sorted(set(knobs) - set(knob_names(kernel)))
        if unknown or len(set(knobs)) != len(knobs):
            raise ValueError(f"{where}: knobs {obj['knobs']!r}: " + (
                f"unknown {TITLE[kernel]} knob(s) {', '.join(unknown)}" if unknown else "a knob named twice"))

    def canonical(key, what) -> str:
        try:
            return config_key(config_from_key(_named_key(key, knobs) if positional else key, kernel))
        except ValueError as err:
            raise ValueError(f"{where}: {what}: {err}") from None

    measured, failed = obj["measured_us"], obj["failed"]
    if not isinstance(measured, dict) or not isinstance(failed, dict):
        raise ValueError(f"{where}: measured_us and failed must be objects")
    entry = TuningEntry(format_name, gpu, obj["n"], obj["k"], obj["m"], obj["qcompile_version"],
                        obj["tvm_version"], default=CONFIG_CLASS[kernel](), code=code)
    for key, us in measured.items():
        if isinstance(us, bool) or not isinstance(us, (int, float)) or not math.isfinite(us) or us <= 0:
            raise ValueError(f"{where}: measured time of {key} must be a positive number, got {us!r}")
        canon = canonical(key, "measured_us")
        if canon in entry.measured_us:
            raise ValueError(f"{where}: {canon} is measured twice")
        entry.measured_us[canon] = float(us)
    for key, error in failed.items():
        if not isinstance(error, str):
            raise ValueError(f"{where}: the error of failed candidate {key} must be a string")
        canon = canonical(key, "failed")
        if canon in entry.measured_us or canon in entry.failed:
            raise ValueError(f"{where}: {canon} is listed twice")
        entry.failed[canon] = error

    default = obj["default"]
    if not isinstance(default, dict) or "config" not in default:
        raise ValueError(f"{where}: default must be an object with a config")
    entry.default = config(default["config"], "default config")
    if not _same_us(default.get("us"), entry.default_us):
        raise ValueError(f"{where}: default us {default.get('us')!r} does not match measured_us "
                         f"({_round_us(entry.default_us)!r})")
    best, stored = entry.best(), obj["best"]
    if stored is None:
        if best is not None:
            raise ValueError(f"{where}: best is null but candidates were measured")
    else:
        if not isinstance(stored, dict) or "config" not in stored:
            raise ValueError(f"{where}: best must be null or an object with a config")
        cfg = config(stored["config"], "best config")
        if best is None or cfg != best[0] or not _same_us(stored.get("us"), best[1]):
            raise ValueError(f"{where}: best {config_key(cfg)} is not the fastest measured candidate")
    return entry


def _same_us(stored, measured: Optional[float]) -> bool:
    if measured is None or stored is None:
        return stored is None and measured is None
    return (not isinstance(stored, bool) and isinstance(stored, (int, float))
            and abs(stored - _round_us(measured)) <= 1e-6 * max(1.0, abs(measured)))


# --- one file ------------------------------------------------------------------------------------

def _format_unit(format_name: str) -> int:
    from ..formats import get as get_format

    return get_format(format_name).decode_unit


def _staged_bits(format_name: str, n: int, k: int) -> int:
    """``mma.streamed_bits`` of the format at [n, k] (the most of any format where the shape is not one of its)."""
    from ..formats import get as get_format
    from ..kernels.mma import STAGED_BITS, streamed_bits

    try:
        return streamed_bits(get_format(format_name), n, k)
    except (ValueError, QCompileError):
        return STAGED_BITS


def _fragment_native(format_name: str) -> bool:
    """Whether the format's mma.sync configs are the fragment-native kernel's (lut_shared may be 2)."""
    from ..formats import get as get_format

    return get_format(format_name).fragment_native


def read_records_file(path: PathLike, gpu: str, format_name: str) -> Dict[EntryKey, TuningEntry]:
    """The entries of one records file ({} when it does not exist). RecordsError (one line naming
    the file) when it cannot be read, is not JSON or breaks the schema, including a file whose
    gpu/format fields are not the ones its place says (a copied file is never applied)."""
    from ..jsonio import read_json_object

    path = Path(path)
    if not path.exists():
        return {}
    remedy = "fix or delete it (qcompile tune writes a new one)"
    try:
        doc = read_json_object(path)
    except QCompileError as err:
        raise RecordsError(f"tuning records {err}; {remedy}") from None

    def bad(problem: str) -> RecordsError:
        return RecordsError(f"tuning records {path}: {problem}; {remedy}")

    if doc.get("schema") not in (SCHEMA, SCHEMA_NAMED_KEYS):
        raise bad(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    if doc.get("gpu") != gpu or doc.get("format") != format_name:
        raise bad(f"holds records for gpu {doc.get('gpu')!r} format {doc.get('format')!r}, "
                  f"not gpu {gpu!r} format {format_name!r}")
    if not isinstance(doc.get("entries"), list):
        raise bad("entries must be a list")
    try:
        unit = _format_unit(format_name)
    except QCompileError as err:
        raise bad(str(err)) from None
    entries: Dict[EntryKey, TuningEntry] = {}
    for index, obj in enumerate(doc["entries"]):
        try:
            entry = _entry_from_json(obj, index, gpu, format_name, unit, doc["schema"] == SCHEMA)
        except ValueError as err:
            raise bad(str(err)) from None
        if entry.key in entries:
            raise bad(f"entry {index} repeats {entry.kernel} N={entry.n} K={entry.k} M={entry.m} for qcompile "
                      f"{entry.qcompile_version} / TVM {entry.tvm_version}")
        entries[entry.key] = entry
    return entries


def write_records_file(path: PathLike, gpu: str, format_name: str, entries: Iterable[TuningEntry]) -> None:
    """Write the file atomically: a temporary file in the same directory, fsync'ed, then renamed
    over the old one, so a reader (or an interrupted run) sees the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "gpu": gpu, "format": format_name,
           "entries": [e.to_json() for e in sorted(entries, key=lambda e: e.key)]}
    atomic_write_bytes(path, (records_json(doc) + "\n").encode())


def records_json(doc: dict) -> str:
    """JSON text of a records document: indented, but each config object ({knob: value}) on one line
    (nine lines each otherwise: the records travel to the GPU machine within a size limit)."""
    configs = []

    def mark(value):  # configs -> placeholders, dumped compactly below
        if isinstance(value, dict):
            if "config" in value and isinstance(value["config"], dict):
                configs.append(json.dumps(value["config"], sort_keys=True))
                value = {**value, "config": f"\x00{len(configs) - 1}\x00"}
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(doc), indent=1, sort_keys=True)
    return re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: configs[int(m.group(1))], text)


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive flock on the directory itself (no lock file to leave behind), so that two
    tuning runs on one GPU never lose each other's read-modify-write."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --- the database --------------------------------------------------------------------------------

def _keeps(here: "TuningEntry", incoming: "TuningEntry") -> bool:
    """Whether a merge keeps ``here`` over an ``incoming`` entry of the same key and another code: the
    incoming one has no fingerprint where this one has, or this one is of today's kernels and the
    incoming one is not."""
    if incoming.code is None:
        return here.code is not None
    return here.code is not None and not here.stale_code() and incoming.stale_code()


def applies_today(entry: "TuningEntry", spec: KernelSpec) -> bool:
    """Whether ``entry``'s best may replace today's default config of ``spec``: the entry was tuned
    against that default, or measured it among its candidates. An entry tuned against a default the
    library has since changed is stale, its best only known to beat the old one (e8p-2 4096x11008
    M=1: the record's best 28.1 us against 12.8 us for today's default); ``qcompile tune``, which
    measures today's default first, refreshes it."""
    from .space import default_config

    try:
        today = default_config(spec, entry.kernel)
    except QCompileError:
        return False
    return entry.default == today or config_key(today) in entry.measured_us


def _warn_default(message: str) -> None:
    warnings.warn(message, TuningRecordsWarning, stacklevel=3)


class TuningRecords:
    """The records under one directory (``schedules/``): ``<root>/<gpu>/<format>.json``.

    ``warn`` receives the one-line message of a records file that ``config_for`` ignores
    (default: ``warnings.warn`` with TuningRecordsWarning); each file is reported once.
    """

    def __init__(self, root: PathLike, warn: Optional[Callable[[str], None]] = None,
                 versions: Optional[Tuple[str, str]] = None):
        self.root = Path(root)
        self._warn = warn or _warn_default
        self._versions = versions
        self._lenient: Dict[Tuple[str, str], Dict[EntryKey, TuningEntry]] = {}
        self._stale_warned: set = set()  # (gpu, format) files whose stale entries were reported

    @property
    def versions(self) -> Tuple[str, str]:
        """(qcompile, TVM) versions records must carry to apply; the running ones by default."""
        if self._versions is None:
            self._versions = current_versions()
        return self._versions

    def path(self, gpu: str, format_name: str) -> Path:
        # ('@': a layout variant, e.g. qtip-3inst-2@mma-kernel, has records of its own)
        if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z._@-]*", format_name):
            raise QCompileError(f"format name {format_name!r} cannot name a records file")
        return self.root / check_gpu_name(gpu) / f"{format_name}.json"

    def entries(self, gpu: str, format_name: str) -> Dict[EntryKey, TuningEntry]:
        """Every entry of the GPU's file for the format, of all versions (RecordsError if damaged)."""
        return read_records_file(self.path(gpu, format_name), gpu, format_name)

    def entry(self, spec: KernelSpec, gpu: str, kernel: Optional[str] = None) -> Optional[TuningEntry]:
        """The entry of ``spec`` on ``gpu`` for the current versions in kernel family ``kernel``
        (default: the family that runs the spec's bucket, ``library.kernel_family``), or None
        (RecordsError if the file is damaged)."""
        kernel = kernel or kernel_family(spec.format, spec.m)
        return self.entries(gpu, spec.format).get((spec.n, spec.k, spec.m, *self.versions, kernel))

    def open_entry(self, spec: KernelSpec, gpu: str, default: KernelConfig) -> TuningEntry:
        """The stored entry of ``spec`` on ``gpu`` for the current versions in the family of
        ``default`` (its default set to ``default``, the config build uses today), or a new empty
        one where there is none or the stored one's times are not known to be of today's kernels (its
        ``code`` missing or stale: ``save`` then replaces it); RecordsError if the file is damaged.
        Nothing is written until ``save``."""
        entry = self.entry(spec, gpu, family_of(default))
        if entry is not None and (entry.code is None or entry.stale_code()):
            entry = None  # measured on other (or unrecorded) kernels: measured anew, replaced on save
        if entry is None:
            entry = TuningEntry(spec.format, check_gpu_name(gpu), spec.n, spec.k, spec.m, *self.versions,
                                default=default)
        entry.default = default
        return entry

    def save(self, entry: TuningEntry) -> Path:
        """Store ``entry`` (replacing the same key) under the directory lock: re-read the file,
        merge what another run may have measured for the same entry meanwhile, write atomically.
        Returns the file's path. The entry is stamped with today's ``kernel_code``: what it holds was
        measured on the kernels this library generates (a stored entry of other code is replaced, not
        merged)."""
        gpu, format_name = entry.gpu, entry.format
        path = self.path(gpu, format_name)
        entry.stamp_code()
        with _locked(path.parent):
            entries = read_records_file(path, gpu, format_name)
            on_disk = entries.get(entry.key)
            if on_disk is not None and on_disk is not entry and on_disk.code == entry.code:
                for key, us in on_disk.measured_us.items():
                    if key not in entry.measured_us and key not in entry.failed:
                        entry.measured_us[key] = us
                for key, error in on_disk.failed.items():
                    if key not in entry.measured_us and key not in entry.failed:
                        entry.failed[key] = error
            entries[entry.key] = entry
            write_records_file(path, gpu, format_name, entries.values())
        self._lenient.pop((gpu, format_name), None)
        return path

    def merge(self, other_root: PathLike) -> List[Tuple[Path, int]]:
        """Add every entry of the records under ``other_root`` (``<gpu>/<format>.json`` files, e.g.
        what ``qcompile tune --records`` wrote on another machine) to these: an entry of a new key, or
        of a key whose entry here has another ``code``, is copied (unless the one here is of today's
        kernels and the incoming one is not, or the incoming one has no fingerprint and this one has:
        a copy of old records never undoes a newer tuning run, whatever the order of merges); one of a
        key and code present on both sides gets the union of the measurements (``other_root``'s
        time where both measured a config, its default config; a config measured on either side is
        not a failure, as in ``TuningEntry.add_measurement``). Every source file and every destination
        file it touches is read (and a damaged one refused, RecordsError) before anything is written;
        each destination file is written once, atomically, under the directory lock. Returns
        [(destination file, entries of the source file)]."""
        other = Path(other_root)
        if not other.is_dir():
            raise QCompileError(f"records to merge: {other} is not a directory (give the directory that holds "
                                f"<gpu>/<format>.json files)")
        sources = {}
        for path in sorted(other.glob("*/*.json")):
            gpu, format_name = check_gpu_name(path.parent.name), path.stem
            sources[(gpu, format_name)] = read_records_file(path, gpu, format_name)
        if not sources:
            raise QCompileError(f"records to merge: no <gpu>/<format>.json files under {other}")
        for gpu, format_name in sources:  # a damaged destination stops the merge before any write
            read_records_file(self.path(gpu, format_name), gpu, format_name)
        done = []
        for (gpu, format_name), incoming in sources.items():
            path = self.path(gpu, format_name)
            with _locked(path.parent):
                entries = read_records_file(path, gpu, format_name)
                for key, entry in incoming.items():
                    here = entries.get(key)
                    if here is not None and here.code != entry.code and _keeps(here, entry):
                        continue
                    if here is not None and here.code == entry.code:  # else the incoming run replaces it
                        measured = {**here.measured_us, **entry.measured_us}
                        failed = {c: e for c, e in {**here.failed, **entry.failed}.items() if c not in measured}
                        entry.measured_us, entry.failed = measured, failed
                    entries[key] = entry
                write_records_file(path, gpu, format_name, entries.values())
            self._lenient.pop((gpu, format_name), None)
            done.append((path, len(incoming)))
        return done

    # --- what build uses: never raises for a damaged file ----------------------------------------
    def config_for(self, spec: KernelSpec, gpu: Optional[str]) -> Optional[KernelConfig]:
        """The best measured config of ``spec`` on ``gpu`` for the current versions (a GemvConfig,
        MmaConfig or TensorCoreConfig), or None: no GPU, a GEMM bucket, no record that applies, or a
        damaged file (warned once, then the defaults). The candidates are the entries of the
        families that can run the bucket (``library.family_options``): the default family's, and an
        alternative family's only beside it (so that its best is known to beat the default route)
        and only where it measured faster. A record of a family that cannot run the bucket (e.g. an
        old GEMV record of M=16) is never applied, nor one whose ``code`` is not today's kernels'
        (warned once per file)."""
        if gpu is None:
            return None
        families = [f for f in family_options(spec.format, spec.m) if f in FAMILIES]
        if not families:
            return None
        cache_key = (gpu, spec.format)
        if cache_key not in self._lenient:
            try:
                self._lenient[cache_key] = self.entries(gpu, spec.format)
            except QCompileError as err:
                self._warn(f"{err} (using the default schedules)")
                self._lenient[cache_key] = {}
        found = []
        for family in families:
            entry = self._lenient[cache_key].get((spec.n, spec.k, spec.m, *self.versions, family))
            best = entry.best() if entry is not None else None
            if best is None or not applies_today(entry, spec):
                continue
            if entry.stale_code():
                if cache_key not in self._stale_warned:
                    self._stale_warned.add(cache_key)
                    self._warn(f"tuning records {self.path(gpu, spec.format)}: {spec.format} N={spec.n} K={spec.k} "
                               f"M={spec.m} ({family}) was measured on kernels the library has since changed, so "
                               f"its default config is used; run qcompile tune on the shape to measure today's")
                continue
            found.append((family, best))
        if not found or found[0][0] != families[0]:
            return None
        return min(found, key=lambda fb: fb[1][1])[1][0]

    def lookup(self, gpu: Optional[str]) -> Callable[[KernelSpec], Optional[KernelConfig]]:
        """``config_for`` bound to one GPU: what ``qcompile.kernels.library.build`` takes."""
        return lambda spec: self.config_for(spec, gpu)
