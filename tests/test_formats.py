"""int4-g128: quantization, packing and the torch reference decode; the format registry."""
import pytest
import torch

import qcompile as qc
from qcompile.errors import QCompileError

FMT = "int4-g128"


def test_registry_names_and_unknown_format():
    assert FMT in qc.formats.names()
    assert qc.formats.get(FMT).name == FMT
    with pytest.raises(QCompileError, match="unknown format 'int3-g7'"):
        qc.formats.get("int3-g7")


def test_pack_unpack_round_trip_every_code_at_every_position():
    fmt = qc.formats.get(FMT)
    gen = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (32, 256), generator=gen)
    u[0, :16] = torch.arange(16)  # every code value, incl. 15 in the sign nibble
    words = fmt.pack(u)
    assert words.dtype == torch.int32 and words.shape == (32, 32)
    assert torch.equal(fmt.unpack(words), u)


def test_layout_puts_pairs_in_the_two_halves():
    # element 2i sits at nibble i of the low half, element 2i+1 at nibble i of the high half
    fmt = qc.formats.get(FMT)
    u = torch.zeros(1, 8, dtype=torch.int64)
    u[0, 3] = 0xA  # pair 1, high half -> bits 20..23
    assert fmt.pack(u).item() == 0xA << 20
    u = torch.zeros(1, 8, dtype=torch.int64)
    u[0, 6] = 0x5  # pair 3, low half -> bits 12..15
    assert fmt.pack(u).item() == 0x5 << 12


def test_quantize_properties():
    fmt = qc.formats.get(FMT)
    W = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    qw = fmt.quantize(W)
    assert qw.bits_per_weight == pytest.approx(4.125)
    assert fmt.bits_per_weight(64, 512) == pytest.approx(4.125)
    assert qw.tensors["scales"].dtype == torch.float16 and qw.tensors["scales"].shape == (64, 4)
    W_hat = fmt.dequantize(qw)
    s = qw.tensors["scales"].float().repeat_interleave(128, dim=1)
    # round to nearest with no clipping: error at most half a step (plus fp16 rounding of the product)
    assert ((W_hat - W).abs() <= 0.5 * s + 1e-3 * W.abs().max()).all()
    # the group max is representable: amax/7 * 7
    assert torch.allclose(W_hat.abs().reshape(64, 4, 128).amax(-1), W.abs().reshape(64, 4, 128).amax(-1),
                          rtol=2e-3)
    rel = (W_hat - W).pow(2).mean() / W.pow(2).mean()
    assert rel < 0.02  # ~0.014 for Gaussian weights at 4 bits with per-128 absmax scales


def test_decode_fp16_is_the_fp16_product():
    fmt = qc.formats.get(FMT)
    qw = fmt.quantize(torch.randn(8, 128))
    q = (fmt.unpack(qw.tensors["qweight"]) - 8).to(torch.float16)
    assert torch.equal(fmt.decode_fp16(qw), q * qw.tensors["scales"].repeat_interleave(128, dim=1))


def test_scale_override_targets_rms():
    fmt = qc.formats.get(FMT)
    W = torch.randn(16, 256)
    qw = fmt.quantize(W, scale=2.0)
    codes = fmt.unpack(qw.tensors["qweight"]) - 8
    assert 1.5 < codes.float().pow(2).mean().sqrt() < 2.5


def test_zero_groups_are_exact():
    fmt = qc.formats.get(FMT)
    W = torch.zeros(4, 256)
    W[1, 130] = 3.0
    assert torch.equal(fmt.dequantize(fmt.quantize(W)), W)


@pytest.mark.parametrize("W, msg", [
    (torch.randn(16, 100), "not a multiple of the group size 128"),
    (torch.randn(128), "must be 2-D"),
    (torch.full((4, 128), float("nan")), "NaN or Inf"),
])
def test_bad_weights(W, msg):
    with pytest.raises(QCompileError, match=msg):
        qc.formats.get(FMT).quantize(W)


def test_check_qweight_rejects_wrong_tensors():
    fmt = qc.formats.get(FMT)
    qw = fmt.quantize(torch.randn(8, 128))
    qw.tensors["scales"] = qw.tensors["scales"].float()
    with pytest.raises(QCompileError, match="scales"):
        fmt.decode_fp16(qw)


def test_rht_weight_carries_sign_vectors():
    fmt = qc.formats.get(FMT)
    W = torch.randn(24, 256, generator=torch.Generator().manual_seed(4))  # 24 = 12·2: a tabulated K_h
    qw = fmt.quantize(W, rht=True, seed=11)
    assert set(qw.tensors) == {"qweight", "scales", "SU", "SV"} and qw.rht and qw.meta["rht"]
    assert set(qw.kernel_tensors()) == set(fmt.tensor_specs(24, 256)) == {"qweight", "scales"}
    assert fmt.aux_specs(24, 256, True)["SU"].shape == (256,) and fmt.aux_specs(24, 256, False) == {}
    assert fmt.decode_fp16(qw).dtype == torch.float16  # the kernel-basis values
    rel = (fmt.dequantize(qw) - W).pow(2).mean() / W.pow(2).mean()
    assert rel < 0.02


def test_hessian_only_changes_codes_with_ldlq():
    fmt = qc.formats.get(FMT)
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(16, 128, generator=gen)
    X = torch.randn(512, 128, generator=gen) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=gen))
    H = X.T @ X / 512
    rtn, with_h = fmt.quantize(W), fmt.quantize(W, hessian=H, ldlq=False)
    assert torch.equal(rtn.tensors["qweight"], with_h.tensors["qweight"]) and "proxy_loss" not in rtn.meta
    ldlq = fmt.quantize(W, hessian=H)
    assert ldlq.meta["ldlq"] and ldlq.meta["proxy_loss"] < with_h.meta["proxy_loss"]
    with pytest.raises(QCompileError, match="LDLQ needs a Hessian"):
        fmt.quantize(W, ldlq=True)
