"""The precision policy (discon_core/precision.py): auto by the hardware, mocked both ways;
explicit requests honoured with one warning where slow; auto is the default everywhere."""
from __future__ import annotations

import inspect
import logging

import pytest
import torch
import yaml

from discon_core import DisconError, build, precision
from discon_core.config import TrainConfig
from tests.conftest import REPO


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set whether this 'CPU' runs bf16 natively; the once-per-process log starts afresh."""
    monkeypatch.setattr(precision, "_said", set())

    def set_native(native: bool) -> None:
        monkeypatch.setattr(precision, "_cpu_native_bf16", lambda: native)
    return set_native


@pytest.fixture
def cuda(monkeypatch):
    def set_cuda(available: bool, bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    return set_cuda


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_follows_native_bf16(cpu_bf16, native, expected):
    cpu_bf16(native)
    assert precision.resolve_dtype("auto", "cpu") is expected
    assert precision.resolve_dtype(None, "cpu") is expected
    assert precision.resolve_precision("auto", "cpu") == {torch.bfloat16: "bf16",
                                                          torch.float32: "fp32"}[expected]


@pytest.mark.parametrize("available, bf16, expected", [
    (True, True, torch.bfloat16), (True, False, torch.float32), (False, False, torch.float32)])
def test_auto_on_cuda_follows_the_gpu(cpu_bf16, cuda, available, bf16, expected):
    cpu_bf16(not bf16)  # the CPU's answer must not leak into the GPU's
    cuda(available, bf16)
    assert precision.resolve_dtype("auto", "cuda") is expected


def test_the_cuda_check_excludes_emulated_bf16(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: seen.setdefault("emu", including_emulation))
    precision.native_bf16("cuda")
    assert seen["emu"] is False  # a pre-Ampere GPU emulates bf16: auto must say fp32 there


@pytest.mark.parametrize("value, expected", [
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
    ("half", torch.float16), ("fp32", torch.float32), ("float", torch.float32),
    (" BF16 ", torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_explicit_requests_are_honoured(cpu_bf16, value, expected):
    for native in (True, False):
        cpu_bf16(native)
        assert precision.resolve_dtype(value, "cpu") is expected


@pytest.mark.parametrize("bad", ["bfloat61", "int8", torch.int64, torch.bool, 16])
def test_other_values_are_one_error_naming_the_setting(bad):
    with pytest.raises(DisconError, match=r"--dtype must be auto, a floating torch.dtype or one"):
        precision.resolve_dtype(bad, "cpu", "--dtype")


def test_explicit_bf16_where_not_native_warns_once(cpu_bf16, caplog):
    cpu_bf16(False)
    with caplog.at_level(logging.INFO, logger="discon_core.precision"):
        for _ in range(3):
            precision.resolve_dtype("bf16", "cpu")
        precision.resolve_dtype("fp32", "cpu")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "slower than fp32 here" in warnings[0].getMessage()
    assert "bf16 native: False" in warnings[0].getMessage()  # says why


def test_explicit_bf16_where_native_and_auto_do_not_warn(cpu_bf16, caplog):
    cpu_bf16(True)
    with caplog.at_level(logging.INFO, logger="discon_core.precision"):
        precision.resolve_dtype("bf16", "cpu")
        precision.resolve_dtype("auto", "cpu")
        precision.resolve_dtype("auto", "cpu")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    chosen = [r.getMessage() for r in caplog.records if "precision auto" in r.getMessage()]
    assert len(chosen) == 1 and "-> bf16" in chosen[0] and "capability" in chosen[0]


def test_the_onednn_check_decides_on_cpu(monkeypatch):
    """oneDNN's own answer wins over the flags (it honours ONEDNN_MAX_CPU_ISA); the flags are
    the fallback for a torch without oneDNN."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False,
                        raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    assert precision._cpu_native_bf16() is False
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert precision._cpu_native_bf16() is True
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert precision._cpu_native_bf16() is False


def test_hardware_record_names_the_machine(cpu_bf16):
    cpu_bf16(False)
    rec = precision.hardware_record("cpu", torch.float32)
    assert rec["dtype"] == "fp32" and rec["native_bf16"] is False and rec["device"] == "cpu"
    assert rec["threads"] == torch.get_num_threads() and rec["torch"] == torch.__version__
    assert rec["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and rec["cpu_model"]


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_build_defaults_to_auto_for_loaded_weights(cpu_bf16, tmp_path, native, expected):
    assert inspect.signature(build).parameters["dtype"].default == "auto"
    cpu_bf16(native)
    from safetensors.torch import save_file
    save_file({f"diffloss.{k}": v for k, v in build("head", "discon-tiny").state_dict().items()},
              str(tmp_path / "head.safetensors"))  # the head's keys in MAR's layout
    loaded = build("head", "discon-tiny", checkpoint=tmp_path / "head.safetensors")
    assert next(loaded.parameters()).dtype is expected
    # random init is there to be trained: fp32 weights whatever the hardware
    assert next(build("head", "discon-tiny").parameters()).dtype is torch.float32
    assert next(build("head", "discon-tiny", dtype=None,
                      checkpoint=tmp_path / "head.safetensors").parameters()).dtype is torch.float32


def test_training_precision_defaults_to_auto_and_is_checked():
    raw = {"recipe": "discon", "components": {"backbone": "discon-tiny"}, "data": {}, "steps": 1}
    assert TrainConfig.from_dict(raw).precision == "auto"
    with pytest.raises(DisconError, match="precision must be auto, fp32 or bf16, got 'fp16'"):
        TrainConfig.from_dict({**raw, "precision": "fp16"})


def _precisions(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "precision":
                yield f"{path}.{k}".lstrip("."), v
            yield from _precisions(v, f"{path}.{k}")


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_uses_auto_or_says_nothing(config):
    raw = yaml.safe_load((REPO / "configs" / config).read_text())
    assert {k: v for k, v in _precisions(raw) if v != "auto"} == {}
    if "recipe" in raw:  # a training config: it parses with the policy's default
        assert TrainConfig.load(REPO / "configs" / config).precision == "auto"


def test_trainer_resolves_auto_and_records_the_hardware(cpu_bf16, tmp_path):
    import json

    from discon_core.train import Trainer, train
    from tests.core.test_train import toy_config
    cpu_bf16(False)
    cfg = toy_config(tmp_path / "run", steps=4)
    assert cfg.precision == "auto" and Trainer(cfg).precision == "fp32"
    state = torch.load(train(cfg), weights_only=True)
    hw = json.loads(state["hardware"])
    assert hw["dtype"] == "fp32" and hw["native_bf16"] is False and hw["torch"] == torch.__version__
    cpu_bf16(True)
    assert Trainer(toy_config(tmp_path / "run2", steps=4)).precision == "bf16"
