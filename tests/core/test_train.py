"""The trainer's mechanics on a stand-in task (tests/core/toy_recipe.py): schedule, parameter
groups, checkpoints loadable with weights_only, SIGKILL + --resume == uninterrupted (exact),
2-process torchrun (gloo) == 1 process with the same global batch, NaN stop, crash-safe saves."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from discon_core.checkpoints import load_file
from discon_core.errors import DisconError
from discon_core import build
from discon_plugins.recipes import _mar_no_decay, _rar_no_decay
from discon_core.train import Trainer, TrainConfig, lr_at, train
from tests.conftest import REPO

TOY = {
    "recipe": "tests.core.toy_recipe:make", "components": {"toy": "none"}, "data": {},
    "steps": 12, "batch_size": 16, "optimizer": {"lr": 0.01, "warmup_steps": 3},
    "ckpt_every": 4, "log_every": 2, "ema_rate": 0.9, "progress": False,
    "recipe_options": {"noise": True},
}


def toy_config(out: Path, **changes) -> TrainConfig:
    raw = {**TOY, "out": str(out), **changes}
    return TrainConfig.from_dict(raw)


def write_config(path: Path, out: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**TOY, "out": str(out), **changes}))
    return path


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def assert_same_state(a: dict, b: dict, exact: bool = True, atol: float = 0.0) -> None:
    for part in ("model", "model_ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            if exact:
                assert torch.equal(a[part][k], b[part][k]), (part, k)
            else:
                torch.testing.assert_close(a[part][k], b[part][k], atol=atol, rtol=0, msg=k)


def test_lr_schedule_warmup_constant_cosine():
    kw = dict(lr=1.0, warmup=10, total=110, min_lr=0.1)
    assert lr_at(0, schedule="constant", **kw) == 0.0      # MAR: the first step runs at lr 0
    assert lr_at(5, schedule="constant", **kw) == 0.5
    assert lr_at(10, schedule="constant", **kw) == 1.0
    assert lr_at(100, schedule="constant", **kw) == 1.0
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.1)


def test_param_group_rules():
    w2, w1 = torch.zeros(3, 3), torch.zeros(3)
    assert not _mar_no_decay("encoder_blocks.0.attn.qkv.weight", w2)
    assert _mar_no_decay("encoder_blocks.0.attn.qkv.bias", w1)
    assert _mar_no_decay("diffloss.net.input_proj.weight", w2)     # MAR: no decay in the head
    assert _mar_no_decay("encoder_norm.weight", w1)
    assert _rar_no_decay("embeddings.weight", w2) and _rar_no_decay("adaln_before_head.w", w2)
    assert not _rar_no_decay("cls_token", torch.zeros(1, 1, 3))


def test_ema_warmup_forgets_the_init_and_leaves_saved_configs_alone(tmp_path):
    from discon_core.train import EMA
    w = torch.nn.Parameter(torch.zeros(3))
    plain, warm = EMA([w], 0.999), EMA([w], 0.999, warmup=True)
    with torch.no_grad():
        w.fill_(1.0)       # the weights leave their init (0) and stay at 1
    for t in range(1000):
        plain.update(t)
        warm.update(t)
    # without warmup 0.999^1000 = 36.8% of the init remains; with it, prod (1+t)/(10+t) ~ 1e-21
    assert plain.shadow[0][0].item() == pytest.approx(1 - 0.999 ** 1000, abs=1e-4)
    assert warm.shadow[0][0].item() == pytest.approx(1.0, abs=1e-6)
    assert warm.rate_at(0) == pytest.approx(0.1) and warm.rate_at(10 ** 6) == 0.999
    # a config at the default does not name the key (saved configs and signatures unchanged)
    assert "ema_warmup" not in toy_config(tmp_path).as_dict()
    assert toy_config(tmp_path, ema_warmup=True).as_dict()["ema_warmup"] is True
    with pytest.raises(DisconError, match="ema_rate must lie in"):
        toy_config(tmp_path, ema_rate=1.0)


def test_patchify_roundtrip_and_order():
    """The recipe trains in the backbone's own token layout (the one sampling unpatchifies)."""
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    layout = {p: build("backbone", "discon-tiny", img_size=16, vae_stride=4, patch_size=p,
                       vae_embed_dim=3, device="meta") for p in (1, 2)}
    t = layout[1].patchify(x)
    assert t.shape == (2, 16, 3) and torch.equal(t[0, 1], x[0, :, 0, 1])
    for p in (1, 2):
        assert torch.equal(layout[p].unpatchify(layout[p].patchify(x)), x)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(DisconError, match="unknown key.*stepz"):
        TrainConfig.from_dict({**TOY, "stepz": 3})
    with pytest.raises(DisconError, match="precision"):
        toy_config(tmp_path, precision="fp8")
    with pytest.raises(DisconError, match="exactly one of steps or epochs"):
        toy_config(tmp_path, epochs=2)
    with pytest.raises(DisconError, match="unknown recipe 'dicson'.*discon"):
        Trainer(toy_config(tmp_path, recipe="dicson"))


def test_checkpoint_contents_and_log(tmp_path):
    path = train(toy_config(tmp_path / "run"))
    state = torch.load(path, weights_only=True)       # RNG and config stored as plain data
    assert state["step"] == 12 and state["world_size"] == 1
    assert state["data"] == {"epoch": 2, "batch": 0, "global_batch": 16, "seed": 1,
                             "num_items": 96}
    assert set(state["model"]) == {"fc1.weight", "fc1.bias", "norm.weight", "norm.bias",
                                   "fc2.weight", "fc2.bias"}
    assert not torch.equal(state["model"]["fc1.weight"], state["model_ema"]["fc1.weight"])
    assert len(state["optimizer"]["param_groups"]) == 2
    lines = [yaml.safe_load(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8, 10, 12]
    assert {"loss", "lr", "grad_norm", "images_per_s"} <= set(lines[-1])
    assert lines[0]["lr"] == pytest.approx(0.01 / 3)   # logged lr is that of the last step


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(tmp_path):
    """Killed mid-way (after the step-8 checkpoint, at step 10), resumed: the same weights,
    EMA and optimizer state as a run that was never interrupted."""
    steps = {"steps": 16}
    ref_cfg = write_config(tmp_path / "ref.yaml", tmp_path / "ref", **steps)
    subprocess.run([sys.executable, "-m", "discon_core.cli", "train", str(ref_cfg)], cwd=REPO,
                   env=env(), check=True, capture_output=True)
    reference = load_file(tmp_path / "ref" / "checkpoint-last.pth")

    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "kill.yaml", out, **steps,
                       recipe_options={"noise": True, "block_at_step": 10})
    proc = subprocess.Popen([sys.executable, "-m", "discon_core.cli", "train", str(cfg)],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while not (out / "blocked").exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["step"] == 8

    result = subprocess.run([sys.executable, "-m", "discon_core.cli", "train", str(cfg),
                             "--resume", "--set", "recipe_options.block_at_step=null"],
                            cwd=REPO, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    resumed = load_file(out / "checkpoint-last.pth")
    assert resumed["step"] == 16
    logged = [yaml.safe_load(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(2, 17, 2))      # the lost steps 9-10 are not logged twice
    assert_same_state(reference, resumed, exact=True)
    for k, v in reference["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, resumed["optimizer"]["state"][k][name]), (k, name)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_ddp_matches_one_process(tmp_path, fsdp):
    """torchrun --nproc_per_node 2 (gloo) == 1 process at the same global batch, with DDP and
    with FSDP2 (which, unlike DDP, relies on every rank building the same init)."""
    # fp32: bf16 autocast (what auto picks on a native-bf16 CPU) rounds batch 8 and 16 apart
    changes = {"steps": 6, "recipe_options": {"noise": False}, "precision": "fp32"}
    single = load_file(train(toy_config(tmp_path / "one", **changes)))
    cfg = write_config(tmp_path / "ddp.yaml", tmp_path / "two", fsdp=fsdp, **changes)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "discon_core.cli", "train", str(cfg)],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    double = load_file(tmp_path / "two" / "checkpoint-last.pth")
    assert double["world_size"] == 2 and len(double["rng"]) == 2
    assert_same_state(single, double, exact=False, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # the model fails inside its forward of step index 6, i.e. the 7th step (steps count from 1)
    cfg = toy_config(tmp_path / "nan", recipe_options={"noise": True, "nan_at_step": 6})
    with pytest.raises(DisconError, match=r"loss is nan at step 7.*checkpoint-last.pth is kept"):
        train(cfg)
    state = load_file(tmp_path / "nan" / "checkpoint-last.pth")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    last = (tmp_path / "nan" / "log.jsonl").read_text().splitlines()[-1]
    assert '"nonfinite"' in last


def test_finite_check_reports_the_first_failing_step_only_when_read(tmp_path):
    from discon_core.train import FiniteCheck
    trainer = Trainer(toy_config(tmp_path / "fc"))
    (tmp_path / "fc").mkdir()             # the error is also logged to OUT/log.jsonl
    trainer.step = 10                     # a resumed run: steps 11.. are recorded here
    check = FiniteCheck(torch.device("cpu"))
    one = torch.tensor(1.0)
    for loss, gnorm in ((one, one), (one, one), (one, torch.tensor(float("inf"))),
                        (torch.tensor(float("nan")), one)):
        check.record(loss, gnorm)
    trainer.step = 14
    with pytest.raises(DisconError, match=r"gradient norm is inf at step 13"):
        check.check(trainer, lr=0.01)
    fine = FiniteCheck(torch.device("cpu"))
    fine.record(one, one)
    fine.check(trainer, lr=0.01)          # nothing failed: no error


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(toy_config(tmp_path / "disk", steps=4))
    trainer.fit()
    before = (tmp_path / "disk" / "checkpoint-last.pth").read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    trainer.step = 5
    with pytest.raises(OSError, match="No space left"):
        trainer.save()
    assert (tmp_path / "disk" / "checkpoint-last.pth").read_bytes() == before
    assert [p.name for p in (tmp_path / "disk").iterdir() if p.name.endswith(".tmp")] == []


def test_resume_refuses_a_different_config(tmp_path):
    train(toy_config(tmp_path / "r", steps=4))
    with pytest.raises(DisconError, match="batch_size"):
        Trainer(toy_config(tmp_path / "r", steps=8, batch_size=32)).fit(resume=True)
    with pytest.raises(DisconError, match="does not exist"):
        Trainer(toy_config(tmp_path / "r2", steps=8)).fit(resume=tmp_path / "nope.pth")


# ------------------------------------------------------------------------------------------------
# Shipped configs, and the real recipes end to end

def _referenced_presets(components: dict):
    from discon_core.recipes import component_spec
    for kind, spec in components.items():
        s = component_spec(spec, kind)
        yield s.get("kind", kind), s["preset"]


@pytest.mark.parametrize("name", ["imagenet_discon_l.yaml", "fmnist_discon_tiny.yaml"])
def test_shipped_train_configs_validate(name):
    from discon_core.registry import resolve
    cfg = TrainConfig.load(REPO / "configs" / name)
    for kind, preset in _referenced_presets(cfg.components):
        resolve(kind, preset)
    assert {"backbone", "head"} <= set(cfg.components)
