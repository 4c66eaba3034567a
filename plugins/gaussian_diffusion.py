"""Gaussian diffusion math of MAR's diffusion head (the ADM/DiT formulation MAR uses).

Only the configuration MAR runs is implemented: cosine schedule over 1000 steps, epsilon
prediction, learned-range variance, MSE + variational-bound loss, optional timestep respacing
("100", "25,25", "ddim50", ...). Every per-step coefficient is computed in float64 (as the
reference does, with numpy) and cast to float32 when used, so results match the official code
bit for bit up to float32 rounding.

Shapes: the head works on token rows, so ``x`` is ``[M, D]`` throughout.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from discon_core.errors import DisconError

NUM_TRAIN_STEPS = 1000
MAX_BETA = 0.999
# Discretised Gaussian decoder (t == 0 term of the bound): 2/255 bins, open outer bins at +-0.999.
HALF_BIN = 1.0 / 255.0
EDGE = 0.999


def cosine_betas(num_steps: int = NUM_TRAIN_STEPS) -> torch.Tensor:
    """Cosine schedule ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)`` as float64 [T]."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), MAX_BETA)
             for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def space_timesteps(num_steps: int, spacing: str | int) -> list[int]:
    """The original step indices kept by a respacing string (sorted ascending).

    ``"100"`` (or ``100``): 100 steps spread over one section; ``"10,15"``: two sections;
    ``"ddimN"``: the DDIM integer stride giving exactly N steps.
    """
    spec = str(spacing).strip()
    if spec.startswith("ddim"):
        try:
            desired = int(spec[len("ddim"):])
        except ValueError:
            raise DisconError(f"num_sampling_steps {spacing!r}: expected 'ddimN' with an integer N") from None
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == desired:
                return list(range(0, num_steps, stride))
        raise DisconError(f"num_sampling_steps {spacing!r}: no integer stride gives exactly "
                          f"{desired} of {num_steps} steps")
    try:
        sections = [int(s) for s in spec.split(",")]
    except ValueError:
        raise DisconError(f"num_sampling_steps {spacing!r}: expected an integer such as '100', "
                          "comma-separated section counts, or 'ddimN'") from None
    if any(s < 1 for s in sections):
        raise DisconError(f"num_sampling_steps {spacing!r}: step counts must be >= 1")
    size_per, extra = divmod(num_steps, len(sections))
    start, steps = 0, []
    for i, count in enumerate(sections):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise DisconError(f"num_sampling_steps {spacing!r}: cannot take {count} steps from a "
                              f"section of {size} (at most {num_steps} in total)")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # The reference accumulates the fractional index by repeated addition, then rounds;
        # doing the same keeps the chosen steps identical.
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


# the schedule's coefficients one reverse step reads (GaussianDiffusion attributes)
REVERSE_COEFS = ("log_betas", "posterior_log_variance_clipped", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2")


def reverse_step(out: torch.Tensor, x: torch.Tensor, c) -> tuple[torch.Tensor, ...]:
    """The reverse-step Gaussian from the network output ``[M, 2D]`` (eps, variance value) at
    ``x [M, D]``: (mean, log_variance, pred_xstart). ``c`` maps ``REVERSE_COEFS`` to the
    schedule's values at the step: scalars (one step for all rows, the sampler) or ``[M, 1]``
    (a step per row, the training loss)."""
    eps, var_values = out.split(x.shape[-1], dim=-1)
    frac = (var_values + 1) / 2  # LEARNED_RANGE: interpolate between the two log-variances
    log_variance = frac * c["log_betas"] + (1 - frac) * c["posterior_log_variance_clipped"]
    pred_xstart = c["sqrt_recip_alphas_cumprod"] * x - c["sqrt_recipm1_alphas_cumprod"] * eps
    mean = c["posterior_mean_coef1"] * pred_xstart + c["posterior_mean_coef2"] * x
    return mean, log_variance, pred_xstart


class GaussianDiffusion:
    """One (possibly respaced) cosine diffusion process.

    ``timestep_map[k]`` is the original 0..999 step of respaced index ``k``; the network always
    receives original steps. Arrays are float64 tensors ``[K]``.
    """

    def __init__(self, spacing: str | int | None = None, num_train_steps: int = NUM_TRAIN_STEPS):
        # Schedules are host-side float64 tables (also when the module is built on "meta").
        base = cosine_betas(num_train_steps)
        if spacing in (None, ""):
            self.timestep_map = torch.arange(num_train_steps, device="cpu")
            betas = base
        else:
            kept = space_timesteps(num_train_steps, spacing)
            abar = torch.cumprod(1.0 - base, dim=0)
            new, last = [], 1.0
            for i in kept:  # respaced betas reproduce the kept alpha_bar values exactly (unclipped)
                new.append(1.0 - abar[i].item() / last)
                last = abar[i].item()
            self.timestep_map = torch.tensor(kept, dtype=torch.int64, device="cpu")
            betas = torch.tensor(new, dtype=torch.float64, device="cpu")
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_prev = prev
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        self.posterior_variance = betas * (1.0 - prev) / (1.0 - self.alphas_cumprod)
        # The variance at step 0 is 0; its log is replaced by the step-1 value (as the reference).
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.cat([pv[1:2], pv[1:]]).log()
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = betas.log()

    # -- coefficients -------------------------------------------------------------------------
    @staticmethod
    def _at(arr: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """arr[t] as float32 [M, 1] (the reference's float64 -> float32 cast at use)."""
        return arr.to(t.device)[t].float().unsqueeze(-1)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced indices -> the original steps the network is conditioned on."""
        return self.timestep_map.to(t.device)[t]

    # -- forward process ------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise.  [M, D]"""
        return self._at(self.sqrt_alphas_cumprod, t) * x_start + \
            self._at(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def q_posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t) * x_start + \
            self._at(self.posterior_mean_coef2, t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t)

    # -- reverse process ------------------------------------------------------------------------
    def p_mean_variance_from_output(self, out: torch.Tensor, x: torch.Tensor,
                                    t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Network output ``[M, 2D]`` (eps, variance value) at respaced steps ``t`` -> the
        reverse-step Gaussian: mean, variance, log_variance, pred_xstart (each [M, D])."""
        mean, log_variance, pred_xstart = reverse_step(
            out, x, {name: self._at(getattr(self, name), t) for name in REVERSE_COEFS})
        return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_mean_variance(self, net: Callable, x: torch.Tensor, t: torch.Tensor,
                        c: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run ``net(x, original_t, c)`` and return the reverse-step Gaussian (see above)."""
        return self.p_mean_variance_from_output(net(x, self.model_timesteps(t), c), x, t)

    # -- training loss --------------------------------------------------------------------------
    def training_losses(self, net: Callable, x_start: torch.Tensor, t: torch.Tensor,
                        c: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row loss = MSE(eps) + VB (bits/dim; eps detached so only the variance learns from
        it; the decoder NLL at t == 0). Returns {'loss', 'mse', 'vb'}, each [M]."""
        x_t = self.q_sample(x_start, t, noise)
        out = net(x_t, self.model_timesteps(t), c)
        eps = out[:, :x_start.shape[-1]]
        frozen = torch.cat([eps.detach(), out[:, x_start.shape[-1]:]], dim=-1)
        vb = self._vb_terms_bpd(frozen, x_start, x_t, t)
        mse = ((noise - eps) ** 2).mean(dim=-1)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _vb_terms_bpd(self, out: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
        true_mean, true_log_var = self.q_posterior_mean(x_start, x_t, t)
        p = self.p_mean_variance_from_output(out, x_t, t)
        kl = normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])
        kl = kl.mean(dim=-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"])
        nll = nll.mean(dim=-1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of ``x`` under a Gaussian discretised into 2/255-wide bins on [-1, 1]."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + HALF_BIN))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - HALF_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -EDGE, log_cdf_plus,
                       torch.where(x > EDGE, log_one_minus_cdf_min, log_delta))
