"""Transformer building blocks shared by every plugin: attention with a selectable backend,
the timm-style MLP, and the pre-norm ViT block that MAR uses.

Attention backends (``attn_backend``):

* ``"xformers"``: ``xformers.ops.memory_efficient_attention``; needs xformers and CUDA fp16/bf16;
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / mem-efficient / math,
  picked by torch);
* ``"math"``: explicit ``softmax(q k^T * scale) v`` in fp32, for checking the others;
* ``"matmul"``: the same products in the input dtype (scores rounded to it; the softmax
  accumulates in fp32). For bf16 on CPU this is ~1.8x faster than SDPA's flash kernel, which
  runs small blocks with conversions (MAR-B decoder layer, [1, 12, 320, 64] from the fused qkv,
  1 thread: 2.4 ms against 4.4 ms);
* ``"auto"`` (default): xformers when it imports and the tensors are CUDA fp16/bf16, matmul for
  bf16 on CPUs where bf16 is native, else sdpa.

:class:`Linear` is ``nn.Linear`` with faster CPU inference paths in fp32 and bf16 (see its
docstring); the blocks here and the heads use it.

The backend actually used is logged once per process and backend, never silently switched.
"""
from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from discon_core.errors import DisconError

log = logging.getLogger("discon.attention")
BACKENDS = ("auto", "sdpa", "xformers", "math", "matmul")
# Scores the matmul backend holds at once (elements, 128 MB in bf16): at large batches it
# works through the batch in chunks instead of materializing [B, H, Lq, Lk] whole.
MATMUL_SCORES_BUDGET = 1 << 26
_announced: set[str] = set()

try:  # optional extra: pip install 'discon[xformers]'
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightMask
except Exception:  # noqa: BLE001 - any import failure means "not available"
    xops = None
_xformers_works: bool | None = None  # probed once on CUDA: a wheel can import without kernels


def _xformers_usable(q: torch.Tensor) -> bool:
    """xformers imports AND runs on this GPU (a wheel built for another torch has no kernels)."""
    global _xformers_works
    if xops is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if _xformers_works is None:
        try:
            t = torch.zeros(1, 8, 1, 64, device=q.device, dtype=q.dtype)
            xops.memory_efficient_attention(t, t, t)
            _xformers_works = True
        except Exception as e:  # noqa: BLE001 - report once, loudly, then use sdpa
            _xformers_works = False
            log.warning("xformers is installed but cannot run here (%s: %s); attention uses "
                        "sdpa instead", type(e).__name__, str(e).splitlines()[0])
    return _xformers_works


def _announce(backend: str) -> None:
    if backend not in _announced:
        _announced.add(backend)
        log.info("attention backend: %s", backend)


def pick_backend(requested: str, q: torch.Tensor) -> str:
    """Resolve ``requested`` for tensors like ``q``; an explicit unusable choice is an error."""
    if requested not in BACKENDS:
        raise DisconError(f"unknown attn_backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    xformers_ok = _xformers_usable(q)
    if requested == "auto":
        if xformers_ok:
            return "xformers"
        # matmul only where bf16 products are native: emulated, it is ~16x slower than sdpa
        # (MAR-B decoder layer, AVX2, 1 thread: 88 ms against 5.5 ms)
        return ("matmul" if q.device.type == "cpu" and q.dtype == torch.bfloat16
                and _probe("onednn") else "sdpa")
    if requested == "xformers" and not xformers_ok:
        why = ("xformers is not installed" if xops is None else
               "tensors are not CUDA fp16/bf16" if not (q.is_cuda and q.dtype in (
                   torch.float16, torch.bfloat16)) else "xformers has no working kernels here")
        raise DisconError(f"attn_backend='xformers' requested but {why}; use 'sdpa' or 'auto'")
    return requested


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto",
              causal: bool = False, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head attention on ``[B, H, L, Dh]`` tensors -> ``[B, H, Lq, Dh]``.

    ``attn_mask`` is additive (float, broadcastable to ``[B, H, Lq, Lk]``); ``causal`` aligns the
    last query with the last key (so it also works with a KV cache).
    """
    backend = pick_backend(backend, q)
    _announce(backend)
    if backend == "xformers":
        bias = None
        if causal:
            bias = LowerTriangularFromBottomRightMask()
        elif attn_mask is not None:
            bias = attn_mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p)
        return out.transpose(1, 2)
    if backend == "sdpa":
        if causal and q.shape[2] != k.shape[2]:  # SDPA's is_causal is top-left aligned
            attn_mask, causal = _bottom_right_causal(q.shape[2], k.shape[2], q.device, q.dtype), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=causal)
    if backend == "matmul":
        return _matmul_attention(q, k, v, causal, attn_mask, dropout_p)
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        scores = scores + _bottom_right_causal(q.shape[2], k.shape[2], q.device, torch.float32)
    if attn_mask is not None:
        scores = scores + attn_mask.float()
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return (probs @ v.float()).to(q.dtype)


def _matmul_attention(q, k, v, causal: bool, attn_mask, dropout_p: float) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` in q's dtype, a batch chunk at a time."""
    if causal:
        causal_mask = _bottom_right_causal(q.shape[2], k.shape[2], q.device, q.dtype)
        attn_mask = causal_mask if attn_mask is None else attn_mask + causal_mask
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype)
    per_row = q.shape[1] * q.shape[2] * k.shape[2]
    chunk = max(1, MATMUL_SCORES_BUDGET // max(1, per_row))
    outs = []
    for i in range(0, max(1, q.shape[0]), chunk):  # one (empty) pass for an empty batch
        rows = slice(i, i + chunk)
        scores = (q[rows] * q.shape[-1] ** -0.5) @ k[rows].transpose(-2, -1)
        if attn_mask is not None:
            batched = attn_mask.dim() == 4 and attn_mask.shape[0] != 1
            scores = scores + (attn_mask[rows] if batched else attn_mask)
        probs = scores.softmax(dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p)
        outs.append(probs @ v[rows])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _bottom_right_causal(lq: int, lk: int, device, dtype) -> torch.Tensor:
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)
    return torch.zeros(lq, lk, device=device, dtype=dtype).masked_fill(~allowed, float("-inf"))


class KVCache:
    """Preallocated keys/values ``[B, H, capacity, Dh]`` of one attention layer, for decoding.

    ``append`` writes the new keys/values in place, so a decoding step costs the same at the
    first token and at the last (a ``torch.cat`` cache copies the whole prefix every step).
    """

    def __init__(self, batch: int, num_heads: int, capacity: int, head_dim: int, *,
                 device=None, dtype=None):
        self.k = torch.empty(batch, num_heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B, H, L_new, Dh]``; return views of all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise DisconError(f"KV cache overflow: {end} positions for a capacity of "
                              f"{self.k.shape[2]}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


# Rows up to which an fp32 product uses MKL's prepacked weight: for the few rows of a head step
# (~16 tokens) F.linear's per-call packing of the weight costs about half the product (1024x1024,
# 16 rows, 1 thread: 0.59 ms -> 0.30 ms with AVX-512, 0.66 -> 0.46 ms with AVX2); from a few
# hundred rows on the two are equal (docs/speed.md).
MKL_MAX_ROWS = 64
MKL_PACK_ROWS = 16  # the row count MKL packs for; any count then runs on it
_packing: dict[str, bool] = {}  # probed once per path: "onednn" (bf16), "mkl" (fp32)
# Linear -> {path: (source weight, its version, prepared weight)}; weak, so modules (and their
# copies, which never see these opaque tensors) are collected as usual.
_prepared: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_FUSED = {None: ("none", ""), "gelu": ("gelu", "none"), "silu": ("swish", "")}  # oneDNN post-ops


def _probe(path: str) -> bool:
    """Whether a prepacked path runs on this CPU, decided once per process. bf16 is packed for
    oneDNN only where its bf16 products are native (elsewhere oneDNN emulates them, ~100x
    slower than fp32, and refuses to pack on AVX2-only CPUs)."""
    if path not in _packing:
        from discon_core.precision import native_bf16
        try:
            if path == "onednn":
                ok = native_bf16("cpu")
                if ok:
                    w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2, dtype=torch.bfloat16))
                    ok = bool(torch.ops.mkldnn._linear_pointwise(
                        torch.ones(1, 2, dtype=torch.bfloat16), w, None, "none", [], "").eq(2).all())
            else:
                w = torch.ones(2, 2)
                ok = torch.backends.mkl.is_available() and bool(torch.ops.mkl._mkl_linear(
                    torch.ones(1, 2), torch.ops.mkl._mkl_reorder_linear_weight(w, 1), w, None,
                    1).eq(2).all())
        except Exception as e:  # noqa: BLE001 - a build or CPU without it: plain F.linear
            ok = False
            log.info("CPU linears: no prepacked %s weights (%s)", path, str(e).splitlines()[0])
        _packing[path] = ok
    return _packing[path]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, keys and init) with faster CPU inference paths, and an
    optional fused activation: ``layer(x, activation="gelu" | "silu")``.

    ``F.linear`` repacks the weight into the BLAS kernel's blocked layout on every call; for the
    few rows of a sampling step (a head step sees ~16 tokens) that costs about as much as the
    product. Here the prepared weight is made once and reused until the weight changes (in
    place, ``.to()``, ``load_state_dict``); it holds one more copy of the weight. The path is
    chosen per call from the input, never by catching errors (the probes run once):

    * bf16 where bf16 is native: oneDNN's packed weight, the activation fused into the product;
    * bf16 where it is not (AVX2-only CPUs): the product in fp32 on an fp32 copy of the weight,
      rounded back to bf16 (emulated bf16 products run at ~1 GFLOP/s there, fp32 at ~130);
    * fp32 with at most ``MKL_MAX_ROWS`` rows: MKL's packed weight;
    * anything else (more rows, other dtypes or devices, anything autograd records): ``F.linear``.
    """

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        path = self._path(x)
        if path == "onednn":
            attr, algorithm = _FUSED[activation]
            return torch.ops.mkldnn._linear_pointwise(x, self._prepared(path), self.bias, attr,
                                                      [], algorithm)
        if path == "upcast":
            w = self._prepared(path)
            b = None if self.bias is None else self.bias.float()
            y = self._fp32(x.float(), w, b, x.numel() // x.shape[-1]).to(x.dtype)
        elif path == "mkl":
            # the last argument must be the row count, else MKL ignores the packed weight
            y = torch.ops.mkl._mkl_linear(x, self._prepared(path), self.weight, self.bias,
                                          x.numel() // x.shape[-1])
        else:
            y = F.linear(x, self.weight, self.bias)
        if activation == "gelu":
            return F.gelu(y)
        return F.silu(y) if activation == "silu" else y

    def _fp32(self, x, w, b, rows):
        if rows <= MKL_MAX_ROWS and _probe("mkl"):
            return torch.ops.mkl._mkl_linear(x, self._prepared("upcast-mkl"), w, b, rows)
        return F.linear(x, w, b)

    def _path(self, x: torch.Tensor) -> str | None:
        w = self.weight
        if (x.device.type != "cpu" or x.dtype != w.dtype
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
                or w.is_inference()):  # made under inference_mode: no version counter to watch
            return None
        if w.dtype == torch.bfloat16:
            return "onednn" if _probe("onednn") else "upcast"
        if w.dtype == torch.float32 and x.numel() <= MKL_MAX_ROWS * x.shape[-1] and _probe("mkl"):
            return "mkl"
        return None

    def _prepared(self, path: str) -> torch.Tensor:
        w = self.weight
        entries = _prepared.setdefault(self, {})
        entry = entries.get(path)
        # The entry keeps its source storage alive, so an equal address means the same storage;
        # the version counter then catches in-place writes.
        if entry is None or entry[0].data_ptr() != w.data_ptr() or entry[1] != w._version:
            source = w.detach()
            if path == "onednn":
                prepared = torch.ops.mkldnn._reorder_linear_weight(source)
            elif path == "upcast":
                prepared = source.float()
            else:  # mkl: fp32 weight, or the fp32 copy of a bf16 one
                base = self._prepared("upcast") if path == "upcast-mkl" else source
                prepared = torch.ops.mkl._mkl_reorder_linear_weight(base, MKL_PACK_ROWS)
            entry = (source, w._version, prepared)
            entries[path] = entry
        return entry[2]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation (DiT): ``x * (1 + scale) + shift`` (RAR blocks and the MLP heads)."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """timm/RAR self-attention: fused ``qkv``, optional per-head q/k LayerNorm, ``proj``.

    Key names (``qkv``, ``q_norm``, ``k_norm``, ``proj``) match timm's ``Attention`` and RAR's,
    so official checkpoints load as they are.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, qk_norm: bool = False,
                 norm_eps: float = 1e-6, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 attn_backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise DisconError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = attn_backend
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, *, causal: bool = False,
                attn_mask: torch.Tensor | None = None,
                kv_cache: KVCache | tuple[torch.Tensor, torch.Tensor] | None = None,
                return_kv: bool = False):
        """x [B, L, dim] -> [B, L, dim].

        With ``kv_cache=(k, v)`` the new keys/values are appended to the cached ones; with
        ``return_kv`` the (full) keys/values are returned too, for the caller's cache. A
        :class:`KVCache` is filled in place instead.
        """
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if isinstance(kv_cache, KVCache):
            k, v = kv_cache.append(k, v)
        elif kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
        out = attention(q, k, v, backend=self.attn_backend, causal=causal, attn_mask=attn_mask,
                        dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
        return (out, (k, v)) if return_kv else out


class Mlp(nn.Module):
    """fc1 -> exact GELU -> dropout -> fc2 -> dropout (timm ``Mlp``; keys fc1, fc2). The GELU is
    fused into fc1 (:class:`Linear`)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.fc1(x, activation="gelu"))))


class Block(nn.Module):
    """Pre-norm ViT block (timm ``vision_transformer.Block``, as MAR uses it):
    ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``. Keys: norm1, attn.*, norm2, mlp.*."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 norm_eps: float = 1e-6, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 attn_backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop,
                              proj_drop=proj_drop, attn_backend=attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
