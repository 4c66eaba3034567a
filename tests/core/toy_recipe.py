"""A small stand-in recipe for the trainer tests (``recipe: tests.core.toy_recipe:make``).

A two-layer regression net on fixed random data. Options (``recipe_options``):
``noise``: draw input masks from the trainer's generator and use dropout (the global torch
RNG), so that exact resume must restore both; ``nan_at_step``: return a NaN loss at that step;
``block_at_step``: at that step write ``OUT/blocked`` and wait forever (the test then SIGKILLs
the process, mid-run, between two checkpoints).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from discon_core.recipes import Recipe, plain_no_decay


class ToyData:
    num_classes = 1

    def __init__(self, n: int = 96):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def get(self, index: int, flip: bool = False):
        x = self.x[index]
        return {"x": -x if flip else x, "y": self.y[index]}


def collate(items):
    return {"x": torch.stack([it["x"] for it in items]), "y": torch.stack([it["y"] for it in items]),
            "labels": torch.zeros(len(items), dtype=torch.int64)}


class ToyModel(nn.Module):
    def __init__(self, out: Path, noise: bool, nan_at_step: int | None, block_at_step: int | None):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 4)
        self.drop = nn.Dropout(0.1 if noise else 0.0)
        self.out, self.noise = out, noise
        self.nan_at_step, self.block_at_step = nan_at_step, block_at_step

    def forward(self, batch, *, step: int, generator=None):
        if step == self.block_at_step:
            (self.out / "blocked").write_text(str(step))
            while True:
                time.sleep(0.05)
        x = batch["x"]
        if self.noise:
            x = x * (torch.rand(x.shape, generator=generator, device=x.device) > 0.2)
        pred = self.fc2(self.drop(torch.nn.functional.gelu(self.norm(self.fc1(x)))))
        loss = (pred - batch["y"]).pow(2).mean()
        if step == self.nan_at_step:
            loss = loss * float("nan")
        return loss, {"mse": loss.detach()}


def make(cfg, device) -> Recipe:
    opts = dict(cfg.recipe_options)
    model = ToyModel(Path(cfg.out), bool(opts.get("noise", False)), opts.get("nan_at_step"),
                     opts.get("block_at_step"))
    return Recipe("toy", model, ToyData(), collate, plain_no_decay)
