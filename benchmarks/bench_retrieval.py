"""Retrieval of rotated copies: the project's embedding beside the classical descriptors.

On maps the autoencoder never saw (by default the val and test splits of its corpus: whole
structures held out, each entry in five random orientations), each method turns every map into
a vector, and each query looks for its nearest neighbours by Euclidean distance:

- **clean**: every held-out map is a query against all the others; a hit is another
  orientation of the same entry (``entry_id``).
- **hard**: each query is a degraded copy of a held-out map (``embedding.degraded_copy``:
  another uniformly random rotation by spline interpolation, a blur of 1 voxel, noise at an SNR
  drawn from 1–2, masked at a contour drawn from mean + 0–1 s.d.), searched among the clean
  maps with its own source map left out: a hit is one of the source's other orientations.
- **another experiment** (with ``--experiment``): each held-out map's atomic model (the corpus
  records its source file and chains) simulated again in a uniformly random orientation, at a
  voxel size drawn from 1–3 Å and a resolution drawn from 5–12 Å (the corpus has 4 Å and 8 Å),
  taken through the product's preprocessing to 64³ at 4 Å, and noised at an SNR drawn from 1–2:
  the map another lab might deposit. It is searched among all the clean maps; a hit is one of
  its entry's orientations. No map is interpolated by a rotation here, so this form also
  measures what the clean form's spline rotations hide.
- **same structure**: for entries whose structure has other held-out entries (sub-assemblies
  of one complex), the nearest map of another entry, clean form: a hit shares the structure
  (``group``).

Methods: ``raw voxels``, ``radial spectrum``, ``3-D Zernike`` (order 10, no pre-filter) and
``3-D Zernike σ2`` (both sides pre-filtered, σ = 2 voxels: its fair preprocessing for noisy
queries), and the spectrum and ``3-D Zernike σ2`` of the box's inscribed sphere alone (``…,
sphere``: the crop the embedding makes, ``preprocess.inscribed_sphere``), from
``napari_cryoswan.descriptors``; ``pooled latent`` (each level's latent averaged
over the box, as the paper's UMAP pools it); ``SWAN shells`` (the embedding recipe without its
head), ``SWAN embedding`` (with the checkpoint's invariance head, when it has one) and, when
that head has a Zernike term, ``SWAN head alone`` (the embedding's leading columns, without the
term: read off its vectors, so not timed); ``--ablations`` adds the recipe without its pose
step and without its canonical density.

    python benchmarks/bench_retrieval.py --corpus corpus_default --checkpoint bundled:swan \\
        --splits val test --seed 0 --experiment --json retrieval.json

``--experiment`` reads the atomic models the corpus was built from (its manifest's paths, relative
to the folder it was built in: ``--built-in DIR`` when that is not the current one).

Prints the machine, versions, settings and date, then a markdown table of top-1 and top-5
rates and the time per map of each method, the embedding's misses and its distance scale (how far
a query lies from the nearest map of its own entry and of another), then, for each form, the embedding's top-1 rate
minus that of the best descriptor there, with a 95 % interval from a bootstrap over entries: a
gap of a few maps that one structure decides shows up as an interval that spans zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pooled_latent_embedder(model):
    """The plain pooled latent: each level's continuous latent averaged over the box."""
    import torch

    from napari_cryoswan.engine import map_batches

    def embed(boxes):
        def pool(x):
            latents = model.encode(x).latents
            return torch.cat([latents[name].float().mean(dim=(2, 3, 4)) for name in sorted(latents)], 1)

        parts = map_batches(pool, boxes, torch.device("cpu"))
        return np.concatenate([p.numpy() for p in parts])

    return embed


EXPERIMENT_VOXEL_SIZES = (1.0, 3.0)  # Å, uniform
EXPERIMENT_RESOLUTIONS = (5.0, 12.0)  # Å, uniform
EXPERIMENT_SNR = (1.0, 2.0)


def experiment_copies(corpus, indices, rng, built_in=None) -> np.ndarray:
    """(N, box, box, box): each sample's atoms simulated again as another experiment would
    give them (see the module docstring), preprocessed to the corpus grid."""
    from napari_cryoswan.denoise import add_noise
    from napari_cryoswan.preprocess import PreprocessSettings, preprocess, random_rotations
    from napari_cryoswan.simulate import load_atoms, simulate_density

    settings = PreprocessSettings(voxel_size=corpus.voxel_size, box=corpus.box)
    atoms_of, copies = {}, []
    for i in indices:
        sample = corpus.samples[int(i)]
        if sample.get("source_kind") != "structure" or sample.get("variant") == "assembly":
            raise SystemExit(f"{sample['sample_id']} is not simulated from the chains of one atomic model: "
                             "--experiment needs a corpus of structures and their sub-assemblies.")
        source = _structure_file(sample["source"], built_in)
        if source not in atoms_of:
            atoms_of[source] = load_atoms(source)
        atoms = atoms_of[source]
        atoms = atoms.subset(np.isin(atoms.chain, sample["chains"]))
        centre = np.average(atoms.xyz, axis=0, weights=atoms.atomic_number)
        turned = (atoms.xyz - centre) @ random_rotations(1, rng)[0].T + centre
        atoms = dataclasses.replace(atoms, xyz=turned)
        density = simulate_density(atoms, rng.uniform(*EXPERIMENT_VOXEL_SIZES), rng.uniform(*EXPERIMENT_RESOLUTIONS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a large entry's cropped edge, as in the corpus
            box = preprocess(density, settings).data
        noisy = add_noise(box, rng.uniform(*EXPERIMENT_SNR), rng)
        copies.append((noisy - noisy.mean()) / noisy.std())  # z-scored, as the corpus's maps
    return np.stack(copies)


def _structure_file(recorded: str, built_in) -> Path:
    path = Path(built_in or ".") / recorded
    if not path.is_file():
        raise SystemExit(f"{path}: the atomic model of a corpus entry is not there. Pass --built-in DIR, "
                         "the folder the corpus was built in (its manifest's source paths are relative to it).")
    return path


def methods(loaded, head_path=None, ablations: bool = False) -> dict:
    from napari_cryoswan.descriptors import describe_boxes
    from napari_cryoswan.embedding import Embedder

    found = {name: partial(describe_boxes, function) for name, function in DESCRIPTORS.items()}
    found["pooled latent"] = pooled_latent_embedder(loaded.model)
    found["SWAN shells"] = Embedder(loaded.model, None).embed
    if ablations:  # what steps 1 and 2 of the recipe buy, without the head
        found["SWAN shells, no pose"] = Embedder(loaded.model, None, steps=("canonical",)).embed
        found["SWAN shells, no canonical density"] = Embedder(loaded.model, None, steps=("pose",)).embed
    embedder = Embedder.for_checkpoint(loaded, head_path)
    if embedder.head is not None:
        found["SWAN embedding"] = embedder.embed
    if embedder.head is not None and embedder.head.descriptor is not None:  # what step 5 adds
        found[HEAD_ALONE] = LeadingColumns("SWAN embedding", drop=len(embedder.head.descriptor.mean))
    return found


@dataclasses.dataclass(frozen=True)
class LeadingColumns:
    """A method read off another method's vectors, without encoding the maps again: all but
    their last ``drop`` columns (the head's vector is the embedding less its Zernike term)."""

    of: str
    drop: int


def excluded_distances(queries_ND, gallery_MD, excluded_QM) -> np.ndarray:
    """(Q, M) squared Euclidean distances, infinite where excluded."""
    # A few queries at a time, so that raw voxels against a gallery of hundreds fit in memory.
    chunk = max(1, int(5e7 // (gallery_MD.shape[0] * gallery_MD.shape[1])))
    distances = np.concatenate([((queries_ND[i:i + chunk, None, :] - gallery_MD[None]) ** 2).sum(-1)
                                for i in range(0, len(queries_ND), chunk)])
    distances[excluded_QM] = np.inf
    return distances


def ranked(queries_ND, gallery_MD, excluded_QM, k: int = 5) -> np.ndarray:
    """(Q, k) gallery rows nearest to each query, leaving out the excluded ones."""
    return np.argsort(excluded_distances(queries_ND, gallery_MD, excluded_QM), axis=1)[:, :k]


def hits(queries_ND, gallery_MD, query_labels, gallery_labels, excluded_QM) -> np.ndarray:
    """(Q, 5) whether each query's five nearest non-excluded gallery items share its label."""
    return gallery_labels[ranked(queries_ND, gallery_MD, excluded_QM)] == query_labels[:, None]


def record_form(row: dict, form: str, hits_Q5: np.ndarray) -> None:
    """A form's top-1 and top-5 rates, and each query's top-1 hit for the paired comparison."""
    row[f"{form}_top1"], row[f"{form}_top5"] = float(hits_Q5[:, 0].mean()), float(hits_Q5.any(1).mean())
    row[f"{form}_hits"] = hits_Q5[:, 0].tolist()


RESAMPLES = 2000


def paired_difference(hits_a, hits_b, clusters, rng, resamples: int = RESAMPLES) -> tuple[float, float, float]:
    """Top-1 rate of a minus that of b on the same queries, with a 95 % interval from a bootstrap
    that resamples whole entries (a cluster bootstrap): the maps of one entry share their
    misses, so resampling single maps would make the interval too narrow."""
    a, b = np.asarray(hits_a, float), np.asarray(hits_b, float)
    names, cluster = np.unique(clusters, return_inverse=True)
    per_cluster = np.stack([np.bincount(cluster, a - b, len(names)), np.bincount(cluster, None, len(names))])
    drawn = rng.integers(0, len(names), size=(resamples, len(names)))
    differences = per_cluster[0][drawn].sum(1) / per_cluster[1][drawn].sum(1)
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(a.mean() - b.mean()), float(low), float(high)


def comparisons(result: dict, rng) -> list[dict]:
    """For each form, the SWAN embedding against the descriptor with the best top-1 there."""
    rows = {r["method"]: r for r in result["rows"]}
    ours = rows.get("SWAN embedding")
    if ours is None:
        return []
    found = []
    for form in ("clean", "hard", "experiment", "structure"):
        if f"{form}_hits" not in ours:
            continue
        clusters = result.get(f"entries_of_{form}_queries", result["entries_of_queries"])
        anchors = [r for r in result["rows"] if r["method"] in ANCHORS and f"{form}_hits" in r]
        best = max(anchors, key=lambda r: r[f"{form}_top1"])
        difference, low, high = paired_difference(ours[f"{form}_hits"], best[f"{form}_hits"], clusters, rng)
        found.append({"form": form, "anchor": best["method"], "difference": difference, "low": low, "high": high})
    return found


def report_comparisons(result: dict, seed: int) -> list[dict]:
    """``comparisons``, printed."""
    found = comparisons(result, np.random.default_rng(seed))
    if found:
        print("\nSWAN embedding minus the best descriptor of each form, top-1, with a 95 % interval "
              f"(entries resampled {RESAMPLES}×):\n")
        for c in found:
            print(f"- {c['form']}: {c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] against {c['anchor']}")
    return found


def add_experiment_arguments(parser, help_text: str) -> None:
    parser.add_argument("--experiment", action="store_true", help=help_text)
    parser.add_argument("--built-in", default=None, help="the folder the corpus was built in, when its "
                        "manifest's source paths do not resolve from here")


def misses(queries_ND, gallery_MD, labels, excluded_QM) -> dict[str, int]:
    """How often each "query label → label of its wrong nearest map" confusion occurs."""
    nearest = labels[ranked(queries_ND, gallery_MD, excluded_QM, k=1)[:, 0]]
    wrong = [f"{a} → {b}" for a, b in zip(labels, nearest) if a != b]
    return {pair: wrong.count(pair) for pair in sorted(set(wrong))}


def distance_scale(queries_ND, gallery_MD, labels, excluded_QM) -> dict[str, list[float]]:
    """The 5th, 50th and 95th percentiles of each query's distance to the nearest map of its own
    entry ("own") and to the nearest map of another ("other"): the scale on which the explorer's
    distances read as "a copy" or "another map"."""
    distances = np.sqrt(excluded_distances(queries_ND, gallery_MD, excluded_QM))
    same = labels[:, None] == labels[None]
    own, other = np.where(same, distances, np.inf).min(1), np.where(same, np.inf, distances).min(1)
    return {name: np.percentile(values[np.isfinite(values)], [5, 50, 95]).round(3).tolist()
            for name, values in (("own", own), ("other", other))}


# Latent features have arbitrary units per channel: each is scaled by its spread over the clean
# maps, so that no channel's units decide the distance (the embedding's head standardises its
# input itself). The descriptors are compared as their authors define them.
# The model-free descriptors: each method's name and its name in napari_cryoswan.descriptors.
# The "sphere" rows see only the box's inscribed sphere, as the embedding does.
DESCRIPTORS = {"raw voxels": "raw_voxels", "radial spectrum": "radial_power_spectrum",
               "3-D Zernike": "zernike", "3-D Zernike σ2": "zernike_prefiltered",
               "radial spectrum, sphere": "radial_power_spectrum_sphere",
               "3-D Zernike σ2, sphere": "zernike_prefiltered_sphere"}
ANCHORS = tuple(DESCRIPTORS)
HEAD_ALONE = "SWAN head alone (no Zernike term)"
STANDARDISED = ("pooled latent", "SWAN shells", "SWAN shells, no pose", "SWAN shells, no canonical density")


def standardised(clean_ND, *others):
    """Every array scaled by the clean maps' per-feature mean and spread (None stays None)."""
    mean, std = clean_ND.mean(0), clean_ND.std(0) + 1e-8
    return [None if a is None else (a - mean) / std for a in (clean_ND, *others)]


def run(args) -> dict:
    from napari_cryoswan.checkpoint import load_checkpoint, resolve_checkpoint
    from napari_cryoswan.embedding import degraded_copy
    from training.corpus import Corpus

    corpus = Corpus(args.corpus)
    loaded = load_checkpoint(resolve_checkpoint(args.checkpoint))
    indices = np.concatenate([corpus.split_indices(s) for s in args.splits])
    if args.max_maps:
        indices = indices[: args.max_maps]
    boxes = corpus.load_batch(indices)
    entry = np.array([corpus.samples[i]["entry_id"] for i in indices])
    group = np.array([corpus.samples[i]["group"] for i in indices])
    rng = np.random.default_rng(args.seed)
    hard = np.stack([degraded_copy(b, rng) for b in boxes])
    experiment = experiment_copies(corpus, indices, rng, args.built_in) if args.experiment else None
    n = len(indices)
    itself = np.eye(n, dtype=bool)
    same_entry = entry[:, None] == entry[None]
    multi = np.array([len(set(entry[group == g])) > 1 for g in group])
    rows, vectors_of = [], {}
    for name, embed in methods(loaded, args.head, args.ablations).items():
        if isinstance(embed, LeadingColumns):
            clean, degraded, other = (None if v is None else v[:, :-embed.drop]
                                      for v in vectors_of[embed.of])
            seconds = float("nan")  # not timed: no encoding of its own
        else:
            start = time.perf_counter()
            clean = np.asarray(embed(boxes), np.float64)
            seconds = (time.perf_counter() - start) / n
            degraded = np.asarray(embed(hard), np.float64)
            other = None if experiment is None else np.asarray(embed(experiment), np.float64)
            vectors_of[name] = (clean, degraded, other)
        if name in STANDARDISED:
            clean, degraded, other = standardised(clean, degraded, other)
        row = {"method": name, "dim": clean.shape[1], "ms_per_map": 1000 * seconds}
        record_form(row, "clean", hits(clean, clean, entry, entry, itself))
        record_form(row, "hard", hits(degraded, clean, entry, entry, itself))
        row["clean_misses"] = misses(clean, clean, entry, itself)
        row["hard_misses"] = misses(degraded, clean, entry, itself)
        if other is not None:
            nothing = np.zeros_like(itself)
            record_form(row, "experiment", hits(other, clean, entry, entry, nothing))
            row["experiment_misses"] = misses(other, clean, entry, nothing)
        if multi.any():
            record_form(row, "structure", hits(clean[multi], clean, group[multi], group, same_entry[multi]))
        if name == "SWAN embedding":
            row["distances"] = {"clean": distance_scale(clean, clean, entry, itself),
                                "hard": distance_scale(degraded, clean, entry, itself)}
            if other is not None:
                row["distances"]["experiment"] = distance_scale(other, clean, entry, np.zeros_like(itself))
        rows.append(row)
        print(f"  {name}: done ({row['ms_per_map']:.0f} ms/map)", file=sys.stderr, flush=True)
    return {"maps": n, "entries": len(set(entry)), "structure_queries": int(multi.sum()),
            "checkpoint_id": loaded.checkpoint_id, "rows": rows,
            "entries_of_queries": entry.tolist(), "entries_of_structure_queries": entry[multi].tolist()}


def environment(args) -> dict:
    import torch

    from _machine import cpu_name

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores", "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }


def table(result: dict) -> str:
    forms = ["clean", "hard"] + (["experiment"] if "experiment_top1" in result["rows"][0] else [])
    header = " | ".join(f"{form} top-1 | {form} top-5" for form in forms)
    lines = [f"| method | dim | {header} | same structure top-1 | ms/map |",
             "|---|---|" + "---|---|" * len(forms) + "---|---|"]
    for r in result["rows"]:
        rates = " | ".join(f"{r[f'{form}_top1']:.2f} | {r[f'{form}_top5']:.2f}" for form in forms)
        structure = f"{r['structure_top1']:.2f}" if "structure_top1" in r else "–"
        timed = f"{r['ms_per_map']:.0f}" if np.isfinite(r["ms_per_map"]) else "–"  # – : not timed here
        lines.append(f"| {r['method']} | {r['dim']} | {rates} | {structure} | {timed} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--checkpoint", default="bundled:swan")
    p.add_argument("--head", default=None, help="an embedding head file (default: the one beside the checkpoint)")
    p.add_argument("--splits", nargs="+", default=["val", "test"], choices=("train", "val", "test"))
    p.add_argument("--max-maps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablations", action="store_true",
                   help="also the embedding recipe without its pose step, and without its canonical density")
    add_experiment_arguments(p, "also queries simulated again from each entry's atomic model (another voxel "
                                "size, resolution and orientation)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    env = environment(args)
    result = run(args)
    print(json.dumps(env, indent=1))
    print(f"\n{result['maps']} maps of {result['entries']} entries; {result['structure_queries']} same-structure queries\n")
    print(table(result))
    for r in result["rows"]:
        if r["method"] == "SWAN embedding":
            for form in ("clean", "hard", "experiment"):
                if f"{form}_misses" not in r:
                    continue
                found = ", ".join(f"{pair} ({count}×)" for pair, count in r[f"{form}_misses"].items()) or "none"
                print(f"\nSWAN embedding, {form} top-1 misses: {found}")
            print("\nSWAN embedding, distance from a query to the nearest map of its own entry and of another "
                  "(5th, 50th, 95th percentile):")
            for form, scale in r["distances"].items():
                print(f"- {form}: own {scale['own']}, other {scale['other']}")
    result["comparisons"] = report_comparisons(result, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps({**env, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
