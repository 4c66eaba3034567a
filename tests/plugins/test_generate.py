"""discon_plugins.generate (discon sample's write_samples): class balance, the ADM .npz layout, and resume == uninterrupted."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from discon_core.errors import DisconError
from discon_plugins.generate import balanced_labels, write_samples


def _generate(labels, generator):
    # depends on the labels and on the per-batch generator only, like a real pipeline
    noise = torch.rand(len(labels), 3, 8, 8, generator=generator)
    return (noise + labels.view(-1, 1, 1, 1) / 10).clamp(0, 1)


def _write(out, **kw):
    args = dict(num=23, num_classes=5, batch_size=4, seed=3, config={"mode": "test"},
                progress=False)
    return write_samples(_generate, out, **{**args, **kw})


def test_labels_are_class_balanced():
    labels = balanced_labels(23, 5)
    assert torch.bincount(labels).tolist() == [5, 5, 5, 4, 4]
    with pytest.raises(DisconError, match="smaller than the 10 classes"):
        balanced_labels(7, 10)


def test_npz_and_pngs_follow_the_adm_layout(tmp_path):
    path = _write(tmp_path / "s")
    data = np.load(path)
    assert data["arr_0"].shape == (23, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == balanced_labels(23, 5).tolist()
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 23


def test_resumed_sampling_equals_uninterrupted(tmp_path):
    full = np.load(_write(tmp_path / "full"))["arr_0"]
    _write(tmp_path / "resumed")
    parts = sorted((tmp_path / "resumed" / "parts").glob("batch-*.npz"))
    for p in parts[2:5]:          # an interrupted run: some batches never written
        p.unlink()
    (tmp_path / "resumed" / "samples.npz").unlink()
    resumed = np.load(_write(tmp_path / "resumed"))["arr_0"]
    assert np.array_equal(full, resumed)
    # and the seed matters (the comparison above can fail)
    assert not np.array_equal(full, np.load(_write(tmp_path / "other", seed=4))["arr_0"])


def test_resume_with_other_settings_is_refused(tmp_path):
    _write(tmp_path / "s")
    with pytest.raises(DisconError, match="other settings.*seed"):
        _write(tmp_path / "s", seed=9)


def test_sample_json_records_weights_provenance(tmp_path):
    """sample.json's checkpoints: released weights with file + sha256 + source, a local file
    with its sha256, random init as null."""
    import hashlib
    from safetensors.torch import save_file
    from discon_core import build, checkpoints
    from discon_core.pipeline import Pipeline
    from discon_plugins.generate import weights_record
    prior = build("prior", "fmnist", checkpoint="pretrained", dtype="fp32")
    dtok = build("dtok", "fmnist", dtype="fp32")
    local = tmp_path / "dtok.safetensors"
    save_file(dtok.state_dict(), local)
    rec = weights_record(Pipeline(prior=prior, dtok=build("dtok", "fmnist", checkpoint=local,
                                                          dtype="fp32")))
    assert set(rec) == {"prior", "dtok"}
    released = rec["prior"]["weights"]
    assert rec["prior"]["preset"] == "fmnist"
    # named by package, not by this machine's path
    assert released["file"] == released["source"] == "package:discon_plugins/weights/fmnist/prior.safetensors"
    shipped = checkpoints.package_file(released["source"])
    assert released["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert rec["dtok"]["weights"] == {"file": str(local),
                                      "sha256": hashlib.sha256(local.read_bytes()).hexdigest()}
    assert weights_record(Pipeline(prior=prior, dtok=dtok))["dtok"]["weights"] is None
