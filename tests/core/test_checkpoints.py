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
    with pytest.raises(DisconError, match=r"^download: file://\S+src.bin is corrupted: sha256 "
                                          r"[0-9a-f]{64}, expected 0{64}; the download was deleted$"):
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


class FakeHub:
    """hf_hub_download stand-in: serves ``files`` (name -> bytes) from a fake repo at commit
    ``c0ffee``, laid out like the Hub client's cache; records every call."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.calls = files, []

    def __call__(self, repo, filename, *, revision=None, local_files_only=False, cache_dir=None):
        from huggingface_hub.utils import LocalEntryNotFoundError
        self.calls.append((repo, filename, revision, local_files_only))
        path = (cache_dir / f"models--{repo.replace('/', '--')}" / "snapshots" / "c0ffee"
                / filename)
        if local_files_only:
            if not path.is_file():
                raise LocalEntryNotFoundError("not in the cache")
            return str(path)
        if filename not in self.files:
            raise OSError(f"404 Client Error: {filename} not found")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.files[filename])
        return str(path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setenv("DISCON_HOME", str(tmp_path / "home"))
    for var in checkpoints.OFFLINE_ENV:
        monkeypatch.delenv(var, raising=False)
    fake = FakeHub({"w.bin": b"weights"})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


def test_hub_download_records_sha256_and_commit_then_reuses_the_cache(hub, tmp_path):
    got = checkpoints.fetch("w.bin", repo="org/model", filename="w.bin", revision="main")
    assert got.read_bytes() == b"weights" and "snapshots/c0ffee" in str(got)
    assert [c[3] for c in hub.calls] == [True, False]  # the cache first, then the network
    book = checkpoints.read_json(tmp_path / "home" / "checkpoints" / checkpoints.HASHES, "book")
    (rec,) = book.values()
    assert rec["sha256"] == hashlib.sha256(b"weights").hexdigest() and rec["revision"] == "c0ffee"
    assert rec["source"] == "https://huggingface.co/org/model/resolve/main/w.bin"
    hub.calls.clear()
    assert checkpoints.fetch("w.bin", repo="org/model", filename="w.bin") == got
    assert [c[3] for c in hub.calls] == [True]  # reused: no download
    shared = "$DISCON_HOME/" + str(got.relative_to(tmp_path / "home"))  # no path of this machine
    assert checkpoints.provenance(got) == {"file": shared, "sha256": rec["sha256"],
                                           "revision": "c0ffee", "source": rec["source"]}


def test_hub_url_is_fetched_through_the_hub_client(hub):
    got = checkpoints.fetch("w.bin", "https://huggingface.co/org/model/resolve/v1/w.bin")
    assert got.read_bytes() == b"weights" and ("org/model", "w.bin", "v1", False) in hub.calls


def test_a_changed_cached_file_is_refused_against_the_first_use_record(hub):
    got = checkpoints.fetch("w.bin", repo="org/model", filename="w.bin")
    got.write_bytes(b"tampered")
    with pytest.raises(DisconError, match=r"^file: \S+w.bin is corrupted: sha256 [0-9a-f]{64}, "
                                          r"expected [0-9a-f]{64}; delete \S+ and run again"):
        checkpoints.fetch("w.bin", repo="org/model", filename="w.bin")


def test_registry_sha256_is_checked_on_download(hub):
    with pytest.raises(DisconError, match="corrupted: sha256 .* expected 0{64}"):
        checkpoints.fetch("w.bin", repo="org/model", filename="w.bin", sha256="0" * 64)


def test_offline_mode_and_hub_errors_are_one_line(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DisconError, match=r"^prior: w.bin is not cached and downloads are off "
                                          r"\(HF_HUB_OFFLINE or DISCON_OFFLINE is set\)"):
        checkpoints.fetch("w.bin", repo="org/model", filename="w.bin", what="prior")
    assert not any(c[3] is False for c in hub.calls)  # nothing was downloaded
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(DisconError, match=r"^prior: cannot download gone.bin from the Hub repo "
                                          r"org/model \(revision main\): 404 Client Error") as e:
        checkpoints.fetch("gone.bin", repo="org/model", filename="gone.bin", what="prior")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("file", ["../../../../tmp/x.safetensors", "/tmp/x.safetensors",
                                  "sub/../../x.bin"])
def test_cache_paths_stay_inside_discon_home(hub, file):
    with pytest.raises(DisconError, match=r"must be a relative path inside \$DISCON_HOME"):
        checkpoints.fetch(file, "file:///tmp/x.safetensors")


def test_local_file_provenance_hashes_it(tmp_path):
    f = tmp_path / "mine.pth"
    f.write_bytes(b"mine")
    assert checkpoints.provenance(f) == {"file": str(f),
                                         "sha256": hashlib.sha256(b"mine").hexdigest()}
    assert checkpoints.provenance(None) is None


@pytest.mark.parametrize("local_rank", ["0", "1"])
@pytest.mark.parametrize("cached", [False, True])
def test_under_torchrun_local_rank_0_fetches_first(hub, monkeypatch, local_rank, cached):
    """Each rank reaches the one barrier whatever its cache holds (so that the calls pair up
    across nodes): local rank 0 after fetching, the others before they look."""
    log = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: log.append("barrier"))
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    if cached or local_rank != "0":  # rank 0 has filled the shared cache before the others look
        hub("org/model", "w.bin", cache_dir=checkpoints.discon_home() / "hub")
    monkeypatch.setattr(hub, "calls", [])
    got = checkpoints.fetch("w.bin", repo="org/model", filename="w.bin")
    assert got.read_bytes() == b"weights" and log == ["barrier"]
    downloaded = any(c[3] is False for c in hub.calls)
    assert downloaded == (local_rank == "0" and not cached)


def test_portable_writes_the_cache_root_as_a_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DISCON_HOME", str(tmp_path / "home"))
    stats = str(tmp_path / "home" / "eval" / "ref.npz")
    row = {"fid": 1.5, "reference_stats": stats, "rows": [{"p": stats}],
           "other": str(tmp_path / "homework" / "x"), "generated": "runs/a.npz"}
    out = checkpoints.portable(row)
    assert out["reference_stats"] == "$DISCON_HOME/eval/ref.npz" == out["rows"][0]["p"]
    assert out["other"] == row["other"] and out["generated"] == "runs/a.npz"  # only the root
    assert out["fid"] == 1.5
