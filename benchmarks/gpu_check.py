"""GPU checks in one short run: the xformers attention path, bf16, and speed at batch 100.

Meant for a CUDA machine (random weights, full-size presets; no downloads)::

    python benchmarks/gpu_check.py --out gpu_check.json

1. attention backends (xformers / sdpa / math) agree on real shapes, incl. the bottom-right
   causal mask a KV cache needs, and their speed;
2. discon-b backbone in bf16: xformers vs sdpa outputs and forward time at batch 100;
3. continuous-stage sampling at batch 100 in bf16: discon-b + diffusion head (100 steps) at
   16 AR steps, + flow head (25 steps) at 16, and MAR-B (diffusion) at 64 AR steps (256 steps
   would take minutes: its head runs 25,600 small calls); ratios printed from this one run;
4. RAR-B sampling of 256 tokens at batch 100 with CFG in bf16, with the KV cache;
5. the paper's pipeline (rar-xxl -> discon-l -> va-vae decode) in bf16 at batch 100: finite,
   in [0, 1], seconds per image next to the paper's 0.236.

The trainer against a bare loop (its overhead, target >= 0.95x) is measured by
``python benchmarks/train_throughput.py --preset discon-b discon-l --batch 64 --precision bf16``.

Each check records its figures in the JSON file; a failing check is recorded and the rest run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

import discon_core
from discon_core import build, sample_tokens
from discon_plugins import attention as attn_mod


def cuda_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` with CUDA synchronisation."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Visible random weights (official inits zero some output layers)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.1)).to(p))
    return module


def check_attention(report: dict) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"mar_b_full": (100, 12, 320, 64), "rar_xxl_step": (200, 16, 1, 88)}
    for name, (b, h, lq, d) in shapes.items():
        lk = 258 if lq == 1 else lq
        q = torch.randn(b, h, lq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(b, h, lk, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, h, lk, d, device="cuda", dtype=torch.bfloat16, generator=g)
        causal = lq == 1 or name.startswith("rar")
        ref = attn_mod.attention(q, k, v, backend="math", causal=causal).float()
        row = {}
        for backend in ("sdpa", "xformers"):
            try:
                out = attn_mod.attention(q, k, v, backend=backend, causal=causal).float()
                row[backend] = {
                    "max_abs_diff_vs_math": (out - ref).abs().max().item(),
                    "ms": 1e3 * cuda_time(lambda: attn_mod.attention(q, k, v, backend=backend,
                                                                     causal=causal), 10, 3)}
            except Exception as e:  # noqa: BLE001 - record and go on
                row[backend] = {"error": f"{type(e).__name__}: {e}"}
        row["math_ms"] = 1e3 * cuda_time(lambda: attn_mod.attention(q, k, v, backend="math",
                                                                    causal=causal), 10, 3)
        report[f"attention_{name}"] = row
        print(name, row, flush=True)


def check_backbone(report: dict, batch: int) -> None:
    out = {}
    zs = {}
    g = torch.Generator(device="cuda").manual_seed(1)
    for backend in ("sdpa", "xformers"):
        bb = randomize(build("backbone", "discon-b", device="cuda", attn_backend=backend)).eval()
        bb = bb.to(torch.bfloat16)
        g.manual_seed(1)
        x = torch.randn(batch, bb.seq_len, bb.token_dim, device="cuda", generator=g,
                        dtype=torch.bfloat16)
        mask = torch.rand(batch, bb.seq_len, device="cuda", generator=g).argsort(1) < 180
        labels = torch.randint(1000, (batch,), device="cuda", generator=g)
        cond = torch.randint(1024, (batch, bb.seq_len), device="cuda", generator=g)
        try:
            with torch.no_grad():
                zs[backend] = bb(x, mask, labels, cond).float()
                out[f"{backend}_forward_ms"] = 1e3 * cuda_time(lambda: bb(x, mask, labels, cond))
        except Exception as e:  # noqa: BLE001
            out[f"{backend}_error"] = f"{type(e).__name__}: {e}"
        del bb
    if len(zs) == 2:
        diff = (zs["xformers"] - zs["sdpa"]).abs()
        out["xformers_vs_sdpa_max_abs_diff"] = diff.max().item()
        out["xformers_vs_sdpa_rel_diff"] = (diff.norm() / zs["sdpa"].norm()).item()
    report["backbone_discon_b_bf16"] = out
    print("backbone", out, flush=True)


def check_sampling(report: dict, batch: int) -> None:
    out = {}
    labels = torch.arange(batch, device="cuda") % 1000
    cond = torch.randint(1024, (batch, 256), device="cuda")
    runs = [("discon-b", "discon-b", 16), ("discon-b", "flow", 16),
            ("mar-b", "mar-b", 64)]
    for bb_name, head_name, steps in runs:
        bb = randomize(build("backbone", bb_name, device="cuda")).eval()
        extra = {}
        if head_name == "flow":  # flow head sized like the discon-b head
            extra = dict(bb.discon_preset.params)
        head = randomize(build("head", head_name, device="cuda", **extra), seed=2).eval()
        c = cond if getattr(bb, "cond_vocab_size", 0) else None
        g = torch.Generator(device="cuda").manual_seed(0)

        def go(ar_steps=steps):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return sample_tokens(bb, head, labels, cond=c, ar_steps=ar_steps, generator=g)

        try:
            go(1)  # warm-up: kernels and allocator
            seconds = cuda_time(go, repeats=1, warmup=0)
            key = f"{bb_name}+{head_name}@{steps}"
            out[key] = {"seconds": seconds, "images_per_s": batch / seconds,
                        "finite": bool(torch.isfinite(go(1)).all())}
        except Exception as e:  # noqa: BLE001
            out[f"{bb_name}+{head_name}@{steps}"] = {"error": f"{type(e).__name__}: {e}"}
        print(bb_name, head_name, steps, out.get(f"{bb_name}+{head_name}@{steps}"), flush=True)
        del bb, head
        torch.cuda.empty_cache()
    base = out.get("mar-b+mar-b@64", {}).get("seconds")
    if base:
        for key, row in out.items():
            if "seconds" in row:
                row["speedup_vs_mar_64"] = base / row["seconds"]
    report["sampling_batch100_bf16"] = out


def check_prior(report: dict, batch: int) -> None:
    rar = randomize(build("prior", "rar-b", device="cuda")).eval().to(torch.bfloat16)
    labels = torch.arange(batch, device="cuda") % 1000
    g = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for kv in (True,):
        def go():
            with torch.no_grad():
                return rar.sample(labels, cfg_scale=16.0, guidance_scale_pow=2.75,
                                  temperature=1.0, kv_cache=kv, generator=g)
        seconds = cuda_time(go, repeats=1, warmup=0)
        out["kv" if kv else "nokv"] = {"seconds": seconds, "tokens_per_s": 256 * batch / seconds}
    report["prior_rar_b_batch100_bf16"] = out
    print("prior", out, flush=True)


PAPER_SEC_PER_IMAGE = 0.236  # DisCon-L + RAR-XXL, the paper's Table 2 (batch 100)


def check_pipeline(report: dict, batch: int) -> None:
    """The paper's pairing, DisCon-L + RAR-XXL -> VA-VAE decode, in bf16 at ``batch``: seconds
    per image after a warm-up call, beside the paper's 0.236."""
    comps = {"prior": build("prior", "rar-xxl", device="cuda"),
             "dtok": None,
             "backbone": build("backbone", "discon-l", device="cuda"),
             "head": build("head", "discon-l", device="cuda"),
             "ctok": build("ctok", "va-vae", device="cuda", latents_stats=None)}
    for k, m in comps.items():
        if m is not None:
            randomize(m, seed=len(k)).to(torch.bfloat16)
    pipe = discon_core.Pipeline(**comps)
    g = torch.Generator(device="cuda").manual_seed(0)
    pipe.generate(torch.arange(2, device="cuda"), generator=g, progress=False)  # warm-up
    labels = torch.arange(batch, device="cuda") % 1000
    torch.cuda.synchronize()
    start = time.perf_counter()
    images = pipe.generate(labels, generator=g, progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    report["pipeline_rar_xxl_discon_l_vavae_bf16"] = {
        "batch": batch, "sec_per_image": seconds / batch,
        "paper_sec_per_image": PAPER_SEC_PER_IMAGE,
        "ratio_to_paper": seconds / batch / PAPER_SEC_PER_IMAGE, "shape": list(images.shape),
        "finite": bool(torch.isfinite(images.float()).all()),
        "in_unit_range": bool(images.min() >= 0 and images.max() <= 1)}
    print("pipeline", report["pipeline_rar_xxl_discon_l_vavae_bf16"], flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--only", default="attention,backbone,sampling,prior,pipeline")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check needs CUDA", file=sys.stderr)
        return 1
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
              "xformers": getattr(attn_mod.xops, "__name__", None) and
              __import__("xformers").__version__}
    checks = {"attention": lambda: check_attention(report),
              "backbone": lambda: check_backbone(report, args.batch),
              "sampling": lambda: check_sampling(report, args.batch),
              "prior": lambda: check_prior(report, args.batch),
              "pipeline": lambda: check_pipeline(report, args.batch)}
    for name in args.only.split(","):
        start = time.perf_counter()
        try:
            checks[name]()
        except Exception:  # noqa: BLE001 - keep going, record the failure
            report[f"{name}_failed"] = traceback.format_exc()
            print(report[f"{name}_failed"], flush=True)
        print(f"[{name}] {time.perf_counter() - start:.1f}s", flush=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
