"""``discon export``: a ``discon train`` checkpoint -> a pipeline folder (docs/pretrained.md).

    discon export runs/discon_m/checkpoint-last.pth --out exported/discon-m \\
        --prior fmnist --dtok fmnist --ctok fmnist [--push-to-hub ORG/NAME]

The folder gets the checkpoint's EMA weights (safetensors), ``presets.yaml`` (the presets and
parameters the training used, the sampling settings, sha256 of every file) and a generated model
card; ``Pipeline.from_pretrained(DIR)``, ``discon run --pretrained DIR`` and ``discon demo
--model DIR`` load it. ``--prior/--dtok/--ctok NAME`` add the other stages by registry name
(their released weights), so that the folder is a whole pipeline.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from discon_core.config import one_line
from discon_core.errors import DisconError
from discon_core.hooks import hookimpl

# recipe -> the components its checkpoint holds (kind in the pipeline, key of cfg.components)
TRAINED = {"discon": (("backbone", "backbone"), ("head", "head")), "prior": (("prior", "prior"),),
           "tokenizer": ()}  # a tokenizer's kind is components.tokenizer.kind


def components_of(path: Path) -> tuple[dict, dict]:
    """(kind -> module with the EMA weights, training metadata) of a ``discon train`` file."""
    from discon_core.checkpoints import load_file
    from discon_core.recipes import component_spec
    from discon_core.registry import build

    ck = load_file(path)
    if not isinstance(ck, dict) or not {"config", "model_ema"} <= set(ck):
        raise DisconError(f"{path} is not a `discon train` checkpoint (no config / model_ema); "
                          "export takes the checkpoint-*.pth of a training run")
    cfg = yaml.safe_load(ck["config"])
    recipe = str(ck.get("recipe") or cfg.get("recipe"))
    if recipe not in TRAINED:
        raise DisconError(f"{path}: recipe {recipe!r} is not exportable; known: "
                          f"{', '.join(TRAINED)}")
    pairs = TRAINED[recipe] or ((component_spec(cfg["components"]["tokenizer"], "tokenizer")
                                 ["kind"], "tokenizer"),)
    built = {}
    for kind, key in pairs:  # load_into prefers model_ema: the EMA weights
        spec = component_spec(cfg["components"][key], kind)
        built[kind] = build(kind, spec["preset"], checkpoint=path, device="cpu", dtype="fp32",
                            **spec["overrides"])
    info = {"recipe": recipe, "step": ck.get("step"), "config": cfg,
            "data": json.loads(ck["info"]) if isinstance(ck.get("info"), str) else {}}
    return built, info


def training_notes(info: dict) -> str:
    cfg = info["config"]
    return (f"Trained with the `{info['recipe']}` recipe for {info['step']} steps (EMA weights); "
            f"data `{json.dumps(cfg.get('data'))}`, batch {cfg.get('batch_size')}, optimizer "
            f"`{json.dumps(cfg.get('optimizer'))}`.\n")


def push_to_hub(folder: Path, repo: str, *, private: bool, message: str) -> str:
    from huggingface_hub import HfApi
    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=message)
    except Exception as e:  # HTTP, auth and validation errors of the client
        raise DisconError(f"--push-to-hub {repo}: {one_line(e)}") from None
    return str(url)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="a discon train checkpoint -> a pipeline folder (EMA "
                                      "weights, presets, model card), optionally on the Hub")
    p.add_argument("checkpoint", help="checkpoint-*.pth of a `discon train` run")
    p.add_argument("--out", required=True, help="the folder to write (must be new or empty)")
    p.add_argument("--name", default=None, help="model name in presets.yaml (default: the "
                                                "folder's name)")
    for kind in ("prior", "dtok", "ctok"):
        p.add_argument(f"--{kind}", metavar="NAME", help=f"add the {kind} preset NAME (its "
                       "released weights) to the pipeline")
    p.add_argument("--half", action="store_true", help="store the weights in fp16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload the folder to this "
                                                              "Hub repo (HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    p.set_defaults(func=_cmd_export, unused_flags=("device", "dtype", "seed"))


def _cmd_export(args) -> int:
    from discon_core import pretrained
    from discon_core.registry import resolve

    path, out = Path(args.checkpoint), Path(args.out)
    if not path.is_file():
        raise DisconError(f"checkpoint {path} does not exist")
    references = {k: getattr(args, k) for k in ("prior", "dtok", "ctok") if getattr(args, k)}
    for kind, preset in references.items():
        resolve(kind, preset)  # an unknown name fails before any work
    built, info = components_of(path)
    clash = sorted(set(built) & set(references))
    if clash:
        raise DisconError(f"--{clash[0]}: the checkpoint already holds the {clash[0]}")
    name = args.name or out.name
    pretrained.save(out, built, name=name, references=references, overwrite=args.overwrite,
                    half=args.half, notes=training_notes(info))
    print(f"exported {', '.join(built)} (step {info['step']}) to {out}")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private,
                          message=f"discon export of {path.name}")
        print(f"pushed to {url}")
    return 0


@hookimpl
def discon_register_commands(subparsers) -> None:
    _add_export(subparsers)
