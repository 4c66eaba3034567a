"""Training throughput of a DisCon backbone+head through ``discon_core.train.Trainer``.

Random data of the real shapes (latent tokens, discrete ids, labels), the real objective
(``masked_ar_loss`` of the discon recipe), AdamW with MAR's groups, grad clip, EMA. Reports images/s and
the model FLOP utilisation (FLOPs counted by ``torch.utils.flop_counter`` on one step, divided by
the peak of the device), and the same for a bare loop (forward, backward, AdamW step; no clip,
EMA or logging) measured in the same run, so the ratio is the trainer's overhead.

    python benchmarks/train_throughput.py --preset discon-b --batch 2 --steps 2          # CPU
    python benchmarks/train_throughput.py --preset discon-b discon-l --batch 64 --precision bf16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from discon_core import build  # noqa: E402
from discon_plugins.recipes import masked_ar_loss  # noqa: E402
from discon_core.recipes import Recipe  # noqa: E402
from discon_plugins.recipes import _mar_no_decay  # noqa: E402
from discon_core.train import TrainConfig, Trainer  # noqa: E402

# Dense bf16 peaks (TFLOP/s) for MFU; CPU has none we can trust, so no MFU there.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


class RandomTokens:
    """Random continuous tokens, discrete ids and labels of a backbone's shapes."""

    def __init__(self, n: int, seq_len: int, token_dim: int, vocab: int, classes: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, seq_len, token_dim, generator=g)
        self.cond = torch.randint(vocab, (n, seq_len), generator=g)
        self.labels = torch.randint(classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def get(self, i: int, flip: bool = False) -> dict:
        return {"x": self.x[i], "cond": self.cond[i], "labels": self.labels[i]}


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in ("x", "cond", "labels")}


class Objective(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch, *, step: int, generator=None):
        return masked_ar_loss(self.backbone, self.head, batch["x"], batch["labels"],
                              batch["cond"], generator=generator)


_PRESET = {}


def make_recipe(cfg, device) -> Recipe:
    name = _PRESET["name"]
    backbone, head = build("backbone", name, device=device), build("head", name, device=device)
    backbone.train(), head.train()
    data = RandomTokens(cfg.batch_size * 2, backbone.seq_len, backbone.token_dim,
                        getattr(backbone, "cond_vocab_size", 1024), backbone.class_num)
    return Recipe("bench", Objective(backbone, head), data, collate, _mar_no_decay,
                  to_file=lambda k: k, from_file=lambda k: k)


def count_flops(model, batch, generator) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(batch, step=0, generator=generator)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name: str, batch: int, steps: int, warmup: int, precision: str, device: str) -> dict:
    _PRESET["name"] = name
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_dict({
            "recipe": f"{__name__}:make_recipe", "components": {"backbone": name}, "data": {},
            "out": tmp, "steps": warmup + steps, "batch_size": batch,
            "ckpt_every": 10 ** 9, "log_every": 10 ** 9, "precision": precision,
            "device": device, "progress": False})
        trainer = Trainer(cfg)
        dev = trainer.device
        model = trainer.module
        params = sum(p.numel() for p in model.parameters())
        b = {k: v.to(dev) for k, v in collate([trainer.recipe.dataset.get(i) for i in range(batch)]).items()}
        with trainer._autocast():
            flops = count_flops(model, b, trainer.generator)

        # the trainer: warmup steps, then timed steps
        trainer.save = lambda: None  # checkpoint I/O is not throughput
        trainer.total_steps = warmup
        trainer.fit()
        sync(dev)
        trainer.total_steps = warmup + steps
        t0 = time.perf_counter()
        trainer.fit()
        sync(dev)
        t_trainer = time.perf_counter() - t0

        # the bare loop, same model and optimizer, same batch
        opt = trainer.optimizer
        g = trainer.generator
        for i in range(warmup + steps):
            if i == warmup:
                sync(dev)
                t0 = time.perf_counter()
            with trainer._autocast():
                loss, _ = model(b, step=i, generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(dev)
        t_bare = time.perf_counter() - t0
    ips, ips_bare = batch * steps / t_trainer, batch * steps / t_bare
    out = {"preset": name, "params": params, "batch": batch, "precision": precision,
           "device": str(dev), "steps": steps, "images_per_s": ips, "bare_images_per_s": ips_bare,
           "trainer_over_bare": ips / ips_bare, "flops_per_image": flops / batch}
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name(dev)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
        out["gpu"] = gpu
        if peak:
            out["mfu"] = flops / batch * ips / (peak * 1e12)
            out["bare_mfu"] = flops / batch * ips_bare / (peak * 1e12)
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["discon-b"])
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 2 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU / 2 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 / 1)")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                    help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    batch = args.batch or (64 if gpu else 2)
    steps = args.steps or (20 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    precision = args.precision or ("bf16" if gpu else "fp32")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")
    results = []
    for name in args.preset:
        r = bench(name, batch, steps, warmup, precision, device)
        results.append(r)
        line = (f"{name:>9}: {r['params'] / 1e6:.1f}M params, batch {batch} {precision}: "
                f"{r['images_per_s']:.2f} images/s through the Trainer, "
                f"{r['bare_images_per_s']:.2f} bare loop (ratio {r['trainer_over_bare']:.3f}); "
                f"{r['flops_per_image'] / 1e9:.1f} GFLOP/image")
        if "mfu" in r:
            line += f"; MFU {100 * r['mfu']:.1f}% (bare {100 * r['bare_mfu']:.1f}%)"
        if "max_memory_gib" in r:
            line += f"; peak memory {r['max_memory_gib']:.1f} GiB"
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("DISCON_DISABLE_PLUGINS", "1")
    main()
