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

Optional, for any kind: ``self_contained_state() -> (state_dict, params_overrides)``, the weights
a pipeline folder stores (``Pipeline.save_pretrained``, ``discon export``) when ``state_dict()``
alone would not rebuild the module, e.g. a KL tokenizer folding its latent statistics (an
external file) into its weights; ``params_overrides`` go into the saved preset (here:
identity statistics). Without it, ``state_dict()`` is stored as is.
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

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """float32 [B,3,H,W] in [0,1] -> raw posterior moments [B,M,h,w] (any M; what
        ``discon cache`` stores, so training can draw a fresh posterior sample each step)."""
        ...

    def latents_from_moments(
        self, moments: torch.Tensor, *, sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """moments from ``encode_moments`` -> normalized latents [B,C,h,w] (mean or sample),
        equal to ``encode(images, sample=...)`` (the discon recipe calls it on cached moments)."""
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
    """MAR-style masked AR transformer: visible continuous tokens (+ discrete grid) -> z.

    Optional attributes the core reads with a default when absent: ``cond_drop_prob`` (0.0:
    probability of dropping the discrete grid in training), ``cond_vocab_size`` (0: no discrete
    conditioning; else the prior's codebook size), ``patch_size`` (1) and ``vae_stride``
    (the ctok's ``downsample``), used by the compatibility checks.
    """

    token_dim: int
    z_dim: int
    seq_len: int
    class_num: int          # labels lie in [0, class_num) (MAR's name)
    label_drop_prob: float  # training: probability of replacing a label by the null class

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        label_drop: torch.Tensor | None = None,
        cond_drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x float [B,N,D], mask bool [B,N] (True = masked), labels int64 [B],
        cond int64 [B,N] or None -> z float [B,N,Dz].

        Values of x at masked positions are ignored. With ``cond=None`` (or a backbone built
        without discrete conditioning) this is exactly MAR's encoder + decoder.
        ``label_drop`` / ``cond_drop``: bool [B] or None; True rows use the learned null class /
        no discrete grid. The core draws them in training and sets them on the unconditional
        half of the batch for classifier-free guidance.
        """
        ...

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """normalized latents [B,C,h,w] -> tokens [B,N,token_dim] in raster order."""
        ...

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """tokens [B,N,token_dim] -> latents [B,C,h,w] (inverse of ``patchify``)."""
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
        cfg_scale: float = 1.0,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """z [M,Dz] -> tokens [M,D]; ``steps`` overrides the preset's number of sampling steps.

        Classifier-free guidance is the head's job (only it knows where guidance applies: on the
        noise prediction of a diffusion head, the velocity of a flow, the mean of a Gaussian).
        With ``cfg_scale != 1`` the rows of ``z`` are ``[cond; uncond]`` (M even, MAR's layout)
        and both halves of the result hold the same guided tokens; ``cfg_scale == 1`` is plain
        conditional sampling. A head without guidance should raise on ``cfg_scale != 1``.
        """
        ...


@runtime_checkable
class Trainable(Protocol):
    """What the ``prior`` and ``tokenizer`` training recipes call (not needed for sampling).

    A prior: ``training_loss(tokens int64 [B,N], labels int64 [B], *, step, generator)``; a
    tokenizer: ``training_loss(images [B,3,H,W] in [0,1], *, generator)``. Both return
    ``(loss scalar tensor, logs: dict[str, float])``.
    """

    def training_loss(self, *args, **kwargs) -> tuple[torch.Tensor, dict]:
        ...


PROTOCOLS: dict[str, type] = {
    "dtok": DiscreteTokenizer,
    "ctok": ContinuousTokenizer,
    "prior": DiscretePrior,
    "backbone": ConditionalBackbone,
    "head": ContinuousHead,
}
