"""The one public API that Cryo-SWAN and every baseline follow.

A model maps a batch of preprocessed volumes x (B, 1, 64, 64, 64; 4 Å voxels, z-scored) to
codes and back. Codes are a dict from level name to a list of tensors, one per scale (or per
residual step): integer index maps for the quantized models, continuous latent vectors for the
VAEs. Everything else (training, the plugin, latent search) goes through this class only.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Codes = dict[str, list[torch.Tensor]]


@dataclass
class Encoding:
    """What `encode` returns.

    - codes: level → per-scale codes; `decode_codes(codes)` rebuilds the reconstruction.
    - latents: level → continuous encoder map before quantization (the posterior mean for VAEs).
    - quantized: level → quantized map (VQ models only), for latent search and diffusion.
    """

    codes: Codes
    latents: dict[str, torch.Tensor]
    quantized: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ModelOutput:
    """What `forward` returns.

    - recon: (B, 1, D, H, W) reconstruction.
    - losses: always "total" and "recon" (voxel MSE); model-specific terms beside them
      ("commit", "commit/<level>", "kl", …).
    - codes: as in :class:`Encoding`.
    - levels: level → named tensors of that level ("latent", "quantized", "decoded", …).
    """

    recon: torch.Tensor
    losses: dict[str, torch.Tensor]
    codes: Codes
    levels: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class Autoencoder(nn.Module, metaclass=abc.ABCMeta):
    """Base class: subclasses implement `forward`, `encode` and `decode_codes`.

    `config` is the dataclass the model was built from and `name` its registry name, so
    ``registry.build_from_config(model.config_dict())`` rebuilds the architecture.
    """

    name: str = ""
    # The modules between the volume and the quantizer: a noise-aware fine-tune trains only these,
    # so its codes keep their meaning for the frozen codebooks and decoder.
    encoder_modules: tuple[str, ...] = ("encoder", "quant_conv")

    def __init__(self, config):
        super().__init__()
        self.config = config

    def config_dict(self) -> dict:
        """{"name": registry name, **config fields}: all a checkpoint needs to rebuild the model."""
        return {"name": self.name, **dataclasses.asdict(self.config)}

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> ModelOutput:
        """Reconstruction, losses, codes and per-level tensors. Shape: x (B, 1, D, H, W)."""

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> Encoding:
        """Codes and continuous latents of x (deterministic in eval mode)."""

    @abc.abstractmethod
    def decode_codes(self, codes: Codes) -> torch.Tensor:
        """Reconstruction (B, 1, D, H, W) from codes as `encode` returns them."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (evaluation mode, no autograd). Shape: like x."""
        with evaluating(self), torch.inference_mode():
            return self(x).recon

    @property
    def variants(self) -> tuple[str, ...]:
        """The names of the reconstructions that `reconstruction_variants` returns."""
        return (self.name,)

    def reconstruction_variants(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstructions by variant: the name says which quantizer levels a variant uses
        (Cryo-SWAN: {"RQ1+RQ2": …}; its RQ1-only ablation: {"RQ1": …}).

        Shape: each like x."""
        return {self.name: self.reconstruct(x)}

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective: (total, every term detached)."""
        losses = self(x).losses
        return losses["total"], {key: value.detach() for key, value in losses.items()}

    def losses_against(self, output: ModelOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``output``'s loss terms with the reconstruction scored against ``target`` instead of
        the input (a noise-aware fine-tune's clean map). Every model's total is its reconstruction
        MSE plus the other terms (commitment, KL), so the swap keeps their weights; a model with
        another term that reads the input rescores it too."""
        recon = F.mse_loss(output.recon.float(), target)
        return {**output.losses, "recon": recon,
                "total": output.losses["total"] - output.losses["recon"] + recon}

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The parameters of ``encoder_modules`` (empty for a model without them)."""
        return [param for name in self.encoder_modules if isinstance(getattr(self, name, None), nn.Module)
                for param in getattr(self, name).parameters()]

    def codebooks(self) -> dict[str, nn.Module]:
        """Level name → codebook; empty for the continuous VAEs."""
        return {}

    def codebook_usage(self) -> dict[str, dict[str, float]]:
        """Per-level usage since `reset_usage()`: fraction of codes used, perplexity, dead codes.

        Call `reset_usage()`, run a validation pass, then read this."""
        return {level: book.usage() for level, book in self.codebooks().items()}

    def reset_usage(self) -> None:
        for book in self.codebooks().values():
            book.reset_usage()


class evaluating:
    """Put a module in eval mode for a block, then restore its previous mode."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)
