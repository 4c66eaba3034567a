"""Pipeline folders (discon_core/pretrained.py): save_pretrained -> from_pretrained gives the
same images, the files are checked, nothing is overwritten, Hub sources go through the client."""
from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from discon_core.errors import DisconError
from discon_core.pipeline import Pipeline

LABELS = torch.tensor([0, 7])


def images(pipe):
    return pipe.generate(LABELS, generator=torch.Generator().manual_seed(0), progress=False)


@pytest.fixture(scope="module")
def default():
    return Pipeline.from_pretrained(dtype="fp32")  # the embedded default, no name needed


def test_no_argument_and_a_shared_name_give_the_embedded_default(default):
    assert {k: getattr(default, k).discon_preset.name for k in
            ("prior", "dtok", "backbone", "head", "ctok")} == dict.fromkeys(
        ("prior", "dtok", "backbone", "head", "ctok"), "fmnist")
    assert Pipeline.from_names(dtype="fp32").mode == default.mode  # from_names() too
    torch.testing.assert_close(images(Pipeline.from_pretrained("fmnist", dtype="fp32")),
                               images(default), rtol=0, atol=0)


def test_save_then_load_gives_the_same_images(default, tmp_path):
    folder = default.save_pretrained(tmp_path / "mine")
    presets = yaml.safe_load((folder / "presets.yaml").read_text())
    assert set(presets) == {"prior", "dtok", "backbone", "head", "ctok"}
    assert presets["head"]["mine"]["checkpoint"] == presets["backbone"]["mine"]["checkpoint"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "backbone.safetensors", "ctok.safetensors", "dtok.safetensors",
        "presets.yaml", "prior.safetensors"]
    assert "| backbone | fmnist |" in (folder / "README.md").read_text()
    loaded = Pipeline.from_pretrained(folder, dtype="fp32")
    assert loaded.backbone.discon_preset.name == "mine"
    assert loaded.backbone.discon_preset.sampling == default.backbone.discon_preset.sampling
    torch.testing.assert_close(images(loaded), images(default), rtol=0, atol=0)


def test_an_existing_folder_is_not_overwritten_and_a_changed_file_is_refused(default, tmp_path):
    folder = default.save_pretrained(tmp_path / "m")
    before = (folder / "prior.safetensors").read_bytes()
    with pytest.raises(DisconError, match=r"m exists and is not empty; .*overwrite"):
        default.save_pretrained(folder)
    assert (folder / "prior.safetensors").read_bytes() == before
    data = bytearray(before)
    data[-1] ^= 1
    (folder / "prior.safetensors").write_bytes(bytes(data))
    with pytest.raises(DisconError, match=r"prior weights \S+prior.safetensors is corrupted: "
                                          r"sha256 [0-9a-f]{64}, expected [0-9a-f]{64}"):
        Pipeline.from_pretrained(folder)


def test_bad_sources_are_one_line(tmp_path):
    with pytest.raises(DisconError, match=r"'nothing-here' is neither a pipeline folder nor a "
                                          r"preset name"):
        Pipeline.from_pretrained("nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DisconError, match=r"empty is not a pipeline folder: presets.yaml is missing"):
        Pipeline.from_pretrained(tmp_path / "empty")


def test_hub_source_is_downloaded_through_the_hub_client(default, tmp_path, monkeypatch):
    import huggingface_hub
    folder = default.save_pretrained(tmp_path / "local", name="hubbed")
    calls = []

    def snapshot_download(repo, revision=None, cache_dir=None):
        calls.append((repo, revision))
        if repo != "org/discon-fmnist":
            raise OSError("401 Client Error: Repository Not Found")
        dest = cache_dir / "snap"
        shutil.copytree(folder, dest, dirs_exist_ok=True)
        return str(dest)

    monkeypatch.setenv("DISCON_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    pipe = Pipeline.from_pretrained("hf-hub:org/discon-fmnist@v1", dtype="fp32")
    assert calls == [("org/discon-fmnist", "v1")] and pipe.prior.discon_preset.name == "hubbed"
    with pytest.raises(DisconError, match=r"^cannot download the pipeline hf-hub:org/gone: "
                                          r".*Repository Not Found"):
        Pipeline.from_pretrained("hf-hub:org/gone")
