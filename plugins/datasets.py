"""The built-in datasets: ImageNet-style class folders and Fashion-MNIST (IDX files).

Every dataset returns ``(image, label)`` with ``image`` float32 ``[3, H, W]`` in ``[0, 1]`` and
``label`` an int, and exposes ``get(index, flip)`` (the caller's :class:`~discon_core.data.BatchOrder`
chooses flips), ``name(index)``, ``skipped`` and, where known, ``classes``. Registered through
``discon_register_datasets`` like any plugin's; configs name them ``data: {type: ...}``::

    {"type": "fashion-mnist", "root": null, "split": "train", "limit": null}   # train | val | test
    {"type": "folder", "root": "/data/imagenet/train", "image_size": 256}
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from discon_core.errors import DisconError
from discon_core.hooks import hookimpl

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "DISCON_FASHION_MNIST"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The validation split: the last 1/VAL_DIVISOR of each class of the training file, by index
# (500 per class, 5,000 of the 60,000): fixed by the file alone (no RNG, so no torch or numpy
# version can change it), class balanced; "train" is the other 55,000.
VAL_DIVISOR = 12
FASHION_MNIST_SPLITS = ("train", "val", "test")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".jpe")
# IDX type byte -> numpy big-endian dtype (the IDX format stores multi-byte values big-endian).
IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# ------------------------------------------------------------------------------------------------
# Image transforms

def _missing(path: Path) -> str:
    return "is a file, expected a folder" if path.exists() else "does not exist"


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop (as MAR and RAR preprocess ImageNet): halve with BOX filtering while the
    short side is >= 2x the target, resize with BICUBIC so the short side is ``image_size``,
    then crop the centre square."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3,H,W] in [0,1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


# ------------------------------------------------------------------------------------------------
# Class folders

class ImageFolder:
    """``root/<class name>/<image file>``, classes sorted by name -> labels 0..K-1.

    Images are ADM centre-cropped to ``image_size``. Unreadable or corrupt files are skipped with
    a warning when first met and counted in ``skipped`` (``get`` then returns None; the batch
    collation drops them and the cache records them in its manifest).
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 256):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DisconError(f"dataset folder {self.root} {_missing(self.root)} (data.root)")
        self.image_size = int(image_size)
        if self.image_size <= 0:
            raise DisconError(f"data.image_size must be a positive integer, got {image_size!r}")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise DisconError(f"dataset folder {self.root} holds no class sub-folders; expected "
                              "root/<class name>/<image files> (ImageNet layout)")
        self.files: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            for path in sorted((self.root / name).rglob("*")):
                if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                    self.files.append((path, label))
        if not self.files:
            raise DisconError(f"dataset folder {self.root} has {len(self.classes)} class folders "
                              f"but no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.skipped: dict[str, str] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        """The file of item ``index`` relative to the root (the cache records it)."""
        return str(self.files[index][0].relative_to(self.root))

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 (16 hex) of the file list, labels and image size (not of the file contents:
        reading a million images to key a cache would cost more than the cache saves)."""
        h = hashlib.sha256(f"{self.image_size};".encode())
        for i, (_, label) in enumerate(self.files):
            h.update(f"{self.name(i)}:{label};".encode())
        return h.hexdigest()[:16]

    def get(self, index: int, flip: bool = False) -> tuple[torch.Tensor, int] | None:
        """(image float32 [3,S,S] in [0,1], label), horizontally flipped if ``flip``; None when
        the file cannot be decoded."""
        path, label = self.files[index]
        try:
            with Image.open(path) as im:
                im.load()
                image = center_crop_arr(im.convert("RGB"), self.image_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            key = self.name(index)
            if key not in self.skipped:
                self.skipped[key] = f"{type(e).__name__}: {e}"
                warnings.warn(f"skipping unreadable image {path}: {e} "
                              f"({len(self.skipped)} skipped so far)", stacklevel=2)
            return None
        x = pil_to_tensor(image)
        return (x.flip(-1) if flip else x), label

    def __getitem__(self, index: int):
        return self.get(index, False)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0,0,type,ndim; ndim big-endian uint32 dims;
    then the data, big-endian."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DisconError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DisconError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + dtype.itemsize * math.prod(dims)
    if len(raw) != expected:
        raise DisconError(f"IDX file {path} is truncated or padded: {len(raw)} bytes, expected "
                          f"{expected} for shape {tuple(dims)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DisconError(f"Fashion-MNIST folder {root} lacks {stem}[.gz]; expected the four IDX files "
                      f"({', '.join(s for pair in FASHION_MNIST_FILES.values() for s in pair)}); "
                      "on Debian/Ubuntu: apt-get install dataset-fashion-mnist")


def val_indices(labels: np.ndarray) -> np.ndarray:
    """Indices (sorted) of the validation split in the training file: the last
    ``len(class) // VAL_DIVISOR`` images of each class."""
    picked = [np.flatnonzero(labels == c)[-(n // VAL_DIVISOR):]
              for c in np.unique(labels) if (n := int((labels == c).sum())) >= VAL_DIVISOR]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


class FashionMNIST:
    """Fashion-MNIST from IDX files, as the agreed CPU-scale dataset: 28x28 grey, zero-padded
    by 2 pixels to 32x32 (the background is 0), replicated to 3 channels, 10 classes.

    ``root``: a folder with the IDX files (gzipped or not); default ``$DISCON_FASHION_MNIST`` or
    Debian's ``/usr/share/datasets/fashion-mnist``. ``split``: ``train`` (55,000: the training
    file without the validation split), ``val`` (5,000 of the training file, see
    ``VAL_DIVISOR``) or ``test`` (10,000). ``limit`` keeps the first N items of the split.
    """

    num_classes = 10
    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train",
                 limit: int | None = None, image_size: int = 32):
        root = Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
        if not root.is_dir():
            raise DisconError(f"Fashion-MNIST folder {root} {_missing(root)} (data.root); install "
                              "Debian's dataset-fashion-mnist package or pass a folder holding "
                              "the IDX files")
        if split not in FASHION_MNIST_SPLITS:
            raise DisconError(f"data.split must be one of {', '.join(FASHION_MNIST_SPLITS)}, "
                              f"got {split!r}")
        if image_size < 28 or (image_size - 28) % 2:
            raise DisconError(f"data.image_size for Fashion-MNIST must be 28 + an even padding "
                              f"(e.g. 32), got {image_size!r}")
        images_stem, labels_stem = FASHION_MNIST_FILES["test" if split == "test" else "train"]
        images = read_idx(_find_idx(root, images_stem))
        labels = read_idx(_find_idx(root, labels_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DisconError(f"Fashion-MNIST files in {root} disagree: images {images.shape}, "
                              f"labels {labels.shape}")
        index = np.arange(len(labels))
        if split != "test":
            val = np.zeros(len(labels), bool)
            val[val_indices(labels)] = True
            index = index[val if split == "val" else ~val]
        if limit is not None:
            if int(limit) <= 0:
                raise DisconError(f"data.limit must be a positive integer, got {limit!r}")
            index = index[:int(limit)]
        if not len(index):
            raise DisconError(f"Fashion-MNIST split {split!r} in {root} is empty (the validation "
                              f"split takes 1/{VAL_DIVISOR} of each class of >= {VAL_DIVISOR})")
        images, labels = images[index], labels[index]
        self.index = index                                             # rows of the IDX file
        self.root, self.split, self.image_size = root, split, int(image_size)
        self.pad = (self.image_size - images.shape[-1]) // 2
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # uint8 [N,28,28]
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        """The split and the row in its IDX file (train and val share the training file)."""
        return f"{self.split}/{int(self.index[index]):05d}"

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 (16 hex) of the split's images and labels: what keys caches of its contents."""
        h = hashlib.sha256(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]

    def get(self, index: int, flip: bool = False) -> tuple[torch.Tensor, int]:
        """(image float32 [3,32,32] in [0,1], label)."""
        x = self.images[index].float().div_(255.0)
        x = torch.nn.functional.pad(x, (self.pad,) * 4)
        if flip:
            x = x.flip(-1)
        return x.expand(3, -1, -1).contiguous(), int(self.labels[index])

    def __getitem__(self, index: int):
        return self.get(index, False)

@hookimpl
def discon_register_datasets(register):
    register("fashion-mnist", FashionMNIST)
    register("folder", ImageFolder)
