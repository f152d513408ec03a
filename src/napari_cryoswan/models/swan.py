"""Cryo-SWAN (Algorithm 1): K encoders, coarse-to-fine conditional decoding, and the
multi-scale residual quantizer of Algorithm 2 at every level.

For a 64³ input and K = 2:

    x ─PE (Eq. 1)─▶ encoder_1 ─▶ Enc[1] 16³ ─▶ encoder_2 ─▶ Enc[2] 8³
    level 2: quant_conv_2 ▶ RQ2 (scales 1, 2, 4, 8)          ▶ post_quant_conv_2 ▶ decoder_2 ▶ r_2 16³
    level 1: combi_conv_1(concat(r_2, Enc[1])) ▶ quant_conv_1 ▶ RQ1 (scales 1, 4, …, 16)
             ▶ post_quant_conv_1 ▶ decoder_1 ▶ r_1 = x̂ 64³

As Algorithm 1 is written, the reconstruction depends on the level-1 codes alone: the coarser
levels condition what level 1 quantizes (and train through its straight-through estimator),
so `decode_codes` needs only ``codes["rq1"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Autoencoder, Codes, Encoding, ModelOutput
from .blocks import Decoder3d, Encoder3d, VoxelPositionalEncoding, fusion_block, mse
from .quantize import ResidualQuantizer

RQ1_SCALES = (1, 4, 6, 8, 10, 12, 14, 16)
RQ2_SCALES = (1, 2, 4, 8)


@dataclass
class SwanConfig:
    """Cryo-SWAN hyperparameters.

    - scales: perception scales per level, finest level first; K = len(scales).
    - widths: channels at 32³ (level 1's first stage), then one width per level (16³, 8³, …).
    - blocks: residual blocks per encoder/decoder stage.
    - dead_ema, dead_below, kmeans_after: how codebooks stay alive (quantize.Codebook);
      phi_mix, phi_shared: VAR's constrained φ (quantize.ResidualQuantizer). Their defaults are
      the behaviour of configs saved before they existed, so old checkpoints rebuild as trained;
      the presets switch them on.
    """

    volume_size: int = 64
    pe_freqs: int = 10
    scales: tuple[tuple[int, ...], ...] = (RQ1_SCALES, RQ2_SCALES)
    widths: tuple[int, ...] = (32, 128, 256)
    blocks: int = 2
    code_dim: int = 32
    codebook_size: int = 4096
    beta: float = 0.25
    dead_after: int = 50
    dead_ema: float | None = None
    dead_below: float = 0.01
    kmeans_after: int | None = None
    phi_mix: float | None = None
    phi_shared: int = 0

    def __post_init__(self):
        self.scales = tuple(tuple(s) for s in self.scales)
        self.widths = tuple(self.widths)
        if len(self.widths) != len(self.scales) + 1:
            raise ValueError("widths needs one entry for the 32³ stage plus one per level")
        for k, scales in enumerate(self.scales, start=1):
            if scales[-1] != self.latent_size(k):
                raise ValueError(f"level {k}: last scale {scales[-1]} != latent size {self.latent_size(k)}")

    @property
    def levels(self) -> int:
        return len(self.scales)

    def latent_size(self, level: int) -> int:
        """Level 1 is 4× smaller than the volume; each further level halves it again."""
        return self.volume_size // 2 ** (level + 1)


class CryoSwan(Autoencoder):
    """Cryo-SWAN with K levels (Algorithm 1); K = 1 is the paper's RQ1-only ablation (Fig. 4).

    Levels are numbered 1 (finest, 16³) … K (coarsest); module lists are indexed level − 1.

    Shape:
        - x: (B, 1, 64, 64, 64)
        - recon: (B, 1, 64, 64, 64)
        - codes["rq<k>"][i]: (B, s_i, s_i, s_i) for the perception scales s_i of level k
        - levels["rq<k>"]["latent" | "quantized"]: (B, code_dim, S_k, S_k, S_k), S_k = 64 / 2^(k+1)
    """

    name = "swan"

    def __init__(self, config: SwanConfig):
        super().__init__(config)
        w, K = config.widths, config.levels
        self.positional_encoding = VoxelPositionalEncoding(config.pe_freqs)
        self.encoders = nn.ModuleList(
            [Encoder3d(self.positional_encoding.out_channels, w[:2], config.blocks)]
            + [Encoder3d(w[k], (w[k + 1],), config.blocks) for k in range(1, K)])
        # combi_conv_k fuses r_{k+1} with Enc[k] for every level but the coarsest (line 14).
        self.combi_convs = nn.ModuleList(fusion_block(2 * w[k + 1], w[k + 1]) for k in range(K - 1))
        self.quant_convs = nn.ModuleList(nn.Conv3d(w[k + 1], config.code_dim, 1) for k in range(K))
        self.quantizers = nn.ModuleList(
            ResidualQuantizer(config.codebook_size, config.code_dim, config.scales[k], config.beta,
                              dead_after=config.dead_after, phi_mix=config.phi_mix,
                              phi_shared=config.phi_shared, dead_ema=config.dead_ema,
                              dead_below=config.dead_below, kmeans_after=config.kmeans_after)
            for k in range(K))
        self.post_quant_convs = nn.ModuleList(
            nn.Conv3d(config.code_dim, w[k + 1], 3, padding=1) for k in range(K))
        self.decoders = nn.ModuleList(
            [Decoder3d(w[1::-1], 1, config.blocks)]
            + [Decoder3d((w[k + 1],), w[k], config.blocks) for k in range(1, K)])

    @staticmethod
    def level_name(level: int) -> str:
        return f"rq{level}"

    def forward(self, x: torch.Tensor) -> ModelOutput:
        levels, codes, commits = self._quantize_levels(self._encode_levels(x))
        recon = self.decoders[0](self.post_quant_convs[0](levels["rq1"]["quantized"]))
        levels["rq1"]["decoded"] = recon
        losses = {"recon": mse(recon, x), "commit": sum(commits.values())}
        losses.update({f"commit/{name}": value for name, value in commits.items()})
        losses["total"] = losses["recon"] + losses["commit"]
        return ModelOutput(recon, losses, codes, levels)

    def encode(self, x: torch.Tensor) -> Encoding:
        levels, codes, _ = self._quantize_levels(self._encode_levels(x))
        return Encoding(codes, {name: level["latent"] for name, level in levels.items()},
                        {name: level["quantized"] for name, level in levels.items()})

    def decode_codes(self, codes: Codes) -> torch.Tensor:
        f_quant = self.quantizers[0].decode(codes[self.level_name(1)])
        return self.decoders[0](self.post_quant_convs[0](f_quant))

    @property
    def variants(self) -> tuple[str, ...]:
        return ("+".join(f"RQ{k}" for k in range(1, self.config.levels + 1)),)

    def reconstruction_variants(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.variants[0]: self.reconstruct(x)}

    def codebooks(self) -> dict[str, nn.Module]:
        return {self.level_name(k + 1): q.codebook for k, q in enumerate(self.quantizers)}

    def _encode_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Phase 1 (lines 6–9): Enc[k] = encoder_k(Enc[k−1]), Enc[0] = PE(x)."""
        features = [self.positional_encoding(x)]
        for encoder in self.encoders:
            features.append(encoder(features[-1]))
        return features[1:]

    def _quantize_levels(self, encoded: list[torch.Tensor]):
        """Phase 2 (lines 11–18) from level K down to level 2, then level 1's quantizer.

        Returns per-level tensors, codes and commitment losses; decoder_1 is left to the caller
        so that `encode` does not pay for it.
        """
        levels, codes, commits = {}, {}, {}
        r_BCdhw = None  # r_{k+1}: the decoded output of the level above
        for k in reversed(range(self.config.levels)):
            name = self.level_name(k + 1)
            zc_BCdhw = encoded[k] if r_BCdhw is None else self.combi_convs[k](torch.cat([r_BCdhw, encoded[k]], 1))
            f_BCdhw = self.quant_convs[k](zc_BCdhw)
            quantized = self.quantizers[k](f_BCdhw)
            levels[name] = {"latent": f_BCdhw, "quantized": quantized.f_hat_BCdhw,
                            "residual_norms": torch.stack(quantized.residual_norms)}
            codes[name], commits[name] = quantized.codes, quantized.loss
            if k > 0:
                r_BCdhw = self.decoders[k](self.post_quant_convs[k](quantized.f_hat_BCdhw))
                levels[name]["decoded"] = r_BCdhw
        order = [self.level_name(k) for k in range(1, self.config.levels + 1)]
        return ({n: levels[n] for n in order}, {n: codes[n] for n in order}, {n: commits[n] for n in order})
