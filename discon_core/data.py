"""Data plumbing the cache and the trainer share: datasets built by name from a config, batch
collation, and the seeded, resumable batch order.

A dataset (the built-ins are in ``discon_plugins/datasets.py``; plugins add theirs through the
``discon_register_datasets`` hook) returns ``(image, label)`` with ``image`` float32
``[3, H, W]`` in ``[0, 1]`` from ``get(index, flip)``: the horizontal flip is chosen by the caller
(the :class:`BatchOrder`), never by a hidden RNG inside the dataset, so a batch is a pure function
of ``(seed, step)``: exact resume and any number of data workers give the same data.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import hooks
from .config import check_keys
from .errors import DisconError, close_matches


def class_names(spec: list | str | None) -> list[str]:
    """A preset's ``classes``: a list of names, or the name of a dataset whose names to use."""
    if isinstance(spec, str):
        known = {k: v.fn for k, v in hooks.datasets().items() if getattr(v.fn, "classes", None)}
        if spec not in known:
            raise DisconError(f"classes: unknown dataset {spec!r}; datasets with class names: "
                              f"{', '.join(known)} (or give the list of names)")
        return list(known[spec].classes)
    return [str(c) for c in spec or []]


def build_dataset(spec: Mapping[str, Any]):
    """A dataset from a config mapping ``{type: fashion-mnist|folder, ...its arguments}``."""
    known = hooks.datasets()
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise DisconError(f"data must be a mapping with a 'type' ({', '.join(known)}), "
                          f"got {spec!r}")
    kind = spec["type"]
    if kind not in known:
        raise DisconError(f"unknown data.type {kind!r}; known: {', '.join(known)}"
                          f"{close_matches(str(kind), known)}")
    cls = known[kind].fn
    accepted = list(inspect.signature(cls).parameters)
    args = {k: v for k, v in spec.items() if k != "type"}
    check_keys(args, accepted, f"data (type {kind!r})", "option")
    return cls(**args)


def collate_images(items: Sequence[tuple[torch.Tensor, int] | None]) -> dict[str, torch.Tensor]:
    """Stack (image, label) items into {'images' [B,3,H,W], 'labels' [B]}, dropping unreadable
    (None) items; the trainer counts the dropped ones."""
    kept = [it for it in items if it is not None]
    if not kept:
        raise DisconError("a whole batch of images was unreadable; check the dataset folder")
    return {"images": torch.stack([x for x, _ in kept]),
            "labels": torch.tensor([y for _, y in kept], dtype=torch.int64)}


# ------------------------------------------------------------------------------------------------
# Batch order

class BatchOrder:
    """Which items (and flips) make up global batch number ``step``: a pure function of
    ``(seed, step)``.

    Each epoch is a fresh permutation drawn from ``Generator(seed, epoch)``; the trailing partial
    batch is dropped. Under DDP rank ``r`` of ``world`` takes the ``r``-th contiguous slice of the
    global batch, so N processes see together exactly what one process sees.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int = 0, *, rank: int = 0,
                 world: int = 1, flip: bool = True):
        if global_batch <= 0 or global_batch % world:
            raise DisconError(f"batch_size (global) must be a positive multiple of the number of "
                              f"processes ({world}), got {global_batch}")
        if num_items < global_batch:
            raise DisconError(f"the dataset has {num_items} items, fewer than one global batch "
                              f"({global_batch}); lower batch_size or add data")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.rank, self.world, self.flip = rank, world, flip
        self.steps_per_epoch = num_items // global_batch
        self._epoch: int | None = None
        self._perm = self._flips = None

    def position(self, step: int) -> dict[str, int]:
        """The data position of global batch ``step`` (stored in checkpoints)."""
        return {"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch,
                "global_batch": self.global_batch, "seed": self.seed, "num_items": self.num_items}

    def _load_epoch(self, epoch: int) -> None:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.num_items, generator=g)
            self._flips = torch.rand(self.num_items, generator=g) < 0.5
            self._epoch = epoch

    def batch(self, step: int) -> list[tuple[int, bool]]:
        """This rank's ``(index, flip)`` pairs of global batch ``step``."""
        epoch, b = divmod(step, self.steps_per_epoch)
        self._load_epoch(epoch)
        per_rank = self.global_batch // self.world
        start = b * self.global_batch + self.rank * per_rank
        idx = self._perm[start:start + per_rank]
        flips = self._flips[start:start + per_rank] if self.flip else torch.zeros(per_rank, dtype=torch.bool)
        return [(int(i), bool(f)) for i, f in zip(idx, flips)]


class StepBatches(torch.utils.data.Dataset):
    """Map-style view "step -> collated batch" for a DataLoader with ``batch_size=None``: workers
    prefetch whole batches and the order stays a pure function of the step."""

    def __init__(self, dataset, order: BatchOrder, collate, start_step: int, end_step: int):
        self.dataset, self.order, self.collate = dataset, order, collate
        self.start_step, self.end_step = start_step, end_step

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __getitem__(self, j: int):
        pairs = self.order.batch(self.start_step + j)
        return self.collate([self.dataset.get(i, f) for i, f in pairs])
