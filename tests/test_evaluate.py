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
    assert [r["model"] for r in rows] == [
        "swan (RQ1+RQ2)", "swan (RQ2)", "wavelet @ swan's bits", "dct @ swan's bits",
        "swan-rq1 (RQ1)", "wavelet @ swan-rq1's bits", "dct @ swan-rq1's bits"]
    # bits per map: the small presets' latents at a fixed width (7-bit indices; RQ2: 585 codes),
    # the real streams of their indices, and the codecs' streams within those
    assert [rows[i]["fixed_bits_per_map"] for i in (0, 1, 4)] == ["76622", "4095", "72527"]
    coded = {label: index_stream_bits(load_checkpoint(path).model, levels, tiny_corpus)
             for label, path, levels in (("swan", paths[0], ("rq1", "rq2")), ("RQ2", paths[0], ("rq2",)),
                                         ("swan-rq1", paths[1], ("rq1",)))}
    assert [float(rows[i]["bits_per_map"]) for i in (0, 1, 4)] == pytest.approx(
        [coded["swan"], coded["RQ2"], coded["swan-rq1"]], rel=1e-5)
    for row in rows[2:4] + rows[5:]:
        budget = int(coded["swan" if "swan's" in row["model"] else "swan-rq1"])
        assert int(row["bit_budget"]) == budget and 0 < float(row["bits_per_map"]) <= budget
    assert rows[2]["budget_of"] == "swan (RQ1+RQ2)" and rows[2]["checkpoint"] == paths[0]
    assert "| model | bits/map | MSE ↓" in markdown
    assert f"| swan (RQ1+RQ2) | {coded['swan']:,.0f} |" in markdown
    assert "fixed width" in markdown and "swan (RQ1+RQ2) 76,622" in markdown

    # the numbers are what the metrics module gives for these reconstructions
    data = Corpus(tiny_corpus)
    volumes = data.load_batch(data.split_indices("test"))
    recon = reconstruct(load_checkpoint(paths[0]).model, volumes)["RQ1+RQ2"]
    psnr = np.mean([voxel_metrics(p, t)["psnr"] for p, t in zip(recon, volumes)])
    mean_curve = np.mean([fsc(p, t, 4.0).correlation for p, t in zip(recon, volumes)], axis=0)
    curve = fsc(recon[0], volumes[0], 4.0)
    curve = type(curve)(curve.shell, curve.frequency, mean_curve, curve.n_voxels, 64, 4.0)
    assert float(rows[0]["psnr"]) == pytest.approx(psnr, rel=1e-4)
    expected = fsc_resolution(curve, 0.5)  # an untrained model's curve need not cross
    assert rows[0]["fsc_0.5_kind"] == expected.kind
    if expected.angstrom is None:
        assert rows[0]["fsc_0.5"] == ""
    else:
        assert float(rows[0]["fsc_0.5"]) == pytest.approx(expected.angstrom, rel=1e-4)

    report = json.loads((out / "report.json").read_text())
    assert "binarisation" in report and report["results"][0]["codebook_usage"]["rq1"]["size"] == 128
    assert len(report["results"][0]["fsc_mean"]) == 33
    codec_row = report["results"][2]
    assert (codec_row["variant"], codec_row["codebook_usage"]) == ("wavelet", {})
    assert codec_row["bit_budget"] == int(coded["swan"]) and len(codec_row["fsc_mean"]) == 33
    assert report["results"][0]["fixed_bits"] == 76_622
    assert "| wavelet @ swan's bits |" not in markdown.split("## Codebook usage")[1]


def index_stream_bits(model, levels, corpus) -> float:
    """The mean size of the test maps' index streams at ``levels``, encoded here in one batch."""
    import torch

    from napari_cryoswan.codecs import index_stream

    data = Corpus(corpus)
    volumes = torch.from_numpy(data.load_batch(data.split_indices("test")))[:, None]
    with torch.inference_mode():
        codes = model.eval().encode(volumes).codes
    total = [sum(8 * len(index_stream(torch.cat([t[b].ravel() for t in codes[level]]).numpy(),
                                      model.codebooks()[level].size)) for level in levels)
             for b in range(len(volumes))]
    return float(np.mean(total))


def test_codec_rows_are_scored_from_their_bytes_like_the_models(tiny_corpus, small_checkpoints,
                                                                tmp_path):
    from napari_cryoswan.codecs import get_codec

    out = tmp_path / "report"
    assert main(["--checkpoints", str(small_checkpoints["swan-rq1"]), "--corpus", str(tiny_corpus),
                 "--out", str(out), "--device", "cpu", "--codecs", "wavelet",
                 "--codec-fractions", "1", "0.05"]) == 0
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [r["model"] for r in rows] == ["swan-rq1 (RQ1)", "wavelet @ swan-rq1's bits",
                                          "wavelet @ 0.05 × swan-rq1's bits"]
    data = Corpus(tiny_corpus)
    volumes = data.load_batch(data.split_indices("test"))
    codec = get_codec("wavelet")
    budget = int(rows[2]["bit_budget"])  # 0.05 × the mean size of the model's index streams
    assert budget == pytest.approx(0.05 * float(rows[0]["bits_per_map"]), abs=1)
    blobs = [codec.encode(v, budget) for v in volumes]
    recon = [codec.decode(b, v.shape) for b, v in zip(blobs, volumes)]
    assert float(rows[2]["bits_per_map"]) == pytest.approx(np.mean([len(b) * 8 for b in blobs]), rel=1e-5)
    psnr = np.mean([voxel_metrics(p, t)["psnr"] for p, t in zip(recon, volumes)])
    assert float(rows[2]["psnr"]) == pytest.approx(psnr, rel=1e-4)
    assert float(rows[1]["psnr"]) > float(rows[2]["psnr"])  # more bits, a closer map


def test_codecs_can_be_left_out(tiny_corpus, small_checkpoints, tmp_path):
    out = tmp_path / "report"
    assert main(["--checkpoints", str(small_checkpoints["swan-rq1"]), "--corpus", str(tiny_corpus),
                 "--out", str(out), "--device", "cpu", "--codecs"]) == 0
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [(r["model"], r["fixed_bits_per_map"]) for r in rows] == [("swan-rq1 (RQ1)", "72527")]
    assert 0 < float(rows[0]["bits_per_map"]) <= 72527 + 15  # a stream's header byte and padding


def test_two_checkpoints_of_one_model_are_named_by_their_runs(tiny_corpus, small_checkpoints, tmp_path):
    import shutil

    for run in ("run-a", "run-b"):
        (tmp_path / run).mkdir()
        shutil.copyfile(small_checkpoints["swan-rq1"], tmp_path / run / "model.pt")
    out = tmp_path / "report"
    assert main(["--checkpoints", str(tmp_path / "run-a" / "model.pt"), str(tmp_path / "run-b" / "model.pt"),
                 "--corpus", str(tiny_corpus), "--out", str(out), "--device", "cpu", "--codecs"]) == 0
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [r["model"] for r in rows] == ["run-a: swan-rq1 (RQ1)", "run-b: swan-rq1 (RQ1)"]


def test_report_on_a_folder_of_maps(small_checkpoints, tmp_path, data_dir):
    maps = tmp_path / "maps"
    maps.mkdir()
    shutil.copy(data_dir / "emd_3197.map.gz", maps)
    out = tmp_path / "report"
    assert main(["--checkpoints", str(small_checkpoints["swan"]), "--maps", str(maps),
                 "--out", str(out), "--device", "cpu", "--codecs", "dct"]) == 0
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


def test_runs_that_differ_only_in_their_seed_are_summarised_as_mean_and_sd(tiny_corpus, tmp_path):
    import torch

    from napari_cryoswan.checkpoint import save_checkpoint
    from napari_cryoswan.models.registry import build_model

    def run(name, seed, step=10, **timing):
        torch.manual_seed(seed)
        return str(save_checkpoint(tmp_path / f"{name}.pt", build_model("swan-rq1", preset="small"),
                                   {"seed": seed, "step": step, "corpus_id": "c0", **timing}))

    # runs stopped by one time budget are seeds of one recipe, whatever step each reached
    timed = {"time_budget": 480.0, "train_seconds": 480.5}
    paths = [run("s0", 0), run("s1", 1), run("s2", 2), run("longer", 3, step=20),
             run("t0", 0, step=285, **timed), run("t1", 1, step=287, **timed)]
    out = tmp_path / "report"
    assert main(["--checkpoints", *paths, "--corpus", str(tiny_corpus), "--out", str(out),
                 "--device", "cpu", "--codecs"]) == 0
    rows = {r["model"]: r for r in csv.DictReader(open(out / "report.csv"))}
    psnr = [float(rows[f"s{s}: swan-rq1 (RQ1)"]["psnr"]) for s in range(3)]
    section = (out / "report.md").read_text().split("## Over seeds: mean ± s.d.")[1]
    summary = [line for line in section.splitlines() if line.startswith("| swan-rq1")]
    assert len(summary) == 2  # the run of another step is not one of the seeds
    cells = [c.strip() for c in summary[0].split("|")[1:-1]]
    assert cells[1:3] == ["step 10", "0, 1, 2"]
    assert cells[4] == f"{np.mean(psnr):.4g} ± {np.std(psnr, ddof=1):.2g}"
    assert [c.strip() for c in summary[1].split("|")[2:4]] == ["480 s", "0, 1"]
