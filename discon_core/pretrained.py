"""Pipeline folders: what ``Pipeline.save_pretrained`` / ``discon export`` write and
``Pipeline.from_pretrained`` reads (docs/pretrained.md).

A folder holds ``presets.yaml`` (a registry fragment in the schema of registry.yaml: one model
name for every kind in it, each entry ``extends`` the preset it was built from, with the
``params`` that differ, the ``sampling`` settings and ``checkpoint: {file: <kind>.safetensors,
sha256}``), one safetensors file per component (the backbone's in MAR's layout: its keys plus the
head's under ``diffloss.``, which the head entry shares) and a generated ``README.md`` model card.
An entry may instead name only a registry preset (``extends``, no file): that component then
loads the preset's released weights.

A component may make its file self-contained with an optional method ``self_contained_state()
-> (state_dict, params_overrides)`` (interfaces.py; e.g. a KL tokenizer folds its latent
statistics into its weights); otherwise its ``state_dict()`` is stored.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from . import checkpoints, hooks
from .config import one_line
from .errors import DisconError
from .registry import HEAD_PREFIX, _entries, _validate_file, resolve

PRESETS = "presets.yaml"
HUB_SCHEME = "hf-hub:"
_FOLDERS: set[str] = set()  # presets.yaml files registered by load(): never a saved entry's base


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _diff(values: dict, base: dict) -> dict:
    return {k: _plain(v) for k, v in values.items() if k not in base or _plain(base[k]) != _plain(v)}


def entry_of(module, overrides: dict | None = None) -> dict[str, Any]:
    """The registry entry that rebuilds ``module`` (built by ``build``): ``extends`` the registry
    preset it came from (past pipeline folders), the params that differ and ``overrides``."""
    p = module.discon_preset
    base, entries = p.name, _entries()[p.kind]
    while base in entries and entries[base][1] in _FOLDERS:
        base = entries[base][0].get("extends")
    ref = resolve(p.kind, base) if base in entries else None
    return {**({"extends": base} if ref else {"factory": p.factory}),
            "description": p.description or f"{p.kind} {p.name}",
            "params": {**_diff(p.params, ref.params if ref else {}), **(overrides or {})},
            "sampling": _diff(p.sampling, ref.sampling if ref else {})}


def write(folder: Path, components: dict[str, Any], *, half: bool = False,
          entries: dict[str, dict] | None = None,
          locate: Callable[[Path], dict] | None = None) -> dict[str, dict]:
    """Store each component's weights in ``folder/<kind>.safetensors`` (fp16 with ``half``; the
    head inside the backbone's file); returns {kind: entry} for presets.yaml. ``entries`` (kind ->
    fields) replace generated fields; ``locate(path)`` gives the checkpoint block (default
    {file: name}), to which the sha256 is added."""
    out: dict[str, dict] = {}
    for kind, module in components.items():
        if kind == "head" and "backbone" in components:
            continue  # stored with the backbone, in MAR's layout
        fn = getattr(module, "self_contained_state", None)
        state, params = fn() if fn is not None else (module.state_dict(), {})
        if kind == "backbone" and "head" in components:
            state = {**state, **{HEAD_PREFIX + k: v for k, v in
                                 components["head"].state_dict().items()}}
        fp = torch.float16 if half else torch.float32
        state = {k: v.detach().to(fp if v.is_floating_point() else v.dtype).cpu().contiguous()
                 for k, v in state.items()}
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise DisconError(f"{kind}: non-finite weights{' in fp16' if half else ''} in "
                              f"{', '.join(bad[:3])}; not saved")
        path = checkpoints.save_atomic(state, folder / f"{kind}.safetensors")
        ck = {**(locate(path) if locate else {"file": path.name}),
              "sha256": checkpoints.sha256_of(path)}
        for k in (kind, "head") if kind == "backbone" and "head" in components else (kind,):
            over = (entries or {}).get(k, {})
            e = {**over, **entry_of(components[k], params if k == kind else {}), **over}
            e["params"] = {**over.get("params", e["params"]), **(params if k == kind else {})}
            out[k] = {**{f: v for f, v in e.items() if f != "sampling"}, "checkpoint": ck,
                      **({"sampling": e["sampling"]} if e["sampling"] else {})}
    return out


def card(name: str, components: dict[str, Any], presets: dict[str, dict], notes: str) -> str:
    """The folder's README.md: what is in it (``notes``: how it was made) and how to load it."""
    rows = []
    for kind, e in ((k, v[name]) for k, v in presets.items()):
        m, ck = components.get(kind), e.get("checkpoint") or {}
        size = f"{sum(p.numel() for p in m.parameters()) / 1e6:.3f} M" if m is not None else ""
        sampling = (m.discon_preset if m is not None else resolve(kind, e["extends"])).sampling
        rows.append(f"| {kind} | {e.get('extends', e.get('factory'))} | {size} | "
                    f"{ck.get('file', 'the preset released weights')} | {ck.get('sha256', '')} | "
                    f"{sampling or ''} |")
    return "\n".join([
        f"# {name}", "", "A discon pipeline folder (docs/pretrained.md in discon).", "", notes,
        "| kind | preset | parameters | weights | sha256 | sampling |", "|---|---|---|---|---|---|",
        *rows, "", "```python", "from discon_core.pipeline import Pipeline", "",
        'pipe = Pipeline.from_pretrained("THIS_FOLDER")  # or "hf-hub:ORG/NAME"',
        "images = pipe.generate(torch.tensor([0, 1, 2, 3]))", "```", "",
        "Or `discon demo --model THIS_FOLDER`. Every file's sha256 is checked at every load.", ""])


def save(folder: str | os.PathLike, components: dict[str, Any], *, name: str,
         references: dict[str, str] | None = None, overwrite: bool = False,
         half: bool = False, notes: str = "") -> Path:
    """Write ``components`` (kind -> built module) to ``folder`` under the model name ``name``;
    ``references`` (kind -> registry preset) are entries that load that preset's weights;
    ``notes`` go into the model card."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise DisconError(f"{folder} exists and is not empty; choose another folder or pass "
                          "overwrite=True (--overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    presets = {k: {name: {"extends": v, "description": f"the {v} preset"}}
               for k, v in (references or {}).items()}
    presets.update({k: {name: e} for k, e in write(folder, components, half=half).items()})
    with checkpoints.atomic_path(folder / PRESETS) as tmp:
        tmp.write_text(f"# Written by discon (Pipeline.save_pretrained); model {name!r}.\n"
                       + yaml.safe_dump(presets, sort_keys=False, width=100))
    with checkpoints.atomic_path(folder / "README.md") as tmp:
        tmp.write_text(card(name, components, presets, notes))
    return folder


def resolve_source(source: str, revision: str | None = None) -> Path | None:
    """A folder for ``source``: the folder itself, or a Hub repo (``hf-hub:ORG/NAME[@REV]``)
    downloaded through the Hub client into ``$DISCON_HOME/hub``; None: not a folder (a name)."""
    if source.startswith(HUB_SCHEME):
        repo, _, rev = source[len(HUB_SCHEME):].partition("@")
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(repo, revision=rev or revision,
                                          cache_dir=checkpoints.discon_home() / "hub"))
        except Exception as e:  # the client raises many types (HTTP, auth, offline, cache)
            raise DisconError(f"cannot download the pipeline {source}: {one_line(e)}") from None
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or os.sep in source:
        raise DisconError(f"{source} is not a pipeline folder (one with {PRESETS})")
    return None


class _FolderPresets:
    """A plugin contributing one folder's presets.yaml to the registry."""

    def __init__(self, path: Path):
        self.path = path

    @hooks.hookimpl
    def discon_register_presets(self, register):
        register(self.path)


def load(folder: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """Register ``folder``'s presets (once); (kind -> name, kind -> checkpoint file) for
    ``from_names``, each file's sha256 checked against presets.yaml."""
    path = (folder / PRESETS).resolve()
    if not path.is_file():
        raise DisconError(f"{folder} is not a pipeline folder: {PRESETS} is missing")
    names, ckpts = {}, {}
    for kind, entries in _validate_file(path).items():
        if len(entries) != 1:
            raise DisconError(f"{path}: {kind} must have exactly one entry, got {len(entries)}")
        (name, entry), = entries.items()
        names[kind], ck = str(name), entry.get("checkpoint")
        if ck:
            file = folder / ck["file"]
            if not file.is_file():
                raise DisconError(f"{path}: the {kind} weights {file} are missing")
            checkpoints.verify_sha256(file, ck.get("sha256"), f"{kind} weights {file}",
                                      "download or export the folder again")
            ckpts[kind] = file
    if hooks.plugin_manager().get_plugin(f"pretrained:{path}") is None:
        _FOLDERS.add(str(path))
        hooks.register_plugin(_FolderPresets(path), name=f"pretrained:{path}")
    other = {_entries()[k][n][1] for k, n in names.items()} - {str(path)}
    if other:
        raise DisconError(f"{path}: its model name {names[next(iter(names))]!r} is also "
                          f"defined by {other.pop()}; export it under another --name")
    return names, ckpts
