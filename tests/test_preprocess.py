"""The ProteinNet3D preprocessing steps, each on its own, then the pipeline."""

import numpy as np
import pytest

from napari_cryoswan import preprocess as preprocess_module
from napari_cryoswan.io import DensityMap, read_map
from napari_cryoswan.metrics import fsc
from napari_cryoswan.preprocess import (
    CroppedDensityWarning,
    PreprocessSettings,
    augment,
    centre_of_mass,
    contour_mask,
    crop_or_pad,
    crop_spectrum,
    cropped_shape,
    denormalise,
    inscribed_sphere,
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


def test_inscribed_sphere_keeps_the_sphere_and_fills_the_corners_with_the_background():
    rng = np.random.default_rng(4)
    box = rng.normal(-0.5, 0.1, (20, 20, 20)).astype(np.float32)
    box += gaussian_blob(box.shape, (8.0, 10.0, 11.0), sigma=2.5)  # the particle
    box[0, 0, 0] = box[19, 19, 0] = 3.0  # and density in two corners
    kept = inscribed_sphere(box)
    radius = np.sqrt(((np.indices(box.shape) - 9.5) ** 2).sum(0))
    np.testing.assert_array_equal(kept[radius <= 9.5], box[radius <= 9.5])
    corners = kept[radius > 9.5]
    assert np.all(corners == corners[0]) and corners[0] == pytest.approx(-0.5, abs=0.05)
    # A rotation about the centre turns what the sphere holds and nothing else.
    turned = np.rot90(box, 1, axes=(1, 2))
    np.testing.assert_allclose(inscribed_sphere(turned), np.rot90(kept, 1, axes=(1, 2)), atol=1e-2)
    # Non-cubic: the sphere of the shortest side; too small a box is kept as it is.
    assert inscribed_sphere(np.ones((6, 10, 10), np.float32))[0, 0, 0] == 1.0
    tiny = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    np.testing.assert_array_equal(inscribed_sphere(tiny), tiny)
    # All of the density in the corners (a capsid wider than the box): nothing to keep.
    corners_only = np.where(radius > 12, box, -0.5).astype(np.float32)
    np.testing.assert_array_equal(inscribed_sphere(corners_only), corners_only)


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


# ─── fine maps: spectrum cropping before the low-pass ────────────────────────────────────────


def smooth_map(shape=(150, 160, 140), voxel=0.8):
    """A particle of a few dozen overlapping blobs (σ 2–4 Å), well inside a box of fine voxels."""
    rng = np.random.default_rng(11)
    extent = np.array(shape) * voxel
    out = np.zeros(shape, np.float32)
    for _ in range(40):
        out += rng.uniform(0.3, 1.0) * gaussian_blob(shape, extent / 2 + rng.normal(size=3) * 12.0,
                                                     rng.uniform(2.0, 4.0), voxel=(voxel,) * 3)
    return out


def test_cropped_shape_goes_to_half_the_target_voxel():
    assert cropped_shape((640, 640, 640), (0.8,) * 3, 4.0) == (256, 256, 256)
    assert cropped_shape((512, 512, 512), (1.0,) * 3, 4.0) == (256, 256, 256)
    # An axis already at half the target or coarser keeps its length; 63 → 64 FFTs faster.
    assert cropped_shape((100, 100, 100), (0.5, 2.0, 3.0), 4.0) == (25, 100, 100)
    assert cropped_shape((126, 10, 10), (1.0, 2.0, 2.5), 4.0) == (64, 10, 10)


def test_crop_spectrum_keeps_every_frequency_below_the_new_nyquist(monkeypatch):
    monkeypatch.setattr(preprocess_module, "_SLAB_VOXELS", 500)  # many slabs
    n, m = (48, 40, 36), (20, 25, 36)
    grids = np.meshgrid(*[np.arange(k, dtype=float) for k in n], indexing="ij")
    # Periodic waves with frequencies (cycles per box) below every new Nyquist limit.
    waves = [((1, 3, 2), 0.3), ((4, -5, 7), 1.1), ((9, 2, -12), -0.4)]

    def field(coords, box):
        return sum(np.cos(2 * np.pi * sum(k * c / b for k, c, b in zip(ks, coords, box)) + phase)
                   for ks, phase in waves)

    data = field(grids, n).astype(np.float32)
    cropped = crop_spectrum(data, m)
    coarse = np.meshgrid(*[np.arange(j) * a / b for j, a, b in zip(m, n, m)], indexing="ij")
    np.testing.assert_allclose(cropped, field(coarse, n), atol=2e-5)
    assert cropped.dtype == np.float32


def test_periodic_spline_sampling_matches_scipy():
    from scipy.ndimage import affine_transform, spline_filter

    from napari_cryoswan.preprocess import _fourier_filter, _sample_periodic_spline

    data = np.random.default_rng(6).normal(size=(20, 24, 18)).astype(np.float32)
    voxel = (2.0, 2.0, 2.0)
    # The spline prefilter folded into the low-pass gives scipy's periodic spline coefficients...
    coefficients = _fourier_filter(data, voxel, 8.0, spline=True)
    reference = spline_filter(lowpass(data, voxel, 8.0).astype(np.float64), order=3, mode="grid-wrap")
    np.testing.assert_allclose(coefficients, reference, atol=1e-4)
    # ...and sampling them axis by axis gives what affine_transform (grid-wrap) gives.
    scale, offset, shape = np.array([0.45, 0.5, 0.55]), np.array([-0.7, 0.2, 1.3]), (45, 49, 33)
    positions = [o + np.arange(k) * s for o, k, s in zip(offset, shape, scale)]
    expected = affine_transform(reference, scale, offset=offset, output_shape=shape, order=3,
                                mode="grid-wrap", prefilter=False)
    np.testing.assert_allclose(_sample_periodic_spline(coefficients, positions), expected, atol=1e-4)


def old_resample(data, voxel, new_voxel):
    """The direct path as it was: low-pass on the full grid, then a cubic spline (zero outside)."""
    from scipy.ndimage import affine_transform

    old_shape = np.asarray(data.shape)
    new_shape = np.round(old_shape * np.asarray(voxel) / new_voxel).astype(int)
    step = new_voxel / np.asarray(voxel)
    start = (old_shape - 1) / 2 - (new_shape - 1) / 2 * step
    return affine_transform(lowpass(data, voxel, 2 * new_voxel), step, offset=start,
                            output_shape=tuple(new_shape), order=3, mode="grid-constant")


def test_cropped_path_matches_the_direct_path():
    data = smooth_map()
    fast, shift_fast, cutoff_fast = resample(data, (0.8,) * 3, 4.0)
    direct, shift_direct, cutoff_direct = resample(data, (0.8,) * 3, 4.0, fourier_crop=False)
    old = old_resample(data, (0.8,) * 3, 4.0)
    assert fast.shape == direct.shape == old.shape == (30, 32, 28) and fast.dtype == np.float32
    assert shift_fast == shift_direct and cutoff_fast == cutoff_direct == 8.0
    for reference in (direct, old):
        assert np.corrcoef(fast.ravel(), reference.ravel())[0, 1] > 0.9999
        np.testing.assert_allclose(fast, reference, atol=2e-3 * reference.max())
    # and through the whole pipeline: the same box, the same Fourier shells up to the cutoff
    density = DensityMap(data, (0.8,) * 3, origin=(-30.0, 12.0, 4.0))
    a = preprocess(density)
    b = preprocess(density, PreprocessSettings(fourier_crop=False))
    for field in ("box_origin", "crop_start", "resampled_shape", "lowpass_cutoff"):
        assert getattr(a.record, field) == getattr(b.record, field)
    assert np.corrcoef(a.data.ravel(), b.data.ravel())[0, 1] > 0.999
    curve = fsc(a.data, b.data, 4.0)
    shells = (curve.frequency > 0) & (curve.frequency <= 1 / 8.0)  # the mean (shell 0) is removed
    assert curve.correlation[shells].min() > 0.999


@pytest.mark.parametrize("fourier_crop", [True, False])
def test_a_feature_lands_at_its_place_in_angstrom(fourier_crop):
    """A blob at a known position of a 0.8 Å map stays there, in Å, through preprocessing."""
    voxel, shape, origin = (0.8, 0.8, 0.8), (140, 150, 130), np.array([-20.0, 35.0, 7.5])
    centre = np.array([51.3, 63.7, 47.1])  # Å from voxel 0, off every grid
    blob = gaussian_blob(shape, centre, sigma=6.0, voxel=voxel)  # all below the 8 Å cutoff
    density = DensityMap(blob, voxel, origin=tuple(origin))
    out = preprocess(density, PreprocessSettings(normalise=False, fourier_crop=fourier_crop))
    com_world = np.asarray(out.record.box_origin) + centre_of_mass(out.data) * 4.0
    np.testing.assert_allclose(com_world, origin + centre, atol=0.05)
    # The resampled grid keeps the same centre as the input.
    data, shift, _ = resample(blob, voxel, 4.0, fourier_crop=fourier_crop)
    np.testing.assert_allclose(np.asarray(shift) + (np.array(data.shape) - 1) / 2 * 4.0,
                               (np.array(shape) - 1) / 2 * 0.8)
    np.testing.assert_allclose(physical_com(data, (4.0,) * 3, origin=shift), centre, atol=0.05)


def test_read_only_input_is_fine():
    data = smooth_map((60, 64, 56), 1.0)
    data.setflags(write=False)
    out, _, _ = resample(data, (1.0,) * 3, 4.0)
    assert out.shape == (15, 16, 14)


def test_contour_mask_in_slabs_is_the_same_as_whole(monkeypatch):
    from scipy.ndimage import distance_transform_edt

    blob = gaussian_blob((40, 36, 30), (20, 18, 15), sigma=5.0) + gaussian_blob((40, 36, 30), (8, 9, 10), 2.0)
    voxel, level, edge = (1.5, 1.0, 1.2), 0.5, 6.0
    inside = blob >= level
    ramp = np.clip(distance_transform_edt(~inside, sampling=voxel) / edge, 0, 1)
    whole = (0.5 * (1 + np.cos(np.pi * ramp))).astype(np.float32)
    monkeypatch.setattr(preprocess_module, "_SLAB_VOXELS", 36 * 30)  # one section a slab
    np.testing.assert_allclose(contour_mask(blob, level, voxel, edge), whole, atol=1e-6)
    masked = preprocess_module._masked(blob, level, voxel, edge)
    np.testing.assert_allclose(masked, blob * whole, atol=1e-6)


def test_denormalise_undoes_the_z_scoring():
    density = DensityMap(smooth_map((60, 64, 56), 1.0) * 3.0 + 0.5, (1.0,) * 3)
    normalised = preprocess(density)
    raw = preprocess(density, PreprocessSettings(normalise=False))
    assert normalised.record.std is not None and raw.record.std is None
    np.testing.assert_allclose(denormalise(normalised.data, normalised.record), raw.data, atol=1e-5)
    restored = denormalise(raw.data, raw.record)
    assert restored.dtype == np.float32
    np.testing.assert_array_equal(restored, raw.data)
