"""Metrics, with the FSC checked against analytic cases."""

import json

import numpy as np
import pytest

from napari_cryoswan.io import DensityMap
from napari_cryoswan.metrics import (
    FSCCurve,
    binary_level,
    f1,
    fsc,
    fsc_between_maps,
    fsc_curves_csv,
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
    resolution = fsc_resolution(curve, 0.143)  # never crosses: Nyquist is all the grid shows
    assert (resolution.kind, resolution.angstrom, resolution.limit) == ("no crossing", None, 8.0)
    assert resolution.format() == "≤ 8.0 Å (Nyquist)"


def test_independent_noise_does_not_correlate(noise):
    other = np.random.default_rng(1).normal(size=noise.shape).astype(np.float32)
    curve = fsc(noise, other, voxel_size=4.0)
    # beyond the first few shells each holds hundreds of voxels: |FSC| ~ 1/sqrt(n)
    assert np.all(np.abs(curve.correlation[3:]) < 4 / np.sqrt(curve.n_voxels[3:]))
    resolution = fsc_resolution(curve, 0.5)
    assert resolution.kind != "crossing" or resolution.angstrom > 64 * 4.0 / 3


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
        resolution = fsc_resolution(curve, threshold)
        assert resolution.kind == "crossing"
        crossing_shell = 64 * 4.0 / resolution.angstrom
        assert abs(crossing_shell - cutoff_shell) <= 1.0


def curve_of(correlation, box=8, voxel_size=4.0) -> FSCCurve:
    shells = np.arange(len(correlation))
    return FSCCurve(shells, shells / (box * voxel_size), np.asarray(correlation, float),
                    np.ones(len(correlation)), box=box, voxel_size=voxel_size)


def test_crossing_is_interpolated_between_shells():
    curve = curve_of([1.0, 0.9, 0.7, 0.3, 0.1])
    # crosses 0.5 halfway between shells 2 and 3: s* = 2.5, resolution = 8·4/2.5
    resolution = fsc_resolution(curve, 0.5)
    assert resolution.kind == "crossing" and resolution.angstrom == pytest.approx(32 / 2.5)
    assert resolution.format() == "12.8 Å" and resolution.limit is None
    # the same from the curve's dict, as layers and reports store it
    assert fsc_resolution(curve.to_dict(), 0.5) == resolution == curve.resolution(0.5)


@pytest.mark.parametrize("correlation", [
    [1.0, 0.3, 0.2, 0.1, 0.0],  # drops between shell 0 (the mean) and shell 1: was 280 Å-like
    [0.0, 0.3, 0.2, 0.1, 0.0],  # nothing correlates, not even the mean: was "inf Å"
])
def test_a_curve_below_the_threshold_from_shell_1_is_beyond_the_box(correlation):
    # a 57-voxel box of 4 Å: the box edge is 228 Å, the coarsest detail the box can measure
    resolution = fsc_resolution(curve_of(correlation, box=57), 0.5)
    assert (resolution.kind, resolution.angstrom) == ("beyond the box", None)
    assert resolution.limit == pytest.approx(228.0)
    assert resolution.format() == "> 228.0 Å (box edge)"


def test_to_dict_is_json_and_says_which_kind(noise):
    beyond = curve_of([1.0, 0.3, 0.2, 0.1, 0.0]).to_dict()
    crossing = curve_of([1.0, 0.9, 0.7, 0.3, 0.1]).to_dict()
    same = fsc(noise, noise, 4.0).to_dict()
    for curve in (beyond, crossing, same):
        json.dumps(curve, allow_nan=False)  # no inf or NaN for a JSON reader to choke on
        assert {"frequency", "correlation", "box", "voxel_size"} <= set(curve)
    assert beyond["resolution_0.5"] is None and beyond["resolution_0.5_kind"] == "beyond the box"
    assert crossing["resolution_0.5"] == pytest.approx(12.8)
    assert crossing["resolution_0.5_kind"] == "crossing"
    assert same["resolution_0.143"] is None and same["resolution_0.143_kind"] == "no crossing"


def test_curves_csv_leaves_the_resolution_of_shell_0_empty():
    rows = fsc_curves_csv({"a": curve_of([1.0, 0.9, 0.7, 0.3, 0.1]).to_dict()}).splitlines()
    assert rows[1] == '"a",0.000000,,1.000000'
    assert rows[2].split(",")[2] == "32.0000"
    assert "inf" not in "".join(rows)


def test_map_pairs_on_different_grids_are_refused_with_the_reason(noise):
    anisotropic = (0.46, 0.39, 0.45)
    with pytest.raises(ValueError) as err:
        fsc_between_maps(DensityMap(noise, anisotropic), DensityMap(noise, anisotropic))
    message = str(err.value)
    assert "anisotropic voxels" in message and "Resample to isotropic voxels" in message
    assert message.count("(0.46, 0.39, 0.45)") == 1  # the size once, not as two "different" ones
    with pytest.raises(ValueError, match=r"^Map B has anisotropic voxels"):
        fsc_between_maps(DensityMap(noise, (1.0, 1.0, 1.0)), DensityMap(noise, anisotropic))
    with pytest.raises(ValueError, match=r"different voxel grids \(voxel sizes 1.1 and 1.2 Å\)"):
        fsc_between_maps(DensityMap(noise, (1.1,) * 3), DensityMap(noise, (1.2,) * 3))
    with pytest.raises(ValueError, match=r"different voxel grids \(shapes \(64, 64, 64\) and "
                                         r"\(64, 64, 32\)\)"):
        fsc_between_maps(DensityMap(noise, (1.0,) * 3), DensityMap(noise[..., :32], (1.0,) * 3))
    with pytest.raises(ValueError, match=r"different voxel grids \(origins \(0, 0, 0\) and "
                                         r"\(0, 0, 10\) Å\)"):
        fsc_between_maps(DensityMap(noise, (1.0,) * 3), DensityMap(noise, (1.0,) * 3, (0, 0, 10)))
    with pytest.raises(ValueError, match="^Map A has no voxel size"):
        fsc_between_maps(DensityMap(noise, None), DensityMap(noise, (1.0,) * 3))
    same_grid = fsc_between_maps(DensityMap(noise, (2.0,) * 3, (5, 5, 5)),
                                 DensityMap(noise, (2.0,) * 3, (5, 5, 5)))
    assert same_grid.voxel_size == 2.0 and same_grid.box == 64


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
    assert metrics["iou"] == 1.0
    assert metrics["fsc_0.5"].kind == "no crossing" and metrics["fsc_0.5"].angstrom is None
