"""The mma.sync kernels (qcompile.kernels.mma) on the GPU, for every format: fused products against
float64 at M = 1..16 (default configs and others: one tile, several warps along N, 64-column spans,
unrolled K loops), and the decoded values read back exactly through the kernel's A fragments with
one-hot activations (with the format's decode intrinsic and with the plain TIR decode). For QTIP HYB,
mma_scheduled_func builds the fragment-native kernel (qcompile.kernels.mma_fragment: each lane decodes
its own A registers), so every test here covers it; FRAGMENT_CONFIGS adds its table placements."""
import pytest
import torch

import qcompile as qc
from qcompile.kernels.mma import MmaConfig, check_mma_config, mma_scheduled_func, streamed_bits
from qcompile.kernels.pipeline import compile_module

pytestmark = pytest.mark.gpu
MS = (1, 2, 5, 8, 16, 24, 64)
N, K = 1024, 2048


def build(funcs):
    import tvm

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
                        for name, f in funcs.items()})
    major, minor = torch.cuda.get_device_capability(0)
    return compile_module(mod, tvm.target.Target({"kind": "cuda", "arch": f"sm_{major}{minor}"}))


def rel_err(fn, fmt, qw, m, seed=0):
    k = qw.shape[1]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    X = (torch.randn(m, k, device="cuda", generator=gen) / 8).to(torch.float16)
    Y = torch.full((m, qw.shape[0]), float("nan"), dtype=torch.float16, device="cuda")
    fn(X, *[qw.tensors[name] for name in fmt.tensor_specs(*qw.shape)], Y)
    ref = X.double() @ fmt.decode_fp16(qw).double().T
    assert torch.isfinite(Y).all(), "unwritten or non-finite outputs"
    return ((Y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", qc.formats.names())
def test_fused_matmul_matches_float64(name):
    fmt = qc.formats.get(name)
    qw = fmt.random_weight(N, K, seed=5).to("cuda")
    ex = build({f"m{m}": mma_scheduled_func(fmt, N, K, m) for m in MS})
    for m in MS:
        err = rel_err(ex[f"m{m}"], fmt, qw, m, seed=m)
        assert err < 2e-3, (name, m, err)


CONFIGS = [
    MmaConfig(units=1, tiles=1, warps_n=1, warps_k=4),
    MmaConfig(units=2, tiles=1, warps_n=2, warps_k=2, unroll=2),
    MmaConfig(units=2, tiles=4, warps_n=1, warps_k=4),
    MmaConfig(units=8, tiles=2, warps_n=2, warps_k=1),
    MmaConfig(units=4, tiles=2, warps_n=1, warps_k=16),
    # x_staged: the activations of a K step through a padded shared tile (beside the 32 dynamic copies)
    MmaConfig(units=1, tiles=2, warps_n=1, warps_k=4, lut_shared=3, x_staged=1),
    MmaConfig(units=2, tiles=4, warps_n=2, warps_k=2, lut_shared=4, x_staged=1),
    # the cp.async pipeline: the K step's packed words staged in shared memory one or two steps ahead
    MmaConfig(units=2, tiles=2, warps_n=1, warps_k=4, stages=2),
    MmaConfig(units=1, tiles=4, warps_n=2, warps_k=2, stages=3, lut_shared=0),
    # padded stage rows (conflict-free shared reads); refused for two-tensor formats (e8p-4)
    MmaConfig(units=2, tiles=2, warps_n=1, warps_k=4, stages=2, stage_pad=1),
    MmaConfig(units=1, tiles=4, warps_n=2, warps_k=2, stages=3, stage_pad=1, lut_shared=0),
]
CONFIG_MS = (3, 16)


# the fragment-native kernel (QTIP HYB): the five table placements (lut_shared=3: 32 copies in 64 KiB
# of dynamic shared memory, which the split-K partials reuse after the K loop), one unit a lane,
# unrolled K loops, two warps along N, four tiles a warp
FRAGMENT_CONFIGS = [
    MmaConfig(units=2, tiles=2, warps_n=1, warps_k=4, lut_shared=0),
    MmaConfig(units=1, tiles=2, warps_n=2, warps_k=2, unroll=2, lut_shared=1),
    MmaConfig(units=2, tiles=4, warps_n=1, warps_k=2, lut_shared=2),
    MmaConfig(units=4, tiles=2, warps_n=1, warps_k=4, unroll=2, lut_shared=2),
    MmaConfig(units=1, tiles=2, warps_n=1, warps_k=8, unroll=2, lut_shared=3),
    MmaConfig(units=2, tiles=4, warps_n=2, warps_k=4, lut_shared=3),
    # lut_shared=4: 16 copies of the sign-folded 1024-entry table (64 KiB, dynamic, under the partials)
    MmaConfig(units=1, tiles=2, warps_n=1, warps_k=16, lut_shared=4),
    MmaConfig(units=1, tiles=4, warps_n=1, warps_k=4, lut_shared=4),
    # lut_shared=5: 32 copies of the sign-folded table (128 KiB, dynamic: one 1024-thread block an SM)
    MmaConfig(units=1, tiles=2, warps_n=1, warps_k=32, lut_shared=5),
    MmaConfig(units=2, tiles=2, warps_n=2, warps_k=8, lut_shared=5),
    # the cp.async pipeline of the trellis words (CONFIGS' stages=2 config: beside the single table),
    # with the table in global memory and beside the lane copies
    MmaConfig(units=2, tiles=2, warps_n=1, warps_k=4, lut_shared=0, stages=2),
    MmaConfig(units=1, tiles=2, warps_n=1, warps_k=4, lut_shared=2, stages=3),
    MmaConfig(units=1, tiles=2, warps_n=1, warps_k=4, lut_shared=3, stages=2),
]


def _check_ok(fmt, cfg, n, k, m):
    """Whether check_mma_config takes ``cfg`` for ``fmt`` at (n, k, m)."""
    try:
        check_mma_config(cfg, n, k, m, fmt.decode_unit, fragment=fmt.fragment_native,
                         staged_bits=streamed_bits(fmt, n, k))
        return True
    except ValueError:
        return False


def _fits(name, cfg):
    fmt = qc.formats.get(name)
    if cfg.stage_pad and len(fmt.streamed) > 1:
        return False
    return all(_check_ok(fmt, cfg, N, K, m) for m in CONFIG_MS)


CONFIG_NAMES = ["int4-g128", "e8p-2", "e8p-4", "qtip-1mad-2", "qtip-hyb-2", "qtip-hyb-3", "qtip-hyb-4"]
CONFIG_CASES = [pytest.param(name, cfg, id=f"{name}-" + "-".join(f"{v}" for v in cfg.as_dict().values()))
                for cfg in CONFIGS + FRAGMENT_CONFIGS for name in CONFIG_NAMES if _fits(name, cfg)]


@pytest.mark.parametrize("name, cfg", CONFIG_CASES)
def test_configs_match_float64(name, cfg):
    fmt = qc.formats.get(name)
    qw = fmt.random_weight(N, K, seed=7).to("cuda")
    ex = build({f"m{m}": mma_scheduled_func(fmt, N, K, m, cfg) for m in CONFIG_MS})
    for m in CONFIG_MS:
        err = rel_err(ex[f"m{m}"], fmt, qw, m, seed=m)
        assert err < 2e-3, (name, cfg, m, err)


DECODE_CASES = [(name, True) for name in qc.formats.names()] + [
    (name, False) for name in qc.formats.names() if qc.formats.get(name).decode_intrin("cuda") is not None]


@pytest.mark.parametrize("name, use_intrin", DECODE_CASES)
def test_decode_bit_exact_through_the_kernel(name, use_intrin, check_one_hot_decode):
    fmt = qc.formats.get(name)
    n, k, m = 256, 1024, 16
    qw = fmt.random_weight(n, k, seed=11)
    fn = build({"k": mma_scheduled_func(fmt, n, k, m, use_intrin=use_intrin)})["k"]
    check_one_hot_decode(fn, fmt, qw, m, f"{name} intrin={use_intrin}")


@pytest.mark.parametrize("name, stage_pad", [("int4-g128", 0), ("e8p-2", 0), ("e8p-4", 0), ("e8p-3", 0),
                                             ("qtip-hyb-2", 0), ("qtip-hyb-3", 0), ("qtip-hyb-4", 0),
                                             ("int4-g128", 1), ("e8p-2", 1), ("qtip-1mad-2", 1)])
def test_pipelined_decode_bit_exact_through_the_kernel(name, stage_pad, check_one_hot_decode):
    """Every weight read back exactly through a kernel whose packed words pass through the cp.async
    pipeline stages (MmaConfig.stages = 2; padded rows with stage_pad, which needs lane reads of 8 or 16
    bytes: the fewest units a lane that give them), so no word is staged into the wrong slot, step or
    padded column."""
    fmt = qc.formats.get(name)
    n, k, m = 256, 1024, 16
    bits = streamed_bits(fmt, n, k)
    frag = fmt.fragment_native  # QTIP HYB: its own kernel (mma_fragment), whose lanes stage their words
    for units in (1, 2, 4):
        cfg = MmaConfig(units=units, tiles=2, warps_n=1, warps_k=2, stages=2, stage_pad=stage_pad)
        try:
            check_mma_config(cfg, n, k, m, fmt.decode_unit, fragment=frag, staged_bits=bits)
            break
        except ValueError:
            continue
    check_mma_config(cfg, n, k, m, fmt.decode_unit, fragment=frag, staged_bits=bits)
    qw = fmt.random_weight(n, k, seed=13)
    fn = build({"k": mma_scheduled_func(fmt, n, k, m, cfg)})["k"]
    check_one_hot_decode(fn, fmt, qw, m, f"{name} {cfg}")


@pytest.mark.parametrize("name", ["int4-g128", "e8p-2", "e8p-4", "qtip-hyb-2", "qtip-hyb-3"])
def test_padded_k_blocks_match_float64(name):
    """K = 11008 (Llama-2-7B down_proj): 86 K blocks padded to 88 for 8 K warps (and to 96 for 16
    warps x unroll 2): the padded blocks read K's last block again and must add nothing."""
    from qcompile.kernels.mma import format_default_mma_config, k_blocks, span_of

    fmt = qc.formats.get(name)
    n, k = 512, 11008
    frag = fmt.fragment_native
    wk16u2 = MmaConfig(units=max(1, 32 // fmt.decode_unit), tiles=2 if frag else 1, warps_k=16, unroll=2, lut_shared=1)
    # the default differs per M (the fragment kernel's K warps / unroll), so each M takes its own
    cfgs = {(tag, m): format_default_mma_config(fmt, n, k, m) if tag == "default" else wk16u2
            for tag in ("default", "wk16u2") for m in (3, 16)}
    for cfg in cfgs.values():  # K blocks of 4 spans: padded past K's own
        block = 4 * span_of(cfg, fmt.decode_unit)
        assert k_blocks(cfg, k, fmt.decode_unit) > -(-k // block), cfg
    qw = fmt.random_weight(n, k, seed=13).to("cuda")
    ex = build({f"{tag}_{m}": mma_scheduled_func(fmt, n, k, m, cfg) for (tag, m), cfg in cfgs.items()})
    for tag in ("default", "wk16u2"):
        for m in (3, 16):
            err = rel_err(ex[f"{tag}_{m}"], fmt, qw, m, seed=m)
            assert err < 2e-3, (name, tag, m, err)


@pytest.mark.parametrize("name", ["int4-g128", "e8p-2", "e8p-4", "qtip-hyb-2", "qtip-hyb-3"])
def test_grid_split_k_matches_float64_and_reads_back_exactly(name, check_one_hot_decode):
    """MmaConfig.blocks_k > 1: thread blocks split K, store fp32 partials and a second kernel sums them.
    Against float64 at M = 1, 5, 16 with 2 and 3 blocks (K = 2048 in 3 blocks x 2 warps: 32 K blocks
    of 64 columns padded to 36, or E8P's 16 of 128 to 18, so the last block's range holds padded
    blocks), and with the cp.async pipeline where it fits; every weight read back exactly with one-hot
    activations (each output is then one block's partial plus zeros)."""
    fmt = qc.formats.get(name)
    frag = fmt.fragment_native
    units = 1 if frag else max(1, 16 // fmt.decode_unit)
    lut = 2 if frag else 1
    cfgs = [MmaConfig(units=units, tiles=2, warps_n=1, warps_k=4, lut_shared=lut, blocks_k=2),
            MmaConfig(units=units, tiles=2, warps_n=1, warps_k=2, lut_shared=lut, blocks_k=3),
            MmaConfig(units=units, tiles=2, warps_n=1, warps_k=2, lut_shared=lut, stages=2, blocks_k=4)]
    ms = (1, 5, 16)
    usable = [c for c in cfgs if all(_check_ok(fmt, c, N, K, m) for m in ms)]
    assert usable[:2] == cfgs[:2], (name, "the one-stage split-K configs should fit", cfgs)
    ex = build({f"c{i}_m{m}": mma_scheduled_func(fmt, N, K, m, c) for i, c in enumerate(usable) for m in ms})
    qw = fmt.random_weight(N, K, seed=11).to("cuda")
    for i, c in enumerate(usable):
        for m in ms:
            err = rel_err(ex[f"c{i}_m{m}"], fmt, qw, m, seed=m)
            assert err < 2e-3, (name, c, m, err)
    check_one_hot_decode(ex["c1_m16"], fmt, fmt.random_weight(N, K, seed=12), 16, f"{name} {usable[1]}")


@pytest.mark.parametrize("name", ["qtip-hyb-2", "qtip-hyb-3", "qtip-hyb-4"])
def test_lane_copy_by_min_matches_float64_and_reads_back_exactly(name, monkeypatch, check_one_hot_decode):
    """formats.trellis.LANE_COPY_BY_MIN (the table copy index as min(lane, lane ^ 16)): the default
    configs at M = 1 and 16 against float64, and every weight read back exactly at M=16."""
    from qcompile.formats import trellis

    monkeypatch.setattr(trellis, "LANE_COPY_BY_MIN", True)
    fmt = qc.formats.get(name)
    ex = build({f"m{m}": mma_scheduled_func(fmt, N, K, m) for m in (1, 16)})
    qw = fmt.random_weight(N, K, seed=17).to("cuda")
    for m in (1, 16):
        err = rel_err(ex[f"m{m}"], fmt, qw, m, seed=m)
        assert err < 2e-3, (name, m, err)
    check_one_hot_decode(ex["m16"], fmt, fmt.random_weight(N, K, seed=18), 16, f"{name} lane copy by min")


@pytest.mark.parametrize("name", ["qtip-hyb-2", "qtip-hyb-4"])
def test_partials_in_table_match_float64_and_read_back_exactly(name, monkeypatch, check_one_hot_decode):
    """kernels.mma.FRAGMENT_PARTIALS_IN_TABLE (the K warps' partials laid over the lane copies after the
    K loop): the default configs at M = 1 and 16 and a block of 4 tiles x 8 K warps at M=16 that only
    fits so, against float64; every weight read back exactly through the latter."""
    from qcompile.kernels import mma

    monkeypatch.setattr(mma, "FRAGMENT_PARTIALS_IN_TABLE", True)
    fmt = qc.formats.get(name)
    wide = MmaConfig(units=1, tiles=4, warps_n=1, warps_k=8, lut_shared=2)
    ex = build({"m1": mma_scheduled_func(fmt, N, K, 1), "m16": mma_scheduled_func(fmt, N, K, 16),
                "wide": mma_scheduled_func(fmt, N, K, 16, wide)})
    qw = fmt.random_weight(N, K, seed=19).to("cuda")
    for key, m in (("m1", 1), ("m16", 16), ("wide", 16)):
        err = rel_err(ex[key], fmt, qw, m, seed=m)
        assert err < 2e-3, (name, key, err)
    check_one_hot_decode(ex["wide"], fmt, fmt.random_weight(N, K, seed=20), 16, f"{name} partials in table")


# QTIP 1MAD / 3INST in the kernel layout (unregistered variants, fragment-native like HYB's stored
# layout: qcompile.kernels.mma_fragment with the V=1 fragment gather); fused products against float64
# and, at M=16, the decoded values read back bit for bit through the A fragments
V1_FRAGMENT = [f"qtip-{code}-{K}@mma-kernel" for code in ("1mad", "3inst") for K in (2, 3, 4)]


@pytest.mark.parametrize("name", V1_FRAGMENT)
def test_v1_fragment_variants_match_float64(name, check_one_hot_decode):
    fmt = qc.formats.get(name)
    assert fmt.fragment_native
    qw = fmt.random_weight(N, K, seed=5).to("cuda")
    ms = (1, 2, 5, 8, 16)
    ex = build({f"m{m}": mma_scheduled_func(fmt, N, K, m) for m in ms})
    for m in ms:
        err = rel_err(ex[f"m{m}"], fmt, qw, m, seed=m)
        assert err < 2e-3, (name, m, err)
    n, k = 256, 1024
    qw = fmt.random_weight(n, k, seed=11)
    fn = build({"k": mma_scheduled_func(fmt, n, k, 16)})["k"]
    check_one_hot_decode(fn, fmt, qw, 16, name)


# the fragment kernel with its A fragments as 32-bit registers (mma_fragment.PACKED_A: W_frag holds the
# gathered words whole): every weight read back bit for bit, and the FRAGMENT_CONFIGS against float64
PACKED = ["qtip-hyb-2", "qtip-hyb-3", "qtip-hyb-4", "qtip-3inst-2@mma-kernel", "qtip-1mad-3@mma-kernel"]


@pytest.mark.parametrize("name", PACKED)
def test_packed_a_fragments_match(name, check_one_hot_decode):
    fmt = qc.formats.get(name)
    n, k = 256, 1024
    qw = fmt.random_weight(n, k, seed=11)
    piped = next(cfg for cfg in (MmaConfig(units=units, tiles=2, warps_k=2, stages=2) for units in (1, 2, 4))
                 if _check_ok(fmt, cfg, n, k, 16))
    fns = build({"k": mma_scheduled_func(fmt, n, k, 16, packed_a=True),
                 "piped": mma_scheduled_func(fmt, n, k, 16, piped, packed_a=True)})
    check_one_hot_decode(fns["k"], fmt, qw, 16, f"{name} packed A")
    check_one_hot_decode(fns["piped"], fmt, qw, 16, f"{name} packed A, 2 stages")
    qw = fmt.random_weight(N, K, seed=7).to("cuda")
    cfgs = [cfg for cfg in FRAGMENT_CONFIGS if _fits(name, cfg)] if name in CONFIG_NAMES else [None]
    ex = build({f"c{i}_m{m}": mma_scheduled_func(fmt, N, K, m, cfg, packed_a=True)
                for i, cfg in enumerate(cfgs) for m in CONFIG_MS})
    for i, cfg in enumerate(cfgs):
        for m in CONFIG_MS:
            err = rel_err(ex[f"c{i}_m{m}"], fmt, qw, m, seed=m)
            assert err < 2e-3, (name, cfg, m, err)
