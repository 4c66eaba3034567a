"""The pre-tokenization cache: content, resume, verification on read, preset checks."""
from __future__ import annotations

import json

import pytest
import torch

from discon_core import build
from discon_plugins.cache import MANIFEST, CachedDataset, build_cache, collate_cached
from discon_core.checkpoints import save_atomic
from discon_plugins.datasets import FashionMNIST
from discon_core.errors import DisconError
from tests.plugins.test_datasets import fake_fashion_mnist

TOKS = dict(dtok="maskgit-vq-tiny", ctok="va-vae-tiny")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Random-init tiny tokenizers saved as checkpoint files (so the manifest has hashes)."""
    folder = tmp_path_factory.mktemp("toks")
    torch.manual_seed(0)
    paths = {}
    for kind, name in (("dtok", TOKS["dtok"]), ("ctok", TOKS["ctok"])):
        paths[kind] = folder / f"{kind}.pth"
        save_atomic({"model": build(kind, name).state_dict()}, paths[kind])
    return paths


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizers):
    root = fake_fashion_mnist(tmp_path_factory.mktemp("fm"), n=24)
    data = {"type": "fashion-mnist", "root": str(root)}
    out = tmp_path_factory.mktemp("cache")
    build_cache(data, out, dtok_checkpoint=str(tokenizers["dtok"]),
                ctok_checkpoint=str(tokenizers["ctok"]), shard_size=10, batch_size=7,
                device="cpu", dtype="fp32", progress=False, **TOKS)
    return data, out


def test_manifest_and_shard_contents(built, tokenizers):
    data, out = built
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["count"] == 24 and manifest["num_shards"] == 3
    assert [s["count"] for s in manifest["shards"]] == [10, 10, 4]
    assert manifest["grid"] == [8, 8] and manifest["latent_channels"] == 8
    assert manifest["dtok"]["preset"] == "maskgit-vq-tiny" and len(manifest["dtok"]["sha256"]) == 64
    assert manifest["ctok"]["params"]["embed_dim"] == 8

    ds = CachedDataset(out)
    dtok = build("dtok", TOKS["dtok"], checkpoint=tokenizers["dtok"], dtype="fp32")
    ctok = build("ctok", TOKS["ctok"], checkpoint=tokenizers["ctok"], dtype="fp32")
    images = FashionMNIST(data["root"])
    for index in (0, 13, 23):
        img = images.get(index)[0][None]
        for flip in (False, True):
            item = ds.get(index, flip)
            x = img.flip(-1) if flip else img
            assert torch.equal(item["tokens"], dtok.encode(x)[0])
            torch.testing.assert_close(item["moments"], ctok.encode_moments(x)[0],
                                       atol=1e-5, rtol=1e-5)
            assert item["labels"] == images.get(index)[1]
    batch = collate_cached([ds.get(i, i % 2 == 1) for i in range(5)])
    assert batch["moments"].shape == (5, 16, 8, 8) and batch["tokens"].dtype == torch.int64


def test_resume_rebuilds_only_missing_shards(built, tokenizers, tmp_path):
    data, out = built
    # a copy of the finished cache with shard 1 lost (as after a crash)
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    original = (tmp_path / "shard-00001.safetensors").read_bytes()
    (tmp_path / "shard-00001.safetensors").unlink()
    (tmp_path / "shard-00001.json").unlink()
    before = (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns
    build_cache(data, tmp_path, dtok_checkpoint=str(tokenizers["dtok"]),
                ctok_checkpoint=str(tokenizers["ctok"]), shard_size=10, batch_size=7,
                device="cpu", dtype="fp32", progress=False, **TOKS)
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == before
    assert (tmp_path / "shard-00001.safetensors").read_bytes() == original
    assert len(CachedDataset(tmp_path)) == 24


def test_corrupt_shard_is_named(built, tmp_path):
    _, out = built
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    shard = tmp_path / "shard-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    ds = CachedDataset(tmp_path)
    assert ds.get(3)["labels"] >= 0                        # other shards still read
    with pytest.raises(DisconError, match="shard-00002.safetensors is corrupt"):
        ds.get(21)


def test_other_presets_are_refused_naming_both(built, tokenizers):
    data, out = built
    with pytest.raises(DisconError, match="built with ctok 'va-vae-tiny'.*not 'ldm-kl-tiny'"):
        build_cache(data, out, dtok=TOKS["dtok"], ctok="ldm-kl-tiny",
                    dtok_checkpoint=str(tokenizers["dtok"]), shard_size=10, device="cpu",
                    dtype="fp32", progress=False)
    with pytest.raises(DisconError, match="holds ctok 'va-vae-tiny'.*expects ctok 'ldm-kl-tiny'"):
        CachedDataset(out).check_presets(dtok="maskgit-vq-tiny", ctok="ldm-kl-tiny")


def test_incomplete_or_missing_cache(built, tmp_path):
    _, out = built
    with pytest.raises(DisconError, match="not a discon cache"):
        CachedDataset(tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(DisconError, match="incomplete"):
        CachedDataset(tmp_path)


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_same_cache(built, tokenizers, tmp_path):
    """Under torchrun each rank writes every other shard; the result equals the 1-process cache."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    data, out = built
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "discon_core.cli", "cache", "--data", "fashion-mnist", "--data-root", data["root"],
         "--dtok", TOKS["dtok"], "--dtok-checkpoint", str(tokenizers["dtok"]),
         "--ctok", TOKS["ctok"], "--ctok-checkpoint", str(tokenizers["ctok"]),
         "--out", str(tmp_path / "par"), "--shard-size", "10", "--batch-size", "7",
         "--device", "cpu", "--dtype", "fp32", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = CachedDataset(out), CachedDataset(tmp_path / "par")
    assert [s["count"] for s in one.shards] == [s["count"] for s in two.shards]
    for i in range(len(one)):   # floats may differ in the last bit: other thread counts
        a, b = one.get(i, True), two.get(i, True)
        assert torch.equal(a["tokens"], b["tokens"]) and a["labels"] == b["labels"]
        torch.testing.assert_close(a["moments"], b["moments"], atol=1e-5, rtol=1e-5)


class ShiftPrior(torch.nn.Module):
    """A DiscretePrior whose teacher-forced distribution of token i is (true token i + 1) mod V:
    shows that every position and both views are drawn at the right place."""

    codebook_size, num_classes = 128, 10

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(50.0))

    def logits(self, tokens, labels):
        return torch.nn.functional.one_hot((tokens + 1) % self.codebook_size,
                                           self.codebook_size).float() * self.scale


def test_prior_tokens_cache_replaces_only_the_tokens(built, tmp_path):
    from discon_plugins.cache import prior_tokens_cache
    _, src = built
    out = tmp_path / "prior-tokens"
    prior_tokens_cache(src, out, ShiftPrior(), temperature=1.0, batch_size=5, progress=False)
    a, b = CachedDataset(src), CachedDataset(out)
    assert len(a) == len(b) == 24 and b.manifest["tokens_from"]["temperature"] == 1.0
    for i in (0, 13, 23):
        for flip in (False, True):
            x, y = a.get(i, flip), b.get(i, flip)
            assert torch.equal(y["tokens"], (x["tokens"] + 1) % 128)
            assert torch.equal(y["moments"], x["moments"]) and y["labels"] == x["labels"]
    b.check_presets(**TOKS)  # still the dtok's vocabulary and the same ctok
    # a rerun reuses the finished shards; another temperature is refused, naming the folder
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    prior_tokens_cache(src, out, ShiftPrior(), temperature=1.0, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")} == before
    with pytest.raises(DisconError, match="another cache, prior or temperature"):
        prior_tokens_cache(src, out, ShiftPrior(), temperature=0.5, progress=False)


def test_prior_tokens_cache_with_a_real_prior_draws_its_vocabulary(built, tmp_path):
    from discon_plugins.cache import prior_tokens_cache
    _, src = built
    torch.manual_seed(0)
    prior = build("prior", "rar-tiny-s", dtype="fp32").eval()
    prior_tokens_cache(src, tmp_path / "c", prior, seed=3, progress=False)
    a, b = CachedDataset(src), CachedDataset(tmp_path / "c")
    drawn = torch.stack([b.get(i)["tokens"] for i in range(len(b))])
    true = torch.stack([a.get(i)["tokens"] for i in range(len(a))])
    assert drawn.shape == true.shape and 0 <= drawn.min() and drawn.max() < prior.codebook_size
    assert (drawn != true).float().mean() > 0.5  # an untrained prior: mostly other codes
