"""Build any model by name from a config: Cryo-SWAN, its RQ1-only ablation and the baselines.

Every name has a ``full`` preset (the configuration to train on a GPU; a 64³ Cryo-SWAN
reconstruction takes under 1 s on a 2-core CPU) and a ``small`` one (tiny widths and codebooks,
for tests and CPU demos). Cryo-SWAN and the quantized baselines also have ``cpu``: the bundled
checkpoints' widths and 4,096 codes, so a baseline can be compared at the bundled size. Keyword
overrides replace single fields of a preset.

    model = build_model("swan", preset="small", codebook_size=256)
    clone = build_from_config(model.config_dict())

Training loops build Adam with ``default_optimizer`` and call ``step_codebooks(model, optimizer)``
after every ``optimizer.step()``: that is when live codebooks count the step, renew dead codes
and forget the optimizer state of the rows they renewed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .base import Autoencoder
from .baselines import (VQVAE, DrgnConfig, DrgnVAE, HQConfig, HQVAE, MultiScaleVQVAE, RQVAE,
                        SingleLevelConfig, TargetConfig, TargetVAE)
from .quantize import Codebook, ResidualQuantizer, StochasticQuantizer
from .swan import RQ1_SCALES, CryoSwan, SwanConfig

# The paper's training defaults (Methods, "Model training hyperparameters").
PAPER_LR = 1e-3
PAPER_WEIGHT_DECAY = 1e-5
PAPER_CODEBOOK_SIZE = 4096

# Twelve VAR scales whose code count (10,864 per volume) matches Cryo-SWAN's RQ1 + RQ2 (10,946).
VAR_SCALES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16)
RQ_DEPTH = 3

# Codebooks that live (docs/MODELS.md): usage EMA over optimizer steps, dead codes renewed from
# a FIFO of recent residuals, k-means of that FIFO after a 100-step warm-up. Every quantized model
# gets the same mechanisms, so that the comparison of latent spaces stays fair.
_LIVE = {"dead_ema": 0.99, "dead_below": 0.01, "kmeans_after": 100}
# VAR's φ: half identity, half conv, four convs shared across the scales by position.
_VAR_PHI = {"phi_mix": 0.5, "phi_shared": 4}
_SWAN = {**_LIVE, **_VAR_PHI}
# Cryo-SWAN's two levels as approximation plus detail (docs/MODELS.md, "Level 2 as the
# approximation"): Algorithm 1 read literally leaves RQ2 without information. Two-level presets only.
_APPROX = {"decoder_input": "residual", "approx_weight": 1.0}

_SMALL_VQ = {"widths": (8, 16), "blocks": 1, "code_dim": 8, "codebook_size": 128}
# The bundled models' preset: a quarter of the full widths, one block per stage, and the paper's
# 4096 codes per level (a training step at batch 4 costs about 1.2× the step with 1024 codes,
# docs/MODELS.md).
_CPU_SWAN = {"widths": (16, 64, 128), "blocks": 1, "code_dim": 16, "codebook_size": PAPER_CODEBOOK_SIZE}
# One level at that size (the RQ1-only ablation and the single-level baselines): two stages, 64³ → 16³.
_CPU_SINGLE = {**_CPU_SWAN, "widths": _CPU_SWAN["widths"][:2]}

# name → (model class, config class, preset name → config fields)
_REGISTRY: dict[str, tuple[type[Autoencoder], type, dict[str, dict]]] = {
    "swan": (CryoSwan, SwanConfig, {
        "full": {**_SWAN, **_APPROX},
        "small": {"widths": (8, 16, 32), "blocks": 1, "code_dim": 8, "codebook_size": 128, **_SWAN, **_APPROX},
        "cpu": {**_CPU_SWAN, **_SWAN, **_APPROX},
    }),
    "swan-rq1": (CryoSwan, SwanConfig, {
        "full": {"scales": (RQ1_SCALES,), "widths": (32, 128), **_SWAN},
        "small": {"scales": (RQ1_SCALES,), **_SMALL_VQ, **_SWAN},
        "cpu": {**_CPU_SINGLE, "scales": (RQ1_SCALES,), **_SWAN},
    }),
    "vq": (VQVAE, SingleLevelConfig, {"full": _LIVE, "small": {**_SMALL_VQ, **_LIVE},
                                      "cpu": {**_CPU_SINGLE, **_LIVE}}),
    "rq": (RQVAE, SingleLevelConfig, {
        "full": {"scales": (16,) * RQ_DEPTH, **_LIVE},
        "small": {"scales": (16,) * RQ_DEPTH, **_SMALL_VQ, **_LIVE},
        "cpu": {"scales": (16,) * RQ_DEPTH, **_CPU_SINGLE, **_LIVE},
    }),
    "var": (MultiScaleVQVAE, SingleLevelConfig, {
        "full": {"scales": VAR_SCALES, "refine": True, **_SWAN},
        "small": {"scales": VAR_SCALES, "refine": True, **_SMALL_VQ, **_SWAN},
        "cpu": {"scales": VAR_SCALES, "refine": True, **_CPU_SINGLE, **_SWAN},
    }),
    "hq": (HQVAE, HQConfig, {
        "full": _LIVE,
        "small": {"widths": (8, 16, 32), "blocks": 1, "code_dim": 8, "codebook_size": 128, **_LIVE},
        "cpu": {**_CPU_SWAN, **_LIVE},
    }),
    "drgn-vae": (DrgnVAE, DrgnConfig, {
        "full": {},
        "small": {"pool": 8, "encoder_hidden": (64,), "z_dim": 8, "decoder_hidden": 32,
                  "decoder_layers": 2, "xyz_freqs": 5},
    }),
    "target-vae": (TargetVAE, TargetConfig, {
        "full": {},
        "small": {"widths": (8, 16), "blocks": 1, "z_dim": 8, "decoder_hidden": 32,
                  "decoder_layers": 2, "xyz_freqs": 5},
    }),
}

MODEL_NAMES = tuple(_REGISTRY)
PRESETS = ("small", "cpu", "full")  # "cpu": Cryo-SWAN, its RQ1 ablation and the quantized baselines


def model_config(name: str, preset: str = "full", **overrides) -> dict:
    """The config fields of a named preset, with overrides applied (a plain dict)."""
    _, config_class, presets = _lookup(name)
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {name!r}; choose from {sorted(presets)}")
    config = config_class(**{**presets[preset], **overrides})
    return dataclasses.asdict(config)


def build_model(name: str, preset: str = "full", **overrides) -> Autoencoder:
    """A freshly initialised model (seed torch beforehand for reproducible weights)."""
    model_class, config_class, _ = _lookup(name)
    model = model_class(config_class(**model_config(name, preset, **overrides)))
    model.name = name
    return model


def build_from_config(config: dict) -> Autoencoder:
    """Rebuild a model from ``model.config_dict()`` (what a checkpoint stores)."""
    fields = dict(config)
    name = fields.pop("name")
    model_class, config_class, _ = _lookup(name)
    model = model_class(config_class(**fields))
    model.name = name
    return model


def default_optimizer(model: nn.Module, lr: float = PAPER_LR, weight_decay: float = PAPER_WEIGHT_DECAY,
                      decay_all: bool = False) -> torch.optim.Adam:
    """Adam with the paper's learning rate and weight decay, the decay on conv and linear weights
    only (``parameter_groups``). Adam's decay is coupled: an unused codebook row, whose only
    gradient is the decay, moves lr per step toward zero and vanishes before it can be chosen.
    ``decay_all`` restores the decay on every parameter (runs made before this change). Frozen
    parameters (``requires_grad`` False) are left out."""
    params = ([p for p in model.parameters() if p.requires_grad] if decay_all
              else parameter_groups(model, weight_decay))
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


_DECAYED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                    nn.ConvTranspose3d, nn.Linear)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two Adam groups: ``weight_decay`` on the weights of convs and linear layers, none on the
    rest: codebooks, the φ convs inside quantizers, norms, biases and other scalars."""
    quantizers = (m for m in model.modules() if isinstance(m, (ResidualQuantizer, StochasticQuantizer)))
    quantizer_params = {id(p) for q in quantizers for p in q.parameters()}
    decayed, free = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            decays = isinstance(module, _DECAYED_MODULES) and name == "weight" and id(param) not in quantizer_params
            (decayed if decays else free).append(param)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": free, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def step_codebooks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Call after every ``optimizer.step()``, on the model (not its DDP wrapper) or a lone
    quantizer: each live codebook counts the step (counts summed over processes), runs its
    k-means or renews its dead codes, and the optimizer forgets the state of every renewed row,
    legacy restarts included. Returns the number of rows renewed."""
    renewed = 0
    for book in (m for m in model.modules() if isinstance(m, Codebook)):
        book.step_()
        rows = book.pop_renewed_rows()
        if optimizer is not None and rows.numel():
            forget_rows_(optimizer, book.weight, rows)
        renewed += rows.numel()
    return renewed


def warm_start_codebooks(model: nn.Module) -> None:
    """Before training on from a checkpoint's weights (``training.train --init``): every live
    codebook takes its warm-up as done (``Codebook.warm_start_``)."""
    for book in (m for m in model.modules() if isinstance(m, Codebook)):
        book.warm_start_()


@torch.no_grad()
def forget_rows_(optimizer: torch.optim.Optimizer, param: torch.Tensor, rows: torch.Tensor) -> None:
    """Zero Adam's moments (exp_avg, exp_avg_sq, and max_exp_avg_sq with amsgrad) of some rows of
    ``param``, as if those rows had just been created."""
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            state[key][rows] = 0


def _lookup(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name]
