"""Batch-size dispatch: which compiled M buckets serve a batch of M rows.

A module holds kernels for a few M buckets only (qcompile.kernels.library.DEFAULT_BUCKETS). A plan
covers rows [0, M) with row blocks (row_start, rows_used, bucket); a block with rows_used < bucket
runs padded.

- M <= GEMV_MAX_M: one launch of the smallest bucket >= M. The GEMV family reads the weights once
  per launch whatever M is, so padding a few rows is cheaper than a second launch.
- larger M: blocks of the largest bucket above GEMV_MAX_M (int4/E8P's mma.sync 32 and 64, or opt-in
  GEMM buckets) that still fits, greedily; the final
  remainder (smaller than every GEMM bucket) runs as one launch of the smallest bucket >= it.
  Taking GEMV buckets for that tail would cost one weight read per launch (e.g. 44 = 16+16+4+4+4:
  five launches instead of one 64-row GEMM).
- once fewer rows than the largest bucket are left, those greedy blocks are compared with one
  padded launch of the smallest bucket >= the rows left, at a cost of (rows computed +
  LAUNCH_COST_ROWS per launch), and the cheaper wins. Every launch reads the whole weight again;
  LAUNCH_COST_ROWS is about what that read costs in rows of tensor-core work. With the dense
  qcompile.kernels.library.TUNED_BUCKETS (..., 32, 64, 128, 256, 512), M=100 runs one 128-row
  launch instead of 64 + 32 + 4, and M=80 keeps 64 + 16.
A module without GEMM buckets (e.g. buckets 1,4,16) splits large M into its largest bucket.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from ..kernels.library import GEMV_MAX_M

RowBlock = Tuple[int, int, int]  # (row_start, rows_used, bucket)
# One more launch costs about as much as this many more rows: a 4-bit weight read at ~3 TB/s takes
# as long as ~40 rows of fp16 tensor-core math over the same weight (H100); fewer at 2 bits
LAUNCH_COST_ROWS = 32


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
    while m - start >= large[-1]:  # whole blocks of the largest bucket
        plan.append((start, large[-1], large[-1]))
        start += large[-1]
    if start < m:
        tail = _greedy_blocks(m - start, large, buckets)
        single = next(b for b in buckets if b >= m - start)  # exists: m - start < large[-1]
        if single + LAUNCH_COST_ROWS < sum(bucket + LAUNCH_COST_ROWS for _, bucket in tail):
            tail = [(m - start, single)]
        for used, bucket in tail:
            plan.append((start, used, bucket))
            start += used
    return plan


def _greedy_blocks(rows: int, large: Sequence[int], buckets: Sequence[int]) -> List[Tuple[int, int]]:
    """(rows_used, bucket) blocks for ``rows`` < max(large): the largest bucket of ``large`` that
    still fits, repeatedly; the remainder padded to the smallest bucket >= it."""
    blocks: List[Tuple[int, int]] = []
    while rows > 0:
        fitting = [b for b in large if b <= rows]
        if fitting:
            blocks.append((fitting[-1], fitting[-1]))
            rows -= fitting[-1]
        else:  # rows < min(large) <= max(buckets), so a bucket >= rows exists
            blocks.append((rows, next(b for b in buckets if b >= rows)))
            rows = 0
    return blocks
