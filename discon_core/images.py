"""Image files: PNG grids and single PNGs from ``[B,3,H,W]`` tensors in ``[0,1]``."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] float in [0,1] -> uint8 [B,H,W,3], rounding to nearest."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


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
              upscale: int = 1) -> Path:
    """Save a batch as one PNG grid (``upscale`` enlarges small images, nearest-neighbour)."""
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


def save_line_plot(series: dict[str, tuple[list[float], list[float]]], path: str | os.PathLike,
                   *, title: str = "", xlabel: str = "", ylabel: str = "",
                   size: tuple[int, int] = (640, 400)) -> Path:
    """A small line plot as PNG (no plotting library needed): ``{label: (xs, ys)}``."""
    from PIL import ImageDraw

    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    xs = [x for xx, _ in series.values() for x in xx]
    ys = [y for _, yy in series.values() for y in yy if math.isfinite(y)]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        draw.text((4, to_px(x0, y)[1] - 6), f"{y:.3g}", fill="black")
        x = x0 + frac * (x1 - x0)
        draw.text((to_px(x, y0)[0] - 10, h - bottom + 6), f"{x:.0f}", fill="black")
    draw.text((max(left, w // 2 - 3 * len(title)), 8), title, fill="black")
    draw.text((w // 2 - 20, h - 16), xlabel, fill="black")
    draw.text((4, top - 18), ylabel, fill="black")
    for i, (label, (xx, yy)) in enumerate(series.items()):
        color = colors[i % len(colors)]
        points = [to_px(x, y) for x, y in zip(xx, yy) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        draw.text((w - right - 120, top + 8 + 14 * i), label, fill=color)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
