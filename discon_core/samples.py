"""Sample sets for evaluation (``discon sample``): N class-balanced images from any pipeline.

    discon sample --prior rar-b --dtok maskgit-vq --num 50000 --out samples/rar-b
    torchrun --nproc_per_node 8 -m discon_core.cli sample ... --out samples/x   # sharded

``OUT/`` receives one PNG per image (``images/img_000123.png``), ``samples.npz`` in ADM's layout
(``arr_0`` uint8 [N,H,W,3], ``arr_1`` int64 labels; what MAR's and RAR's evaluations read) and
``sample.json``, the complete sampling configuration (presets, checkpoints with sha256, steps,
guidance, temperatures, seed, dtype, device).

Labels are class-balanced (image ``i`` has class ``i % num_classes``, so N / num_classes per class
when N is a multiple). Batch ``k`` covers images ``[k*B, (k+1)*B)`` and draws from its own
generator seeded by ``(seed, k)``, so the result does not depend on how the batches were split
over processes or interrupted: a rerun skips the finished batches (``parts/batch-*.npz``, each
written atomically) and continues; rank ``r`` of ``W`` takes batches ``r, r+W, ...``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DisconError

# seeds of batch k: independent streams for (seed, k) without collisions for k < 1e6
SEED_STRIDE = 1_000_003


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """int64 [num]: image i has class i % num_classes."""
    if num < num_classes:
        raise DisconError(f"--num {num} is smaller than the {num_classes} classes: a class-"
                          "balanced set needs at least one image per class")
    return torch.arange(num) % num_classes


def _batch_seed(seed: int, k: int) -> int:
    return seed * SEED_STRIDE + k


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    from .checkpoints import atomic_path
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_samples(generate: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                  out: str | os.PathLike, *, num: int, num_classes: int, batch_size: int,
                  seed: int, config: Mapping[str, Any], device: torch.device | str = "cpu",
                  rank: int = 0, world: int = 1, progress: bool = True) -> Path:
    """Generate ``num`` images with ``generate(labels, generator) -> [B,3,H,W] in [0,1]`` into
    ``out``; returns the path of ``samples.npz`` (written by rank 0 once every batch exists).

    ``config`` is recorded in ``sample.json``; a rerun with a different ``config``, ``num``,
    ``batch_size`` or ``seed`` into the same folder is refused, naming the difference."""
    from PIL import Image
    from tqdm.auto import tqdm

    out = Path(out)
    parts = out / "parts"
    labels = balanced_labels(num, num_classes)
    info = {"num": num, "num_classes": num_classes, "batch_size": batch_size, "seed": seed,
            **config}
    meta = out / "sample.json"
    if meta.is_file():
        try:
            old = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DisconError(f"{meta} is not valid JSON; delete {out} to sample afresh") from None
        diff = sorted(k for k in set(old) | set(info)
                      if k not in ("complete", "labels") and old.get(k) != info.get(k))
        if diff:
            raise DisconError(f"{out} holds samples made with other settings ({', '.join(diff)}: "
                              f"{ {k: old.get(k) for k in diff} } there, "
                              f"{ {k: info.get(k) for k in diff} } now); use another --out")
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
        (out / "images").mkdir(exist_ok=True)
        meta.write_text(json.dumps({**info, "complete": False}, indent=2))
    batches = range(rank, -(-num // batch_size), world)
    todo = [k for k in batches if not (parts / f"batch-{k:06d}.npz").is_file()]
    bar = tqdm(total=len(batches), initial=len(batches) - len(todo), unit="batch",
               desc="sample", disable=not progress or rank != 0)
    for k in todo:
        lab = labels[k * batch_size:(k + 1) * batch_size]
        g = torch.Generator(device).manual_seed(_batch_seed(seed, k))
        images = generate(lab.to(device), g).float()
        if images.shape[0] != len(lab) or not torch.isfinite(images).all():
            raise DisconError(f"batch {k}: the pipeline returned {list(images.shape)} images "
                              "(non-finite values or a wrong count)")
        arr = images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for i, a in enumerate(arr):
            Image.fromarray(a).save(out / "images" / f"img_{k * batch_size + i:06d}.png")
        _write_npz(parts / f"batch-{k:06d}.npz", arr_0=arr, arr_1=lab.numpy())
        bar.update(1)
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    final = out / "samples.npz"
    if rank == 0:
        arrays = [np.load(parts / f"batch-{k:06d}.npz") for k in range(-(-num // batch_size))]
        _write_npz(final, arr_0=np.concatenate([a["arr_0"] for a in arrays]),
                   arr_1=np.concatenate([a["arr_1"] for a in arrays]))
        meta.write_text(json.dumps({**info, "complete": True}, indent=2))
    return final
