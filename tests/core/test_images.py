"""PNG grids and plots."""
import numpy as np
import torch
from PIL import Image

from discon_core.images import make_grid, save_grid, save_images


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

