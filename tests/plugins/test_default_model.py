"""The embedded default pipeline: shipped files, `discon run` and
`discon sample` with no component named, and their bad inputs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from discon_core import build
from discon_core.checkpoints import package_file, sha256_of
from discon_core.cli import main
from discon_plugins.generate import parse_labels
from discon_core.errors import DisconError
from discon_plugins import default_model


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "discon_core.cli", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_shipped_files_match_their_presets_and_fit_the_budget():
    presets = yaml.safe_load(default_model.PRESETS.read_text())
    files = {e["checkpoint"]["url"]: e["checkpoint"]["sha256"]
             for kind in presets.values() for e in kind.values()}
    assert len(files) == 4  # prior, dtok, backbone (+ head in the same file), ctok
    for url, sha in files.items():
        assert sha256_of(package_file(url)) == sha
    assert default_model.size_mb() <= 12.0


def test_corrupted_embedded_file_is_named(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "w.safetensors").write_bytes(b"not the shipped bytes")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DisconError, match=r"embedded file .*w\.safetensors is corrupted: sha256"):
        package_file("package:fakepkg/w.safetensors", "0" * 64)
    with pytest.raises(DisconError, match="is missing; reinstall discon"):
        package_file("package:fakepkg/other.safetensors")


def test_labels_by_id_or_name():
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
    assert parse_labels("sneaker,bag", classes, 10) == [7, 8]
    assert parse_labels("Ankle-boot, 3, t-shirt, ankle boot", classes, 10) == [9, 3, 0, 9]
    with pytest.raises(DisconError, match="unknown class 'snekaer'.*sneaker"):
        parse_labels("snekaer", classes, 10)
    with pytest.raises(DisconError, match=r"class ids \[10\] are outside \[0, 10\)"):
        parse_labels("10", classes, 10)
    with pytest.raises(DisconError, match="presets name no classes"):
        parse_labels("dog", [], 1000)


@pytest.mark.slow
def test_discon_run_default_pipeline_end_to_end(tmp_path):
    """`discon run` with no component: the classifier agrees with the requested labels for most
    images (the figures are in docs/default_model.md)."""
    from discon_plugins import evaluation
    out = tmp_path / "samples"
    r = run("run", "--out", str(out), "--compare-discrete", "--ar-steps-sweep", "1,16")
    assert r.returncode == 0, r.stderr
    assert "sec/img" in r.stdout and "since the process started" in r.stdout
    from PIL import Image
    for name in ("grid.png", "grid_discrete.png", "grid_ar_steps.png"):
        assert (out / name).is_file()
    grid, sweep = Image.open(out / "grid.png"), Image.open(out / "grid_ar_steps.png")
    assert sweep.width == grid.width and sweep.height == grid.height  # 2 rows of 10 each
    pngs = sorted(out.glob("img_*.png"))
    assert len(pngs) == 20  # two per class, classes in turn
    images = torch.stack([torch.from_numpy(__import__("numpy").array(Image.open(p)))
                          for p in pngs]).permute(0, 3, 1, 2)
    _, logits = evaluation.get_extractor("fmnist")(images)
    agree = (logits.argmax(1) == torch.arange(20) % 10).float().mean().item()
    assert agree >= 0.6, f"the classifier agrees with only {agree:.0%} of the requested labels"


@pytest.mark.slow
def test_discon_run_labels_by_name_and_sample_default(tmp_path, capsys):
    assert main(["run", "--labels", "sneaker,bag", "--num", "4", "--out",
                 str(tmp_path / "run")]) == 0
    assert "Sneaker, Bag, Sneaker, Bag" in capsys.readouterr().out
    assert main(["sample", "--num", "10", "--batch-size", "10", "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    info = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert info["presets"] == {k: "fmnist" for k in ("prior", "dtok", "backbone", "head", "ctok")}
    assert info["complete"]


@pytest.mark.parametrize("args, message", [
    (["--labels", "sneakers,bagg"], "unknown class 'sneakers'"),
    (["--labels", "12"], "outside [0, 10)"),
    (["--device", "cuda:7"], "cuda"),
    (["--ar-steps-sweep", "0,4"], "--ar-steps-sweep needs integers >= 1"),
])
def test_run_bad_input_is_one_line(tmp_path, args, message):
    r = run("run", "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()  # nothing left behind


def test_run_refuses_an_existing_file_as_out_before_sampling(tmp_path):
    f = tmp_path / "taken"
    f.write_text("keep me")
    r = run("run", "--out", str(f))
    assert r.returncode == 1 and str(f) in r.stderr and "Traceback" not in r.stderr
    assert f.read_text() == "keep me"
