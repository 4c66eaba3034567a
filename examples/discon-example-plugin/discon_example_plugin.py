"""An example third-party discon plugin: a diagonal-Gaussian continuous head.

The simplest possible ContinuousHead: one linear layer maps z to a per-channel mean and log-std;
the loss is the Gaussian negative log-likelihood and sampling draws mean + T * std * noise. It is
a baseline for the diffusion and flow heads (a unimodal head cannot model multimodal tokens).

Install it (``pip install -e examples/discon-example-plugin``) and ``discon plugins`` lists
``head gaussian``; ``discon_core.build("head", "gaussian", token_dim=16, z_dim=768)`` builds it.
It also ships a preset (``head gaussian-tiny``, for the ``discon-tiny`` backbone) through the
presets hook and a sub-command (``discon gaussian-info``) through the commands hook.
"""
import math

import torch
from torch import nn

from discon_core.hooks import hookimpl


class GaussianHead(nn.Module):
    """z [M, z_dim] -> N(mean(z), diag(std(z)^2)) over tokens [M, token_dim]."""

    def __init__(self, token_dim: int = 16, z_dim: int = 768):
        super().__init__()
        self.token_dim, self.z_dim = token_dim, z_dim
        self.proj = nn.Linear(z_dim, 2 * token_dim)

    def _params(self, z):
        mean, log_std = self.proj(z).chunk(2, dim=-1)
        return mean, log_std.clamp(-7.0, 5.0)

    def loss(self, target, z, *, generator=None):
        mean, log_std = self._params(z)
        nll = 0.5 * ((target - mean) / log_std.exp()) ** 2 + log_std + 0.5 * math.log(2 * math.pi)
        return nll.mean(dim=-1)

    @torch.no_grad()
    def sample(self, z, *, temperature=1.0, cfg_scale=1.0, steps=None, generator=None):
        mean, log_std = self._params(z)
        if cfg_scale != 1.0:  # rows are [cond; uncond]: guide the mean, keep the cond spread
            cond, uncond = mean.chunk(2)
            mean = torch.cat([uncond + cfg_scale * (cond - uncond)] * 2)
            log_std = torch.cat([log_std.chunk(2)[0]] * 2)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + temperature * log_std.exp() * noise


@hookimpl
def discon_register_components(register):
    register("head", "gaussian", GaussianHead)


@hookimpl
def discon_register_presets(register):
    register({"head": {"gaussian-tiny": {
        "factory": "gaussian", "params": {"token_dim": 8, "z_dim": 128},
        "description": "Gaussian head sized for the discon-tiny backbone (example plugin)"}}})


def _info(args):
    head = GaussianHead(args.token_dim, args.z_dim)
    print(f"gaussian head: {sum(p.numel() for p in head.parameters())} parameters")
    return 0


@hookimpl
def discon_register_commands(subparsers):
    p = subparsers.add_parser("gaussian-info", help="parameter count of the example Gaussian head")
    p.add_argument("--token-dim", type=int, default=8)
    p.add_argument("--z-dim", type=int, default=128)
    p.set_defaults(func=_info)
