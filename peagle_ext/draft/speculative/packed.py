"""Linear layers with weights packed by oneDNN, for decoding on the CPU.

A decode multiplies each weight by a handful of rows: one token in plain decoding, K + 1 in a
verification. The default CPU path (``F.linear``, BLAS) costs about 4x more for 6 rows than for 1
on such a small product, and a whole 135M-parameter forward over 6 tokens ~1.65x one over 1 token;
oneDNN's inner product over a weight reordered once into its own layout costs ~1.25x, and the
one-token forward itself runs ~1.7x faster (float32 throughout, the same arithmetic up to the
order of the sums). :func:`packed_linears` swaps that product into a module's ``nn.Linear``
layers for the duration of a ``with`` block; the plain baseline and the verification both use
it, so their ratio stays honest.

The packed copies are kept per module and rebuilt when a weight is modified (its version
counter moves) or replaced.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

# dtypes whose inner product oneDNN packs on CPUs of this generation (float32 everywhere; bfloat16
# with native instructions or emulated)
PACKED_DTYPES = (torch.float32, torch.bfloat16)
# the row count the layout is tuned for (a verification of K = 5 reads 6 rows; 1 row works as well)
_ROWS_HINT = 6


def packing_available() -> bool:
    """Whether this torch build has the oneDNN packed inner product."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _packable(layer: torch.nn.Linear) -> bool:
    weight = layer.weight
    # a layer whose forward is already replaced on the instance (accelerate's hooks do that) is left alone
    return weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and "forward" not in layer.__dict__


class _PackedLayer:
    """One layer's packed weight and the state of the weight it was packed from."""

    def __init__(self, layer: torch.nn.Linear):
        self.layer = layer
        self.packed: torch.Tensor | None = None
        self.source: tuple | None = None

    def refresh(self) -> None:
        weight = self.layer.weight
        source = (id(weight), weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        if source != self.source:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)
            self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if x.dtype != layer.weight.dtype or x.device.type != "cpu" or torch.is_grad_enabled() and (
                x.requires_grad or layer.weight.requires_grad):
            return torch.nn.functional.linear(x, layer.weight, layer.bias)  # what oneDNN's packed path cannot take
        bias = None if layer.bias is None else layer.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packed_layers(module: torch.nn.Module) -> list[_PackedLayer]:
    layers = [m for m in module.modules() if isinstance(m, torch.nn.Linear) and _packable(m)]
    known = _CACHE.get(module)
    if known is None or [p.layer for p in known] != layers:
        known = [_PackedLayer(layer) for layer in layers]
        _CACHE[module] = known
    for packed in known:
        packed.refresh()
    return known


@contextlib.contextmanager
def packed_linears(module: torch.nn.Module, enabled: bool | None = None):
    """Within the block, ``module``'s CPU ``nn.Linear`` layers (float32 or bfloat16 weights) compute
    with oneDNN-packed weights when no gradient is needed; elsewhere (another dtype or device, a
    gradient wanted) they compute as before. ``enabled``: None = when this build can
    (:func:`packing_available`), False = leave the module alone."""
    if enabled is False or (enabled is None and not packing_available()):
        yield module
        return
    layers = _packed_layers(module)
    for packed in layers:
        packed.layer.forward = packed.forward
    try:
        yield module
    finally:
        for packed in layers:
            del packed.layer.forward
