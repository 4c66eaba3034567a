"""PNG grids and plots."""
import numpy as np
import torch
from PIL import Image

from discon_core.images import make_grid, psnr, save_grid, save_images, to_uint8, uint8_tensor


def test_grid_layout_and_values(tmp_path):
    images = torch.zeros(5, 3, 4, 6)
    images[1] = 1.0
    grid = make_grid(images, nrow=3, pad=2)
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    assert (grid[2:6, 10:16] == 255).all() and (grid[2:6, 2:8] == 0).all()
    path = save_grid(images, tmp_path / "g.png", nrow=3, upscale=2)
    assert Image.open(path).size == (grid.shape[1] * 2, grid.shape[0] * 2)
    paths = save_images(images[:2], tmp_path / "each")
    assert [p.name for p in paths] == ["img_00000.png", "img_00001.png"]
    assert np.asarray(Image.open(paths[1])).min() == 255


def test_uint8_rounds_to_nearest_and_clamps():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 0.6 / 255, 254.4 / 255, 1.0, 2.0]).view(1, 1, 1, 7)
    assert uint8_tensor(x).flatten().tolist() == [0, 0, 0, 1, 254, 255, 255]  # half to even
    assert uint8_tensor(x).dtype == torch.uint8
    img = torch.rand(2, 3, 4, 5)
    arr = to_uint8(img)
    assert arr.shape == (2, 4, 5, 3) and (arr == uint8_tensor(img).permute(0, 2, 3, 1).numpy()).all()


def test_psnr_values_and_clamping():
    x = torch.rand(2, 3, 8, 8)
    assert psnr(x, x).min() >= 99
    noisy = (x + 0.1).clamp(0, 1)
    expected = 10 * torch.log10(1 / (x - noisy).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(psnr(x, noisy), expected)
    # images are clamped to [0, 1] first: an overshoot costs nothing beyond the clamp
    torch.testing.assert_close(psnr(x.clamp(0.5, 1), x.clamp(0.5, 1) + 5), psnr(x.clamp(0.5, 1), torch.ones_like(x)))
