"""The CPU-scale study (`discon study`): its shipped config validates; every stage runs on a
tiny schedule, is reused, and resumes when its schedule grows."""
from __future__ import annotations

import pytest
import torch
import yaml

from discon_core.train import TrainConfig
from tests.conftest import REPO


def test_shipped_study_config_validates():
    from discon_core.registry import resolve
    from discon_plugins.study import STUDY_KEYS
    raw = yaml.safe_load((REPO / "configs" / "fmnist_cpu.yaml").read_text())
    assert set(raw) <= STUDY_KEYS
    for sec, recipe in (("dtok", "tokenizer"), ("ctok", "tokenizer"), ("discon", "discon"),
                        ("prior", "prior")):
        TrainConfig.from_dict({**raw[sec]["train"], "recipe": recipe, "components": {"x": "y"},
                               "data": {}})
    resolve("dtok", raw["dtok"]["preset"])
    resolve("ctok", raw["ctok"]["preset"])
    resolve("prior", raw["prior"]["preset"])
    resolve("backbone", raw["discon"]["backbone"])
    resolve("head", raw["discon"]["head"])


@pytest.fixture
def one_thread():
    """Tiny models are dominated by per-op overhead; with other jobs on the cores, idle OpenMP
    workers get descheduled between ops (several times slower than one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_study_end_to_end_and_stage_reuse(tmp_path, capsys, one_thread):
    """tokenizers -> cache -> discon-tiny + rar-tiny -> sample grid, on a tiny schedule; a
    second run reuses every stage; checkpoints load through build() (MAR layout)."""
    from discon_core import build
    from discon_plugins.study import run_study
    from tests.plugins.test_datasets import fake_fashion_mnist

    root = fake_fashion_mnist(tmp_path / "fm", n=32)
    small = ["out=" + str(tmp_path / "study"), f"data.root={root}", "data.limit=null",
             "cache.shard_size=20", "ctok.stats_items=32", "sample.rows=1", "sample.ar_steps=2"]
    for stage in ("dtok", "ctok", "discon", "prior"):
        small += [f"{stage}.train.steps=2", f"{stage}.train.batch_size=8",
                  f"{stage}.train.sample_every=2", f"{stage}.train.num_samples=4",
                  f"{stage}.train.ckpt_every=2"]
    config = REPO / "configs" / "fmnist_cpu.yaml"
    grid = run_study(config, small)
    from PIL import Image
    assert Image.open(grid).size[0] > 10 * 32
    first = capsys.readouterr().out
    for stage in ("dtok", "ctok", "discon", "prior"):   # EMA sample grids of every recipe
        assert (tmp_path / "study" / stage / "samples" / "step-0000002.png").is_file()
    assert "discon: training" in first and "cache: pre-tokenizing" in first
    run_study(config, small)
    again = capsys.readouterr().out
    for stage in ("dtok", "ctok", "discon", "prior"):
        assert f"{stage}: reusing" in again
    assert "cache: reusing" in again
    ckpt = tmp_path / "study" / "discon" / "checkpoint-last.pth"
    state = torch.load(ckpt, weights_only=True)
    assert any(k.startswith("diffloss.") for k in state["model"])
    assert not any(k.startswith(("backbone.", "head.")) for k in state["model"])
    build("backbone", "discon-tiny", checkpoint=ckpt)
    build("head", "discon-tiny", checkpoint=ckpt)
    build("prior", "rar-tiny", checkpoint=tmp_path / "study" / "prior" / "checkpoint-last.pth")
    # continuing a stage: more steps resume from its checkpoint
    run_study(config, small + ["prior.train.steps=3"])
    assert "prior: resuming at step 2" in capsys.readouterr().out
    assert torch.load(tmp_path / "study" / "prior" / "checkpoint-last.pth",
                      weights_only=True)["step"] == 3
