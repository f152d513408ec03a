"""Do large complexes that fill or overflow the box reconstruct as well as the median map?

For each checkpoint, every map of a split of two corpora is reconstructed (the full variant) and
scored on its own FSC curve:

- ``--proteins``: the reference corpus (``corpus_default``): the median FSC(0.5) resolution of its
  maps, and the share of the box faces above mean + 1 s.d. (how much the maps fill their box);
- ``--assemblies``: the large-complex corpus (``default_corpus --assemblies-out``): per entry (its
  rotations pooled), the FSC(0.5) resolution of its mean curve, PSNR, IoU, mass, symmetry, its
  span (the longest axis-aligned extent of the density above mean + 1 s.d., in Å), the density
  that the box cut off, and whether it lies within ``--within`` Å of the reference
  median (the goal: 3 Å).

A curve that never crosses 0.5 counts at the Nyquist limit (8 Å at 4 Å voxels) in the median;
one below 0.5 from the first shell counts at the box edge. Both are marked in the table.

    python benchmarks/bench_large_complexes.py --proteins corpus_default --assemblies corpus_assemblies \\
        bundled:swan runs/swan/model.pt --figure large.png

``--figure`` draws, for the heaviest test entries (first rotation), a central slab of the input
beside each checkpoint's reconstruction.

Prints the machine, versions, settings and date, then markdown tables; ``--json`` writes all.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def resolution_angstrom(curve, threshold: float = 0.5) -> tuple[float, str]:
    """The resolution in Å and a mark: "" for a crossing, "≤" at Nyquist, ">" at the box edge."""
    from napari_cryoswan.metrics import CROSSING, NO_CROSSING, fsc_resolution

    found = fsc_resolution(curve, threshold)
    if found.kind == CROSSING:
        return found.angstrom, ""
    return found.limit, "≤" if found.kind == NO_CROSSING else ">"


def score(model, corpus, split: str) -> list[dict]:
    """Per map: its sample record, the map, its full reconstruction, FSC curve, PSNR and IoU."""
    from napari_cryoswan.engine import reconstruct
    from napari_cryoswan.metrics import fsc, voxel_metrics

    ids = corpus.split_indices(split)
    volumes = corpus.load_batch(ids)
    recon = next(iter(reconstruct(model, volumes).values()))  # the full variant comes first
    return [{"sample": corpus.samples[i], "volume": v, "recon": r,
             "curve": fsc(r, v, corpus.voxel_size), **voxel_metrics(r, v)}
            for i, v, r in zip(ids, volumes, recon)]


def faces_dense(volume: np.ndarray) -> float:
    from napari_cryoswan.io import DensityMap
    from napari_cryoswan.reconstruction import fraction_of_faces_dense

    return fraction_of_faces_dense(DensityMap(volume, (4.0,) * 3, (0.0,) * 3))  # voxel size unused


def span(volume: np.ndarray, voxel_size: float) -> float:
    """The longest axis-aligned extent (Å) of the voxels above mean + 1 s.d."""
    dense = np.argwhere(volume > volume.mean() + volume.std())
    return float((dense.max(axis=0) - dense.min(axis=0) + 1).max() * voxel_size)


def per_entry(rows: list[dict], voxel_size: float) -> list[dict]:
    """Rows pooled by entry: the mean FSC curve over its rotations, mean PSNR and IoU."""
    entries: dict[str, list[dict]] = {}
    for row in rows:
        entries.setdefault(row["sample"]["entry_id"], []).append(row)
    pooled = []
    for entry_id, group in sorted(entries.items()):
        first = group[0]["sample"]
        curve = replace(group[0]["curve"], correlation=np.mean([r["curve"].correlation for r in group], axis=0))
        angstrom, mark = resolution_angstrom(curve)
        pooled.append({
            "entry": entry_id, "maps": len(group), "mass_kda": first.get("mass_kda"),
            "symmetry": first.get("symmetry", first.get("variant")),
            "outside": float(np.mean([r["sample"]["preprocessing"]["fraction_outside"] for r in group])),
            "faces_dense": float(np.mean([faces_dense(r["volume"]) for r in group])),
            "span": float(np.mean([span(r["volume"], voxel_size) for r in group])),
            "fsc_0.5": angstrom, "mark": mark,
            "psnr": float(np.mean([r["psnr"] for r in group])), "iou": float(np.mean([r["iou"] for r in group])),
        })
    return pooled


def draw(shown: dict[str, list[dict]], path: str, count: int = 5) -> None:
    """Central 8-voxel slabs (summed) of the heaviest entries: input, then each checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(shown.values()))
    picks = sorted((i for i, r in enumerate(first) if r["sample"]["rotation_index"] == 0),
                   key=lambda i: -(first[i]["sample"]["mass_kda"] or 0))[:count]
    columns = ["input", *shown]
    fig, axes = plt.subplots(len(picks), len(columns), figsize=(2.0 * len(columns), 2.0 * len(picks)),
                             squeeze=False)
    slab = slice(28, 36)
    for row, i in enumerate(picks):
        sample = first[i]["sample"]
        images = [first[i]["volume"]] + [rows[i]["recon"] for rows in shown.values()]
        for col, (title, image) in enumerate(zip(columns, images)):
            ax = axes[row, col]
            ax.imshow(image[slab].sum(axis=0), cmap="gray")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{sample['entry_id']}\n{sample['symmetry'][:12]}, {sample['mass_kda']:.0f} kDa",
                              fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    from _machine import run_line
    from napari_cryoswan.checkpoint import load_checkpoint, resolve_checkpoint
    from training.corpus import Corpus

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--proteins", required=True, help="the reference corpus (its median map)")
    p.add_argument("--assemblies", required=True, help="the large-complex corpus")
    p.add_argument("--split", default="test")
    p.add_argument("--within", type=float, default=3.0, help="Å from the reference median (goal: 3)")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--figure", help="draw the heaviest entries and their reconstructions here (.png)")
    args = p.parse_args(argv)

    proteins, assemblies = Corpus(args.proteins), Corpus(args.assemblies)
    print(f"# Large complexes against the median map\n\n{run_line()}\n"
          f"reference {args.proteins} (id {proteins.corpus_id}), large complexes {args.assemblies} "
          f"(id {assemblies.corpus_id}), {args.split} split; FSC(0.5) of each map's own curve "
          f"(assemblies: the mean curve over an entry's rotations); ≤: no crossing up to Nyquist, "
          f">: beyond the box\n")
    report, shown = {}, {}
    for spec in args.checkpoints:
        loaded = load_checkpoint(resolve_checkpoint(spec))
        reference = score(loaded.model, proteins, args.split)
        median = float(np.median([resolution_angstrom(r["curve"])[0] for r in reference]))
        reference_faces = float(np.median([faces_dense(r["volume"]) for r in reference]))
        large_maps = score(loaded.model, assemblies, args.split)
        shown[spec] = large_maps
        large = per_entry(large_maps, assemblies.voxel_size)
        for entry in large:
            entry["within"] = entry["fsc_0.5"] - median <= args.within
        report[spec] = {"checkpoint_id": loaded.checkpoint_id, "reference_median_fsc_0.5": median,
                        "reference_maps": len(reference), "reference_median_faces_dense": reference_faces,
                        "reference_psnr": float(np.mean([r["psnr"] for r in reference])),
                        "entries": large}
        within = sum(e["within"] for e in large)
        print(f"## {spec} (id {loaded.checkpoint_id})\n\nreference: {len(reference)} maps, median FSC(0.5) "
              f"{median:.2f} Å, mean PSNR {report[spec]['reference_psnr']:.2f} dB, median dense faces "
              f"{reference_faces:.1%}; large complexes within {args.within:g} Å of it: {within} of "
              f"{len(large)}\n")
        print("| entry | symmetry | mass (kDa) | span (Å) | cut off | dense faces | FSC 0.5 (Å) | PSNR (dB) | IoU | within |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for e in sorted(large, key=lambda e: -(e["mass_kda"] or 0)):
            print(f"| {e['entry']} | {e['symmetry']} | {e['mass_kda']:.0f} | {e['span']:.0f} | {e['outside']:.0%} | "
                  f"{e['faces_dense']:.0%} | {e['mark']}{e['fsc_0.5']:.2f} | {e['psnr']:.2f} | {e['iou']:.3f} | "
                  f"{'yes' if e['within'] else 'no'} |")
        print(flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.figure:
        draw(shown, args.figure)


if __name__ == "__main__":
    main()
