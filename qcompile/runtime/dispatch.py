"""Batch-size dispatch: which compiled M buckets serve a batch of M rows.

A module holds kernels for a few M buckets only (qcompile.kernels.library.DEFAULT_BUCKETS). A plan
covers rows [0, M) with row blocks (row_start, rows_used, bucket); a block with rows_used < bucket
runs padded.

- M <= GEMV_MAX_M: one launch of the smallest bucket >= M. The GEMV family reads the weights once
  per launch whatever M is, so padding a few rows is cheaper than a second launch.
- larger M: blocks of the largest GEMM bucket (> GEMV_MAX_M) that still fits, greedily; the final
  remainder (smaller than every GEMM bucket) runs as one launch of the smallest bucket >= it.
  Taking GEMV buckets for that tail would cost one weight read per launch (e.g. 44 = 16+16+4+4+4:
  five launches instead of one 64-row GEMM).
A module without GEMM buckets (e.g. buckets 1,4,16) splits large M into its largest bucket.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from ..kernels.library import GEMV_MAX_M

RowBlock = Tuple[int, int, int]  # (row_start, rows_used, bucket)


def check_buckets(buckets: Sequence[int]) -> Tuple[int, ...]:
    """Sorted, distinct, positive buckets; ValueError otherwise."""
    out = tuple(sorted(set(int(b) for b in buckets)))
    if not out or out[0] < 1:
        raise ValueError(f"M buckets must be positive integers, got {list(buckets)}")
    return out


def plan_rows(m: int, buckets: Sequence[int], gemv_max_m: int = GEMV_MAX_M) -> List[RowBlock]:
    """Row blocks covering M rows with the compiled buckets (sorted ascending)."""
    if m < 0:
        raise ValueError(f"batch size must be >= 0, got {m}")
    buckets = tuple(buckets)
    if m == 0:
        return []
    if m <= gemv_max_m:
        for b in buckets:
            if b >= m:
                return [(0, m, b)]
    large = [b for b in buckets if b > gemv_max_m] or [buckets[-1]]
    plan: List[RowBlock] = []
    start = 0
    while start < m:
        left = m - start
        fitting = [b for b in large if b <= left]
        if fitting:
            b = fitting[-1]
            plan.append((start, b, b))
            start += b
        else:  # left < min(large) <= max(buckets), so a bucket >= left exists
            b = next(b for b in buckets if b >= left)
            plan.append((start, left, b))
            start = m
    return plan
