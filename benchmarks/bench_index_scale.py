"""How the latent index scales: a synthetic index of 50,000 maps, opened and searched.

The index has the real layout of a checkpoint (default ``bundled:swan``): embeddings of its real
dimension (random unit vectors) and codes of its real code layout (random indices into its
codebook), with metadata rows like a map's, written through ``LatentIndex.add`` in shards of
--shard-size. Then, in a fresh worker process (so that its memory is the index's alone):

- open:   ``open_index`` (manifest, every shard's rows and embeddings; codes memory-mapped),
          median over --repeats;
- query:  one exact k-nearest-neighbour search (``LatentIndex.search``, k = --k), median over
          --queries random queries;
- find:   one substring lookup over names and ids (``LatentIndex.find``), median (and the
          first call, which also builds each row's lookup text);
- codes:  reading one entry's codes from the memory-mapped shards (what showing it needs), median;
- spacing: ``LatentIndex.spacing`` (each of up to 256 maps' nearest map of another entry: the
          scale "Find similar" reads a query's distance on), once, as the first search pays it;
- peak memory: the growth of the peak resident set (VmHWM) over the worker's size before
  opening and searching, then tracemalloc's peak over the same work (Python's and numpy's
  allocations: the rows, the embeddings, the distances);
- disk:   the index folder's size, and the codes' share of it.

``time_projection`` also times ``napari_cryoswan.projection``: fitting the UMAP on the index's
embeddings (``fit_projection``, single-threaded for a reproducible layout; --projection-entries
fits on fewer) and placing one new map on it (``place``, median). Where that module is absent
it says so and times nothing.

    python benchmarks/bench_index_scale.py                              # 50,000 entries
    python benchmarks/bench_index_scale.py --entries 5000 --repeats 3  # a quick run

Prints the machine, versions, settings and date, then a markdown table; --json writes both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from _machine import cpu_name


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=50_000)
    p.add_argument("--checkpoint", default="bundled:swan", help="whose embedding dimension and code layout to use")
    p.add_argument("--shard-size", type=int, default=256, help="maps per shard (training.build_index's default)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="timed opens (median)")
    p.add_argument("--queries", type=int, default=50, help="timed queries, lookups and code reads (median)")
    p.add_argument("--projection-entries", type=int, default=None,
                   help="fit the UMAP on the first N entries (default: all; 0: do not time the projection)")
    p.add_argument("--dir", type=Path, default=None, help="where to write the index (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the index afterwards")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ─── the synthetic index ─────────────────────────────────────────────────────────────────────────


def real_shape(checkpoint_spec: str):
    """(loaded checkpoint, code layout, embedding dimension and version) of a real checkpoint,
    from one box."""
    import torch

    from napari_cryoswan.checkpoint import load_checkpoint, resolve_checkpoint
    from napari_cryoswan.index import embed_maps

    loaded = load_checkpoint(resolve_checkpoint(checkpoint_spec))
    box = np.random.default_rng(0).standard_normal((1,) + (loaded.contract.box,) * 3).astype(np.float32)
    embedded = embed_maps(loaded, box, device=torch.device("cpu"))
    return loaded, embedded.layout, embedded.embeddings.shape[1], embedded.embedding_version


def write_synthetic_index(folder: Path, loaded, layout, dim: int, version: str, entries: int, shard_size: int) -> float:
    """Fill ``folder`` with ``entries`` random maps; returns the seconds it took."""
    from napari_cryoswan.index import create_index

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    index = create_index(folder, loaded, layout=layout, embedding_dim=dim, embedding_version=version)
    codebook = layout.codebook_size or 1024
    for first in range(0, entries, shard_size):
        n = min(shard_size, entries - first)
        embeddings_ND = rng.standard_normal((n, dim)).astype(np.float32)
        embeddings_ND /= np.linalg.norm(embeddings_ND, axis=1, keepdims=True)
        codes_NC = rng.integers(0, codebook, (n, layout.per_map), dtype=np.uint16)
        index.add(embeddings_ND, codes_NC, [_row(first + i) for i in range(n)])
    return time.perf_counter() - start


def _row(i: int) -> dict:
    """A row like a map file's: name, source, ids and geometry."""
    return {"key": f"/data/maps/emd_{10000 + i}.map.gz", "name": f"emd_{10000 + i}",
            "source": f"/data/maps/emd_{10000 + i}.map.gz", "source_kind": "map",
            "emdb_id": f"EMD-{10000 + i}", "pdb_id": None, "voxel_size": [1.06, 1.06, 1.06],
            "box_shape": [320, 320, 320], "mass_kda": None, "split": None,
            "placement": {"voxel_size": 4.0, "box_origin": [12.5, -3.0, 40.25], "mean": 0.0123,
                          "std": 0.0456, "fraction_outside": 0.0}}


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(all files, the codes files) in bytes."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_size for p in files if p.name.endswith(".codes.npy"))


# ─── measuring (in a worker process) ─────────────────────────────────────────────────────────────


def measure(folder: Path, args) -> dict:
    from napari_cryoswan.index import open_index

    rng = np.random.default_rng(1)
    # The resident set first, untraced: tracemalloc's own bookkeeping (a traceback per object)
    # would inflate it. Then the traced peak of the same work, on a second open.
    baseline_rss = _resident_bytes()
    index = open_index(folder)
    query_D = _unit(rng.standard_normal(index.embedding_dim))
    index.search(query_D, args.k)
    peak_rss_growth = _peak_resident_bytes() - baseline_rss
    del index
    tracemalloc.start()
    index = open_index(folder)
    index.search(query_D, args.k)
    peak_traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    row = {"entries": len(index), "dim": index.embedding_dim, "codes_per_map": index.layout.per_map,
           "open_s": _median(lambda: open_index(folder), args.repeats)}
    queries = [_unit(rng.standard_normal(index.embedding_dim)) for _ in range(args.queries)]
    row["query_s"] = _median_over(lambda q: index.search(q, args.k), queries)
    # A brute-force anchor in the same run: one float32 matrix product, |a|² + |b|² − 2ab.
    squared_N = np.einsum("nd,nd->n", index.embeddings, index.embeddings)
    row["query_matmul_s"] = _median_over(
        lambda q: np.argpartition(squared_N - 2 * index.embeddings @ q, args.k)[:args.k], queries)
    names = [f"emd_{10000 + int(i)}" for i in rng.integers(0, len(index), args.queries)]
    start = time.perf_counter()
    index.find(names[0])  # the first lookup also builds each row's search text
    row["find_first_s"] = time.perf_counter() - start
    row["find_s"] = _median_over(lambda name: index.find(name), names)
    rows = [int(i) for i in rng.integers(0, len(index), args.queries)]
    row["codes_s"] = _median_over(lambda r: index.codes(r), rows)
    start = time.perf_counter()
    index.spacing()
    row["spacing_s"] = time.perf_counter() - start
    row["peak_traced_mib"] = peak_traced / 2**20
    row["peak_rss_growth_mib"] = peak_rss_growth / 2**20
    row["embeddings_mib"] = index.embeddings.nbytes / 2**20
    row["projection"] = time_projection(index, queries[0], args.projection_entries)
    return row


def time_projection(index, query_D, entries: int | None = None) -> dict:
    """The hook for ``napari_cryoswan.projection`` (written beside the index): seconds to fit
    the 2-D UMAP (``fit_projection``) on the index's embeddings (the first ``entries``, all when
    None) and to place one new map on it (``place``, median), or why nothing was timed."""
    try:
        from napari_cryoswan.projection import fit_projection, place
    except ImportError:
        return {"note": "napari_cryoswan.projection (fit_projection, place) is absent in this build: not timed"}
    if entries == 0:
        return {"note": "projection not timed (--projection-entries 0)"}
    vectors_ND = index.embeddings[:entries]
    start = time.perf_counter()
    coords_N2 = fit_projection(vectors_ND)
    fit_s = time.perf_counter() - start
    place_s = _median_over(lambda q: place(q[None], vectors_ND, coords_N2), [query_D] * 20)
    return {"fit_s": fit_s, "place_s": place_s, "fitted_on": len(vectors_ND)}


def _median(run, repeats: int) -> float:
    run()  # warm-up: the file cache, numpy's first calls
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _median_over(run, items) -> float:
    run(items[0])
    times = []
    for item in items:
        start = time.perf_counter()
        run(item)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ─── report ──────────────────────────────────────────────────────────────────────────────────────


def environment(args, checkpoint_id: str) -> dict:
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "checkpoint": f"{args.checkpoint} ({checkpoint_id})",
        "entries": args.entries,
        "shard_size": args.shard_size,
        "k": args.k,
        "repeats": args.repeats,
        "queries": args.queries,
        "command": " ".join(["python", *sys.argv]),
        "load_average_start": round(os.getloadavg()[0], 2),
    }


def markdown_table(row: dict) -> str:
    projection = row["projection"]
    lines = [
        "| measure | value |", "|---|---|",
        f"| entries | {row['entries']:,} (embedding dim {row['dim']}, {row['codes_per_map']:,} codes per map) |",
        f"| write the index (synthetic, {row['shards']} shards) | {row['write_s']:.1f} s |",
        f"| open_index | {row['open_s'] * 1e3:.0f} ms |",
        f"| exact k={row['k']} query (LatentIndex.search) | {row['query_s'] * 1e3:.2f} ms |",
        f"| same, float32 matmul anchor (no exact distances, no sort) | {row['query_matmul_s'] * 1e3:.2f} ms "
        f"(search / anchor = {row['query_s'] / row['query_matmul_s']:.1f}×) |",
        f"| find (substring over names and ids) | {row['find_s'] * 1e3:.1f} ms "
        f"(first call {row['find_first_s'] * 1e3:.0f} ms) |",
        f"| read one entry's codes (memory-mapped) | {row['codes_s'] * 1e6:.0f} µs |",
        f"| the index's spacing (LatentIndex.spacing, once per opened index) | {row['spacing_s'] * 1e3:.0f} ms |",
        f"| peak traced memory, open + query (tracemalloc) | {row['peak_traced_mib']:.0f} MiB "
        f"(embeddings alone {row['embeddings_mib']:.1f} MiB) |",
        f"| peak resident-set growth, open + query | {row['peak_rss_growth_mib']:.0f} MiB |",
        f"| disk | {row['disk_bytes'] / 2**20:,.0f} MiB, codes {row['codes_bytes'] / row['disk_bytes']:.0%} of it |",
    ]
    if "fit_s" in projection:
        lines += [f"| fit the UMAP (projection.fit_projection, {projection['fitted_on']:,} maps) "
                  f"| {projection['fit_s']:.1f} s |",
                  f"| place one new map on it (projection.place) | {projection['place_s'] * 1e3:.1f} ms |"]
    else:
        lines.append(f"| projection | {projection['note']} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    loaded, layout, dim, version = real_shape(args.checkpoint)
    env = environment(args, loaded.checkpoint_id)
    parent = args.dir or Path(tempfile.mkdtemp(prefix="bench_index_"))
    folder = parent / "index"
    try:
        write_s = write_synthetic_index(folder, loaded, layout, dim, version, args.entries, args.shard_size)
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", str(folder)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row.update(write_s=write_s, shards=-(-args.entries // args.shard_size), k=args.k)
        row["disk_bytes"], row["codes_bytes"] = folder_bytes(folder)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            if args.dir is None:
                shutil.rmtree(parent, ignore_errors=True)
    env["load_average_end"] = round(os.getloadavg()[0], 2)
    print("\n".join(f"- {key}: {value}" for key, value in env.items()))
    print()
    print(markdown_table(row))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": row}, indent=2))


if __name__ == "__main__":
    main()
