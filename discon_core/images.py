"""Images as tensors ``[B,3,H,W]`` in ``[0,1]``: uint8 conversion, PSNR, PNG grids and files."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def uint8_tensor(images: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] float in [0,1] -> uint8 [B,C,H,W] on the CPU, rounding to nearest (what the
    evaluation scores and what a PNG holds)."""
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] float in [0,1] -> uint8 [B,H,W,3] array (image files)."""
    return uint8_tensor(images).permute(0, 2, 3, 1).numpy()


def psnr(reference: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``images`` against ``reference`` (both ``[B,C,H,W]`` in [0,1];
    ``images`` clamped to it first, as they would be displayed)."""
    mse = (reference.float() - images.float().clamp(0, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile a batch into one uint8 [H', W', 3] array, ``nrow`` images per row (default: square)."""
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
              upscale: int | None = None) -> Path:
    """Save a batch as one PNG grid; ``upscale`` enlarges it (nearest-neighbour), by default
    so that small images (Fashion-MNIST's 32 px) show at 128 px."""
    upscale = upscale or max(1, 128 // images.shape[-1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(make_grid(images, nrow))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    img.save(path)
    return path


def save_images(images: torch.Tensor, folder: str | os.PathLike, prefix: str = "img",
                start: int = 0) -> list[Path]:
    """Save each image as ``folder/{prefix}_{index:05d}.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(to_uint8(images)):
        p = folder / f"{prefix}_{start + i:05d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths

