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


def test_plugins_extend_recipes_datasets_presets_and_commands(tmp_path, capsys):
    """One plugin object contributes a recipe, a dataset, a preset and a sub-command; the
    core finds each through its hook, and they are gone again after reset()."""
    from discon_core import cli, registry
    from discon_core.data import build_dataset

    class TinySet:
        def __init__(self, n: int = 3):
            self.n = n

        def __len__(self):
            return self.n

        def get(self, index, flip=False):
            return torch.zeros(3, 8, 8), index

    def handler(args):
        print(f"hello {args.who}")
        return 0

    def recipe(cfg, device):
        raise NotImplementedError

    plugin = types.SimpleNamespace()
    plugin.discon_register_recipes = hookimpl(lambda register: register("toy", recipe))
    plugin.discon_register_datasets = hookimpl(lambda register: register("tiny-set", TinySet))
    plugin.discon_register_presets = hookimpl(lambda register: register(
        {"head": {"flow-wide": {"extends": "flow", "params": {"diffloss_w": 2048}}}}))

    def commands(subparsers):
        p = subparsers.add_parser("hello", help="say hello")
        p.add_argument("who")
        p.set_defaults(func=handler)

    plugin.discon_register_commands = hookimpl(commands)
    hooks.reset()
    registry.set_user_registry(None)
    try:
        hooks.register_plugin(plugin, name="toy-plugin")
        assert hooks.recipes()["toy"].plugin == "toy-plugin"
        assert set(hooks.recipes()) >= {"discon", "prior", "tokenizer", "toy"}
        assert len(build_dataset({"type": "tiny-set", "n": 5})) == 5
        preset = registry.resolve("head", "flow-wide")
        assert preset.params["diffloss_w"] == 2048 and preset.source == "toy-plugin"
        assert cli.main(["hello", "world"]) == 0
        assert capsys.readouterr().out.strip() == "hello world"
        with pytest.raises(DisconError, match="already provides"):
            hooks.register_plugin(types.SimpleNamespace(discon_register_recipes=hookimpl(
                lambda register: register("discon", recipe))), name="clash")
            hooks.recipes()
    finally:
        hooks.reset()
        registry.set_user_registry(None)
    with pytest.raises(DisconError, match="unknown data.type"):
        build_dataset({"type": "tiny-set"})


def _misspelled_plugin():
    plugin = types.ModuleType("typo_plugin")

    @hookimpl
    def discon_register_component(register):  # 'components' misspelled: pluggy never calls it
        register("head", "never", object)

    plugin.discon_register_component = discon_register_component
    return plugin


def test_misspelled_hook_is_one_line_naming_plugin_and_hook():
    hooks.reset()
    try:
        with pytest.raises(DisconError) as e:
            hooks.register_plugin(_misspelled_plugin(), name="typo-plugin")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("plugin 'typo-plugin' implements unknown hook "
                                                  "'discon_register_component'")
        assert "did you mean: discon_register_components" in msg
        assert hooks.plugin_manager().get_plugin("typo-plugin") is None  # nothing changed
        assert ("head", "never") not in hooks.factories()
    finally:
        hooks.reset()


def test_misspelled_hook_in_an_entry_point_plugin_stops_the_cli(tmp_path, monkeypatch, capsys):
    from discon_core.cli import main
    site = tmp_path / "site"
    info = site / "typo_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: typo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[discon]\ntypo = typo_plugin\n")
    (site / "typo_plugin.py").write_text(
        "from discon_core.hooks import hookimpl\n\n\n@hookimpl\n"
        "def discon_register_command(subparsers):\n    pass\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("DISCON_DISABLE_PLUGINS")
    hooks.reset()
    try:
        assert main(["plugins"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            "discon: error: plugin 'typo' implements unknown hook 'discon_register_command' "
            "(did you mean: discon_register_commands"), err
        assert err[0].endswith("hooks are: " + ", ".join(sorted(
            n for n in vars(hooks._Specs) if n.startswith("discon_"))))
    finally:
        hooks.reset()
