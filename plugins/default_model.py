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

import yaml

from discon_core.hooks import hookimpl

FOLDER = Path(__file__).with_name("weights") / "fmnist"
PRESETS = FOLDER / "presets.yaml"
PACKAGE_URL = "package:discon_plugins/weights/fmnist/"


@hookimpl
def discon_register_presets(register):
    if PRESETS.is_file():
        register(PRESETS)


@hookimpl
def discon_default_pipeline():
    return dict.fromkeys(("prior", "dtok", "backbone", "head", "ctok"), "fmnist")


def export(components: dict[str, dict[str, Any]], *, description: str) -> dict[str, str]:
    """Write the default pipeline: ``components`` maps a kind (prior, dtok, backbone, ctok) to
    ``{module, extends, description, params?, sampling?}`` (the backbone also ``head`` and
    ``head_extends``); returns file -> sha256.

    ``module`` is the trained, loaded component, ``extends`` the preset it was built from. The
    files are written by the code of ``Pipeline.save_pretrained`` (``discon_core.pretrained.write``:
    fp16 here, a ``ctok`` with its latent statistics folded in by its ``self_contained_state``),
    with ``package:`` URLs."""
    from discon_core.checkpoints import atomic_path
    from discon_core.pretrained import write

    modules = {k: spec["module"] for k, spec in components.items()}
    entries = {k: {"extends": spec["extends"], "description": spec["description"],
                   "params": spec.get("params", {}), "sampling": spec.get("sampling", {})}
               for k, spec in components.items()}
    if "backbone" in components:
        modules["head"] = components["backbone"]["head"]
        entries["head"] = {"extends": components["backbone"]["head_extends"],
                           "params": entries["backbone"]["params"],
                           "description": "head of the embedded default (in the backbone's file)",
                           "sampling": {}}
    FOLDER.mkdir(parents=True, exist_ok=True)
    written = write(FOLDER, modules, half=True, entries=entries,
                    locate=lambda path: {"file": f"fmnist/{path.name}",
                                         "url": PACKAGE_URL + path.name})
    presets = {k: {"fmnist": written[k]} for k in ("prior", "dtok", "backbone", "head", "ctok")
               if k in written}
    for path in FOLDER.glob("*.safetensors"):
        path.chmod(0o644)  # package data: readable by every user
    header = ("# Written by `python benchmarks/reproduce.py configs/paper_cpu.yaml "
              "--export-default`; do not edit by hand.\n# " + description + "\n")
    with atomic_path(PRESETS) as tmp:
        Path(tmp).write_text(header + yaml.safe_dump(presets, sort_keys=False, width=100))
    PRESETS.chmod(0o644)
    return {Path(e["fmnist"]["checkpoint"]["file"]).name: e["fmnist"]["checkpoint"]["sha256"]
            for e in presets.values()}


def size_mb() -> float:
    return sum(p.stat().st_size for p in FOLDER.glob("*.safetensors")) / 1e6 if FOLDER.is_dir() \
        else math.nan
