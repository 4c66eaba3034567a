"""The ``discon`` command line: thin sub-commands that parse, call the library, report.

Errors from bad input (DisconError) print one line and exit 1; ``--debug`` shows tracebacks.
Each sub-command is a pair: ``_add_<name>(subparsers)`` declares it, ``_cmd_<name>(args)`` runs it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import yaml

from .errors import DisconError
from .interfaces import KINDS


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


# Sub-commands, in --help order. Later modules add theirs here.
SUBCOMMANDS = [_add_plugins, _add_show]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="discon",
        description="DisCon: discrete-conditioned continuous autoregressive image generation.")
    parser.add_argument("--registry", metavar="PATH",
                        help="user registry.yaml overlaid on the built-in one "
                             "(default: $DISCON_REGISTRY)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
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
