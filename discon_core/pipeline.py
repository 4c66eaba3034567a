"""Sampling: the continuous stage (``sample_tokens``) and the end-to-end ``Pipeline``.

DisCon (all five components)::

    pipe = Pipeline.from_names(prior="rar-xxl", dtok="maskgit-vq", backbone="discon-l",
                               ctok="va-vae")                      # head defaults to "discon-l"
    images = pipe.generate(torch.tensor([207, 360]), generator=torch.Generator().manual_seed(0))

    prior.sample -> x_d [B,h,w] -> sample_tokens(backbone, head, cond=x_d) -> x_c -> ctok.decode

The other public pipelines, chosen by which components are given:

* discrete only (``prior`` + ``dtok``): prior.sample -> dtok.decode (RAR + MaskGIT VQGAN);
* continuous only (``backbone`` + ``head`` + ``ctok``, no prior): MAR class-conditional
  generation (sample_tokens without a discrete condition) -> ctok.decode.

Every compatibility check (grids, channels, vocabularies, classes) runs before any compute.
"""
from __future__ import annotations

import inspect
import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import hooks
from .errors import DisconError

CFG_SCHEDULES = ("linear", "constant")
STAGES = ("prior", "dtok", "backbone", "head", "ctok")  # a pipeline's components, in data order


# -- the continuous stage ------------------------------------------------------------------------

def random_orders(batch: int, seq_len: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """An independent random permutation of ``range(seq_len)`` per row: int64 [B, N]."""
    return torch.rand(batch, seq_len, generator=generator, device=device).argsort(dim=1)


def mask_from_orders(orders: torch.Tensor, num_masked: int) -> torch.Tensor:
    """bool [B, N], True at ``orders[:, :num_masked]`` (the first positions of each order)."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :num_masked], True)


def mask_schedule(seq_len: int, ar_steps: int) -> list[int]:
    """MAR's cosine schedule without data: the masked count after each step (clamped as the
    sampler clamps it: at least one token predicted per step, never below 1)."""
    masked, out = seq_len, []
    for step in range(ar_steps):
        mask_len = int(np.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / ar_steps)))
        masked = max(1, min(masked - 1, mask_len))
        out.append(masked)
    return out


def cfg_at(cfg_scale: float, schedule: str, seq_len: int, mask_len_next: int) -> float:
    """Guidance scale for one AR step (Muse-style linear ramp on the post-step masked count)."""
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * (seq_len - mask_len_next) / seq_len
    return cfg_scale


def as_labels(labels) -> torch.Tensor:
    """Class ids (a tensor, list or tuple of ints) -> int64 [B]; empty or other input is refused."""
    if not torch.is_tensor(labels):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise DisconError(f"labels must be class ids (an int64 tensor [B] or a list of ints), "
                              f"got {type(labels).__name__}") from None
    if not labels.numel():
        raise DisconError("labels is empty: give at least one class id")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise DisconError(f"labels must be int64 [B], got {labels.dtype} {list(labels.shape)}")
    return labels.long()


def _weights_device(module, kind: str) -> torch.device:
    device = next(module.parameters()).device
    if device.type == "meta":
        raise DisconError(f"the {kind} is on the meta device (built with device='meta': shapes "
                          "only, no weights); build it on cpu or cuda to sample")
    return device


def check_stage_finite(x: torch.Tensor, stage: str) -> torch.Tensor:
    """Stop a sampling stage whose output is NaN/inf (corrupt or diverged weights) instead of
    writing black images or failing later in an unrelated op."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise DisconError(f"{stage} produced non-finite values (NaN/inf): its weights are corrupt "
                          "or diverged, or the precision overflowed (try fp32)")
    return x


def _check_sampler_args(backbone, labels, cond, ar_steps, temperature, cfg_scale, cfg_schedule):
    n = backbone.seq_len
    if not isinstance(ar_steps, int) or not 1 <= ar_steps <= n:
        raise DisconError(f"ar_steps must be an integer in [1, {n}] (the sequence length), "
                          f"got {ar_steps!r}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise DisconError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, "
                          f"got {cfg_schedule!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise DisconError(f"temperature must be a finite number >= 0, got {temperature}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise DisconError(f"cfg_scale must be a finite number >= 0 (1 disables guidance), got "
                          f"{cfg_scale}")
    if cond is not None:
        if cond.shape != (labels.shape[0], n):
            raise DisconError(f"cond must be int64 [{labels.shape[0]}, {n}] (B, seq_len), got "
                              f"{list(cond.shape)}")


@torch.no_grad()
def sample_tokens(backbone, head, labels: torch.Tensor, *, cond: torch.Tensor | None = None,
                  ar_steps: int = 16, temperature: float = 1.0, cfg_scale: float = 1.0,
                  cfg_schedule: str = "linear", generator: torch.Generator | None = None,
                  progress: bool = False, head_steps: int | str | None = None,
                  orders: torch.Tensor | None = None) -> torch.Tensor:
    """MAR's ``sample_tokens`` over any backbone + head: labels int64 [B] (and the discrete grid
    ``cond`` int64 [B, N] or [B, h, w]) -> continuous tokens [B, N, D].

    Per step: run the backbone on the current tokens and mask, shrink the mask along the
    cosine schedule (at least one token per step), and sample every newly revealed token of
    the whole batch in ONE head call (rows batch-major, positions ascending). Positions are
    revealed from the end of each random order backwards, as in MAR. With ``cfg_scale != 1``
    the batch is doubled with the null class (and null discrete condition) and the head
    guides with the per-step scale of ``cfg_schedule``.

    Extensions: ``head_steps`` overrides the head's sampling steps; ``orders`` (int64 [B, N])
    replaces the random orders drawn from ``generator``.
    """
    labels = as_labels(labels)
    if cond is not None and cond.dim() == 3:
        cond = cond.flatten(1)
    _check_sampler_args(backbone, labels, cond, ar_steps, temperature, cfg_scale, cfg_schedule)
    device = _weights_device(backbone, "backbone")
    _weights_device(head, "head")
    b, n, d = labels.shape[0], backbone.seq_len, backbone.token_dim
    labels = labels.to(device)
    cond = cond.to(device) if cond is not None else None
    if orders is None:
        orders = random_orders(b, n, generator, device)
    elif orders.shape != (b, n):
        raise DisconError(f"orders must be int64 [{b}, {n}], got {list(orders.shape)}")
    orders = orders.to(device)
    dtype = next(backbone.parameters()).dtype
    tokens = torch.zeros(b, n, d, device=device, dtype=dtype)
    mask = torch.ones(b, n, dtype=torch.bool, device=device)
    guided = cfg_scale != 1.0
    drop = None
    if guided:
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(device)
    steps = range(ar_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="continuous stage", unit="step")
    for step, mask_len in zip(steps, mask_schedule(n, ar_steps)):
        if guided:
            z = backbone(torch.cat([tokens, tokens]), torch.cat([mask, mask]),
                         torch.cat([labels, labels]),
                         torch.cat([cond, cond]) if cond is not None else None,
                         label_drop=drop, cond_drop=drop if cond is not None else None)
        else:
            z = backbone(tokens, mask, labels, cond)
        mask_next = mask_from_orders(orders, mask_len)
        to_pred = mask if step == ar_steps - 1 else mask & ~mask_next
        rows = z[:b][to_pred]
        if rows.shape[0]:
            if guided:
                rows = torch.cat([rows, z[b:][to_pred]])
                cfg_iter = cfg_at(cfg_scale, cfg_schedule, n, mask_len)
                new = head.sample(rows, temperature=temperature, steps=head_steps,
                                  generator=generator, cfg_scale=cfg_iter)[: rows.shape[0] // 2]
            else:
                new = head.sample(rows, temperature=temperature, steps=head_steps,
                                  generator=generator)
            tokens[to_pred] = new.to(tokens.dtype)
        mask = mask_next
    return check_stage_finite(tokens, "the continuous stage (backbone + head)")


# -- the pipeline --------------------------------------------------------------------------------

def _name(module, kind: str) -> str:
    preset = getattr(module, "discon_preset", None)
    return f"{kind} {preset.name!r}" if preset is not None else f"the {kind}"


# the sampling-block keys Pipeline.generate passes on (typed by sample_tokens' signature)
BACKBONE_SAMPLING = ("ar_steps", "temperature", "cfg_scale", "cfg_schedule")


def _sampling(module) -> dict[str, Any]:
    """A preset's ``sampling:`` block, checked against what receives it (a prior's ``sample()``
    keywords, the backbone's keys of ``sample_tokens``): names and types, one line naming the
    registry file, entry and key instead of a TypeError in the middle of sampling."""
    from .config import check_keys, coerce
    preset = getattr(module, "discon_preset", None)
    if preset is None or preset.kind not in ("prior", "backbone"):
        return dict(preset.sampling) if preset is not None else {}
    fn = type(module).sample if preset.kind == "prior" else sample_tokens
    params = inspect.signature(fn).parameters
    where = f"registry {preset.source}, entry {preset.kind}/{preset.name}"
    if preset.kind == "backbone" or all(p.kind is not p.VAR_KEYWORD for p in params.values()):
        check_keys(preset.sampling, BACKBONE_SAMPLING if preset.kind == "backbone" else [
            n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in
            ("generator", "progress")], where, "sampling key")
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # annotations naming what only a type checker imports
        hints = {}
    return {k: coerce(v, hints[k], f"sampling.{k}", where) if k in hints else v
            for k, v in preset.sampling.items()}


def check_compatible(prior=None, dtok=None, backbone=None, head=None, ctok=None) -> str:
    """Which pipeline the given components form ('discon', 'discrete', 'continuous'); raises a
    DisconError naming both presets for the first mismatch. Needs only attributes, so it runs on
    meta-device modules before any weights load."""
    def fail(msg: str):
        raise DisconError(msg)

    for module in (prior, backbone):  # their presets' sampling blocks, before any weights load
        if module is not None:
            _sampling(module)

    if backbone is not None or head is not None:
        if backbone is None or head is None:
            fail("backbone and head go together: give both (the head preset of the same name "
                 "as the backbone fits it)")
        if head.token_dim != backbone.token_dim or head.z_dim != backbone.z_dim:
            fail(f"{_name(head, 'head')} (token_dim {head.token_dim}, z_dim {head.z_dim}) does not "
                 f"fit {_name(backbone, 'backbone')} (token_dim {backbone.token_dim}, z_dim "
                 f"{backbone.z_dim}); use the head preset of the backbone's name")
        if ctok is None:
            fail("a backbone needs a continuous tokenizer (ctok) to decode its latents")
        patch = getattr(backbone, "patch_size", 1)
        if ctok.latent_channels * patch ** 2 != backbone.token_dim:
            fail(f"{_name(ctok, 'ctok')} has {ctok.latent_channels} latent channels but "
                 f"{_name(backbone, 'backbone')} models tokens of {backbone.token_dim} "
                 f"(vae_embed_dim * patch_size**2)")
        stride = getattr(backbone, "vae_stride", ctok.downsample)
        if stride != ctok.downsample:
            fail(f"{_name(ctok, 'ctok')} downsamples by {ctok.downsample} but "
                 f"{_name(backbone, 'backbone')} expects vae_stride {stride}")
    if prior is not None:
        if dtok is not None and prior.codebook_size != dtok.codebook_size:
            fail(f"{_name(prior, 'prior')} samples {prior.codebook_size} codes but "
                 f"{_name(dtok, 'dtok')} has codebook_size {dtok.codebook_size}")
        if backbone is None:
            if dtok is None:
                fail("a prior needs either a dtok (discrete pipeline) or backbone + head + ctok "
                     "(DisCon)")
            return "discrete"
        vocab = getattr(backbone, "cond_vocab_size", 0)
        if not vocab:
            fail(f"{_name(backbone, 'backbone')} has no discrete conditioning (cond_vocab_size=0);"
                 " use a discon-* backbone with a prior, or drop the prior for plain MAR")
        if vocab != prior.codebook_size:
            fail(f"{_name(prior, 'prior')} has codebook_size {prior.codebook_size} but "
                 f"{_name(backbone, 'backbone')} was built for cond_vocab_size {vocab}")
        if prior.seq_len != backbone.seq_len:
            fail(f"{_name(prior, 'prior')} makes {prior.seq_len} tokens but "
                 f"{_name(backbone, 'backbone')} has seq_len {backbone.seq_len}: the discrete and "
                 "continuous grids differ")
        if prior.num_classes != getattr(backbone, "class_num", prior.num_classes):
            fail(f"{_name(prior, 'prior')} has {prior.num_classes} classes but "
                 f"{_name(backbone, 'backbone')} has class_num {backbone.class_num}")
        if dtok is not None and dtok.downsample != ctok.downsample:
            fail(f"{_name(dtok, 'dtok')} downsamples by {dtok.downsample} but {_name(ctok, 'ctok')}"
                 f" by {ctok.downsample}: the discrete and continuous grids differ")
        return "discon"
    if backbone is None:
        fail("nothing to run: give a prior (+ dtok), or backbone + head + ctok, or all five")
    return "continuous"


class Pipeline:
    """Class labels -> images, through whichever components are given (see the module doc)."""

    def __init__(self, prior=None, dtok=None, backbone=None, head=None, ctok=None):
        from .interfaces import PROTOCOLS
        given = {"prior": prior, "dtok": dtok, "backbone": backbone, "head": head, "ctok": ctok}
        for kind, module in given.items():
            if module is not None and not isinstance(module, PROTOCOLS[kind]):
                raise DisconError(f"Pipeline({kind}=...): got {type(module).__name__}, which is "
                                  f"not a {PROTOCOLS[kind].__name__}; accepted: a module built by "
                                  f"build({kind!r}, name) (or None)")
        self.mode = check_compatible(prior, dtok, backbone, head, ctok)
        self.prior, self.dtok, self.backbone, self.head, self.ctok = prior, dtok, backbone, head, ctok
        for module in (prior, dtok, backbone, head, ctok):
            if module is not None:
                module.eval()  # sampling: dropout must never leak in

    @classmethod
    def from_names(cls, prior: str | None = None, dtok: str | None = None,
                   backbone: str | None = None, head: str | None = None, ctok: str | None = None,
                   *, checkpoints: Mapping[str, str | None] | None = None,
                   device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> "Pipeline":
        """Build from registry names. ``checkpoints`` maps a kind to a path, "pretrained"
        (default: the preset's released weights) or None (random init). The head defaults to the
        preset of the backbone's name, and to the backbone's checkpoint file (MAR layout holds
        both). Compatibility is checked on meta-device copies before any weights load."""
        from .checkpoints import fetch_preset_checkpoint
        from .registry import build, resolve

        if not any((prior, dtok, backbone, head, ctok)):  # the default (a plugin's hook)
            prior, dtok, backbone, head, ctok = (hooks.default_pipeline().get(k) for k in STAGES)
        if backbone is not None and head is None:
            head = backbone
        names = {"prior": prior, "dtok": dtok, "backbone": backbone, "head": head, "ctok": ctok}
        ckpts = dict(checkpoints or {})
        if "head" not in ckpts and "backbone" in ckpts:
            ckpts["head"] = ckpts["backbone"]
        meta = {k: build(k, n, device="meta") if n else None for k, n in names.items()}
        check_compatible(**meta)
        for kind, name in names.items():  # missing unreleased weights: fail before any download
            if name and ckpts.get(kind, "pretrained") == "pretrained":
                fetch_preset_checkpoint(resolve(kind, name), check_only=True)
        built = {k: build(k, n, checkpoint=ckpts.get(k, "pretrained"), device=device, dtype=dtype)
                 if n else None for k, n in names.items()}
        return cls(**built)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, *,
                        revision: str | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None) -> "Pipeline":
        """The embedded default (``source`` None); a preset name every stage shares (e.g.
        ``"fmnist"``); a folder written by :meth:`save_pretrained` or ``discon export``; or
        ``"hf-hub:ORG/NAME[@REVISION]"``, such a folder on the Hugging Face Hub
        (docs/pretrained.md)."""
        from . import pretrained
        from .registry import _names

        if source is None:
            return cls.from_names(device=device, dtype=dtype)
        folder = pretrained.resolve_source(str(source), revision)
        if folder is not None:
            names, ckpts = pretrained.load(folder)
            return cls.from_names(**names, checkpoints=ckpts, device=device, dtype=dtype)
        names = {k: str(source) for k in STAGES if str(source) in _names(k)}
        if not names:
            raise DisconError(f"{str(source)!r} is neither a pipeline folder nor a preset name "
                              "(discon plugins lists them), nor hf-hub:ORG/NAME")
        return cls.from_names(**names, device=device, dtype=dtype)

    def save_pretrained(self, folder: str | os.PathLike, *, name: str | None = None,
                        overwrite: bool = False, half: bool = False) -> Path:
        """Write this pipeline as a folder that :meth:`from_pretrained` loads: safetensors
        weights, presets.yaml, a model card (docs/pretrained.md); returns the folder."""
        from . import pretrained

        parts = {k: getattr(self, k) for k in STAGES if getattr(self, k) is not None}
        return pretrained.save(folder, parts, name=name or Path(folder).name,
                               overwrite=overwrite, half=half)

    @property
    def num_classes(self) -> int:
        """Labels lie in [0, num_classes): the prior's classes, or the backbone's without one."""
        return self.prior.num_classes if self.prior is not None else self.backbone.class_num

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, *, prior_cfg: float | None = None,
                 prior_temperature: float | None = None, ar_steps: int | None = None,
                 cfg_scale: float | None = None, temperature: float | None = None,
                 head_steps: int | str | None = None, generator: torch.Generator | None = None,
                 progress: bool = True, return_tokens: bool = False,
                 discrete: torch.Tensor | None = None):
        """labels int64 [B] -> images float32 [B, 3, H, W] in [0, 1].

        Names: ``prior_*`` is the discrete stage, the rest the continuous stage (the names of
        ``sample_tokens``). ``prior_cfg`` / ``prior_temperature`` default to the prior preset's
        ``sampling: {cfg_scale, temperature}`` (the arguments of ``prior.sample``);
        ``ar_steps``, ``cfg_scale`` (1.0 = no CFG for DisCon, as in the paper) and
        ``temperature`` default to the backbone preset's sampling block (16, 1.0, 1.0 without
        one); ``head_steps`` to the head preset's.
        With ``return_tokens``: ``(images, discrete tokens [B,h,w] or None, latents [B,C,h,w]
        or None)``. ``discrete`` (int64 [B,h,w]) replaces the prior's sample: the same tokens
        completed again, e.g. at other step counts (``discon run --ar-steps-sweep``).
        """
        labels = as_labels(labels)
        for kind in ("prior", "dtok", "backbone", "head", "ctok"):
            if getattr(self, kind) is not None:
                _weights_device(getattr(self, kind), kind)
        num_classes = self.num_classes
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise DisconError(f"labels must lie in [0, {num_classes}), got "
                              f"[{labels.min().item()}, {labels.max().item()}]")
        if self.backbone is not None and ar_steps is None:
            ar_steps = int(_sampling(self.backbone).get("ar_steps", 16))
        if self.backbone is not None and not 1 <= ar_steps <= self.backbone.seq_len:
            raise DisconError(f"ar_steps must be in [1, {self.backbone.seq_len}], got {ar_steps}")
        latents = None
        if discrete is not None and (self.prior is None or discrete.shape[0] != labels.shape[0]):
            raise DisconError("discrete: given tokens need a pipeline with a prior (its grid) and "
                              f"one grid per label, got {list(discrete.shape)} for "
                              f"{labels.shape[0]} labels")
        if self.prior is not None and discrete is None:
            sampling = _sampling(self.prior)
            cfg, temp = sampling.pop("cfg_scale", 1.0), sampling.pop("temperature", 1.0)
            cfg = cfg if prior_cfg is None else prior_cfg
            temp = temp if prior_temperature is None else prior_temperature
            prior_device = next(self.prior.parameters()).device
            try:
                discrete = self.prior.sample(labels.to(prior_device), cfg_scale=cfg,
                                             temperature=temp, generator=generator,
                                             progress=progress, **sampling)
            except RuntimeError as e:  # torch.multinomial on NaN/inf probabilities
                if "inf" not in str(e) and "nan" not in str(e):
                    raise
                raise DisconError("the prior produced non-finite logits (NaN/inf): its weights "
                                  "are corrupt or diverged, or the precision overflowed") from None
        if self.prior is not None:
            codes = self.prior.codebook_size
            if discrete.numel() and (discrete.min() < 0 or discrete.max() >= codes):
                raise DisconError(f"the prior produced token ids outside [0, {codes}); its "
                                  "weights are corrupt or do not match its preset")
            if self.mode == "discrete":
                images = self.dtok.decode(discrete.to(next(self.dtok.parameters()).device))
                images = check_stage_finite(images, "the dtok decoder")
                return (images, discrete, None) if return_tokens else images
        sampling = _sampling(self.backbone)
        x = sample_tokens(
            self.backbone, self.head, labels,
            cond=discrete.flatten(1) if discrete is not None else None, ar_steps=ar_steps,
            temperature=sampling.get("temperature", 1.0) if temperature is None else temperature,
            cfg_scale=sampling.get("cfg_scale", 1.0) if cfg_scale is None else cfg_scale,
            cfg_schedule=sampling.get("cfg_schedule", "linear"), generator=generator,
            progress=progress, head_steps=head_steps)
        latents = self.backbone.unpatchify(x)
        images = self.ctok.decode(latents.to(next(self.ctok.parameters()).device))
        images = check_stage_finite(images, "the ctok decoder")
        return (images, discrete, latents) if return_tokens else images
