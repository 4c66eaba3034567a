"""RAR: the randomized autoregressive class-conditional prior over discrete image tokens.

RAR (Yu et al., 2024) is a decoder-only transformer over MaskGIT-VQ tokens that is trained on
random token orders (annealed to raster order) and samples in raster order. This module is the
whole component: architecture, official-format checkpoint layout, teacher forcing, training
objective, and the KV-cached sampler with RAR's power-cosine CFG schedule.

Layout (N = ``image_seq_len``, V = ``codebook_size``, C = ``condition_num_classes``):

* vocabulary of the ``embeddings`` table, V + 1 + C + 1 rows: codes ``0..V-1``, an unused mask
  slot ``V``, class ``c`` at ``c + V + 1``, and the null class ``C + V + 1`` (label dropout and
  the unconditional CFG branch);
* model input ``[cls, cond, t_0 .. t_{N-1}]`` (slot ``j``); ``cls`` is a learned vector;
* slot ``j`` gets the positional embedding of its token's raster position and, on top, the
  *target-aware* embedding of the position it must predict next;
* every block is adaLN-modulated by a per-slot vector ``emb(cond) + timesteps_embeddings[j]``.

Public API: :meth:`RAR.logits`, :meth:`RAR.sample`, :meth:`RAR.training_loss`; reference-level:
:meth:`RAR.forward_fn` (shifted condition ids, orders), :meth:`RAR.preprocess_condition`,
:meth:`RAR.cfg_schedule`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from discon_core.errors import DisconError
from discon_core.hooks import hookimpl
from discon_plugins.attention import Attention, KVCache, Mlp, modulate

NORM_EPS = 1e-6
# Rows the official checkpoints store beyond N in the position tables (only N + 2 are read).
POS_TABLE_EXTRA = 1024
TIMESTEP_TABLE_EXTRA = 100
PREFIX = 2  # cls + condition slots before the image tokens
# Memory allowed for precomputed adaLN modulations while sampling (see _CachedDecoder).
MODULATION_BUDGET_BYTES = 256 << 20

StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]


class RARBlock(nn.Module):
    """Pre-norm transformer block with DiT-style adaLN from a per-slot condition.

    Keys: ``norm1``, ``attn.{qkv,q_norm,k_norm,proj}``, ``norm2``, ``mlp.{fc1,fc2}``,
    ``adaLN_modulation.1`` (index 0 is the SiLU). Unlike DiT, the LayerNorms are affine.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, *, dropout: float,
                 attn_drop: float, attn_backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=True, norm_eps=NORM_EPS,
                              attn_drop=attn_drop, proj_drop=dropout, attn_backend=attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, mlp_hidden, drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """c [B, L, D] -> [B, L, 6D]: shift/scale/gate for attention, then for the MLP."""
        return self.adaLN_modulation(c)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, *, causal: bool = True,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """x [B, L, D], modulation [B, L, 6D] -> [B, L, D]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), causal=causal,
                                  kv_cache=kv_cache)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Non-affine LayerNorm modulated by ``Linear(SiLU(c))`` chunked as (scale, shift) --
    the reverse of the blocks' order. Keys: ``adaLN_modulation.1``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=NORM_EPS, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """c [B, L, D] -> [B, L, 2D]."""
        return self.adaLN_modulation(c)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        scale, shift = modulation.chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


class RAR(nn.Module):
    """RAR prior (DiscretePrior). Hyperparameters use the official config names.

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: width, depth,
            heads and MLP width (RAR-B: 768, 24, 16, 3072).
        dropout, attn_drop: dropout on the projections/MLP and on attention (training only).
        class_label_dropout: probability of replacing the class by the null class in training.
        image_seq_len: tokens per image N (a square grid, 256 = 16x16).
        condition_num_classes: number of classes C.
        codebook_size: discrete tokenizer codebook size V.
        randomness_anneal_start, randomness_anneal_end: training steps between which the
            probability of a random order falls linearly from 1 to 0.
        attn_backend: auto / sdpa / xformers / math / matmul (``discon_plugins.attention``).
    """

    def __init__(self, hidden_size: int = 768, num_hidden_layers: int = 24,
                 num_attention_heads: int = 16, intermediate_size: int = 3072,
                 dropout: float = 0.1, attn_drop: float = 0.1, class_label_dropout: float = 0.1,
                 image_seq_len: int = 256, condition_num_classes: int = 1000,
                 codebook_size: int = 1024, randomness_anneal_start: int = 125_000,
                 randomness_anneal_end: int = 187_500, attn_backend: str = "auto"):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers),
                            ("num_attention_heads", num_attention_heads),
                            ("intermediate_size", intermediate_size),
                            ("image_seq_len", image_seq_len),
                            ("condition_num_classes", condition_num_classes),
                            ("codebook_size", codebook_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DisconError(f"RAR {name} must be a positive integer, got {value!r}")
        if hidden_size % num_attention_heads:
            raise DisconError(f"RAR hidden_size {hidden_size} is not divisible by "
                              f"num_attention_heads {num_attention_heads}")
        side = math.isqrt(image_seq_len)
        if side * side != image_seq_len:
            raise DisconError(f"RAR image_seq_len must be a square number (tokens of an h x h "
                              f"grid), got {image_seq_len}")
        for name, value in (("dropout", dropout), ("attn_drop", attn_drop),
                            ("class_label_dropout", class_label_dropout)):
            if not 0.0 <= value <= 1.0:
                raise DisconError(f"RAR {name} must be in [0, 1], got {value!r}")
        if not 0 <= randomness_anneal_start <= randomness_anneal_end:
            raise DisconError(
                f"RAR needs 0 <= randomness_anneal_start <= randomness_anneal_end, got "
                f"{randomness_anneal_start} and {randomness_anneal_end}")

        self.hidden_size = hidden_size
        self.num_heads = num_attention_heads
        self.image_seq_len = image_seq_len
        self.grid_size = side
        self.condition_num_classes = condition_num_classes
        self.target_codebook_size = codebook_size
        self.class_label_dropout = class_label_dropout
        self.randomness_anneal_start = randomness_anneal_start
        self.randomness_anneal_end = randomness_anneal_end
        self.none_condition_id = condition_num_classes + codebook_size + 1
        # The official code goes through a float ratio and back; keep that for identical widths.
        mlp_hidden = int(hidden_size * (intermediate_size / hidden_size))

        # Registration order = the official state_dict order (direct parameters first).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.blocks = nn.ModuleList([
            RARBlock(hidden_size, num_attention_heads, mlp_hidden, dropout=dropout,
                     attn_drop=attn_drop, attn_backend=attn_backend)
            for _ in range(num_hidden_layers)])
        self.embeddings = nn.Embedding(codebook_size + 1 + condition_num_classes + 1, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, image_seq_len + POS_TABLE_EXTRA, hidden_size))
        self.target_aware_pos_embed = nn.Parameter(
            torch.zeros(1, image_seq_len + POS_TABLE_EXTRA, hidden_size))
        self.timesteps_embeddings = nn.Parameter(
            torch.zeros(1, image_seq_len + TIMESTEP_TABLE_EXTRA, hidden_size))
        self.adaln_before_head = FinalLayer(hidden_size)
        self.lm_head = nn.Linear(hidden_size, codebook_size)
        self.reset_parameters()

    # -- DiscretePrior attributes ------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.target_codebook_size

    @property
    def seq_len(self) -> int:
        return self.image_seq_len

    @property
    def num_classes(self) -> int:
        return self.condition_num_classes

    def reset_parameters(self) -> None:
        """The official init: trunc-normal(0.02) linears, embeddings and tables, LayerNorm (1, 0),
        zero adaLN projections (each block starts as the identity) and a zero cls token."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for table in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(table, mean=0.0, std=0.02)
        for layer in [blk.adaLN_modulation[-1] for blk in self.blocks] + \
                [self.adaln_before_head.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.cls_token)

    # -- input checks ------------------------------------------------------------------------
    def _check_labels(self, labels, name: str = "labels") -> torch.Tensor:
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise DisconError(f"{name} must be integer class ids, got dtype {labels.dtype}")
        if labels.dim() != 1 or labels.numel() == 0:
            raise DisconError(f"{name} must be a non-empty 1-D tensor [B] of class ids, got "
                              f"shape {tuple(labels.shape)}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.condition_num_classes:
            raise DisconError(f"{name} must be in [0, {self.condition_num_classes}) "
                              f"(condition_num_classes), got values in [{lo}, {hi}]")
        return labels.long().to(self.embeddings.weight.device)

    def _check_tokens(self, tokens, batch: int) -> torch.Tensor:
        tokens = torch.as_tensor(tokens)
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise DisconError(f"tokens must be integer code ids, got dtype {tokens.dtype}")
        if tokens.dim() == 3:  # a [B, h, w] grid, as sample() returns it
            tokens = tokens.flatten(1)
        if tokens.dim() != 2 or tokens.shape[1] != self.image_seq_len:
            raise DisconError(f"tokens must be [B, {self.image_seq_len}] (or [B, "
                              f"{self.grid_size}, {self.grid_size}]), got shape "
                              f"{tuple(tokens.shape)}")
        if tokens.shape[0] != batch:
            raise DisconError(f"tokens has batch size {tokens.shape[0]} but labels has {batch}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.codebook_size:
            raise DisconError(f"tokens must be in [0, {self.codebook_size}) (codebook_size), got "
                              f"values in [{lo}, {hi}]")
        return tokens.long().to(self.embeddings.weight.device)

    # -- reference-level computation ---------------------------------------------------------
    def preprocess_condition(self, labels: torch.Tensor, cond_drop_prob: float = 0.0,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw labels [B] -> condition ids [B] (class + V + 1, or the null id when dropped).

        Draws B uniforms even when ``cond_drop_prob`` is 0, as the reference does, so seeded
        sampling consumes the random stream identically.
        """
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < cond_drop_prob
        condition = labels + self.target_codebook_size + 1
        return torch.where(drop, torch.full_like(condition, self.none_condition_id), condition)

    def raster_orders(self, batch: int) -> torch.Tensor:
        return torch.arange(self.image_seq_len, device=self.pos_embed.device).expand(batch, -1)

    def _slot_embeddings(self, orders: torch.Tensor) -> torch.Tensor:
        """Positional + target-aware embeddings of all N + 2 slots for ``orders`` [B, N].

        Returns (pos [B, N+2, D], target_aware [B, N+2, D]): slot 2+i holds token o[i] and gets
        pos[2 + o[i]]; slot j in 1..N gets target_aware[2 + o[j-1]] (what it predicts next);
        cls and the last slot get no target-aware term.
        """
        batch = orders.shape[0]
        pos_table, ta_table = self.pos_embed[0], self.target_aware_pos_embed[0]
        pos = torch.cat([pos_table[:PREFIX].expand(batch, -1, -1), pos_table[PREFIX + orders]], 1)
        zero = torch.zeros_like(pos[:, :1])
        target_aware = torch.cat([zero, ta_table[PREFIX + orders], zero], 1)
        return pos, target_aware

    def forward_fn(self, input_ids: torch.Tensor, condition: torch.Tensor, *,
                   orders: torch.Tensor | None = None, is_sampling: bool = False,
                   return_labels: bool = False):
        """The reference's teacher-forced pass.

        Args:
            input_ids: int64 [B, n] codes in raster order (n = N unless ``is_sampling``).
            condition: int64 [B] **shifted** condition ids (see :meth:`preprocess_condition`).
            orders: int64 [B, N] permutations (None: raster). Unless ``is_sampling``, the tokens
                are permuted by it; the position embeddings always are.
            is_sampling: leave the tokens in the given order (a generation prefix).
            return_labels: also return the targets, the tokens in the permuted order.

        Returns logits [B, n+1, V]: position 0 (the condition slot) predicts the first token
        of the order, position k predicts token k, the last predicts nothing.
        """
        batch, n = input_ids.shape
        if orders is None:
            orders = self.raster_orders(batch)
        if not is_sampling:
            if n != self.image_seq_len:
                raise DisconError(f"teacher forcing needs all {self.image_seq_len} tokens, "
                                  f"got {n}")
            input_ids = input_ids.gather(1, orders)
        length = n + PREFIX
        ids = torch.cat([condition.view(batch, 1), input_ids], dim=1)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), self.embeddings(ids)], dim=1)
        pos, target_aware = self._slot_embeddings(orders)
        x = x + pos[:, :length]
        x = x + target_aware[:, :length]
        c = self.embeddings(condition.view(batch, 1)) + self.timesteps_embeddings[:, :length]
        for blk in self.blocks:
            x = blk(x, blk.modulation(c), causal=True)
        x, c = x[:, 1:], c[:, 1:]  # drop the cls slot
        logits = self.lm_head(self.adaln_before_head(x, self.adaln_before_head.modulation(c)))
        return (logits, input_ids) if return_labels else logits

    # -- DiscretePrior -----------------------------------------------------------------------
    def logits(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced raster logits: tokens int64 [B, N] (or [B, h, w]), raw labels [B]
        -> float [B, N, V]; ``logits[:, i]`` is the distribution of ``tokens[:, i]``."""
        labels = self._check_labels(labels)
        tokens = self._check_tokens(tokens, labels.shape[0])
        condition = labels + self.target_codebook_size + 1
        return self.forward_fn(tokens, condition)[:, :-1]

    forward = logits

    def random_ratio(self, step: int) -> float:
        """Probability of a random order at training ``step`` (1, linear to 0, then 0)."""
        start, end = self.randomness_anneal_start, self.randomness_anneal_end
        if step < start:
            return 1.0
        if step >= end:
            return 0.0
        return 1.0 - (step - start) / (end - start)

    def training_loss(self, tokens: torch.Tensor, labels: torch.Tensor, *, step: int,
                      generator: torch.Generator | None = None):
        """RAR's objective: cross-entropy over codes on per-sample orders.

        Each sample's order is a random permutation with probability ``random_ratio(step)``,
        raster otherwise; each label is replaced by the null class with probability
        ``class_label_dropout``. tokens int64 [B, N] (or [B, h, w]), labels [B] ->
        (scalar loss, logs {loss, correct_tokens, random_ratio}).
        """
        labels = self._check_labels(labels)
        tokens = self._check_tokens(tokens, labels.shape[0])
        batch, n = tokens.shape
        ratio = self.random_ratio(step)
        condition = self.preprocess_condition(labels, self.class_label_dropout, generator)
        device = tokens.device
        random_rows = torch.rand(batch, generator=generator, device=device) < ratio
        permutations = torch.rand(batch, n, generator=generator, device=device).argsort(dim=1)
        orders = torch.where(random_rows[:, None], permutations, self.raster_orders(batch))
        logits, targets = self.forward_fn(tokens, condition, orders=orders, return_labels=True)
        logits = logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, self.codebook_size), targets.reshape(-1))
        with torch.no_grad():
            correct = (logits.argmax(-1) == targets).float().mean()
        return loss, {"loss": loss.detach(), "correct_tokens": correct, "random_ratio": ratio}

    def cfg_schedule(self, step: int, guidance_scale: float,
                     guidance_scale_pow: float) -> torch.Tensor:
        """RAR's CFG scale at sampling ``step`` (float32 [1], computed as the reference does):
        ``(gs - 1) * (1 - cos(pi * (step/N) ** pow)) / 2 + 1``; pow = 0 gives gs throughout."""
        scale_pow = torch.ones(1, device=self.pos_embed.device) * guidance_scale_pow
        scale_step = (1 - torch.cos(((step / self.image_seq_len) ** scale_pow) * torch.pi)) / 2
        return (guidance_scale - 1) * scale_step + 1

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, cfg_scale: float, temperature: float,
               guidance_scale_pow: float = 0.0, kv_cache: bool = True,
               generator: torch.Generator | None = None, progress: bool = False,
               on_step: StepHook | None = None) -> torch.Tensor:
        """Sample token grids in raster order.

        Args:
            labels: int64 [B] classes in [0, condition_num_classes).
            cfg_scale: the official ``guidance_scale``; 0 disables CFG (any other value runs the
                conditional and null-class branches).
            temperature: softmax temperature (the official ``randomize_temperature``), > 0.
            guidance_scale_pow: power of the cosine CFG schedule (0: constant ``cfg_scale``).
            kv_cache: decode with per-layer key/value caches (default); False recomputes the
                prefix every step (same ids; for checking).
            generator: source of all randomness (None: torch's global RNG, drawn in the
                reference's order, so ``torch.manual_seed(s)`` reproduces the official ids).
            progress: show a progress bar.
            on_step: called as ``on_step(step, last_logits [rows, V], probs [B, V])`` with the
                raw logits (conditional rows, then null-class rows under CFG) and the
                probabilities that are sampled from.

        Returns int64 [B, h, w].
        """
        labels = self._check_labels(labels)
        for name, value in (("cfg_scale", cfg_scale), ("guidance_scale_pow", guidance_scale_pow)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise DisconError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
                or temperature <= 0:
            raise DisconError(f"temperature must be a finite number > 0, got {temperature!r} "
                              "(use a small value such as 1e-4 for near-greedy sampling)")
        batch = labels.shape[0]
        condition = self.preprocess_condition(labels, 0.0, generator)
        use_cfg = cfg_scale != 0
        if use_cfg:
            condition = torch.cat([condition, torch.full_like(condition, self.none_condition_id)])
        ids = torch.empty(batch, 0, dtype=torch.long, device=labels.device)
        decoder = _CachedDecoder(self, condition) if kv_cache else None
        for step in tqdm(range(self.image_seq_len), desc="RAR", disable=not progress,
                         leave=False):
            if decoder is not None:
                last = decoder.step(ids[:, -1:] if step else None)
            else:
                prefix = torch.cat([ids, ids]) if use_cfg else ids
                last = self.forward_fn(prefix, condition, is_sampling=True)[:, -1]
            logits = last
            if use_cfg:
                cond_logits, uncond_logits = last[:batch], last[batch:]
                scale = self.cfg_schedule(step, cfg_scale, guidance_scale_pow)
                logits = uncond_logits + (cond_logits - uncond_logits) * scale
            probs = F.softmax(logits.float() / temperature, dim=-1)
            if on_step is not None:
                on_step(step, last, probs)
            sampled = torch.multinomial(probs, num_samples=1, generator=generator)
            ids = torch.cat([ids, sampled], dim=1)
        return ids.view(batch, self.grid_size, self.grid_size)


class _CachedDecoder:
    """Incremental raster decoding for :meth:`RAR.sample`.

    Holds one preallocated :class:`KVCache` per block and feeds one slot per step (the first
    step feeds cls + condition). The adaLN modulations depend only on the condition and the
    slot, so they are computed for a chunk of upcoming slots at once: one pass over those
    weights per chunk instead of per step, which matters because decoding a small batch is
    bound by reading weights.
    """

    def __init__(self, model: RAR, condition: torch.Tensor):
        self.model = model
        self.rows = condition.shape[0]
        weight = model.pos_embed
        self.capacity = model.image_seq_len + 1  # slots 0..N are fed; N+1 never is
        self.cond_emb = model.embeddings(condition)[:, None]  # [rows, 1, D]
        self.caches = [KVCache(self.rows, model.num_heads, self.capacity,
                               model.hidden_size // model.num_heads, device=weight.device,
                               dtype=weight.dtype) for _ in model.blocks]
        per_slot = self.rows * (6 * len(model.blocks) + 2) * model.hidden_size * \
            weight.element_size()
        self.chunk = max(2, min(64, MODULATION_BUDGET_BYTES // per_slot))
        self.slot = 0
        self._mods: list[torch.Tensor] = []
        self._mods_start = self._mods_end = 0

    def _modulations(self, start: int, end: int) -> list[torch.Tensor]:
        """Per block (then the final layer) modulations of slots [start, end)."""
        if end > self._mods_end:
            stop = min(max(end, start + self.chunk), self.capacity)
            c = self.cond_emb + self.model.timesteps_embeddings[:, start:stop]
            self._mods = [blk.modulation(c) for blk in self.model.blocks]
            self._mods.append(self.model.adaln_before_head.modulation(c))
            self._mods_start, self._mods_end = start, stop
        lo, hi = start - self._mods_start, end - self._mods_start
        return [m[:, lo:hi] for m in self._mods]

    def _inputs(self, content: torch.Tensor, start: int) -> torch.Tensor:
        """content [rows, L, D] of slots start.. -> plus positional and target-aware terms
        (raster order: slot j gets pos[j] and, for 1 <= j <= N, target_aware[j + 1])."""
        model, end = self.model, start + content.shape[1]
        x = content + model.pos_embed[:, start:end]
        ta_lo, ta_hi = max(start, 1), min(end, model.image_seq_len + 1)
        if ta_lo < ta_hi:
            x[:, ta_lo - start:ta_hi - start] += model.target_aware_pos_embed[:, ta_lo + 1:ta_hi + 1]
        return x

    def step(self, newest: torch.Tensor | None) -> torch.Tensor:
        """Feed the newest sampled tokens [B, 1] (None at the first step) -> logits [rows, V]
        predicting the next token."""
        model = self.model
        if newest is None:
            cls = model.cls_token.expand(self.rows, -1, -1)
            content = torch.cat([cls, self.cond_emb], dim=1)
        else:
            newest = newest.repeat(self.rows // newest.shape[0], 1)  # the CFG rows share tokens
            content = model.embeddings(newest)
        start = self.slot
        x = self._inputs(content, start)
        end = start + x.shape[1]
        *block_mods, final_mod = self._modulations(start, end)
        for blk, cache, mod in zip(model.blocks, self.caches, block_mods):
            x = blk(x, mod, causal=x.shape[1] > 1, kv_cache=cache)
        self.slot = end
        x = model.adaln_before_head(x[:, -1], final_mod[:, -1])
        return model.lm_head(x)


@hookimpl
def discon_register_components(register):
    register("prior", "rar", RAR)
