"""The 3-D convolutional backbone that Cryo-SWAN and every baseline share.

Encoders halve the grid at each stage with a strided convolution and refine it with residual
blocks; decoders mirror them with transposed convolutions. Keeping one backbone makes the
baselines differ from Cryo-SWAN only in their latent space, which is the comparison the paper
draws (Table 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class VoxelPositionalEncoding(nn.Module):
    """Eq. 1: sine/cosine features of each voxel's density value.

    f(v) = (sin(2⁰πv), cos(2⁰πv), …, sin(2^(L-1)πv), cos(2^(L-1)πv)), with the raw value kept
    as channel 0 so low frequencies are not lost to aliasing of the high ones.

    Shape:
        - x_B1dhw: (B, 1, D, H, W)
        - output: (B, 1 + 2L, D, H, W); with L = 0 the input is returned unchanged.
    """

    def __init__(self, n_freqs: int):
        super().__init__()
        self.n_freqs = n_freqs
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freqs), persistent=False)

    @property
    def out_channels(self) -> int:
        return 1 + 2 * self.n_freqs

    def forward(self, x_B1dhw: torch.Tensor) -> torch.Tensor:
        if self.n_freqs == 0:
            return x_B1dhw
        angles_BLdhw = x_B1dhw * self.freqs.view(1, -1, 1, 1, 1)
        return torch.cat([x_B1dhw, torch.sin(angles_BLdhw), torch.cos(angles_BLdhw)], dim=1)


def fourier_features(coords_N3: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """Fourier features of xyz coordinates for coordinate-MLP decoders.

    Shape:
        - coords_N3: (..., 3), coordinates in [-0.5, 0.5)
        - output: (..., 3 + 6 * n_freqs): the raw coordinates, then sin and cos of
          2^l·π·coordinate for l = 0 … n_freqs-1.
    """
    freqs = math.pi * 2.0 ** torch.arange(n_freqs, device=coords_N3.device, dtype=coords_N3.dtype)
    angles = (coords_N3.unsqueeze(-1) * freqs).flatten(-2)
    return torch.cat([coords_N3, torch.sin(angles), torch.cos(angles)], dim=-1)


def voxel_grid(size: int, device=None) -> torch.Tensor:
    """Voxel-centre coordinates of a size³ box in [-0.5, 0.5), in (z, y, x) order.

    Shape:
        - output: (size³, 3)
    """
    axis = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size - 0.5
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([zz, yy, xx], dim=-1).reshape(-1, 3)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock3d(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, Conv3d 3³) twice plus the identity.

    Shape:
        - f_BCdhw: (B, C, D, H, W) → (B, C, D, H, W)
    """

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv3d(channels, channels, 3, padding=1),
            _norm(channels), nn.SiLU(), nn.Conv3d(channels, channels, 3, padding=1),
        )

    def forward(self, f_BCdhw: torch.Tensor) -> torch.Tensor:
        return f_BCdhw + self.body(f_BCdhw)


class Encoder3d(nn.Module):
    """Strided Conv3d (4³, stride 2) then `blocks` residual blocks, once per width; the output
    is normalised (GroupNorm, SiLU).

    Each width halves the grid, so widths (32, 64) take 64³ to 16³. The output norm keeps the
    latent's scale from running away under Adam at lr 1e-3: without it the residual stream of a
    deep encoder can grow by large factors per step, and the codebooks cannot follow.

    Shape:
        - x_BCdhw: (B, in_channels, D, H, W)
        - output: (B, widths[-1], D / 2^n, H / 2^n, W / 2^n), n = len(widths)
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...], blocks: int):
        super().__init__()
        layers: list[nn.Module] = []
        for width in widths:
            layers.append(nn.Conv3d(in_channels, width, 4, stride=2, padding=1))
            layers.extend(ResBlock3d(width) for _ in range(blocks))
            in_channels = width
        layers += [_norm(in_channels), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.out_channels = in_channels

    def forward(self, x_BCdhw: torch.Tensor) -> torch.Tensor:
        return self.layers(x_BCdhw)


def fusion_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv3d 3³ then GroupNorm and SiLU: fuses concatenated maps into a normalised map.

    Used before quant_conv, so that (as after an encoder) the latent's scale is set by one 1³
    quant_conv and cannot jump with a wide conv's Adam step.

    Shape: (B, in_channels, D, H, W) → (B, out_channels, D, H, W)
    """
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1), _norm(out_channels), nn.SiLU())


class Decoder3d(nn.Module):
    """Mirror of :class:`Encoder3d`: residual blocks, then a transposed Conv3d (4³, stride 2)
    per step up. The last step maps straight to `out_channels` with no block after it.

    widths[0] is the input width; each following width is one upsampling step, and the final
    upsampling step goes to out_channels. So widths (64, 32) with out_channels 1 take 16³ to 64³.

    Shape:
        - f_BCdhw: (B, widths[0], d, h, w)
        - output: (B, out_channels, d·2^n, h·2^n, w·2^n), n = len(widths)
    """

    def __init__(self, widths: tuple[int, ...], out_channels: int, blocks: int):
        super().__init__()
        layers: list[nn.Module] = []
        for width, next_width in zip(widths, widths[1:]):
            layers.extend(ResBlock3d(width) for _ in range(blocks))
            layers.append(_upsample(width, next_width))
        layers.extend(ResBlock3d(widths[-1]) for _ in range(blocks))
        layers += [_norm(widths[-1]), nn.SiLU(), _upsample(widths[-1], out_channels)]
        self.layers = nn.Sequential(*layers)

    def forward(self, f_BCdhw: torch.Tensor) -> torch.Tensor:
        return self.layers(f_BCdhw)


def _upsample(in_channels: int, out_channels: int) -> nn.ConvTranspose3d:
    return nn.ConvTranspose3d(in_channels, out_channels, 4, stride=2, padding=1)


class CoordinateDecoder(nn.Module):
    """A coordinate MLP: density at each point from Fourier features of its xyz and a latent z.

    The latent enters the first layer as an additive bias (computed once per volume), which is
    the same function as concatenating z to every point's features, at a fraction of the cost.

    Shape:
        - coords_BN3: (B, N, 3) points in [-0.5, 0.5); a (N, 3) grid is broadcast over B
        - z_BZ: (B, Z)
        - output: (B, N)
    """

    def __init__(self, z_dim: int, n_freqs: int, hidden: int, layers: int):
        super().__init__()
        self.n_freqs = n_freqs
        self.from_coords = nn.Linear(3 + 6 * n_freqs, hidden)
        self.from_latent = nn.Linear(z_dim, hidden, bias=False)
        body: list[nn.Module] = []
        for _ in range(layers - 1):
            body += [nn.SiLU(), nn.Linear(hidden, hidden)]
        body += [nn.SiLU(), nn.Linear(hidden, 1)]
        self.body = nn.Sequential(*body)

    def forward(self, coords_BN3: torch.Tensor, z_BZ: torch.Tensor) -> torch.Tensor:
        h_BNH = self.from_coords(fourier_features(coords_BN3, self.n_freqs))
        h_BNH = h_BNH + self.from_latent(z_BZ).unsqueeze(1)
        return self.body(h_BNH).squeeze(-1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_std: float = 1.0) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) ‖ N(0, prior_std²)) summed over the last axis.

    Shape:
        - mu, logvar: (B, Z) → output: (B,)
    """
    prior_var = prior_std**2
    kl = 0.5 * ((mu.pow(2) + logvar.exp()) / prior_var - 1.0 - logvar + math.log(prior_var))
    return kl.sum(-1)


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, sample: bool) -> torch.Tensor:
    """A sample mu + σ·ε while training, the mean otherwise."""
    if not sample:
        return mu
    return mu + torch.randn_like(mu) * (0.5 * logvar).exp()


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32, whatever autocast does around it."""
    return F.mse_loss(a.float(), b.float())
