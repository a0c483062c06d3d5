"""Proxy Hessians H = E[x xᵀ] of every linear's input, captured one decoder layer at a time.

The quantizer minimises the proxy loss tr(ΔW H ΔWᵀ) = E_x ‖ΔW x‖², so each linear needs the second
moment of its inputs over calibration tokens. Linears that read the same tensor share one Hessian
(for Llama: q/k/v read the attention input, up/gate the MLP input; o_proj and down_proj have their
own), as in QuIP#/QTIP.

Layer at a time: the hidden states entering layer 0 are captured once (embeddings only), then each
decoder layer is moved to the device, run over the cached states with input hooks on its linears,
and its outputs become the next layer's inputs. Only one layer's weights are ever on the device, so
models larger than GPU memory can be calibrated. The propagated states come from the layers as they
are when run (the original weights, like QuIP#'s offline Hessians), since the hooked forward also
produces the next layer's inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import QCompileError

# eigvalsh costs O(n³) on the host; above this size a non-PSD Hessian is caught by the Cholesky
# factorisation that LDLQ does anyway.
EIGEN_CHECK_MAX_N = 1024


# --------------------------------------------------------------------------------------------
# accumulation
# --------------------------------------------------------------------------------------------
class HessianAccumulator:
    """Running Σ x xᵀ and Σ x (float64) over input rows of one linear, and the row count."""

    def __init__(self, n: int, device=None, name: str = ""):
        self.n = int(n)
        self.name = name
        self.sum_xxT = torch.zeros(self.n, self.n, dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(self.n, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of x [..., n] (any float dtype)."""
        if x.shape[-1] != self.n:
            raise QCompileError(f"{self._label()} expects inputs with last dim {self.n}, got shape {list(x.shape)}")
        rows = x.reshape(-1, self.n)
        if not bool(torch.isfinite(rows).all()):
            raise QCompileError(f"{self._label()} saw NaN/Inf activations; check the model weights and dtype "
                                f"(fp16 overflow?) or run calibration in float32/bfloat16")
        rows = rows.to(device=self.sum_xxT.device, dtype=torch.float64)
        self.sum_xxT.addmm_(rows.T, rows)
        self.sum_x += rows.sum(dim=0)
        self.count += rows.shape[0]

    def _label(self) -> str:
        return f"Hessian of {self.name}" if self.name else "Hessian accumulator"

    def _need_rows(self) -> None:
        if self.count == 0:
            raise QCompileError(f"{self._label()} has no rows: the calibration set is empty or never reached this linear")

    def hessian(self) -> torch.Tensor:
        """E[x xᵀ] (float64 [n, n]), symmetric."""
        self._need_rows()
        h = self.sum_xxT / self.count
        return (h + h.T) * 0.5

    def mean(self) -> torch.Tensor:
        """E[x] (float64 [n])."""
        self._need_rows()
        return self.sum_x / self.count

    def covariance(self) -> torch.Tensor:
        """E[x xᵀ] − μμᵀ (float64), the centred form the reference stores on disk."""
        mu = self.mean()
        return self.hessian() - torch.outer(mu, mu)


# --------------------------------------------------------------------------------------------
# validation and damping
# --------------------------------------------------------------------------------------------
def check_hessian(H: torch.Tensor, n: Optional[int] = None, what: str = "Hessian") -> None:
    """Raise QCompileError unless H is a finite, square, symmetric, positive semidefinite [n, n] matrix.

    Positive semidefiniteness is checked with eigvalsh (λ_min ≥ −tol·λ_max, tol = √eps of the
    dtype) for n ≤ EIGEN_CHECK_MAX_N; larger matrices are checked by the Cholesky in LDLQ.
    """
    if not isinstance(H, torch.Tensor) or H.dim() != 2 or H.shape[0] != H.shape[1]:
        shape = list(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise QCompileError(f"{what} must be a square [n, n] matrix, got {shape}")
    if n is not None and H.shape[0] != n:
        raise QCompileError(f"{what} is {H.shape[0]}x{H.shape[1]} but the weight has {n} input columns")
    if not H.dtype.is_floating_point:
        raise QCompileError(f"{what} must be floating point, got {H.dtype}")
    if not bool(torch.isfinite(H).all()):
        raise QCompileError(f"{what} contains NaN/Inf")
    scale = float(H.abs().max())
    if float((H - H.T).abs().max()) > 1e-5 * scale:
        raise QCompileError(f"{what} is not symmetric (max |H - Hᵀ| = {float((H - H.T).abs().max()):.3g})")
    if H.shape[0] <= EIGEN_CHECK_MAX_N and scale > 0:
        eig = torch.linalg.eigvalsh(H.detach().to("cpu", torch.float64))
        tol = math.sqrt(torch.finfo(H.dtype).eps) * float(eig.abs().max())
        if float(eig.min()) < -tol:
            raise QCompileError(f"{what} is not positive semidefinite (smallest eigenvalue {float(eig.min()):.3g}, "
                                f"largest {float(eig.max()):.3g}); a Hessian must be E[x xᵀ]")


def damp(H: torch.Tensor, sigma: float = 1e-2) -> torch.Tensor:
    """H / mean(diag H) + σ·I (QuIP#'s regularisation; returns H's dtype).

    Normalising by the mean diagonal makes σ relative to the average input power, so σ = 1e-2 means
    1% ridge whatever the activation scale. LDLQ's result is invariant to the normalisation itself;
    the ridge keeps the Cholesky factorisation well conditioned when some input directions are
    (nearly) unseen in calibration. QTIP's H + σ·mean(diag H)·I is the same matrix up to a scale.
    """
    check_hessian(H)
    if sigma < 0 or not math.isfinite(sigma):
        raise QCompileError(f"damping sigma must be a finite non-negative number, got {sigma}")
    H64 = H.to(torch.float64)
    mean_diag = float(torch.diagonal(H64).mean())
    if mean_diag <= 0:
        raise QCompileError("Hessian has a zero diagonal (no input power); the calibration activations are all zero")
    out = H64 / mean_diag
    out.diagonal().add_(sigma)
    return out.to(H.dtype)


# --------------------------------------------------------------------------------------------
# layer-at-a-time capture on transformers decoder models
# --------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by the layer-0 hook once the inputs are captured, to skip the rest of the model."""


def decoder_backbone(model: nn.Module) -> Tuple[nn.Module, nn.ModuleList]:
    """(the module holding ``layers``, the decoder layer list) of a transformers causal LM."""
    for holder in (getattr(model, "model", None), model):
        layers = getattr(holder, "layers", None) if holder is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return holder, layers
    raise QCompileError(f"{type(model).__name__} has no decoder layer list (expected model.model.layers "
                        f"as in transformers Llama-style models)")


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _module_device(module: nn.Module) -> Optional[torch.device]:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


def _batch_kwargs(batch, index: int) -> Dict[str, object]:
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise QCompileError(f"calibration batch {index} is a dict without 'input_ids'")
        kwargs = dict(batch)
    elif isinstance(batch, torch.Tensor):
        kwargs = {"input_ids": batch}
    else:
        raise QCompileError(f"calibration batch {index} must be a LongTensor of token ids or a dict, "
                            f"got {type(batch).__name__}")
    ids = kwargs["input_ids"]
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2) or ids.numel() == 0:
        raise QCompileError(f"calibration batch {index} must be non-empty integer token ids [batch, seq] or [seq], "
                            f"got {ids.dtype} {list(ids.shape)}")
    if ids.dim() == 1:
        kwargs["input_ids"] = ids[None]
    return kwargs


class _LinearInputHooks:
    """Forward pre-hooks on every nn.Linear of one layer, one accumulator per distinct input tensor.

    During the first forward, linears that receive the very same tensor object (q/k/v, up/gate)
    join the accumulator of the first of them (the leader), which alone accumulates afterwards.
    """

    def __init__(self, layer: nn.Module, device, layer_name: str):
        self.device = device
        self.layer_name = layer_name
        self.accumulators: Dict[str, HessianAccumulator] = {}
        self.leaders: Dict[int, str] = {}  # id(accumulator) -> name of the linear that accumulates
        self.live: List[Tuple[torch.Tensor, HessianAccumulator]] = []  # inputs seen in this forward
        self.handles = []
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                self.handles.append(mod.register_forward_pre_hook(self._hook(name, mod)))
        if not self.handles:
            raise QCompileError(f"{layer_name} has no nn.Linear modules to calibrate")

    def _hook(self, name: str, mod: nn.Linear):
        def hook(_module, args):
            x = args[0]
            acc = self.accumulators.get(name)
            if acc is None:  # first forward: find a linear that already read this very tensor
                acc = next((a for t, a in self.live if t is x), None)
                if acc is None:
                    acc = HessianAccumulator(mod.in_features, self.device, f"{self.layer_name}.{name}")
                    self.leaders[id(acc)] = name
                self.accumulators[name] = acc
            if self.leaders[id(acc)] == name:
                acc.add(x)
                self.live.append((x, acc))
            elif not any(t is x and a is acc for t, a in self.live):
                raise QCompileError(f"{self.layer_name}.{name} no longer shares its input with "
                                    f"{self.leaders[id(acc)]}; the layer's data flow changed between batches")
        return hook

    def end_forward(self) -> None:
        self.live.clear()  # drop references to this forward's activations

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@dataclass
class LayerHessians:
    """Hessians of one decoder layer's linears.

    ``hessians`` maps each linear's name inside the layer (e.g. ``self_attn.q_proj``) to its
    accumulator; linears that share an input share the same accumulator object. ``inputs`` are the
    hidden states that entered the layer, one tensor per calibration batch.
    """

    index: int
    layer: nn.Module
    hessians: Dict[str, HessianAccumulator]
    inputs: List[torch.Tensor] = field(default_factory=list)

    def groups(self) -> List[Tuple[Tuple[str, ...], HessianAccumulator]]:
        """(names of the linears sharing it, accumulator) per distinct input, in first-use order."""
        out: List[Tuple[Tuple[str, ...], HessianAccumulator]] = []
        for name, acc in self.hessians.items():
            for i, (names, a) in enumerate(out):
                if a is acc:
                    out[i] = (names + (name,), a)
                    break
            else:
                out.append(((name,), acc))
        return out


def iter_layer_hessians(model: nn.Module, calibration_batches: Iterable, device=None, *,
                        layers: Optional[Sequence[int]] = None,
                        cache_device=None) -> Iterator[LayerHessians]:
    """Yield ``LayerHessians`` for each requested decoder layer (all by default), in order.

    ``calibration_batches``: LongTensor token ids [batch, seq] (or [seq]), or dicts of model kwargs
    with ``input_ids``. ``device``: where each layer runs (default: the model's device).
    ``cache_device``: where the hidden states between layers live (default: ``device``; use "cpu"
    when the calibration activations do not fit on the GPU). Only the embeddings/rotary tables and
    the current layer are moved to ``device``; everything is moved back afterwards. Layers after
    the last requested one are not run.
    """
    backbone, decoder_layers = decoder_backbone(model)
    if device is None:
        device = _module_device(model) or torch.device("cpu")
    device = torch.device(device)
    cache_device = device if cache_device is None else torch.device(cache_device)
    n_layers = len(decoder_layers)
    wanted = sorted(set(range(n_layers) if layers is None else (int(i) for i in layers)))
    bad = [i for i in wanted if not 0 <= i < n_layers]
    if bad:
        raise QCompileError(f"layer index {bad[0]} out of range: the model has {n_layers} decoder layers")
    if not wanted:
        return
    was_training = model.training
    model.eval()
    try:
        hidden, layer_kwargs = _capture_first_layer_inputs(backbone, decoder_layers[0], calibration_batches,
                                                           device, cache_device)
        for idx in range(wanted[-1] + 1):
            layer = decoder_layers[idx]
            home = _module_device(layer)
            layer.to(device)
            hooks = _LinearInputHooks(layer, device, f"layer {idx}") if idx in wanted else None
            outputs = []
            try:
                with torch.no_grad():
                    for h, kw in zip(hidden, layer_kwargs):
                        out = layer(h.to(device), **_move(kw, device))
                        if isinstance(out, (tuple, list)):
                            out = out[0]
                        if hooks is not None:
                            hooks.end_forward()
                        outputs.append(out.to(cache_device))
            finally:
                if hooks is not None:
                    hooks.remove()
                if home is not None:
                    layer.to(home)
            if hooks is not None:
                yield LayerHessians(idx, layer, dict(hooks.accumulators), hidden)
            hidden = outputs
    finally:
        model.train(was_training)


def _capture_first_layer_inputs(backbone: nn.Module, first_layer: nn.Module, calibration_batches: Iterable,
                                device: torch.device, cache_device: torch.device):
    """Run the embeddings (not the layers) on every batch; return layer-0 hidden states and kwargs."""
    # Everything in the backbone except the layer list (embeddings, rotary tables, final norm) is
    # small: move it to the device for the capture, then back.
    homes = []
    for name, child in backbone.named_children():
        if name != "layers":
            home = _module_device(child)
            if home is not None:
                homes.append((child, home))
                child.to(device)
    hidden: List[torch.Tensor] = []
    layer_kwargs: List[Dict[str, object]] = []

    def catch(_module, args, kwargs):
        kwargs = dict(kwargs)
        h = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if args[1:]:
            raise QCompileError("decoder layers called with extra positional arguments are not supported")
        hidden.append(h.detach().to(cache_device))
        layer_kwargs.append(_move(rest, cache_device))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        count = 0
        with torch.no_grad():
            for i, batch in enumerate(calibration_batches):
                kwargs = _move(_batch_kwargs(batch, i), device)
                kwargs["use_cache"] = False
                try:
                    backbone(**kwargs)
                except _StopForward:
                    pass
                count += 1
                if len(hidden) != count:
                    raise QCompileError(f"calibration batch {i} never reached decoder layer 0")
        if count == 0:
            raise QCompileError("the calibration set is empty: give at least one batch of token ids")
    finally:
        handle.remove()
        for child, home in homes:
            child.to(home)
    return hidden, layer_kwargs


def capture_layer_hessians(model: nn.Module, calibration_batches: Iterable, layer_idx: int, device=None,
                           cache_device=None) -> Dict[str, HessianAccumulator]:
    """Hessians of decoder layer ``layer_idx`` (linear name -> accumulator, shared inputs shared).

    Runs layers 0..layer_idx-1 to produce the layer's inputs; to calibrate every layer, iterate
    ``iter_layer_hessians`` instead, which runs each layer only once.
    """
    for captured in iter_layer_hessians(model, calibration_batches, device, layers=[layer_idx],
                                        cache_device=cache_device):
        return captured.hessians
    raise QCompileError(f"layer {layer_idx} was not captured")  # unreachable: iter raises first
