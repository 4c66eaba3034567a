"""discon's Attention / Mlp / Block against timm's (the official MAR builds its encoder and
decoder from timm's ``vision_transformer.Block``): the same keys and shapes, so official weights
map 1:1, and the same outputs on the same weights, on every attention backend and Linear path."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from discon_plugins import attention as A

vit = pytest.importorskip("timm.models.vision_transformer", reason="timm is a test dependency")

DIM, HEADS = 64, 4


def pair(ours: nn.Module, theirs: nn.Module) -> tuple[nn.Module, nn.Module]:
    """theirs' random init copied into ours, key for key (strict: names and shapes must match)."""
    torch.manual_seed(0)
    for p in theirs.parameters():  # non-trivial norms and biases too
        nn.init.normal_(p, std=0.2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
           {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def modules(which: str):
    if which == "attention":
        return A.Attention(DIM, HEADS), vit.Attention(DIM, HEADS, qkv_bias=True)
    if which == "mlp":
        return A.Mlp(DIM, 4 * DIM), vit.Mlp(DIM, 4 * DIM)
    return (A.Block(DIM, HEADS, 4.0),  # MAR: Block(dim, heads, mlp_ratio=4, qkv_bias=True, eps 1e-6)
            vit.Block(DIM, HEADS, mlp_ratio=4.0, qkv_bias=True,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6)))


@pytest.mark.parametrize("which", ["attention", "mlp", "block"])
@pytest.mark.parametrize("rows", [5, 90])  # a head step's few rows (MKL path) and many (F.linear)
@pytest.mark.parametrize("backend", ["math", "sdpa", "matmul"])
def test_same_keys_and_outputs_as_timm(which, rows, backend):
    ours, theirs = pair(*modules(which))
    for m in ours.modules():
        if isinstance(m, A.Attention):
            m.attn_backend = backend
    x = torch.randn(2, rows, DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=2e-5)


def test_gradients_match_timm_in_training_mode():
    ours, theirs = pair(*modules("block"))
    ours.train(), theirs.train()  # no dropout configured: training mode is deterministic
    x = torch.randn(2, 9, DIM, generator=torch.Generator().manual_seed(2))
    for m in (ours, theirs):
        m(x).square().sum().backward()
    for (k, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=k)
