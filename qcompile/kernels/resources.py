"""What ptxas gives each compiled kernel: registers, static shared memory, stack and spills.

A kernel's speed often turns on these rather than on its instruction count: registers and shared
memory decide how many thread blocks an SM holds, and that decides how much of the SM's memory is left
to L1 (qtip-hyb-2 M=1 on the H100: the same K loop ran 15-18 % faster at two 512-thread blocks an SM
than at three). The sweeps record them beside each time (``tc_sweep --resources``).

And what nvdisasm shows of its main loop (``sass_loop_mix``): the instructions of the longest
backward branch, by opcode and by the pipe that issues them. The ALU pipe (LOP3, SHF, PRMT, IADD3, ...)
takes a warp instruction every second cycle on sm_80 / sm_90, so a loop with more than half of its
instructions there is bound by that pipe before it is bound by issue: e8p-2's mma.sync K loop at M=1
(28672x8192, nvcc 13.0) has 399 instructions, 229 of them ALU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..errors import QCompileError

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass(frozen=True)
class KernelResources:
    registers: int      # per thread
    shared_bytes: int   # static shared memory per block (the dynamic part is set at launch)
    stack_bytes: int
    spill_bytes: int    # spill stores + spill loads

    def as_dict(self) -> dict:
        return asdict(self)


def parse_ptxas_report(report: str) -> Dict[str, KernelResources]:
    """{kernel name: KernelResources} from the text of ``nvcc -Xptxas -v`` (one architecture)."""
    out: Dict[str, KernelResources] = {}
    name, frame = None, (0, 0, 0)
    for line in report.splitlines():
        m = _ENTRY.search(line)
        if m:
            name, frame = m.group(1), (0, 0, 0)
            continue
        m = _FRAME.search(line)
        if m and name is not None:
            frame = tuple(int(v) for v in m.groups())
            continue
        m = _USED.search(line)
        if m and name is not None:
            smem = _SMEM.search(line)
            out[name] = KernelResources(int(m.group(1)), int(smem.group(1)) if smem else 0, frame[0],
                                        frame[1] + frame[2])
            name = None
    return out


def compile_cubin(cuda_source: str, arch: str = "sm_90") -> Tuple[str, bytes]:
    """(ptxas's -v report, the cubin) of generated CUDA source, compiled here with nvcc for ``arch`` (a few
    seconds; QCompileError in one line without nvcc or when it fails): one compile serves
    ``kernel_resources`` and ``sass_loop_mix``."""
    if shutil.which("nvcc") is None:
        raise QCompileError("compiling the kernels for ptxas and nvdisasm needs nvcc (the CUDA toolkit) on PATH")
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise QCompileError(f"arch {arch!r} is not sm_XX")
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.cu", Path(tmp) / "k.cubin"
        src.write_text(cuda_source)
        run = subprocess.run(["nvcc", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o", str(cubin), str(src)],
                             capture_output=True, text=True)
        if run.returncode:
            tail = " ".join((run.stderr or run.stdout).split())[-300:]
            raise QCompileError(f"nvcc could not compile the kernels for {arch}: {tail}")
        return run.stdout + run.stderr, cubin.read_bytes()


def resources_of_report(report: str, arch: str = "sm_90") -> Dict[str, KernelResources]:
    """``parse_ptxas_report`` of a ``compile_cubin`` report; QCompileError when it names no kernel."""
    resources = parse_ptxas_report(report)
    if not resources:
        raise QCompileError(f"nvcc reported no kernel resources for {arch}")
    return resources


def kernel_resources(cuda_source: str, arch: str = "sm_90") -> Dict[str, KernelResources]:
    """{kernel name: KernelResources} of generated CUDA source, compiled here with nvcc for ``arch``
    (``compile_cubin``)."""
    return resources_of_report(compile_cubin(cuda_source, arch)[0], arch)


# the opcodes (before the first '.') that issue on the ALU pipe and on the FMA pipe on sm_80 / sm_90, after
# Nsight Compute's pipe descriptions: ALU = logic, bit manipulation, integer arithmetic but IMAD / IMUL,
# comparisons, selects and min / max; FMA = FP32 add / multiply / fma and the integer multiply-adds
# (IMAD, IMAD.SHL, IMAD.HI, IMAD.WIDE). Anything else (memory, tensor cores, fp16, branches) is counted by
# opcode only. An approximation for reading a loop, not a simulator.
ALU_OPS = frozenset({"LOP3", "SHF", "LEA", "PRMT", "IADD3", "ISETP", "SEL", "VIMNMX", "IMNMX", "MOV", "IABS", "FLO",
                     "POPC", "LOP", "SHL", "SHR", "BMSK", "VIADD", "CS2R", "FSEL", "FSETP", "FMNMX", "P2R", "R2P",
                     "PLOP3"})
FMA_OPS = frozenset({"IMAD", "IMUL", "FFMA", "FMUL", "FADD"})
_SASS_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
_SASS_LABEL = re.compile(r"\s*(\.L_x_\d+):")
_BACK_BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


@dataclass
class LoopMix:
    instructions: int
    alu: int                  # issued on the ALU pipe (ALU_OPS)
    fma: int                  # on the FMA pipe (FMA_OPS)
    by_opcode: Dict[str, int] = field(default_factory=dict)  # full opcode (e.g. IMAD.HI.U32) -> count

    @property
    def bound_cycles(self) -> int:
        """Cycles a warp scheduler needs for one pass of the loop per warp at best: one issue a cycle,
        the ALU pipe every second cycle."""
        return max(self.instructions, 2 * self.alu)


def parse_sass_loop(sass: str) -> Optional[LoopMix]:
    """The instruction mix of the longest loop (the widest backward branch) in nvdisasm text of one
    kernel; None without a backward branch."""
    ins, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _SASS_LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _SASS_LINE.match(line)
        if m:
            addr = int(m.group(1), 16)
            for label in pending:
                labels[label] = addr
            pending = []
            ins.append((addr, m.group(2).strip()))
    best = None
    for addr, text in ins:
        m = _BACK_BRANCH.search(text)
        if m and m.group(1) in labels and labels[m.group(1)] < addr:
            if best is None or addr - labels[m.group(1)] > best[1] - best[0]:
                best = (labels[m.group(1)], addr)
    if best is None:
        return None
    ops = [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for addr, text in ins if best[0] <= addr <= best[1]]
    heads = [op.split(".")[0] for op in ops]
    return LoopMix(len(ops), sum(h in ALU_OPS for h in heads), sum(h in FMA_OPS for h in heads),
                   dict(Counter(ops).most_common()))


def find_nvdisasm() -> Optional[str]:
    """nvdisasm from $QCOMPILE_NVDISASM, PATH or the CUDA toolkit beside nvcc (None when there is none)."""
    for cand in (os.environ.get("QCOMPILE_NVDISASM"), shutil.which("nvdisasm")):
        if cand and os.path.exists(cand):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        beside = Path(nvcc).resolve().parent / "nvdisasm"
        if beside.exists():
            return str(beside)
    return None


def sass_loop_mix(cuda_source: str, arch: str = "sm_90", nvdisasm: Optional[str] = None,
                  cubin: Optional[bytes] = None) -> Dict[str, LoopMix]:
    """{kernel name: LoopMix of its longest loop} of generated CUDA source, compiled here with nvcc for
    ``arch`` (or its ``compile_cubin`` output ``cubin``, compiled already) and disassembled with nvdisasm
    (``find_nvdisasm``); QCompileError in one line without them."""
    nvdisasm = nvdisasm or find_nvdisasm()
    if nvdisasm is None:
        raise QCompileError("the SASS loop mix needs nvdisasm (the CUDA toolkit's, or set QCOMPILE_NVDISASM)")
    if cubin is None:
        cubin = compile_cubin(cuda_source, arch)[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        dis = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True)
    if dis.returncode:
        raise QCompileError(f"nvdisasm failed: {' '.join(dis.stderr.split())[-300:]}")
    out = {}
    for name, body in _kernel_bodies(dis.stdout).items():
        mix = parse_sass_loop(body)
        if mix is not None:
            out[name] = mix
    return out


def _kernel_bodies(sass: str) -> Dict[str, str]:
    """nvdisasm text split per kernel (its ``.text.<name>`` sections)."""
    bodies, name, lines = {}, None, []
    for line in sass.splitlines():
        m = re.match(r"\s*\.section\s+\.text\.(\w+)", line)
        if m:
            if name is not None:
                bodies[name] = "\n".join(lines)
            name, lines = m.group(1), []
            continue
        if name is not None:
            lines.append(line)
    if name is not None:
        bodies[name] = "\n".join(lines)
    return bodies
