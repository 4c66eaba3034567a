"""registry.yaml loading, validation, preset resolution and build()."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import discon_core
from discon_core import hooks, registry
from discon_core.errors import DisconError
from discon_core.hooks import hookimpl


class ToyHead(nn.Module):
    def __init__(self, token_dim: int = 4, z_dim: int = 8, width: int = 16):
        super().__init__()
        self.token_dim, self.z_dim = token_dim, z_dim
        self.net = nn.Sequential(nn.Linear(z_dim, width), nn.Linear(width, token_dim))

    def loss(self, target, z, *, generator=None):
        return ((self.net(z) - target) ** 2).mean(-1)

    def sample(self, z, *, temperature=1.0, steps=None, generator=None):
        return self.net(z)


class NotAHead(nn.Module):
    def __init__(self):
        super().__init__()


@pytest.fixture
def toy_plugin():
    plugin = types.SimpleNamespace()

    @hookimpl
    def discon_register_components(register):
        register("head", "toy", ToyHead)
        register("head", "not-a-head", NotAHead)

    plugin.discon_register_components = discon_register_components
    hooks.reset()
    hooks.register_plugin(plugin, name="toy-plugin")
    yield
    hooks.reset()
    registry.set_user_registry(None)


def write(tmp_path, text, name="user.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_builtin_presets_resolve_with_extends():
    xl = discon_core.resolve("prior", "rar-xl")
    assert xl.factory == "rar"
    assert xl.params["hidden_size"] == 1280 and xl.params["num_hidden_layers"] == 32
    assert xl.params["image_seq_len"] == 256  # inherited from rar-b
    assert xl.sampling == {"cfg_scale": 6.9, "guidance_scale_pow": 1.5, "temperature": 1.02}
    assert xl.checkpoint.file == "rar_xl.bin"


def test_unknown_kind_and_name_suggest_close_names():
    with pytest.raises(DisconError, match=r"unknown kind 'priors'.*did you mean: prior"):
        discon_core.resolve("priors", "rar-b")
    with pytest.raises(DisconError, match=r"unknown prior 'rar-bb'.*did you mean: rar-b"):
        discon_core.resolve("prior", "rar-bb")


def test_build_and_override(toy_plugin):
    head = discon_core.build("head", "toy", width=5)
    assert isinstance(head, discon_core.ContinuousHead)
    assert head.net[0].out_features == 5
    assert head.discon_preset.params == {"width": 5}
    meta = discon_core.build("head", "toy", device="meta")
    assert meta.net[0].weight.is_meta


def test_unknown_override_lists_accepted(toy_plugin):
    with pytest.raises(DisconError, match=r"unknown override 'widht'.*accepted: token_dim, z_dim, width"):
        discon_core.build("head", "toy", widht=3)


def test_factory_result_must_satisfy_protocol(toy_plugin):
    with pytest.raises(DisconError, match="does not satisfy ContinuousHead"):
        discon_core.build("head", "not-a-head")


def test_user_registry_adds_and_extends(toy_plugin, tmp_path):
    registry.set_user_registry(write(tmp_path, """
head:
  toy-wide:
    factory: toy
    params: {width: 32}
  toy-wider:
    extends: toy-wide
    params: {z_dim: 3}
"""))
    head = discon_core.build("head", "toy-wider")
    assert head.net[0].in_features == 3 and head.net[0].out_features == 32
    names = [r["name"] for r in discon_core.list_components("head")["head"]]
    assert {"toy", "toy-wide", "toy-wider"} <= set(names)


def test_user_registry_via_environment(toy_plugin, tmp_path, monkeypatch):
    monkeypatch.setenv("DISCON_REGISTRY", str(write(tmp_path, "head: {toy-env: {factory: toy}}")))
    registry.set_user_registry(None)
    assert discon_core.resolve("head", "toy-env").factory == "toy"


@pytest.mark.parametrize("text, match", [
    ("head: [unclosed", r"user.yaml is not valid YAML"),
    ("- just a list", r"top level must be a mapping"),
    ("heads: {}", r"unknown kind 'heads'.*did you mean: head"),
    ("head: {x: {params: {width: 3}}}", r"entry head/x: missing key 'factory'"),
    ("head: {x: {factory: toy, params: [1, 2]}}", r"entry head/x: params must be a mapping, got \[1, 2\]"),
    ("head: {x: {factory: toy, parms: {}}}", r"entry head/x: unknown key 'parms'.*did you mean: params"),
    ("head: {x: {factory: toy, checkpoint: {url: 'http://a'}}}", r"entry head/x: missing key checkpoint.file"),
    ("head: {x: {factory: toy, checkpoint: {file: a, urll: b}}}", r"checkpoint: unknown key 'urll'.*did you mean: url"),
    ("head: {x: {factory: toy, checkpoint: {file: a, sha256: xyz}}}", r"checkpoint.sha256 must be 64"),
    ("head: {x: {factory: toy, classes: 3}}", r"entry head/x: classes must be a list"),
    ("head: {x: {factory: toy, checkpoint: {file: ../../../../tmp/x.safetensors}}}",
     r"entry head/x: checkpoint.file must be a relative path inside \$DISCON_HOME"),
    ("head: {x: {factory: toy, checkpoint: {file: a, repo: org/r}}}",
     r"entry head/x: checkpoint: give url, or repo \+ filename"),
    ("head: {x: {factory: toy, checkpoint: {file: a, repo: org/r, filename: a, url: 'http://a'}}}",
     r"entry head/x: checkpoint: give url, or repo \+ filename"),
])
def test_malformed_registry_names_file_entry_field(toy_plugin, tmp_path, text, match):
    registry.set_user_registry(write(tmp_path, text))
    with pytest.raises(DisconError, match=match):
        discon_core.resolve("head", "toy")


def test_extends_cycle_and_unknown_parent(toy_plugin, tmp_path):
    registry.set_user_registry(write(tmp_path, "head: {a: {extends: b}, b: {extends: a}}"))
    with pytest.raises(DisconError, match=r"'extends' cycle a -> b -> a"):
        discon_core.resolve("head", "a")
    registry.set_user_registry(write(tmp_path, "head: {a: {extends: toyy}}", "u2.yaml"))
    with pytest.raises(DisconError, match=r"extends unknown head 'toyy'"):
        discon_core.resolve("head", "a")


def test_missing_user_registry_file(tmp_path):
    registry.set_user_registry(tmp_path / "nope.yaml")
    try:
        with pytest.raises(DisconError, match=r"nope.yaml does not exist"):
            discon_core.resolve("prior", "rar-b")
    finally:
        registry.set_user_registry(None)


def test_preset_param_not_accepted_by_factory(toy_plugin, tmp_path):
    registry.set_user_registry(write(tmp_path, "head: {bad: {factory: toy, params: {depth: 3}}}"))
    with pytest.raises(DisconError, match=r"unknown preset head/bad param 'depth'"):
        discon_core.build("head", "bad")


def test_every_registry_entry_resolves_to_a_registered_factory():
    facs = hooks.factories()
    for kind, rows in discon_core.list_components().items():
        for row in rows:
            assert (kind, row["factory"]) in facs, f"{kind}/{row['name']} -> {row['factory']}"


def test_every_registry_entry_builds_on_meta():
    """timm-style: every preset builds at full size, shapes only, and satisfies its Protocol."""
    for kind, rows in discon_core.list_components().items():
        for row in rows:
            module = discon_core.build(kind, row["name"], device="meta")
            assert isinstance(module, torch.nn.Module), f"{kind}/{row['name']}"


def test_duplicate_keys_refused_in_user_and_plugin_registries(toy_plugin, tmp_path):
    registry.set_user_registry(write(tmp_path, "head:\n  x: {factory: toy}\n  x: {factory: toy}\n"))
    with pytest.raises(DisconError, match=r"user.yaml is not valid YAML: duplicate key 'x' \(line 3"):
        discon_core.resolve("head", "toy")
    registry.set_user_registry(None)
    presets = write(tmp_path, "head:\n  y:\n    factory: toy\n    params: {width: 3, width: 4}\n",
                    "presets.yaml")
    plugin = types.SimpleNamespace(discon_register_presets=hookimpl(
        lambda register: register(str(presets))))
    hooks.register_plugin(plugin, name="dup-presets")
    with pytest.raises(DisconError, match=r"presets.yaml is not valid YAML: duplicate key 'width'"):
        discon_core.resolve("head", "y")


def test_sampling_block_is_typed_by_the_sampler_signature(tmp_path):
    from discon_core.pipeline import Pipeline, _sampling
    registry.set_user_registry(write(tmp_path, """
prior:
  spelled: {extends: rar-tiny, sampling: {cfg_scale: "2.5", guidance_scale_pow: 1}}
  typo: {extends: rar-tiny, sampling: {cfg_scael: 2.0}}
"""))
    try:
        prior = discon_core.build("prior", "spelled", device="meta")
        assert _sampling(prior) == {"cfg_scale": 2.5, "guidance_scale_pow": 1.0,
                                    "temperature": 1.0}  # YAML's string number as a float
        with pytest.raises(DisconError) as e:  # before any weights load (meta copies)
            Pipeline.from_names(prior="typo", dtok="maskgit-vq-tiny",
                                checkpoints={"prior": None, "dtok": None})
        assert str(e.value).startswith(f"registry {tmp_path / 'user.yaml'}, entry prior/typo: "
                                       "unknown sampling key 'cfg_scael' (did you mean: cfg_scale")
    finally:
        registry.set_user_registry(None)
