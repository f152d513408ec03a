"""The baselines of the paper's Table 1, on Cryo-SWAN's backbone (see docs/MODELS.md).

- VQ-VAE (van den Oord et al. 2017): one codebook at the 16³ latent.
- RQ-VAE (Lee et al. 2022): D residual lookups per 16³ position in one shared codebook.
- VAR's multi-scale VQ-VAE (Tian et al. 2024): Algorithm 2 at a single level.
- HQ-VAE (Takida et al. 2024), SQ-VAE-2 style: 8³ top and 16³ bottom levels, top-down, with
  stochastic quantization.
- cryoDRGN-style VAE (Zhong et al. 2021): MLP encoder, coordinate-MLP decoder.
- TARGET-VAE-style spatial VAE (Nasiri & Bepler 2022): latent rotation and translation beside
  the content code, decoded by a coordinate MLP on the transformed grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Autoencoder, Codes, Encoding, ModelOutput
from .blocks import (CoordinateDecoder, Decoder3d, Encoder3d, VoxelPositionalEncoding, fusion_block,
                     gaussian_kl, mse, reparameterise, voxel_grid)
from .quantize import ResidualQuantizer, StochasticQuantizer, residual_statistics

# ─── single-level quantized autoencoders: VQ, RQ, VAR ────────────────────────────────────────


@dataclass
class SingleLevelConfig:
    """One encoder (64³ → 16³), one quantizer, one decoder.

    - scales: the quantizer's steps: (16,) is VQ, (16,)·D is RQ, (1, 2, …, 16) is VAR.
    - refine: a Conv3d φ per step (Algorithm 2 line 9; VAR), or plain code sums (VQ, RQ).
    - dead_ema … phi_shared: as in SwanConfig (old behaviour by default, on in the presets).
    """

    volume_size: int = 64
    pe_freqs: int = 0
    widths: tuple[int, ...] = (32, 128)
    blocks: int = 2
    code_dim: int = 32
    codebook_size: int = 4096
    scales: tuple[int, ...] = (16,)
    refine: bool = False
    beta: float = 0.25
    dead_after: int = 50
    dead_ema: float | None = None
    dead_below: float = 0.01
    kmeans_after: int | None = None
    phi_mix: float | None = None
    phi_shared: int = 0

    def __post_init__(self):
        self.widths, self.scales = tuple(self.widths), tuple(self.scales)
        if self.scales[-1] != self.volume_size // 4:
            raise ValueError(f"the last scale must be the 16³ latent edge {self.volume_size // 4}")


class SingleLevelVQ(Autoencoder):
    """Encoder → quant_conv → quantizer → post_quant_conv → decoder.

    Shape:
        - x, recon: (B, 1, 64, 64, 64)
        - codes["latent"][i]: (B, s_i, s_i, s_i); levels["latent"]["latent"]: (B, code_dim, 16, 16, 16)
    """

    def __init__(self, config: SingleLevelConfig):
        super().__init__(config)
        self.positional_encoding = VoxelPositionalEncoding(config.pe_freqs)
        self.encoder = Encoder3d(self.positional_encoding.out_channels, config.widths, config.blocks)
        self.quant_conv = nn.Conv3d(config.widths[-1], config.code_dim, 1)
        self.quantizer = ResidualQuantizer(
            config.codebook_size, config.code_dim, config.scales, config.beta, refine=config.refine,
            dead_after=config.dead_after, phi_mix=config.phi_mix, phi_shared=config.phi_shared,
            dead_ema=config.dead_ema, dead_below=config.dead_below, kmeans_after=config.kmeans_after)
        self.post_quant_conv = nn.Conv3d(config.code_dim, config.widths[-1], 3, padding=1)
        self.decoder = Decoder3d(config.widths[::-1], 1, config.blocks)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        f_BCdhw = self.quant_conv(self.encoder(self.positional_encoding(x)))
        quantized = self.quantizer(f_BCdhw)
        recon = self.decoder(self.post_quant_conv(quantized.f_hat_BCdhw))
        losses = {"recon": mse(recon, x), "commit": quantized.loss}
        losses["total"] = losses["recon"] + losses["commit"]
        level = {"latent": f_BCdhw, "quantized": quantized.f_hat_BCdhw, **residual_statistics(quantized)}
        return ModelOutput(recon, losses, {"latent": quantized.codes}, {"latent": level})

    def encode(self, x: torch.Tensor) -> Encoding:
        f_BCdhw = self.quant_conv(self.encoder(self.positional_encoding(x)))
        quantized = self.quantizer(f_BCdhw)
        return Encoding({"latent": quantized.codes}, {"latent": f_BCdhw}, {"latent": quantized.f_hat_BCdhw})

    def decode_codes(self, codes: Codes) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self.quantizer.decode(codes["latent"])))

    def codebooks(self) -> dict[str, nn.Module]:
        return {"latent": self.quantizer.codebook}


class VQVAE(SingleLevelVQ):
    name = "vq"


class RQVAE(SingleLevelVQ):
    name = "rq"


class MultiScaleVQVAE(SingleLevelVQ):
    """VAR's tokenizer: Algorithm 2 without Cryo-SWAN's levels."""

    name = "var"


# ─── HQ-VAE (SQ-VAE-2 style) ─────────────────────────────────────────────────────────────────


@dataclass
class HQConfig:
    """Two stochastic levels: top at 8³, bottom at 16³. widths: 32³, 16³ and 8³ stages.
    dead_ema, dead_below, kmeans_after: as in SwanConfig (old behaviour by default)."""

    volume_size: int = 64
    pe_freqs: int = 0
    widths: tuple[int, ...] = (32, 128, 256)
    blocks: int = 2
    code_dim: int = 32
    codebook_size: int = 4096
    temperature: float = 0.5
    init_variance: float = 1.0
    dead_after: int = 50
    dead_ema: float | None = None
    dead_below: float = 0.01
    kmeans_after: int | None = None

    def __post_init__(self):
        self.widths = tuple(self.widths)


class HQVAE(Autoencoder):
    """HQ-VAE with injected top-down layers (SQ-VAE-2).

    Bottom-up: h_16 = enc_bottom(x), h_8 = enc_top(h_16). Top-down: the top level quantizes h_8
    and decodes it to d_top at 16³; the bottom level quantizes fuse(d_top, h_16); the decoder
    reads both d_top and the bottom codes. Unlike Cryo-SWAN, both levels feed the decoder and
    quantization is stochastic while training.

    Shape:
        - x, recon: (B, 1, 64, 64, 64)
        - codes["top"][0]: (B, 8, 8, 8); codes["bottom"][0]: (B, 16, 16, 16)
    """

    name = "hq"

    def __init__(self, config: HQConfig):
        super().__init__(config)
        w0, w1, w2 = config.widths
        c = config.code_dim
        self.positional_encoding = VoxelPositionalEncoding(config.pe_freqs)
        self.encoder_bottom = Encoder3d(self.positional_encoding.out_channels, (w0, w1), config.blocks)
        self.encoder_top = Encoder3d(w1, (w2,), config.blocks)
        self.quant_conv_top = nn.Conv3d(w2, c, 1)
        self.fuse_bottom = fusion_block(2 * w1, w1)
        self.quant_conv_bottom = nn.Conv3d(w1, c, 1)
        self.quantizer_top = self._stochastic_quantizer(config)
        self.quantizer_bottom = self._stochastic_quantizer(config)
        self.post_quant_top = nn.Conv3d(c, w2, 3, padding=1)
        self.post_quant_bottom = nn.Conv3d(c, w1, 3, padding=1)
        self.decoder_top = Decoder3d((w2,), w1, config.blocks)
        self.fuse = nn.Conv3d(2 * w1, w1, 3, padding=1)
        self.decoder = Decoder3d((w1, w0), 1, config.blocks)

    @staticmethod
    def _stochastic_quantizer(config: HQConfig) -> StochasticQuantizer:
        return StochasticQuantizer(config.codebook_size, config.code_dim, config.temperature,
                                   config.init_variance, config.dead_after, dead_ema=config.dead_ema,
                                   dead_below=config.dead_below, kmeans_after=config.kmeans_after)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        levels, top, bottom = self._quantize(x)
        recon = self._decode(levels["top"]["decoded"], bottom.f_hat_BCdhw)
        # The SQ terms are per latent position; weighting by positions per voxel makes the sum a
        # per-voxel ELBO, on the scale of the voxel MSE.
        n_voxels = x[0].numel()
        sq_top = top.loss * levels["top"]["latent"][0, 0].numel() / n_voxels
        sq_bottom = bottom.loss * levels["bottom"]["latent"][0, 0].numel() / n_voxels
        losses = {"recon": mse(recon, x), "sq/top": sq_top, "sq/bottom": sq_bottom, "sq": sq_top + sq_bottom}
        losses["total"] = losses["recon"] + losses["sq"]
        return ModelOutput(recon, losses, {"top": top.codes, "bottom": bottom.codes}, levels)

    def encode(self, x: torch.Tensor) -> Encoding:
        levels, top, bottom = self._quantize(x)
        return Encoding({"top": top.codes, "bottom": bottom.codes},
                        {name: level["latent"] for name, level in levels.items()},
                        {name: level["quantized"] for name, level in levels.items()})

    def decode_codes(self, codes: Codes) -> torch.Tensor:
        d_top = self.decoder_top(self.post_quant_top(self.quantizer_top.decode(codes["top"])))
        return self._decode(d_top, self.quantizer_bottom.decode(codes["bottom"]))

    def codebooks(self) -> dict[str, nn.Module]:
        return {"top": self.quantizer_top.codebook, "bottom": self.quantizer_bottom.codebook}

    def _quantize(self, x: torch.Tensor):
        h_16 = self.encoder_bottom(self.positional_encoding(x))
        z_top = self.quant_conv_top(self.encoder_top(h_16))
        top = self.quantizer_top(z_top)
        d_top = self.decoder_top(self.post_quant_top(top.f_hat_BCdhw))
        z_bottom = self.quant_conv_bottom(self.fuse_bottom(torch.cat([d_top, h_16], 1)))
        bottom = self.quantizer_bottom(z_bottom)
        levels = {"top": {"latent": z_top, "quantized": top.f_hat_BCdhw, "decoded": d_top},
                  "bottom": {"latent": z_bottom, "quantized": bottom.f_hat_BCdhw}}
        return levels, top, bottom

    def _decode(self, d_top: torch.Tensor, zq_bottom: torch.Tensor) -> torch.Tensor:
        fused = self.fuse(torch.cat([d_top, self.post_quant_bottom(zq_bottom)], 1))
        return self.decoder(fused)


# ─── classical VAEs with coordinate decoders ─────────────────────────────────────────────────


@dataclass
class DrgnConfig:
    """cryoDRGN-style VAE.

    - pool: average-pooling factor before the MLP encoder (64³ / 4³ = 4096 inputs).
    - xyz_freqs: Fourier frequencies of the decoder's coordinates (2⁰π … 2^(n−1)π; 7 reaches
      the 64-voxel Nyquist limit).
    """

    volume_size: int = 64
    pool: int = 4
    encoder_hidden: tuple[int, ...] = (512, 256, 256)
    z_dim: int = 128
    decoder_hidden: int = 128
    decoder_layers: int = 3
    xyz_freqs: int = 7
    kl_weight: float = 1.0

    def __post_init__(self):
        self.encoder_hidden = tuple(self.encoder_hidden)


class _CoordinateVAE(Autoencoder):
    """Shared decoding for the coordinate-MLP VAEs: a density at every voxel centre."""

    def __init__(self, config):
        super().__init__(config)
        self.decoder = CoordinateDecoder(config.z_dim, config.xyz_freqs, config.decoder_hidden,
                                         config.decoder_layers)
        self.register_buffer("grid_N3", voxel_grid(config.volume_size), persistent=False)

    def _render(self, z_BZ: torch.Tensor, coords_BN3: torch.Tensor) -> torch.Tensor:
        size = self.config.volume_size
        return self.decoder(coords_BN3, z_BZ).view(-1, 1, size, size, size)

    def _kl_per_voxel(self, kl_B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-volume KL over voxels, so KL and voxel MSE form one per-voxel ELBO."""
        return self.config.kl_weight * kl_B.mean() / x[0].numel()


class DrgnVAE(_CoordinateVAE):
    """cryoDRGN's autoencoder: an MLP on the (downsampled, flattened) volume gives q(z | x); a
    coordinate MLP on Fourier features of xyz, conditioned on z, gives the density.

    Shape:
        - x, recon: (B, 1, 64, 64, 64); codes["z"][0]: (B, z_dim)
    """

    name = "drgn-vae"

    def __init__(self, config: DrgnConfig):
        super().__init__(config)
        sizes = [(config.volume_size // config.pool) ** 3, *config.encoder_hidden]
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.SiLU()]
        layers.append(nn.Linear(sizes[-1], 2 * config.z_dim))
        self.encoder = nn.Sequential(*layers)

    def _posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = F.avg_pool3d(x, self.config.pool).flatten(1)
        mu, logvar = self.encoder(pooled).chunk(2, dim=-1)
        return mu, logvar

    def forward(self, x: torch.Tensor) -> ModelOutput:
        mu, logvar = self._posterior(x)
        z = reparameterise(mu, logvar, self.training)
        recon = self._render(z, self.grid_N3)
        losses = {"recon": mse(recon, x), "kl": self._kl_per_voxel(gaussian_kl(mu, logvar), x)}
        losses["total"] = losses["recon"] + losses["kl"]
        return ModelOutput(recon, losses, {"z": [z]}, {"z": {"mu": mu, "logvar": logvar}})

    def encode(self, x: torch.Tensor) -> Encoding:
        mu, _ = self._posterior(x)
        return Encoding({"z": [mu]}, {"z": mu})

    def decode_codes(self, codes: Codes) -> torch.Tensor:
        return self._render(codes["z"][0], self.grid_N3)


@dataclass
class TargetConfig:
    """TARGET-VAE-style spatial VAE.

    - widths, blocks: the shared conv encoder (64³ → 16³).
    - rotation_prior_std: radians, per axis-angle component; translation_prior_std: box fraction.
    """

    volume_size: int = 64
    widths: tuple[int, ...] = (32, 128)
    blocks: int = 2
    z_dim: int = 128
    decoder_hidden: int = 128
    decoder_layers: int = 3
    xyz_freqs: int = 7
    rotation_prior_std: float = 1.0
    translation_prior_std: float = 0.1
    kl_weight: float = 1.0

    def __post_init__(self):
        self.widths = tuple(self.widths)


POSE_LOGVAR_INIT = -6.0  # initial log-variance of TARGET-VAE's rotation and translation posteriors


class TargetVAE(_CoordinateVAE):
    """Pose-disentangled VAE: q(z, R, t | x), and p(x | z) evaluated on the grid moved by R, t.

    The conv encoder scores every 16³ position; the softmax of the scores is an attention map
    whose expected position is the translation mean (translation equivariance, as TARGET-VAE's
    attention), and whose weighted features give the content z and the rotation, an axis-angle
    vector ω with R = exp([ω]×). The decoder renders the template at Rᵀ(c − t) for each voxel
    centre c. Priors: z ~ N(0, I), ω ~ N(0, σ_R²), t ~ N(0, σ_t²).

    Shape:
        - x, recon: (B, 1, 64, 64, 64)
        - codes: {"z": [(B, z_dim)], "rotation": [(B, 3)], "translation": [(B, 3)]}
    """

    name = "target-vae"

    def __init__(self, config: TargetConfig):
        super().__init__(config)
        self.encoder = Encoder3d(1, config.widths, config.blocks)
        self.attention = nn.Conv3d(config.widths[-1], 1, 1)
        # z mean and log-variance, rotation mean and log-variance, translation log-variance
        self.heads = nn.Linear(config.widths[-1], 2 * config.z_dim + 9)
        # Start the pose posteriors narrow (std 0.05). Started at the prior's width, the decoder
        # sees a fresh random rotation of about 1 rad every step and learns only the
        # rotation-averaged density, the mean, which is where an early version stayed stuck.
        with torch.no_grad():
            self.heads.bias[2 * config.z_dim + 3:].fill_(POSE_LOGVAR_INIT)
        latent_size = config.volume_size // 2 ** len(config.widths)
        self.register_buffer("positions_M3", voxel_grid(latent_size), persistent=False)

    def _posterior(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        h_BCdhw = self.encoder(x)
        weights_BM = self.attention(h_BCdhw).flatten(1).softmax(-1)
        pooled_BC = torch.einsum("bm,bcm->bc", weights_BM, h_BCdhw.flatten(2))
        z_dim = self.config.z_dim
        z_mu, z_logvar, rot_mu, rot_logvar, t_logvar = self.heads(pooled_BC).split([z_dim, z_dim, 3, 3, 3], -1)
        t_mu = weights_BM @ self.positions_M3
        return {"z": (z_mu, z_logvar), "rotation": (rot_mu, rot_logvar), "translation": (t_mu, t_logvar)}

    def forward(self, x: torch.Tensor) -> ModelOutput:
        posterior = self._posterior(x)
        codes = {name: [reparameterise(mu, logvar, self.training)] for name, (mu, logvar) in posterior.items()}
        recon = self.decode_codes(codes)
        cfg = self.config
        priors = {"z": 1.0, "rotation": cfg.rotation_prior_std, "translation": cfg.translation_prior_std}
        kl_B = sum(gaussian_kl(*posterior[name], priors[name]) for name in posterior)
        losses = {"recon": mse(recon, x), "kl": self._kl_per_voxel(kl_B, x)}
        losses["total"] = losses["recon"] + losses["kl"]
        levels = {name: {"mu": mu, "logvar": logvar} for name, (mu, logvar) in posterior.items()}
        return ModelOutput(recon, losses, codes, levels)

    def encode(self, x: torch.Tensor) -> Encoding:
        posterior = self._posterior(x)
        return Encoding({name: [mu] for name, (mu, _) in posterior.items()},
                        {name: mu for name, (mu, _) in posterior.items()})

    def decode_codes(self, codes: Codes) -> torch.Tensor:
        rotation_B33 = axis_angle_to_matrix(codes["rotation"][0])
        # Row-vector form of Rᵀ(c − t): (c − t) R.
        coords_BN3 = (self.grid_N3.unsqueeze(0) - codes["translation"][0].unsqueeze(1)) @ rotation_B33
        return self._render(codes["z"][0], coords_BN3)


def axis_angle_to_matrix(omega_B3: torch.Tensor) -> torch.Tensor:
    """Rotation matrices exp([ω]×) from axis-angle vectors, in float32 (matrix_exp has no
    half-precision kernels). Shape: (B, 3) → (B, 3, 3)"""
    omega_B3 = omega_B3.float()
    zero = torch.zeros_like(omega_B3[:, 0])
    wx, wy, wz = omega_B3.unbind(-1)
    skew = torch.stack([zero, -wz, wy, wz, zero, -wx, -wy, wx, zero], -1).view(-1, 3, 3)
    return torch.linalg.matrix_exp(skew)

