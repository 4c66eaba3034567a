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

from .config import SEED_RANGE, check_seed
from .errors import DisconError
from .hooks import hookimpl
from .interfaces import KINDS
from .runtime import DEVICES, resolve_device


def add_device_option(p, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, metavar="DEVICE",
                   help=f"{DEVICES} (auto: cuda if available, else cpu)")


def add_dtype_option(p) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and compute dtype (default auto: bf16 where this device runs "
                        "it natively, else fp32; docs/speed.md)")


def _logging_flags(p, default) -> None:
    for flags, text in ((["--debug"], "show tracebacks on errors"), (["-v", "--verbose"], "log "
                        "INFO messages"), (["-q", "--quiet"], "errors only, no progress bars")):
        p.add_argument(*flags, action="store_true", default=default, help=text)


def add_common_options(p) -> None:
    """The flags of every sub-command (docs/cli.md). A command re-declares one to give it its
    own default or help (sub-command parsers resolve the conflict to the later definition)."""
    _logging_flags(p, argparse.SUPPRESS)  # unset here: the value before the command stands
    add_device_option(p, default=None)
    add_dtype_option(p)
    p.add_argument("--seed", type=int, help=f"random seed [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of torch (default: torch's, one per core)")
    p.add_argument("--out", metavar="PATH", help="where the command writes")


class CommandParser(argparse.ArgumentParser):
    """The parser of every sub-command, plugins' included: the common flags come with it."""

    def __init__(self, **kwargs):
        super().__init__(**{"conflict_handler": "resolve", **kwargs})
        add_common_options(self)


def check_common(args) -> None:
    """Apply the common flags the core owns (logging, threads) and range-check the seed."""
    check_seed(getattr(args, "seed", None), "--seed")
    if args.verbose and args.quiet:
        raise DisconError("-v/--verbose and -q/--quiet exclude each other")
    for flag in getattr(args, "unused_flags", ()):  # accepted everywhere, meaningless here
        if getattr(args, flag, None) not in (None, "auto"):
            raise DisconError(f"discon {args.command}: --{flag} has no effect on this command")
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise DisconError(f"--threads must be >= 1, got {args.threads}")
        __import__("torch").set_num_threads(args.threads)
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True


def checkpoint_arg(value: str | None) -> str | None:
    """A ``--*-checkpoint`` value: a path, ``pretrained``, or ``none`` (any case) for random
    init (None); not given stays None."""
    return None if value is not None and value.lower() == "none" else value


def _add_plugins(sub) -> None:
    p = sub.add_parser("plugins", help="list component kinds, names and the plugin providing each")
    p.add_argument("--kind", choices=list(KINDS), help="only this kind")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=_cmd_plugins, unused_flags=("device", "dtype", "seed", "out"))


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
    p.set_defaults(func=_cmd_show, unused_flags=("device", "dtype", "seed", "out"))


def _cmd_show(args) -> int:
    from .registry import resolve

    print(yaml.safe_dump(resolve(args.kind, args.name).as_dict(), sort_keys=False), end="")
    return 0


def add_config_options(p, example: str) -> None:
    """Options shared by the config-driven sub-commands (train; plugins' e.g. study)."""
    p.epilog = "--device, --dtype (precision), --seed and --out not given: the config's values"
    p.add_argument("--out", help="output folder (overrides the config's out)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key (dotted, YAML value), e.g. --set {example}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(dtype=None)  # not given: the config's precision


def config_overrides(args, precision_keys=("precision",)) -> list[str]:
    """--set edits from the common flags; a given --dtype sets each of ``precision_keys``."""
    if args.device is not None:
        resolve_device(args.device)  # fail before the config loads anything
    if args.dtype == "fp16":
        raise DisconError("--dtype fp16: training runs in auto, fp32 or bf16 (autocast)")
    named = [("out", args.out), ("device", args.device), ("seed", args.seed)]
    named += [(key, args.dtype) for key in precision_keys]
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
    _logging_flags(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    from . import hooks
    hooks.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        parser = build_parser()  # a plugin with a misspelled hook stops here
        args = parser.parse_args(argv)
        level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        if args.command is None:
            parser.print_help()
            return 2
        check_common(args)
        if args.registry:
            from .registry import set_user_registry
            set_user_registry(args.registry)
        return int(args.func(args) or 0)
    except DisconError as e:
        if args is not None and args.debug:
            raise
        print(f"discon: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("discon: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
