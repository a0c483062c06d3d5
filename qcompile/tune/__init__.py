"""Auto-tuning of the kernel schedules: search spaces, the record database, the tuning loop.

- ``space``: the knob space of a kernel in the family that runs its bucket: the GEMV (M=1 but QTIP HYB's;
  M < 8 of QTIP 1MAD, M < 4 of 3INST), the mma.sync kernel (M = 2..64 of int4/E8P, 1..16 of QTIP HYB)
  or the low-batch WMMA kernel (up to M=16 of QTIP 1MAD/3INST) (``candidates(spec)``, ``config_key``).
- ``records``: ``TuningRecords`` — measured configs per (format, N, K, M, kernel family, GPU,
  qcompile and TVM version) in ``schedules/<gpu>/<format>.json``; ``qcompile build`` applies the
  best one where its family runs the bucket.
- ``driver``: ``tune(specs, target, measure, records_dir, ...)`` — resumable, budgeted search.
- ``measure``: ``CudaMeasure`` — times a candidate on the local GPU (needs CUDA).
- ``cost_model``: the XGBoost model that orders candidates once some are measured.
"""
from .driver import DEFAULT_BUDGET, CandidateError, TuneResult, tune  # noqa: F401
from .records import (RecordsError, TuningEntry, TuningRecords, TuningRecordsWarning,  # noqa: F401
                      default_records_dir, records_gpu)
from .space import candidates, config_key  # noqa: F401

__all__ = ["DEFAULT_BUDGET", "CandidateError", "TuneResult", "tune", "RecordsError", "TuningEntry",
           "TuningRecords", "TuningRecordsWarning", "default_records_dir", "records_gpu", "candidates", "config_key"]
