"""Checkpoints: a model's weights with its config and provenance, saved atomically.

A checkpoint is one file written by ``torch.save`` and read back with ``weights_only=True``, so
loading a file cannot run code. It holds plain data only:

    format, format_version   "napari-cryoswan", 1
    model                    registry name ("swan", "swan-rq1", "vq", …)
    config                   the model config as a dict (models.registry.build_from_config)
    state_dict               the weights
    provenance               corpus id, step, metrics, code version, date, torch version, …
    training                 optional: optimizer and RNG states, for resuming
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass, field
from importlib.resources import as_file, files
from pathlib import Path

from ._atomic import atomic_path

FORMAT = "napari-cryoswan"
FORMAT_VERSION = 1
BUNDLED = {"swan": "swan.pt", "swan-rq1": "swan-rq1.pt"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. The message says what is wrong and what to do."""


@dataclass
class LoadedCheckpoint:
    model: object  # an Autoencoder, in eval mode
    provenance: dict
    path: Path
    training: dict = field(default_factory=dict)

    @property
    def checkpoint_id(self) -> str:
        return checkpoint_id(self.path)


def save_checkpoint(
    path: str | os.PathLike,
    model,
    provenance: dict | None = None,
    training: dict | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (weights, config, provenance) atomically: a temporary file, then a rename."""
    import torch

    from . import __version__

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists. Choose another name, or pass overwrite=True.")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.name,
        "config": model.config_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "provenance": {
            "code_version": __version__,
            "torch_version": str(torch.__version__),
            "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **(provenance or {}),
        },
    }
    if training is not None:
        payload["training"] = training
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp_name:
        torch.save(payload, tmp_name)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> LoadedCheckpoint:
    """Rebuild the model a checkpoint holds, in eval mode.

    Raises:
        CheckpointError: missing, corrupt or truncated file, not one of ours, an unknown model,
            or weights that do not fit the model's config.
    """
    import torch

    from .models.registry import build_from_config

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; all mean the same here
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {_first_line(err)}). The file is "
            "corrupt, truncated, or not a PyTorch checkpoint: train or download it again."
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: this is not a napari-cryoswan checkpoint (it has no '{FORMAT}' format "
            "tag). Use a checkpoint written by python -m training.train."
        )
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format_version']} is newer than this "
            f"napari-cryoswan understands ({FORMAT_VERSION}). Update napari-cryoswan."
        )
    try:
        model = build_from_config({**payload["config"], "name": payload["model"]})
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot build model '{payload.get('model')}' from its config ({err})."
        ) from err
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: the weights do not fit a '{payload['model']}' model with this config. "
            f"The file is damaged or was edited. ({_first_line(err)})"
        ) from err
    model.eval()
    return LoadedCheckpoint(model, payload.get("provenance", {}), path, payload.get("training", {}))


def bundled_checkpoint_path(name: str = "swan") -> Path:
    """Path of a checkpoint shipped inside the package ("swan" or "swan-rq1")."""
    if name not in BUNDLED:
        raise CheckpointError(f"No bundled checkpoint named {name!r}; there are {sorted(BUNDLED)}.")
    resource = files(__package__) / "checkpoints" / BUNDLED[name]
    with as_file(resource) as path:
        if not Path(path).is_file():
            raise CheckpointError(
                f"The bundled {name} checkpoint is missing from this installation ({path}). "
                "Reinstall napari-cryoswan, or choose a checkpoint file."
            )
        return Path(path)


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A checkpoint named on a command line: ``bundled:swan`` / ``bundled:swan-rq1`` for the
    weights shipped in the package, anything else a file path."""
    text = str(spec)
    if text.startswith("bundled:"):
        return bundled_checkpoint_path(text.removeprefix("bundled:"))
    return Path(text)


def checkpoint_id(path: str | os.PathLike) -> str:
    """A short content hash that names a checkpoint in layer metadata and reports."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
