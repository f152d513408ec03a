"""Score the denoising methods on noisy copies of clean maps (the paper's Fig. 5c protocol).

    python -m training.evaluate_denoise --checkpoint bundled:swan --corpus corpus/ --split test \\
        --snr 0.1 0.25 0.5 1 2 --seed 0 --out report/

or ``--maps PATH ...`` (map files or folders of maps, each preprocessed for the checkpoint's
input contract), or ``--meshes PATH ...`` (mesh files or folders, voxelised as the corpus
builder does: the paper's ModelNet protocol). Each clean map gets white Gaussian noise at each
SNR (``denoise.add_noise``: SNR = var(clean) / var(noise) over the box of the z-scored map),
seeded from ``--seed``, the SNR and the map's position; each method (``--methods``, default all
of ``denoise.METHODS``) restores it, and the result is scored against the clean map.

Every method is told the noise s.d. (the noise model is known); ``--estimate-noise`` makes the
methods estimate it from each noisy map instead. The Gaussian's width is tuned per SNR on the
validation split of the corpus (``--tune-corpus``, default ``--corpus``); with ``--maps`` or
``--meshes`` alone it is tuned on the scored maps themselves, which flatters it, and the report
says so. ``--denoiser CKPT`` adds a "(noise-aware)" row for each model method, run through a
noise-aware fine-tune of the checkpoint (``training.train --init … --input-snr …``).
``--ablations`` adds rows for the choices inside the latent projection (the scale it undoes, a
second pass).

Writes ``report.md``, ``report.csv`` and ``report.json`` (its "methods" maps each row, "noisy"
first, to its mean PSNR, SSIM, RMSE, MSE, IoU, F1 and FSC resolutions per SNR), ``psnr.png``
(PSNR against SNR per method) and ``slices_snr<S>.png`` (central slices of the first maps).
A non-empty ``--out`` is refused unless it holds this same run's report, or ``--overwrite`` is
given.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from napari_cryoswan._atomic import atomic_path, write_text_atomic
from napari_cryoswan.denoise import GAUSSIAN_SIGMAS, METHODS
from napari_cryoswan.session import DEVICES

REPORT = "denoise"
SCORES = ("psnr", "ssim", "rmse", "fsc_0.5", "fsc_0.143", "mse", "iou", "f1")
TABLES = ("psnr", "ssim", "rmse", "fsc_0.5")
LOWER_IS_BETTER = {"rmse", "mse", "fsc_0.5", "fsc_0.143"}
TITLES = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "rmse": "RMSE ↓", "fsc_0.5": "FSC 0.5 (Å) ↓"}
ABLATIONS = {
    "swan (noisy s.d. in and out)": ("swan", {"input_scale": "noisy", "output_scale": "noisy"}),
    "swan (noisy s.d. in)": ("swan", {"input_scale": "noisy"}),
    "swan (2 passes)": ("swan", {"passes": 2}),
}
NOISE_MODEL = ("White Gaussian noise added to the z-scored clean map, SNR = var(clean) / "
               "var(noise) over the whole box (noise s.d. 1/√SNR).")
SLICE_MAPS = 3
EVALUATION_STREAM, TUNING_STREAM = 0, 1


class OutFolderError(ValueError):
    """--out holds something this run must not overwrite."""


def noise_seed(seed: int, snr: float, stream: int) -> list[int]:
    """The seed of one SNR's noise: map i of the scored maps gets [*this, i] (``add_noise``)."""
    return [seed, stream, int(round(snr * 1e6))]


def evenly_spaced(n: int, k: int | None) -> np.ndarray:
    """``k`` indices spread evenly over range(n) (all when k is None or ≥ n), so a subset of a
    split spans its groups instead of the first few."""
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def read_maps(paths: list[str], contract) -> tuple[np.ndarray, str]:
    """Map files, and the map files in folders, preprocessed for ``contract``, in name order."""
    from napari_cryoswan.io import is_map_path, read_map
    from training.build_corpus import collect_files

    files = collect_files(paths, is_map_path, "map (.mrc, .map, .ccp4, optionally .gz)")
    return _preprocessed([read_map(p) for p in files], files, contract)


def read_meshes(paths: list[str], contract) -> tuple[np.ndarray, str]:
    """Mesh files, and the mesh files in folders, voxelised as the corpus builder does
    (``training.mesh``) in the contract's box and preprocessed for it. A mesh that encloses no
    volume is skipped with a warning."""
    from training.build_corpus import collect_files
    from training.mesh import MeshError, MeshSettings, is_mesh_path, mesh_density

    settings = MeshSettings(box=contract.box, voxel_size=contract.voxel_size)
    files, densities = [], []
    for path in collect_files(paths, is_mesh_path, "mesh (.off, .obj, .ply, .stl)"):
        try:
            densities.append(mesh_density(path, settings))
            files.append(path)
        except MeshError as err:
            print(f"warning: skipped {err}", file=sys.stderr)
    if not files:
        raise ValueError(f"{' '.join(paths)}: no mesh could be voxelised.")
    volumes, description = _preprocessed(densities, files, contract)
    return volumes, f"{description}, voxelised from meshes"


def _preprocessed(densities, files: list[Path], contract) -> tuple[np.ndarray, str]:
    from napari_cryoswan.preprocess import preprocess

    settings = contract.settings()
    volumes = np.stack([preprocess(d, settings).data for d in densities])
    return volumes, (f"{len(files)} maps ({', '.join(p.name for p in files[:5])}"
                     f"{', …' if len(files) > 5 else ''}), preprocessed to {settings.box}³ at "
                     f"{settings.voxel_size:g} Å")


def corpus_split(corpus: str, split: str, contract, k: int | None) -> tuple[np.ndarray, str]:
    """``k`` maps spread over a corpus split (``evaluate.VolumeSource`` checks the geometry)."""
    from training.evaluate import VolumeSource

    source = VolumeSource(corpus, split, None, None)
    volumes = source(contract)
    keep = evenly_spaced(len(volumes), k)
    return volumes[keep], f"{source.description}, {len(keep)} of its {len(volumes)} maps"


def score(outputs: np.ndarray, clean: np.ndarray, voxel_size: float) -> dict:
    """Mean scores of ``outputs`` against ``clean``, (N, D, H, W) each: ``evaluate``'s scoring
    (FSC resolutions read off the mean curve) and the mean RMSE on the same [0, 1] scale."""
    from napari_cryoswan.metrics import rmse
    from training.evaluate import score_reconstructions

    means, _ = score_reconstructions(outputs, clean, voxel_size)
    row = {key: value for key, value in means.items() if not key.startswith("fsc_")}
    row["rmse"] = float(np.mean([rmse(p, t) for p, t in zip(outputs, clean)]))
    for column in ("fsc_0.5", "fsc_0.143"):
        row[column] = means[column].angstrom
        row[f"{column}_resolution"] = means[column].to_dict()
    return row


def evaluate(model, clean: np.ndarray, rows: dict[str, tuple[str | None, dict]], snrs,
             seed: int, voxel_size: float, *, device=None, known_noise: bool = True,
             gaussian_sigmas: dict | None = None, row_models: dict | None = None,
             progress=print) -> tuple[dict, dict]:
    """Score every row (label → (method or None for the noisy input, params)) at every SNR.
    A row named in ``row_models`` runs its method through that model instead of ``model``.

    Returns ({label: {snr: scores}}, {snr: {"clean" | label: central slices of the first maps}}).
    """
    from napari_cryoswan.denoise import add_noise, denoise, noise_sd_for

    results: dict[str, dict] = {label: {} for label in rows}
    slices: dict[str, dict] = {}
    centre = clean.shape[1] // 2
    for snr in snrs:
        key = f"{snr:g}"
        noisy = np.stack([add_noise(v, snr, [*noise_seed(seed, snr, EVALUATION_STREAM), i])
                          for i, v in enumerate(clean)])
        slices[key] = {"clean": clean[:SLICE_MAPS, centre]}
        for label, (method, params) in rows.items():
            if method == "gaussian" and gaussian_sigmas:
                params = {**params, "sigma": gaussian_sigmas[key]}
            start = time.perf_counter()
            outputs = noisy if method is None else np.stack([
                denoise(n, method, model=(row_models or {}).get(label, model), params=params,
                        device=device,
                        noise_sd=noise_sd_for(c, snr) if known_noise else None).volume
                for n, c in zip(noisy, clean)])
            seconds = (time.perf_counter() - start) / len(clean)
            results[label][key] = {**score(outputs, clean, voxel_size),
                                   "seconds_per_map": seconds}
            slices[key][label] = outputs[:SLICE_MAPS, centre]
            progress(f"SNR {key}: {label:28s} PSNR {results[label][key]['psnr']:6.2f} dB, "
                     f"{seconds:.2f} s/map")
    return results, slices


def tune_gaussian(volumes: np.ndarray, snrs, seed: int, progress=print) -> tuple[dict, dict]:
    """The tuned Gaussian width per SNR, and every width's mean PSNR ({snr: {sigma: dB}})."""
    from napari_cryoswan.denoise import tune_gaussian_sigma

    best, curves = {}, {}
    for snr in snrs:
        key = f"{snr:g}"
        best[key], curves[key] = tune_gaussian_sigma(volumes, snr,
                                                     noise_seed(seed, snr, TUNING_STREAM))
        progress(f"SNR {key}: Gaussian sigma {best[key]:g} voxels "
                 f"({curves[key][best[key]]:.2f} dB on the tuning maps)")
    return best, curves


def _check_denoiser(denoiser, contract) -> None:
    if denoiser.contract.to_dict() != contract.to_dict():
        raise ValueError(f"--denoiser takes {denoiser.contract.box}³ maps at "
                         f"{denoiser.contract.voxel_size:g} Å; --checkpoint takes "
                         f"{contract.box}³ at {contract.voxel_size:g} Å. Fine-tune the checkpoint "
                         "itself (training.train --init).")


def check_out_folder(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless it holds a report of the same settings (a rerun)."""
    if overwrite or not out.exists() or not any(out.iterdir()):
        return
    try:
        previous = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        previous = {}
    if previous.get("report") == REPORT and previous.get("settings") == settings:
        return
    held = ("a denoising report of other settings" if previous.get("report") == REPORT
            else "other files")
    raise OutFolderError(f"{out} already holds {held}. Choose another --out, or give --overwrite "
                         "to write this report over it.")


def write_report(out: Path, report: dict, slices: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    write_text_atomic(out / "report.csv", _csv(report["methods"]))
    write_text_atomic(out / "report.md", _markdown(report))
    _plot_psnr(report["methods"], out / "psnr.png")
    for key, by_row in slices.items():
        _plot_slices(by_row, key, out / f"slices_snr{key}.png")


def _csv(methods: dict) -> str:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["method", "snr", *SCORES, "fsc_0.5_kind", "fsc_0.143_kind", "seconds_per_map"])
    for label, by_snr in methods.items():
        for key, row in by_snr.items():
            scores = ("" if row[c] is None else f"{row[c]:.6g}" for c in SCORES)
            writer.writerow([label, key, *scores,
                             row["fsc_0.5_resolution"]["kind"], row["fsc_0.143_resolution"]["kind"],
                             f"{row['seconds_per_map']:.4g}"])
    return text.getvalue()


def _markdown(report: dict) -> str:
    methods = report["methods"]
    keys = list(next(iter(methods.values())))
    lines = [f"Data: {report['data']}.", "",
             f"Checkpoint: {report['checkpoint']['path']} ({report['checkpoint']['model']}, id "
             f"{report['checkpoint']['id']}). Seed {report['settings']['seed']}.", "",
             f"Noise model: {report['noise_model']} {report['noise_sd']}", ""]
    for column in TABLES:
        lines += [f"## {TITLES[column]}", "", "| method | " + " | ".join(f"SNR {k}" for k in keys)
                  + " |", "|---" * (len(keys) + 1) + "|"]
        best = {k: _best(methods, column, k) for k in keys}
        for label, by_snr in methods.items():
            cells = [_cell(by_snr[k], column) for k in keys]
            cells = [f"**{c}**" if _rank(by_snr[k], column) == best[k] else c
                     for c, k in zip(cells, keys)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Seconds per map", "", "| method | " + " | ".join(f"SNR {k}" for k in keys) + " |",
              "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(f"{by_snr[k]['seconds_per_map']:.2f}" for k in keys)
              + " |" for label, by_snr in methods.items()]
    lines += ["", "Bold: the best value in each column, the noisy input included. PSNR, SSIM and "
              "RMSE are computed after the affine map that takes each clean map to [0, 1] is "
              "applied to both volumes. FSC resolutions are read off the mean FSC curve over the "
              "maps, against the clean map (training.evaluate's scoring).", "",
              f"Gaussian width: {report['gaussian']['note']}", "",
              "Parameters: " + "; ".join(f"{label}: {json.dumps(p)}"
                                         for label, p in report["parameters"].items()), ""]
    return "\n".join(lines)


def _parameters(rows: dict, sigmas: dict) -> dict:
    """Each method row's parameters; the Gaussian's width per SNR where it was tuned."""
    parameters = {label: {**METHODS[m].defaults, **params} for label, (m, params) in rows.items()
                  if m is not None}
    for label, (method, _) in rows.items():
        if method == "gaussian" and sigmas:
            parameters[label]["sigma"] = sigmas
    return parameters


def _cell(row: dict, column: str) -> str:
    if column.startswith("fsc_"):
        from napari_cryoswan.metrics import Resolution

        return Resolution(**row[f"{column}_resolution"]).format(digits=1)
    return f"{row[column]:.4g}" if column == "ssim" or column == "rmse" else f"{row[column]:.2f}"


def _rank(row: dict, column: str) -> float:
    """The value that orders a column; an FSC without a crossing counts as its limit (Nyquist)
    or as worse than any crossing (beyond the box), as in training.evaluate."""
    if not column.startswith("fsc_"):
        return row[column]
    resolution = row[f"{column}_resolution"]
    if resolution["angstrom"] is not None:
        return resolution["angstrom"]
    return resolution["limit"] if resolution["kind"] == "no crossing" else float("inf")


def _best(methods: dict, column: str, key: str) -> float:
    values = [_rank(by_snr[key], column) for by_snr in methods.values()]
    return min(values) if column in LOWER_IS_BETTER else max(values)


def _plot_psnr(methods: dict, path: Path) -> None:
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab20"].colors  # one colour per row, up to 20 rows
    for i, (label, by_snr) in enumerate(methods.items()):
        snrs = [float(k) for k in by_snr]
        ax.plot(snrs, [row["psnr"] for row in by_snr.values()], marker="o", label=label,
                color=colours[i % len(colours)], linestyle="--" if label == "noisy" else "-")
    ax.set(xscale="log", xlabel="SNR (var(clean) / var(noise))", ylabel="PSNR (dB)",
           title="Denoising: PSNR against the clean map")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside, not over, the lines
    _save_figure(fig, path)


def _plot_slices(by_row: dict, key: str, path: Path) -> None:
    """Central z-slices, one map per row: clean, noisy, then each method, on the clean map's
    grey scale."""
    from matplotlib.figure import Figure

    labels = list(by_row)
    n_maps = len(by_row["clean"])
    fig = Figure(figsize=(1.6 * len(labels), 1.7 * n_maps + 0.4), layout="constrained")
    axes = fig.subplots(n_maps, len(labels), squeeze=False)
    for i in range(n_maps):
        low, high = np.percentile(by_row["clean"][i], [1, 99.5])
        for j, label in enumerate(labels):
            axes[i, j].imshow(by_row[label][i], cmap="gray", vmin=low, vmax=high)
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(label, fontsize=7)
    fig.suptitle(f"Central slices at SNR {key}", fontsize=9)
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate_denoise", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="an autoencoder checkpoint (.pt), or bundled:swan for the shipped weights")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help="a corpus folder from training.build_corpus")
    source.add_argument("--maps", nargs="+", help="map files or folders of maps")
    source.add_argument("--meshes", nargs="+",
                        help="mesh files (.off, .obj, .ply, .stl) or folders of them, voxelised as "
                             "the corpus builder does (the paper's ModelNet protocol)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--max-maps", type=int, default=None,
                   help="score at most this many maps, spread evenly over the split")
    p.add_argument("--snr", type=float, nargs="+", action="extend", metavar="SNR",
                   help="signal-to-noise ratios (repeatable; default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--denoiser", metavar="CKPT",
                   help="a noise-aware fine-tune of the checkpoint (training.train --init "
                        "--input-snr): adds a '(noise-aware)' row for each model method")
    p.add_argument("--ablations", action="store_true",
                   help="add rows for the latent projection's scaling and a second pass")
    p.add_argument("--estimate-noise", action="store_true",
                   help="methods estimate the noise s.d. from each map instead of being told it")
    p.add_argument("--tune-corpus", help="tune the Gaussian on this corpus's val split "
                                         "(default: --corpus)")
    p.add_argument("--tune-maps", type=int, default=10,
                   help="validation maps to tune the Gaussian on (default 10)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--overwrite", action="store_true",
                   help="write over a report folder that holds other files or another report")
    p.add_argument("--device", default="auto", choices=DEVICES)
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    snrs = args.snr or [0.5]
    if any(not s > 0 for s in snrs):
        p.error("--snr must be positive")
    if args.max_maps is not None and args.max_maps < 1:
        p.error("--max-maps must be at least 1")
    try:
        return _run(args, sorted(set(snrs)))
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # CheckpointError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args, snrs: list[float]) -> int:
    import torch

    from napari_cryoswan.checkpoint import resolve_checkpoint
    from napari_cryoswan.session import Session

    session = Session(args.device)
    checkpoint = resolve_checkpoint(args.checkpoint)
    loaded = session.checkpoint(checkpoint)
    contract = loaded.contract
    if args.corpus:
        clean, description = corpus_split(args.corpus, args.split, contract, args.max_maps)
    else:
        read = read_maps if args.maps else read_meshes
        clean, description = read(args.maps or args.meshes, contract)
        clean = clean[evenly_spaced(len(clean), args.max_maps)]
    rows = {"noisy": (None, {}), **{m: (m, {}) for m in args.methods}}
    row_models, denoiser = {}, None
    if args.denoiser:
        denoiser = session.checkpoint(resolve_checkpoint(args.denoiser))
        _check_denoiser(denoiser, contract)
        for method in (m for m in args.methods if METHODS[m].needs_model):
            rows[f"{method} (noise-aware)"] = (method, {})
            row_models[f"{method} (noise-aware)"] = denoiser.model
    if args.ablations:
        rows.update(ABLATIONS)
    settings = {"checkpoint_id": loaded.checkpoint_id, "data": description, "snrs": snrs,
                "seed": args.seed, "rows": list(rows), "estimate_noise": args.estimate_noise,
                "tune_corpus": args.tune_corpus or args.corpus, "tune_maps": args.tune_maps,
                "denoiser_id": denoiser and denoiser.checkpoint_id}
    out = Path(args.out)
    check_out_folder(out, settings, args.overwrite)

    sigmas, gaussian = {}, {"note": "not scored."}
    if "gaussian" in args.methods:
        tune_corpus = args.tune_corpus or args.corpus
        if tune_corpus:
            tuning, tuned_on = corpus_split(tune_corpus, "val", contract, args.tune_maps)
        else:
            tuning, tuned_on = clean, "the scored maps themselves (no --tune-corpus): optimistic"
        sigmas, curves = tune_gaussian(tuning, snrs, args.seed)
        gaussian = {"note": f"σ (voxels) tuned per SNR for the best mean PSNR on {tuned_on}, "
                            f"over {GAUSSIAN_SIGMAS[0]:g}–{GAUSSIAN_SIGMAS[-1]:g} voxels: "
                            + ", ".join(f"SNR {k}: σ = {s:g}" for k, s in sigmas.items()) + ".",
                    "sigma": sigmas, "psnr_by_sigma": curves}
    print(f"scoring {len(rows)} rows on {len(clean)} maps at SNR "
          f"{', '.join(f'{s:g}' for s in snrs)}", flush=True)
    results, slices = evaluate(loaded.model, clean, rows, snrs, args.seed, contract.voxel_size,
                               device=session.device, known_noise=not args.estimate_noise,
                               gaussian_sigmas=sigmas, row_models=row_models,
                               progress=lambda m: print(m, flush=True))
    report = {
        "report": REPORT,
        "settings": settings,
        "data": description,
        "checkpoint": {"path": str(checkpoint), "id": loaded.checkpoint_id,
                       "model": loaded.model.name, "contract": contract.to_dict()},
        "denoiser": denoiser and {
            "path": str(args.denoiser), "id": denoiser.checkpoint_id,
            "fine_tuned_from": denoiser.provenance.get("init_checkpoint_id"),
            "input_snr": denoiser.provenance.get("input_snr"),
            "train_only": denoiser.provenance.get("train_only")},
        "noise_model": NOISE_MODEL,
        "noise_sd": ("Each method estimates the noise s.d. from the noisy map (--estimate-noise)."
                     if args.estimate_noise else "Each method is told the noise s.d."),
        "gaussian": gaussian,
        "parameters": _parameters(rows, sigmas),
        "methods": results,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": str(session.device)},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_report(out, report, slices)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
