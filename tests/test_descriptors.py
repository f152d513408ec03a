"""Classical shape descriptors: invariances, the Zernike basis against analytic cases, the
registry and refusals of bad input."""

import numpy as np
import pytest
from scipy.special import eval_jacobi

from napari_cryoswan.descriptors import (
    DESCRIPTORS,
    MAX_ORDER,
    _monomials,
    _zernike_tables,
    describe_boxes,
    radial_power_spectrum,
    raw_voxels,
    zernike_basis,
    zernike_descriptors,
    zernike_labels,
)
from napari_cryoswan.preprocess import rotate

BOX = 64
INVARIANT = ["radial_power_spectrum", "zernike", "zernike_prefiltered", "radial_power_spectrum_sphere",
             "zernike_prefiltered_sphere"]
# How far (as a fraction of the distance between the two different shapes) a rotated copy may
# move. The spectrum's low shells hold a few hundred coefficients, so they sample an anisotropic
# spectrum sparsely and a rotation shifts them by a few %; the Zernike invariants are exact up to
# the interpolation.
ROTATED_TOLERANCE = {"radial_power_spectrum": 0.35, "zernike": 0.01, "zernike_prefiltered": 0.01,
                     "radial_power_spectrum_sphere": 0.35, "zernike_prefiltered_sphere": 0.01}


def blobs(centres, sigmas=(3.0, 2.5, 3.5, 2.0, 3.0)) -> np.ndarray:
    """A sum of Gaussian blobs; centres in voxels from the box centre, (z, y, x)."""
    grid = np.indices((BOX,) * 3, dtype=float) - (BOX - 1) / 2
    out = np.zeros((BOX,) * 3)
    for centre, sigma in zip(centres, sigmas):
        offset = grid - np.asarray(centre, float)[:, None, None, None]
        out += np.exp(-(offset**2).sum(0) / (2 * sigma**2))
    return out


@pytest.fixture(scope="module")
def shape_a():
    return blobs([(0, 0, 0), (8, 0, 0), (0, 10, 2), (-3, -4, 9), (-9, 5, -6)])


@pytest.fixture(scope="module")
def shape_b():
    # The same five blobs, two of them elsewhere: about as big as A, differently shaped.
    return blobs([(0, 0, 0), (8, 0, 0), (0, 10, 2), (-3, -4, -9), (9, 5, -6)])


@pytest.fixture(scope="module")
def rotation():
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("zyx", [37, -61, 113], degrees=True).as_matrix()


def distance(u, v) -> float:
    return float(np.linalg.norm(np.asarray(u, float) - np.asarray(v, float)))


@pytest.mark.parametrize("name", INVARIANT)
def test_a_rotated_copy_stays_much_nearer_than_another_shape(name, shape_a, shape_b, rotation):
    describe = DESCRIPTORS[name]
    a, b = describe(shape_a), describe(shape_b)
    other_shape = distance(a, b)
    quarter_turn = describe(np.rot90(shape_a, 1, axes=(0, 2)))
    interpolated = describe(rotate(shape_a, rotation))
    assert distance(a, quarter_turn) < 1e-3 * other_shape  # exact on the grid
    assert distance(a, interpolated) < ROTATED_TOLERANCE[name] * other_shape


def test_raw_voxels_are_z_scored_block_means_and_see_rotations(shape_a, shape_b):
    vector = raw_voxels(shape_a)
    assert vector.dtype == np.float32 and vector.shape == ((BOX // 2) ** 3,)
    assert abs(vector.mean()) < 1e-5 and vector.std() == pytest.approx(1.0, abs=1e-5)
    expected = shape_a.reshape(32, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(vector, ((expected - expected.mean()) / expected.std()).ravel(),
                               atol=1e-5)
    np.testing.assert_allclose(raw_voxels(3 * shape_a + 7), vector, atol=1e-5)
    assert raw_voxels(shape_a, downsample=1).shape == (BOX**3,)
    # Not invariant, on purpose: a quarter turn moves it as far as another shape does.
    quarter_turn = raw_voxels(np.rot90(shape_a, 1, axes=(0, 2)))
    assert distance(vector, quarter_turn) > 0.5 * distance(vector, raw_voxels(shape_b))


def test_a_box_not_divisible_by_the_block_is_padded_not_cut(shape_a):
    odd = shape_a[:63, :62, :61]
    assert raw_voxels(odd).shape == (32 * 31 * 31,)


@pytest.mark.parametrize("name", INVARIANT)
def test_scale_and_offset_of_the_density_do_not_matter(name, shape_a):
    describe = DESCRIPTORS[name]
    np.testing.assert_allclose(describe(5.0 * shape_a - 2.0), describe(shape_a), atol=1e-5)


def test_zernike_invariants_ignore_where_the_shape_sits(shape_a):
    moved = np.roll(shape_a, (3, -2, 4), axis=(0, 1, 2))
    np.testing.assert_allclose(zernike_descriptors(moved), zernike_descriptors(shape_a), atol=1e-6)


def test_a_filament_cut_by_its_box_is_described_alike_only_within_the_sphere(filament_copies):
    """Turned onto the diagonal, the box cuts a longer piece of it: the radius of gyration, and
    so the Zernike ball, changes unless both sides keep the same sphere."""
    original, turned, other = filament_copies
    for name, copy_nearer in (("zernike_prefiltered", False), ("zernike_prefiltered_sphere", True)):
        a, b, c = (DESCRIPTORS[name](box) for box in (original, turned, other))
        assert (distance(a, b) < 0.1 * distance(a, c)) is copy_nearer, name


def test_radial_power_spectrum_of_white_noise_is_flat():
    noise = np.random.default_rng(0).normal(size=(BOX,) * 3)
    spectrum = radial_power_spectrum(noise)
    assert spectrum.shape == (32,) and spectrum.dtype == np.float32
    # Every shell holds the same mean power, 1/32 of the total, up to shot noise: shell s
    # averages about 2πs² independent |F|² (exponentially distributed), so 4 standard
    # deviations are 4/√(2πs²) of the power, 1/ln 10 of that in log10.
    shell = np.arange(1, 33)
    tolerance = 4 / np.sqrt(2 * np.pi * shell**2) / np.log(10)
    assert np.all(np.abs(spectrum - np.log10(1 / 32)) < tolerance)
    assert radial_power_spectrum(noise, shells=8).shape == (8,)


def test_zernike_of_a_sphere_has_only_l_0_terms_with_their_analytic_values():
    from scipy.integrate import quad

    radius = 12.0  # voxels
    grid = np.indices((BOX,) * 3) - (BOX - 1) / 2
    ball = (np.sqrt((grid**2).sum(0)) <= radius).astype(float)
    vector = zernike_descriptors(ball, weighting="binary")
    labels = zernike_labels()
    assert len(vector) == len(labels) == 36
    # The unit ball is 2 radii of gyration: a solid sphere of radius a has Rg = √(3/5)·a, so it
    # fills the ball to rho = 1/(2√0.6) whatever its size; Ω_n00 is the mean of Z_n00 over it.
    rho = 1 / (2 * np.sqrt(0.6))
    for value, (n, l) in zip(vector, labels):
        if l > 0:  # a voxelised sphere keeps the cube's l = 4, 6, … symmetry: small, not 0
            assert value < 0.015 * vector.max(), (n, l)
            continue
        radial = quad(lambda u: np.sqrt(2 * n + 3) * eval_jacobi(n // 2, 0, 0.5, 2 * u * u - 1)
                      * u * u, 0, rho)[0]
        expected = abs(3 / rho**3 * radial / np.sqrt(4 * np.pi))
        assert value == pytest.approx(expected, rel=0.02, abs=2e-3), (n, l)


def test_zernike_basis_is_orthonormal_on_the_ball():
    order = 8
    # A product rule exact for polynomials of degree < 24: Gauss–Legendre in r (with r² dr) and
    # in cos θ, equally spaced in φ.
    r, r_weight = np.polynomial.legendre.leggauss(12)
    r, r_weight = (r + 1) / 2, r_weight / 2 * ((r + 1) / 2) ** 2
    cos_theta, theta_weight = np.polynomial.legendre.leggauss(12)
    phi = np.arange(24) * 2 * np.pi / 24
    R, C, P = np.meshgrid(r, cos_theta, phi, indexing="ij")
    S = np.sqrt(1 - C**2)
    points = np.stack([R * C, R * S * np.sin(P), R * S * np.cos(P)], -1).reshape(-1, 3)
    weights = (r_weight[:, None, None] * theta_weight[None, :, None]
               * np.full(24, 2 * np.pi / 24)[None, None, :]).ravel()
    basis = zernike_basis(points, order)
    gram = basis.T @ (basis * weights[:, None])
    np.testing.assert_allclose(gram, np.eye(len(gram)), atol=1e-10)


def test_the_polynomial_form_reproduces_the_basis():
    order = 10
    tables = _zernike_tables(order)
    points = np.random.default_rng(3).uniform(-0.577, 0.577, size=(500, 3))  # inside the ball
    exponents = np.stack(tables.exponents, axis=1)
    np.testing.assert_allclose(_monomials(points, exponents) @ tables.chi,
                               zernike_basis(points, order), atol=1e-8)


def test_a_gaussian_prefilter_rescues_a_noisy_copy(shape_a, shape_b, rotation):
    rng = np.random.default_rng(0)
    noisy = rotate(shape_a, rotation)
    noisy = noisy + rng.normal(scale=np.sqrt(noisy.var() / 0.5), size=noisy.shape)  # SNR 0.5
    describe = DESCRIPTORS["zernike_prefiltered"]
    query = describe(noisy)
    assert distance(query, describe(shape_a)) < distance(query, describe(shape_b))


def test_the_weighting_and_ball_options():
    grid = np.indices((BOX,) * 3) - (BOX - 1) / 2
    ball = (np.sqrt((grid**2).sum(0)) <= 10).astype(float)
    # for a solid ball the binary mask and the height above a 0.5 contour are the same shape
    np.testing.assert_allclose(zernike_descriptors(ball, contour=0.5, weighting="binary"),
                               zernike_descriptors(ball, contour=0.5), atol=1e-6)
    by_max = zernike_descriptors(ball, weighting="binary", ball_radius="max")
    by_gyration = zernike_descriptors(ball, weighting="binary")
    assert not np.allclose(by_max, by_gyration)
    with pytest.raises(ValueError, match="weighting must be"):
        zernike_descriptors(ball, weighting="mass")
    with pytest.raises(ValueError, match="ball_radius must be"):
        zernike_descriptors(ball, ball_radius=0)


def test_the_registry_round_trips_through_describe_boxes(shape_a, shape_b):
    boxes = np.stack([shape_a, shape_b]).astype(np.float32)
    assert {"raw_voxels", "radial_power_spectrum", "zernike", "zernike_prefiltered"} <= set(
        DESCRIPTORS)
    for name, describe in DESCRIPTORS.items():
        calls = []
        table = describe_boxes(name, boxes, progress=lambda *done_total: calls.append(done_total))
        assert table.dtype == np.float32 and table.shape[0] == 2
        for row, box in zip(table, boxes):
            np.testing.assert_array_equal(row, describe(box))
        assert calls == [(1, 2), (2, 2)]
    # options go to the descriptor; a list of boxes works like an array
    table = describe_boxes("zernike", [shape_a, shape_b], order=4)
    assert table.shape == (2, len(zernike_labels(4)))
    with pytest.raises(ValueError, match="Unknown descriptor 'fourier'.*zernike"):
        describe_boxes("fourier", boxes)
    with pytest.raises(ValueError, match=r"batch \(N, D, H, W\)"):
        describe_boxes("zernike", shape_a)
    with pytest.raises(ValueError, match="no boxes"):
        describe_boxes("zernike", [])


@pytest.mark.parametrize("name", sorted(DESCRIPTORS))
def test_bad_boxes_are_refused_with_the_reason(name):
    describe = DESCRIPTORS[name]
    with pytest.raises(ValueError, match="constant"):
        describe(np.full((BOX,) * 3, 2.0))
    with_nan = np.random.default_rng(0).normal(size=(BOX,) * 3)
    with_nan[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite voxels"):
        describe(with_nan)
    with pytest.raises(ValueError, match=r"one \(D, H, W\) box"):
        describe(np.ones((8, 8)))


def test_bad_options_are_refused_with_the_reason(shape_a):
    with pytest.raises(ValueError, match="No voxel reaches the contour"):
        zernike_descriptors(shape_a, contour=100.0)
    with pytest.raises(ValueError, match="'mean\\+Ksd'"):
        zernike_descriptors(shape_a, contour="1 sigma")
    with pytest.raises(ValueError, match=f"order must be an integer from 0 to {MAX_ORDER}"):
        zernike_descriptors(shape_a, order=MAX_ORDER + 1)
    with pytest.raises(ValueError, match=r"between 1 and half.*\(16 for a \(32, 32, 32\) box"):
        radial_power_spectrum(shape_a[:32, :32, :32], shells=32)
    with pytest.raises(ValueError, match="downsample"):
        raw_voxels(shape_a, downsample=0)
    # "mean+Ksd" accepts other multiples and the minus sign
    assert zernike_descriptors(shape_a, contour="mean+2.5sd").shape == (36,)
    assert zernike_descriptors(shape_a, contour="mean - 0.5 sd").shape == (36,)
