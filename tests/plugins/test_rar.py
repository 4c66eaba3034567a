"""RAR prior: parity with the reference fixture (teacher forcing, loss, seeded sampling with the
reference's RNG order, KV cache vs none), official layouts on the meta device, strict loading,
sampling options, input validation and the training objective."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import discon_core
from discon_core import DisconError
from discon_plugins import rar as rar_module
from tests.conftest import load_fixture, load_manifest

TOL = dict(atol=1e-4, rtol=1e-4)
RUNS = ("cfg_cosine_kv", "cfg_cosine_nokv", "cfg_const_kv", "nocfg_kv", "greedy_like_kv")


def overrides_from_config(config: dict) -> dict:
    gen = config["model"]["generator"]
    names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "dropout", "attn_drop", "class_label_dropout", "image_seq_len",
             "condition_num_classes", "randomness_anneal_start", "randomness_anneal_end")
    return {"codebook_size": config["model"]["vq_model"]["codebook_size"],
            **{name: gen[name] for name in names}}


@pytest.fixture(scope="module")
def tiny(shared):
    config, io, folder = load_fixture(shared, "rar_tiny")
    model = discon_core.build("prior", "rar", checkpoint=folder / "ckpt.bin", dtype="fp32",
                              **overrides_from_config(config))
    return model, io


def small_random_prior(**overrides) -> torch.nn.Module:
    """A random RAR whose blocks are not the identity (the official adaLN-zero init is)."""
    params = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, image_seq_len=16, condition_num_classes=5,
                  codebook_size=24)
    params.update(overrides)
    model = discon_core.build("prior", "rar", **params).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() != 2 else
                                                           p.shape[1] ** -0.5))
    return model


# -- parity with the reference fixture ---------------------------------------------------------

def test_fixture_builds_in_eval_mode_with_fixture_sizes(tiny):
    model, _ = tiny
    assert not model.training
    assert (model.codebook_size, model.seq_len, model.num_classes) == (32, 16, 10)
    assert model.none_condition_id == 43
    assert model.embeddings.weight.shape == (44, 64)


@pytest.mark.parametrize("which", ["raster", "perm"])
def test_teacher_forced_logits_labels_and_loss(tiny, which):
    model, io = tiny
    inputs, expected = io["inputs"], io["forward"][which]
    orders = inputs["orders_perm"] if which == "perm" else None
    with torch.no_grad():
        logits, labels = model.forward_fn(inputs["input_ids"], inputs["condition_tokens"],
                                          orders=orders, return_labels=True)
    torch.testing.assert_close(logits, expected["logits"], **TOL)
    assert torch.equal(labels, expected["labels"])
    # ARLoss: mean cross-entropy of all N targets, the last position dropped.
    shifted = logits[:, :-1]
    loss = F.cross_entropy(shifted.reshape(-1, 32), labels.reshape(-1))
    torch.testing.assert_close(loss, expected["ar_loss"], **TOL)
    correct = (shifted.argmax(-1) == labels).float().mean()
    torch.testing.assert_close(correct, expected["correct_tokens"], **TOL)


def test_sampling_mode_and_prefix_only_logits(tiny):
    model, io = tiny
    inputs, expected = io["inputs"], io["forward"]
    with torch.no_grad():
        full = model.forward_fn(inputs["input_ids"], inputs["condition_tokens"], is_sampling=True)
        prefix = model.forward_fn(inputs["input_ids"][:, :0], inputs["condition_tokens"],
                                  is_sampling=True)
        default = model.forward_fn(inputs["input_ids"], inputs["condition_tokens"])
    torch.testing.assert_close(full, expected["sampling_full_raster"]["logits"], **TOL)
    torch.testing.assert_close(prefix, expected["prefix_only"]["logits"], **TOL)
    torch.testing.assert_close(default, expected["forward_default"]["logits"], **TOL)


def test_logits_contract_takes_raw_labels(tiny):
    model, io = tiny
    inputs = io["inputs"]
    rows = [0, 2]  # row 1 of the fixture uses the null condition
    with torch.no_grad():
        got = model.logits(inputs["input_ids"][rows], inputs["class_labels"][rows])
        grid = model.logits(inputs["input_ids"][rows].view(2, 4, 4), inputs["class_labels"][rows])
    assert got.shape == (2, 16, 32)
    torch.testing.assert_close(got, io["forward"]["raster"]["logits"][rows, :-1], **TOL)
    assert torch.equal(got, grid)


def test_preprocess_condition_shifts_and_draws_like_the_reference(tiny):
    model, io = tiny
    torch.manual_seed(0)
    got = model.preprocess_condition(io["inputs"]["class_labels"], 0.0)
    assert torch.equal(got, io["preprocess_condition_p0"])
    dropped = model.preprocess_condition(io["inputs"]["class_labels"], 1.0)
    assert torch.equal(dropped, torch.full((3,), 43))


def _sample_run(model, io, name, generator=None, kv_cache=None):
    run = io["generate"]["runs"][name]
    kwargs = run["kwargs"]
    last_logits, probs = [], []
    ids = model.sample(io["generate"]["condition"], cfg_scale=kwargs["guidance_scale"],
                       temperature=kwargs["randomize_temperature"],
                       guidance_scale_pow=kwargs["guidance_scale_pow"],
                       kv_cache=kwargs["kv_cache"] if kv_cache is None else kv_cache,
                       generator=generator,
                       on_step=lambda step, last, p: (last_logits.append(last), probs.append(p)))
    return run, ids, torch.stack(last_logits), torch.stack(probs)


@pytest.mark.parametrize("name", RUNS)
def test_seeded_sampling_reproduces_reference_ids_probs_and_rng_use(tiny, name):
    model, io = tiny
    torch.manual_seed(io["generate"]["runs"][name]["seed"])
    run, ids, last_logits, probs = _sample_run(model, io, name)
    rand_after = torch.rand(4)
    assert ids.shape == (4, 4, 4) and ids.dtype == torch.int64
    assert torch.equal(ids.flatten(1), run["ids"])
    torch.testing.assert_close(probs, run["step_probs"], **TOL)
    torch.testing.assert_close(last_logits, run["step_last_logits"], **TOL)
    assert torch.equal(rand_after, run["rand_after"])  # same amount of RNG consumed


@pytest.mark.parametrize("name", ["cfg_cosine_kv", "nocfg_kv"])
def test_generator_gives_the_same_draws_and_leaves_global_rng_alone(tiny, name):
    model, io = tiny
    run = io["generate"]["runs"][name]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    gen = torch.Generator().manual_seed(run["seed"])
    _, ids, _, probs = _sample_run(model, io, name, generator=gen)
    assert torch.equal(ids.flatten(1), run["ids"])
    assert torch.equal(torch.rand(4, generator=gen), run["rand_after"])
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", ["cfg_cosine_kv", "cfg_const_kv", "nocfg_kv"])
def test_kv_cache_and_full_recompute_agree_on_fixture(tiny, name):
    model, io = tiny
    seed = io["generate"]["runs"][name]["seed"]
    results = []
    for kv in (True, False):
        _, ids, last, _ = _sample_run(model, io, name, kv_cache=kv,
                                      generator=torch.Generator().manual_seed(seed))
        results.append((ids, last))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", [rar_module.MODULATION_BUDGET_BYTES, 1])
def test_kv_cache_matches_recompute_on_longer_sequences(monkeypatch, budget):
    # budget 1 -> modulation chunks of 2 slots: exercises every chunk refill.
    monkeypatch.setattr(rar_module, "MODULATION_BUDGET_BYTES", budget)
    model = small_random_prior(image_seq_len=36)
    labels = torch.tensor([0, 4, 2])
    outs = []
    for kv in (True, False):
        steps = []
        ids = model.sample(labels, cfg_scale=3.0, temperature=1.0, guidance_scale_pow=1.5,
                           kv_cache=kv, generator=torch.Generator().manual_seed(0),
                           on_step=lambda s, last, p: steps.append(last))
        outs.append((ids, torch.stack(steps)))
    assert outs[0][0].shape == (3, 6, 6)
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)


# -- official layouts --------------------------------------------------------------------------

@pytest.mark.parametrize("preset,manifest", [("rar-b", "rar_b"), ("rar-l", "rar_l"),
                                             ("rar-xl", "rar_xl"), ("rar-xxl", "rar_xxl")])
def test_full_size_presets_match_official_manifests_on_meta(shared, preset, manifest):
    expected = load_manifest(shared, manifest)
    model = discon_core.build("prior", preset, device="meta")
    state = model.state_dict()
    assert list(state) == list(expected["state_dict"])  # names and order
    assert {k: list(v.shape) for k, v in state.items()} == {
        k: list(v) for k, v in expected["state_dict"].items()}
    assert sum(p.numel() for p in model.parameters()) == expected["total_params"]
    assert len(state) == expected["num_tensors"]


def test_presets_carry_recommended_sampling_settings():
    assert discon_core.resolve("prior", "rar-b").sampling == {
        "cfg_scale": 16.0, "guidance_scale_pow": 2.75, "temperature": 1.0}
    assert discon_core.resolve("prior", "rar-xxl").sampling == {
        "cfg_scale": 8.0, "guidance_scale_pow": 1.2, "temperature": 1.02}


def test_rar_tiny_preset_builds_and_samples():
    model = discon_core.build("prior", "rar-tiny").eval()
    assert (model.codebook_size, model.seq_len, model.num_classes) == (128, 64, 10)
    assert 4 == len(model.blocks) and model.hidden_size == 128
    sampling = model.discon_preset.sampling
    tokens = model.sample(torch.arange(3), cfg_scale=sampling["cfg_scale"],
                          temperature=sampling["temperature"],
                          guidance_scale_pow=sampling["guidance_scale_pow"],
                          generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 8, 8) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 128


# -- strict loading ----------------------------------------------------------------------------

def test_loading_reports_missing_unexpected_and_misshaped_keys(shared, tmp_path):
    config, _, folder = load_fixture(shared, "rar_tiny")
    state = torch.load(folder / "ckpt.bin", weights_only=True)
    broken = dict(state)
    broken.pop("lm_head.bias")
    broken["blocks.0.attn.extra"] = torch.zeros(1)
    path = tmp_path / "broken.bin"
    torch.save(broken, path)
    with pytest.raises(DisconError, match=r"missing keys.*lm_head\.bias"):
        discon_core.build("prior", "rar", checkpoint=path, dtype="fp32", **overrides_from_config(config))
    with pytest.raises(DisconError, match=r"mis-shaped keys.*pos_embed"):
        discon_core.build("prior", "rar", checkpoint=folder / "ckpt.bin", dtype="fp32",
                          **{**overrides_from_config(config), "image_seq_len": 25})


def test_discon_saved_state_dict_round_trips(tiny, tmp_path):
    model, io = tiny
    path = tmp_path / "rar.bin"
    torch.save(model.state_dict(), path)
    config_model = model.discon_preset.params
    again = discon_core.build("prior", "rar", checkpoint=path, dtype="fp32", **config_model)
    inputs = io["inputs"]
    with torch.no_grad():
        assert torch.equal(again.forward_fn(inputs["input_ids"], inputs["condition_tokens"]),
                           model.forward_fn(inputs["input_ids"], inputs["condition_tokens"]))


# -- sampling options and validation ----------------------------------------------------------

def test_cfg_schedule_matches_reference_values():
    model = small_random_prior(image_seq_len=256)
    steps = (0, 64, 128, 192, 255)
    for (gs, power), expected in {(16.0, 2.75): (1, 1.018, 1.803, 7.404, 15.996),
                                  (8.0, 1.2): (1, 1.602, 3.793, 6.628, 8.000)}.items():
        got = [model.cfg_schedule(s, gs, power).item() for s in steps]
        assert got == pytest.approx(expected, abs=1e-3)
    assert model.cfg_schedule(0, 4.0, 0.0).item() == 4.0  # pow 0: constant, as 0**0 = 1


def test_temperature_sharpens_and_cfg_changes_samples():
    model = small_random_prior()
    labels = torch.tensor([1, 1, 1, 1])

    def entropy_of_first_step(**kw):
        seen = []
        model.sample(labels, generator=torch.Generator().manual_seed(0),
                     on_step=lambda s, last, p: seen.append(p) if s == 0 else None, **kw)
        p = seen[0]
        return -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()

    assert entropy_of_first_step(cfg_scale=0.0, temperature=0.5) < \
        entropy_of_first_step(cfg_scale=0.0, temperature=1.0) < \
        entropy_of_first_step(cfg_scale=0.0, temperature=2.0)
    a = model.sample(labels, cfg_scale=0.0, temperature=1.0,
                     generator=torch.Generator().manual_seed(1))
    b = model.sample(labels, cfg_scale=5.0, temperature=1.0,
                     generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


def test_progress_bar_is_shown_on_request(capsys):
    model = small_random_prior()
    model.sample(torch.tensor([0]), cfg_scale=0.0, temperature=1.0, progress=True)
    assert "RAR" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=torch.tensor([0, 5])), r"labels must be in \[0, 5\)"),
    (dict(labels=torch.tensor([-1])), r"labels must be in \[0, 5\)"),
    (dict(labels=torch.tensor([0.0])), "labels must be integer"),
    (dict(labels=torch.tensor([[0]])), r"1-D tensor \[B\]"),
    (dict(cfg_scale=-1.0), "cfg_scale must be a finite number >= 0"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=-0.5), "temperature must be a finite number > 0"),
    (dict(guidance_scale_pow=-1.0), "guidance_scale_pow must be"),
])
def test_bad_sampling_arguments_are_clear_errors(kwargs, match):
    model = small_random_prior()
    args = dict(labels=torch.tensor([0]), cfg_scale=1.0, temperature=1.0)
    args.update(kwargs)
    with pytest.raises(DisconError, match=match):
        model.sample(args.pop("labels"), **args)


@pytest.mark.parametrize("tokens,match", [
    (torch.zeros(2, 15, dtype=torch.long), r"tokens must be \[B, 16\]"),
    (torch.full((2, 16), 24), r"tokens must be in \[0, 24\)"),
    (torch.full((2, 16), -1), r"tokens must be in \[0, 24\)"),
    (torch.zeros(3, 16, dtype=torch.long), "batch size 3 but labels has 2"),
    (torch.zeros(2, 16), "integer code ids"),
])
def test_bad_tokens_are_clear_errors(tokens, match):
    model = small_random_prior()
    with pytest.raises(DisconError, match=match):
        model.logits(tokens, torch.tensor([0, 1]))
    with pytest.raises(DisconError, match=match):
        model.training_loss(tokens, torch.tensor([0, 1]), step=0)


@pytest.mark.parametrize("overrides,match", [
    (dict(hidden_size=30), "not divisible by num_attention_heads"),
    (dict(image_seq_len=15), "square number"),
    (dict(randomness_anneal_start=10, randomness_anneal_end=5), "randomness_anneal_start"),
    (dict(dropout=1.5), r"dropout must be in \[0, 1\]"),
])
def test_bad_hyperparameters_are_clear_errors(overrides, match):
    with pytest.raises(DisconError, match=match):
        small_random_prior(**overrides)


# -- training objective ------------------------------------------------------------------------

def test_randomness_anneals_linearly_between_the_two_steps():
    model = small_random_prior(randomness_anneal_start=100, randomness_anneal_end=300)
    assert [model.random_ratio(s) for s in (0, 99, 100, 200, 250, 300, 10_000)] == \
        [1.0, 1.0, 1.0, 0.5, 0.25, 0.0, 0.0]


def test_training_loss_in_raster_mode_is_the_teacher_forced_cross_entropy():
    model = small_random_prior(class_label_dropout=0.0, randomness_anneal_start=0,
                               randomness_anneal_end=0)
    tokens = torch.randint(0, 24, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 4])
    loss, logs = model.training_loss(tokens, labels, step=5)
    with torch.no_grad():
        expected = F.cross_entropy(model.logits(tokens, labels).reshape(-1, 24), tokens.flatten())
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    assert logs["random_ratio"] == 0.0 and 0.0 <= logs["correct_tokens"] <= 1.0


def test_training_loss_is_reproducible_with_a_generator_and_uses_random_orders():
    model = small_random_prior()
    tokens = torch.randint(0, 24, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    first = model.training_loss(tokens, labels, step=0, generator=torch.Generator().manual_seed(3))
    again = model.training_loss(tokens, labels, step=0, generator=torch.Generator().manual_seed(3))
    raster = model.training_loss(tokens, labels, step=10 ** 9,
                                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(first[0], again[0])
    assert first[1]["random_ratio"] == 1.0 and not torch.allclose(first[0], raster[0])


def test_tiny_prior_learns_a_structured_token_distribution():
    torch.manual_seed(0)
    classes, n, vocab = 4, 16, 16
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % classes
    # Each class is a fixed "image": a class-dependent stripe pattern, with 10% of codes noisy.
    base = (labels[:, None] * 3 + torch.arange(n)[None] // 4) % vocab
    noise = torch.randint(0, vocab, base.shape, generator=gen)
    tokens = torch.where(torch.rand(base.shape, generator=gen) < 0.1, noise, base)
    model = discon_core.build("prior", "rar", hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=128, image_seq_len=n,
                              condition_num_classes=classes, codebook_size=vocab, dropout=0.0,
                              attn_drop=0.0, randomness_anneal_start=40,
                              randomness_anneal_end=80).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.96))
    losses = []
    for step in range(120):
        rows = torch.randint(0, 64, (16,), generator=gen)
        loss, logs = model.training_loss(tokens[rows], labels[rows], step=step, generator=gen)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert math.isfinite(losses[0]) and losses[0] > math.log(vocab) * 0.8
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    # The learned prior samples the class pattern (greedy-like temperature, CFG on).
    model.eval()
    sampled = model.sample(torch.tensor([1, 2]), cfg_scale=2.0, temperature=0.05,
                           generator=torch.Generator().manual_seed(0)).flatten(1)
    agreement = (sampled == base[[1, 2]]).float().mean().item()
    assert agreement > 0.8


def test_preallocated_kv_cache_equals_concatenation_and_refuses_overflow():
    from discon_plugins.attention import Attention, KVCache
    attn = Attention(16, 2, qk_norm=True).eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    cache = KVCache(2, 2, 5, 8)
    with torch.no_grad():
        full = attn(x, causal=True)
        first = attn(x[:, :2], causal=True, kv_cache=cache)
        rest = [attn(x[:, i:i + 1], kv_cache=cache) for i in range(2, 5)]
    torch.testing.assert_close(torch.cat([first] + rest, dim=1), full, atol=1e-6, rtol=1e-6)
    assert cache.length == 5
    with pytest.raises(DisconError, match="KV cache overflow"):
        attn(x[:, :1], kv_cache=cache)
