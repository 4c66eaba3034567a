"""The plugin contract end to end: components that implement ONLY the Protocols of
discon_core/interfaces.py (and the example plugin's Gaussian head) go through `discon cache`,
`discon train`, a reload from the written checkpoint, guided `sample_tokens` and
`Pipeline.generate`; plugins contribute presets and sub-commands through the hooks."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from discon_core import Pipeline, build, hooks, sample_tokens
from discon_core.cli import main
from discon_core.hooks import hookimpl
from discon_core.interfaces import (ConditionalBackbone, ContinuousHead,
                                     ContinuousTokenizer, DiscreteTokenizer)
from tests.conftest import REPO
from tests.plugins.test_datasets import fake_fashion_mnist

EXAMPLE = REPO / "examples" / "discon-example-plugin"


class MiniBackbone(nn.Module):
    """Only what ConditionalBackbone states: patch size 1 over 8x8x8 latents, 10 classes."""

    def __init__(self, channels: int = 8, grid: int = 8, width: int = 32, classes: int = 10,
                 vocab: int = 128):
        super().__init__()
        self.token_dim, self.z_dim, self.seq_len = channels, width, grid * grid
        self.class_num, self.label_drop_prob, self.grid = classes, 0.1, grid
        self.inp = nn.Linear(channels, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.pos = nn.Parameter(torch.zeros(grid * grid, width))
        self.label = nn.Embedding(classes + 1, width)      # last row: the null class
        self.cond = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)

    def forward(self, x, mask, labels, cond=None, *, label_drop=None, cond_drop=None):
        h = torch.where(mask[..., None], self.mask_token, self.inp(x)) + self.pos
        if label_drop is not None:
            labels = torch.where(label_drop, torch.full_like(labels, self.class_num), labels)
        h = h + self.label(labels)[:, None]
        if cond is not None:
            c = self.cond(cond)
            if cond_drop is not None:
                c = c * (~cond_drop)[:, None, None]
            h = h + c
        return self.mix(torch.tanh(h + h.mean(1, keepdim=True)))

    def patchify(self, latents):
        return latents.flatten(2).transpose(1, 2)

    def unpatchify(self, x):
        return x.transpose(1, 2).reshape(x.shape[0], self.token_dim, self.grid, self.grid)


class MiniHead(nn.Module):
    """Only what ContinuousHead states: a linear mean, unit-variance noise, guidance on the mean."""

    def __init__(self, token_dim: int = 8, z_dim: int = 32):
        super().__init__()
        self.token_dim, self.z_dim = token_dim, z_dim
        self.proj = nn.Linear(z_dim, token_dim)

    def loss(self, target, z, *, generator=None):
        return ((self.proj(z) - target) ** 2).mean(-1)

    def sample(self, z, *, temperature=1.0, cfg_scale=1.0, steps=None, generator=None):
        mean = self.proj(z)
        if cfg_scale != 1.0:
            cond, uncond = mean.chunk(2)
            mean = torch.cat([uncond + cfg_scale * (cond - uncond)] * 2)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + temperature * 0.1 * noise


class MiniDtok(nn.Module):
    """Only what DiscreteTokenizer states: 4x4 mean grey levels as 128 codes."""
    codebook_size, downsample = 128, 4

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))  # a parameter, so the core can find its device

    def encode(self, images):
        grey = nn.functional.avg_pool2d(images.mean(1, keepdim=True), self.downsample)
        return (grey[:, 0] * (self.codebook_size - 1)).round().long()

    def decode(self, tokens):
        grey = (self.gain * tokens.float() / (self.codebook_size - 1))[:, None]
        return nn.functional.interpolate(grey.repeat(1, 3, 1, 1), scale_factor=self.downsample)


class MiniCtok(nn.Module):
    """Only what ContinuousTokenizer states: a strided conv posterior (mean, logvar)."""
    latent_channels, downsample = 8, 4

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 2 * self.latent_channels, self.downsample, self.downsample)
        self.dec = nn.ConvTranspose2d(self.latent_channels, 3, self.downsample, self.downsample)

    def encode_moments(self, images):
        return self.enc(images)

    def latents_from_moments(self, moments, *, sample=False, generator=None):
        mean, logvar = moments.chunk(2, dim=1)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + (0.5 * logvar.clamp(-30, 20)).exp() * noise

    def encode(self, images, *, sample=False, generator=None):
        return self.latents_from_moments(self.encode_moments(images), sample=sample,
                                         generator=generator)

    def decode(self, latents):
        return torch.sigmoid(self.dec(latents))


class ContractPlugin:
    """A user plugin: two components and their presets, through the hooks only."""

    @hookimpl
    def discon_register_components(self, register):
        register("backbone", "mini", MiniBackbone)
        register("head", "mini", MiniHead)
        register("dtok", "mini", MiniDtok)
        register("ctok", "mini", MiniCtok)

    @hookimpl
    def discon_register_presets(self, register):
        register({"backbone": {"mini": {"factory": "mini", "params": {"width": 32},
                                        "sampling": {"ar_steps": 4, "cfg_scale": 1.5}}},
                  "head": {"mini": {"factory": "mini", "params": {"z_dim": 32}}},
                  "dtok": {"mini": {"factory": "mini"}}, "ctok": {"mini": {"factory": "mini"}}})


@pytest.fixture
def plugins():
    hooks.reset()
    hooks.register_plugin(ContractPlugin(), name="contract-test")
    sys.path.insert(0, str(EXAMPLE))
    import discon_example_plugin
    hooks.register_plugin(discon_example_plugin, name="discon-example-plugin")
    yield
    sys.path.remove(str(EXAMPLE))
    hooks.reset()


@pytest.fixture
def cache(tmp_path, plugins):
    root = fake_fashion_mnist(tmp_path / "fm", n=16)
    out = tmp_path / "cache"
    assert main(["cache", "--data", "fashion-mnist", "--data-root", str(root),
                 "--dtok", "mini", "--dtok-checkpoint", "none",
                 "--ctok", "mini", "--ctok-checkpoint", "none", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    return out


def _train(tmp_path: Path, cache: Path, backbone: str, head: str) -> Path:
    out = tmp_path / f"run-{head}"
    cfg = {"recipe": "discon", "out": str(out), "data": {"cache": str(cache)},
           "components": {"backbone": backbone, "head": head, "dtok": "mini",
                          "ctok": "mini"},
           "steps": 3, "batch_size": 4, "optimizer": {"lr": 1e-3, "warmup_steps": 1},
           "ckpt_every": 3, "log_every": 1, "progress": False,
           "recipe_options": {"sampling": {"ar_steps": 2}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--overwrite"]) == 0
    return out / "checkpoint-last.pth"


@pytest.mark.slow
@pytest.mark.parametrize("backbone,head", [("mini", "mini"), ("discon-tiny", "gaussian-tiny")])
def test_protocol_only_components_train_reload_and_sample(tmp_path, cache, backbone, head,
                                                          one_thread):
    ckpt = _train(tmp_path, cache, backbone, head)
    bb = build("backbone", backbone, checkpoint=ckpt, dtype="fp32")   # head keys are read under diffloss.
    hd = build("head", head, checkpoint=ckpt, dtype="fp32")
    assert isinstance(bb, ConditionalBackbone) and isinstance(hd, ContinuousHead)
    trained = torch.load(ckpt, weights_only=True)["model_ema"]   # what build() loads
    first = next(k for k in trained if k.startswith("diffloss."))
    assert torch.equal(hd.state_dict()[first[len("diffloss."):]], trained[first])
    labels = torch.tensor([0, 3])
    cond = torch.randint(0, 128, (2, bb.seq_len)) if backbone == "discon-tiny" else None
    x1 = sample_tokens(bb, hd, labels, cond=cond, ar_steps=2, cfg_scale=1.0,
                       generator=torch.Generator().manual_seed(0))
    x3 = sample_tokens(bb, hd, labels, cond=cond, ar_steps=2, cfg_scale=3.0,
                       generator=torch.Generator().manual_seed(0))
    assert x1.shape == x3.shape == (2, bb.seq_len, bb.token_dim)
    assert torch.isfinite(x3).all() and not torch.allclose(x1, x3)   # guidance did something
    ctok = build("ctok", "mini")
    assert isinstance(ctok, ContinuousTokenizer) and isinstance(build("dtok", "mini"),
                                                                 DiscreteTokenizer)
    if backbone == "mini":
        images = Pipeline(backbone=bb, head=hd, ctok=ctok).generate(labels, progress=False)
        assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_plugin_presets_and_commands(plugins, capsys):
    assert build("head", "gaussian-tiny").token_dim == 8
    assert main(["gaussian-info"]) == 0
    assert "gaussian head: 2064 parameters" in capsys.readouterr().out
