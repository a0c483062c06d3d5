"""What ptxas gives each compiled kernel: registers, static shared memory, stack and spills.

A kernel's speed often turns on these rather than on its instruction count: registers and shared
memory decide how many thread blocks an SM holds, and that decides how much of the SM's memory is left
to L1 (qtip-hyb-2 M=1 on the H100: the same K loop ran 15-18 % faster at two 512-thread blocks an SM
than at three). The sweeps record them beside each time (``tc_sweep --resources``).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict

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


def kernel_resources(cuda_source: str, arch: str = "sm_90") -> Dict[str, KernelResources]:
    """{kernel name: KernelResources} of generated CUDA source, compiled here with nvcc for ``arch``
    (a few seconds; QCompileError in one line without nvcc or when it fails)."""
    if shutil.which("nvcc") is None:
        raise QCompileError("kernel resources need nvcc (the CUDA toolkit) on PATH")
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise QCompileError(f"arch {arch!r} is not sm_XX")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.cu"
        src.write_text(cuda_source)
        run = subprocess.run(["nvcc", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o", str(Path(tmp) / "k.cubin"),
                              str(src)], capture_output=True, text=True)
    if run.returncode:
        tail = " ".join((run.stderr or run.stdout).split())[-300:]
        raise QCompileError(f"nvcc could not compile the kernels for {arch}: {tail}")
    resources = parse_ptxas_report(run.stdout + run.stderr)
    if not resources:
        raise QCompileError(f"nvcc reported no kernel resources for {arch}")
    return resources
