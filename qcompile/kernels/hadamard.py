"""The randomized Hadamard transform (RHT) of activations as compiled TVM kernels.

Around a matmul with an RHT weight (qcompile.quant.hadamard) the runtime needs, per row of M:

* input side  ``X' = hadUt(SU ⊙ X)``  (rht_input),  X fp16 [m, n] → fp16 [m, n]
* output side ``Y  = SV ⊙ hadU(Y')``  (rht_output), Y' fp16 [m, n] → fp16 [m, n]

with U_n = (H_K ⊗ H_{2^p}) / √n for n = K·2^p (K from ``hadamard_factor``). Every kernel is
``f(X fp16[m, n], S fp16[n], HK float32[K, K], Y fp16[m, n])``: S is SU or SV, HK is
``hadamard_factor(n)[1]`` untransposed for both sides (the input side reads it transposed; for
K = 1 it is the unused [[1.]]); the table is a kernel input like the E8P kernels' codebook.

Compute (``rht_func``), fp32 throughout and one rounding to fp16 at the end, O(n·log n + n·K):

* A row is viewed as [K][R_G]…[R_1] (its natural row-major order) with R_g = 2^{r_g}, ∏R_g = 2^p:
  the bits of the 2^p index split into radix groups, the lowest bits last. Each of the p radix-2
  butterflies is its own TE compute along its group's axis (pairs (x, x + h), h = 2^bit). The axis
  keeps region analysis exact, so a GPU thread runs a whole group in R_g registers and only group
  outputs go through shared memory.
* Butterflies go from the lowest bit up, like ``had_transform``, each exactly ``a + c`` or ``a - c``
  in fp32: for K = 1 the output is bit-identical to the fp32 torch reference.
* Then the dense K×K stage across the K chunks (absent for K = 1), a sequential fp32 sum.
* The sign multiply (X·SU in fp32: exact, a product of two fp16 values) is fused into the first
  stage; the 1/√n scale, SV and the fp16 rounding into the last stage, which writes Y.

CUDA (``schedule_rht_cuda``): one thread block per row, ``rht_groups`` sizes the groups so that a
thread runs at most one radix unit per group. A thread then reads all of its group input before
any thread writes the group output (a barrier between), so TVM's dynamic shared memory planner
puts every group output in the buffer of the one before: one row of n stage values in shared
memory, 4·n bytes in fp32 plus up to 1/4 (radix runs of >= 16 values get 16 bytes of padding against bank
conflicts, ``stage_bytes``): n = 28672 = 28·1024 takes 126 KiB; sm_80 allows 163 KiB per block,
sm_90 227 KiB, sm_86/89 99 KiB. Where fp32 does not fit, the stage buffer is fp16
(``rht_store_dtype``): the arithmetic in registers stays fp32, each group boundary rounds once to
fp16, and the 1/√n scale moves to the first stage so stored values keep the output's size (no fp16
overflow). The last stage (the K×K stage, or the last butterfly group) writes Y straight from
registers, so it needs no buffer of its own.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Iterable, List, Optional, Sequence

from ..errors import QCompileError
from ..quant.hadamard import hadamard_factor
from .schedules import vectorize_copy

SIDES = ("input", "output")
STORE_DTYPES = ("float32", "float16")
# opt-in dynamic shared memory per thread block (bytes) by SM version; unknown archs get the smallest
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DEFAULT_SHARED_BYTES = 101376


@dataclass(frozen=True)
class RhtConfig:
    """Knobs of the RHT kernels. radix_bits: the butterflies a thread runs in registers per trip
    through shared memory (2^radix_bits values; raised where needed so that a block's threads
    cover a group in one pass); max_threads: the thread block size limit (one block per row)."""

    radix_bits: int = 3
    max_threads: int = 1024

    def as_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class RhtSpec:
    """One RHT kernel: ``side`` ("input": hadUt(SU ⊙ x), "output": SV ⊙ hadU(y)) of size n for a
    block of m rows."""

    side: str
    n: int
    m: int

    @property
    def name(self) -> str:
        return f"rht_{self.side}_n{self.n}_m{self.m}"


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------
def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def _factor(n: int):
    """(K, p) with n = K·2^p; QCompileError naming the nearest supported sizes for a bad n."""
    k, _ = hadamard_factor(n)
    return k, (n // k).bit_length() - 1


def rht_groups(n: int, cfg: RhtConfig = RhtConfig()) -> List[int]:
    """Sizes r_g (in bits, lowest bits first) of the radix groups of the 2^p part of n: each at
    least cfg.radix_bits and big enough that n / 2^r_g units fit in cfg.max_threads threads;
    as many groups as that allows, the larger ones first."""
    k, p = _factor(n)
    if p == 0:
        return []
    r_min = 1
    while r_min < p and k << (p - r_min) > cfg.max_threads:
        r_min += 1
    count = max(1, p // max(cfg.radix_bits, r_min))
    base, extra = divmod(p, count)
    return [base + 1 if g < extra else base for g in range(count)]


def _row_pad(radix0: int, store: str) -> int:
    """Elements of padding after every run of the first group's radix0 values in shared memory: a
    thread stores its run as 16-byte vectors, and runs of >= 16 values at a power-of-two stride
    would put 4-8 threads of a quarter warp on the same banks; 16 bytes more make the stride odd
    in 16-byte units. (Runs of 8 cost a 2-way conflict at most: not worth 50% more memory.)"""
    return (16 // (4 if store == "float32" else 2)) if radix0 >= 16 else 0


def stage_bytes(n: int, store: str = "float32", cfg: RhtConfig = RhtConfig()) -> int:
    """Shared memory of one block: one row of stage values plus the first group's padding (see
    the module doc)."""
    groups = rht_groups(n, cfg)
    k, _ = _factor(n)
    if not groups or (k == 1 and len(groups) == 1):  # the only stage writes Y: no buffer
        return 0
    radix0 = 1 << groups[0]
    return n // radix0 * (radix0 + _row_pad(radix0, store)) * (4 if store == "float32" else 2)


def max_shared_bytes(arch: str) -> int:
    m = re.fullmatch(r"sm_(\d+)a?", str(arch))
    return MAX_SHARED_BYTES.get(int(m.group(1)), DEFAULT_SHARED_BYTES) if m else DEFAULT_SHARED_BYTES


def rht_store_dtype(n: int, arch: str, cfg: RhtConfig = RhtConfig()) -> str:
    """float32 stage buffers where they fit the arch's shared memory, else float16; QCompileError
    where neither fits."""
    limit = max_shared_bytes(arch)
    for store in STORE_DTYPES:
        if stage_bytes(n, store, cfg) <= limit:
            return store
    raise QCompileError(f"the RHT kernel of size n={n} needs {stage_bytes(n, 'float16', cfg) // 1024} KiB of shared "
                        f"memory even in fp16, more than {arch} has per block ({limit // 1024} KiB)")


# --------------------------------------------------------------------------------------------
# compute
# --------------------------------------------------------------------------------------------
# (te.compute rejects keyword arguments in fcompute, so the closures come from these factories)
def _reader(t):
    """(row, kk, xs) -> fp32 value of the stage tensor t."""
    def read(r, kk, xs):
        v = t[(r, kk) + tuple(xs)]
        return v if t.dtype == "float32" else v.astype("float32")
    return read


def _butterfly(read, h, axis, dtype):
    """Radix-2 stage along view axis ``axis``: pairs (lo, lo + h); the lower one gets a + c."""
    from tvm import tirx

    def stage(r, kk, *xs):
        x = xs[axis]
        lo = tirx.floordiv(x, 2 * h) * (2 * h) + tirx.floormod(x, h)
        a = read(r, kk, xs[:axis] + (lo,) + xs[axis + 1:])
        c = read(r, kk, xs[:axis] + (lo + h,) + xs[axis + 1:])
        v = tirx.Select(tirx.floormod(tirx.floordiv(x, h), 2) == 0, a + c, a - c)
        return v if dtype == "float32" else v.astype(dtype)
    return stage


def rht_func(n: int, m: int, side: str, groups: Optional[Sequence[int]] = None, store: str = "float32"):
    """PrimFunc main(X fp16[m, n], S fp16[n], HK float32[K, K], Y fp16[m, n]) of one RHT side (module
    doc). ``groups``: radix group sizes in bits, lowest first (default ``rht_groups(n)``);
    ``store``: dtype of each group's output. Blocks: ``bfly_g{group}_b{bit}`` (the butterfly on
    ``bit`` of the 2^p index), ``hk`` (the K×K stage), ``Y`` (scale, SV, fp16)."""
    from tvm import te, tirx

    _check_side(side)
    if store not in STORE_DTYPES:
        raise ValueError(f"store must be one of {STORE_DTYPES}, got {store!r}")
    n, m = int(n), int(m)
    k, p = _factor(n)
    p2 = n // k
    groups = list(rht_groups(n) if groups is None else groups)
    if sum(groups) != p or min(groups, default=1) < 1:
        raise ValueError(f"radix groups {groups} must be positive and add up to {p} bits (n = {k}·2^{p})")
    radix = [1 << r for r in groups]
    offsets = [sum(groups[:g]) for g in range(len(groups))]
    view = (m, k) + tuple(reversed(radix))  # xs: highest group first, so the view is row-major
    scale = tirx.const(1.0 / math.sqrt(n), "float32")
    scale_first = store == "float16"  # keeps stored values at the output's size (no fp16 overflow)

    X = te.placeholder((m, n), "float16", name="X")
    S = te.placeholder((n,), "float16", name="S")
    HK = te.placeholder((k, k), "float32", name="HK")

    def column(kk, xs):
        col = kk * p2
        for g, x in enumerate(reversed(xs)):
            col = col + x * (1 << offsets[g])
        return col

    def first_read(r, kk, xs):  # the input, with the sign (input side) fused in
        col = column(kk, xs)
        v = X[r, col].astype("float32")
        if side == "input":
            v = v * S[col].astype("float32")
        return v * scale if scale_first else v

    read = first_read
    for g, r_bits in enumerate(groups):
        axis = len(groups) - 1 - g
        for b in range(r_bits):
            dtype = store if b == r_bits - 1 else "float32"
            t = te.compute(view, _butterfly(read, 1 << b, axis, dtype), name=f"bfly_g{g}_b{offsets[g] + b}")
            read = _reader(t)
    if k > 1:
        kr = te.reduce_axis((0, k), name="kr")
        prev = read

        def hk_stage(r, kk, *xs):
            coef = HK[kr, kk] if side == "input" else HK[kk, kr]  # hadUt uses H_Kᵀ
            return te.sum(coef * prev(r, kr, xs), axis=kr)

        read = _reader(te.compute(view, hk_stage, name="hk"))

    def epilogue(r, col):
        xs = [tirx.floormod(tirx.floordiv(col, 1 << offsets[g]), radix[g]) for g in range(len(groups))]
        v = read(r, tirx.floordiv(col, p2), list(reversed(xs)))
        if not scale_first:
            v = v * scale
        if side == "output":
            v = v * S[col].astype("float32")
        return v.astype("float16")

    Y = te.compute((m, n), epilogue, name="Y")
    return te.create_prim_func([X, S, HK, Y]).with_attr("global_symbol", "main")


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------
def _stage_names(func) -> List[str]:
    """The blocks before the epilogue Y, in compute order (create_prim_func keeps it)."""
    return [str(b.name) for b in func.body.block.alloc_buffers]


def _group_of(name: str) -> Optional[int]:
    m = re.fullmatch(r"bfly_g(\d+)_b\d+", name)
    return int(m.group(1)) if m else None


def schedule_rht_llvm(func):
    """CPU: rows in parallel, all stages of a row into per-row buffers ahead of its epilogue."""
    import tvm

    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    r, _ = sch.get_loops(sch.get_sblock("Y"))
    for name in reversed(_stage_names(func)):
        sch.compute_at(sch.get_sblock(name), r)
    sch.parallel(r)
    return sch.mod


def _bind_threads(sch, loops, threads):
    """Fuse ``loops`` and stride them over threadIdx.x (a predicate where fewer); the thread loop."""
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _, tx = sch.split(fused, [None, threads])
    sch.bind(tx, "threadIdx.x")
    return tx


def schedule_rht_cuda(func):
    """One thread block per row (blockIdx.x). Per radix group, each thread loads its 2^r values
    (the first group from X in 16-byte vectors, later ones from shared memory, strided by the
    group's place value: consecutive threads hit consecutive banks), runs the group's butterflies
    in registers and stores the group output (vectorized for the first group). The K×K stage: one
    output per thread per pass, columns fastest (conflict-free; H_K entries are uniform across a
    warp, read through L1). The last stage stores Y directly."""
    import tvm

    names = _stage_names(func)
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    y = sch.get_sblock("Y")
    n = int(sch.get(y).writes[0].source.shape[1])
    if not names:  # n = 1: Y = X·S
        r, col = sch.get_loops(y)
        sch.bind(r, "blockIdx.x")
        sch.bind(col, "threadIdx.x")
        return sch.mod

    groups = {}
    for name in names:
        g = _group_of(name)
        if g is not None:
            groups.setdefault(g, []).append(name)
    shapes = [int(d) for d in sch.get(sch.get_sblock(names[-1])).writes[0].source.shape]  # (m, K, R_G..R_1)
    n_groups = len(groups)
    radix = list(reversed(shapes[2:]))  # R_g by group
    threads = max([n // r for r in radix], default=min(n, 1024))

    # the last stage writes Y itself: inline the epilogue into a register -> Y copy of it
    out = sch.cache_write(sch.get_sblock(names[-1]), 0, "local")
    sch.reverse_compute_inline(y)
    r = sch.get_loops(out)[0]
    sch.bind(r, "blockIdx.x")
    for name in reversed(names):
        sch.compute_at(sch.get_sblock(name), r)

    for g, members in sorted(groups.items()):
        last = sch.get_sblock(members[-1])
        final = "hk" not in names and g == n_groups - 1
        if final:
            store = out
        else:  # computed in registers, then stored to shared memory by `store`
            store = sch.cache_write(last, 0, "local")
            sch.set_scope(store, 0, "shared.dyn")
            pad = _row_pad(radix[0], str(sch.get(store).writes[0].source.dtype)) if g == 0 else 0
            if pad:  # stride of the axis above the runs: radix0 + pad (see _row_pad)
                sch.storage_align(store, 0, len(shapes) - 2, radix[0], pad)
        loops = sch.get_loops(store)[-1 - n_groups:]  # (kk, group axes, highest group first)
        axis_loop = loops[1 + (n_groups - 1 - g)]
        others = [lp for lp in loops if not lp.same_as(axis_loop)]
        sch.reorder(*others, axis_loop)
        tx = _bind_threads(sch, others, threads)
        for name in reversed(members):
            sch.compute_at(sch.get_sblock(name), tx)
        for name in members[:-1]:
            sch.set_scope(sch.get_sblock(name), 0, "local")
        load = sch.cache_read(sch.get_sblock(members[0]), 0, "local")  # X, or the previous group's output
        sch.compute_at(load, tx)
        for name in members:
            sch.unroll(sch.get_loops(sch.get_sblock(name))[-1])
        contiguous = g == 0
        for copy in (load, store):
            if contiguous and not (copy.same_as(store) and final and n_groups > 1):
                vectorize_copy(sch, copy)
            else:
                sch.unroll(sch.get_loops(copy)[-1])
    if "hk" in names:
        # one output per thread per pass; kk outermost so consecutive threads take consecutive columns
        tx = _bind_threads(sch, sch.get_loops(out)[-1 - n_groups:], threads)
        sch.compute_at(sch.get_sblock("hk"), tx)
    return sch.mod


# --------------------------------------------------------------------------------------------
# the kernels a model needs (the hook for qcompile.kernels.library / the runtime)
# --------------------------------------------------------------------------------------------
def rht_specs(n: int, buckets: Iterable[int], sides: Iterable[str] = SIDES) -> List[RhtSpec]:
    """The RHT kernels of one size for each M bucket; checks n first (QCompileError)."""
    _factor(int(n))
    out = []
    for side in sides:
        _check_side(side)
        out.extend(RhtSpec(side, int(n), int(m)) for m in buckets)
    return out


def scheduled_rht_func(spec: RhtSpec, target, cfg: RhtConfig = RhtConfig()):
    """The scheduled PrimFunc of one RHT kernel for a qcompile TargetInfo, named ``spec.name``."""
    groups = rht_groups(spec.n, cfg)
    if target.kind == "llvm":
        mod = schedule_rht_llvm(rht_func(spec.n, spec.m, spec.side, groups))
    else:
        store = rht_store_dtype(spec.n, target.arch, cfg)
        mod = schedule_rht_cuda(rht_func(spec.n, spec.m, spec.side, groups, store))
    return mod["main"].with_attr("global_symbol", spec.name).with_attr("tirx.is_scheduled", True)


def build_rht(specs: Iterable[RhtSpec], target, cfg: RhtConfig = RhtConfig()):
    """Compile RHT kernels into one TVM executable (functions named by ``RhtSpec.name``). To put
    them into a model's module instead, add ``scheduled_rht_func(spec, target)`` to the IRModule that
    library.build compiles."""
    import tvm

    funcs = {}
    for spec in specs:
        funcs.setdefault(spec.name, scheduled_rht_func(spec, target, cfg))
    return tvm.compile(tvm.IRModule(funcs), target=target.tvm_target())
