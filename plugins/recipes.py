"""The built-in training recipes: ``discon`` (backbone + head with
``objectives.masked_ar_loss`` on a token cache; MAR's checkpoint layout and parameter groups),
``prior`` (``prior.training_loss`` on cached ids; RAR's parameter groups) and ``tokenizer``
(``tok.training_loss`` on images). Registered through ``discon_register_recipes``, as a
plugin's own recipes are; the trainer (``discon_core/train.py``) runs any of them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from discon_core import sample_tokens
from discon_core.cache import CachedDataset, collate_cached
from discon_core.config import check_keys
from discon_core.data import build_dataset, collate_images
from discon_core.errors import DisconError
from discon_core.hooks import hookimpl
from discon_core.interfaces import Trainable
from discon_core.objectives import masked_ar_loss
from discon_core.pipeline import check_compatible
from discon_core.recipes import Recipe, build_component, component_spec, plain_no_decay
from discon_core.registry import build

if TYPE_CHECKING:
    from discon_core.config import TrainConfig


class _Frozen:
    """Holds a frozen helper module out of the trainable module tree (no DDP/EMA/state dict)."""

    def __init__(self, module: nn.Module):
        self.module = module


class DisconObjective(nn.Module):
    """backbone + head trained with ``objectives.masked_ar_loss`` on cached moments + ids."""

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
    module = build(kind, rec["preset"], checkpoint=rec["checkpoint"], device=device, **params)
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

    def samples(m: PriorObjective, g: torch.Generator) -> torch.Tensor:
        dtok = _cache_tokenizer(cfg, ds, "dtok", device)
        labels = torch.arange(cfg.num_samples, device=device) % m.prior.num_classes
        opts = {"cfg_scale": 0.0, "temperature": 1.0, **sample_opts}
        tokens = m.prior.sample(labels, generator=g, **opts)
        return dtok.decode(tokens)

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
