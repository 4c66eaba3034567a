"""MaskGIT VQGAN, the discrete tokenizer RAR uses (kind ``dtok``, factory ``maskgit-vq``).

Full size (``maskgit-vq`` preset): f16, 1024 codes x 256, 54.5M parameters; official file
``maskgit-vqgan-imagenet-f16-256.bin`` (a plain state dict: ``encoder.*``, ``decoder.*``,
``quantize.embedding.weight``) loads strictly::

    from discon_core import build
    tok = build("dtok", "maskgit-vq", checkpoint="pretrained")
    tokens = tok.encode(images)          # [B,3,256,256] in [0,1] -> int64 [B,16,16]
    recon = tok.decode(tokens)           # -> [B,3,256,256] in [0,1] (clamped)

The network works on images in [0, 1] directly (no [-1,1] conversion) and the decoder output
is clamped to [0, 1], as in the official tokenizer. ``decode_raw`` gives the unclamped output.

Training from scratch (``training_loss``): reconstruction + codebook + commitment losses with a
straight-through estimator, and dead-code restart: every ``dead_code_restart_every`` calls,
codes that no input chose since the last restart are re-seeded from current encoder outputs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from discon_core.errors import DisconError
from discon_core.hooks import hookimpl
from discon_plugins.autoencoder import MASKGIT, Decoder, Encoder, check_images, check_widths
from discon_core.images import psnr

REC_LOSSES = ("mse", "l1")


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer with squared-L2 distances (no normalisation).

    Key: ``embedding.weight`` ``[codebook_size, embedding_dim]``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        # The official init; encoder outputs are much larger, hence dead-code restart in training.
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def compute_distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared distances ``|z|^2 + |e|^2 - 2 z.e``: z ``[..., C]`` (channels last) -> ``[M, K]``
        with ``M`` = number of vectors in z (computed like the official ``addmm``)."""
        flat = z.reshape(-1, self.embedding_dim)
        codebook_t = self.embedding.weight.t()
        norms = flat.pow(2).sum(1, keepdim=True) + codebook_t.pow(2).sum(0, keepdim=True)
        return torch.addmm(norms, flat, codebook_t, alpha=-2.0)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, C, h, w]`` -> nearest code ids int64 ``[B, h, w]``."""
        b, _, h, w = z.shape
        return self.compute_distances(z.permute(0, 2, 3, 1)).argmin(1).view(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code ids ``[B, h, w]`` -> codebook vectors ``[B, C, h, w]`` (``get_codebook_entry``)."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, h, w]`` -> (quantized ``[B, C, h, w]``, indices int64 ``[B, h, w]``)."""
        idx = self.indices(z)
        return self.lookup(idx), idx


class MaskGitVQ(nn.Module):
    """MaskGIT VQGAN tokenizer (DiscreteTokenizer): images in [0,1] <-> int64 token grids."""

    def __init__(self, *, channel_mult: Sequence[int], hidden_channels: int, num_res_blocks: int,
                 z_channels: int, num_channels: int, dropout: float, codebook_size: int,
                 commitment_cost: float, num_groups: int, dead_code_restart_every: int,
                 rec_loss: str):
        super().__init__()
        check_widths(hidden_channels, channel_mult, num_groups, ch_name="hidden_channels",
                     mult_name="channel_mult")
        if codebook_size < 2:
            raise DisconError(f"codebook_size must be >= 2, got {codebook_size}")
        if rec_loss not in REC_LOSSES:
            raise DisconError(f"rec_loss must be one of {', '.join(REC_LOSSES)}, got {rec_loss!r}")
        if dead_code_restart_every < 0:
            raise DisconError("dead_code_restart_every must be >= 0 (0 disables the restart), "
                              f"got {dead_code_restart_every}")
        common = dict(ch=hidden_channels, ch_mult=channel_mult, num_res_blocks=num_res_blocks,
                      dropout=dropout, num_groups=num_groups, style=MASKGIT)
        self.encoder = Encoder(in_channels=num_channels, out_channels=z_channels, **common)
        self.decoder = Decoder(z_channels=z_channels, out_ch=num_channels, **common)
        self.quantize = VectorQuantizer(codebook_size, z_channels)
        self.codebook_size = codebook_size
        self.downsample = 2 ** (len(channel_mult) - 1)
        self.num_channels = num_channels
        self.commitment_cost = commitment_cost
        self.dead_code_restart_every = dead_code_restart_every
        self.rec_loss = rec_loss
        # Training bookkeeping, not weights: kept out of the state dict (official key set).
        self.register_buffer("code_usage", torch.zeros(codebook_size), persistent=False)
        self._training_calls = 0

    # ------------------------------------------------------------------ interface
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images float ``[B, 3, H, W]`` in [0, 1] -> token ids int64 ``[B, H/f, W/f]``."""
        check_images(images, channels=self.num_channels, downsample=self.downsample,
                     what="maskgit-vq encode")
        # computed in the weights' dtype (build(dtype=...)); fp32 images are the common input
        return self.quantize.indices(self.encoder(images.to(self.quantize.embedding.weight.dtype)))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids int64 ``[B, h, w]`` -> images ``[B, 3, h*f, w*f]`` clamped to [0, 1]."""
        return self.decode_raw(tokens).clamp(0.0, 1.0)

    def decode_raw(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> the decoder output before the clamp (``[B, 3, h*f, w*f]``).

        Also accepts the official ``[B, N]`` layout when N is a perfect square (raster order).
        """
        return self.decoder(self.quantize.lookup(self.check_tokens(tokens)))

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Validate token ids (int, in range) and return them as ``[B, h, w]``."""
        if not isinstance(tokens, torch.Tensor):
            raise DisconError(f"maskgit-vq decode: tokens must be an int64 tensor [B,h,w], got "
                              f"{type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise DisconError(f"maskgit-vq decode: tokens must be integer ids (int64), got "
                              f"{tokens.dtype}")
        if tokens.ndim == 2:
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise DisconError(f"maskgit-vq decode: [B,N] tokens need a square N, got "
                                  f"N={tokens.shape[1]}; pass the grid [B,h,w] instead")
            tokens = tokens.reshape(tokens.shape[0], side, side)
        if tokens.ndim != 3:
            raise DisconError(f"maskgit-vq decode: tokens must be [B,h,w], got shape "
                              f"{tuple(tokens.shape)}")
        if tokens.numel() and tokens.device.type != "meta":
            lo, hi = tokens.min().item(), tokens.max().item()
            if lo < 0 or hi >= self.codebook_size:
                raise DisconError(f"maskgit-vq decode: token ids must be in [0, "
                                  f"{self.codebook_size}) (codebook_size={self.codebook_size}), "
                                  f"got range [{lo}, {hi}]")
        return tokens.long()

    # ------------------------------------------------------------------ training
    def training_loss(self, images: torch.Tensor, *, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """VQ-VAE objective on images ``[B, 3, H, W]`` in [0, 1] -> (scalar loss, logs).

        loss = rec + |sg(z) - e|^2 + commitment_cost * |z - sg(e)|^2, with the straight-through
        estimator feeding the decoder. ``generator`` drives the dead-code restart draws.
        """
        check_images(images, channels=self.num_channels, downsample=self.downsample,
                     what="maskgit-vq training_loss")
        z = self.encoder(images)
        idx = self.quantize.indices(z.detach())
        e = self.quantize.lookup(idx)
        codebook = F.mse_loss(e, z.detach())
        commitment = F.mse_loss(z, e.detach())
        z_q = z + (e - z).detach()  # straight-through: decoder gradients flow to the encoder
        recon = self.decoder(z_q)
        rec = F.mse_loss(recon, images) if self.rec_loss == "mse" else F.l1_loss(recon, images)
        loss = rec + codebook + self.commitment_cost * commitment

        restarted = self._track_and_restart(z.detach(), idx, generator)
        with torch.no_grad():
            used = torch.bincount(idx.flatten(), minlength=self.codebook_size).gt(0).sum().item()
            logs = {"loss": loss.item(), "rec": rec.item(), "codebook": codebook.item(),
                    "commitment": commitment.item(),
                    "psnr": psnr(images, recon).mean().item(),
                    "codes_used": float(used), "codes_restarted": float(restarted)}
        return loss, logs

    @torch.no_grad()
    def _track_and_restart(self, z: torch.Tensor, idx: torch.Tensor,
                           generator: torch.Generator | None) -> int:
        """Count code usage; every ``dead_code_restart_every`` calls re-seed the unused codes
        from randomly chosen encoder outputs of this batch. Returns how many were re-seeded."""
        if self.dead_code_restart_every == 0:
            return 0
        self.code_usage += torch.bincount(idx.flatten(), minlength=self.codebook_size).to(
            self.code_usage)
        self._training_calls += 1
        if self._training_calls % self.dead_code_restart_every:
            return 0
        dead = (self.code_usage == 0).nonzero().flatten()
        self.code_usage.zero_()
        if dead.numel() == 0:
            return 0
        vectors = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        gen_device = generator.device if generator is not None else torch.device("cpu")
        pick = torch.randint(vectors.shape[0], (dead.numel(),), generator=generator,
                             device=gen_device).to(vectors.device)
        self.quantize.embedding.weight[dead.to(vectors.device)] = vectors[pick].to(
            self.quantize.embedding.weight.dtype)
        return int(dead.numel())


def maskgit_vq(channel_mult: Sequence[int] = (1, 1, 2, 2, 4), hidden_channels: int = 128,
               num_res_blocks: int = 2, z_channels: int = 256, num_channels: int = 3,
               dropout: float = 0.0, codebook_size: int = 1024, commitment_cost: float = 0.25,
               num_groups: int = 32, dead_code_restart_every: int = 20,
               rec_loss: str = "mse", num_resolutions: int | None = None,
               resolution: int | None = None) -> MaskGitVQ:
    """MaskGIT VQGAN with the official hyperparameter names (``PretrainedTokenizer`` config).

    ``num_groups`` (GroupNorm groups; 32 officially), ``dead_code_restart_every`` (training
    calls between dead-code restarts; 0 disables) and ``rec_loss`` ("mse" or "l1") are discon
    additions. The codebook vector width is ``z_channels``. The official config also carries
    ``num_resolutions`` (must equal ``len(channel_mult)``) and ``resolution`` (the nominal image
    size, a multiple of the down-sampling factor); both are accepted so that config builds
    verbatim, and checked, since the architecture follows from ``channel_mult``.
    """
    if num_resolutions is not None and num_resolutions != len(channel_mult):
        raise DisconError(f"maskgit-vq: num_resolutions {num_resolutions} does not match "
                          f"channel_mult {list(channel_mult)} ({len(channel_mult)} levels)")
    factor = 2 ** (len(channel_mult) - 1)
    if resolution is not None and (resolution <= 0 or resolution % factor):
        raise DisconError(f"maskgit-vq: resolution {resolution} must be a positive multiple of "
                          f"the down-sampling factor {factor} (from channel_mult)")
    return MaskGitVQ(channel_mult=tuple(channel_mult), hidden_channels=hidden_channels,
                     num_res_blocks=num_res_blocks, z_channels=z_channels,
                     num_channels=num_channels, dropout=dropout, codebook_size=codebook_size,
                     commitment_cost=commitment_cost, num_groups=num_groups,
                     dead_code_restart_every=dead_code_restart_every, rec_loss=rec_loss)


@hookimpl
def discon_register_components(register):
    register("dtok", "maskgit-vq", maskgit_vq)
