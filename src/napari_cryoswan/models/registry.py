"""Build any model by name from a config: Cryo-SWAN, its RQ1-only ablation and the baselines.

Every name has a ``full`` preset (the configuration to train on a GPU; a 64³ Cryo-SWAN
reconstruction takes under 1 s on a 2-core CPU) and a ``small`` one (tiny widths and codebooks,
for tests and CPU demos). Cryo-SWAN and its ablation also have ``cpu``, what a 2-core CPU trains
in about an hour. Keyword overrides replace single fields of a preset.

    model = build_model("swan", preset="small", codebook_size=256)
    clone = build_from_config(model.config_dict())
"""

from __future__ import annotations

import dataclasses

import torch

from .base import Autoencoder
from .baselines import (VQVAE, DrgnConfig, DrgnVAE, HQConfig, HQVAE, MultiScaleVQVAE, RQVAE,
                        SingleLevelConfig, TargetConfig, TargetVAE)
from .swan import RQ1_SCALES, CryoSwan, SwanConfig

# The paper's training defaults (Methods, "Model training hyperparameters").
PAPER_LR = 1e-3
PAPER_WEIGHT_DECAY = 1e-5
PAPER_CODEBOOK_SIZE = 4096

# Twelve VAR scales whose code count (10,864 per volume) matches Cryo-SWAN's RQ1 + RQ2 (10,946).
VAR_SCALES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16)
RQ_DEPTH = 3

_SMALL_VQ = {"widths": (8, 16), "blocks": 1, "code_dim": 8, "codebook_size": 128}
# What a 2-core CPU trains in about an hour (the bundled checkpoints): a quarter of the full
# widths, one block per stage, and 1024 codes per level for a corpus of under a thousand maps.
_CPU_SWAN = {"widths": (16, 64, 128), "blocks": 1, "code_dim": 16, "codebook_size": 1024}

# name → (model class, config class, preset name → config fields)
_REGISTRY: dict[str, tuple[type[Autoencoder], type, dict[str, dict]]] = {
    "swan": (CryoSwan, SwanConfig, {
        "full": {},
        "small": {"widths": (8, 16, 32), "blocks": 1, "code_dim": 8, "codebook_size": 128},
        "cpu": _CPU_SWAN,
    }),
    "swan-rq1": (CryoSwan, SwanConfig, {
        "full": {"scales": (RQ1_SCALES,), "widths": (32, 128)},
        "small": {"scales": (RQ1_SCALES,), **_SMALL_VQ},
        "cpu": {**_CPU_SWAN, "scales": (RQ1_SCALES,), "widths": _CPU_SWAN["widths"][:2]},
    }),
    "vq": (VQVAE, SingleLevelConfig, {"full": {}, "small": _SMALL_VQ}),
    "rq": (RQVAE, SingleLevelConfig, {
        "full": {"scales": (16,) * RQ_DEPTH},
        "small": {"scales": (16,) * RQ_DEPTH, **_SMALL_VQ},
    }),
    "var": (MultiScaleVQVAE, SingleLevelConfig, {
        "full": {"scales": VAR_SCALES, "refine": True},
        "small": {"scales": VAR_SCALES, "refine": True, **_SMALL_VQ},
    }),
    "hq": (HQVAE, HQConfig, {
        "full": {},
        "small": {"widths": (8, 16, 32), "blocks": 1, "code_dim": 8, "codebook_size": 128},
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
PRESETS = ("small", "cpu", "full")  # "cpu": Cryo-SWAN and its RQ1 ablation only


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


def default_optimizer(model: torch.nn.Module, lr: float = PAPER_LR,
                      weight_decay: float = PAPER_WEIGHT_DECAY) -> torch.optim.Adam:
    """Adam with the paper's learning rate and weight decay."""
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def _lookup(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name]
