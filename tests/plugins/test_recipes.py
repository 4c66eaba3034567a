"""The discon recipe's objective, masked_ar_loss: MAR's masking, dropout and tiled head loss."""
from __future__ import annotations

import math

import pytest
import torch

from discon_core import DisconError, build
from discon_core.pipeline import mask_from_orders, random_orders
from discon_plugins.recipes import masked_ar_loss, masked_token_loss, sample_mask_ratio
from tests.conftest import load_fixture


def test_forward_loss_parity(shared):
    config, io, folder = load_fixture(shared, "mar_tiny")
    i, o = io["inputs"], io["outputs"]
    head = build("head", "diffusion", checkpoint=folder / "ckpt.pth", dtype="fp32", **config["kwargs"])
    loss = masked_token_loss(head, i["loss_z"], o["tokens"], i["mask_partial"].bool(),
                             diffusion_batch_mul=4, generator=torch.Generator().manual_seed(15))
    torch.testing.assert_close(loss, o["forward_loss"], atol=1e-4, rtol=1e-4)


def test_mask_ratio_is_truncated_normal():
    from scipy.stats import truncnorm
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_mask_ratio(0.7, g) for _ in range(4000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    ref = truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    assert abs(draws.mean().item() - ref.mean()) < 0.005
    assert abs(draws.std().item() - ref.std()) < 0.005


def test_orders_and_mask():
    orders = random_orders(3, 10, torch.Generator().manual_seed(0))
    assert torch.equal(orders.sort(dim=1).values, torch.arange(10).expand(3, 10))
    mask = mask_from_orders(orders, 4)
    assert mask.sum(dim=1).tolist() == [4, 4, 4]
    assert mask.gather(1, orders[:, :4]).all()


def tiny_pair(cond_drop_prob=0.0):
    torch.manual_seed(0)
    kw = dict(img_size=16, vae_stride=4, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
              decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2, vae_embed_dim=3,
              class_num=4, buffer_size=2, diffloss_d=1, diffloss_w=16)
    head = build("head", "diffusion", **kw)
    for p in head.parameters():  # MAR's init zeroes the head output: no gradient would reach z
        torch.nn.init.normal_(p, std=0.2)
    return build("backbone", "mar", cond_vocab_size=9, cond_drop_prob=cond_drop_prob, **kw), head


def test_masked_ar_loss_trains_both_and_is_reproducible():
    bb, head = tiny_pair(cond_drop_prob=0.5)
    g = torch.Generator().manual_seed(0)
    x, labels, cond = torch.randn(2, 16, 3, generator=g), torch.tensor([0, 3]), torch.randint(0, 9, (2, 16), generator=g)
    bb.eval()  # MAR's attention/proj dropout draws from the global RNG: compare in eval mode
    loss, logs = masked_ar_loss(bb, head, x, labels, cond, generator=torch.Generator().manual_seed(5))
    again, _ = masked_ar_loss(bb, head, x, labels, cond, generator=torch.Generator().manual_seed(5))
    other, _ = masked_ar_loss(bb, head, x, labels, cond, generator=torch.Generator().manual_seed(6))
    assert torch.isfinite(loss) and torch.equal(loss, again) and not torch.equal(loss, other)
    assert 0.7 <= logs["mask_ratio"] <= 1.0 and logs["num_masked"] == math.ceil(16 * logs["mask_ratio"])
    loss.backward()
    assert bb.z_proj.weight.grad is not None and bb.cond_emb_enc.weight.grad.abs().sum() > 0
    assert head.net.input_proj.weight.grad is not None


def test_only_masked_tokens_count():
    """With mask_ratio_min=1 every token is masked: visible-token values cannot matter, and the
    loss equals masked_token_loss on an all-True mask."""
    bb, head = tiny_pair()
    bb.eval()
    x, labels = torch.randn(2, 16, 3), torch.tensor([1, 2])
    loss, logs = masked_ar_loss(bb, head, x, labels, None, mask_ratio_min=1.0, diffusion_batch_mul=2,
                                generator=torch.Generator().manual_seed(1))
    assert logs["num_masked"] == 16
    ref = masked_token_loss(head, torch.zeros(2, 16, 24), x, torch.ones(2, 16, dtype=torch.bool),
                            diffusion_batch_mul=2, generator=torch.Generator().manual_seed(0))
    assert ref.shape == () and torch.isfinite(ref)
    shifted = x.clone()
    partial = torch.zeros(2, 16, dtype=torch.bool)
    partial[:, :4] = True
    shifted[:, 4:] += 100.0  # unmasked targets must not enter the loss
    a = masked_token_loss(head, torch.zeros(2, 16, 24), x, partial, generator=torch.Generator().manual_seed(0))
    b = masked_token_loss(head, torch.zeros(2, 16, 24), shifted, partial, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_bad_inputs():
    bb, head = tiny_pair()
    x, labels = torch.randn(2, 16, 3), torch.tensor([0, 1])
    with pytest.raises(DisconError, match="x must be"):
        masked_ar_loss(bb, head, x[:, :8], labels)
    with pytest.raises(DisconError, match="labels must be"):
        masked_ar_loss(bb, head, x, labels[:1])
    with pytest.raises(DisconError, match="cond must be"):
        masked_ar_loss(bb, head, x, labels, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(DisconError, match="cond ids must lie"):
        masked_ar_loss(bb, head, x, labels, torch.full((2, 16), 9))
    with pytest.raises(DisconError, match="mask_ratio_min"):
        masked_ar_loss(bb, head, x, labels, mask_ratio_min=1.5)
