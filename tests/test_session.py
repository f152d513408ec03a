"""The session: checkpoint cache, input contracts, control pairing, the reconstruct use case."""

import os

import pytest
import torch

from napari_cryoswan import checkpoint as checkpoint_module
from napari_cryoswan.checkpoint import (
    CheckpointError,
    InputContract,
    load_checkpoint,
    save_checkpoint,
)
from napari_cryoswan.models.registry import build_model
from napari_cryoswan.session import Session


class NotPlainData:
    """Pickled by reference to this module: a safe load refuses it."""


@pytest.fixture
def counting_loads(monkeypatch):
    calls = []
    original = checkpoint_module.load_checkpoint

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr("napari_cryoswan.session.load_checkpoint", counting)
    return calls


def test_a_checkpoint_is_read_once_and_again_when_its_file_changes(small_checkpoints, counting_loads,
                                                                   tmp_path):
    path = tmp_path / "swan.pt"
    path.write_bytes(small_checkpoints["swan"].read_bytes())
    session = Session()
    first = session.checkpoint(path)
    assert session.checkpoint(path) is first
    assert len(counting_loads) == 1
    # a retrained file at the same path is a new checkpoint
    torch.manual_seed(1)
    save_checkpoint(path, build_model("swan", preset="small"), overwrite=True)
    os.utime(path, ns=(1, 1))
    second = session.checkpoint(path)
    assert second is not first and second.checkpoint_id != first.checkpoint_id
    assert len(counting_loads) == 2


def test_the_checkpoint_contract_drives_preprocessing(tmp_path, make_blob_map):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "two_angstrom.pt", build_model("swan", preset="small"),
                           contract=InputContract(box=64, voxel_size=2.0))
    result = Session("cpu").reconstruct(make_blob_map(voxel=(1.0, 1.0, 1.0)), path)
    assert result.record.voxel_size == 2.0
    assert result.placement[0] == (2.0, 2.0, 2.0)
    session = Session()
    text, _ = session.describe_reconstruction(make_blob_map(voxel=(1.0,) * 3), path)
    assert "1 Å → 4 Å" in text and "read when it runs" in text  # not loaded yet
    session.checkpoint(path)
    text, _ = session.describe_reconstruction(make_blob_map(voxel=(1.0,) * 3), path)
    assert "1 Å → 2 Å" in text


def test_a_format_1_checkpoint_loads_with_the_papers_contract(tmp_path):
    torch.manual_seed(0)
    model = build_model("swan-rq1", preset="small")
    path = tmp_path / "v1.pt"
    torch.save({"format": "napari-cryoswan", "format_version": 1, "model": model.name,
                "config": model.config_dict(), "state_dict": model.state_dict(),
                "provenance": {}}, path)
    loaded = load_checkpoint(path)
    assert loaded.kind == "autoencoder"
    assert loaded.contract == InputContract(box=64, voxel_size=4.0, normalisation="z-score")


def test_another_kind_of_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "d.pt", build_model("swan-rq1", preset="small"),
                           kind="diffusion")
    with pytest.raises(CheckpointError, match="holds a diffusion model, not an autoencoder"):
        Session().checkpoint(path)


def test_a_two_level_model_is_refused_as_the_rq1_control(small_checkpoints, make_blob_map):
    with pytest.raises(CheckpointError, match="not the RQ1-only Cryo-SWAN ablation"):
        Session("cpu").reconstruct(make_blob_map(), small_checkpoints["swan"],
                                   control=small_checkpoints["swan"])


def test_a_control_trained_for_another_input_is_refused(small_checkpoints, tmp_path, make_blob_map):
    control = save_checkpoint(tmp_path / "rq1_2A.pt", build_model("swan-rq1", preset="small"),
                              contract=InputContract(box=64, voxel_size=2.0))
    with pytest.raises(CheckpointError, match="cannot reconstruct the same input"):
        Session("cpu").reconstruct(make_blob_map(), small_checkpoints["swan"], control=control)


@pytest.mark.parametrize("value", ["", "."])
def test_an_empty_checkpoint_field_says_to_choose_one(value):
    with pytest.raises(CheckpointError) as err:
        Session().checkpoint(value)
    assert str(err.value) == "No checkpoint chosen: choose a checkpoint file (.pt)."
    assert os.getcwd() not in str(err.value)


def test_a_corrupt_checkpoint_gives_no_advice_to_run_its_code(tmp_path, small_checkpoints):
    path = tmp_path / "evil.pt"
    torch.save({"format": "napari-cryoswan", "object": NotPlainData()}, path)
    with pytest.raises(CheckpointError) as err:
        Session().checkpoint(path)
    assert "weights_only" not in str(err.value) and "corrupt" in str(err.value)
    path.write_bytes(small_checkpoints["swan"].read_bytes()[:5000])
    with pytest.raises(CheckpointError) as err:
        Session().checkpoint(path)
    assert "weights_only" not in str(err.value) and "truncated" in str(err.value)


def test_sessions_are_one_per_viewer():
    class Viewer:
        pass

    first, second = Viewer(), Viewer()
    assert Session.for_viewer(first) is Session.for_viewer(first)
    assert Session.for_viewer(first) is not Session.for_viewer(second)
