"""Target names -> TVM targets. GPU names, sm_XX, auto (the local GPU, else the CPU) and llvm."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ..errors import QCompileError

GPU_ARCH = {
    "h100": "sm_90", "h200": "sm_90", "gh200": "sm_90",
    "a100": "sm_80", "a800": "sm_80", "a30": "sm_80",
    "a10": "sm_86", "a10g": "sm_86", "a40": "sm_86", "a6000": "sm_86", "rtx3090": "sm_86", "rtx3080": "sm_86",
    "l4": "sm_89", "l40": "sm_89", "l40s": "sm_89", "rtx4090": "sm_89", "rtx4080": "sm_89", "rtx6000ada": "sm_89",
}
MIN_SM = 80  # the kernels use fp16 arithmetic tuned for Ampere and newer


@dataclass(frozen=True)
class TargetInfo:
    name: str          # what the user asked for, normalised (e.g. "h100", "sm_90", "llvm")
    kind: str          # "cuda" or "llvm"
    arch: Optional[str] = None  # "sm_90" for cuda

    @property
    def key(self) -> str:
        """What an artifact is built for: 'llvm' or 'cuda-sm_90'."""
        return "llvm" if self.kind == "llvm" else f"cuda-{self.arch}"

    def tvm_target(self):
        import tvm

        if self.kind == "llvm":
            return tvm.target.Target({"kind": "llvm"})
        return tvm.target.Target({"kind": "cuda", "arch": self.arch})


def local_cuda_arch() -> Optional[str]:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"sm_{major}{minor}"
    except Exception:  # a broken driver is the same as no GPU here
        return None
    return None


def parse_target(name: str) -> TargetInfo:
    t = str(name).strip().lower()
    if t == "auto":
        arch = local_cuda_arch()
        return TargetInfo("llvm", "llvm") if arch is None else TargetInfo(arch, "cuda", arch)
    if t in ("llvm", "cpu"):
        return TargetInfo("llvm", "llvm")
    if t in GPU_ARCH:
        return TargetInfo(t, "cuda", GPU_ARCH[t])
    m = re.fullmatch(r"sm_?(\d{2,3})a?", t)
    if m:
        sm = int(m.group(1))
        if sm < MIN_SM:
            raise QCompileError(f"target {name!r} is older than sm_{MIN_SM}; qcompile kernels need Ampere or newer")
        return TargetInfo(f"sm_{sm}", "cuda", f"sm_{sm}")
    raise QCompileError(
        f"unknown target {name!r}; use auto, llvm, sm_XX (e.g. sm_90) or a GPU name: {', '.join(sorted(GPU_ARCH))}")
