"""Per-token continuous heads: MAR's diffusion loss (``diffusion``) and a flow-matching head
(``flow``), both on one MLP-with-adaLN trunk (MAR's ``SimpleMLPAdaLN``; same state-dict keys).

A head maps a backbone latent ``z [M, Dz]`` to a continuous token ``[M, D]``::

    head = discon_core.build("head", "mar-b", checkpoint="pretrained")  # diffloss.* of MAR-B
    x = head.sample(z, temperature=1.0, steps=100, generator=g)       # [M, D]
    loss = head.loss(target, z, generator=g)                          # [M], per token

Both factories accept every argument of the official ``MAR.__init__`` (so one MAR config builds
backbone and head) and derive: ``token_dim = vae_embed_dim * patch_size**2``,
``z_dim = decoder_embed_dim``, width/depth = ``diffloss_w``/``diffloss_d``, default sampling
steps = ``num_sampling_steps``. Both read their weights from the ``diffloss.`` keys of a MAR-layout
checkpoint.

Why sampling is fast here: during one ``sample`` call the conditioning ``z`` is fixed and every
step's time is known in advance, so the adaLN modulations (about 60% of the trunk's weights)
of all steps are computed up front in a few large matrix products instead of one
weight-streaming product per step for a handful of rows. The per-step work is then only the
residual MLPs. The arithmetic is the official one; only the batching differs.

In bf16 (``build(..., dtype=torch.bfloat16)``) the network runs in bf16 while the sampler's
state (x, the noise, the update) stays fp32, and the noise is drawn in fp32 so that a seed gives
the same sample in every dtype up to rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from discon_core.errors import DisconError
from discon_core.hooks import hookimpl

from .attention import Linear, modulate
from .gaussian_diffusion import NUM_TRAIN_STEPS, REVERSE_COEFS, GaussianDiffusion, reverse_step
from .mar import takes_official_args

FREQ_DIM = 256
# Upper bound on rows x modulation width held at once by the precomputation (floats): 64M = 256 MB.
MOD_BUDGET = 64 * 1024 * 1024
FLOW_TIME_SCALE = 1000.0  # flow time t in [0,1] enters the same sinusoid as diffusion steps 0..999


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding ([cos, sin], 256 frequencies) -> Linear -> SiLU -> Linear (keys mlp.0/2)."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(FREQ_DIM, width), nn.SiLU(), Linear(width, width))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0):
        """t [M] (may be fractional) -> [M, dim]: cos then sin of t * exp(-ln(max_period) k / half)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period)
                          * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)); (shift, scale, gate) = adaLN(y)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(Linear(width, width), nn.SiLU(), Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """x [M, w], mod [M, 3w] (this block's adaLN output)."""
        shift, scale, gate = mod.chunk(3, dim=-1)
        h = self.mlp[0](modulate(self.in_ln(x), shift, scale), activation="silu")  # = mlp[:2]
        return x + gate * self.mlp[2](h)


class FinalLayer(nn.Module):
    """Non-affine LN, adaLN (shift, scale), Linear to the output channels."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class AdaLNMLP(nn.Module):
    """MAR's ``SimpleMLPAdaLN``: the trunk both heads share.

    ``forward(x [M, in], t [M], c [M, z]) -> [M, out]``; ``y = time_embed(t) + cond_embed(c)``
    conditions every block through adaLN.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, z_channels: int,
                 depth: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = Linear(z_channels, width)
        self.input_proj = Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's init: xavier Linear weights, zero biases, N(0, .02) time MLP, zero adaLN/output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.res_blocks),
                      self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def modulations(self, y: torch.Tensor) -> list[torch.Tensor]:
        """adaLN outputs of every block and of the final layer for conditioning ``y [..., w]``
        (each ``adaLN_modulation`` is SiLU -> Linear: the SiLU is shared, computed once)."""
        h = F.silu(y)
        return [b.adaLN_modulation[1](h) for b in self.res_blocks] + \
            [self.final_layer.adaLN_modulation[1](h)]

    def forward_modulated(self, x: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        """The trunk with precomputed modulations (``modulations(y)`` for the same rows)."""
        h = self.input_proj(x)
        for block, mod in zip(self.res_blocks, mods):
            h = block(h, mod)
        return self.final_layer(h, mods[-1])

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        y = self.time_embed(t) + self.cond_embed(c)
        return self.forward_modulated(x, self.modulations(y))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """MAR's guided call: rows [cond; uncond] share the first half of ``x``; the eps channels
        are guided, the variance channels pass through."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, c)
        return _guide(out, self.in_channels, cfg_scale)


def _guide(out: torch.Tensor, channels: int, cfg_scale: float) -> torch.Tensor:
    """[cond; uncond] rows -> guided first ``channels`` copied to both halves, the rest kept."""
    pred, rest = out[:, :channels], out[:, channels:]
    cond, uncond = pred.chunk(2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)


class StepConditioner:
    """Serves per-step adaLN modulations for a fixed ``c`` and a known list of network times.

    Computes them chunk by chunk (as many steps as fit ``MOD_BUDGET``) in large batched products.
    """

    def __init__(self, net: AdaLNMLP, times: torch.Tensor, c: torch.Tensor):
        self.net, self.times = net, times
        self.c_emb = net.cond_embed(c)  # [M, w], once per call instead of once per step
        width = self.c_emb.shape[-1]
        per_step = self.c_emb.shape[0] * width * (3 * len(net.res_blocks) + 2)
        self.chunk = max(1, MOD_BUDGET // max(1, per_step))
        self.start, self.cache = None, None

    def __call__(self, i: int) -> list[torch.Tensor]:
        if self.start is None or not self.start <= i < self.start + self.chunk:
            self.start = i - i % self.chunk
            t = self.times[self.start:self.start + self.chunk]
            y = self.net.time_embed(t)[:, None, :] + self.c_emb[None]  # [S, M, w]
            self.cache = self.net.modulations(y)
        return [m[i - self.start] for m in self.cache]


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise on ``like``'s device in ``dtype`` (default: ``like``'s), drawn in
    at least fp32 so that one seed gives the same noise in every dtype: torch's bf16/fp16
    sampler takes another path than fp32's for some sizes (>= 16 elements, not a multiple of
    16), which would decorrelate a bf16 run from its fp32 reference."""
    dtype = like.dtype if dtype is None else dtype
    noise = torch.randn(shape, generator=generator, device=like.device,
                        dtype=torch.promote_types(dtype, torch.float32))
    return noise.to(dtype)


def _state_dtype(z: torch.Tensor) -> torch.dtype:
    """The sampler's state dtype: at least fp32. In bf16 the network runs in bf16 but x and its
    updates stay fp32: bf16 keeps 8 significant bits, so at |x| ~ 1 a bf16 Euler step x + dt * v
    would be off by up to a tenth of its increment (dt * v ~ 0.04), compounding over the steps
    (MAR-B, 16 AR steps, flow head: max |bf16 - fp32| of the tokens 0.21 with a bf16 state,
    0.012 with an fp32 one)."""
    return torch.promote_types(z.dtype, torch.float32)


def _check_rows(name: str, z: torch.Tensor, z_dim: int, target: torch.Tensor | None = None,
                token_dim: int | None = None) -> None:
    if z.dim() != 2 or z.shape[1] != z_dim:
        raise DisconError(f"{name}: z must be [M, {z_dim}] (z_dim), got {list(z.shape)}")
    if target is not None and (target.dim() != 2 or target.shape != (z.shape[0], token_dim)):
        raise DisconError(f"{name}: target must be [M, {token_dim}] with M = {z.shape[0]} rows "
                          f"of z, got {list(target.shape)}")


def _check_sampling(temperature: float, cfg_scale: float, z: torch.Tensor) -> None:
    if temperature < 0:
        raise DisconError(f"temperature must be >= 0, got {temperature}")
    if cfg_scale != 1.0 and z.shape[0] % 2:
        raise DisconError("with cfg_scale != 1, z must hold [cond; uncond] rows (an even count), "
                          f"got {z.shape[0]} rows")


class DiffusionHead(nn.Module):
    """MAR's DiffLoss: cosine schedule, 1000 training steps, eps prediction with learned-range
    variance, MSE + VB loss, respaced ancestral sampling; temperature scales the per-step noise.
    """

    checkpoint_prefix = "diffloss."

    def __init__(self, token_dim: int, z_dim: int, width: int, depth: int,
                 num_sampling_steps: str | int = "100"):
        super().__init__()
        self.token_dim, self.z_dim = token_dim, z_dim
        self.num_sampling_steps = str(num_sampling_steps)
        self.net = AdaLNMLP(token_dim, width, 2 * token_dim, z_dim, depth)
        self.train_diffusion = GaussianDiffusion(None)
        self._gen: dict[str, GaussianDiffusion] = {}
        self.gen_diffusion = self.schedule(self.num_sampling_steps)  # validates the spacing early

    def schedule(self, steps: str | int | None) -> GaussianDiffusion:
        key = self.num_sampling_steps if steps is None else str(steps)
        if key not in self._gen:
            self._gen[key] = GaussianDiffusion(key)
        return self._gen[key]

    def loss(self, target: torch.Tensor, z: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """target [M, D], z [M, Dz] -> per-row loss [M] (t ~ U{0..999}, then noise ~ N(0, I))."""
        _check_rows("diffusion head loss", z, self.z_dim, target, self.token_dim)
        t = torch.randint(0, NUM_TRAIN_STEPS, (target.shape[0],), generator=generator,
                          device=target.device)
        noise = _randn(target.shape, target, generator)
        return self.train_diffusion.training_losses(self.net, target, t, z, noise)["loss"]

    @torch.no_grad()
    def sample(self, z: torch.Tensor, *, temperature: float = 1.0, steps: int | str | None = None,
               generator: torch.Generator | None = None, cfg_scale: float = 1.0,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """z [M, Dz] -> tokens [M, D] by ancestral sampling over ``steps`` respaced steps.

        With ``cfg_scale != 1`` the rows of ``z`` are [cond; uncond] (M even); both halves start
        from the same noise and all M rows are returned (keep the first half), as MAR does.
        RNG use matches the reference: one noise draw for x_T, then one per step (also the last).
        ``noise`` ([M, D]) replaces the x_T draw (it is not scaled by the temperature).
        """
        _check_rows("diffusion head sample", z, self.z_dim)
        _check_sampling(temperature, cfg_scale, z)
        diff = self.schedule(steps)
        m, state = z.shape[0], _state_dtype(z)
        if noise is not None:
            if noise.shape != (m, self.token_dim):
                raise DisconError(f"noise must be [{m}, {self.token_dim}], got {list(noise.shape)}")
            x = noise.to(device=z.device, dtype=state)
        elif cfg_scale != 1.0:
            half = _randn((m // 2, self.token_dim), z, generator, state)
            x = torch.cat([half, half])
        else:
            x = _randn((m, self.token_dim), z, generator, state)
        if m == 0:
            return x.to(z.dtype)
        k_total = diff.num_timesteps
        # Network times in loop order (respaced index K-1 .. 0 mapped to original steps).
        times = diff.timestep_map.flip(0).to(device=z.device, dtype=torch.float32)
        mods = StepConditioner(self.net, times, z)
        f32 = dict(dtype=torch.float32, device=z.device)
        coef = {name: getattr(diff, name).to(**f32) for name in REVERSE_COEFS}
        d = self.token_dim
        for i, k in enumerate(range(k_total - 1, -1, -1)):
            x_in = torch.cat([x[: m // 2]] * 2) if cfg_scale != 1.0 else x
            out = self.net.forward_modulated(x_in.to(z.dtype), mods(i)).to(state)
            if cfg_scale != 1.0:
                out = _guide(out, d, cfg_scale)
            mean, log_var, _ = reverse_step(out, x, {n: v[k] for n, v in coef.items()})
            noise = _randn(x.shape, x, generator)
            x = mean + torch.exp(0.5 * log_var) * noise * temperature if k != 0 else mean
        return x.to(z.dtype)


class FlowHead(nn.Module):
    """Flow-matching head on the same trunk: linear interpolant ``x_t = t x + (1 - t) n``
    (t = 0 noise, t = 1 data), velocity target ``x - n``, Euler or Heun integration over
    ``steps`` uniform steps; temperature scales the initial noise.
    """

    checkpoint_prefix = "diffloss."
    SOLVERS = ("euler", "heun")

    def __init__(self, token_dim: int, z_dim: int, width: int, depth: int, steps: int = 25,
                 solver: str = "euler"):
        super().__init__()
        if solver not in self.SOLVERS:
            raise DisconError(f"flow_solver must be one of {', '.join(self.SOLVERS)}, got {solver!r}")
        if int(steps) < 1:
            raise DisconError(f"flow_steps must be >= 1, got {steps}")
        self.token_dim, self.z_dim = token_dim, z_dim
        self.steps, self.solver = int(steps), solver
        self.net = AdaLNMLP(token_dim, width, token_dim, z_dim, depth)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """v(x_t, t | z): x [M, D], t [M] in [0, 1], z [M, Dz] -> [M, D]."""
        return self.net(x, t * FLOW_TIME_SCALE, z)

    def loss(self, target: torch.Tensor, z: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """target [M, D], z [M, Dz] -> per-row velocity MSE [M] (t ~ U[0, 1), noise ~ N(0, I))."""
        _check_rows("flow head loss", z, self.z_dim, target, self.token_dim)
        t = torch.rand(target.shape[0], generator=generator, device=target.device,
                       dtype=target.dtype)
        noise = _randn(target.shape, target, generator)
        x_t = t[:, None] * target + (1 - t[:, None]) * noise
        return ((self.velocity(x_t, t, z) - (target - noise)) ** 2).mean(dim=-1)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, *, temperature: float = 1.0, steps: int | None = None,
               generator: torch.Generator | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
        """z [M, Dz] -> tokens [M, D]; ``steps`` integration steps (Heun: 2 evaluations each).

        With ``cfg_scale != 1`` the rows are [cond; uncond] and the velocity is guided; all rows
        are returned (keep the first half). One noise draw in total.
        """
        _check_rows("flow head sample", z, self.z_dim)
        _check_sampling(temperature, cfg_scale, z)
        n = self.steps if steps is None else int(steps)
        if n < 1:
            raise DisconError(f"steps must be >= 1, got {steps}")
        m, state = z.shape[0], _state_dtype(z)
        shape = (m // 2 if cfg_scale != 1.0 else m, self.token_dim)
        x = _randn(shape, z, generator, state) * temperature
        if cfg_scale != 1.0:
            x = torch.cat([x, x])
        if m == 0:
            return x.to(z.dtype)
        grid = torch.linspace(0, 1, n + 1, device=z.device, dtype=torch.float32)
        # Network times in evaluation order: Euler uses t_i; Heun t_i then t_{i+1}.
        times = grid[:-1] if self.solver == "euler" else torch.stack([grid[:-1], grid[1:]], 1).flatten()
        mods = StepConditioner(self.net, times * FLOW_TIME_SCALE, z)

        def v(x_: torch.Tensor, j: int) -> torch.Tensor:
            out = self.net.forward_modulated(x_.to(z.dtype), mods(j)).to(state)
            return _guide(out, self.token_dim, cfg_scale) if cfg_scale != 1.0 else out

        for i in range(n):
            dt = grid[i + 1] - grid[i]
            if self.solver == "euler":
                x = x + dt * v(x, i)
            else:
                v0 = v(x, 2 * i)
                v1 = v(x + dt * v0, 2 * i + 1)
                x = x + dt * 0.5 * (v0 + v1)
        return x.to(z.dtype)


# -- factories: every official MAR.__init__ argument by name (mar.official_args) ----------------

@takes_official_args()
def diffusion(a) -> DiffusionHead:
    """MAR's diffusion head (``DiffLoss``); backbone-only arguments (the official ones and the
    backbone's ``cond_*``/``attn_backend``) are accepted and ignored, so one config builds both."""
    return DiffusionHead(token_dim=a.vae_embed_dim * a.patch_size ** 2, z_dim=a.decoder_embed_dim,
                         width=a.diffloss_w, depth=a.diffloss_d,
                         num_sampling_steps=a.num_sampling_steps)


@takes_official_args(num_sampling_steps="25", flow_solver="euler")
def flow(a) -> FlowHead:
    """Flow-matching head; ``num_sampling_steps`` is the number of integration steps."""
    try:
        steps = int(a.num_sampling_steps)
    except ValueError:
        raise DisconError(f"flow head: num_sampling_steps must be an integer, got "
                          f"{a.num_sampling_steps!r}") from None
    return FlowHead(token_dim=a.vae_embed_dim * a.patch_size ** 2, z_dim=a.decoder_embed_dim,
                    width=a.diffloss_w, depth=a.diffloss_d, steps=steps, solver=a.flow_solver)


@hookimpl
def discon_register_components(register):
    register("head", "diffusion", diffusion)
    register("head", "flow", flow)
