"""Train the tiny tokenizers on Fashion-MNIST on a CPU in minutes; report PSNR, save grids.

    python benchmarks/train_tokenizer_cpu.py          # 3 min each: maskgit-vq-tiny, va-vae-tiny
    python benchmarks/train_tokenizer_cpu.py --minutes 10 --tokenizers va-vae-tiny ldm-kl-tiny

Data: Fashion-MNIST (``discon_plugins.datasets.FashionMNIST``: 28x28 grey zero-padded to 32x32,
replicated to RGB), train split for training, the first ``--eval`` test images for PSNR.
Each tokenizer trains with its own ``training_loss`` (VQ: reconstruction + codebook +
commitment with straight-through and dead-code restart; KL: L1 + kl_weight * KL) and AdamW,
for a fixed wall-clock budget. Outputs, under ``--out`` (default ``runs/tokenizers_cpu``):

* ``<name>/model.pth``: the weights (loads with ``build(kind, name, checkpoint=...)``);
* ``<name>/recon.png``: test images (odd rows) above their reconstructions (even rows);
* ``<name>/latents_stats.pt`` (KL tokenizers): per-channel mean/std of posterior samples of
  training images in the official format; pass it as ``latents_stats=...``;
* ``results.json``: steps, images seen, final training loss, test PSNR, codebook usage.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from discon_core import build
from discon_core.checkpoints import save_atomic
from discon_plugins.datasets import FashionMNIST
from discon_core.images import psnr, save_grid
from discon_plugins.kl_vae import compute_latents_stats, save_latents_stats

KINDS = {"maskgit-vq-tiny": "dtok", "va-vae-tiny": "ctok", "ldm-kl-tiny": "ctok"}


def as_tensor(dataset: FashionMNIST, n: int | None = None) -> torch.Tensor:
    """All (or the first n) images of a FashionMNIST dataset as float [N,3,32,32] in [0,1]."""
    n = len(dataset) if n is None else min(n, len(dataset))
    x = dataset.images[:n].float().div(255.0)
    x = torch.nn.functional.pad(x, (dataset.pad,) * 4).unsqueeze(1)
    return x.expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def reconstruct(tok, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    out = []
    for chunk in images.split(batch):
        out.append(tok.decode(tok.encode(chunk)))
    return torch.cat(out)


def train_one(name: str, train: torch.Tensor, test: torch.Tensor, args, out_dir: Path) -> dict:
    kind = KINDS[name]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tok = build(kind, name).train()
    params = sum(p.numel() for p in tok.parameters())
    opt = torch.optim.AdamW(tok.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    budget = args.minutes * 60.0
    step, start, recent = 0, time.perf_counter(), []
    print(f"[{name}] {params / 1e3:.0f}K params, training for {args.minutes} min, batch "
          f"{args.batch}, lr {args.lr}")
    while time.perf_counter() - start < budget:
        idx = torch.randint(len(train), (args.batch,), generator=gen)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, logs = tok.training_loss(train[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [logs])[-20:]
        step += 1
        if step % args.log_every == 0:
            mean = {k: sum(r[k] for r in recent) / len(recent) for k in recent[0]}
            print(f"[{name}] step {step:5d}  {time.perf_counter() - start:6.0f}s  "
                  + "  ".join(f"{k} {v:.4g}" for k, v in mean.items()), flush=True)
    elapsed = time.perf_counter() - start
    tok.eval()
    recon = reconstruct(tok, test)
    result = {"name": name, "params": params, "steps": step, "seconds": round(elapsed, 1),
              "images_seen": step * args.batch,
              "final_train_loss": sum(r["loss"] for r in recent) / len(recent),
              "test_images": len(test), "test_psnr_db": psnr(test, recon).mean().item()}
    folder = out_dir / name
    save_atomic(tok.state_dict(), folder / "model.pth")
    pairs = torch.stack([test[:16], recon[:16]], 0).view(2, 2, 8, 3, 32, 32)
    save_grid(pairs.transpose(0, 1).reshape(32, 3, 32, 32), folder / "recon.png", nrow=8,
              upscale=2)
    if kind == "dtok":
        with torch.no_grad():
            used = torch.cat([tok.encode(c) for c in test.split(250)]).unique().numel()
        result["test_codes_used"] = f"{used}/{tok.codebook_size}"
    else:
        gen_stats = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():  # raw posterior samples, as LightningDiT computes its stats
            stats = compute_latents_stats(
                tok.posterior(tok.encode_moments(c)).sample(gen_stats)
                for c in train[:args.stats_images].split(250))
        save_latents_stats(stats, folder / "latents_stats.pt")
        result["latent_std_range"] = [stats["std"].min().item(), stats["std"].max().item()]
    print(f"[{name}] done: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizers", nargs="+", default=["maskgit-vq-tiny", "va-vae-tiny"],
                    choices=sorted(KINDS))
    ap.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget per tokenizer")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval", type=int, default=1000, help="test images for PSNR")
    ap.add_argument("--stats-images", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for these tiny convs on a shared CPU)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder")
    ap.add_argument("--out", type=Path, default=Path("runs/tokenizers_cpu"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train = as_tensor(FashionMNIST(args.data_root, split="train"))
    test = as_tensor(FashionMNIST(args.data_root, split="test"), args.eval)
    results = [train_one(name, train, test, args, args.out) for name in args.tokenizers]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| tokenizer | params | steps | images seen | minutes | test PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['params'] / 1e3:.0f}K | {r['steps']} | {r['images_seen']} | "
              f"{r['seconds'] / 60:.1f} | {r['test_psnr_db']:.2f} |")


if __name__ == "__main__":
    main()
