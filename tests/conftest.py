"""Shared test setup: isolation from installed third-party plugins and from the user's cache,
and the path to the reference fixtures in ../shared (tests that need them skip without it)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ["DISCON_DISABLE_PLUGINS"] = "1"
os.environ.pop("DISCON_REGISTRY", None)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISCON_SHARED", REPO.parent / "shared"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DISCON_HOME", str(tmp_path_factory.mktemp("discon_home")))


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared (the spec and reference fixtures); skips the test when it is absent."""
    if not (SHARED / "fixtures").is_dir():
        pytest.skip(f"reference fixtures not found at {SHARED} (set DISCON_SHARED)")
    return SHARED


def load_fixture(shared: Path, name: str):
    """(config dict, io dict, fixture folder) of ../shared/fixtures/<name>."""
    folder = shared / "fixtures" / name
    config = json.loads((folder / "config.json").read_text())
    io = torch.load(folder / "io.pt", map_location="cpu", weights_only=True)
    return config, io, folder


def assert_chain_close(got: torch.Tensor, exp: torch.Tensor, *, norm_rtol: float = 1e-4,
                       rtol: float = 2e-2, atol: float = 1e-2) -> None:
    """Closeness for sampling chains recorded by the reference code: they reach ~1e5 and amplify
    fp32 rounding, which differs between CPUs and BLAS kernels (AVX-512 vs AVX2), so a few
    elements drift by ~1e-3 relative. The whole tensor must agree to ``norm_rtol`` (relative
    L2) and every element to ``rtol``: a wrong step, schedule or RNG use misses by ~1."""
    got = got.to(exp.dtype)
    assert got.shape == exp.shape
    err = float((got - exp).norm() / exp.norm().clamp_min(1e-12))
    assert err <= norm_rtol, f"relative L2 error {err:.2e} > {norm_rtol:.0e}"
    torch.testing.assert_close(got, exp, atol=atol, rtol=rtol)


def load_manifest(shared: Path, name: str) -> dict:
    return json.loads((shared / "spec" / "manifests" / f"{name}.keys.json").read_text())


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared CPU, tiny convs run much faster without thread
    contention (results change by float rounding only, far below the tolerances)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fashion_mnist_32(n: int) -> torch.Tensor:
    """The first ``n`` Fashion-MNIST test images as [n,3,32,32] in [0,1] (skips without the data)."""
    from discon_plugins.datasets import FashionMNIST
    from discon_core.errors import DisconError

    try:
        ds = FashionMNIST(split="test", limit=n)
    except DisconError as e:
        pytest.skip(str(e))
    return torch.stack([ds.get(i)[0] for i in range(n)])
