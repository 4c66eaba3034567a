"""Plugin discovery: built-ins, the entry-point group, explicit overrides, isolation."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import discon_core
from discon_core import hooks
from discon_core.errors import DisconError
from discon_core.hooks import hookimpl

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "discon-example-plugin"


def make_discoverable(site: Path) -> Path:
    """A hand-made .dist-info on ``site`` that declares the example plugin's entry point."""
    info = site / "discon_example_plugin-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: discon-example-plugin\n"
                                   "Version: 0.1.0\n")
    (info / "entry_points.txt").write_text("[discon]\nexample = discon_example_plugin\n")
    return site


@pytest.fixture
def example_plugin(tmp_path, monkeypatch):
    site = make_discoverable(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delenv("DISCON_DISABLE_PLUGINS")
    hooks.reset()
    yield site
    hooks.reset()


def test_builtins_register_through_the_hook():
    facs = hooks.factories()
    assert all(f.plugin.startswith("discon_plugins.") for f in facs.values())


def test_entry_point_plugin_is_listed_and_builds(example_plugin):
    rows = {r["name"]: r for r in discon_core.list_components("head")["head"]}
    assert rows["gaussian"]["plugin"] == "example"
    head = discon_core.build("head", "gaussian", token_dim=4, z_dim=6)
    assert isinstance(head, discon_core.ContinuousHead)
    z, target = torch.randn(5, 6), torch.randn(5, 4)
    assert head.loss(target, z).shape == (5,)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(head.sample(z, generator=g), head.sample(z, generator=g.manual_seed(0)))


def test_disable_env_keeps_third_party_out(example_plugin, monkeypatch):
    monkeypatch.setenv("DISCON_DISABLE_PLUGINS", "1")
    hooks.reset()
    assert "gaussian" not in [r["name"] for r in discon_core.list_components("head")["head"]]


def _plugin(register_calls):
    plugin = types.SimpleNamespace()

    @hookimpl
    def discon_register_components(register):
        for args, kwargs in register_calls:
            register(*args, **kwargs)

    plugin.discon_register_components = discon_register_components
    return plugin


def test_overriding_a_builtin_must_be_explicit():
    name = next(n for (k, n) in hooks.factories() if k == "head")
    hooks.reset()
    try:
        hooks.register_plugin(_plugin([(("head", name, lambda: None), {})]), name="sneaky")
        with pytest.raises(DisconError, match=rf"'sneaky' registers head '{name}'.*override=True"):
            hooks.factories()
        hooks.reset()
        marker = lambda: None  # noqa: E731
        hooks.register_plugin(_plugin([(("head", name, marker), {"override": True})]), name="ok")
        assert hooks.factories()[("head", name)].fn is marker
    finally:
        hooks.reset()


def test_unknown_kind_from_plugin():
    hooks.reset()
    try:
        hooks.register_plugin(_plugin([(("decoder", "x", lambda: None), {})]), name="odd")
        with pytest.raises(DisconError, match=r"'odd' registers 'x' under unknown kind 'decoder'"):
            hooks.factories()
    finally:
        hooks.reset()


def test_cli_lists_discoverable_plugin(tmp_path):
    site = make_discoverable(tmp_path / "site")
    env = {"PYTHONPATH": f"{site}:{EXAMPLE}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "discon_core.cli", "plugins", "--kind", "head"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert any(line.split()[:2] == ["gaussian", "example"] for line in out.splitlines())
