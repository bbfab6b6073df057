"""Make the drafts of speculators and NeMo Automodel build their BlockMask with peagle_ext.

    import peagle_ext.integrations
    peagle_ext.integrations.enable("speculators")   # speculators' P-EAGLE, EAGLE-3 and DFlash drafts
    peagle_ext.integrations.enable("automodel")     # NeMo Automodel's P-EAGLE drafts
    ...
    peagle_ext.integrations.disable("speculators")  # back to the peer's own create_block_mask

While enabled, the peer's P-EAGLE forward gets its BlockMask from :func:`peagle_ext.build_block_mask`
instead of ``create_block_mask`` over the dense N x N grid, and speculators' EAGLE-3 and DFlash
drafts theirs from :func:`peagle_ext.masks.eagle3_block_mask` and
:func:`peagle_ext.masks.dflash_block_mask`. The masks describe the same blocks, so training
changes only in speed and memory. The patches live on the peer's module and class, so
they reach drafts created before and after :func:`enable`; :func:`disable` puts back exactly the
objects that were there. Both are idempotent. A peer is imported only inside :func:`enable`.

A peer version this module was not tested with is refused (:class:`UntestedPeerVersionError`);
``enable(name, force=True)`` or the environment variable ``PEAGLE_EXT_FORCE_INTEGRATIONS=1`` (or a
comma-separated list of names) applies it anyway.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from .block_mask import build_block_mask
from .masks import dflash_block_mask, eagle3_block_mask

FORCE_ENV = "PEAGLE_EXT_FORCE_INTEGRATIONS"

# name -> (distribution, versions the tests in tests/interop/test_integrations.py ran against)
TESTED_VERSIONS = {
    "speculators": ("speculators", ("0.9.0",)),
    "automodel": ("nemo_automodel", ("0.7.0",)),
}

# Attribute that the patched speculators create_peagle_mask_mod puts on the mask_mod it returns.
_MASK_ARGS = "_peagle_ext_mask_args"


class UntestedPeerVersionError(RuntimeError):
    """The installed peer is a version the integration was not tested with."""


_ABSENT = object()


@dataclass
class _Patch:
    """One attribute of a module or class replaced by peagle_ext; restore() puts back what was there."""

    owner: object
    name: str
    replacement: object
    original: object = _ABSENT  # _ABSENT: the owner had no attribute of its own under this name

    def apply(self) -> None:
        self.original = vars(self.owner).get(self.name, _ABSENT)
        setattr(self.owner, self.name, self.replacement)

    def still_applied(self) -> bool:
        return vars(self.owner).get(self.name, _ABSENT) is self.replacement

    def restore(self) -> None:
        if self.original is _ABSENT:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.original)

    def where(self) -> str:
        owner = self.owner
        owner_name = owner.__name__ if isinstance(owner, ModuleType) else f"{owner.__module__}.{owner.__qualname__}"
        return f"{owner_name}.{self.name}"


def _own_attr(owner, name: str, peer: str):
    """owner.name, which the patch relies on; a clear error when the peer's layout differs."""
    try:
        return vars(owner)[name]
    except KeyError:
        raise RuntimeError(
            f"peagle_ext.integrations cannot apply to this {peer}: {owner.__name__} has no {name!r} "
            f"(tested versions: {', '.join(TESTED_VERSIONS[peer][1])})"
        ) from None


# --- speculators: PEagleDraftModel.forward builds each mask through the module-level
# create_peagle_mask_mod and the instance attribute _create_mask_fn (create_block_mask for
# "simple_flex_attention", dense masks for "eager"/"sdpa").

class _SpeculatorsMaskFn:
    """Data descriptor for ``PEagleDraftModel._create_mask_fn``.

    Eagle3DraftModel.__init__ stores the builder in each instance; a data descriptor on the class
    takes precedence over the instance's own value, so drafts created before enable() are covered
    without touching them. Stores and deletes still go to the instance, so disable() only has to
    remove this descriptor. Drafts whose builder is not speculators' flex ``create_block_mask``
    (the dense masks of "eager" and "sdpa", or a builder set by the user) keep it unchanged.
    """

    def __init__(self, flex_builder: Callable):
        self.flex_builder = flex_builder

    def __get__(self, model, owner=None):
        if model is None:
            return self
        try:
            chosen = _instance_dict(model)["_create_mask_fn"]
        except KeyError:
            raise AttributeError("_create_mask_fn") from None
        if chosen is not self.flex_builder:
            return chosen

        def create_mask_fn(mask_mod, *args, **kwargs):
            mask_args = getattr(mask_mod, _MASK_ARGS, None)
            call = dict(kwargs)
            device = call.pop("device", None)
            if mask_args is None or args or call != _forward_call(mask_args["anchor_pos"].numel()):
                # Not the call PEagleDraftModel.forward makes: leave it to the peer's builder.
                return chosen(mask_mod, *args, **kwargs)
            return _speculators_block_mask(device=device, **mask_args)

        return create_mask_fn

    def __set__(self, model, value):
        _instance_dict(model)["_create_mask_fn"] = value

    def __delete__(self, model):
        del _instance_dict(model)["_create_mask_fn"]


def _instance_dict(model) -> dict:
    # Not model.__dict__ or vars(model): Dynamo in torch 2.11 recurses without end on those inside
    # a descriptor it traces (speculators compiles forward), and this form it follows.
    return object.__getattribute__(model, "__dict__")


def _forward_call(num_elements: int) -> dict:
    """The arguments besides device with which PEagleDraftModel.forward calls _create_mask_fn."""
    return {"B": None, "H": None, "Q_LEN": num_elements, "KV_LEN": num_elements}


# The builders run eagerly: under torch.compile (speculators compiles forward when CUDA is present)
# this is one graph break at the call instead of Dynamo tracing into the argument checks.
@torch.compiler.disable
def _speculators_block_mask(anchor_pos, depth, document_ids, sliding_window, device):
    if device is not None:
        anchor_pos, depth, document_ids = (t.to(device) for t in (anchor_pos, depth, document_ids))
    # speculators' COD gives the chains that start before position 0 (when loss_mask[0] is 1) the
    # anchor -1, and its mask_mod reads their document as document_ids[-1] (tensor indexing wraps
    # around). Prepending that entry and shifting every anchor by one gives exactly the same pairs
    # (the rule compares anchors only with each other) with anchors build_block_mask accepts.
    document_ids = torch.cat([document_ids[-1:], document_ids])
    return build_block_mask(anchor_pos + 1, depth, document_ids=document_ids, sliding_window=sliding_window)


def _speculators_patches() -> list[_Patch]:
    peagle_core = importlib.import_module("speculators.models.peagle.core")
    eagle3_core = importlib.import_module("speculators.models.eagle3.core")
    peer_mask_mod = _own_attr(peagle_core, "create_peagle_mask_mod", "speculators")
    flex_builder = _own_attr(eagle3_core, "create_block_mask", "speculators")

    def create_peagle_mask_mod(anchor_pos, depth, document_ids, sliding_window=None):
        # The peer's own mask_mod (the dense paths evaluate it), labelled with the arguments
        # that build_block_mask needs.
        mask_mod = peer_mask_mod(anchor_pos=anchor_pos, depth=depth, document_ids=document_ids,
                                 sliding_window=sliding_window)
        setattr(mask_mod, _MASK_ARGS, dict(anchor_pos=anchor_pos, depth=depth, document_ids=document_ids,
                                          sliding_window=sliding_window))
        return mask_mod

    return [
        _Patch(peagle_core, "create_peagle_mask_mod", create_peagle_mask_mod),
        _Patch(peagle_core.PEagleDraftModel, "_create_mask_fn", _SpeculatorsMaskFn(flex_builder)),
        _eagle3_patch(eagle3_core, flex_builder),
        _dflash_patch(),
    ]


# --- speculators: Eagle3DraftModel._build_attn_mask builds the (S x S) mask of its first
# test-time step (later steps extend it by a diagonal, without the dense grid), and
# DFlashDraftModel._create_attention_mask the anchor-block mask; both through the instance's
# _create_mask_fn, create_block_mask for "simple_flex_attention". Drafts with any other builder
# (dense masks for "eager"/"sdpa", or one the user set) keep theirs.

def _uses_builder(model, builder) -> bool:
    return _instance_dict(model).get("_create_mask_fn") is builder


def _eagle3_patch(eagle3_core, flex_builder) -> _Patch:
    own = _own_attr(eagle3_core.Eagle3DraftModel, "_build_attn_mask", "speculators")
    peer_mask_mod = _own_attr(eagle3_core, "create_combined_mask_mod", "speculators")

    @torch.compiler.disable
    def _build_attn_mask(self, doc_ids_1d, seq_len, device, sliding_window=None):
        if not _uses_builder(self, flex_builder) or doc_ids_1d.numel() != seq_len:
            return own(self, doc_ids_1d, seq_len, device, sliding_window)
        documents = doc_ids_1d.to(device)
        mask = eagle3_block_mask(documents, seq_len, 1, sliding_window=sliding_window)
        # Each test-time step extends the mask by a diagonal copy of the keys and keeps its
        # mask_mod, so the mask_mod must hold for every copy: the peer's own does.
        mask.mask_mod = peer_mask_mod(documents, seq_len, sliding_window=sliding_window)
        return mask

    return _Patch(eagle3_core.Eagle3DraftModel, "_build_attn_mask", _build_attn_mask)


def _dflash_patch() -> _Patch:
    dflash_core = importlib.import_module("speculators.models.dflash.core")
    model_class = dflash_core.DFlashDraftModel
    own = _own_attr(model_class, "_create_attention_mask", "speculators")
    flex_builder = _own_attr(dflash_core, "_compiled_create_block_mask", "speculators")

    @torch.compiler.disable
    def _create_attention_mask(self, document_ids, total_seq_len, anchor_positions, device, sliding_window=None,
                               sliding_window_non_causal=False):
        documents = document_ids.squeeze(0)
        if not _uses_builder(self, flex_builder) or documents.dim() != 1 or documents.numel() != total_seq_len:
            return own(self, document_ids, total_seq_len, anchor_positions, device, sliding_window,
                       sliding_window_non_causal)
        return dflash_block_mask(documents.to(device), total_seq_len, anchor_positions.to(device), self.block_size,
                                 sliding_window=sliding_window, sliding_window_non_causal=sliding_window_non_causal)

    return _Patch(model_class, "_create_attention_mask", _create_attention_mask)


# --- NeMo Automodel: every P-EAGLE mask comes from _PeagleDraftMixin.build_peagle_block_mask
# (documents given as lengths, no window).

@torch.compiler.disable
def _build_peagle_block_mask(self, anchor_pos, depth, lengths, total_seq_len):
    """build_peagle_block_mask of NeMo Automodel's P-EAGLE drafts, through peagle_ext."""
    return build_block_mask(anchor_pos, depth, lengths, total_seq_len)


def _automodel_patches() -> list[_Patch]:
    peagle_draft = importlib.import_module("nemo_automodel.components.speculative.eagle.peagle_draft")
    mixin = peagle_draft._PeagleDraftMixin
    _own_attr(mixin, "build_peagle_block_mask", "automodel")
    return [_Patch(mixin, "build_peagle_block_mask", _build_peagle_block_mask)]


_PATCHES = {"speculators": _speculators_patches, "automodel": _automodel_patches}
_active: dict[str, list[_Patch]] = {}


def _check_name(name) -> None:
    if name not in TESTED_VERSIONS:
        raise ValueError(f"name must be one of {sorted(TESTED_VERSIONS)}, got {name!r}")


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _forced_by_env(name: str) -> bool:
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    return value in ("1", "all") or name in {part.strip() for part in value.split(",")}


def _check_version(name: str, force: bool) -> None:
    distribution, tested = TESTED_VERSIONS[name]
    found = _installed_version(distribution)
    if found is None:
        raise ModuleNotFoundError(
            f"enable({name!r}) needs the package {distribution} (tested: {', '.join(tested)}), "
            f"which is not installed"
        )
    if found not in tested and not (force or _forced_by_env(name)):
        raise UntestedPeerVersionError(
            f"{distribution} {found} is installed, but peagle_ext.integrations was tested with "
            f"{distribution} {', '.join(tested)} only. To apply it anyway, call enable({name!r}, force=True) "
            f"or set {FORCE_ENV}={name}."
        )


def enable(name: str, *, force: bool = False) -> None:
    """Make the peer ``name`` ("speculators" or "automodel") build its masks with peagle_ext (for
    speculators: its P-EAGLE, EAGLE-3 and DFlash drafts; for NeMo Automodel: its P-EAGLE drafts).

    Idempotent. Raises ModuleNotFoundError when the peer is not installed, and
    UntestedPeerVersionError for an untested version unless ``force=True`` or the environment
    variable PEAGLE_EXT_FORCE_INTEGRATIONS (``1``, ``all`` or a comma-separated list of names)
    says so.
    """
    _check_name(name)
    if name in _active:
        return
    _check_version(name, force)
    patches = _PATCHES[name]()
    for patch in patches:
        patch.apply()
    _active[name] = patches


def disable(name: str) -> None:
    """Put back the peer's own mask building, exactly the objects enable() replaced. Idempotent.

    Refuses (RuntimeError, nothing restored) when something else replaced a patched attribute
    after enable(): restoring would silently undo that change.
    """
    _check_name(name)
    patches = _active.get(name)
    if patches is None:
        return
    replaced = [patch.where() for patch in patches if not patch.still_applied()]
    if replaced:
        raise RuntimeError(f"cannot disable({name!r}): {', '.join(replaced)} was replaced after enable()")
    for patch in reversed(patches):
        patch.restore()
    del _active[name]


def is_enabled(name: str) -> bool:
    """Whether enable(name) is in effect."""
    _check_name(name)
    return name in _active


__all__ = ["FORCE_ENV", "TESTED_VERSIONS", "UntestedPeerVersionError", "disable", "enable", "is_enabled"]
