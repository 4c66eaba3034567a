"""The built-in datasets: IDX reader, Fashion-MNIST, class folders with ADM centre crop."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from discon_plugins.datasets import (FASHION_MNIST_DIR, FashionMNIST, ImageFolder, center_crop_arr,
                                     read_idx)
from discon_core.data import collate_images
from discon_core.errors import DisconError

VAL_SHA = "926f8b77848b70e9"  # sha256 of the 5,000 val indices (54,527 ... 59,999)


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """An IDX file (ubyte) as the Fashion-MNIST distribution ships them."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def fake_fashion_mnist(folder: Path, n: int = 40, seed: int = 0) -> Path:
    """A folder with the four Fashion-MNIST IDX files holding ``n`` random 28x28 images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("t10k", max(4, n // 4))):
        write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (count,)),
                  gz=split == "train")
    return folder


def test_read_idx_plain_gzip_and_errors(tmp_path):
    a = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", a, gz=False)), a)
    assert np.array_equal(read_idx(write_idx(tmp_path / "b", a, gz=True)), a)
    raw = (tmp_path / "a").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(DisconError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n" + raw)
    with pytest.raises(DisconError, match="not an IDX file"):
        read_idx(tmp_path / "png")


def test_fashion_mnist_from_any_folder(tmp_path):
    root = fake_fashion_mnist(tmp_path / "fm", n=12)
    ds = FashionMNIST(root)
    assert len(ds) == 12 and ds.num_classes == 10
    x, y = ds.get(3)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    raw = torch.from_numpy(read_idx(root / "train-images-idx3-ubyte.gz")[3]).float() / 255
    assert torch.equal(x[0, 2:30, 2:30], raw) and torch.equal(x[0], x[2])
    assert x[:, :2].abs().sum() == 0 and x[:, :, -2:].abs().sum() == 0   # zero padding
    assert torch.equal(ds.get(3, flip=True)[0], x.flip(-1))
    assert len(FashionMNIST(root, split="test")) == 4
    assert len(FashionMNIST(root, limit=5)) == 5


def test_fashion_mnist_bad_input(tmp_path):
    with pytest.raises(DisconError, match="does not exist"):
        FashionMNIST(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DisconError, match="train-images-idx3-ubyte.*dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "empty")
    root = fake_fashion_mnist(tmp_path / "fm", n=4)
    with pytest.raises(DisconError, match="data.split must be one of train, val, test"):
        FashionMNIST(root, split="validation")
    with pytest.raises(DisconError, match="split 'val' .* is empty"):
        FashionMNIST(root, split="val")   # 4 images: no class has the 12 a val image needs


def test_val_split_is_the_last_twelfth_of_each_class_and_train_the_rest(tmp_path):
    root = fake_fashion_mnist(tmp_path / "fm", n=480)
    labels = read_idx(root / "train-labels-idx1-ubyte.gz")
    torch.manual_seed(1)
    train, val = FashionMNIST(root, split="train"), FashionMNIST(root, split="val")
    torch.manual_seed(2)
    assert np.array_equal(FashionMNIST(root, split="val").index, val.index)  # no RNG involved
    expected = sorted(i for c in range(10) for i in np.flatnonzero(labels == c)[-((labels == c).sum() // 12):])
    assert val.index.tolist() == expected and len(val) == sum((labels == c).sum() // 12 for c in range(10))
    assert not set(train.index) & set(val.index) and len(train) + len(val) == 480
    i = 5
    raw = torch.from_numpy(read_idx(root / "train-images-idx3-ubyte.gz")[val.index[i]]).float() / 255
    assert torch.equal(val.get(i)[0][0, 2:30, 2:30], raw) and val.get(i)[1] == labels[val.index[i]]
    assert val.name(i) == f"val/{val.index[i]:05d}"
    assert len(FashionMNIST(root, split="val", limit=3)) == 3
    assert train.fingerprint != val.fingerprint != FashionMNIST(root, split="test").fingerprint
    assert FashionMNIST(root, split="val").fingerprint == val.fingerprint


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist():
    import hashlib
    ds, val = FashionMNIST(), FashionMNIST(split="val")
    assert len(ds) == 55000 and len(val) == 5000 and len(FashionMNIST(split="test")) == 10000
    assert sorted(set(ds.labels.tolist())) == list(range(10))
    assert np.bincount(val.labels.numpy()).tolist() == [500] * 10
    assert not set(ds.index) & set(val.index)
    # the validation split is pinned: these indices, whatever the library versions
    assert hashlib.sha256(val.index.astype(np.int64).tobytes()).hexdigest()[:16] == VAL_SHA


def _png(path: Path, size: tuple[int, int], color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_center_crop_arr_adm():
    # Left half red, right half blue, 200x100: the crop keeps the middle square.
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100, 0] = 255
    arr[:, 100:, 2] = 255
    out = np.asarray(center_crop_arr(Image.fromarray(arr), 32))
    assert out.shape == (32, 32, 3)
    assert out[:, :14, 0].min() > 200 and out[:, 18:, 2].min() > 200


def test_image_folder_classes_crop_and_corrupt_files(tmp_path):
    root = tmp_path / "imagenet"
    _png(root / "n02" / "a.png", (64, 48), (255, 0, 0))
    _png(root / "n01" / "b.jpg", (40, 40), (0, 255, 0))
    _png(root / "n01" / "c.png", (90, 30), (0, 0, 255))
    (root / "n02" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "n02" / "notes.txt").write_text("ignored")
    ds = ImageFolder(root, image_size=16)
    assert ds.classes == ["n01", "n02"] and len(ds) == 4
    x, y = ds.get(0)
    assert x.shape == (3, 16, 16) and y == 0 and x[1].mean() > 0.9
    broken = [i for i in range(len(ds)) if ds.name(i).endswith("broken.jpg")][0]
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert ds.get(broken) is None
    assert list(ds.skipped) == ["n02/broken.jpg"]
    batch = collate_images([ds.get(i) for i in range(len(ds))])
    assert batch["images"].shape == (3, 3, 16, 16)            # the unreadable one is dropped
    assert batch["labels"].tolist() == [0, 0, 1]


def test_image_folder_bad_input(tmp_path):
    with pytest.raises(DisconError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "x.png", (8, 8), (0, 0, 0))
    with pytest.raises(DisconError, match="no class sub-folders"):
        ImageFolder(tmp_path / "flat")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DisconError, match="no image files"):
        ImageFolder(tmp_path / "empty")
