"""Benchmark: RAR token sampling with and without the KV cache, ours beside the official code.

Samples all ``image_seq_len`` tokens of a randomly initialised RAR (default: the rar-b size,
256 tokens, batch 2, CFG on, so every step runs 4 rows) and reports wall time, tokens/s, the
KV-cache speed-up, and the per-token cost over the first and the last tokens. Runs are
interleaved (ours, official, ours, ...) because a shared machine is noisy; ratios are taken
within the same run.

The official column needs a checkout of bytedance/1d-tokenizer (``--official PATH``) whose
imports (timm, omegaconf, einops, torchvision, ...) are importable, e.g. via ``PYTHONPATH``.
Without it that column is skipped. Both implementations get the same weights (loaded strictly
into the official module from our state dict), and the script checks that they sample the same
ids from the same seed.

    python benchmarks/prior_sampling.py                          # ours only
    PYTHONPATH=DEPS python benchmarks/prior_sampling.py --official CHECKOUT --repeats 2
    python benchmarks/prior_sampling.py --image-seq-len 64 --modes kv,nokv   # a quick look
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import discon_core


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="rar-b", help="prior preset whose size to use")
    p.add_argument("--image-seq-len", type=int, default=None,
                   help="override the number of tokens (a square number; default: preset's)")
    p.add_argument("--batch", type=int, default=2, help="images per call (CFG doubles the rows)")
    p.add_argument("--cfg-scale", type=float, default=16.0)
    p.add_argument("--guidance-scale-pow", type=float, default=2.75)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--modes", default="kv,nokv", help="comma list of kv, nokv")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of each run")
    p.add_argument("--nokv-repeats", type=int, default=1,
                   help="repeats of the (slow) no-cache runs")
    p.add_argument("--window", type=int, default=32,
                   help="tokens averaged for the first/last per-token cost")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--official", type=Path, default=None,
                   help="checkout of bytedance/1d-tokenizer (skip the official column without)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="where ours runs (the official column runs on CPU only)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="our parameter dtype (official column: float32 only)")
    return p.parse_args(argv)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial random weights (the official adaLN-zero init makes every block the
    identity, which would make the id check meaningless)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = p.shape[-1] ** -0.5 if p.dim() == 2 else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if name.endswith(
                "norm1.weight") or name.endswith("norm2.weight") else 0.0))


def load_official(checkout: Path, ours, params: dict):
    """The official RAR with our weights, or (None, reason)."""
    sys.path.insert(0, str(checkout))
    try:
        from omegaconf import OmegaConf
        from modeling.rar import RAR as OfficialRAR
    except Exception as e:  # noqa: BLE001 - report any import problem and go on without it
        return None, f"cannot import the official code from {checkout}: {e!r}"
    config = OmegaConf.create({"model": {
        "vq_model": {"codebook_size": params["codebook_size"]},
        "generator": {k: params[k] for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "dropout", "attn_drop", "class_label_dropout", "image_seq_len",
            "condition_num_classes")}}})
    official = OfficialRAR(config)
    official.load_state_dict(ours.state_dict(), strict=True)
    return official.eval(), ""


def run_ours(model, labels, args, kv: bool):
    stamps = []
    gen = torch.Generator(device=labels.device).manual_seed(args.seed)
    sync = torch.cuda.synchronize if labels.is_cuda else (lambda: None)

    def stamp(*_):
        sync()
        stamps.append(time.perf_counter())

    sync()
    start = time.perf_counter()
    ids = model.sample(labels, cfg_scale=args.cfg_scale, temperature=args.temperature,
                       guidance_scale_pow=args.guidance_scale_pow, kv_cache=kv, generator=gen,
                       on_step=stamp)
    sync()
    return time.perf_counter() - start, start, stamps, ids.flatten(1).cpu()


def run_official(model, labels, args, kv: bool):
    stamps = []
    inner = model.forward_fn

    def timed_forward_fn(*a, **kw):  # called once per step
        out = inner(*a, **kw)
        stamps.append(time.perf_counter())
        return out

    model.forward_fn = timed_forward_fn
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            ids = model.generate(labels, guidance_scale=args.cfg_scale,
                                 randomize_temperature=args.temperature,
                                 guidance_scale_pow=args.guidance_scale_pow, kv_cache=kv)
    finally:
        del model.forward_fn
    return time.perf_counter() - start, start, stamps, ids


def per_token(start: float, stamps: list[float], window: int) -> tuple[float, float]:
    """Mean ms per token over the first and the last ``window`` steps (step 0 excluded: it
    processes the two prefix slots)."""
    steps = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    first, last = steps[1:1 + window], steps[-window:]
    return 1e3 * statistics.fmean(first), 1e3 * statistics.fmean(last)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"dropout": 0.0, "attn_drop": 0.0}
    if args.image_seq_len:
        overrides["image_seq_len"] = args.image_seq_len
    ours = discon_core.build("prior", args.preset, **overrides).eval()
    randomize(ours, args.seed)
    params = ours.discon_preset.params
    n_tokens = ours.seq_len
    labels = torch.arange(args.batch) % ours.num_classes
    official, why = (None, "no --official checkout given")
    if args.official is not None:
        if args.device != "cpu" or args.dtype != "float32":
            why = "the official column runs on CPU in float32 only"
        else:
            official, why = load_official(args.official, ours, params)
    ours.to(device=args.device, dtype=getattr(torch, args.dtype))
    labels = labels.to(args.device)
    print(f"RAR sampling benchmark: preset {args.preset} (hidden {params['hidden_size']}, depth "
          f"{params['num_hidden_layers']}), {n_tokens} tokens, batch {args.batch}, cfg "
          f"{args.cfg_scale} (pow {args.guidance_scale_pow}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, ours on {args.device} ({args.dtype})")
    if official is None:
        print(f"official column skipped: {why}")

    impls = [("ours", ours, run_ours)] + ([("official", official, run_official)]
                                          if official is not None else [])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    times: dict[tuple[str, str], list[float]] = {}
    flat: dict[tuple[str, str], list[tuple[float, float]]] = {}
    ids_of: dict[tuple[str, str], torch.Tensor] = {}
    for mode in modes:
        repeats = args.repeats if mode == "kv" else args.nokv_repeats
        for rep in range(repeats):
            for name, model, runner in impls:  # interleaved
                seconds, start, stamps, ids = runner(model, labels, args, kv=(mode == "kv"))
                times.setdefault((name, mode), []).append(seconds)
                flat.setdefault((name, mode), []).append(per_token(start, stamps, args.window))
                ids_of[(name, mode)] = ids
                print(f"  {name:8s} {mode:5s} run {rep + 1}: {seconds:8.2f} s "
                      f"({n_tokens / seconds:6.2f} tokens/s)", flush=True)

    print(f"\n| impl | mode | best s | tokens/s | ms/token first {args.window} | "
          f"ms/token last {args.window} | last/first |")
    print("|---|---|---|---|---|---|---|")
    for (name, mode), ts in times.items():
        first, last = min(flat[(name, mode)], key=lambda fl: fl[0] + fl[1])
        print(f"| {name} | {mode} | {min(ts):.2f} | {n_tokens / min(ts):.2f} | {first:.1f} | "
              f"{last:.1f} | {last / first:.2f} |")
    print()
    for name, _, _ in impls:
        if (name, "kv") in times and (name, "nokv") in times:
            print(f"{name}: KV cache speed-up {min(times[(name, 'nokv')]) / min(times[(name, 'kv')]):.1f}x")
    for mode in modes:
        if ("official", mode) in times:
            print(f"{mode}: official / ours time = "
                  f"{min(times[('official', mode)]) / min(times[('ours', mode)]):.2f}x; "
                  f"same ids as official: "
                  f"{torch.equal(ids_of[('ours', mode)], ids_of[('official', mode)])}")
    if ("ours", "kv") in ids_of and ("ours", "nokv") in ids_of:
        print(f"ours kv vs nokv same ids: "
              f"{torch.equal(ids_of[('ours', 'kv')], ids_of[('ours', 'nokv')])}")


if __name__ == "__main__":
    main()
