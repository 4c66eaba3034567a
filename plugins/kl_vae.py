"""KL autoencoders, the continuous tokenizers (kind ``ctok``): ``ldm-kl`` and ``va-vae``.

One :class:`AutoencoderKL` (the LDM architecture) serves both; the two factories differ only
in the decoder's attention placement (a preset parameter) and in the **latent normalization**,
which belongs to the preset:

* ``ldm-kl`` (MAR's KL-16, ``kl16.ckpt``): ``latent = z * scale_factor`` (0.2325);
* ``va-vae`` (LightningDiT's VA-VAE f16d32): ``latent = (z - mean) / std * latent_multiplier``
  with per-channel ``mean``/``std`` from a ``latents_stats`` file ``{'mean','std'}`` of shape
  ``[1, C, 1, 1]`` (a path or a URL, fetched into ``$DISCON_HOME`` on first use).

::

    from discon_core import build
    vae = build("ctok", "va-vae", checkpoint="pretrained")
    lat = vae.encode(images)                             # [B,3,256,256] in [0,1] -> [B,32,16,16]
    lat = vae.encode(images, sample=True, generator=g)   # a posterior draw instead of the mean
    rec = vae.decode(lat)                                # -> [B,3,256,256] in [0,1] (clamped)

Internally the network sees images in [-1, 1]. The raw pieces are public for caches and
parity checks: ``encode_moments`` (the ``quant_conv`` output, mean and logvar),
``posterior``, ``latents_from_moments``, ``decode_raw`` (the unclamped [-1,1] decoder output).

Training from scratch (``training_loss``): reconstruction (L1 or MSE) + ``kl_weight`` * KL;
``bounded_loss`` (the tiny presets) lets black/white targets be overshot for free, as the
clamped image shows them (:func:`bounded_to_targets`).
New latent statistics for a new tokenizer: :func:`compute_latents_stats` and
:func:`save_latents_stats` (the official format).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from discon_core import checkpoints
from discon_core.errors import DisconError
from discon_core.hooks import hookimpl
from discon_plugins.autoencoder import LDM, Decoder, Encoder, check_images, check_widths
from discon_core.images import psnr

REC_LOSSES = ("l1", "mse")


class DiagonalGaussian:
    """The KL posterior from ``moments [B, 2C, h, w]`` (mean and logvar stacked on channels).

    ``logvar`` is clamped to [-30, 20] as in the official code.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps``; eps is float32 N(0,1) drawn on the generator's device (the CPU
        default generator when None, as the official code does), so draws match across devices."""
        device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over C, h, w -> ``[B]``."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """LDM KL autoencoder (ContinuousTokenizer): images in [0,1] <-> normalized latents.

    Keys: ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``. The latent
    normalization ``latent = (z - shift) / scale * multiplier`` lives in non-persistent buffers
    (it is not part of the official weights); ``latents_stats`` files load lazily on first use.
    """

    def __init__(self, *, embed_dim: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], decoder_attn_resolutions: Sequence[int],
                 resolution: int, dropout: float, num_groups: int, kl_weight: float,
                 rec_loss: str, name: str, bounded_loss: bool = False):
        super().__init__()
        check_widths(ch, ch_mult, num_groups, ch_name="ch", mult_name="ch_mult")
        if rec_loss not in REC_LOSSES:
            raise DisconError(f"rec_loss must be one of {', '.join(REC_LOSSES)}, got {rec_loss!r}")
        common = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                      resolution=resolution, dropout=dropout, num_groups=num_groups, style=LDM)
        # The official wrappers set z_channels = embed_dim and double_z (mean and logvar).
        self.encoder = Encoder(in_channels=3, out_channels=2 * embed_dim,
                               attn_resolutions=tuple(attn_resolutions), **common)
        self.decoder = Decoder(z_channels=embed_dim, out_ch=3,
                               attn_resolutions=tuple(decoder_attn_resolutions), **common)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.latent_channels = embed_dim
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.kl_weight = kl_weight
        self.rec_loss = rec_loss
        self.bounded_loss = bool(bounded_loss)
        self.name = name
        self.register_buffer("latent_shift", torch.zeros(1, embed_dim, 1, 1), persistent=False)
        self.register_buffer("latent_scale", torch.ones(1, embed_dim, 1, 1), persistent=False)
        self.latent_multiplier = 1.0
        self._pending_stats: str | None = None

    # ------------------------------------------------------------------ normalization
    def set_scale_factor(self, scale_factor: float) -> None:
        """LDM/MAR normalization: ``latent = z * scale_factor``."""
        if not scale_factor > 0:
            raise DisconError(f"scale_factor must be > 0, got {scale_factor}")
        self.latent_shift.zero_()
        self.latent_scale.fill_(1.0)
        self.latent_multiplier = float(scale_factor)
        self._pending_stats = None

    def set_latents_stats(self, stats: str | os.PathLike | dict | None,
                          latent_multiplier: float = 1.0) -> None:
        """VA-VAE normalization: ``latent = (z - mean) / std * latent_multiplier``.

        ``stats``: ``{'mean','std'}`` tensors ``[1, C, 1, 1]``, or a path or http(s) URL of such a
        file (read on first use, so building on the meta device needs no download), or None
        (identity: mean 0, std 1; for a new tokenizer whose statistics are not computed yet).
        """
        if not latent_multiplier > 0:
            raise DisconError(f"latent_multiplier must be > 0, got {latent_multiplier}")
        self.latent_multiplier = float(latent_multiplier)
        self._pending_stats = None
        if stats is None:
            self.latent_shift.zero_()
            self.latent_scale.fill_(1.0)
        elif isinstance(stats, dict):
            self._apply_stats(stats, "the given stats")
        else:
            self._pending_stats = str(stats)

    def _apply_stats(self, stats: dict, where: str) -> None:
        c = self.latent_channels
        for key in ("mean", "std"):
            value = stats.get(key) if isinstance(stats, dict) else None
            if not isinstance(value, torch.Tensor):
                raise DisconError(f"latents_stats {where}: expected a dict with tensors 'mean' "
                                  f"and 'std' of shape [1,{c},1,1], missing {key!r}")
            if value.numel() != c:
                raise DisconError(f"latents_stats {where}: {key!r} has shape "
                                  f"{tuple(value.shape)}, expected [1,{c},1,1] "
                                  f"(latent_channels={c})")
        std = stats["std"].reshape(1, c, 1, 1)
        if (std <= 0).any():
            raise DisconError(f"latents_stats {where}: 'std' must be positive everywhere")
        with torch.no_grad():
            self.latent_shift.copy_(stats["mean"].reshape(1, c, 1, 1))
            self.latent_scale.copy_(std)

    def _resolve_stats(self) -> None:
        """Load a pending ``latents_stats`` path/URL (first use after construction)."""
        if self._pending_stats is None:
            return
        source = self._pending_stats
        if urlparse(source).scheme in ("http", "https", "file"):
            digest = hashlib.sha256(source.encode()).hexdigest()[:12]
            base = Path(urlparse(source).path).name or "latents_stats.pt"
            path = checkpoints.fetch(f"latents_stats/{digest}-{base}", source,
                                     what=f"{self.name} latents_stats")
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise DisconError(f"{self.name}: latents_stats file not found: {path} (expected "
                                  "a torch file {'mean','std'} of shape [1,C,1,1]; compute one "
                                  "with discon_plugins.kl_vae.compute_latents_stats)")
        self._apply_stats(checkpoints.load_file(path), str(path))
        self._pending_stats = None

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw posterior latents ``[B, C, h, w]`` -> modelling latents."""
        self._resolve_stats()
        return (z - self.latent_shift) / self.latent_scale * self.latent_multiplier

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Modelling latents -> raw latents for the decoder (inverse of :meth:`normalize`)."""
        self._resolve_stats()
        return latents * self.latent_scale / self.latent_multiplier + self.latent_shift

    @torch.no_grad()
    def self_contained_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(state dict, params overrides) of this tokenizer with its normalization folded into
        its 1x1 convolutions, so that identity statistics give the same latents and images: what
        a pipeline folder stores (interfaces.py), needing no separate ``latents_stats`` file.

        Normalization ``(z - m) / s * k``. Encoder side: moments = (mean, logvar) of z; the
        normalized posterior has mean ``(mean - m) * k / s`` and logvar ``logvar + 2 log(k / s)``.
        Decoder side: ``post_quant_conv(latent * s / k + m)`` is one 1x1 convolution with scaled
        weights and a shifted bias."""
        state = {k: v.clone() for k, v in self.state_dict().items()}
        c = self.latent_channels
        self._resolve_stats()
        m = self.latent_shift.reshape(c).double()
        gain = (self.latent_multiplier / self.latent_scale.reshape(c)).double()  # k / s
        w, b = state["quant_conv.weight"].double(), state["quant_conv.bias"].double()
        w[:c] *= gain[:, None, None, None]
        b[:c] = (b[:c] - m) * gain
        b[c:] += 2 * torch.log(gain)
        dtype = self.quant_conv.weight.dtype
        state["quant_conv.weight"], state["quant_conv.bias"] = w.to(dtype), b.to(dtype)
        w, b = state["post_quant_conv.weight"].double(), state["post_quant_conv.bias"].double()
        state["post_quant_conv.bias"] = (b + w[:, :, 0, 0] @ m).to(dtype)
        state["post_quant_conv.weight"] = (w / gain[None, :, None, None]).to(dtype)
        identity = {"scale_factor": 1.0} if self.name == "ldm-kl" else {
            "latents_stats": None, "latent_multiplier": 1.0}
        return state, identity

    # ------------------------------------------------------------------ raw pieces
    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """Network input in [-1, 1] ``[B, 3, H, W]`` -> moments ``[B, 2C, H/f, W/f]``."""
        return self.quant_conv(self.encoder(x))

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> raw posterior moments ``[B, 2C, h, w]`` (mean, logvar; the
        official ``quant_conv`` output, before the logvar clamp; what latent caches store)."""
        check_images(images, channels=3, downsample=self.downsample,
                     what=f"{self.name} encode")
        # computed in the weights' dtype (build(dtype=...)); fp32 images are the common input
        return self.moments(images.to(self.quant_conv.weight.dtype) * 2.0 - 1.0)

    @staticmethod
    def posterior(moments: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(moments)

    def latents_from_moments(self, moments: torch.Tensor, *, sample: bool = True,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Cached moments ``[B, 2C, h, w]`` -> normalized latents ``[B, C, h, w]`` (a posterior
        draw when ``sample``, else the mean)."""
        if moments.ndim != 4 or moments.shape[1] != 2 * self.latent_channels:
            raise DisconError(f"{self.name} latents_from_moments: moments must be "
                              f"[B,{2 * self.latent_channels},h,w] (mean and logvar of "
                              f"{self.latent_channels} channels), got {tuple(moments.shape)}")
        post = DiagonalGaussian(moments)
        return self.normalize(post.sample(generator) if sample else post.mode())

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalized) latents -> the decoder output in about [-1, 1], unclamped."""
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    # ------------------------------------------------------------------ interface
    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images float ``[B, 3, H, W]`` in [0, 1] -> normalized latents ``[B, C, H/f, W/f]``:
        the posterior mean, or a draw from ``generator`` when ``sample``."""
        return self.latents_from_moments(self.encode_moments(images), sample=sample,
                                         generator=generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents ``[B, C, h, w]`` -> images ``[B, 3, h*f, w*f]`` in [0, 1]."""
        self.check_latents(latents)
        return ((self.decode_raw(self.denormalize(latents)) + 1.0) / 2.0).clamp(0.0, 1.0)

    def check_latents(self, latents: torch.Tensor) -> None:
        c = self.latent_channels
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise DisconError(f"{self.name} decode: latents must be a float tensor [B,{c},h,w], "
                              f"got {getattr(latents, 'dtype', type(latents).__name__)}")
        if latents.ndim != 4 or latents.shape[1] != c:
            raise DisconError(f"{self.name} decode: latents must be [B,{c},h,w] "
                              f"(latent_channels={c}), got shape {tuple(latents.shape)}")

    # ------------------------------------------------------------------ training
    def training_loss(self, images: torch.Tensor, *, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """KL-VAE objective on images ``[B, 3, H, W]`` in [0, 1] -> (scalar loss, logs).

        loss = rec + kl_weight * KL / (3*H*W), with rec the per-pixel L1 (or MSE) in [-1, 1]
        and KL summed over the latent: LDM's balance (summed reconstruction + kl_weight * KL),
        divided by the pixel count so the loss reads per pixel. The posterior sample uses
        ``generator``. With ``bounded_loss`` the reconstruction is compared as
        :func:`bounded_to_targets` leaves it (see there; off in the official presets).
        """
        moments = self.encode_moments(images)
        post = DiagonalGaussian(moments)
        x = images * 2.0 - 1.0
        recon = self.decode_raw(post.sample(generator))
        shown = bounded_to_targets(recon, x) if self.bounded_loss else recon
        rec = F.l1_loss(shown, x) if self.rec_loss == "l1" else F.mse_loss(shown, x)
        kl = post.kl().mean()
        loss = rec + self.kl_weight * kl / x[0].numel()
        with torch.no_grad():
            logs = {"loss": loss.item(), "rec": rec.item(), "kl": kl.item(),
                    "psnr": psnr(images, (recon + 1.0) / 2.0).mean().item()}
        return loss, logs


def bounded_to_targets(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``recon`` with its overshoot past the bound its target lies on removed: clamped to >= -1
    where the target is -1 (black) and to <= 1 where it is 1 (white), unchanged elsewhere.

    ``decode`` clamps to [-1, 1], so such overshoot is invisible and should cost nothing. A plain
    L1/MSE instead pulls every black-background output back up to exactly -1, so it settles
    symmetrically around -1, and after the clamp and uint8 rounding only a part of the background
    is exactly 0 (the rest a faint grey; docs/reproduction.md, "the grey haze"). Bounded, an
    output at or below -1 gets no gradient and stays black; outputs for targets inside (-1, 1)
    keep the full loss, so no pixel can get stuck in the flat region.
    """
    target = target.to(recon.dtype)
    low, high = target <= -1.0, target >= 1.0
    return torch.where(low, recon.clamp_min(-1.0), torch.where(high, recon.clamp_max(1.0), recon))


def compute_latents_stats(latents: torch.Tensor | Iterable[torch.Tensor]
                          ) -> dict[str, torch.Tensor]:
    """Per-channel statistics of raw latents, in the official ``latents_stats.pt`` format.

    ``latents``: one ``[N, C, h, w]`` tensor or an iterable of such batches (e.g. posterior
    samples of a dataset, as LightningDiT uses). Returns ``{'mean', 'std'}`` float32
    ``[1, C, 1, 1]``: mean and **unbiased** std over dims (0, 2, 3), accumulated in float64.
    """
    batches = [latents] if isinstance(latents, torch.Tensor) else latents
    total = sq = None
    count = 0
    for batch in batches:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
            raise DisconError("compute_latents_stats: latents must be [N,C,h,w] tensors, got "
                              f"{getattr(batch, 'shape', type(batch).__name__)}")
        b = batch.detach().double().cpu()
        s, q = b.sum(dim=(0, 2, 3)), b.pow(2).sum(dim=(0, 2, 3))
        if total is not None and s.shape != total.shape:
            raise DisconError(f"compute_latents_stats: channel count changed from "
                              f"{total.shape[0]} to {s.shape[0]}")
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += b.shape[0] * b.shape[2] * b.shape[3]
    if total is None or count < 2:
        raise DisconError("compute_latents_stats: need at least 2 latent values per channel")
    mean = total / count
    var = (sq - count * mean.pow(2)) / (count - 1)
    std = var.clamp_min(0).sqrt()
    return {"mean": mean.float().view(1, -1, 1, 1), "std": std.float().view(1, -1, 1, 1)}


def save_latents_stats(stats: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``{'mean','std'}`` like the official ``latents_stats.pt`` (atomically)."""
    if set(stats) != {"mean", "std"}:
        raise DisconError("save_latents_stats: expected keys 'mean' and 'std', got "
                          f"{sorted(stats)}")
    return checkpoints.save_atomic({k: v.detach().float().cpu().contiguous()
                                    for k, v in stats.items()}, path)


def _autoencoder(name: str, embed_dim: int, ch: int, ch_mult: Sequence[int],
                 num_res_blocks: int, attn_resolutions: Sequence[int],
                 decoder_attn_resolutions: Sequence[int], resolution: int, dropout: float,
                 num_groups: int, kl_weight: float, rec_loss: str,
                 bounded_loss: bool) -> AutoencoderKL:
    return AutoencoderKL(embed_dim=embed_dim, ch=ch, ch_mult=tuple(ch_mult),
                         num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                         decoder_attn_resolutions=decoder_attn_resolutions,
                         resolution=resolution, dropout=dropout, num_groups=num_groups,
                         kl_weight=kl_weight, rec_loss=rec_loss, name=name,
                         bounded_loss=bounded_loss)


def ldm_kl(embed_dim: int = 16, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
           num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,),
           decoder_attn_resolutions: Sequence[int] = (), resolution: int = 256,
           dropout: float = 0.0, num_groups: int = 32, scale_factor: float = 0.2325,
           kl_weight: float = 1e-6, rec_loss: str = "l1", bounded_loss: bool = False
           ) -> AutoencoderKL:
    """LDM KL autoencoder as MAR uses it (KL-16), latents multiplied by ``scale_factor``.

    ``attn_resolutions`` applies to the encoder, ``decoder_attn_resolutions`` to the decoder
    (MAR's KL-16 has no decoder up-block attention). Official MAR file: ``{'model': sd}``;
    LDM Lightning files also carry ``loss.*``, which is dropped by name.
    """
    model = _autoencoder("ldm-kl", embed_dim, ch, ch_mult, num_res_blocks, attn_resolutions,
                         decoder_attn_resolutions, resolution, dropout, num_groups, kl_weight,
                         rec_loss, bounded_loss)
    model.checkpoint_drop = ("loss.",)
    model.set_scale_factor(scale_factor)
    return model


def va_vae(embed_dim: int = 32, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
           num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,),
           decoder_attn_resolutions: Sequence[int] = (16,), resolution: int = 256,
           dropout: float = 0.0, num_groups: int = 32,
           latents_stats: str | None = None, latent_multiplier: float = 1.0,
           kl_weight: float = 1e-6, rec_loss: str = "l1", bounded_loss: bool = False
           ) -> AutoencoderKL:
    """VA-VAE (LightningDiT) with per-channel latent normalization from ``latents_stats``.

    The official Lightning file ``{'state_dict': ...}`` also holds the training-only
    ``loss.*``, ``foundation_model.*`` (DINOv2) and ``linear_proj.*`` keys: dropped by name.
    The vision-foundation alignment loss of VA-VAE training is not part of ``training_loss``.
    """
    model = _autoencoder("va-vae", embed_dim, ch, ch_mult, num_res_blocks, attn_resolutions,
                         decoder_attn_resolutions, resolution, dropout, num_groups, kl_weight,
                         rec_loss, bounded_loss)
    model.checkpoint_drop = ("loss.", "foundation_model.", "linear_proj.")
    model.set_latents_stats(latents_stats, latent_multiplier)
    return model


@hookimpl
def discon_register_components(register):
    register("ctok", "ldm-kl", ldm_kl)
    register("ctok", "va-vae", va_vae)
