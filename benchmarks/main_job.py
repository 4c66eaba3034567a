"""Score the main job's output: DisCon vs the discrete decode of the same prior tokens.

After ``discon study configs/fmnist_cpu.yaml`` (``runs/fmnist_cpu``), this samples N
class-balanced images with the study's own sampling settings, keeps the prior's tokens, decodes
them once through DisCon (backbone + head -> ctok decoder) and once through the dtok's decoder,
and scores both against the Fashion-MNIST test split with the ``fmnist`` extractor::

    python benchmarks/main_job.py configs/fmnist_cpu.yaml --num 1000 \
        --json benchmarks/results/fmnist_cpu/main_job.json

Prints FID, KID, IS, precision/recall and class accuracy of both, and the seconds it took.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from discon_core import Pipeline
from discon_core.config import load_yaml
from discon_core.images import uint8_tensor as to_uint8
from discon_plugins import evaluation as metrics
from discon_core.train import LAST
from discon_plugins.study import sampling_options, study_pipeline
from reproduce import raw_weights  # benchmarks/ is on the path of a script run here


def load(cfg: dict, weights: str = "ema") -> Pipeline:
    """The study's trained components, as its sample stage builds them; ``weights="raw"`` takes
    DisCon's raw (non-EMA) weights from the same checkpoint."""
    out = Path(cfg["out"])
    stats = ({} if cfg["ctok"].get("normalize", "stats") in (None, "none")
             else {"latents_stats": str(out / "cache" / "latents_stats.pt")})
    ckpt = raw_weights(out / "discon" / LAST) if weights == "raw" else None
    return study_pipeline(out, cfg, stats, discon_checkpoint=ckpt)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, help="the study config the main job ran")
    ap.add_argument("--num", type=int, default=1000, help="images (class-balanced)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", choices=["ema", "raw"], default="ema",
                    help="DisCon's EMA weights (what the study samples with) or its raw weights")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cfg = load_yaml(args.config, "study config")
    pipe = load(cfg, args.weights)
    sample = cfg.get("sample") or {}
    kwargs = sampling_options(sample)
    labels = torch.arange(args.num) % pipe.prior.num_classes
    g = torch.Generator().manual_seed(args.seed)
    discon, discrete, start = [], [], time.perf_counter()
    for i in range(0, args.num, args.batch_size):
        images, tokens, _ = pipe.generate(labels[i:i + args.batch_size], generator=g,
                                          return_tokens=True, progress=False, **kwargs)
        discon.append(to_uint8(images))
        discrete.append(to_uint8(pipe.dtok.decode(tokens)))
    seconds = time.perf_counter() - start
    extractor = metrics.get_extractor("fmnist")
    ref = metrics.load_input("fashion-mnist:test")
    rows = {}
    for name, images in (("discon", discon), ("dtok_decode", discrete)):
        gen = metrics.EvalInput(name, images=metrics.TensorImages(torch.cat(images)),
                                labels=labels)
        rows[name] = metrics.compute(gen, ref, extractor)
        print(f"{name:<12} FID {rows[name]['fid']:7.3f}  KID {rows[name]['kid']:.4f}  "
              f"IS {rows[name]['isc']:.2f}  P {rows[name]['precision']:.3f}  "
              f"R {rows[name]['recall']:.3f}  class acc {rows[name]['class_accuracy']:.3f}")
    print(f"sampling {args.num} images (both decodes): {seconds:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": "python benchmarks/main_job.py " + " ".join(
                      [str(args.config), "--num", str(args.num), "--seed", str(args.seed),
                       "--weights", args.weights]), "weights": args.weights,
                  "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
                  platform.machine(), "threads": torch.get_num_threads(), "N": args.num,
                  "reference": "fashion-mnist:test", "extractor": "fmnist", "sampling": kwargs,
                  "seconds": seconds, **rows}
        args.json.write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
