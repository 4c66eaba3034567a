"""The discon CLI: listing, showing presets, error conventions."""
from __future__ import annotations

import subprocess
import sys

import yaml

from discon_core.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "discon_core.cli", *args],
                          capture_output=True, text=True)


def test_plugins_lists_every_kind(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for kind in ("dtok", "ctok", "prior", "backbone", "head"):
        assert f"{kind}  (" in out
    assert "rar-xxl" in out and "maskgit-vq" in out


def test_show_prints_resolved_yaml(capsys):
    assert main(["show", "prior", "rar-xxl"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["params"]["hidden_size"] == 1408
    assert shown["params"]["image_seq_len"] == 256
    assert shown["sampling"]["cfg_scale"] == 8.0
    assert shown["checkpoint"]["file"] == "rar_xxl.bin"


def test_error_is_one_line_exit_1_without_traceback():
    r = run("show", "prior", "rar-bb")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        r.stderr.strip()] and r.stderr.startswith("discon: error: unknown prior 'rar-bb'")
    assert "Traceback" not in r.stderr


def test_debug_shows_traceback():
    r = run("--debug", "show", "prior", "rar-bb")
    assert r.returncode == 1 and "Traceback" in r.stderr and "DisconError" in r.stderr


def test_help_and_usage_errors():
    r = run("--help")
    assert r.returncode == 0 and "plugins" in r.stdout and "show" in r.stdout
    assert run().returncode == 2
    assert run("show", "priorz", "x").returncode == 2  # argparse: invalid choice


def test_user_registry_option(tmp_path, capsys):
    p = tmp_path / "mine.yaml"
    p.write_text("prior: {rar-mini: {extends: rar-b, params: {num_hidden_layers: 2}}}\n")
    assert main(["--registry", str(p), "show", "prior", "rar-mini"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["params"]["num_hidden_layers"] == 2
    from discon_core import registry
    registry.set_user_registry(None)


# -- one CLI: the common flags (docs/cli.md) -----------------------------------------------------

COMMON = ("--debug", "-v", "-q", "--device", "--dtype", "--seed", "--threads", "--out")


def _commands(parser=None) -> dict:
    import argparse

    from discon_core.cli import build_parser
    parser = parser or build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_subcommand_has_the_common_flags_plugins_included():
    import types

    from discon_core import hooks
    from discon_core.hooks import hookimpl

    plugin = types.SimpleNamespace(discon_register_commands=hookimpl(
        lambda subparsers: subparsers.add_parser("third-party").set_defaults(func=print)))
    hooks.register_plugin(plugin, name="third-party-plugin")
    try:
        commands = _commands()
    finally:
        hooks.reset()
    assert {"plugins", "show", "train", "run", "sample", "eval", "cache", "study",
            "third-party"} <= set(commands)
    for name, p in commands.items():
        flags = {s for a in p._actions for s in a.option_strings}
        assert set(COMMON) <= flags, (name, set(COMMON) - flags)


def test_logging_flags_before_and_after_the_subcommand():
    from discon_core.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["-v", "plugins"]).verbose and parse(["plugins", "-v"]).verbose
    assert parse(["--debug", "show", "prior", "x"]).debug
    assert parse(["show", "prior", "x", "--debug"]).debug
    assert parse(["-q", "plugins"]).quiet and parse(["plugins", "--quiet"]).quiet
    none = parse(["plugins"])
    assert not (none.verbose or none.quiet or none.debug)
    r = run("show", "prior", "rar-bb", "--debug")  # after the command: tracebacks too
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_common_flag_defaults_per_command():
    from discon_core.cli import build_parser
    parse = build_parser().parse_args
    run_args = parse(["run"])
    assert (run_args.dtype, run_args.seed, run_args.out, run_args.device) == (
        "auto", 0, "samples", None)
    train = parse(["train", "c.yaml"])
    assert (train.dtype, train.seed, train.out, train.device, train.threads) == (
        None, None, None, None, None)  # not given: the config's values
    ev = parse(["eval", "g", "--ref", "r"])
    assert (ev.seed, ev.out, ev.json, ev.extractor) == (2020, None, False, None)
    cache = parse(["cache", "--data", "d", "--dtok", "a", "--ctok", "b", "--out", "o"])
    assert (cache.dtok_checkpoint, cache.ctok_checkpoint, cache.dtype) == (
        "pretrained", "pretrained", "auto")
    assert parse(["plugins", "--json"]).json is True
    assert run("run", "--dtype", "int8").returncode == 2  # argparse: invalid choice
    assert run("sample", "--num", "4").returncode == 2  # sample: --out required


def test_dtype_and_threads_reach_the_config_of_train_and_study():
    from discon_core.cli import build_parser, config_overrides
    parse = build_parser().parse_args
    assert config_overrides(parse(["train", "c.yaml", "--dtype", "bf16", "--seed", "5"])) == [
        'seed=5', 'precision="bf16"']
    assert config_overrides(parse(["train", "c.yaml"])) == []
    assert config_overrides(parse(["study", "c.yaml", "--dtype", "fp32"]),
                            ["discon.train.precision"]) == ['discon.train.precision="fp32"']


def test_threads_sets_torch_threads(capsys):
    import torch
    before = torch.get_num_threads()
    try:
        assert main(["plugins", "--kind", "head", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_flags_a_command_ignores_are_refused(capsys):
    assert main(["plugins", "--seed", "3"]) == 1
    assert capsys.readouterr().err.strip() == (
        "discon: error: discon plugins: --seed has no effect on this command")
    assert main(["show", "prior", "rar-b", "--device", "cpu"]) == 1
    assert "--device has no effect" in capsys.readouterr().err
    assert main(["plugins", "-v", "-q"]) == 1
    assert "exclude each other" in capsys.readouterr().err


def test_docs_flag_table_lists_every_command_and_common_flag():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| command"))
    for flag in COMMON:
        assert f"`{flag}" in header, flag
    rows = {line.split("|")[1].strip(" `") for line in text.splitlines()
            if line.startswith("| `")}
    assert set(_commands()) <= rows, set(_commands()) - rows
