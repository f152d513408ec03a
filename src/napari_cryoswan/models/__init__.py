"""Cryo-SWAN and the baselines of the paper's Table 1 (imports torch; load on demand).

    from napari_cryoswan.models import build_model
    model = build_model("swan", preset="full")
    codes = model.encode(x).codes          # x: (B, 1, 64, 64, 64), z-scored, 4 Å voxels
    x_hat = model.decode_codes(codes)
"""

from .base import Autoencoder, Codes, Encoding, ModelOutput
from .registry import (MODEL_NAMES, PAPER_CODEBOOK_SIZE, PAPER_LR, PAPER_WEIGHT_DECAY, PRESETS,
                       build_from_config, build_model, default_optimizer, model_config)

__all__ = ["Autoencoder", "Codes", "Encoding", "ModelOutput", "MODEL_NAMES", "PAPER_CODEBOOK_SIZE",
           "PAPER_LR", "PAPER_WEIGHT_DECAY", "PRESETS", "build_from_config", "build_model",
           "default_optimizer", "model_config"]
