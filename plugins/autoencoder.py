"""Convolutional autoencoder building blocks shared by the three tokenizers.

One ResNet block, one attention block, one resampler pair, one ``Encoder`` and one ``Decoder``
serve MaskGIT's VQGAN (``maskgit-vq``) and the LDM-style KL autoencoders (``ldm-kl``,
``va-vae``). The two families differ only in a handful of choices, gathered in :class:`Style`:

* convs in ResNet blocks and encoder.conv_in: with bias (LDM) | without (MaskGIT);
* width-changing skip: ``nin_shortcut(x)``, in->out (LDM) | ``h + nin_shortcut(h)``, out->out
  (MaskGIT);
* down-sampling: zero-pad (0,1,0,1) + 3x3 stride-2 conv (LDM) | 2x2 average pool, no
  parameters (MaskGIT);
* up-sampling keys: ``upsample.conv`` (LDM) | ``upsample_conv`` (MaskGIT);
* middle: ``block_1, attn_1, block_2`` (LDM) | ``num_res_blocks`` plain blocks (MaskGIT);
* decoder blocks per level: ``num_res_blocks + 1`` (LDM) | ``num_res_blocks`` (MaskGIT);
* encoder ``conv_out``: 3x3 to 2*z, mean and logvar (LDM) | 1x1 to z (MaskGIT).

The MaskGIT shortcut quirk (the input skip is discarded when the width changes, and a 1x1
conv is applied to the block's own output instead) comes from the original JAX MaskGIT code;
the official weights only reproduce with it.

Module names equal the official ones, so official checkpoints load strictly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from discon_core.errors import DisconError
from discon_plugins.attention import attention


@dataclass(frozen=True)
class Style:
    """The architectural choices that tell MaskGIT's VQGAN from the LDM autoencoder."""

    conv_bias: bool            # bias on ResnetBlock convs and on encoder.conv_in
    shortcut_on_output: bool   # MaskGIT: h + nin_shortcut(h) when the width changes
    avgpool_downsample: bool   # MaskGIT: 2x2 average pool instead of a stride-2 conv
    flat_upsample_conv: bool   # MaskGIT: key ``upsample_conv`` instead of ``upsample.conv``
    mid_attention: bool        # LDM: mid = block_1, attn_1, block_2
    extra_decoder_block: bool  # LDM: num_res_blocks + 1 blocks per decoder level
    encoder_out_kernel: int    # 3 (LDM) or 1 (MaskGIT)


LDM = Style(conv_bias=True, shortcut_on_output=False, avgpool_downsample=False,
            flat_upsample_conv=False, mid_attention=True, extra_decoder_block=True,
            encoder_out_kernel=3)
MASKGIT = Style(conv_bias=False, shortcut_on_output=True, avgpool_downsample=True,
                flat_upsample_conv=True, mid_attention=False, extra_decoder_block=False,
                encoder_out_kernel=1)


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with eps 1e-6 and affine parameters, as in every official tokenizer."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


def check_widths(ch: int, ch_mult: Sequence[int], num_groups: int, *, ch_name: str,
                 mult_name: str) -> None:
    """Every hidden width must split into ``num_groups`` GroupNorm groups: say so up front."""
    if not ch_mult:
        raise DisconError(f"{mult_name} must list at least one level, got {list(ch_mult)}")
    if num_groups < 1:
        raise DisconError(f"num_groups must be >= 1, got {num_groups}")
    for m in ch_mult:
        if (ch * m) % num_groups:
            raise DisconError(
                f"num_groups={num_groups} does not divide the width {ch}*{m}={ch * m} "
                f"({ch_name}={ch}, {mult_name}={list(ch_mult)}); choose num_groups dividing "
                f"every width (the official models use 32 with {ch_name}=128)")


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> dropout -> conv3x3, plus a skip.

    ``[B, in_channels, H, W] -> [B, out_channels, H, W]``. When the width changes the skip is a
    1x1 ``nin_shortcut``: on the input (LDM) or on the block's own output (MaskGIT).
    """

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float, num_groups: int,
                 style: Style):
        super().__init__()
        self.changes_width = in_channels != out_channels
        self.shortcut_on_output = style.shortcut_on_output
        bias = style.conv_bias
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        if self.changes_width:
            shortcut_in = out_channels if style.shortcut_on_output else in_channels
            self.nin_shortcut = nn.Conv2d(shortcut_in, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if not self.changes_width:
            return x + h
        if self.shortcut_on_output:
            return h + self.nin_shortcut(h)
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 q/k/v/proj_out convs.

    ``[B, C, H, W] -> [B, C, H, W]`` (residual); softmax scale ``C**-0.5``.
    """

    def __init__(self, channels: int, *, num_groups: int):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,1,HW,C]
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        out = attention(heads(self.q(y)), heads(self.k(y)), heads(self.v(y)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """LDM down-sampling: zero-pad right/bottom by one, then a 3x3 stride-2 conv (halves H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 up-sampling followed by a 3x3 conv (doubles H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResNet blocks (each optionally followed by attention), then an
    optional resampler. Keys: ``block.{i}``, ``attn.{i}``, and ``downsample.conv`` /
    ``upsample.conv`` / ``upsample_conv`` depending on the style."""

    def __init__(self, widths: Sequence[int], *, attend: bool, resample: str | None,
                 dropout: float, num_groups: int, style: Style):
        super().__init__()
        out = widths[-1]
        self.block = nn.ModuleList(
            ResnetBlock(a, b, dropout=dropout, num_groups=num_groups, style=style)
            for a, b in zip(widths[:-1], widths[1:]))
        if attend:
            self.attn = nn.ModuleList(AttnBlock(out, num_groups=num_groups)
                                      for _ in range(len(self.block)))
        self.resample = resample
        self.avgpool = False
        if resample == "down":
            if style.avgpool_downsample:
                self.avgpool = True  # parameter-free: no module, no keys
            else:
                self.downsample = Downsample(out)
        elif resample == "up":
            if style.flat_upsample_conv:
                self.upsample_conv = nn.Conv2d(out, out, 3, padding=1)
            else:
                self.upsample = Upsample(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attns = getattr(self, "attn", None)
        for i, block in enumerate(self.block):
            x = block(x)
            if attns is not None:
                x = attns[i](x)
        if self.resample == "down":
            x = F.avg_pool2d(x, kernel_size=2, stride=2) if self.avgpool else self.downsample(x)
        elif self.resample == "up":
            if hasattr(self, "upsample_conv"):
                x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
            else:
                x = self.upsample(x)
        return x


class MidBlock(nn.Module):
    """LDM middle: ``block_1 -> attn_1 -> block_2`` at constant width."""

    def __init__(self, channels: int, *, dropout: float, num_groups: int, style: Style):
        super().__init__()
        kw = dict(dropout=dropout, num_groups=num_groups, style=style)
        self.block_1 = ResnetBlock(channels, channels, **kw)
        self.attn_1 = AttnBlock(channels, num_groups=num_groups)
        self.block_2 = ResnetBlock(channels, channels, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def middle(channels: int, num_res_blocks: int, *, dropout: float, num_groups: int,
           style: Style) -> nn.Module:
    """The style's middle section (MaskGIT: a plain stack of ``num_res_blocks`` blocks)."""
    if style.mid_attention:
        return MidBlock(channels, dropout=dropout, num_groups=num_groups, style=style)
    return nn.Sequential(*(ResnetBlock(channels, channels, dropout=dropout,
                                       num_groups=num_groups, style=style)
                           for _ in range(num_res_blocks)))


class Encoder(nn.Module):
    """Images ``[B, in_channels, H, W]`` -> ``[B, out_channels, H/f, W/f]``, ``f = 2**(L-1)``
    for ``L = len(ch_mult)`` levels.

    Args:
        ch: base width (MaskGIT's ``hidden_channels``); level i has width ``ch * ch_mult[i]``.
        num_res_blocks: ResNet blocks per level.
        attn_resolutions: levels whose nominal resolution (``resolution / 2**i``) is listed get
            an attention block after each ResNet block; the nominal ``resolution`` decides, not
            the input size (as in the official code).
        out_channels: conv_out width (``2 * z_channels`` for a KL posterior).
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 in_channels: int, out_channels: int, attn_resolutions: Sequence[int] = (),
                 resolution: int = 256, dropout: float = 0.0, num_groups: int = 32,
                 style: Style = LDM):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=style.conv_bias)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        levels = []
        for i, mult in enumerate(ch_mult):
            widths = [ch * in_mult[i]] + [ch * mult] * num_res_blocks
            last = i == len(ch_mult) - 1
            levels.append(Level(widths, attend=res in attn_resolutions,
                                resample=None if last else "down", dropout=dropout,
                                num_groups=num_groups, style=style))
            res = res if last else res // 2
        self.down = nn.ModuleList(levels)
        top = ch * ch_mult[-1]
        self.mid = middle(top, num_res_blocks, dropout=dropout, num_groups=num_groups,
                          style=style)
        self.norm_out = group_norm(top, num_groups)
        k = style.encoder_out_kernel
        self.conv_out = nn.Conv2d(top, out_channels, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents ``[B, z_channels, h, w]`` -> ``[B, out_ch, h*f, w*f]`` (unbounded; no tanh).

    ``up`` is indexed by level (``up.0`` is full resolution) and run from the lowest resolution
    up, as in the official code. Level i maps width ``ch*ch_mult[i+1]`` (or ``ch*ch_mult[-1]``
    for the last) to ``ch*ch_mult[i]``.
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, out_ch: int, attn_resolutions: Sequence[int] = (),
                 resolution: int = 256, dropout: float = 0.0, num_groups: int = 32,
                 style: Style = LDM):
        super().__init__()
        top = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, top, 3, padding=1)
        self.mid = middle(top, num_res_blocks, dropout=dropout, num_groups=num_groups,
                          style=style)
        blocks = num_res_blocks + (1 if style.extra_decoder_block else 0)
        res = resolution // 2 ** (len(ch_mult) - 1)
        levels: list[Level] = []
        block_in = top
        for i in reversed(range(len(ch_mult))):
            widths = [block_in] + [ch * ch_mult[i]] * blocks
            levels.append(Level(widths, attend=res in attn_resolutions,
                                resample="up" if i != 0 else None, dropout=dropout,
                                num_groups=num_groups, style=style))
            block_in = widths[-1]
            res = res * 2 if i != 0 else res
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def check_images(images: torch.Tensor, *, channels: int, downsample: int, what: str,
                 atol: float = 1e-4) -> None:
    """Validate images for ``encode``: float ``[B, channels, H, W]``, values in [0, 1],
    H and W multiples of ``downsample``. ``atol`` tolerates rounding from resizing."""
    if not isinstance(images, torch.Tensor):
        raise DisconError(f"{what}: images must be a torch.Tensor [B,{channels},H,W], "
                          f"got {type(images).__name__}")
    if images.ndim != 4:
        raise DisconError(f"{what}: images must be 4-D [B,{channels},H,W], got shape "
                          f"{tuple(images.shape)}")
    if not images.is_floating_point():
        raise DisconError(f"{what}: images must be a float tensor in [0, 1], got "
                          f"{images.dtype} (divide uint8 images by 255)")
    if images.shape[1] != channels:
        raise DisconError(f"{what}: images must have {channels} channels (RGB, [B,{channels},"
                          f"H,W]), got {images.shape[1]} (shape {tuple(images.shape)})")
    h, w = images.shape[-2:]
    if h % downsample or w % downsample:
        raise DisconError(f"{what}: image height and width must be multiples of the "
                          f"downsampling factor {downsample}, got {h}x{w}")
    if images.device.type != "meta" and images.numel():
        if not bool(torch.isfinite(images).all()):  # NaN fails no comparison below
            raise DisconError(f"{what}: images hold NaN or inf values; expected values in [0, 1]")
        lo, hi = images.min().item(), images.max().item()
        if lo < -atol or hi > 1 + atol:
            raise DisconError(f"{what}: images must have values in [0, 1], got range "
                              f"[{lo:.4g}, {hi:.4g}] (convert from [-1,1] with (x+1)/2, "
                              "from uint8 with x/255)")


