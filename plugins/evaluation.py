"""Evaluation, a built-in plugin: FID, KID, Inception Score, precision/recall (torch-fidelity's
implementations), class accuracy and PSNR over any registered feature extractor, pixel
statistics with a check for a systematic shift (``discon_plugins/pixel_stats.py``), and the
``discon eval`` command. Optional (``pip install 'discon[eval]'``): the core never imports it.

An input is a folder of images, an ``.npz`` of images (ADM layout: ``arr_0`` uint8 NHWC,
optional ``arr_1`` labels), an ``.npz`` of statistics (``mu``, ``sigma``: FID only), a folder
written by ``discon sample`` (its ``samples.npz``), a registered dataset's split
(``DATASET:SPLIT``, e.g. ``fashion-mnist:test``), or a flat folder of reference images
(``folder:PATH``). Features of dataset references are computed once and
cached under ``$DISCON_HOME/eval/`` keyed by dataset, extractor and preprocessing.

Extractors (built-ins in ``discon_plugins/extractors.py``) are registered through the
``discon_register_extractors`` hook; this module knows only their interface: a module
with ``name``, ``feature_dim``, ``num_classes`` (0: no logits), ``preprocessing`` and
``forward(uint8 [B,3,H,W]) -> (features [B,D], logits [B,K] | None)``. It is registered with
torch-fidelity (``register_feature_extractor``) and run through its feature loop, always with
``cuda=`` from the chosen device.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from discon_core import cli, hooks
from discon_core.errors import DisconError, close_matches
from discon_core.images import psnr, uint8_tensor
from discon_core.hooks import hookimpl
from discon_core.runtime import check_output_dir, resolve_device
from discon_plugins import pixel_stats

log = logging.getLogger(__name__)

METRICS = ("fid", "kid", "isc", "prc")
INCEPTION_MIN_SAMPLES = 50_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
EVAL_EXTRA = "pip install 'discon[eval]' (from a checkout: pip install -e '.[eval]')"


def _fidelity():
    try:
        import torch_fidelity
    except ImportError:
        raise DisconError(f"discon eval needs torch-fidelity: {EVAL_EXTRA}") from None
    return torch_fidelity


def parse_metrics(text: str | None) -> list[str] | None:
    """'fid,kid' -> ['fid', 'kid']; None keeps the defaults (everything the inputs allow)."""
    if text is None:
        return None
    names = [m.strip() for m in text.split(",") if m.strip()]
    for m in names:
        if m not in METRICS:
            raise DisconError(f"unknown metric {m!r} in --metrics; known: {', '.join(METRICS)}"
                              f"{close_matches(m, METRICS)}")
    if not names:
        raise DisconError("--metrics is empty; give e.g. fid,kid,isc,prc")
    return names


def get_extractor(name: str, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build the registered extractor ``name`` on ``device``; it computes in ``dtype`` (by
    autocast: its fp32 weights and preprocessing stay as they are; features come back fp32)."""
    table = hooks.extractors()
    if name not in table:
        raise DisconError(f"unknown extractor {name!r}; registered: {', '.join(sorted(table))}"
                          f"{close_matches(name, table)}")
    module = table[name].fn().to(device).eval().requires_grad_(False)
    module.compute_dtype = dtype
    return module


def default_extractor(ref: str) -> str:
    """``--extractor`` by the reference: the Fashion-MNIST classifier for Fashion-MNIST
    (``fashion-mnist:SPLIT``), the standard Inception network for everything else."""
    return "fmnist" if ref.partition(":")[0] == "fashion-mnist" else "inception"


# ------------------------------------------------------------------------------------------------
# Inputs

@dataclass
class EvalInput:
    """Images (uint8 [3,H,W] items), or statistics only; plus labels and provenance."""

    source: str
    images: Any = None                      # a torch Dataset of uint8 [3,H,W] tensors
    stats: dict[str, np.ndarray] | None = None
    labels: torch.Tensor | None = None
    cache_key: str | None = None            # set for dataset references: features are cached
    sample_info: dict | None = None         # sample.json found beside generated samples
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else int(self.stats.get("n", 0))


class TensorImages(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images                # uint8 [N,3,H,W]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class DatasetImages(torch.utils.data.Dataset):
    """A registered dataset's images as uint8 (the evaluation's input format)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset.get(i)[0].mul(255).round_().to(torch.uint8)


class FolderImages(torch.utils.data.Dataset):
    """Image files of one size, read lazily; a file that fails to decode is named."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        try:
            with Image.open(self.files[i]) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise DisconError(f"cannot decode image {self.files[i]} (corrupt or truncated?): "
                              f"{e}") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _folder(path: Path) -> FolderImages:
    from PIL import Image, UnidentifiedImageError
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DisconError(f"folder {path} is empty: expected image files ({', '.join(IMAGE_SUFFIXES)})")
    sizes: dict[tuple[int, int], Path] = {}
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DisconError(f"folder {path} holds a non-image file {p.name}; give a folder of "
                              f"images only ({', '.join(IMAGE_SUFFIXES)}), an .npz or a stats file")
        try:
            with Image.open(p) as im:
                sizes.setdefault(im.size, p)
        except (OSError, UnidentifiedImageError) as e:
            raise DisconError(f"cannot read image {p} (corrupt?): {e}") from None
        if len(sizes) > 1:
            (s1, p1), (s2, p2) = list(sizes.items())[:2]
            raise DisconError(f"folder {path} mixes image sizes: {p1.name} is {s1[0]}x{s1[1]}, "
                              f"{p2.name} is {s2[0]}x{s2[1]}; all images must have one size")
    return FolderImages(files)


def _npz(path: Path) -> EvalInput:
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except (OSError, ValueError) as e:
        raise DisconError(f"cannot read {path} as .npz: {e}") from None
    if "arr_0" in keys:
        arr = data["arr_0"]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3) or not len(arr):
            raise DisconError(f"{path}: arr_0 must be uint8 images [N,H,W,3] (ADM layout), got "
                              f"{arr.dtype} {list(arr.shape)}")
        images = torch.from_numpy(arr).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous()
        labels = torch.from_numpy(data["arr_1"].astype(np.int64)) if "arr_1" in keys else None
        return EvalInput(str(path), images=TensorImages(images), labels=labels)
    if {"mu", "sigma"} <= keys:
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise DisconError(f"{path}: mu must be [D] and sigma [D,D], got {list(mu.shape)} and "
                              f"{list(sigma.shape)}")
        return EvalInput(str(path), stats={"mu": mu, "sigma": sigma})
    raise DisconError(f"{path} has neither arr_0 (images) nor mu and sigma (statistics); keys: "
                      f"{', '.join(sorted(keys)) or 'none'}")


def _sample_json(folder: Path) -> dict | None:
    for p in (folder / "sample.json", folder.parent / "sample.json"):
        if p.is_file():
            return json.loads(p.read_text())
    return None


def _folder_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def load_input(spec: str) -> EvalInput:
    """An input from its command-line form (see the module doc)."""
    kind, _, split = spec.partition(":")
    if split and kind != "folder" and kind in hooks.datasets():
        from discon_core.data import build_dataset
        ds = build_dataset({"type": kind, "split": split})
        labels = getattr(ds, "labels", None)
        if labels is None:
            labels = torch.tensor([ds.get(i)[1] for i in range(len(ds))])
        # keyed by the split's contents where the dataset says them (a redefined split, e.g.
        # train without val, never reuses features of the old one)
        fingerprint = getattr(ds, "fingerprint", None)
        return EvalInput(spec, images=DatasetImages(ds), labels=torch.as_tensor(labels),
                         cache_key=f"{kind}-{split}-{getattr(ds, 'image_size', '')}px"
                                   + (f"-{fingerprint}" if fingerprint else ""))
    if spec.startswith("folder:"):
        path = Path(spec.split(":", 1)[1])
        if not path.is_dir():
            raise DisconError(f"reference folder {path} does not exist")
        return EvalInput(spec, images=_folder(path),
                         cache_key=f"folder-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
                                   f"-{_folder_digest(path)}")
    path = Path(spec)
    if path.is_dir():
        info = _sample_json(path)
        if (path / "samples.npz").is_file() and (path / "sample.json").is_file():
            inp = _npz(path / "samples.npz")
        elif info is not None and (path / "sample.json").is_file():
            raise DisconError(f"{path} holds an unfinished `discon sample` run (no samples.npz); "
                              "rerun the same discon sample command to complete it")
        else:
            inp = EvalInput(str(path), images=_folder(path))
        inp.sample_info = info
        if inp.labels is None and info is not None and info.get("labels") is not None:
            inp.labels = torch.tensor(info["labels"], dtype=torch.int64)
        return inp
    if path.is_file() and path.suffix == ".npz":
        inp = _npz(path)
        inp.sample_info = _sample_json(path.parent)
        return inp
    if path.exists():
        raise DisconError(f"{spec}: expected a folder of images, an .npz (arr_0 images or mu/sigma "
                          "statistics), DATASET:SPLIT (e.g. fashion-mnist:test) or folder:PATH")
    raise DisconError(f"{spec} does not exist (a folder, an .npz, DATASET:SPLIT such as "
                      "fashion-mnist:test, or folder:PATH)")


# ------------------------------------------------------------------------------------------------
# Features (through torch-fidelity's loop), with a cache for dataset references

def _fidelity_name(extractor) -> str:
    """Register ``extractor``'s class with torch-fidelity (once) and return its name there."""
    tf = _fidelity()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    name = f"discon-{extractor.name}"
    if name in FEATURE_EXTRACTORS_REGISTRY:
        return name
    provided = ("features", "logits") if extractor.num_classes else ("features",)

    class Wrapped(tf.FeatureExtractorBase):
        def __init__(self, name, features_list, extractor=None, **kwargs):
            super().__init__(name, features_list)
            self.extractor = extractor

        @staticmethod
        def get_provided_features_list():
            return provided

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "logits" if metric == "isc" else "features"

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):
            dtype = getattr(self.extractor, "compute_dtype", torch.float32)
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
                features, logits = self.extractor(x)
            named = {"features": features, "logits": logits}
            return tuple(named[k].float() for k in self.features_list)

    tf.register_feature_extractor(name, Wrapped)
    return name


def extract(extractor, images, *, device: torch.device, batch_size: int = 64,
            progress: bool = False) -> dict[str, torch.Tensor]:
    """{'features' [N,D], 'logits' [N,K] if the extractor has them} of a uint8 image dataset."""
    _fidelity()
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)
    layers = ["features", "logits"] if extractor.num_classes else ["features"]
    fe = create_feature_extractor(_fidelity_name(extractor), layers, cuda=cuda,
                                  extractor=extractor, verbose=False)
    return get_featuresdict_from_dataset(images, fe, batch_size, cuda, True, progress)


def _cache_path(key: str, extractor) -> Path:
    from discon_core.checkpoints import discon_home
    prep = hashlib.sha256(extractor.preprocessing.encode()).hexdigest()[:12]
    dtype = getattr(extractor, "compute_dtype", torch.float32)  # features differ by precision
    suffix = "" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}"
    return discon_home() / "eval" / f"{key}-{extractor.name}-{prep}{suffix}.safetensors"


def _cached(path: Path, make, valid, metadata: dict) -> dict[str, torch.Tensor]:
    """``make()`` (a dict of tensors) read from / written to the cache file ``path``; written
    atomically (an interrupted run leaves no partial file); a damaged or ``valid``-failing entry
    is recomputed, never trusted."""
    from safetensors.torch import load_file

    from discon_core.checkpoints import save_atomic
    if path.is_file():
        try:
            tensors = load_file(str(path))
            if valid(tensors):
                return tensors
        except Exception as e:
            log.warning("recomputing damaged reference cache %s: %s", path, e)
    tensors = make()
    save_atomic(tensors, path, metadata=metadata)
    return tensors


def features_of(inp: EvalInput, extractor, **kw) -> dict[str, torch.Tensor]:
    """Features of an input; those of dataset references are cached."""
    if inp.stats is not None or inp.features:
        return inp.features
    if inp.cache_key is None:
        inp.features = extract(extractor, inp.images, **kw)
        return inp.features
    inp.features = _cached(
        _cache_path(inp.cache_key, extractor), lambda: extract(extractor, inp.images, **kw),
        lambda t: t["features"].shape == (len(inp), extractor.feature_dim),
        {"source": inp.source, "extractor": extractor.name,
         "preprocessing": extractor.preprocessing})
    return inp.features


def pixels_of(inp: EvalInput) -> pixel_stats.PixelStats | None:
    """Pixel statistics of an input (None for statistics-only inputs); those of dataset
    references are cached beside their features."""
    if inp.images is None:
        return None
    if inp.cache_key is None:
        return pixel_stats.pixel_statistics(inp.images)
    from discon_core.checkpoints import discon_home

    def make() -> dict[str, torch.Tensor]:
        px = pixel_stats.pixel_statistics(inp.images)
        return {"values": torch.from_numpy(px.values), "hist": torch.from_numpy(px.hist)}

    t = _cached(discon_home() / "eval" / f"{inp.cache_key}-pixels-v1.safetensors", make,
                lambda t: t["values"].shape == (len(inp), len(pixel_stats.PER_IMAGE)),
                {"source": inp.source})
    return pixel_stats.PixelStats(t["values"].numpy(), t["hist"].numpy())


def reference_statistics(inp: EvalInput, extractor, **kw) -> Path:
    """The FID statistics (``mu``, ``sigma``, ``n``) of a dataset reference as an ``.npz`` that
    ``--ref`` accepts, written once beside its cached features: the 10,000-image Inception
    statistics of a test split are computed once and reused anywhere (even without the data)."""
    if inp.cache_key is None:
        raise DisconError(f"{inp.source}: reference statistics are kept for dataset references "
                          "(DATASET:SPLIT or folder:PATH) only")
    path = _cache_path(inp.cache_key, extractor).with_suffix(".npz")
    if not path.is_file():
        from discon_core.checkpoints import atomic_path
        stats = statistics(features_of(inp, extractor, **kw)["features"])
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the name
                np.savez(f, mu=stats["mu"], sigma=stats["sigma"], n=len(inp))
    return path


# ------------------------------------------------------------------------------------------------
# Metrics

def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """FID statistics in float64: mean [D] and covariance [D,D] (unbiased, as TTUR/ADM)."""
    f = features.double().numpy()
    return {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}


def compute(gen: EvalInput, ref: EvalInput, extractor, metrics: list[str] | None = None, *,
            device: torch.device | str = "cpu", batch_size: int = 64, kid_subset_size: int = 1000,
            kid_subsets: int = 100, prc_neighborhood: int = 3, seed: int = 2020,
            progress: bool = False) -> dict[str, Any]:
    """Score ``gen`` against ``ref``; ``metrics`` None: every metric the inputs allow."""
    tf = _fidelity()
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    asked = metrics
    stats_only = gen.stats is not None or ref.stats is not None
    if metrics is None:
        metrics = ["fid"] if stats_only else [m for m in METRICS
                                              if m != "isc" or extractor.num_classes]
    if "isc" in metrics and not extractor.num_classes:
        raise DisconError(f"the {extractor.name} extractor has no class logits, so no Inception "
                          "Score; use --extractor fmnist for IS (or drop isc from --metrics)")
    for inp in (gen, ref):
        if inp.stats is not None:
            width = inp.stats["mu"].shape[0]
            if width != extractor.feature_dim:
                raise DisconError(f"statistics in {inp.source} have feature width {width} but the "
                                  f"{extractor.name} extractor gives {extractor.feature_dim}")
            bad = [m for m in metrics if m != "fid"]
            if bad:
                raise DisconError(f"{inp.source} holds statistics only, enough for fid but not "
                                  f"{', '.join(bad)}; pass images or --metrics fid")
    n_gen, n_ref = len(gen), len(ref)
    if "kid" in metrics and min(n_gen, n_ref) < kid_subset_size:
        raise DisconError(f"KID draws subsets of {kid_subset_size} images but there are "
                          f"{n_gen} generated and {n_ref} reference images; lower "
                          "--kid-subset-size or add images")
    if "prc" in metrics and min(n_gen, n_ref) <= prc_neighborhood:
        raise DisconError(f"precision/recall needs more than {prc_neighborhood} images per side")
    if "isc" in metrics and n_gen < 10:
        raise DisconError(f"the Inception Score uses 10 splits: it needs >= 10 images, got {n_gen}")
    if extractor.name == "inception" and n_gen and n_gen < INCEPTION_MIN_SAMPLES:
        log.warning("%d generated images: Inception metrics from fewer than %d samples are biased "
                    "(FID upward) and not comparable to published 50k numbers", n_gen,
                    INCEPTION_MIN_SAMPLES)
    kw = {"device": torch.device(device), "batch_size": batch_size, "progress": progress}
    fg, fr = features_of(gen, extractor, **kw), features_of(ref, extractor, **kw)
    opts = {"verbose": False, "rng_seed": seed}
    out: dict[str, Any] = {}
    if "fid" in metrics:
        sg = gen.stats or statistics(fg["features"])
        sr = ref.stats or statistics(fr["features"])
        out["fid"] = fid_statistics_to_metric(sg, sr, False)[tf.KEY_METRIC_FID]
    if "kid" in metrics:
        kid = kid_features_to_metric(fg["features"], fr["features"], kid_subsets=kid_subsets,
                                     kid_subset_size=kid_subset_size, **opts)
        out["kid"], out["kid_std"] = kid[tf.KEY_METRIC_KID_MEAN], kid[tf.KEY_METRIC_KID_STD]
    if "isc" in metrics:
        isc = isc_features_to_metric(fg["logits"], 10, True, seed)
        out["isc"], out["isc_std"] = isc[tf.KEY_METRIC_ISC_MEAN], isc[tf.KEY_METRIC_ISC_STD]
    if "prc" in metrics:
        prc = prc_features_to_metric(fg["features"], fr["features"], prc_neighborhood=prc_neighborhood,
                                     save_cpu_ram=True, **opts)
        out["precision"], out["recall"] = prc[tf.KEY_METRIC_PRECISION], prc[tf.KEY_METRIC_RECALL]
    if extractor.num_classes and gen.labels is not None and "logits" in fg:
        if len(gen.labels) != n_gen:
            raise DisconError(f"{gen.source}: {len(gen.labels)} labels for {n_gen} images")
        if n_gen < extractor.num_classes:
            raise DisconError(f"class accuracy needs at least one image per class: {n_gen} images "
                              f"for {extractor.num_classes} classes")
        out["class_accuracy"] = float((fg["logits"].argmax(1) == gen.labels).float().mean())
    elif asked and "class_accuracy" in asked:
        raise DisconError("class accuracy needs labels (arr_1 in the .npz or sample.json)")
    pg, pr = pixels_of(gen), pixels_of(ref)
    if pg is not None and pr is not None:
        out["pixels"], out["pixel_check"] = pixel_stats.compare(pg, pr)
        if not out["pixel_check"]["pass"]:
            log.warning(pixel_stats.describe_failure(out["pixels"], out["pixel_check"]))
    if ref.cache_key is not None and "fid" in metrics:
        out["reference_stats"] = str(reference_statistics(ref, extractor, **kw))
    out.update({"N": n_gen, "N_ref": n_ref, "extractor": extractor.name,
                "preprocessing": extractor.preprocessing, "generated": gen.source,
                "reference": ref.source, "kid_subset_size": kid_subset_size if "kid" in out else None,
                "sample": gen.sample_info})
    return out


@torch.no_grad()
def reconstruct(tokenizer, inp: EvalInput, *, device, batch_size: int = 64,
                progress: bool = False) -> tuple[EvalInput, float]:
    """Encode + decode every image of ``inp`` (a dtok or ctok; the ctok's posterior mean):
    the reconstructions as an input, and their mean PSNR (dB) against the originals."""
    from tqdm.auto import tqdm
    loader = torch.utils.data.DataLoader(inp.images, batch_size=batch_size)
    recon, scores = [], []
    for batch in tqdm(loader, desc="reconstruct", unit="batch", disable=not progress):
        x = batch.to(device).float() / 255
        y = tokenizer.decode(tokenizer.encode(x)).float().clamp(0, 1)
        recon.append(uint8_tensor(y))
        scores.append(psnr(x, y).cpu())
    out = EvalInput(f"reconstructions of {inp.source}", images=TensorImages(torch.cat(recon)))
    return out, float(torch.cat(scores).mean())


# ------------------------------------------------------------------------------------------------
# discon eval

def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="FID, KID, IS, precision/recall, class accuracy of images against a "
                     "reference (or rFID + PSNR of a tokenizer with --reconstruct)")
    p.add_argument("generated", nargs="?", help="folder of images, discon sample folder, .npz "
                                                "(arr_0) or statistics .npz (mu, sigma)")
    p.add_argument("--ref", required=True, help="the same kinds, DATASET:SPLIT (e.g. "
                                                "fashion-mnist:test) or folder:PATH")
    p.add_argument("--extractor", default=None, help="inception | fmnist (default: fmnist for a "
                                                     "fashion-mnist:SPLIT reference, else inception)")
    p.add_argument("--metrics", default=None, help="comma-separated: fid,kid,isc,prc "
                                                   "(default: all the inputs allow)")
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write the results as JSON to FILE (a regular file)")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON on stdout instead of the table")
    p.add_argument("--reconstruct", action="store_true",
                   help="score reconstructions of --ref by --dtok or --ctok (rFID) with PSNR")
    for kind in ("dtok", "ctok"):
        p.add_argument(f"--{kind}", help=f"{kind} preset for --reconstruct")
        p.add_argument(f"--{kind}-checkpoint", default="pretrained", metavar="PATH")
    p.add_argument("--ctok-latents-stats", default=None, metavar="PATH",
                   help="latents_stats override of the ctok (e.g. a study's cache/latents_stats.pt)")
    p.add_argument("--grid", default=None, metavar="PNG",
                   help="with --reconstruct: also save the first 10 reference images (top row) "
                        "and their reconstructions (bottom row)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval, seed=2020)  # KID subsets, IS splits, PR: torch-fidelity's seed


def _cmd_eval(args) -> int:
    from discon_core.checkpoints import atomic_path, file_target
    from discon_core.precision import hardware_record, resolve_dtype
    from discon_core.registry import build

    names = parse_metrics(args.metrics)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, "--dtype")
    if args.out:  # a bad target is refused before any work
        check_output_dir(os.path.dirname(os.path.abspath(args.out)), what="--out folder")
        file_target(args.out)
    extractor = get_extractor(args.extractor or default_extractor(args.ref), device, dtype)
    ref = load_input(args.ref)
    mean_psnr = None
    if args.reconstruct:
        if args.generated or (args.dtok is None) == (args.ctok is None):
            raise DisconError("--reconstruct scores one tokenizer: give --dtok or --ctok (and no "
                              "GENERATED argument)")
        kind = "dtok" if args.dtok else "ctok"
        extra = ({"latents_stats": args.ctok_latents_stats}
                 if kind == "ctok" and args.ctok_latents_stats else {})
        tok = build(kind, getattr(args, kind),
                    checkpoint=cli.checkpoint_arg(getattr(args, f"{kind}_checkpoint")),
                    device=device, dtype=dtype, **extra)
        if args.grid:
            check_output_dir(os.path.dirname(os.path.abspath(args.grid)), what="--grid folder")
        gen, mean_psnr = reconstruct(tok, ref, device=device, batch_size=args.batch_size,
                                     progress=not args.no_progress)
        if args.grid:
            from discon_core.images import save_grid
            pair = torch.stack([ref.images[i] for i in range(10)] +
                               [gen.images[i] for i in range(10)]).float() / 255
            print(f"wrote {save_grid(pair, args.grid, nrow=10)}",  # stdout: only the JSON
                  file=sys.stderr if args.json else sys.stdout)
    elif args.grid:
        raise DisconError("--grid shows reconstructions: use it with --reconstruct")
    elif args.generated is None:
        raise DisconError("give GENERATED (images to score) or --reconstruct with --dtok/--ctok")
    else:
        gen = load_input(args.generated)
    out = compute(gen, ref, extractor, names, device=device, batch_size=args.batch_size,
                  kid_subset_size=args.kid_subset_size, seed=args.seed,
                  progress=not args.no_progress)
    if mean_psnr is not None:
        out["psnr"] = mean_psnr
    out.update(seed=args.seed, hardware=hardware_record(device, dtype))
    text = json.dumps(out, indent=2, default=str)
    if args.out:
        with atomic_path(args.out) as tmp:  # any file name, always JSON
            tmp.write_text(text)
    if args.json:
        print(text)
        return 0
    for key in ("fid", "kid", "isc", "precision", "recall", "class_accuracy", "psnr"):
        if key in out:
            print(f"{key:<16}{out[key]:.4f}")
    for key, v in out.get("pixels", {}).items():  # grey levels for means, shares for the rest
        print(f"{key:<16}{v:.4f}" if not isinstance(v, dict) else
              f"{key:<16}{v['value']:.4f} (reference {v['reference']:.4f})")
    if "pixel_check" in out:
        print(f"{'pixel_check':<16}{'pass' if out['pixel_check']['pass'] else 'FAIL'}")
    print(f"{'N':<16}{out['N']} generated vs {out['N_ref']} reference ({out['extractor']})")
    return 0


@hookimpl
def discon_register_commands(subparsers) -> None:
    _add_eval(subparsers)
