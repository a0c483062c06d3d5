"""The bitshift-trellis Viterbi encoder (qcompile.formats.viterbi) against brute force on tiny trellises."""
import itertools
import shutil

import pytest
import torch

from qcompile.errors import QCompileError
from qcompile.formats.viterbi import (is_path, is_tailbiting, path_cost, per_sequence_bytes, viterbi,
                                      viterbi_tailbiting, viterbi_tailbiting_exact)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def all_paths(L, KV, S):
    """Every path of S states (int64 [P, S]): a free start state, then KV fresh bits per step."""
    mask = (1 << L) - 1
    out = []
    for s0 in range(1 << L):
        for tail in itertools.product(range(1 << KV), repeat=S - 1):
            path = [s0]
            for c in tail:
                path.append(((path[-1] << KV) & mask) | c)
            out.append(path)
    return torch.tensor(out, dtype=torch.int64)


def all_tailbiting_paths(L, KV, S):
    """Every circular stream of S·KV bits, read as S windows of L bits at steps of KV (independent
    of qcompile's bitstream code)."""
    nbits = S * KV
    out = []
    for v in range(1 << nbits):
        bits = [(v >> (nbits - 1 - i)) & 1 for i in range(nbits)]
        out.append([sum(bits[(t * KV + i) % nbits] << (L - 1 - i) for i in range(L)) for t in range(S)])
    return torch.tensor(out, dtype=torch.int64)


def costs_of(x, cb, paths):
    """float64 [B, P]: squared error of every sequence under every path."""
    rec = cb.double()[paths]  # [P, S, V]
    return (x.double()[:, None] - rec[None]).pow(2).sum(dim=(2, 3))


CASES = [(4, 1, 1, 6), (5, 2, 1, 5), (6, 2, 2, 4), (6, 3, 1, 4), (5, 1, 2, 5)]  # (L, K, V, S)


@pytest.mark.parametrize("L, K, V, S", CASES)
def test_viterbi_is_the_exact_optimum(L, K, V, S):
    KV = K * V
    gen = torch.Generator().manual_seed(L * 100 + KV * 10 + S)
    cb = torch.randn(1 << L, V, generator=gen)
    x = torch.randn(24, S, V, generator=gen)
    paths = all_paths(L, KV, S)
    brute = costs_of(x, cb, paths).min(dim=1).values
    states, cost = viterbi(x, cb, L, KV)
    assert states.dtype == torch.int64 and states.shape == (24, S)
    assert is_path(states, L, KV).all()
    got = path_cost(x, cb, states)
    assert torch.allclose(got, brute, rtol=0, atol=1e-5)
    # the returned cost drops Σ||x_t||² (the GEMM form of the squared error)
    assert torch.allclose(cost.double() + x.double().pow(2).sum(dim=(1, 2)), got, atol=1e-4)


@pytest.mark.parametrize("L, K, V, S", CASES[:3])
def test_viterbi_start_and_end_constraints(L, K, V, S):
    KV = K * V
    gen = torch.Generator().manual_seed(7 + L)
    cb = torch.randn(1 << L, V, generator=gen)
    x = torch.randn(16, S, V, generator=gen)
    G = 1 << (L - KV)
    top = torch.randint(0, G, (16,), generator=gen)
    low = torch.randint(0, G, (16,), generator=gen)
    paths = all_paths(L, KV, S)
    ok = ((paths[None, :, 0] >> KV) == top[:, None]) & ((paths[None, :, -1] & (G - 1)) == low[:, None])
    brute = costs_of(x, cb, paths).masked_fill(~ok, float("inf")).min(dim=1).values
    states, _ = viterbi(x, cb, L, KV, start_top=top, end_low=low)
    assert torch.equal(states[:, 0] >> KV, top) and torch.equal(states[:, -1] & (G - 1), low)
    assert torch.allclose(path_cost(x, cb, states), brute, atol=1e-5)


@pytest.mark.parametrize("L, K, V, S", [(4, 1, 1, 6), (5, 2, 1, 5), (6, 2, 2, 4), (5, 1, 2, 4), (6, 1, 1, 8)])
def test_tailbiting_two_pass_is_a_valid_tailbiting_path(L, K, V, S):
    KV = K * V
    gen = torch.Generator().manual_seed(3 * L + S)
    B = 64
    cb = torch.randn(1 << L, V, generator=gen)
    x = torch.randn(B, S, V, generator=gen)
    circ = all_tailbiting_paths(L, KV, S)
    assert is_tailbiting(circ, L, KV).all()
    exact = costs_of(x, cb, circ).min(dim=1).values
    # the quadratic exact search (one constrained run per overlap) agrees with brute force
    ex_states, _ = viterbi_tailbiting_exact(x, cb, L, KV)
    assert is_tailbiting(ex_states, L, KV).all()
    assert torch.allclose(path_cost(x, cb, ex_states), exact, atol=1e-5)
    # the two-pass approximation always returns a valid tail-biting path, never below the optimum.
    # On streams this short (S·K·V ≈ L: every window covers most of the stream) the overlap guessed
    # by pass 1 is often wrong: measured here, optimal for 28-75 % of the sequences, mean excess
    # 5-80 %. The gap vanishes for realistic lengths (next test).
    states, _ = viterbi_tailbiting(x, cb, L, KV)
    assert is_tailbiting(states, L, KV).all()
    assert (path_cost(x, cb, states) >= exact - 1e-6).all()


@pytest.mark.parametrize("L, K, V, S, B", [(6, 1, 1, 32, 64), (6, 2, 1, 64, 64), (8, 2, 2, 64, 32), (10, 2, 1, 256, 4)])
def test_tailbiting_two_pass_gap_at_longer_sequences(L, K, V, S, B):
    """The documented gap of the two-pass approximation against the exact tail-biting optimum
    (``viterbi_tailbiting_exact``, checked against brute force above). Measured (same seeds):
    (6,1,1,32): optimal for 66 % of sequences, mean excess 1.7 %, max 13 %; (6,2,1,64), (8,2,2,64),
    (10,2,1,256): optimal for every sequence. Paper Table 2 (L=12, T=256): ≤ 0.2 % at k=1, none at k ≥ 2."""
    KV = K * V
    gen = torch.Generator().manual_seed(3 * L + S)
    cb = torch.randn(1 << L, V, generator=gen)
    x = torch.randn(B, S, V, generator=gen)
    ex_states, _ = viterbi_tailbiting_exact(x, cb, L, KV)
    states, _ = viterbi_tailbiting(x, cb, L, KV)
    assert is_tailbiting(states, L, KV).all()
    exact, two = path_cost(x, cb, ex_states), path_cost(x, cb, states)
    assert (two >= exact - 1e-5).all()
    gap = (two - exact) / exact
    if S * KV >= 16 * L:
        assert float(gap.max()) < 1e-6
    else:
        assert float(gap.mean()) < 0.03


def test_chunking_by_memory_budget_gives_the_same_paths():
    L, KV, S = 10, 2, 32
    gen = torch.Generator().manual_seed(5)
    cb = torch.randn(1 << L, 1, generator=gen)
    x = torch.randn(9, S, 1, generator=gen)
    ref, _ = viterbi_tailbiting(x, cb, L, KV)
    small, _ = viterbi_tailbiting(x, cb, L, KV, memory_budget=2 * per_sequence_bytes(L, KV, S))  # chunks of 2
    assert torch.equal(ref, small)
    one, _ = viterbi_tailbiting(x, cb, L, KV, memory_budget=1)  # at least one sequence per chunk
    assert torch.equal(ref, one)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(x=torch.zeros(2, 4), L=4, KV=1), "must be \\[batch, steps, V\\]"),
    (dict(x=torch.zeros(2, 4, 1), cb=torch.zeros(8, 1), L=4, KV=1), "codebook must be \\[2\\^L=16, V=1\\]"),
    (dict(x=torch.zeros(2, 4, 1), L=4, KV=4), "between 1 and L-1"),
    (dict(x=torch.zeros(2, 4, 1), L=30, KV=2), "between 1 and 24"),
    (dict(x=torch.zeros(2, 4, 1), L=12, KV=9), "uint8 backpointers"),
])
def test_bad_inputs(kwargs, msg):
    L = kwargs["L"]
    cb = kwargs.get("cb", torch.zeros(1 << min(L, 12), 1))
    with pytest.raises(QCompileError, match=msg):
        viterbi(kwargs["x"], cb, L, kwargs["KV"])


def test_tailbiting_needs_a_stream_at_least_one_state_long():
    with pytest.raises(QCompileError, match="S·K·V ≥ L"):
        viterbi_tailbiting(torch.zeros(1, 3, 1), torch.zeros(256, 1), 8, 2)


def test_elementwise_costs_when_matmuls_may_use_reduced_precision():
    L, KV, S = 6, 2, 8
    gen = torch.Generator().manual_seed(2)
    for V in (1, 2):
        cb = torch.randn(1 << L, V, generator=gen)
        x = torch.randn(6, S, V, generator=gen)
        ref, _ = viterbi_tailbiting(x, cb, L, KV)
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")  # no GEMM: elementwise fp32 costs
        try:
            got, _ = viterbi_tailbiting(x, cb, L, KV)
        finally:
            torch.set_float32_matmul_precision(old)
        assert torch.allclose(path_cost(x, cb, got), path_cost(x, cb, ref), atol=1e-5)


def engine_problem(L, KV, V):
    """(codebook, 12 sequences of 40 steps, forced top bits) seeded by L and KV: what the engine
    comparisons below run, unconstrained and with the tail-biting constraints."""
    g = torch.Generator().manual_seed(L * 10 + KV)
    cb = torch.randn(1 << L, V, generator=g)
    x = torch.randn(12, 40, V, generator=g)
    top = torch.randint(0, 1 << (L - KV), (12,), generator=g)
    return cb, x, top


@pytest.mark.parametrize("L, KV, V", [(10, 2, 1), (10, 4, 2), (12, 3, 1)])
def test_tir_engine_finds_the_torch_engines_paths(L, KV, V):
    """The compiled TIR step and the torch passes pick the same paths (ties: the largest
    predecessor in both; near-ties may round apart), with and without the tail-biting constraints."""
    cb, x, top = engine_problem(L, KV, V)
    for kwargs in ({}, {"start_top": top, "end_low": top}):
        s_torch, c_torch = viterbi(x, cb, L, KV, engine="torch", **kwargs)
        s_tir, c_tir = viterbi(x, cb, L, KV, engine="tir", **kwargs)
        # the same paths up to fp32 rounding of near-ties (the torch engine sums through a GEMM)
        assert (s_torch == s_tir).all(dim=1).float().mean() >= 0.9
        assert torch.allclose(c_torch, c_tir, rtol=1e-5, atol=1e-4)
        assert torch.allclose(path_cost(x, cb, s_tir), path_cost(x, cb, s_torch), rtol=1e-5)


def test_tir_step_takes_the_largest_predecessor_of_a_tie():
    from qcompile.formats.viterbi import _tir_step

    L, KV, V, B = 6, 2, 1, 3
    n, nc, G = 1 << L, 1 << KV, 1 << (L - KV)
    cost = torch.randn(B, n)
    cost.view(B, nc, G)[:, 1] = cost.view(B, nc, G)[:, 3] = -10.0  # predecessors 1 and 3 tie for the minimum
    xa = torch.tensor([[0.5, 1.0]] * B)
    M = torch.randn(V + 1, n)
    new, bp = torch.empty(B, G, nc), torch.empty(B, G, dtype=torch.uint8)
    _tir_step(B, L, KV, V)(cost, xa, M, new, bp)
    assert (bp == 3).all()
    expected = (-10.0 + M[1] + 0.5 * M[0]).view(1, G, nc).expand(B, G, nc)
    assert torch.allclose(new, expected)


def test_unknown_or_unavailable_engine_is_one_clear_error():
    cb = torch.randn(1 << 8, 1)
    with pytest.raises(QCompileError, match="unknown Viterbi engine 'fast'") as info:
        viterbi(torch.randn(2, 8, 1), cb, 8, 2, engine="fast")
    assert "\n" not in str(info.value)
    with pytest.raises(QCompileError, match="runs on CPUs only; use engine='tir-min'") as info:
        viterbi(torch.empty(2, 8, 1, device="meta"), cb.to("meta"), 8, 2, engine="tir")
    assert "\n" not in str(info.value)
    with pytest.raises(QCompileError, match="runs on CPUs and CUDA GPUs, not on 'meta'"):
        viterbi(torch.empty(2, 8, 1, device="meta"), cb.to("meta"), 8, 2, engine="tir-min")


@pytest.mark.parametrize("L, KV, V", [(10, 2, 1), (10, 4, 2), (12, 3, 1), (10, 8, 2)])
def test_group_minimum_engine_finds_the_full_cost_engines_paths(L, KV, V, monkeypatch):
    """engine="tir-min" (the minima of the groups between steps, a compiled backtrack) through its llvm
    schedule: the same TIR as its CUDA kernels. Against the full-cost TIR step it adds the costs in the
    same order, so the paths agree exactly, with and without the tail-biting constraints; the chunk is
    padded to whole CUDA threads' sequences (12 -> 16 here) and the padding sliced off."""
    from qcompile.formats import viterbi as vit

    monkeypatch.setattr(vit, "MIN_STEP_FULL_THREADS", 1)  # 8 sequences a thread: pads 12 to 16
    assert vit.min_step_sequences(12, L, KV) == 8
    step_batches = []
    compiled = vit._min_step

    def recording_step(B, *args):
        step_batches.append(B)
        return compiled(B, *args)

    monkeypatch.setattr(vit, "_min_step", recording_step)
    cb, x, top = engine_problem(L, KV, V)
    for kwargs in ({}, {"start_top": top, "end_low": top}):
        s_tir, c_tir = viterbi(x, cb, L, KV, engine="tir", **kwargs)
        s_min, c_min = viterbi(x, cb, L, KV, engine="tir-min", **kwargs)
        assert s_min.shape == (12, 40) and is_path(s_min, L, KV).all()
        assert torch.equal(s_min, s_tir)
        assert torch.allclose(c_min, c_tir, rtol=1e-6, atol=1e-5)
        if kwargs:
            assert ((s_min[:, 0] >> KV) == top).all() and ((s_min[:, -1] & ((1 << (L - KV)) - 1)) == top).all()
    states, _ = viterbi_tailbiting(x, cb, L, KV, engine="tir-min")
    assert is_tailbiting(states, L, KV).all()
    assert step_batches and set(step_batches) == {16}


def test_group_minimum_step_takes_the_largest_predecessor_of_a_tie():
    from qcompile.formats.viterbi import _min_step

    L, KV, V, B = 6, 2, 1, 3
    nc, G = 1 << KV, 1 << (L - KV)
    prev = torch.randn(B, G)
    xa = torch.tensor([[0.0, 1.0]] * B)  # x_t = 0: cost = prev[j >> KV] + M[1, j]
    M = torch.zeros(V + 1, 1 << L)
    # group g's predecessors j = c·G + g read prev[j >> KV]; make c = 1 and c = 3 tie below the others
    M[1].view(nc, G)[0] = M[1].view(nc, G)[2] = 100.0
    j1, j3 = torch.arange(G) + G, torch.arange(G) + 3 * G
    prev[:, j3 >> KV] = prev[:, j1 >> KV] = -10.0
    best, bp = torch.empty(B, G), torch.empty(B, G, dtype=torch.uint8)
    _min_step(B, L, KV, V, "llvm")(prev, xa, M, best, bp)
    assert (bp == 3).all() and (best == -10.0).all()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas) for the resources")
@pytest.mark.parametrize("K, V", [(2, 1), (3, 1), (4, 1), (2, 2), (3, 2), (4, 2)])
def test_group_minimum_cuda_kernels_compile_without_spills(K, V):
    """The CUDA forms of the step (L=16, a chunk of 1600 sequences: 8 a thread) and of the backtrack
    compile for sm_90 without spills or local memory, and the step loads each M value once for all
    of a thread's sequences (K·V <= 4: the predecessor loop unrolled)."""
    import tvm

    from qcompile.formats.viterbi import schedule_backtrack, schedule_min_step
    from qcompile.kernels.resources import kernel_resources

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    L, KV, B = 16, K * V, 1600
    for sch in (schedule_min_step(B, L, KV, V, "cuda"), schedule_backtrack(B, 256 // V, L, KV, "cuda")):
        src = tvm.compile(sch.mod, target=target).mod.imports[0].inspect_source()
        (res,) = kernel_resources(src).values()
        assert res.spill_bytes == 0 and res.stack_bytes == 0 and res.registers <= 128, res


def test_viterbi_speed_bench_times_engines_side_by_side(tmp_path):
    """python -m qcompile.bench.viterbi_speed on the CPU at a toy size: a row per (format, engine) with
    the throughput of the second run, the engines' MSEs equal (the same paths), and the JSON written."""
    import json

    from qcompile.bench import viterbi_speed

    out = tmp_path / "v.json"
    assert viterbi_speed.main(["--formats", "qtip-3inst-2", "--sequences", "4", "--engines", "tir,tir-min",
                               "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["engine"]: r for r in doc["rows"]}
    assert set(rows) == {"tir", "tir-min"} and doc["device"] == "cpu" and doc["layer"] == []
    assert rows["tir"]["mse"] == rows["tir-min"]["mse"] and 0.03 < rows["tir"]["mse"] < 0.15
    assert all(r["weights_per_s"] == 4 * 256 / r["seconds"] for r in rows.values())


def test_quantize_takes_the_viterbi_engine():
    """TrellisFormat.quantize(..., viterbi_engine=) reaches the encoder: BlockLDLQ over a 32 x 64 layer
    with the group-minimum engine stores the trellis of the full-cost engine (same paths, same
    order of additions); an unknown engine is the one-line error."""
    from qcompile.formats import get as get_format

    fmt = get_format("qtip-3inst-2")
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 64, generator=g) * 0.02
    X = torch.randn(256, 64, generator=g)
    H = (X.T @ X / 256).double()
    a = fmt.quantize(W, hessian=H, viterbi_engine="tir")
    b = fmt.quantize(W, hessian=H, viterbi_engine="tir-min")
    assert torch.equal(a.tensors["trellis"], b.tensors["trellis"])
    with pytest.raises(QCompileError, match="unknown Viterbi engine 'gpu'"):
        fmt.quantize(W, viterbi_engine="gpu")


def test_auto_engine_on_cpus_takes_the_group_minimum_kernels_where_they_measured_faster():
    """engine="auto" on a CPU: "tir-min" at K·V = 2 (CPU_MIN_ENGINE_KV), the full-cost "tir" step at the
    other K·V; on CUDA the CUDA_AUTO_ENGINE."""
    from qcompile.formats.viterbi import CPU_MIN_ENGINE_KV, CUDA_AUTO_ENGINE, _engine

    assert CPU_MIN_ENGINE_KV == (2,)
    assert [_engine("auto", "cpu", kv) for kv in (2, 3, 4, 6, 8)] == ["tir-min", "tir", "tir", "tir", "tir"]
    assert _engine("auto", "cuda", 2) == CUDA_AUTO_ENGINE
