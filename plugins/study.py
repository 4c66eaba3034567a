"""The CPU-scale study: every stage of DisCon from nothing, on a real small dataset.

    discon study configs/fmnist_cpu.yaml

Stages, each in its own folder under ``out``:

1. ``dtok/``   train the discrete tokenizer (tokenizer recipe on images);
2. ``ctok/``   train the continuous tokenizer;
3. ``cache/``  pre-tokenize the dataset with both (ids + posterior moments, image and flip),
               then compute the continuous latents' normalization (``latents_stats.pt``);
4. ``discon/`` train backbone + head on the cache (discon recipe);
5. ``prior/``  train the discrete prior on the cached ids (prior recipe);
6. ``samples.png``: prior -> discrete ids -> backbone+head -> continuous latents -> decoder.

A finished stage is reused (its checkpoint reached the configured steps; the cache manifest is
complete); an interrupted one resumes exactly from its last checkpoint. Raising a stage's
``steps`` (``--set discon.train.steps=2000``) continues that stage from its checkpoint; when a
tokenizer changes, the study refuses to mix it with a cache built from the old one and names the
folders to delete. Delete a stage's folder to redo it from scratch.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from discon_core.errors import DisconError
from discon_core.hooks import hookimpl
from discon_core.recipes import component_spec
from discon_core.config import TrainConfig, apply_overrides, check_keys, coerce, load_yaml, read_json
from discon_core.train import LAST, train

log = logging.getLogger(__name__)

STUDY_KEYS = {"out", "seed", "device", "threads", "data", "dtok", "ctok", "cache", "discon",
              "prior", "sample"}


def _section(raw: Mapping, key: str) -> dict:
    value = raw.get(key)
    if not isinstance(value, Mapping):
        raise DisconError(f"study config: section {key!r} must be a mapping")
    return dict(value)


# typed values of the sections, checked before the first stage trains for minutes
SECTION_TYPES = {
    "cache": {"shard_size": int, "batch_size": int},
    "ctok": {"preset": str, "normalize": str, "stats_items": int},
    "dtok": {"preset": str}, "prior": {"preset": str, "overrides": dict},
    "sample": {"rows": int, "seed": int, "ar_steps": int, "prior_cfg": float,
               "prior_temperature": float, "cfg_scale": float, "temperature": float},
}


def _check_sections(config: str, **sections: dict) -> None:
    for name, sec in sections.items():
        for key, t in SECTION_TYPES.get(name, {}).items():
            if sec.get(key) is not None:
                sec[key] = coerce(sec[key], t, f"{name}.{key}", f"study config {config}")
                if t is int and key != "seed" and sec[key] < 1:
                    raise DisconError(f"study config {config}: {name}.{key} must be >= 1, got "
                                      f"{sec[key]}")
    for stage in ("dtok", "ctok", "discon", "prior"):  # each stage's train section, typed
        TrainConfig.from_dict({"recipe": stage, "components": {stage: stage}, "data": {},
                               **_section(sections[stage], "train")}, f"study stage {stage}")
    from discon_core.registry import resolve
    for kind in ("dtok", "ctok", "prior"):  # unknown presets: now, not after a stage trained
        if "preset" not in sections[kind]:
            raise DisconError(f"study config {config}: {kind}.preset is missing")
        resolve(kind, sections[kind]["preset"])
    if sections["ctok"].get("normalize", "stats") not in ("stats", "none"):
        raise DisconError(f"study config {config}: ctok.normalize must be 'stats' or 'none', "
                          f"got {sections['ctok']['normalize']!r}")


def _say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def _checkpoint_step(path: Path) -> int | None:
    if not path.is_file():
        return None
    from discon_core.checkpoints import load_file
    return int(load_file(path)["step"])


def _train_stage(name: str, out: Path, base: dict, train_cfg: dict, *, recipe: str,
                 components: dict, data: dict, upstream_changed: bool) -> bool:
    """Run (or reuse, or resume) one training stage; True when it trained now."""
    cfg = TrainConfig.from_dict({"seed": base.get("seed", 0), "device": base.get("device"),
                                 **train_cfg, "recipe": recipe, "components": components,
                                 "data": data, "out": str(out / name)},
                                where=f"study stage {name}")
    ckpt = out / name / LAST
    if upstream_changed and ckpt.exists():
        raise DisconError(f"stage {name} depends on a stage that changed; delete {out / name} "
                          "to retrain it on the new inputs")
    done = _checkpoint_step(ckpt)
    if done is not None and cfg.steps is not None and done >= cfg.steps:
        _say(f"{name}: reusing {ckpt} (step {done})")
        return False
    verb = "resuming at step %d" % done if done is not None else "training"
    _say(f"{name}: {verb} -> {cfg.steps} steps, batch {cfg.batch_size} ({out / name})")
    t0 = time.perf_counter()
    train(cfg, resume="auto")
    _say(f"{name}: done in {time.perf_counter() - t0:.0f} s")
    return True


def _latent_stats(cache_dir: Path, ctok_spec: dict, ctok_ckpt: Path, limit: int, seed: int,
                  device) -> Path:
    """Per-channel mean/std of posterior samples of cached moments (LightningDiT computes its
    ``latents_stats.pt`` the same way, from training latents)."""
    from discon_plugins.kl_vae import compute_latents_stats, save_latents_stats

    from discon_plugins.cache import CachedDataset
    from discon_core.registry import build
    path = cache_dir / "latents_stats.pt"
    if path.is_file():
        return path
    ds = CachedDataset(cache_dir)
    ctok = build("ctok", ctok_spec["preset"], checkpoint=ctok_ckpt, device=device)
    g = torch.Generator(device).manual_seed(seed)
    n = min(limit, len(ds))
    index = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    batches = []
    for start in range(0, n, 256):
        moments = torch.stack([ds.get(int(i))["moments"] for i in index[start:start + 256]])
        batches.append(ctok.posterior(moments.to(device)).sample(g))  # raw (unnormalized) draws
    save_latents_stats(compute_latents_stats(batches), path)
    return path


def run_study(config: str | Path, overrides: list[str] = (), *, progress: bool = True) -> Path:
    """Run the study described by ``config``; returns the path of the sample grid."""
    raw = apply_overrides(load_yaml(config), list(overrides))
    check_keys(raw, STUDY_KEYS, f"study config {config}")
    for key, t in (("seed", int), ("threads", int | None), ("out", str), ("device", str | None)):
        if key in raw:
            raw[key] = coerce(raw[key], t, key, f"study config {config}")
    if raw.get("threads") is not None:
        # tiny models are per-op-overhead bound: on busy cores one thread avoids descheduled
        # OpenMP workers (measured: 1.7 s vs 7.3 s per DisCon step on a shared 2-core machine)
        torch.set_num_threads(int(raw["threads"]))
    from discon_core.runtime import check_output_dir, resolve_device
    secs = {key: _section(raw, key) for key in ("data", "dtok", "ctok", "cache", "discon", "prior")}
    secs["sample"] = _section(raw, "sample") if raw.get("sample") is not None else {}
    _check_sections(str(config), **{k: v for k, v in secs.items() if k != "data"})
    study = {"out": Path(raw.get("out", "runs/study")), "seed": raw.get("seed", 0),
             "device": resolve_device(raw.get("device"), what="device"), "progress": progress}
    check_output_dir(study["out"], what="out")
    t_start = time.perf_counter()
    changed = _tokenizer_stages(study, secs)
    fresh_cache = _cache_stage(study, secs, tokenizers_changed=changed)
    ctok_overrides = _normalization_stage(study, secs)
    _model_stages(study, secs, ctok_overrides, fresh_cache=fresh_cache)
    grid = _sample_stage(study, secs, ctok_overrides)
    _say(f"total {time.perf_counter() - t_start:.0f} s")
    return grid


def _base(study: dict) -> dict:
    return {"seed": study["seed"], "device": str(study["device"])}


def _tokenizer_stages(study: dict, secs: dict) -> bool:
    """Stages 1-2: train dtok and ctok on images; True when either trained now."""
    changed = False
    for kind in ("dtok", "ctok"):
        sec = secs[kind]
        comp = {"tokenizer": {"kind": kind, "preset": sec["preset"],
                              "overrides": sec.get("overrides") or {}}}
        changed |= _train_stage(kind, study["out"], _base(study), _section(sec, "train"),
                                recipe="tokenizer", components=comp, data=secs["data"],
                                upstream_changed=False)
    return changed


def _cache_stage(study: dict, secs: dict, *, tokenizers_changed: bool) -> bool:
    """Stage 3: pre-tokenize the dataset with both tokenizers; True when built now."""
    from discon_plugins.cache import build_cache
    out, cache = study["out"], secs["cache"]
    cache_dir = out / "cache"
    if tokenizers_changed and (cache_dir / "manifest.json").exists():
        raise DisconError(f"a tokenizer was retrained; delete {cache_dir} (and the stages after "
                          "it) to rebuild the cache with the new weights")
    if (cache_dir / "manifest.json").is_file() and read_json(
            cache_dir / "manifest.json", "cache manifest").get("complete"):
        _say(f"cache: reusing {cache_dir}")
        return False
    _say(f"cache: pre-tokenizing {secs['data']} -> {cache_dir}")
    t0 = time.perf_counter()
    build_cache(secs["data"], cache_dir, dtok=secs["dtok"]["preset"],
                ctok=secs["ctok"]["preset"], dtok_checkpoint=str(out / "dtok" / LAST),
                ctok_checkpoint=str(out / "ctok" / LAST),
                shard_size=int(cache.get("shard_size", 5000)),
                batch_size=int(cache.get("batch_size", 128)), device=str(study["device"]),
                progress=study["progress"])
    _say(f"cache: done in {time.perf_counter() - t0:.0f} s")
    return True


def _normalization_stage(study: dict, secs: dict) -> dict[str, Any]:
    """The ctok's latent normalization (``latents_stats.pt`` from the cache) as overrides."""
    ctok = secs["ctok"]
    if ctok.get("normalize", "stats") in (None, "none"):
        return {}
    stats = _latent_stats(study["out"] / "cache", ctok, study["out"] / "ctok" / LAST,
                          int(ctok.get("stats_items", 10000)), study["seed"], study["device"])
    return {"latents_stats": str(stats)}


def _model_stages(study: dict, secs: dict, ctok_overrides: dict, *, fresh_cache: bool) -> None:
    """Stages 4-5: DisCon backbone+head, and the prior, on the cache."""
    out, discon, prior, dtok = study["out"], secs["discon"], secs["prior"], secs["dtok"]
    data_cache = {"cache": str(out / "cache")}
    ctok_comp = {"preset": secs["ctok"]["preset"], "overrides": ctok_overrides}
    _train_stage("discon", out, _base(study), _section(discon, "train"), recipe="discon",
                 components={"backbone": discon["backbone"], "head": discon["head"],
                             "dtok": dtok["preset"], "ctok": ctok_comp},
                 data=data_cache, upstream_changed=fresh_cache and
                 (out / "discon" / LAST).exists())
    _train_stage("prior", out, _base(study), _section(prior, "train"), recipe="prior",
                 components={"prior": {"preset": prior["preset"],
                                       "overrides": prior.get("overrides") or {}},
                             "dtok": dtok["preset"]},
                 data=data_cache, upstream_changed=fresh_cache and
                 (out / "prior" / LAST).exists())


def study_pipeline(out: Path, secs: Mapping, ctok_overrides: dict, device="cpu", *,
                   discon_checkpoint: Path | None = None):
    """The study's trained pipeline from its stage folders (``secs``: the config's sections;
    ``discon_checkpoint``: another file of backbone + head weights than the stage's last)."""
    from discon_core.pipeline import Pipeline
    from discon_core.registry import build
    prior, discon_ckpt = secs["prior"], discon_checkpoint or out / "discon" / LAST
    trained = {kind: component_spec(secs["discon"][kind], kind) for kind in ("backbone", "head")}
    return Pipeline(
        prior=build("prior", prior["preset"], checkpoint=out / "prior" / LAST, device=device,
                    **(prior.get("overrides") or {})),
        dtok=build("dtok", secs["dtok"]["preset"], checkpoint=out / "dtok" / LAST,
                   device=device),
        **{kind: build(kind, s["preset"], checkpoint=discon_ckpt, device=device,
                       **s["overrides"]) for kind, s in trained.items()},
        ctok=build("ctok", secs["ctok"]["preset"], checkpoint=out / "ctok" / LAST,
                   device=device, **ctok_overrides))


def sampling_options(sample: Mapping) -> dict[str, Any]:
    """The ``Pipeline.generate`` settings a config's ``sample`` section sets (the rest default
    to the presets')."""
    return {k: sample[k] for k in ("ar_steps", "prior_cfg", "prior_temperature", "cfg_scale",
                                   "temperature") if sample.get(k) is not None}


def _sample_stage(study: dict, secs: dict, ctok_overrides: dict) -> Path:
    """Stage 6: a grid, one column per class, and the same ids through the dtok's decoder."""
    from discon_core.images import save_grid
    out, device, sample = study["out"], study["device"], secs["sample"]
    _say("sample: prior -> backbone+head -> decoder")
    pipe = study_pipeline(out, secs, ctok_overrides, device)
    num_classes = pipe.prior.num_classes
    labels = torch.arange(num_classes).repeat(int(sample.get("rows", 4)))
    g = torch.Generator(device).manual_seed(int(sample.get("seed", study["seed"])))
    kwargs = sampling_options(sample)
    images, tokens, _ = pipe.generate(labels.to(device), generator=g, progress=False,
                                      return_tokens=True, **kwargs)
    grid = save_grid(images, out / "samples.png", nrow=num_classes, upscale=2)
    # the same discrete ids decoded by the discrete tokenizer alone, for comparison
    save_grid(pipe.dtok.decode(tokens), out / "samples_dtok.png", nrow=num_classes, upscale=2)
    _say(f"wrote {grid} (DisCon) and {out / 'samples_dtok.png'} (same ids, VQ decoder)")
    return grid


def _cmd_study(args) -> int:
    from discon_core.cli import config_overrides
    stages = ("dtok", "ctok", "discon", "prior")
    quiet = [f"{stage}.train.progress=false" for stage in stages if args.no_progress]
    threads = [f"threads={args.threads}"] if args.threads is not None else []  # the config's key
    overrides = config_overrides(args, [f"{stage}.train.precision" for stage in stages])
    grid = run_study(args.config, overrides + quiet + threads, progress=not args.no_progress)
    print(f"samples: {grid}")
    return 0


@hookimpl
def discon_register_commands(subparsers) -> None:
    from discon_core.cli import add_config_options
    p = subparsers.add_parser("study", help="CPU-scale study: train tiny tokenizers -> cache -> "
                                            "train DisCon + prior -> sample a grid (finished "
                                            "stages reused)")
    p.add_argument("config", help="study config (YAML), e.g. configs/fmnist_cpu.yaml")
    add_config_options(p, "discon.train.steps=3000")
    p.set_defaults(func=_cmd_study)
