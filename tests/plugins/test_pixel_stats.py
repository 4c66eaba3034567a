"""discon_plugins.pixel_stats and its place in `discon eval`: exact values on synthetic images,
and each metric's sensitivity to the defects of issue 22 (a +7/255 haze, a 1-pixel shift, a
blur) on real Fashion-MNIST test images, in the fmnist-extractor FID and the pixel check
(measured, 300 images against 1,000 others: FID 2.15 clean, 1.76 hazy, 4.29 shifted, 13.95
blurred; the check passes the clean set and fails all three)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from discon_plugins import pixel_stats
from tests.conftest import fashion_mnist_32

evaluation = pytest.importorskip("discon_plugins.evaluation")
pytest.importorskip("torch_fidelity")


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def test_per_image_values_and_histogram_distances():
    img = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    img[0, :, 2:6, 2:6] = 200           # a bright square inside the 2-pixel frame
    img[1] = 2                          # near-black everywhere, frame included
    v = pixel_stats.per_image(img).numpy()
    assert v[0] == pytest.approx([48 / 64, 48 / 64, 0.0, 200 * 16 / 64])
    assert v[1] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    black, grey = np.zeros(256), np.zeros(256)
    black[0], grey[7] = 10, 4
    assert pixel_stats.histogram_distances(black, grey) == pytest.approx((1.0, 7.0))
    assert pixel_stats.histogram_distances(black, black) == (0.0, 0.0)
    with pytest.raises(ValueError, match="uint8"):
        pixel_stats.per_image(img.float())


def haze(x: torch.Tensor) -> torch.Tensor:
    return x + 7 / 255


def shift(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    out[..., 1:] = x[..., :-1]           # one pixel to the right, zero fill
    return out


def blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    b, c, h, w = x.shape
    return F.conv2d(x.reshape(b * c, 1, h, w), k[None, None], padding=1).reshape(b, c, h, w)


@pytest.fixture(scope="module")
def real():
    """300 test images to perturb, and 1,000 others as the reference (features kept on it)."""
    x = fashion_mnist_32(1300)
    ref = evaluation.EvalInput("ref", images=evaluation.TensorImages(_uint8(x[300:])))
    return x[:300], ref, evaluation.get_extractor("fmnist")


def _score(images: torch.Tensor, real) -> dict:
    _, ref, fmnist = real
    gen = evaluation.EvalInput("gen", images=evaluation.TensorImages(_uint8(images)))
    return evaluation.compute(gen, ref, fmnist, ["fid"])


# defect, the statistics the check must name, and the least factor by which the FID must grow;
# None: the fmnist extractor is blind to it (its GroupNorm removes most of a uniform offset: the
# haze even lowers its FID a little, 2.15 -> 1.76), which is why the pixel check exists
@pytest.mark.parametrize("defect, failed, fid_factor", [
    (haze, {"black", "near_black", "border_mean", "hist_tv"}, None),
    (shift, {"border_mean"}, 1.5),
    (blur, {"black", "near_black", "border_mean", "hist_tv"}, 4.0),
])
def test_each_defect_moves_fid_and_fails_the_pixel_check(real, defect, failed, fid_factor):
    clean = _score(real[0], real)
    assert clean["pixel_check"]["pass"], clean["pixel_check"]
    bad = _score(defect(real[0]), real)
    if fid_factor is None:
        assert abs(bad["fid"] - clean["fid"]) < 1.0, (clean["fid"], bad["fid"])
    else:
        assert bad["fid"] > fid_factor * clean["fid"], (clean["fid"], bad["fid"])
    assert not bad["pixel_check"]["pass"]
    assert failed <= set(bad["pixel_check"]["failed"]), bad["pixel_check"]
    px = bad["pixels"]
    assert px["border_mean"]["reference"] == 0.0   # the zero padding is exactly black
    assert px["border_mean"]["value"] > 0.5
    if defect is not shift:                         # the haze and the blur lift the background
        assert px["black"]["value"] < px["black"]["reference"] - 0.1


def test_eval_reports_pixels_warns_once_and_keeps_reusable_reference_stats(tmp_path, caplog):
    """`discon eval` JSON: pixels with the reference's values, pixel_check, one warning line
    (the CLI's log goes to stderr) when it fails; a dataset reference leaves an .npz of FID statistics that --ref takes
    and that gives the same FID."""
    import json

    from PIL import Image

    from discon_core import cli
    x = _uint8(fashion_mnist_32(300))
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(x[100:]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(ref / f"{i:03d}.png")
    np.savez(tmp_path / "hazy.npz", arr_0=_uint8(haze(x[:100].float() / 255)).permute(0, 2, 3, 1).numpy())
    base = ["eval", str(tmp_path / "hazy.npz"), "--metrics", "fid", "--extractor", "fmnist",
            "--no-progress"]
    assert cli.main(base + ["--ref", f"folder:{ref}", "--out", str(tmp_path / "a.json")]) == 0
    err = [r.getMessage() for r in caplog.records if "pixel check" in r.getMessage()]
    assert len(err) == 1 and "black" in err[0] and "\n" not in err[0], err
    out = json.loads((tmp_path / "a.json").read_text())
    assert out["pixel_check"]["pass"] is False and "black" in out["pixel_check"]["failed"]
    assert out["pixels"]["black"]["reference"] > 0.55 > 0.05 > out["pixels"]["black"]["value"]
    stats = out["reference_stats"]
    assert np.load(stats)["n"] == 200
    assert cli.main(base + ["--ref", stats, "--out", str(tmp_path / "b.json")]) == 0
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-6)
    assert "pixel_check" not in again                # statistics only: no pixels to compare
