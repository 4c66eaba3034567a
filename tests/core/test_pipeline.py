"""The continuous-stage sampler, the Pipeline and `discon run` (tiny random-weight components)."""
from __future__ import annotations

import pytest
import torch

from discon_core import DisconError, Pipeline, build, sample_tokens
from discon_core.cli import main
from discon_core.pipeline import cfg_at, mask_schedule
from tests.conftest import assert_chain_close, load_fixture

RANDOM = dict(prior=None, dtok=None, backbone=None, ctok=None)  # random init everywhere


@pytest.fixture(scope="module")
def fx(shared):
    config, io, folder = load_fixture(shared, "mar_tiny")
    kw = config["kwargs"]
    bb = build("backbone", "mar", checkpoint=folder / "ckpt.pth", dtype="fp32", **kw)
    head = build("head", "diffusion", checkpoint=folder / "ckpt.pth", dtype="fp32", **kw)
    return bb, head, io["inputs"], io["outputs"]


@pytest.mark.parametrize("steps", [64, 256])
def test_cosine_schedule_matches_reference(fx, steps):
    *_, o = fx
    after = mask_schedule(256, steps)
    assert after == o[f"marsched_L256_it{steps}_mask_len_next"].tolist()
    before = [256] + after[:-1]
    n_pred = [b - a for b, a in zip(before, after)]
    n_pred[-1] = before[-1]  # the last step predicts everything still masked
    assert n_pred == o[f"marsched_L256_it{steps}_n_pred"].tolist()
    cfg = torch.tensor([cfg_at(3.0, "linear", 256, m) for m in after], dtype=torch.float64)
    torch.testing.assert_close(cfg, o[f"marsched_L256_it{steps}_cfg_iter_cfg3"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg,seed,key", [(1.0, 13, "sample_tokens_it4_cfg1_T1"),
                                          (3.0, 14, "sample_tokens_it4_cfg3lin_T1")])
def test_sample_tokens_parity(fx, cfg, seed, key):
    bb, head, i, o = fx
    x = sample_tokens(bb, head, i["labels"], ar_steps=4, cfg_scale=cfg, orders=i["orders"],
                      generator=torch.Generator().manual_seed(seed))
    # Chains amplify fp32 rounding (x316 in the first diffusion step); the head's batched adaLN
    # products also round differently from per-step ones.
    assert_chain_close(bb.unpatchify(x), o[key])


def test_sample_tokens_is_seeded_and_validates(fx):
    bb, head, i, _ = fx
    a = sample_tokens(bb, head, i["labels"], ar_steps=3, head_steps=10, generator=torch.Generator().manual_seed(0))
    b = sample_tokens(bb, head, i["labels"], ar_steps=3, head_steps=10, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 16, 8) and torch.equal(a, b)
    for bad in (0, 17):
        with pytest.raises(DisconError, match=r"ar_steps must be an integer in \[1, 16\]"):
            sample_tokens(bb, head, i["labels"], ar_steps=bad)
    with pytest.raises(DisconError, match="cfg_schedule"):
        sample_tokens(bb, head, i["labels"], cfg_schedule="cosine")
    with pytest.raises(DisconError, match="cond must be int64"):
        sample_tokens(bb, head, i["labels"], cond=torch.zeros(2, 15, dtype=torch.long))


def tiny_pipeline():
    torch.manual_seed(0)
    return Pipeline.from_names(prior="rar-tiny", dtok="maskgit-vq-tiny", backbone="discon-tiny",
                               ctok="va-vae-tiny", checkpoints=RANDOM)


def test_discon_pipeline_end_to_end():
    pipe = tiny_pipeline()
    assert pipe.mode == "discon" and not pipe.backbone.training
    labels = torch.tensor([1, 7])
    images, discrete, latents = pipe.generate(labels, ar_steps=4, progress=False, return_tokens=True,
                                              head_steps=10, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert discrete.shape == (2, 8, 8) and latents.shape == (2, 8, 8, 8)
    again = pipe.generate(labels, ar_steps=4, progress=False, head_steps=10,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again)
    with pytest.raises(DisconError, match="ar_steps must be in"):
        pipe.generate(labels, ar_steps=65, progress=False)
    with pytest.raises(DisconError, match=r"labels must lie in \[0, 10\)"):
        pipe.generate(torch.tensor([10]), progress=False)


def test_discrete_and_continuous_pipelines():
    pipe = Pipeline.from_names(prior="rar-tiny", dtok="maskgit-vq-tiny", checkpoints=RANDOM)
    assert pipe.mode == "discrete"
    assert pipe.generate(torch.tensor([3]), progress=False).shape == (1, 3, 32, 32)
    pipe = Pipeline.from_names(backbone="discon-tiny", ctok="va-vae-tiny", checkpoints=RANDOM)
    assert pipe.mode == "continuous"
    out = pipe.generate(torch.tensor([3]), ar_steps=2, head_steps=5, progress=False)
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("names,message", [
    (dict(prior="rar-tiny", backbone="discon-tiny", ctok="ldm-kl-tiny"), "4 latent channels"),
    (dict(prior="rar-tiny", dtok="maskgit-vq", backbone="discon-tiny", ctok="va-vae-tiny"),
     "codebook_size 1024"),
    (dict(prior="rar-b", backbone="discon-tiny", ctok="va-vae-tiny"), "cond_vocab_size 128"),
    (dict(prior="rar-tiny", backbone="mar-b", ctok="ldm-kl"), "no discrete conditioning"),
    (dict(backbone="discon-tiny", head="discon-b", ctok="va-vae-tiny"), "does not fit"),
    (dict(backbone="discon-tiny", ctok="va-vae"), "latent channels"),
])
def test_incompatible_presets_fail_before_loading(names, message):
    with pytest.raises(DisconError, match=message):
        Pipeline.from_names(**names)  # "pretrained" everywhere: would download if checks came late


def test_cli_run_writes_pngs(tmp_path, capsys):
    out = tmp_path / "samples"
    rc = main(["run", "--prior", "rar-tiny", "--dtok", "maskgit-vq-tiny", "--backbone", "discon-tiny",
               "--ctok", "va-vae-tiny", "--prior-checkpoint", "none", "--dtok-checkpoint", "none",
               "--backbone-checkpoint", "none", "--ctok-checkpoint", "none", "--num", "3",
               "--labels", "1,2", "--ar-steps", "2", "--head-steps", "5", "--device", "cpu",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "sec/img" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "img_00000.png", "img_00001.png",
                                                     "img_00002.png"]


def test_cli_missing_weights_message(capsys):
    rc = main(["run", "--backbone", "discon-l", "--ctok", "va-vae", "--num", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "backbone preset 'discon-l'" in err and "discon-l/checkpoint-last.pth" in err
    assert "discon train" in err
