"""Training recipes: what the one trainer (``discon_core/train.py``) optimises.

A recipe bundles the model to optimise (an ``nn.Module`` returning ``(loss, logs)``), its
dataset, how its keys map to the checkpoint layout, which parameters AdamW must not decay, and
how to draw a grid of samples. Recipes are registered through the ``discon_register_recipes``
hook (the built-in ``discon``, ``prior`` and ``tokenizer`` in ``discon_plugins/recipes.py``) or
named directly in a config: ``recipe: package.module:function``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import hooks
from .config import check_keys
from .errors import DisconError, close_matches

if TYPE_CHECKING:
    from .config import TrainConfig


def component_spec(spec: Any, kind: str) -> dict[str, Any]:
    """Normalise ``name`` or ``{preset, checkpoint, overrides}`` to the mapping form."""
    if isinstance(spec, str):
        return {"preset": spec, "checkpoint": None, "overrides": {}}
    if not isinstance(spec, Mapping) or "preset" not in spec:
        raise DisconError(f"components.{kind} must be a preset name or a mapping with 'preset', "
                          f"got {spec!r}")
    check_keys(spec, ("preset", "checkpoint", "overrides", "kind"), f"components.{kind}")
    return {"preset": spec["preset"], "checkpoint": spec.get("checkpoint"),
            "overrides": dict(spec.get("overrides") or {}), "kind": spec.get("kind", kind)}


def build_component(kind: str, spec: Any, device, *, trainable: bool = True) -> nn.Module:
    from .registry import build
    s = component_spec(spec, kind)
    # fp32 weights in training, trained or frozen: the trainer's autocast sets the precision
    module = build(s.get("kind", kind), s["preset"], checkpoint=s["checkpoint"], device=device,
                   dtype="fp32", **s["overrides"])
    module.train(trainable)
    if not trainable:
        module.requires_grad_(False)
    return module


# ------------------------------------------------------------------------------------------------
# Recipes

@dataclass
class Recipe:
    """What to train: ``model(batch, step=, generator=) -> (loss, logs)`` over ``dataset``.

    ``to_file``/``from_file`` map module state-dict keys to the checkpoint layout and back;
    ``no_decay(file_key, param)`` names the parameters AdamW must not decay; ``samples(model,
    generator)`` returns a grid-worth of images in [0,1] (or None) for the sample grids.
    """

    name: str
    model: nn.Module
    dataset: Any
    collate: Callable
    no_decay: Callable[[str, torch.Tensor], bool]
    to_file: Callable[[str], str] = lambda k: k
    from_file: Callable[[str], str] = lambda k: k
    samples: Callable[[nn.Module, torch.Generator], torch.Tensor | None] | None = None
    flip: bool = True
    info: dict[str, Any] = field(default_factory=dict)


def plain_no_decay(key: str, p: torch.Tensor) -> bool:
    """The usual AdamW rule: no decay for 1-D parameters (norms) and biases."""
    return p.ndim < 2 or key.endswith(".bias")


def make_recipe(cfg: TrainConfig, device) -> Recipe:
    """A registered recipe by name (built-in or from a plugin's hook), or ``package.module:function`` for your own."""
    if ":" in cfg.recipe:
        mod, _, fn = cfg.recipe.partition(":")
        try:
            return getattr(importlib.import_module(mod), fn)(cfg, device)
        except (ImportError, AttributeError) as e:
            raise DisconError(f"recipe {cfg.recipe!r} cannot be imported: {e}") from None
    known = hooks.recipes()
    if cfg.recipe not in known:
        raise DisconError(f"unknown recipe {cfg.recipe!r}; registered: {', '.join(known)} (or "
                          f"package.module:function){close_matches(cfg.recipe, known)}")
    return known[cfg.recipe].fn(cfg, device)
