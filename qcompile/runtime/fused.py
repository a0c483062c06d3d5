"""Fused linears (QuIP# ``self_attn.qkv_proj`` = q,k,v and ``mlp.upgate_proj`` = up,gate) in a
transformers model whose attention / MLP calls its parts one by one.

A fused weight is one QuantizedWeight over the concatenated output dim, with one RHT over the
concatenation, so no part can be computed on its own: the product of the whole fused weight is
computed and its output split by ``sizes``, part i multiplied by ``fuse_scales[i]``
(qcompile.formats.quipsharp_io). Here:

* ``FusedQuantLinear`` (a QuantLinear, registered in the parent module under the fused name, so
  the state dict keys are the artifact's ``<parent>.qkv_proj.<tensor>``) returns the tuple of
  scaled parts;
* each part linear of the parent (``q_proj`` ...) is replaced by a ``FusedPart``, which holds no
  tensors and returns its slice of the fused output;
* ``install_fused`` adds both and two hooks on the parent: a forward pre-hook computes the fused
  product ONCE from the parent's input (its first forward argument, positional or by name) and
  leaves it, with that input, on the FusedQuantLinear (``pending``); the parts called with that
  very input object return their slice; a forward hook (``always_call``: also when the forward
  raises) clears it. So the cache lives exactly for one parent call and is keyed on the input
  tensor's identity: a part called with another tensor (or outside the parent's forward) computes
  the fused product itself and takes its slice -- always correct, only not shared.

This needs no copy of the parent's forward (which transformers changes between versions) and keeps
torch.compile(fullgraph=True) and CUDA graphs working: under torch.compile the hooks are traced
inline into the parent's graph (one fused kernel call, the identity test is resolved while tracing)
and nothing stays on the module after the call; CUDA-graph capture records the one call like any
other op. The one case that falls back to per-part products is torch.compile of the parent module
itself as the root (hooks of the root module run outside the compiled frame): results stay correct.

Fuse scales are float32 Python numbers, not buffers (``model.half()`` cannot round them); part i is
``y_i * s_i`` with one rounding to the output dtype (fp16 · Python scalar is computed in float32).
"""
from __future__ import annotations

import inspect
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import QCompileError
from ..formats import QuantizedWeight
from ..kernels.library import DEFAULT_BUCKETS
from .linear import QuantLinear

_FUSED_NAMES = "_qcompile_fused"  # parent.__dict__ key: names of its FusedQuantLinear children
_INPUT_NAME = "_qcompile_fused_input"  # parent.__dict__ key: name of its forward's first argument


def check_fused_meta(fused, n: int, where: str) -> Tuple[List[str], List[int], List[float]]:
    """(parts, sizes, fuse_scales) of a ``meta["fused"]`` dict for a weight with n outputs;
    QCompileError (``where`` + one line) when malformed."""
    if not isinstance(fused, dict):
        raise QCompileError(f"{where}: fused metadata must be an object, got {type(fused).__name__}")
    parts, sizes, scales = fused.get("parts"), fused.get("sizes"), fused.get("fuse_scales")
    if not (isinstance(parts, list) and parts and all(isinstance(p, str) and p.isidentifier() for p in parts)
            and len(set(parts)) == len(parts)):
        raise QCompileError(f"{where}: fused parts must be distinct module names, got {parts!r}")
    if not (isinstance(sizes, list) and len(sizes) == len(parts)
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)):
        raise QCompileError(f"{where}: fused sizes must be {len(parts)} positive integers, got {sizes!r}")
    if sum(sizes) != n:
        raise QCompileError(f"{where}: fused sizes {sizes} add up to {sum(sizes)}, not the layer's {n} outputs")
    if not (isinstance(scales, list) and len(scales) == len(parts)
            and all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scales)):
        raise QCompileError(f"{where}: fuse_scales must be {len(parts)} finite numbers, got {scales!r}")
    # float32 values, as the checkpoints store them
    return list(parts), list(sizes), [float(torch.tensor(float(s), dtype=torch.float32)) for s in scales]


class FusedQuantLinear(QuantLinear):
    """QuantLinear of a fused weight (``qweight.meta["fused"]``): forward returns the tuple of its
    parts, part i = (x @ W^T)[..., rows of part i] * fuse_scales[i] (+ its slice of the bias)."""

    def __init__(self, qweight: QuantizedWeight, kernels, bias: Optional[torch.Tensor] = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, compiled_rht: Optional[bool] = None,
                 decode_min_m=None):
        super().__init__(qweight, kernels, bias=bias, buckets=buckets, compiled_rht=compiled_rht,
                         decode_min_m=decode_min_m)
        self.parts, self.sizes, self.fuse_scales = check_fused_meta(
            self.meta.get("fused"), self.out_features, f"fused {self.format} layer")
        self.meta["fused"] = {"parts": list(self.parts), "sizes": list(self.sizes),
                              "fuse_scales": list(self.fuse_scales)}
        self.pending = None  # (input, parts) while the parent's forward runs (see the module doc)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        lead = x.shape[:-1]
        y = self.product(self.flat_input(x))
        out, start = [], 0
        for size, scale in zip(self.sizes, self.fuse_scales):
            part = y[:, start:start + size]
            if part.dtype == x.dtype:  # one rounding: an fp16 tensor times a Python float is computed in float32
                part = part * scale
            else:
                part = (part.to(torch.float32) * scale).to(x.dtype)
            if self.bias is not None:
                part = part + self.bias[start:start + size].to(x.dtype)
            out.append(part.reshape(*lead, size))
            start += size
        return tuple(out)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", parts={list(zip(self.parts, self.sizes))}"


class FusedPart(nn.Module):
    """One part of a FusedQuantLinear, in place of the parent's linear of that name: its slice of
    the product the parent's pre-hook computed for this input, else of a product computed here."""

    def __init__(self, fused: FusedQuantLinear, index: int):
        super().__init__()
        self.__dict__["fused"] = fused  # not a child: the parent owns it (one copy in the state dict)
        self.index = index
        self.name = fused.parts[index]
        self.in_features = fused.in_features
        self.out_features = fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pending = self.fused.pending
        if pending is not None and pending[0] is x:
            return pending[1][self.index]
        return self.fused(x)[self.index]

    def extra_repr(self) -> str:
        return f"part {self.index} ({self.name}) of a fused linear, out_features={self.out_features}"


def _compute_fused(parent: nn.Module, args, kwargs) -> None:
    name = parent.__dict__[_INPUT_NAME]
    x = args[0] if args else kwargs.get(name)
    if not isinstance(x, torch.Tensor):
        return  # an unexpected call: the parts compute their products themselves
    for fused_name in parent.__dict__[_FUSED_NAMES]:
        fused = getattr(parent, fused_name)
        fused.pending = (x, fused(x))


def _clear_fused(parent: nn.Module, args, kwargs, output) -> None:
    for fused_name in parent.__dict__[_FUSED_NAMES]:
        getattr(parent, fused_name).pending = None


def install_fused(model: nn.Module, path: str, fused: FusedQuantLinear, where: str = "") -> None:
    """Put ``fused`` at ``path`` (e.g. ``model.layers.0.self_attn.qkv_proj``) and a FusedPart in place
    of each of its parts (``q_proj`` ... linears of the same parent, which must match its sizes and
    in_features); QCompileError (``where`` + one line) when the model has no such parts."""
    where = where or f"fused layer {path}"
    parent_name, _, child = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise QCompileError(f"{where}: the model has no module {parent_name}") from None
    if hasattr(parent, child):
        raise QCompileError(f"{where}: {parent_name} already has a {child!r} attribute "
                            f"({type(getattr(parent, child)).__name__}), it cannot hold the fused layer")
    for part, size in zip(fused.parts, fused.sizes):
        linear = getattr(parent, part, None)
        if isinstance(linear, (QuantLinear, FusedPart)):
            raise QCompileError(f"{where}: fused part {part!r} of {parent_name} is also another artifact layer")
        if not isinstance(linear, nn.Linear):
            have = sorted(n for n, m in parent.named_children() if isinstance(m, (nn.Linear, QuantLinear, FusedPart)))
            raise QCompileError(f"{where}: fused part {part!r} is not a linear of {parent_name} "
                                f"(its linears: {', '.join(have) or 'none'})")
        if (linear.out_features, linear.in_features) != (size, fused.in_features):
            raise QCompileError(f"{where}: fused part {part} is {size}x{fused.in_features} but the model's "
                                f"{parent_name}.{part} is {linear.out_features}x{linear.in_features}")
        if linear.bias is not None and fused.bias is None:
            raise QCompileError(f"{where}: the model's {parent_name}.{part} has a bias but the fused layer has none")
    if _FUSED_NAMES not in parent.__dict__:
        params = [p for p in inspect.signature(parent.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not params:
            raise QCompileError(f"{where}: {parent_name} ({type(parent).__name__}) takes no positional input")
        parent.__dict__[_INPUT_NAME] = params[0].name
        parent.__dict__[_FUSED_NAMES] = ()
        parent.register_forward_pre_hook(_compute_fused, with_kwargs=True)
        parent.register_forward_hook(_clear_fused, with_kwargs=True, always_call=True)
    parent.__dict__[_FUSED_NAMES] += (child,)
    parent.add_module(child, fused)
    for i, part in enumerate(fused.parts):
        setattr(parent, part, FusedPart(fused, i))
