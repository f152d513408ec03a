"""Reconstructing maps of any size: preprocessing, models, and mapping back (no Qt)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_cryoswan.checkpoint import load_checkpoint
from napari_cryoswan.engine import Cancelled
from napari_cryoswan.io import DensityMap
from napari_cryoswan.metrics import fsc
from napari_cryoswan.preprocess import centre_of_mass, preprocess
from napari_cryoswan.reconstruction import describe_preprocessing, reconstruct_map



class IdentityModel(torch.nn.Module):
    name = "identity"

    def level_reconstructions(self, x):
        return {"identity": x.clone()}


def identity_checkpoint():
    return SimpleNamespace(model=IdentityModel(), path="identity.pt", checkpoint_id="0" * 12)


def test_identity_model_on_a_4_angstrom_map_gives_the_map_back(make_blob_map):
    density = make_blob_map(shape=(40, 50, 36), voxel=(4.0, 4.0, 4.0))
    result = reconstruct_map(density, [identity_checkpoint()])
    (level,) = result.levels
    assert level.on_input_grid.shape == density.shape
    np.testing.assert_allclose(level.on_input_grid, density.data, atol=1e-4)
    assert result.coverage.all()
    np.testing.assert_allclose(result.difference(level, density), 0.0, atol=1e-4)
    np.testing.assert_allclose(level.fsc.correlation, 1.0, atol=1e-5)


def test_results_overlay_a_map_at_another_voxel_size(make_blob_map):
    density = make_blob_map(shape=(60, 80, 50), voxel=(1.7, 1.7, 1.7), origin=(-30.0, 12.0, 40.0))
    result = reconstruct_map(density, [identity_checkpoint()])
    back = result.levels[0].on_input_grid
    assert back.shape == density.shape
    # same place in Å: centres of mass agree to a fraction of a model voxel (4 Å)
    np.testing.assert_allclose(centre_of_mass(back) * 1.7, centre_of_mass(density.data) * 1.7, atol=1.0)
    assert np.corrcoef(back.ravel(), density.data.ravel())[0, 1] > 0.98


def test_two_checkpoints_give_rq1_and_rq1_rq2(small_checkpoints, make_blob_map):
    density = make_blob_map()
    checkpoints = [load_checkpoint(small_checkpoints["swan"]), load_checkpoint(small_checkpoints["swan-rq1"])]
    stages = []
    result = reconstruct_map(density, checkpoints, torch.device("cpu"),
                             stage=lambda d, t, m: stages.append((d, t)))
    assert [level.level for level in result.levels] == ["RQ1+RQ2", "RQ1"]
    assert stages[0] == (0, 4) and stages[-1] == (4, 4)
    prepared = preprocess(density)
    for level in result.levels:
        assert level.box.shape == (64, 64, 64)
        assert np.abs(level.on_input_grid).max() > 0
        expected = fsc(level.box, prepared.data * prepared.record.std + prepared.record.mean, 4.0)
        np.testing.assert_allclose(level.fsc.correlation, expected.correlation, atol=1e-5)


def test_cancel_stops_before_the_models_run(make_blob_map):
    with pytest.raises(Cancelled):
        reconstruct_map(make_blob_map(), [identity_checkpoint()], should_stop=lambda: True)


def test_missing_voxel_size_is_a_clear_error():
    density = DensityMap(np.ones((8, 8, 8), np.float32), None)
    assert "No voxel size" in describe_preprocessing(density)
    with pytest.raises(ValueError, match="no voxel size"):
        reconstruct_map(density, [identity_checkpoint()])


def test_describe_says_what_will_change(make_blob_map):
    text = describe_preprocessing(make_blob_map(shape=(300, 200, 100), voxel=(1.0, 1.0, 1.0)))
    assert "resample 1 Å → 4 Å (300×200×100 → 75×50×25)" in text
    assert "low-pass at 8 Å" in text and "crop to 64³" in text and "pad to 64³" in text
