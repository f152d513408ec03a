"""Reconstruct a map of any size and voxel size with one or more checkpoints.

The map goes through the one preprocessing pipeline (64³ at 4 Å, z-scored), each model
reconstructs it, the normalisation is undone, and every reconstruction is resampled back onto
the input's own voxel grid so that it overlays the input in napari. The FSC of each
reconstruction against the preprocessed input (what the model saw) is computed in the model's
box, where both lie on the same cubic grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engine import Cancelled, StopCheck
from .io import DensityMap
from .metrics import FSCCurve, fsc, voxel_metrics
from .preprocess import Preprocessed, PreprocessRecord, PreprocessSettings, preprocess

Stage = Callable[[int, int, str], None]  # (done, total, what is happening)


@dataclass
class LevelReconstruction:
    """One reconstruction: a level of one checkpoint ("RQ1+RQ2", "RQ1", "vq", …)."""

    level: str
    model: str
    checkpoint: str
    checkpoint_id: str
    box: np.ndarray  # (64, 64, 64), in the density units of the preprocessed input
    on_input_grid: np.ndarray  # like the input map
    fsc: FSCCurve
    metrics: dict[str, float]


@dataclass
class ReconstructionResult:
    record: PreprocessRecord
    input_box: np.ndarray  # the preprocessed input, normalisation undone
    coverage: np.ndarray  # bool, like the input: voxels that the model's box covers
    levels: list[LevelReconstruction] = field(default_factory=list)

    def difference(self, level: LevelReconstruction, source: DensityMap) -> np.ndarray:
        """What the model changed: reconstruction − preprocessed input, on the input grid.

        Both sides are the model's view of the map (resampled, low-passed, boxed), so the
        difference holds the model's changes and not those of the preprocessing.
        """
        seen = to_input_grid(self.input_box, self.record, source)
        return np.where(self.coverage, level.on_input_grid - seen, 0.0).astype(np.float32)


def describe_preprocessing(density: DensityMap, settings: PreprocessSettings = PreprocessSettings()) -> str:
    """One line that says what preprocessing will do to this map, before it runs."""
    if density.voxel_size is None:
        return "No voxel size: set the layer's scale (Å per voxel) before reconstructing."
    voxel = np.asarray(density.voxel_size)
    new_shape = np.maximum(np.round(np.asarray(density.shape) * voxel / settings.voxel_size), 1)
    steps = [
        f"resample {_format_voxel(voxel)} Å → {settings.voxel_size:g} Å "
        f"({_format_shape(density.shape)} → {_format_shape(new_shape)})",
    ]
    if np.any(voxel < settings.voxel_size):
        steps.append(f"low-pass at {2 * settings.voxel_size:g} Å")
    box = settings.box
    if np.any(new_shape > box):
        steps.append(f"crop to {box}³ around the centre of mass")
    if np.any(new_shape < box):
        steps.append(f"pad to {box}³")
    steps.append("normalise to mean 0, s.d. 1")
    return "; ".join(steps)


def reconstruct_map(
    density: DensityMap,
    checkpoints: list,
    device=None,
    settings: PreprocessSettings = PreprocessSettings(),
    stage: Stage | None = None,
    should_stop: StopCheck | None = None,
) -> ReconstructionResult:
    """Preprocess ``density``, reconstruct it with every checkpoint, map results back.

    Args:
        checkpoints: ``LoadedCheckpoint`` objects (a two-level Cryo-SWAN gives "RQ1+RQ2", its
            RQ1-only ablation "RQ1").
        stage: called as (done, total, message) as the work advances.
        should_stop: checked between stages; raises ``engine.Cancelled`` when it says True.
    """
    from .engine import reconstruct

    total = len(checkpoints) + 2
    report = stage or (lambda done, total, message: None)

    def check():
        if should_stop is not None and should_stop():
            raise Cancelled()

    report(0, total, "preprocessing")
    prepared = preprocess(density, settings)
    result = ReconstructionResult(prepared.record, _denormalise(prepared.data, prepared),
                                  to_input_grid(np.ones_like(prepared.data), prepared.record,
                                                density, order=0) > 0.5)
    for i, checkpoint in enumerate(checkpoints, start=1):
        check()
        report(i, total, f"reconstructing with {checkpoint.model.name}")
        levels = reconstruct(checkpoint.model, prepared.data[None], device, batch_size=1,
                             should_stop=should_stop)
        for level, volumes in levels.items():
            box = _denormalise(volumes[0], prepared)
            result.levels.append(LevelReconstruction(
                level=level,
                model=checkpoint.model.name,
                checkpoint=str(checkpoint.path),
                checkpoint_id=checkpoint.checkpoint_id,
                box=box,
                on_input_grid=to_input_grid(box, prepared.record, density),
                fsc=fsc(box, result.input_box, settings.voxel_size),
                metrics=voxel_metrics(volumes[0], prepared.data),
            ))
    check()
    report(total, total, "done")
    return result


def to_input_grid(box: np.ndarray, record: PreprocessRecord, source: DensityMap,
                  order: int = 1) -> np.ndarray:
    """Resample a volume on the model's box grid onto the source map's voxel grid.

    Source voxel i sits at origin + i·voxel (Å); in the box grid that is
    (origin + i·voxel − box_origin) / box voxel size. Voxels outside the box get 0.
    """
    from scipy.ndimage import affine_transform

    if record.rotation is not None:
        raise ValueError("A rotated (augmented) volume does not overlay its source map.")
    box_voxel = record.voxel_size
    scale = np.asarray(source.voxel_size, dtype=float) / box_voxel
    offset = (np.asarray(source.origin, float) - np.asarray(record.box_origin, float)) / box_voxel
    return affine_transform(np.asarray(box, np.float32), scale, offset=offset,
                            output_shape=source.shape, order=order, mode="grid-constant",
                            cval=0.0).astype(np.float32)


def _denormalise(data: np.ndarray, prepared: Preprocessed) -> np.ndarray:
    record = prepared.record
    if record.std is None:
        return np.asarray(data, np.float32)
    return (np.asarray(data, np.float32) * record.std + record.mean).astype(np.float32)


def _format_voxel(voxel: np.ndarray) -> str:
    return f"{voxel[0]:.3g}" if np.allclose(voxel, voxel[0]) else "×".join(f"{v:.3g}" for v in voxel)


def _format_shape(shape) -> str:
    return "×".join(str(int(n)) for n in shape)
