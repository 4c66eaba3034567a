"""Tokenizer throughput: encode + decode images/s of each full-size tokenizer (random weights).

    python benchmarks/tokenizers.py                          # 256 px, batch 8, CPU
    python benchmarks/tokenizers.py --device cuda --iters 10
    python benchmarks/tokenizers.py --official-mar-vae PATH  # + ours vs the official code

``--official-mar-vae`` points at a copy of ``models/vae.py`` from LTH14/mar (self-contained:
torch + numpy). The comparison runs MAR's own Encoder/Decoder and ours on the ``ldm-kl-tiny``
configuration (with 32 GroupNorm groups, the official hard-coded value), with the same weights
(loaded strictly, outputs checked equal), alternating the two per iteration, and prints the
median time ratio ours / official measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from discon_core import build

FULL_SIZE = [("dtok", "maskgit-vq"), ("ctok", "ldm-kl"), ("ctok", "va-vae")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def encode_decode(tok: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if hasattr(tok, "codebook_size"):
        return tok.decode(tok.encode(images))
    # posterior mean, no latents_stats file needed: what encode+decode computes minus the
    # per-channel affine normalization (negligible cost)
    moments = tok.encode_moments(images)
    return tok.decode_raw(tok.posterior(moments).mode())


def time_calls(fn, iters: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def full_size(args, device: torch.device) -> None:
    print(f"full-size tokenizers, {args.size}px, batch {args.batch}, random weights, "
          f"device {device}, torch threads {torch.get_num_threads()}, dtype float32")
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    for kind, name in FULL_SIZE:
        torch.manual_seed(0)
        tok = build(kind, name, device=device).eval()
        params = sum(p.numel() for p in tok.parameters()) / 1e6
        encode_decode(tok, images)  # warm-up
        times = time_calls(lambda: encode_decode(tok, images), args.iters, device)
        best = min(times)
        print(f"  {name:12s} {params:6.1f}M params  encode+decode {best:7.3f} s/batch  "
              f"{args.batch / best:8.2f} images/s  (best of {args.iters})")
        del tok


class OfficialKL(nn.Module):
    """MAR's Encoder/Decoder + quant convs at a chosen width (the official wrapper fixes ch)."""

    def __init__(self, mod, *, embed_dim: int, ch: int, ch_mult, num_res_blocks: int,
                 attn_resolutions, resolution: int):
        super().__init__()
        cfg = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                   resolution=resolution, z_channels=embed_dim)
        self.encoder = mod.Encoder(attn_resolutions=tuple(attn_resolutions), **cfg)
        self.decoder = mod.Decoder(attn_resolutions=(), **cfg)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(x))
        return self.decoder(self.post_quant_conv(moments.chunk(2, dim=1)[0]))


def versus_official(args, device: torch.device) -> None:
    spec = importlib.util.spec_from_file_location("official_mar_vae", args.official_mar_vae)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ours = build("ctok", "ldm-kl-tiny", num_groups=32, device=device).eval()
    p = ours.discon_preset.params
    official = OfficialKL(mod, embed_dim=p["embed_dim"], ch=p["ch"], ch_mult=p["ch_mult"],
                          num_res_blocks=p["num_res_blocks"],
                          attn_resolutions=p["attn_resolutions"],
                          resolution=p["resolution"]).to(device).eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    x = torch.rand(args.tiny_batch, 3, 32, 32, device=device)
    with torch.no_grad():
        a = ours.decode_raw(ours.posterior(ours.encode_moments(x)).mode())
        b = official.run(x * 2 - 1)
    diff = (a - b).abs().max().item()
    ours_t, off_t = [], []
    encode_decode(ours, x), official.run(x * 2 - 1)  # warm-up
    for _ in range(args.tiny_iters):  # alternate so that load drift hits both alike
        ours_t += time_calls(lambda: encode_decode(ours, x), 1, device)
        off_t += time_calls(lambda: official.run(x * 2 - 1), 1, device)
    mo, mf = statistics.median(ours_t), statistics.median(off_t)
    print(f"ldm-kl-tiny (num_groups 32), 32px, batch {args.tiny_batch}, {args.tiny_iters} "
          f"alternating iterations: ours {mo * 1e3:.1f} ms, official {mf * 1e3:.1f} ms, "
          f"ratio ours/official {mo / mf:.3f}; max |output diff| {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--official-mar-vae", type=Path, default=None,
                    help="path to a copy of LTH14/mar models/vae.py")
    ap.add_argument("--tiny-batch", type=int, default=64)
    ap.add_argument("--tiny-iters", type=int, default=20)
    ap.add_argument("--skip-full-size", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if not args.skip_full_size:
        full_size(args, device)
    if args.official_mar_vae is not None:
        versus_official(args, device)


if __name__ == "__main__":
    main()
