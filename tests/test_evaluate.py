"""python -m training.evaluate: the Table 1 report, its plots and the RQ1 ablation."""

import csv
import json
import shutil

import numpy as np
import pytest

from napari_cryoswan.checkpoint import load_checkpoint
from napari_cryoswan.engine import reconstruct
from napari_cryoswan.metrics import fsc, fsc_resolution, voxel_metrics
from training.corpus import Corpus
from training.evaluate import main

def test_report_on_a_corpus_split(tiny_corpus, small_checkpoints, tmp_path):
    out = tmp_path / "report"
    paths = [str(small_checkpoints["swan"]), str(small_checkpoints["swan-rq1"])]
    assert main(["--checkpoints", *paths, "--corpus", str(tiny_corpus), "--split", "test",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert {p.name for p in out.iterdir()} == {"report.md", "report.csv", "report.json",
                                               "fsc.png", "codebook_usage.png"}
    markdown = (out / "report.md").read_text()
    for column in ("MSE ↓", "PSNR ↑", "SSIM ↑", "IOU ↑", "F1 ↑", "FSC 0.5 (Å) ↓", "FSC 0.143 (Å) ↓"):
        assert column in markdown
    assert "binarise" in markdown and "Ablation: RQ1 alone versus RQ1+RQ2" in markdown
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [r["model"] for r in rows] == ["swan (RQ1+RQ2)", "swan-rq1 (RQ1)"]

    # the numbers are what the metrics module gives for these reconstructions
    data = Corpus(tiny_corpus)
    volumes = data.load_batch(data.split_indices("test"))
    recon = reconstruct(load_checkpoint(paths[0]).model, volumes)["RQ1+RQ2"]
    psnr = np.mean([voxel_metrics(p, t)["psnr"] for p, t in zip(recon, volumes)])
    mean_curve = np.mean([fsc(p, t, 4.0).correlation for p, t in zip(recon, volumes)], axis=0)
    curve = fsc(recon[0], volumes[0], 4.0)
    curve = type(curve)(curve.shell, curve.frequency, mean_curve, curve.n_voxels, 64, 4.0)
    assert float(rows[0]["psnr"]) == pytest.approx(psnr, rel=1e-4)
    assert float(rows[0]["fsc_0.5"]) == pytest.approx(fsc_resolution(curve, 0.5).angstrom, rel=1e-4)

    report = json.loads((out / "report.json").read_text())
    assert "binarisation" in report and report["results"][0]["codebook_usage"]["rq1"]["size"] == 128
    assert len(report["results"][0]["fsc_mean"]) == 33


def test_report_on_a_folder_of_maps(small_checkpoints, tmp_path, data_dir):
    maps = tmp_path / "maps"
    maps.mkdir()
    shutil.copy(data_dir / "emd_3197.map.gz", maps)
    out = tmp_path / "report"
    assert main(["--checkpoints", str(small_checkpoints["swan"]), "--maps", str(maps),
                 "--out", str(out), "--device", "cpu"]) == 0
    assert "1 maps from" in (out / "report.md").read_text()


def test_bad_checkpoint_is_a_clear_error(tiny_corpus, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    assert main(["--checkpoints", str(bad), "--corpus", str(tiny_corpus), "--out", str(tmp_path / "r")]) == 2
    assert "not a readable napari-cryoswan checkpoint" in capsys.readouterr().err


def test_a_corpus_of_another_geometry_is_refused(tiny_corpus, tmp_path, capsys):
    from napari_cryoswan.checkpoint import InputContract, save_checkpoint
    from napari_cryoswan.models.registry import build_model

    path = save_checkpoint(tmp_path / "2A.pt", build_model("swan-rq1", preset="small"),
                           contract=InputContract(box=64, voxel_size=2.0))
    assert main(["--checkpoints", str(path), "--corpus", str(tiny_corpus), "--out",
                 str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert "trained on 64³ at 2 Å" in capsys.readouterr().err
