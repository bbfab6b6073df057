"""Building P-EAGLE masks in DataLoader workers, and moving them as a whole.

    loader = DataLoader(dataset, batch_size=1, num_workers=2, pin_memory=True,
                        collate_fn=PeagleMaskCollator(num_depths=8))
    for batch in loader:
        batch = batch.to("cuda", non_blocking=True)
        block_mask = batch["block_mask"][0]

The collator runs where the batch is collated (in the workers when ``num_workers >= 1``), so COD
sampling and the mask build overlap the training step; the BlockMask comes back to the main process
by pickling (its mask_mod is a :class:`~peagle_ext.mask_mod.PeagleMaskMod`). A BlockMask is not a
tensor, and ``BlockMask.to`` moves only its block lists, blocking, and leaves the mask_mod's tensors
where they were: :func:`block_mask_to` and :func:`pin_block_mask` move or pin every tensor of it,
and :class:`PeagleBatch` applies them to the masks in a batch when the DataLoader pins it or the
caller moves it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.data import default_collate

from .block_mask import BACKENDS, build_block_mask
from .cod import generate_cod_sample_indices
from .mask_mod import PeagleMaskMod

# Globals a BlockMask from build_block_mask needs under torch.load's default weights_only=True:
#     with torch.serialization.safe_globals(peagle_ext.data.SAFE_GLOBALS): torch.load(path)
SAFE_GLOBALS = [BlockMask, PeagleMaskMod]

# Per-sample keys that the collator reads and returns as lists (one entry per sample), never
# collates: their lengths differ from sample to sample.
LAYOUT_KEYS = ("anchor_pos", "depth", "lengths", "document_ids")


def _map_block_mask(block_mask: BlockMask, fn: Callable[[torch.Tensor], torch.Tensor]) -> BlockMask:
    """A copy of the BlockMask with ``fn`` applied to its block lists and to its mask_mod's tensors
    (a PeagleMaskMod's; another mask_mod is kept as it is)."""
    mapped = copy.copy(block_mask)  # a BlockMask is its attributes: block lists, sizes, the mask_mod
    for name, value in vars(block_mask).items():
        if isinstance(value, torch.Tensor):
            setattr(mapped, name, fn(value))
    if isinstance(block_mask.mask_mod, PeagleMaskMod):
        mapped.mask_mod = block_mask.mask_mod.map_tensors(fn)
    return mapped


def block_mask_to(block_mask: BlockMask, device, non_blocking: bool = False) -> BlockMask:
    """The BlockMask on ``device``, its mask_mod's tensors included (``BlockMask.to`` leaves those
    behind). With ``non_blocking=True`` copies from pinned memory do not wait for the device."""
    return _map_block_mask(block_mask, lambda tensor: tensor.to(device, non_blocking=non_blocking))


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.is_pinned() else tensor.pin_memory()


def pin_block_mask(block_mask: BlockMask) -> BlockMask:
    """The BlockMask with every tensor (block lists and the mask_mod's) in pinned host memory."""
    return _map_block_mask(block_mask, _pinned)


def _map_batch(value, tensor_fn, mask_fn):
    if isinstance(value, torch.Tensor):
        return tensor_fn(value)
    if isinstance(value, BlockMask):
        return mask_fn(value)
    if isinstance(value, Mapping):
        return {key: _map_batch(item, tensor_fn, mask_fn) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_map_batch(item, tensor_fn, mask_fn) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_batch(item, tensor_fn, mask_fn) for item in value)
    return value


class PeagleBatch(dict):
    """A collated batch (a dict) whose BlockMasks are pinned and moved with its tensors.

    The DataLoader's ``pin_memory=True`` calls :meth:`pin_memory`; :meth:`to` moves everything,
    masks whole (:func:`block_mask_to`).
    """

    def pin_memory(self) -> PeagleBatch:
        return PeagleBatch(_map_batch(dict(self), _pinned, pin_block_mask))

    def to(self, device, non_blocking: bool = False) -> PeagleBatch:
        return PeagleBatch(_map_batch(dict(self), lambda t: t.to(device, non_blocking=non_blocking),
                                      lambda mask: block_mask_to(mask, device, non_blocking)))


def check_sample(index: int, sample) -> None:
    """What :class:`PeagleMaskCollator` reads of a sample, checked before anything is built, each
    mistake named as ``samples[index]['key']``: a loss_mask tensor [S] (or [1, S]); its layout
    entries 1-D tensors, anchor_pos and depth together, lengths or document_ids (not both),
    document_ids one per position; no tensor on the meta device (it holds no values)."""
    if not isinstance(sample, Mapping) or "loss_mask" not in sample:
        raise TypeError(f"sample {index} must be a mapping with a 'loss_mask' entry, got {type(sample).__name__}")
    for key in ("loss_mask",) + LAYOUT_KEYS:
        if key not in sample:
            continue
        value, name = sample[key], f"samples[{index}][{key!r}]"
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.device.type == "meta":
            raise ValueError(f"{name} is on the meta device, which holds no values")
        if key == "loss_mask" and not (value.dim() == 1 or (value.dim() == 2 and value.shape[0] == 1)):
            raise ValueError(f"{name} must have shape [S] or [1, S], got {tuple(value.shape)}")
        if key != "loss_mask" and value.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one sample's), got shape {tuple(value.shape)}")
    if ("anchor_pos" in sample) != ("depth" in sample):
        given, missing = ("anchor_pos", "depth") if "anchor_pos" in sample else ("depth", "anchor_pos")
        raise ValueError(f"samples[{index}] has {given!r} without {missing!r}: give both (its own layout) or "
                         "neither (a sampled one)")
    if "lengths" in sample and "document_ids" in sample:
        raise ValueError(f"samples[{index}] has both 'lengths' and 'document_ids': give one form of its documents")
    positions = sample["loss_mask"].numel()
    if "document_ids" in sample and sample["document_ids"].numel() != positions:
        raise ValueError(f"samples[{index}]['document_ids'] has {sample['document_ids'].numel()} entries, "
                         f"loss_mask {positions}: one document id per position")


class PeagleMaskCollator:
    """A DataLoader ``collate_fn`` that builds each sample's COD layout and BlockMask.

    Each sample is a mapping with ``loss_mask`` (int/bool/float [S], 1 where supervised) and
    optionally its documents, ``lengths`` (int [D], packed from position 0; positions past their sum
    are padding) or ``document_ids`` (int [S], -1 for padding); with neither, one document of S
    positions. A sample that carries ``anchor_pos`` and ``depth`` keeps that layout; otherwise it
    is sampled with :func:`peagle_ext.generate_cod_sample_indices` from torch's default generator,
    which the DataLoader seeds in each worker (reproducible through the DataLoader's ``generator``).

    Returns a :class:`PeagleBatch`: the samples' other fields collated by ``collate_fn`` (torch's
    ``default_collate`` unless given), and, one entry per sample, the lists ``"anchor_pos"``,
    ``"depth"`` and ``"block_mask"`` (plus ``"lengths"`` or ``"document_ids"`` where samples had
    them). The masks are built on the CPU (``backend="auto"``: the compiled kernel where there is
    one) and pickle back to the main process.

    The mask options are those of :func:`peagle_ext.build_block_mask`; the sampling options those
    of :func:`peagle_ext.generate_cod_sample_indices`.
    """

    def __init__(self, *, num_depths: int = 8, down_sample_ratio: float = 0.7, down_sample_ratio_min: float = 0.2,
                 max_anchors: int | None = None, sliding_window: int | None = None,
                 BLOCK_SIZE: int | tuple[int, int] = 128, backend: str = "auto", validate: bool = True,
                 collate_fn: Callable = default_collate):
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
        if not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
        self.sampling = dict(num_depths=num_depths, down_sample_ratio=down_sample_ratio,
                             down_sample_ratio_min=down_sample_ratio_min, max_anchors=max_anchors)
        self.mask_options = dict(sliding_window=sliding_window, BLOCK_SIZE=BLOCK_SIZE, backend=backend,
                                 validate=validate)
        self.collate_fn = collate_fn

    def layout(self, sample: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample's (anchor_pos, depth): its own, or sampled from its loss_mask."""
        if "anchor_pos" in sample:
            return sample["anchor_pos"], sample["depth"]
        loss_mask = sample["loss_mask"]
        return generate_cod_sample_indices(loss_mask.numel(), loss_mask, **self.sampling)

    def block_mask(self, sample: Mapping, anchor_pos: torch.Tensor, depth: torch.Tensor) -> BlockMask:
        if "document_ids" in sample:
            return build_block_mask(anchor_pos, depth, document_ids=sample["document_ids"], **self.mask_options)
        seq_len = sample["loss_mask"].numel()
        lengths = sample.get("lengths")
        if lengths is None:
            lengths = torch.tensor([seq_len], device=anchor_pos.device)
        return build_block_mask(anchor_pos, depth, lengths, seq_len, **self.mask_options)

    def __call__(self, samples) -> PeagleBatch:
        for index, sample in enumerate(samples):
            check_sample(index, sample)
        batch = PeagleBatch(self.collate_fn([{key: value for key, value in sample.items() if key not in LAYOUT_KEYS}
                                             for sample in samples]))
        layouts, masks = [], []
        for index, sample in enumerate(samples):
            try:
                layouts.append(self.layout(sample))
                masks.append(self.block_mask(sample, *layouts[-1]))
            except (TypeError, ValueError) as error:  # say which sample the mask API's message is about
                raise type(error)(f"samples[{index}]: {error}") from None
        batch["anchor_pos"] = [anchor_pos for anchor_pos, _ in layouts]
        batch["depth"] = [depth for _, depth in layouts]
        batch["block_mask"] = masks
        for key in ("lengths", "document_ids"):
            if any(key in sample for sample in samples):
                batch[key] = [sample.get(key) for sample in samples]
        return batch
