"""Checkpoints: a model's weights with its config and provenance, saved atomically.

A checkpoint is one file written by ``torch.save`` and read back with ``weights_only=True``, so
loading a file cannot run code. It holds plain data only:

    format, format_version   "napari-cryoswan", 2
    kind                     what the model does: "autoencoder" or "diffusion"
    input                    the input contract: box, voxel size (Å) and normalisation of the
                             maps it was trained on; preprocessing for it follows this, never a
                             default, so a model trained at another voxel size is run right
    model                    registry name ("swan", "swan-rq1", "vq", …)
    config                   the model config as a dict (models.registry.build_from_config)
    state_dict               the weights
    provenance               corpus id, step, metrics, code version, date, torch version, …
    training                 optional: optimizer and RNG states, for resuming

Format 1 files (no kind, no input contract) still load: they are autoencoders trained on the
paper's 64³ maps at 4 Å, z-scored, which is what every format 1 checkpoint was.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import asdict, dataclass, field
from importlib.resources import as_file, files
from pathlib import Path

from ._atomic import atomic_path
from .hashing import file_sha256
from .preprocess import PreprocessSettings

FORMAT = "napari-cryoswan"
FORMAT_VERSION = 2
KINDS = ("autoencoder", "diffusion")
NORMALISATIONS = ("z-score", "none")
# name → file in checkpoints/: Cryo-SWAN, its RQ1-only ablation, its encoder fine-tuned on noisy
# maps for denoising, and Cryo-SWAN trained on voxelised meshes (docs/CHECKPOINTS.md)
BUNDLED = {"swan": "swan.pt", "swan-rq1": "swan-rq1.pt", "swan-denoiser": "swan-denoiser.pt",
           "swan-shapes": "swan-shapes.pt"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. The message says what is wrong and what to do."""


@dataclass(frozen=True)
class InputContract:
    """The maps a model was trained on: a cubic ``box`` at ``voxel_size`` Å, normalised so."""

    box: int
    voxel_size: float
    normalisation: str = "z-score"

    @classmethod
    def of(cls, settings: PreprocessSettings) -> InputContract:
        return cls(settings.box, settings.voxel_size,
                   "z-score" if settings.normalise else "none")

    @classmethod
    def from_dict(cls, values: dict) -> InputContract:
        contract = cls(int(values["box"]), float(values["voxel_size"]),
                       str(values.get("normalisation", "z-score")))
        if contract.box < 8 or not contract.voxel_size > 0 or contract.normalisation not in NORMALISATIONS:
            raise ValueError(f"not a usable input contract: {values}")
        return contract

    def to_dict(self) -> dict:
        return asdict(self)

    def settings(self, contour_level: float | None = None) -> PreprocessSettings:
        """The preprocessing that gives this model the maps it expects."""
        return PreprocessSettings(voxel_size=self.voxel_size, box=self.box,
                                  contour_level=contour_level,
                                  normalise=self.normalisation == "z-score")


@dataclass
class LoadedCheckpoint:
    model: object  # an Autoencoder (or diffusion model), in eval mode
    provenance: dict
    path: Path
    contract: InputContract
    checkpoint_id: str  # a short content hash, computed once when the file is read
    kind: str = "autoencoder"
    training: dict = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike,
    model,
    provenance: dict | None = None,
    training: dict | None = None,
    *,
    contract: InputContract | None = None,
    kind: str = "autoencoder",
    overwrite: bool = False,
    extra: dict | None = None,
    half: bool = False,
) -> Path:
    """Write ``model`` (weights, config, provenance) atomically: a temporary file, then a rename.

    ``contract``: the input the model was trained on (training passes its corpus's box and
    voxel size); None means the paper's preprocessing, ``PreprocessSettings()``.
    ``extra``: further top-level entries of plain types (a diffusion model's autoencoder).
    ``half``: store floating-point weights as float16, half the file (the bundled files that the
    size budget would not fit otherwise; docs/CHECKPOINTS.md measures what it costs). Loading
    casts them back to the model's float32.
    """
    import torch

    from . import __version__

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists. Choose another name, or pass overwrite=True.")
    if kind not in KINDS:
        raise ValueError(f"Unknown checkpoint kind {kind!r}; use one of {KINDS}.")
    contract = contract or InputContract.of(PreprocessSettings())
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "input": contract.to_dict(),
        "model": model.name,
        "config": model.config_dict(),
        "state_dict": {k: _stored(v.detach().cpu(), half) for k, v in model.state_dict().items()},
        "provenance": {
            "code_version": __version__,
            "torch_version": str(torch.__version__),
            "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **(provenance or {}),
        },
    }
    if training is not None:
        payload["training"] = training
    payload.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp_name:
        torch.save(payload, tmp_name)
    return path


def _stored(tensor, half: bool):
    import torch

    return tensor.half() if half and tensor.dtype == torch.float32 else tensor


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu",
                    kind: str | None = "autoencoder") -> LoadedCheckpoint:
    """Rebuild the model a checkpoint holds, in eval mode.

    ``kind``: the kind of model the caller can use (None: any).

    Raises:
        CheckpointError: no file chosen, missing, corrupt or truncated file, not one of ours,
            another kind of model, an unknown model, or weights that do not fit its config.
    """
    import torch

    from .models.registry import build_from_config

    path = checkpoint_file(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; all mean the same here
        # torch's own text advises weights_only=False, which would run code from the file:
        # the user gets our sentence, the log keeps torch's.
        raise CheckpointError(
            f"{path.name}: not a readable napari-cryoswan checkpoint. The file is corrupt, "
            "truncated, or holds something other than plain weights: train or download it again."
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
    found_kind = payload.get("kind", "autoencoder")
    if kind is not None and found_kind != kind:
        raise CheckpointError(
            f"{path.name} holds a {found_kind} model, not an {kind}. Choose an {kind} checkpoint.")
    try:
        contract = InputContract.from_dict(payload["input"]) if "input" in payload else \
            InputContract.of(PreprocessSettings())
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path.name}: its input contract is damaged ({err}).") from err
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
    return LoadedCheckpoint(model, payload.get("provenance", {}), path, contract,
                            checkpoint_id(path), found_kind, payload.get("training", {}))


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` as a checkpoint file that exists, or a CheckpointError that says what to choose.

    An emptied file field reads as '' or '.': that is no choice, not the working directory.
    """
    if str(path).strip() in ("", "."):
        raise CheckpointError("No checkpoint chosen: choose a checkpoint file (.pt).")
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: choose a checkpoint file (.pt) inside it.")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    return path


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
    """A checkpoint named on a command line: ``bundled:NAME`` (a name of ``BUNDLED``) for the
    weights shipped in the package, anything else a file path."""
    text = str(spec)
    if text.startswith("bundled:"):
        return bundled_checkpoint_path(text.removeprefix("bundled:"))
    return Path(text)


def checkpoint_id(path: str | os.PathLike) -> str:
    """A short content hash that names a checkpoint in layer metadata and reports."""
    return file_sha256(path)[:12]


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
