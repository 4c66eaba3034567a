"""The ``discon`` command line: thin sub-commands that parse, call the library, report.

Errors from bad input (DisconError) print one line and exit 1; ``--debug`` shows tracebacks.
Each sub-command is a pair: ``_add_<name>(subparsers)`` declares it, ``_cmd_<name>(args)`` runs it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import yaml

from .errors import DisconError
from .hooks import hookimpl
from .interfaces import KINDS
from .runtime import DEVICES, check_output_dir, output_dir, resolve_device  # noqa: F401

MAX_RUN_IMAGES = 50_000  # an FID-50k set; run keeps every image in memory
_PROCESS_START = time.time()  # fallback of _since_start where /proc is absent


def add_device_option(p, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, metavar="DEVICE",
                   help=f"{DEVICES} (auto: cuda if available, else cpu)")


def add_dtype_option(p) -> None:
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights and compute dtype (default fp32; bf16 is ~4x faster on CPUs "
                        "with AVX-512 BF16 and on GPUs)")


def _add_plugins(sub) -> None:
    p = sub.add_parser("plugins", help="list component kinds, names and the plugin providing each")
    p.add_argument("--kind", choices=list(KINDS), help="only this kind")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)


def _cmd_plugins(args) -> int:
    from .registry import list_components

    table = list_components(args.kind)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    for kind, rows in table.items():
        print(f"{kind}  ({KINDS[kind]})")
        for row in rows:
            print(f"  {row['name']:<20} {row['plugin']:<28} {row['description']}")
    return 0


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="print the resolved preset of KIND NAME as YAML")
    p.add_argument("kind", choices=list(KINDS))
    p.add_argument("name")
    p.set_defaults(func=_cmd_show)


def _cmd_show(args) -> int:
    from .registry import resolve

    print(yaml.safe_dump(resolve(args.kind, args.name).as_dict(), sort_keys=False), end="")
    return 0


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
    p.add_argument("--dtok-checkpoint", help="its weights: a path, 'pretrained' or 'none'")
    p.add_argument("--ctok", required=True, help="continuous tokenizer preset")
    p.add_argument("--ctok-checkpoint", help="its weights: a path, 'pretrained' or 'none'")
    p.add_argument("--out", required=True, help="cache folder (rerun to resume)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    add_device_option(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_cache)


def _cmd_cache(args) -> int:
    from .cache import build_cache

    data = {"type": args.data}
    for key, value in (("root", args.data_root), ("split", args.split), ("limit", args.limit),
                       ("image_size", args.image_size)):
        if value is not None:
            data[key] = value
    resolve_device(args.device)
    ckpts = {k: None if v is not None and v.lower() == "none" else v  # 'none': random init, as run
             for k, v in (("dtok", args.dtok_checkpoint), ("ctok", args.ctok_checkpoint))}
    with output_dir(args.out):
        path = build_cache(data, args.out, dtok=args.dtok, ctok=args.ctok,
                           dtok_checkpoint=ckpts["dtok"], ctok_checkpoint=ckpts["ctok"],
                           shard_size=args.shard_size, batch_size=args.batch_size,
                           device=args.device, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"cache manifest: {path}")
    return 0


def _add_config_options(p, example: str) -> None:
    """Options shared by the config-driven sub-commands (train; plugins' e.g. study)."""
    p.add_argument("--out", help="output folder (overrides the config's out)")
    add_device_option(p, default=None)  # None: the config's device
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key (dotted, YAML value), e.g. --set {example}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config_overrides(args) -> list[str]:
    if args.device is not None:
        resolve_device(args.device)  # fail before the config loads anything
    named = (("out", args.out), ("device", args.device), ("seed", args.seed))
    # JSON-quoted: YAML reads it back as the same string (an --out named 123 stays a string)
    return list(args.set) + [f"{key}={json.dumps(value)}" for key, value in named
                             if value is not None]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train backbone+head, a prior or a tokenizer from a YAML "
                                     "config (single process or under torchrun)")
    p.add_argument("config", help="training config (YAML, see configs/)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue exactly from CHECKPOINT (default: OUT/checkpoint-last.pth)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUT that holds a run (replaces its checkpoint and log)")
    _add_config_options(p, "steps=200")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .train import TrainConfig, train

    if args.resume and args.overwrite:
        raise DisconError("--resume and --overwrite exclude each other")
    extra = ["progress=false"] if args.no_progress else []
    path = train(TrainConfig.load(args.config, _config_overrides(args) + extra), resume=args.resume,
                 overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {path}")
    return 0


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
    p.add_argument("--seed", type=int, default=0)
    add_device_option(p)
    add_dtype_option(p)
    p.add_argument("--no-progress", action="store_true")


# The embedded default (Fashion-MNIST, weights inside the package; docs/default_model.md):
# what `discon run` / `discon sample` use when no component is named.
DEFAULT_PIPELINE = {"prior": "fmnist", "dtok": "fmnist", "backbone": "fmnist", "head": "fmnist",
                    "ctok": "fmnist"}


def _pipeline_names(args) -> tuple[dict, dict]:
    """(kind -> preset name or None, kind -> checkpoint) from the shared options."""
    names = {k: getattr(args, k) for k in KINDS_IN_PIPELINE}
    if not any(names.values()):
        names = dict(DEFAULT_PIPELINE)
    if args.prior and names["backbone"] is None and args.ctok:
        names["backbone"] = "discon-l"
    if args.prior and names["backbone"] is None and names["dtok"] is None:
        names["dtok"] = "maskgit-vq"
    ckpts = {}
    for kind in KINDS_IN_PIPELINE:
        value = getattr(args, f"{kind}_checkpoint")
        if value is not None:
            ckpts[kind] = None if value.lower() == "none" else value
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
    from .errors import close_matches
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
    import torch

    from .images import save_grid, save_images
    from .pipeline import Pipeline
    from .registry import parse_dtype

    if args.num is not None:
        _check_batching(args, MAX_RUN_IMAGES)
    sweep = _parse_steps_sweep(args.ar_steps_sweep)
    device = resolve_device(args.device)
    with output_dir(args.out):  # checked before any weights load; removed if nothing is written
        names, ckpts = _pipeline_names(args)
        pipe = Pipeline.from_names(**names, checkpoints=ckpts, device=device,
                                   dtype=parse_dtype(args.dtype, "--dtype"))
        if args.compare_discrete and (pipe.dtok is None or pipe.backbone is None):
            raise DisconError("--compare-discrete needs a DisCon pipeline (a prior, a dtok and a "
                              "backbone): name --dtok too")
        if sweep and (pipe.prior is None or pipe.backbone is None):
            raise DisconError("--ar-steps-sweep needs a DisCon pipeline (a prior and a backbone)")
        lead = pipe.prior if pipe.prior is not None else pipe.backbone
        num_classes = lead.num_classes if pipe.prior is not None else lead.class_num
        from .data import class_names
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
        grid = save_grid(images, f"{args.out}/grid.png", nrow=nrow, upscale=_upscale(images))
        save_images(images, args.out)
        wrote = [str(grid)]
        if args.compare_discrete:
            discrete = torch.cat([pipe.dtok.decode(t.to(device)).cpu() for t in tokens])
            wrote.append(str(save_grid(discrete, f"{args.out}/grid_discrete.png", nrow=nrow,
                                       upscale=_upscale(images))))
        if sweep:
            rows, t = [], tokens[0][:nrow or 8]  # the first row's tokens, completed in k steps
            for k in sweep:
                g = torch.Generator(device=device).manual_seed(args.seed)
                rows.append(pipe.generate(labels[:len(t)], discrete=t, ar_steps=k, generator=g,
                                          cfg_scale=args.cfg_scale, temperature=args.temperature,
                                          head_steps=args.head_steps, progress=False).cpu())
            wrote.append(str(save_grid(torch.cat(rows), f"{args.out}/grid_ar_steps.png",
                                       nrow=len(rows[0]), upscale=_upscale(images))))
        named = [classes[i] if i < len(classes) else str(i) for i in labels.tolist()]
        print(f"{pipe.mode}: {args.num} images in {elapsed:.2f} s = "
              f"{elapsed / args.num:.3f} sec/img on {device} ({_since_start():.1f} s since the "
              f"process started); labels {', '.join(named)}")
        print(f"wrote {', '.join(wrote)} and {args.num} PNGs in {args.out}"
              + (f" (AR steps per row: {sweep})" if sweep else ""))
    return 0


def _upscale(images) -> int:
    """Small images (Fashion-MNIST's 32 px) are enlarged in grids so they can be seen."""
    return max(1, 128 // images.shape[-1])


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


def _cmd_sample(args) -> int:
    import torch

    from .checkpoints import sha256_of
    from .pipeline import Pipeline
    from .registry import parse_dtype
    from .samples import write_samples

    _check_batching(args, 10_000_000)
    device = resolve_device(args.device)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    with output_dir(args.out):
        names, ckpts = _pipeline_names(args)
        pipe = Pipeline.from_names(**names, checkpoints=ckpts, device=device,
                                   dtype=parse_dtype(args.dtype, "--dtype"))
        files = {}
        for kind, module in ((k, getattr(pipe, k)) for k in KINDS_IN_PIPELINE):
            if module is not None:
                path = ckpts.get(kind, ckpts.get("backbone") if kind == "head" else "pretrained")
                files[kind] = ({"file": str(path), "sha256": sha256_of(path)}
                               if path not in (None, "pretrained") else path)
        config = {"mode": pipe.mode, "presets": {k: v for k, v in names.items() if v},
                  "checkpoints": files, "ar_steps": args.ar_steps, "head_steps": args.head_steps,
                  "prior_cfg": args.prior_cfg, "prior_temperature": args.prior_temperature,
                  "cfg_scale": args.cfg_scale, "temperature": args.temperature, "dtype": args.dtype, "device": str(device)}
        num_classes = (pipe.prior.num_classes if pipe.prior is not None
                       else pipe.backbone.class_num)
        path = write_samples(_generate_fn(pipe, args), args.out, num=args.num,
                             num_classes=num_classes, batch_size=args.batch_size,
                             seed=args.seed, config=config, device=device, rank=rank,
                             world=world, progress=not args.no_progress)
    if rank == 0:
        print(f"wrote {args.num} images: {path} (+ PNGs in {args.out}/images, sample.json)")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="FID, KID, IS, precision/recall, class accuracy of images against a "
                     "reference (or rFID + PSNR of a tokenizer with --reconstruct)")
    p.add_argument("generated", nargs="?", help="folder of images, discon sample folder, .npz "
                                                "(arr_0) or statistics .npz (mu, sigma)")
    p.add_argument("--ref", required=True, help="the same kinds, DATASET:SPLIT (e.g. "
                                                "fashion-mnist:test) or folder:PATH")
    p.add_argument("--extractor", default="fmnist", help="inception | fmnist (default fmnist)")
    p.add_argument("--metrics", default=None, help="comma-separated: fid,kid,isc,prc "
                                                   "(default: all the inputs allow)")
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
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
    add_device_option(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from . import metrics
    from .registry import build

    names = metrics.parse_metrics(args.metrics)
    device = resolve_device(args.device)
    if args.json:
        check_output_dir(os.path.dirname(os.path.abspath(args.json)), what="--json folder")
    extractor = metrics.get_extractor(args.extractor, device)
    ref = metrics.load_input(args.ref)
    psnr = None
    if args.reconstruct:
        if args.generated or (args.dtok is None) == (args.ctok is None):
            raise DisconError("--reconstruct scores one tokenizer: give --dtok or --ctok (and no "
                              "GENERATED argument)")
        kind = "dtok" if args.dtok else "ctok"
        extra = ({"latents_stats": args.ctok_latents_stats}
                 if kind == "ctok" and args.ctok_latents_stats else {})
        ckpt = getattr(args, f"{kind}_checkpoint")
        tok = build(kind, getattr(args, kind), checkpoint=None if ckpt == "none" else ckpt,
                    device=device, **extra)
        if args.grid:
            check_output_dir(os.path.dirname(os.path.abspath(args.grid)), what="--grid folder")
        gen, psnr = metrics.reconstruct(tok, ref, device=device, batch_size=args.batch_size,
                                        progress=not args.no_progress)
        if args.grid:
            import torch

            from .images import save_grid
            pair = torch.stack([ref.images[i] for i in range(10)] +
                               [gen.images[i] for i in range(10)]).float() / 255
            print(f"wrote {save_grid(pair, args.grid, nrow=10, upscale=_upscale(pair))}")
    elif args.grid:
        raise DisconError("--grid shows reconstructions: use it with --reconstruct")
    elif args.generated is None:
        raise DisconError("give GENERATED (images to score) or --reconstruct with --dtok/--ctok")
    else:
        gen = metrics.load_input(args.generated)
    out = metrics.compute(gen, ref, extractor, names, device=device, batch_size=args.batch_size,
                          kid_subset_size=args.kid_subset_size, progress=not args.no_progress)
    if psnr is not None:
        out["psnr"] = psnr
    for key in ("fid", "kid", "isc", "precision", "recall", "class_accuracy", "psnr"):
        if key in out:
            print(f"{key:<16}{out[key]:.4f}")
    print(f"{'N':<16}{out['N']} generated vs {out['N_ref']} reference ({out['extractor']})")
    if args.json:
        from .checkpoints import atomic_path
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(out, indent=2, default=str))
    return 0


@hookimpl
def discon_register_commands(subparsers) -> None:
    """The built-in sub-commands, in --help order (plugins add theirs through the same hook)."""
    for add in (_add_plugins, _add_show, _add_cache, _add_train, _add_run,
                _add_sample, _add_eval):
        add(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="discon",
        description="DisCon: discrete-conditioned continuous autoregressive image generation.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"discon {__version__}")
    parser.add_argument("--registry", metavar="PATH",
                        help="user registry.yaml overlaid on the built-in one "
                             "(default: $DISCON_REGISTRY)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import hooks
    hooks.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.registry:
            from .registry import set_user_registry
            set_user_registry(args.registry)
        return int(args.func(args) or 0)
    except DisconError as e:
        if args.debug:
            raise
        print(f"discon: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("discon: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
