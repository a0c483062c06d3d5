"""QTIP bitshift-trellis formats: qtip-1mad-K, qtip-3inst-K (V=1) and qtip-hyb-K (V=2), K = 2, 3, 4.

Written from the facts and the math in ../shared/reference/qtip.md (the reference code is GPL-3.0
and was not read). Section numbers (§) refer to that report.

Trellis (§1.1–1.3). L = 16 state bits, K bits per weight, V weights per step, one sequence per
16×16 tile (T = 256 weights, S = T/V steps). The tile's bitstream has exactly T·K bits, MSB first,
and is read circularly (tail-biting): state t is the 16-bit window at bit t·K·V, modulo T·K. State
t's top K·V bits are stream bits [t·KV, t·KV + KV), so packing a valid tail-biting path is just
"concatenate every state's top KV bits". Streams are stored in 16-bit words, first stream bit = bit
15 (the reference's int16 words).

Codes (§2, exact constants). A state s decodes to V fp16 values:
  1MAD  x = 34038481·s + 76625530 mod 2^32; y = sum of x's 4 bytes; fp16(fp32(y − 510) ⊗ fp32(1/147.800537109375))
        (one fp32 multiply by the rounded reciprocal — portable bit-exact on CPUs and GPUs, where a
        division or a fused multiply-add is not — then the fp16 round; ≤ 1 fp16 ulp from the
        reference's division; at most 1021 distinct values, 908 over the 2^16 states)
  3INST x = 89226354·s + 64248484 mod 2^32; r = (x & 0x8FFF8FFF) ^ 0x3B603B60;
        fp16(r >> 16) + fp16(r & 0xFFFF) (one fp16 add; each half is ±[2^-3, 2))
  HYB   h = s·(s+1) mod 2^32; (v0, v1) = tlut[(h >> 6) & 511]; v0's sign bit ^= bit 15 of h
        (the sign flip is an XOR of 0x8000, as the reference kernel does, so ±0 stay exact).
        tlut: fp16 [512, 2] per layer, stored with the weight ("tlut"); the default comes from a
        deterministic k-means on Gaussian samples (``kmeans_tlut``), rescaled to std √(15/16).

Layouts (§1.2, §1.4). A layout is an in-tile ORDER (sequence position p → tile element) plus a
PACKING (where a tile's stream bytes live). Both are the reference's:
  generic = order "row" (position p = row·16 + col, row-major) + packing "tiles" (tensor row
            I·(k/16) + J holds tile (I, J)'s 16K stream words)                        (§1.2)
  kernel  = order "mma" (the mma.m16n8k16 A-fragment order) + packing "kernel" (each lane's K-byte
            chunk byte-reversed, lanes of 2×2 tiles interleaved per 32×32 super-tile)  (§1.4)
The order is part of what was encoded (the trellis couples consecutive positions), so converting
between orders needs a re-quantization; converting between packings is a lossless byte shuffle
(``repack`` / ``pack_kernel`` / ``unpack_kernel``). For V=1 the "mma" order is our extension: the
same position → element map, one state per position.

OUR STORED LAYOUTS: qtip-hyb-K uses the kernel layout, qtip-1mad-K / qtip-3inst-K the generic one —
exactly what the reference writes for each (§1.4: only HYB L16 Q9 V2 16×16 gets the kernel layout).
Why: (1) every public QTIP model is HYB in the kernel layout, and the order cannot be converted
without re-quantizing, so HYB must keep the mma order; keeping the reference's bytes too makes
import/export zero-copy and leaves the proven mma A-fragment kernel design (§5.1) open for the GPU
work (a warp per 32×32 super-tile, each lane reading its own 4K contiguous bytes + its neighbour's);
(2) 1MAD/3INST have no public checkpoints and no reference kernel; their generic layout gives a
16-column decode unit (one tile row) = K contiguous int16 words + the next row's first word, which
suits our row-wise GEMV; keeping the reference's bytes again makes export/import exact. Every other
(order, packing) pair is available as an unregistered variant (``variant``), e.g. HYB in mma order
with tile-contiguous streams, for kernels that prefer it; ``tir_decode_unit`` handles all four.

Tensors: "trellis" int16 [N/16, k/16, 16·K] in the tiles packing, [N/32, k/32, 64·K] (one row per
32×32 super-tile) in the kernel packing (exactly K bits per weight; the same bytes as the reference's
nominal 2-D [(N/16)·(k/16), 16·K], 3-D so that the TIR decode knows k and a kernel's staging of a
tile or super-tile is one contiguous region of the last axis), "tlut" fp16
[512, 2] (HYB only), and the RHT vectors SU fp16 [k], SV fp16 [N]. QTIP quantizes in the RHT basis,
always: the ``rht`` argument of quantize is ignored (the trellis codes are Gaussian codebooks and SV is where
the layer scale lives). Wscale (the reference's per-layer scale, §3.3) is rms(W̃)/(rms(codebook)·ρ)
with ρ = ``scale`` (default 0.9 = the reference's scale_override); the quantizer sees W̃/Wscale. Like
the reference, the kernels multiply activations divided by 32 (keeps fp16 partial sums in range,
§2.4): we fold that into the stored vectors, SU = ±1/32 and SV = ±fp16(32·Wscale), both exact in fp16
(powers of two / one rounding of the scale, which the quantizer then uses). So for the stored weight
W = diag(SV)·U·Ŵ·Uᵀ·diag(SU) with Ŵ = decode_fp16 (what ``dequantize`` returns).

Quantization (§3): BlockLDLQ (qcompile.quant.ldlq.block_ldlq) with g = 16 input columns; each 16-column
block is cut into m/16 tiles, ordered by the layout's in-tile order and encoded with the two-pass
tail-biting Viterbi of qcompile.formats.viterbi (fp32 costs). Without a Hessian every tile is encoded
independently (no feedback).

Measured here (2-core CPU, one thread; ``gaussian_mse``, i.i.d. N(0,1), T=256, best ρ of the grid):
  256 sequences, K=2:  3INST 0.0686 (ρ 1.0), 1MAD 0.0686 (ρ 1.0), HYB 0.0702 (ρ 1.0)
                       (paper Table 1: 0.069, 0.069, 0.071; distortion-rate bound 0.0625)
  64 sequences:        K=2  3INST 0.0697  1MAD 0.0694  HYB 0.0713
                       K=3  3INST 0.0181  1MAD 0.0178  HYB 0.0191   (best ρ 0.9-0.95)
                       K=4  3INST 0.0047  1MAD 0.0046  HYB 0.0056   (best ρ 0.8-0.85)
  Viterbi, both tail-biting passes: ~55 ms per 256-weight sequence for V=1, ~25 ms for V=2
  (all K); a 256×256 layer with LDLQ: 6 s (HYB), 16 s (3INST).
"""
from __future__ import annotations

import functools
import math
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..errors import QCompileError
from .base import Format, QuantizedWeight, TensorSpec, register, tir_word_half

# --- trellis parameters ------------------------------------------------------------------------------
L_BITS = 16          # state bits (the only L the formats use; tests use smaller L on the raw helpers)
TILE = 16            # tile side: td_x = td_y = 16
TILE_WEIGHTS = TILE * TILE  # T = 256
Q_BITS = 9           # HYB table index bits
# HYB fragment gather: the lane's table copy (lane % 16) written min(lane, lane ^ 16), the same value
# for lanes 0..31. With lane % 16 nvcc folds the & 15 into the address and spends two LOP3 a table word
# on (h & 0x7FC0) | copy·4; with min it keeps copy·4 in a register and takes one. K-loop SASS (sm_90,
# 28672x8192, packed A): HYB-2 M=1 default 249 -> 209 instructions but 40 -> 51 registers (two
# 512-thread blocks an SM instead of three); M=16 481 -> 418. Timed on the H100 in one process
# (tc_sweep --flag lane-copy-min; artifacts/bench/mma-sweep-qtip-hyb-switches-h100.json): HYB-2 M=1
# 54.3 -> 50.7 us on 28672x8192, 51.5 -> 46.7 on 8192x28672, M=16 88.5 -> 87.3 and 105.0 -> 103.6; HYB-3
# and HYB-4 M=1 on lut_shared=2 59.5 -> 60.4 / 57.5 -> 58.0 and 60.0 -> 60.3 / 55.0 -> 55.0 (and within
# 0.5 % on lut_shared=4). So: the code bits K it is on for (True: every K, as tc_sweep --flag sets it;
# ``lane_copy_by_min``).
LANE_COPY_BY_MIN = (2,)
# HYB's sign-folded table (tir_tables(signed=True)): entries e and e + 512, value 0's sign flipped in the second
SIGNED_ENTRIES = 2 << Q_BITS
LUT_COPIES = 16      # HYB: copies of the uint32 table in W_table_lanes (lanes l, l+16 share one: 32 KiB, under the 48 KiB a launch gets)
BITS = (2, 3, 4)     # K
CODES = {"1mad": 1, "3inst": 1, "hyb": 2}  # code -> V
DEFAULT_SCALE = 0.9  # ρ: the reference's --scale_override
RUNTIME_SCALE = 32   # activations ÷32 before the kernel, outputs ×32 (folded into SU / SV)
DEFAULT_LAYOUT = {"1mad": "generic", "3inst": "generic", "hyb": "kernel"}
LAYOUTS = {"generic": ("row", "tiles"), "kernel": ("mma", "kernel")}
ORDERS = ("row", "mma")
PACKINGS = ("tiles", "kernel")


def lane_copy_by_min(K: int) -> bool:
    """Whether the HYB fragment gather of a K-bit code writes its table copy as min(lane, lane ^ 16)."""
    return LANE_COPY_BY_MIN is True or K in (LANE_COPY_BY_MIN or ())

# --- code constants (§2) -----------------------------------------------------------------------------
MAD1_A, MAD1_B = 34038481, 76625530
MAD1_OFFSET = 510
MAD1_DIVISOR = 147.800537109375
INST3_A, INST3_B = 89226354, 64248484
INST3_MASK = 0x8FFF8FFF
INST3_XOR = 0x3B603B60  # fp16 0x3B60 = 0.921875 in both halves
HYB_STD = 0.9682458365518543  # √(15/16): std of the tlut entries after the k-means


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


MAD1_RECIP = _f32(1.0 / MAD1_DIVISOR)  # the fp32 constant both decoders multiply with


# --- codes: state -> value, vectorised (CPU or CUDA) ----------------------------------------------------
def _u32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int64) & 0xFFFFFFFF


def _u16_to_f16(u: torch.Tensor) -> torch.Tensor:
    """uint16 bit patterns (in an int64 tensor) -> float16 values with those bits."""
    u = u.to(torch.int64) & 0xFFFF
    return torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16).view(torch.float16)


def decode_1mad(states: torch.Tensor) -> torch.Tensor:
    """1MAD (§2.1): fp16 [...] of int states [...]."""
    x = _u32(states.to(torch.int64) * MAD1_A + MAD1_B)
    y = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
    recip = torch.tensor(MAD1_RECIP, dtype=torch.float32, device=states.device)
    return ((y - MAD1_OFFSET).to(torch.float32) * recip).to(torch.float16)


def decode_3inst(states: torch.Tensor) -> torch.Tensor:
    """3INST (§2.2): fp16 [...] of int states [...] (the sum of two fp16 halves, fp16-rounded)."""
    x = _u32(states.to(torch.int64) * INST3_A + INST3_B)
    r = (x & INST3_MASK) ^ INST3_XOR
    return _u16_to_f16(r >> 16) + _u16_to_f16(r & 0xFFFF)


def hyb_index_sign(states: torch.Tensor, Q: int = Q_BITS) -> Tuple[torch.Tensor, torch.Tensor]:
    """HYB hash (§2.3): (table index int64, sign bit int64) of int states."""
    s = states.to(torch.int64)
    h = _u32(s * (s + 1))
    return (h >> (15 - Q)) & ((1 << Q) - 1), (h >> 15) & 1


def decode_hyb(states: torch.Tensor, tlut: torch.Tensor) -> torch.Tensor:
    """HYB (§2.3): fp16 [..., 2] of int states [...] with the layer's table tlut fp16 [512, 2]."""
    idx, sign = hyb_index_sign(states)
    vals = tlut.to(states.device, torch.float16)[idx]  # [..., 2]
    bits = vals.view(torch.int16).to(torch.int32)
    flip = torch.zeros_like(bits)
    flip[..., 0] = sign.to(torch.int32) << 15
    bits = bits ^ flip  # XOR 0x8000 into element 0
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.float16)


def decode_states(code: str, states: torch.Tensor, tlut: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp16 [..., V] values of int states [...] under ``code``."""
    if code == "1mad":
        return decode_1mad(states).unsqueeze(-1)
    if code == "3inst":
        return decode_3inst(states).unsqueeze(-1)
    if code == "hyb":
        if tlut is None:
            raise QCompileError("the HYB code needs its lookup table (tlut fp16 [512, 2])")
        return decode_hyb(states, tlut)
    raise QCompileError(f"unknown trellis code {code!r}; choose one of {', '.join(CODES)}")


@functools.lru_cache(maxsize=8)
def _fixed_codebook(code: str, device: str) -> torch.Tensor:
    return decode_states(code, torch.arange(1 << L_BITS, device=device))


def codebook(code: str, tlut: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """fp16 [2^16, V]: the value(s) of every state (cached for the table-free codes)."""
    dev = torch.device(device) if device is not None else (tlut.device if tlut is not None else torch.device("cpu"))
    if code == "hyb":
        return decode_states(code, torch.arange(1 << L_BITS, device=dev), tlut)
    return _fixed_codebook(code, str(dev)).clone()


# --- the HYB table: k-means on Gaussian samples ------------------------------------------------------
KMEANS_SAMPLES = 1 << 18   # the reference uses 2^20 (scipy); 2^18 = 512 samples per centre
KMEANS_ITERS = 100
KMEANS_SEED = 0


def kmeans_tlut(n_samples: int = KMEANS_SAMPLES, iters: int = KMEANS_ITERS, seed: int = KMEANS_SEED,
                Q: int = Q_BITS) -> torch.Tensor:
    """The default HYB table (§2.3): Lloyd's k-means with 2^Q centres on ``n_samples`` i.i.d. N(0, I₂)
    samples, started from randn(2^Q, 2) (both drawn from one CPU generator seeded with ``seed``),
    ``iters`` iterations (an empty cluster keeps its centre), then rescaled so that the std of all
    entries is √(15/16) (torch's unbiased std), rounded to fp16. float64 and no threaded reductions,
    so the result is deterministic. The shipped default (``default_tlut``) is this function at the
    default arguments (2^18 samples; the reference uses 2^20 with scipy, ~4× more than 2 CPU cores
    do in reasonable time; the MSE difference is small, see tests/test_trellis.py)."""
    gen = torch.Generator().manual_seed(int(seed))
    k = 1 << Q
    X = torch.randn(int(n_samples), 2, generator=gen, dtype=torch.float64)
    C = torch.randn(k, 2, generator=gen, dtype=torch.float64)
    chunk = 1 << 14
    assign = torch.empty(X.shape[0], dtype=torch.int64)
    for _ in range(int(iters)):
        for a in range(0, X.shape[0], chunk):
            xs = X[a:a + chunk]
            # elementwise squared distances (no BLAS: its summation order varies between CPUs)
            d = (xs[:, None, 0] - C[None, :, 0]).square_()
            d += (xs[:, None, 1] - C[None, :, 1]).square_()
            assign[a:a + chunk] = d.argmin(dim=1)
        counts = torch.bincount(assign, minlength=k).to(torch.float64)
        sums = torch.stack([torch.bincount(assign, weights=X[:, i], minlength=k) for i in range(2)], dim=1)
        C = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], C)
    C = C * (HYB_STD / C.std())
    return C.to(torch.float16)


# the output of kmeans_tlut() (fp16 bit patterns, row-major [512, 2]); see test_trellis.py (slow)
_DEFAULT_TLUT_HEX = """
b8b93ababd4bbf81bd8eb99f3842b873b441b8c23438ae66b8bfb97cbc8cb40b380cbc77bf19b919b7abb79e30ff3de7
b8b7b4bc307db6e9be773b4ca55f3592b6042fe9b69b33983c8b20babed4b5a63c2f38c23f903672bb5baf44b9293fe2
bd1d361c3ee839aa3cf5b3dc3600b9bcbef22fa6b85dbba8ba343c9b3dc5bc61bb6cb936b5903a63b3c4b0513e833726
3c52bdb03d383dc42df234c2bb6134273e2db9fcb83c34363679bddd396a3b51b8d4b6e63579bae2376cb77fb4ad3b86
bb123a02b30ab9dbbbc7b41db871a9cd9182bdf3bbcc41053b7d39b73a0bbb0db9e93a33b801bec630553c0bb1683c4a
b6aeb16dbc32b85d3c52b127b101b818c00c3e49396dc10434649b1838e9b7693791ba57b7b23eedbbb03c48b70035c2
b282c0b49901a478c0d3b63b3e7f3d1c37963eb13c4a3d2231c437bf3d3f3ca43ca2b84c3aed3d7cbc40aedab1e63286
be6dbd0c3eb1bd33b214bdfc39d53ceb3bdea5e8bc1abdd53ddf345cbe32b84bbdbb3c403d3c3b20c11ebbab30123d35
3b47b12cbaa7243635983af3bbd13e6bad60bc03257939423cc73f4fbef8bbb1aa073e6a36bbb8e6276130ec3c5cc074
bc5f353c36b338c5b41cbeddb889ba8839c53f17b936bcf9bf444074391a3a3140053fd93216b553b79037ce37b9409f
b157bafb3b9c37523a47b91a3323b821b0fe38413dccb2b8b8b02c54bcf73e12ad1e31afc15b3c9a3145c08a34c42e1b
3925bda5bdbfbc073c043057361627d52c1abbb339873921bf2db037bd472c07ba43be543c90bbd3401bb927b6aa3d2d
b7853a1839bc299eb5f0b681c00ead6ab3033511391f33fc34c8392aac923d983af5b9fe3b3d41763aab38afb59223b7
b34dbc05bc0f3fd53421b6c9b959c1a03539b1c73dde28b6b76a29b532e8305b3ca8b9e5b942b86fb0b1b8f23857b982
37d12d0b1944bd1c2dc8405a3a83b472bc0abac4b4d2bd46af1a348f3efebb7c3198be52b750b9c9b9c438b323d1b00a
bd4e3ac63982ac5b2d55b556bbd1bc07b064b491ba723b7f3c753c0838bd2027bbdc3b0b319e2adab3a79979b4654004
368635f6a9b73769bf143cd438efbe8a357cb8201a2833e43720b0cda920baea298db37fb16bac5db62fbc043930b47c
3a3e3c17b83d3c85bc8d297eb136bc9a33c53a20b6de40b63d81378bb80230e3b8eb3970b83fb8adbee13930ab703a1d
324a33fdb0d12dff3870aefd3a523a38379aa8533d292fb0b955ae653968bccf346b3853bbd52648bf1236a6bd9c342c
3ecc31ae3dd4397b3cd4bcd6bcbbbc17be062dd1b98d216939eab80328473f73bdf5b50139b6b5f7b670b8df3b56bb9b
34c232b9be43ba52b80c38f3b96eb2d9bc9a3a4fb6d9badfb0703664b4272f1f3bfab91bbad6b5b2ba9ebb7839e13116
b8d1381fba68356aba8e37ab3d004070c034b9f8be50352c3a5abc4c39643e12b4c2330036e03c8e3be0bc9141423a39
3df1b7de3e3e3baa407734a2b9b9b5482f09b05930f3bd8fa893b527b4103ee63c3d35823819bf633b6734bd3272bb10
bcf4bab8b5713c693d0434e3c003bcb92d6eb8352fdf31733f08b884b98dbae7bdda3804b5b83790bc0f3d30bbf03827
b557b9d5b3a03d05b7cab5c5b8e2c07035d1acdf34b435193ad7b65b38503d43be5dae3f2e0a3a233bd93e5fbce8b8d1
b4023706b4743986b613b4c03eaead793c0fba89baa8bd432b19b8ffaca1bfeca0a041643102bc3a3a814011bb0a308c
3afa31ed364b3de5bc363948b53535633fd0283bb9e92f82b34cb3fc3d23ad223a8abfb4b808bc713adcbd433ade2c03
ba60b8a3366d37cac1b12f1e3973380facd3ae163825b3a8b9d1bf7fbd123ce93945361235f8beae3bc6b4b4b0a0b18f
3870b5df37afbd224144a0c23d52bb01b159b61b3c46bef13f67bea1baadbc86b93234e0b7b3b3e43c77b5b3410fba12
bdcf3f6b254bba003a3434a536313fc73a7336d4ba4b3d8dbc25bcdbb98636b5bc60b9a8bda0af76aa80389cc0173885
2c713843336d3eb83715b560bb8f3646b971bc3337eb3badbef4be71b637bdf738ca3c6434fb3c03aac7b2c12cee36a4
3e653eb634deb54a3d75bf47acd33cd53d50b91cb5afb81835f2b69231fd35e13c0bb765b9d83e9131e0aa9dbefcc056
384437253e91b55034a236ca40dabd89ba9ab353bc1bb6453281b138bca73c1ebcdc325dbffe33bb3053b9bd3f10c084
bd1838ee3b663c74bd4ebdffb75e3b9da885b834be223da140443d5eb8713637383b397ba8672d1b3404b3f02651b6ba
3987b9e638c4bac031403915bfe8b6824017bc87b515b2ae2debc1b23432bbf73acfbe4eb9c6b9a03620bc183633b40c
b86bb11bb4adbaf5bc0fbf033d7fbdd5bd24bcebb8103df431a5b8e82e08a8113b08b858365230aa34c9bd46c0633c20
bd3bb462a701becfb40cb753390dbc0bb0013b4db436388caede20ec313cbccf3834352eb0b4394bb90031b9b63138f8
3920b1913414b9fd364939d3c0d237d43b6f3b34bacdba29407cb32e3865387e32a2bf7f3070b39fb52fbc9aba48aec0
ba03335ea4c23c1ab049bd48b9323bf53819327b25d43b10aecab9ffbc9737c8b550ad9a3caf3749b49d3de3c0a82d03
368034373d3bb68fbc2f317138d73009baf838dc31f43b18c098be2b1dc6bc76353e3d33a945b92d3c813247349fb900
b771bd1f2cb12c14b603bfea33c93c9438073a963c673a60b8ddbdcdbcc3b6bdbcedae443f623c27b9f6b740bd70b78c
ad30b6ba381bc047b8f83d2a3ce539303a9eaad43a17b1bbbdee39ad3fa4b467b26b3a6bbb2ab7c5bf953b22402e39d2
b457b5703548bca42e79bab5bc32c080b715ac423930b8cb2ca03c9e37c2bb81
"""


@functools.lru_cache(maxsize=1)
def _default_tlut_cpu() -> torch.Tensor:
    raw = bytes.fromhex("".join(_DEFAULT_TLUT_HEX.split()))
    words = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 2).to(torch.int64)
    u = (words[:, 0] << 8) | words[:, 1]  # big-endian hex: stable across hosts
    return _u16_to_f16(u).view(1 << Q_BITS, 2).clone()


def default_tlut(device=None) -> torch.Tensor:
    """The default per-layer HYB table: fp16 [512, 2] (a copy; see ``kmeans_tlut``)."""
    t = _default_tlut_cpu().clone()
    return t if device is None else t.to(device)


# --- bitstreams ------------------------------------------------------------------------------------------
def _check_stream(L: int, KV: int, S: int) -> None:
    if not (1 <= KV < L <= 16):
        raise QCompileError(f"unsupported trellis: L={L} state bits and K·V={KV} bits per step "
                            f"(need 1 ≤ K·V < L ≤ 16)")
    if S * KV < L:
        raise QCompileError(f"a tail-biting stream of {S} steps × {KV} bits is shorter than one state (L={L})")


def states_to_words(states: torch.Tensor, L: int, KV: int) -> torch.Tensor:
    """Pack tail-biting state paths [..., S] into MSB-first 16-bit words int16 [..., ⌈S·KV/16⌉]:
    the stream is the concatenation of every state's top KV bits (zero-padded to whole words)."""
    S = states.shape[-1]
    _check_stream(L, KV, S)
    top = (states.to(torch.int64) >> (L - KV)) & ((1 << KV) - 1)
    shifts = torch.arange(KV - 1, -1, -1, device=states.device)
    bits = ((top.unsqueeze(-1) >> shifts) & 1).reshape(*states.shape[:-1], S * KV)
    pad = (-S * KV) % 16
    if pad:
        bits = torch.cat([bits, bits.new_zeros(*bits.shape[:-1], pad)], dim=-1)
    bits = bits.reshape(*bits.shape[:-1], -1, 16)
    weights = torch.tensor([1 << (15 - i) for i in range(16)], dtype=torch.int64, device=states.device)
    u = (bits * weights).sum(-1)
    return torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16)


def words_to_bits(words: torch.Tensor) -> torch.Tensor:
    """int16 MSB-first words [..., W] -> bits uint8 [..., 16·W]."""
    u = words.to(torch.int64) & 0xFFFF
    shifts = torch.arange(15, -1, -1, device=words.device)
    return ((u.unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(*words.shape[:-1], -1)


def words_to_states(words: torch.Tensor, S: int, L: int, KV: int) -> torch.Tensor:
    """States int64 [..., S] of streams [..., W] int16: state t = bits [t·KV, t·KV + L) of the first
    S·KV stream bits, read circularly."""
    _check_stream(L, KV, S)
    nbits = S * KV
    if words.shape[-1] * 16 < nbits:
        raise QCompileError(f"{words.shape[-1]} words hold fewer than the {nbits} stream bits of {S} states")
    dev = words.device
    p = torch.arange(S, device=dev) * KV
    if nbits == words.shape[-1] * 16:  # whole words: two-word windows (the kernels' arithmetic)
        u = words.to(torch.int64) & 0xFFFF
        w = p >> 4
        hi = u[..., w]
        lo = u[..., (w + 1) % words.shape[-1]]
        return (((hi << 16) | lo) >> (32 - L - (p & 15))) & ((1 << L) - 1)
    bits = words_to_bits(words)[..., :nbits].to(torch.int64)
    idx = (p[:, None] + torch.arange(L, device=dev)[None, :]) % nbits  # [S, L]
    weights = torch.tensor([1 << (L - 1 - i) for i in range(L)], dtype=torch.int64, device=dev)
    return (bits[..., idx] * weights).sum(-1)


# --- in-tile orders ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _order_cpu(order: str) -> torch.Tensor:
    p = torch.arange(TILE_WEIGHTS)
    if order == "row":
        return p
    if order == "mma":  # §1.4(a): p = 8·lane + 2·j + v
        lane, j, v = p >> 3, (p >> 1) & 3, p & 1
        row = (lane >> 2) + 8 * (j & 1)
        col = 2 * (lane & 3) + 8 * (j >> 1) + v
        return row * TILE + col
    raise QCompileError(f"unknown in-tile order {order!r}; choose one of {', '.join(ORDERS)}")


def tile_order(order: str, device=None) -> torch.Tensor:
    """int64 [256]: sequence position p -> tile element row·16 + col."""
    t = _order_cpu(order)
    return t if device is None else t.to(device)


# --- packings -----------------------------------------------------------------------------------------------
def _check_kernel_shape(n: int, k: int) -> None:
    if n % 32 or k % 32:
        raise QCompileError(f"the kernel packing interleaves 2×2 tiles: both dims must be multiples of 32, "
                            f"got {n}x{k}")


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    u = words.to(torch.int64) & 0xFFFF
    return torch.stack([u >> 8, u & 0xFF], dim=-1).reshape(*words.shape[:-1], -1)  # MSB-first byte order


def pack_kernel(streams: torch.Tensor, n: int, k: int, K: int) -> torch.Tensor:
    """Tile streams int16 [(n/16)(k/16), 16K] (tile (I, J) at row I·(k/16) + J, MSB-first words) ->
    the kernel packing (§1.4 b, c), same shape and dtype: per 32×32 super-tile (row-major) and lane ℓ,
    the four tiles' K-byte chunks (m-subtile fastest), each chunk byte-reversed; the int16 words are
    little-endian pairs of those bytes."""
    _check_kernel_shape(n, k)
    ti, tj = n // TILE, k // TILE
    b = _words_to_bytes(streams).view(ti // 2, 2, tj // 2, 2, 32, K)  # [I2, a, J2, b, lane, byte]
    b = b.flip(-1).permute(0, 2, 4, 3, 1, 5).reshape(-1, 2)           # [I2, J2, lane, b, a, K] bytes
    u = b[:, 0] | (b[:, 1] << 8)                                        # little-endian int16 words
    return torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16).view(ti * tj, 16 * K)


def unpack_kernel(packed: torch.Tensor, n: int, k: int, K: int) -> torch.Tensor:
    """Inverse of ``pack_kernel``: kernel-packed int16 -> tile streams int16 [(n/16)(k/16), 16K]."""
    _check_kernel_shape(n, k)
    ti, tj = n // TILE, k // TILE
    u = packed.to(torch.int64).reshape(-1) & 0xFFFF
    b = torch.stack([u & 0xFF, u >> 8], dim=-1).view(ti // 2, tj // 2, 32, 2, 2, K)  # [I2, J2, lane, b, a, K]
    b = b.flip(-1).permute(0, 4, 1, 3, 2, 5).reshape(ti * tj, 16 * K, 2)             # [I2, a, J2, b, lane, K]
    w = (b[..., 0] << 8) | b[..., 1]
    return torch.where(w >= 0x8000, w - 0x10000, w).to(torch.int16)


# --- the formats ----------------------------------------------------------------------------------------------
def _layout_of(order: str, packing: str) -> str:
    for name, pair in LAYOUTS.items():
        if pair == (order, packing):
            return name
    return f"{order}-{packing}"


class TrellisFormat(Format):
    """qtip-{code}-{K} (see the module doc). ``order``/``packing`` default to the code's stored
    layout; other pairs make unregistered variants named ``qtip-{code}-{K}@{order}-{packing}``."""

    always_rht = True

    decode_unit = 16  # one tile row: 16 consecutive input columns of one output row
    streamed = ("trellis",)

    def __init__(self, code: str, K: int, order: Optional[str] = None, packing: Optional[str] = None):
        if code not in CODES:
            raise QCompileError(f"unknown trellis code {code!r}; choose one of {', '.join(CODES)}")
        if K not in BITS:
            raise QCompileError(f"unsupported bits per weight K={K} for qtip-{code}; choose one of "
                                f"{', '.join(map(str, BITS))}")
        d_order, d_packing = LAYOUTS[DEFAULT_LAYOUT[code]]
        order = order or d_order
        packing = packing or d_packing
        if order not in ORDERS:
            raise QCompileError(f"unknown in-tile order {order!r}; choose one of {', '.join(ORDERS)}")
        if packing not in PACKINGS:
            raise QCompileError(f"unknown packing {packing!r}; choose one of {', '.join(PACKINGS)}")
        self.code, self.K, self.V, self.L = code, int(K), CODES[code], L_BITS
        self.KV = self.K * self.V
        self.gemv_tile = (2 * TILE, 2) if packing == "kernel" else (TILE, 1)
        self.S = TILE_WEIGHTS // self.V
        self.order, self.packing = order, packing
        self.layout = _layout_of(order, packing)
        self.base_name = f"qtip-{code}-{K}"
        self.is_default_layout = (order, packing) == (d_order, d_packing)
        self.name = self.base_name if self.is_default_layout else f"{self.base_name}@{order}-{packing}"

    # --- shapes ---------------------------------------------------------------------------------------
    def check_shape(self, n: int, k: int) -> None:
        if n <= 0 or k <= 0:
            raise QCompileError(f"{self.name}: weight shape {n}x{k} is empty")
        if n % TILE or k % TILE:
            raise QCompileError(f"{self.name}: both dims must be multiples of the 16x16 trellis tile, got {n}x{k}")
        if self.packing == "kernel" and (n % 32 or k % 32):
            raise QCompileError(f"{self.name}: the kernel layout interleaves 2x2 tiles, so both dims must be "
                                f"multiples of 32, got {n}x{k}")

    def tensor_specs(self, n: int, k: int) -> Dict[str, TensorSpec]:
        self.check_shape(n, k)
        if self.packing == "kernel":  # one row per 32x32 super-tile: 4 tiles' streams, lane-interleaved
            specs = {"trellis": TensorSpec((n // (2 * TILE), k // (2 * TILE), 4 * TILE * self.K), "int16")}
        else:
            specs = {"trellis": TensorSpec((n // TILE, k // TILE, TILE * self.K), "int16")}
        if self.code == "hyb":
            specs["tlut"] = TensorSpec((1 << Q_BITS, 2), "float16")
        return specs

    # --- layouts -----------------------------------------------------------------------------------------
    def variant(self, order: Optional[str] = None, packing: Optional[str] = None) -> "TrellisFormat":
        return variant(self.base_name, order or self.order, packing or self.packing)

    def layout_variant(self, layout: str) -> "TrellisFormat":
        """``formats.get("qtip-<code>-<K>@<order>-<packing>")``: the variant (``trellis_format``)."""
        return trellis_format(f"{self.base_name}@{layout}")

    def streams(self, qw: QuantizedWeight) -> torch.Tensor:
        """Tile streams int16 [(N/16)(k/16), 16K] (tiles row-major, MSB-first words) of a stored weight."""
        n, k = qw.shape
        t = qw.tensors["trellis"].reshape((n // TILE) * (k // TILE), TILE * self.K)
        return unpack_kernel(t, n, k, self.K) if self.packing == "kernel" else t

    def pack_streams(self, streams: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """Tile streams [(N/16)(k/16), 16K] -> the stored "trellis" tensor (``tensor_specs`` shape)."""
        t = pack_kernel(streams, n, k, self.K) if self.packing == "kernel" else streams
        return t.reshape(self.tensor_specs(n, k)["trellis"].shape).contiguous()

    def states(self, qw: QuantizedWeight) -> torch.Tensor:
        """Trellis states int64 [(N/16)(k/16), S] of a stored weight (tiles row-major)."""
        return words_to_states(self.streams(qw), self.S, self.L, self.KV)

    # --- quantize ----------------------------------------------------------------------------------------
    def codebook(self, tlut: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
        return codebook(self.code, tlut, device)

    def quantize(self, W: torch.Tensor, hessian: Optional[torch.Tensor] = None, seed: int = 0,
                 scale: Optional[float] = None, rht: bool = True, ldlq: Optional[bool] = None,
                 sigma: float = 1e-2, memory_budget: Optional[int] = None,
                 viterbi_engine: str = "auto") -> QuantizedWeight:
        """W float [N, k] -> QuantizedWeight, always in the RHT basis (``rht`` is ignored; see the
        module doc). ``scale`` = ρ (default 0.9): the quantizer input has RMS ρ·rms(codebook).
        ``hessian`` + ``ldlq`` (default: on with a Hessian): BlockLDLQ with 16-column blocks.
        ``memory_budget``: bytes of Viterbi working memory; ``viterbi_engine``: "auto", "torch",
        "tir" or "tir-min" (both: qcompile.formats.viterbi)."""
        from ..quant.hessian import damp
        from ..quant.ldlq import block_ldlq

        try:
            rho = DEFAULT_SCALE if scale is None else float(scale)
        except (TypeError, ValueError):
            rho = float("nan")
        if not (math.isfinite(rho) and rho > 0):
            raise QCompileError(f"{self.name}: scale must be a positive finite RMS factor (default "
                                f"{DEFAULT_SCALE}), got {scale}")
        W_work, H, aux, use_ldlq = self.prepare_input(W, hessian, seed, True, ldlq)
        n, k = W_work.shape
        dev = W_work.device
        tlut = default_tlut(dev) if self.code == "hyb" else None
        cb16 = self.codebook(tlut, dev)
        cb = cb16.to(torch.float32)
        rms_cb = float(cb.pow(2).mean().sqrt())
        rms_w = float(W_work.pow(2).mean().sqrt())
        if rms_w > 0:
            sv16 = torch.tensor(RUNTIME_SCALE * rms_w / (rms_cb * float(rho)), dtype=torch.float16)
            if not bool(torch.isfinite(sv16)) or float(sv16) == 0.0:
                raise QCompileError(f"{self.name}: the layer scale {rms_w / (rms_cb * rho):.3g} does not fit fp16; "
                                    f"rescale the weight")
            wscale = float(sv16) / RUNTIME_SCALE
            X = W_work / wscale
        else:  # an all-zero weight: SV = 0 makes it exact whatever the trellis holds
            sv16, wscale = torch.tensor(0.0, dtype=torch.float16), 0.0
            X = W_work
        perm = tile_order(self.order, dev)
        enc = _TileEncoder(self, cb, perm, memory_budget, viterbi_engine)
        if use_ldlq:
            result = block_ldlq(X, damp(H, sigma).to(dev), TILE, enc.round_block)
            states = torch.stack(result.states, dim=1)  # [N/16, k/16, S]
        else:
            tiles = X.view(n // TILE, TILE, k // TILE, TILE).permute(0, 2, 1, 3).reshape(-1, TILE_WEIGHTS)
            states = enc.encode(tiles)[0].view(n // TILE, k // TILE, self.S)
        streams = states_to_words(states.reshape(-1, self.S), self.L, self.KV)
        tensors = {"trellis": self.pack_streams(streams, n, k)}
        if tlut is not None:
            tensors["tlut"] = tlut.contiguous()
        tensors["SU"] = (aux["SU"].to(torch.float32) / RUNTIME_SCALE).to(torch.float16)
        tensors["SV"] = (aux["SV"].to(torch.float32) * float(sv16)).to(torch.float16)
        meta = {"code": self.code, "K": self.K, "V": self.V, "L": self.L, "layout": self.layout,
                "scale": float(rho), "wscale": wscale, "runtime_scale": RUNTIME_SCALE, "rht": True}
        if self.code == "hyb":
            meta["tlut_bits"] = Q_BITS
        qw = QuantizedWeight(self.name, (n, k), tensors, meta)
        if H is not None:
            meta["ldlq"] = use_ldlq
            W_hat = self.decode_fp16(qw).to(torch.float32) * wscale
            meta["proxy_loss"] = self.relative_proxy_loss(W_work, W_hat, H)
        return qw

    # --- decode (torch reference) ----------------------------------------------------------------------
    def random_weight(self, n: int, k: int, seed: int = 0, device=None) -> QuantizedWeight:
        """Random stream words (every bit stream is a valid tail-biting trellis walk), the default
        tlut (HYB), SU = ±1/32 and SV = ±32 as the runtime scale folds them."""
        self.check_shape(n, k)
        gen = torch.Generator().manual_seed(int(seed))
        words = torch.randint(-2**15, 2**15, self.tensor_specs(n, k)["trellis"].shape, generator=gen, dtype=torch.int32)
        tensors = {"trellis": words.to(torch.int16)}
        if self.code == "hyb":
            tensors["tlut"] = default_tlut()
        tensors.update(self._random_rht(n, k, gen, su=1.0 / RUNTIME_SCALE, sv=float(RUNTIME_SCALE)))
        qw = QuantizedWeight(self.name, (n, k), tensors, {"rht": True, "random": True,
                                                          "runtime_scale": RUNTIME_SCALE})
        return qw.to(device) if device is not None else qw

    def decode_fp16(self, qw: QuantizedWeight) -> torch.Tensor:
        self.check_qweight(qw)
        n, k = qw.shape
        states = self.states(qw)
        vals = decode_states(self.code, states, qw.tensors.get("tlut")).reshape(-1, TILE_WEIGHTS)
        tiles = torch.empty_like(vals)
        tiles[:, tile_order(self.order, vals.device)] = vals
        return tiles.view(n // TILE, k // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(n, k)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """float32 [N, k] in the original basis: SV ⊙ U·decode_fp16·Uᵀ ⊙ SU (Wscale and the ×32 live in SV/SU)."""
        return self.undo_rht(qw, self.decode_fp16(qw).to(torch.float32))

    # --- TIR ---------------------------------------------------------------------------------------------
    def _tir_bit_offset(self, r, cc):
        """TIR int32: bit offset (in the tile stream) of the state holding tile element (r, cc), and
        which of the state's V values it is."""
        from tvm import tirx

        fd, fm = tirx.floordiv, tirx.floormod
        if self.order == "row":
            p = r * TILE + cc
        else:  # mma: the inverse of §1.4(a)
            lane = 4 * fm(r, 8) + fd(fm(cc, 8), 2)
            j = fd(r, 8) + 2 * fd(cc, 8)
            p = 8 * lane + 2 * j + fm(cc, 2)
        if self.V == 1:
            return p * self.K, 0
        return fd(p, 2) * self.KV, fm(cc, 2)

    def _tir_window(self, T, n, c, p0):
        """TIR uint32: the 16-bit window at bit p0 of tile (n // 16, c)'s circular stream."""
        from tvm import tirx

        fd, fm = tirx.floordiv, tirx.floormod
        u32 = lambda e: tirx.Cast("uint32", e)  # noqa: E731
        c32 = lambda v: tirx.const(v, "uint32")  # noqa: E731
        I = fd(n, TILE)
        words = TILE * self.K
        if self.packing == "tiles":
            w = fd(p0, 16)
            hi = u32(tirx.Cast("uint16", T[I, c, w]))
            lo = u32(tirx.Cast("uint16", T[I, c, fm(w + 1, words)]))
            both = tirx.bitwise_or(tirx.shift_left(hi, c32(16)), lo)
            # (the & 31 changes no valid shift, 1..16; it keeps constant folding of unreachable index
            # values that tensor-core rewrites create from casting a negative number to uint32)
            return tirx.bitwise_and(tirx.shift_right(both, u32(tirx.bitwise_and(16 - fm(p0, 16), 31))), c32(0xFFFF))
        # kernel packing: three stream bytes q0..q0+2, each at its byte-reversed, interleaved address
        # in the super-tile's row T[I // 2, c // 2, :] (lane-major, then tile column b, row a)
        K = self.K

        def byte(q):
            q = fm(q, words * 2)
            addr = (fd(q, K) * 4 + fm(c, 2) * 2 + fm(I, 2)) * K + (K - 1 - fm(q, K))
            word = u32(tirx.Cast("uint16", T[fd(I, 2), fd(c, 2), fd(addr, 2)]))
            return tirx.bitwise_and(tirx.shift_right(word, u32(8 * fm(addr, 2))), c32(0xFF))

        q0 = fd(p0, 8)
        three = tirx.bitwise_or(tirx.bitwise_or(tirx.shift_left(byte(q0), c32(16)),
                                                tirx.shift_left(byte(q0 + 1), c32(8))), byte(q0 + 2))
        return tirx.bitwise_and(tirx.shift_right(three, u32(tirx.bitwise_and(8 - fm(p0, 8), 31))), c32(0xFFFF))

    # The stored layouts decode through a gather stage: per unit (one tile row) a few 32-bit slices
    # of the tile stream, in registers, from which every window of the row is one shift and mask;
    # all of the row's position dependence (which words, the wrap of row 15, HYB's half-row offset)
    # lives in the gather, so the decode of a unit is the same for every row and a CUDA intrinsic
    # can replace it. Other (order, packing) variants use the direct window expression.
    @property
    def gather_count(self) -> int:
        if not self.is_default_layout:
            return 0
        return self.K if self.V == 1 else 8

    # HYB in the kernel layout: the table lookups live in the gather stage, one 32-bit word per state
    # from a uint32 copy of the table (tir_tables), so the decode only splits words into fp16 halves.
    def tir_tables(self, bufs: Mapping[str, object], lane_copies: int = 0,
                   signed: bool = False) -> Dict[str, object]:
        """HYB (stored layout): "tlut32" uint32 [512] (stage W_table: tlut[e, 1] in the high half,
        tlut[e, 0] in the low half, the bits unchanged) and "tlut32_lanes" uint32 [512, copies]
        (stage W_table_lanes: ``lane_copies`` copies of tlut32, default LUT_COPIES; entry-major, so
        that copy r of entry e sits in bank (e·copies + r) % 32: with 32 copies a warp's lookups never
        meet in a bank, with 16 lanes l and l + 16 share one). The gather reads copy lut_copy(c) of
        tlut32_lanes; a schedule that inlines W_table_lanes reads tlut32 (one table), one that
        inlines both reads tlut (two 16-bit loads per state, the old form).
        ``signed``: both tables with 1024 entries, entry e + 512 being entry e with value 0's sign
        flipped (``SIGNED_ENTRIES``): indexed by h's bits 6..15, the sign flip is in the table, not
        an instruction per state (twice the shared memory)."""
        if self.code != "hyb" or not self.gather_count:
            return {}
        from tvm import te, tirx

        copies = lane_copies or LUT_COPIES
        if copies not in (16, 32):
            raise ValueError(f"{self.name}: {copies} table copies; use 16 (32 KiB) or 32 (64 KiB, bank-conflict free)")
        tlut = bufs["tlut"]
        if signed:  # entry e + 512: entry e with bit 15 (value 0's sign) flipped
            entries = SIGNED_ENTRIES
            t32 = te.compute((entries,), lambda e: tirx.bitwise_xor(
                _tir_tlut32(tlut, tirx.floormod(e, 1 << Q_BITS)),
                tirx.shift_left(tirx.Cast("uint32", tirx.floordiv(e, 1 << Q_BITS)), tirx.const(15, "uint32"))),
                name="W_table")
        else:
            entries = 1 << Q_BITS
            t32 = te.compute((entries,), lambda e: _tir_tlut32(tlut, e), name="W_table")
        lanes = te.compute((entries, copies), lambda e, r: t32[e], name="W_table_lanes")
        return {"tlut32": t32, "tlut32_lanes": lanes}

    @property
    def slice_count(self) -> int:
        """HYB (stored layout): the gather's 4 stream slices per unit as their own stage (W_slice), so
        that each is computed once, not once per table word (nvcc does not merge the copies for K=3)."""
        return 4 if self.V == 2 and self.gather_count else 0

    def tir_slice(self, bufs: Mapping[str, object], n, c, g):
        return self._hyb_slice(bufs, n, c, g)

    @staticmethod
    def _lane_copies(bufs: Mapping[str, object]) -> int:
        """How many table copies the W_table_lanes stage in ``bufs`` holds (its second axis)."""
        return int(bufs["tlut32_lanes"].shape[1]) if "tlut32_lanes" in bufs else LUT_COPIES

    def _hyb_lut_copy(self, c, copies: int = LUT_COPIES):
        """The table copy unit column c reads: in the GEMV schedule units c = (step, threadIdx.x,
        chunk) with chunks = gemv_tile[1] per thread, so with threads_k >= 32 the copy is the lane
        (threadIdx.x % LUT_COPIES): with 16 copies a warp's lookups meet at most two to a bank (32
        copies would be conflict-free but need 64 KiB, over what a launch gets). (Any copy holds the
        same words, so another config only gets more bank conflicts, never other values.)"""
        from tvm import tirx

        return tirx.floormod(tirx.floordiv(c, self.gemv_tile[1]), copies)

    def _hyb_lut_word(self, bufs: Mapping[str, object], idx, c, copy=None):
        """uint32 table word of entry idx: from the lane copies (copy ``copy``, default the GEMV's
        ``_hyb_lut_copy(c)``), the uint32 table, or tlut itself."""
        if "tlut32_lanes" in bufs:
            lanes = bufs["tlut32_lanes"]
            return lanes[idx, self._hyb_lut_copy(c, self._lane_copies(bufs)) if copy is None else copy]
        if "tlut32" in bufs:
            return bufs["tlut32"][idx]
        return _tir_tlut32(bufs["tlut"], idx)

    def _hyb_slice(self, bufs: Mapping[str, object], n, c, g):
        """HYB (kernel layout) uint32 stream slice g (0..3) of unit (n, c): row r = 8h + q of a tile
        uses lanes 4q..4q+3 (and the lookahead of lane 4q+4); slice g = the 32 stream bits from bit
        h·KV of lane 4q+g's chunk, so the row's states of lane 4q+g are the windows at bits 0 and
        2·KV (columns 2g, 2g+1 and 2g+8, 2g+9)."""
        from tvm import tirx

        fd, fm = tirx.floordiv, tirx.floormod
        T = bufs["trellis"]
        I, r = fd(n, TILE), fm(n, TILE)
        K = self.K
        u64 = lambda e: tirx.Cast("uint64", e)  # noqa: E731
        c64 = lambda v: tirx.const(v, "uint64")  # noqa: E731
        h, q = fd(r, 8), fm(r, 8)
        a, b = fm(I, 2), fm(c, 2)

        def chunk(lane):
            """Lane ``lane``'s K stream bytes as a big-endian integer: the packing stores them
            byte-reversed, so they read as a little-endian integer at byte (lane·4 + b·2 + a)·K."""
            base = (fm(lane, 32) * 4 + b * 2 + a) * K
            val = None
            for i in range(K):
                addr = base + i
                byte = tirx.bitwise_and(tirx.shift_right(u64(tirx.Cast("uint16", T[fd(I, 2), fd(c, 2), fd(addr, 2)])),
                                                         u64(8 * fm(addr, 2))), c64(0xFF))
                term = tirx.shift_left(byte, c64(8 * i))
                val = term if val is None else tirx.bitwise_or(val, term)
            return val

        lane = 4 * q + g
        z = tirx.bitwise_or(tirx.shift_left(chunk(lane), c64(8 * K)), chunk(lane + 1))  # 16K stream bits
        return tirx.Cast("uint32", tirx.shift_right(tirx.shift_left(z, u64(h * self.KV)), c64(16 * K - 32)))

    def tir_gather(self, bufs: Mapping[str, object], n, c, g):
        """uint32 gathered word g of unit (n, c).
        generic (row order, V=1): the row's stream starts at word r·K of its tile; slice g = stream
          words r·K + g and r·K + g + 1 (circular), so state j's window sits at bit j·K of the slices.
        kernel (mma order, V=2, HYB): word g = 4t + l (t = 0, 1; l = 0..3) is the table word of the
          row's state t of lane 4q+l (_hyb_slice: the window at bit 2·KV·t of slice l), i.e. of
          columns 2l + 8t and 2l + 8t + 1: tlut32[idx] ^ (h & 0x8000) (low half: value 0 with its
          sign flipped; high half: value 1)."""
        from tvm import tirx

        fd, fm = tirx.floordiv, tirx.floormod
        u32 = lambda e: tirx.Cast("uint32", e)  # noqa: E731
        c32 = lambda v: tirx.const(v, "uint32")  # noqa: E731
        if self.V == 1:
            T = bufs["trellis"]
            I, r = fd(n, TILE), fm(n, TILE)
            words = TILE * self.K
            w = r * self.K + g
            hi = u32(tirx.Cast("uint16", T[I, c, w]))
            lo = u32(tirx.Cast("uint16", T[I, c, fm(w + 1, words)]))
            return tirx.bitwise_or(tirx.shift_left(hi, c32(16)), lo)
        slice_ = bufs["slices"][n, c, fm(g, 4)] if "slices" in bufs else self._hyb_slice(bufs, n, c, fm(g, 4))
        shift = 16 - 2 * self.KV * fd(g, 4)
        # (the & 0xFFFF does not change the result: h mod 2^16 depends only on s mod 2^16 and only h's bits
        # 6..15 are read; but with it nvcc narrows the K=3 slices' 64-bit shifts to 32 bits)
        s = tirx.bitwise_and(tirx.shift_right(slice_, tirx.Cast("uint32", tirx.bitwise_and(shift, 31))), c32(0xFFFF))
        return self._hyb_state_word(bufs, s, c)

    def _hyb_state_word(self, bufs: Mapping[str, object], s, c, copy=None, mask_first=False):
        """HYB: uint32 half2 word of state s (uint32 expr; h's bits 6..15 depend only on s mod 2^16):
        tlut32[idx] ^ (h & 0x8000) with h = s·(s+1), idx = bits 6..14 of h (low half: value 0, its
        sign flipped by bit 15 of h; high half: value 1). ``c`` / ``copy``: which table copy
        (``_hyb_lut_word``). ``mask_first``: idx as (h & 0x7FC0) >> 6, the same value, which lets nvcc
        fold the shift into the lane copies' 64-byte entry stride; with a ``copy`` of the lane copies,
        their flat index ((h & 0x7FC0) | copy << 2) >> 2 itself (below). With the sign-folded tables
        (``tir_tables(signed=True)``) idx is bits 6..15 (mask 0xFFC0) and the word is the table's."""
        from tvm import tirx

        c32 = lambda v: tirx.const(v, "uint32")  # noqa: E731
        h = s * (s + c32(1))
        signed = _signed_table(bufs)
        index_bits = Q_BITS + 1 if signed else Q_BITS  # (signed: the sign bit 15 is the index's top bit)
        mask = c32(((1 << index_bits) - 1) << (15 - Q_BITS))  # 0x7FC0, signed 0xFFC0
        if mask_first and copy is not None and "tlut32_lanes" in bufs:
            # the lane copies' flat index (h & mask) >> (6 - log2 copies) | copy (entries of
            # `copies` words: idx·copies = (h & 0x7FC0) >> 2 with 16 copies, >> 1 with 32, and the copy
            # fills the low bits), so that the byte address is (h & 0x7FC0) << (log2 copies - 4) |
            # 4·copy and LDS takes it plus the table base (nvcc, 16 copies: two LOP3, where
            # idx·16 + copy took LOP3, LEA.HI and LEA). With 32 copies the index is taken from
            # h << 1 instead, the same bits one place up ((2h & mask << 1) | copy << 2) >> 2: nvcc
            # makes the doubling an IMAD.SHL (the FMA pipe) where the << 1 of the byte address was
            # a LEA, on the ALU pipe that HYB's decode fills (qtip-hyb-2 M=1, 28672x8192, H100 ncu:
            # ALU the busiest pipe, artifacts/bench/ncu-qtip-hyb-2-h100.txt; K-loop SASS, nvcc
            # 13.0: ALU 144 -> 114 instructions, as with 16 copies, FMA 40 -> 75)
            copies = self._lane_copies(bufs)
            shift = 15 - Q_BITS - (copies.bit_length() - 1)  # idx·copies = (h & mask) >> shift
            up = max(0, 2 - shift)
            hh, mm = (tirx.shift_left(h, c32(up)), c32(int(mask.value) << up)) if up else (h, mask)
            flat = tirx.Cast("int32", tirx.shift_right(
                tirx.bitwise_or(tirx.bitwise_and(hh, mm), tirx.shift_left(tirx.Cast("uint32", copy), c32(shift + up))),
                c32(shift + up)))
            word = bufs["tlut32_lanes"][tirx.floordiv(flat, copies), tirx.floormod(flat, copies)]
        else:
            if mask_first:
                idx = tirx.Cast("int32", tirx.shift_right(tirx.bitwise_and(h, mask), c32(15 - Q_BITS)))
            else:
                idx = tirx.Cast("int32", tirx.bitwise_and(tirx.shift_right(h, c32(15 - Q_BITS)), c32((1 << index_bits) - 1)))
            word = self._hyb_lut_word(bufs, idx, c, copy)
        if signed:
            return word
        return tirx.bitwise_xor(word, tirx.bitwise_and(h, c32(0x8000)))

    def tir_decode_unit(self, bufs: Mapping[str, object], n, c, j):
        """fp16 value of weight (n, 16c + j): window → code, from the packed words (and the tlut)."""
        from tvm import tirx

        fd, fm = tirx.floordiv, tirx.floormod
        c32 = lambda v: tirx.const(v, "uint32")  # noqa: E731
        if self.gather_count:
            G = self.gathered(bufs)
            if self.V == 2:  # column j: the table word of state (j // 8, lane j % 8 // 2), half j % 2
                return tir_word_half(G[n, c, fd(j, 8) * 4 + fd(fm(j, 8), 2)], fm(j, 2))
            off = j * self.K  # state j at bit j·K of the slices
            slice_, shift, v = G[n, c, fd(off, 16)], 16 - fm(off, 16), 0
            # (& 31 as in _tir_window: no valid shift changes; tensor-core rewrites fold index values
            # that cannot occur, and a negative one must not reach the uint32 cast)
            s = tirx.bitwise_and(tirx.shift_right(slice_, tirx.Cast("uint32", tirx.bitwise_and(shift, 31))), c32(0xFFFF))
            return _tir_code(self.code, s, v, bufs.get("tlut"))
        T = bufs["trellis"]
        r = tirx.floormod(n, TILE)
        p0, v = self._tir_bit_offset(r, j)
        s = self._tir_window(T, n, c, p0)
        return _tir_code(self.code, s, v, bufs.get("tlut"))

    def unit_reads(self):
        if not self.gather_count:
            raise NotImplementedError(f"{self.name} has no decode intrinsic (the qtip formats in their stored layout have one)")
        return {"gathered": ((1, 1, self.gather_count), "uint32", True)}

    def decode_intrin(self, target_kind: str):
        if target_kind != "cuda" or not self.gather_count:
            return None
        from ..kernels.intrinsics import register_unit_decode

        source = _CUDA_HYB if self.V == 2 else _cuda_trellis_source()
        return register_unit_decode(self, f"qc_qtip_{self.code}_k{self.K}_decode16", source), source

    # --- fragment decode: the kernel layout (HYB's stored one; 1MAD / 3INST as the @mma-kernel variant),
    # whose order is the mma A-fragment order -----------------------------------------------------------
    # (§1.4) Tile (I, J) = 16x16 weights rows 16I.., columns 16J..; its super-tile (I2, J2) = (I // 2,
    # J // 2), sub-tile (a, b) = (I % 2, J % 2). Lane l's 4·K bytes of a super-tile (tensor row
    # trellis[I2, J2, :], int16 words 2K·l .. 2K·l + 2K - 1) hold its K-byte chunks of the four tiles,
    # chunk (a, b) at byte (2b + a)·K. State t = 4l + j (j = 0..3) of a tile is lane l's A register pair
    # j: registers e = 2j, 2j + 1 (row (l >> 2) + 8·(j & 1), columns 2·(l & 3) + 8·(j >> 1) + 0, 1), its
    # window the 16 stream bits from bit 2K·j of lane l's chunk, running into lane l + 1's (lane 31:
    # lane 0's, the tail-bite). So a lane decodes its A registers from its own 4K bytes and the next
    # lane's 4K bytes, nothing else. V=1 (1MAD / 3INST in mma order, one state per position): state
    # p = 8l + e is lane l's register e, its window from bit K·e of lane l's chunk (7K + 16 <= 16K: at
    # most into lane l + 1's chunk, as HYB's), so the same words and slice serve both.
    @property
    def fragment_native(self) -> bool:
        """True in the kernel layout (order "mma", packing "kernel"): each lane's bytes decode to its A
        fragment. HYB's stored layout; for 1MAD / 3INST the unregistered variant
        ``qtip-<code>-<K>@mma-kernel`` (state p = position p, so lane l's eight A registers are states
        8l..8l+7, the windows at bits 0, K, .., 7K of the same slice as HYB's)."""
        return (self.order, self.packing) == LAYOUTS["kernel"]

    @property
    def fragment_word_count(self) -> int:
        """int16 words a lane stages per super-tile: its own 2K words, then lane l + 1's 2K."""
        return 4 * self.K

    def _check_fragment(self):
        if not self.fragment_native:
            raise QCompileError(f"{self.name} is not stored in the mma A-fragment order (only the kernel layout "
                                f"is: qtip-hyb-K, or a variant qtip-<code>-<K>@mma-kernel)")

    def tir_fragment_word(self, bufs: Mapping[str, object], I2, J2, lane, w):
        """int16 word w (0..4K-1) of lane ``lane``'s staged words of super-tile (I2, J2): w < 2K its own
        words, then lane (lane + 1) % 32's (two contiguous runs: two vector loads)."""
        from tvm import tirx

        self._check_fragment()
        fd, fm = tirx.floordiv, tirx.floormod
        half = 2 * self.K
        return bufs["trellis"][I2, J2, fm(lane + fd(w, half), 32) * half + fm(w, half)]

    def tir_fragment_slice(self, bufs: Mapping[str, object], I, J, lane):
        """The 16K stream bits of lane ``lane`` in tile (I, J) from its own chunk on (own chunk << 8K |
        lane + 1's chunk): uint32 for K = 2, uint64 for K = 3, 4. Reads bufs["fragment_words"] (the
        staged words, [N/32, k/32, 32, 4K]) when a kernel computed them, else the trellis."""
        from tvm import tirx

        self._check_fragment()
        fd, fm = tirx.floordiv, tirx.floormod
        K = self.K
        dtype = "uint32" if K == 2 else "uint64"
        cast = lambda e: tirx.Cast(dtype, e)  # noqa: E731
        const = lambda v: tirx.const(v, dtype)  # noqa: E731
        staged = bufs.get("fragment_words")
        I2, J2 = fd(I, 2), fd(J, 2)

        def word(w):  # uint16 value (in ``dtype``) of staged word w
            raw = staged[I2, J2, lane, w] if staged is not None else self.tir_fragment_word(bufs, I2, J2, lane, w)
            return cast(tirx.Cast("uint16", raw))

        chunk_byte = (fm(J, 2) * 2 + fm(I, 2)) * K  # chunk (a, b)'s first byte in a lane's 4K bytes

        def chunk(first):
            """The K bytes from staged byte ``first`` as a little-endian integer: the packing stores
            each chunk byte-reversed, so this is the chunk's stream bits, first bit = MSB."""
            if K % 2 == 0:  # whole words (chunks start at even bytes)
                terms = [tirx.shift_left(word(fd(first, 2) + i), const(16 * i)) for i in range(K // 2)]
            else:
                # K = 3: the 32-bit word q holding the chunk's first byte and the next one (clamped to
                # the staged words: a chunk starting in a word's first two bytes ends inside it), one
                # funnel shift and a mask; byte by byte it took nvcc about 13 more instructions a tile
                q = fd(first, 4)
                last = 2 * K - 1  # the last staged 32-bit word (4K int16 words)

                def word32(i):
                    return tirx.bitwise_or(word(2 * i), tirx.shift_left(word(2 * i + 1), const(16)))

                pair = tirx.bitwise_or(word32(q), tirx.shift_left(word32(tirx.min(q + 1, last)), const(32)))
                return tirx.bitwise_and(tirx.shift_right(pair, cast(8 * fm(first, 4))), const((1 << 8 * K) - 1))
            val = terms[0]
            for t in terms[1:]:
                val = tirx.bitwise_or(val, t)
            return val

        own, nxt = chunk(chunk_byte), chunk(chunk_byte + 4 * K)
        return tirx.bitwise_or(tirx.shift_left(own, const(8 * K)), nxt)

    def tir_fragment_gather(self, bufs: Mapping[str, object], I, J, lane, g):
        """uint32 half2 word of lane ``lane``'s A registers 2g, 2g + 1 (g = 0..3) in tile (I, J) (low
        half = register 2g, high half = 2g + 1). Reads bufs["fragment_slices"] ([N/16, k/16, 32]) when
        present.
        HYB (V=2): the table word of state 4·lane + g (``_hyb_state_word``), the window at bit 2K·g of
          the slice, from table copy lane % copies when the lane copies are a stage.
        1MAD / 3INST (V=1, mma order): registers 2g, 2g + 1 are states 8·lane + 2g, 8·lane + 2g + 1,
          the windows at bits 2g·K and (2g + 1)·K of the slice (register 7's ends at bit 7K + 16 <=
          16K: inside lane + 1's chunk for every K >= 2), each decoded by the code (``_tir_code``)."""
        from tvm import tirx

        self._check_fragment()
        K = self.K
        dtype = "uint32" if K == 2 else "uint64"
        slices = bufs.get("fragment_slices")
        z = slices[I, J, lane] if slices is not None else self.tir_fragment_slice(bufs, I, J, lane)
        bits = 32 if K == 2 else 64
        if self.V == 1:
            c32 = lambda v: tirx.const(v, "uint32")  # noqa: E731

            def window(e):  # uint32: state 8·lane + e, the window at bit e·K of the slice
                # (the & as below: constant folding of unreachable g values must not see a bad shift)
                shift = tirx.bitwise_and(16 * K - 16 - K * e, bits - 1)
                return tirx.bitwise_and(tirx.Cast("uint32", tirx.shift_right(z, tirx.Cast(dtype, shift))), c32(0xFFFF))

            return _tir_code_pair(self.code, window(2 * g), window(2 * g + 1))
        # (the & keeps constant folding of unreachable g values from producing an out-of-range shift)
        shift = tirx.bitwise_and(16 * K - 16 - 2 * K * g, bits - 1)
        # the window without its & 0xFFFF: bits above 16 change neither h's bits 6..15 (h mod 2^16
        # depends only on s mod 2^16) nor so the word; one instruction less per state
        s = tirx.Cast("uint32", tirx.shift_right(z, tirx.Cast(dtype, shift)))
        copies = self._lane_copies(bufs)
        if lane_copy_by_min(self.K) and copies == 16:  # lane % 16 for lanes 0..31, in a form nvcc keeps opaque
            copy = tirx.min(lane, tirx.bitwise_xor(lane, 16))
        else:
            copy = tirx.floormod(lane, copies)
        return self._hyb_state_word(bufs, s, None, copy, mask_first=True)

    def tir_fragment_decode(self, bufs: Mapping[str, object], I, J, lane, e):
        """fp16 A-fragment register e (0..7) of lane ``lane`` for tile (I, J): the weight at tile row
        (lane >> 2) + 8·((e >> 1) & 1), column 2·(lane & 3) + (e & 1) + 8·(e >> 2) (PTX m16n8k16). Half
        e % 2 of gathered word e // 2 (bufs["fragment_gathered"], [N/16, k/16, 32, 4], when present)."""
        from tvm import tirx

        return tir_word_half(self.tir_fragment_register(bufs, I, J, lane, tirx.floordiv(e, 2)), tirx.floormod(e, 2))

    def tir_fragment_register(self, bufs: Mapping[str, object], I, J, lane, w):
        """uint32 A-fragment register w (0..3) of lane ``lane`` for tile (I, J): registers 2w (low half)
        and 2w + 1 (high half) of ``tir_fragment_decode``, as the mma operand holds them. Gathered word
        w (bufs["fragment_gathered"] when present)."""
        self._check_fragment()
        gathered = bufs.get("fragment_gathered")
        return gathered[I, J, lane, w] if gathered is not None else self.tir_fragment_gather(bufs, I, J, lane, w)


def _signed_table(bufs: Mapping[str, object]) -> bool:
    """Whether ``bufs``' HYB table stages are the sign-folded ones (tir_tables(signed=True))."""
    for name in ("tlut32_lanes", "tlut32"):
        if name in bufs:
            return int(bufs[name].shape[0]) == SIGNED_ENTRIES
    return False


def _tir_tlut32(tlut, e):
    """uint32 TIR word of HYB table entry e: tlut[e, 1]'s bits in the high half, tlut[e, 0]'s low."""
    from tvm import tirx

    half = lambda x: tirx.Cast("uint32", tirx.reinterpret("uint16", x))  # noqa: E731
    return tirx.bitwise_or(tirx.shift_left(half(tlut[e, 1]), tirx.const(16, "uint32")), half(tlut[e, 0]))


def _tir_code(code: str, s, v, tlut):
    """TIR fp16 value v (0 or TIR expr) of state s (uint32 expr) under ``code``."""
    from tvm import tirx

    u32 = lambda x: tirx.const(x, "uint32")  # noqa: E731
    sr, band = tirx.shift_right, tirx.bitwise_and
    if code == "1mad":
        x = s * u32(MAD1_A) + u32(MAD1_B)
        y = band(x, u32(255)) + band(sr(x, u32(8)), u32(255)) + band(sr(x, u32(16)), u32(255)) + sr(x, u32(24))
        f = tirx.Cast("float32", tirx.Cast("int32", y) - MAD1_OFFSET) * tirx.const(MAD1_RECIP, "float32")
        return tirx.Cast("float16", f)
    if code == "3inst":
        x = s * u32(INST3_A) + u32(INST3_B)
        r = tirx.bitwise_xor(band(x, u32(INST3_MASK)), u32(INST3_XOR))
        hi = tirx.reinterpret("float16", tirx.Cast("uint16", sr(r, u32(16))))
        lo = tirx.reinterpret("float16", tirx.Cast("uint16", band(r, u32(0xFFFF))))
        return hi + lo
    if code == "hyb":
        h = s * (s + u32(1))
        idx = tirx.Cast("int32", band(sr(h, u32(15 - Q_BITS)), u32((1 << Q_BITS) - 1)))
        val = tlut[idx, v]
        if isinstance(v, int) and v == 1:
            return val
        sign_bit = band(sr(h, u32(15)), u32(1))
        if not isinstance(v, int):  # only value 0 carries the sign (one table read either way, so
            sign_bit = sign_bit * tirx.Cast("uint32", 1 - v)  # the read region is the same for every v)
        sign = tirx.Cast("uint16", tirx.shift_left(sign_bit, u32(15)))
        return tirx.reinterpret("float16", tirx.bitwise_xor(tirx.reinterpret("uint16", val), sign))
    raise QCompileError(f"unknown trellis code {code!r}")


def _tir_code_pair(code: str, s0, s1):
    """TIR uint32 half2 word of two V=1 states (uint32 exprs < 2^16): low half the fp16 bits of s0's
    value, high half s1's, bit for bit ``_tir_code``'s. 3INST in the pair form of _CUDA_TRELLIS's
    decode: the two states' fp16 halves regrouped into two half2 words (one PRMT each on the GPU) and
    added as one half2 (HADD2): sm_90 SASS of the fragment kernel's K loop 10.5 instead of 12.8
    instructions a weight (qtip-3inst-2@mma-kernel). 1MAD: ``_tir_code`` twice (the plain-TIR byte
    sums tried, (x & 0x00FF00FF) + (x >> 8 & 0x00FF00FF) then its two halves, and the 2^23 magic
    number for y - 510, came out at 20 instead of 18: nvcc splits the halves' sums apart again; the
    DP4A of _CUDA_TRELLIS needs a CUDA intrinsic)."""
    from tvm import tirx

    u32 = lambda x: tirx.const(x, "uint32")  # noqa: E731
    sr, sl, band, bor = tirx.shift_right, tirx.shift_left, tirx.bitwise_and, tirx.bitwise_or
    if code == "3inst":
        r0, r1 = [tirx.bitwise_xor(band(s * u32(INST3_A) + u32(INST3_B), u32(INST3_MASK)), u32(INST3_XOR))
                  for s in (s0, s1)]
        lo = bor(band(r0, u32(0xFFFF)), sl(r1, u32(16)))          # the low fp16 halves: (s0, s1)
        hi = bor(sr(r0, u32(16)), band(r1, u32(0xFFFF0000)))      # the high fp16 halves: (s0, s1)
        h2 = lambda w: tirx.reinterpret("float16x2", w)  # noqa: E731
        return tirx.reinterpret("uint32", h2(hi) + h2(lo))
    if code == "1mad":
        bits16 = lambda st: tirx.Cast("uint32", tirx.reinterpret("uint16", _tir_code(code, st, 0, None)))  # noqa: E731
        return bor(bits16(s0), sl(bits16(s1), u32(16)))
    raise QCompileError(f"the pair decode is for the V=1 codes (1mad, 3inst), not {code!r}")


# HYB's decode of one unit from its 8 gathered table words: word p holds columns 2p and 2p + 1 (low,
# high half), so the unit's 16 fp16 values are the 8 words in order, stored as they are (the TIR decode
# splits each word into halves; as plain TIR, nvcc re-packs the halves into the half2 operands of the
# HFMA2s with a shift and a PRMT per word, which this copy avoids). Its own source (and include guard),
# so the 1MAD/3INST kernels keep their source byte for byte.
_CUDA_HYB = r"""
#ifndef QC_QTIP_HYB_DECODE16
#define QC_QTIP_HYB_DECODE16
#include <cuda_fp16.h>
__device__ __forceinline__ void qc_qtip_hyb16(const unsigned* __restrict__ g, half* __restrict__ w) {
  unsigned* out = reinterpret_cast<unsigned*>(w);
#pragma unroll
  for (int p = 0; p < 8; ++p) out[p] = g[p];
}
#define QC_QTIP_HYB(K) \
  __device__ __forceinline__ int qc_qtip_hyb_k##K##_decode16(const unsigned* __restrict__ g, half* __restrict__ w) { \
    qc_qtip_hyb16(g, w); return 0; }
QC_QTIP_HYB(2) QC_QTIP_HYB(3) QC_QTIP_HYB(4)
#endif
"""

# The decode of one unit (16 weights of a tile row) from its gathered stream slices, in half2 pairs:
# windows by one shift and mask; 3INST: IMAD, LOP3, then the two fp16 halves of two weights regrouped by
# PRMT and added by one HADD2; 1MAD: IMAD, the byte sum by DP4A, y − 510 exactly in fp32 through the
# 2^23 magic number, the fp32 multiply by the rounded reciprocal, one rounding to half2. Every step is
# exact or rounds exactly as the TIR decode does, so the values are bit-identical to it. (HYB's table
# reads, whose data-dependent index tensorize cannot match, are in its gather stage: _CUDA_HYB.)
_CUDA_TRELLIS = r"""
#ifndef QC_QTIP_DECODE16
#define QC_QTIP_DECODE16
#include <cuda_fp16.h>
#ifndef QC_QTIP_SHR  // (see TRELLIS_WINDOW_BY_MULHI)
#define QC_QTIP_SHR(x, s) ((x) >> (s))
#endif
template <int K>
__device__ __forceinline__ unsigned qc_qtip_window(const unsigned* __restrict__ g, int j) {
  return (g[(j * K) >> 4] >> (16 - ((j * K) & 15))) & 0xFFFFu;
}
template <int K>  // (3INST's: its loop fills the ALU pipe first; 1MAD's, the FMA pipe)
__device__ __forceinline__ unsigned qc_qtip_window_alu(const unsigned* __restrict__ g, int j) {
  return QC_QTIP_SHR(g[(j * K) >> 4], 16 - ((j * K) & 15)) & 0xFFFFu;
}
__device__ __forceinline__ unsigned qc_qtip_3inst(unsigned s) {
  return ((s * @INST3_A@u + @INST3_B@u) & @INST3_MASK@u) ^ @INST3_XOR@u;
}
__device__ __forceinline__ float qc_qtip_1mad(unsigned s) {
  const unsigned y = __dp4a(s * @MAD1_A@u + @MAD1_B@u, 0x01010101u, 0u);  // sum of the 4 bytes
  return (__uint_as_float(0x4B000000u | y) - @MAD1_MAGIC@f) * @MAD1_RECIP@f;  // (y - 510) exactly, then one rounding
}
template <int K>
__device__ __forceinline__ void qc_qtip_3inst16(const unsigned* __restrict__ g, half* __restrict__ w) {
  unsigned* out = reinterpret_cast<unsigned*>(w);
#pragma unroll
  for (int j = 0; j < 16; j += 2) {
    const unsigned x0 = qc_qtip_3inst(qc_qtip_window_alu<K>(g, j)), x1 = qc_qtip_3inst(qc_qtip_window_alu<K>(g, j + 1));
    const unsigned lo = __byte_perm(x0, x1, 0x5410), hi = __byte_perm(x0, x1, 0x7632);
    const half2 v = __hadd2(*reinterpret_cast<const half2*>(&hi), *reinterpret_cast<const half2*>(&lo));
    out[j / 2] = *reinterpret_cast<const unsigned*>(&v);
  }
}
template <int K>
__device__ __forceinline__ void qc_qtip_1mad16(const unsigned* __restrict__ g, half* __restrict__ w) {
  half2* out = reinterpret_cast<half2*>(w);
#pragma unroll
  for (int j = 0; j < 16; j += 2)
    out[j / 2] = __floats2half2_rn(qc_qtip_1mad(qc_qtip_window<K>(g, j)), qc_qtip_1mad(qc_qtip_window<K>(g, j + 1)));
}
#define QC_QTIP_V1(code, K) \
  __device__ __forceinline__ int qc_qtip_##code##_k##K##_decode16(const unsigned* __restrict__ g, half* __restrict__ w) { \
    qc_qtip_##code##16<K>(g, w); return 0; }
QC_QTIP_V1(3inst, 2) QC_QTIP_V1(3inst, 3) QC_QTIP_V1(3inst, 4)
QC_QTIP_V1(1mad, 2) QC_QTIP_V1(1mad, 3) QC_QTIP_V1(1mad, 4)
#endif
"""


# TRELLIS_WINDOW_BY_MULHI (refuted and removed): QC_QTIP_SHR, 3INST's window shifts, could be defined as
# __umulhi by powers of two, IMAD.HI on the FMA pipe instead of SHF on the ALU pipe (1301 -> 1077 ALU
# instructions in the M=1 GEMV loop). On the H100 at c53ea96 it was slower: qtip-3inst-2 M=1 GEMV 90.9 ->
# 96.2 us (28672x8192), 92.2 -> 98.3 us (8192x28672); M=16 WMMA 169.8 -> 172.8 and 174.4 -> 179.5 us
# (artifacts/bench/trellis-mulhi-qtip-3inst-2-h100.json). The macro and qc_qtip_window_alu stay as they are
# because the tuning records' kernel fingerprints hash this source text.


@functools.lru_cache(maxsize=1)
def _cuda_trellis_source() -> str:
    import struct

    recip = struct.unpack("<f", struct.pack("<f", MAD1_RECIP))[0]
    values = {"INST3_A": INST3_A, "INST3_B": INST3_B, "INST3_MASK": f"0x{INST3_MASK:08X}",
              "INST3_XOR": f"0x{INST3_XOR:08X}", "MAD1_A": MAD1_A, "MAD1_B": MAD1_B,
              "MAD1_MAGIC": f"{float(2 ** 23 + MAD1_OFFSET):.1f}", "MAD1_RECIP": recip.hex()}
    src = _CUDA_TRELLIS
    for key, val in values.items():
        src = src.replace(f"@{key}@", str(val))
    return src


class _TileEncoder:
    """Encodes 16×16 tiles (flattened row-major, [B, 256]) with the tail-biting Viterbi."""

    def __init__(self, fmt: TrellisFormat, cb: torch.Tensor, perm: torch.Tensor, memory_budget, engine="auto"):
        self.fmt, self.cb, self.perm, self.budget, self.engine = fmt, cb, perm, memory_budget, engine

    def encode(self, tiles: torch.Tensor):
        from .viterbi import viterbi_tailbiting

        f = self.fmt
        seq = tiles[:, self.perm].reshape(-1, f.S, f.V)
        states, _ = viterbi_tailbiting(seq, self.cb, f.L, f.KV, memory_budget=self.budget, engine=self.engine)
        vals = self.cb[states].reshape(-1, TILE_WEIGHTS)
        out = torch.empty_like(vals)
        out[:, self.perm] = vals
        return states, out

    def round_block(self, x: torch.Tensor):
        """BlockLDLQ round function: x [m, 16] -> (x_hat [m, 16], states [m/16, S])."""
        m = x.shape[0]
        states, vals = self.encode(x.reshape(m // TILE, TILE_WEIGHTS))
        return vals.view(m, TILE), states


@functools.lru_cache(maxsize=None)
def variant(base_name: str, order: str, packing: str) -> TrellisFormat:
    """The format ``base_name`` (e.g. "qtip-hyb-2") with another (order, packing); the stored layout
    returns the registered format."""
    try:
        _, code, k = base_name.split("-")
        fmt = TrellisFormat(code, int(k), order, packing)
    except (ValueError, TypeError):
        raise QCompileError(f"{base_name!r} is not a qtip format name (qtip-<code>-<K>)") from None
    if fmt.is_default_layout:
        from .base import get

        return get(fmt.name)
    return fmt


def repack(qw: QuantizedWeight, packing: str) -> QuantizedWeight:
    """The same weight (same in-tile order, same decoded values) in another packing: a lossless
    byte shuffle. Returns a weight of the variant format (or of the registered one)."""
    fmt = qw_format(qw)
    target = variant(fmt.base_name, fmt.order, packing)
    n, k = qw.shape
    target.check_shape(n, k)
    tensors = dict(qw.tensors)
    tensors["trellis"] = target.pack_streams(fmt.streams(qw), n, k)
    meta = dict(qw.meta, layout=target.layout)
    return QuantizedWeight(target.name, qw.shape, tensors, meta)


def trellis_format(name) -> TrellisFormat:
    """A qtip format by name: registered ("qtip-hyb-2") or a variant ("qtip-hyb-2@mma-tiles")."""
    from .base import get

    if isinstance(name, TrellisFormat):
        return name
    name = str(name)
    if "@" in name:
        base, layout = name.split("@", 1)
        try:
            order, packing = layout.split("-")
        except ValueError:
            raise QCompileError(f"{name!r} is not a qtip format variant name "
                                f"(qtip-<code>-<K>@<order>-<packing>)") from None
        return variant(base, order, packing)
    fmt = get(name)
    if not isinstance(fmt, TrellisFormat):
        raise QCompileError(f"{name!r} is not a qtip trellis format")
    return fmt


def qw_format(qw: QuantizedWeight) -> TrellisFormat:
    """The TrellisFormat (registered or variant) a weight is stored in."""
    return trellis_format(qw.format)


for _code in CODES:
    for _k in BITS:
        register(f"qtip-{_code}-{_k}", (lambda c=_code, kk=_k: TrellisFormat(c, kk)))


# --- measurement: MSE on i.i.d. Gaussian sequences ------------------------------------------------------------
DEFAULT_MSE_SCALES = (0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05)  # covers the optima at K = 2..4


def gaussian_mse(fmt_name: str, n_sequences: int = 4096, seed: int = 0, scales=None, device=None,
                 memory_budget: Optional[int] = None, engine: str = "auto") -> dict:
    """MSE per weight of the format's trellis (L=16, two-pass tail-biting Viterbi, the layout's
    in-tile order does not matter for i.i.d. data) on ``n_sequences`` i.i.d. N(0, 1) sequences of 256,
    at the best of ``scales`` (ρ values as in ``quantize``: the quantizer input x·rms(codebook)·ρ; default
    DEFAULT_MSE_SCALES). The sequences come from a CPU generator seeded with ``seed``; work runs on
    ``device`` (default: CUDA when available) with the Viterbi ``engine`` (qcompile.formats.viterbi).
    HYB uses the default table.

    Returns {"format", "mse", "scale", "mse_by_scale": {ρ: mse}, "n_sequences", "seconds"}."""
    import time

    from .viterbi import viterbi_tailbiting

    fmt = trellis_format(fmt_name)
    if int(n_sequences) < 1:
        raise QCompileError(f"n_sequences must be at least 1, got {n_sequences}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(int(n_sequences), TILE_WEIGHTS, generator=gen).to(dev)
    tlut = default_tlut(dev) if fmt.code == "hyb" else None
    cb = fmt.codebook(tlut, dev).to(torch.float32)
    rms_cb = float(cb.pow(2).mean().sqrt())
    t0 = time.time()
    by_scale = {}
    for rho in (DEFAULT_MSE_SCALES if scales is None else scales):
        g = rms_cb * float(rho)
        states, _ = viterbi_tailbiting((x * g).view(-1, fmt.S, fmt.V), cb, fmt.L, fmt.KV, memory_budget=memory_budget,
                                       engine=engine)
        x_hat = cb[states].reshape(x.shape) / g
        by_scale[float(rho)] = float((x - x_hat).pow(2).mean())
    best = min(by_scale, key=by_scale.get)
    return {"format": fmt.name, "mse": by_scale[best], "scale": best, "mse_by_scale": by_scale,
            "n_sequences": int(n_sequences), "seconds": time.time() - t0}
