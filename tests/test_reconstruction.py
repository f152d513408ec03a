"""Reconstructing maps of any size: preprocessing, models, placement and concerns (no Qt)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_cryoswan.checkpoint import load_checkpoint
from napari_cryoswan.engine import Cancelled
from napari_cryoswan.io import DensityMap
from napari_cryoswan.metrics import fsc
from napari_cryoswan.preprocess import PreprocessSettings, centre_of_mass, preprocess
from napari_cryoswan.reconstruction import (
    DENSE_FACES_FRACTION,
    describe_preprocessing,
    estimated_fraction_outside,
    input_concerns,
    reconstruct_map,
)



class IdentityModel(torch.nn.Module):
    name = "identity"
    variants = ("identity",)

    def reconstruction_variants(self, x):
        return {"identity": x.clone()}


def identity_checkpoint():
    return SimpleNamespace(model=IdentityModel(), path="identity.pt", checkpoint_id="0" * 12)


SETTINGS = PreprocessSettings()


def world_centre_of_mass(data, scale, translate):
    return centre_of_mass(data) * np.asarray(scale) + np.asarray(translate)


def test_identity_model_gives_the_preprocessed_map_back(make_blob_map):
    density = make_blob_map(shape=(40, 50, 36), voxel=(4.0, 4.0, 4.0))
    result = reconstruct_map(density, [identity_checkpoint()], SETTINGS)
    (variant,) = result.variants
    assert variant.box.shape == (64, 64, 64)
    np.testing.assert_allclose(variant.box, result.input_box, atol=1e-4)
    np.testing.assert_allclose(result.difference(variant), 0.0, atol=1e-4)
    np.testing.assert_allclose(variant.fsc.correlation, 1.0, atol=1e-5)
    # the normalisation is undone: the box holds the map's own values
    assert abs(variant.box.max() - density.data.max()) < 1e-3


def test_the_result_is_placed_over_a_map_at_another_voxel_size(make_blob_map):
    density = make_blob_map(shape=(60, 80, 50), voxel=(1.7, 1.7, 1.7), origin=(-30.0, 12.0, 40.0))
    result = reconstruct_map(density, [identity_checkpoint()], SETTINGS)
    scale, translate = result.placement
    assert scale == (4.0, 4.0, 4.0)
    # the same place in Å: centres of mass agree to a fraction of a model voxel (4 Å)
    np.testing.assert_allclose(world_centre_of_mass(result.variants[0].box, scale, translate),
                               world_centre_of_mass(density.data, density.voxel_size, density.origin),
                               atol=1.0)


def test_two_checkpoints_give_rq1_and_rq1_rq2(small_checkpoints, make_blob_map):
    density = make_blob_map()
    checkpoints = [load_checkpoint(small_checkpoints["swan"]), load_checkpoint(small_checkpoints["swan-rq1"])]
    stages = []
    result = reconstruct_map(density, checkpoints, SETTINGS, torch.device("cpu"),
                             stage=lambda d, t, m: stages.append((d, t)))
    assert [variant.variant for variant in result.variants] == ["RQ1+RQ2", "RQ2", "RQ1"]
    assert stages[0] == (0, 4) and stages[-1] == (4, 4)
    prepared = preprocess(density)
    for variant in result.variants:
        assert variant.box.shape == (64, 64, 64)
        expected = fsc(variant.box, prepared.data * prepared.record.std + prepared.record.mean, 4.0)
        np.testing.assert_allclose(variant.fsc.correlation, expected.correlation, atol=1e-5)


def test_cancel_stops_before_the_models_run(make_blob_map):
    with pytest.raises(Cancelled):
        reconstruct_map(make_blob_map(), [identity_checkpoint()], SETTINGS, should_stop=lambda: True)


def test_missing_voxel_size_is_a_clear_error():
    density = DensityMap(np.ones((8, 8, 8), np.float32), None)
    assert "No voxel size" in describe_preprocessing(density, SETTINGS)
    with pytest.raises(ValueError, match="no voxel size"):
        reconstruct_map(density, [identity_checkpoint()], SETTINGS)


def test_describe_says_what_will_change(make_blob_map):
    text = describe_preprocessing(make_blob_map(shape=(300, 200, 100), voxel=(1.0, 1.0, 1.0)), SETTINGS)
    assert "resample 1 Å → 4 Å (300×200×100 → 75×50×25)" in text
    assert "low-pass at 8 Å" in text and "crop to 64³" in text and "pad to 64³" in text


def test_a_map_that_fits_raises_no_concern(make_blob_map):
    assert input_concerns(make_blob_map(), SETTINGS) == []


def test_a_tiny_fine_map_is_flagged_before_the_run(make_blob_map):
    # a MicroED-like map: 0.45 Å voxels, 18×4×11 voxels, becomes 2×0×1 voxels at 4 Å
    concerns = input_concerns(make_blob_map(shape=(18, 4, 11), voxel=(0.45,) * 3), SETTINGS)
    assert any("only" in c and "voxels" in c for c in concerns)


def test_a_coarse_map_is_flagged_before_the_run(make_blob_map):
    concerns = input_concerns(make_blob_map(shape=(30, 30, 30), voxel=(11.4,) * 3), SETTINGS)
    assert any("11.4 Å" in c and "coarser" in c for c in concerns)


def test_a_map_that_fills_its_own_box_is_flagged_before_the_run(make_blob_map):
    # a slab across the whole box, as a membrane: dense on four of the six faces
    data = np.zeros((40, 40, 40), np.float32)
    data[15:25] = 1.0
    concerns = input_concerns(DensityMap(data, (4.0, 4.0, 4.0)), SETTINGS)
    assert any("edges of its own box" in c for c in concerns)
    assert not any("edges" in c for c in input_concerns(DensityMap(data, (4.0, 4.0, 4.0)), SETTINGS,
                                                        for_model=False))
    assert not any("edges" in c for c in input_concerns(make_blob_map(), SETTINGS))


def test_noise_in_the_solvent_is_not_taken_for_density_at_the_box_faces(make_blob_map):
    from napari_cryoswan.denoise import add_noise

    blob = make_blob_map()
    noisy = blob.with_data(add_noise(blob.data, 0.5, np.random.default_rng(0)))
    unblurred = np.mean([np.mean(face > noisy.data.mean() + noisy.data.std())
                         for face in (noisy.data[0], noisy.data[:, 0], noisy.data[:, :, 0])])
    assert unblurred > DENSE_FACES_FRACTION  # what the faces held before the blur
    assert not any("edges" in c for c in input_concerns(noisy, SETTINGS))


def test_density_outside_the_box_is_flagged_before_and_after_the_run():
    # two blobs 240 Å apart: the 256 Å box, centred on their centre of mass, holds the larger
    grid = np.indices((100, 40, 40)).astype(np.float32)
    data = sum(w * np.exp(-((grid - np.array(c)[:, None, None, None]) ** 2).sum(0) / 20.0)
               for w, c in ((1.0, (30, 20, 20)), (0.5, (90, 20, 20))))
    density = DensityMap(data.astype(np.float32), (4.0, 4.0, 4.0))
    before = input_concerns(density, SETTINGS)
    assert any("outside the model's 64³ box" in c for c in before)
    assert 0.3 < estimated_fraction_outside(density, SETTINGS) < 0.7
    result = reconstruct_map(density, [identity_checkpoint()], SETTINGS)
    assert any("cut off" in note for note in result.notes)
    assert abs(estimated_fraction_outside(density, SETTINGS) - result.record.fraction_outside) < 0.1


def test_the_fsc_of_a_coarse_map_stops_at_its_own_nyquist(make_blob_map):
    density = make_blob_map(shape=(20, 20, 20), voxel=(11.4,) * 3)
    result = reconstruct_map(density, [identity_checkpoint()], SETTINGS)
    curve = result.variants[0].fsc
    assert curve.frequency[-1] <= 1 / 22.8 + 1e-9
    assert curve.resolution(0.143).format() == f"≤ {1 / curve.frequency[-1]:.1f} Å (Nyquist)"
