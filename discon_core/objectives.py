"""Training objectives over components.

``masked_ar_loss`` is MAR's training step for a backbone + head pair, with the discrete grid as
extra conditioning (DisCon)::

    loss, logs = masked_ar_loss(backbone, head, x, labels, cond, generator=g)
    loss.backward()

All randomness (mask ratio, orders, label/condition dropout, the head's noise) comes from
``generator``, so a step is reproducible from the seed.
"""
from __future__ import annotations

import math

import torch

from .errors import DisconError

MASK_RATIO_STD = 0.25  # MAR: Gaussian centred at 1.0, std 0.25, truncated to [min, 1]


def sample_mask_ratio(mask_ratio_min: float, generator: torch.Generator | None = None) -> float:
    """One draw of MAR's truncated-normal mask ratio (scipy ``truncnorm((min-1)/.25, 0, 1, .25)``),
    by inverse CDF from a uniform of ``generator``."""
    if not 0.0 <= mask_ratio_min <= 1.0:
        raise DisconError(f"mask_ratio_min must lie in [0, 1], got {mask_ratio_min}")
    a = torch.tensor((mask_ratio_min - 1.0) / MASK_RATIO_STD, dtype=torch.float64)
    # drawn on the generator's device (a CUDA generator cannot fill a CPU tensor)
    u = torch.rand((), generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else None)
    lo, hi = torch.special.ndtr(a), torch.special.ndtr(torch.zeros((), dtype=torch.float64))
    ratio = 1.0 + MASK_RATIO_STD * torch.special.ndtri(lo + u * (hi - lo))
    return float(ratio.clamp(mask_ratio_min, 1.0))


def random_orders(batch: int, seq_len: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """An independent random permutation of ``range(seq_len)`` per row: int64 [B, N]."""
    return torch.rand(batch, seq_len, generator=generator, device=device).argsort(dim=1)


def mask_from_orders(orders: torch.Tensor, num_masked: int) -> torch.Tensor:
    """bool [B, N], True at ``orders[:, :num_masked]`` (the first positions of each order)."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :num_masked], True)


def masked_token_loss(head, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                      diffusion_batch_mul: int = 4,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """MAR's ``forward_loss``: z [B,N,Dz], target [B,N,D], mask bool [B,N] -> scalar.

    Rows are flattened and the whole batch tiled ``diffusion_batch_mul`` times (``repeat``, not
    interleaved); the head's per-row loss is averaged over masked tokens only.
    """
    if diffusion_batch_mul < 1:
        raise DisconError(f"diffusion_batch_mul must be >= 1, got {diffusion_batch_mul}")
    b, n, _ = target.shape
    target = target.reshape(b * n, -1).repeat(diffusion_batch_mul, 1)
    z = z.reshape(b * n, -1).repeat(diffusion_batch_mul, 1)
    weight = mask.reshape(b * n).repeat(diffusion_batch_mul).to(target.dtype)
    per_row = head.loss(target, z, generator=generator)
    return (per_row * weight).sum() / weight.sum().clamp(min=1)


def masked_ar_loss(backbone, head, x: torch.Tensor, labels: torch.Tensor,
                   cond: torch.Tensor | None = None, *, mask_ratio_min: float = 0.7,
                   diffusion_batch_mul: int = 4, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """MAR's masked autoregressive loss with optional discrete conditioning.

    Args:
        x: continuous tokens [B, N, D] (normalized latents, patchified).
        labels: int64 [B]; replaced by the null class with probability
            ``backbone.label_drop_prob`` (MAR: 0.1).
        cond: discrete tokens int64 [B, N] or None; replaced by the null condition with
            probability ``backbone.cond_drop_prob`` (default 0: off).
        mask_ratio_min: lower end of the truncated-normal mask ratio (one draw per batch).
        diffusion_batch_mul: times each token's (z, target) is repeated for the head's loss.

    Returns (loss scalar, logs {'loss', 'mask_ratio', 'num_masked'}).
    RNG order: mask ratio, orders, label drop, condition drop, then the head's draws.
    """
    n, d = backbone.seq_len, backbone.token_dim
    if x.dim() != 3 or x.shape[1:] != (n, d):
        raise DisconError(f"x must be [B, {n}, {d}] (backbone seq_len, token_dim), got {list(x.shape)}")
    b = x.shape[0]
    if labels.shape != (b,):
        raise DisconError(f"labels must be int64 [{b}] (one per row of x), got {list(labels.shape)}")
    if cond is not None and cond.shape != (b, n):
        raise DisconError(f"cond must be int64 [{b}, {n}] (one discrete token per position of x), "
                          f"got {list(cond.shape)}")
    ratio = sample_mask_ratio(mask_ratio_min, generator)
    num_masked = math.ceil(n * ratio)
    orders = random_orders(b, n, generator, x.device)
    mask = mask_from_orders(orders, num_masked)
    label_drop = torch.rand(b, generator=generator, device=x.device) < backbone.label_drop_prob
    cond_drop = None
    if cond is not None and getattr(backbone, "cond_drop_prob", 0.0) > 0:
        cond_drop = torch.rand(b, generator=generator, device=x.device) < backbone.cond_drop_prob
    z = backbone(x, mask, labels, cond, label_drop=label_drop, cond_drop=cond_drop)
    loss = masked_token_loss(head, z, x.detach(), mask, diffusion_batch_mul=diffusion_batch_mul,
                             generator=generator)
    return loss, {"loss": float(loss.detach()), "mask_ratio": ratio, "num_masked": num_masked}
