"""Generation commands, a built-in plugin: ``discon run`` (pictures: a grid and one PNG per
image, with the paper's Figure 2 and 5 comparisons) and ``discon sample`` (class-balanced
evaluation sets), over any pipeline ``Pipeline.from_names`` can build. Without named components
both use the embedded default (``discon_plugins/default_model.py``).

``discon sample``:

    discon sample --prior rar-b --dtok maskgit-vq --num 50000 --out samples/rar-b
    torchrun --nproc_per_node 8 -m discon_core.cli sample ... --out samples/x   # sharded

``OUT/`` receives one PNG per image (``images/img_000123.png``), ``samples.npz`` in ADM's layout
(``arr_0`` uint8 [N,H,W,3], ``arr_1`` int64 labels; what MAR's and RAR's evaluations read) and
``sample.json``, the complete sampling configuration (presets; ``checkpoints``: each component's
preset and weights, {file, sha256, revision, source} for released weights, {file, sha256} for a
local file, null for random init; steps, guidance, temperatures, seed, dtype, device) and
``hardware`` (``precision.hardware_record``: what the last run on the folder ran on; a resume on
other hardware is allowed).

Labels are class-balanced (image ``i`` has class ``i % num_classes``, so N / num_classes per class
when N is a multiple). Batch ``k`` covers images ``[k*B, (k+1)*B)`` and draws from its own
generator seeded by ``(seed, k)``, so the result does not depend on how the batches were split
over processes or interrupted: a rerun skips the finished batches (``parts/batch-*.npz``, each
written atomically) and continues; rank ``r`` of ``W`` takes batches ``r, r+W, ...``.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from discon_core import cli, hooks
from discon_core.checkpoints import save_atomic
from discon_core.errors import DisconError, close_matches
from discon_core.hooks import hookimpl
from discon_core.images import to_uint8
from discon_core.runtime import output_dir, resolve_device

MAX_RUN_IMAGES = 50_000  # an FID-50k set; run keeps every image in memory
_PROCESS_START = time.time()  # fallback of _since_start where /proc is absent


KINDS_IN_PIPELINE = ("prior", "dtok", "backbone", "head", "ctok")


def _add_pipeline_options(p) -> None:
    """The pipeline options `discon run` and `discon sample` share."""
    p.add_argument("--prior", help="discrete prior preset, e.g. rar-xxl")
    p.add_argument("--dtok", help="discrete tokenizer preset (default maskgit-vq with a prior "
                                  "and no backbone)")
    p.add_argument("--backbone", help="backbone preset (default discon-l with a prior and --ctok)")
    p.add_argument("--head", help="head preset (default: the backbone's name)")
    p.add_argument("--ctok", help="continuous tokenizer preset, e.g. va-vae")
    for kind in KINDS_IN_PIPELINE:
        p.add_argument(f"--{kind}-checkpoint", default=None, metavar="PATH",
                       help="weights: a path, 'pretrained' (released weights; the default) or "
                            "'none' (random init)" + (" (default: the backbone's file)"
                                                      if kind == "head" else ""))
    p.add_argument("--ar-steps", type=int, default=None,
                   help="continuous-stage AR steps (default: the backbone preset's)")
    p.add_argument("--head-steps", default=None, help="head sampling steps (default: preset)")
    p.add_argument("--prior-cfg", type=float, default=None, help="prior guidance (default: preset)")
    p.add_argument("--prior-temperature", type=float, default=None,
                   help="prior temperature (default: preset)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="continuous-stage CFG (default: the backbone preset's; 1 = off)")
    p.add_argument("--temperature", type=float, default=None,
                   help="continuous-stage (head) temperature (default: the backbone preset's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(seed=0)  # --device, --dtype, --seed: the common flags (docs/cli.md)


def _pipeline_names(args) -> tuple[dict, dict]:
    """(kind -> preset name or None, kind -> checkpoint) from the shared options."""
    names = {k: getattr(args, k) for k in KINDS_IN_PIPELINE}
    if not any(names.values()):  # the embedded default (docs/default_model.md), by its hook
        names = hooks.default_pipeline()
    if args.prior and names["backbone"] is None and args.ctok:
        names["backbone"] = "discon-l"
    if args.prior and names["backbone"] is None and names["dtok"] is None:
        names["dtok"] = "maskgit-vq"
    ckpts = {kind: cli.checkpoint_arg(getattr(args, f"{kind}_checkpoint"))
             for kind in KINDS_IN_PIPELINE if getattr(args, f"{kind}_checkpoint") is not None}
    return names, ckpts


def _generate_fn(pipe, args):
    """labels, generator -> images, with the shared sampling options."""
    def generate(labels, generator, return_tokens=False):
        return pipe.generate(labels, ar_steps=args.ar_steps, prior_cfg=args.prior_cfg,
                             prior_temperature=args.prior_temperature,
                             cfg_scale=args.cfg_scale, temperature=args.temperature,
                             head_steps=args.head_steps, generator=generator,
                             progress=False, return_tokens=return_tokens)
    return generate


def _check_batching(args, limit: int) -> None:
    if not 1 <= args.num <= limit:
        raise DisconError(f"--num must be in [1, {limit}], got {args.num}")
    if args.batch_size < 1:
        raise DisconError(f"--batch-size must be >= 1, got {args.batch_size}")


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="generate images: prior -> discrete grid -> backbone + head -> ctok decode",
        description="Sample class-conditional images. With --prior and a discon-* backbone: "
                    "DisCon; with --prior and --dtok only: the discrete pipeline (RAR + MaskGIT); "
                    "with a backbone and --ctok but no prior: MAR.")
    _add_pipeline_options(p)
    p.add_argument("--num", type=int, default=None,
                   help="number of images (default: two per class up to 16 classes, else 8)")
    p.add_argument("--labels", default=None,
                   help="comma-separated class ids or names (e.g. sneaker,bag), cycled to --num "
                        "(default: classes in turn, or random ones for more than 16 classes)")
    p.add_argument("--out", default="samples", help="output folder (grid.png + one PNG per image)")
    p.add_argument("--compare-discrete", action="store_true",
                   help="also write grid_discrete.png: the same prior tokens decoded by the dtok "
                        "(the paper's Figure 2)")
    p.add_argument("--ar-steps-sweep", default=None, metavar="K1,K2,...",
                   help="also write grid_ar_steps.png: the same prior tokens completed with each "
                        "number of AR steps, one row per value (the paper's Figure 5)")
    p.set_defaults(func=_cmd_run)


def _class_key(name: str) -> str:
    return name.strip().lower().replace(" ", "-")


def parse_labels(text: str, classes: list[str], num_classes: int) -> list[int]:
    """``--labels``: comma-separated class ids or class names (case-insensitive, spaces as
    hyphens: ``ankle-boot``; a name before a slash alone: ``t-shirt`` for ``T-shirt/top``)."""
    by_name = {_class_key(c): i for i, c in enumerate(classes)}
    by_name.update({k.split("/")[0]: i for k, i in list(by_name.items()) if "/" in k})
    ids = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if item.lstrip("-").isdigit():
            ids.append(int(item))
        elif _class_key(item) in by_name:
            ids.append(by_name[_class_key(item)])
        else:
            known = f"; classes: {', '.join(classes)}" if classes else (
                "; this pipeline's presets name no classes, use class ids")
            raise DisconError(f"--labels: unknown class {item!r}"
                              f"{close_matches(_class_key(item), list(by_name))}{known}")
    if not ids:
        raise DisconError("--labels is empty")
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise DisconError(f"--labels: class ids {bad} are outside [0, {num_classes}) of this "
                          "pipeline")
    return ids


def _parse_steps_sweep(text: str | None) -> list[int]:
    if text is None:
        return []
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DisconError(f"--ar-steps-sweep must be comma-separated integers, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise DisconError(f"--ar-steps-sweep needs integers >= 1, got {text!r}")
    return steps


def _cmd_run(args) -> int:
    from discon_core.data import class_names
    from discon_core.images import save_grid, save_images
    from discon_core.pipeline import Pipeline
    from discon_core.precision import resolve_dtype

    if args.num is not None:
        _check_batching(args, MAX_RUN_IMAGES)
    sweep = _parse_steps_sweep(args.ar_steps_sweep)
    device = resolve_device(args.device)
    with output_dir(args.out):  # checked before any weights load; removed if nothing is written
        names, ckpts = _pipeline_names(args)
        pipe = Pipeline.from_names(**names, checkpoints=ckpts, device=device,
                                   dtype=resolve_dtype(args.dtype, device, "--dtype"))
        if args.compare_discrete and (pipe.dtok is None or pipe.backbone is None):
            raise DisconError("--compare-discrete needs a DisCon pipeline (a prior, a dtok and a "
                              "backbone): name --dtok too")
        if sweep and (pipe.prior is None or pipe.backbone is None):
            raise DisconError("--ar-steps-sweep needs a DisCon pipeline (a prior and a backbone)")
        lead = pipe.prior if pipe.prior is not None else pipe.backbone  # names the classes
        num_classes = pipe.num_classes
        classes = class_names(getattr(getattr(lead, "discon_preset", None), "classes", None))
        args.num = args.num or (2 * num_classes if num_classes <= 16 else 8)
        _check_batching(args, MAX_RUN_IMAGES)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        if args.labels is not None:
            ids = parse_labels(args.labels, classes, num_classes)
            labels = torch.tensor([ids[i % len(ids)] for i in range(args.num)])
        elif num_classes <= 16:
            labels = torch.arange(args.num) % num_classes
        else:
            labels = torch.randint(0, num_classes, (args.num,),
                                   generator=torch.Generator().manual_seed(args.seed))
        generate = _generate_fn(pipe, args)
        images, tokens, start = [], [], time.perf_counter()
        for i in range(0, args.num, args.batch_size):
            out = generate(labels[i:i + args.batch_size], generator, return_tokens=True)
            images.append(out[0].cpu())
            tokens.append(out[1])
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        images = torch.cat(images)
        nrow = num_classes if args.labels is None and args.num % num_classes == 0 else None
        grid = save_grid(images, f"{args.out}/grid.png", nrow=nrow)
        save_images(images, args.out)
        wrote = [str(grid)]
        if args.compare_discrete:
            discrete = torch.cat([pipe.dtok.decode(t.to(device)).cpu() for t in tokens])
            wrote.append(str(save_grid(discrete, f"{args.out}/grid_discrete.png", nrow=nrow)))
        if sweep:
            rows, t = [], tokens[0][:nrow or 8]  # the first row's tokens, completed in k steps
            for k in sweep:
                g = torch.Generator(device=device).manual_seed(args.seed)
                rows.append(pipe.generate(labels[:len(t)], discrete=t, ar_steps=k, generator=g,
                                          cfg_scale=args.cfg_scale, temperature=args.temperature,
                                          head_steps=args.head_steps, progress=False).cpu())
            wrote.append(str(save_grid(torch.cat(rows), f"{args.out}/grid_ar_steps.png",
                                       nrow=len(rows[0]))))
        named = [classes[i] if i < len(classes) else str(i) for i in labels.tolist()]
        print(f"{pipe.mode}: {args.num} images in {elapsed:.2f} s = "
              f"{elapsed / args.num:.3f} sec/img on {device} ({_since_start():.1f} s since the "
              f"process started); labels {', '.join(named)}")
        print(f"wrote {', '.join(wrote)} and {args.num} PNGs in {args.out}"
              + (f" (AR steps per row: {sweep})" if sweep else ""))
    return 0


def _since_start() -> float:
    """Seconds since this process started (Linux: from /proc, Python start-up included)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _PROCESS_START


def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate N class-balanced images for evaluation (PNGs + ADM .npz + "
                       "sample.json; resumable, torchrun-sharded)")
    _add_pipeline_options(p)
    p.add_argument("--num", type=int, required=True, help="number of images (e.g. 50000)")
    p.add_argument("--out", required=True, help="output folder (rerun the command to resume)")
    p.set_defaults(func=_cmd_sample)


def weights_record(pipe) -> dict[str, dict]:
    """kind -> {preset, weights}: the preset's name and where the weights came from
    (``checkpoints.provenance``: {file, sha256, revision, source} for released weights, {file,
    sha256} for a local checkpoint, None for random init)."""
    from discon_core.checkpoints import provenance
    modules = {k: getattr(pipe, k) for k in KINDS_IN_PIPELINE if getattr(pipe, k) is not None}
    return {k: {"preset": getattr(getattr(m, "discon_preset", None), "name", None),
                "weights": provenance(getattr(m, "discon_checkpoint", None))}
            for k, m in modules.items()}


def _cmd_sample(args) -> int:
    from discon_core.distributed import setup_distributed
    from discon_core.pipeline import Pipeline
    from discon_core.precision import hardware_record, resolve_dtype

    _check_batching(args, 10_000_000)
    rank, world, device = setup_distributed(args.device)  # under torchrun: one device per rank
    with output_dir(args.out):
        names, ckpts = _pipeline_names(args)
        dtype = resolve_dtype(args.dtype, device, "--dtype")
        pipe = Pipeline.from_names(**names, checkpoints=ckpts, device=device, dtype=dtype)
        config = {"mode": pipe.mode, "presets": {k: v for k, v in names.items() if v},
                  "checkpoints": weights_record(pipe), "ar_steps": args.ar_steps,
                  "head_steps": args.head_steps, "prior_cfg": args.prior_cfg,
                  "prior_temperature": args.prior_temperature,
                  "cfg_scale": args.cfg_scale, "temperature": args.temperature,
                  "dtype": args.dtype, "device": str(device),
                  "hardware": hardware_record(device, dtype)}
        path = write_samples(_generate_fn(pipe, args), args.out, num=args.num,
                             num_classes=pipe.num_classes, batch_size=args.batch_size,
                             seed=args.seed, config=config, device=device, rank=rank,
                             world=world, progress=not args.no_progress)
    if rank == 0:
        print(f"wrote {args.num} images: {path} (+ PNGs in {args.out}/images, sample.json)")
    return 0


# ------------------------------------------------------------------------------------------------
# Evaluation sets (discon sample)

# seeds of batch k: independent streams for (seed, k) without collisions for k < 1e6
SEED_STRIDE = 1_000_003


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """int64 [num]: image i has class i % num_classes."""
    if num < num_classes:
        raise DisconError(f"--num {num} is smaller than the {num_classes} classes: a class-"
                          "balanced set needs at least one image per class")
    return torch.arange(num) % num_classes


def _batch_seed(seed: int, k: int) -> int:
    return seed * SEED_STRIDE + k


def write_samples(generate: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                  out: str | os.PathLike, *, num: int, num_classes: int, batch_size: int,
                  seed: int, config: Mapping[str, Any], device: torch.device | str = "cpu",
                  rank: int = 0, world: int = 1, progress: bool = True) -> Path:
    """Generate ``num`` images with ``generate(labels, generator) -> [B,3,H,W] in [0,1]`` into
    ``out``; returns the path of ``samples.npz`` (written by rank 0 once every batch exists).

    ``config`` is recorded in ``sample.json``; a rerun with a different ``config``, ``num``,
    ``batch_size`` or ``seed`` into the same folder is refused, naming the difference."""
    from PIL import Image
    from tqdm.auto import tqdm

    out = Path(out)
    parts = out / "parts"
    labels = balanced_labels(num, num_classes)
    info = {"num": num, "num_classes": num_classes, "batch_size": batch_size, "seed": seed,
            **config}
    meta = out / "sample.json"
    if meta.is_file():
        try:
            old = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DisconError(f"{meta} is not valid JSON; delete {out} to sample afresh") from None
        diff = sorted(k for k in set(old) | set(info)
                      if k not in ("complete", "labels", "hardware")  # a resume may move
                      and old.get(k) != info.get(k))
        if diff:
            raise DisconError(f"{out} holds samples made with other settings ({', '.join(diff)}: "
                              f"{ {k: old.get(k) for k in diff} } there, "
                              f"{ {k: info.get(k) for k in diff} } now); use another --out")
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
        (out / "images").mkdir(exist_ok=True)
        meta.write_text(json.dumps({**info, "complete": False}, indent=2))
    batches = range(rank, -(-num // batch_size), world)
    todo = [k for k in batches if not (parts / f"batch-{k:06d}.npz").is_file()]
    bar = tqdm(total=len(batches), initial=len(batches) - len(todo), unit="batch",
               desc="sample", disable=not progress or rank != 0)
    for k in todo:
        lab = labels[k * batch_size:(k + 1) * batch_size]
        g = torch.Generator(device).manual_seed(_batch_seed(seed, k))
        images = generate(lab.to(device), g).float()
        if images.shape[0] != len(lab) or not torch.isfinite(images).all():
            raise DisconError(f"batch {k}: the pipeline returned {list(images.shape)} images "
                              "(non-finite values or a wrong count)")
        arr = to_uint8(images)
        for i, a in enumerate(arr):
            Image.fromarray(a).save(out / "images" / f"img_{k * batch_size + i:06d}.png")
        save_atomic({"arr_0": arr, "arr_1": lab.numpy()}, parts / f"batch-{k:06d}.npz")
        bar.update(1)
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    final = out / "samples.npz"
    if rank == 0:
        arrays = [np.load(parts / f"batch-{k:06d}.npz") for k in range(-(-num // batch_size))]
        save_atomic({"arr_0": np.concatenate([a["arr_0"] for a in arrays]),
                     "arr_1": np.concatenate([a["arr_1"] for a in arrays])}, final)
        meta.write_text(json.dumps({**info, "complete": True}, indent=2))
    return final


@hookimpl
def discon_register_commands(subparsers) -> None:
    _add_run(subparsers)
    _add_sample(subparsers)
