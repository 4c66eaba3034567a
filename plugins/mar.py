"""The conditional MAR backbone (factory ``mar``, kind ``backbone``).

With ``cond_vocab_size=0`` this is MAR's encoder + decoder exactly (``LTH14/mar``
``models/mar.py``; same state-dict keys, so an official ``checkpoint-last.pth`` loads, its
``diffloss.*`` head keys being left to the head). With ``cond_vocab_size > 0`` it also sees the
discrete tokens of the same image grid (DisCon)::

    bb = discon_core.build("backbone", "discon-l")                 # random init
    z = bb(x, mask, labels, cond)      # x [B,N,D], mask bool [B,N], labels [B], cond int64 [B,N]

Discrete conditioning modes (``cond_mode``):

* ``"add"`` (default): an embedding of the discrete token at each position is added to the
  encoder input (before the position embedding) and to the decoder's full-length input,
  mask-token positions included. The discrete and continuous grids are aligned, so this gives
  every position its own discrete token at zero extra sequence length: the cost is MAR's.
* ``"tokens"``: the discrete tokens are N extra always-visible encoder tokens (own position
  embedding), whose encoder outputs also enter the decoder as a prefix; longer sequences
  (encoder and decoder see N more tokens), conditioning only through attention.

Condition dropout (for an optional CFG on the continuous stage) uses a learned null id
(row ``cond_vocab_size`` of the embeddings); the class label uses MAR's ``fake_latent``. Which
rows drop is decided by the caller (``masked_ar_loss`` draws it from its generator, the sampler
sets it for the unconditional CFG half) through ``label_drop`` / ``cond_drop``.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import SimpleNamespace

import torch
from einops import rearrange
from torch import nn

from discon_core.errors import DisconError
from discon_core.hooks import hookimpl
from discon_plugins.attention import BACKENDS, Block, Linear

COND_MODES = ("add", "tokens")


class MAR(nn.Module):
    """MAR encoder/decoder with optional discrete conditioning.

    Attributes: ``token_dim`` (D = vae_embed_dim * patch_size**2), ``z_dim`` (decoder_embed_dim),
    ``seq_len`` (N = (img_size // vae_stride // patch_size) ** 2), ``cond_vocab_size``.
    """

    # An official MAR file also holds the diffusion head; the head module loads those keys.
    checkpoint_drop = ("diffloss.",)  # the default for backbones (registry.HEAD_PREFIX)

    def __init__(self, *, img_size: int, vae_stride: int, patch_size: int, encoder_embed_dim: int,
                 encoder_depth: int, encoder_num_heads: int, decoder_embed_dim: int,
                 decoder_depth: int, decoder_num_heads: int, mlp_ratio: float, norm_eps: float,
                 vae_embed_dim: int, mask_ratio_min: float, label_drop_prob: float,
                 class_num: int, attn_dropout: float, proj_dropout: float, buffer_size: int,
                 grad_checkpointing: bool, cond_vocab_size: int, cond_mode: str,
                 cond_drop_prob: float, attn_backend: str):
        super().__init__()
        if img_size % (vae_stride * patch_size):
            raise DisconError(f"img_size {img_size} must be divisible by vae_stride * patch_size "
                              f"= {vae_stride * patch_size}")
        if cond_mode not in COND_MODES:
            raise DisconError(f"cond_mode must be one of {', '.join(COND_MODES)}, got {cond_mode!r}")
        if attn_backend not in BACKENDS:
            raise DisconError(f"attn_backend must be one of {', '.join(BACKENDS)}, got {attn_backend!r}")
        if cond_vocab_size < 0:
            raise DisconError(f"cond_vocab_size must be >= 0 (0 = plain MAR), got {cond_vocab_size}")
        self.img_size, self.vae_stride, self.patch_size = img_size, vae_stride, patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.vae_embed_dim = vae_embed_dim
        self.token_dim = vae_embed_dim * patch_size ** 2
        self.z_dim = decoder_embed_dim
        self.buffer_size = buffer_size
        self.class_num = class_num
        self.mask_ratio_min = mask_ratio_min
        self.label_drop_prob = label_drop_prob
        self.cond_vocab_size, self.cond_mode = cond_vocab_size, cond_mode
        self.cond_drop_prob = cond_drop_prob
        self.grad_checkpointing = grad_checkpointing
        e, d, n = encoder_embed_dim, decoder_embed_dim, self.seq_len
        block = dict(mlp_ratio=mlp_ratio, norm_eps=norm_eps, attn_drop=attn_dropout,
                     proj_drop=proj_dropout, attn_backend=attn_backend)

        # Encoder (parameter creation order follows the official module for readable dumps).
        self.class_emb = nn.Embedding(class_num, e)
        self.fake_latent = nn.Parameter(torch.zeros(1, e))
        self.z_proj = Linear(self.token_dim, e)
        self.z_proj_ln = nn.LayerNorm(e, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n + buffer_size, e))
        self.encoder_blocks = nn.ModuleList(
            [Block(e, encoder_num_heads, **block) for _ in range(encoder_depth)])
        self.encoder_norm = nn.LayerNorm(e, eps=norm_eps)
        # Decoder.
        self.decoder_embed = Linear(e, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n + buffer_size, d))
        self.decoder_blocks = nn.ModuleList(
            [Block(d, decoder_num_heads, **block) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(d, eps=norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, n, d))
        # Discrete conditioning (absent for plain MAR, so official key sets match exactly).
        if cond_vocab_size:
            self.cond_emb_enc = nn.Embedding(cond_vocab_size + 1, e)  # + the null id
            if cond_mode == "add":
                self.cond_emb_dec = nn.Embedding(cond_vocab_size + 1, d)
            else:
                self.cond_pos_embed_enc = nn.Parameter(torch.zeros(1, n, e))
                self.cond_pos_embed_dec = nn.Parameter(torch.zeros(1, n, d))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's init: N(0, .02) embeddings/tokens/positions, xavier Linear, unit LayerNorm."""
        std_init = [self.class_emb.weight, self.fake_latent, self.mask_token,
                    self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                    self.diffusion_pos_embed_learned]
        for name in ("cond_emb_enc", "cond_emb_dec"):
            if hasattr(self, name):
                std_init.append(getattr(self, name).weight)
        for name in ("cond_pos_embed_enc", "cond_pos_embed_dec"):
            if hasattr(self, name):
                std_init.append(getattr(self, name))
        for p in std_init:
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- token layout ---------------------------------------------------------------------------
    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, C*p*p] (raster order; channel index slowest within a token)."""
        p = self.patch_size
        return rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C*p*p] -> [B, C, h*p, w*p]."""
        p = self.patch_size
        return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=self.seq_h, p=p, q=p)

    # -- public forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                cond: torch.Tensor | None = None, *, label_drop: torch.Tensor | None = None,
                cond_drop: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,N,D] float, mask bool [B,N] (True = masked; the same count per row), labels int64
        [B], cond int64 [B,N] or None -> z [B,N,Dz].

        ``label_drop`` / ``cond_drop`` (bool [B], optional): rows that use the null class
        (``fake_latent``) / the null discrete condition (label dropout, CFG's unconditional half).
        """
        self.check_inputs(x, mask, labels, cond)
        class_embedding = self.class_emb(labels)
        if label_drop is not None:
            class_embedding = torch.where(label_drop[:, None].to(class_embedding.device),
                                          self.fake_latent.to(class_embedding.dtype), class_embedding)
        cond_ids = None
        if cond is not None and self.cond_vocab_size:
            cond_ids = cond
            if cond_drop is not None:
                cond_ids = torch.where(cond_drop[:, None].to(cond.device),
                                       torch.full_like(cond, self.cond_vocab_size), cond)
        enc = self.forward_encoder(x, mask, class_embedding, cond_ids)
        return self.forward_decoder(enc, mask, cond_ids)

    def check_inputs(self, x, mask, labels, cond) -> None:
        """Shape, dtype and range checks with messages naming the argument."""
        n, dd = self.seq_len, self.token_dim
        if x.dim() != 3 or x.shape[1:] != (n, dd):
            raise DisconError(f"x must be [B, {n}, {dd}] (seq_len, token_dim), got {list(x.shape)}")
        b = x.shape[0]
        if mask.shape != (b, n) or mask.dtype != torch.bool:
            raise DisconError(f"mask must be bool [{b}, {n}], got {mask.dtype} {list(mask.shape)}")
        if labels.shape != (b,) or labels.is_floating_point():
            raise DisconError(f"labels must be int64 [{b}], got {labels.dtype} {list(labels.shape)}")
        if b and (labels.min() < 0 or labels.max() >= self.class_num):
            raise DisconError(f"labels must lie in [0, {self.class_num}) (class_num), got "
                              f"[{labels.min().item()}, {labels.max().item()}]")
        if cond is None:
            return
        if not self.cond_vocab_size:
            raise DisconError("this backbone has no discrete conditioning (cond_vocab_size=0, plain "
                              "MAR): pass cond=None, or use a discon-* preset")
        if cond.shape != (b, n) or cond.is_floating_point():
            raise DisconError(f"cond must be int64 [{b}, {n}] (discrete tokens, raster order), got "
                              f"{cond.dtype} {list(cond.shape)}")
        if b and (cond.min() < 0 or cond.max() >= self.cond_vocab_size):
            raise DisconError(f"cond ids must lie in [0, {self.cond_vocab_size}) (cond_vocab_size), "
                              f"got [{cond.min().item()}, {cond.max().item()}]")

    # -- encoder / decoder (official names) -----------------------------------------------------
    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def _keep(self, mask: torch.Tensor, cond_tokens: bool) -> torch.Tensor:
        """Encoder-visible positions of the full [buffer | (cond tokens) | seq] layout, bool."""
        b = mask.shape[0]
        visible = torch.ones(b, self.buffer_size, dtype=torch.bool, device=mask.device)
        parts = [visible]
        if cond_tokens:
            parts.append(torch.ones(b, self.seq_len, dtype=torch.bool, device=mask.device))
        parts.append(~mask)
        return torch.cat(parts, dim=1)

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor,
                        cond_ids: torch.Tensor | None = None) -> torch.Tensor:
        """MAR's ``forward_mae_encoder`` (+ conditioning) -> [B, buffer (+N) + #visible, E]."""
        counts = (~mask).sum(dim=1)
        if counts.numel() and (counts != counts[0]).any():
            raise DisconError("mask must mask the same number of tokens in every row "
                              f"(visible counts: {counts.tolist()})")
        h = self.z_proj(x)
        b, _, e = h.shape
        if cond_ids is not None and self.cond_mode == "add":
            h = h + self.cond_emb_enc(cond_ids)
        buffer = class_embedding.unsqueeze(1).expand(b, self.buffer_size, e).to(h.dtype)
        h = torch.cat([buffer, h], dim=1) + self.encoder_pos_embed_learned
        if cond_ids is not None and self.cond_mode == "tokens":
            c = self.cond_emb_enc(cond_ids) + self.cond_pos_embed_enc
            h = torch.cat([h[:, :self.buffer_size], c, h[:, self.buffer_size:]], dim=1)
        h = self.z_proj_ln(h)
        tokens_mode = cond_ids is not None and self.cond_mode == "tokens"
        h = h[self._keep(mask, tokens_mode)].reshape(b, -1, e)
        return self.encoder_norm(self._blocks(self.encoder_blocks, h))

    def forward_decoder(self, enc: torch.Tensor, mask: torch.Tensor,
                        cond_ids: torch.Tensor | None = None) -> torch.Tensor:
        """MAR's ``forward_mae_decoder`` (+ conditioning) -> z [B, N, Dz]."""
        h = self.decoder_embed(enc)
        b, _, d = h.shape
        keep = self._keep(mask, cond_ids is not None and self.cond_mode == "tokens")
        full = self.mask_token.to(h.dtype).expand(b, keep.shape[1], d).clone()
        full[keep] = h.reshape(-1, d)
        extra = 0  # decoder positions before the continuous sequence, besides the buffer
        if cond_ids is not None and self.cond_mode == "tokens":
            extra = self.seq_len
            pos = torch.cat([self.decoder_pos_embed_learned[:, :self.buffer_size],
                             self.cond_pos_embed_dec,
                             self.decoder_pos_embed_learned[:, self.buffer_size:]], dim=1)
            full = full + pos
        else:
            full = full + self.decoder_pos_embed_learned
            if cond_ids is not None:  # "add": every position, masked or visible
                full = torch.cat([full[:, :self.buffer_size],
                                  full[:, self.buffer_size:] + self.cond_emb_dec(cond_ids)], dim=1)
        h = self.decoder_norm(self._blocks(self.decoder_blocks, full))
        return h[:, self.buffer_size + extra:] + self.diffusion_pos_embed_learned


def _norm_eps(norm_layer: Callable | None) -> float:
    """LayerNorm eps of an official ``norm_layer`` (None: the eps 1e-6 all MAR factories use)."""
    if norm_layer is None:
        return 1e-6
    probe = norm_layer(1, device="meta")
    if not isinstance(probe, nn.LayerNorm):
        raise DisconError(f"norm_layer must build an nn.LayerNorm, got {type(probe).__name__}")
    return probe.eps


def official_args(img_size: int = 256, vae_stride: int = 16, patch_size: int = 1,
                  encoder_embed_dim: int = 1024, encoder_depth: int = 16,
                  encoder_num_heads: int = 16, decoder_embed_dim: int = 1024,
                  decoder_depth: int = 16, decoder_num_heads: int = 16, mlp_ratio: float = 4.0,
                  norm_layer: Callable | None = None, vae_embed_dim: int = 16,
                  mask_ratio_min: float = 0.7, label_drop_prob: float = 0.1,
                  class_num: int = 1000, attn_dropout: float = 0.1, proj_dropout: float = 0.1,
                  buffer_size: int = 64, diffloss_d: int = 3, diffloss_w: int = 1024,
                  num_sampling_steps: str = "100", diffusion_batch_mul: int = 4,
                  grad_checkpointing: bool = False, cond_vocab_size: int = 0,
                  cond_mode: str = "add", cond_drop_prob: float = 0.0,
                  attn_backend: str = "auto") -> dict:
    """Every official ``MAR.__init__`` argument with its default (written once: the backbone and
    head factories take all of them, so one config builds both), plus ours: ``cond_vocab_size``
    (0 = plain MAR), ``cond_mode``, ``cond_drop_prob``, ``attn_backend``."""
    return dict(locals())


def takes_official_args(**changes):
    """Give a factory the keyword signature of :func:`official_args` (defaults changed or extra
    arguments added by ``changes``); it is called with one namespace of all the values, so the
    registry's name and type checks see every official argument."""
    defaults = {**inspect.signature(official_args).parameters, **changes}
    sig = inspect.Signature([inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY,
        default=d.default if isinstance(d, inspect.Parameter) else d) for name, d in defaults.items()])

    def wrap(fn):
        @functools.wraps(fn)
        def factory(**kwargs):
            bound = sig.bind(**kwargs)
            bound.apply_defaults()
            return fn(SimpleNamespace(**bound.arguments))
        factory.__signature__ = sig
        return factory
    return wrap


@takes_official_args()
def mar(a) -> MAR:
    """MAR backbone from the official arguments (head-only ones such as ``diffloss_w`` are
    ignored; ``diffusion_batch_mul`` is kept for the objective)."""
    model = MAR(img_size=a.img_size, vae_stride=a.vae_stride, patch_size=a.patch_size,
                encoder_embed_dim=a.encoder_embed_dim, encoder_depth=a.encoder_depth,
                encoder_num_heads=a.encoder_num_heads, decoder_embed_dim=a.decoder_embed_dim,
                decoder_depth=a.decoder_depth, decoder_num_heads=a.decoder_num_heads,
                mlp_ratio=a.mlp_ratio, norm_eps=_norm_eps(a.norm_layer),
                vae_embed_dim=a.vae_embed_dim, mask_ratio_min=a.mask_ratio_min,
                label_drop_prob=a.label_drop_prob, class_num=a.class_num,
                attn_dropout=a.attn_dropout, proj_dropout=a.proj_dropout,
                buffer_size=a.buffer_size, grad_checkpointing=a.grad_checkpointing,
                cond_vocab_size=a.cond_vocab_size, cond_mode=a.cond_mode,
                cond_drop_prob=a.cond_drop_prob, attn_backend=a.attn_backend)
    model.diffusion_batch_mul = a.diffusion_batch_mul
    return model


@hookimpl
def discon_register_components(register):
    register("backbone", "mar", mar)
