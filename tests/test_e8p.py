"""QuIP# E8P formats (e8p-2/3/4): the codebooks, the exact encoder, the §1.6 bit trick, layouts, the
TIR decode on llvm, quantization with RHT + BlockLDLQ, Gaussian MSE and bad inputs."""
import math

import numpy as np
import pytest
import torch

import qcompile as qc
from qcompile.errors import QCompileError
from qcompile.formats import e8p
from qcompile.formats.quipsharp_io import from_reference_qidxs, to_reference_qidxs

FORMATS = ["e8p-2", "e8p-3", "e8p-4"]


def rand_codes(fmt, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    c1 = torch.randint(0, 65536, (n, k // 8), generator=gen)
    c2 = None
    if fmt.residual is not None:
        c2 = torch.randint(0, 65536 if fmt.residual == "e8p" else 256, (n, k // 8), generator=gen)
    return c1, c2


def qweight_from_codes(fmt, c1, c2, seed=0):
    n, k = c1.shape[0], c1.shape[1] * 8
    gen = torch.Generator().manual_seed(seed)
    su = (torch.randint(0, 2, (k,), generator=gen) * 2 - 1).half()
    sv = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).half() * 0.03125
    return qc.formats.QuantizedWeight(fmt.name, (n, k), {**fmt.tensors_from_codes(c1, c2), "SU": su, "SV": sv})


# --- codebook -------------------------------------------------------------------------------------
def test_registry():
    for name in FORMATS:
        assert name in qc.formats.names() and qc.formats.get(name).decode_unit == 32


def test_abs_grid_order_norms_and_packed_table():
    S = e8p.e8p_abs_grid()
    n2 = S.pow(2).sum(1)
    # 227 lexicographically sorted vectors of |D̂8| with norm² ≤ 10, then 29 pads of norm² 12
    assert sorted(map(tuple, S[:227].tolist())) == list(map(tuple, S[:227].tolist()))
    assert set(n2[:227].tolist()) == {2.0, 4.0, 6.0, 8.0, 10.0} and (n2[227:] == 12).all()
    assert ((S * 2) % 2 == 1).all()  # positive half-integers
    assert S[0].tolist() == [0.5] * 8 and S[227].tolist() == [1.5, 0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 1.5]
    assert S[255].tolist() == [1.5, 1.5, 0.5, 0.5, 1.5, 1.5, 1.5, 0.5]
    odd = e8p.e8p_abs_odd()
    assert int(odd[:227].sum()) == 120 and odd[227:].all() and (S[227:] == 0.5).sum(1).eq(3).all()
    # packed: nibble k = 2·base[PERM[k]] + 8, coordinate 7 negated for odd sums
    words = e8p.e8p_packed_abs().to(torch.int64) & 0xFFFFFFFF
    for k, coord in enumerate(e8p.PERM):
        nib = (words >> (4 * k)) & 15
        expect = 2 * S[:, coord] * torch.where(odd & (coord == 7), -1.0, 1.0) + 8
        assert torch.equal(nib.float(), expect)
    assert words[0] == 0x99999999


def test_codebook_is_2_16_distinct_points_of_e8_plus_quarter():
    g = e8p.e8p_full_grid()
    assert g.shape == (65536, 8) and torch.unique(g, dim=0).shape[0] == 65536
    assert e8p.in_e8_plus_quarter(g).all()
    assert set((g * 4).unique().tolist()) == {float(v) for v in range(-11, 12, 2)}
    # code = abs_idx << 8 | signs; the D̂8 part (point ∓ ¼, by sign parity) has the abs vector's norm
    codes = torch.arange(65536)
    p = e8p._popcount8(codes & 255) & 1
    v = g + torch.where(p.bool(), 0.25, -0.25)[:, None]
    assert torch.equal(v.abs(), e8p.e8p_abs_grid()[codes >> 8])
    assert (v.sum(1) % 2 == 0).all()  # D̂8: even sum
    # the fp16 table is exact
    assert torch.equal(e8p.e8p_full_grid(dtype=torch.float16).float(), g)


def test_membership_test_rejects_non_members():
    g = e8p.e8p_full_grid()[:1000]
    bump = torch.zeros(8)
    bump[3] = 1.0  # odd sum change
    assert not e8p.in_e8_plus_quarter(g + bump).any()
    half = torch.zeros(8)
    half[0] = 0.5  # mixes ¼ and ¾ classes
    assert not e8p.in_e8_plus_quarter(g + half).any()
    assert not e8p.in_e8_plus_quarter(g + 0.1).any()
    assert e8p.in_e8_plus_quarter(g + 2.0).all()  # 2·1 ∈ D8


def test_encode_decode_is_identity_on_all_codes():
    g = e8p.e8p_full_grid()
    assert torch.equal(e8p.e8p_encode(g), torch.arange(65536))


def test_fast_encoder_is_exact_against_bruteforce():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1500, 8, generator=gen), 2.5 * torch.randn(500, 8, generator=gen)])
    c_fast, c_bf = e8p.e8p_encode(x), e8p.e8p_encode_bruteforce(x)
    g = e8p.e8p_full_grid()
    d_fast = (x - g[c_fast]).pow(2).sum(1)
    d_bf = (x - g[c_bf]).pow(2).sum(1)
    assert torch.allclose(d_fast, d_bf, atol=1e-5)
    assert (c_fast == c_bf).float().mean() > 0.999  # the rest are exact ties


def test_bit_trick_equals_table_decode_for_all_codes():
    codes = torch.arange(65536).reshape(-1, 4)  # four codes per 64-bit word
    abs32 = sum((codes[:, i] >> 8) << (8 * i) for i in range(4))
    sign32 = sum(((codes[:, i] >> j) & 1) << (4 * j + i) for i in range(4) for j in range(8))
    out = e8p.bit_trick_decode(abs32.numpy(), sign32.numpy())
    ref = e8p.e8p_full_grid(dtype=torch.float16)[codes].numpy()
    assert np.array_equal(out.view(np.uint16), ref.view(np.uint16))


# The CUDA intrinsic's integer logic, run on the CPU: its source compiled as host C++ with the one
# inline-asm LOP3 spelled in C and exact fp16 adds (every sum the decode forms is exact), on the same
# word pairs as the NumPy bit trick above. The GPU tests check the real kernels; this catches a slip
# in the mask arithmetic on a machine without a GPU.
_HOST_SHIM = r"""
#include <cmath>
#include <cstdint>
#include <cstdio>
#define __device__
#define __forceinline__ inline
#define __restrict__
struct half { uint16_t x; };
struct half2 { uint16_t x, y; };
static float h2f(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const float v = e ? std::ldexp(float(m | 1024), e - 25) : std::ldexp(float(m), -24);
  return (h >> 15) ? -v : v;
}
static uint16_t f2h(float f) {  // exact for the values the decode forms (normal fp16 numbers)
  if (f == 0.0f) return std::signbit(f) ? 0x8000 : 0;
  int e;
  const float m = std::frexp(std::fabs(f), &e);
  return uint16_t((f < 0 ? 0x8000 : 0) | ((e + 14) << 10) | (uint32_t(std::ldexp(m, 11)) & 1023));
}
static half2 __hadd2(half2 a, half2 b) { return {f2h(h2f(a.x) + h2f(b.x)), f2h(h2f(a.y) + h2f(b.y))}; }
"""
_HOST_MAIN = r"""
int main() {
  int tbl[256];
  unsigned w[2];
  FILE* f = std::fopen("tbl.bin", "rb"); std::fread(tbl, 4, 256, f); std::fclose(f);
  FILE* in = std::fopen("words.bin", "rb"); FILE* out = std::fopen("out.bin", "wb");
  while (std::fread(w, 4, 2, in) == 2) {
    int t[4];
    for (int i = 0; i < 4; ++i) t[i] = tbl[(w[0] >> (8 * i)) & 255];
    const int sign = int(w[1]);
    half o[32];
    qc_e8p2_decode32(&sign, t, o);
    std::fwrite(o, 2, 32, out);
  }
  std::fclose(in); std::fclose(out);
}
"""


def test_cuda_decode_source_matches_bit_trick_on_host(tmp_path, run_host_cpp):
    """The e8p-2 decode of the CUDA source, compiled for the host (g++, a shim for the fp16 and
    intrinsic calls), equals bit_trick_decode on 20000 random word pairs."""
    import re

    full = e8p._CUDA_E8P
    src = full.split("__device__ __forceinline__ int qc_e8p4_decode32")[0]  # e8p-2's decode
    src = src.replace("#include <cuda_fp16.h>", "").replace("#ifndef QC_E8P_DECODE32", "")
    src = src.replace("#define QC_E8P_DECODE32", "")
    src, n = re.subn(r'asm\("lop3\.b32 %0, %1, %2, %3, 0xea;" : "=r"\(h\) : "r"\(xs\), "n"\(0x00F000F0\), '
                     r'"n"\(0x50085008\)\);', "h = (xs & 0x00F000F0u) | 0x50085008u;", src)
    assert n == 1 and "asm" not in src
    e8p.e8p_packed_abs().numpy().astype(np.int32).tofile(tmp_path / "tbl.bin")
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=(20000, 2), dtype=np.uint64).astype(np.uint32)
    words.tofile(tmp_path / "words.bin")
    run_host_cpp(tmp_path, _HOST_SHIM + src + _HOST_MAIN)
    got = np.fromfile(tmp_path / "out.bin", dtype=np.float16).reshape(-1, 4, 8)
    ref = e8p.bit_trick_decode(words[:, 0].astype(np.int64), words[:, 1].astype(np.int64))
    assert np.array_equal(got.view(np.uint16), ref.view(np.uint16))


def test_e81b_codebook():
    g = e8p.e81b_grid()
    assert g.shape == (256, 8) and torch.unique(g, dim=0).shape[0] == 256
    n2 = g.pow(2).sum(1)
    assert (n2[:241] <= 2).all() and (n2[241:] == 4).all() and (g.sum(1) % 2 == 0).all()
    assert (g[:113] == g[:113].round()).all() and (g[113:241].abs() == 0.5).all()
    assert (g[0] == 0).sum() == 6 and g[0].tolist()[:2] == [-1.0, -1.0]  # lexicographic: smallest first
    assert g[112].tolist() == [1.0, 1.0, 0, 0, 0, 0, 0, 0]
    assert torch.equal(g[241:249], 2 * torch.eye(8)) and torch.equal(g[249:], -2 * torch.eye(8)[:7])
    words = e8p.e81b_packed().to(torch.int64) & 0xFFFFFFFF
    dec = torch.stack([((words >> (4 * j)) & 15).float() / 2 - 4 for j in range(8)], dim=1)
    assert torch.equal(dec, g)
    x = g + 0.01 * torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(e8p.e81b_encode(x), torch.arange(256))


# --- layouts --------------------------------------------------------------------------------------
def test_pack_unpack_and_reference_tiles():
    c = torch.randint(0, 65536, (32, 16), generator=torch.Generator().manual_seed(2))
    c[0, :4] = torch.tensor([0, 65535, 0x8000, 0x00FF])
    q = e8p.pack_e8p(c)
    assert q.dtype == torch.int32 and q.shape == (32, 4, 2)
    assert torch.equal(e8p.unpack_e8p(q), c)
    tiles = e8p.pack_e8p_tiles(c)
    assert tiles.shape == (2, 2, 8, 4, 2) and torch.equal(e8p.unpack_e8p_tiles(tiles), c)
    ref = e8p.e8p_to_reference(q)
    assert ref.dtype == torch.int64 and ref.shape == (32, 4)
    assert torch.equal(ref, e8p.reference_pack_e8p(c))  # straight from the §1.5 description
    assert torch.equal(e8p.e8p_from_reference(ref), q)
    assert torch.equal(tiles.reshape(-1, 2).view(torch.int64).reshape(32, 4), ref)  # a pure re-view (little endian)
    # a tile word = rows r0, r0+1 × code columns c0, c0+1: code 1 is the next row
    one = torch.zeros(16, 8, dtype=torch.int64)
    one[1, 0] = (7 << 8) | 0b00000001
    w = e8p.pack_e8p_tiles(one)[0, 0, 0, 0]
    assert int(w[0]) == 7 << 8 and int(w[1]) == 1 << 1  # abs byte 1; sign bit 0 of code 1 at bit 1
    # a kernel word pair = four consecutive codes of one row: code column 1 is code 1
    w = e8p.pack_e8p(one)[1, 0]
    assert int(w[0]) == 7 and int(w[1]) == 1  # abs byte 0; sign bit 0 of code 0 at bit 0
    one[1, 0], one[1, 1] = 0, (9 << 8) | 0b10000000
    w = e8p.pack_e8p(one)[1, 0]
    assert int(w[0]) == 9 << 8 and int(w[1]) == 1 << (4 * 7 + 1)  # sign bit 7 of code 1
    e = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(3))
    words = e8p.pack_e81b(e)
    assert torch.equal(e8p.unpack_e81b(words), e)
    r = e8p.e81b_to_reference(words)
    assert r.shape == (16, 2) and torch.equal(e8p.e81b_from_reference(r), words)
    assert int(r[0, 0]) & 255 == int(e[0, 0]) and (int(r[0, 1]) >> 56) & 255 == int(e[0, 15])


@pytest.mark.parametrize("name", FORMATS)
def test_reference_qidxs_round_trip(name):
    fmt = qc.formats.get(name)
    n, k = 32, 128
    c1, c2 = rand_codes(fmt, n, k, 4)
    qw = qweight_from_codes(fmt, c1, c2)
    ref = to_reference_qidxs(qw)
    assert ref.dtype == torch.int64 and ref.shape == (n, {"e8p-2": k // 32, "e8p-4": k // 16, "e8p-3": 3 * k // 64}[name])
    assert torch.equal(ref[:, :k // 32], e8p.reference_pack_e8p(c1))
    back = from_reference_qidxs(name, ref, n, k)
    for t, v in back.items():
        assert torch.equal(v, qw.tensors[t])


# --- decode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
def test_decode_fp16_is_the_table_decode(name):
    fmt = qc.formats.get(name)
    n, k = 16, 128
    c1, c2 = rand_codes(fmt, n, k, 5)
    qw = qweight_from_codes(fmt, c1, c2)
    a = e8p.e8p_full_grid()[c1].reshape(n, k)
    out = fmt.decode_fp16(qw)
    if fmt.residual is None:
        expect = a.half()
    else:
        b = (e8p.e8p_full_grid()[c2] if fmt.residual == "e8p" else e8p.e81b_grid()[c2]).reshape(n, k)
        r = float(torch.tensor(1 / fmt.resid_scale).half())
        expect = torch.tensor((a.double() + b.double() * r).numpy()).half()  # exact sum, one rounding
    assert torch.equal(out.view(torch.int16), expect.view(torch.int16))
    assert qw.bits_per_weight == pytest.approx(fmt.bits + (8192 + (8192 if name == "e8p-3" else 0)
                                                           + (16 if fmt.residual else 0) + 16 * (n + k)) / (n * k))


@pytest.mark.parametrize("name", FORMATS)
def test_tir_decode_is_bit_exact_on_llvm(name):
    import tvm
    from tvm import te

    from qcompile.kernels.target import parse_target

    fmt = qc.formats.get(name)
    n, k = 32, 256
    c1, c2 = rand_codes(fmt, n, k, 6)
    qw = qweight_from_codes(fmt, c1, c2)
    specs = fmt.tensor_specs(n, k)
    bufs = {nm: te.placeholder(spec.shape, spec.dtype, name=nm) for nm, spec in specs.items()}
    W = te.compute((n, k), lambda i, j: fmt.tir_decode(bufs, i, j), name="W")
    ex = tvm.compile(te.create_prim_func([*bufs.values(), W]), target=parse_target("llvm").tvm_target())
    out = torch.empty(n, k, dtype=torch.float16)
    ex["main"](*[qw.tensors[nm] for nm in specs], out)
    assert torch.equal(out.view(torch.int16), fmt.decode_fp16(qw).view(torch.int16))


@pytest.mark.parametrize("name", FORMATS)
def test_fused_matmul_llvm(name):
    from qcompile.kernels.library import KernelSpec, build
    from qcompile.kernels.target import parse_target

    fmt = qc.formats.get(name)
    n, k, m = 32, 256, 3
    gen = torch.Generator().manual_seed(7)
    qw = fmt.quantize(torch.randn(n, k, generator=gen), seed=1)
    spec = KernelSpec(name, n, k, m)
    ex = build([spec], parse_target("llvm"))
    X = torch.randn(m, k, generator=gen).half()
    Y = torch.full((m, n), float("nan"), dtype=torch.float16)
    ex[spec.name](X, *[qw.tensors[t] for t in fmt.tensor_specs(n, k)], Y)
    ref = X.double() @ fmt.decode_fp16(qw).double().T
    assert ((Y.double() - ref).norm() / ref.norm()).item() < 1e-3


# --- quantize -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, lo, hi", [("e8p-2", 0.085, 0.105), ("e8p-3", 0.026, 0.034), ("e8p-4", 0.0075, 0.0115)])
def test_quantize_round_trip_error_on_gaussian_weights(name, lo, hi):
    fmt = qc.formats.get(name)
    n, k = 64, 512
    W = 0.02 * torch.randn(n, k, generator=torch.Generator().manual_seed(8))
    qw = fmt.quantize(W, seed=3)
    assert qw.rht and qw.meta["rht"] and qw.meta["rho"] == fmt.default_rho and qw.meta["codebook"] == fmt.codebook
    assert set(qw.tensors) == set(fmt.stored_specs(n, k, True))
    fmt.check_qweight(qw)
    # SU = ±1, SV = ±Wscale with Wscale = fp16(RMS(W̃)/ρ) (RMS is preserved by the orthogonal RHT)
    ws = qw.meta["wscale"]
    assert ws == pytest.approx(float(W.pow(2).mean().sqrt()) / fmt.default_rho, rel=2e-3)
    assert (qw.tensors["SU"].abs() == 1).all() and (qw.tensors["SV"].float().abs() == ws).all()
    grid = fmt.decode_fp16(qw).float()
    assert grid.abs().max() <= 2.75 * (1 + 1 / (fmt.resid_scale or math.inf)) + 2 + 1e-3
    rel = ((fmt.dequantize(qw) - W).pow(2).mean() / W.pow(2).mean()).item()
    assert lo < rel < hi, rel


def test_scale_overrides_rho_and_rht_is_always_on():
    fmt = qc.formats.get("e8p-2")
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(9))
    qw = fmt.quantize(W, scale=0.7, rht=False)
    assert qw.rht and qw.meta["rho"] == 0.7
    assert 0.6 < fmt.decode_fp16(qw).float().pow(2).mean().sqrt() < 0.8
    with pytest.raises(QCompileError, match="positive target RMS"):
        fmt.quantize(W, scale=-1.0)


def test_zero_weight():
    fmt = qc.formats.get("e8p-2")
    qw = fmt.quantize(torch.zeros(16, 64))  # E8P has no zero point: SV = 0 makes it exact
    assert qw.meta["wscale"] == 0.0 and torch.equal(fmt.dequantize(qw), torch.zeros(16, 64))


@pytest.mark.parametrize("name", FORMATS)
def test_ldlq_beats_nearest_rounding_with_a_correlated_hessian(name):
    fmt = qc.formats.get(name)
    gen = torch.Generator().manual_seed(10)
    n, k = 32, 256
    W = torch.randn(n, k, generator=gen)
    A = torch.eye(k) + 0.4 * torch.randn(k, k, generator=gen) / math.sqrt(k) * 4
    X = torch.randn(1024, k, generator=gen) @ A
    H = X.T @ X / 1024
    near = fmt.quantize(W, hessian=H, ldlq=False, seed=1)
    ldlq = fmt.quantize(W, hessian=H, seed=1)
    assert ldlq.meta["ldlq"] and not near.meta["ldlq"]
    assert ldlq.meta["proxy_loss"] < 0.9 * near.meta["proxy_loss"], (ldlq.meta["proxy_loss"], near.meta["proxy_loss"])
    # the proxy loss recorded is the one of the stored weight in the original basis
    from qcompile.quant.ldlq import proxy_loss

    direct = proxy_loss(W.double(), fmt.dequantize(ldlq).double(), H.double())
    assert direct == pytest.approx(ldlq.meta["proxy_loss"], rel=1e-3)


def test_gaussian_mse():
    # at the Gaussian-optimal ρ ≈ 1.03 (found by the search below and in the report)
    mse2 = e8p.gaussian_mse("e8p-2", 1 << 15, seed=0, scale=1.03)
    assert 0.089 < mse2 <= 0.0935  # paper: 0.0915 (scalar 2-bit: 0.120, D4: 0.1019)
    mse, rho = e8p.gaussian_mse("e8p-2", 1 << 11, seed=1, return_scale=True)  # the ρ search itself
    assert 0.85 < rho < 1.2 and mse < 0.097
    mse3 = e8p.gaussian_mse("e8p-3", 1 << 13, seed=0, scale=0.98)
    mse4 = e8p.gaussian_mse("e8p-4", 1 << 13, seed=0, scale=0.93)
    assert mse3 < 0.0315 and mse4 < 0.0092 and mse4 < mse3 < mse2  # scalar 3-bit: 0.0377


# --- bad inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, msg", [
    ((24, 128), "out_features % 16"), ((32, 96), "in_features % 64"),
    ((32, 704), "in_features=704: no Hadamard construction"), ((176, 64), "out_features=176: no Hadamard"),
])
def test_bad_shapes(shape, msg):
    with pytest.raises(QCompileError, match=msg) as err:
        qc.formats.get("e8p-2").quantize(torch.randn(*shape))
    assert "\n" not in str(err.value)


def test_check_qweight_rejects_bad_tensors():
    fmt = qc.formats.get("e8p-4")
    qw = fmt.quantize(torch.randn(16, 64))
    bad = qc.formats.QuantizedWeight(qw.format, qw.shape, dict(qw.tensors), qw.meta)
    bad.tensors["grid_packed_abs"] = bad.tensors["grid_packed_abs"].clone()
    bad.tensors["grid_packed_abs"][3] += 1
    with pytest.raises(QCompileError, match="abs table"):
        fmt.decode_fp16(bad)
    bad = qc.formats.QuantizedWeight(qw.format, qw.shape, dict(qw.tensors), qw.meta)
    bad.tensors["qidxs"] = bad.tensors["qidxs"].to(torch.int64)
    with pytest.raises(QCompileError, match="qidxs"):
        fmt.decode_fp16(bad)
    bad = qc.formats.QuantizedWeight(qw.format, qw.shape, {k: v for k, v in qw.tensors.items() if k != "SU"}, qw.meta)
    with pytest.raises(QCompileError):
        fmt.decode_fp16(bad)
