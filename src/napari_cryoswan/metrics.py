"""Reconstruction metrics: MSE, RMSE, PSNR, SSIM, IoU, F1 and the Fourier shell correlation.

Intensity metrics (MSE, RMSE, PSNR, SSIM) are computed after scaling both volumes with the same
affine map that takes the target to [0, 1], so PSNR has a peak of 1 and the numbers do not depend
on how the maps were normalised. IoU and F1 compare the two volumes binarised at one density
level (default: 1 standard deviation above the target's mean, on the z-scored maps the model
sees), which is stated with every report.

FSC follows one definition (GUIDE section 4): shells s = round(|k|) of the full 3-D FFT,
s = 0 … N/2, at frequency s / (N · voxel) Å⁻¹; the resolution at threshold t is N · voxel / s*,
where s* is the first crossing below t, linearly interpolated between the shells around it.
A curve need not cross inside the range the box can measure, so a resolution is a
``Resolution``: a crossing (a number in Å), "no crossing" (above t up to Nyquist: 2 · voxel or
better) or "beyond the box" (below t from shell 1 on: coarser than the box edge N · voxel).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .io import DensityMap

FSC_THRESHOLDS = (0.5, 0.143)
DEFAULT_BINARY_LEVEL_SIGMA = 1.0

CROSSING, NO_CROSSING, BEYOND_THE_BOX = "crossing", "no crossing", "beyond the box"
ResolutionKind = Literal["crossing", "no crossing", "beyond the box"]


@dataclass(frozen=True)
class Resolution:
    """The resolution an FSC curve shows at one threshold.

    ``kind`` is one of:
      - "crossing": the curve falls below the threshold between two shells s ≥ 1; ``angstrom``
        is N · voxel / s*.
      - "no crossing": it stays at or above the threshold up to the last shell (Nyquist): the
        resolution is ``limit`` (2 · voxel) or better, finer than this grid can tell.
      - "beyond the box": it is below the threshold from shell 1 on: the resolution is coarser
        than ``limit``, the box edge N · voxel, the coarsest detail the box can measure.

    ``angstrom`` is set only for a crossing and ``limit`` only for the other two, so neither an
    infinity nor the sampling limit is ever taken for a measured resolution.
    """

    threshold: float
    kind: ResolutionKind
    angstrom: float | None = None
    limit: float | None = None  # Å: the last shell's resolution (Nyquist) or the box edge

    def format(self, digits: int = 1) -> str:
        """The text users read: "12.3 Å", "≤ 8.0 Å (Nyquist)" or "> 256.0 Å (box edge)"."""
        if self.kind == CROSSING:
            return f"{self.angstrom:.{digits}f} Å"
        if self.kind == NO_CROSSING:
            return f"≤ {self.limit:.{digits}f} Å (Nyquist)"
        return f"> {self.limit:.{digits}f} Å (box edge)"

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict:
        """JSON-friendly: the number only for a crossing (null otherwise), with the kind."""
        return {"threshold": self.threshold, "kind": self.kind, "angstrom": self.angstrom,
                "limit": self.limit}


@dataclass(frozen=True)
class FSCCurve:
    """FSC per shell: ``shell`` index, ``frequency`` in Å⁻¹, ``correlation``, ``n_voxels``."""

    shell: np.ndarray
    frequency: np.ndarray
    correlation: np.ndarray
    n_voxels: np.ndarray
    box: int
    voxel_size: float

    def resolution(self, threshold: float) -> Resolution:
        return fsc_resolution(self, threshold)

    def up_to(self, max_frequency: float) -> FSCCurve:
        """The curve up to ``max_frequency`` (Å⁻¹): a map sampled more coarsely than this grid
        holds nothing beyond its own Nyquist, so shells past it would only show interpolation."""
        keep = self.frequency <= max_frequency + 1e-12
        keep[:2] = True  # shells 0 and 1 always: a resolution needs them
        return FSCCurve(self.shell[keep], self.frequency[keep], self.correlation[keep],
                        self.n_voxels[keep], self.box, self.voxel_size)

    def to_dict(self) -> dict:
        """Plain lists and the resolutions at the standard thresholds (for layer metadata).

        ``resolution_<t>`` holds the Å of a crossing and None otherwise, ``resolution_<t>_kind``
        says which case it is (see ``Resolution``); every value is JSON-friendly.
        """
        resolutions = {t: fsc_resolution(self, t) for t in FSC_THRESHOLDS}
        return {
            "frequency": self.frequency.tolist(),
            "correlation": self.correlation.tolist(),
            "box": self.box,
            "voxel_size": self.voxel_size,
            **{f"resolution_{t:g}": r.angstrom for t, r in resolutions.items()},
            **{f"resolution_{t:g}_kind": r.kind for t, r in resolutions.items()},
        }


def fsc(a: np.ndarray, b: np.ndarray, voxel_size: float) -> FSCCurve:
    """Fourier shell correlation of two cubic volumes on the same grid."""
    from scipy import fft

    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape or a.ndim != 3 or len(set(a.shape)) != 1:
        raise ValueError(
            f"FSC needs two cubic volumes of the same size; got {a.shape} and {b.shape}. "
            "Preprocess both onto the same cubic box first."
        )
    n = a.shape[0]
    fa, fb = fft.rfftn(a), fft.rfftn(b)
    k = np.fft.fftfreq(n, d=1.0 / n)
    kx = np.fft.rfftfreq(n, d=1.0 / n)
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    shells = np.rint(radius).astype(int)
    # rfftn stores half the spectrum: every column but kx = 0 (and kx = N/2) stands for two.
    weight = np.full(kx.shape, 2.0)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    weight = np.broadcast_to(weight, shells.shape)
    n_shells = n // 2 + 1
    inside = shells < n_shells

    def shell_sum(values):
        return np.bincount(shells[inside], (weight * values)[inside], minlength=n_shells)

    cross = shell_sum((fa * np.conj(fb)).real)
    power_a = shell_sum(np.abs(fa) ** 2)
    power_b = shell_sum(np.abs(fb) ** 2)
    denominator = np.sqrt(power_a * power_b)
    correlation = np.divide(cross, denominator, out=np.zeros(n_shells), where=denominator > 0)
    shell = np.arange(n_shells)
    return FSCCurve(
        shell=shell,
        frequency=shell / (n * voxel_size),
        correlation=correlation,
        n_voxels=np.bincount(shells[inside], weight[inside], minlength=n_shells),
        box=n,
        voxel_size=float(voxel_size),
    )


def fsc_between_maps(a: DensityMap, b: DensityMap) -> FSCCurve:
    """FSC of two maps on the same voxel grid; a non-cubic grid is zero-padded to a cube.

    Maps on different grids (voxel size, shape or origin) are refused: resampling one onto the
    other would change the curve, so that choice is left to the user (reconstructions are
    already on their input's grid). Errors call the maps "map A" and "map B", in that order.
    """
    for name, m in (("map A", a), ("map B", b)):
        if m.voxel_size is None:
            raise ValueError(f"{name[0].upper()}{name[1:]} has no voxel size: FSC needs it to put the curve in Å⁻¹. "
                             "Set the layer's scale (Å per voxel) first.")
    anisotropic = {name: tuple(m.voxel_size) for name, m in (("map A", a), ("map B", b))
                   if not np.allclose(m.voxel_size, m.voxel_size[0], rtol=1e-4)}
    if anisotropic:
        sizes = set(anisotropic.values())
        sizes_text = (f"{_format_zyx(sizes.pop())} Å" if len(sizes) == 1 else
                      "; ".join(f"{name} {_format_zyx(v)} Å" for name, v in anisotropic.items()))
        subject = " and ".join(anisotropic)
        subject = subject[0].upper() + subject[1:]
        raise ValueError(f"{subject} {'has' if len(anisotropic) == 1 else 'have'}"
                         f" anisotropic voxels ({sizes_text} along z, y, x): FSC shells need the "
                         "same voxel size along every axis. Resample to isotropic voxels first.")
    va, vb = float(a.voxel_size[0]), float(b.voxel_size[0])
    differences = []
    if not np.isclose(va, vb, rtol=1e-4):
        differences.append(f"voxel sizes {va:g} and {vb:g} Å")
    if a.shape != b.shape:
        differences.append(f"shapes {_format_zyx(a.shape)} and {_format_zyx(b.shape)}")
    if not np.allclose(a.origin, b.origin, rtol=0, atol=1e-3 * min(va, vb)):
        differences.append(f"origins {_format_zyx(a.origin)} and {_format_zyx(b.origin)} Å")
    if differences:
        raise ValueError(f"Map A and map B are on different voxel grids ({'; '.join(differences)}"
                         "): FSC compares two maps voxel by voxel. Resample one onto the "
                         "other's grid first.")
    edge = max(a.shape)
    return fsc(_pad_to_cube(a.data, edge), _pad_to_cube(b.data, edge), va)


def _format_zyx(values) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def _pad_to_cube(data: np.ndarray, edge: int) -> np.ndarray:
    return np.pad(data, [(0, edge - n) for n in data.shape])


def fsc_curves_csv(curves: dict[str, dict]) -> str:
    """CSV text of FSC curves given as ``FSCCurve.to_dict()`` dicts, keyed by label."""
    lines = ["curve,frequency_per_angstrom,resolution_angstrom,fsc"]
    for label, curve in curves.items():
        for f, c in zip(curve["frequency"], curve["correlation"]):
            resolution = f"{1 / f:.4f}" if f > 0 else ""  # shell 0 has no resolution
            lines.append(f'"{label}",{f:.6f},{resolution},{c:.6f}')
    return "\n".join(lines) + "\n"


def fsc_resolution(curve: FSCCurve | Mapping, threshold: float) -> Resolution:
    """Where the FSC first drops below ``threshold`` after shell 0 (the mean), as a ``Resolution``.

    ``curve`` is an ``FSCCurve`` or its ``to_dict()`` (only "frequency" and "correlation" are
    read). The frequency is linear in the shell index, s / (N · voxel), so interpolating it
    between the two shells around the crossing gives N · voxel / s* exactly.
    """
    if isinstance(curve, FSCCurve):
        frequency, c = curve.frequency, curve.correlation
    else:
        frequency, c = curve["frequency"], curve["correlation"]
    frequency, c = np.asarray(frequency, float), np.asarray(c, float)
    if frequency.size < 2:
        raise ValueError("An FSC curve needs at least shells 0 and 1.")
    below = np.nonzero(c[1:] < threshold)[0]
    if below.size == 0:
        return Resolution(threshold, NO_CROSSING, limit=float(1 / frequency[-1]))
    s1 = int(below[0]) + 1  # first shell below the threshold; s1 − 1 is still at or above it
    if s1 == 1:  # below already at shell 1: the crossing, if any, lies beyond the box edge
        return Resolution(threshold, BEYOND_THE_BOX, limit=float(1 / frequency[1]))
    s0 = s1 - 1
    f_star = frequency[s0] + (c[s0] - threshold) / (c[s0] - c[s1]) * (frequency[s1] - frequency[s0])
    return Resolution(threshold, CROSSING, angstrom=float(1 / f_star))


def scale_like_target(prediction: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply to both volumes the affine map that takes the target to [0, 1]."""
    low, high = float(target.min()), float(target.max())
    span = high - low if high > low else 1.0
    return (prediction - low) / span, (target - low) / span


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps over every voxel (0 when either is constant)."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def mse(prediction: np.ndarray, target: np.ndarray) -> float:
    p, t = scale_like_target(prediction, target)
    return float(np.mean((p - t) ** 2))


def rmse(prediction: np.ndarray, target: np.ndarray) -> float:
    """Root-mean-square error on the [0, 1] scale of the target (as ``mse``)."""
    return float(np.sqrt(mse(prediction, target)))


def psnr(prediction: np.ndarray, target: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, with the target scaled to a peak of 1."""
    error = mse(prediction, target)
    return float("inf") if error == 0 else float(10.0 * np.log10(1.0 / error))


def ssim(prediction: np.ndarray, target: np.ndarray) -> float:
    """3-D structural similarity (Gaussian window σ = 1.5 voxels) on the [0, 1] scale."""
    from skimage.metrics import structural_similarity

    p, t = scale_like_target(prediction, target)
    return float(
        structural_similarity(
            p, t, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
    )


def binary_level(target: np.ndarray, sigma: float = DEFAULT_BINARY_LEVEL_SIGMA) -> float:
    """The density level used to binarise for IoU and F1: target mean + ``sigma`` · std."""
    return float(target.mean() + sigma * target.std())


def iou(prediction: np.ndarray, target: np.ndarray, level: float | None = None) -> float:
    level = binary_level(target) if level is None else level
    p, t = prediction >= level, target >= level
    union = np.logical_or(p, t).sum()
    return float(np.logical_and(p, t).sum() / union) if union else 1.0


def f1(prediction: np.ndarray, target: np.ndarray, level: float | None = None) -> float:
    """F1 (Dice) score of the binarised volumes."""
    level = binary_level(target) if level is None else level
    p, t = prediction >= level, target >= level
    total = p.sum() + t.sum()
    return float(2 * np.logical_and(p, t).sum() / total) if total else 1.0


def voxel_metrics(prediction: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """MSE, PSNR, SSIM, IoU and F1 of one volume pair (definitions in the module docstring)."""
    return {
        "mse": mse(prediction, target),
        "psnr": psnr(prediction, target),
        "ssim": ssim(prediction, target),
        "iou": iou(prediction, target),
        "f1": f1(prediction, target),
    }


def reconstruction_metrics(
    prediction: np.ndarray, target: np.ndarray, voxel_size: float
) -> dict[str, float | Resolution]:
    """Every Table 1 metric for one volume pair: ``voxel_metrics`` and the FSC ``Resolution``s."""
    curve = fsc(prediction, target, voxel_size)
    return {
        **voxel_metrics(prediction, target),
        **{f"fsc_{t:g}": fsc_resolution(curve, t) for t in FSC_THRESHOLDS},
    }
