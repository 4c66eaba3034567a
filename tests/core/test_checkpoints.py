"""Safe checkpoint loading, official-format unwrapping, key reports, atomic saves, downloads."""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from discon_core import checkpoints
from discon_core.errors import DisconError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)


def state(seed=0):
    torch.manual_seed(seed)
    return Net().state_dict()


def test_plain_state_dict_round_trip(tmp_path):
    torch.save(state(1), tmp_path / "w.bin")
    net = checkpoints.load_into(Net(), tmp_path / "w.bin")
    assert torch.equal(net.a.weight, state(1)["a.weight"])


def test_wrappers_prefer_ema_and_allow_namespace(tmp_path):
    p = tmp_path / "checkpoint-last.pth"
    torch.save({"model": state(1), "model_ema": state(2), "epoch": 3,
                "args": argparse.Namespace(lr=1e-4, model="mar_base")}, p)
    net = checkpoints.load_into(Net(), p)
    assert torch.equal(net.b.bias, state(2)["b.bias"])
    torch.save({"state_dict": state(3), "global_step": 7}, tmp_path / "lightning.ckpt")
    net = checkpoints.load_into(Net(), tmp_path / "lightning.ckpt")
    assert torch.equal(net.a.bias, state(3)["a.bias"])


def test_safetensors(tmp_path):
    save_file(state(4), str(tmp_path / "w.safetensors"))
    net = checkpoints.load_into(Net(), tmp_path / "w.safetensors")
    assert torch.equal(net.a.weight, state(4)["a.weight"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(DisconError, match="bad.safetensors is not a readable safetensors file"):
        checkpoints.load_into(Net(), tmp_path / "bad.safetensors")


def test_prefix_and_drop_list(tmp_path):
    class Head(Net):
        checkpoint_prefix = "diffloss."

    class Backbone(Net):
        checkpoint_drop = ("diffloss.", "loss.")

    full = {**state(5), **{f"diffloss.{k}": v + 1 for k, v in state(5).items()},
            "loss.logvar": torch.zeros(())}
    torch.save({"model": full}, tmp_path / "mar.pth")
    head = checkpoints.load_into(Head(), tmp_path / "mar.pth")
    backbone = checkpoints.load_into(Backbone(), tmp_path / "mar.pth")
    assert torch.equal(head.a.weight, state(5)["a.weight"] + 1)
    assert torch.equal(backbone.a.weight, state(5)["a.weight"])


def test_key_report_lists_missing_unexpected_misshaped(tmp_path):
    sd = state(0)
    del sd["b.bias"]
    sd["c.weight"] = torch.zeros(1)
    sd["a.weight"] = torch.zeros(5, 3)
    torch.save(sd, tmp_path / "w.bin")
    with pytest.raises(DisconError) as e:
        checkpoints.load_into(Net(), tmp_path / "w.bin")
    msg = str(e.value)
    assert "missing keys (1): b.bias" in msg
    assert "unexpected keys (1): c.weight" in msg
    assert "mis-shaped keys (1): a.weight (file (5, 3), model (4, 3))" in msg


def test_missing_empty_truncated_and_garbage_files(tmp_path):
    with pytest.raises(DisconError, match="checkpoint not found"):
        checkpoints.load_file(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(DisconError, match="is empty"):
        checkpoints.load_file(tmp_path / "empty.pth")
    torch.save(state(0), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(DisconError, match="truncated or corrupt"):
        checkpoints.load_file(tmp_path / "cut.pth")
    (tmp_path / "notes.txt").write_text("this is not a checkpoint\n")
    with pytest.raises(DisconError, match="not a checkpoint torch can read"):
        checkpoints.load_file(tmp_path / "notes.txt")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(DisconError, match="holds a list, not a state dict"):
        checkpoints.unwrap(checkpoints.load_file(tmp_path / "list.pth"), "list.pth")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Exploit(marker)}, f)
    with pytest.raises(DisconError, match="refused to unpickle.*Nothing in it was executed"):
        checkpoints.load_file(tmp_path / "evil.pth")
    assert not marker.exists()


def test_save_atomic_keeps_previous_file_on_failure(tmp_path):
    p = tmp_path / "ckpt.pth"
    checkpoints.save_atomic({"step": torch.tensor(1)}, p)
    with pytest.raises(Exception):
        checkpoints.save_atomic({"step": torch.tensor(2), "bad": lambda: 0}, p)
    assert int(checkpoints.load_file(p)["step"]) == 1
    assert [f.name for f in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp left behind


def test_download_file_url_with_checksum(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = checkpoints.download(src.as_uri(), tmp_path / "cache" / "w.bin", digest, progress=False)
    assert out.read_bytes() == src.read_bytes()


def test_download_checksum_mismatch_removes_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights")
    dest = tmp_path / "cache" / "w.bin"
    with pytest.raises(DisconError, match=r"expected sha256 0{64}, got [0-9a-f]{64}"):
        checkpoints.download(src.as_uri(), dest, "0" * 64, progress=False)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_fetch_uses_discon_home_and_explains_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("DISCON_HOME", str(tmp_path / "home"))
    src = tmp_path / "w.bin"
    src.write_bytes(b"abc")
    got = checkpoints.fetch("sub/w.bin", src.as_uri())
    assert got == tmp_path / "home" / "checkpoints" / "sub" / "w.bin" and got.read_bytes() == b"abc"
    src.unlink()
    assert checkpoints.fetch("sub/w.bin", src.as_uri()) == got  # cached: no second download
    with pytest.raises(DisconError, match=r"expected file .*other.bin is missing"):
        checkpoints.fetch("other.bin", None)


def test_pretrained_without_weights_names_preset_file_and_source(tmp_path):
    from discon_core.registry import CheckpointSource, Preset
    url = (tmp_path / "offline" / "rar_b.bin").as_uri()
    preset = Preset(kind="prior", name="rar-b", factory="rar",
                    checkpoint=CheckpointSource(file="rar_b.bin", url=url))
    with pytest.raises(DisconError, match=rf"prior preset 'rar-b'.*rar_b.bin.*get it from {url}"):
        checkpoints.fetch_preset_checkpoint(preset)
    with pytest.raises(DisconError, match=r"prior preset 'rar-b'.*expected file .*rar_b.bin is missing"):
        checkpoints.fetch_preset_checkpoint(Preset(kind="prior", name="rar-b", factory="rar",
                                                   checkpoint=CheckpointSource(file="rar_b.bin")))
    with pytest.raises(DisconError, match=r"has no published checkpoint"):
        checkpoints.fetch_preset_checkpoint(Preset(kind="head", name="flow", factory="flow"))
