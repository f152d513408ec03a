"""Textbook codecs at a bit budget, and the bit budget of a model's latent."""

import numpy as np
import pytest

from napari_cryoswan.codecs import (CODEC_NAMES, BudgetTooSmall, DctCodec, _read_varints,
                                    _varints, get_codec, index_stream, latent_bits,
                                    read_index_stream)


def simulated_density(box=32, atoms=60, seed=0):
    """A smooth density: Gaussian 'atoms' (σ = 1.2 voxels) in a ball, z-scored like a map of
    the corpus."""
    rng = np.random.default_rng(seed)
    centres = box / 2 + rng.normal(scale=box / 8, size=(atoms, 3))
    grid = np.indices((box,) * 3).astype(np.float64)
    density = sum(np.exp(-((grid - c[:, None, None, None]) ** 2).sum(0) / (2 * 1.2**2))
                  for c in centres)
    return ((density - density.mean()) / density.std()).astype(np.float32)


def relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def volume():
    return simulated_density()


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_round_trip_through_the_bytes_fits_the_budget(volume, name):
    codec = get_codec(name)
    bits = 6000
    blob = codec.encode(volume, bits)
    assert isinstance(blob, bytes) and len(blob) * 8 <= bits
    recon = codec.decode(bytes(blob), volume.shape)  # a fresh copy: nothing but the bytes
    assert recon.shape == volume.shape and recon.dtype == np.float32
    assert np.array_equal(recon, codec.decode(blob, volume.shape))
    assert relative_error(recon, volume) < 0.5


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_more_bits_give_less_error(volume, name):
    codec = get_codec(name)
    errors = []
    for bits in (1500, 4000, 12000, 40000):
        blob = codec.encode(volume, bits)
        assert len(blob) * 8 <= bits
        errors.append(relative_error(codec.decode(blob, volume.shape), volume))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 2


def test_the_wavelet_codec_at_a_generous_budget_keeps_the_map(volume):
    codec = get_codec("wavelet")
    blob = codec.encode(volume, 60_000)  # 1.8 bits per voxel of a 32³ box
    recon = codec.decode(blob, volume.shape)
    assert np.corrcoef(recon.ravel(), volume.ravel())[0, 1] > 0.999


def test_wavelet_beats_the_dct_low_pass_on_a_compact_density(volume):
    """A compact object with a flat background: what wavelets are good at."""
    errors = {name: relative_error(get_codec(name).decode(get_codec(name).encode(volume, 6000),
                                                          volume.shape), volume)
              for name in CODEC_NAMES}
    assert errors["wavelet"] < errors["dct"]


def test_odd_and_non_cubic_shapes_round_trip():
    volume = simulated_density(box=32)[:27, :30, :20].copy()
    for name in CODEC_NAMES:
        codec = get_codec(name)
        recon = codec.decode(codec.encode(volume, 20000), volume.shape)
        assert recon.shape == volume.shape and relative_error(recon, volume) < 0.3


def test_a_constant_map_and_a_budget_below_the_header():
    flat = np.zeros((16, 16, 16), np.float32)
    for name in CODEC_NAMES:
        codec = get_codec(name)
        assert np.array_equal(codec.decode(codec.encode(flat, 1000), flat.shape), flat)
        with pytest.raises(BudgetTooSmall):
            codec.encode(simulated_density(box=16), 40)


def test_the_dct_codec_keeps_only_low_frequencies(volume):
    """Its stream names a count n; the map it decodes has no energy outside the first n
    coefficients in order of radius."""
    from scipy.fft import dctn

    from napari_cryoswan.codecs import _HEADER, _radial_order

    codec = DctCodec()
    blob = codec.encode(volume, 3000)
    _, count = _HEADER.unpack_from(blob)
    assert 0 < count < volume.size
    spectrum = dctn(codec.decode(blob, volume.shape).astype(np.float64), norm="ortho").ravel()
    assert np.abs(spectrum[_radial_order(volume.shape)[count:]]).max() < 1e-4


def test_the_decoder_rebuilds_exactly_the_quantized_coefficients(volume):
    """What the encoder chose (its step and kept coefficients) is what the decoder rebuilds,
    signs and all: transforming the decoded map gives back round(c / step) · step."""
    from scipy.fft import dctn

    from napari_cryoswan.codecs import _HEADER, WaveletCodec, _radial_order

    wavelet = WaveletCodec()
    coeffs = wavelet._analyse(volume.astype(np.float64))
    blob = wavelet.encode(volume, 8000)
    step, kept = _HEADER.unpack_from(blob)
    expected = np.rint(coeffs / step) * step
    assert np.count_nonzero(expected) == kept and (expected < 0).any()
    rebuilt = wavelet._analyse(wavelet.decode(blob, volume.shape).astype(np.float64))
    np.testing.assert_allclose(rebuilt, expected, atol=1e-4 * np.abs(coeffs).max())

    order = _radial_order(volume.shape)
    coeffs = dctn(volume.astype(np.float64), norm="ortho").ravel()[order]
    blob = DctCodec().encode(volume, 8000)
    step, count = _HEADER.unpack_from(blob)
    expected = np.zeros_like(coeffs)
    expected[:count] = np.rint(coeffs[:count] / step) * step
    assert (expected < 0).any()
    rebuilt = dctn(DctCodec().decode(blob, volume.shape).astype(np.float64), norm="ortho").ravel()
    np.testing.assert_allclose(rebuilt[order], expected, atol=1e-4 * np.abs(coeffs).max())


def test_varints_round_trip():
    values = np.array([0, 1, 127, 128, 300, 2**21, 2**35 + 5], np.uint64)
    data = _varints(values)
    assert len(data) == 1 + 1 + 1 + 2 + 2 + 4 + 6
    assert np.array_equal(_read_varints(data, len(values)), values)
    with pytest.raises(ValueError, match="corrupt"):
        _read_varints(data[:-1], len(values))


def test_latent_bits_of_the_small_swan_is_the_hand_count():
    from napari_cryoswan.models.registry import build_model

    model = build_model("swan", preset="small")  # codebooks of 128 codes: 7 bits per index
    rq1 = 1 + 4**3 + 6**3 + 8**3 + 10**3 + 12**3 + 14**3 + 16**3  # 10,361 codes
    rq2 = 1 + 2**3 + 4**3 + 8**3  # 585 codes
    assert latent_bits(model) == {"rq1": rq1 * 7, "rq2": rq2 * 7}
    assert (rq1 + rq2) * 7 == 76_622  # the budget evaluate gives the codecs
    assert model.training  # its mode and usage counts are as they were
    assert all(u["assignments"] == 0 for u in model.codebook_usage().values())


def test_latent_bits_of_a_vae_counts_32_bit_floats():
    from napari_cryoswan.models.registry import build_model

    assert sum(latent_bits(build_model("drgn-vae", preset="small")).values()) == 8 * 32  # z_dim 8


def test_index_streams_round_trip_and_code_repeated_indices_in_fewer_bits():
    rng = np.random.default_rng(0)
    varied = rng.integers(0, 4096, 5000)  # no repeats to exploit: packed at 12 bits each
    blob = index_stream(varied, 4096)
    assert len(blob) == 1 + 5000 * 12 // 8
    assert np.array_equal(read_index_stream(blob, 5000, 4096), varied)
    solvent = np.where(rng.random(5000) < 0.9, 17, rng.integers(0, 4096, 5000))  # one code dominates
    blob = index_stream(solvent, 4096)
    assert len(blob) * 8 < 0.5 * 5000 * 12
    assert np.array_equal(read_index_stream(blob, 5000, 4096), solvent)
    odd = rng.integers(0, 100, 7)  # 7 bits each, padded to whole bytes
    assert np.array_equal(read_index_stream(index_stream(odd, 100), 7, 100), odd)


def test_index_streams_refuse_indices_outside_the_codebook_and_unknown_streams():
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        index_stream(np.array([0, 128]), 128)
    with pytest.raises(ValueError, match="unknown kind"):
        read_index_stream(b"\x07abc", 3, 128)
