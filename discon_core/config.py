"""Typed configuration: the training config dataclasses, YAML/JSON reading and ``--set`` edits.

Every value is checked against its dataclass annotation in ONE place (:func:`coerce`), so a
config typo is one line naming the key path and the expected type. YAML spells some numbers as
strings (PyYAML reads ``2e-4`` and ``1.0e6`` as str): float fields accept any numeric spelling,
int fields accept integral numbers only, bool fields accept only true/false.
:func:`check_keys` is the one strict-keys check used wherever a mapping from a user is read.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import DisconError, close_matches


def one_line(e: BaseException) -> str:
    """An exception's message on one line (YAML and JSON errors span several)."""
    return " ".join(str(e).split())


def check_keys(mapping: Mapping, allowed: Iterable[str], where: str, what: str = "key") -> None:
    """Refuse keys of ``mapping`` outside ``allowed``, naming ``where`` and the closest match."""
    allowed = list(dict.fromkeys(map(str, allowed)))  # in the caller's (signature) order
    unknown = sorted(set(map(str, mapping)) - set(allowed))
    if unknown:
        raise DisconError(f"{where}: unknown {what} {', '.join(map(repr, unknown))}"
                          f"{close_matches(unknown[0], allowed)}; accepted: {', '.join(allowed)}")


SEED_RANGE = (0, 2**32 - 1)  # numpy's range; batch seeds (seed * stride + k) stay in torch's


def check_seed(seed: int | None, what: str = "seed") -> None:
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise DisconError(f"{what} must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], "
                          f"got {seed}")


# -- files ---------------------------------------------------------------------------------------

def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The text of ``path``; a missing file, a folder, a binary or unreadable file is one line."""
    path = Path(path)
    if path.is_dir():
        raise DisconError(f"{what} {path} is a directory, expected a file")
    if not path.is_file():
        raise DisconError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DisconError(f"{what} {path} is not a text file (binary content)") from None
    except OSError as e:
        raise DisconError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise DisconError(f"{what} {path} is not valid JSON (truncated or corrupt?): "
                          f"{one_line(e)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        keys = [(k.tag, k.value, k.start_mark.line) for k, _ in node.value if k.id == "scalar"]
        for i, (tag, value, line) in enumerate(keys):
            if any((t, v) == (tag, value) for t, v, _ in keys[:i]):
                raise yaml.YAMLError(f"duplicate key {value!r} (line {line + 1})")
        return super().construct_mapping(node, deep)


def safe_load(text: str) -> Any:
    """yaml.safe_load with duplicate keys refused: the one YAML reader of every file discon
    reads (configs, registries, presets, --set values)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_yaml(path: str | os.PathLike, what: str = "config file") -> dict:
    try:
        data = safe_load(read_text(path, what))
    except yaml.YAMLError as e:
        raise DisconError(f"{what} {path} is not valid YAML: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise DisconError(f"{what} {path}: top level must be a mapping, got "
                          f"{type(data).__name__}")
    return data


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """``--set a.b=value`` edits (value parsed as YAML) on a nested mapping."""
    raw = copy.deepcopy(raw)
    for item in overrides or ():
        key, eq, value = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            raise DisconError(f"--set expects KEY=VALUE with a dotted KEY, got {item!r}")
        try:
            parsed = safe_load(value)
        except yaml.YAMLError as e:
            raise DisconError(f"--set {item!r}: the value is not valid YAML "
                              f"({one_line(e)})") from None
        node = raw
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DisconError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a mapping")
        node[parts[-1]] = parsed
    return raw


# -- typed values --------------------------------------------------------------------------------

def _type_name(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        plural = {float: "numbers", int: "integers", str: "strings", bool: "booleans"}
        return f"a list of {len(args)} {plural.get(args[0], 'values')}"
    if origin is dict or t is dict or dataclasses.is_dataclass(t):
        return "a mapping"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(
        t, getattr(t, "__name__", str(t)))


def coerce(value: Any, t, key: str, where: str = "config") -> Any:
    """``value`` as annotation ``t`` (float, int, bool, str, X | None, tuple[...], dict,
    a config dataclass, Any); a DisconError naming ``where``, ``key`` and the expected type."""
    if t is Any:
        return value
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            return coerce(value, a, key, where)  # one non-null member: all the configs need
    bad = DisconError(f"{where}: {key} must be {_type_name(t)}, got {value!r}")
    if dataclasses.is_dataclass(t):
        if not isinstance(value, Mapping):
            raise bad
        return from_mapping(t, value, where, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(coerce(v, a, f"{key}[{i}]", where)
                     for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or t is dict:
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    if t is bool or t is str:
        if not isinstance(value, t):
            raise bad
        return value
    if t in (int, float):
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)):
            raise bad
        if t is int:
            if isinstance(value, float) and not value.is_integer():
                raise bad
            return int(value)
        return float(value)
    return value


def from_mapping(cls, raw: Mapping[str, Any], where: str, prefix: str = ""):
    """Build the dataclass ``cls`` from ``raw``: strict keys, every field coerced."""
    if not isinstance(raw, Mapping):
        raise DisconError(f"{where}: {prefix or 'top level '}must be a mapping, got "
                          f"{type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(raw, fields, f"{where}: {prefix[:-1]}" if prefix else where)
    for name, f in fields.items():
        if name not in raw and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            raise DisconError(f"{where}: missing key {prefix}{name}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(v, hints[k], prefix + k, where) for k, v in raw.items()})


# -- the training config -------------------------------------------------------------------------

@dataclass
class OptimConfig:
    """AdamW + schedule. ``lr`` wins over ``blr`` (then ``lr = blr * batch_size / 256``, MAR)."""

    blr: float = 1e-4
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.02
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    schedule: str = "constant"          # constant | cosine
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    """A training run; loaded from plain YAML (see configs/). Unknown keys are an error."""

    recipe: str                                   # discon | prior | tokenizer | pkg.module:function
    components: dict[str, Any]  # kind -> preset name or {preset, checkpoint, overrides}
    data: dict[str, Any]                          # {cache: folder} or a data.build_dataset mapping
    out: str = "runs/train"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64                          # global, over all processes
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    grad_clip: float | None = 3.0
    ema_rate: float = 0.9999
    # min(ema_rate, (1+t)/(10+t)) at update t: the average forgets the random init within a
    # short schedule (0.999 keeps 0.999^1000 = 37% of it after 1,000 steps). Added after runs
    # were saved: as_dict() leaves it out at its default, so their configs still compare equal.
    ema_warmup: bool = field(default=False, metadata={"omit_default": True})
    precision: str = "auto"                       # auto | fp32 | bf16 (autocast); precision.py
    grad_checkpointing: bool = False
    compile: bool = False
    fsdp: bool = False
    seed: int = 1
    device: str | None = None                     # default: cuda if available, else cpu
    ckpt_every: int = 1000
    keep_every: int | None = None                 # also keep checkpoint-<step>.pth every N steps
    log_every: int = 10
    sample_every: int | None = None
    num_samples: int = 16
    num_workers: int = 0
    progress: bool = True
    recipe_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "config") -> "TrainConfig":
        cfg = from_mapping(cls, raw, where)
        cfg.validate(where)
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Iterable[str] = ()) -> "TrainConfig":
        return cls.from_dict(apply_overrides(load_yaml(path), overrides), str(path))

    def validate(self, where: str = "config") -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise DisconError(f"{where}: precision must be auto, fp32 or bf16, got "
                              f"{self.precision!r}")
        if self.optimizer.schedule not in ("constant", "cosine"):
            raise DisconError(f"{where}: optimizer.schedule must be constant or cosine, got "
                              f"{self.optimizer.schedule!r}")
        if (self.steps is None) == (self.epochs is None):
            raise DisconError(f"{where}: give exactly one of steps or epochs")
        for name in ("steps", "epochs", "batch_size", "ckpt_every", "log_every", "keep_every",
                     "sample_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise DisconError(f"{where}: {name} must be positive, got {value}")
        if not 0.0 <= self.ema_rate < 1.0:
            raise DisconError(f"{where}: ema_rate must lie in [0, 1), got {self.ema_rate}")
        for name in ("num_samples", "num_workers"):
            if getattr(self, name) < 0:
                raise DisconError(f"{where}: {name} must be >= 0, got {getattr(self, name)}")
        if not self.components:
            raise DisconError(f"{where}: components must map kinds to presets")
        check_seed(self.seed, f"{where}: seed")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optimizer"]["betas"] = list(d["optimizer"]["betas"])
        for f in dataclasses.fields(self):
            if f.metadata.get("omit_default") and d[f.name] == f.default:
                del d[f.name]
        return d
