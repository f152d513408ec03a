"""The ProteinNet3D preprocessing steps, each on its own, then the pipeline."""

import numpy as np
import pytest

from napari_cryoswan.io import DensityMap, read_map
from napari_cryoswan.preprocess import (
    CroppedDensityWarning,
    PreprocessSettings,
    augment,
    centre_of_mass,
    contour_mask,
    crop_or_pad,
    lowpass,
    normalise,
    preprocess,
    random_rotations,
    resample,
    rotate,
)


def gaussian_blob(shape, centre_zyx, sigma, voxel=(1.0, 1.0, 1.0)):
    grids = np.meshgrid(*[np.arange(n) * v for n, v in zip(shape, voxel)], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre_zyx))
    return np.exp(-r2 / (2 * sigma**2)).astype(np.float32)


def physical_com(data, voxel, origin=(0.0, 0.0, 0.0)):
    return np.asarray(origin) + centre_of_mass(data) * np.asarray(voxel)


def radial_power_above(data, voxel, frequency):
    spectrum = np.abs(np.fft.fftn(data)) ** 2
    f = np.sqrt(sum(np.fft.fftfreq(n, d=v)[tuple(slice(None) if i == a else None for i in range(3))] ** 2
                    for a, (n, v) in enumerate(zip(data.shape, voxel))))
    return spectrum[f > frequency].sum() / spectrum.sum()


def test_lowpass_leaves_nothing_above_the_cutoff():
    noise = np.random.default_rng(0).normal(size=(40, 36, 32)).astype(np.float32)
    voxel = (1.0, 1.2, 1.5)
    assert radial_power_above(noise, voxel, 1 / 8.0) > 0.5
    filtered = lowpass(noise, voxel, cutoff=8.0)
    assert radial_power_above(filtered, voxel, 1 / 8.0) < 1e-10
    # and keeps what lies well below it
    low = gaussian_blob((64, 60, 56), (32, 36, 42), sigma=6.0, voxel=voxel)
    np.testing.assert_allclose(lowpass(low, voxel, cutoff=8.0), low, atol=1e-3)


def test_resample_antialiases_to_the_new_nyquist():
    noise = np.random.default_rng(1).normal(size=(48, 48, 48)).astype(np.float32)
    out, _, cutoff = resample(noise, (1.0, 1.0, 1.0), 2.0)
    assert cutoff == 4.0 and out.shape == (24, 24, 24)
    without, _, _ = resample(noise, (1.0, 1.0, 1.0), 2.0, antialias=False)
    # Aliased noise keeps its full variance; filtered noise keeps only the band below Nyquist.
    assert out.std() < 0.5 * without.std()


@pytest.mark.parametrize("voxel,new_voxel,shape", [((1.0, 1.0, 1.0), 4.0, (130, 120, 110)),
                                                  ((11.4,) * 3, 4.0, (30, 28, 26)),
                                                  ((1.2, 0.9, 1.5), 3.0, (90, 110, 70))])
def test_resample_preserves_the_centre_of_mass(voxel, new_voxel, shape):
    # An off-centre blob that lies well inside the box, so the box edges do not cut it.
    centre = (np.array(shape) * np.array(voxel)) * np.array([0.45, 0.52, 0.55])
    blob = gaussian_blob(shape, centre, sigma=2.5 * max(max(voxel), new_voxel), voxel=voxel)
    out, shift, _ = resample(blob, voxel, new_voxel)
    before = physical_com(blob, voxel)
    after = physical_com(out, (new_voxel,) * 3, origin=shift)
    np.testing.assert_allclose(after, before, atol=0.05 * new_voxel)
    np.testing.assert_array_equal(out.shape, np.round(np.array(shape) * voxel / new_voxel))


def test_crop_and_pad_centre_the_density():
    blob = gaussian_blob((30, 80, 50), (10.3, 60.7, 20.2), sigma=3.0)
    boxed, start, outside = crop_or_pad(blob, 64, centre_of_mass(blob))
    assert boxed.shape == (64, 64, 64)
    np.testing.assert_allclose(centre_of_mass(boxed), 31.5, atol=0.5)
    np.testing.assert_allclose(np.asarray(start) + centre_of_mass(boxed), centre_of_mass(blob), atol=1e-4)
    assert outside < 1e-6
    assert boxed.sum() == pytest.approx(blob.sum(), rel=1e-5)


def test_crop_reports_the_density_that_falls_outside():
    slab = np.ones((10, 100, 10), np.float32)
    boxed, _, outside = crop_or_pad(slab, 10, centre_of_mass(slab))
    assert outside == pytest.approx(0.9)
    assert boxed.sum() == pytest.approx(1000)


def test_contour_mask_has_a_soft_edge():
    blob = gaussian_blob((40, 40, 40), (20, 20, 20), sigma=5.0)
    noisy = blob + 0.05 * np.random.default_rng(2).normal(size=blob.shape).astype(np.float32)
    mask = contour_mask(noisy, level=0.5, voxel_size=(1.0, 1.0, 1.0), soft_edge=4.0)
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert np.all(mask[noisy >= 0.5] == 1.0)
    edge = (mask > 0) & (mask < 1)
    assert edge.any()
    far = np.linalg.norm(np.indices(blob.shape) - 20, axis=0) > 20
    assert np.all(mask[far] == 0)  # beyond contour radius (~5.9) + soft edge
    with pytest.raises(ValueError, match="lower level"):
        contour_mask(noisy, level=10.0, voxel_size=(1.0, 1.0, 1.0), soft_edge=4.0)


def test_normalise_gives_zero_mean_unit_variance():
    data = np.random.default_rng(3).gamma(2.0, 3.0, size=(16, 16, 16)).astype(np.float32)
    out, mean, std = normalise(data)
    assert abs(out.mean()) < 1e-5 and out.std() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(out * std + mean, data, rtol=1e-5)
    with pytest.raises(ValueError, match="constant"):
        normalise(np.ones((4, 4, 4)))


def radial_profile(data):
    centre = (np.asarray(data.shape) - 1) / 2
    r = np.linalg.norm(np.indices(data.shape) - centre[:, None, None, None], axis=0)
    shells = np.round(r).astype(int)
    return np.bincount(shells.ravel(), data.ravel())[:16] / np.bincount(shells.ravel())[:16]


def test_rotation_keeps_the_radial_profile():
    rng = np.random.default_rng(4)
    # An asymmetric object: three blobs of different sizes inside the inscribed sphere.
    obj = sum(gaussian_blob((48, 48, 48), c, s) for c, s in
              [((23.5, 23.5, 23.5), 4.0), ((30, 20, 25), 2.5), ((18, 28, 30), 2.0)])
    for rotation in random_rotations(3, rng):
        rotated = rotate(obj, rotation)
        assert not np.allclose(rotated, obj, atol=1e-2)
        np.testing.assert_allclose(radial_profile(rotated), radial_profile(obj), atol=0.02)


def test_random_rotations_are_proper_and_reproducible():
    a = random_rotations(5, np.random.default_rng(7))
    b = random_rotations(5, np.random.default_rng(7))
    for r, s in zip(a, b):
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-10)
        assert np.linalg.det(r) == pytest.approx(1.0)
        np.testing.assert_array_equal(r, s)


def test_pipeline_on_a_real_map_records_what_it_did(data_dir):
    density = read_map(data_dir / "emd_3197.map.gz")
    out = preprocess(density)
    rec = out.record
    assert out.data.shape == (64, 64, 64) and out.data.dtype == np.float32
    assert abs(out.data.mean()) < 1e-5 and out.data.std() == pytest.approx(1.0, abs=1e-4)
    assert rec.source_voxel_size == pytest.approx((11.4,) * 3)
    assert rec.source_shape == (20, 20, 20)
    assert rec.resampled_shape == (57, 57, 57)  # 20 × 11.4 / 4
    assert rec.lowpass_cutoff is None  # upsampling cannot alias
    assert sum(rec.padding[0]) == 64 - 57
    assert rec.mean is not None and rec.std > 0
    assert isinstance(rec.to_dict(), dict)


def test_pipeline_output_overlays_its_source():
    """The box origin recorded maps each output voxel to the right place in Å."""
    voxel, shape = (1.5, 1.5, 1.5), (90, 100, 110)
    centre = np.array([60.0, 70.0, 80.0])  # Å, from voxel 0
    blob = gaussian_blob(shape, centre, sigma=10.0, voxel=voxel)
    density = DensityMap(blob, voxel, origin=(100.0, -50.0, 20.0))
    settings = PreprocessSettings(normalise=False)
    out = preprocess(density, settings)
    com_world = np.asarray(out.record.box_origin) + centre_of_mass(out.data) * 4.0
    np.testing.assert_allclose(com_world, np.asarray(density.origin) + centre, atol=0.3)


def test_big_map_is_cropped_with_a_warning():
    slab = DensityMap(np.ones((20, 400, 20), np.float32), (4.0, 4.0, 4.0))
    with pytest.warns(CroppedDensityWarning, match=r"84\.\d% of the positive density"):
        out = preprocess(slab)
    assert out.record.fraction_outside == pytest.approx(1 - 64 / 400, abs=0.01)


def test_contour_mask_in_the_pipeline_removes_background():
    # A full 64³ box, so the corners hold background noise rather than padding.
    blob = gaussian_blob((64, 64, 64), (32, 32, 32), sigma=3.0)
    noise = 0.05 * np.random.default_rng(5).normal(size=blob.shape).astype(np.float32)
    density = DensityMap(blob + noise, (4.0, 4.0, 4.0))
    unmasked = preprocess(density, PreprocessSettings(normalise=False))
    out = preprocess(density, PreprocessSettings(contour_level=0.3, normalise=False))
    assert np.abs(unmasked.data[:5, :5, :5]).max() > 0.01
    assert np.all(out.data[:5, :5, :5] == 0)
    assert out.data.max() > 0.5 * unmasked.data.max()  # the particle itself is kept
    assert out.record.contour_level == 0.3


def test_missing_voxel_size_is_refused():
    with pytest.raises(ValueError, match="no voxel size"):
        preprocess(DensityMap(np.ones((8, 8, 8), np.float32), None))


def test_augment_gives_distinct_normalised_copies():
    obj = gaussian_blob((32, 32, 32), (12, 16, 20), 3.0) + gaussian_blob((32, 32, 32), (20, 14, 12), 2.0)
    copies = augment(DensityMap(obj, (4.0,) * 3), PreprocessSettings(), 5, np.random.default_rng(0))
    assert len(copies) == 5
    for copy in copies:
        assert copy.record.rotation is not None
        assert copy.data.std() == pytest.approx(1.0, abs=1e-4)
    assert not np.allclose(copies[0].data, copies[1].data)


def test_rotating_from_precomputed_spline_coefficients_is_the_same():
    from napari_cryoswan.preprocess import spline_coefficients

    obj = gaussian_blob((24, 24, 24), (10, 12, 14), 2.5)
    rotation = random_rotations(1, np.random.default_rng(9))[0]
    np.testing.assert_allclose(rotate(obj, rotation, spline_coefficients(obj)), rotate(obj, rotation),
                               atol=1e-6)
