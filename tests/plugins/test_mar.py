"""MAR backbone: parity with the official tiny MAR, official key sets on meta, conditioning."""
from __future__ import annotations

import pytest
import torch

from discon_core import DisconError, build
from discon_core.checkpoints import save_atomic
from tests.conftest import load_fixture, load_manifest

ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def mar_tiny(shared):
    config, io, folder = load_fixture(shared, "mar_tiny")
    backbone = build("backbone", "mar", checkpoint=folder / "ckpt.pth", dtype="fp32", **config["kwargs"])
    return backbone, config, io["inputs"], io["outputs"], folder


def close(got, exp, atol=ATOL, rtol=RTOL):
    assert got.shape == exp.shape
    torch.testing.assert_close(got.float(), exp.float(), atol=atol, rtol=rtol)


def test_patchify_roundtrip(mar_tiny):
    bb, _, i, o, _ = mar_tiny
    close(bb.patchify(i["latent_img"]), o["tokens"])
    close(bb.unpatchify(o["tokens"]), o["unpatchify_tokens"])


@pytest.mark.parametrize("which", ["partial", "all"])
def test_encoder_decoder_parity(mar_tiny, which):
    bb, _, i, o, _ = mar_tiny
    assert not bb.training  # weights were loaded -> eval()
    tokens, mask = o["tokens"], i[f"mask_{which}"].bool()
    cls = bb.class_emb(i["labels"])
    close(cls, o["class_embedding"])
    enc = bb.forward_encoder(tokens, mask, cls)
    close(enc, o[f"enc_{which}"])
    close(bb.forward_decoder(enc, mask), o[f"z_{which}"])
    close(bb(tokens, mask, i["labels"]), o[f"z_{which}"])


def test_null_class_parity(mar_tiny):
    bb, _, i, o, _ = mar_tiny
    z = bb(o["tokens"], i["mask_partial"].bool(), i["labels"], label_drop=torch.ones(2, dtype=torch.bool))
    close(z, o["z_partial_uncond"])


def test_ema_weights_are_used_and_model_weights_load(mar_tiny, tmp_path):
    bb, config, i, o, folder = mar_tiny
    z = bb(o["tokens"], i["mask_partial"].bool(), i["labels"])
    assert not torch.allclose(z, o["z_partial_with_model_weights"], atol=1e-3)
    state = torch.load(folder / "ckpt.pth", weights_only=True)["model"]
    path = save_atomic({"model": state}, tmp_path / "model_only.pth")
    plain = build("backbone", "mar", checkpoint=path, dtype="fp32", **config["kwargs"])
    close(plain(o["tokens"], i["mask_partial"].bool(), i["labels"]), o["z_partial_with_model_weights"])


def test_sdpa_and_math_attention_agree(mar_tiny):
    bb, config, i, o, folder = mar_tiny
    math_bb = build("backbone", "mar", checkpoint=folder / "ckpt.pth", dtype="fp32", attn_backend="math",
                    **config["kwargs"])
    z_math = math_bb(o["tokens"], i["mask_partial"].bool(), i["labels"])
    sdpa_bb = build("backbone", "mar", checkpoint=folder / "ckpt.pth", dtype="fp32", attn_backend="sdpa",
                    **config["kwargs"])
    close(sdpa_bb(o["tokens"], i["mask_partial"].bool(), i["labels"]), z_math, atol=1e-5, rtol=1e-5)
    close(z_math, o["z_partial"])


@pytest.mark.parametrize("name,manifest", [("mar-b", "mar_base"), ("mar-l", "mar_large"),
                                           ("mar-h", "mar_huge")])
def test_full_size_presets_match_official_manifest(shared, name, manifest):
    m = load_manifest(shared, manifest)
    bb = build("backbone", name, device="meta")
    head = build("head", name, device="meta")
    keys = {k: list(v.shape) for k, v in bb.state_dict().items()}
    keys.update({f"diffloss.{k}": list(v.shape) for k, v in head.state_dict().items()})
    assert keys == m["state_dict"]
    n_head = sum(p.numel() for p in head.parameters())
    assert sum(p.numel() for p in bb.parameters()) + n_head == m["num_params"]
    assert n_head == m["num_params_diffloss"]


def test_discon_sizes_match_paper():
    """Table 2's "+ Condition" rows: 184M / 427M / 558M trainable parameters (paper); the
    arithmetic is in docs/components.md."""
    for name, paper in (("discon-s", 184e6), ("discon-b", 427e6), ("discon-l", 558e6)):
        total = sum(p.numel() for kind in ("backbone", "head")
                    for p in build(kind, name, device="meta").parameters())
        assert abs(total - paper) / paper < 0.0075, (name, total)  # discon-s: +0.68%


def tiny(**kw):
    base = dict(img_size=32, vae_stride=8, encoder_embed_dim=32, encoder_depth=1,
                encoder_num_heads=2, decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2,
                vae_embed_dim=4, class_num=5, buffer_size=2, attn_dropout=0.0, proj_dropout=0.0)
    torch.manual_seed(0)
    return build("backbone", "mar", **{**base, **kw}).eval()


def inputs(b=2, n=16, d=4, vocab=7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, n, d, generator=g)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[0, :10], mask[1, 6:] = True, True
    return x, mask, torch.tensor([1, 3]), torch.randint(0, vocab, (b, n), generator=g)


@pytest.mark.parametrize("mode", ["add", "tokens"])
def test_conditioning_reaches_masked_positions(mode):
    bb = tiny(cond_vocab_size=7, cond_mode=mode)
    x, mask, labels, cond = inputs()
    z = bb(x, mask, labels, cond)
    other = cond.clone()
    other[0, 0] = (other[0, 0] + 1) % 7  # change one discrete token at a masked position
    z2 = bb(x, mask, labels, other)
    assert not torch.allclose(z[0][mask[0]], z2[0][mask[0]])
    torch.testing.assert_close(z[1], z2[1])  # rows are independent


@pytest.mark.parametrize("mode", ["add", "tokens"])
def test_without_cond_a_conditioned_backbone_is_exactly_mar(mode):
    cond_bb = tiny(cond_vocab_size=7, cond_mode=mode)
    plain = tiny()
    state = {k: v for k, v in cond_bb.state_dict().items() if not k.startswith("cond_")}
    plain.load_state_dict(state)
    x, mask, labels, cond = inputs()
    torch.testing.assert_close(cond_bb(x, mask, labels), plain(x, mask, labels))
    dropped = cond_bb(x, mask, labels, cond, cond_drop=torch.tensor([True, False]))
    assert not torch.allclose(dropped[0], cond_bb(x, mask, labels, cond)[0])
    torch.testing.assert_close(dropped[1], cond_bb(x, mask, labels, cond)[1])


def test_bad_inputs_are_clear_errors():
    bb = tiny(cond_vocab_size=7)
    x, mask, labels, cond = inputs()
    with pytest.raises(DisconError, match="x must be"):
        bb(x[:, :5], mask, labels, cond)
    with pytest.raises(DisconError, match="mask must be bool"):
        bb(x, mask.float(), labels, cond)
    with pytest.raises(DisconError, match="cond ids must lie in"):
        bb(x, mask, labels, cond + 7)
    with pytest.raises(DisconError, match="cond must be int64"):
        bb(x, mask, labels, cond[:, :3])
    with pytest.raises(DisconError, match="labels must lie"):
        bb(x, mask, torch.tensor([0, 5]), cond)
    uneven = mask.clone()
    uneven[0, 12] = True
    with pytest.raises(DisconError, match="same number"):
        bb(x, uneven, labels, cond)
    with pytest.raises(DisconError, match="no discrete conditioning"):
        tiny()(x, mask, labels, cond)
    with pytest.raises(DisconError, match="cond_mode"):
        tiny(cond_vocab_size=7, cond_mode="concat")
    with pytest.raises(DisconError, match="unknown override"):
        build("backbone", "mar", diffloss_width=3)
