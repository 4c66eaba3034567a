"""Attention backends: sdpa, math and (bf16) matmul agree (also bottom-right causal, as a KV
cache needs), explicit choices that cannot run are errors, the Attention module's cache is exact,
and the bf16 Linear fast path equals F.linear and follows weight changes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from discon_core.errors import DisconError
from discon_plugins import attention as A


@pytest.mark.parametrize("lq, lk, causal", [(10, 10, False), (10, 10, True), (1, 7, True),
                                            (3, 7, True)])
def test_sdpa_matches_math(lq, lk, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (lq, lk, lk))
    sdpa = A.attention(q, k, v, backend="sdpa", causal=causal)
    math = A.attention(q, k, v, backend="math", causal=causal)
    torch.testing.assert_close(sdpa, math, atol=1e-5, rtol=1e-5)
    if causal and lq == 1:  # the last query sees every key
        full = A.attention(q, k, v, backend="math")
        torch.testing.assert_close(math, full)


def test_additive_mask_matches_math():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
    mask = torch.zeros(5, 5).masked_fill(torch.rand(5, 5, generator=g) < 0.3, float("-inf"))
    mask.fill_diagonal_(0)
    torch.testing.assert_close(A.attention(q, k, v, backend="sdpa", attn_mask=mask),
                               A.attention(q, k, v, backend="math", attn_mask=mask),
                               atol=1e-5, rtol=1e-5)


def test_backend_choice_errors():
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(DisconError, match="unknown attn_backend 'flash'"):
        A.attention(q, q, q, backend="flash")
    with pytest.raises(DisconError, match="attn_backend='xformers' requested but"):
        A.attention(q, q, q, backend="xformers")  # CPU float32: never usable
    assert A.pick_backend("auto", q) == "sdpa"


def test_attention_module_kv_cache_equals_full_causal_pass():
    torch.manual_seed(0)
    attn = A.Attention(16, 4, qkv_bias=True, qk_norm=True).eval()
    x = torch.randn(2, 6, 16)
    full = attn(x, causal=True)
    cache = None
    steps = []
    for i in range(6):
        out, cache = attn(x[:, i:i + 1], causal=True, kv_cache=cache, return_kv=True)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_dim_must_divide_heads():
    with pytest.raises(DisconError, match="not divisible by num_heads 5"):
        A.Attention(16, 5)


@pytest.mark.parametrize("lq, lk, causal", [(10, 10, False), (3, 7, True), (1, 7, True)])
def test_matmul_backend_in_bf16_close_to_math(lq, lk, causal, monkeypatch):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(5, 3, n, 8, generator=g) for n in (lq, lk, lk))
    ref = A.attention(q, k, v, backend="math", causal=causal)
    lowp = [t.bfloat16() for t in (q, k, v)]
    # auto takes matmul for CPU bf16 only where bf16 products are native (else sdpa: faster)
    assert A.pick_backend("auto", lowp[0]) == ("matmul" if A._probe("onednn") else "sdpa")
    out = A.attention(*lowp, backend="matmul", causal=causal)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)
    monkeypatch.setattr(A, "MATMUL_SCORES_BUDGET", 2 * 3 * lq * lk)  # batch in chunks of 2
    torch.testing.assert_close(A.attention(*lowp, backend="matmul", causal=causal), out,
                               atol=0, rtol=0)


def test_matmul_backend_per_row_additive_mask():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5).masked_fill(torch.rand(2, 1, 5, 5, generator=g) < 0.3,
                                               float("-inf"))
    mask[..., 0] = 0  # every query sees a key
    torch.testing.assert_close(A.attention(q, k, v, backend="matmul", attn_mask=mask),
                               A.attention(q, k, v, backend="math", attn_mask=mask),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, rows, native, path", [
    (torch.bfloat16, 7, True, "onednn"),      # native bf16: oneDNN's packed weight
    (torch.bfloat16, 7, False, "upcast"),     # AVX2-only: the product in fp32
    (torch.bfloat16, 90, False, "upcast"),    # ... past MKL_MAX_ROWS: F.linear in fp32
    (torch.float32, 7, None, "mkl"),          # few fp32 rows: MKL's packed weight
    (torch.float32, 90, None, None),          # many fp32 rows: F.linear
])
def test_linear_fast_paths_match_f_linear_and_follow_weight_changes(monkeypatch, dtype, rows,
                                                                      native, path):
    if path == "onednn" and not A._probe("onednn"):
        pytest.skip("this CPU has no native bf16 oneDNN products")
    if native is False:  # the AVX2-only CPU's decision, on any CPU
        monkeypatch.setitem(A._packing, "onednn", False)
    if path in ("mkl", "upcast") and not A._probe("mkl"):
        pytest.skip("this torch has no MKL")
    torch.manual_seed(0)
    layer = A.Linear(64, 32).to(dtype)
    x = torch.randn(2, rows, 64).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)

    def reference(inp):  # the product in fp32, rounded to the input's dtype once
        return F.linear(inp.float(), layer.weight.float(), layer.bias.float()).to(dtype)

    with torch.no_grad():
        assert layer._path(x) == path  # the path under test
        torch.testing.assert_close(layer(x), reference(x), **tol)
        for name, act in (("gelu", F.gelu), ("silu", F.silu)):
            torch.testing.assert_close(layer(x, activation=name).float(),
                                       act(reference(x).float()), **tol)
        layer.weight.mul_(2)  # in place: the prepared copy must follow
        torch.testing.assert_close(layer(x), reference(x), **tol)
        layer.load_state_dict({"weight": torch.ones(32, 64), "bias": torch.zeros(32)})
        row_sums = x.float().sum(-1, keepdim=True).expand(2, rows, 32)
        torch.testing.assert_close(layer(x).float(), row_sums, atol=0.5, rtol=1e-2)
    y = layer(x.requires_grad_())  # autograd: the plain path, gradients flow
    assert layer._path(x) is None
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
