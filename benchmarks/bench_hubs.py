"""Projection and hubs on synthetic clustered embeddings: speed, stability across UMAP seeds,
and how well hubs recover the true clusters.

The data: ``--clusters`` Gaussian clusters of varied size (log-normal shares, at least 20 maps
each) and varied spread in ``--dims`` dimensions, plus a share of noise points drawn uniformly
over the clusters' bounding box (maps like nothing else, which should belong to no hub).
``--separations`` scale the distance between cluster centres relative to the clusters' spread;
the "kNN purity" column (share of a map's 10 nearest neighbours from its own cluster) says how
hard each setting is: 1.0 separates cleanly, 0.6 is about as tangled as real corpora get, 0.4
is past what any method here untangles.

For each N and separation:
  - fit_projection: seconds per fit (median over the seeds; single-threaded, as umap-learn
    runs whenever a random_state is fixed);
  - place: median milliseconds per held-out query placed one at a time, and per query in one
    batch; "placement agreement": share of held-out maps whose placed point's nearest indexed
    point on the picture is from the map's own cluster;
and for each way of finding hubs (--variants: HDBSCAN on the projection with find_hubs'
embedding check, without it, or HDBSCAN on the embedding):
  - find_hubs: seconds (median over seeds);
  - hubs per seed, share of maps in a hub, ARI against the true clusters (noise points each a
    group of their own), share of true noise left out of every hub, share of cluster maps in a
    hub;
  - stability across the seeds: ARI mean / min over seed pairs, mean partner Jaccard, share of
    maps that kept at least half their hub partners (compare_labelings). Hubs found on the
    embedding do not depend on the seed (1.0 by construction).

    python benchmarks/bench_hubs.py                         # N = 2,000, 5 seeds, 3 separations
    python benchmarks/bench_hubs.py --sizes 50000 --separations 0.6 --variants projection

Prints the machine, versions, settings and date, then markdown tables; --json writes all.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _machine import cpu_name

from napari_cryoswan.projection import (
    HUB_MIN_SAMPLES,
    adjusted_rand,
    compare_labelings,
    find_hubs,
    fit_projection,
    hub_labels,
    hub_stability,
    place,
)


# name: (cluster_on, max_mads)
VARIANTS = {"projection": ("projection", 3.0), "projection-unchecked": ("projection", None),
            "embedding": ("embedding", 3.0)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[2000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="how hubs are found: HDBSCAN on the projection (with or without the "
                             "embedding check of find_hubs' max_mads) or on the embedding")
    parser.add_argument("--clusters", type=int, default=20)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--noise-share", type=float, default=0.1)
    parser.add_argument("--separations", nargs="+", type=float, default=[1.0, 0.6, 0.4],
                        help="centre spread / cluster spread (smaller: harder)")
    parser.add_argument("--min-size", type=int, default=5)
    parser.add_argument("--min-samples", type=int, default=HUB_MIN_SAMPLES,
                        help="HDBSCAN's min_samples (default: find_hubs' default)")
    parser.add_argument("--selection", default="eom", choices=("eom", "leaf"),
                        help="HDBSCAN's cluster_selection_method (the explorer uses leaf)")
    parser.add_argument("--n-neighbors", type=int, default=15)
    parser.add_argument("--min-dist", type=float, default=0.1)
    parser.add_argument("--queries", type=int, default=200, help="held-out maps placed one at a time")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--embedding-max-n", type=int, default=20000,
                        help="skip cluster_on=embedding above this N (HDBSCAN in D dims is near-quadratic)")
    parser.add_argument("--index", type=Path, default=None,
                        help="measure hub stability on a real index's embeddings instead of synthetic data")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def clustered_data(n: int, *, clusters: int, dims: int, noise_share: float, separation: float,
                   queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """n points and their true labels (-1: noise), plus held-out points from the same clusters."""
    rng = np.random.default_rng(seed)
    n_noise = int(round(n * noise_share))
    shares = rng.lognormal(0.0, 0.8, clusters)
    sizes = np.maximum(20, np.floor(shares / shares.sum() * (n - n_noise))).astype(int)
    sizes[np.argmax(sizes)] += (n - n_noise) - sizes.sum()  # exact total
    centres = rng.normal(0.0, separation, (clusters, dims))
    spreads = rng.uniform(0.7, 1.3, clusters) / np.sqrt(dims)  # per-dimension sd; radius ≈ spread
    centres /= np.sqrt(dims)

    def draw(cluster_sizes):
        parts = [centres[c] + spreads[c] * rng.normal(size=(size, dims)) for c, size in enumerate(cluster_sizes)]
        labels = np.repeat(np.arange(clusters), cluster_sizes)
        return np.concatenate(parts), labels

    points, labels = draw(sizes)
    low, high = points.min(0), points.max(0)
    noise = rng.uniform(low, high, (n_noise, dims))
    vectors = np.concatenate([points, noise]).astype(np.float32)
    truth = np.concatenate([labels, np.full(n_noise, -1)])
    # held-out queries, one per cluster at least, in proportion to size
    query_sizes = np.maximum(1, np.round(sizes / sizes.sum() * queries)).astype(int)
    held_out, query_truth = draw(query_sizes)
    order = rng.permutation(len(vectors))
    return vectors[order], truth[order], held_out.astype(np.float32), query_truth


def environment() -> dict:
    import numba
    import pynndescent
    import sklearn
    import umap

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "umap-learn": umap.__version__,
        "numba": numba.__version__,
        "pynndescent": pynndescent.__version__,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
    }


def knn_purity(vectors: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Share of a clustered map's k nearest neighbours (embedding) from its own cluster: the difficulty."""
    from napari_cryoswan.projection import _nearest

    clustered = np.flatnonzero(truth >= 0)
    sample = clustered[:: max(1, len(clustered) // 2000)]  # 2,000 maps are enough to estimate it
    neighbours, _ = _nearest(vectors[sample], vectors, k + 1)
    return float((truth[neighbours[:, 1:]] == truth[sample, None]).mean())


def timed(run):
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def bench_size(n: int, separation: float, args) -> dict:
    vectors, truth, queries, query_truth = clustered_data(
        n, clusters=args.clusters, dims=args.dims, noise_share=args.noise_share,
        separation=separation, queries=args.queries, seed=args.data_seed)
    truth_noise = truth < 0
    print(f"\n## N = {n:,}, separation {separation} ({args.clusters} clusters, {truth_noise.sum()} noise points, "
          f"D = {args.dims})", file=sys.stderr, flush=True)

    coords_by_seed, fit_seconds = {}, []
    for seed in args.seeds:
        coords_by_seed[seed], seconds = timed(lambda: fit_projection(
            vectors, seed=seed, n_neighbors=args.n_neighbors, min_dist=args.min_dist))
        fit_seconds.append(seconds)
        print(f"  fit_projection seed {seed}: {seconds:.1f} s", file=sys.stderr, flush=True)

    first_coords = coords_by_seed[args.seeds[0]]
    place(queries[:1], vectors, first_coords)  # warm-up
    place_ms = []
    for query in queries:
        _, seconds = timed(lambda: place(query[None], vectors, first_coords))
        place_ms.append(1000 * seconds)
    placed, batch_seconds = timed(lambda: place(queries, vectors, first_coords))
    # where did each held-out map land: among its own cluster's maps?
    nearest_on_picture = np.argmin(((placed[:, None, :] - first_coords[None]) ** 2).sum(-1), axis=1)
    placement_agreement = float((truth[nearest_on_picture] == query_truth).mean())

    result = {
        "n": n, "separation": separation, "noise_points": int(truth_noise.sum()),
        "knn_purity": knn_purity(vectors, truth),
        "fit_projection_s_median": statistics.median(fit_seconds), "fit_projection_s": fit_seconds,
        "place_ms_per_query_median": statistics.median(place_ms),
        "place_batch_ms_per_query": 1000 * batch_seconds / len(queries),
        "placement_agreement": placement_agreement,
        "variants": {},
    }
    for variant in args.variants:
        space, max_mads = VARIANTS[variant]
        if space == "embedding" and n > args.embedding_max_n:
            print(f"  cluster_on=embedding skipped at N = {n:,} (--embedding-max-n)", file=sys.stderr)
            continue
        labelings, hub_seconds = [], []
        seeds = args.seeds if space == "projection" else args.seeds[:1]  # embedding: seed-free
        for seed in seeds:
            coords = coords_by_seed[seed]
            hubs, seconds = timed(lambda: find_hubs(vectors, coords, min_size=args.min_size,
                                                    min_samples=args.min_samples, cluster_on=space,
                                                    max_mads=max_mads, selection=args.selection))
            hub_seconds.append(seconds)
            labelings.append(hub_labels(hubs, n))
        recovery = [adjusted_rand(truth, labels) for labels in labelings]
        noise_left_out = [float((labels[truth_noise] < 0).mean()) for labels in labelings]
        clustered_in = [float((labels[~truth_noise] >= 0).mean()) for labels in labelings]
        stability = compare_labelings(labelings * (2 if len(labelings) == 1 else 1), names=None)
        result["variants"][variant] = {
            "find_hubs_s_median": statistics.median(hub_seconds),
            "n_hubs": stability["n_hubs"][: len(labelings)],
            "hubbed_share_mean": float(np.mean(stability["hubbed_share"])),
            "recovery_ari_mean": float(np.mean(recovery)), "recovery_ari": recovery,
            "noise_left_out_mean": float(np.mean(noise_left_out)),
            "clustered_in_hub_mean": float(np.mean(clustered_in)),
            "stability_ari_mean": stability["ari_mean"], "stability_ari_min": stability["ari_min"],
            "partner_jaccard_mean": stability["partner_jaccard_mean"],
            "partners_kept_share": stability["partners_kept_share"],
        }
        print(f"  {variant}: {json.dumps(result['variants'][variant])}", file=sys.stderr, flush=True)
    return result


def neighbour_sizes(index, max_pairs_of: int = 2000, seed: int = 0) -> dict:
    """How well an index's nearest neighbours keep a map's size: for each map with a mass, the
    |log2| mass ratio to its nearest other map, against that of every pair; and the median
    distance to the nearest other map against that between any two (how evenly maps spread).
    "Any pair" figures come from at most ``max_pairs_of`` maps drawn at random, so a large
    index does not need all its pairs in memory."""
    masses = np.array([row.get("mass_kda") or np.nan for row in index.rows], float)
    nearest_rows, nearest_distances = [], []
    for row in range(len(index)):
        neighbour = index.search(index.embeddings[row], k=1, exclude=row)[0]
        nearest_rows.append(neighbour.row)
        nearest_distances.append(neighbour.distance)
    known = np.isfinite(masses) & np.isfinite(masses[nearest_rows])
    ratio = np.abs(np.log2(masses[nearest_rows] / masses))[known]
    drawn = np.random.default_rng(seed).permutation(len(index))[:max_pairs_of]
    upper = np.triu_indices(len(drawn), 1)
    pairs = np.abs(np.log2(masses[drawn][:, None] / masses[drawn][None]))[upper]
    pairs = pairs[np.isfinite(pairs)]
    vectors = index.embeddings[drawn].astype(np.float64)
    all_distances = np.sqrt(((vectors[:, None] - vectors[None]) ** 2).sum(-1))[upper]
    return {"maps_with_mass": int(known.sum()),
            "nearest_within_1.5x_mass": float((ratio < np.log2(1.5)).mean()) if known.any() else None,
            "median_mass_fold_nearest": float(2 ** np.median(ratio)) if known.any() else None,
            "median_mass_fold_any_pair": float(2 ** np.median(pairs)) if len(pairs) else None,
            "median_distance_nearest": float(np.median(nearest_distances)),
            "median_distance_any_pair": float(np.median(all_distances))}


def bench_index(index, args) -> list[dict]:
    """Hub stability across UMAP seeds on an index's embeddings, hubs found on the projection
    and on the embedding, with each hub's anchor and first members by name (seed 0)."""
    rows = []
    for space in ("projection", "embedding"):
        stability = hub_stability(index.embeddings, seeds=tuple(args.seeds), min_size=args.min_size,
                                  min_samples=args.min_samples, cluster_on=space, selection=args.selection)
        coords = fit_projection(index.embeddings, seed=args.seeds[0]) if space == "projection" else None
        hubs = find_hubs(index.embeddings, coords, min_size=args.min_size, min_samples=args.min_samples,
                         cluster_on=space, selection=args.selection)
        rows.append({"space": space, "maps": len(index), **{k: v for k, v in stability.items() if k != "pair_ari"},
                     "hubs": [[index.rows[m]["name"] for m in hub.members[:6]] for hub in hubs]})
    return rows


def main() -> None:
    args = parse_args()
    env = environment()
    if args.index is not None:
        from napari_cryoswan.index import open_index

        index = open_index(args.index)
        rows, sizes = bench_index(index, args), neighbour_sizes(index)
        print(f"# bench_hubs on {args.index}\n")
        for key, value in env.items():
            print(f"- {key}: {value}")
        print("\n| hubs found on | maps | hubs per seed | maps in a hub | seed ARI mean / min | partner Jaccard |")
        print("|---|---:|---|---|---|---:|")
        for r in rows:
            print(f"| {r['space']} | {r['maps']} | {r['n_hubs']} | {[round(x, 2) for x in r['hubbed_share']]} "
                  f"| {r['ari_mean']:.2f} / {r['ari_min']:.2f} | {r['partner_jaccard_mean']:.2f} |")
        print(f"\nNearest other map: median distance {sizes['median_distance_nearest']:.3f} "
              f"(any pair {sizes['median_distance_any_pair']:.3f}).")
        if sizes["maps_with_mass"]:
            print(f"Within 1.5× of the map's mass for {sizes['nearest_within_1.5x_mass']:.2f} of "
                  f"{sizes['maps_with_mass']} maps with a mass (median fold {sizes['median_mass_fold_nearest']:.2f}; "
                  f"any pair {sizes['median_mass_fold_any_pair']:.2f}).")
        for r in rows:
            print(f"\nHubs on the {r['space']} (seed {args.seeds[0]}; anchor first):")
            for k, names in enumerate(r["hubs"]):
                print(f"- {k}: {', '.join(names)}")
        if args.json:
            args.json.write_text(json.dumps({"environment": env, "index": rows, "neighbour_sizes": sizes}, indent=2))
        return
    # The first UMAP in a process pays for importing umap and numba's compilation; time that
    # once, on a small input, so the per-fit medians below are steady-state.
    warm_up = np.random.default_rng(0).normal(size=(300, args.dims)).astype(np.float32)
    _, env["first_fit_projection_s_300_maps"] = timed(lambda: fit_projection(warm_up, seed=0))
    settings = {key: value for key, value in vars(args).items() if key != "json"}
    results = [bench_size(n, separation, args) for n in args.sizes for separation in args.separations]

    print("# bench_hubs\n")
    for key, value in env.items():
        print(f"- {key}: {value}")
    print(f"- settings: {json.dumps(settings)}\n")
    print("| N | separation | kNN purity | fit_projection s (median) | place ms/query (median, one at a time) "
          "| place ms/query (batch) | placement agreement |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['n']:,} | {r['separation']} | {r['knn_purity']:.3f} | {r['fit_projection_s_median']:.2f} "
              f"| {r['place_ms_per_query_median']:.2f} | {r['place_batch_ms_per_query']:.3f} "
              f"| {r['placement_agreement']:.3f} |")
    print("\n| N | separation | hubs found on | find_hubs s | hubs per seed | maps in a hub | ARI vs truth "
          "| noise left out | cluster maps in a hub | seed ARI mean / min | partner Jaccard | partners kept |")
    print("|---:|---:|---|---:|---|---:|---:|---:|---:|---|---:|---:|")
    for r in results:
        for variant, s in r["variants"].items():
            print(f"| {r['n']:,} | {r['separation']} | {variant} | {s['find_hubs_s_median']:.2f} | {s['n_hubs']} "
                  f"| {s['hubbed_share_mean']:.3f} | {s['recovery_ari_mean']:.3f} | {s['noise_left_out_mean']:.3f} "
                  f"| {s['clustered_in_hub_mean']:.3f} | {s['stability_ari_mean']:.3f} / {s['stability_ari_min']:.3f} "
                  f"| {s['partner_jaccard_mean']:.3f} | {s['partners_kept_share']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "settings": settings, "results": results}, indent=2))


if __name__ == "__main__":
    main()
