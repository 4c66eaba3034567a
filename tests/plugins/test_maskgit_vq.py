"""maskgit-vq: the official key set on the meta device, parity with the reference fixture,
strict loading, input validation, and training from scratch."""
from __future__ import annotations


import pytest
import torch

from discon_core import build
from discon_core.errors import DisconError
from tests.conftest import fashion_mnist_32, load_fixture, load_manifest

TOL = dict(atol=1e-4, rtol=1e-4)


def fixture_tokenizer(shared):
    config, io, folder = load_fixture(shared, "maskgit_vqgan_tiny")
    e, q = config["encoder_decoder_config"], config["quantizer"]
    assert e["num_resolutions"] == len(e["channel_mult"])
    tok = build("dtok", "maskgit-vq", checkpoint=folder / "ckpt.bin", dtype="fp32",
                channel_mult=e["channel_mult"], hidden_channels=e["hidden_channels"],
                num_res_blocks=e["num_res_blocks"], z_channels=e["z_channels"],
                num_channels=e["num_channels"], dropout=e["dropout"],
                codebook_size=q["num_embeddings"], commitment_cost=q["commitment_cost"])
    assert q["embedding_dim"] == e["z_channels"]
    return tok, io, folder


def test_full_size_matches_official_manifest_on_meta(shared):
    manifest = load_manifest(shared, "maskgit_vqgan")
    tok = build("dtok", "maskgit-vq", device="meta")
    got = {k: list(v.shape) for k, v in tok.state_dict().items()}
    assert list(got) == list(manifest["state_dict"])  # same names, same order
    assert got == manifest["state_dict"]
    assert sum(p.numel() for p in tok.parameters()) == manifest["total_params"] == 54_515_587
    assert len(got) == manifest["num_tensors"]
    assert tok.codebook_size == 1024 and tok.downsample == 16


@torch.no_grad()
def test_parity_encode(shared):
    tok, io, _ = fixture_tokenizer(shared)
    assert not tok.training
    images, enc = io["inputs"]["images"], io["encode"]
    z = tok.encoder(images)
    torch.testing.assert_close(z, enc["encoder_out"], **TOL)
    torch.testing.assert_close(tok.quantize.compute_distances(z.permute(0, 2, 3, 1)),
                               enc["distances"], **TOL)
    quantized, idx = tok.quantize(z)
    torch.testing.assert_close(quantized, enc["quantized"], **TOL)
    assert torch.equal(idx.flatten(1), enc["indices_from_quantize"])
    tokens = tok.encode(images)
    assert tokens.dtype == torch.int64 and tokens.shape == (3, 4, 4)
    assert torch.equal(tokens.flatten(1), enc["indices"])


@torch.no_grad()
def test_parity_decode(shared):
    tok, io, _ = fixture_tokenizer(shared)
    codes, dec = io["inputs"]["codes"], io["decode"]
    grid = codes.view(2, 4, 4)
    torch.testing.assert_close(tok.quantize.lookup(grid), dec["codebook_entry"], **TOL)
    torch.testing.assert_close(tok.decode_raw(grid), dec["decoder_raw"], **TOL)
    torch.testing.assert_close(tok.decode(grid), dec["decode_tokens"], **TOL)
    torch.testing.assert_close(tok.decode(codes), dec["decode_tokens_3d_codes"], **TOL)  # [B,N]
    recon = tok.decode(tok.encode(io["inputs"]["images"]))
    torch.testing.assert_close(recon, io["reconstruct"]["decode_tokens_of_encode"], **TOL)


def test_strict_loading_reports_missing_keys(shared, tmp_path):
    config, _, folder = load_fixture(shared, "maskgit_vqgan_tiny")
    state = torch.load(folder / "ckpt.bin", weights_only=True)
    state.pop("decoder.conv_out.bias")
    torch.save({"model": state}, tmp_path / "partial.pth")
    e = config["encoder_decoder_config"]
    with pytest.raises(DisconError, match=r"missing keys \(1\): decoder.conv_out.bias"):
        build("dtok", "maskgit-vq", checkpoint=tmp_path / "partial.pth", dtype="fp32",
              channel_mult=e["channel_mult"], hidden_channels=32, num_res_blocks=1,
              z_channels=8, codebook_size=32)


def test_bad_input_errors():
    tok = build("dtok", "maskgit-vq-tiny")
    with pytest.raises(DisconError, match=r"values in \[0, 1\]"):
        tok.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    with pytest.raises(DisconError, match="3 channels"):
        tok.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(DisconError, match="multiples of the downsampling factor 4, got 30x32"):
        tok.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(DisconError, match=r"token ids must be in \[0, 128\).*got range \[0, 128\]"):
        tok.decode(torch.tensor([[[0, 128], [1, 2]]]))
    with pytest.raises(DisconError, match=r"got range \[-1, 2\]"):
        tok.decode(torch.tensor([[[-1, 0], [1, 2]]]))
    with pytest.raises(DisconError, match="integer ids"):
        tok.decode(torch.zeros(1, 2, 2))
    with pytest.raises(DisconError, match="square N"):
        tok.decode(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(DisconError, match="num_groups=12 does not divide the width 32"):
        build("dtok", "maskgit-vq-tiny", num_groups=12)
    with pytest.raises(DisconError, match="unknown override 'resolutions'"):
        build("dtok", "maskgit-vq-tiny", resolutions=32)


def test_tiny_preset_round_trip_shapes():
    tok = build("dtok", "maskgit-vq-tiny").eval()
    assert 2e5 < sum(p.numel() for p in tok.parameters()) < 1e6
    with torch.no_grad():
        tokens = tok.encode(torch.rand(2, 3, 32, 32))
        assert tokens.shape == (2, 8, 8) and tokens.dtype == torch.int64
        assert int(tokens.max()) < 128
        images = tok.decode(tokens)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_dead_code_restart_reseeds_unused_codes_from_encoder_outputs():
    torch.manual_seed(0)
    tok = build("dtok", "maskgit-vq-tiny", dead_code_restart_every=1)
    images = torch.rand(4, 3, 32, 32)
    _, logs = tok.training_loss(images, generator=torch.Generator().manual_seed(0))
    # The official init puts every code near 0, so a random batch uses only some of them;
    # with a restart every call, all the others are re-seeded.
    assert logs["codes_used"] < 64
    assert logs["codes_used"] + logs["codes_restarted"] == 128
    with torch.no_grad():
        z = tok.encoder(images).permute(0, 2, 3, 1).reshape(-1, 16)
        # every code now sits on one of the batch's encoder outputs (up to the used ones)
        codes = tok.quantize.embedding.weight
        nearest = (codes[:, None] - z[None]).abs().amax(-1).min(1).values
    assert (nearest < 1e-5).sum() >= logs["codes_restarted"]
    _, logs2 = tok.training_loss(images)
    assert logs2["codes_used"] > logs["codes_used"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_loss_falls_on_fashion_mnist():
    images = fashion_mnist_32(240)
    torch.manual_seed(0)
    tok = build("dtok", "maskgit-vq-tiny", hidden_channels=16, num_groups=4).train()
    opt = torch.optim.AdamW(tok.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    losses, logs = [], {}
    for step in range(30):
        batch = images[(step * 24) % 240:][:24]
        loss, logs = tok.training_loss(batch, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(logs) >= {"loss", "rec", "codebook", "commitment", "psnr", "codes_used"}
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert logs["codes_used"] > 16  # the restart keeps the codebook in use


def test_official_encoder_decoder_config_builds_verbatim():
    """MaskGIT's own config (with num_resolutions and resolution) builds the full-size model;
    inconsistent values are refused naming the key."""
    official = {"channel_mult": [1, 1, 2, 2, 4], "num_resolutions": 5, "dropout": 0.0,
                "hidden_channels": 128, "num_channels": 3, "num_res_blocks": 2,
                "resolution": 256, "z_channels": 256}
    vq = build("dtok", "maskgit-vq", device="meta", **official)
    assert vq.downsample == 16 and vq.codebook_size == 1024
    with pytest.raises(DisconError, match="num_resolutions 4"):
        build("dtok", "maskgit-vq", device="meta", **{**official, "num_resolutions": 4})
    with pytest.raises(DisconError, match="resolution 100"):
        build("dtok", "maskgit-vq", device="meta", **{**official, "resolution": 100})
