"""Loading compiled kernel modules.

TVM 0.27 keeps CUDA kernels as source inside an exported module and compiles them when the module
is loaded, through the global callback ``tvm_callback_cuda_compile``. An artifact carries the
fatbin that ``qcompile build`` compiled from that exact source; our callback hands it back by the
source's sha256, so loading needs no CUDA compiler. A source with no stored binary (e.g. a module
built elsewhere without nvcc) falls back to TVM's own compiler path (NVRTC, or nvcc).
"""
from __future__ import annotations

import hashlib
import os
import threading
from typing import Dict

_BINARIES: Dict[str, bytes] = {}
_LOCK = threading.Lock()
_installed = False


def register_binary(code_sha256: str, binary: bytes) -> None:
    with _LOCK:
        _BINARIES[code_sha256] = binary


def _install_callback() -> None:
    global _installed
    if _installed:
        return
    import tvm_ffi
    from tvm.support import nvcc

    def compile_or_lookup(code, *args):
        key = hashlib.sha256(code.encode()).hexdigest()
        with _LOCK:
            binary = _BINARIES.get(key)
        if binary is not None:
            return binary
        return nvcc.tvm_callback_cuda_compile(code, *args)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_or_lookup, override=True)
    _installed = True


def load_kernels(lib_path: str, fatbin_path: str = None, source_path: str = None):
    """Load kernels.so; with a fatbin beside it (and the source it came from), no compiler runs."""
    import tvm

    if fatbin_path and source_path and os.path.exists(fatbin_path) and os.path.exists(source_path):
        with open(source_path, "rb") as f:
            key = hashlib.sha256(f.read()).hexdigest()
        with open(fatbin_path, "rb") as f:
            register_binary(key, f.read())
    _install_callback()
    return tvm.runtime.load_module(lib_path)
