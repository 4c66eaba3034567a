"""The shared conv building blocks: both styles' key layouts and behaviours, attention
placement, shapes, and the image validation every tokenizer uses."""
from __future__ import annotations

import pytest
import torch

from discon_core.errors import DisconError
from discon_plugins.autoencoder import (LDM, MASKGIT, AttnBlock, Decoder, Encoder, ResnetBlock,
                                        check_images, check_widths)


def _keys(module: torch.nn.Module) -> list[str]:
    return list(module.state_dict())


def test_resnet_block_ldm_shortcut_uses_the_input():
    torch.manual_seed(0)
    block = ResnetBlock(8, 16, dropout=0.0, num_groups=2, style=LDM).eval()
    assert block.nin_shortcut.weight.shape == (16, 8, 1, 1)
    assert block.conv1.bias is not None
    x = torch.randn(2, 8, 5, 5)
    h = block.conv2(torch.nn.functional.silu(block.norm2(
        block.conv1(torch.nn.functional.silu(block.norm1(x))))))
    torch.testing.assert_close(block(x), block.nin_shortcut(x) + h)


def test_resnet_block_maskgit_quirk_drops_the_input_skip():
    torch.manual_seed(0)
    block = ResnetBlock(8, 16, dropout=0.0, num_groups=2, style=MASKGIT).eval()
    assert block.nin_shortcut.weight.shape == (16, 16, 1, 1)  # out -> out: the tell
    assert block.conv1.bias is None and block.nin_shortcut.bias is None
    x = torch.randn(2, 8, 5, 5)
    h = block.conv2(torch.nn.functional.silu(block.norm2(
        block.conv1(torch.nn.functional.silu(block.norm1(x))))))
    torch.testing.assert_close(block(x), h + block.nin_shortcut(h))


def test_resnet_block_same_width_is_identity_skip():
    block = ResnetBlock(8, 8, dropout=0.0, num_groups=4, style=MASKGIT)
    torch.nn.init.zeros_(block.conv2.weight)  # residual branch off -> output == input
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(block(x), x)
    assert not hasattr(block, "nin_shortcut")


def test_attn_block_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = AttnBlock(8, num_groups=2)
    x = torch.randn(2, 8, 3, 4)
    y = attn.norm(x)
    q, k, v = (t.flatten(2) for t in (attn.q(y), attn.k(y), attn.v(y)))  # [B,C,N]
    w = torch.softmax(q.transpose(1, 2) @ k * 8 ** -0.5, dim=-1)         # [B,N,N]
    out = (v @ w.transpose(1, 2)).view(2, 8, 3, 4)
    torch.testing.assert_close(attn(x), x + attn.proj_out(out), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", [LDM, MASKGIT], ids=["ldm", "maskgit"])
def test_encoder_decoder_shapes(style):
    kw = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=4, style=style)
    enc = Encoder(in_channels=3, out_channels=6, **kw)
    dec = Decoder(z_channels=3, out_ch=3, **kw)
    z = enc(torch.rand(2, 3, 16, 24))
    assert z.shape == (2, 6, 4, 6)
    assert dec(z[:, :3]).shape == (2, 3, 16, 24)


def test_style_key_layouts():
    kw = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, resolution=8,
              attn_resolutions=(4,))
    ldm = _keys(Encoder(in_channels=3, out_channels=4, style=LDM, **kw))
    assert "encoder" not in ldm[0]
    assert "down.0.downsample.conv.weight" in ldm and "mid.attn_1.q.weight" in ldm
    assert "down.1.attn.0.q.weight" in ldm and "down.0.attn.0.q.weight" not in ldm
    vq_kw = {**kw, "attn_resolutions": ()}  # MaskGIT's VQGAN has no attention
    vq = _keys(Encoder(in_channels=3, out_channels=4, style=MASKGIT, **vq_kw))
    assert not any("downsample" in k or "attn" in k for k in vq)  # avg-pool: no parameters
    assert "mid.0.conv1.weight" in vq and "conv_in.bias" not in vq
    dec_ldm = _keys(Decoder(z_channels=4, out_ch=3, style=LDM, **kw))
    dec_vq = _keys(Decoder(z_channels=4, out_ch=3, style=MASKGIT, **vq_kw))
    assert "up.1.upsample.conv.weight" in dec_ldm and "up.1.block.1.conv1.weight" in dec_ldm
    assert "up.1.upsample_conv.weight" in dec_vq and "up.1.block.1.conv1.weight" not in dec_vq


def test_attention_level_follows_nominal_resolution_not_input_size():
    enc = Encoder(ch=8, ch_mult=(1, 1, 2), num_res_blocks=1, in_channels=3, out_channels=4,
                  attn_resolutions=(16,), resolution=64, num_groups=4)
    keys = _keys(enc)
    assert any(k.startswith("down.2.attn.0") for k in keys)  # 64 / 4 = 16: the last level
    assert not any(k.startswith(("down.0.attn", "down.1.attn")) for k in keys)
    assert enc(torch.rand(1, 3, 8, 8)).shape == (1, 4, 2, 2)  # any input size runs


def test_check_widths_names_num_groups():
    with pytest.raises(DisconError, match=r"num_groups=32 does not divide the width 8\*1=8"):
        check_widths(8, [1, 2], 32, ch_name="ch", mult_name="ch_mult")


@pytest.mark.parametrize("images, match", [
    (torch.rand(1, 1, 8, 8), "3 channels"),
    (torch.rand(1, 3, 8, 6), "multiples of the downsampling factor 4, got 8x6"),
    (torch.rand(1, 3, 8, 8) * 2 - 1, r"values in \[0, 1\]"),
    (torch.rand(3, 8, 8), "4-D"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "float tensor"),
])
def test_check_images_errors(images, match):
    with pytest.raises(DisconError, match=match):
        check_images(images, channels=3, downsample=4, what="test encode")


def test_check_images_accepts_valid():
    check_images(torch.rand(2, 3, 8, 8), channels=3, downsample=4, what="test")
