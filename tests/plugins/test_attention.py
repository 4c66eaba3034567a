"""Attention backends: sdpa and math agree (also bottom-right causal, as a KV cache needs),
explicit choices that cannot run are errors, and the Attention module's cache is exact."""
from __future__ import annotations

import pytest
import torch

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
