"""The CPU-scale reproduction driver (benchmarks/reproduce.py): preset checks before any work,
the quick profile end to end (every stage, results, rendering), reuse and refusals."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import reproduce  # noqa: E402

CONFIG = ROOT / "configs" / "paper_cpu.yaml"


def write_config(tmp_path: Path, **changes) -> Path:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["out"] = str(tmp_path / "study")
    cfg["results"] = str(tmp_path / "results")
    for key, value in changes.items():
        node = cfg
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # cache order matters
    return path


def test_shipped_config_checks_and_lists_its_stages(capsys, monkeypatch):
    assert reproduce.main([str(CONFIG), "--list"]) == 0
    stages = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    for s in ("tok:dtok", "cache:va-vae", "cont:mar-s", "cont:discon-m", "prior:rar-l",
              "cont:discon-m:s1", "prior:rar-l:s1", "tokens:rar-l:1:1000",
              "eval:table2:mar-m:1", "eval:table3:rar-s:dtok:0", "eval:fig6:discon-s:64",
              "eval:fig7:discon-s-kl:0.7", "eval:fig8:mar-s:1500", "eval:rfid:ldm-kl",
              "cont:discon-s+flow-head", "eval:ablation:base", "eval:ablation:head-ddim50",
              "tok:dtok-k16", "cache:va-vae-k16", "cont:discon-s-k16", "eval:codebook:128",
              "eval:inception:rar-l:dtok"):
        assert s in stages
    # the ablation's and the sweep's models are not table rows; one training seed each
    assert "cont:discon-s-k16:s1" not in stages and "eval:rfid:dtok-k16" not in stages
    study = reproduce.Study(reproduce.load_config(str(CONFIG)))
    monkeypatch.setattr(study, "_ctok_overrides", lambda cache: {})  # no cache built here
    assert study.discons == ["discon-s", "discon-m"] and study.mars == ["mar-s", "mar-m"]
    # seed 1 trains its own copy (another folder and seed); the table row samples that copy
    assert study.cont_cfg("discon-m", 1).seed == study.cont_cfg("discon-m").seed + 1
    assert study.cont_dir("discon-m", 1).name == "discon-m-s1"
    assert "cont:discon-m:s1" in study.stages["eval:table3:rar-l:discon-m:1"].deps
    # sweeps are scored on validation, the table rows on test
    assert study.stages["eval:fig7:discon-s:0.5"].settings["split"] == "val"
    flow = study.cont_cfg("discon-s+flow-head").components["head"]
    assert flow["preset"] == "discon-tiny-flow" and flow["overrides"]["diffloss_w"] == 64
    assert study.cont_cfg("discon-s-k16").components["dtok"]["overrides"] == {"codebook_size": 16}
    # training on the prior's tokens: the base's cache with its tokens redrawn by the prior
    assert study.stages["cache:va-vae+rar-l-tokens"].deps == ["cache:va-vae", "prior:rar-l"]
    assert study.cont_cfg("discon-s+prior-tokens").data["cache"].endswith("va-vae+rar-l-tokens")
    assert "cont:discon-s+prior-tokens" in study.stages["eval:ablation:prior-tokens"].deps


@pytest.mark.parametrize("change, message", [
    ({"continuous.discon-s.overrides": {"vae_embed_dim": 4}}, "continuous.discon-s"),
    ({"priors.rar-s.overrides": {"codebook_size": 1024}}, "priors.rar-s"),
    ({"continuous.mar-s.cache": "nope"}, "continuous.mar-s.cache 'nope'"),
    ({"eval.prior": "rar-xl"}, "eval.prior 'rar-xl'"),
    ({"ablation.trained.prior-tokens": {"prior_tokens": "rar-xl"}}, "prior_tokens 'rar-xl'"),
])
def test_presets_that_do_not_fit_are_refused_before_any_work(tmp_path, capsys, change, message):
    path = write_config(tmp_path, **change)
    assert reproduce.main([str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_quick_profile_end_to_end(tmp_path, capsys):
    path = write_config(tmp_path)
    assert reproduce.main([str(path), "--quick"]) == 0
    results = tmp_path / "study_quick" / "results"
    rows = {p.stem: json.loads(p.read_text()) for p in results.glob("eval__*.json")}
    for stem in ("eval__table2__mar-s__0", "eval__table3__rar-l__discon-m__0",
                 "eval__table3__rar-s__dtok__0", "eval__fig6__discon-s__16",
                 "eval__fig7__discon-s-kl__1.0", "eval__fig8__mar-s__10", "eval__rfid__va-vae",
                 "eval__bf16_check", "eval__figures", "eval__ablation__base",
                 "eval__ablation__half-training", "eval__ablation__prior-tokens",
                 "eval__codebook__16", "eval__codebook__128"):
        assert stem in rows, stem
    # choices on the validation split, table rows on test, each with its pixel statistics
    assert rows["eval__fig7__discon-s__1.0"]["split"] == "val"
    assert rows["eval__mar_cfg__mar-s__1.0"]["split"] == "val"
    row = rows["eval__table3__rar-l__discon-m__0"]
    assert row["split"] == "test" and "black" in row["pixels"] and "pass" in row["pixel_check"]
    assert row["N"] == 40 and row["extractor"] == "fmnist" and 0 <= row["class_accuracy"] <= 1
    assert row["hardware"]["dtype"] == "fp32" and "cpu_capability" in row["hardware"]
    # the ablation: oracle and end-to-end scores per row; a sampled row on a kept checkpoint
    abl = rows["eval__ablation__half-training"]
    assert abl["settings"]["step"] == 10 and abl["oracle"]["fid"] > 0 and abl["e2e"]["fid"] > 0
    assert rows["eval__ablation__prior-tokens"]["params"] == rows["eval__ablation__base"]["params"]
    manifest = tmp_path / "study_quick" / "cache" / "va-vae+rar-l-tokens" / "manifest.json"
    drawn = json.loads(manifest.read_text())["tokens_from"]  # trained on tokens the prior drew
    assert drawn["prior"]["preset"] == "rar-tiny-l"
    assert drawn["source"]["preset"] == "maskgit-vq-tiny"
    # the codebook sweep: the 16-code dtok and its DisCon, the three decodes of the same images
    cb = rows["eval__codebook__16"]
    assert cb["settings"]["model"] == "discon-s-k16" and set(cb["rows"]) == {
        "dtok_reconstruction", "ctok_reconstruction", "discon_from_true_tokens"}
    assert yaml.safe_load((tmp_path / "study_quick" / "tok" / "dtok-k16" / "config.yaml")
                          .read_text())["steps"] == 20  # the quick schedule, not the sweep's
    # the ablation's trained rows and the sweep's DisCon run the shorter schedule; the main
    # codebook size is the base's checkpoint at that step
    for cfg_yaml in ("cont/discon-s+prior-tokens/config.yaml", "cont/discon-s-k16/config.yaml"):
        assert yaml.safe_load((tmp_path / "study_quick" / cfg_yaml).read_text())["steps"] == 10
    assert rows["eval__codebook__128"]["settings"]["step"] == 10
    assert rows["eval__codebook__16"]["settings"]["step"] is None
    assert all(r["signature"] for r in rows.values())  # the results stand without the markers
    for cfg_yaml in ("cont/discon-m/config.yaml", "prior/rar-l/config.yaml"):
        assert yaml.safe_load((tmp_path / "study_quick" / cfg_yaml).read_text())["ema_warmup"]
    assert row["fid"] > 0 and row["sec_per_img"] > row["sec_per_img_prior"] > 0
    assert rows["eval__table2__mar-s__0"]["settings"]["ar_steps"] == 64
    # rendering: tables, plots and the claims, kept beside the quick results
    assert reproduce.main([str(path), "--quick", "--render"]) == 0
    md = (results / "RESULTS.md").read_text()
    for text in ("Table 2 analogue", "Table 3 analogue", "rFID", "The paper's claims",
                 "Closing the oracle gap", "codebook size", "validation split"):
        assert text in md
    for png in ("fig6_fid_vs_ar_steps.png", "fig7_fid_vs_temperature.png",
                "fig8_fid_vs_epochs.png", "fig2_discrete_vs_discon.png", "fig5_ar_steps.png",
                "fig_codebook_size.png"):
        assert (results / png).is_file()
    # a rerun finds every stage done
    capsys.readouterr()
    assert reproduce.main([str(path), "--quick", "--list"]) == 0
    assert "todo" not in capsys.readouterr().out
    # a finished stage trained with other settings is refused, naming the difference
    cfg = yaml.safe_load(path.read_text())
    cfg["tokenizers"]["dtok"]["train"]["optimizer"]["lr"] = 5.0e-3
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # cache order matters
    assert reproduce.main([str(path), "--quick", "--only", "tok:dtok"]) == 1
    assert "optimizer" in capsys.readouterr().err


def test_tracked_results_stand_and_only_what_remains_is_rebuilt(tmp_path):
    """Results carry their settings' signature: on a fresh clone (no checkpoints, no markers)
    the measurements in git stand, only the inputs of the missing ones are rebuilt, and those
    run in the tier of the most urgent stage needing them."""
    study = reproduce.Study(reproduce.load_config(str(write_config(tmp_path))))
    missing = {"eval:codebook:16", "eval:rfid_inception:ldm-kl"}
    study.results.mkdir(parents=True)
    for s in study.stages:
        if s.startswith("eval:") and s not in missing:
            study.result(s).write_text(json.dumps(
                {"stage": s, "signature": reproduce.signature(study.stages[s].settings)}))
    todo, ready = study.runnable()
    assert set(todo) == missing | {"cont:discon-s-k16", "cache:va-vae-k16", "tok:dtok-k16",
                                   "tok:va-vae", "tok:dtok", "tok:ldm-kl", "cache:ldm-kl",
                                   "ref:inception"}
    # the codebook sweep (tier 3) before Inception (4), config order within a tier
    assert ready == ["tok:va-vae", "tok:dtok-k16", "tok:dtok", "tok:ldm-kl", "ref:inception"]
    # a result made with other settings does not stand
    study.result("eval:rfid:dtok").write_text(json.dumps({"stage": "eval:rfid:dtok",
                                                         "signature": "0" * 16}))
    assert not study.is_done("eval:rfid:dtok")
    assert "eval:rfid:dtok" in study.runnable()[0]


def test_longest_remaining_path_runs_first_within_a_tier(tmp_path):
    """The ablation's inputs: the prior (prior -> tokens -> every row) is claimed before the
    five ablation models (model -> one row) that come before it in config order."""
    study = reproduce.Study(reproduce.load_config(str(write_config(tmp_path))))
    pending = ("eval:ablation", "prior:", "tokens:", "cont:discon-s+")
    for s, st in study.stages.items():
        if not s.startswith(pending):
            study.marker(s).parent.mkdir(parents=True, exist_ok=True)
            study.marker(s).write_text(json.dumps({"signature": reproduce.signature(st.settings)}))
    todo, ready = study.runnable()
    models = [s for s in study.stages if s.startswith("cont:discon-s+")]
    assert list(study.stages).index("prior:rar-l") > list(study.stages).index(models[-1])
    assert ready == ["prior:rar-l"] + models
    assert "tokens:rar-l:0:500" in todo and "tokens:rar-l:0:500" not in ready


def test_inception_statistics_are_one_stage_that_every_inception_row_waits_on(tmp_path):
    """The test split's Inception statistics (10,000 images, the study's slowest input) are
    computed by one worker in a stage of their own, not by each worker reaching an Inception row."""
    study = reproduce.Study(reproduce.load_config(str(write_config(tmp_path))))
    rows = [s for s in study.stages if "inception" in s and s != "ref:inception"]
    assert len(rows) == 6 and all("ref:inception" in study.stages[s].deps for s in rows)
    assert study.stages["ref:inception"].deps == []
    for s, st in study.stages.items():
        if s not in rows and s != "ref:inception":
            study.marker(s).parent.mkdir(parents=True, exist_ok=True)
            study.marker(s).write_text(json.dumps({"signature": reproduce.signature(st.settings)}))
    todo, ready = study.runnable()
    assert ready == ["ref:inception"] and set(todo) == {"ref:inception", *rows}


def test_a_separate_fp32_run_trains_everything_anew_in_fp32(tmp_path, capsys, monkeypatch):
    """`--dtype fp32 --out DIR` (timing the study on a CPU without native bf16): every stage of
    that run trains in fp32 and is todo there, whatever the tracked results say."""
    cfg = reproduce.run_options(reproduce.load_config(str(CONFIG)), "fp32", tmp_path / "fp32")
    study = reproduce.Study(cfg)
    monkeypatch.setattr(study, "_ctok_overrides", lambda cache: {})  # no cache built here
    assert study.results == tmp_path / "fp32" / "results" and cfg["separate_run"]
    assert study.cont_cfg("discon-s").precision == "fp32"
    assert study.prior_cfg("rar-l", 1).precision == "fp32"
    assert reproduce.main([str(CONFIG), "--list", "--dtype", "fp32", "--out",
                           str(tmp_path / "fp32")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("todo") for line in lines)
