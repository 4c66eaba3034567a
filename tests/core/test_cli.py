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
