"""Where the continuous stage spends its time: backbone, head, and the rest (Python/glue) per
AR step, for several dtypes on the same random weights. Run::

    python benchmarks/profile_sampling.py --size mar-b --batch 1 --ar-steps 16 \
        --dtypes fp32,bf16 --ops 12 --json benchmarks/results/profile_sampling_cpu.json

``--size`` is a backbone preset (mar-b, discon-tiny, ...); the head is the preset's own head
(``--head`` to pick another; ``--head flow`` is the flow head sized like the backbone preset,
as ``sampling_speed.py`` builds it, e.g. 6x1024 for mar-b). Each dtype runs ``--warmup`` times
untimed first (bf16 packs its weights on the first call). With ``--ops N`` the last dtype's run
is repeated under torch.profiler and its N most expensive operators (self CPU time) are
printed: that is where a dtype falls back to slow kernels. Every run starts from the same seed; the max abs difference of
the sampled tokens against the first dtype is reported (same noise, so it measures the rounding).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from discon_core import build, sample_tokens
from discon_core.precision import resolve_dtype


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Visible random weights (MAR's init zeroes the head's output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.01))
    return module.eval()


class Clock:
    """Accumulates the wall time of a module's forward (hooks) or of a wrapped callable."""

    def __init__(self):
        self.seconds, self.calls, self._start = 0.0, 0, 0.0

    def pre(self, *_):
        self._start = time.perf_counter()

    def post(self, *_):
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self.pre()
            try:
                return fn(*args, **kwargs)
            finally:
                self.post()
        return timed


def build_head(name: str, bb):
    """The head preset ``name``, or for ``flow`` the bare flow factory with the backbone preset's
    sizes (its own default of 25 steps)."""
    if name == "flow":
        params = {k: v for k, v in bb.discon_preset.params.items() if k != "num_sampling_steps"}
        return build("head", "flow", **params)
    return build("head", name)


def run(bb, head, labels, cond, steps, head_steps, seed):
    bb_clock, head_clock = Clock(), Clock()
    hooks = [bb.register_forward_pre_hook(bb_clock.pre), bb.register_forward_hook(bb_clock.post)]
    sample = head.sample
    head.sample = head_clock.wrap(sample)
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            x = sample_tokens(bb, head, labels, cond=cond, ar_steps=steps, head_steps=head_steps,
                              generator=torch.Generator().manual_seed(seed))
        total = time.perf_counter() - start
    finally:
        head.sample = sample
        for h in hooks:
            h.remove()
    return x.float(), {"total_s": total, "backbone_s": bb_clock.seconds,
                       "backbone_calls": bb_clock.calls, "head_s": head_clock.seconds,
                       "head_calls": head_clock.calls,
                       "other_s": total - bb_clock.seconds - head_clock.seconds,
                       "other_ms_per_step": 1e3 * (total - bb_clock.seconds - head_clock.seconds)
                       / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="mar-b", help="backbone preset")
    ap.add_argument("--head", default=None,
                    help="head preset (default: --size); flow: the flow head sized like --size")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ar-steps", type=int, default=16)
    ap.add_argument("--head-steps", type=int, default=None, help="override the head's steps")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--ops", type=int, default=0, help="print the N top operators of the last dtype")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per dtype first")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb32 = randomize(build("backbone", args.size), 0)
    head_name = args.head or args.size
    head32 = randomize(build_head(head_name, bb32), 1)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(args.batch) % 10  # valid for 10- and 1000-class presets
    cond = None
    if getattr(bb32, "cond_vocab_size", 0):
        cond = torch.randint(0, bb32.cond_vocab_size, (args.batch, bb32.seq_len), generator=g)
    load_before = os.getloadavg()
    print(f"{args.size} + head {head_name}, batch {args.batch}, {args.ar_steps} AR "
          f"steps, {torch.get_num_threads()} threads, load {load_before[0]:.2f}")
    print(f"{'dtype':<6}{'total s':>9}{'backbone s':>12}{'head s':>9}{'other s':>9}"
          f"{'per AR step, ms: backbone':>27}{'head':>7}{'other':>7}{'max|dx| vs first':>18}")
    rows, first = [], None
    for name in args.dtypes.split(","):
        dtype = resolve_dtype(name, "cpu", "--dtypes")
        bb = build("backbone", args.size)
        bb.load_state_dict(bb32.state_dict())
        head = build_head(head_name, bb)
        head.load_state_dict(head32.state_dict())
        bb, head = bb.to(dtype).eval(), head.to(dtype).eval()
        for _ in range(args.warmup):
            run(bb, head, labels, cond, args.ar_steps, args.head_steps, seed=0)
        x, row = run(bb, head, labels, cond, args.ar_steps, args.head_steps, seed=0)
        first = x if first is None else first
        row.update(dtype=name, max_abs_diff_vs_first=float((x - first).abs().max()),
                   finite=bool(torch.isfinite(x).all()))
        rows.append(row)
        print(f"{name:<6}{row['total_s']:>9.2f}{row['backbone_s']:>12.2f}{row['head_s']:>9.2f}"
              f"{row['other_s']:>9.2f}{1e3 * row['backbone_s'] / args.ar_steps:>27.1f}"
              f"{1e3 * row['head_s'] / args.ar_steps:>7.1f}{row['other_ms_per_step']:>7.1f}"
              f"{row['max_abs_diff_vs_first']:>18.4f}", flush=True)
    top = []
    if args.ops:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(bb, head, labels, cond, args.ar_steps, args.head_steps, seed=0)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total_us = sum(e.self_cpu_time_total for e in events)
        print(f"\ntop {args.ops} operators ({name}, self CPU time):")
        for e in events[:args.ops]:
            share = 100 * e.self_cpu_time_total / total_us
            top.append({"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                        "share": share})
            print(f"  {e.key:<40}{e.count:>8} calls{e.self_cpu_time_total / 1e3:>10.1f} ms"
                  f"{share:>6.1f}%")
    if len(rows) > 1:
        print("\nratios (same run): " + ", ".join(
            f"{rows[0]['dtype']} / {r['dtype']}: {rows[0]['total_s'] / r['total_s']:.2f}x"
            for r in rows[1:]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "size": args.size, "head": head_name, "batch": args.batch,
            "ar_steps": args.ar_steps, "threads": torch.get_num_threads(),
            "load_before": load_before[0], "load_after": os.getloadavg()[0], "rows": rows,
            "top_ops": top, "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
