"""Anchor-conditioned generation: train a tiny latent diffusion model, then make variants."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import blob_map

from conftest import DIFFUSION_STEPS as STEPS
from conftest import diffusion_train_args as _train_args


def _train(argv):
    from training.train_diffusion import main

    return main(argv)


@pytest.fixture(scope="module")
def loaded(diffusion_run, small_checkpoints):
    from napari_cryoswan.checkpoint import load_checkpoint
    from napari_cryoswan.generate import load_diffusion

    autoencoder = load_checkpoint(small_checkpoints["swan"])
    return load_diffusion(diffusion_run / "model.pt", autoencoder=autoencoder), autoencoder


def test_training_writes_the_run_folder(diffusion_run, small_checkpoints):
    from napari_cryoswan.checkpoint import checkpoint_id

    for name in ("config.json", "latents.pt", "train_log.csv", "validation.jsonl", "last.pt", "model.pt"):
        assert (diffusion_run / name).is_file(), name
    config = json.loads((diffusion_run / "config.json").read_text())
    assert config["autoencoder_id"] == checkpoint_id(small_checkpoints["swan"])
    validations = [json.loads(line) for line in (diffusion_run / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validations] == [2, 4] and all(np.isfinite(v["loss"]) for v in validations)
    # its own log columns, not the autoencoder trainer's
    assert (diffusion_run / "train_log.csv").read_text().splitlines()[0] == "step,loss,volumes_per_s"


def test_checkpoint_round_trips(loaded, tmp_path):
    from napari_cryoswan.generate import generate_boxes, load_diffusion, save_diffusion

    diffusion, autoencoder = loaded
    again_path = save_diffusion(tmp_path / "again.pt", diffusion.model, autoencoder_id=diffusion.autoencoder_id,
                                contract=diffusion.contract)
    again = load_diffusion(again_path, autoencoder=autoencoder)
    x = torch.randn(1, diffusion.model.code_dim, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(diffusion.model(x, t), again.model(x, t))
    assert torch.equal(diffusion.model.latent_std_C, again.model.latent_std_C)
    assert not torch.allclose(diffusion.model.latent_std_C, torch.ones_like(diffusion.model.latent_std_C))
    volume = np.random.default_rng(0).normal(size=(64, 64, 64)).astype(np.float32)
    a, _ = generate_boxes(autoencoder.model, diffusion.model, volume, n=1, strength=0.3, seed=5, steps=5,
                          device=torch.device("cpu"))
    b, _ = generate_boxes(autoencoder.model, again.model, volume, n=1, strength=0.3, seed=5, steps=5,
                          device=torch.device("cpu"))
    np.testing.assert_array_equal(a, b)


def test_strength_zero_returns_the_anchor_reconstruction(loaded):
    from napari_cryoswan.generate import encode_latents, generate_variants, snap_to_codes
    from napari_cryoswan.preprocess import preprocess
    from napari_cryoswan.reconstruction import reconstruct_map

    diffusion, autoencoder = loaded
    anchor = blob_map()
    result = generate_variants(anchor, diffusion, autoencoder, n=2, strength=0.0, seed=1, steps=5,
                               device=torch.device("cpu"))
    for variant in result.variants:
        np.testing.assert_array_equal(variant.data, result.reconstruction.data)
    # The anchor's latent snaps back to the anchor's own codes ...
    x = torch.from_numpy(preprocess(anchor, autoencoder.contract.settings()).data)[None, None]
    z, codes = encode_latents(autoencoder.model, x)
    snapped = snap_to_codes(autoencoder.model, z, codes)
    assert all(torch.equal(a, b) for a, b in zip(snapped["rq1"], codes["rq1"]))
    # ... and its reconstruction is the one the Reconstruct widget shows (up to the float error of
    # the straight-through estimator in the forward pass).
    box = reconstruct_map(anchor, [autoencoder], autoencoder.contract.settings()).variants[0].box
    np.testing.assert_allclose(result.reconstruction_box, box, atol=1e-4 * np.abs(box).max())


def test_higher_strength_moves_farther_from_the_anchor(loaded):
    from napari_cryoswan.generate import generate_boxes
    from napari_cryoswan.preprocess import preprocess

    diffusion, autoencoder = loaded
    volume = preprocess(blob_map(), autoencoder.contract.settings()).data

    def distance(strength):
        boxes, recon = generate_boxes(autoencoder.model, diffusion.model, volume, n=3, strength=strength,
                                      seed=0, steps=10, device=torch.device("cpu"))
        return np.mean([np.linalg.norm(b - recon) / np.linalg.norm(recon) for b in boxes])

    near, far = distance(0.02), distance(1.0)
    assert far > 0.2
    assert far > near


def test_strength_is_the_share_of_the_noise_schedule(loaded):
    diffusion, _ = loaded
    T = diffusion.model.config.num_train_timesteps
    assert [diffusion.model.edit_start(s) for s in (0.0, 0.25, 0.5, 1.0)] == [-1, T // 4 - 1, T // 2 - 1, T - 1]


def test_a_strength_calibration_spreads_similarity_evenly_and_round_trips(loaded, tmp_path):
    from napari_cryoswan.generate import load_diffusion, save_diffusion

    diffusion, autoencoder = loaded
    model = diffusion.model
    model.strength_calibration = {"timesteps": [99, 499, 999], "similarity": [0.9, 0.5, 0.1]}
    try:
        # strength 0.5: similarity 1 − 0.5·(1 − 0.1) = 0.55, between t 99 (0.9) and 499 (0.5)
        assert [model.edit_start(s) for s in (0.0, 0.5, 1.0)] == [-1, 449, 999]
        again = load_diffusion(save_diffusion(tmp_path / "calibrated.pt", model, contract=diffusion.contract,
                                              autoencoder_id=diffusion.autoencoder_id), autoencoder=autoencoder)
    finally:
        model.strength_calibration = None
    assert again.model.strength_calibration["timesteps"] == [99, 499, 999]
    assert again.model.edit_start(0.5) == 449 and model.edit_start(0.5) == 499


def test_calibrate_cli_measures_and_writes_a_new_checkpoint(diffusion_run, small_checkpoints, tiny_corpus,
                                                            tmp_path, capsys):
    from napari_cryoswan.generate import load_diffusion
    from training.calibrate_diffusion import main

    out = tmp_path / "calibrated.pt"
    argv = ["--checkpoint", str(diffusion_run / "model.pt"), "--corpus", str(tiny_corpus), "--out", str(out),
            "--autoencoder", str(small_checkpoints["swan"]), "--maps", "1", "--points", "3", "--steps", "3"]
    assert main(argv) == 0
    calibration = load_diffusion(out).model.strength_calibration
    assert calibration["timesteps"] == [332, 666, 999] and calibration["maps"] == 1
    assert all(-1.0 <= r <= 1.0 for r in calibration["similarity"])
    assert main(argv) == 2 and "exists" in capsys.readouterr().err


def test_refused_with_another_autoencoder(diffusion_run, small_checkpoints, tmp_path, capsys):
    from napari_cryoswan.checkpoint import CheckpointError, load_checkpoint
    from napari_cryoswan.generate import load_diffusion
    from training.generate import main

    other = load_checkpoint(small_checkpoints["swan-rq1"])
    with pytest.raises(CheckpointError, match="learned the latents of autoencoder"):
        load_diffusion(diffusion_run / "model.pt", autoencoder=other)
    with pytest.raises(CheckpointError, match="holds a diffusion model"):
        load_checkpoint(diffusion_run / "model.pt")
    with pytest.raises(CheckpointError, match="not a diffusion model"):
        load_diffusion(small_checkpoints["swan"])
    anchor = tmp_path / "anchor.mrc"
    _write(anchor, blob_map())
    rc = main(["--anchor", str(anchor), "--out", str(tmp_path / "out"), "--checkpoint",
               str(diffusion_run / "model.pt"), "--autoencoder", str(small_checkpoints["swan-rq1"]),
               "--device", "cpu"])
    assert rc == 2 and "train_diffusion" in capsys.readouterr().err


def test_generate_cli_writes_variants_on_the_anchor_grid(diffusion_run, small_checkpoints, tmp_path):
    from napari_cryoswan.checkpoint import checkpoint_id
    from napari_cryoswan.io import read_header, read_map
    from training.generate import main

    anchor_map = blob_map()
    anchor = _write(tmp_path / "anchor.mrc", anchor_map)
    out = tmp_path / "variants"
    rc = main(["--anchor", str(anchor), "--n", "2", "--strength", "0.4", "--seed", "7", "--steps", "5",
               "--out", str(out), "--checkpoint", str(diffusion_run / "model.pt"),
               "--autoencoder", str(small_checkpoints["swan"]), "--device", "cpu"])
    assert rc == 0
    files = sorted(out.glob("*.mrc"))
    assert len(files) == 2
    source = read_map(anchor)
    for i, path in enumerate(files):
        variant = read_map(path)
        assert variant.shape == source.shape
        np.testing.assert_allclose(variant.voxel_size, source.voxel_size, rtol=1e-5)
        np.testing.assert_allclose(variant.origin, source.origin, atol=1e-3)
        assert any(f"seed {7 + i} strength 0.4" in label for label in read_header(path)["labels"])
    report = json.loads((out / "generation.json").read_text())
    assert report["strength"] == 0.4 and report["seed"] == 7 and report["steps"] == 5
    assert report["autoencoder_checkpoint_id"] == checkpoint_id(small_checkpoints["swan"])
    assert report["diffusion_checkpoint_id"] == checkpoint_id(diffusion_run / "model.pt")
    assert [v["seed"] for v in report["variants"]] == [7, 8]
    for v in report["variants"]:
        assert -1 <= v["correlation"] <= 1 and v["fsc_0.5"]["kind"]


def test_generate_cli_without_a_checkpoint_says_how_to_train_one(small_checkpoints, tmp_path, capsys):
    from training.generate import main

    lone = tmp_path / "lone.pt"
    shutil.copy(small_checkpoints["swan"], lone)
    anchor = _write(tmp_path / "anchor.mrc", blob_map())
    rc = main(["--anchor", str(anchor), "--out", str(tmp_path / "out"), "--autoencoder", str(lone)])
    err = capsys.readouterr().err
    assert rc == 2 and "python -m training.train_diffusion --autoencoder" in err


def test_resume_continues_and_reuses_the_cache(diffusion_run, small_checkpoints, tiny_corpus, tmp_path, capsys):
    from napari_cryoswan.generate import load_diffusion

    run = tmp_path / "run"
    shutil.copytree(diffusion_run, run)
    capsys.readouterr()
    assert _train(_train_args(small_checkpoints["swan"], tiny_corpus, run, STEPS + 2, "--resume")) == 0
    assert "latent cache: reused" in capsys.readouterr().err
    assert load_diffusion(run / "last.pt").training["step"] == STEPS + 2
    assert load_diffusion(run / "model.pt").provenance["step"] == STEPS + 2
    config = json.loads((run / "config.json").read_text())
    assert config["resumed_at_steps"] == [STEPS] and config["steps"] == STEPS + 2
    rows = (run / "train_log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, STEPS + 3))
    # another autoencoder may not continue the run
    assert _train(_train_args(small_checkpoints["swan-rq1"], tiny_corpus, run, STEPS + 4, "--resume")) == 2
    assert "Resume with that autoencoder" in capsys.readouterr().err
    # a new run refuses a folder that holds one
    assert _train(_train_args(small_checkpoints["swan"], tiny_corpus, run)) == 2


def test_latent_cache_is_keyed_by_autoencoder_and_corpus(small_checkpoints, tiny_corpus, tmp_path):
    from napari_cryoswan.checkpoint import load_checkpoint
    from training.corpus import CorpusSet
    from training.train_diffusion import latent_cache

    corpus = CorpusSet([tiny_corpus])
    swan, rq1 = (load_checkpoint(small_checkpoints[name]) for name in ("swan", "swan-rq1"))
    cpu = torch.device("cpu")
    first, reused = latent_cache(tmp_path, swan, corpus, cpu)
    assert not reused and len(first["train"]) == len(corpus.split_indices("train"))
    second, reused = latent_cache(tmp_path, swan, corpus, cpu)
    assert reused and torch.equal(first["train"], second["train"])
    third, reused = latent_cache(tmp_path, rq1, corpus, cpu)
    assert not reused and third["key"]["autoencoder_id"] == rq1.checkpoint_id
    # the corpus id is part of the key too
    corpus.corpora[0].manifest["corpus_id"] = "another"
    fourth, reused = latent_cache(tmp_path, rq1, corpus, cpu)
    assert not reused and fourth["key"]["corpus_id"] == "another"


def _write(path, density):
    from napari_cryoswan.io import write_map

    return write_map(path, density.data, density.voxel_size, density.origin)


@pytest.mark.parametrize("decoder_input", ["residual", "both"])
def test_snapping_follows_encode_for_every_decoder_design(decoder_input):
    """A "residual" RQ1 quantizes f₁ − p, p rebuilt from the anchor's coarser codes."""
    from napari_cryoswan.generate import encode_latents, snap_to_codes
    from napari_cryoswan.models.registry import build_model
    from napari_cryoswan.preprocess import PreprocessSettings, preprocess

    torch.manual_seed(0)
    model = build_model("swan", preset="small", decoder_input=decoder_input,
                        approx_weight=float(decoder_input == "residual")).eval()
    x = torch.from_numpy(preprocess(blob_map(), PreprocessSettings()).data)[None, None]
    z, codes = encode_latents(model, x)
    snapped = snap_to_codes(model, z, codes)
    assert all(torch.equal(a, b) for a, b in zip(snapped["rq1"], codes["rq1"]))


def test_the_bundled_diffusion_model_belongs_to_the_bundled_swan():
    from napari_cryoswan.checkpoint import bundled_checkpoint_path, load_checkpoint
    from napari_cryoswan.generate import diffusion_path_for, generate_boxes, load_diffusion

    swan = load_checkpoint(bundled_checkpoint_path("swan"))
    diffusion = load_diffusion(diffusion_path_for(swan.path), autoencoder=swan)
    assert diffusion.provenance["step"] > 0 and diffusion.provenance["corpus_id"]
    volume = np.random.default_rng(0).normal(size=(64, 64, 64)).astype(np.float32)
    boxes, recon = generate_boxes(swan.model, diffusion.model, volume, n=2, strength=0.3, seed=0, steps=4,
                                  device=torch.device("cpu"))
    assert boxes.shape == (2, 64, 64, 64) and np.isfinite(boxes).all()
    assert not np.array_equal(boxes[0], boxes[1]) and not np.array_equal(boxes[0], recon)
