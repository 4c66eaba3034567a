"""The embedded default pipeline: Fashion-MNIST DisCon weights shipped inside the package.

``discon run`` with no component named samples prior ``fmnist`` -> backbone + head ``fmnist``
-> ctok ``fmnist`` (and ``--compare-discrete`` decodes the same tokens with dtok ``fmnist``).
The five presets live in ``weights/fmnist/presets.yaml``, contributed through the
``discon_register_presets`` hook like any plugin's; each names its safetensors file as
``package:discon_plugins/weights/fmnist/<file>`` with its sha256, verified at every load.

They are written by one command after the CPU-scale reproduction (``configs/paper_cpu.yaml``):

    python benchmarks/reproduce.py configs/paper_cpu.yaml --export-default

which takes the stages named in the config's ``default`` block, stores the EMA weights in fp16
(upcast to fp32 when loaded), folds the continuous tokenizer's per-channel latent statistics into
its ``quant_conv``/``post_quant_conv`` (so the shipped ctok needs no separate stats file) and
writes the presets with the sampling settings the study chose. The model card is
``docs/default_model.md``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import yaml

from discon_core.hooks import hookimpl

FOLDER = Path(__file__).with_name("weights") / "fmnist"
PRESETS = FOLDER / "presets.yaml"
PACKAGE_URL = "package:discon_plugins/weights/fmnist/"


@hookimpl
def discon_register_presets(register):
    if PRESETS.is_file():
        register(PRESETS)


@torch.no_grad()
def fold_latent_stats(ctok) -> dict[str, torch.Tensor]:
    """State dict of a KL tokenizer whose normalization ``(z - mean) / std * multiplier`` is
    folded into its 1x1 convolutions, so that identity statistics give the same latents.

    Encoder side: moments = (mean, logvar) of z; the normalized posterior has mean
    ``(mean - m) * k / s`` and logvar ``logvar + 2 log(k / s)``. Decoder side:
    ``post_quant_conv(latent * s / k + m)`` is one 1x1 convolution with scaled weights and a
    shifted bias."""
    state = {k: v.clone() for k, v in ctok.state_dict().items()}
    c = ctok.latent_channels
    ctok._resolve_stats()
    m = ctok.latent_shift.reshape(c).double()
    gain = (ctok.latent_multiplier / ctok.latent_scale.reshape(c)).double()  # k / s
    w, b = state["quant_conv.weight"].double(), state["quant_conv.bias"].double()
    w[:c] *= gain[:, None, None, None]
    b[:c] = (b[:c] - m) * gain
    b[c:] += 2 * torch.log(gain)
    state["quant_conv.weight"], state["quant_conv.bias"] = w.float(), b.float()
    w, b = state["post_quant_conv.weight"].double(), state["post_quant_conv.bias"].double()
    state["post_quant_conv.bias"] = (b + w[:, :, 0, 0] @ m).float()
    state["post_quant_conv.weight"] = (w / gain[None, :, None, None]).float()
    return state


def export(components: dict[str, dict[str, Any]], *, description: str) -> dict[str, str]:
    """Write the default pipeline: ``components`` maps a kind (prior, dtok, backbone, ctok) to
    ``{module, extends, description, params?, sampling?}`` (the backbone also ``head`` and
    ``head_extends``); returns file -> sha256.

    ``module`` is the trained, loaded component (its state dict is stored in fp16; a ``ctok``
    gets its latent statistics folded in), ``extends`` the preset it was built from."""

    from discon_core.checkpoints import atomic_path, save_atomic, sha256_of

    FOLDER.mkdir(parents=True, exist_ok=True)
    presets: dict[str, dict] = {}
    shas = {}
    for kind, spec in components.items():
        module = spec["module"]
        state = fold_latent_stats(module) if kind == "ctok" else module.state_dict()
        if kind == "backbone":  # the MAR layout: backbone keys plus the head under diffloss.
            state = {**state, **{f"diffloss.{k}": v
                                 for k, v in spec["head"].state_dict().items()}}
        state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype)
                 .contiguous().cpu() for k, v in state.items()}
        bad = [k for k, v in state.items() if v.is_floating_point() and not
               torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"{kind}: values out of fp16 range in {bad[:3]}")
        file = FOLDER / f"{kind}.safetensors"
        save_atomic(state, file)
        file.chmod(0o644)  # package data: readable by every user
        shas[file.name] = sha256_of(file)
        checkpoint = {"file": f"fmnist/{file.name}", "url": PACKAGE_URL + file.name,
                      "sha256": shas[file.name]}
        entry = {"extends": spec["extends"], "description": spec["description"],
                 "params": spec.get("params", {}), "checkpoint": checkpoint}
        if spec.get("sampling"):
            entry["sampling"] = spec["sampling"]
        presets.setdefault(kind, {})["fmnist"] = entry
        if kind == "backbone":  # the head reads the diffloss. keys of the same file
            presets.setdefault("head", {})["fmnist"] = {
                "extends": spec["head_extends"], "params": spec.get("params", {}),
                "description": "head of the embedded default (in the backbone's file)",
                "checkpoint": checkpoint}
    if "ctok" in presets:  # statistics folded into the weights
        presets["ctok"]["fmnist"]["params"] = {**presets["ctok"]["fmnist"]["params"],
                                               "latents_stats": None, "latent_multiplier": 1.0}
    header = ("# Written by `python benchmarks/reproduce.py configs/paper_cpu.yaml "
              "--export-default`; do not edit by hand.\n# " + description + "\n")
    with atomic_path(PRESETS) as tmp:
        Path(tmp).write_text(header + yaml.safe_dump(presets, sort_keys=False, width=100))
    PRESETS.chmod(0o644)
    return shas


def size_mb() -> float:
    return sum(p.stat().st_size for p in FOLDER.glob("*.safetensors")) / 1e6 if FOLDER.is_dir() \
        else math.nan
