"""Denoising: the noise model, each method on small simulated maps, and the evaluation CLI."""

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from napari_cryoswan.denoise import (
    METHODS,
    add_noise,
    band_pass,
    cube_rotations,
    denoise,
    noise_sd_for,
    rotate_cube,
    tune_gaussian_sigma,
    unrotate_cube,
)
from napari_cryoswan.engine import Cancelled
from napari_cryoswan.metrics import psnr


def smooth_volume(n=32, seed=0):
    """A z-scored volume of a few Gaussian blobs: smooth, like a low-resolution map."""
    rng = np.random.default_rng(seed)
    grid = np.indices((n,) * 3).astype(np.float32)
    volume = np.zeros((n,) * 3, np.float32)
    for centre, width in zip(rng.uniform(0.3 * n, 0.7 * n, (4, 3)), rng.uniform(2, 5, 4)):
        volume += np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * width**2))
    return (volume - volume.mean()) / volume.std()


class Identity(nn.Module):
    """A stand-in autoencoder that returns its input: projection is then pure bookkeeping."""

    name = "identity"
    variants = ("identity",)

    def reconstruction_variants(self, x):
        return {"identity": x.clone()}


def test_noise_has_the_requested_snr_and_follows_the_seed():
    clean = smooth_volume()
    noisy = add_noise(clean, 0.5, seed=3)
    noise = noisy - clean
    assert np.var(clean) / np.var(noise) == pytest.approx(0.5, rel=0.05)
    assert abs(noise.mean()) < 0.05
    assert noise_sd_for(clean, 0.5) == pytest.approx(np.sqrt(2), rel=1e-5)
    np.testing.assert_array_equal(noisy, add_noise(clean, 0.5, seed=3))
    assert not np.array_equal(noisy, add_noise(clean, 0.5, seed=4))
    with pytest.raises(ValueError, match="positive"):
        add_noise(clean, 0, seed=0)


def test_band_pass_keeps_its_band_and_removes_the_rest():
    z = np.arange(32)[:, None, None] * np.ones((1, 32, 32))
    inside = np.cos(2 * np.pi * 4 / 32 * z)  # 0.125 cycles/voxel
    outside = np.cos(2 * np.pi * 13 / 32 * z)  # 0.41 cycles/voxel
    out = band_pass((inside + outside + 3.0).astype(np.float32))
    np.testing.assert_allclose(out, inside, atol=1e-4)  # the mean (frequency 0) goes too


@pytest.mark.parametrize("method", ["band-pass", "gaussian", "nl-means", "wavelet"])
def test_each_classical_method_raises_psnr(method):
    clean = smooth_volume()
    noisy = add_noise(clean, 0.5, seed=0)
    result = denoise(noisy, method, noise_sd=noise_sd_for(clean, 0.5))
    assert result.volume.shape == clean.shape and result.method == method
    assert psnr(result.volume, clean) > psnr(noisy, clean) + 2


def test_methods_estimate_the_noise_they_are_not_told():
    clean = smooth_volume()
    noisy = add_noise(clean, 1.0, seed=0)
    told = denoise(noisy, "wavelet", noise_sd=1.0).params
    guessed = denoise(noisy, "wavelet").params
    assert told == {"noise_sd": 1.0, "noise_sd_from": "given"}
    assert guessed["noise_sd_from"] == "estimated"
    assert guessed["noise_sd"] == pytest.approx(1, rel=0.2)


def test_gaussian_width_tuned_wider_for_more_noise():
    clean = [smooth_volume(24, seed) for seed in (1, 2)]
    sigmas = (0.5, 1.0, 2.0, 3.0)
    noisy_best, scores = tune_gaussian_sigma(clean, 0.1, seed=0, sigmas=sigmas)
    clear_best, _ = tune_gaussian_sigma(clean, 10.0, seed=0, sigmas=sigmas)
    assert set(scores) == set(sigmas) and scores[noisy_best] == max(scores.values())
    assert noisy_best > clear_best


def test_cube_rotations_are_the_24_proper_ones_and_undo_exactly():
    volume = np.random.default_rng(0).normal(size=(4, 4, 4))
    rotations = cube_rotations()
    turned = {rotate_cube(volume, r).tobytes() for r in rotations}
    assert len(rotations) == 24 and len(turned) == 24
    np.testing.assert_array_equal(rotate_cube(volume, rotations[0]), volume)  # identity first
    for r in rotations:
        np.testing.assert_array_equal(unrotate_cube(rotate_cube(volume, r), r), volume)
    mirrored = volume[::-1].tobytes()
    assert mirrored not in turned


@pytest.mark.parametrize("method", ["swan", "swan-rotations"])
def test_projection_returns_its_input_in_the_input_units(method):
    """Normalising for the model and undoing it are exact inverses (noise s.d. 0)."""
    volume = 5.0 + 3.0 * smooth_volume(16)
    out = denoise(volume, method, model=Identity(), noise_sd=0.0, device="cpu")
    np.testing.assert_allclose(out.volume, volume, atol=1e-4)


def test_projection_undoes_the_clean_scale_not_the_noisy_one():
    clean = smooth_volume(16)
    noisy = add_noise(clean, 0.5, seed=0)
    kept = denoise(noisy, "swan", model=Identity(), noise_sd=np.sqrt(2), device="cpu").volume
    # The identity "model" sees the map scaled by 1/clean s.d. and its output is scaled back.
    np.testing.assert_allclose(kept, noisy, atol=1e-4)
    inflated = denoise(noisy, "swan", model=Identity(), noise_sd=np.sqrt(2), device="cpu",
                       params={"input_scale": "clean", "output_scale": "noisy"}).volume
    assert np.std(inflated) == pytest.approx(np.std(noisy) ** 2 / np.sqrt(np.var(noisy) - 2),
                                             rel=1e-3)


@pytest.fixture(scope="module")
def small_swan():
    from napari_cryoswan.models.registry import build_model

    torch.manual_seed(0)
    return build_model("swan", preset="small").eval()


def test_swan_runs_through_a_small_model_with_progress(small_swan):
    noisy = add_noise(smooth_volume(64), 0.5, seed=0)
    calls = []
    out = denoise(noisy, "swan", model=small_swan, device="cpu",
                  progress=lambda done, total, message: calls.append((done, total, message)))
    assert out.volume.shape == (64, 64, 64) and np.isfinite(out.volume).all()
    assert calls[0] == (0, 1, "swan") and calls[-1] == (1, 1, "done")
    assert (1, 1, "projecting") in calls
    assert out.params["rotations"] is False and out.params["noise_sd_from"] == "estimated"


def test_a_model_method_refuses_another_box_and_a_missing_model(small_swan):
    with pytest.raises(ValueError, match="takes 64³ volumes"):
        denoise(smooth_volume(32), "swan", model=small_swan, noise_sd=1.0, device="cpu")
    with pytest.raises(ValueError, match="needs a model"):
        denoise(smooth_volume(32), "swan-rotations", noise_sd=1.0)


def test_unknown_methods_and_parameters_are_refused():
    with pytest.raises(ValueError, match="choose one of band-pass"):
        denoise(smooth_volume(8), "median")
    with pytest.raises(ValueError, match="has no parameter width; it takes sigma"):
        denoise(smooth_volume(8), "gaussian", params={"width": 2})
    assert {"noisy"}.isdisjoint(METHODS)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_stop_request_cancels(method):
    with pytest.raises(Cancelled):
        denoise(smooth_volume(16), method, model=Identity(), noise_sd=1.0,
                should_stop=lambda: True)


def test_rotation_averaging_stops_between_batches():
    checks = []

    def stop_on_the_third_check():
        checks.append(1)
        return len(checks) >= 3

    with pytest.raises(Cancelled):
        denoise(smooth_volume(16), "swan-rotations", model=Identity(), noise_sd=1.0,
                device="cpu", should_stop=stop_on_the_third_check)
    assert len(checks) == 3  # once before the work, then between the model's batches


# --- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_maps(tmp_path_factory):
    from napari_cryoswan.io import write_map

    folder = tmp_path_factory.mktemp("maps")
    return [str(write_map(folder / f"blobs{seed}.mrc", smooth_volume(40, seed) + 2, 4.0))
            for seed in (1, 2)]


def test_cli_scores_every_method_at_every_snr(two_maps, small_checkpoints, tmp_path):
    from training.evaluate_denoise import main

    out = tmp_path / "report"
    methods = ["band-pass", "gaussian", "wavelet", "swan"]
    assert main(["--checkpoint", str(small_checkpoints["swan"]), "--maps", *two_maps,
                 "--snr", "0.5", "--snr", "2", "--seed", "0", "--methods", *methods,
                 "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["noisy", *methods]
    for by_snr in report["methods"].values():
        assert list(by_snr) == ["0.5", "2"]
        for row in by_snr.values():
            assert {"psnr", "ssim", "rmse", "fsc_0.5"} <= set(row)
    noisy = report["methods"]["noisy"]
    assert noisy["0.5"]["psnr"] < noisy["2"]["psnr"]
    assert report["methods"]["gaussian"]["0.5"]["psnr"] > noisy["0.5"]["psnr"]
    assert "scored maps themselves" in report["gaussian"]["note"]
    assert set(report["parameters"]["gaussian"]["sigma"]) == {"0.5", "2"}
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert len(rows) == 10 and {"psnr", "ssim", "rmse", "fsc_0.5"} <= set(rows[0])
    markdown = (out / "report.md").read_text()
    assert "## PSNR (dB) ↑" in markdown and "| swan |" in markdown and "2 maps" in markdown
    assert {p.name for p in out.glob("*.png")} == {"psnr.png", "slices_snr0.5.png",
                                                   "slices_snr2.png"}


def test_cli_scores_held_out_meshes_and_skips_one_that_encloses_nothing(small_checkpoints, tmp_path,
                                                                       capsys):
    import trimesh

    from training.evaluate_denoise import main

    meshes = tmp_path / "meshes"
    meshes.mkdir()
    trimesh.creation.capsule(height=2.0, radius=0.5).export(meshes / "capsule.obj")
    trimesh.creation.box((2, 1, 1)).export(meshes / "brick.off")
    sheet = trimesh.creation.box((1, 1, 1))
    sheet.update_faces(np.arange(len(sheet.faces)) < 2)  # two triangles: no volume
    sheet.export(meshes / "sheet.obj")
    out = tmp_path / "report"
    assert main(["--checkpoint", str(small_checkpoints["swan"]), "--meshes", str(meshes),
                 "--methods", "band-pass", "swan", "--out", str(out), "--device", "cpu"]) == 0
    assert "skipped" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert "2 maps (brick.off, capsule.obj)" in report["data"] and "meshes" in report["data"]
    noisy, band_pass = (report["methods"][k]["0.5"]["psnr"] for k in ("noisy", "band-pass"))
    assert band_pass > noisy


def test_cli_adds_a_noise_aware_row_per_model_method(two_maps, small_checkpoints, tmp_path):
    from training.evaluate_denoise import main

    out = tmp_path / "report"
    swan = str(small_checkpoints["swan"])
    assert main(["--checkpoint", swan, "--maps", *two_maps, "--methods", "band-pass", "swan",
                 "--denoiser", swan, "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["noisy", "band-pass", "swan", "swan (noise-aware)"]
    # the same weights through the same method: the same scores
    assert report["methods"]["swan (noise-aware)"]["0.5"]["psnr"] == pytest.approx(
        report["methods"]["swan"]["0.5"]["psnr"])
    assert report["denoiser"]["id"] == report["settings"]["denoiser_id"]


def test_cli_refuses_a_folder_with_another_report(two_maps, small_checkpoints, tmp_path, capsys):
    from training.evaluate_denoise import main

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"report": "denoise", "settings": {"seed": 9}}))
    args = ["--checkpoint", str(small_checkpoints["swan"]), "--maps", *two_maps, "--methods",
            "band-pass", "--out", str(out), "--device", "cpu"]
    assert main(args) == 2
    assert "holds a denoising report of other settings" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(args) == 0  # the same run again may write over its own report


def test_cli_turns_a_bad_checkpoint_into_one_line(two_maps, small_checkpoints, tmp_path, capsys):
    from napari_cryoswan.checkpoint import save_checkpoint
    from napari_cryoswan.models.registry import build_model
    from training.evaluate_denoise import main

    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    diffusion = save_checkpoint(tmp_path / "diffusion.pt", build_model("swan", preset="small"),
                                kind="diffusion")
    for path, message in ((bad, "not a readable napari-cryoswan checkpoint"),
                          (diffusion, "holds a diffusion model")):
        assert main(["--checkpoint", str(path), "--maps", *two_maps, "--out",
                     str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_projection_refuses_an_unknown_scale():
    with pytest.raises(ValueError, match="'clean' or 'noisy'"):
        denoise(smooth_volume(8), "swan", model=Identity(), noise_sd=1.0,
                params={"output_scale": "noise"})
