"""The pre-tokenization cache, a built-in plugin (the ``discon cache`` command): discrete ids
and continuous posterior moments of every image and of its horizontal flip, computed once (as
MAR's ``main_cache.py`` does for its latents), so that training never runs a tokenizer. The
``discon`` and ``prior`` recipes (``discon_plugins/recipes.py``) train from it.

Layout of a cache folder::

    manifest.json              presets, parameters, checkpoint paths + sha256, dataset, counts
    shard-00000.safetensors    index int64 [n]; labels int64 [n];
                               tokens int32 [n, 2, h, w]          (view 0 = image, 1 = its flip)
                               moments float32 [n, 2, 2C, h, w]   (raw mean ++ logvar, as quant_conv)
    shard-00000.json           count, sha256 of the shard file, skipped images

Shards are written atomically (temp file + rename, then the sidecar), so a crash leaves either a
finished shard or none; a rerun skips every shard whose sidecar and checksum agree (resume).
Under ``torchrun`` rank r writes shards r, r+world, ...; rank 0 writes the manifest at the end.
Readers check the manifest's presets against what the model expects and verify each shard's
sha256 before first use, naming the corrupt shard.

Command line::

    discon cache --data fashion-mnist --dtok maskgit-vq-tiny --dtok-checkpoint dtok.pth \\
        --ctok va-vae-tiny --ctok-checkpoint ctok.pth --out runs/cache
    torchrun --nproc_per_node 8 -m discon_core.cli cache --data folder --data-root /imagenet/train \\
        --image-size 256 --dtok maskgit-vq --dtok-checkpoint pretrained --ctok va-vae \\
        --ctok-checkpoint pretrained --out /cache/imagenet256
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from discon_core import cli
from discon_core.checkpoints import save_atomic, sha256_of, verify_sha256
from discon_core.config import read_json
from discon_core.errors import DisconError
from discon_core.hooks import hookimpl
from discon_core.precision import SHORT
from discon_core.runtime import output_dir, resolve_device

log = logging.getLogger(__name__)

FORMAT = "discon-cache/1"
MANIFEST = "manifest.json"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def component_record(module: torch.nn.Module, checkpoint: str | os.PathLike | None) -> dict:
    """What the manifest says about a tokenizer: preset name, parameters, weights file + sha256."""
    preset = getattr(module, "discon_preset", None)
    record: dict[str, Any] = {"preset": preset.name if preset else type(module).__name__,
                              "params": preset.params if preset else {}}
    if checkpoint is None:
        record.update(checkpoint=None, sha256=None)
    else:
        path = Path(checkpoint)
        if str(checkpoint) == "pretrained" and preset is not None:
            from discon_core.checkpoints import fetch_preset_checkpoint
            path = fetch_preset_checkpoint(preset)
        record.update(checkpoint=str(path.resolve()), sha256=sha256_of(path))
    return record


def _same_component(a: Mapping, b: Mapping) -> bool:
    return a.get("preset") == b.get("preset") and a.get("sha256") == b.get("sha256") \
        and a.get("params") == b.get("params")


def _describe(rec: Mapping) -> str:
    sha = rec.get("sha256")
    return f"{rec.get('preset')!r} (weights {'sha256 ' + sha[:12] if sha else 'random init'})"


@torch.no_grad()
def encode_batch(images: torch.Tensor, dtok, ctok) -> tuple[torch.Tensor, torch.Tensor]:
    """images [B,3,H,W] in [0,1] -> (tokens int32 [B,2,h,w], moments float32 [B,2,2C,h,w]),
    view 1 being the horizontally flipped image."""
    both = torch.cat([images, images.flip(-1)])
    tokens = dtok.encode(both)
    moments = ctok.encode_moments(both).float()
    b = images.shape[0]
    if tokens.shape[-2:] != moments.shape[-2:]:
        raise DisconError(f"dtok and ctok grids differ: tokens {tuple(tokens.shape[-2:])}, "
                          f"moments {tuple(moments.shape[-2:])}; DisCon needs both views on the "
                          "same grid (choose tokenizers with the same downsampling)")
    tokens = torch.stack([tokens[:b], tokens[b:]], 1).to(torch.int32)
    moments = torch.stack([moments[:b], moments[b:]], 1)
    return tokens.cpu(), moments.cpu()


def build_cache(data: Mapping[str, Any], out: str | os.PathLike, *, dtok: str,
                ctok: str, dtok_checkpoint: str | None = None, ctok_checkpoint: str | None = None,
                shard_size: int = 1000, batch_size: int = 64, device: str | None = None,
                dtype: str | torch.dtype = "auto", seed: int = 0, progress: bool = True,
                dtok_overrides: Mapping[str, Any] | None = None) -> Path:
    """Pre-tokenize the dataset ``data`` (a :func:`discon_core.data.build_dataset` mapping) into
    ``out``; resumable and torchrun-parallel. Returns the manifest path. ``dtype`` is the
    tokenizers' (``build(dtype=)``; the manifest records it, a resume must match it);
    ``dtok_overrides``: preset parameters of the dtok (e.g. another ``codebook_size``).

    Stages: plan (tokenizers, dataset, shard layout) and check it against an existing manifest;
    each rank writes its missing shards; rank 0 gathers the sidecars into the final manifest."""
    from tqdm.auto import tqdm

    from discon_core.data import build_dataset
    from discon_core.distributed import setup_distributed, teardown_distributed
    from discon_core.registry import build
    from discon_core.runtime import check_output_dir

    if shard_size <= 0 or batch_size <= 0:
        raise DisconError(f"shard_size and batch_size must be positive, got {shard_size}, "
                          f"{batch_size}")
    out = check_output_dir(out, what="cache folder")
    rank, world, dev = setup_distributed(device)
    dataset = build_dataset(data)
    torch.manual_seed(seed)  # random-init tokenizers (tests) must agree across ranks too
    dt = build("dtok", dtok, checkpoint=dtok_checkpoint, device=dev, dtype=dtype,
               **(dtok_overrides or {})).eval()
    ct = build("ctok", ctok, checkpoint=ctok_checkpoint, device=dev, dtype=dtype).eval()
    if not hasattr(ct, "encode_moments"):
        raise DisconError(f"ctok {ctok!r} has no encode_moments(); the cache stores raw "
                          "posterior moments (contract extension for continuous tokenizers)")
    plan = {"format": FORMAT, "complete": False,
            "dtok": component_record(dt, dtok_checkpoint),
            "ctok": component_record(ct, ctok_checkpoint),
            "data": dict(data), "num_items": len(dataset),
            "data_fingerprint": getattr(dataset, "fingerprint", None),  # the items, not the config
            "dtype": SHORT.get(next(ct.parameters()).dtype, "fp32"),
            "num_classes": int(dataset.num_classes), "shard_size": shard_size,
            "num_shards": math.ceil(len(dataset) / shard_size)}
    _start_manifest(out, plan, write=rank == 0)
    mine = [k for k in range(rank, plan["num_shards"], world) if not _shard_done(out, k)]
    done_before = len(range(rank, plan["num_shards"], world)) - len(mine)
    if done_before:
        log.info("rank %d: %d finished shards reused", rank, done_before)
    bar = tqdm(total=sum(min(shard_size, len(dataset) - k * shard_size) for k in mine),
               unit="img", desc=f"cache[{rank}]", disable=not progress or rank != 0)
    for k in mine:
        _write_shard(out, k, dataset, dt, ct, shard_size, batch_size, dev, bar)
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        _finish_manifest(out, plan)
    teardown_distributed()
    return out / MANIFEST


@torch.no_grad()
def prior_tokens_cache(src: str | os.PathLike, out: str | os.PathLike, prior, *,
                       prior_checkpoint: str | os.PathLike | None = None,
                       temperature: float = 1.0, seed: int = 0, batch_size: int = 256,
                       progress: bool = True) -> Path:
    """A copy of the cache ``src`` whose discrete tokens are the ones ``prior`` would produce:
    token ``i`` of every view drawn from ``prior.logits`` (a :class:`DiscretePrior`, teacher
    forced on the TRUE tokens before ``i``, conditional, no CFG) at ``temperature``; moments,
    labels and indices are unchanged. Training on it shows the continuous model the kind of
    discrete tokens it gets at sampling time, each still paired with its image's continuous
    tokens. Resumable per shard; returns the manifest path."""
    from tqdm.auto import tqdm

    from discon_core.runtime import check_output_dir
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise DisconError(f"temperature must be a number > 0, got {temperature!r}")
    source = CachedDataset(src)
    out = check_output_dir(out, what="cache folder")
    plan = {**_recipe(source.manifest),
            "tokens_from": {"prior": component_record(prior, prior_checkpoint),
                            "source": source.manifest["dtok"], "temperature": float(temperature),
                            "seed": int(seed), "mode": "teacher-forced, conditional, no CFG"}}
    if (out / MANIFEST).is_file():
        if _recipe(read_json(out / MANIFEST, "cache manifest")) != plan:
            raise DisconError(f"cache {out} was built from another cache, prior or temperature; "
                              f"use another --out folder or delete {out}")
    else:
        save_atomic({**plan, "complete": False}, out / MANIFEST)
    dev = next(prior.parameters()).device
    shards = []
    for k, rec in enumerate(tqdm(source.shards, desc="prior tokens", disable=not progress)):
        path = out / rec["file"]
        if not _shard_done(out, k):
            data = dict(source._shard(k))
            tokens = data["tokens"]                       # int32 [n, 2, h, w]
            flat = tokens.flatten(2).flatten(0, 1).long()  # [n*2, h*w]
            labels = data["labels"].repeat_interleave(tokens.shape[1])
            g = torch.Generator(device=dev).manual_seed(seed * 100003 + k)
            drawn = torch.cat([_draw_teacher_forced(prior, flat[i:i + batch_size].to(dev),
                                                    labels[i:i + batch_size].to(dev),
                                                    temperature, g).cpu()
                               for i in range(0, len(flat), batch_size)])
            data["tokens"] = drawn.view(tokens.shape).to(torch.int32)
            save_atomic(data, path)
            save_atomic({"count": rec["count"], "items": None, "sha256": sha256_of(path),
                         "skipped": {}}, out / f"{shard_name(k)}.json")
        shards.append({**rec, "sha256": read_json(out / f"{shard_name(k)}.json",
                                                  "cache shard sidecar")["sha256"]})
    save_atomic({**plan, "complete": True, "shards": shards}, out / MANIFEST)
    return out / MANIFEST


def _recipe(manifest: dict) -> dict:
    """What a manifest says its cache was made from (not how far the build got)."""
    return {k: v for k, v in manifest.items() if k not in ("complete", "shards")}


def _draw_teacher_forced(prior, tokens: torch.Tensor, labels: torch.Tensor, temperature: float,
                         generator: torch.Generator) -> torch.Tensor:
    """tokens int64 [B, N] -> [B, N]: token i drawn from the prior given the class and
    tokens[:, :i]."""
    probs = torch.softmax(prior.logits(tokens, labels).float() / temperature, -1)
    return torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(tokens.shape)


def _start_manifest(out: Path, plan: dict, *, write: bool) -> None:
    """Refuse a folder cached with other tokenizers, data or sharding; else record the plan."""
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = read_json(manifest_path, "cache manifest")
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise DisconError(f"cache manifest {manifest_path} is not a {FORMAT!r} manifest; use "
                              f"another --out folder or delete {out}")
        for kind in ("dtok", "ctok"):
            if not _same_component(old.get(kind, {}), plan[kind]):
                raise DisconError(
                    f"cache {out} was built with {kind} {_describe(old.get(kind, {}))}, not "
                    f"{_describe(plan[kind])}; use another --out folder or delete {out}")
        for key in ("data", "num_items", "data_fingerprint", "shard_size", "dtype"):
            if old.get(key, plan[key] if key == "dtype" else None) != plan[key]:  # older: none
                raise DisconError(f"cache {out} was built with {key}={old.get(key)!r}, now "
                                  f"{plan[key]!r}; use another --out folder or delete {out}")
    elif write:
        save_atomic(plan, manifest_path)


def _write_shard(out: Path, k: int, dataset, dt, ct, shard_size: int, batch_size: int, dev,
                 bar) -> None:
    """Encode items of shard ``k`` and write it with its sidecar (count, sha256, skipped)."""
    lo, hi = k * shard_size, min(len(dataset), (k + 1) * shard_size)
    parts: dict[str, list[torch.Tensor]] = {"index": [], "labels": [], "tokens": [],
                                             "moments": []}
    skipped_before = dict(dataset.skipped)
    for start in range(lo, hi, batch_size):
        items = [(i, dataset.get(i, False)) for i in range(start, min(hi, start + batch_size))]
        items = [(i, it) for i, it in items if it is not None]
        bar.update(min(hi, start + batch_size) - start)
        if not items:
            continue
        images = torch.stack([it[0] for _, it in items]).to(dev)
        tokens, moments = encode_batch(images, dt, ct)
        parts["index"].append(torch.tensor([i for i, _ in items], dtype=torch.int64))
        parts["labels"].append(torch.tensor([it[1] for _, it in items], dtype=torch.int64))
        parts["tokens"].append(tokens)
        parts["moments"].append(moments)
    if not parts["index"]:
        raise DisconError(f"every image of shard {k} (items {lo}..{hi - 1}) is unreadable")
    tensors = {name: torch.cat(v) for name, v in parts.items()}
    path = out / f"{shard_name(k)}.safetensors"
    save_atomic(tensors, path)
    skipped = {n: r for n, r in dataset.skipped.items() if n not in skipped_before}
    save_atomic({"count": int(tensors["index"].numel()), "items": [lo, hi],
                 "sha256": sha256_of(path), "skipped": skipped}, out / f"{shard_name(k)}.json")


def _finish_manifest(out: Path, plan: dict) -> None:
    """Gather every shard's sidecar into the manifest and mark it complete."""
    shards, skipped, count = [], {}, 0
    for k in range(plan["num_shards"]):
        side = out / f"{shard_name(k)}.json"
        if not side.is_file():
            raise DisconError(f"cache {out}: shard {k} was not written by any rank; rerun")
        rec = read_json(side, "cache shard sidecar")
        shards.append({"file": f"{shard_name(k)}.safetensors", "count": rec["count"],
                       "sha256": rec["sha256"]})
        skipped.update(rec["skipped"])
        count += rec["count"]
    sample = load_shard(out / shards[0]["file"], shards[0]["sha256"])
    manifest = {**plan, "complete": True, "count": count, "skipped": skipped,
                "grid": list(sample["tokens"].shape[-2:]),
                "latent_channels": int(sample["moments"].shape[2]) // 2,
                "shards": shards}
    save_atomic(manifest, out / MANIFEST)
    if skipped:
        log.warning("cache %s: %d unreadable images skipped (listed in %s)", out,
                    len(skipped), out / MANIFEST)


def _shard_done(out: Path, k: int) -> bool:
    side, path = out / f"{shard_name(k)}.json", out / f"{shard_name(k)}.safetensors"
    if not (side.is_file() and path.is_file()):
        return False
    try:
        return json.loads(side.read_text())["sha256"] == sha256_of(path)
    except (ValueError, KeyError):
        return False


def load_shard(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """Read one shard after checking its sha256; a bad shard is a DisconError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not path.is_file():
        raise DisconError(f"cache shard {path} is missing; rerun `discon cache` with the same "
                          "arguments to rebuild it")
    verify_sha256(path, sha256, f"cache shard {path}",
                  fix="delete it and its .json sidecar and rerun `discon cache` to rebuild it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DisconError(f"cache shard {path} is unreadable ({e}); delete it and rerun "
                          "`discon cache`") from None


class CachedDataset:
    """A finished cache, read back: ``get(i, flip)`` -> {'moments' [2C,h,w], 'tokens' int64
    [h,w], 'labels' int} for the image or (``flip``) its mirror, like MAR's ``CachedFolder``.

    Shards are verified (sha256) and loaded when first touched and kept in memory up to
    ``max_shards_in_memory``.
    """

    def __init__(self, root: str | os.PathLike, *, max_shards_in_memory: int = 64,
                 verify: bool = True):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.exists():
            raise DisconError(f"{self.root} is not a discon cache (no {MANIFEST}); build one "
                              "with `discon cache`")
        self.manifest = read_json(path, "cache manifest")
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise DisconError(f"cache manifest {path} is not a {FORMAT!r} manifest; rebuild the "
                              "cache with `discon cache`")
        if not self.manifest.get("complete"):
            raise DisconError(f"cache {self.root} is incomplete (an interrupted `discon cache`); "
                              "rerun the same command to finish it")
        self.shards = self.manifest["shards"]
        self.offsets = [0]
        for s in self.shards:
            self.offsets.append(self.offsets[-1] + s["count"])
        self.num_classes = int(self.manifest["num_classes"])
        self.verify = verify
        self.max_shards = max(1, max_shards_in_memory)
        self._loaded: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.skipped: dict[str, str] = {}

    def check_presets(self, *, dtok: str | None = None, ctok: str | None = None) -> None:
        """Refuse a cache built with other tokenizer presets than the model expects."""
        for kind, want in (("dtok", dtok), ("ctok", ctok)):
            have = self.manifest[kind]["preset"]
            if want is not None and want != have:
                raise DisconError(f"cache {self.root} holds {kind} {have!r} tokens but the "
                                  f"training config expects {kind} {want!r}; rebuild the cache "
                                  f"with --{kind} {want} or set components.{kind} to {have}")

    def __len__(self) -> int:
        return self.offsets[-1]

    def _shard(self, k: int) -> dict[str, torch.Tensor]:
        if k in self._loaded:
            self._loaded.move_to_end(k)
            return self._loaded[k]
        rec = self.shards[k]
        data = load_shard(self.root / rec["file"], rec["sha256"] if self.verify else None)
        self._loaded[k] = data
        while len(self._loaded) > self.max_shards:
            self._loaded.popitem(last=False)
        return data

    def get(self, index: int, flip: bool = False) -> dict[str, Any]:
        import bisect
        k = bisect.bisect_right(self.offsets, index) - 1
        shard, j, v = self._shard(k), index - self.offsets[k], int(flip)
        return {"moments": shard["moments"][j, v], "tokens": shard["tokens"][j, v].long(),
                "labels": int(shard["labels"][j])}

    def __getitem__(self, index: int):
        return self.get(index, False)


def collate_cached(items) -> dict[str, torch.Tensor]:
    """Stack cached items into {'moments' [B,2C,h,w], 'tokens' [B,h,w], 'labels' [B]}."""
    return {"moments": torch.stack([it["moments"] for it in items]),
            "tokens": torch.stack([it["tokens"] for it in items]),
            "labels": torch.tensor([it["labels"] for it in items], dtype=torch.int64)}


# ------------------------------------------------------------------------------------------------
# discon cache

def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="pre-tokenize a dataset: discrete ids + continuous moments "
                                     "of each image and its flip, into verified shards")
    p.add_argument("--data", required=True, help="fashion-mnist | folder")
    p.add_argument("--data-root", help="dataset folder (folder: ImageNet-style class folders; "
                                       "fashion-mnist: IDX files, default the Debian package's)")
    p.add_argument("--split", default=None, help="fashion-mnist split: train | test")
    p.add_argument("--limit", type=int, default=None, help="fashion-mnist: first N items only")
    p.add_argument("--image-size", type=int, default=None, help="folder: centre-crop size")
    p.add_argument("--dtok", required=True, help="discrete tokenizer preset")
    p.add_argument("--ctok", required=True, help="continuous tokenizer preset")
    for kind in ("dtok", "ctok"):
        p.add_argument(f"--{kind}-checkpoint", default="pretrained", metavar="PATH",
                       help="its weights: a path, 'pretrained' (the preset's released weights; "
                            "the default) or 'none' (random init)")
    p.add_argument("--out", required=True, help="cache folder (rerun to resume)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_cache, seed=0)  # --seed: random-init tokenizers (same on every rank)


def _cmd_cache(args) -> int:
    data = {"type": args.data}
    for key, value in (("root", args.data_root), ("split", args.split), ("limit", args.limit),
                       ("image_size", args.image_size)):
        if value is not None:
            data[key] = value
    resolve_device(args.device)
    with output_dir(args.out):
        path = build_cache(data, args.out, dtok=args.dtok, ctok=args.ctok,
                           dtok_checkpoint=cli.checkpoint_arg(args.dtok_checkpoint),
                           ctok_checkpoint=cli.checkpoint_arg(args.ctok_checkpoint),
                           shard_size=args.shard_size, batch_size=args.batch_size,
                           device=args.device, dtype=args.dtype, seed=args.seed,
                           progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"cache manifest: {path}")
    return 0


@hookimpl
def discon_register_commands(subparsers) -> None:
    _add_cache(subparsers)
