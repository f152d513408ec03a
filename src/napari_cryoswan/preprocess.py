"""The ProteinNet3D preprocessing recipe (paper, Methods), one pure function per step.

``preprocess`` runs them in order:

1. optional mask at a contour level, with a soft cosine edge, on the original grid (where the
   EMDB recommended contour is defined);
2. resample to an isotropic voxel size (4 Å), low-passing first at the new Nyquist frequency so
   the downsampling cannot alias (the mask's edge is smoothed by the same filter). A map finer
   than half the target voxel is first brought to about that voxel by cropping its spectrum, axis
   by axis and slab by slab (``fourier_crop``), so no full-size spectrum is made: a 1 GB map at
   0.8 Å (memory-mapped by ``io.read_map``) peaks at 1.3 times its size, where it took 11;
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


# Slab-wise steps (spectrum cropping, filtering, masking) work on about this many voxels at once.
_SLAB_VOXELS = 4 * 2**20
# ``resample`` crops a fine map's spectrum to a voxel of new/_CROP_OVERSAMPLING before filtering.
_CROP_OVERSAMPLING = 2.0


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
    # Crop the spectrum of a fine map to half the target voxel before the low-pass: much less
    # memory and time, the same result up to the interpolation. False: filter the full grid.
    fourier_crop: bool = True


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

    @property
    def placement(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(scale, translate) in Å, (z, y, x), that lay the box over the source map."""
        return (self.voxel_size,) * 3, tuple(self.box_origin)

    @property
    def source_nyquist(self) -> float:
        """The highest frequency (1/Å) the box holds of the source: a map coarser than the box
        holds nothing past its own Nyquist, so FSCs against it stop there."""
        return 1.0 / (2.0 * max(max(self.source_voxel_size), self.voxel_size))

    def cut_off_note(self) -> str | None:
        """What the user must be told when the box cut off more than 1 % of the density."""
        if self.fraction_outside <= 0.01:
            return None
        return (f"{self.fraction_outside:.0%} of the density lay outside the {self.box}³ box at "
                f"{self.voxel_size:g} Å and was cut off before the map was processed.")


@dataclass(frozen=True)
class Preprocessed:
    data: np.ndarray  # (box, box, box) float32
    record: PreprocessRecord


def lowpass(data: np.ndarray, voxel_size: ZYX, cutoff: float, edge: float = 0.1) -> np.ndarray:
    """Remove every spatial frequency above 1/``cutoff`` Å⁻¹.

    The response is 1 up to (1 − ``edge``)/cutoff and falls along a raised cosine to exactly 0
    at 1/cutoff, so nothing above the cutoff survives and ringing stays small. The spectrum is
    single precision and filtered in place, slab by slab, so the memory this adds is the
    spectrum (about the size of ``data``) and one slab of response.
    """
    return _fourier_filter(data, voxel_size, cutoff, edge)


def _fourier_filter(data: np.ndarray, voxel_size: ZYX, cutoff: float, edge: float = 0.1,
                    spline: bool = False) -> np.ndarray:
    """``lowpass``; with ``spline`` also the periodic cubic B-spline prefilter, so the result
    is the coefficients of the spline that interpolates the low-passed map (grid-wrap)."""
    from scipy import fft

    spectrum = fft.rfftn(np.asarray(data, dtype=np.float32), workers=-1)
    f_cut = np.float32(1.0 / cutoff)
    f_pass = np.float32((1.0 - edge) / cutoff)
    if spline:
        prefilter_z = _bspline_prefilter(np.fft.fftfreq(data.shape[0]))
        prefilter_yx = (_bspline_prefilter(np.fft.fftfreq(data.shape[1]))[:, None]
                        * _bspline_prefilter(np.fft.rfftfreq(data.shape[2]))[None, :])
    rows = max(1, _SLAB_VOXELS // (spectrum.shape[1] * spectrum.shape[2]))
    for start in range(0, spectrum.shape[0], rows):
        freq = _frequency_magnitude(data.shape, voxel_size, slice(start, start + rows))
        ramp = np.clip((freq - f_pass) / (f_cut - f_pass), 0.0, 1.0)
        response = np.float32(0.5) * (np.float32(1.0) + np.cos(np.float32(np.pi) * ramp))
        response[freq >= f_cut] = 0.0
        if spline:
            response *= prefilter_z[start:start + rows, None, None] * prefilter_yx
        spectrum[start:start + rows] *= response
    return fft.irfftn(spectrum, s=data.shape, workers=-1, overwrite_x=True).astype(
        np.float32, copy=False)


def _bspline_prefilter(frequency: np.ndarray) -> np.ndarray:
    """The periodic cubic B-spline prefilter at ``frequency`` (cycles per voxel): 1 / B̂(ω)."""
    return (3.0 / (2.0 + np.cos(2 * np.pi * frequency))).astype(np.float32)


def resample(
    data: np.ndarray,
    voxel_size: ZYX,
    new_voxel_size: float,
    antialias: bool = True,
    *,
    fourier_crop: bool = True,
) -> tuple[np.ndarray, ZYX, float | None]:
    """Resample onto an isotropic grid with the same centre.

    Downsampling low-passes at the new Nyquist frequency first, in Fourier space, so the map is
    treated as periodic from then on: the cubic spline that samples the new grid wraps around
    too, and its prefilter is folded into the low-pass. With ``fourier_crop``, a map finer than
    half the new voxel size is first cropped in Fourier space to about that voxel size
    (``crop_spectrum``). That keeps every frequency the low-pass keeps, so the low-pass and the
    interpolation run on a grid up to (2·voxel/new)³ times smaller with the same result, up to
    the interpolation (correlation above 0.999 in the tests). Upsampling interpolates directly.

    Returns:
        (resampled data, position in Å of its voxel 0 relative to the input's voxel 0,
        the low-pass cutoff in Å that was applied or None).
    """
    from scipy.ndimage import affine_transform

    voxel = np.asarray(voxel_size, dtype=float)
    old_shape = np.asarray(data.shape)
    new_shape = np.maximum(np.round(old_shape * voxel / new_voxel_size).astype(int), 1)
    step = new_voxel_size / voxel  # input voxels per output voxel
    # Output voxel j samples input position (j − (n'−1)/2)·step + (n−1)/2: centres coincide.
    start = (old_shape - 1) / 2 - (new_shape - 1) / 2 * step
    shift = tuple(float(s) for s in start * voxel)
    if not (antialias and np.any(voxel < new_voxel_size)):
        out = affine_transform(np.asarray(data, dtype=np.float32), step, offset=start,
                               output_shape=tuple(new_shape), order=3, mode="grid-constant",
                               cval=0.0)
        return out, shift, None
    cutoff = 2.0 * new_voxel_size  # the new Nyquist limit
    grid = np.asarray(cropped_shape(data.shape, voxel_size, new_voxel_size)
                      if fourier_crop else data.shape)
    if np.any(grid < old_shape):
        data = crop_spectrum(data, tuple(grid))
    coefficients = _fourier_filter(data, tuple(voxel * old_shape / grid), cutoff, spline=True)
    del data
    # Input voxel i sits at i·grid/n on the (cropped) grid.
    positions = [(s + np.arange(n) * d) * g / n0
                 for s, n, d, g, n0 in zip(start, new_shape, step, grid, old_shape)]
    return _sample_periodic_spline(coefficients, positions), shift, cutoff


def _sample_periodic_spline(coefficients: np.ndarray, positions: list[np.ndarray]) -> np.ndarray:
    """The periodic cubic B-spline of ``coefficients`` on the grid of ``positions`` (voxels).

    The same values as ``affine_transform(coefficients, …, order=3, mode="grid-wrap",
    prefilter=False)`` for an axis-aligned scaling, computed axis by axis as small matrix
    products, which is many times faster.
    """
    out = coefficients
    for axis, position in enumerate(positions):
        weights = _bspline_weights(position, coefficients.shape[axis])  # (n_out, n_in)
        out = np.moveaxis(np.tensordot(weights, out, axes=(1, axis)), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def _bspline_weights(position: np.ndarray, n: int) -> np.ndarray:
    """(len(position), n) weights of the periodic cubic B-spline at ``position`` (voxels)."""
    weights = np.zeros((len(position), n))
    base = np.floor(position).astype(int)
    rows = np.arange(len(position))
    for offset in (-1, 0, 1, 2):
        t = np.abs(position - (base + offset))
        value = np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
        np.add.at(weights, (rows, (base + offset) % n), value)
    return weights.astype(np.float32)


def cropped_shape(shape, voxel_size: ZYX, new_voxel_size: float) -> tuple[int, int, int]:
    """The grid ``resample`` crops a map's spectrum to: voxels no larger than new/2 on any axis.

    There the grid's Nyquist frequency is at least twice the low-pass cutoff (1/(2·new)), so
    the cutoff's band is sampled finely enough for a precise cubic interpolation. An axis that
    is already that coarse keeps its length; the others get a length that FFTs fast.
    """
    from scipy.fft import next_fast_len

    out = []
    for n, v in zip(shape, voxel_size):
        m = next_fast_len(int(np.ceil(n * v * _CROP_OVERSAMPLING / new_voxel_size - 1e-9)),
                          real=True)
        out.append(int(min(m, n)))
    return tuple(out)


def crop_spectrum(data: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample onto a coarser grid of ``shape`` by keeping only the lowest frequencies.

    Each axis of length n becomes m ≤ n: voxel j of the result sits at input index j·n/m and
    holds the map's periodic band-limited interpolant there, so every frequency below the new
    Nyquist limit is kept exactly (the one at it is not) and nothing above it aliases. It works
    in slabs (y and x per slab of z-sections, then z per slab of rows) on a ``data`` that may be
    memory-mapped, so the memory it adds is an nz × my × mx float32 intermediate, the float32
    result and one slab's spectrum.
    """
    from scipy import fft

    nz, ny, nx = data.shape
    mz, my, mx = shape
    # Rows of the y spectrum that stay: the lowest (my + 1) // 2 frequencies and the my // 2
    # most negative ones; columns of the half (x) spectrum: the lowest mx // 2 + 1.
    keep_y = np.r_[0:(my + 1) // 2, ny - my // 2:ny]
    partial = np.empty((nz, my, mx), np.float32)
    planes = max(1, _SLAB_VOXELS // (ny * nx))
    for z0 in range(0, nz, planes):
        slab = np.asarray(data[z0:z0 + planes], dtype=np.float32)
        if (my, mx) == (ny, nx):
            partial[z0:z0 + planes] = slab
            continue
        # "forward" puts the 1/n on the forward transform, so values keep their scale.
        spectrum = fft.rfft2(slab, norm="forward", workers=-1)[:, keep_y, : mx // 2 + 1]
        partial[z0:z0 + planes] = fft.irfft2(spectrum, s=(my, mx), norm="forward", workers=-1)
    if mz == nz:
        return partial
    out = np.empty(shape, np.float32)
    rows = max(1, _SLAB_VOXELS // (nz * mx))
    for y0 in range(0, my, rows):
        spectrum = fft.rfft(partial[:, y0:y0 + rows], axis=0, norm="forward", workers=-1)
        out[:, y0:y0 + rows] = fft.irfft(spectrum[: mz // 2 + 1], n=mz, axis=0, norm="forward",
                                         workers=-1)
    return out


def contour_mask(data: np.ndarray, level: float, voxel_size: ZYX, soft_edge: float) -> np.ndarray:
    """1 inside the contour (density ≥ level), a cosine fall-off over ``soft_edge`` Å outside it.

    Computed in slabs of z-sections, each with a margin of ``soft_edge`` Å on every side of the
    contour (every contour voxel nearer than that is in the margin, so the distances that matter
    are exact). The distance transform (about 20 bytes a voxel) then runs on one slab's box
    around the contour at a time, not on the whole map.
    """
    mask = np.empty(data.shape, np.float32)
    for z0, z1, slab in _contour_mask_slabs(data, level, voxel_size, soft_edge):
        mask[z0:z1] = slab
    return mask


def _masked(data: np.ndarray, level: float, voxel_size: ZYX, soft_edge: float) -> np.ndarray:
    """``data * contour_mask(...)`` as one new float32 array, without a whole-map mask."""
    out = np.empty(data.shape, np.float32)
    for z0, z1, slab in _contour_mask_slabs(data, level, voxel_size, soft_edge):
        np.multiply(data[z0:z1], slab, out=out[z0:z1])
    return out


def _contour_mask_slabs(data, level, voxel_size, soft_edge):
    """(z0, z1, mask of sections z0:z1) in turn, for ``contour_mask``."""
    from scipy.ndimage import distance_transform_edt

    n_planes = data.shape[0]
    peak = max(float(np.max(data[z0:z0 + 64])) for z0 in range(0, n_planes, 64))
    if not peak >= level:
        raise ValueError(
            f"No voxel reaches the contour level {level:g} (map maximum {peak:g}). "
            "Choose a lower level."
        )
    # Voxels within soft_edge of the contour lie within this many voxels of it on each axis.
    reach = [int(np.ceil(soft_edge / v)) if soft_edge > 0 else 0 for v in voxel_size]
    planes = max(1, _SLAB_VOXELS // (data.shape[1] * data.shape[2]), 4 * reach[0])
    for z0 in range(0, n_planes, planes):
        z1 = min(z0 + planes, n_planes)
        a, b = max(z0 - reach[0], 0), min(z1 + reach[0], n_planes)
        inside = np.asarray(data[a:b]) >= level
        mask = np.zeros((z1 - z0,) + data.shape[1:], np.float32)
        footprint = inside.any(axis=0)
        if soft_edge <= 0 or not footprint.any():
            mask[...] = inside[z0 - a:z1 - a]
            yield z0, z1, mask
            continue
        # Outside the contour's box grown by the reach, every voxel is too far: 0.
        box = []
        for axis, n in ((1, data.shape[1]), (2, data.shape[2])):
            hits = np.flatnonzero(footprint.any(axis=2 - axis))
            box.append(slice(max(hits[0] - reach[axis], 0), min(hits[-1] + reach[axis] + 1, n)))
        distance = distance_transform_edt(~inside[:, box[0], box[1]], sampling=voxel_size)
        ramp = np.clip(distance[z0 - a:z1 - a] / soft_edge, 0.0, 1.0)
        mask[:, box[0], box[1]] = 0.5 * (1.0 + np.cos(np.pi * ramp))
        yield z0, z1, mask


def centre_of_mass(data: np.ndarray) -> np.ndarray:
    """Centre of mass (voxels, z, y, x) of the positive density; negative noise is ignored."""
    positive = np.clip(data, 0.0, None)
    total = positive.sum()
    if total <= 0:
        return (np.asarray(data.shape) - 1) / 2.0
    grids = np.indices(data.shape, sparse=True)
    return np.array([(g * positive).sum() / total for g in grids])


def distance_from_centre(shape: tuple[int, ...]) -> np.ndarray:
    """(float32, ``shape``) each voxel's distance in voxels from the box centre, (n − 1) / 2 on each axis."""
    offsets = [np.arange(n, dtype=np.float32) - (n - 1) / 2.0 for n in shape]
    return np.sqrt(offsets[0][:, None, None] ** 2 + offsets[1][None, :, None] ** 2 + offsets[2][None, None, :] ** 2)


def above_contour(data: np.ndarray, *, blur: float = 1.5, sds: float = 1.0) -> np.ndarray:
    """(float64) ``data`` blurred by ``blur`` voxels (0: not blurred), less its mean + ``sds``
    s.d., clipped at 0: the density that stands above the contour once noise is smoothed away."""
    from scipy.ndimage import gaussian_filter

    blurred = gaussian_filter(np.asarray(data, np.float64), blur)
    return np.clip(blurred - blurred.mean() - sds * blurred.std(), 0.0, None)


def inscribed_sphere(data: np.ndarray, *, rim: float = 3.0, min_share: float = 0.01) -> np.ndarray:
    """``data`` with the voxels outside the box's inscribed sphere set to the background level,
    the median of the sphere's outermost ``rim`` voxels.

    Rotating a box about its centre keeps what lies inside that sphere and changes what fills
    the corners: for a map that runs out of its box (a filament, a large assembly cut by the
    crop), two rotated copies hold the same density only there. Where the sphere holds less
    than ``min_share`` of the density (blurred by 1.5 voxels, above mean + 1 s.d.), as for a
    capsid wider than the box, ``data`` is returned as it is: there is nothing there to keep.
    """
    data = np.asarray(data, np.float32)
    radius = min(data.shape) / 2.0 - 0.5
    distance = distance_from_centre(data.shape)
    inside = distance <= radius
    rim_voxels = data[inside & (distance > radius - rim)]
    if rim_voxels.size == 0:  # a box of a voxel or two: no sphere inside it to keep
        return data
    density = above_contour(data)
    if not density[inside].sum() >= min_share * density.sum():
        return data
    return np.where(inside, data, np.median(rim_voxels)).astype(np.float32)


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


def zscored(data: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance, in the input's precision; a constant map is refused."""
    std = data.std()
    if not std > 0:
        raise ValueError("The map is constant: there is no density to use.")
    return (data - data.mean()) / std


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
        # On the original grid, where the contour level is defined: one masked float32 copy.
        data = _masked(data, settings.contour_level, density.voxel_size, settings.mask_soft_edge)
    data, shift, cutoff = resample(data, density.voxel_size, settings.voxel_size,
                                   antialias=settings.antialias,
                                   fourier_crop=settings.fourier_crop)
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


def denormalise(data: np.ndarray, record: PreprocessRecord) -> np.ndarray:
    """Undo the z-scoring of ``record`` (a model's output back in the map's own units).

    Identity (as float32) when the preprocessing did not normalise.
    """
    if record.std is None:
        return np.asarray(data, np.float32)
    return (np.asarray(data, np.float32) * np.float32(record.std) + np.float32(record.mean)).astype(
        np.float32, copy=False)


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


def _frequency_magnitude(shape, voxel_size: ZYX, rows: slice = slice(None)) -> np.ndarray:
    """|k| in Å⁻¹ (float32) on the rfftn grid of an array of ``shape``, for the z ``rows`` asked."""
    fz = np.fft.fftfreq(shape[0], d=voxel_size[0])[rows].astype(np.float32)[:, None, None]
    fy = np.fft.fftfreq(shape[1], d=voxel_size[1]).astype(np.float32)[None, :, None]
    fx = np.fft.rfftfreq(shape[2], d=voxel_size[2]).astype(np.float32)[None, None, :]
    return np.sqrt(fz**2 + fy**2 + fx**2)
