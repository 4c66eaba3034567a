"""The five component interfaces of the discon contract (shared/spec/CONTRACT.md, v1).

They are Protocols: a component satisfies one by having the attributes and methods, not by
inheriting. Every component is also a ``torch.nn.Module``; anything built with trained weights
is returned in ``eval()`` mode.

Conventions that hold for every kind:

* images: float32 ``[B, 3, H, W]``, RGB, values in ``[0, 1]``;
* discrete tokens: int64 ``[B, h, w]`` in ``[0, codebook_size)``; sequences are row-major;
* continuous latents: float ``[B, C, h, w]``, already normalized for modelling (the
  tokenizer applies and undoes its own normalization);
* sequences: ``[B, N]`` or ``[B, N, D]`` with ``N = h * w`` in raster order;
* class labels: int64 ``[B]`` in ``[0, num_classes)``;
* masks: bool ``[B, N]``, ``True`` = masked (unknown, to be predicted);
* every stochastic method takes ``generator: torch.Generator | None``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

KINDS: dict[str, str] = {
    "dtok": "DiscreteTokenizer",
    "ctok": "ContinuousTokenizer",
    "prior": "DiscretePrior",
    "backbone": "ConditionalBackbone",
    "head": "ContinuousHead",
}


@runtime_checkable
class DiscreteTokenizer(Protocol):
    """Images <-> discrete token grids (e.g. MaskGIT VQGAN, 1024 codes, f16)."""

    codebook_size: int
    downsample: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float32 [B,3,H,W] in [0,1] -> int64 [B, H/downsample, W/downsample]."""
        ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 [B,h,w] in [0, codebook_size) -> float32 [B,3,h*downsample,w*downsample] in [0,1]."""
        ...


@runtime_checkable
class ContinuousTokenizer(Protocol):
    """Images <-> normalized continuous latents (e.g. VA-VAE f16d32, LDM KL-16)."""

    latent_channels: int
    downsample: int

    def encode(
        self,
        images: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """float32 [B,3,H,W] in [0,1] -> normalized latents [B,C,h,w].

        The posterior mean, or a posterior sample drawn with ``generator`` when ``sample``.
        """
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalized latents [B,C,h,w] -> float32 [B,3,H,W] in [0,1]."""
        ...


@runtime_checkable
class DiscretePrior(Protocol):
    """A class-conditional autoregressive model over discrete token sequences (e.g. RAR)."""

    codebook_size: int
    seq_len: int
    num_classes: int

    def logits(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced raster-order logits.

        tokens int64 [B,N], labels int64 [B] -> float [B,N,codebook_size], where
        ``logits[:, i]`` is the distribution of ``tokens[:, i]`` given the class and ``tokens[:, :i]``.
        """
        ...

    def sample(
        self,
        labels: torch.Tensor,
        *,
        cfg_scale: float,
        temperature: float,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """labels int64 [B] -> tokens int64 [B,h,w].

        For RAR ``cfg_scale`` is the official ``guidance_scale`` (0 disables CFG); extra sampler
        options are keywords with the official names (e.g. ``guidance_scale_pow``).
        """
        ...


@runtime_checkable
class ConditionalBackbone(Protocol):
    """MAR-style masked AR transformer: visible continuous tokens (+ discrete grid) -> z."""

    token_dim: int
    z_dim: int
    seq_len: int

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x float [B,N,D], mask bool [B,N] (True = masked), labels int64 [B],
        cond int64 [B,N] or None -> z float [B,N,Dz].

        Values of x at masked positions are ignored. With ``cond=None`` (or a backbone built
        without discrete conditioning) this is exactly MAR's encoder + decoder.
        """
        ...


@runtime_checkable
class ContinuousHead(Protocol):
    """Per-token generative head p(x | z) (MAR's DiffLoss shape)."""

    token_dim: int
    z_dim: int

    def loss(
        self, target: torch.Tensor, z: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """target [M,D], z [M,Dz] -> per-token loss [M]."""
        ...

    def sample(
        self,
        z: torch.Tensor,
        *,
        temperature: float = 1.0,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """z [M,Dz] -> tokens [M,D]; ``steps`` overrides the preset's number of sampling steps."""
        ...


PROTOCOLS: dict[str, type] = {
    "dtok": DiscreteTokenizer,
    "ctok": ContinuousTokenizer,
    "prior": DiscretePrior,
    "backbone": ConditionalBackbone,
    "head": ContinuousHead,
}
