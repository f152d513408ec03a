"""Retrieval on the training structures, with the embedding's head cross-validated.

The held-out splits of ``bench_retrieval.py`` hold 24 entries of 14 structures, so one structure
decides most of its comparisons. The training splits hold about ten times as many entries. Their
maps taught the autoencoder, but the embedding's *head* can be kept from them: the structures are
split into ``--folds`` folds, and for each fold a head is fitted (``train_embedding.fit_head``,
the shipped head's settings) on the views of the other folds and measured on this one. Every map
is then a query once, against the maps of its own fold:

- **clean**: a map against the other maps of its fold; a hit is another orientation of its entry.
- **hard**: the map's degraded copy (``embedding.degraded_copy``: the very copy the head would
  have trained on, drawn as ``training.train_embedding`` draws it) against the clean maps of its
  fold, its own source left out.

- **another experiment** (with ``--experiment``): each map of a single protein or sub-assembly
  simulated again from its atomic model (``bench_retrieval.experiment_copies``: another
  orientation, voxel size, resolution and noise) against the clean maps of its fold. The head
  never trains on such maps, in any fold.

The classical descriptors of ``bench_retrieval.py`` are measured on the same maps and copies, and
the SWAN shells (no head) are standardised per fold. The embedding's Zernike term (step 5) is
standardised over the clean maps of the folds its head was fitted on; the head's vector without
it is a row of its own. What this cannot say: the autoencoder was
trained on these maps, so its latent may describe them better than a new map's; the held-out
splits of ``bench_retrieval.py`` stay the test of that.

    python benchmarks/bench_retrieval_cv.py --corpus corpus_default corpus_assemblies \\
        --checkpoint bundled:swan --views-cache views.npz --experiment --json retrieval_cv.json

``--invariants-as-inputs 1 4`` adds heads fitted with the descriptor's values among their inputs
(its columns once, or four times so that they weigh more against the 320 shell features): the
early fusion that step 5's late fusion was chosen over.

``--descriptor-weight 0.5 1 2 3 5 10`` measures the embedding at several weights of its Zernike
term in one run (the sweep that chose λ, docs/EXPLORER.md). ``--views-cache`` is
``train_embedding``'s cache of encoded views (the same key), so a cache from
training the head saves the half hour of encoding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_retrieval import (  # noqa: E402
    DESCRIPTORS, HEAD_ALONE, add_experiment_arguments, environment, experiment_copies, hits, record_form,
    report_comparisons, standardised, table)


def descriptor_views(corpus, indices, *, seed: int) -> tuple[dict, dict]:
    """Each descriptor of every map's clean view and degraded copy: {name: (N, 2, D)}, and the
    milliseconds per view each took."""
    from tqdm import tqdm

    from napari_cryoswan.descriptors import describe_boxes
    from training.train_embedding import training_views

    found, seconds = {name: [] for name in DESCRIPTORS}, dict.fromkeys(DESCRIPTORS, 0.0)
    views = training_views(corpus, indices, degraded=1, seed=seed)
    for boxes, _, _ in tqdm(views, total=len(indices), desc="descriptors", unit="map"):
        for name, function in DESCRIPTORS.items():
            start = time.perf_counter()
            found[name].append(describe_boxes(function, boxes))
            seconds[name] += time.perf_counter() - start
    return ({name: np.stack(v) for name, v in found.items()},
            {name: 1000 * s / (2 * len(indices)) for name, s in seconds.items()})


def experiment_views(corpus, indices, embedder, args) -> tuple[np.ndarray, dict]:
    """Each map's row among the maps simulated again (-1: none; assemblies are built by symmetry
    operators that the manifest does not keep, so they cannot be), and those maps' descriptors
    and shell features: {name: (E, D), "features": (E, F)}."""
    from napari_cryoswan.descriptors import describe_boxes

    simulated = [k for k, i in enumerate(indices) if corpus.samples[int(i)].get("source_kind") == "structure"
                 and corpus.samples[int(i)].get("variant") != "assembly"]
    row = np.full(len(indices), -1)
    row[simulated] = np.arange(len(simulated))
    print(f"  simulating {len(simulated)} maps again", file=sys.stderr, flush=True)
    copies = experiment_copies(corpus, indices[simulated], np.random.default_rng(args.seed), args.built_in)
    found = {name: describe_boxes(function, copies) for name, function in DESCRIPTORS.items()}
    found["features"] = embedder.features(copies)
    return row, found


def run(args) -> dict:
    from napari_cryoswan.checkpoint import load_checkpoint, resolve_checkpoint
    from napari_cryoswan.embedding import DESCRIPTOR, DescriptorTerm, Embedder
    from training.corpus import CorpusSet
    from training.train_embedding import cached_view_features, fit_head, view_features, views_key

    loaded = load_checkpoint(resolve_checkpoint(args.checkpoint))
    corpus = CorpusSet(args.corpus)
    indices = corpus.split_indices("train")
    embedder = Embedder(loaded.model, None)
    key = views_key(loaded, corpus, "train", degraded=1, seed=args.views_seed)
    features, entries, groups = cached_view_features(
        args.views_cache, key, lambda: view_features(embedder, corpus, indices, degraded=1, seed=args.views_seed))
    features = features.reshape(len(indices), 2, -1)  # each map: its clean view, its degraded copy
    entries, groups = entries[::2], groups[::2]
    described, ms_per_view = descriptor_views(corpus, indices, seed=args.views_seed)
    experiment_row, experiment = experiment_views(corpus, indices, embedder, args) if args.experiment else (
        np.full(len(indices), -1), None)
    structures = np.unique(groups)
    np.random.default_rng(args.seed).shuffle(structures)
    folds = [np.flatnonzero(np.isin(groups, part)) for part in np.array_split(structures, args.folds)]
    zernike = next(name for name, function in DESCRIPTORS.items() if function == DESCRIPTOR)
    fused = {embedding_row(w, k): w for k, w in enumerate(args.descriptor_weight)}
    # Early fusion: each map's shell features followed by the invariants, their columns R times.
    fed = {fed_row(r): (r, np.concatenate([features, np.tile(described[zernike], r)], axis=2).astype(np.float32))
           for r in args.invariants_as_inputs}
    collected = {name: {"clean": [], "hard": [], "experiment": []}
                 for name in [*DESCRIPTORS, "SWAN shells", HEAD_ALONE, *fused, *fed]}
    experiment_queries = []
    for number, held in enumerate(folds, start=1):
        rest = np.setdiff1d(np.arange(len(indices)), held)
        start = time.perf_counter()
        head = fit_head(features[rest].reshape(2 * len(rest), -1), np.repeat(entries[rest], 2),
                        autoencoder_id=loaded.checkpoint_id, steps=args.steps, seed=args.seed)
        print(f"  fold {number}/{args.folds}: head fitted on {len(rest)} maps in "
              f"{time.perf_counter() - start:.0f} s; measuring on {len(held)} maps", file=sys.stderr, flush=True)
        others = experiment_row[held][experiment_row[held] >= 0]  # the fold's experiment copies
        vectors = {name: (v[held, 0], v[held, 1], None if experiment is None else experiment[name][others])
                   for name, v in described.items()}
        other_features = None if experiment is None else experiment["features"][others]
        vectors["SWAN shells"] = tuple(standardised(features[held, 0], features[held, 1], other_features))
        vectors[HEAD_ALONE] = head_vectors(head, features[held, 0], features[held, 1], other_features)
        for name, (repeats, inputs) in fed.items():
            fed_head = fit_head(inputs[rest].reshape(2 * len(rest), -1), np.repeat(entries[rest], 2),
                                autoencoder_id=loaded.checkpoint_id, steps=args.steps, seed=args.seed)
            other_inputs = None if experiment is None else np.concatenate(
                [other_features, np.tile(experiment[zernike][others], repeats)], axis=1).astype(np.float32)
            vectors[name] = head_vectors(fed_head, inputs[held, 0], inputs[held, 1], other_inputs)
        # Step 5, standardised over the clean maps of the folds the head was fitted on.
        for name, weight in fused.items():
            term = DescriptorTerm.fitted(described[zernike][rest, 0], weight)
            vectors[name] = tuple(None if v is None else np.concatenate([v, term.scaled(z)], axis=1)
                                  for v, z in zip(vectors[HEAD_ALONE], vectors[zernike]))
        itself = np.eye(len(held), dtype=bool)
        labels = entries[held]
        other_labels = labels[experiment_row[held] >= 0]
        experiment_queries.append(other_labels)
        for name, (clean, degraded, other) in vectors.items():
            clean, degraded = np.asarray(clean, np.float64), np.asarray(degraded, np.float64)
            collected[name]["clean"].append(hits(clean, clean, labels, labels, itself))
            collected[name]["hard"].append(hits(degraded, clean, labels, labels, itself))
            if other is not None:
                nothing = np.zeros((len(other), len(held)), bool)
                collected[name]["experiment"].append(
                    hits(np.asarray(other, np.float64), clean, other_labels, labels, nothing))
    rows = []
    for name, forms in collected.items():
        row = {"method": name, "dim": int(np.shape(vectors[name][0])[-1]), "ms_per_map": ms_per_view.get(name, float("nan"))}
        for form, parts in forms.items():
            if parts:
                record_form(row, form, np.concatenate(parts))
        rows.append(row)
    order = np.concatenate(folds)
    return {"maps": len(indices), "entries": len(set(entries)), "structures": len(structures),
            "checkpoint_id": loaded.checkpoint_id, "rows": rows, "descriptor": zernike, "entries_of_queries": entries[order].tolist(),
            "entries_of_experiment_queries": np.concatenate(experiment_queries).tolist()}


def head_vectors(head, clean, degraded, other) -> tuple:
    """A head's vectors of a fold's clean maps, their degraded copies and the maps simulated
    again (None where there are none)."""
    import torch

    return tuple(None if f is None else head.apply(torch.from_numpy(f)) for f in (clean, degraded, other))


FED_HEAD = "head fed the invariants"


def fed_row(repeats: int) -> str:
    """The row of a head fitted with the invariants among its inputs, their columns ``repeats`` times."""
    return FED_HEAD + ("" if repeats == 1 else f", columns ×{repeats}")


def embedding_row(weight: float, position: int) -> str:
    """The row of the embedding at one λ: the first weight given is the one compared with the
    descriptors, under the name the comparison reads."""
    return "SWAN embedding" if position == 0 else f"SWAN embedding, λ = {weight:g}"


def misses_table(result: dict) -> str:
    """Top-1 misses of the head alone, of the embedding at each λ, of the heads fed the invariants
    and of the Zernike term's descriptor alone."""
    shown = (HEAD_ALONE, result["descriptor"])
    rows = [r for r in result["rows"] if r["method"] in shown
            or r["method"].startswith(("SWAN embedding", FED_HEAD))]
    forms = [f for f in ("clean", "hard", "experiment") if f"{f}_hits" in rows[0]]
    lines = ["| method | " + " | ".join(f"{f} misses (of {len(rows[0][f'{f}_hits'])})" for f in forms) + " |",
             "|---" * (len(forms) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(str(r[f"{f}_hits"].count(False)) for f in forms) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from napari_cryoswan.embedding import DESCRIPTOR_WEIGHT

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, nargs="+", help="the corpora the head is trained on")
    p.add_argument("--checkpoint", default="bundled:swan")
    p.add_argument("--views-cache", type=Path, default=None, help="train_embedding's cache of encoded views")
    p.add_argument("--views-seed", type=int, default=0, help="the seed the degraded copies are drawn with")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--steps", type=int, default=600, help="head training steps (the shipped head's 600)")
    p.add_argument("--seed", type=int, default=0, help="draws the folds, the heads and the bootstrap")
    p.add_argument("--descriptor-weight", type=float, nargs="+", default=[DESCRIPTOR_WEIGHT], metavar="λ",
                   help=f"λ of the embedding's Zernike term (default: the recipe's, {DESCRIPTOR_WEIGHT}); "
                        "several: a row for each, the first compared with the descriptors")
    p.add_argument("--invariants-as-inputs", type=int, nargs="*", default=[], metavar="R",
                   help="also a head fitted on the shell features followed by the Zernike invariants, "
                        "their columns repeated R times (early fusion instead of step 5's late fusion); "
                        "a row for each R")
    add_experiment_arguments(p, "also each single protein and sub-assembly simulated again from its atomic model")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    env = environment(args)
    result = run(args)
    print(json.dumps(env, indent=1, default=str))
    print(f"\n{result['maps']} maps of {result['entries']} entries and {result['structures']} structures, "
          f"{args.folds} folds by structure\n")
    print(table(result))
    print("\n" + misses_table(result))
    result["comparisons"] = report_comparisons(result, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps({**env, **result}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
