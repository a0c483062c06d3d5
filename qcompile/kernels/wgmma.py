"""Hopper wgmma GEMM with the weight decoded into its shared-memory B staging: M >= 128's route in the making.

    Y[M, N] = X[M, K] @ W[N, K]^T, X and Y fp16 (fp32 accumulation), W a format's packed tensors decoded
    in the kernel by the format's own TIR decode or CUDA decode intrinsic (group-wise formats from register
    copies loaded ahead; E8P and QTIP where each unit is loaded), or fp16.

A TensorIR PrimFunc that issues ``wgmma.mma_async`` (both operands in 128-byte-swizzled shared memory,
through matrix descriptors) from TVM 0.27's ptx dialect: an S-stage cp.async ring, NWG warpgroups of 64
rows each, and optionally a producer warpgroup that loads and decodes while the others only issue wgmma
(``WgmmaConfig.warp_specialized``). It needs sm_90a (``WGMMA_ARCH``). Its config is the search space a
tuner varies (tile width, stages, prefetch depth of the words, their vector width, the decode intrinsic,
warp specialisation).

Not in the runtime's dispatch yet. As ``tests/gpu/wgmma_probe.py`` at c53ea96 / 14843f4 it ran on the H100
(M=1024, 70B MLP shapes): fp16 87 / 92 % of cuBLAS (BN=256, 4 stages), int4-g128 63 / 66 % (BN=256, 4
stages, words prefetched a k tile ahead, the decode intrinsic), below decode + cuBLAS's 75-84 %. Since
then the main loop is unrolled by the prefetch depth, and that form, the deeper prefetch, 16-byte word
loads, the warp-specialised form and the E8P / QTIP forms have not run on a GPU.

Layout notes (what the descriptors and the address arithmetic below assume):

    C[M, N] = A[M, K] @ B[N, K]^T
    A: fp16, row-major (K contiguous)          -- activations
    B: fp16, N rows, K contiguous              -- PyTorch nn.Linear weight layout
    C: fp16 (default) or fp32, row-major; accumulation is always fp32.

Usage
    python3 wgmma_probe.py                # build for sm_90a on a CPU box, print wgmma lines,
                                          # ptxas -v resource usage (registers / spills / smem)
    python3 wgmma_probe.py --check        # on an H100: correctness vs torch + TFLOPS vs cuBLAS
    options: --bn 128|256  --stages S  --wg-inflight 0|1  --swizzle 128|0  --out f16|f32

Kernel structure (one CTA = NWG warpgroups = 128*NWG threads, tile BM x BN x BK, BK = 64):

  * every warpgroup g owns rows [64*g, 64*g+64) of the CTA's M tile and all BN columns; per
    k16 step it issues one `wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.f16.f16` with both A
    and B read from shared memory through 64-bit matrix descriptors ("ss" form).
  * global -> shared with `cp.async.cg.shared.global` (16 B per instruction), S-stage ring
    buffer, `cp.async.commit_group` / `cp.async.wait_group` bookkeeping, one __syncthreads per
    k tile. No TMA, no mbarriers, no warp specialisation: every thread both loads and computes.

Shared-memory layout (swizzle=128, the default) -- the canonical K-major SW128 atom that
CUTLASS calls  Swizzle<3,4,3> o ((8,m),(8,2)):((8,SBO),(1,T))  (T = 8 fp16 = 16 bytes):

  A tile (BM x 64 fp16) and B tile (BN x 64 fp16) are each stored row by row, one 128-byte
  row per M (resp. N) index -- 64 fp16 of K = exactly the 128-byte swizzle width. Inside each
  row, the 16-byte chunk c (= K elements 8c .. 8c+7) is stored at chunk slot c ^ (row % 8):

        byte_offset(row, k) = row * 128 + (((k // 8) ^ (row % 8)) * 16) + (k % 8) * 2

  i.e. address bits [4,7) are XORed with bits [7,10). Eight rows form a 1024-byte "swizzle
  atom"; atoms are stacked densely along M/N, so the stride between 8-row groups is 1024 B.
  The hardware applies the XOR on the *absolute* shared address bits, so every tile base
  must be 1024-byte aligned (the descriptor's base_offset field stays 0). The dynamic smem
  buffer is over-allocated by 1 KiB and the base is rounded up at run time.

  Descriptor fields (PTX ISA "Matrix Descriptor Format", bit layout = cute::GmmaDescriptor):
      start_address  bits [0,14)  = (smem_addr >> 4)
      LBO            bits [16,30) = 1       (ignored for swizzled K-major layouts; CUTLASS writes 1)
      SBO            bits [32,46) = 1024>>4 = 64   (distance between consecutive 8-row groups)
      base_offset    bits [49,52) = 0
      layout_type    bits [62,64) = 1 (SWIZZLE_128B)   [0 = interleave/none, 2 = 64B, 3 = 32B]
  T.cuda.wgmma.encode_matrix_descriptor(&d, ptr, ldo, sdo, swizzle) fills exactly these;
  its `swizzle` argument is 0 none, 1 32B, 2 64B, 3 128B and ldo/sdo are passed already in
  16-byte units (they are stored into the bitfields verbatim).

  Sub-tile addressing: the descriptor start address is the *unswizzled* logical address of
  element (row0, k0): moving 16 K elements (one k16 step) inside the 128-byte atom adds
  32 bytes (= +2 in the descriptor's low field), moving 64 rows (the next warpgroup's A rows)
  adds 64*128 = 8192 bytes (+512), moving one pipeline stage adds the stage size. Because
  the start address lives in the low 14 bits and never overflows them (smem < 256 KiB), we
  encode one descriptor for the aligned smem base and add (byte_offset >> 4) to it.

  swizzle=0 ("interleave", no swizzle) is provided as a fallback: 8x16-byte core matrices,
        byte_offset(row, k) = ((k // 8) * (R // 8) + row // 8) * 128 + (row % 8) * 16 + (k % 8) * 2
  (R = rows of the tile), LBO = (R//8)*128 bytes (next core matrix along K),
  SBO = 128 bytes (next 8-row group). It needs no alignment beyond 16 B but has 8-way bank
  conflicts on the cp.async stores.

Accumulator fragment (PTX ISA "wgmma .m64nNk16 register fragment D", = CUTLASS
CLayout_64xN): thread t of the warpgroup holds N/2 fp32 values d[0 .. N/2-1]:
        warp = t // 32, lane = t % 32
        row(i) = 16*warp + lane//4 + 8*((i//2) % 2)
        col(i) = 8*(i//4) + 2*(lane % 4) + (i % 2)
i.e. the m16n8 mma.sync C layout, one 16-row slab per warp, repeated N/8 times along N.
"""
from dataclasses import asdict, dataclass
from typing import Optional

from ..errors import QCompileError

WGMMA_ARCH = "sm_90a"  # wgmma does not assemble for plain sm_90
SMEM_LIMIT = 232448  # dynamic shared memory a block may opt into on sm_90 (227 KiB)
SW128 = 128
SW_NONE = 0
BK = 64  # the K tile: one 128-byte swizzle row of fp16


@dataclass(frozen=True)
class WgmmaConfig:
    """One point of the kernel's space (see ``_build`` for what each knob does)."""

    bn: int = 128  # the CTA's N tile = the wgmma N
    warpgroups: int = 2  # MMA warpgroups, 64 rows of the M tile each
    stages: int = 4  # shared-memory ring depth
    wg_inflight: int = 1  # wgmma groups left in flight across k tiles
    swizzle: int = SW128
    prefetch: int = 1  # k tiles ahead the packed words are loaded into registers (0: where decoded)
    word_vec: int = 1  # consecutive words of a row one thread loads at once
    decode_intrin: bool = False  # the format's CUDA decode intrinsic instead of its TIR decode
    warp_specialized: bool = False  # a producer warpgroup loads and decodes; the others only issue wgmma

    def as_dict(self):
        return asdict(self)


def smem_bytes(cfg: WgmmaConfig) -> int:
    """The ring (A and decoded B tiles of every stage) plus 1 KiB to align its base to 1024 bytes."""
    return cfg.stages * (64 * cfg.warpgroups + cfg.bn) * BK * 2 + 1024


def is_groupwise8(fmt, n: int, k: int) -> bool:
    """A group-wise format with 8 weights a word (qweight + scales): the kernel's words-ahead fast path."""
    return set(fmt.tensor_specs(n, k)) == {"qweight", "scales"} and fmt.decode_unit == 8


def intrin_function(fmt):
    """(device function name, CUDA source) of ``fmt``'s decode intrinsic: the function its registered
    TensorIntrin's implementation calls."""
    import re

    import tvm

    name, source = fmt.decode_intrin("cuda")
    found = re.findall(r'T\.call_extern\("int32", "(\w+)"', tvm.s_tir.TensorIntrin.get(name).impl.script())
    return found[0], source


def check_wgmma_config(fmt, n: int, k: int, m: int, cfg: WgmmaConfig) -> None:
    """Raise QCompileError (one line: what is wrong, what to do) unless ``cfg`` builds for this problem."""
    what = fmt.name if fmt is not None else "fp16"
    bm = 64 * cfg.warpgroups
    if cfg.warpgroups not in (1, 2):
        raise QCompileError(f"wgmma {what}: warpgroups={cfg.warpgroups}; use 1 or 2")
    if cfg.bn not in (64, 128, 192, 256):
        raise QCompileError(f"wgmma {what}: bn={cfg.bn}; use 64, 128, 192 or 256")
    if m % bm or n % cfg.bn or k % BK:
        raise QCompileError(f"wgmma {what}: M={m}, N={n}, K={k} must be multiples of {bm}, {cfg.bn} and {BK}; "
                            "pad the problem or pick another tile")
    if cfg.wg_inflight not in (0, 1) or cfg.stages < 2 + cfg.wg_inflight:
        raise QCompileError(f"wgmma {what}: stages={cfg.stages} with wg_inflight={cfg.wg_inflight}; "
                            "stages must be at least 2 + wg_inflight (wg_inflight 0 or 1)")
    if 1 + 2 * cfg.stages > 16:
        raise QCompileError(f"wgmma {what}: stages={cfg.stages} needs more than 16 named barriers; use at most 7")
    if smem_bytes(cfg) > SMEM_LIMIT:
        raise QCompileError(f"wgmma {what}: {smem_bytes(cfg)} bytes of shared memory exceed {SMEM_LIMIT}; "
                            "use fewer stages or a narrower bn")
    if cfg.swizzle not in (SW128, SW_NONE):
        raise QCompileError(f"wgmma {what}: swizzle={cfg.swizzle}; use 128 or 0")
    if cfg.warp_specialized and (cfg.stages < 3 or cfg.wg_inflight != 1 or k // BK < cfg.stages):
        raise QCompileError(f"wgmma {what}: the warp-specialised kernel needs stages >= 3, wg_inflight=1 and "
                            f"at least `stages` k tiles (K={k})")
    loaders = 128 if cfg.warp_specialized else 128 * cfg.warpgroups
    if (bm * BK // 8) % loaders or (cfg.bn * BK // 8) % loaders:
        raise QCompileError(f"wgmma {what}: bn={cfg.bn} does not split into 16-byte chunks over {loaders} threads")
    if fmt is None:
        return
    fmt.check_shape(n, k)
    if not is_groupwise8(fmt, n, k):  # any other format: decoded where the unit is loaded
        unit = fmt.decode_unit
        if cfg.prefetch or cfg.word_vec != 1:
            raise QCompileError(f"wgmma {what}: this format decodes where it loads its words; use prefetch=0 and "
                                "word_vec=1 (default_wgmma_config)")
        if cfg.decode_intrin and fmt.decode_intrin("cuda") is None:
            raise QCompileError(f"wgmma {what}: the format has no CUDA decode intrinsic; use decode_intrin=0")
        if BK % unit or unit % 8 or (cfg.bn * (BK // unit)) % loaders:
            raise QCompileError(f"wgmma {what}: {unit}-weight decode units do not split over {loaders} threads "
                                f"at bn={cfg.bn}; use a wider bn")
        return
    if cfg.prefetch not in (0, 1, 2) or (k // BK) % max(1, cfg.prefetch):
        raise QCompileError(f"wgmma {what}: prefetch={cfg.prefetch} with {k // BK} k tiles; use 0, 1, or 2 with "
                            "an even tile count")
    words = cfg.bn * BK // 8 // loaders
    if cfg.word_vec not in (1, 2, 4, 8) or words % cfg.word_vec:
        raise QCompileError(f"wgmma {what}: word_vec={cfg.word_vec} does not divide the {words} words a thread "
                            "loads a k tile; use 1, 2 or 4")
    if cfg.decode_intrin and (not cfg.prefetch or fmt.decode_intrin("cuda") is None):
        raise QCompileError(f"wgmma {what}: decode_intrin needs prefetch >= 1 and a format with a CUDA decode "
                            "intrinsic")


def default_wgmma_config(fmt, n: int, k: int) -> WgmmaConfig:
    """The config to start from: the best measured (H100, M=1024, 70B MLP shapes, 14843f4: 256-wide N tiles,
    4 stages; for group-wise formats the words a k tile ahead and the decode intrinsic, 63 / 66 % of cuBLAS
    against 53 / 55 % without it), 128-wide where N is not a multiple of 256. Other formats (not timed yet)
    decode with their TIR decode where they load."""
    bn = 256 if n % 256 == 0 else 128
    if fmt is None:
        return WgmmaConfig(bn=bn)
    if is_groupwise8(fmt, n, k):
        return WgmmaConfig(bn=bn, decode_intrin=fmt.decode_intrin("cuda") is not None)
    return WgmmaConfig(prefetch=0)


def wgmma_gemm_func(fmt, n: int, k: int, m: int, cfg: Optional[WgmmaConfig] = None,
                    out_dtype: str = "float16", name: str = "wgmma_gemm"):
    """The PrimFunc (X [m, k] fp16, weight tensors, Y [m, n]) of ``cfg`` for ``fmt``: None, B the fp16 weight
    [n, k] and S a 1-element placeholder; a format, its ``tensor_specs`` in order. Compile for
    ``WGMMA_ARCH``."""
    cfg = cfg or default_wgmma_config(fmt, n, k)
    check_wgmma_config(fmt, n, k, m, cfg)
    return _build(m, n, k, BN=cfg.bn, NWG=cfg.warpgroups, stages=cfg.stages, wg_inflight=cfg.wg_inflight,
                  swizzle=cfg.swizzle, out_dtype=out_dtype, name=name, quant=fmt, qprefetch=cfg.prefetch,
                  qintrin=int(cfg.decode_intrin), qvec=cfg.word_vec, ws=int(cfg.warp_specialized))


def _build(
    M,
    N,
    K,
    BN=128,
    NWG=2,
    stages=4,
    wg_inflight=1,
    swizzle=SW128,
    out_dtype="float16",
    name="wgmma_gemm",
    quant=None,
    qprefetch=1,
    qintrin=0,
    qvec=1,
    ws=0,
):
    """Return a TIR PrimFunc computing C = A @ B^T with Hopper wgmma. The arguments are a WgmmaConfig's,
    checked by ``check_wgmma_config`` (``wgmma_gemm_func`` calls it first).

    M, N, K : static problem sizes (M % BM == 0, N % BN == 0, K % 64 == 0).
    BN      : CTA tile along N = the wgmma N (64, 128, 192 or 256).
    NWG     : warpgroups per CTA; BM = 64 * NWG.
    stages  : shared-memory ring depth S (>= 2 + wg_inflight).
    wg_inflight : number of wgmma groups allowed in flight across k tiles (0 or 1).
                  The cp.async prefetch distance is P = S - 1 - wg_inflight tiles.
    swizzle : 128 (SW128 K-major atom) or 0 (interleave, no swizzle).
    quant   : None (B is fp16 [N, K], copied by cp.async) or a group-wise format object (int4-g128):
              B is then the format's packed words and S its scales, and the threads decode each
              k tile's B into the same swizzled stage with the format's own TIR decode
              (``tir_decode_unit``), K/8 words a row, while the previous tile's wgmma runs.
    qprefetch : quant only. 0 = each thread loads tile t's words from global memory right where it
              decodes them (the load latency is exposed once per k tile: 39-40 % of cuBLAS at BN=128 on
              the H100); d = 1, 2: the words (and scales) of tile t+d are loaded into register copy
              t % d right after tile t's decode, so they have d k tiles of wgmma to land (47 % with 1).
    qvec    : quant: words a thread loads from one row at once (1 or 4: one 16-byte load and one scale
              for four words; the decode's shared stores stay 16-byte chunks of the swizzled row).
    qintrin : quant with qprefetch only. 1 = each word decoded by the format's CUDA decode intrinsic
              (``fmt.decode_intrin``: int4's LOP3 + HSUB2 + HMUL2, bit-identical to its TIR decode); 0 =
              element by element with ``tir_decode_unit``.
    ws      : 1 = warp-specialised: one more warpgroup (the producer) issues the cp.async of A and decodes
              B (quant) into the ring while the NWG consumer warpgroups only issue wgmma; named barriers
              FULL[s] (1 + s) and EMPTY[s] (1 + stages + s) hand each stage over, with no CTA-wide barrier.
              The producer runs stages - 2 tiles ahead of the FULL signal it gives, so its cp.async
              latency is hidden too.
    """
    import tvm
    from tvm.script import tirx as T  # (the TVMScript below resolves T through this closure)

    BK = 64
    BM = 64 * NWG
    NT = 128 * NWG  # the MMA warpgroups' threads
    LT = 128 if ws else NT  # the threads that load (and decode) a tile: the producer warpgroup, or all
    NT_ALL = NT + 128 if ws else NT
    LAG = stages - 2  # ws: the producer signals tile t FULL when it issues tile t + LAG
    P = stages - 1 - wg_inflight  # prefetch distance in k tiles
    KT = K // BK
    ACC = BN // 2  # fp32 accumulator registers per thread (m64nBNk16: 64*BN/128)

    A_BYTES = BM * BK * 2  # one stage of A
    B_BYTES = BN * BK * 2
    STAGE_BYTES = A_BYTES + B_BYTES
    SMEM_BYTES = stages * STAGE_BYTES + 1024  # + 1 KiB slack to round the base up to 1024 B
    A_CHUNKS = BM * BK // 8 // LT  # 16-byte cp.async per loading thread per k tile for A
    B_CHUNKS = BN * BK // 8 // LT
    assert A_CHUNKS * LT * 8 == BM * BK and B_CHUNKS * LT * 8 == BN * BK
    # The kernel's weight tensors, (parameter name, shape, dtype): fp16 B and a placeholder S; a group-wise
    # format's qweight and scales as B and S (the words-ahead fast path); any other format's own tensors.
    fmt = quant
    GENERIC = fmt is not None and not is_groupwise8(fmt, N, K)
    if fmt is None:
        PARAMS = [("B", (N, K), "float16"), ("S", (1,), "float16")]
    elif not GENERIC:
        specs = fmt.tensor_specs(N, K)
        PARAMS = [("B", specs["qweight"].shape, specs["qweight"].dtype), ("S", specs["scales"].shape, "float16")]
    else:
        PARAMS = [(f"W_{t}", spec.shape, spec.dtype) for t, spec in fmt.tensor_specs(N, K).items()]
        TENSORS = list(fmt.tensor_specs(N, K))
    B_DTYPE = PARAMS[0][2]

    def decode(Q, Sc, n, c, j):  # element j of word (n, c): the group-wise format's TIR decode
        return fmt.tir_decode_unit({"qweight": Q, "scales": Sc}, n, c, j)

    def named_tensors(bufs):  # the format's tensors by name, from the kernel's parameters in their order
        return dict(zip(TENSORS, bufs))

    def region_start(shape, off):  # where a unit's region of a tensor starts (Format.unit_reads' offset)
        return off[0] if off and off[0] is not None else (0,) * len(shape)

    def decode_unit_generic(bufs, gath, n, c, j):  # element j of unit c of row n: any format, its own tensors
        return fmt.tir_decode_unit(with_gathered(bufs, gath), n, c, j)

    def gather_generic(bufs, n, c, g):  # gathered (table) word g of unit c of row n
        return fmt.tir_gather(named_tensors(bufs), n, c, g)

    def with_gathered(bufs, gath):
        """The format's tensors, and its gathered words from the unit's local copy ``gath`` (computed once a
        unit instead of once a weight), which tir_decode_unit reads as bufs["gathered"][n, c, g]."""
        named = named_tensors(bufs)
        if GATHERS:
            class _UnitGathered:
                def __getitem__(self, idx):
                    return gath[idx[-1]]
            named["gathered"] = _UnitGathered()
        return named
    QUANT = quant is not None and not GENERIC
    PREFETCH = QUANT and bool(qprefetch)
    DEPTH = max(1, qprefetch if QUANT else 1)  # register copies of the words: tiles fetched ahead
    QV = qvec if QUANT else 1  # consecutive words of one row a thread loads (and decodes) together
    QROWS = B_CHUNKS // QV  # rows of one register copy: [row, word] -> the format decode's (n, c)
    UNIT = fmt.decode_unit if GENERIC else 8  # weights a decode unit (GENERIC: any format's)
    UPR = BK // UNIT  # units of one B tile row
    UPT = BN * UPR // LT  # units a loading thread decodes a k tile
    WDEC = max(8, UNIT)
    GATHERS = fmt.gather_count if GENERIC else 0  # table words a unit gathers (E8P, QTIP)
    GATHER_DTYPE = fmt.unit_reads()["gathered"][1] if GATHERS else "int32"
    INTRIN = None  # (function name, CUDA source) of the format's decode intrinsic
    if (PREFETCH or GENERIC) and qintrin:
        INTRIN = intrin_function(fmt)
    IMPORT_C = INTRIN[1] if INTRIN is not None else ""
    # GENERIC with the intrinsic: its arguments are one pointer per region a unit reads (Format.unit_reads,
    # in order): the gathered words (gath), the other staged words copied into ureg, the rest in place
    READS = list(fmt.unit_reads().items()) if GENERIC and INTRIN is not None else []
    STAGED = [(t, spec) for t, spec in READS if t != "gathered" and spec[2]]
    assert len(STAGED) <= 2 and len({spec[1] for _, spec in STAGED}) <= 1, STAGED
    STAGED_SIZES = [int(spec[0][-1]) if len(spec[0]) == 3 else 1 for _, spec in STAGED]
    STAGED_AT = {t: sum(STAGED_SIZES[:i]) for i, (t, _) in enumerate(STAGED)}  # each one's place in ureg
    UREG = max(1, sum(STAGED_SIZES))
    UREG_DTYPE = STAGED[0][1][1] if STAGED else "int32"

    def staged_load(bufs, i, n, c, e):
        """Element e of staged region i of unit (n, c): the tensor at [n, c, start + e] (or [n, c])."""
        t, (shape, _, _, *off) = STAGED[int(i)]
        buf = named_tensors(bufs)[t]
        return buf[n, c, region_start(shape, off)[2] + e] if len(shape) == 3 else buf[n, c]

    def intrin_ptrs(bufs, ureg, gath, n, c):
        named, ptrs = named_tensors(bufs), []
        for t, (shape, _, staged, *off) in READS:
            if t == "gathered":
                ptrs.append(gath.ptr_to([0]))
            elif staged:
                ptrs.append(ureg.ptr_to([STAGED_AT[t]]))
            else:  # read in place (e.g. E8P's residual scale): its region's start at unit (n, c)
                start = region_start(shape, off)
                ptrs.append(named[t].ptr_to([n, c, *start[2:]] if len(shape) >= 2 else list(start)))
        return ptrs
    # words per scale (int4-g128: 16); the register copy is indexed (chunk, 0), which the format's
    # decode reads as word (chunk, 0) and scale (chunk, 0 // S_WORDS)
    S_WORDS = (K // 8) // PARAMS[1][1][1] if QUANT else 1

    if swizzle == SW128:
        sw_code = 3  # T.cuda.wgmma.encode_matrix_descriptor: 3 = 128B swizzle
        LBO_A = LBO_B = 1  # unused for swizzled K-major
        SBO_A = SBO_B = 1024 >> 4  # 8 rows x 128 B
        KSTEP_A = KSTEP_B = 32  # bytes per k16 step inside the atom
        WG_A = 64 * 128  # bytes between warpgroup row slabs of A
    else:
        sw_code = 0
        LBO_A = (BM // 8) * 128 >> 4  # next core matrix along K
        LBO_B = (BN // 8) * 128 >> 4
        SBO_A = SBO_B = 128 >> 4  # next 8-row group
        KSTEP_A = 2 * (BM // 8) * 128  # 16 K elements = 2 core matrices along K
        KSTEP_B = 2 * (BN // 8) * 128
        WG_A = 8 * 128  # 64 rows = 8 core-matrix rows
    # A and B get separate descriptors because LBO differs between them in interleave mode.

    def smem_off(row, chunk, rows):
        """Byte offset of 16-byte chunk `chunk` (K elements 8*chunk..) of tile row `row`."""
        if swizzle == SW128:
            return row * 128 + T.bitwise_xor(chunk, row % 8) * 16
        return (chunk * (rows // 8) + row // 8) * 128 + (row % 8) * 16

    mma_chain = f"wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.f16.f16"

    # fmt: off
    @T.macro
    def load_tile(t, st, slot, A, bufs, smem, wdec, qreg, sreg, gath, ureg, base, pad_elems, tx, bm, bn):
        """Tile t of A and B into stage st: A by cp.async; B by cp.async (fp16) or decoded by the threads
        (quant: word (row, chunk) of tile t -> 8 fp16 -> one 16-byte chunk; plain shared stores, which
        the fence.proxy.async before the next barrier orders for wgmma)."""
        for j in T.unroll(A_CHUNKS):
            T.ptx.cp.async_.cg.shared.global_(
                base + T.cast(st * STAGE_BYTES + smem_off((j * LT + tx) // 8, (j * LT + tx) % 8, BM), "uint32"),
                A.ptr_to([bm * BM + (j * LT + tx) // 8, t * BK + ((j * LT + tx) % 8) * 8]), 16)
        if QUANT:
            # unit u = jj * LT + tx: QV consecutive words (chunks c0 .. c0+QV-1) of B tile row u // (8 // QV)
            for jj in T.unroll(B_CHUNKS // QV):
                for v in T.unroll(QV):
                    if INTRIN is not None:  # the format's intrinsic: word, scale -> 8 fp16 in wdec
                        T.evaluate(T.call_extern("int32", INTRIN[0], qreg.ptr_to([slot * QROWS + jj, v]),
                                                 sreg.ptr_to([slot * QROWS + jj, 0]), wdec.ptr_to([0])))
                    elif PREFETCH:  # tile t's words are in qreg/sreg since qprefetch k tiles ago
                        for e in T.unroll(8):
                            wdec[e] = decode(qreg, sreg, slot * QROWS + jj, v, e)
                    else:
                        for e in T.unroll(8):
                            wdec[e] = decode(bufs[0], bufs[1], bn * BN + (jj * LT + tx) // (8 // QV), t * 8 + ((jj * LT + tx) % (8 // QV)) * QV + v, e)
                    for e in T.vectorized(8):
                        smem[pad_elems + (st * STAGE_BYTES + A_BYTES + smem_off((jj * LT + tx) // (8 // QV), ((jj * LT + tx) % (8 // QV)) * QV + v, BN)) // 2 + e] = wdec[e]
        if GENERIC:
            # unit u = jj * LT + tx: unit u % UPR of B tile row u // UPR, UNIT weights = UNIT // 8 chunks,
            # decoded where loaded by the format's TIR decode or intrinsic on its own tensors
            for jj in T.unroll(UPT):
                row = (jj * LT + tx) // UPR  # the unit's row in the B tile, its unit in the row's k tile
                col = (jj * LT + tx) % UPR
                if GATHERS > 0:
                    for g in T.unroll(GATHERS):
                        gath[g] = gather_generic(bufs, bn * BN + row, t * UPR + col, g)
                if INTRIN is not None:  # the format's intrinsic: staged words + gathered words -> UNIT fp16
                    if len(STAGED) >= 1:
                        for e in T.unroll(STAGED_SIZES[0]):
                            ureg[e] = staged_load(bufs, 0, bn * BN + row, t * UPR + col, e)
                    if len(STAGED) >= 2:
                        for e in T.unroll(STAGED_SIZES[-1]):
                            ureg[STAGED_SIZES[0] + e] = staged_load(bufs, 1, bn * BN + row, t * UPR + col, e)
                    T.evaluate(T.call_extern("int32", INTRIN[0], *intrin_ptrs(bufs, ureg, gath, bn * BN + row, t * UPR + col),
                                             wdec.ptr_to([0])))
                else:
                    for e in T.unroll(UNIT):
                        wdec[e] = decode_unit_generic(bufs, gath, bn * BN + row, t * UPR + col, e)
                for q in T.unroll(UNIT // 8):
                    for e in T.vectorized(8):
                        smem[pad_elems + (st * STAGE_BYTES + A_BYTES + smem_off(row, col * (UNIT // 8) + q, BN)) // 2 + e] = wdec[q * 8 + e]
        if fmt is None:
            for j in T.unroll(B_CHUNKS):
                T.ptx.cp.async_.cg.shared.global_(
                    base + T.cast(st * STAGE_BYTES + A_BYTES + smem_off((j * LT + tx) // 8, (j * LT + tx) % 8, BN), "uint32"),
                    bufs[0].ptr_to([bn * BN + (j * LT + tx) // 8, t * BK + ((j * LT + tx) % 8) * 8]), 16)

    @T.macro
    def fetch_words(t, slot, bufs, qreg, sreg, tx, bn):
        """qprefetch: tile t's packed words and their scales -> register copy ``slot`` (used qprefetch k
        tiles later)."""
        for jj in T.unroll(B_CHUNKS // QV):
            for v in T.vectorized(QV):  # one 4 * QV-byte load
                qreg[slot * QROWS + jj, v] = bufs[0][bn * BN + (jj * LT + tx) // (8 // QV), t * 8 + ((jj * LT + tx) % (8 // QV)) * QV + v]
            sreg[slot * QROWS + jj, 0] = bufs[1][bn * BN + (jj * LT + tx) // (8 // QV), (t * 8 + ((jj * LT + tx) % (8 // QV)) * QV) // S_WORDS]

    @T.macro
    def mma_k_tile(stage, wg, acc, descA, descB):
        """Warpgroup wg's four k16 steps of the k tile in ring stage ``stage``, as one wgmma group."""
        T.ptx.wgmma.fence.sync.aligned()
        for kk in T.unroll(BK // 16):
            T.ptx[mma_chain](
                *[acc[i] for i in range(ACC)],
                descA[0] + T.cast((T.uint32(stage * STAGE_BYTES) + T.uint32(wg * WG_A) + T.uint32(kk * KSTEP_A)) >> T.uint32(4), "uint64"),
                descB[0] + T.cast((T.uint32(stage * STAGE_BYTES + A_BYTES) + T.uint32(kk * KSTEP_B)) >> T.uint32(4), "uint64"),
                True, 1, 1, 0, 0)
        T.ptx.wgmma.commit_group.sync.aligned()

    @T.macro
    def store_acc(C, acc, bm, bn, wg, warp, lane):
        """The accumulator fragment -> C: acc[2j], acc[2j+1] are adjacent columns of one row (one 2-wide store)."""
        for j in T.unroll(ACC // 2):
            for e in T.vectorized(2):
                C[bm * BM + wg * 64 + warp * 16 + lane // 4 + 8 * (j % 2),
                  bn * BN + 8 * (j // 2) + 2 * (lane % 4) + e] = T.cast(acc[2 * j + e], out_dtype)

    @T.macro
    def gemm(A, bufs, C, bm, bn, tx, smem, acc, descA, descB, wdec, gath, ureg, qreg, sreg):
        wg = tx // 128
        warp = (tx % 128) // 32
        lane = tx % 32
        # 1024-byte aligned base of the ring buffer, as a shared-window address.
        raw = T.cuda.cvta_generic_to_shared(smem.ptr_to([0]))
        pad = T.bitwise_and(T.uint32(1024) - T.bitwise_and(raw, T.uint32(1023)), T.uint32(1023))
        base = raw + pad
        pad_elems = T.cast(pad, "int32") // 2
        # One descriptor per operand, for the aligned base; sub-tiles add (offset >> 4).
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(descA[0]), smem.ptr_to([pad_elems]),
                                              LBO_A, SBO_A, sw_code)
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(descB[0]), smem.ptr_to([pad_elems]),
                                              LBO_B, SBO_B, sw_code)

        with T.attr(0, "pragma_import_c", IMPORT_C):  # the decode intrinsic's source, if any
            for i in T.unroll(ACC):
                acc[i] = T.float32(0)

        # ---- prologue: tiles 0 .. P-1 -> stages 0 .. P-1 (one commit group per tile) ----
        for s in T.unroll(P):
            if s < KT:
                if PREFETCH:
                    fetch_words(s, s % DEPTH, bufs, qreg, sreg, tx, bn)
                load_tile(s, s, s % DEPTH, A, bufs, smem, wdec, qreg, sreg, gath, ureg, base, pad_elems, tx, bm, bn)
            T.ptx.cp.async_.commit_group()
        if PREFETCH:
            for d in T.unroll(DEPTH):
                if P + d < KT:
                    fetch_words(P + d, (P + d) % DEPTH, bufs, qreg, sreg, tx, bn)

        # ---- main loop over k tiles ----
        # (unrolled by DEPTH: tile kt+P's register copy, (par + P) % DEPTH, is a constant in each step)
        for kt2 in range(KT // DEPTH):
            for par in T.unroll(DEPTH):
                kt = kt2 * DEPTH + par
                stage = kt % stages
                # Groups committed so far = P + kt; <= P-1 pending  =>  tile kt has landed.
                T.ptx.cp.async_.wait_group(P - 1)
                # cp.async writes (and the decode's shared stores) are generic-proxy writes; wgmma reads
                # smem through the async proxy, so order them with a proxy fence before the barrier.
                T.ptx.fence.proxy.async_.shared__cta()
                T.cuda.cta_sync()
                # (no register operand fence for the accumulators, as CUTLASS's warpgroup_fence_operand: TVM
                # 0.27's T.cuda.wgmma.noop_barrier crashes CUDA codegen; ptxas still keeps the HGMMAs unserialized)
                mma_k_tile(stage, wg, acc, descA, descB)
                # Refill the stage last read by tile kt-1-wg_inflight (finished by every warpgroup:
                # each thread passed wgmma.wait_group(wg_inflight) before the barrier above).
                nxt = kt + P
                if nxt < KT:
                    load_tile(nxt, nxt % stages, (par + P) % DEPTH, A, bufs, smem, wdec, qreg, sreg, gath, ureg, base, pad_elems,
                              tx, bm, bn)
                    if PREFETCH:  # into the copy just decoded: tile nxt + DEPTH, DEPTH k tiles ahead
                        if nxt + DEPTH < KT:
                            fetch_words(nxt + DEPTH, (par + P) % DEPTH, bufs, qreg, sreg, tx, bn)
                T.ptx.cp.async_.commit_group()
                T.ptx.wgmma.wait_group.sync.aligned(wg_inflight)

        T.ptx.wgmma.wait_group.sync.aligned(0)

        # ---- epilogue: fragment -> C (see module docstring for the mapping) ----
        store_acc(C, acc, bm, bn, wg, warp, lane)

    @T.macro
    def gemm_ws(A, bufs, C, bm, bn, tx, smem, acc, descA, descB, wdec, gath, ureg, qreg, sreg):
        raw = T.cuda.cvta_generic_to_shared(smem.ptr_to([0]))
        pad = T.bitwise_and(T.uint32(1024) - T.bitwise_and(raw, T.uint32(1023)), T.uint32(1023))
        base = raw + pad
        pad_elems = T.cast(pad, "int32") // 2
        with T.attr(0, "pragma_import_c", IMPORT_C):  # the decode intrinsic's source, if any
            if tx < 128:
                # ---- producer warpgroup: tile kt -> stage kt % stages once EMPTY; FULL LAG tiles later ----
                if PREFETCH:
                    for d in T.unroll(DEPTH):
                        fetch_words(d, d, bufs, qreg, sreg, tx, bn)
                for kt2 in range(KT // DEPTH):
                    for par in T.unroll(DEPTH):
                        kt = kt2 * DEPTH + par
                        if kt >= stages:  # consumers are done with tile kt - stages
                            T.ptx.bar.sync(T.uint32(1 + stages + kt % stages), T.uint32(NT_ALL))
                        load_tile(kt, kt % stages, par, A, bufs, smem, wdec, qreg, sreg, gath, ureg, base, pad_elems, tx, bm, bn)
                        if PREFETCH:  # into the copy just decoded: tile kt + DEPTH
                            if kt + DEPTH < KT:
                                fetch_words(kt + DEPTH, par, bufs, qreg, sreg, tx, bn)
                        T.ptx.cp.async_.commit_group()
                        if kt >= LAG:  # tile kt - LAG's A has landed (its B stores are this thread's own)
                            T.ptx.cp.async_.wait_group(LAG)
                            T.ptx.fence.proxy.async_.shared__cta()
                            T.ptx.bar.arrive(T.uint32(1 + (kt - LAG) % stages), T.uint32(NT_ALL))
                T.ptx.cp.async_.wait_group(0)
                T.ptx.fence.proxy.async_.shared__cta()
                for d in T.unroll(LAG):
                    T.ptx.bar.arrive(T.uint32(1 + (KT - LAG + d) % stages), T.uint32(NT_ALL))
            else:
                # ---- consumer warpgroups: wgmma on FULL stages, EMPTY once the group has retired ----
                wg = tx // 128 - 1
                warp = (tx % 128) // 32
                lane = tx % 32
                T.cuda.wgmma.encode_matrix_descriptor(T.address_of(descA[0]), smem.ptr_to([pad_elems]),
                                                      LBO_A, SBO_A, sw_code)
                T.cuda.wgmma.encode_matrix_descriptor(T.address_of(descB[0]), smem.ptr_to([pad_elems]),
                                                      LBO_B, SBO_B, sw_code)
                for i in T.unroll(ACC):
                    acc[i] = T.float32(0)
                for kt in range(KT):
                    stage = kt % stages
                    T.ptx.bar.sync(T.uint32(1 + stage), T.uint32(NT_ALL))
                    mma_k_tile(stage, wg, acc, descA, descB)
                    T.ptx.wgmma.wait_group.sync.aligned(1)  # tile kt - 1's group has retired
                    if kt >= 1:  # (only for the tiles whose stage the producer waits to refill)
                        if kt - 1 + stages < KT:
                            T.ptx.bar.arrive(T.uint32(1 + stages + (kt - 1) % stages), T.uint32(NT_ALL))
                T.ptx.wgmma.wait_group.sync.aligned(0)
                store_acc(C, acc, bm, bn, wg, warp, lane)
    # fmt: on
    # The PrimFunc: (A, the weight tensors, C), the launch and the buffers of both forms, then one of the two
    # macros above. (TVMScript takes no variable parameter list, so the signature is written out for this
    # format's tensors.)
    params = ", ".join(f"{p}: T.Buffer({tuple(shape)!r}, {dtype!r})" for p, shape, dtype in PARAMS)
    text = PRIM_FUNC.format(params=params, tensors=", ".join(p for p, _, _ in PARAMS))
    return tvm.script.from_source(text, extra_vars=dict(
        T=T, body=gemm_ws if ws else gemm, M=M, N=N, K=K, BM=BM, BN=BN, THREADS=NT_ALL, OUT_DTYPE=out_dtype,
        NAME=name, SMEM_BYTES=SMEM_BYTES, ACC=ACC, WDEC=WDEC, GATHERS=GATHERS, GATHER_DTYPE=GATHER_DTYPE,
        UREG=UREG, UREG_DTYPE=UREG_DTYPE, DEPTH=DEPTH, QROWS=QROWS, QV=QV, B_DTYPE=B_DTYPE))


# the PrimFunc around _build's macros (constants from its extra_vars)
PRIM_FUNC = """
@T.prim_func
def main(A: T.Buffer((M, K), "float16"), {params}, C: T.Buffer((M, N), OUT_DTYPE)):
    T.func_attr({{"global_symbol": NAME, "tirx.noalias": True}})
    bm = T.launch_thread("blockIdx.x", M // BM)   # M tiles fastest: CTAs sharing a B tile run together
    bn = T.launch_thread("blockIdx.y", N // BN)
    tx = T.launch_thread("threadIdx.x", THREADS)
    smem = T.alloc_buffer((SMEM_BYTES // 2,), "float16", scope="shared.dyn")
    acc = T.alloc_buffer((ACC,), "float32", scope="local")
    descA = T.alloc_buffer((1,), "uint64", scope="local")
    descB = T.alloc_buffer((1,), "uint64", scope="local")
    wdec = T.alloc_buffer((WDEC,), "float16", scope="local")
    gath = T.alloc_buffer((max(1, GATHERS),), GATHER_DTYPE, scope="local")
    ureg = T.alloc_buffer((UREG,), UREG_DTYPE, scope="local")
    qreg = T.alloc_buffer((DEPTH * QROWS, QV), B_DTYPE, scope="local")
    sreg = T.alloc_buffer((DEPTH * QROWS, 1), "float16", scope="local")
    body(A, ({tensors},), C, bm, bn, tx, smem, acc, descA, descB, wdec, gath, ureg, qreg, sreg)
"""



def layout_selftest() -> bool:
    """Pure-Python consistency checks of the layout math (no GPU, no TVM).

    (1) The address each cp.async writes (formula used in the TIR) equals the address the
        wgmma descriptor makes the hardware read, according to the canonical K-major layouts
        documented in CUTLASS (cute/atom/mma_traits_sm90_gmma.hpp, make_gmma_desc<Major::K>):
          INTERLEAVE: ((8,m),(T,2)):((1T,SBO),(1,LBO))   [uint128 units]
          SW128     : Swizzle<3,4,3> o ((8,m),(T,2)):((8T,SBO),(1,T))
        for every k16 step and both warpgroup row slabs.
    (2) The accumulator fragment map (thread, reg) -> (row, col) is a bijection onto 64 x N.
    This checks self-consistency with the documented layouts, not the hardware itself.
    """
    ok = True
    for sw in (SW128, SW_NONE):
        for rows in (64, 128, 256):
            def write_addr(row, k):  # what the kernel's cp.async mapping stores (bytes)
                c = k // 8
                if sw == SW128:
                    return row * 128 + ((c ^ (row % 8)) * 16) + (k % 8) * 2
                return (c * (rows // 8) + row // 8) * 128 + (row % 8) * 16 + (k % 8) * 2

            for kk in range(4):
                for slab in range(rows // 64):
                    if sw == SW128:
                        start = slab * 64 * 128 + kk * 32
                        sbo = 1024
                    else:
                        start = slab * 8 * 128 + kk * 2 * (rows // 8) * 128
                        sbo, lbo = 128, (rows // 8) * 128
                    for m in range(64):
                        for k in range(16):
                            if sw == SW128:
                                u = start + (m % 8) * 128 + (m // 8) * sbo + (k // 8) * 16 + (k % 8) * 2
                                hw = u ^ (((u >> 7) & 7) << 4)  # 128B swizzle on absolute bits
                            else:
                                hw = start + (m % 8) * 16 + (m // 8) * sbo + (k // 8) * lbo + (k % 8) * 2
                            if hw != write_addr(slab * 64 + m, kk * 16 + k):
                                ok = False
    for n in (8, 64, 128, 256):
        seen = set()
        for t in range(128):
            warp, lane = t // 32, t % 32
            for i in range(n // 2):
                seen.add((16 * warp + lane // 4 + 8 * ((i // 2) % 2), 8 * (i // 4) + 2 * (lane % 4) + i % 2))
        ok &= seen == {(r, c) for r in range(64) for c in range(n)}
    return ok
