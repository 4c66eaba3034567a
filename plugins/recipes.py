"""The built-in training recipes: ``discon`` (backbone + head with :func:`masked_ar_loss`,
MAR's objective with the discrete grid as extra conditioning, on a token cache; MAR's
checkpoint layout and parameter groups),
``prior`` (``prior.training_loss`` on cached ids; RAR's parameter groups) and ``tokenizer``
(``tok.training_loss`` on images). Registered through ``discon_register_recipes``, as a
plugin's own recipes are; the trainer (``discon_core/train.py``) runs any of them.

All randomness of the ``discon`` objective (mask ratio, orders, label/condition dropout, the
head's noise) comes from one ``generator``, so a step is reproducible from the seed.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from discon_core import sample_tokens
from discon_plugins.cache import CachedDataset, collate_cached
from discon_core.config import check_keys
from discon_core.data import build_dataset, collate_images
from discon_core.errors import DisconError
from discon_core.hooks import hookimpl
from discon_core.interfaces import Trainable
from discon_core.pipeline import check_compatible, mask_from_orders, random_orders
from discon_core.recipes import Recipe, build_component, component_spec, plain_no_decay
from discon_core.registry import build

if TYPE_CHECKING:
    from discon_core.config import TrainConfig


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


class _Frozen:
    """Holds a frozen helper module out of the trainable module tree (no DDP/EMA/state dict)."""

    def __init__(self, module: nn.Module):
        self.module = module


class DisconObjective(nn.Module):
    """backbone + head trained with :func:`masked_ar_loss` on cached moments + ids."""

    def __init__(self, backbone: nn.Module, head: nn.Module, ctok: nn.Module, *,
                 use_cond: bool = True):
        super().__init__()
        self.backbone, self.head = backbone, head
        self._ctok = _Frozen(ctok)
        self.use_cond = use_cond
        # One source: the backbone preset (MAR's names and defaults; set them with
        # components.backbone.overrides), read with MAR's defaults for backbones without them.
        self.mask_ratio_min = getattr(backbone, "mask_ratio_min", 0.7)
        self.diffusion_batch_mul = getattr(backbone, "diffusion_batch_mul", 4)
        check_compatible(backbone=backbone, head=head, ctok=ctok)  # token_dim, channels, stride

    def tokens(self, batch: dict, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            latents = self._ctok.module.latents_from_moments(batch["moments"], sample=True,
                                                             generator=generator)
        x = self.backbone.patchify(latents.float())  # the backbone's token layout, as sampling
        if x.shape[1] != self.backbone.seq_len:
            raise DisconError(f"cached latents give {x.shape[1]} tokens but the backbone's "
                              f"seq_len is {self.backbone.seq_len}; check img_size/vae_stride")
        cond = batch["tokens"].flatten(1) if self.use_cond else None
        return x, cond

    def forward(self, batch: dict, *, step: int, generator=None):
        x, cond = self.tokens(batch, generator)
        return masked_ar_loss(self.backbone, self.head, x, batch["labels"], cond,
                              mask_ratio_min=self.mask_ratio_min,
                              diffusion_batch_mul=self.diffusion_batch_mul, generator=generator)


class PriorObjective(nn.Module):
    """A discrete prior trained on cached ids with its own ``training_loss``."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        _require_trainable(prior, "prior")
        self.prior = prior

    def forward(self, batch: dict, *, step: int, generator=None):
        return self.prior.training_loss(batch["tokens"].flatten(1), batch["labels"], step=step,
                                        generator=generator)


class TokenizerObjective(nn.Module):
    """A tokenizer (dtok or ctok) trained on images with its own ``training_loss``."""

    def __init__(self, tok: nn.Module):
        super().__init__()
        _require_trainable(tok, "tokenizer")
        self.tok = tok

    def forward(self, batch: dict, *, step: int, generator=None):
        return self.tok.training_loss(batch["images"], generator=generator)


def _require_trainable(module: nn.Module, recipe: str) -> None:
    if not isinstance(module, Trainable):
        raise DisconError(f"recipe {recipe!r}: {type(module).__name__} has no training_loss() "
                          "(the Trainable protocol in discon_core/interfaces.py)")


def _mar_no_decay(key: str, p: torch.Tensor) -> bool:
    # MAR's add_weight_decay: 1-D params, biases, and everything in the diffusion head.
    return p.ndim == 1 or key.endswith(".bias") or "diffloss" in key


def _rar_no_decay(key: str, p: torch.Tensor) -> bool:
    # 1d-tokenizer's rule for RAR: ndim < 2 or names with these substrings.
    return p.ndim < 2 or any(s in key for s in ("ln", "bias", "embed", "norm", "embedding"))


def _open_cache(cfg: TrainConfig):
    if "cache" not in cfg.data:
        raise DisconError(f"recipe {cfg.recipe!r} trains on a pre-tokenized cache: set "
                          "data: {cache: FOLDER} (build it with `discon cache`)")
    ds = CachedDataset(cfg.data["cache"])
    want = {k: component_spec(cfg.components[k], k)["preset"]
            for k in ("dtok", "ctok") if k in cfg.components}
    ds.check_presets(**want)
    return ds, collate_cached


def _cache_tokenizer(cfg: TrainConfig, ds, kind: str, device) -> nn.Module:
    """The tokenizer a cache was built with (preset, params and weights from its manifest);
    ``components.<kind>.overrides`` in the config may add settings that do not change the
    cached moments, e.g. the ``latents_stats`` computed after caching."""
    rec = ds.manifest[kind]
    # The manifest stores the resolved params; passing them back rebuilds the same module even
    # when the registry default changed meanwhile.
    params = dict(rec.get("params") or {})
    if kind in cfg.components:
        params.update(component_spec(cfg.components[kind], kind)["overrides"])
    module = build(kind, rec["preset"], checkpoint=rec["checkpoint"], device=device,
                   dtype="fp32", **params)  # the trainer's autocast sets the precision
    return module.eval().requires_grad_(False)


def recipe_discon(cfg: TrainConfig, device) -> Recipe:
    ds, collate = _open_cache(cfg)
    ctok = _cache_tokenizer(cfg, ds, "ctok", device)
    backbone = build_component("backbone", cfg.components["backbone"], device)
    head = build_component("head", cfg.components["head"], device)
    opts = dict(cfg.recipe_options)
    sample_opts = opts.pop("sampling", {}) or {}
    for key in ("mask_ratio_min", "diffusion_batch_mul"):
        if key in opts:
            raise DisconError(f"recipe_options.{key}: this is a backbone setting; set it with "
                              f"components.backbone.overrides: {{{key}: ...}}")
    check_keys(opts, {"use_cond"}, "recipe_options for discon", "option")
    model = DisconObjective(backbone, head, ctok, **opts)

    def to_file(k: str) -> str:
        return k[len("backbone."):] if k.startswith("backbone.") else "diffloss." + k[len("head."):]

    def from_file(k: str) -> str:
        return "head." + k[len("diffloss."):] if k.startswith("diffloss.") else "backbone." + k

    def samples(m: DisconObjective, g: torch.Generator) -> torch.Tensor | None:
        n = min(cfg.num_samples, len(ds))
        batch = collate([ds.get(i, False) for i in range(n)])
        batch = {k: v.to(device) for k, v in batch.items()}
        cond = batch["tokens"].flatten(1) if m.use_cond else None
        x = sample_tokens(m.backbone, m.head, batch["labels"], cond=cond, generator=g,
                          **{"ar_steps": 16, **sample_opts})
        return ctok.decode(m.backbone.unpatchify(x.float()))

    return Recipe("discon", model, ds, collate, _mar_no_decay, to_file, from_file, samples,
                  info={"dtok": ds.manifest["dtok"]["preset"], "ctok": ds.manifest["ctok"]["preset"]})


def recipe_prior(cfg: TrainConfig, device) -> Recipe:
    ds, collate = _open_cache(cfg)
    prior = build_component("prior", cfg.components["prior"], device)
    model = PriorObjective(prior)
    sample_opts = dict(cfg.recipe_options.get("sampling", {}) or {})
    # built at the first sample grid, then reused (runs without grids never load it)
    dtok = functools.cache(lambda: _cache_tokenizer(cfg, ds, "dtok", device))

    def samples(m: PriorObjective, g: torch.Generator) -> torch.Tensor:
        labels = torch.arange(cfg.num_samples, device=device) % m.prior.num_classes
        opts = {"cfg_scale": 0.0, "temperature": 1.0, **sample_opts}
        tokens = m.prior.sample(labels, generator=g, **opts)
        return dtok().decode(tokens)

    return Recipe("prior", model, ds, collate, _rar_no_decay,
                  to_file=lambda k: k[len("prior."):], from_file=lambda k: "prior." + k,
                  samples=samples, info={"dtok": ds.manifest["dtok"]["preset"]})


def recipe_tokenizer(cfg: TrainConfig, device) -> Recipe:
    if "cache" in cfg.data:
        raise DisconError("the tokenizer recipe trains on images: data must be a dataset "
                          "mapping ({type: fashion-mnist} or {type: folder, root: ...})")
    ds = build_dataset(cfg.data)
    spec = component_spec(cfg.components.get("tokenizer"), "tokenizer")
    kind = spec.get("kind")
    if kind not in ("dtok", "ctok"):
        raise DisconError("components.tokenizer.kind must be dtok or ctok, got "
                          f"{kind!r}")
    tok = build_component(kind, spec, device)
    model = TokenizerObjective(tok)

    def samples(m: TokenizerObjective, g: torch.Generator) -> torch.Tensor:
        n = max(1, cfg.num_samples // 2)
        images = collate_images([ds.get(i, False) for i in range(n)])["images"].to(device)
        rec = m.tok.decode(m.tok.encode(images))
        return torch.cat([images, rec.clamp(0, 1)])

    return Recipe("tokenizer", model, ds, collate_images, plain_no_decay,
                  to_file=lambda k: k[len("tok."):], from_file=lambda k: "tok." + k,
                  samples=samples, info={"kind": kind})


@hookimpl
def discon_register_recipes(register):
    register("discon", recipe_discon)
    register("prior", recipe_prior)
    register("tokenizer", recipe_tokenizer)
