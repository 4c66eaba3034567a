"""discon export: a discon train checkpoint -> a pipeline folder that from_pretrained loads;
--push-to-hub through a mocked Hub client; bad input is one line and writes nothing."""
from __future__ import annotations

import pytest
import torch
import yaml

from discon_core import build
from discon_core.cli import main
from discon_core.pipeline import Pipeline

CONFIG = {"recipe": "discon", "components": {"backbone": "fmnist", "head": "fmnist"},
          "data": {"cache": "unused"}, "steps": 3}


@pytest.fixture(scope="module")
def train_checkpoint(tmp_path_factory):
    """A discon-recipe training file in the trainer's layout: its EMA is the embedded default's
    backbone + head (MAR layout), its raw weights are noise (export must take the EMA)."""
    backbone = build("backbone", "fmnist", checkpoint="pretrained", dtype="fp32")
    head = build("head", "fmnist", checkpoint="pretrained", dtype="fp32")
    ema = {**backbone.state_dict(), **{f"diffloss.{k}": v for k, v in head.state_dict().items()}}
    path = tmp_path_factory.mktemp("run") / "checkpoint-last.pth"
    torch.save({"model": {k: torch.randn_like(v) if v.is_floating_point() else v
                          for k, v in ema.items()},
                "model_ema": ema, "step": 3, "recipe": "discon", "info": "{}",
                "config": yaml.safe_dump(CONFIG)}, path)
    return path


def test_export_then_from_pretrained_samples_like_the_trained_weights(train_checkpoint, tmp_path,
                                                                      capsys):
    out = tmp_path / "exported"
    assert main(["export", str(train_checkpoint), "--out", str(out), "--prior", "fmnist",
                 "--dtok", "fmnist", "--ctok", "fmnist"]) == 0
    assert "exported backbone, head (step 3)" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "the `discon` recipe for 3 steps" in card and "| ctok | fmnist |" in card
    labels, g = torch.tensor([1, 2]), lambda: torch.Generator().manual_seed(0)
    got = Pipeline.from_pretrained(out, dtype="fp32").generate(labels, generator=g(),
                                                                progress=False)
    ref = Pipeline.from_pretrained(dtype="fp32").generate(labels, generator=g(), progress=False)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the EMA weights, not the raw ones


def test_push_to_hub_uses_the_hub_client(train_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub
    calls = []

    class FakeApi:
        def create_repo(self, repo, private=False, exist_ok=False):
            calls.append(("create_repo", repo, private, exist_ok))
            return f"https://huggingface.co/{repo}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in
                                                           __import__("pathlib").Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["export", str(train_checkpoint), "--out", str(tmp_path / "o"), "--push-to-hub",
                 "org/mine", "--private"]) == 0
    assert calls == [("create_repo", "org/mine", True, True),
                     ("upload_folder", "org/mine", ["README.md", "backbone.safetensors",
                                                    "presets.yaml"])]


@pytest.mark.parametrize("args, message", [
    (["nope.pth", "--out", "{tmp}/o"], "checkpoint nope.pth does not exist"),
    (["{ckpt}", "--out", "{tmp}/o", "--ctok", "fmnsit"], "unknown ctok 'fmnsit'"),
    (["{weights}", "--out", "{tmp}/o"], "is not a `discon train` checkpoint"),
    (["{ckpt}", "--out", "{tmp}/full"], "full exists and is not empty"),
])
def test_bad_input_is_one_line_and_writes_nothing(train_checkpoint, tmp_path, capsys, args,
                                                  message):
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    args = [a.format(tmp=tmp_path, ckpt=train_checkpoint, weights=weights) for a in args]
    assert main(["export", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
