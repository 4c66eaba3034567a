"""The ``discon`` command line: thin sub-commands that parse, call the library, report.

Errors from bad input (DisconError) print one line and exit 1; ``--debug`` shows tracebacks.
Each sub-command is a pair: ``_add_<name>(subparsers)`` declares it, ``_cmd_<name>(args)`` runs it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import yaml

from .errors import DisconError
from .hooks import hookimpl
from .interfaces import KINDS
from .runtime import DEVICES, resolve_device


def add_device_option(p, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, metavar="DEVICE",
                   help=f"{DEVICES} (auto: cuda if available, else cpu)")


def add_dtype_option(p) -> None:
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights and compute dtype (default fp32; bf16 is ~4x faster on CPUs "
                        "with AVX-512 BF16 and on GPUs)")


def checkpoint_arg(value: str | None) -> str | None:
    """A ``--*-checkpoint`` value: a path, ``pretrained``, or ``none`` (any case) for random
    init (None); not given stays None."""
    return None if value is not None and value.lower() == "none" else value


def _add_plugins(sub) -> None:
    p = sub.add_parser("plugins", help="list component kinds, names and the plugin providing each")
    p.add_argument("--kind", choices=list(KINDS), help="only this kind")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)


def _cmd_plugins(args) -> int:
    from .registry import list_components

    table = list_components(args.kind)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    for kind, rows in table.items():
        print(f"{kind}  ({KINDS[kind]})")
        for row in rows:
            print(f"  {row['name']:<20} {row['plugin']:<28} {row['description']}")
    return 0


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="print the resolved preset of KIND NAME as YAML")
    p.add_argument("kind", choices=list(KINDS))
    p.add_argument("name")
    p.set_defaults(func=_cmd_show)


def _cmd_show(args) -> int:
    from .registry import resolve

    print(yaml.safe_dump(resolve(args.kind, args.name).as_dict(), sort_keys=False), end="")
    return 0


def add_config_options(p, example: str) -> None:
    """Options shared by the config-driven sub-commands (train; plugins' e.g. study)."""
    p.add_argument("--out", help="output folder (overrides the config's out)")
    add_device_option(p, default=None)  # None: the config's device
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key (dotted, YAML value), e.g. --set {example}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_overrides(args) -> list[str]:
    if args.device is not None:
        resolve_device(args.device)  # fail before the config loads anything
    named = (("out", args.out), ("device", args.device), ("seed", args.seed))
    # JSON-quoted: YAML reads it back as the same string (an --out named 123 stays a string)
    return list(args.set) + [f"{key}={json.dumps(value)}" for key, value in named
                             if value is not None]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train backbone+head, a prior or a tokenizer from a YAML "
                                     "config (single process or under torchrun)")
    p.add_argument("config", help="training config (YAML, see configs/)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue exactly from CHECKPOINT (default: OUT/checkpoint-last.pth)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUT that holds a run (replaces its checkpoint and log)")
    add_config_options(p, "steps=200")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .train import TrainConfig, train

    if args.resume and args.overwrite:
        raise DisconError("--resume and --overwrite exclude each other")
    extra = ["progress=false"] if args.no_progress else []
    path = train(TrainConfig.load(args.config, config_overrides(args) + extra), resume=args.resume,
                 overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {path}")
    return 0


@hookimpl
def discon_register_commands(subparsers) -> None:
    """The built-in sub-commands, in --help order (plugins add theirs through the same hook)."""
    for add in (_add_plugins, _add_show, _add_train):
        add(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="discon",
        description="DisCon: discrete-conditioned continuous autoregressive image generation.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"discon {__version__}")
    parser.add_argument("--registry", metavar="PATH",
                        help="user registry.yaml overlaid on the built-in one "
                             "(default: $DISCON_REGISTRY)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import hooks
    hooks.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.registry:
            from .registry import set_user_registry
            set_user_registry(args.registry)
        return int(args.func(args) or 0)
    except DisconError as e:
        if args.debug:
            raise
        print(f"discon: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("discon: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
