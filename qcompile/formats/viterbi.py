"""Viterbi encoding of sequences on a bitshift trellis (QTIP §3.1), plus tail-biting (§1.3).

Trellis: 2^L states; state i can be followed by j iff the top L−KV bits of j equal the low L−KV
bits of i, i.e. j = ((i << KV) mod 2^L) | c with 0 ≤ c < 2^KV. Every step consumes V values and
emits KV fresh bits. ``codebook[s]`` ([2^L, V]) is the vector state s decodes to.

Shared-predecessor trick: the 2^KV states j that share their group g = j >> KV (top L−KV bits)
all have the same 2^KV predecessors i = (c << (L−KV)) | g. So one step is

    best[g]   = min_c cost[(c << (L−KV)) | g]        # viewing cost as [2^KV, 2^(L−KV)]: min over dim 0
    cost'[j]  = best[j >> KV] + ||x_t − codebook[j]||²

O(2^L) per step, O(2^L·S) per sequence of S = T/V steps. The backpointer of group g is the
argmin c, only KV bits: stored as uint8 [S−1, B, 2^(L−KV)] (the reference keeps int64 [S, B, 2^(L−KV)]:
8× more). Costs are float32 (the reference uses fp16; fp32 costs the same bandwidth on CPUs,
which have no fast fp16, and removes ties/rounding in 256-step sums; the GPU path can reuse it).

The squared error is expanded, ||x − c||² = ||c||² − 2⟨x, c⟩ + ||x||², and the per-step constant
||x||² is dropped: the new costs of one step are then one rank-(V+1) GEMM (``addmm_``) on top of
the broadcast group minima, so a step is a few passes over [B, 2^L] floats (min/argmin,
broadcast, GEMM). When fp32 matmuls may use TF32/bf16 (torch.set_float32_matmul_precision, CUDA allow_tf32) the GEMM is replaced by
V+1 elementwise fp32 passes, so the costs stay fp32 either way.
Returned costs therefore exclude Σ||x_t||²; ``path_cost`` gives true squared errors.

Tail-biting (the sequence is a cycle: the low L−KV bits of the last state equal the top L−KV bits of
the first, so S·KV bits store the whole path): the reference's two-pass approximation. Pass 1 runs an
unconstrained Viterbi on the sequence rotated right by ⌊S/2⌋ steps and reads the overlap O = top
L−KV bits of the state at the rotated step ⌊S/2⌋ (= original step 0). Pass 2 reruns on the original
sequence with s_0's top bits and s_{S−1}'s low bits forced to O. The result is always a valid
tail-biting path (needs S·KV ≥ L); it can miss the exact tail-biting optimum
(``viterbi_tailbiting_exact``, 2^(L−KV) constrained runs): measured in tests/test_viterbi.py, the
gap is large only on streams barely longer than one state (S·KV ≈ L) and vanished on every
sequence once S·KV ≥ 16·L (e.g. L=10, T=256).

Engines: ``"torch"`` runs a step as the torch passes above; ``"tir"`` runs it as one compiled TVM
TensorIR kernel (``viterbi_step_func``: per group g the min and argmax-of-ties over its 2^KV
predecessors, then the 2^KV new costs of the group, read and written once), in the elementwise
form's order. Its paths are the torch engine's up to fp32 rounding of near-ties (64 tail-biting
sequences at L=16, V=2: one differed, by 6e-7 of its squared error at K·V=4, 5e-6 at K·V=8).
``"tir-min"`` keeps only the group minima between steps (``viterbi_min_step_func``: a step recomputes
each group's 2^KV costs from the previous minima, so it moves 2^(L−KV) floats a sequence each way where
the others move 2^L) and reads the path out with a compiled backtrack kernel; it has a CUDA schedule
and an llvm one, the same TIR, so the CPU tests check the kernels the GPU runs.
``"auto"`` (the default) is a TIR engine on CPUs (a L=16, K=2, V=1 step of 64 sequences: 1.3 ms
against 4.1 ms for the torch passes, 2 cores): "tir-min" at K·V = 2, where it measured faster,
"tir" elsewhere (``CPU_MIN_ENGINE_KV``); and ``CUDA_AUTO_ENGINE`` on CUDA: "tir-min" (10-15x the
torch passes on an H100).

Memory: sequences are processed in chunks sized from ``memory_budget`` bytes (per sequence about
10·2^L bytes of cost buffers + (S−1)·2^(L−KV) bytes of backpointers: L=16, K=2, V=1: ≈4.9 MiB;
``per_sequence_bytes``).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from ..errors import QCompileError

_INF = float("inf")


def _check(x: torch.Tensor, codebook: torch.Tensor, L: int, KV: int) -> Tuple[int, int, int]:
    if not (1 <= L <= 24):
        raise QCompileError(f"trellis state bits L={L} must be between 1 and 24")
    if not (1 <= KV < L):
        raise QCompileError(f"bits per trellis step K·V={KV} must be between 1 and L-1={L - 1}")
    if KV > 8:
        raise QCompileError(f"bits per trellis step K·V={KV} > 8 does not fit the uint8 backpointers")
    if x.dim() != 3:
        raise QCompileError(f"Viterbi input must be [batch, steps, V], got shape {list(x.shape)}")
    B, S, V = x.shape
    if codebook.dim() != 2 or codebook.shape[0] != (1 << L) or codebook.shape[1] != V:
        raise QCompileError(f"codebook must be [2^L={1 << L}, V={V}], got {list(codebook.shape)}")
    if S < 1:
        raise QCompileError("Viterbi needs at least one step")
    return B, S, V


def per_sequence_bytes(L: int, KV: int, S: int, engine: str = "torch") -> int:
    """Approximate working memory of one sequence in ``viterbi`` (bytes): the full cost buffers of the
    torch and "tir" engines, or the two group-minimum buffers of "tir-min" (plus its last step's full
    costs), and the uint8 backpointers."""
    n, g = 1 << L, 1 << (L - KV)
    if engine == "tir-min":
        return 4 * g * 2 + 4 * n * 2 + max(S - 1, 0) * g + 64 * S
    return 4 * n * 2 + 2 * n + 4 * g + max(S - 1, 0) * g + 64 * S


def default_memory_budget(device) -> int:
    """Bytes of working memory the encoder may use at once: 256 MiB on CPUs; on CUDA a quarter of
    the free memory, at least 256 MiB and at most 8 GiB."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(min(8 << 30, max(256 << 20, free // 4)))
    return 256 << 20


def _gemm_operands(codebook: torch.Tensor):
    """M [V+1, 2^L] with rows −2·codebookᵀ and ||codebook||², so [x, 1] @ M = ||c||² − 2⟨x, c⟩."""
    cb = codebook.to(torch.float32)
    return torch.cat([-2.0 * cb.T, cb.pow(2).sum(dim=1, keepdim=True).T], dim=0).contiguous()


def viterbi(x: torch.Tensor, codebook: torch.Tensor, L: int, KV: int, *,
            start_top: Optional[torch.Tensor] = None, end_low: Optional[torch.Tensor] = None,
            memory_budget: Optional[int] = None, engine: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimum squared-error path of each sequence.

    x: float [B, S, V] (S steps of V values); codebook: [2^L, V]. ``start_top`` (int [B]): force the
    top L−KV bits of the first state; ``end_low`` (int [B]): force the low L−KV bits of the last.
    Returns (states int64 [B, S], cost float32 [B]) where cost = Σ_t ||x_t − c(s_t)||² − Σ_t ||x_t||².
    ``engine``: "torch", "tir" or "auto" (see the module doc).
    """
    B, S, V = _check(x, codebook, L, KV)
    dev = x.device
    engine = _engine(engine, dev, KV)
    budget = default_memory_budget(dev) if memory_budget is None else int(memory_budget)
    chunk = max(1, budget // per_sequence_bytes(L, KV, S, engine))
    M = _gemm_operands(codebook.to(dev))
    out_s = torch.empty(B, S, dtype=torch.int64, device=dev)
    out_c = torch.empty(B, dtype=torch.float32, device=dev)
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        st = None if start_top is None else start_top[b0:b1]
        en = None if end_low is None else end_low[b0:b1]
        s, c = _viterbi_chunk(x[b0:b1].to(torch.float32), M, L, KV, st, en, engine)
        out_s[b0:b1] = s
        out_c[b0:b1] = c
    return out_s, out_c


def _viterbi_chunk(x, M, L, KV, start_top, end_low, engine="torch"):
    if engine == "tir-min":
        return _viterbi_chunk_min(x, M, L, KV, start_top, end_low)
    B, S, V = x.shape
    dev = x.device
    n, nc, G = 1 << L, 1 << KV, 1 << (L - KV)
    # [x_t, 1] for every step: the GEMM left operand
    xa = torch.cat([x, torch.ones(B, S, 1, dtype=torch.float32, device=dev)], dim=2)
    # the GEMM form is exact fp32 only when matmuls may not drop to TF32/bf16 internally; the TIR
    # step computes the elementwise form
    gemm = engine == "torch" and torch.get_float32_matmul_precision() == "highest" and not (
        dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    cost = torch.mm(xa[:, 0], M) if gemm else \
        M[V].expand(B, n).clone().addcmul_(x[:, 0, 0:1], M[0:1]) if V == 1 else \
        M[V].expand(B, n).clone().addcmul_(x[:, 0, 0:1], M[0:1]).addcmul_(x[:, 0, 1:2], M[1:2])
    if start_top is not None:
        top = start_top.to(dev, torch.int64).view(B, 1)
        bad = torch.arange(G, device=dev).view(1, G) != top  # group g = top L−KV bits
        cost.view(B, G, nc).masked_fill_(bad.unsqueeze(2), _INF)
    bp = torch.empty(max(S - 1, 0), B, G, dtype=torch.uint8, device=dev)
    if engine == "tir" and S > 1:
        step = _tir_step(B, L, KV, V)
        xa_steps = xa.transpose(0, 1).contiguous()  # [S, B, V+1]: one compact operand per step
        nxt = torch.empty_like(cost)
        for t in range(1, S):
            step(cost, xa_steps[t], M, nxt.view(B, G, nc), bp[t - 1])
            cost, nxt = nxt, cost
        return _backtrack(cost, bp, B, S, L, KV, nc, G, end_low, dev)
    best = torch.empty(B, G, dtype=torch.float32, device=dev)
    eq = torch.empty(B, nc, G, dtype=torch.bool, device=dev)
    tagged = torch.empty(B, nc, G, dtype=torch.uint8, device=dev)
    ids = torch.arange(nc, dtype=torch.uint8, device=dev).view(1, nc, 1)
    for t in range(1, S):
        pred = cost.view(B, nc, G)
        # best[g] = min_c cost[c, g]; argmin as max{c : cost[c, g] == best[g]} (torch.min with indices
        # over a strided dim is ~3x slower on CPUs than these four vectorised passes)
        torch.amin(pred, dim=1, out=best)
        torch.eq(pred, best.unsqueeze(1), out=eq)
        torch.mul(eq.view(torch.uint8), ids, out=tagged)
        torch.amax(tagged, dim=1, out=bp[t - 1])
        cost.view(B, G, nc).copy_(best.unsqueeze(2).expand(B, G, nc))
        if gemm:
            cost.addmm_(xa[:, t], M)
        else:  # the same sum, elementwise in full fp32
            cost.add_(M[V])
            for v in range(V):
                cost.addcmul_(x[:, t, v:v + 1], M[v:v + 1])
    return _backtrack(cost, bp, B, S, L, KV, nc, G, end_low, dev)


def _final_state(cost, B, L, KV, nc, G, end_low, dev):
    """(cost, state) of the best final state of each sequence, its low L−KV bits forced to ``end_low``."""
    if end_low is None:
        return cost.min(dim=1)
    low = end_low.to(dev, torch.int64).view(B, 1, 1)
    cand = cost.view(B, nc, G).gather(2, low.expand(B, nc, 1)).squeeze(2)  # [B, 2^KV]
    final_cost, c = cand.min(dim=1)
    return final_cost, (c << (L - KV)) | low.view(B)


def _backtrack(cost, bp, B, S, L, KV, nc, G, end_low, dev):
    """The best final state (``_final_state``), then the path through ``bp``."""
    final_cost, state = _final_state(cost, B, L, KV, nc, G, end_low, dev)
    states = torch.empty(B, S, dtype=torch.int64, device=dev)
    states[:, S - 1] = state
    rows = torch.arange(B, device=dev)
    for t in range(S - 1, 0, -1):
        g = state >> KV
        c = bp[t - 1][rows, g].to(torch.int64)
        state = (c << (L - KV)) | g
        states[:, t - 1] = state
    return states, final_cost


ENGINES = ("auto", "torch", "tir", "tir-min")
# what engine="auto" runs on a CUDA device: the group-minimum kernels. H100, one process at c67c318
# (artifacts/bench/viterbi-h100.json; 4096 tail-biting sequences of 256, L=16): qtip-hyb-2 12.1 M
# weights/s against 1.2 M for the torch passes, qtip-3inst-2 7.9 M against 0.52 M, the same MSE; one
# 4096x4096 layer with BlockLDLQ 17.5 -> 3.4 s (HYB-2) and 38.1 -> 3.8 s (3INST-2)
CUDA_AUTO_ENGINE = "tir-min"
# ... and on a CPU: the group-minimum kernels at these K·V, the full-cost step elsewhere. 2 cores, 128
# tail-biting sequences of 256 at L=16 (gaussian_mse, three runs each, alternating): K·V=2 (3INST-2)
# 1.55-1.61 s against 1.85-1.89 s; K·V=3 (1MAD-3) 2.83-2.89 against 1.84-2.06; K·V=4 (HYB-2) 1.51-1.60
# against 1.47-1.55, (3INST-4) 2.67-2.77 against 2.65-2.69. Both find the same paths.
CPU_MIN_ENGINE_KV = (2,)


def _engine(engine: str, dev, KV: int = 0) -> str:
    if engine not in ENGINES:
        raise QCompileError(f"unknown Viterbi engine {engine!r} (known: {', '.join(ENGINES)})")
    kind = torch.device(dev).type
    if engine == "auto":
        if kind == "cpu":
            return "tir-min" if KV in CPU_MIN_ENGINE_KV else "tir"
        return CUDA_AUTO_ENGINE
    if engine == "tir" and kind != "cpu":
        raise QCompileError("the full-cost TIR Viterbi step runs on CPUs only; use engine='tir-min' "
                            "(or 'torch') on CUDA")
    if engine == "tir-min" and kind not in ("cpu", "cuda"):
        raise QCompileError(f"engine='tir-min' runs on CPUs and CUDA GPUs, not on {kind!r} tensors")
    return engine


def viterbi_step_func(B: int, L: int, KV: int, V: int):
    """TIR of one Viterbi step: main(cost f32[B, 2^L], xa f32[B, V+1] (x_t and a 1), M f32[V+1, 2^L]
    (``_gemm_operands``), new f32[B, 2^(L−KV), 2^KV], bp u8[B, 2^(L−KV)]). For group g:
    best = min_c cost[c·G + g], bp = the largest c attaining it, new[g, c'] = best + M[V, j] +
    Σ_v x_v·M[v, j] with j = g·2^KV + c' (the torch engine's elementwise order)."""
    from tvm import te

    n, nc, G = 1 << L, 1 << KV, 1 << (L - KV)
    cost = te.placeholder((B, n), "float32", name="cost")
    xa = te.placeholder((B, V + 1), "float32", name="xa")
    M = te.placeholder((V + 1, n), "float32", name="M")
    c = te.reduce_axis((0, nc), name="c")
    best = te.compute((B, G), lambda b, g: te.min(cost[b, c * G + g], axis=c), name="best")
    c2 = te.reduce_axis((0, nc), name="c2")
    bp = te.compute((B, G), lambda b, g: te.max(
        te.if_then_else(cost[b, c2 * G + g] == best[b, g], c2, 0).astype("uint8"), axis=c2), name="bp")

    def new_cost(b, g, cc):
        j = g * nc + cc
        e = best[b, g] + M[V, j]
        for v in range(V):
            e = e + xa[b, v] * M[v, j]
        return e

    new = te.compute((B, G, nc), new_cost, name="new")
    return te.create_prim_func([cost, xa, M, new, bp])


@functools.lru_cache(maxsize=16)
def _tir_step(B: int, L: int, KV: int, V: int):
    """The compiled CPU step for one chunk shape: per (sequence, group) the minimum, its backpointer
    and the group's new costs in one pass, sequences in parallel."""
    import tvm

    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": viterbi_step_func(B, L, KV, V)}))
    best = sch.get_sblock("best")
    b, g, c = sch.get_loops(best)
    # 8 groups at a time, the predecessor loop outside them, so the min / argmax / new-cost loops run
    # over contiguous groups as vectors (1.34 against 2.5 ms per step with one group at a time)
    g_outer, g_inner = sch.split(g, [None, min(8, 1 << (L - KV))])
    sch.reorder(c, g_inner)
    sch.reverse_compute_at(sch.get_sblock("bp"), g_outer)
    sch.reverse_compute_at(sch.get_sblock("new"), g_outer)
    sch.parallel(b)
    best_init = sch.decompose_reduction(best, c)
    bp = sch.get_sblock("bp")
    c2_loop, g_loop = sch.get_loops(bp)[-1], sch.get_loops(bp)[-2]
    sch.reorder(c2_loop, g_loop)
    bp_init = sch.decompose_reduction(bp, c2_loop)
    sch.vectorize(sch.get_loops(best_init)[-1])
    sch.vectorize(sch.get_loops(bp_init)[-1])
    g_new, cc = sch.get_loops(sch.get_sblock("new"))[-2:]
    if 1 << KV <= 8:  # the group's new costs: a vector of at most 64 lanes
        sch.vectorize(sch.fuse(g_new, cc))
    else:  # (K·V = 8: 256 per group) vectors of 8 lanes
        sch.vectorize(sch.split(cc, [None, 8])[1])
    return tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm"}))["main"]


# --- the group-minimum engine ("tir-min"): a step keeps only the 2^(L−KV) group minima ---------------
#
# cost_t[j] = best_{t−1}[j >> KV] + ||c_j||² − 2⟨x_t, c_j⟩, and step t's only use of cost_t is
# best_t[g] = min_c cost_t[c·G + g] (with its backpointer). So a step can recompute the 2^KV costs of
# a group from the previous minima instead of storing all 2^L of them: per sequence and step it reads
# and writes G = 2^(L−KV) floats (64 KiB at L=16, K·V=2) where the full-cost step moves 2^L (256 KiB)
# each way. That is what a GPU wants (the torch passes move the full costs five or six times); on CPUs
# the full-cost step ("tir") vectorizes better above K·V = 2 and stays the default there
# (CPU_MIN_ENGINE_KV). Step 0 starts from the prior
# best_{−1} = 0, or +inf outside the forced group of ``start_top``; the last step's full costs
# (needed for ``end_low``) are formed once in torch.
MIN_STEP_THREADS = 256       # CUDA threads per block of the step kernel
MIN_STEP_SEQUENCES = 8       # sequences a CUDA thread carries for one group (their M loads are shared)
# threads that fill an H100-class GPU (132 SMs x 1024): below them, fewer sequences a thread
MIN_STEP_FULL_THREADS = 1 << 17
MIN_STEP_UNROLL = 16         # predecessors per group unrolled at most (K·V = 8 has 256)
BACKTRACK_THREADS = 64       # CUDA threads per block of the backtrack kernel (one sequence each)
# llvm: up to this K·V a group run's update stays scalar and unrolled, above it is one vector of 8 groups.
# A step of 64 sequences at L=16 (2 cores): K·V=2 1.09 ms scalar against 3.49 vectorized; K·V=3 3.94 /
# 2.39, 4 (V=1) 3.62 / 2.53, 4 (V=2) 4.09 / 2.70, 8 3.70 / 2.49 ms (the full-cost step: 2.35-3.12 ms)
MIN_STEP_SCALAR_KV = 2


def viterbi_min_step_func(B: int, L: int, KV: int, V: int):
    """TIR of one group-minimum step: main(prev f32[B, G], xa f32[B, V+1] (x_t and a 1), M f32[V+1, 2^L]
    (``_gemm_operands``), best f32[B, G], bp u8[B, G]) with G = 2^(L−KV). For group g and predecessor
    c, j = c·G + g: cost = prev[j >> KV] + M[V, j] + Σ_v x_v·M[v, j] (the torch engine's elementwise
    order); best = the minimum over c, bp = the largest c attaining it (one pass: a (value, index)
    reduction that takes a later c on equality)."""
    from tvm import te, tirx

    n, nc, G = 1 << L, 1 << KV, 1 << (L - KV)
    prev = te.placeholder((B, G), "float32", name="prev")
    xa = te.placeholder((B, V + 1), "float32", name="xa")
    M = te.placeholder((V + 1, n), "float32", name="M")

    def combine(acc, new):
        take = tirx.any(new[0] < acc[0], tirx.all(new[0] == acc[0], new[1] > acc[1]))
        return tirx.Select(take, new[0], acc[0]), tirx.Select(take, new[1], acc[1])

    def identity(t0, t1):
        return tirx.const(_INF, t0), tirx.const(0, t1)

    argmin_last = te.comm_reducer(combine, identity, name="argmin_last")
    c = te.reduce_axis((0, nc), name="c")

    def cost(b, g, c):
        j = c * G + g
        e = prev[b, tirx.shift_right(j, KV)] + M[V, j]
        for v in range(V):
            e = e + xa[b, v] * M[v, j]
        return e

    best, arg = te.compute((B, G), lambda b, g: argmin_last((cost(b, g, c), c), axis=c), name="best")
    bp = te.compute((B, G), lambda b, g: arg[b, g].astype("uint8"), name="bp")
    return te.create_prim_func([prev, xa, M, best, bp])


def min_step_sequences(B: int, L: int, KV: int) -> int:
    """Sequences per CUDA thread of the step kernel: MIN_STEP_SEQUENCES, halved while the B·G / that
    threads would not fill the GPU (MIN_STEP_FULL_THREADS)."""
    per = MIN_STEP_SEQUENCES
    while per > 1 and (B // per) * (1 << (L - KV)) < MIN_STEP_FULL_THREADS:
        per //= 2
    return per


def schedule_min_step(B: int, L: int, KV: int, V: int, kind: str):
    """The step's schedule. cuda: a thread per (group, ``min_step_sequences`` sequences), consecutive
    groups on consecutive lanes (their M and prev reads coalesce), the predecessor loop outside the
    sequences so each M value is loaded once for all of them, the running minima in registers.
    llvm: sequences in parallel, groups in runs of 8 (the minima of a run in registers; a vector above
    MIN_STEP_SCALAR_KV)."""
    import tvm

    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": viterbi_min_step_func(B, L, KV, V)}))
    blk = sch.get_sblock("best")
    b, g, c = sch.get_loops(blk)
    if kind == "cuda":
        per = min_step_sequences(B, L, KV)
        bo, bi = sch.split(b, [None, per])
        sch.reorder(bo, g, c, bi)
        bx, tx = sch.split(sch.fuse(bo, g), [None, MIN_STEP_THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        at, inner = tx, bi
    else:
        go, gi = sch.split(g, [None, min(8, 1 << (L - KV))])
        sch.reorder(b, go, c, gi)
        sch.parallel(b)
        at, inner = go, gi
    stores = [sch.cache_write(blk, i, "local") for i in (0, 1)]  # the minima and their indices
    for store in stores:
        sch.reverse_compute_at(store, at)
    sch.compute_inline(sch.get_sblock("best.v1_local"))  # the int32 index goes straight to the uint8 bp
    sch.reverse_compute_at(sch.get_sblock("bp"), at)
    vector = kind != "cuda" and KV > MIN_STEP_SCALAR_KV
    if vector:  # (vectorize before the init is split off: after, the update no longer counts as a reduction)
        sch.vectorize(inner)
    sch.decompose_reduction(blk, c)
    if not vector:
        sch.unroll(inner)
    if kind == "cuda" and (1 << KV) <= MIN_STEP_UNROLL:
        sch.unroll(c)
    return sch


def viterbi_backtrack_func(B: int, S: int, L: int, KV: int):
    """TIR of the path read-out: main(bp u8[S−1, B, G], last i64[B], states i64[B, S]): from the final
    state, state_{t−1} = (bp[t−1, b, g] << (L−KV)) | g with g = state_t >> KV. One sequence is a serial
    chain of S dependent loads; sequences run in parallel."""
    from tvm.script import tirx as T

    G, shift = 1 << (L - KV), L - KV
    steps = max(S - 1, 1)  # (an unused 1-step bp when S = 1)

    @T.prim_func(s_tir=True)
    def main(bp: T.Buffer((steps, B, G), "uint8"), last: T.Buffer((B,), "int64"),
             states: T.Buffer((B, S), "int64")):
        T.func_attr({"tirx.noalias": True})
        cur = T.sblock_alloc_buffer((B,), "int64", scope="local")
        for b in range(B):
            with T.sblock("path"):
                vb = T.axis.spatial(B, b)
                T.reads(bp[0:steps, vb, 0:G], last[vb])
                T.writes(states[vb, 0:S], cur[vb])
                cur[vb] = last[vb]
                states[vb, S - 1] = last[vb]
                for i in range(S - 1):
                    g = T.shift_right(cur[vb], T.int64(KV))
                    cur[vb] = T.bitwise_or(T.shift_left(T.Cast("int64", bp[S - 2 - i, vb, g]), T.int64(shift)), g)
                    states[vb, S - 2 - i] = cur[vb]

    return main


def schedule_backtrack(B: int, S: int, L: int, KV: int, kind: str):
    import tvm

    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": viterbi_backtrack_func(B, S, L, KV)}))
    (b,) = sch.get_loops(sch.get_sblock("path"))
    if kind == "cuda":
        bx, tx = sch.split(b, [None, BACKTRACK_THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    else:
        sch.parallel(b)
    return sch


def _tvm_target(kind: str):
    from ..kernels.target import TargetInfo, local_cuda_arch

    if kind == "cuda":
        arch = local_cuda_arch()
        if arch is None:
            raise QCompileError("engine='tir-min' on CUDA tensors needs a visible CUDA GPU")
        return TargetInfo(arch, "cuda", arch).tvm_target()
    return TargetInfo("llvm", "llvm").tvm_target()


@functools.lru_cache(maxsize=16)
def _min_step(B: int, L: int, KV: int, V: int, kind: str):
    import tvm

    return tvm.compile(schedule_min_step(B, L, KV, V, kind).mod, target=_tvm_target(kind))["main"]


@functools.lru_cache(maxsize=16)
def _backtrack_kernel(B: int, S: int, L: int, KV: int, kind: str):
    import tvm

    return tvm.compile(schedule_backtrack(B, S, L, KV, kind).mod, target=_tvm_target(kind))["main"]


def _viterbi_chunk_min(x, M, L, KV, start_top, end_low):
    """``_viterbi_chunk`` on the group-minimum kernels (CPU or CUDA, by x's device). The chunk is
    padded to a whole number of the CUDA kernel's sequences per thread (zero sequences, sliced off), on
    either device, so the CPU runs the padding the GPU does (at most 7 idle sequences)."""
    B0, S, V = x.shape
    dev = x.device
    kind = "cuda" if dev.type == "cuda" else "llvm"
    n, nc, G = 1 << L, 1 << KV, 1 << (L - KV)
    per = min_step_sequences(B0, L, KV)
    B = -(-B0 // per) * per
    if B != B0:
        x = torch.cat([x, x.new_zeros(B - B0, S, V)])
    xa = torch.cat([x, torch.ones(B, S, 1, dtype=torch.float32, device=dev)], dim=2).transpose(0, 1).contiguous()
    prev = torch.zeros(B, G, dtype=torch.float32, device=dev)
    if start_top is not None:  # step 0's costs: +inf outside group start_top (its top L−KV bits)
        prev[:B0].fill_(_INF).scatter_(1, start_top.to(dev, torch.int64).view(B0, 1), 0.0)
    nxt = torch.empty_like(prev)
    bp = torch.empty(max(S - 1, 1), B, G, dtype=torch.uint8, device=dev)
    if S > 1:
        step = _min_step(B, L, KV, V, kind)
        for t in range(S - 1):
            step(prev, xa[t], M, nxt, bp[t])
            prev, nxt = nxt, prev
    # the last step's full costs, in the elementwise order of the step
    cost = prev.repeat_interleave(nc, dim=1).add_(M[V])
    for v in range(V):
        cost.addcmul_(xa[S - 1, :, v:v + 1], M[v:v + 1])
    final_cost, last = _final_state(cost[:B0], B0, L, KV, nc, G, end_low, dev)
    last = torch.cat([last, last.new_zeros(B - B0)]).contiguous()
    states = torch.empty(B, S, dtype=torch.int64, device=dev)
    _backtrack_kernel(B, S, L, KV, kind)(bp, last, states)
    return states[:B0], final_cost


def path_cost(x: torch.Tensor, codebook: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Σ_t ||x_t − codebook[s_t]||² per sequence (float64 [B]); x [B, S, V], states [B, S]."""
    rec = codebook.to(x.device, torch.float64)[states]
    return (x.to(torch.float64) - rec).pow(2).sum(dim=(1, 2))


def is_tailbiting(states: torch.Tensor, L: int, KV: int) -> torch.Tensor:
    """bool [B]: every step is a trellis edge, including the wrap from the last state to the first."""
    mask = (1 << (L - KV)) - 1
    nxt = torch.roll(states, -1, dims=1)
    return ((nxt >> KV) == (states & mask)).all(dim=1)


def is_path(states: torch.Tensor, L: int, KV: int) -> torch.Tensor:
    """bool [B]: every consecutive pair of states is a trellis edge (no wrap)."""
    mask = (1 << (L - KV)) - 1
    return ((states[:, 1:] >> KV) == (states[:, :-1] & mask)).all(dim=1)


def viterbi_tailbiting(x: torch.Tensor, codebook: torch.Tensor, L: int, KV: int, *,
                       memory_budget: Optional[int] = None, engine: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Two-pass tail-biting Viterbi (see the module doc). x [B, S, V] -> (states int64 [B, S],
    cost float32 [B], without Σ||x_t||²). Needs S·KV ≥ L."""
    B, S, V = _check(x, codebook, L, KV)
    if S * KV < L:
        raise QCompileError(f"a tail-biting trellis needs S·K·V ≥ L; got {S} steps of {KV} bits with L={L}")
    shift = S // 2
    rot_states, _ = viterbi(torch.roll(x, shift, dims=1), codebook, L, KV, memory_budget=memory_budget,
                            engine=engine)
    overlap = rot_states[:, shift] >> KV  # state at original step 0: its top L−KV bits
    return viterbi(x, codebook, L, KV, start_top=overlap, end_low=overlap, memory_budget=memory_budget,
                   engine=engine)


def viterbi_tailbiting_exact(x: torch.Tensor, codebook: torch.Tensor, L: int, KV: int, *,
                             memory_budget: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact tail-biting optimum: one constrained Viterbi per overlap value (2^(L−KV) runs per
    sequence, i.e. quadratic in 2^L). For measuring the two-pass gap at small L only."""
    B, S, V = _check(x, codebook, L, KV)
    if S * KV < L:
        raise QCompileError(f"a tail-biting trellis needs S·K·V ≥ L; got {S} steps of {KV} bits with L={L}")
    G = 1 << (L - KV)
    overlaps = torch.arange(G, device=x.device)
    best_s = torch.empty(B, S, dtype=torch.int64, device=x.device)
    best_c = torch.empty(B, dtype=torch.float32, device=x.device)
    for b in range(B):
        xb = x[b:b + 1].expand(G, S, V)
        s, c = viterbi(xb, codebook, L, KV, start_top=overlaps, end_low=overlaps, memory_budget=memory_budget)
        i = int(torch.argmin(c))
        best_s[b], best_c[b] = s[i], c[i]
    return best_s, best_c
