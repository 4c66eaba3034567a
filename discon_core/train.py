"""One trainer for every discon component: backbone+head (``discon``), the discrete prior
(``prior``) and the tokenizers (``tokenizer``).

It is a plain loop over a *recipe* (the model to optimise, its data and its loss), with what
large runs need: AdamW with per-recipe parameter groups (MAR's for backbone+head), lr scaling
``lr = blr * global_batch / 256`` with linear warmup and a constant or cosine schedule, gradient
clipping, EMA of the parameters (0.9999), optional bf16 autocast, gradient checkpointing,
torch.compile, DDP (torchrun; gloo on CPU, NCCL on GPU), FSDP2 for the large models, atomic
periodic checkpoints holding everything needed for an exact ``--resume`` (model, EMA, optimizer,
scheduler, step, data position, every RNG of every rank), a stop on NaN/inf that keeps the last
good checkpoint, tqdm progress, a JSON-lines log and sample grids.

A run is never clobbered: a fresh start into an ``out`` that holds ``checkpoint-last.pth`` or
``log.jsonl`` is refused without ``--overwrite``, ``--resume`` without a checkpoint is refused,
temp files of a killed save are removed at the next start, and checkpoints with NaN/inf weights
are refused at load.

Launch::

    discon train configs/fmnist_discon.yaml                       # one process
    discon train configs/fmnist_discon.yaml --resume              # continue out/checkpoint-last.pth
    discon train configs/fmnist_discon.yaml --overwrite           # replace the run held in out
    torchrun --nproc_per_node 8 -m discon_core.cli train configs/imagenet_discon_l.yaml
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m discon_core.cli train configs/imagenet_discon_l.yaml   # multi-node

A DisCon checkpoint uses MAR's layout, ``{'model': sd, 'model_ema': sd, ...}`` with the backbone
keys at the top level and the head keys under ``diffloss.``, so ``build('backbone', name,
checkpoint=f)`` and ``build('head', name, checkpoint=f)`` both load from it (EMA weights).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from .config import OptimConfig, TrainConfig, apply_overrides, load_yaml  # noqa: F401 (re-exported)
from .errors import DisconError
from .distributed import _all_reduce_max, _gather, setup_distributed, teardown_distributed
from .precision import hardware_record, resolve_precision
from .recipes import Recipe, component_spec, make_recipe
from .train_state import rng_state, set_rng_state

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "discon-train/1"
LAST = "checkpoint-last.pth"


# ------------------------------------------------------------------------------------------------
# Learning rate, parameter groups, EMA

def base_lr(opt: OptimConfig, global_batch: int) -> float:
    return opt.lr if opt.lr is not None else opt.blr * global_batch / 256


def lr_at(step: int, *, lr: float, warmup: int, total: int, schedule: str, min_lr: float) -> float:
    """MAR's per-iteration schedule: linear warmup from 0, then constant or half-cosine."""
    if step < warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, recipe: Recipe, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if recipe.no_decay(recipe.to_file(name), p) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class EMA:
    """Exponential moving average of the trainable parameters (MAR: ``ema = r*ema + (1-r)*p``),
    in float32, aligned with ``model.parameters()`` (local shards under FSDP)."""

    def __init__(self, params: list[nn.Parameter], rate: float, warmup: bool = False):
        self.params, self.rate, self.warmup = params, rate, warmup
        self.shadow = [p.detach().float().clone() for p in params]

    def rate_at(self, step: int) -> float:
        """The decay of update number ``step`` (0-based): ``rate``, or with warmup
        ``min(rate, (1 + step) / (10 + step))``."""
        return min(self.rate, (1 + step) / (10 + step)) if self.warmup else self.rate

    @torch.no_grad()
    def update(self, step: int) -> None:
        rate = self.rate_at(step)
        # one fused multi-tensor op per step instead of 2 kernels per parameter
        current = [p.detach().float() for p in self.params]
        torch._foreach_mul_(self.shadow, rate)
        torch._foreach_add_(self.shadow, current, alpha=1.0 - rate)

    @contextlib.contextmanager
    def swapped(self):
        """Temporarily put the EMA values into the model's parameters."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    @torch.no_grad()
    def copy_from_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.copy_(p.detach().float())


# ------------------------------------------------------------------------------------------------
# The trainer

def _identity_keys(cfg: TrainConfig) -> dict[str, Any]:
    """The parts of a config that must not change across --resume."""
    comps = {k: component_spec(v, k) for k, v in cfg.components.items()}
    for v in comps.values():
        v.pop("checkpoint", None)  # the init checkpoint is irrelevant once resumed
    return {"recipe": cfg.recipe, "components": comps, "batch_size": cfg.batch_size,
            "seed": cfg.seed}


def _log_step(line: str) -> int | None:
    """The step of one log.jsonl line; None for a line a killed process left half-written."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return int(record.get("step", 0)) if isinstance(record, dict) else None


class FiniteCheck:
    """Non-finite losses and gradient norms, recorded on the device every step and read back
    only when the trainer is about to log, save or sample: one host sync per check instead of
    two per step (on a GPU each sync stalls the queue of kernels). The first failing step, what
    failed and its value are kept for the error."""

    def __init__(self, device: torch.device):
        self.step = torch.zeros((), dtype=torch.int64, device=device)   # steps recorded
        self.first = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet
        self.grad = torch.zeros((), dtype=torch.bool, device=device)    # the gradient failed
        self.value = torch.zeros((), dtype=torch.float32, device=device)

    def record(self, loss: torch.Tensor, gnorm: torch.Tensor) -> None:
        self.step += 1
        loss_ok, grad_ok = torch.isfinite(loss), torch.isfinite(gnorm)
        new = ~(loss_ok & grad_ok) & (self.first == 0)
        self.first = torch.where(new, self.step, self.first)
        self.grad = torch.where(new, loss_ok, self.grad)  # a finite loss: the gradient failed
        self.value = torch.where(new, torch.where(loss_ok, gnorm.float(), loss.float()),
                                 self.value)

    def check(self, trainer: "Trainer", lr: float) -> None:
        if _all_reduce_max(float(self.first > 0), trainer.world):
            first = int(self.first)  # this rank may be fine while another failed
            trainer._nonfinite("gradient norm" if bool(self.grad) else "loss",
                               float(self.value), lr, trainer.step - int(self.step) + first
                               if first else trainer.step)


class Trainer:
    """Runs a :class:`TrainConfig`. ``Trainer(cfg).fit(resume=...)`` returns the final step."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed(cfg.device)
        self.out = Path(cfg.out)
        # The same init on every rank (FSDP does not broadcast it, unlike DDP) ...
        torch.manual_seed(cfg.seed)
        self.recipe = make_recipe(cfg, self.device)
        # ... then per-rank streams, so ranks draw different masks/noise (MAR: seed + rank).
        seed = cfg.seed + self.rank
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.precision = resolve_precision(cfg.precision, self.device)  # auto: by the hardware
        model = self.recipe.model.to(self.device)
        if cfg.grad_checkpointing:
            self._enable_grad_checkpointing(model)
        self.module = model                       # unwrapped
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise DisconError(f"recipe {cfg.recipe!r} has no trainable parameters")
        if cfg.fsdp and self.world == 1:
            log.warning("fsdp: true with a single process: nothing to shard, training unwrapped")
        if cfg.fsdp and self.world > 1:
            from torch.distributed.fsdp import fully_shard
            for sub in model.modules():
                if isinstance(sub, nn.ModuleList):
                    for block in sub:
                        fully_shard(block)
            fully_shard(model)
            self.params = [p for p in model.parameters() if p.requires_grad]
            self.wrapped = model
        elif self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.wrapped = model
        if cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        num_items = len(self.recipe.dataset)
        from .data import BatchOrder
        self.order = BatchOrder(num_items, cfg.batch_size, cfg.seed, rank=self.rank,
                                world=self.world, flip=self.recipe.flip)
        spe = self.order.steps_per_epoch
        self.total_steps = int(cfg.steps if cfg.steps is not None else round(cfg.epochs * spe))
        o = cfg.optimizer
        self.warmup = int(o.warmup_steps if o.warmup_steps is not None
                          else round((o.warmup_epochs or 0) * spe))
        self.lr = base_lr(o, cfg.batch_size)
        self.optimizer = torch.optim.AdamW(param_groups(self.module, self.recipe, o.weight_decay),
                                           lr=self.lr, betas=o.betas)
        self.ema = EMA(self.params, cfg.ema_rate, cfg.ema_warmup)
        self.step = 0
        self.dropped = 0
        self.last_good: Path | None = None

    # -- helpers ---------------------------------------------------------------------------------
    def _enable_grad_checkpointing(self, model: nn.Module) -> None:
        done = False
        for sub in model.modules():
            if hasattr(sub, "set_grad_checkpointing"):
                sub.set_grad_checkpointing(True)
                done = True
            elif hasattr(sub, "grad_checkpointing"):
                sub.grad_checkpointing = True
                done = True
        if not done:
            raise DisconError("grad_checkpointing: true, but no component of this recipe supports "
                              "it (no grad_checkpointing attribute or set_grad_checkpointing())")

    def _full_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(self.module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        return {self.recipe.to_file(k): v.detach().cpu().clone() for k, v in sd.items()}

    def _set_full_state(self, file_sd: Mapping[str, torch.Tensor], what: str, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        sd = {self.recipe.from_file(k): v for k, v in file_sd.items()}
        expected = set(self.module.state_dict())
        if set(sd) != expected:
            missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
            raise DisconError(f"checkpoint {path} ({what}) does not fit this model: missing "
                              f"{missing[:8]}, unexpected {extra[:8]}")
        set_model_state_dict(self.module, sd, options=StateDictOptions(full_state_dict=True))

    def checkpoint_path(self) -> Path:
        return self.out / LAST

    def save(self) -> Path:
        """Write checkpoint-last.pth atomically (every rank takes part in the gathers)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        from .checkpoints import save_atomic
        model_sd = self._full_state()
        with self.ema.swapped():
            ema_sd = self._full_state()
        opt_sd = get_optimizer_state_dict(self.module, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        rngs = _gather(rng_state(self.generator), self.world)
        path = self.checkpoint_path()
        if self.rank == 0:
            state = {
                "model": model_sd, "model_ema": ema_sd, "optimizer": opt_sd,
                "scheduler": {"schedule": self.cfg.optimizer.schedule, "lr": self.lr,
                              "warmup_steps": self.warmup, "total_steps": self.total_steps},
                "step": self.step, "data": self.order.position(self.step),
                "rng": rngs, "world_size": self.world, "dropped_items": self.dropped,
                "format": CHECKPOINT_FORMAT, "recipe": self.recipe.name,
                "identity": json.dumps(_identity_keys(self.cfg), sort_keys=True),
                "config": yaml.safe_dump(self.cfg.as_dict(), sort_keys=False),
                "info": json.dumps(self.recipe.info),
                "hardware": json.dumps(hardware_record(self.device, self.precision))}
            save_atomic(state, path)
            if self.cfg.keep_every and self.step % self.cfg.keep_every == 0:
                save_atomic(state, self.out / f"checkpoint-{self.step:07d}.pth")
        if self.world > 1:
            torch.distributed.barrier()
        self.last_good = path
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Restore everything from a checkpoint written by :meth:`save`."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from .checkpoints import check_finite, load_file
        path = Path(path)
        state = load_file(path)
        if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
            raise DisconError(f"{path} is not a discon training checkpoint (format "
                              f"{state.get('format') if isinstance(state, Mapping) else None!r}); "
                              "to start from weights only, set components.<kind>.checkpoint")
        have, want = json.loads(state["identity"]), _identity_keys(self.cfg)
        if have != want:
            diff = sorted(k for k in want if have.get(k) != want.get(k))
            raise DisconError(f"cannot resume from {path}: the config differs in "
                              f"{', '.join(diff)} (checkpoint: "
                              f"{ {k: have.get(k) for k in diff} }, config: "
                              f"{ {k: want.get(k) for k in diff} })")
        for part in ("model", "model_ema"):
            check_finite(state[part], f"{path} ({part})")
        self._set_full_state(state["model_ema"], "model_ema", path)
        self.ema.copy_from_params()
        self._set_full_state(state["model"], "model", path)
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.step = int(state["step"])
        self.dropped = int(state.get("dropped_items", 0))
        if int(state["world_size"]) == self.world:
            set_rng_state(state["rng"][self.rank], self.generator)
        else:
            log.warning("resuming with %d processes from a %d-process checkpoint: the random "
                        "streams restart (the run continues, but not bit-exactly)",
                        self.world, int(state["world_size"]))
        self.last_good = path
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)

    def _trim_log(self) -> None:
        """Drop log lines past the step we start from (steps a killed run did not checkpoint)."""
        path = self.out / "log.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text(errors="replace").splitlines()
                if _log_step(line) is not None and _log_step(line) <= self.step]
        path.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _samples(self) -> None:
        if self.recipe.samples is None:
            return
        if not self.cfg.fsdp and self.rank != 0:
            return
        from .images import save_grid
        g = torch.Generator(self.device).manual_seed(self.cfg.seed)
        rng = torch.get_rng_state()  # sampling must not shift the training RNG streams
        self.module.eval()
        try:
            with self.ema.swapped(), torch.no_grad(), self._autocast():
                images = self.recipe.samples(self.module, g)
        except ImportError as e:
            log.warning("sample grid skipped: %s", e)
            images = None
        finally:
            self.module.train()
            torch.set_rng_state(rng)
        if images is not None and self.rank == 0:
            save_grid(images.float(), self.out / "samples" / f"step-{self.step:07d}.png")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, resume: str | os.PathLike | bool | None = None, overwrite: bool = False) -> int:
        """Train to ``total_steps``; ``resume``: a checkpoint path, True for
        out/checkpoint-last.pth, or "auto" (that file when it exists, else a fresh start)."""
        from tqdm.auto import tqdm

        from .data import StepBatches
        check_run_dir(self.out, resume, overwrite)
        if self.rank == 0:  # temp files of a save that was killed (SIGKILL skips the cleanup)
            for tmp in self.out.glob(".checkpoint-*.pth.*.tmp"):
                tmp.unlink(missing_ok=True)
        if resume:
            path = self.checkpoint_path() if resume in (True, "auto") else Path(resume)
            if path.is_file():
                self.load(path)
        if self.rank == 0:
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.as_dict(), sort_keys=False))
            self._trim_log()
        loader = torch.utils.data.DataLoader(
            StepBatches(self.recipe.dataset, self.order, self.recipe.collate, self.step,
                        self.total_steps),
            batch_size=None, shuffle=False, num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            # its own generator: creating the iterator must not draw from the global RNG,
            # which a resumed run has just restored
            generator=torch.Generator().manual_seed(self.cfg.seed))
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc=self.recipe.name,
                   disable=not self.cfg.progress or self.rank != 0)
        per_rank = self.cfg.batch_size // self.world
        t0, seen = time.perf_counter(), 0
        finite = FiniteCheck(self.device)
        self.wrapped.train()
        for batch in loader:
            self.dropped += per_rank - len(batch["labels"])
            batch = self._to_device(batch)
            lr = lr_at(self.step, lr=self.lr, warmup=self.warmup, total=self.total_steps,
                       schedule=self.cfg.optimizer.schedule, min_lr=self.cfg.optimizer.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with self._autocast():
                loss, logs = self.wrapped(batch, step=self.step, generator=self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip = self.cfg.grad_clip if self.cfg.grad_clip else float("inf")
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            if hasattr(gnorm, "full_tensor"):
                gnorm = gnorm.full_tensor()
            finite.record(loss.detach(), gnorm)  # on the device: no host sync per step
            self.optimizer.step()
            self.ema.update(self.step)
            self.step += 1
            seen += self.cfg.batch_size
            bar.update(1)
            log_now = self.step % self.cfg.log_every == 0 or self.step == self.total_steps
            save_now = self.step % self.cfg.ckpt_every == 0 or self.step == self.total_steps
            sample_now = self.cfg.sample_every and (self.step % self.cfg.sample_every == 0
                                                    or self.step == self.total_steps)
            if log_now or save_now or sample_now:
                # before anything is logged, saved or sampled: a non-finite step since the
                # last check stops the run (its weights are never written)
                finite.check(self, lr)
            if log_now:
                loss_value = float(loss.detach())
                dt = time.perf_counter() - t0
                record = {"step": self.step, "loss": loss_value, "lr": lr,
                          "grad_norm": float(gnorm), "images_per_s": seen / dt if dt else None,
                          **{k: float(v) for k, v in (logs or {}).items()}}
                if self.dropped:
                    record["dropped_items"] = self.dropped
                self._log(record)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                t0, seen = time.perf_counter(), 0
            if save_now:
                self.save()
            if sample_now:
                self._samples()
        bar.close()
        if self.step < self.total_steps:
            raise DisconError(f"data ran out at step {self.step} of {self.total_steps}")
        return self.step

    def _nonfinite(self, what: str, value: float, lr: float, failing: int) -> None:
        self._log({"step": failing, "event": "nonfinite", "what": what, "value": str(value),
                   "lr": lr})
        keep = (f"the last good checkpoint {self.last_good} is kept" if self.last_good
                else "no checkpoint was written yet")
        raise DisconError(f"{what} is {value} at step {failing}: training stopped; {keep}. "
                          "Lower the learning rate (optimizer.blr), keep grad_clip on, or use "
                          "precision: fp32, then continue with --resume")


def check_run_dir(out: Path, resume, overwrite: bool = False) -> None:
    """Refuse to clobber a run in ``out`` without --resume/--overwrite, and a --resume with
    nothing to resume; runs before the models are built."""
    from .runtime import check_output_dir
    check_output_dir(out, what="out")
    last = out / LAST
    if resume is True and not last.is_file():
        raise DisconError(f"--resume: {out} holds no {LAST} to continue; drop --resume to start "
                          "a fresh run")
    if resume not in (True, "auto") and resume and not Path(resume).is_file():
        state = "is a directory, expected a checkpoint file" if Path(resume).is_dir() else \
            "does not exist"
        raise DisconError(f"--resume: checkpoint {resume} {state}")
    held = [p.name for p in (last, out / "log.jsonl") if p.is_file()]
    if not resume and not overwrite and held:
        raise DisconError(f"out {out} already holds a training run ({', '.join(held)}); "
                          "continue it with --resume, or start afresh with --overwrite")


def train(cfg: TrainConfig, resume: str | os.PathLike | bool | None = None,
          overwrite: bool = False) -> Path:
    """Run one training config; returns the path of its final checkpoint. ``resume``: see
    :meth:`Trainer.fit`; ``overwrite`` lets a fresh run replace the one in ``cfg.out``."""
    from .runtime import output_dir, resolve_device
    resolve_device(cfg.device, what="device")  # before check_run_dir creates the folder
    with output_dir(cfg.out, what="out"):
        check_run_dir(Path(cfg.out), resume, overwrite)
        trainer = Trainer(cfg)
        try:
            trainer.fit(resume=resume, overwrite=overwrite)
        finally:
            teardown_distributed()
    return trainer.checkpoint_path()

