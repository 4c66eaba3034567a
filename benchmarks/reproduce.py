"""The paper's ablations at CPU scale on Fashion-MNIST, as one resumable study.

    python benchmarks/reproduce.py configs/paper_cpu.yaml --workers 2     # train + measure
    python benchmarks/reproduce.py configs/paper_cpu.yaml --render        # RESULTS.md + plots
    python benchmarks/reproduce.py configs/paper_cpu.yaml --quick         # tiny schedules

Every stage is trained by discon's own recipes (``discon_core.train``) or measured with
``discon_plugins.evaluation``; a stage is one unit of work with inputs (other stages) and an output:

    tok:<name>     a tokenizer            -> OUT/tok/<name>/checkpoint-last.pth
    cache:<name>   ids + moments of the training set, and the latents' normalization
    cont:<name>    a continuous model (plain MAR or DisCon: backbone + head)
    prior:<name>   a discrete prior
    tokens:...     class-balanced prior samples, kept for every continuous model that uses them
    eval:...       one measurement -> RESULTS/<stage>.json (metrics, N, seed, timing, settings)

A finished stage is skipped (its marker in ``OUT/.done`` records the settings it ran with; other
settings run it again: trainings continue from their checkpoint, the trainer refuses a changed
config naming the difference); an interrupted one resumes. With ``--workers K`` K processes
share the stages, each claiming (a lock folder per stage) the next one whose inputs are done.
Every preset combination is checked on the meta device before anything trains.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from discon_core.config import TrainConfig, check_keys, load_yaml
from discon_core.errors import DisconError
from discon_core.images import uint8_tensor as to_uint8
from discon_core.precision import hardware_record, resolve_precision

KEYS = {"out", "results", "seed", "threads", "data", "train_defaults", "tokenizers", "caches",
        "continuous_train", "continuous", "prior_train", "priors", "eval", "default",
        "ablation", "codebook_sweep"}
EVAL_KEYS = {"num", "sweep_num", "seeds", "batch_size", "prior", "prior_cfg_sweep",
             "mar_cfg_sweep", "ar_steps_sweep", "temperature_sweep", "inception_num", "rfid_num"}
CONT_KEYS = {"backbone", "head", "cache", "size", "overrides", "train", "role"}
SAMPLED_KEYS = {"temperature", "ar_steps", "head_steps", "step"}   # ablation rows on the base
# where each kind of measurement is scored: every choice (sweeps, figures, ablations) on the
# validation split carved out of train, the reported table rows once on test
SELECT, REPORT = "val", "test"
LAST = "checkpoint-last.pth"
TIERS = {None: 0, "ablation": 2, "codebook": 3}  # stage tiers by role (Stage.tier)
INCEPTION_TIER = 4
# measurements sample in fp32 on every machine, so rows compare across CPUs (bf16 sampling moved
# the embedded default's FID by 0.06: docs/speed.md); only training follows precision: auto
EVAL_DTYPE = "fp32"


def say(msg: str) -> None:
    print(f"[reproduce {os.getpid()}] {time.strftime('%H:%M:%S')} {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Config

def quick_profile(cfg: dict) -> dict:
    """Tiny schedules, batches and sample counts: every stage type runs and every table and plot
    renders, in a few minutes on 2 cores (docs/reproduction.md); the slow test runs it."""
    cfg = copy.deepcopy(cfg)
    cfg["out"] = cfg["out"].rstrip("/") + "_quick"
    cfg["results"] = str(Path(cfg["out"]) / "results")
    cfg["separate_run"] = True  # renders beside its results, never into RESULTS.md
    cfg["data"] = {**cfg["data"], "limit": 400}
    for sec in list(cfg["tokenizers"].values()):
        sec["train"].update(steps=20, batch_size=16, keep_every=None)
    for key in ("continuous_train", "prior_train"):
        cfg[key].update(steps=20, batch_size=16, keep_every=10, ckpt_every=10)
    for sec in cfg["priors"].values():
        sec["overrides"] = {**sec.get("overrides", {}), "randomness_anneal_start": 7,
                            "randomness_anneal_end": 14}
    for sec in cfg["continuous"].values():
        sec.get("train", {}).pop("steps", None)
    if cfg.get("ablation"):  # one trained lever (the prior-token one, if any: its own cache
        abl = cfg["ablation"]  # stage) and one sampled lever
        keep = ([k for k, v in abl["trained"].items() if "prior_tokens" in v]
                or list(abl["trained"]))[:1]
        abl["trained"] = {k: {**v, "train": {kk: vv for kk, vv in v.get("train", {}).items()
                                             if kk != "steps"}}
                          for k, v in abl["trained"].items() if k in keep}
        abl["sampled"] = {"half-training": {"step": 10}}
        if "steps" in abl:
            abl["steps"] = 10
    if cfg.get("codebook_sweep"):  # one more codebook size, at the tokenizers' quick steps
        cfg["codebook_sweep"].update(sizes=cfg["codebook_sweep"]["sizes"][:1], steps=20)
        if cfg["codebook_sweep"].get("cont_steps"):
            cfg["codebook_sweep"]["cont_steps"] = 10
    cfg["eval"].update(num=40, sweep_num=20, seeds=[0], batch_size=20, prior_cfg_sweep=[1.0, 2.0],
                       mar_cfg_sweep=[1.0, 2.0], ar_steps_sweep=[1, 16],
                       temperature_sweep=[1.0], inception_num=0, rfid_num=1000)
    return cfg


def expand(cfg: dict, path: str) -> dict:
    """The ablation's trained rows and the codebook sweep as ordinary config entries (role
    ``ablation`` / ``codebook``: trained like any other, kept out of the tables' roles)."""
    abl, cb = cfg.get("ablation"), cfg.get("codebook_sweep")
    if abl:
        check_keys(abl, {"base", "steps", "trained", "sampled"}, f"study config {path}: ablation")
        base = abl["base"]
        if base not in cfg["continuous"]:
            raise DisconError(f"study config {path}: ablation.base {base!r} is not one of "
                              f"{sorted(cfg['continuous'])}")
        for row, change in abl["trained"].items():
            check_keys(change, CONT_KEYS - {"role", "cache", "size"} | {"prior_tokens"},
                       f"study config {path}: ablation.trained.{row}")
            b = cfg["continuous"][base]
            cache = b["cache"]
            if "prior_tokens" in change:  # the base's cache, its tokens drawn by this prior
                prior = change["prior_tokens"]
                if prior not in cfg["priors"]:
                    raise DisconError(f"study config {path}: ablation.trained.{row}.prior_tokens "
                                      f"{prior!r} is not one of {sorted(cfg['priors'])}")
                cache = f"{b['cache']}+{prior}-tokens"
                cfg["caches"][cache] = {**cfg["caches"][b["cache"]], "from": b["cache"],
                                        "prior_tokens": prior}
            cfg["continuous"][f"{base}+{row}"] = {
                **b, "cache": cache,
                **{k: v for k, v in change.items() if k not in ("overrides", "train",
                                                                "prior_tokens")},
                "overrides": {**b.get("overrides", {}), **change.get("overrides", {})},
                # `steps`: the trained rows' shorter schedule (compare them with the base's
                # checkpoint at that step, a sampled row)
                "train": {**b.get("train", {}), **({"steps": int(abl["steps"])} if "steps" in abl
                                                   else {}), **change.get("train", {})},
                "role": "ablation"}
        for row, change in abl["sampled"].items():
            check_keys(change, SAMPLED_KEYS, f"study config {path}: ablation.sampled.{row}")
    if cb:
        check_keys(cb, {"dtok", "continuous", "sizes", "steps", "cont_steps"},
                   f"study config {path}: codebook_sweep")
        dtok, base = cb["dtok"], cb["continuous"]
        if dtok not in cfg["tokenizers"] or base not in cfg["continuous"]:
            raise DisconError(f"study config {path}: codebook_sweep names dtok {dtok!r} and "
                              f"continuous {base!r}; tokenizers: {sorted(cfg['tokenizers'])}, "
                              f"continuous: {sorted(cfg['continuous'])}")
        b = cfg["continuous"][base]
        for k in cb["sizes"]:
            t = copy.deepcopy(cfg["tokenizers"][dtok])
            t["overrides"] = {**t.get("overrides", {}), "codebook_size": int(k)}
            if cb.get("steps"):
                t["train"]["steps"] = int(cb["steps"])
            cfg["tokenizers"][f"{dtok}-k{k}"] = {**t, "role": "codebook"}
            cache = f"{b['cache']}-k{k}"
            cfg["caches"][cache] = {**cfg["caches"][b["cache"]], "dtok": f"{dtok}-k{k}"}
            cfg["continuous"][f"{base}-k{k}"] = {
                **b, "cache": cache, "role": "codebook",
                "overrides": {**b.get("overrides", {}), "cond_vocab_size": int(k)},
                **({"train": {**b.get("train", {}), "steps": int(cb["cont_steps"])}}
                   if cb.get("cont_steps") else {})}
    return cfg


def load_config(path: str, quick: bool = False) -> dict:
    cfg = load_yaml(path)
    check_keys(cfg, KEYS, f"study config {path}")
    check_keys(cfg["eval"], EVAL_KEYS, f"study config {path}: eval")
    for name, c in cfg["continuous"].items():
        check_keys(c, CONT_KEYS - {"role"}, f"study config {path}: continuous.{name}")
    if quick:
        cfg = quick_profile(cfg)
    cfg = expand(cfg, path)
    names = set(cfg["tokenizers"])
    for name, c in cfg["caches"].items():
        for kind in ("dtok", "ctok"):
            if c[kind] not in names:
                raise DisconError(f"study config {path}: caches.{name}.{kind} names tokenizer "
                                  f"{c[kind]!r}, not one of {sorted(names)}")
    for name, c in cfg["continuous"].items():
        if c["cache"] not in cfg["caches"]:
            raise DisconError(f"study config {path}: continuous.{name}.cache {c['cache']!r} is "
                              f"not one of {sorted(cfg['caches'])}")
    if cfg["eval"]["prior"] not in cfg["priors"]:
        raise DisconError(f"study config {path}: eval.prior {cfg['eval']['prior']!r} is not one "
                          f"of {sorted(cfg['priors'])}")
    return cfg


def run_options(cfg: dict, dtype: str | None = None, out: str | None = None) -> dict:
    """``--dtype``: every training stage's precision; ``--out``: a separate run (its own
    checkpoints and results, rendered beside them), e.g. to time the whole study in fp32."""
    cfg = copy.deepcopy(cfg)
    if dtype:
        cfg["train_defaults"] = {**cfg.get("train_defaults", {}), "precision": dtype}
    if out:
        cfg.update(out=str(out), results=str(Path(out) / "results"), separate_run=True)
    return cfg


def check_presets(cfg: dict) -> None:
    """Every combination the study will train or sample, checked on meta copies (grids,
    channels, vocabularies, classes) before any stage runs: one line naming the entries."""
    from discon_core.pipeline import check_compatible
    from discon_core.registry import build
    toks = cfg["tokenizers"]

    def meta(kind, spec):
        return build(kind, spec["preset"], device="meta", **spec.get("overrides", {}))

    dtok = next(iter(cfg["caches"].values()))["dtok"]  # the ids every prior is trained on
    for name, c in cfg["continuous"].items():
        cache = cfg["caches"][c["cache"]]
        bspec, hspec = specs(c)
        try:
            backbone, head = meta("backbone", bspec), meta("head", hspec)
            check_compatible(dtok=meta("dtok", toks[cache["dtok"]]), backbone=backbone,
                             head=head, ctok=meta("ctok", toks[cache["ctok"]]))
        except DisconError as e:
            raise DisconError(f"study config: continuous.{name} ({c['backbone']} on cache "
                              f"{c['cache']}): {e}") from None
    for name, p in cfg["priors"].items():
        try:
            check_compatible(prior=meta("prior", p), dtok=meta("dtok", toks[dtok]))
        except DisconError as e:
            raise DisconError(f"study config: priors.{name} ({p['preset']}): {e}") from None


def specs(c: dict) -> tuple[dict, dict]:
    """The backbone and head specs of a continuous entry (the head preset defaults to the
    backbone's name: each backbone preset has the head preset of its name)."""
    over = c.get("overrides", {})
    return ({"preset": c["backbone"], "overrides": over},
            {"preset": c.get("head", c["backbone"]), "overrides": over})


def stage_name(kind: str, name: str, seed: int = 0) -> str:
    """``cont:discon-m`` for seed 0, ``cont:discon-m:s1`` for a second training seed."""
    return f"{kind}:{name}" + (f":s{seed}" if seed else "")


def signature(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Stages

@dataclass
class Stage:
    name: str
    run: Callable[[], Any]
    deps: list[str] = field(default_factory=list)
    settings: Any = None          # what the stage's result depends on (its marker records it)
    tier: int = 0                 # ready stages run lowest tier first: the headline seed 0,
                                  # then the other seeds, the ablation, the codebook sweep,
                                  # Inception (slowest per point); an input takes the lowest
                                  # tier of the unfinished stages that need it


class Study:
    def __init__(self, cfg: dict, device: str = "cpu"):
        self.cfg, self.device = cfg, device
        self.out, self.results = Path(cfg["out"]), Path(cfg["results"])
        self.seed = int(cfg.get("seed", 0))
        self.ev = cfg["eval"]
        self.stages: dict[str, Stage] = {}
        self._extractors: dict[str, Any] = {}
        self._references: dict[tuple, Any] = {}
        # the continuous models by role (config order, smallest first): plain MAR, DisCon on the
        # first cache (the ids the priors learn), DisCon on the other caches (Figure 7); the
        # ablation's and the codebook sweep's models have roles of their own
        conts = {n: c for n, c in cfg["continuous"].items() if not c.get("role")}
        self.mars = [n for n, c in conts.items() if not self._has_cond(c)]
        self.discons = [n for n, c in conts.items() if self._has_cond(c)
                        and c["cache"] == self._id_cache()]
        self.other_ctok_discons = [n for n, c in conts.items() if self._has_cond(c)
                                   and n not in self.discons]
        # every headline seed trains its own Table 2-3 models and priors (seed 0: the sweeps')
        self.train_seeds = sorted({0, *map(int, self.ev["seeds"])})
        self._build_stages()

    # -- paths ---------------------------------------------------------------------------------
    def tok_ckpt(self, name: str) -> Path:
        return self.out / "tok" / name / LAST

    def cache_dir(self, name: str) -> Path:
        return self.out / "cache" / name

    def cont_dir(self, name: str, seed: int = 0) -> Path:
        return self.out / "cont" / (name + (f"-s{seed}" if seed else ""))

    def prior_dir(self, name: str, seed: int = 0) -> Path:
        return self.out / "prior" / (name + (f"-s{seed}" if seed else ""))

    def marker(self, stage: str) -> Path:
        return self.out / ".done" / (stage.replace(":", "__") + ".json")

    def result(self, stage: str) -> Path:
        return self.results / (stage.replace(":", "__") + ".json")

    def add(self, name, run, deps=(), settings=None, tier=0):
        self.stages[name] = Stage(name, run, list(deps), settings, tier)

    # -- training ------------------------------------------------------------------------------
    def _train_cfg(self, block: dict, seed: int = 0, **fields) -> TrainConfig:
        raw = {"device": self.device, **self.cfg.get("train_defaults", {}),
               **copy.deepcopy(block), **fields, "seed": self.seed + seed}
        # auto resolved here, so a stage records what it trained in (bf16 and fp32 runs of one
        # stage are different stages: one trained on another kind of CPU is not reused)
        raw["precision"] = resolve_precision(raw.get("precision", "auto"), self.device)
        return TrainConfig.from_dict(raw, where=f"study stage {fields['out']}")

    # settings a finished stage may change and still be continued (more steps) or re-logged
    FREE_KEYS = {"steps", "epochs", "progress", "ckpt_every", "keep_every", "log_every",
                 "sample_every", "num_samples", "device", "num_workers"}

    def _train(self, cfg: TrainConfig) -> Path:
        """Train (or continue) one stage; a stage folder trained with other settings is refused,
        naming them (the trainer itself only guards what breaks an exact resume)."""
        from discon_core.train import train
        saved = Path(cfg.out) / "config.yaml"
        if saved.is_file():
            old, new = load_yaml(saved), json.loads(json.dumps(cfg.as_dict(), default=str))
            diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                    if k not in self.FREE_KEYS and old.get(k) != new.get(k)}
            if diff:
                raise DisconError(f"{cfg.out} was trained with other settings ("
                                  + "; ".join(f"{k}: {a!r} there, {b!r} now"
                                              for k, (a, b) in diff.items())
                                  + "); restore them or delete the folder to retrain")
        return train(cfg, resume="auto")

    def _ctok_overrides(self, cache: str) -> dict:
        norm = json.loads((self.cache_dir(cache) / "normalization.json").read_text())
        return ({"latents_stats": str(self.cache_dir(cache) / "latents_stats.pt")}
                if norm["kind"] == "stats" else {"scale_factor": norm["scale_factor"]})

    def _build_stages(self) -> None:
        cfg = self.cfg
        data = cfg["data"]
        for name, t in cfg["tokenizers"].items():
            tc = self._train_cfg(t["train"], recipe="tokenizer", data=data,
                                 out=str(self.out / "tok" / name),
                                 components={"tokenizer": {"kind": t["kind"], "preset": t["preset"],
                                                           "overrides": t.get("overrides", {})}})
            self.add(f"tok:{name}", lambda tc=tc: self._train(tc), settings=tc.as_dict(),
                     tier=TIERS[t.get("role")])
        for name, c in cfg["caches"].items():
            self.add(f"cache:{name}", lambda name=name: self.build_cache(name),
                     deps=([f"cache:{c['from']}", f"prior:{c['prior_tokens']}"] if "from" in c
                           else [f"tok:{c['dtok']}", f"tok:{c['ctok']}"]),
                     settings={"data": data, **c},
                     tier=TIERS[cfg["tokenizers"][c["dtok"]].get("role")])
        table = set(self.mars + self.discons)
        for name, c in cfg["continuous"].items():
            for seed in (self.train_seeds if name in table else [0]):
                self.add(stage_name("cont", name, seed),
                         lambda name=name, seed=seed: self._train(self.cont_cfg(name, seed)),
                         deps=[f"cache:{c['cache']}"],
                         settings={**c, **cfg["continuous_train"], "seed": seed},
                         tier=max(TIERS[c.get("role")], min(seed, 1)))
        for name, p in cfg["priors"].items():
            for seed in self.train_seeds:
                self.add(stage_name("prior", name, seed),
                         lambda name=name, seed=seed: self._train(self.prior_cfg(name, seed)),
                         deps=[f"cache:{self._id_cache()}"],
                         settings={**p, **cfg["prior_train"], "seed": seed}, tier=min(seed, 1))
        self._eval_stages()

    def _id_cache(self) -> str:
        return next(iter(self.cfg["caches"]))

    def cont_cfg(self, name: str, seed: int = 0) -> TrainConfig:
        c = self.cfg["continuous"][name]
        cache = self.cfg["caches"][c["cache"]]
        toks = self.cfg["tokenizers"]
        bspec, hspec = specs(c)
        opts = {} if self._has_cond(c) else {"use_cond": False}
        return self._train_cfg({**self.cfg["continuous_train"], **c.get("train", {})}, seed,
                               recipe="discon", out=str(self.cont_dir(name, seed)),
                               recipe_options=opts,
                               data={"cache": str(self.cache_dir(c["cache"]))},
                               components={"backbone": bspec, "head": hspec,
                                           "dtok": {"preset": toks[cache["dtok"]]["preset"],
                                                    "overrides": toks[cache["dtok"]].get(
                                                        "overrides", {})},
                                           "ctok": {"preset": toks[cache["ctok"]]["preset"],
                                                    "overrides": self._ctok_overrides(c["cache"])}})

    def prior_cfg(self, name: str, seed: int = 0) -> TrainConfig:
        p = self.cfg["priors"][name]
        cache = self._id_cache()
        dtok = self.cfg["tokenizers"][self.cfg["caches"][cache]["dtok"]]["preset"]
        return self._train_cfg(self.cfg["prior_train"], seed, recipe="prior",
                               out=str(self.prior_dir(name, seed)),
                               data={"cache": str(self.cache_dir(cache))},
                               components={"prior": {"preset": p["preset"],
                                                     "overrides": p.get("overrides", {})},
                                           "dtok": dtok})

    def _has_cond(self, c: dict) -> bool:
        from discon_core.registry import resolve
        params = {**resolve("backbone", c["backbone"]).params, **c.get("overrides", {})}
        return bool(params.get("cond_vocab_size", 0))

    def build_cache(self, name: str) -> None:
        from discon_plugins.cache import CachedDataset, build_cache, prior_tokens_cache
        c = self.cfg["caches"][name]
        toks = self.cfg["tokenizers"]
        out = self.cache_dir(name)
        if "from" in c:  # the same moments; tokens drawn from the prior, seed 0's
            src, p = self.cache_dir(c["from"]), c["prior_tokens"]
            prior_tokens_cache(src, out, self.prior_module(p).eval(),
                               prior_checkpoint=self.prior_dir(p) / LAST, seed=self.seed,
                               progress=False)
            for f in ("normalization.json", "latents_stats.pt"):
                if (src / f).is_file():
                    shutil.copyfile(src / f, out / f)
            return
        build_cache(self.cfg["data"], out, dtok=toks[c["dtok"]]["preset"],
                    ctok=toks[c["ctok"]]["preset"], dtok_checkpoint=str(self.tok_ckpt(c["dtok"])),
                    ctok_checkpoint=str(self.tok_ckpt(c["ctok"])), shard_size=5000,
                    batch_size=256, device=self.device, progress=False,
                    dtok_overrides=toks[c["dtok"]].get("overrides", {}))
        # normalization of the raw latents, from posterior draws of the cached moments:
        # per channel (VA-VAE's latents_stats.pt) or one scale (LDM's scale_factor = 1/std)
        from discon_core.registry import build
        from discon_plugins.kl_vae import compute_latents_stats, save_latents_stats
        ctok = build("ctok", toks[c["ctok"]]["preset"], checkpoint=self.tok_ckpt(c["ctok"]),
                     dtype="fp32")
        ds = CachedDataset(out)
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(ds), generator=g)[:10000]
        draws = torch.cat([ctok.posterior(torch.stack([ds.get(int(i))["moments"]
                                                       for i in idx[s:s + 500]])).sample(g)
                           for s in range(0, len(idx), 500)])
        if "latents_stats" in ctok_params(toks[c["ctok"]]["preset"]):
            save_latents_stats(compute_latents_stats(draws), out / "latents_stats.pt")
            norm = {"kind": "stats"}
        else:
            norm = {"kind": "scale", "scale_factor": float(1.0 / draws.std())}
        (out / "normalization.json").write_text(json.dumps(norm))

    # -- measuring -----------------------------------------------------------------------------
    def _eval_stages(self) -> None:
        ev, cfg = self.ev, self.cfg
        best_prior = ev["prior"]
        mars, discons = self.mars, self.discons
        ref_inc = []  # every Inception row waits on the test split's statistics, made once
        if ev.get("inception_num"):
            ref_inc = ["ref:inception"]
            self.add("ref:inception", lambda: self.make_reference("inception"),
                     settings={"split": REPORT, "extractor": "inception"}, tier=INCEPTION_TIER)
        for name, t in cfg["tokenizers"].items():
            if t.get("role"):
                continue  # the codebook sweep's dtoks are scored by eval:codebook
            self.add(f"eval:rfid:{name}", lambda name=name: self.eval_rfid(name),
                     deps=[f"tok:{name}"] + [f"cache:{c}" for c, v in cfg["caches"].items()
                                             if v["ctok"] == name][:1],
                     settings={"tok": name, **({"ref_n": ev["rfid_num"]} if ev.get("rfid_num")
                                               else {})})
            if ev.get("inception_num"):  # the same in Inception features, N = inception_num
                self.add(f"eval:rfid_inception:{name}",
                         lambda name=name: self.eval_rfid(name, "inception", ev["inception_num"]),
                         deps=[f"tok:{name}"] + [f"cache:{c}" for c, v in cfg["caches"].items()
                                                 if v["ctok"] == name][:1] + ref_inc,
                         settings={"tok": name, "n": ev["inception_num"]}, tier=INCEPTION_TIER)
        # every sweep below is scored on the validation split (SELECT); its choice is used by
        # the table rows, scored once on test (REPORT)
        sel = {"split": SELECT}
        # prior guidance, chosen on the strongest prior alone (sweep_num, seed 0)
        for s in ev["prior_cfg_sweep"]:
            self.add(f"eval:prior_cfg:{best_prior}:{s}",
                     lambda s=s: self.eval_prior_alone(best_prior, 0, ev["sweep_num"], s),
                     deps=[f"prior:{best_prior}"], settings={"cfg": s, "n": ev["sweep_num"], **sel})
        cfg_deps = [f"eval:prior_cfg:{best_prior}:{s}" for s in ev["prior_cfg_sweep"]]
        # the guidance a sweep chose is part of what its dependants were made with
        psw, msw = {"prior_sweep": ev["prior_cfg_sweep"]}, {"mar_sweep": ev["mar_cfg_sweep"]}
        # MAR guidance, chosen on the smallest MAR at 64 steps
        for s in ev["mar_cfg_sweep"]:
            self.add(f"eval:mar_cfg:{mars[0]}:{s}",
                     lambda s=s: self.eval_cont(mars[0], None, 0, ev["sweep_num"], split=SELECT,
                                                cfg_scale=s, ar_steps=64),
                     deps=[f"cont:{mars[0]}"], settings={"cfg": s, "n": ev["sweep_num"], **sel})
        mar_deps = [f"eval:mar_cfg:{mars[0]}:{s}" for s in ev["mar_cfg_sweep"]]
        # MAR's head temperature at its best guidance; DisCon's on the smallest DisCon (Figure 7)
        s_mar, s_dis = mars[0], discons[0]
        tsw = {"temperature_sweep": ev["temperature_sweep"]}
        for t in ev["temperature_sweep"]:
            self.add(f"eval:mar_temp:{s_mar}:{t}",
                     lambda t=t: self.eval_cont(s_mar, None, 0, ev["sweep_num"], ar_steps=64,
                                                split=SELECT,
                                                cfg_scale=self.best("mar_cfg", "cfg_scale"),
                                                temperature=t),
                     deps=[f"cont:{s_mar}"] + mar_deps, settings={"t": t, **msw, **sel})
        mar_deps += [f"eval:mar_temp:{s_mar}:{t}" for t in ev["temperature_sweep"]]
        msw = {**msw, **tsw, **sel}
        sweep_tokens = f"tokens:{best_prior}:0:{ev['sweep_num']}"
        self.add(sweep_tokens, lambda: self.make_tokens(best_prior, 0, ev["sweep_num"]),
                 deps=[f"prior:{best_prior}"] + cfg_deps, settings={"n": ev["sweep_num"], **psw})
        # Figure 7: FID vs head temperature, the two continuous tokenizers
        for d in [s_dis] + self.other_ctok_discons:
            for t in ev["temperature_sweep"]:
                self.add(f"eval:fig7:{d}:{t}",
                         lambda d=d, t=t: self.eval_cont(d, best_prior, 0, ev["sweep_num"],
                                                         split=SELECT, temperature=t),
                         deps=[sweep_tokens, f"cont:{d}"], settings={"t": t, **psw, **sel})
        dis_deps = [f"eval:fig7:{s_dis}:{t}" for t in ev["temperature_sweep"]]
        psw = {**psw, **sel}
        dsw = {**psw, **tsw}

        def mar_kw() -> dict:    # MAR rows: all tokens in 64 steps, its chosen guidance + temp.
            return {"ar_steps": 64, "cfg_scale": self.best("mar_cfg", "cfg_scale"),
                    "temperature": self.best(f"mar_temp__{s_mar}", "temperature")}

        def dis_kw() -> dict:    # DisCon rows: the temperature chosen on the smallest DisCon
            return {"temperature": self.best(f"fig7__{s_dis}", "temperature")}

        # prior samples: every prior and headline seed (its own trained prior), N = num
        for p in cfg["priors"]:
            for seed in ev["seeds"]:
                self.add(f"tokens:{p}:{seed}:{ev['num']}",
                         lambda p=p, seed=seed: self.make_tokens(p, seed, ev["num"]),
                         deps=[stage_name("prior", p, seed)] + cfg_deps,
                         settings={"n": ev["num"], **psw}, tier=min(seed, 1))
                # Table 3: the prior alone (its tokens through the discrete decoder)
                self.add(f"eval:table3:{p}:dtok:{seed}",
                         lambda p=p, seed=seed: self.eval_prior_tokens(p, seed, ev["num"]),
                         deps=[f"tokens:{p}:{seed}:{ev['num']}"], settings={"n": ev["num"], **psw},
                         tier=min(seed, 1))
                for d in discons:
                    self.add(f"eval:table3:{p}:{d}:{seed}",
                             lambda p=p, d=d, seed=seed: self.eval_cont(
                                 d, p, seed, ev["num"], trained_seed=seed, **dis_kw()),
                             deps=[f"tokens:{p}:{seed}:{ev['num']}",
                                   stage_name("cont", d, seed)] + dis_deps,
                             settings={"n": ev["num"], **dsw}, tier=min(seed, 1))
        # Table 2: MAR at 64 steps (its best guidance and temperature) vs DisCon at 16 steps
        for m in mars:
            for seed in ev["seeds"]:
                self.add(f"eval:table2:{m}:{seed}",
                         lambda m=m, seed=seed: self.eval_cont(m, None, seed, ev["num"],
                                                               trained_seed=seed, **mar_kw()),
                         deps=[stage_name("cont", m, seed)] + mar_deps,
                         settings={"n": ev["num"], **msw}, tier=min(seed, 1))
        # Figure 6: FID vs AR steps, MAR and DisCon of the smallest size
        for k in ev["ar_steps_sweep"]:
            self.add(f"eval:fig6:{s_dis}:{k}",
                     lambda k=k: self.eval_cont(s_dis, best_prior, 0, ev["sweep_num"], split=SELECT,
                                                **{**dis_kw(), "ar_steps": k}),
                     deps=[sweep_tokens, f"cont:{s_dis}"] + dis_deps, settings={"k": k, **dsw})
            self.add(f"eval:fig6:{s_mar}:{k}",
                     lambda k=k: self.eval_cont(s_mar, None, 0, ev["sweep_num"], split=SELECT,
                                                **{**mar_kw(), "ar_steps": k}),
                     deps=[f"cont:{s_mar}"] + mar_deps, settings={"k": k, **msw})
        # Figure 8: FID vs training progress (the kept checkpoints)
        ct = cfg["continuous_train"]
        keep = ct.get("keep_every") or ct["steps"]
        for step in range(keep, ct["steps"] + 1, keep):
            self.add(f"eval:fig8:{s_mar}:{step}",
                     lambda step=step: self.eval_cont(s_mar, None, 0, ev["sweep_num"], step=step,
                                                      split=SELECT, **mar_kw()),
                     deps=[f"cont:{s_mar}"] + mar_deps, settings={"step": step, **msw})
            self.add(f"eval:fig8:{s_dis}:{step}",
                     lambda step=step: self.eval_cont(s_dis, best_prior, 0, ev["sweep_num"],
                                                      step=step, split=SELECT, **dis_kw()),
                     deps=[f"cont:{s_dis}", sweep_tokens] + dis_deps,
                     settings={"step": step, **dsw})
        # Figures 2 and 5: pictures
        self.add("eval:figures", lambda: self.figures(discons[-1], best_prior, **dis_kw()),
                 deps=[sweep_tokens, f"cont:{discons[-1]}"] + dis_deps, settings=dsw)
        # where DisCon loses against the discrete decode: the same 1,000 test images through the
        # dtok, the ctok, and DisCon completing their TRUE discrete tokens (no prior)
        for d in discons:
            self.add(f"eval:oracle:{d}", lambda d=d: self.eval_oracle(d, ev["num"], **dis_kw()),
                     deps=[f"cont:{d}"] + dis_deps, settings={"n": ev["num"], **dsw})
        # the ablation: one lever per row against its base (validation split, oracle + e2e)
        abl = cfg.get("ablation")
        if abl:
            base = abl["base"]
            rows = {"base": (base, {})}
            rows.update({r: (f"{base}+{r}", {}) for r in abl["trained"]})
            rows.update({r: (base, dict(kw)) for r, kw in abl["sampled"].items()})
            for row, (model, kw) in rows.items():
                self.add(f"eval:ablation:{row}",
                         lambda row=row, model=model, kw=kw: self.eval_ablation(
                             row, model, ev["sweep_num"], **{**dis_kw(), **kw}),
                         deps=[sweep_tokens, f"cont:{model}"] + dis_deps,
                         settings={"model": model, **kw, "n": ev["sweep_num"], **dsw}, tier=2)
        # the codebook sweep: dtok decode, DisCon and ctok reconstruction of the same images'
        # true tokens, against the codebook size (validation split)
        cb = cfg.get("codebook_sweep")
        if cb:
            main_k = self.dtok_codebook(cfg["continuous"][cb["continuous"]]["cache"])
            for k in sorted({main_k, *map(int, cb["sizes"])}):
                model = cb["continuous"] if k == main_k else f"{cb['continuous']}-k{k}"
                # the main size: the base's checkpoint at the sweep's training length
                step = cb.get("cont_steps") if k == main_k else None
                self.add(f"eval:codebook:{k}",
                         lambda k=k, model=model, step=step: self.eval_codebook(
                             k, model, ev["sweep_num"], step=step, **dis_kw()),
                         deps=[f"cont:{model}"] + dis_deps,
                         settings={"n": ev["sweep_num"], "step": step, **dsw}, tier=3)
        # the bf16 autocast measurement (images/s and final loss vs fp32, one stage)
        self.add("eval:bf16_check", lambda: self.bf16_check(s_dis),
                 deps=[f"cache:{self._id_cache()}"], settings={"steps": 300})
        # Inception FID of the headline pair (the largest DisCon and the discrete decode of the
        # same prior tokens) and the largest MAR: seed 0, N = inception_num, against the
        # statistics of the whole test split (computed once, cached under $DISCON_HOME/eval)
        if ev.get("inception_num"):
            n, tok = ev["inception_num"], f"tokens:{best_prior}:0:{ev['num']}"
            self.add(f"eval:inception:{mars[-1]}",
                     lambda: self.eval_cont(mars[-1], None, 0, n, extractor="inception",
                                            **mar_kw()),
                     deps=[f"cont:{mars[-1]}"] + mar_deps + ref_inc, settings={"n": n, **msw},
                     tier=INCEPTION_TIER)
            self.add(f"eval:inception:{discons[-1]}",
                     lambda: self.eval_cont(discons[-1], best_prior, 0, n, from_n=ev["num"],
                                            extractor="inception", **dis_kw()),
                     deps=[f"cont:{discons[-1]}", tok] + dis_deps + ref_inc,
                     settings={"n": n, **dsw}, tier=INCEPTION_TIER)
            self.add(f"eval:inception:{best_prior}:dtok",
                     lambda: self.eval_prior_tokens(best_prior, 0, ev["num"], n=n,
                                                    extractor="inception"),
                     deps=[tok] + ref_inc, settings={"n": n, **psw}, tier=INCEPTION_TIER)

    def best(self, sweep: str, key: str) -> float:
        """The ``settings[key]`` with the lowest FID among the finished ``eval:<sweep>...`` rows
        (all scored on the validation split)."""
        rows = [json.loads(p.read_text()) for p in self.results.glob(f"eval__{sweep}__*.json")]
        if not rows:
            raise DisconError(f"the {sweep} sweep has no results in {self.results}")
        return min(rows, key=lambda r: r["fid"])["settings"][key]

    def tokens_path(self, prior: str, seed: int, n: int) -> Path:
        return self.out / "tokens" / f"{prior}-seed{seed}-n{n}.pt"

    def build(self, kind, preset, ckpt, **over):
        from discon_core.registry import build
        return build(kind, preset, checkpoint=ckpt, device=self.device, dtype=EVAL_DTYPE,
                     **over).eval()

    def prior_module(self, p: str, seed: int = 0):
        spec = self.cfg["priors"][p]
        return self.build("prior", spec["preset"], self.prior_dir(p, seed) / LAST,
                          **spec.get("overrides", {}))

    def dtok_module(self, cache: str | None = None):
        name = self.cfg["caches"][cache or self._id_cache()]["dtok"]
        t = self.cfg["tokenizers"][name]
        return self.build("dtok", t["preset"], self.tok_ckpt(name), **t.get("overrides", {}))

    def dtok_codebook(self, cache: str) -> int:
        from discon_core.registry import resolve
        t = self.cfg["tokenizers"][self.cfg["caches"][cache]["dtok"]]
        return int({**resolve("dtok", t["preset"]).params, **t.get("overrides", {})}["codebook_size"])

    @torch.no_grad()
    def sample_prior(self, p: str, seed: int, n: int, cfg_scale: float):
        from discon_plugins.generate import _batch_seed, balanced_labels
        prior = self.prior_module(p, seed)
        from discon_core.pipeline import _sampling
        sampling = _sampling(prior)
        labels = balanced_labels(n, prior.num_classes)
        bs, out = self.ev["batch_size"], []
        t0 = time.perf_counter()
        for k in range(-(-n // bs)):
            g = torch.Generator().manual_seed(_batch_seed(seed, k))
            out.append(prior.sample(labels[k * bs:(k + 1) * bs], cfg_scale=cfg_scale,
                                    temperature=float(sampling.get("temperature", 1.0)),
                                    guidance_scale_pow=float(sampling.get("guidance_scale_pow", 0.0)),
                                    generator=g))
        return torch.cat(out), labels, (time.perf_counter() - t0) / n

    def make_tokens(self, p: str, seed: int, n: int) -> None:
        """Class-balanced samples of prior ``p`` as trained with ``seed``, sampled with it."""
        cfg_scale = self.best("prior_cfg", "cfg_scale")
        tokens, labels, sec = self.sample_prior(p, seed, n, cfg_scale)
        path = self.tokens_path(p, seed, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        from discon_core.checkpoints import save_atomic
        save_atomic({"tokens": tokens, "labels": labels, "sec_per_img": torch.tensor(sec),
                     "cfg_scale": torch.tensor(cfg_scale)}, path)

    def load_tokens(self, p: str, seed: int, n: int) -> dict:
        return torch.load(self.tokens_path(p, seed, n), weights_only=True)

    def extractor(self, name: str):
        """One instance per extractor for the whole process (Inception: a checked 87 MB file)."""
        from discon_plugins import evaluation as metrics
        if name not in self._extractors:
            self._extractors[name] = metrics.get_extractor(name, self.device)
        return self._extractors[name]

    def reference(self, split: str = REPORT, n: int | None = None):
        """Fashion-MNIST ``split`` (or its first n images), read once; its features are cached
        per extractor under $DISCON_HOME/eval."""
        from discon_plugins import evaluation as metrics
        if (split, n) not in self._references:
            ref = metrics.load_input(f"fashion-mnist:{split}")
            if n:  # a fixed subset (the quick profile's rFID)
                ref = metrics.EvalInput(f"fashion-mnist:{split}[:{n}]",
                                        images=torch.utils.data.Subset(ref.images, range(n)),
                                        labels=ref.labels[:n],
                                        cache_key=f"{ref.cache_key}-first{n}")
            self._references[split, n] = ref
        return self._references[split, n]

    def make_reference(self, extractor: str) -> None:
        """The ``extractor`` features, FID statistics and pixel statistics of the whole report
        split, cached under $DISCON_HOME/eval: a stage of its own, so that one worker computes
        them (10,000 Inception passes, the slowest input of the study) while the others train."""
        from discon_plugins import evaluation as metrics
        ref = self.reference(REPORT)
        metrics.reference_statistics(ref, self.extractor(extractor),
                                     device=torch.device(self.device), batch_size=250)
        metrics.pixels_of(ref)

    def score(self, images: torch.Tensor, labels: torch.Tensor, extractor: str = "fmnist",
              split: str = REPORT) -> dict:
        from discon_plugins import evaluation as metrics
        ext = self.extractor(extractor)
        gen = metrics.EvalInput("generated", images=metrics.TensorImages(images), labels=labels)
        ref = self.reference(split)
        names = ["fid", "kid", "isc", "prc"] if ext.num_classes else ["fid", "kid", "prc"]
        row = metrics.compute(gen, ref, ext, names, device=self.device,
                              kid_subset_size=min(1000, len(images)), batch_size=250)
        return {**row, "split": split}   # with pixels + pixel_check against the same split

    def write(self, stage: str, row: dict) -> None:
        from discon_core.checkpoints import portable, save_atomic
        row = {"stage": stage, **row, "machine": machine(),
               "hardware": hardware_record(self.device, EVAL_DTYPE),
               "date": time.strftime("%Y-%m-%d"),
               "signature": signature(self.stages[stage].settings)}
        row.pop("sample", None)
        save_atomic(portable(row), self.result(stage))

    def eval_prior_alone(self, p: str, seed: int, n: int, cfg_scale: float) -> None:
        tokens, labels, sec = self.sample_prior(p, seed, n, cfg_scale)
        images, dec = self.decode_ids(tokens)
        row = self.score(images, labels, split=SELECT)
        self.write(self._current,
                   {**row, "settings": {"prior": p, "cfg_scale": cfg_scale, "seed": seed},
                    "sec_per_img": sec + dec})

    @torch.no_grad()
    def decode_ids(self, tokens: torch.Tensor, cache: str | None = None):
        dtok = self.dtok_module(cache)
        t0 = time.perf_counter()
        images = torch.cat([dtok.decode(tokens[i:i + 250]) for i in range(0, len(tokens), 250)])
        return to_uint8(images), (time.perf_counter() - t0) / len(tokens)

    def eval_prior_tokens(self, p: str, seed: int, num: int, n: int | None = None,
                          extractor: str = "fmnist") -> None:
        """Prior ``p``'s saved tokens (the first ``n`` of ``num``) through the discrete decoder."""
        t = self.load_tokens(p, seed, num)
        n = n or num
        images, dec = self.decode_ids(t["tokens"][:n])
        row = self.score(images, t["labels"][:n], extractor)
        prior = self.prior_module(p, seed)
        self.write(self._current, {
            **row, "settings": {"prior": p, "decoder": "dtok", "seed": seed,
                                "prior_cfg": float(t["cfg_scale"])},
            "params_prior": n_params(prior), "sec_per_img": float(t["sec_per_img"]) + dec,
            "sec_per_img_prior": float(t["sec_per_img"])})

    def cont_modules(self, name: str, step: int | None = None, seed: int = 0,
                     head_steps: str | None = None):
        """Backbone, head and ctok of continuous model ``name`` as trained with ``seed``, at
        ``step`` (None: the end of its schedule); ``head_steps``: another sampling schedule of
        the head (e.g. ``ddim50``)."""
        c = self.cfg["continuous"][name]
        end = {**self.cfg["continuous_train"], **c.get("train", {})}["steps"]
        d = self.cont_dir(name, seed)
        ckpt = d / (f"checkpoint-{step:07d}.pth" if step and step != end else LAST)
        bspec, hspec = specs(c)
        backbone = self.build("backbone", bspec["preset"], ckpt, **bspec["overrides"])
        head = self.build("head", hspec["preset"], ckpt, **hspec["overrides"],
                          **({"num_sampling_steps": str(head_steps)} if head_steps else {}))
        cache = self.cfg["caches"][c["cache"]]
        ctok = self.build("ctok", self.cfg["tokenizers"][cache["ctok"]]["preset"],
                          self.tok_ckpt(cache["ctok"]), **self._ctok_overrides(c["cache"]))
        return backbone, head, ctok

    @torch.no_grad()
    def generate(self, name, prior, seed, n, *, step=None, ar_steps=None, temperature=None,
                 cfg_scale=None, from_n=None, trained_seed=0, head_steps=None):
        """Images of continuous model ``name`` (from ``prior``'s saved tokens of ``seed`` for
        DisCon); returns uint8 images, labels, sec/img of the continuous stage + decoder."""
        from discon_core import sample_tokens
        from discon_plugins.generate import _batch_seed, balanced_labels
        backbone, head, ctok = self.cont_modules(name, step, trained_seed, head_steps)
        from discon_core.pipeline import _sampling
        sampling = _sampling(backbone)
        ar_steps = int(ar_steps or sampling.get("ar_steps", 16))
        cfg_scale = float(cfg_scale if cfg_scale is not None else 1.0)
        temperature = float(temperature if temperature is not None else 1.0)
        if prior is not None:
            t = self.load_tokens(prior, seed, from_n or n)  # from_n: first n of a larger set
            labels, cond = t["labels"][:n], t["tokens"][:n].flatten(1)
        else:
            labels, cond = balanced_labels(n, backbone.class_num), None
        images, sec = self.complete(backbone, head, ctok, labels, cond, ar_steps=ar_steps,
                                    temperature=temperature, cfg_scale=cfg_scale,
                                    seed_of=lambda k: _batch_seed(seed, k) + 7)
        settings = {"model": name, "prior": prior, "seed": seed, "trained_seed": trained_seed,
                    "ar_steps": ar_steps, "temperature": temperature, "cfg_scale": cfg_scale,
                    "step": step or {**self.cfg["continuous_train"],
                                     **self.cfg["continuous"][name].get("train", {})}["steps"],
                    "head_steps": getattr(head, "num_sampling_steps", None)}
        return images, labels, sec, settings, n_params(backbone, head)

    @torch.no_grad()
    def complete(self, backbone, head, ctok, labels, cond, *, ar_steps, temperature,
                 cfg_scale=1.0, seed_of=lambda k: k):
        """The continuous stage in batches (batch k seeded ``seed_of(k)``), decoded: uint8
        images and seconds per image."""
        from discon_core import sample_tokens
        bs, out = self.ev["batch_size"], []
        t0 = time.perf_counter()
        for k in range(-(-len(labels) // bs)):
            sl = slice(k * bs, (k + 1) * bs)
            x = sample_tokens(backbone, head, labels[sl], cond=None if cond is None else cond[sl],
                              ar_steps=ar_steps, temperature=temperature, cfg_scale=cfg_scale,
                              generator=torch.Generator().manual_seed(seed_of(k)))
            out.append(ctok.decode(backbone.unpatchify(x)))
        return to_uint8(torch.cat(out)), (time.perf_counter() - t0) / len(labels)

    def eval_cont(self, name, prior, seed, n, extractor="fmnist", split=REPORT, **kw) -> None:
        images, labels, sec, settings, params = self.generate(name, prior, seed, n, **kw)
        row = self.score(images, labels, extractor, split)
        sec_prior = (float(self.load_tokens(prior, seed, kw.get("from_n") or n)["sec_per_img"])
                     if prior else 0.0)
        self.write(self._current, {**row, "settings": settings, "params": params,
                                   "sec_per_img": sec + sec_prior, "sec_per_img_prior": sec_prior,
                                   "sec_per_img_continuous": sec})

    @torch.no_grad()
    def figures(self, name: str, prior: str, temperature: float = 1.0) -> None:
        """Figure 2 (the same prior tokens: discrete decoder vs DisCon) and Figure 5 (one set of
        samples at 1, 4, 16, 32 AR steps), 2 images per class."""
        from discon_core import sample_tokens
        from discon_core.images import save_grid
        t = self.load_tokens(prior, 0, self.ev["sweep_num"])
        idx = torch.arange(20)
        tokens, labels = t["tokens"][idx], t["labels"][idx]
        backbone, head, ctok = self.cont_modules(name)
        self.results.mkdir(parents=True, exist_ok=True)
        rows = [self.dtok_module().decode(tokens)]
        for k in (1, 4, 16, 32):
            g = torch.Generator().manual_seed(0)
            x = sample_tokens(backbone, head, labels, cond=tokens.flatten(1), ar_steps=k,
                              temperature=temperature, generator=g)
            rows.append(ctok.decode(backbone.unpatchify(x)))
        save_grid(torch.cat([rows[0], rows[3]]), self.results / "fig2_discrete_vs_discon.png",
                  nrow=20, upscale=2)
        save_grid(torch.cat(rows[1:]), self.results / "fig5_ar_steps.png", nrow=20, upscale=2)
        self.write("eval:figures", {"files": ["fig2_discrete_vs_discon.png", "fig5_ar_steps.png"],
                                    "settings": {"model": name, "prior": prior, "images": 20,
                                                 "temperature": temperature,
                                                 "fig5_ar_steps": [1, 4, 16, 32]}})

    def bf16_check(self, name: str) -> None:
        """One stage trained twice from the same seed, fp32 vs bf16 autocast: images/s and the
        final training loss (mean of the last logged values)."""
        rows, steps = {}, min(300, self.cfg["continuous_train"]["steps"])
        for precision in ("fp32", "bf16"):
            cfg = self.cont_cfg(name)
            raw = cfg.as_dict()
            raw.update(out=str(self.out / "bf16_check" / precision), precision=precision,
                       steps=steps, keep_every=None, ckpt_every=steps, log_every=10)
            cfg = TrainConfig.from_dict(raw)
            t0 = time.perf_counter()
            self._train(cfg)
            wall = time.perf_counter() - t0
            logs = [json.loads(x) for x in (Path(cfg.out) / "log.jsonl").read_text().splitlines()
                    if x.strip()]
            losses = [r["loss"] for r in logs if "loss" in r]
            rows[precision] = {"final_loss": sum(losses[-10:]) / len(losses[-10:]),
                               "images_per_s": steps * cfg.batch_size / wall, "wall_s": wall}
        self.write("eval:bf16_check", {"model": name, "steps": steps, **rows,
                                       "speedup": rows["bf16"]["images_per_s"]
                                       / rows["fp32"]["images_per_s"]})

    @torch.no_grad()
    def oracle(self, name: str, split: str, n: int, *, temperature: float = 1.0,
               ar_steps: int = 16, step: int | None = None, head_steps: str | None = None,
               tokenizers: bool = True) -> dict:
        """DisCon ``name`` given the discrete tokens of ``n`` real images of ``split`` (evenly
        spaced; an upper bound of what any prior can give it), beside the two tokenizers'
        reconstructions of the same images (``tokenizers``). Rows of scores by name."""
        ref = self.reference(split)
        idx = torch.arange(n) * (len(ref) // n)
        images = torch.stack([ref.images[int(i)] for i in idx]).float() / 255
        labels = ref.labels[idx]
        cache = self.cfg["continuous"][name]["cache"]
        backbone, head, ctok = self.cont_modules(name, step, head_steps=head_steps)
        dtok = self.dtok_module(cache)
        out = {}
        ids = torch.cat([dtok.encode(images[i:i + 250]) for i in range(0, n, 250)])
        if tokenizers:
            out["dtok_reconstruction"] = self.score(to_uint8(torch.cat(
                [dtok.decode(ids[i:i + 250]) for i in range(0, n, 250)])), labels, split=split)
            out["ctok_reconstruction"] = self.score(to_uint8(torch.cat(
                [ctok.decode(ctok.encode(images[i:i + 250])) for i in range(0, n, 250)])),
                labels, split=split)
        rec, sec = self.complete(backbone, head, ctok, labels, ids.flatten(1), ar_steps=ar_steps,
                                 temperature=temperature)
        out["discon_from_true_tokens"] = {**self.score(rec, labels, split=split),
                                          "sec_per_img_continuous": sec}
        return out

    @staticmethod
    def brief(row: dict) -> dict:
        keep = ("fid", "class_accuracy", "split", "sec_per_img_continuous")
        px = row.get("pixels", {})
        return {**{k: row[k] for k in keep if k in row},
                "black": px.get("black", {}).get("value"),
                "border_mean": px.get("border_mean", {}).get("value"),
                "pixel_check": row.get("pixel_check", {}).get("pass")}

    def eval_oracle(self, name: str, n: int, temperature: float = 1.0) -> None:
        rows = self.oracle(name, REPORT, n, temperature=temperature)
        self.write(self._current, {"rows": {k: self.brief(v) for k, v in rows.items()},
                                   "N": n, "split": REPORT,
                                   "settings": {"model": name, "temperature": temperature,
                                                "ar_steps": 16}})

    def eval_ablation(self, row: str, model: str, n: int, *, temperature: float = 1.0,
                      ar_steps: int | None = None, head_steps: str | None = None,
                      step: int | None = None) -> None:
        """One ablation row: the model given the true tokens of validation images (oracle) and
        given the prior's sweep tokens (end to end), with the continuous stage's s/img."""
        kw = {"temperature": temperature, "ar_steps": ar_steps or 16, "step": step,
              "head_steps": head_steps}
        oracle = self.oracle(model, SELECT, n, tokenizers=False, **kw)["discon_from_true_tokens"]
        images, labels, sec, settings, params = self.generate(
            model, self.ev["prior"], 0, n, **kw)
        e2e = self.score(images, labels, split=SELECT)
        self.write(self._current, {"row": row, "N": n, "split": SELECT, "params": params,
                                   "oracle": self.brief(oracle), "e2e": self.brief(e2e),
                                   "fid": e2e["fid"], "sec_per_img_continuous": sec,
                                   "settings": settings})

    def eval_codebook(self, k: int, model: str, n: int, temperature: float = 1.0,
                      step: int | None = None) -> None:
        rows = self.oracle(model, SELECT, n, temperature=temperature, step=step)
        self.write(self._current, {"codebook_size": k, "N": n, "split": SELECT,
                                   "rows": {r: self.brief(v) for r, v in rows.items()},
                                   "settings": {"model": model, "temperature": temperature,
                                                "ar_steps": 16, "step": step}})

    @torch.no_grad()
    def eval_rfid(self, name: str, extractor: str = "fmnist", n: int | None = None) -> None:
        """rFID of tokenizer ``name``: its reconstructions of the first ``n`` test images
        (default all; the quick profile's rfid_num) against the whole test split."""
        from discon_plugins import evaluation as metrics
        t = self.cfg["tokenizers"][name]
        tok = self.build(t["kind"], t["preset"], self.tok_ckpt(name), **t.get("overrides", {}))
        n = n or self.ev.get("rfid_num")
        ext, src = self.extractor(extractor), self.reference(REPORT, n)
        ref = self.reference(REPORT) if extractor == "inception" else src
        rec, psnr = metrics.reconstruct(tok, src, device=self.device, batch_size=250)
        rec.labels = src.labels  # class accuracy of the reconstructions
        row = metrics.compute(rec, ref, ext, ["fid", "kid"], device=self.device, batch_size=250,
                              kid_subset_size=min(1000, len(src)))
        self.write(self._current, {**row, "psnr": psnr,
                                         "settings": {"tokenizer": name, "preset": t["preset"],
                                                      "steps": t["train"]["steps"]},
                                         "params": n_params(tok)})

    # -- the embedded default -----------------------------------------------------------------
    def export_default(self) -> dict:
        """Ship the stages named in the config's ``default`` block inside the package
        (discon_plugins/default_model.py); the prior samples with the guidance its sweep chose."""
        from discon_core.pipeline import _sampling
        from discon_plugins import default_model
        d = self.cfg["default"]
        check_keys(d, {"prior", "continuous"}, "study config: default")
        name, p = d["continuous"], d["prior"]
        c = self.cfg["continuous"][name]
        cache = self.cfg["caches"][c["cache"]]
        toks = self.cfg["tokenizers"]
        backbone, head, ctok = self.cont_modules(name)
        prior = self.prior_module(p)
        where = f"configs/paper_cpu.yaml, seed {self.seed}"
        comps = {
            "prior": {"module": prior, "extends": self.cfg["priors"][p]["preset"],
                      "params": self.cfg["priors"][p].get("overrides", {}),
                      "sampling": {**_sampling(prior), "cfg_scale": self.best("prior_cfg", "cfg_scale")},
                      "description": f"embedded default prior: stage prior:{p} of {where}"},
            "dtok": {"module": self.dtok_module(), "extends": toks[cache["dtok"]]["preset"],
                     "description": f"embedded default dtok: stage tok:{cache['dtok']} of {where}"},
            "backbone": {"module": backbone, "head": head, "extends": c["backbone"],
                         "head_extends": c.get("head", c["backbone"]),
                         "params": c.get("overrides", {}),
                         "sampling": {**_sampling(backbone), "temperature": self.best(
                             f"fig7__{self.discons[0]}", "temperature")},
                         "description": f"embedded default DisCon: stage cont:{name} of {where}"},
            "ctok": {"module": ctok, "extends": toks[cache["ctok"]]["preset"],
                     "description": f"embedded default ctok: stage tok:{cache['ctok']} of {where} "
                                    "(latent statistics folded into the weights)"},
        }
        shas = default_model.export(comps, description=f"From {where}: prior {p}, DisCon {name}.")
        return {"files": shas, "megabytes": default_model.size_mb()}

    # -- scheduling ----------------------------------------------------------------------------
    def record(self, stage: str) -> dict | None:
        """What a finished stage left: its marker, or (eval stages) its result JSON, when it
        records the current settings. Results are tracked in git, so a fresh clone of a study
        whose checkpoints are gone still knows which measurements stand."""
        sig = signature(self.stages[stage].settings)
        for path in (self.marker(stage), self.result(stage)):
            if path.is_file():
                rec = json.loads(path.read_text())
                if rec.get("signature") == sig:
                    return rec
        return None

    def is_done(self, stage: str) -> bool:
        return self.record(stage) is not None

    def runnable(self, only: str | None = None) -> tuple[list[str], list[str]]:
        """The unfinished stages something still needs (a training whose every measurement
        stands is not redone) or that ``only`` names, and those among them whose inputs are
        done."""
        users: dict[str, list[str]] = {s: [] for s in self.stages}
        for s, st in self.stages.items():
            for d in st.deps:
                users[d].append(s)
        need: dict[str, bool] = {}

        def needed(s: str) -> bool:
            if s not in need:
                need[s] = not self.is_done(s) and (not users[s] or any(map(needed, users[s]))
                                                   or bool(only and s.startswith(only)))
            return need[s]

        tiers: dict[str, int] = {}

        def tier(s: str) -> int:  # an input is as urgent as the most urgent stage needing it
            if s not in tiers:
                after = [tier(u) for u in users[s] if needed(u)]
                tiers[s] = min(after) if after else self.stages[s].tier
            return tiers[s]

        chains: dict[str, int] = {}

        def chain(s: str) -> int:  # the longest path of unfinished stages that waits on s
            if s not in chains:
                chains[s] = 1 + max((chain(u) for u in users[s] if needed(u)), default=0)
            return chains[s]

        todo = [s for s in self.stages if needed(s)]
        # within a tier the longest remaining path first (a prior feeding tokens feeding rows
        # before a model feeding one row), then config order (sorted is stable)
        ready = sorted((s for s in todo if all(self.is_done(d) for d in self.stages[s].deps)),
                       key=lambda s: (tier(s), -chain(s)))
        return todo, ready

    def claim(self, stage: str) -> bool:
        lock = self.out / ".locks" / stage.replace(":", "__")
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.mkdir()
        except FileExistsError:
            pid = (lock / "pid").read_text() if (lock / "pid").is_file() else ""
            if pid and not pid_alive(int(pid)):
                (lock / "pid").unlink(missing_ok=True)
                lock.rmdir()
                return self.claim(stage)
            return False
        (lock / "pid").write_text(str(os.getpid()))
        return True

    def release(self, stage: str) -> None:
        lock = self.out / ".locks" / stage.replace(":", "__")
        (lock / "pid").unlink(missing_ok=True)
        lock.rmdir()

    def work(self, only: str | None = None) -> None:
        while True:
            todo, ready = self.runnable(only)
            pending = list(todo)  # what other workers may be producing
            if only:
                todo = [s for s in todo if s.startswith(only)]
                ready = [s for s in ready if s.startswith(only)]
            if not todo:
                return
            for stage in ready:
                if self.claim(stage):
                    break
            else:
                if not ready and not any((self.out / ".locks" / s.replace(":", "__")).exists()
                                         for s in pending):
                    raise DisconError(f"stages {todo[:3]} wait on inputs nothing produces")
                time.sleep(5)
                continue
            try:
                if self.is_done(stage):
                    continue
                say(f"{stage}: start")
                t0 = time.perf_counter()
                self._current = stage
                self.stages[stage].run()
                wall = time.perf_counter() - t0
                if self.result(stage).is_file():  # the result carries its cost (--list)
                    from discon_core.checkpoints import save_atomic
                    save_atomic({**json.loads(self.result(stage).read_text()), "wall_s": wall},
                                self.result(stage))
                m = self.marker(stage)
                m.parent.mkdir(parents=True, exist_ok=True)
                m.write_text(json.dumps({"signature": signature(self.stages[stage].settings),
                                         "wall_s": wall, "finished": time.strftime("%c")}))
                say(f"{stage}: done in {wall:.0f} s")
            finally:
                self.release(stage)


def ctok_params(preset: str) -> dict:
    from discon_core.registry import resolve
    return resolve("ctok", preset).params


def raw_weights(ckpt: Path) -> Path:
    """The raw (non-EMA) weights of a training checkpoint as a file ``build()`` loads (it takes
    the EMA when a file holds both); written beside the checkpoint, again when the checkpoint
    is newer (checkpoint-last.pth moves on as a run continues)."""
    from discon_core.checkpoints import load_file, save_atomic
    raw = ckpt.with_name(ckpt.stem + "-raw.safetensors")
    if not raw.is_file() or raw.stat().st_mtime < ckpt.stat().st_mtime:
        save_atomic(load_file(ckpt)["model"], raw)
    return raw


def n_params(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def machine() -> str:
    return f"{os.cpu_count()}-core CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="study config, e.g. configs/paper_cpu.yaml")
    ap.add_argument("--quick", action="store_true", help="tiny schedules (minutes)")
    ap.add_argument("--workers", type=int, default=1, help="processes sharing the stages")
    ap.add_argument("--only", default=None, help="run only stages whose name starts with this")
    ap.add_argument("--render", action="store_true", help="write RESULTS.md tables and plots")
    ap.add_argument("--list", action="store_true", help="list the stages and whether they are done")
    ap.add_argument("--export-default", action="store_true",
                    help="ship the config's `default` stages inside the package (discon run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default=None,
                    help="precision of every training stage (default: the config's "
                         "train_defaults.precision); measurements always run in fp32")
    ap.add_argument("--out", default=None,
                    help="study folder instead of the config's `out`, with its results in "
                         "OUT/results (a separate run, e.g. timing the study in fp32)")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        cfg = load_config(args.config, args.quick)
        cfg = run_options(cfg, args.dtype, args.out)
        torch.set_num_threads(int(cfg.get("threads") or os.cpu_count()))
        check_presets(cfg)
        study = Study(cfg, args.device)
        if args.list:  # with each finished stage's wall time, and the sums by stage kind
            walls: dict[str, float] = {}
            for s in study.stages:
                rec = study.record(s)
                done = rec is not None
                wall = rec.get("wall_s", 0.0) if done else None
                if done:
                    walls[s.split(":")[0]] = walls.get(s.split(":")[0], 0.0) + wall
                print(("done  " if done else "todo  ") + s
                      + (f"  {wall:.0f} s" if wall is not None else ""))
            if walls:
                print("wall time of the finished stages (worker-seconds): " + ", ".join(
                    f"{k} {v / 60:.0f} min" for k, v in walls.items())
                    + f"; total {sum(walls.values()) / 3600:.2f} h")
            return 0
        if args.export_default:
            print(json.dumps(study.export_default(), indent=1))
            return 0
        if args.render:
            from render_results import render
            print(render(study))
            return 0
        children = [subprocess.Popen([sys.executable, __file__, *(argv or sys.argv[1:]),
                                      "--workers", "1"])
                    for _ in range(args.workers - 1)]
        study.work(args.only)
        rc = max([c.wait() for c in children], default=0)
        return rc
    except DisconError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    raise SystemExit(main())
