"""Continuous-stage sampling speed (Table 2 analogue): AR steps x head, ours vs official MAR.

Same random weights, same backbone size and head: the time to sample the continuous tokens
(backbone + head, no tokenizer, no prior) at 16 AR steps (DisCon) vs MAR's 64 and 256, with
the diffusion head (100 steps) and the flow head (25 Euler steps), and the share of time spent
in the head. With ``--official PATH`` (a checkout of LTH14/mar; needs ``timm``) the official
``MAR.sample_tokens`` is timed in the same run, interleaved with ours (this machine is noisy),
on the same weights. Run::

    python benchmarks/sampling_speed.py --size mar-b --batch 1 --ar-steps 16,64 \
        --official ../mar-checkout
    python benchmarks/sampling_speed.py --size mar-b --batch 1 --ar-steps 16 --dtype bf16 \
        --official ../mar-checkout          # ours in bf16 vs the official fp32 code

Prints the command line, the hardware (CPU model, capability, native bf16), the machine load
and the other busy processes, one row per configuration and the ratios measured in this run,
and the continuous stage's achieved GFLOP/s (FLOPs counted on the first warm-up run) against
the fp32 and bf16 matmul peaks that the script measures on this machine first. ``--dtype``
defaults to ``auto`` (bf16 where native, else fp32: discon_core/precision.py). Ours is run ``--warmup`` times untimed first
(at the smallest AR step count; its time is printed): the first bf16 call packs the weights
(:class:`discon_plugins.attention.Linear`), a one-time cost like loading them, and this also
warms the process's allocator for the official runs that follow.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from discon_core import build, sample_tokens
from discon_core.precision import hardware_record, resolve_dtype


# environment variables that make this CPU behave as an older one (docs/speed.md)
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


class Timer:
    """Wraps a callable and accumulates its wall time (here: the head's sample)."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def busy_processes(min_cpu: float = 10.0) -> list[str]:
    """Other processes using >= ``min_cpu`` % of a core (ps's lifetime average), for the record."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,pcpu=,ni=,args="], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ["(ps unavailable)"]
    rows = []
    for line in out.splitlines():
        pid, cpu, nice, cmd = line.split(None, 3)
        if int(pid) != os.getpid() and float(cpu) >= min_cpu and not cmd.startswith("ps "):
            # program names without their folders: the record names no path of this machine
            words = [os.path.basename(w) if os.sep in w else w for w in cmd.split()]
            rows.append(f"pid {pid} {cpu}% cpu nice {nice}: {' '.join(words)[:100]}")
    return rows


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Visible random weights (MAR's init zeroes the head output; timing is weight-independent)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.1))


def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """GFLOP/s of an n x n x n matmul in ``dtype`` at the current thread count (best of 3)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start) / 1e9)
    return best


def _linear_flops(x_shape, w_shape, *_, out_shape=None, **__) -> int:
    """FLOPs of the prepacked CPU linears (plugins/attention.py), which FlopCounterMode does not
    know: 2 * rows * in * out."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * out_shape[-1]


def count_flops(fn) -> tuple[float, object]:
    from torch.utils.flop_counter import FlopCounterMode
    mapping = {torch.ops.mkl._mkl_linear: _linear_flops,
               torch.ops.mkldnn._linear_pointwise: _linear_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = fn()
    return counter.get_total_flops(), out


def load_official(path: Path, size: str, state: dict, kwargs: dict):
    """The official MAR on CPU with our weights (``.cuda()`` calls become no-ops)."""
    sys.path.insert(0, str(path))
    torch.Tensor.cuda = lambda self, *a, **k: self  # the reference hard-codes .cuda()
    from models import mar as official  # noqa: PLC0415 - optional, from the given checkout
    factory = {"mar-b": official.mar_base, "mar-l": official.mar_large, "mar-h": official.mar_huge}[size]
    model = factory(**kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="mar-b", choices=["mar-b", "mar-l", "mar-h"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ar-steps", default="16,64,256", help="comma-separated AR step counts")
    ap.add_argument("--flow-steps", type=int, default=25)
    ap.add_argument("--official", type=Path, default=None, help="LTH14/mar checkout (optional)")
    ap.add_argument("--official-max-steps", type=int, default=256,
                    help="skip the official run above this many AR steps (it is the slow one)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="auto",
                    help="ours: auto | fp32 | bf16 | fp16 (official: fp32)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed runs of ours (both heads) before the timed ones")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps_list = [int(s) for s in args.ar_steps.split(",")]

    bb = build("backbone", args.size).eval()
    diff = build("head", args.size).eval()
    flow = build("head", "flow", **{k: v for k, v in bb.discon_preset.params.items()
                                    if k != "num_sampling_steps"}).eval()
    randomize(bb, 0), randomize(diff, 1), randomize(flow, 2)
    fp32_state = {**bb.state_dict(), **{f"diffloss.{k}": v for k, v in diff.state_dict().items()}}
    dtype = resolve_dtype(args.dtype, "cpu", "--dtype")
    for module in (bb, diff, flow):  # ours in the requested dtype, official on the fp32 copy
        module.to(dtype)
    ours = {"diffusion": Timer(diff.sample), "flow": Timer(flow.sample)}
    diff.sample, flow.sample = ours["diffusion"], ours["flow"]
    official = None
    if args.official is not None:
        state = {k: v.clone() for k, v in fp32_state.items()}
        kw = {k: bb.discon_preset.params[k] for k in ("img_size", "vae_stride", "patch_size",
              "vae_embed_dim", "buffer_size", "class_num", "diffloss_d", "diffloss_w",
              "num_sampling_steps")}
        official = load_official(args.official, args.size, state, kw)
        off_timer = Timer(official.diffloss.sample)
        official.diffloss.sample = off_timer
    labels = torch.arange(args.batch) % 1000
    # the --official checkout's location is this machine's business
    shown = ["<LTH14/mar checkout>" if prev == "--official" else a
             for prev, a in zip([""] + sys.argv[:-1], sys.argv)]
    print("# python " + " ".join(shlex.quote(a) for a in shown))
    print("# other busy processes: " + ("; ".join(busy_processes()) or "none"))
    hw = hardware_record("cpu", dtype)
    peaks = {name: matmul_peak(dt) for name, dt in (("fp32", torch.float32),
                                                    ("bf16", torch.bfloat16))}
    print(f"# {hw['cpu_model']}, capability {hw['cpu_capability']}, bf16 native: "
          f"{hw['native_bf16']}, torch {hw['torch']}; --dtype {args.dtype} -> {hw['dtype']}; "
          f"matmul peak (1024^3, {torch.get_num_threads()} threads): fp32 {peaks['fp32']:.0f} "
          f"GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    capped = {k: os.environ[k] for k in ISA_CAPS if k in os.environ}
    if capped:  # an emulated older CPU (docs/speed.md)
        print("# instruction sets capped: " + ", ".join(f"{k}={v}" for k, v in capped.items()))
    print(f"{args.size}, batch {args.batch}, {torch.get_num_threads()} threads, ours in "
          f"{args.dtype} (official fp32), load {os.getloadavg()[0]:.2f}; "
          f"diffusion head {diff.num_sampling_steps} steps, flow head {args.flow_steps} Euler steps")
    print(f"{'model':<22}{'AR steps':>9}{'total s':>10}{'head s':>9}{'head %':>8}")
    results = {}

    def row(name, steps, total, head_s):
        results[(name, steps)] = total
        print(f"{name:<22}{steps:>9}{total:>10.2f}{head_s:>9.2f}{100 * head_s / total:>7.0f}%",
              flush=True)

    flops = {}
    with torch.no_grad():
        for w in range(args.warmup):
            for name, head in (("diffusion", diff), ("flow", flow)):
                start = time.perf_counter()

                def run():
                    return sample_tokens(bb, head, labels, ar_steps=min(steps_list),
                                         head_steps=args.flow_steps if name == "flow" else None,
                                         generator=torch.Generator().manual_seed(0))
                if w == 0:  # counted once (the counter slows this run; it is not timed)
                    flops[f"ours {name}"] = count_flops(run)[0]
                else:
                    run()
                print(f"(warm-up, ours {name}, {min(steps_list)} AR steps: "
                      f"{time.perf_counter() - start:.2f} s)", flush=True)
        for steps in steps_list:  # interleave: official, ours (diffusion), ours (flow)
            if official is not None and steps <= args.official_max_steps:
                off_timer.seconds = 0.0
                torch.manual_seed(0)
                start = time.perf_counter()
                official.sample_tokens(bsz=args.batch, num_iter=steps, labels=labels)
                row("official MAR (diff)", steps, time.perf_counter() - start, off_timer.seconds)
            for name, head in (("ours diffusion", diff), ("ours flow", flow)):
                timer = ours[name.split()[1]]
                timer.seconds = 0.0
                start = time.perf_counter()
                sample_tokens(bb, head, labels, ar_steps=steps,
                              head_steps=args.flow_steps if name == "ours flow" else None,
                              generator=torch.Generator().manual_seed(0))
                row(name, steps, time.perf_counter() - start, timer.seconds)

    print(f"\nload after: {os.getloadavg()[0]:.2f}\nratios (same run):")
    base = min(steps_list)
    for steps in steps_list:
        if steps != base and ("ours diffusion", steps) in results:
            print(f"  ours diffusion {steps} / {base} AR steps: "
                  f"{results[('ours diffusion', steps)] / results[('ours diffusion', base)]:.2f}x slower")
        if ("official MAR (diff)", steps) in results:
            off = results[("official MAR (diff)", steps)]
            print(f"  official / ours diffusion at {steps} AR steps: "
                  f"{off / results[('ours diffusion', steps)]:.2f}x")
            print(f"  official at {steps} / ours flow at {base} AR steps: "
                  f"{off / results[('ours flow', base)]:.2f}x")
    for steps in steps_list:
        print(f"  ours diffusion / ours flow at {steps} AR steps: "
              f"{results[('ours diffusion', steps)] / results[('ours flow', steps)]:.2f}x")
    peak = peaks["bf16" if dtype == torch.bfloat16 else "fp32"]
    for name, total in flops.items():
        seconds = results[(name, base)]
        print(f"  {name} at {base} AR steps: {total / 1e9:.0f} GFLOP in {seconds:.2f} s = "
              f"{total / seconds / 1e9:.0f} GFLOP/s, {100 * total / seconds / 1e9 / peak:.0f}% "
              f"of the {hw['dtype']} matmul peak ({peak:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
