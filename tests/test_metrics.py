"""Metrics, with the FSC checked against analytic cases."""

import numpy as np
import pytest

from napari_cryoswan.metrics import (
    binary_level,
    f1,
    fsc,
    fsc_resolution,
    iou,
    mse,
    psnr,
    reconstruction_metrics,
    ssim,
)
from napari_cryoswan.preprocess import lowpass


@pytest.fixture
def noise():
    return np.random.default_rng(0).normal(size=(64, 64, 64)).astype(np.float32)


def test_identical_maps_correlate_at_every_shell(noise):
    curve = fsc(noise, noise, voxel_size=4.0)
    np.testing.assert_allclose(curve.correlation, 1.0, atol=1e-5)
    assert curve.shell[-1] == 32 and curve.frequency[-1] == pytest.approx(1 / 8.0)
    assert fsc_resolution(curve, 0.143) == pytest.approx(8.0)  # never crosses: Nyquist


def test_independent_noise_does_not_correlate(noise):
    other = np.random.default_rng(1).normal(size=noise.shape).astype(np.float32)
    curve = fsc(noise, other, voxel_size=4.0)
    # beyond the first few shells each holds hundreds of voxels: |FSC| ~ 1/sqrt(n)
    assert np.all(np.abs(curve.correlation[3:]) < 4 / np.sqrt(curve.n_voxels[3:]))
    assert fsc_resolution(curve, 0.5) > 64 * 4.0 / 3


def test_shell_voxel_counts_cover_the_full_spectrum():
    curve = fsc(np.ones((16, 16, 16)), np.ones((16, 16, 16)), 1.0)
    k = np.fft.fftfreq(16, 1 / 16)
    r = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2))
    expected = np.bincount(r[r <= 8].astype(int).ravel())
    np.testing.assert_array_equal(curve.n_voxels, expected)


@pytest.mark.parametrize("cutoff", [12.0, 16.0, 24.0])
def test_a_low_passed_map_crosses_at_its_cutoff(noise, cutoff):
    filtered = lowpass(noise, (4.0, 4.0, 4.0), cutoff=cutoff, edge=0.02)
    curve = fsc(filtered, noise, voxel_size=4.0)
    # FSC = sqrt(P_filtered / P_total) per shell: 1 below the cutoff, 0 above it, so both
    # thresholds cross within one shell (shells are one voxel of |k| wide) of the cutoff.
    cutoff_shell = 64 * 4.0 / cutoff
    for threshold in (0.5, 0.143):
        crossing_shell = 64 * 4.0 / fsc_resolution(curve, threshold)
        assert abs(crossing_shell - cutoff_shell) <= 1.0


def test_crossing_is_interpolated_between_shells():
    from napari_cryoswan.metrics import FSCCurve

    c = np.array([1.0, 0.9, 0.7, 0.3, 0.1])
    curve = FSCCurve(np.arange(5), np.arange(5) / 32.0, c, np.ones(5), box=8, voxel_size=4.0)
    # crosses 0.5 halfway between shells 2 and 3: s* = 2.5, resolution = 8·4/2.5
    assert fsc_resolution(curve, 0.5) == pytest.approx(32 / 2.5)


def test_fsc_refuses_mismatched_or_non_cubic():
    with pytest.raises(ValueError, match="cubic"):
        fsc(np.zeros((8, 8, 6)), np.zeros((8, 8, 6)), 1.0)
    with pytest.raises(ValueError, match="same size"):
        fsc(np.zeros((8, 8, 8)), np.zeros((6, 6, 6)), 1.0)


def test_intensity_metrics_are_scale_free(noise):
    target = noise
    prediction = noise + 0.1 * np.random.default_rng(2).normal(size=noise.shape)
    base = (mse(prediction, target), psnr(prediction, target), ssim(prediction, target))
    scaled = (mse(3 * prediction + 7, 3 * target + 7), psnr(3 * prediction + 7, 3 * target + 7),
              ssim(3 * prediction + 7, 3 * target + 7))
    np.testing.assert_allclose(scaled, base, rtol=1e-4)
    span = target.max() - target.min()
    assert base[0] == pytest.approx(np.mean((prediction - target) ** 2) / span**2, rel=1e-4)
    assert base[1] == pytest.approx(10 * np.log10(1 / base[0]))
    assert psnr(target, target) == float("inf")
    assert ssim(target, target) == pytest.approx(1.0)


def test_iou_and_f1_on_known_overlap():
    target = np.zeros((10, 10, 10))
    target[:, :, :5] = 1  # half the box
    prediction = np.zeros_like(target)
    prediction[:, :, 2:7] = 1  # shifted by 2: overlap 3, union 7 columns
    assert iou(prediction, target, level=0.5) == pytest.approx(3 / 7)
    assert f1(prediction, target, level=0.5) == pytest.approx(2 * 3 / 10)
    assert binary_level(target) == pytest.approx(0.5 + 0.5)


def test_reconstruction_metrics_report_every_table_1_column(noise):
    metrics = reconstruction_metrics(noise, noise, voxel_size=4.0)
    assert set(metrics) == {"mse", "psnr", "ssim", "iou", "f1", "fsc_0.5", "fsc_0.143"}
    assert metrics["iou"] == 1.0 and metrics["fsc_0.5"] == 8.0
