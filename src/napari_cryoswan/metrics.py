"""Reconstruction metrics: MSE, RMSE, PSNR, SSIM, IoU, F1 and the Fourier shell correlation.

Intensity metrics (MSE, RMSE, PSNR, SSIM) are computed after scaling both volumes with the same
affine map that takes the target to [0, 1], so PSNR has a peak of 1 and the numbers do not depend
on how the maps were normalised. IoU and F1 compare the two volumes binarised at one density
level (default: 1 standard deviation above the target's mean, on the z-scored maps the model
sees), which is stated with every report.

FSC follows one definition (GUIDE section 4): shells s = round(|k|) of the full 3-D FFT,
s = 0 … N/2, at frequency s / (N · voxel) Å⁻¹; the resolution at threshold t is N · voxel / s*,
where s* is the first crossing below t, linearly interpolated between the shells around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .io import DensityMap

FSC_THRESHOLDS = (0.5, 0.143)
DEFAULT_BINARY_LEVEL_SIGMA = 1.0


@dataclass(frozen=True)
class FSCCurve:
    """FSC per shell: ``shell`` index, ``frequency`` in Å⁻¹, ``correlation``, ``n_voxels``."""

    shell: np.ndarray
    frequency: np.ndarray
    correlation: np.ndarray
    n_voxels: np.ndarray
    box: int
    voxel_size: float

    def resolution(self, threshold: float) -> float:
        return fsc_resolution(self, threshold)

    def to_dict(self) -> dict:
        """Plain lists and the resolutions at the standard thresholds (for layer metadata)."""
        return {
            "frequency": self.frequency.tolist(),
            "correlation": self.correlation.tolist(),
            "box": self.box,
            "voxel_size": self.voxel_size,
            **{f"resolution_{t:g}": fsc_resolution(self, t) for t in FSC_THRESHOLDS},
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

    Maps on different grids are refused: resampling one onto the other would change the
    curve, so that choice is left to the user (reconstructions are already on their input's grid).
    """
    if a.shape != b.shape:
        raise ValueError(f"The maps have different shapes, {a.shape} and {b.shape}: FSC needs "
                         "two maps on the same voxel grid.")
    if a.voxel_size is None or b.voxel_size is None:
        raise ValueError("FSC needs the voxel size of both maps, to put the curve in Å⁻¹.")
    va, vb = np.asarray(a.voxel_size), np.asarray(b.voxel_size)
    if not (np.allclose(va, vb, rtol=1e-4) and np.allclose(va, va[0], rtol=1e-4)):
        raise ValueError(f"FSC needs the same isotropic voxel size for both maps; got "
                         f"{a.voxel_size} and {b.voxel_size} Å.")
    edge = max(a.shape)
    return fsc(_pad_to_cube(a.data, edge), _pad_to_cube(b.data, edge), float(a.voxel_size[0]))


def _pad_to_cube(data: np.ndarray, edge: int) -> np.ndarray:
    return np.pad(data, [(0, edge - n) for n in data.shape])


def fsc_curves_csv(curves: dict[str, dict]) -> str:
    """CSV text of FSC curves given as ``FSCCurve.to_dict()`` dicts, keyed by label."""
    lines = ["curve,frequency_per_angstrom,resolution_angstrom,fsc"]
    for label, curve in curves.items():
        for f, c in zip(curve["frequency"], curve["correlation"]):
            resolution = f"{1 / f:.4f}" if f > 0 else "inf"
            lines.append(f'"{label}",{f:.6f},{resolution},{c:.6f}')
    return "\n".join(lines) + "\n"


def fsc_resolution(curve: FSCCurve, threshold: float) -> float:
    """Resolution in Å where the FSC first drops below ``threshold``.

    If it never does, the curve stays above the threshold up to Nyquist and the sampling limit
    2 · voxel is returned: the best resolution this grid can show.
    """
    c = curve.correlation
    below = np.nonzero(c[1:] < threshold)[0]
    if below.size == 0:
        return 2.0 * curve.voxel_size
    s1 = int(below[0]) + 1  # first shell below the threshold; s1 − 1 is still at or above it
    s0 = s1 - 1
    if c[s0] < threshold:  # only shell 0 (the mean) preceded the drop: nothing correlates
        return float("inf")
    s_star = s0 + (c[s0] - threshold) / (c[s0] - c[s1])
    return float(curve.box * curve.voxel_size / s_star) if s_star > 0 else float("inf")


def scale_like_target(prediction: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply to both volumes the affine map that takes the target to [0, 1]."""
    low, high = float(target.min()), float(target.max())
    span = high - low if high > low else 1.0
    return (prediction - low) / span, (target - low) / span


def mse(prediction: np.ndarray, target: np.ndarray) -> float:
    p, t = scale_like_target(prediction, target)
    return float(np.mean((p - t) ** 2))


def rmse(prediction: np.ndarray, target: np.ndarray) -> float:
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
) -> dict[str, float]:
    """Every Table 1 metric for one volume pair: ``voxel_metrics`` and the FSC resolutions."""
    curve = fsc(prediction, target, voxel_size)
    return {
        **voxel_metrics(prediction, target),
        **{f"fsc_{t:g}": fsc_resolution(curve, t) for t in FSC_THRESHOLDS},
    }
