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


def test_shipped_config_checks_and_lists_its_stages(capsys):
    assert reproduce.main([str(CONFIG), "--list"]) == 0
    stages = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    for s in ("tok:dtok", "cache:va-vae", "cont:mar-s", "cont:discon-m", "prior:rar-l",
              "eval:table2:mar-m:1", "eval:table3:rar-s:dtok:0", "eval:fig6:discon-s:64",
              "eval:fig7:discon-s-kl:0.7", "eval:fig8:mar-s:2000", "eval:rfid:ldm-kl"):
        assert s in stages


@pytest.mark.parametrize("change, message", [
    ({"continuous.discon-s.overrides": {"vae_embed_dim": 4}}, "continuous.discon-s"),
    ({"priors.rar-s.overrides": {"codebook_size": 1024}}, "priors.rar-s"),
    ({"continuous.mar-s.cache": "nope"}, "continuous.mar-s.cache 'nope'"),
    ({"eval.prior": "rar-xl"}, "eval.prior 'rar-xl'"),
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
                 "eval__bf16_check", "eval__figures", "eval__long__discon-m__40__raw",
                 "eval__warm__rar-l__dtok__0", "eval__warm__rar-l__discon-m__0"):
        assert stem in rows, stem
    # past the schedule: the continued run's kept step, scored with its raw weights
    assert rows["eval__long__discon-m__30__ema"]["settings"]["step"] == 30
    assert rows["eval__long__discon-m__20__raw"]["settings"]["weights"] == "raw"
    # the EMA warmup check: its own prior, tokens and DisCon, trained with ema_warmup
    assert rows["eval__warm__rar-l__discon-m__0"]["settings"]["ema_warmup"] is True
    warm_cfg = yaml.safe_load((tmp_path / "study_quick" / "warm" / "cont" / "discon-m" /
                               "config.yaml").read_text())
    assert warm_cfg["ema_warmup"] is True
    row = rows["eval__table3__rar-l__discon-m__0"]
    assert row["N"] == 40 and row["extractor"] == "fmnist" and 0 <= row["class_accuracy"] <= 1
    assert row["fid"] > 0 and row["sec_per_img"] > row["sec_per_img_prior"] > 0
    assert rows["eval__table2__mar-s__0"]["settings"]["ar_steps"] == 64
    # rendering: tables, plots and the claims, kept beside the quick results
    assert reproduce.main([str(path), "--quick", "--render"]) == 0
    md = (results / "RESULTS.md").read_text()
    for text in ("Table 2 analogue", "Table 3 analogue", "rFID", "The paper's claims",
                 "Past the schedule", "The EMA warmup check"):
        assert text in md
    for png in ("fig6_fid_vs_ar_steps.png", "fig7_fid_vs_temperature.png",
                "fig8_fid_vs_epochs.png", "fig2_discrete_vs_discon.png", "fig5_ar_steps.png",
                "fig8_fid_past_schedule.png"):
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
