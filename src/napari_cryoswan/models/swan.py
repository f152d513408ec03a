"""Cryo-SWAN (Algorithm 1): K encoders, coarse-to-fine conditional decoding, and the
multi-scale residual quantizer of Algorithm 2 at every level.

For a 64³ input and K = 2:

    x ─PE (Eq. 1)─▶ encoder_1 ─▶ Enc[1] 16³ ─▶ encoder_2 ─▶ Enc[2] 8³
    level 2: quant_conv_2 ▶ RQ2 (scales 1, 2, 4, 8)          ▶ post_quant_conv_2 ▶ decoder_2 ▶ r_2 16³
    level 1: combi_conv_1(concat(r_2, Enc[1])) ▶ quant_conv_1 ▶ f_1 ▶ RQ1 (scales 1, 4, …, 16)
             ▶ post_quant_conv_1 ▶ decoder_1 ▶ r_1 = x̂ 64³

``decoder_input`` says how the coarser levels reach the reconstruction:

- ``"rq1"``, Algorithm 1 read literally: decoder_1 reads ẑ_1 alone, so the coarser levels only
  condition what level 1 quantizes and ``decode_codes`` needs only ``codes["rq1"]``;
- ``"residual"``: level 2's output, projected into level 1's code space (p = prior_conv_1(r_2)),
  starts level 1's residual stack: RQ1 quantizes f_1 − p and decoder_1 reads p + ẑ_1, so each
  level adds what the levels above left (Eq. 4's sum over levels, a wavelet's approximation
  plus detail);
- ``"both"``: decoder_1 reads fusion(concat(post_quant_conv_1(ẑ_1), r_2)), as VQ-VAE-2's bottom
  decoder reads the top level.

With ``level_dropout`` q > 0, training replaces r_2 by zeros for a share q of the maps, so the
same model also decodes "RQ1" (level 1 alone) beside "RQ1+RQ2". With ``fine_dropout`` q > 0
(the "residual" and "both" designs), training leaves level 1's codes out of the decoder's input
for a share q of the maps, so that level 2 must reconstruct those maps alone, and the model also
decodes "RQ2" (docs/MODELS.md). With ``approx_weight`` λ > 0 (the "residual" design) level 2
is asked for the map's approximation instead: a 1³ conv of p must give the input averaged onto
level 1's 16³ grid, a loss of weight λ, so that p, where RQ1's residual stack starts, holds the
coarse map and RQ1 the detail; the model then also decodes "RQ2" as that approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .base import Autoencoder, Codes, Encoding, ModelOutput, evaluating
from .blocks import Decoder3d, Encoder3d, VoxelPositionalEncoding, fusion_block, mse
from .quantize import ResidualQuantizer, residual_statistics

RQ1_SCALES = (1, 4, 6, 8, 10, 12, 14, 16)
RQ2_SCALES = (1, 2, 4, 8)
DECODER_INPUTS = ("rq1", "residual", "both")


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
    - decoder_input, level_dropout, fine_dropout: how the coarser levels reach the
      reconstruction, and the training shares of maps decoded without them, or without level 1's
      codes (module docstring). The defaults are Algorithm 1
      read literally, as configs saved before these fields were trained.
    - approx_weight: the weight of the loss that asks level 2's prior for the input's
      approximation on level 1's grid ("residual" only; module docstring); 0 leaves it out.
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
    decoder_input: str = "rq1"
    level_dropout: float = 0.0
    fine_dropout: float = 0.0
    approx_weight: float = 0.0

    def __post_init__(self):
        if self.decoder_input not in DECODER_INPUTS:
            raise ValueError(f"decoder_input must be one of {DECODER_INPUTS}, not {self.decoder_input!r}")
        if not (0.0 <= self.level_dropout < 1.0 and 0.0 <= self.fine_dropout < 1.0):
            raise ValueError("level_dropout and fine_dropout are probabilities below 1")
        if self.fine_dropout and self.decoder_input == "rq1":
            raise ValueError("fine_dropout needs a decoder that reads level 2 (decoder_input 'residual' or 'both')")
        if self.approx_weight < 0 or (self.approx_weight and self.decoder_input != "residual"):
            raise ValueError("approx_weight is a non-negative weight for decoder_input 'residual' (the swan "
                             "presets set it to 1: with another decoder_input, set approx_weight=0 too)")
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
    encoder_modules = ("encoders", "combi_convs", "quant_convs")

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
        # prior_conv_k projects r_{k+1} into level k's code space ("residual");
        # decoder_fusion_k fuses it with level k's codes before decoder_k ("both").
        if config.decoder_input == "residual":
            self.prior_convs = nn.ModuleList(nn.Conv3d(w[k + 1], config.code_dim, 1) for k in range(K - 1))
        if config.approx_weight:
            # what level 2's prior says of the input, on level 1's grid (one density channel)
            self.approx_head = nn.Conv3d(config.code_dim, 1, 1)
        if config.decoder_input == "both":
            self.decoder_fusions = nn.ModuleList(fusion_block(2 * w[k + 1], w[k + 1]) for k in range(K - 1))

    @staticmethod
    def level_name(level: int) -> str:
        return f"rq{level}"

    def forward(self, x: torch.Tensor, without_coarse: bool = False, without_fine: bool = False) -> ModelOutput:
        """``without_coarse``: decode level 1 alone (the in-model "RQ1"), r_2 replaced by zeros;
        ``without_fine``: decode level 2 alone (the in-model "RQ2"), level 1's codes left out."""
        levels, codes, commits = self._quantize_levels(self._encode_levels(x), without_coarse, decode=True,
                                                       without_fine=without_fine)
        recon = levels["rq1"]["decoded"]
        losses = {"recon": mse(recon, x), "commit": sum(commits.values())}
        losses.update({f"commit/{name}": value for name, value in commits.items()})
        losses["total"] = losses["recon"] + losses["commit"]
        if "approximation" in levels["rq1"]:
            losses["approx"] = self._approximation_loss(levels, x)
            losses["total"] = losses["total"] + self.config.approx_weight * losses["approx"]
        return ModelOutput(recon, losses, codes, levels)

    def _approximation_loss(self, levels, target: torch.Tensor) -> torch.Tensor:
        """MSE of level 2's approximation to ``target`` averaged onto level 1's grid."""
        return mse(levels["rq1"]["approximation"], F.interpolate(target, size=self.config.latent_size(1), mode="area"))

    def losses_against(self, output: ModelOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """As the base class, and the approximation too is asked of ``target``, not the input."""
        losses = super().losses_against(output, target)
        if "approx" in losses:
            approx = self._approximation_loss(output.levels, target)
            losses["total"] = losses["total"] + self.config.approx_weight * (approx - losses["approx"])
            losses["approx"] = approx
        return losses

    @staticmethod
    def _upsampled_approximation(levels, x: torch.Tensor) -> torch.Tensor:
        """Level 2's approximation (``approx_weight``) upsampled to x's grid: the in-model "RQ2"."""
        return F.interpolate(levels["rq1"]["approximation"], size=x.shape[-3:], mode="trilinear", align_corners=False)

    def encode(self, x: torch.Tensor) -> Encoding:
        levels, codes, _ = self._quantize_levels(self._encode_levels(x))
        return Encoding(codes, {name: level["latent"] for name, level in levels.items()},
                        {name: level["quantized"] for name, level in levels.items()})

    def decode_codes(self, codes: Codes) -> torch.Tensor:
        """A level whose list of codes is shorter than its scales contributes its first scales
        only, and an empty list nothing (``reconstructions_by_scale``)."""
        r_BCdhw = None
        any_code = next(c for level in codes.values() for c in level)
        for k in reversed(range(self.config.levels)):
            if k > 0 and self.config.decoder_input == "rq1":
                continue  # the literal Algorithm 1: level 1's codes alone make the reconstruction
            level_codes = codes[self.level_name(k + 1)]
            if level_codes:
                f_hat_BCdhw = self.quantizers[k].decode(level_codes)
            else:
                size = self.config.latent_size(k + 1)
                f_hat_BCdhw = torch.zeros(any_code.shape[0], self.config.code_dim, size, size, size,
                                          device=any_code.device)
            prior = self._prior(k, r_BCdhw)
            if prior is not None:
                f_hat_BCdhw = prior + f_hat_BCdhw
            r_BCdhw = self.decoders[k](self._decoder_input(k, f_hat_BCdhw, r_BCdhw))
        return r_BCdhw

    @property
    def variants(self) -> tuple[str, ...]:
        full = "+".join(f"RQ{k}" for k in range(1, self.config.levels + 1))
        return (full, *self._partial_variants())

    def _partial_variants(self) -> dict[str, dict]:
        """The single-level reconstructions this model was trained to decode, and how."""
        if self.config.levels != 2:
            return {}
        partial = {}
        if self.config.level_dropout > 0:
            partial["RQ1"] = {"without_coarse": True}
        if self.config.fine_dropout > 0:
            partial["RQ2"] = {"without_fine": True}
        elif self.config.approx_weight > 0:
            partial["RQ2"] = {"approximation": True}
        return partial

    def reconstruction_variants(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with evaluating(self), torch.inference_mode():
            full = self(x)  # one encoding gives the full map and level 2's approximation
            out = {self.variants[0]: full.recon}
            for name, how in self._partial_variants().items():
                out[name] = (self._upsampled_approximation(full.levels, x) if how.get("approximation")
                             else self(x, **how).recon)
        return out

    def reconstructions_by_scale(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reconstruction after each perception scale, coarse to fine (the paper's Fig. 4b–c):
        "RQ2 1³" decodes level 2's first scale alone, …, "RQ1 16³" every code (the full
        reconstruction). Levels that do not reach the decoder (the literal Algorithm 1's RQ2)
        have no steps of their own.

        Shape: x (B, 1, 64, 64, 64) → each (B, 1, 64, 64, 64)
        """
        with evaluating(self), torch.inference_mode():
            codes = self.encode(x).codes
            steps = {}
            for k, n, step in self._decoded_scales():
                partial = {other: (level if other_k > k else level[:n + 1] if other_k == k else [])
                           for other_k, (other, level) in enumerate(codes.items())}
                steps[step] = self.decode_codes(partial)
            return steps

    def code_maps_by_scale(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each perception scale's code indices over the input grid (the code maps of the paper's
        Fig. 4b–c), under the step names of ``reconstructions_by_scale``: the code of scale s
        covers the block of the box that scale pooled, (D/s)³ voxels.

        Shape: x (B, 1, D, H, W) → each (B, 1, D, H, W), int64
        """
        with evaluating(self), torch.inference_mode():
            codes = self.encode(x).codes
            return {step: F.interpolate(codes[self.level_name(k + 1)][n][:, None].float(), size=x.shape[-3:],
                                        mode="nearest").long()
                    for k, n, step in self._decoded_scales()}

    def _decoded_scales(self):
        """(level index, position of the scale in its level, step name) of each scale whose codes
        reach the decoder, coarse to fine: the literal Algorithm 1's RQ2 has none."""
        for k in reversed(range(self.config.levels)):
            if k > 0 and self.config.decoder_input == "rq1":
                continue
            for n, scale in enumerate(self.config.scales[k]):
                yield k, n, f"RQ{k + 1} {scale}³"

    def codebooks(self) -> dict[str, nn.Module]:
        return {self.level_name(k + 1): q.codebook for k, q in enumerate(self.quantizers)}

    def _encode_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Phase 1 (lines 6–9): Enc[k] = encoder_k(Enc[k−1]), Enc[0] = PE(x)."""
        features = [self.positional_encoding(x)]
        for encoder in self.encoders:
            features.append(encoder(features[-1]))
        return features[1:]

    def _quantize_levels(self, encoded: list[torch.Tensor], without_coarse: bool = False,
                         decode: bool = False, without_fine: bool = False):
        """Phase 2 (lines 11–18) from level K down to level 1.

        Returns per-level tensors, codes and commitment losses. decoder_1 runs only with
        ``decode`` (``encode`` does not pay for it); its output is ``levels["rq1"]["decoded"]``.
        """
        levels, codes, commits = {}, {}, {}
        r_BCdhw = None  # r_{k+1}: the decoded output of the level above
        for k in reversed(range(self.config.levels)):
            name = self.level_name(k + 1)
            approximation = None
            if k == 0 and r_BCdhw is not None:
                if self.config.approx_weight:  # from level 2's own output, before any dropout
                    approximation = self.approx_head(self._prior(k, r_BCdhw))
                r_BCdhw = self._drop_coarse(r_BCdhw, without_coarse)
            zc_BCdhw = encoded[k] if r_BCdhw is None else self.combi_convs[k](torch.cat([r_BCdhw, encoded[k]], 1))
            f_BCdhw = self.quant_convs[k](zc_BCdhw)
            prior = self._prior(k, r_BCdhw)
            # The prior is detached where it is subtracted, so that the decoder's gradient reaches
            # it through the sum below (through the straight-through estimator it would cancel).
            quantized = self.quantizers[k](f_BCdhw if prior is None else f_BCdhw - prior.detach())
            codes_BCdhw = self._drop_fine(quantized.f_hat_BCdhw, without_fine) if k == 0 else quantized.f_hat_BCdhw
            f_hat_BCdhw = codes_BCdhw if prior is None else prior + codes_BCdhw
            levels[name] = {"latent": f_BCdhw, "quantized": f_hat_BCdhw, **residual_statistics(quantized)}
            if approximation is not None:
                levels[name]["approximation"] = approximation
            codes[name], commits[name] = quantized.codes, quantized.loss
            if k > 0 or decode:
                r_BCdhw = self.decoders[k](self._decoder_input(k, f_hat_BCdhw, r_BCdhw))
                levels[name]["decoded"] = r_BCdhw
        order = [self.level_name(k) for k in range(1, self.config.levels + 1)]
        return ({n: levels[n] for n in order}, {n: codes[n] for n in order}, {n: commits[n] for n in order})

    def _drop_coarse(self, r_BCdhw: torch.Tensor, without_coarse: bool) -> torch.Tensor:
        """r_2 as level 1 sees it: zeros when decoding level 1 alone, and for a random share
        ``level_dropout`` of the maps while training."""
        if without_coarse:
            return torch.zeros_like(r_BCdhw)
        return _drop_per_map(r_BCdhw, self.config.level_dropout if self.training else 0.0)

    def _drop_fine(self, zq_BCdhw: torch.Tensor, without_fine: bool) -> torch.Tensor:
        """Level 1's codes as the decoder reads them: none when decoding level 2 alone, and none
        for a random share ``fine_dropout`` of the maps while training."""
        if without_fine:
            return torch.zeros_like(zq_BCdhw)
        return _drop_per_map(zq_BCdhw, self.config.fine_dropout if self.training else 0.0)

    def _prior(self, k: int, r_BCdhw: torch.Tensor | None) -> torch.Tensor | None:
        """p_k, where level k's residual stack starts ("residual"); None otherwise."""
        if self.config.decoder_input != "residual" or r_BCdhw is None:
            return None
        return self.prior_convs[k](r_BCdhw)

    def _decoder_input(self, k: int, f_hat_BCdhw: torch.Tensor, r_BCdhw: torch.Tensor | None) -> torch.Tensor:
        h_BCdhw = self.post_quant_convs[k](f_hat_BCdhw)
        if self.config.decoder_input == "both" and r_BCdhw is not None:
            h_BCdhw = self.decoder_fusions[k](torch.cat([h_BCdhw, r_BCdhw], 1))
        return h_BCdhw


def _drop_per_map(t_BCdhw: torch.Tensor, probability: float) -> torch.Tensor:
    """Zeros for each map of the batch with the given probability, drawn per map."""
    if probability <= 0:
        return t_BCdhw
    keep_B = torch.rand(t_BCdhw.shape[0], device=t_BCdhw.device) >= probability
    return t_BCdhw * keep_B.view(-1, 1, 1, 1, 1).to(t_BCdhw.dtype)
