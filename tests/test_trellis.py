"""QTIP bitshift-trellis formats (qcompile.formats.trellis): codes, bitstreams, layouts, quantization,
TIR decode on llvm, and Gaussian MSE at reduced size."""
import re

import numpy as np
import pytest
import torch

import qcompile as qc
from qcompile.errors import QCompileError
from qcompile.formats import trellis as tr
from qcompile.formats.viterbi import is_tailbiting

NAMES = [f"qtip-{c}-{k}" for c in ("1mad", "3inst", "hyb") for k in (2, 3, 4)]
ALL_STATES = np.arange(1 << 16, dtype=np.uint64)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def f16_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


# --- registry and specs ------------------------------------------------------------------------------------
def test_nine_formats_registered_with_exact_k_bits():
    assert set(NAMES) <= set(qc.formats.names())
    for name in NAMES:
        fmt = qc.formats.get(name)
        specs = fmt.tensor_specs(4096, 4096)
        t = specs["trellis"]
        # the tiles packing has a row per tile, the kernel packing (HYB) one per 32x32 super-tile
        assert t.dtype == "int16" and t.shape == ((128, 128, 64 * fmt.K) if fmt.code == "hyb" else (256, 256, 16 * fmt.K))
        assert np.prod(t.shape) * 16 / 4096 ** 2 == fmt.K  # exactly K bits per weight
        assert ("tlut" in specs) == (fmt.code == "hyb")
        assert fmt.decode_unit == 16
        assert fmt.layout == ("kernel" if fmt.code == "hyb" else "generic")
    assert qc.formats.get("qtip-hyb-2").bits_per_weight(4096, 4096) == pytest.approx(2 + 16384 / 4096 ** 2)


# --- codes: independent numpy restatements of §2 -----------------------------------------------------------
def test_1mad_matches_the_constants_and_has_few_values():
    x = (np.uint64(34038481) * ALL_STATES + np.uint64(76625530)) % np.uint64(2 ** 32)
    y = sum(((x >> np.uint64(8 * i)) & np.uint64(255)).astype(np.int64) for i in range(4))
    ref = ((y - 510).astype(np.float32) * np.float32(1 / 147.800537109375)).astype(np.float16)
    got = tr.decode_1mad(torch.arange(1 << 16))
    assert torch.equal(f16_bits(got), torch.from_numpy(ref.view(np.int16)))
    assert got.unique().numel() <= 1021 < 2 ** 10  # y - 510 takes at most 1021 values
    assert float(got.abs().max()) <= 510 / 147.8 + 1e-2
    assert tr.MAD1_DIVISOR == 147.800537109375


def test_3inst_matches_the_constants_and_halves_are_in_range():
    x = (np.uint64(89226354) * ALL_STATES + np.uint64(64248484)) % np.uint64(2 ** 32)
    r = (x & np.uint64(0x8FFF8FFF)) ^ np.uint64(0x3B603B60)
    hi = (r >> np.uint64(16)).astype(np.uint16).view(np.float16)
    lo = (r & np.uint64(0xFFFF)).astype(np.uint16).view(np.float16)
    for half in (hi, lo):  # random sign, magnitude in [2^-3, 2)
        mag = np.abs(half.astype(np.float32))
        assert mag.min() >= 2 ** -3 and mag.max() < 2
        assert 0.4 < (half < 0).mean() < 0.6
    ref = (hi + lo).astype(np.float16)
    assert torch.equal(f16_bits(tr.decode_3inst(torch.arange(1 << 16))), torch.from_numpy(ref.view(np.int16)))
    assert np.array([0x3B60], dtype=np.uint16).view(np.float16)[0] == np.float16(0.921875)


def test_hyb_hash_index_and_sign_on_element_0():
    s = ALL_STATES
    h = (s * (s + np.uint64(1))) % np.uint64(2 ** 32)
    idx, sign = tr.hyb_index_sign(torch.arange(1 << 16))
    assert torch.equal(idx, torch.from_numpy(((h >> np.uint64(6)) & np.uint64(511)).astype(np.int64)))
    assert torch.equal(sign, torch.from_numpy(((h >> np.uint64(15)) & np.uint64(1)).astype(np.int64)))
    tlut = torch.randn(512, 2).half()
    tlut[3] = torch.tensor([0.0, -0.0]).half()
    vals = tr.decode_hyb(torch.arange(1 << 16), tlut)
    assert torch.equal(f16_bits(vals[:, 1]), f16_bits(tlut[idx, 1]))  # element 1 never flips
    flipped = f16_bits(tlut[idx, 0]).to(torch.int32) ^ (sign.to(torch.int32) << 15)
    assert torch.equal(f16_bits(vals[:, 0]).to(torch.int32) & 0xFFFF, flipped & 0xFFFF)
    # the effective codebook has 2^(Q+1) points
    assert vals.float().unique(dim=0).shape[0] <= 1024


def test_default_table_properties():
    t = tr.default_tlut()
    assert t.dtype == torch.float16 and t.shape == (512, 2)
    assert float(t.float().std()) == pytest.approx(tr.HYB_STD, abs=2e-3)
    assert abs(float(t.float().mean())) < 0.1  # unweighted centre mean: ~1/sqrt(1024) noise
    # a k-means codebook of N(0, I2): distinct, and its Voronoi MSE is near the 2-D 9-bit optimum
    assert t.float().unique(dim=0).shape[0] == 512
    x = torch.randn(20000, 2, generator=torch.Generator().manual_seed(1))
    c = t.float() / tr.HYB_STD
    mse = torch.cdist(x, c).min(dim=1).values.pow(2).mean() / 2
    assert float(mse) < 0.0070  # measured 0.0063 per dim (512 points in 2-D: 4.5 bits per dim)


def test_kmeans_is_deterministic_and_rescaled():
    a = tr.kmeans_tlut(n_samples=4096, iters=3, seed=5, Q=4)
    b = tr.kmeans_tlut(n_samples=4096, iters=3, seed=5, Q=4)
    assert a.shape == (16, 2) and torch.equal(f16_bits(a), f16_bits(b))
    assert float(a.float().std()) == pytest.approx(tr.HYB_STD, abs=2e-3)


@pytest.mark.slow
def test_default_table_is_kmeans_at_the_documented_settings():  # ~4 min on 2 CPU cores
    assert torch.equal(f16_bits(tr.kmeans_tlut()), f16_bits(tr.default_tlut()))


def test_codebooks_on_all_states():
    for code, V in tr.CODES.items():
        cb = tr.codebook(code, tr.default_tlut() if code == "hyb" else None)
        assert cb.shape == (1 << 16, V) and cb.dtype == torch.float16 and bool(torch.isfinite(cb).all())


# --- bitstreams --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L, KV, S", [(16, 2, 256), (16, 3, 256), (16, 4, 128), (16, 8, 128), (16, 6, 128),
                                      (6, 1, 10), (5, 2, 7)])
def test_stream_round_trip_with_the_wrap(L, KV, S):
    gen = torch.Generator().manual_seed(L + KV + S)
    nwords = -(-S * KV // 16)
    words = torch.randint(-2 ** 15, 2 ** 15, (5, nwords), generator=gen).to(torch.int16)
    if (S * KV) % 16:  # padding bits are not part of the stream
        keep = torch.tensor([1] * (S * KV) + [0] * (nwords * 16 - S * KV), dtype=torch.int64).view(nwords, 16)
        words = ((tr.words_to_bits(words).view(5, nwords, 16).to(torch.int64) * keep)
                 * torch.tensor([1 << (15 - i) for i in range(16)])).sum(-1)
        words = torch.where(words >= 2 ** 15, words - 2 ** 16, words).to(torch.int16)
    states = tr.words_to_states(words, S, L, KV)
    assert is_tailbiting(states, L, KV).all()
    assert torch.equal(tr.states_to_words(states, L, KV), words)
    # the closed form: state t = bits [t·KV, t·KV + L) of the circular stream
    bits = tr.words_to_bits(words)[0, :S * KV].tolist()
    for t in (0, 1, S // 2, S - 2, S - 1):
        want = sum(bits[(t * KV + i) % (S * KV)] << (L - 1 - i) for i in range(L))
        assert int(states[0, t]) == want


@pytest.mark.parametrize("KV, V", [(2, 1), (3, 1), (6, 2)])
def test_viterbi_paths_pack_into_t_k_bits_and_decode_back(KV, V):
    from qcompile.formats.viterbi import viterbi_tailbiting

    S = 256 // V
    cb = tr.codebook("3inst").float().expand(-1, V) if V == 1 else tr.codebook("hyb", tr.default_tlut()).float()
    x = torch.randn(2, S, V, generator=torch.Generator().manual_seed(KV))
    states, _ = viterbi_tailbiting(x, cb, 16, KV)
    words = tr.states_to_words(states, 16, KV)
    assert words.shape == (2, 256 * KV // V // 16)  # exactly T·K bits
    assert torch.equal(tr.words_to_states(words, S, 16, KV), states)


def test_last_state_wraps_into_the_first_bits():
    # 16 bits of stream, L = 8, KV = 2: state 7 = bits 14, 15, 0..5
    words = torch.tensor([[0b1011_0000_0000_0010 - 2 ** 16]], dtype=torch.int16)
    states = tr.words_to_states(words, 8, 8, 2)
    assert int(states[0, 7]) == 0b10_101100
    assert int(states[0, 0]) == 0b1011_0000


# --- in-tile orders and packings ----------------------------------------------------------------------------
def test_mma_order_is_the_a_fragment_map():
    perm = tr.tile_order("mma")
    assert torch.equal(perm.sort().values, torch.arange(256))
    for lane in range(32):
        g, tig = lane >> 2, lane & 3
        # PTX m16n8k16 f16 A fragment: a0,a1 (g, 2·tig+i), a2,a3 (g+8, ..), a4,a5 (g, ..+8), a6,a7 (g+8, ..+8)
        want = [(g, 2 * tig), (g, 2 * tig + 1), (g + 8, 2 * tig), (g + 8, 2 * tig + 1),
                (g, 2 * tig + 8), (g, 2 * tig + 9), (g + 8, 2 * tig + 8), (g + 8, 2 * tig + 9)]
        got = [divmod(int(perm[8 * lane + a]), 16) for a in range(8)]
        assert got == want
    assert torch.equal(tr.tile_order("row"), torch.arange(256))


def kernel_pack_by_the_book(streams, n, k, K):
    """§1.4 (b), (c) restated with loops: [n/32][k/32][lane][b][a][K bytes, reversed]."""
    tj = k // 16
    out = []
    for I2 in range(n // 32):
        for J2 in range(k // 32):
            for lane in range(32):
                for b in range(2):
                    for a in range(2):
                        words = streams[(2 * I2 + a) * tj + 2 * J2 + b].tolist()
                        stream_bytes = []
                        for w in words:
                            w &= 0xFFFF
                            stream_bytes += [w >> 8, w & 0xFF]
                        out += stream_bytes[K * lane:K * (lane + 1)][::-1]
    raw = np.array(out, dtype=np.uint8).view("<i2")  # little-endian int16 words
    return torch.from_numpy(raw.astype(np.int16)).view(-1, 16 * K)


@pytest.mark.parametrize("K", [2, 3, 4])
def test_kernel_packing_matches_the_description_and_round_trips(K):
    n, k = 64, 96
    gen = torch.Generator().manual_seed(K)
    streams = torch.randint(-2 ** 15, 2 ** 15, ((n // 16) * (k // 16), 16 * K), generator=gen).to(torch.int16)
    packed = tr.pack_kernel(streams, n, k, K)
    assert packed.dtype == torch.int16 and packed.shape == streams.shape
    assert torch.equal(packed, kernel_pack_by_the_book(streams, n, k, K))
    assert torch.equal(tr.unpack_kernel(packed, n, k, K), streams)
    flat = packed.reshape(-1)
    if K == 2:  # each lane's reversed 2-byte chunk is the natural uint16 stream word
        assert torch.equal(flat[:4 * 32:4], streams[0, :32])  # super-tile 0, tile (a0, b0)
    if K == 4:  # a little-endian uint32 load gives the lane's 32 stream bits MSB-first
        w32 = flat.view(torch.int32)[:4 * 32:4].to(torch.int64) & 0xFFFFFFFF
        s = streams[0].to(torch.int64) & 0xFFFF
        assert torch.equal(w32, (s[0::2] << 16) | s[1::2])


# --- quantization -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qtip-1mad-2", "qtip-3inst-2", "qtip-hyb-2", "qtip-hyb-4"])
def test_quantize_decode_and_stored_vectors(name):
    fmt = qc.formats.get(name)
    W = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    qw = fmt.quantize(W, seed=3)
    assert qw.format == name and qw.rht and qw.meta["rht"] and qw.meta["layout"] == fmt.layout
    fmt.check_qweight(qw)
    states = fmt.states(qw)
    assert states.shape == (16, fmt.S) and is_tailbiting(states, 16, fmt.KV).all()
    # decode = the code's values of the states, placed by the in-tile order
    vals = tr.decode_states(fmt.code, states, qw.tensors.get("tlut")).reshape(16, 256)
    tiles = fmt.decode_fp16(qw).view(4, 16, 4, 16).permute(0, 2, 1, 3).reshape(16, 256)
    assert torch.equal(f16_bits(tiles[:, tr.tile_order(fmt.order)]), f16_bits(vals))
    # SU = ±1/32, SV = ±fp16(32·Wscale): Wscale and the runtime ×32 live in the RHT vectors
    assert set(qw.tensors["SU"].float().abs().unique().tolist()) == {1 / 32}
    sv = qw.tensors["SV"].float().abs().unique()
    assert sv.numel() == 1 and float(sv) == pytest.approx(32 * qw.meta["wscale"], rel=0, abs=0)
    rel = float((fmt.dequantize(qw) - W).pow(2).mean() / W.pow(2).mean())
    assert rel < {2: 0.085, 4: 0.008}[fmt.K]  # ~0.071 / ~0.006 for Gaussian-like data
    assert qw.bits_per_weight == pytest.approx(fmt.K + (16 * 1024 * (fmt.code == "hyb") + 16 * 128) / 4096)


def test_scale_controls_the_quantizer_rms_and_zero_weights_are_exact():
    fmt = qc.formats.get("qtip-3inst-2")
    W = torch.randn(32, 32, generator=torch.Generator().manual_seed(2))
    a, b = fmt.quantize(W, scale=0.9), fmt.quantize(W, scale=0.5)
    assert a.meta["scale"] == 0.9 and b.meta["wscale"] == pytest.approx(a.meta["wscale"] * 0.9 / 0.5, rel=1e-3)
    rms = [float(fmt.decode_fp16(q).float().pow(2).mean().sqrt()) for q in (a, b)]
    assert rms[1] < rms[0]
    z = fmt.quantize(torch.zeros(32, 32))
    assert torch.equal(fmt.dequantize(z), torch.zeros(32, 32))
    with pytest.raises(QCompileError, match="scale must be a positive"):
        fmt.quantize(W, scale=-1.0)


def test_ldlq_lowers_the_proxy_loss():
    fmt = qc.formats.get("qtip-hyb-2")
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(32, 64, generator=gen)
    X = torch.randn(256, 64, generator=gen) @ (torch.eye(64) + 0.5 * torch.randn(64, 64, generator=gen))
    H = X.T @ X / 256
    rtn, ldlq = fmt.quantize(W, hessian=H, ldlq=False), fmt.quantize(W, hessian=H)
    assert ldlq.meta["ldlq"] and not rtn.meta["ldlq"]
    assert ldlq.meta["proxy_loss"] < 0.9 * rtn.meta["proxy_loss"]
    assert is_tailbiting(fmt.states(ldlq), 16, fmt.KV).all()


def test_repack_is_lossless():
    fmt = qc.formats.get("qtip-hyb-3")
    qw = fmt.quantize(torch.randn(64, 32, generator=torch.Generator().manual_seed(6)))
    tiles = tr.repack(qw, "tiles")
    assert tiles.format == "qtip-hyb-3@mma-tiles" and tiles.meta["layout"] == "mma-tiles"
    assert torch.equal(f16_bits(tr.qw_format(tiles).decode_fp16(tiles)), f16_bits(fmt.decode_fp16(qw)))
    back = tr.repack(tiles, "kernel")
    assert back.format == "qtip-hyb-3" and torch.equal(back.tensors["trellis"], qw.tensors["trellis"])


# --- TIR decode on llvm ---------------------------------------------------------------------------------------
def random_weight(fmt, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = fmt.tensor_specs(n, k)["trellis"].shape
    tensors = {"trellis": torch.randint(-2 ** 15, 2 ** 15, shape, generator=gen).to(torch.int16)}
    if fmt.code == "hyb":
        tlut = torch.randn(512, 2, generator=gen).half()
        tlut[:8] = 0.0  # ±0 must come out exactly
        tensors["tlut"] = tlut
    return qc.formats.QuantizedWeight(fmt.name, (n, k), tensors)


def tir_decode(fmt, qw):
    import tvm
    from tvm import te

    from qcompile.kernels.target import parse_target

    n, k = qw.shape
    bufs = {name: te.placeholder(spec.shape, spec.dtype, name=name) for name, spec in fmt.tensor_specs(n, k).items()}
    W = te.compute((n, k // 16, 16), lambda i, c, j: fmt.tir_decode_unit(bufs, i, c, j), name="W")
    ex = tvm.compile(te.create_prim_func([*bufs.values(), W]), target=parse_target("llvm").tvm_target())
    out = torch.empty(n, k // 16, 16, dtype=torch.float16)
    ex["main"](*[qw.tensors[name] for name in bufs], out)
    return out.view(n, k)


VARIANTS = [(f"qtip-{c}-{k}", None, None) for c in ("1mad", "3inst", "hyb") for k in (2, 3, 4)] + [
    ("qtip-hyb-3", "mma", "tiles"), ("qtip-hyb-2", "row", "tiles"), ("qtip-hyb-4", "row", "kernel"),
    ("qtip-3inst-3", "mma", "kernel"), ("qtip-1mad-4", "mma", "tiles"), ("qtip-1mad-2", "row", "kernel")]


@pytest.mark.parametrize("base, order, packing", VARIANTS)
def test_tir_decode_is_bit_exact_on_llvm(base, order, packing):
    fmt = qc.formats.get(base) if order is None else tr.variant(base, order, packing)
    qw = random_weight(fmt, 64, 96 if fmt.packing == "tiles" else 128, seed=len(fmt.name))
    assert torch.equal(f16_bits(tir_decode(fmt, qw)), f16_bits(fmt.decode_fp16(qw)))


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("tables", ["lanes", "single"])
def test_hyb_derived_tables_decode_bit_exact_on_llvm(K, tables):
    """HYB's gather through its derived tables as real stages (W_table: uint32 words; W_table_lanes:
    the per-lane copies that GemvConfig.lut_lanes puts in shared memory): bit-exact to the reference."""
    import tvm
    from tvm import te

    from qcompile.kernels.target import parse_target

    fmt = qc.formats.get(f"qtip-hyb-{K}")
    n, k = 64, 128
    qw = random_weight(fmt, n, k, seed=K)
    qw.tensors["tlut"][8:12] = -0.0  # the sign flip of -0 (and of +0 in tlut[:8]) must stay exact
    bufs = {name: te.placeholder(spec.shape, spec.dtype, name=name) for name, spec in fmt.tensor_specs(n, k).items()}
    params = list(bufs.values())
    derived = fmt.tir_tables(bufs)
    assert set(derived) == {"tlut32", "tlut32_lanes"}
    assert tuple(derived["tlut32_lanes"].shape) == (512, tr.LUT_COPIES)
    bufs["tlut32"] = derived["tlut32"]
    if tables == "lanes":
        bufs["tlut32_lanes"] = derived["tlut32_lanes"]
    G = te.compute((n, k // 16, fmt.gather_count), lambda i, c, g: fmt.tir_gather(bufs, i, c, g), name="W_gather")
    W = te.compute((n, k // 16, 16), lambda i, c, j: fmt.tir_decode_unit(dict(bufs, gathered=G), i, c, j), name="W")
    ex = tvm.compile(te.create_prim_func([*params, W]), target=parse_target("llvm").tvm_target())
    out = torch.empty(n, k // 16, 16, dtype=torch.float16)
    ex["main"](*[qw.tensors[name] for name in fmt.tensor_specs(n, k)], out)
    assert torch.equal(f16_bits(out.view(n, k)), f16_bits(fmt.decode_fp16(qw)))


def ptx_a_fragment(W: torch.Tensor) -> torch.Tensor:
    """fp16 [N/16, k/16, 32, 8]: register e of lane l's PTX mma.m16n8k16 A fragment of each 16x16 tile
    of W [N, k]: row (l >> 2) + 8·((e >> 1) & 1), column 2·(l & 3) + (e & 1) + 8·(e >> 2)."""
    n, k = W.shape
    lane, e = torch.arange(32)[:, None], torch.arange(8)[None, :]
    row = (lane >> 2) + 8 * ((e >> 1) & 1)
    col = 2 * (lane & 3) + (e & 1) + 8 * (e >> 2)
    return W.view(n // 16, 16, k // 16, 16).permute(0, 2, 1, 3)[:, :, row, col]


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("staged", [False, True])
def test_hyb_fragment_decode_is_the_ptx_a_fragment_on_llvm(K, staged):
    """HYB in its stored layout decodes per (tile, lane, A register) (tir_fragment_decode): lane l's
    register e, from its own and lane l + 1's packed bytes, is bit for bit the weight the PTX A
    fragment puts there. staged: through the kernel's stages (compute.fragment_stages: the lane's
    staged words, slices, table words, and the uint32 table with its lane copies), else inline."""
    import tvm
    from tvm import te

    from qcompile.kernels.compute import fragment_stages
    from qcompile.kernels.target import parse_target

    fmt = qc.formats.get(f"qtip-hyb-{K}")
    assert fmt.fragment_native and fmt.fragment_word_count == 4 * K
    assert not any(qc.formats.get(nm).fragment_native for nm in ("qtip-3inst-2", "qtip-1mad-3", "int4-g128", "e8p-2"))
    assert not tr.variant(fmt.name, "mma", "tiles").fragment_native
    n, k = 64, 128
    qw = random_weight(fmt, n, k, seed=10 + K)
    qw.tensors["tlut"][8:12] = -0.0  # the sign flip of ±0 must stay exact
    if staged:
        params, bufs = fragment_stages(fmt, n, k)
        assert {"fragment_words", "fragment_slices", "fragment_gathered", "tlut32_lanes"} <= set(bufs)
    else:
        bufs = {name: te.placeholder(spec.shape, spec.dtype, name=name) for name, spec in fmt.tensor_specs(n, k).items()}
        params = list(bufs.values())
    F = te.compute((n // 16, k // 16, 32, 8), lambda I, J, lane, e: fmt.tir_fragment_decode(bufs, I, J, lane, e), name="F")
    ex = tvm.compile(te.create_prim_func([*params, F]), target=parse_target("llvm").tvm_target())
    out = torch.empty(n // 16, k // 16, 32, 8, dtype=torch.float16)
    ex["main"](*[qw.tensors[name] for name in fmt.tensor_specs(n, k)], out)
    assert torch.equal(f16_bits(out), f16_bits(ptx_a_fragment(fmt.decode_fp16(qw))))


def test_fragment_decode_refuses_other_layouts():
    from tvm import te

    fmt = tr.variant("qtip-hyb-2", "row", "kernel")
    bufs = {name: te.placeholder(spec.shape, spec.dtype, name=name) for name, spec in fmt.tensor_specs(64, 64).items()}
    with pytest.raises(QCompileError, match="not stored in the mma A-fragment order"):
        fmt.tir_fragment_decode(bufs, 0, 0, 0, 0)


@pytest.mark.parametrize("lanes", [0, 1])
def test_hyb_gemv_table_knob_compiles_for_sm90(lanes):
    """lut_lanes=1: the per-lane table copies (16 x 512 uint32, 32 KiB) in dynamic shared memory, read
    at copy threadIdx.x % 16; 0: one 2 KiB uint32 table in static shared memory. Either way one 32-bit
    table load per state and the unit decode is the word-copy intrinsic."""
    import dataclasses

    from qcompile.kernels.library import KernelSpec, build, cuda_source, default_gemv_config
    from qcompile.kernels.target import parse_target

    fmt = qc.formats.get("qtip-hyb-2")
    spec = KernelSpec(fmt.name, 256, 1024, 1)
    cfg = dataclasses.replace(default_gemv_config(256, 1024, 1, fmt.decode_unit, fmt.gemv_tile), lut_lanes=lanes)
    src = cuda_source(build([spec], parse_target("sm_90"), config_for=lambda s: cfg))
    assert "qc_qtip_hyb_k2_decode16(" in src
    assert "tlut[" not in src.split("__global__")[-1].split("W_gather_local")[1]  # no fp16 table reads in the loop
    if lanes:
        assert "extern __shared__" in src and "W_table_lanes_shared_dyn" in src
        # entry * LUT_COPIES + the lane's copy (threadIdx.x % LUT_COPIES; threads_k = 32 here)
        assert re.search(r"\* 16\) \+ \(\(\(int\)threadIdx\.x\) & 15\)\)\]", src), "no per-lane table copy"
    else:
        assert re.search(r"__shared__ .*uint W_table_shared_ptr\[512\]", src)
        assert "W_table_lanes" not in src and "extern __shared__" not in src


def test_fused_gemv_on_llvm():
    from qcompile.kernels.library import KernelSpec, build
    from qcompile.kernels.target import parse_target

    fmt = qc.formats.get("qtip-hyb-2")
    n, k, m = 64, 128, 2
    qw = random_weight(fmt, n, k, seed=9)
    X = torch.randn(m, k, generator=torch.Generator().manual_seed(9)).half()
    spec = KernelSpec(fmt.name, n, k, m)
    ex = build([spec], parse_target("llvm"))
    Y = torch.empty(m, n, dtype=torch.float16)
    ex[spec.name](X, qw.tensors["trellis"], qw.tensors["tlut"], Y)
    ref = X.double() @ fmt.decode_fp16(qw).double().T
    assert float((Y.double() - ref).norm() / ref.norm()) < 2e-3


# --- Gaussian MSE at reduced size (the full 4096-sequence target runs on the GPU) ---------------------------------
@pytest.mark.parametrize("name, bound", [("qtip-3inst-2", 0.075), ("qtip-1mad-2", 0.075), ("qtip-hyb-2", 0.075)])
def test_gaussian_mse_2bit(name, bound):
    r = tr.gaussian_mse(name, n_sequences=32, seed=0, scales=(0.95, 1.0), device="cpu")
    assert r["format"] == name and set(r["mse_by_scale"]) == {0.95, 1.0}
    assert 0.0625 < r["mse"] <= bound  # above the distortion-rate bound 2^-4


@pytest.mark.parametrize("name, scale, hi", [("qtip-hyb-3", 0.9, 0.0205), ("qtip-hyb-4", 0.8, 0.0062),
                                             ("qtip-3inst-4", 0.85, 0.0051)])
def test_gaussian_mse_3_4_bit(name, scale, hi):
    # 64 sequences, best scale: hyb-3 0.0191 (ρ 0.9), hyb-4 0.0056 (ρ 0.8), 3inst-4 0.0047 (ρ 0.85)
    r = tr.gaussian_mse(name, n_sequences=16, seed=1, scales=(scale,), device="cpu")
    assert 2.0 ** (-2 * qc.formats.get(name).K) < r["mse"] <= hi


# --- bad input -------------------------------------------------------------------------------------------------------
def test_bad_weights_and_parameters():
    fmt = qc.formats.get("qtip-hyb-2")
    qw = random_weight(fmt, 32, 32, 0)
    qw.tensors["SU"], qw.tensors["SV"] = torch.ones(32).half(), torch.ones(32).half()
    cases = []
    bad = dict(qw.tensors, trellis=qw.tensors["trellis"].reshape(4, 32))
    cases.append((bad, "trellis.*must be int16\\[1, 1, 128\\]"))
    bad = dict(qw.tensors, trellis=qw.tensors["trellis"].to(torch.int32))
    cases.append((bad, "trellis.*must be int16"))
    bad = {k: v for k, v in qw.tensors.items() if k != "tlut"}
    cases.append((bad, "needs tensors"))
    for tensors, msg in cases:
        with pytest.raises(QCompileError, match=msg) as err:
            fmt.decode_fp16(qc.formats.QuantizedWeight(fmt.name, (32, 32), tensors))
        assert "\n" not in str(err.value)
    for args, msg in [(("hyb", 5), "unsupported bits per weight K=5"), (("trellis", 2), "unknown trellis code"),
                      (("hyb", 2, "diagonal"), "unknown in-tile order")]:
        with pytest.raises(QCompileError, match=msg):
            tr.TrellisFormat(*args)
    with pytest.raises(QCompileError, match="multiples of the 16x16"):
        qc.formats.get("qtip-3inst-2").quantize(torch.randn(24, 40))
    with pytest.raises(QCompileError, match="multiples of 32"):
        qc.formats.get("qtip-hyb-2").quantize(torch.randn(48, 64))
    with pytest.raises(QCompileError, match="unsupported trellis: L=17"):
        tr.words_to_states(torch.zeros(1, 32, dtype=torch.int16), 256, 17, 2)
    with pytest.raises(QCompileError, match="not a qtip format name"):
        tr.variant("qtip-hyb", "row", "tiles")
    with pytest.raises(QCompileError, match="not a qtip trellis format"):
        tr.qw_format(qc.formats.QuantizedWeight("int4-g128", (8, 128), {}))


_QTIP_HOST_SHIM = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>
#define __device__
#define __forceinline__ inline
#define __restrict__
typedef _Float16 half;
struct half2 { _Float16 x, y; };
static half2 __hadd2(half2 a, half2 b) {  // (a double sum of two fp16 is exact: one rounding, as on the GPU)
  return {(_Float16)((double)a.x + (double)b.x), (_Float16)((double)a.y + (double)b.y)};
}
static half2 __floats2half2_rn(float a, float b) { return {(_Float16)a, (_Float16)b}; }
static unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}
static unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xFF) * ((b >> (8 * i)) & 0xFF);
  return c;
}
static float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
template <int K> static void qc_qtip_3inst16(const unsigned* g, half* w);
template <int K> static void qc_qtip_1mad16(const unsigned* g, half* w);
"""
_QTIP_HOST_MAIN = r"""
int main() {
  FILE* in = std::fopen("g.bin", "rb"); FILE* out = std::fopen("out.bin", "wb");
  unsigned g[4];
  while (std::fread(g, 4, 4, in) == 4) {
    half w[16];
    qc_qtip_@CODE@16<@K@>(g, w);
    std::fwrite(w, 2, 16, out);
  }
  std::fclose(in); std::fclose(out);
}
"""


@pytest.mark.parametrize("code", ["3inst", "1mad"])
@pytest.mark.parametrize("K", [2, 3, 4])
def test_cuda_v1_decode_source_matches_the_torch_decode_on_host(tmp_path, code, K, run_host_cpp):
    """The 1MAD / 3INST decode intrinsics of the CUDA source, compiled for the host (g++, _Float16 and a
    shim of the CUDA calls), equal decode_1mad / decode_3inst bit for bit on the windows they read
    (16 weights of 4000 random 4-word slices)."""
    import numpy as np

    src = tr._cuda_trellis_source()
    src = src.replace("#include <cuda_fp16.h>", "")
    main = _QTIP_HOST_MAIN.replace("@CODE@", code).replace("@K@", str(K))
    words = np.random.default_rng(K).integers(0, 2**32, size=(4000, 4), dtype=np.uint64).astype(np.uint32)
    words.tofile(tmp_path / "g.bin")
    run_host_cpp(tmp_path, _QTIP_HOST_SHIM + src + main)
    got = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.int16).reshape(-1, 16))
    g = torch.from_numpy(words.astype(np.int64))
    j = torch.arange(16)
    states = (g[:, (j * K) >> 4] >> (16 - ((j * K) & 15))) & 0xFFFF
    ref = (tr.decode_3inst if code == "3inst" else tr.decode_1mad)(states)
    assert torch.equal(got, ref.view(torch.int16))
