"""Reconstruct a map of any size and voxel size with one or more autoencoder checkpoints.

The map goes through the preprocessing that the first checkpoint's input contract names (the
paper's: 64³ at 4 Å, z-scored), each model reconstructs it, and the normalisation is undone.
Results stay on the model's box grid and are placed in Å by the box's voxel size and origin
(``ReconstructionResult.placement``): shown with that scale and translate they overlay the input
in napari without being resampled onto its grid. Resampling would add no detail (the model sees
4 Å voxels) and would cost a full copy of the input per result, 1 GB each for a 640³ map.

The FSC of each reconstruction against the preprocessed input (what the model saw) is computed
in the box, where both lie on the same cubic grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engine import Cancelled, StopCheck
from .io import DensityMap
from .metrics import FSCCurve, fsc, voxel_metrics
from .preprocess import (PreprocessRecord, PreprocessSettings, above_contour, centre_of_mass, denormalise,
                         preprocess)

Stage = Callable[[int, int, str], None]  # (done, total, what is happening)

# How far from the training data a map may be before the user is told, before the run.
MIN_VOXELS_PER_AXIS = 8  # at the model's voxel size
COARSEST_VOXEL_FACTOR = 2.0  # map voxel / model voxel
CROPPED_FRACTION = 0.05  # of the positive density, outside the box
# Of the voxels on the map's own box faces, above its mean + 1 s.d. once blurred: at most 0.044
# over the 895 protein maps, clean or noised down to SNR 0.25, and 0.12-0.31 for the EMDB maps of
# a crystal (EMD-3001) and a membrane (EMD-3197), which fill their boxes
# (benchmarks/bench_dense_faces.py). Large complexes cropped by the box reach 0.21 too, and swan.pt
# learned them; it still fails the membrane (43 Å by FSC 0.5 against 9 Å for particles,
# docs/DENOISING.md), so the note names what fails rather than what it saw.
DENSE_FACES_FRACTION = 0.05
# Unblurred, noise alone put 894 of the 895 protein maps above it at SNR 1 (the same benchmark).
DENSE_FACES_BLUR = 1.5  # voxels of the (subsampled) map


@dataclass
class VariantReconstruction:
    """One reconstruction: a variant ("RQ1+RQ2", "RQ1", "vq", …) of one checkpoint."""

    variant: str
    model: str
    checkpoint: str
    checkpoint_id: str
    box: np.ndarray  # (box, box, box), in the density units of the input map
    fsc: FSCCurve
    metrics: dict[str, float]


@dataclass
class ScaleSteps:
    """The first checkpoint's reconstruction after each perception scale, coarse to fine."""

    labels: list[str]  # "RQ2 1³", …, "RQ1 16³"
    model: str
    checkpoint: str
    checkpoint_id: str
    boxes: np.ndarray  # (steps, box, box, box), in the density units of the input map
    codes: np.ndarray  # (steps, box, box, box) int32: the code index of each step's own scale


@dataclass
class ReconstructionResult:
    record: PreprocessRecord
    input_box: np.ndarray  # the preprocessed input, normalisation undone
    variants: list[VariantReconstruction] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the user must know about this result
    by_scale: ScaleSteps | None = None

    @property
    def placement(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(scale, translate) in Å, (z, y, x), that lay the box over the input map."""
        return self.record.placement

    def difference(self, variant: VariantReconstruction) -> np.ndarray:
        """What the model changed: reconstruction − preprocessed input, in the box.

        Both sides are the model's view of the map (resampled, low-passed, boxed), so the
        difference holds the model's changes and not those of the preprocessing.
        """
        return (variant.box - self.input_box).astype(np.float32)


def describe_preprocessing(density: DensityMap, settings: PreprocessSettings) -> str:
    """One line that says what preprocessing will do to this map, before it runs."""
    if density.voxel_size is None:
        return "No voxel size: enter the map's voxel size (Å per voxel) to reconstruct it."
    voxel = np.asarray(density.voxel_size)
    new_shape = _resampled_shape(density, settings)
    steps = [
        f"resample {_format_voxel(voxel)} Å → {settings.voxel_size:g} Å "
        f"({_format_shape(density.shape)} → {_format_shape(new_shape)})",
    ]
    if settings.antialias and np.any(voxel < settings.voxel_size):
        steps.append(f"low-pass at {2 * settings.voxel_size:g} Å")
    if settings.contour_level is not None:
        steps.insert(0, f"mask at contour {settings.contour_level:.4g}")
    box = settings.box
    if np.any(new_shape > box):
        steps.append(f"crop to {box}³ around the centre of mass")
    if np.any(new_shape < box):
        steps.append(f"pad to {box}³")
    if settings.normalise:
        steps.append("normalise to mean 0, s.d. 1")
    return "; ".join(steps)


def input_concerns(density: DensityMap, settings: PreprocessSettings,
                   estimate_outside: bool = True, for_model: bool = True) -> list[str]:
    """Why a map lies far outside what the model was trained on, said before the run.
    ``for_model=False`` (a classical filter) leaves out what only a learned model minds: a map
    that fills its own box.

    Cheap enough for the UI thread: the density outside the box is estimated on a strided
    subsample of at most about 128³ voxels (``estimate_outside=False`` leaves that to the run,
    which measures it).
    """
    if density.voxel_size is None:
        return []
    concerns = []
    new_shape = _resampled_shape(density, settings)
    if new_shape.min() < MIN_VOXELS_PER_AXIS:
        concerns.append(
            f"At {settings.voxel_size:g} Å this map is only {_format_shape(new_shape)} voxels, far "
            f"smaller than the maps the model learned (particles filling much of a {settings.box}³ "
            "box): its reconstruction will mean little. Check the voxel size.")
    coarsest = float(max(density.voxel_size))
    if coarsest > COARSEST_VOXEL_FACTOR * settings.voxel_size:
        concerns.append(
            f"The map's voxels ({coarsest:.3g} Å) are much coarser than the model's "
            f"{settings.voxel_size:g} Å: upsampling adds no detail, so expect no more than "
            f"{2 * coarsest:.3g} Å resolution from it.")
    faces = fraction_of_faces_dense(density) if for_model else 0.0
    if faces > DENSE_FACES_FRACTION:
        concerns.append(
            f"The density runs into the edges of its own box ({faces:.0%} of the box faces lie "
            "above mean + 1 s.d.): a membrane, filament, crystal or crop of a larger map. The "
            "bundled models remake such maps as particle-like blobs (a membrane from EMDB comes "
            "back at 43 Å by FSC 0.5, simulated particles at 9 Å); a classical filter or a map "
            "masked to one particle suits it better.")
    outside = estimated_fraction_outside(density, settings) if estimate_outside else 0.0
    if outside > CROPPED_FRACTION:
        edge = settings.box * settings.voxel_size
        concerns.append(
            f"About {outside:.0%} of the density lies outside the model's {settings.box}³ box "
            f"({edge:g} Å wide) and will be cut off. Mask or crop the map to one particle first.")
    return concerns


def fraction_of_faces_dense(density: DensityMap, *, blur: float = DENSE_FACES_BLUR) -> float:
    """The fraction of the voxels on the six faces of the map's box that lie above the map's
    mean + 1 s.d., on a strided subsample of at most about 128³ voxels blurred by ``blur`` voxels
    (``preprocess.above_contour``), so that noise in the solvent does not count as density."""
    step = max(1, int(np.ceil(max(density.shape) / 128)))
    dense = above_contour(density.data[::step, ::step, ::step], blur=blur) > 0
    faces = [dense[0], dense[-1], dense[:, 0], dense[:, -1], dense[:, :, 0], dense[:, :, -1]]
    return sum(int(np.count_nonzero(f)) for f in faces) / sum(f.size for f in faces)


def estimated_fraction_outside(density: DensityMap, settings: PreprocessSettings) -> float:
    """The fraction of positive density that the model's box, centred as preprocessing centres
    it, would leave out: the preprocessing's own measure, estimated on a strided subsample."""
    voxel = np.asarray(density.voxel_size, float)
    shape = np.asarray(density.shape)
    step = np.maximum(np.floor(settings.voxel_size / voxel), np.ceil(shape / 128)).astype(int)
    step = np.maximum(step, 1)
    coarse = np.clip(np.asarray(density.data[::step[0], ::step[1], ::step[2]], np.float32), 0, None)
    total = float(coarse.sum())
    if total <= 0:
        return 0.0
    centre = centre_of_mass(coarse) * step * voxel
    half = settings.box * settings.voxel_size / 2
    inside = [np.abs(np.arange(n) * s * v - c) <= half
              for n, s, v, c in zip(coarse.shape, step, voxel, centre)]
    kept = float(coarse[np.ix_(*inside)].sum())
    return max(0.0, 1.0 - kept / total)


def reconstruct_map(
    density: DensityMap,
    checkpoints: list,
    settings: PreprocessSettings,
    device=None,
    stage: Stage | None = None,
    should_stop: StopCheck | None = None,
    by_scale: bool = False,
) -> ReconstructionResult:
    """Preprocess ``density`` as ``settings`` say and reconstruct it with every checkpoint.

    Args:
        checkpoints: ``LoadedCheckpoint`` objects (a two-level Cryo-SWAN gives "RQ1+RQ2", its
            RQ1-only ablation "RQ1").
        settings: the preprocessing of the checkpoints' input contract.
        stage: called as (done, total, message) as the work advances.
        should_stop: checked between stages; raises ``engine.Cancelled`` when it says True.
        by_scale: also decode the first checkpoint after each perception scale
            (``result.by_scale``; Cryo-SWAN only).
    """
    from .engine import code_maps, reconstruct

    total = len(checkpoints) + 2 + by_scale
    report = stage or (lambda done, total, message: None)

    def check():
        if should_stop is not None and should_stop():
            raise Cancelled()

    report(0, total, "preprocessing")
    prepared = preprocess(density, settings)
    result = ReconstructionResult(prepared.record, denormalise(prepared.data, prepared.record))
    result.notes += filter(None, [prepared.record.cut_off_note()])
    for i, checkpoint in enumerate(checkpoints, start=1):
        check()
        report(i, total, f"reconstructing with {checkpoint.model.name}")
        variants = reconstruct(checkpoint.model, prepared.data[None], device, batch_size=1,
                               should_stop=should_stop)
        for variant, volumes in variants.items():
            box = denormalise(volumes[0], prepared.record)
            result.variants.append(VariantReconstruction(
                variant=variant,
                model=checkpoint.model.name,
                checkpoint=str(checkpoint.path),
                checkpoint_id=checkpoint.checkpoint_id,
                box=box,
                fsc=fsc(box, result.input_box, settings.voxel_size).up_to(prepared.record.source_nyquist),
                metrics=voxel_metrics(volumes[0], prepared.data),
            ))
    if by_scale:
        check()
        report(total - 1, total, "decoding each perception scale")
        main = checkpoints[0]
        steps = reconstruct(main.model, prepared.data[None], device, batch_size=1,
                            should_stop=should_stop, by_scale=True)
        codes = code_maps(main.model, prepared.data[None], device, batch_size=1, should_stop=should_stop)
        result.by_scale = ScaleSteps(
            list(steps), main.model.name, str(main.path), main.checkpoint_id,
            np.stack([denormalise(volumes[0], prepared.record) for volumes in steps.values()]),
            np.stack([codes[step][0] for step in steps]))
    check()
    report(total, total, "done")
    return result


def _resampled_shape(density: DensityMap, settings: PreprocessSettings) -> np.ndarray:
    voxel = np.asarray(density.voxel_size, float)
    return np.maximum(np.round(np.asarray(density.shape) * voxel / settings.voxel_size), 1).astype(int)


def _format_voxel(voxel: np.ndarray) -> str:
    return f"{voxel[0]:.3g}" if np.allclose(voxel, voxel[0]) else "×".join(f"{v:.3g}" for v in voxel)


def _format_shape(shape) -> str:
    return "×".join(str(int(n)) for n in shape)
