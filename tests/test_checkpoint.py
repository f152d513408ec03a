"""Checkpoints: round trip, provenance, atomic writes and clear refusals."""

from pathlib import Path

import pytest
import torch

from napari_cryoswan.checkpoint import (
    CheckpointError,
    bundled_checkpoint_path,
    checkpoint_id,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from napari_cryoswan.models.registry import build_model


@pytest.fixture
def small_swan():
    torch.manual_seed(0)
    return build_model("swan", preset="small").eval()


def test_round_trip_rebuilds_the_same_model(tmp_path, small_swan):
    path = save_checkpoint(tmp_path / "m.pt", small_swan, {"corpus_id": "abc", "step": 7})
    loaded = load_checkpoint(path)
    assert loaded.model.name == "swan"
    assert loaded.provenance["corpus_id"] == "abc" and loaded.provenance["step"] == 7
    assert "torch_version" in loaded.provenance and "code_version" in loaded.provenance
    x = torch.randn(1, 1, 64, 64, 64)
    torch.testing.assert_close(loaded.model.reconstruct(x), small_swan.reconstruct(x))
    assert loaded.checkpoint_id == checkpoint_id(path) and len(loaded.checkpoint_id) == 12


def test_save_refuses_to_overwrite_and_leaves_no_temporary(tmp_path, small_swan):
    path = save_checkpoint(tmp_path / "m.pt", small_swan)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_checkpoint(path, small_swan)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, small_swan, monkeypatch):
    path = save_checkpoint(tmp_path / "m.pt", small_swan)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, small_swan, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_truncated_checkpoint_is_refused(tmp_path, small_swan):
    path = save_checkpoint(tmp_path / "m.pt", small_swan)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(path)


def test_foreign_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(CheckpointError, match="not a napari-cryoswan checkpoint"):
        load_checkpoint(plain)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable napari-cryoswan checkpoint"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_code_cannot_run_on_load(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "napari-cryoswan", "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="not a readable napari-cryoswan checkpoint"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_are_refused(tmp_path, small_swan):
    path = save_checkpoint(tmp_path / "m.pt", small_swan)
    payload = torch.load(path, weights_only=True)
    payload["config"]["codebook_size"] = 64  # the stored codebooks hold 128 codes
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_unknown_model_name_is_refused(tmp_path, small_swan):
    path = save_checkpoint(tmp_path / "m.pt", small_swan)
    payload = torch.load(path, weights_only=True)
    payload["model"] = "no-such-model"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="cannot build model"):
        load_checkpoint(path)


def test_unknown_bundled_name():
    with pytest.raises(CheckpointError, match="No bundled checkpoint"):
        bundled_checkpoint_path("vq")
    with pytest.raises(CheckpointError, match="No bundled checkpoint"):
        resolve_checkpoint("bundled:vq")
    assert resolve_checkpoint("runs/vq/model.pt") == Path("runs/vq/model.pt")


@pytest.mark.parametrize("name, model, levels", [("swan", "swan", 2), ("swan-rq1", "swan-rq1", 1),
                                                 ("swan-denoiser", "swan", 2), ("swan-shapes", "swan", 2)])
def test_bundled_checkpoints_load_offline_and_reconstruct(name, model, levels):
    loaded = load_checkpoint(resolve_checkpoint(f"bundled:{name}"))
    assert loaded.model.name == model and loaded.model.config.levels == levels
    assert loaded.provenance["corpus_id"] and loaded.provenance["step"] > 0
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        recon = loaded.model.reconstruct(x)
    assert recon.shape == x.shape and torch.isfinite(recon).all()


def test_the_bundled_denoiser_is_swan_with_only_its_encoder_fine_tuned():
    swan, denoiser = (load_checkpoint(resolve_checkpoint(f"bundled:{name}"))
                      for name in ("swan", "swan-denoiser"))
    assert denoiser.provenance["init_checkpoint_id"] == swan.checkpoint_id
    assert denoiser.model.config_dict() == swan.model.config_dict()
    before, after = swan.model.state_dict(), denoiser.model.state_dict()
    encoder = ("encoders.", "combi_convs.", "quant_convs.")
    for key in before:  # the rest only rounded to half precision
        if not key.startswith(encoder):
            torch.testing.assert_close(after[key], before[key], rtol=1e-3, atol=1e-5, msg=key)
    assert not torch.allclose(after["encoders.0.layers.0.weight"], before["encoders.0.layers.0.weight"],
                              rtol=1e-2, atol=1e-3)


def test_bundled_weights_fit_the_size_budget():
    folder = bundled_checkpoint_path("swan").parent
    total = sum(path.stat().st_size for path in folder.glob("*.pt"))  # heads and diffusion too
    assert total <= 50 * 2**20


def test_half_precision_storage_halves_the_file_and_loads_as_float32(tmp_path, small_swan):
    full = save_checkpoint(tmp_path / "full.pt", small_swan)
    half = save_checkpoint(tmp_path / "half.pt", small_swan, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_checkpoint(half).model.state_dict()
    for key, value in small_swan.state_dict().items():
        assert loaded[key].dtype == value.dtype, key
        torch.testing.assert_close(loaded[key], value, rtol=1e-3, atol=1e-4, msg=key)
