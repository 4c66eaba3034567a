"""Discrete-conditioning modes compared at CPU scale: ``add`` vs ``tokens`` vs none (plain MAR).

The same discon-tiny backbone + diffusion head is trained on the Fashion-MNIST cache of
``discon study configs/fmnist_cpu.yaml`` once per mode (same seed, data order and schedule),
then scored on a held-out cache of the test split built with the study's own tokenizers:

* held-out masked-AR loss (EMA weights, 4 fixed mask/noise draws per image): how well the
  continuous tokens are predicted from the visible ones, the class and (for add/tokens) the
  discrete grid; lower is better;
* training images/s and 16-step sampling seconds per image (the tokens mode makes the
  encoder and decoder sequences N longer).

Run after the study (finished trainings are reused, interrupted ones resume)::

    discon study configs/fmnist_cpu.yaml
    python benchmarks/cond_modes.py --steps 300          # -> runs/cond_modes/, a PNG of the curves
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from discon_core import build, sample_tokens
from discon_plugins.cache import CachedDataset, build_cache, collate_cached
from discon_plugins.recipes import DisconObjective
from discon_core.train import TrainConfig, train

MODES = {  # name -> (backbone overrides, recipe_options)
    "add": ({"cond_mode": "add"}, {}),
    "tokens": ({"cond_mode": "tokens"}, {}),
    "none": ({"cond_vocab_size": 0}, {"use_cond": False}),
}


def mode_config(base: Path, study: Path, out: Path, mode: str, steps: int) -> TrainConfig:
    overrides, recipe = MODES[mode]
    cfg = TrainConfig.load(base, [f"out={out / mode}", f"steps={steps}",
                                  f"data.cache={study / 'cache'}", "sample_every=0",
                                  f"ckpt_every={max(steps // 4, 1)}"])
    raw = cfg.as_dict()
    raw["components"]["backbone"] = {"preset": "discon-tiny", "overrides": overrides}
    raw["components"]["ctok"] = {"preset": "va-vae-tiny", "overrides": {
        "latents_stats": str(study / "cache" / "latents_stats.pt")}}
    raw["recipe_options"] = {**raw.get("recipe_options", {}), **recipe}
    return TrainConfig.from_dict(raw)


@torch.no_grad()
def held_out_loss(ckpt: Path, mode: str, ctok, test: CachedDataset, draws: int = 4) -> float:
    overrides, recipe = MODES[mode]
    backbone = build("backbone", "discon-tiny", checkpoint=ckpt, **overrides)
    head = build("head", "discon-tiny", checkpoint=ckpt)
    objective = DisconObjective(backbone, head, ctok, **recipe).eval()
    g = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    for start in range(0, len(test), 100):
        batch = collate_cached([test.get(i) for i in range(start, min(start + 100, len(test)))])
        for _ in range(draws):
            loss, _ = objective(batch, step=0, generator=g)
            total, count = total + float(loss) * len(batch["labels"]), count + len(batch["labels"])
    return total / count


@torch.no_grad()
def sampling_seconds(ckpt: Path, mode: str, test: CachedDataset, n: int = 10) -> float:
    overrides, recipe = MODES[mode]
    backbone = build("backbone", "discon-tiny", checkpoint=ckpt, **overrides)
    head = build("head", "discon-tiny", checkpoint=ckpt)
    batch = collate_cached([test.get(i) for i in range(n)])
    cond = None if recipe.get("use_cond") is False else batch["tokens"].flatten(1)
    start = time.perf_counter()
    sample_tokens(backbone, head, batch["labels"], cond=cond, ar_steps=16,
                  generator=torch.Generator().manual_seed(0))
    return (time.perf_counter() - start) / n


def images_per_s(log: Path) -> float:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return sorted(speeds)[len(speeds) // 2] if speeds else float("nan")


def plot(out: Path, modes: list[str]) -> Path:
    series = {}
    for mode in modes:
        rows = [json.loads(x) for x in (out / mode / "log.jsonl").read_text().splitlines() if x]
        rows = [r for r in rows if "loss" in r and "step" in r]
        series[mode] = ([r["step"] for r in rows], [r["loss"] for r in rows])
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for mode, (steps, losses) in series.items():
        ax.plot(steps, losses, label=mode)
    ax.set(xlabel="step", ylabel="training loss",
           title="discon-tiny on Fashion-MNIST: discrete-conditioning modes")
    ax.legend()
    path = out / "cond_modes.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, default=Path("runs/fmnist_cpu"),
                    help="output folder of `discon study` (its cache and tokenizers are used)")
    ap.add_argument("--config", type=Path, default=Path("configs/fmnist_discon_tiny.yaml"))
    ap.add_argument("--out", type=Path, default=Path("runs/cond_modes"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--test-images", type=int, default=500)
    ap.add_argument("--modes", default="add,tokens,none")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    if not (args.study / "cache" / "manifest.json").is_file():
        print(f"no study cache in {args.study}: run `discon study configs/fmnist_cpu.yaml` first",
              file=sys.stderr)
        return 1
    test_dir = args.out / "test_cache"
    build_cache({"type": "fashion-mnist", "split": "test", "limit": args.test_images}, test_dir,
                dtok="maskgit-vq-tiny", ctok="va-vae-tiny",
                dtok_checkpoint=str(args.study / "dtok" / "checkpoint-last.pth"),
                ctok_checkpoint=str(args.study / "ctok" / "checkpoint-last.pth"), progress=False)
    test = CachedDataset(test_dir)
    ctok = build("ctok", "va-vae-tiny", checkpoint=args.study / "ctok" / "checkpoint-last.pth",
                 latents_stats=str(args.study / "cache" / "latents_stats.pt"))
    results = {}
    for mode in modes:
        ckpt = train(mode_config(args.config, args.study, args.out, mode, args.steps))
        results[mode] = {"held_out_loss": held_out_loss(ckpt, mode, ctok, test),
                         "train_images_per_s": images_per_s(args.out / mode / "log.jsonl"),
                         "sample_sec_per_image": sampling_seconds(ckpt, mode, test)}
        print(mode, results[mode], flush=True)
    print(f"\n{'mode':<8} {'held-out loss':>14} {'train img/s':>12} {'sample s/img':>13}")
    for mode, r in results.items():
        print(f"{mode:<8} {r['held_out_loss']:>14.4f} {r['train_images_per_s']:>12.1f} "
              f"{r['sample_sec_per_image']:>13.3f}")
    if "none" in results:
        for mode in results:
            if mode != "none":
                print(f"held-out loss, none / {mode}: "
                      f"{results['none']['held_out_loss'] / results[mode]['held_out_loss']:.2f}x")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"curves: {plot(args.out, modes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
