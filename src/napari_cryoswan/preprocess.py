"""The ProteinNet3D preprocessing recipe (paper, Methods), one pure function per step.

``preprocess`` runs them in order:

1. optional mask at a contour level, with a soft cosine edge, on the original grid (where the
   EMDB recommended contour is defined);
2. resample to an isotropic voxel size (4 Å), low-passing first at the new Nyquist frequency so
   the downsampling cannot alias (the mask's edge is smoothed by the same filter);
3. centre: the box is placed on the centre of mass of the positive density;
4. crop or zero-pad to a cubic box (64³), warning when density falls outside;
5. optional rotation about the box centre (augmentation; the paper makes 5 per map);
6. normalise to zero mean and unit variance, after rotation so every copy is exactly z-scored.

Every output carries a ``PreprocessRecord`` that says what was done, and where the box sits
in the original map's frame, so a result can be laid back over the map in napari.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np

from .io import DensityMap

ZYX = tuple[float, float, float]


class CroppedDensityWarning(UserWarning):
    """Part of the density lay outside the output box and was cut off."""


@dataclass(frozen=True)
class PreprocessSettings:
    """What ``preprocess`` does. The defaults are the paper's: 64³ at 4 Å, no augmentation."""

    voxel_size: float = 4.0
    box: int = 64
    contour_level: float | None = None  # in the map's own units; None: no mask
    mask_soft_edge: float = 8.0  # Å of cosine fall-off outside the contour
    antialias: bool = True
    normalise: bool = True


@dataclass(frozen=True)
class PreprocessRecord:
    """What preprocessing did to a map. Geometry in Å and (z, y, x) order.

    ``box_origin`` is where output voxel (0, 0, 0) sits in the source map's frame: an output
    shown with scale ``voxel_size`` and translate ``box_origin`` overlays its source map
    (unless ``rotation`` is set).
    """

    source_voxel_size: ZYX
    source_shape: tuple[int, int, int]
    source_origin: ZYX
    voxel_size: float
    resampled_shape: tuple[int, int, int]
    lowpass_cutoff: float | None
    contour_level: float | None
    box: int
    crop_start: tuple[int, int, int]  # in the resampled grid; negative where it was padded
    padding: tuple[tuple[int, int], ...]  # zero voxels added (before, after) on each axis
    fraction_outside: float  # of the positive density, cut off by the box
    box_origin: ZYX
    rotation: tuple[tuple[float, ...], ...] | None
    mean: float | None  # subtracted, then divided by std, in the normalisation
    std: float | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preprocessed:
    data: np.ndarray  # (box, box, box) float32
    record: PreprocessRecord

    def as_density_map(self) -> DensityMap:
        return DensityMap(
            data=self.data,
            voxel_size=(self.record.voxel_size,) * 3,
            origin=self.record.box_origin,
            header={"preprocessing": self.record.to_dict()},
        )


def lowpass(data: np.ndarray, voxel_size: ZYX, cutoff: float, edge: float = 0.1) -> np.ndarray:
    """Remove every spatial frequency above 1/``cutoff`` Å⁻¹.

    The response is 1 up to (1 − ``edge``)/cutoff and falls along a raised cosine to exactly 0
    at 1/cutoff, so nothing above the cutoff survives and ringing stays small.
    """
    from scipy import fft

    freq = _frequency_magnitude(data.shape, voxel_size)
    f_cut = 1.0 / cutoff
    f_pass = (1.0 - edge) * f_cut
    ramp = np.clip((freq - f_pass) / (f_cut - f_pass), 0.0, 1.0)
    response = 0.5 * (1.0 + np.cos(np.pi * ramp))
    response[freq >= f_cut] = 0.0
    spectrum = fft.rfftn(data.astype(np.float32, copy=False))
    return fft.irfftn(spectrum * response, s=data.shape).astype(np.float32)


def resample(
    data: np.ndarray, voxel_size: ZYX, new_voxel_size: float, antialias: bool = True
) -> tuple[np.ndarray, ZYX, float | None]:
    """Resample onto an isotropic grid with the same centre.

    Returns:
        (resampled data, position in Å of its voxel 0 relative to the input's voxel 0,
        the low-pass cutoff in Å that was applied or None).
    """
    from scipy.ndimage import affine_transform

    voxel = np.asarray(voxel_size, dtype=float)
    cutoff = None
    if antialias and np.any(voxel < new_voxel_size):
        cutoff = 2.0 * new_voxel_size  # the new Nyquist limit
        data = lowpass(data, voxel_size, cutoff)
    old_shape = np.asarray(data.shape)
    new_shape = np.maximum(np.round(old_shape * voxel / new_voxel_size).astype(int), 1)
    step = new_voxel_size / voxel  # input voxels per output voxel
    # Output voxel j samples input position (j − (n'−1)/2)·step + (n−1)/2: centres coincide.
    start = (old_shape - 1) / 2 - (new_shape - 1) / 2 * step
    out = affine_transform(
        data.astype(np.float32, copy=False),
        step,
        offset=start,
        output_shape=tuple(new_shape),
        order=3,
        mode="grid-constant",
        cval=0.0,
    )
    return out, tuple(float(s) for s in start * voxel), cutoff


def contour_mask(data: np.ndarray, level: float, voxel_size: ZYX, soft_edge: float) -> np.ndarray:
    """1 inside the contour (density ≥ level), a cosine fall-off over ``soft_edge`` Å outside it."""
    from scipy.ndimage import distance_transform_edt

    inside = data >= level
    if not inside.any():
        raise ValueError(
            f"No voxel reaches the contour level {level:g} (map maximum {float(data.max()):g}). "
            "Choose a lower level."
        )
    distance = distance_transform_edt(~inside, sampling=voxel_size)
    if soft_edge <= 0:
        return inside.astype(np.float32)
    ramp = np.clip(distance / soft_edge, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * ramp))).astype(np.float32)


def centre_of_mass(data: np.ndarray) -> np.ndarray:
    """Centre of mass (voxels, z, y, x) of the positive density; negative noise is ignored."""
    positive = np.clip(data, 0.0, None)
    total = positive.sum()
    if total <= 0:
        return (np.asarray(data.shape) - 1) / 2.0
    grids = np.indices(data.shape, sparse=True)
    return np.array([(g * positive).sum() / total for g in grids])


def crop_or_pad(
    data: np.ndarray, box: int, centre: np.ndarray
) -> tuple[np.ndarray, tuple[int, int, int], float]:
    """Cut a ``box``³ window centred (to the nearest voxel) on ``centre``, zero-padding outside.

    Returns (window, its start index in ``data``, fraction of positive density left outside).
    No interpolation: the voxels are copied, so the density is not blurred.
    """
    start = np.round(np.asarray(centre) - (box - 1) / 2.0).astype(int)
    out = np.zeros((box,) * 3, dtype=np.float32)
    src = tuple(slice(max(s, 0), min(s + box, n)) for s, n in zip(start, data.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = data[src]
    positive_total = np.clip(data, 0, None).sum()
    kept = np.clip(out, 0, None).sum()
    outside = float(1.0 - kept / positive_total) if positive_total > 0 else 0.0
    return out, tuple(int(s) for s in start), max(outside, 0.0)


def rotate(data: np.ndarray, rotation: np.ndarray, spline: np.ndarray | None = None) -> np.ndarray:
    """Rotate a volume about its centre by a 3×3 matrix acting on (z, y, x) coordinates.

    ``spline``: the cubic-spline coefficients of ``data`` (``spline_coefficients``), to reuse
    them across several rotations of one volume instead of fitting them each time.
    """
    from scipy.ndimage import affine_transform

    rotation = np.asarray(rotation, dtype=float)
    centre = (np.asarray(data.shape) - 1) / 2.0
    # affine_transform pulls: output position p reads input at R⁻¹(p − c) + c.
    inverse = rotation.T
    offset = centre - inverse @ centre
    if spline is None:
        return affine_transform(data, inverse, offset=offset, order=3, mode="grid-constant",
                                cval=0.0)
    return affine_transform(spline, inverse, offset=offset + _SPLINE_PAD, output_shape=data.shape,
                            order=3, mode="grid-constant", cval=0.0, prefilter=False)


# scipy zero-pads this much before fitting a spline for mode "grid-constant"; doing the same
# keeps a precomputed fit identical to the one affine_transform makes itself.
_SPLINE_PAD = 12


def spline_coefficients(data: np.ndarray) -> np.ndarray:
    """The cubic-spline fit that ``rotate`` interpolates, computed once for many rotations."""
    from scipy.ndimage import spline_filter

    padded = np.pad(np.asarray(data, np.float64), _SPLINE_PAD)
    return spline_filter(padded, order=3, mode="mirror")


def random_rotations(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` rotation matrices drawn uniformly from SO(3)."""
    from scipy.spatial.transform import Rotation

    return list(Rotation.random(n, random_state=rng).as_matrix().reshape(n, 3, 3))


def normalise(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Zero mean, unit variance. Returns (data, mean, std)."""
    mean, std = float(data.mean()), float(data.std())
    if not std > 0:
        raise ValueError("The map is constant after preprocessing: there is no density to use.")
    return ((data - mean) / std).astype(np.float32), mean, std


def preprocess(
    density: DensityMap,
    settings: PreprocessSettings = PreprocessSettings(),
    rotation: np.ndarray | None = None,
) -> Preprocessed:
    """Run the whole recipe on one map (see the module docstring for the order)."""
    return _finish(_resample_and_box(density, settings), settings, rotation)


def augment(
    density: DensityMap,
    settings: PreprocessSettings,
    n_rotations: int,
    rng: np.random.Generator,
) -> list[Preprocessed]:
    """``n_rotations`` randomly rotated, preprocessed copies of one map (resampled once)."""
    boxed = _resample_and_box(density, settings)
    spline = spline_coefficients(boxed.data)
    return [_finish(boxed, settings, r, spline) for r in random_rotations(n_rotations, rng)]


def _resample_and_box(density: DensityMap, settings: PreprocessSettings) -> Preprocessed:
    if density.voxel_size is None:
        raise ValueError(
            "This map has no voxel size, so it cannot be resampled to "
            f"{settings.voxel_size} Å. Set the voxel size (from its EMDB entry) and try again."
        )
    data = density.data
    if settings.contour_level is not None:
        data = data * contour_mask(
            data, settings.contour_level, density.voxel_size, settings.mask_soft_edge
        )
    data, shift, cutoff = resample(
        data, density.voxel_size, settings.voxel_size, antialias=settings.antialias
    )
    boxed, start, outside = crop_or_pad(data, settings.box, centre_of_mass(data))
    if outside > 0.01:
        warnings.warn(
            f"{outside:.1%} of the positive density lies outside the {settings.box}³ box at "
            f"{settings.voxel_size} Å (the map spans {data.shape} voxels there) and was cut off. "
            "Use a larger box or voxel size, or mask the map to the particle first.",
            CroppedDensityWarning,
            stacklevel=3,
        )
    shape = data.shape
    box_origin = np.add(density.origin, shift) + np.asarray(start) * settings.voxel_size
    record = PreprocessRecord(
        source_voxel_size=tuple(density.voxel_size),
        source_shape=tuple(density.data.shape),
        source_origin=tuple(density.origin),
        voxel_size=settings.voxel_size,
        resampled_shape=tuple(int(n) for n in shape),
        lowpass_cutoff=cutoff,
        contour_level=settings.contour_level,
        box=settings.box,
        crop_start=start,
        padding=tuple(
            (max(-s, 0), max(s + settings.box - n, 0)) for s, n in zip(start, shape)
        ),
        fraction_outside=outside,
        box_origin=tuple(float(o) for o in box_origin),
        rotation=None,
        mean=None,
        std=None,
    )
    return Preprocessed(boxed, record)


def _finish(
    boxed: Preprocessed,
    settings: PreprocessSettings,
    rotation: np.ndarray | None,
    spline: np.ndarray | None = None,
) -> Preprocessed:
    data, changes = boxed.data, {}
    if rotation is not None:
        data = rotate(data, rotation, spline)
        changes["rotation"] = tuple(tuple(float(v) for v in row) for row in np.asarray(rotation))
    if settings.normalise:
        data, changes["mean"], changes["std"] = normalise(data)
    return Preprocessed(data.astype(np.float32), replace(boxed.record, **changes))


def _frequency_magnitude(shape, voxel_size: ZYX) -> np.ndarray:
    """|k| in Å⁻¹ on the rfftn grid of an array of ``shape`` with the given voxel size."""
    fz = np.fft.fftfreq(shape[0], d=voxel_size[0])[:, None, None]
    fy = np.fft.fftfreq(shape[1], d=voxel_size[1])[None, :, None]
    fx = np.fft.rfftfreq(shape[2], d=voxel_size[2])[None, None, :]
    return np.sqrt(fz**2 + fy**2 + fx**2)
