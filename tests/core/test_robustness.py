"""Bad input, one class per test (issue 12): through ``discon_core.cli.main`` wherever the input
comes from the command line, every case must exit 1 with exactly one stderr line naming the
argument, file or key, no traceback, and nothing lost or left behind."""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from discon_core import pipeline as pipeline_mod
from discon_core.checkpoints import load_file
from discon_core.cli import main
from discon_core.errors import DisconError
from discon_core.pipeline import Pipeline, sample_tokens
from discon_core.registry import build
from discon_core.config import TrainConfig
from tests.conftest import REPO

torch.set_num_threads(1)

TOY = {
    "recipe": "tests.core.toy_recipe:make", "components": {"toy": "none"}, "data": {},
    "steps": 4, "batch_size": 16, "optimizer": {"lr": 0.01, "warmup_steps": 1},
    "ckpt_every": 2, "log_every": 2, "ema_rate": 0.9, "progress": False,
    "recipe_options": {"noise": False},
}
DISCRETE = ["run", "--prior", "rar-tiny", "--dtok", "maskgit-vq-tiny", "--prior-checkpoint",
            "none", "--dtok-checkpoint", "none", "--num", "2", "--ar-steps", "2",
            "--no-progress"]
CACHE = ["cache", "--data", "fashion-mnist", "--limit", "8", "--dtok", "maskgit-vq-tiny",
         "--dtok-checkpoint", "none", "--ctok", "va-vae-tiny", "--ctok-checkpoint", "none",
         "--shard-size", "8", "--batch-size", "8", "--no-progress"]


@pytest.fixture(autouse=True)
def _builtin_registry():
    yield
    from discon_core.registry import set_user_registry
    set_user_registry(None)  # --registry is process-wide state


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; assert exit 1 and one 'discon: error:' line holding every needle."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1, err
    assert len(lines) == 1 and lines[0].startswith("discon: error: "), err
    assert "Traceback" not in err and "weights_only=False" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def toy_yaml(tmp_path: Path, out: Path, **changes) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({**TOY, "out": str(out), **changes}))
    return path


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- typed config values -------------------------------------------------------------------------

@pytest.mark.parametrize("item, needles", [
    ("=5", ["--set", "'=5'"]),
    ("steps", ["--set", "KEY=VALUE"]),
    ("a..b=1", ["--set", "a..b"]),
    ("optimizer.lr=[1,", ["--set", "optimizer.lr=[1,", "not valid YAML"]),
    ("optimizer=5", ["optimizer must be a mapping"]),
    ("steps=abc", ["steps must be an integer", "'abc'"]),
    ("steps=1.5", ["steps must be an integer"]),
    ("steps=-3", ["steps must be positive"]),
    ("batch_size=0", ["batch_size must be positive"]),
    ("optimizer.betas=5", ["optimizer.betas must be a list of 2 numbers"]),
    ("optimizer.betas=[0.9]", ["optimizer.betas must be a list of 2 numbers"]),
    ("optimizer.betas=[0.9,x]", ["optimizer.betas[1] must be a number"]),
    ("optimizer.lr=[1,2]", ["optimizer.lr must be a number"]),
    ("optimizer.lrr=1", ["optimizer: unknown key 'lrr'", "did you mean: lr"]),
    ("optimizer.lr.x=1", ["optimizer.lr is not a mapping"]),
    ("compile=1", ["compile must be true or false"]),
    ("seed=true", ["seed must be an integer"]),
    ("precision=5", ["precision must be a string"]),
    ("components=[a]", ["components must be a mapping"]),
    ("stepz=3", ["unknown key 'stepz'", "did you mean: steps"]),
])
def test_config_values_are_typed(capsys, tmp_path, item, needles):
    out = tmp_path / "out"
    fails(capsys, ["train", toy_yaml(tmp_path, out), "--set", item], *needles)
    assert not out.exists()  # refused before any work


def test_numbers_in_any_yaml_spelling(tmp_path):
    path = toy_yaml(tmp_path, tmp_path / "out", steps="1e3", optimizer={"lr": "1.0e6"})
    cfg = TrainConfig.load(path, ["optimizer.blr=2e-4", "grad_clip=null", "ema_rate=0"])
    assert cfg.steps == 1000 and isinstance(cfg.steps, int)
    assert cfg.optimizer.lr == 1e6 and cfg.optimizer.blr == 2e-4 and cfg.grad_clip is None
    assert isinstance(cfg.ema_rate, float) and cfg.optimizer.betas == (0.9, 0.95)


@pytest.mark.parametrize("item, needles", [
    ("seed=abc", ["study config", "seed must be an integer"]),
    ("threads=x", ["threads must be an integer"]),
    ("sampel={}", ["unknown key 'sampel'", "did you mean: sample"]),
    ("dtok.preset=5", ["dtok.preset must be a string"]),
    ("ctok.preset=nope", ["unknown ctok 'nope'"]),
    ("cache.shard_size=abc", ["cache.shard_size must be an integer"]),
    ("cache.batch_size=0", ["cache.batch_size must be >= 1"]),
    ("sample=5", ["section 'sample' must be a mapping"]),
    ("sample.rows=x", ["sample.rows must be an integer"]),
    ("sample.cfg_scale=abc", ["sample.cfg_scale must be a number"]),
    ("ctok.normalize=foo", ["ctok.normalize must be 'stats' or 'none'"]),
    ("prior.train.steps=abc", ["study stage prior", "steps must be an integer"]),
    ("discon.train.optimizer.lr=x", ["study stage discon", "optimizer.lr must be a number"]),
])
def test_study_config_values_are_typed(capsys, tmp_path, item, needles):
    out = tmp_path / "study"
    fails(capsys, ["study", REPO / "configs" / "fmnist_cpu.yaml", "--out", out, "--set", item],
          *needles)
    assert not out.exists()


# -- files that are not what they claim ----------------------------------------------------------

def test_files_that_are_not_what_they_claim(capsys, tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(os.urandom(256) + b"\xff\xfe")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    fails(capsys, ["train", binary], str(binary), "not a text file")
    fails(capsys, ["train", folder], str(folder), "is a directory")
    fails(capsys, ["train", tmp_path / "missing.yaml"], "missing.yaml", "does not exist")
    fails(capsys, ["--registry", binary, "plugins"], "registry file", "not a text file")
    fails(capsys, ["--registry", folder, "plugins"], "registry file", "is a directory")
    fails(capsys, [*CACHE, "--data-root", binary, "--out", tmp_path / "c"], str(binary),
          "is a file, expected a folder")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    fails(capsys, ["train", tmp_path / "list.yaml"], "top level must be a mapping")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "broken.yaml").write_text("steps: [1,\n")
    (tmp_path / "partial.yaml").write_text("steps: 4\n")
    for command in ("train", "study"):
        fails(capsys, [command, tmp_path / "empty.yaml"], "empty.yaml", "must be a mapping")
        fails(capsys, [command, tmp_path / "broken.yaml"], "broken.yaml", "not valid YAML")
    fails(capsys, ["--registry", tmp_path / "broken.yaml", "plugins"], "registry file",
          "not valid YAML")
    fails(capsys, ["--registry", tmp_path / "nope.yaml", "plugins"], "nope.yaml",
          "does not exist")
    fails(capsys, ["train", tmp_path / "partial.yaml"], "partial.yaml", "missing key")


@pytest.mark.parametrize("content, needles", [
    (random.Random(0).randbytes(4096), ["not a checkpoint torch can read"]),
    (b"\x80\x09" + random.Random(1).randbytes(4094), ["not a checkpoint torch can read"]),
    (b"\x80\x02" + random.Random(2).randbytes(4094), ["not a checkpoint torch can read"]),
    (b"hello, I am a text file\n", ["not a checkpoint torch can read"]),
    (b"", ["is empty"]),
    ("truncated", ["truncated or corrupt"]),
    ("folder", ["is a directory"]),
    ("missing", ["not found"]),
], ids=["random", "bad-pickle-protocol", "random-after-pickle-header", "text", "empty",
        "truncated", "folder", "missing"])
def test_bad_checkpoint_files(capsys, tmp_path, content, needles):
    path = tmp_path / "weights.pth"
    if content == "truncated":
        torch.save(build("prior", "rar-tiny").state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
    elif content == "folder":
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    out = tmp_path / "samples"
    fails(capsys, [*DISCRETE, "--prior-checkpoint", path, "--out", out], str(path), *needles)
    assert not out.exists()  # the folder run created for its output is removed again


def test_pickle_refusal_without_torch_warning(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    import pickle
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DisconError, match="refused to unpickle") as e:
            load_file(tmp_path / "evil.pth")
    assert not caught and "weights_only=False" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("manifest, needles", [
    ('{"format": "discon-cache/1", "compl', ["cache manifest", "not valid JSON"]),
    ("\xff\xfe\x00binary", ["cache manifest", "not a text file"]),
    ("[1, 2]", ["is not a 'discon-cache/1' manifest"]),
    ("dir", ["cache manifest", "is a directory"]),
])
def test_broken_cache_manifest(capsys, tmp_path, manifest, needles):
    cache = tmp_path / "cache"
    cache.mkdir()
    if manifest == "dir":
        (cache / "manifest.json").mkdir()
    else:
        (cache / "manifest.json").write_text(manifest, encoding="latin-1")
    before = tree(cache)
    config = REPO / "configs" / "fmnist_discon_tiny.yaml"
    fails(capsys, ["train", config, "--set", f"data.cache={cache}", "--out", tmp_path / "run"],
          *needles)
    if manifest != "dir":
        fails(capsys, [*CACHE, "--out", cache], *needles[:1])
    assert tree(cache) == before  # the broken manifest is reported, not replaced


# -- output paths and devices, checked before any work -------------------------------------------

@pytest.fixture
def no_sampling(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("sampling started before the output check")
    monkeypatch.setattr(pipeline_mod.Pipeline, "generate", forbidden)


@pytest.mark.parametrize("target", ["file", "/proc/discon-x", "file/below"])
def test_output_paths_checked_before_work(capsys, tmp_path, no_sampling, target):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    out = tmp_path / target if target.startswith("file") else Path(target)
    fails(capsys, [*DISCRETE, "--out", out], "--out", str(out))
    fails(capsys, [*CACHE, "--out", out], "--out", str(out))
    fails(capsys, ["train", toy_yaml(tmp_path, tmp_path / "unused"), "--out", out], "out",
          str(out))
    fails(capsys, ["study", REPO / "configs" / "fmnist_cpu.yaml", "--out", out], "out", str(out))
    assert a_file.read_text() == "keep me" and not (tmp_path / "unused").exists()


@pytest.mark.parametrize("device, needle", [
    ("gpu", "expected auto, cpu, cuda or cuda:N"),
    ("cuda:x", "expected auto, cpu, cuda or cuda:N"),
    ("meta", "expected auto, cpu, cuda or cuda:N"),
    ("cuda", "CUDA is not available"),
    ("cuda:7", "CUDA is not available"),
])
def test_devices_checked_before_work(capsys, tmp_path, no_sampling, device, needle):
    if needle == "CUDA is not available" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    fails(capsys, [*DISCRETE, "--device", device, "--out", out], "--device", needle)
    fails(capsys, [*CACHE, "--device", device, "--out", out], "--device", needle)
    fails(capsys, ["train", toy_yaml(tmp_path, out), "--device", device], "--device", needle)
    fails(capsys, ["train", toy_yaml(tmp_path, out), "--set", f"device={device}"], "device",
          needle)
    fails(capsys, ["study", REPO / "configs" / "fmnist_cpu.yaml", "--out", out, "--device",
                   device], "--device", needle)
    assert not out.exists()


# -- finished runs are never clobbered -----------------------------------------------------------

def test_train_never_clobbers_a_run(capsys, tmp_path):
    out = tmp_path / "run"
    config = toy_yaml(tmp_path, out)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    before = tree(out)
    fails(capsys, ["train", config], "already holds a training run", "--resume", "--overwrite")
    fails(capsys, ["train", config, "--set", "steps=8"], "already holds a training run")
    fails(capsys, ["train", config, "--resume", "--overwrite"], "exclude each other")
    assert tree(out) == before
    assert main(["train", str(config), "--overwrite"]) == 0      # explicit: allowed
    assert main(["train", str(config), "--resume", "--set", "steps=6"]) == 0
    assert load_file(out / "checkpoint-last.pth")["step"] == 6
    empty = tmp_path / "empty"
    fails(capsys, ["train", config, "--out", empty, "--resume"], "--resume", "holds no "
          "checkpoint-last.pth")
    fails(capsys, ["train", config, "--out", empty, "--resume", tmp_path / "nope.pth"],
          "nope.pth", "does not exist")
    fails(capsys, ["train", config, "--out", empty, "--resume", tmp_path],
          "is a directory, expected a checkpoint file")
    (tmp_path / "bad.pth").write_bytes(random.Random(3).randbytes(999))
    fails(capsys, ["train", config, "--out", empty, "--resume", tmp_path / "bad.pth"],
          "bad.pth", "not a checkpoint torch can read")
    assert not empty.exists()  # a refused run leaves no folder behind


def test_stale_temp_files_of_a_killed_save_are_removed(capsys, tmp_path):
    out = tmp_path / "run"
    config = toy_yaml(tmp_path, out)
    assert main(["train", str(config)]) == 0
    stale = out / ".checkpoint-last.pth.abc123.tmp"         # what SIGKILL mid-save leaves
    stale.write_bytes(b"partial")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')                             # ... and a half-written log line
    assert main(["train", str(config), "--resume", "--set", "steps=6"]) == 0
    assert not stale.exists()
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


# -- non-finite weights and inputs ---------------------------------------------------------------

def nan_checkpoint(tmp_path: Path, kind: str, name: str, key_index: int = 0) -> tuple[Path, str]:
    sd = build(kind, name).state_dict()
    key = [k for k, v in sd.items() if v.is_floating_point()][key_index]
    sd[key] = torch.full_like(sd[key], float("nan"))
    path = tmp_path / f"nan-{kind}.pth"
    torch.save(sd, path)
    return path, key


@pytest.mark.parametrize("kind", ["prior", "dtok"])
def test_nonfinite_checkpoint_refused_at_load_cli(capsys, tmp_path, kind):
    name = {"prior": "rar-tiny", "dtok": "maskgit-vq-tiny"}[kind]
    path, key = nan_checkpoint(tmp_path, kind, name, 1)
    out = tmp_path / "samples"
    fails(capsys, [*DISCRETE, f"--{kind}-checkpoint", path, "--out", out], str(path),
          "non-finite", key)
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("kind, name", [("backbone", "discon-tiny"), ("ctok", "va-vae-tiny"),
                                        ("head", "discon-tiny")])
def test_nonfinite_checkpoint_refused_at_load_api(tmp_path, kind, name):
    sd = build(kind, name).state_dict()
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = torch.full_like(sd[key], float("inf"))
    prefix = "diffloss." if kind == "head" else ""
    torch.save({prefix + k: v for k, v in sd.items()}, tmp_path / "w.pth")
    with pytest.raises(DisconError, match=rf"non-finite.*{key}"):
        build(kind, name, checkpoint=tmp_path / "w.pth")


def tiny(kind: str):
    return build(kind, {"prior": "rar-tiny", "dtok": "maskgit-vq-tiny", "ctok": "va-vae-tiny",
                        "backbone": "discon-tiny", "head": "discon-tiny"}[kind]).eval()


def poisoned(kind: str):
    module = tiny(kind)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
    return module


@pytest.mark.parametrize("bad, stage", [("prior", "the prior"),
                                        ("backbone", "the continuous stage"),
                                        ("head", "the continuous stage"),
                                        ("ctok", "the ctok decoder")])
def test_nonfinite_sampling_stops_at_the_stage(bad, stage):
    parts = {k: poisoned(k) if k == bad else tiny(k)
             for k in ("prior", "dtok", "backbone", "head", "ctok")}
    with pytest.raises(DisconError, match=f"{stage}.*non-finite"):
        Pipeline(**parts).generate(torch.tensor([0, 1]), ar_steps=2, progress=False,
                                   generator=torch.Generator().manual_seed(0))


def test_nonfinite_discrete_decoder_and_images():
    pipe = Pipeline(prior=tiny("prior"), dtok=poisoned("dtok"))
    with pytest.raises(DisconError, match="the dtok decoder.*non-finite"):
        pipe.generate(torch.tensor([0]), progress=False)
    images = torch.rand(2, 3, 32, 32)
    images[0, 0, 0, 0] = float("nan")
    for kind in ("dtok", "ctok"):
        with pytest.raises(DisconError, match="NaN or inf"):
            tiny(kind).encode(images)


# -- sizes and API arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["--num", "100000000000"], ["--num must be in [1, 50000]"]),
    (["--num", "0"], ["--num"]),
    (["--num", "-5"], ["--num"]),
    (["--labels", ""], ["--labels is empty"]),
    (["--labels", ","], ["--labels is empty"]),
    (["--labels", "a,b"], ["--labels: unknown class 'a'"]),
    (["--batch-size", "0"], ["--batch-size"]),
])
def test_run_sizes(capsys, tmp_path, no_sampling, args, needles):
    out = tmp_path / "samples"
    fails(capsys, [*DISCRETE, *args, "--out", out], *needles)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--cfg-scale", "nan"], "cfg_scale must be a finite number"),
    (["--cfg-scale", "-1"], "cfg_scale must be a finite number"),
    (["--ar-steps", "0"], "ar_steps must be in [1, 64]"),
    (["--ar-steps", "65"], "ar_steps must be in [1, 64]"),
    (["--head-steps", "abc"], "num_sampling_steps 'abc'"),
])
def test_run_sampling_values(capsys, tmp_path, args, needle):
    out = tmp_path / "samples"
    fails(capsys, [*DISCRETE, "--backbone", "discon-tiny", "--ctok", "va-vae-tiny",
                   "--backbone-checkpoint", "none", "--ctok-checkpoint", "none", *args,
                   "--out", out], needle)
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("args, needle", [
    (["--prior-temperature", "nan"], "temperature must be a finite number > 0"),
    (["--prior-temperature", "0"], "temperature must be a finite number > 0"),
    (["--prior-cfg", "-3"], "cfg_scale must be a finite number >= 0"),
    (["--prior-cfg", "inf"], "cfg_scale must be a finite number >= 0"),
])
def test_run_prior_values(capsys, tmp_path, args, needle):
    out = tmp_path / "samples"
    fails(capsys, [*DISCRETE, *args, "--out", out], needle)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--limit", "-3"], "data.limit must be a positive integer"),
    (["--split", "validation"], "data.split must be one of train, val, test"),
    (["--shard-size", "0"], "shard_size and batch_size must be positive"),
    (["--batch-size", "-1"], "shard_size and batch_size must be positive"),
    (["--data", "nope"], "unknown data.type 'nope'"),
    (["--data", "folder", "--data-root", "EMPTY"], "unknown option 'limit'"),
    (["--data", "folder", "--data-root", "EMPTY", "--limit", "-"], "no image files"),
])
def test_cache_values(capsys, tmp_path, args, needle):
    (tmp_path / "EMPTY" / "class0").mkdir(parents=True)
    argv = CACHE + [str(tmp_path / a) if a == "EMPTY" else a for a in args]
    if argv[-2:] == ["--limit", "-"]:  # the folder dataset takes no --limit: drop CACHE's
        at = argv.index("--limit")
        argv = argv[:at] + argv[at + 2:-2]
    out = tmp_path / "cache"
    fails(capsys, [*argv, "--out", out], needle)
    assert not out.exists()


@pytest.mark.parametrize("labels", ["99", "-1", "0,10"])
def test_run_labels_out_of_range(capsys, tmp_path, labels):
    out = tmp_path / "samples"
    fails(capsys, [*DISCRETE, "--labels", labels, "--out", out], "are outside [0, 10)")
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("kwargs, needle", [
    ({"decoder_depth": -1}, "decoder_depth must be a positive integer"),
    ({"encoder_depth": 0}, "encoder_depth must be a positive integer"),
    ({"decoder_depth": "4"}, "decoder_depth must be an integer"),
    ({"decoder_depth": 2.5}, "decoder_depth must be an integer"),
    ({"encoder_embed_dim": True}, "encoder_embed_dim must be an integer"),
    ({"grad_checkpointing": "yes"}, "grad_checkpointing must be true or false"),
    ({"mlp_ratio": "four"}, "mlp_ratio must be a number"),
    ({"device": "gpu"}, "device 'gpu': expected"),
    ({"device": 3.5}, "device"),
    ({"checkpoint": 123}, "checkpoint must be a path, 'pretrained' or None"),
    ({"dtype": torch.int64}, "dtype must be auto, a floating torch.dtype"),
    ({"dtype": torch.bool}, "dtype must be auto, a floating torch.dtype"),
    ({"dtype": "int8"}, "dtype must be auto, a floating torch.dtype"),
    ({"widht": 3}, "unknown override 'widht'"),
])
def test_build_arguments(kwargs, needle):
    with pytest.raises(DisconError) as e:
        build("backbone", "discon-tiny", **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_build_accepts_numbers_in_yaml_spelling():
    assert build("backbone", "discon-tiny", mlp_ratio="4e0", device="meta").discon_preset \
        .params["mlp_ratio"] == 4.0


def test_sampling_arguments():
    backbone, head = tiny("backbone"), tiny("head")
    kw = dict(ar_steps=2, generator=torch.Generator().manual_seed(0))
    as_list = sample_tokens(backbone, head, [0, 1], **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(as_list, sample_tokens(backbone, head, torch.tensor([0, 1]), **kw))
    for labels, needle in (([], "labels is empty"), (torch.zeros(0, dtype=torch.long),
                                                      "labels is empty"),
                           ("ab", "labels must be class ids"), ([0.5], "labels must be int64"),
                           (torch.zeros(2, 2, dtype=torch.long), "labels must be int64 [B]")):
        with pytest.raises(DisconError, match=needle.replace("[", r"\[")):
            sample_tokens(backbone, head, labels, ar_steps=2)
    meta = build("backbone", "discon-tiny", device="meta")
    with pytest.raises(DisconError, match="backbone is on the meta device"):
        sample_tokens(meta, head, [0], ar_steps=2)
    pipe = Pipeline(prior=build("prior", "rar-tiny", device="meta"), dtok=tiny("dtok"))
    with pytest.raises(DisconError, match="prior is on the meta device"):
        pipe.generate([0], progress=False)
    with pytest.raises(DisconError, match="labels is empty"):
        Pipeline(prior=tiny("prior"), dtok=tiny("dtok")).generate([], progress=False)


@pytest.mark.parametrize("swap, needle", [
    ({"prior": "dtok", "dtok": "prior"}, "Pipeline(prior=...): got"),
    ({"backbone": "head"}, "Pipeline(backbone=...): got"),
    ({"ctok": "dtok"}, "Pipeline(ctok=...): got"),
    ({"head": 5}, "Pipeline(head=...): got int"),
])
def test_pipeline_checks_each_component_kind(swap, needle):
    parts = {k: tiny(k) for k in ("prior", "dtok", "backbone", "head", "ctok")}
    given = {k: (tiny(v) if isinstance(v, str) else v) for k, v in swap.items()}
    with pytest.raises(DisconError) as e:
        Pipeline(**{**parts, **given})
    assert needle in str(e.value) and "accepted" in str(e.value)


# -- leftovers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("item, needle", [
    ("recipe=tests.core.toy_recipe:nope", "cannot be imported"),
    ("recipe=no.such.module:fn", "cannot be imported"),
    ("recipe=dicson", "unknown recipe 'dicson'"),
])
def test_failed_train_leaves_no_folder(capsys, tmp_path, item, needle):
    out = tmp_path / "deep" / "run"
    fails(capsys, ["train", toy_yaml(tmp_path, out), "--set", item], needle)
    assert not out.exists()


def test_failed_cache_leaves_no_folder(capsys, tmp_path):
    out = tmp_path / "cache"
    fails(capsys, [*CACHE, "--dtok", "nope", "--out", out], "unknown dtok 'nope'")
    assert not out.exists()


def test_cache_accepts_checkpoint_none(capsys, tmp_path):
    out = tmp_path / "cache"
    assert main([*CACHE, "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "manifest.json").is_file() and (out / "shard-00000.safetensors").is_file()
    shutil.rmtree(out)


# -- issue 23: seeds, sampling blocks, duplicate keys, non-regular output targets ---------------

@pytest.mark.parametrize("command", ["run", "sample", "train"])
def test_seed_out_of_range_is_one_line(capsys, tmp_path, command):
    out = tmp_path / "out"
    argv = {"run": [*DISCRETE, "--out", out], "sample": [*DISCRETE, "--out", out],
            "train": ["train", toy_yaml(tmp_path, out)]}[command]
    argv = [command if a == "run" else a for a in argv]
    fails(capsys, [*argv, "--seed", "99999999999999999999999"], "--seed", "[0, 4294967295]")
    assert not out.exists()


def test_config_seed_out_of_range_names_the_file(capsys, tmp_path):
    out = tmp_path / "out"
    path = toy_yaml(tmp_path, out, seed=2**40)
    fails(capsys, ["train", path], str(path), "seed must be an integer in [0, 4294967295]")
    assert not out.exists()


@pytest.mark.parametrize("entry, needles", [
    # the registry docstring's old example: RAR's sample() has no guidance_scale
    ("prior: {bad: {extends: rar-tiny, sampling: {guidance_scale: 16.0}}}",
     ["entry prior/bad", "unknown sampling key 'guidance_scale'", "cfg_scale"]),
    ("prior: {bad: {extends: rar-tiny, sampling: {temperature: warm}}}",
     ["entry prior/bad", "sampling.temperature must be a number, got 'warm'"]),
    ("backbone: {bad: {extends: discon-tiny, sampling: {ar_steps: many}}}\n"
     "head: {bad: {extends: discon-tiny}}",
     ["entry backbone/bad", "sampling.ar_steps must be an integer, got 'many'"]),
    ("backbone: {bad: {extends: discon-tiny, sampling: {head_steps: 3}}}\n"
     "head: {bad: {extends: discon-tiny}}",
     ["entry backbone/bad", "unknown sampling key 'head_steps'"]),
])
def test_sampling_block_checked_against_the_sampler(capsys, tmp_path, entry, needles):
    reg = tmp_path / "reg.yaml"
    reg.write_text(entry + "\n")
    out = tmp_path / "out"
    names = (["--prior", "bad", "--dtok", "maskgit-vq-tiny"] if entry.startswith("prior") else
             ["--prior", "rar-tiny", "--dtok", "maskgit-vq-tiny", "--backbone", "bad",
              "--ctok", "va-vae-tiny", "--backbone-checkpoint", "none", "--ctok-checkpoint",
              "none"])
    argv = ["--registry", reg, "run", *names, "--prior-checkpoint", "none", "--dtok-checkpoint",
            "none", "--num", "2", "--no-progress", "--out", out]
    fails(capsys, argv, f"registry {reg}", *needles)
    assert not out.exists()


def test_duplicate_keys_refused_in_registries_and_configs(capsys, tmp_path):
    reg = tmp_path / "reg.yaml"
    reg.write_text("prior:\n  mine: {extends: rar-tiny}\n  mine: {extends: rar-b}\n")
    fails(capsys, ["--registry", reg, "show", "prior", "mine"], str(reg),
          "duplicate key 'mine' (line 3)")
    out = tmp_path / "out"
    path = toy_yaml(tmp_path, out)
    path.write_text(path.read_text() + "steps: 8\n")  # TOY has steps: 4 already
    fails(capsys, ["train", path], str(path), "duplicate key 'steps'")
    fails(capsys, ["train", toy_yaml(tmp_path, out), "--set", "recipe_options={a: 1, a: 2}"],
          "--set", "duplicate key 'a'")
    assert not out.exists()


def _eval_inputs(tmp_path) -> list[str]:
    import numpy as np
    np.savez(tmp_path / "g.npz", arr_0=np.zeros((20, 28, 28, 3), np.uint8))
    return ["eval", str(tmp_path / "g.npz"), "--ref", str(tmp_path / "g.npz"),
            "--extractor", "fmnist", "--metrics", "fid", "--no-progress"]


def test_eval_refuses_a_device_node_as_out(capsys, tmp_path):
    before = os.stat("/dev/full")
    fails(capsys, [*_eval_inputs(tmp_path), "--out", "/dev/full"], "/dev/full",
          "not a regular file")
    after = os.stat("/dev/full")
    assert __import__("stat").S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


@pytest.mark.parametrize("kind", ["folder", "fifo", "dangling"])
def test_save_atomic_never_replaces_what_is_not_a_regular_file(tmp_path, kind):
    from discon_core.checkpoints import save_atomic
    target = tmp_path / "x.json"
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to(tmp_path / "missing" / "y.json")
    with pytest.raises(DisconError, match="not a regular file") as e:
        save_atomic({"a": 1}, target)
    assert "\n" not in str(e.value)
    assert os.path.lexists(target) and not target.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left either


def test_save_atomic_through_a_symlink_writes_its_file(tmp_path):
    from discon_core.checkpoints import save_atomic
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    save_atomic({"a": 1}, link)
    assert link.is_symlink() and json.loads(real.read_text()) == {"a": 1}


def test_eval_json_on_stdout_and_results_file(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main([*_eval_inputs(tmp_path), "--json", "--out", str(out), "--seed", "7",
                 "--dtype", "fp32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["seed"] == 7 and printed["hardware"]["dtype"] == "fp32"
    assert printed["hardware"]["device"] == "cpu" and abs(printed["fid"]) < 1e-3
