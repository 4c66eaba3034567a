"""registry.yaml: load, validate, resolve presets, and ``build()`` components.

A preset is plain data: which plugin factory builds it, the hyperparameters (official names),
where its weights come from, and its recommended sampling settings::

    prior:
      rar-b:
        factory: rar
        description: RAR-B (261M)
        params: {hidden_size: 768, num_hidden_layers: 24, ...}
        checkpoint: {file: rar_b.bin, url: https://..., sha256: null}
        sampling: {cfg_scale: 16.0, guidance_scale_pow: 2.75, temperature: 1.0}   # sample()'s
      rar-l:
        extends: rar-b          # params and sampling merge over the parent's
        params: {hidden_size: 1024}

A prior's ``sampling`` keys are keywords of its ``sample()``, a backbone's those of
``sample_tokens`` that ``Pipeline.generate`` passes on (``pipeline.BACKBONE_SAMPLING``); names
and types are checked when a pipeline is assembled, before any weights load.

The built-in registry ships inside the package. A user registry (``--registry PATH`` or the
``DISCON_REGISTRY`` environment variable) adds entries or replaces built-in ones of the same
kind and name. Names that no registry lists but a plugin registers build with the factory's
own defaults.
"""
from __future__ import annotations

import copy
import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from . import checkpoints, hooks
from .config import check_keys, from_mapping, one_line, read_text, safe_load
from .errors import DisconError, close_matches
from .interfaces import KINDS, PROTOCOLS
from .precision import resolve_dtype

BUILTIN_REGISTRY = Path(__file__).with_name("registry.yaml")
REGISTRY_ENV = "DISCON_REGISTRY"

@dataclass(frozen=True)
class CheckpointSource:
    """Where a preset's weights come from: a file name in the cache; a URL, or a Hugging Face Hub
    ``repo`` + ``filename`` at ``revision`` (a branch, tag or commit hash: the hash pins it); a
    checksum (None: trust on first use, see checkpoints.fetch)."""

    file: str
    url: str | None = None
    repo: str | None = None
    filename: str | None = None
    revision: str | None = None
    sha256: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Entry:
    """One registry entry as written, before ``extends`` is applied: the schema every registry
    file and plugin preset is checked against (strict keys and types, by config.from_mapping)."""

    factory: str = ""
    extends: str = ""
    description: str = ""
    params: dict = field(default_factory=dict)
    checkpoint: CheckpointSource | None = None
    sampling: dict = field(default_factory=dict)
    classes: Any = None  # class names (index = id) or a dataset's: `classes: fashion-mnist`


@dataclass(frozen=True)
class Preset:
    """A fully resolved registry entry (``extends`` already applied)."""

    kind: str
    name: str
    factory: str
    params: dict[str, Any] = field(default_factory=dict)
    checkpoint: CheckpointSource | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = "<plugin default>"
    classes: list[str] | str = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "factory": self.factory,
                               "description": self.description, "source": self.source,
                               "params": self.params, "sampling": self.sampling}
        if self.classes:
            out["classes"] = self.classes
        if self.checkpoint is not None:
            out["checkpoint"] = {k: v for k, v in vars(self.checkpoint).items() if v is not None}
        return out


_user_registry: Path | None = None
_cache: dict[str, dict[str, tuple[dict, str]]] | None = None
_cache_generation = -1


def set_user_registry(path: str | os.PathLike | None) -> None:
    """Overlay a user registry file on the built-in one (None: only ``DISCON_REGISTRY``)."""
    global _user_registry, _cache
    _user_registry = Path(path) if path is not None else None
    _cache = None


def _validate_file(path: Path) -> dict[str, dict[str, dict]]:
    """Parse and validate one registry file; errors name the file, entry and field."""
    text = read_text(path, "registry file")
    try:
        data = safe_load(text)
    except yaml.YAMLError as e:
        raise DisconError(f"registry file {path} is not valid YAML: {one_line(e)}") from None
    return _validate(data, f"registry file {path}")


def _validate(data: Any, source: str) -> dict[str, dict[str, dict]]:
    """Validate registry entries (from a file or a plugin's presets hook); errors name the
    source, entry and field."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DisconError(f"{source}: top level must be a mapping of kinds "
                          f"({', '.join(KINDS)}), got {type(data).__name__}")
    for kind, entries in data.items():
        if kind not in KINDS:
            raise DisconError(f"{source}: unknown kind {kind!r}; kinds are "
                              f"{', '.join(KINDS)}{close_matches(str(kind), KINDS)}")
        if not isinstance(entries, dict):
            raise DisconError(f"{source}: {kind} must map preset names to entries")
        for name, entry in entries.items():
            where = f"{source}, entry {kind}/{name}"
            if not isinstance(entry, dict):
                raise DisconError(f"{where}: must be a mapping, got {type(entry).__name__}")
            checked = from_mapping(Entry, entry, where)
            if "factory" not in entry and "extends" not in entry:
                raise DisconError(f"{where}: missing key 'factory' (or 'extends')")
            if not isinstance(checked.classes, (list, str, type(None))):
                raise DisconError(f"{where}: classes must be a list of names or a dataset name")
            ck = checked.checkpoint
            if ck is None:
                continue
            checkpoints.cache_path(ck.file, f"{where}: checkpoint.file")
            if ck.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", ck.sha256):
                raise DisconError(f"{where}: checkpoint.sha256 must be 64 lowercase hex digits, "
                                  f"got {ck.sha256!r}")
            if (ck.repo or ck.filename or ck.revision) and not (ck.repo and ck.filename
                                                                and not ck.url):
                raise DisconError(f"{where}: checkpoint: give url, or repo + filename (+ revision)")
    return data


def _entries() -> dict[str, dict[str, tuple[dict, str]]]:
    """kind -> name -> (raw entry, source), built-in < plugin presets < user registry."""
    global _cache, _cache_generation
    if _cache is None or _cache_generation != hooks.generation:
        _cache_generation = hooks.generation
        files = [BUILTIN_REGISTRY]
        user = _user_registry or (Path(os.environ[REGISTRY_ENV]) if os.environ.get(REGISTRY_ENV)
                                  else None)
        if user is not None:
            if not user.exists():
                raise DisconError(f"user registry file {user} does not exist "
                                  f"(from --registry or ${REGISTRY_ENV})")
            files.append(user)
        # built-in file, then presets contributed by plugins, then the user registry
        layers = [(_validate_file(files[0]), str(files[0]))]
        for entries, plugin in hooks.presets():
            if isinstance(entries, (str, os.PathLike)):
                layers.append((_validate_file(Path(entries)), str(entries)))
            else:
                layers.append((_validate(entries, f"presets of plugin {plugin!r}"), plugin))
        layers += [(_validate_file(path), str(path)) for path in files[1:]]
        merged: dict[str, dict[str, tuple[dict, str]]] = {k: {} for k in KINDS}
        for data, source in layers:
            for kind, entries in data.items():
                for name, entry in entries.items():
                    merged[kind][str(name)] = (entry, source)
        _cache = merged
    return _cache


def _names(kind: str) -> set[str]:
    return set(_entries()[kind]) | {n for (k, n) in hooks.factories() if k == kind}


def resolve(kind: str, name: str) -> Preset:
    """The preset ``kind``/``name`` with its ``extends`` chain applied."""
    if kind not in KINDS:
        raise DisconError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}"
                          f"{close_matches(kind, KINDS)}")
    if not isinstance(name, str):
        raise DisconError(f"{kind} preset name must be a string, got {name!r}")
    entries = _entries()[kind]
    if name not in entries:
        if (kind, name) in hooks.factories():
            return Preset(kind=kind, name=name, factory=name)
        known = _names(kind)
        raise DisconError(f"unknown {kind} {name!r}{close_matches(name, known)}; "
                          f"available: {', '.join(sorted(known)) or 'none'}")
    chain: list[tuple[dict, str]] = []
    seen: list[str] = []
    current = name
    while True:
        if current in seen:
            raise DisconError(f"registry entry {kind}/{name}: 'extends' cycle "
                              f"{' -> '.join(seen + [current])}")
        seen.append(current)
        if current not in entries:
            raise DisconError(f"registry entry {kind}/{seen[-2]} ({entries[seen[-2]][1]}): "
                              f"extends unknown {kind} {current!r}"
                              f"{close_matches(current, entries)}")
        entry, src = entries[current]
        chain.append((entry, src))
        if "extends" not in entry:
            break
        current = entry["extends"]
    params: dict[str, Any] = {}
    sampling: dict[str, Any] = {}
    factory = description = ""
    checkpoint: CheckpointSource | None = None
    classes: list[str] | str = []
    for entry, _src in reversed(chain):  # root first, the named entry last
        factory = entry.get("factory", factory)
        classes = entry.get("classes", classes)
        description = entry.get("description", description)
        params.update(copy.deepcopy(entry.get("params", {})))
        sampling.update(copy.deepcopy(entry.get("sampling", {})))
        if "checkpoint" in entry:
            ck = entry["checkpoint"]
            checkpoint = CheckpointSource(**ck) if ck is not None else None
    return Preset(kind=kind, name=name, factory=factory, params=params, checkpoint=checkpoint,
                  sampling=sampling, description=description, source=chain[0][1],
                  classes=classes)


def list_components(kind: str | None = None) -> dict[str, list[dict[str, str]]]:
    """What the registry and the plugins provide: kind -> [{name, factory, plugin, description}]."""
    if kind is not None and kind not in KINDS:
        raise DisconError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}"
                          f"{close_matches(kind, KINDS)}")
    facs = hooks.factories()
    out: dict[str, list[dict[str, str]]] = {}
    for k in [kind] if kind else list(KINDS):
        rows = []
        for name in sorted(_names(k)):
            preset = resolve(k, name)
            fac = facs.get((k, preset.factory))
            rows.append({"name": name, "factory": preset.factory,
                         "plugin": fac.plugin if fac else "<missing factory>",
                         "description": preset.description})
        out[k] = rows
    return out


def accepted_params(fn) -> list[str] | None:
    """Keyword names a factory accepts (None when it takes **kwargs)."""
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return [n for n, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


# int hyperparameters that count or size something: 0 or less builds a broken model
SIZE_NAME = re.compile(r"depth|layers|heads|dim|size|channels|res_blocks|stride|hidden|embed|"
                       r"class_num|num_classes|seq_len|mul$|_w$|_d$|^ch$")


def check_params(fn, params: dict[str, Any], where: str) -> dict[str, Any]:
    """Check hyperparameters against the type of each factory default (ints stay ints, bools
    bools, floats in any YAML spelling; sizes positive); returns them with floats coerced."""
    from .config import coerce

    defaults = {n: p.default for n, p in inspect.signature(fn).parameters.items()
                if p.default is not p.empty and p.default is not None}
    out = dict(params)
    for key, value in params.items():
        if key not in defaults or value is None:
            continue
        default = defaults[key]
        t = type(default)
        if t in (bool, int, float):
            out[key] = coerce(value, t, key, where)
            if t is int and not isinstance(value, int):  # ints stay ints: no "4" or 4.0 depths
                raise DisconError(f"{where}: {key} must be an integer, got {value!r}")
            if t is int and default > 0 and SIZE_NAME.search(key) and value < 1:
                raise DisconError(f"{where}: {key} must be a positive integer, got {value!r}")
        elif t is tuple and not isinstance(value, (list, tuple)):
            raise DisconError(f"{where}: {key} must be a list, got {value!r}")
    return out


HEAD_PREFIX = "diffloss."  # a head's keys in a backbone+head checkpoint (MAR)


def build(kind: str, name: str, *, checkpoint: str | os.PathLike | None = None,
          device: str | torch.device | None = None, dtype: torch.dtype | str | None = "auto",
          **overrides: Any) -> torch.nn.Module:
    """Build the component ``kind``/``name`` from its preset.

    Args:
        kind: dtok, ctok, prior, backbone or head.
        name: a registry name (``discon plugins`` lists them).
        checkpoint: None for random init (training from scratch); a path to an official
            release file, a file written by discon, or a safetensors file; or ``"pretrained"``
            for the preset's own checkpoint (looked up in ``$DISCON_HOME``, downloaded from its
            Hub repo or URL, sha256-checked; see :func:`checkpoints.fetch`).
        device: where to build; ``"meta"`` builds shapes only (no memory, no init).
        dtype: the parameters' dtype once weights are loaded: ``"auto"`` (bf16 where this device
            runs bf16 natively, else fp32; see :mod:`discon_core.precision`), a name such as
            ``"bf16"`` / ``"fp16"`` / ``"fp32"``, a floating torch.dtype, or None (as built).
            ``auto`` leaves a randomly initialised module (``checkpoint=None``) in fp32: it is
            there to be trained, and training keeps fp32 weights (autocast does the rest).
        **overrides: hyperparameters, by the official names; unknown names are an error.

    Returns the module, in eval() mode when weights were loaded; ``module.discon_preset`` is the
    resolved :class:`Preset` with the parameters actually used, ``module.discon_checkpoint`` the
    path its weights came from (None: random init).
    """
    preset = resolve(kind, name)
    facs = hooks.factories()
    fac = facs.get((kind, preset.factory))
    if fac is None:
        known = {n for (k, n) in facs if k == kind}
        raise DisconError(f"{kind} preset {name!r} ({preset.source}) names factory "
                          f"{preset.factory!r}, which no plugin registers"
                          f"{close_matches(preset.factory, known)}")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise DisconError(f"build({kind!r}, {name!r}): checkpoint must be a path, 'pretrained' "
                          f"or None, got {type(checkpoint).__name__} {checkpoint!r}")
    if device is not None and str(device) != "meta":
        from .runtime import resolve_device
        device = resolve_device(device, what=f"build({kind!r}, {name!r}): device")
    auto = dtype is not None and str(dtype).strip().lower() == "auto"
    if dtype is not None and not (auto and (checkpoint is None or str(device) == "meta")):
        dtype = resolve_dtype(dtype, device or "cpu", f"build({kind!r}, {name!r}): dtype")
    else:
        dtype = None
    accepted = accepted_params(fac.fn)
    params = check_params(fac.fn, {**preset.params, **overrides}, f"{kind} {name!r}")
    if accepted is not None:
        where = f"{kind} {name!r} (factory {fac.name!r} from {fac.plugin})"
        check_keys(overrides, accepted, where, "override")
        check_keys(preset.params, accepted, where, f"preset {kind}/{name} param")
    with torch.device(device if device is not None else "cpu"):
        module = fac.fn(**params)
    protocol = PROTOCOLS[kind]
    if not isinstance(module, protocol):
        raise DisconError(f"factory {fac.name!r} from plugin {fac.plugin!r} returned "
                          f"{type(module).__name__}, which does not satisfy {protocol.__name__} "
                          f"(see discon_core/interfaces.py)")
    # `discon train` writes MAR's layout: backbone keys at the top level, the head's under
    # HEAD_PREFIX; a plugin sets checkpoint_prefix / checkpoint_drop only to differ from it.
    if kind == "head" and not hasattr(module, "checkpoint_prefix"):
        module.checkpoint_prefix = HEAD_PREFIX
    if kind == "backbone" and not hasattr(module, "checkpoint_drop"):
        module.checkpoint_drop = (HEAD_PREFIX,)
    path = None if checkpoint is None else Path(checkpoint) if str(checkpoint) != "pretrained" \
        else checkpoints.fetch_preset_checkpoint(preset)
    if path is not None:
        checkpoints.load_into(module, path)
        module.eval()
    if dtype is not None:
        module.to(dtype=dtype)
    module.discon_preset = Preset(kind=kind, name=name, factory=preset.factory, params=params,
                                  checkpoint=preset.checkpoint, sampling=preset.sampling,
                                  description=preset.description, source=preset.source,
                                  classes=preset.classes)
    module.discon_checkpoint = path  # its weights' file, None: random init (checkpoints.provenance)
    return module
