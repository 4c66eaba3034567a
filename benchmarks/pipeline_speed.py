"""Whole-pipeline sampling speed per stage (prior, continuous stage, decode), fp32 vs bf16.

Runs the trained CPU-scale components of a `discon study` folder (or any folder with the same
layout: dtok/, ctok/, discon/, prior/ holding checkpoint-last.pth and cache/latents_stats.pt),
interleaving the dtypes so both see the same machine load::

    python benchmarks/pipeline_speed.py runs/fmnist_cpu --batch 32 100 --repeats 2 \
        --json benchmarks/results/pipeline_speed_cpu.json

Prints images/s per stage and for the whole pipeline, and the bf16/fp32 speed ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from discon_core import Pipeline, build, sample_tokens


def load(study: Path, dtype: torch.dtype, presets: dict) -> Pipeline:
    ck = lambda stage: study / stage / "checkpoint-last.pth"  # noqa: E731
    return Pipeline(
        prior=build("prior", presets["prior"], checkpoint=ck("prior"), dtype=dtype),
        dtok=build("dtok", presets["dtok"], checkpoint=ck("dtok"), dtype=dtype),
        backbone=build("backbone", presets["backbone"], checkpoint=ck("discon"), dtype=dtype),
        head=build("head", presets["head"], checkpoint=ck("discon"), dtype=dtype),
        ctok=build("ctok", presets["ctok"], checkpoint=ck("ctok"), dtype=dtype,
                   latents_stats=str(study / "cache" / "latents_stats.pt")))


@torch.inference_mode()
def time_stages(pipe: Pipeline, batch: int, seed: int, ar_steps: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch) % pipe.prior.num_classes
    sampling = dict(pipe.prior.discon_preset.sampling)
    t0 = time.perf_counter()
    ids = pipe.prior.sample(labels, cfg_scale=sampling.pop("cfg_scale", 1.0),
                            temperature=sampling.pop("temperature", 1.0), generator=g, **sampling)
    t1 = time.perf_counter()
    x = sample_tokens(pipe.backbone, pipe.head, labels, cond=ids.flatten(1), ar_steps=ar_steps,
                      generator=g)
    t2 = time.perf_counter()
    images = pipe.ctok.decode(pipe.backbone.unpatchify(x))
    t3 = time.perf_counter()
    if not torch.isfinite(images.float()).all():
        raise SystemExit("non-finite images")
    return {"prior": t1 - t0, "continuous": t2 - t1, "decode": t3 - t2, "total": t3 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 100])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ar-steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prior", default="rar-tiny")
    ap.add_argument("--dtok", default="maskgit-vq-tiny")
    ap.add_argument("--backbone", default="discon-tiny")
    ap.add_argument("--head", default="discon-tiny")
    ap.add_argument("--ctok", default="va-vae-tiny")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = {k: getattr(args, k) for k in ("prior", "dtok", "backbone", "head", "ctok")}
    pipes = {"fp32": load(args.study, torch.float32, presets),
             "bf16": load(args.study, torch.bfloat16, presets)}
    load_before = os.getloadavg()[0]
    rows = []
    for batch in args.batch:
        for name, pipe in pipes.items():  # warm-up
            time_stages(pipe, 2, 0, args.ar_steps)
        best: dict[str, dict[str, float]] = {}
        for r in range(args.repeats):
            for name, pipe in pipes.items():  # interleaved: same load for both dtypes
                t = time_stages(pipe, batch, r, args.ar_steps)
                best[name] = {k: min(v, best.get(name, {}).get(k, v)) for k, v in t.items()}
        for name, t in best.items():
            row = {"batch": batch, "dtype": name,
                   **{f"{k}_images_per_s": batch / v for k, v in t.items()},
                   **{f"{k}_s": v for k, v in t.items()}}
            rows.append(row)
            print(f"batch {batch:4d} {name}: " + "  ".join(
                f"{k} {batch / v:7.1f} img/s" for k, v in t.items()))
        ratio = {k: best["fp32"][k] / best["bf16"][k] for k in best["fp32"]}
        print(f"batch {batch:4d} bf16 speed-up: " + "  ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    out = {"study": args.study.name, "ar_steps": args.ar_steps, "threads": torch.get_num_threads(),
           "load_before": load_before, "load_after": os.getloadavg()[0], "rows": rows,
           "torch": torch.__version__}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
