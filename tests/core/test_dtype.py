"""Reduced precision: dtypes build() refuses, and the bf16 path stays finite and close
to fp32 on the tiny presets (same weights, same inputs)."""
from __future__ import annotations

import pytest
import torch

from discon_core import DisconError, build, sample_tokens


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Visible random weights (MAR's init zeroes the head's output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.02))
    return module.eval()


def _pair(kind: str, name: str):
    fp32 = _randomize(build(kind, name))
    bf16 = build(kind, name)
    bf16.load_state_dict(fp32.state_dict())
    return fp32, bf16.to(torch.bfloat16).eval()


@pytest.mark.parametrize("bad", ["bfloat61", "int8", torch.int64, torch.bool, 16])
def test_build_rejects_other_dtypes_naming_the_call(bad):
    with pytest.raises(DisconError, match=r"build\('head', 'discon-tiny'\): dtype must be auto"):
        build("head", "discon-tiny", dtype=bad)


def test_build_casts_with_a_dtype_name():
    head = build("head", "discon-tiny", dtype="bf16")
    assert {p.dtype for p in head.parameters()} == {torch.bfloat16}


def test_bf16_backbone_and_head_close_to_fp32():
    torch.manual_seed(0)
    bb32, bb16 = _pair("backbone", "discon-tiny")
    hd32, hd16 = _pair("head", "discon-tiny")
    b, n, d = 4, bb32.seq_len, bb32.token_dim
    x = torch.randn(b, n, d)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, n // 2:] = True
    labels = torch.tensor([0, 3, 5, 9])
    cond = torch.randint(0, bb32.cond_vocab_size, (b, n))
    with torch.no_grad():
        z32 = bb32(x, mask, labels, cond)
        z16 = bb16(x.bfloat16(), mask, labels, cond)
    assert z16.dtype == torch.bfloat16 and torch.isfinite(z16).all()
    rel = (z16.float() - z32).abs().max() / z32.abs().max()
    assert rel < 0.05, f"backbone bf16 vs fp32 relative max diff {rel:.3g}"
    rows = z32[:, :8].reshape(-1, bb32.z_dim)
    noise = torch.randn(rows.shape[0], d)
    t32 = hd32.sample(rows, noise=noise, temperature=0.0, steps=25)
    t16 = hd16.sample(rows.bfloat16(), noise=noise.bfloat16(), temperature=0.0, steps=25)
    assert torch.isfinite(t16).all()
    rel = (t16.float() - t32).abs().max() / t32.abs().max()
    assert rel < 0.05, f"head bf16 vs fp32 relative max diff {rel:.3g}"


def test_bf16_sampling_and_decoding_are_finite():
    bb = _randomize(build("backbone", "discon-tiny")).bfloat16()
    head = _randomize(build("head", "discon-tiny-flow")).bfloat16()
    g = torch.Generator().manual_seed(0)
    cond = torch.randint(0, bb.cond_vocab_size, (3, bb.seq_len), generator=g)
    x = sample_tokens(bb, head, torch.tensor([1, 2, 3]), cond=cond, ar_steps=4, generator=g)
    assert x.shape == (3, bb.seq_len, bb.token_dim) and torch.isfinite(x).all()
    vq32, vq16 = _pair("dtok", "maskgit-vq-tiny")
    ids = torch.randint(0, vq32.codebook_size, (2, 8, 8), generator=g)
    with torch.no_grad():
        im32, im16 = vq32.decode(ids), vq16.decode(ids)
    assert torch.isfinite(im16).all() and (im16.float() - im32).abs().max() < 0.1


@pytest.mark.parametrize("head_name", ["discon-tiny", "discon-tiny-flow"])
def test_bf16_sample_tokens_close_to_fp32(head_name):
    """The whole continuous stage in bf16 against fp32 from the same seed: the heads draw their
    noise in fp32 and keep the sampler state in fp32, so the tokens differ by rounding only."""
    bb32, bb16 = _pair("backbone", "discon-tiny")
    hd32, hd16 = _pair("head", head_name)
    labels = torch.tensor([1, 2, 3])
    cond = torch.randint(0, bb32.cond_vocab_size, (3, bb32.seq_len),
                         generator=torch.Generator().manual_seed(1))
    x32, x16 = (sample_tokens(bb, hd, labels, cond=cond, ar_steps=4,
                              generator=torch.Generator().manual_seed(0))
                for bb, hd in ((bb32, hd32), (bb16, hd16)))
    assert x16.dtype == torch.bfloat16 and torch.isfinite(x16).all()
    rel = (x16.float() - x32).abs().max() / x32.abs().max()
    assert rel < 0.02, f"bf16 vs fp32 tokens: relative max diff {rel:.3g}"
