"""Search a latent index for the maps nearest to query maps:
``python -m training.search INDEX QUERY_MAP… [--k K] [--json] [--checkpoint CKPT]``.

Each query is preprocessed for the index's checkpoint (as reconstruction does), embedded, and
compared with every map of the index (exact Euclidean distances between embeddings). INDEX is an
index folder from ``training.build_index``, or ``bundled`` for the one shipped in the package.
The checkpoint defaults to the one the index was built with when that is a bundled one; any
other must be given, and must be that same checkpoint (an index of another is refused).

``--json`` prints one object per query, neighbours nearest first::

    [{"query": "emd_3197.map.gz",
      "neighbours": [{"name": "emd_3197", "source": "/data/emd_3197.map.gz", "distance": 0.0}, …],
      "note": null}]

otherwise a table per query. ``note`` (and a line under the table) says when the query's nearest
map lies as far from it as the index's distinct maps lie from each other: the index holds no near
copy of it (``index.isolation_note``); it is null otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from napari_cryoswan.index import LatentIndexError


def index_folder(spec: str) -> Path:
    """An INDEX argument as a folder: ``bundled`` is the package's own."""
    from napari_cryoswan.index import bundled_index_path

    return bundled_index_path() if spec == "bundled" else Path(spec)


def checkpoint_for(manifest: dict, given: str | None, index: Path) -> str:
    """The checkpoint to embed queries with: the one given, else the index's own when bundled."""
    if given:
        return given
    recorded = manifest["checkpoint"]
    if recorded.get("bundled"):
        return f"bundled:{recorded['bundled']}"
    raise LatentIndexError(
        f"{index} was built with the checkpoint {recorded['file']} (id {recorded['id']}), not a bundled "
        "one: give that checkpoint with --checkpoint.")


def search(index_spec: str, queries: list[str], *, k: int = 10, checkpoint: str | None = None,
           device: str = "auto", batch_size: int = 4, exclude_self: bool = False) -> list[dict]:
    """[{"query", "neighbours": [{"name", "source", "distance"}, …], "note"}] for each query map."""
    from napari_cryoswan.checkpoint import load_checkpoint, resolve_checkpoint
    from napari_cryoswan.engine import choose_device
    from napari_cryoswan.index import embed_maps, isolation_note, open_index_for, read_manifest
    from napari_cryoswan.io import read_map

    folder = index_folder(index_spec)
    manifest = read_manifest(folder)
    loaded = load_checkpoint(resolve_checkpoint(checkpoint_for(manifest, checkpoint, folder)))
    index = open_index_for(folder, loaded)
    densities = [read_map(path) for path in queries]  # every query readable before any work
    embedded = embed_maps(loaded, densities, device=choose_device(device), batch_size=batch_size)
    results = []
    for path, query_D in zip(queries, embedded.embeddings):
        exclude = str(Path(path).resolve()) if exclude_self else ()
        hits = index.search(query_D, k, exclude=exclude)
        results.append({"query": str(path), "neighbours": [
            {"name": hit.entry.get("name"), "source": hit.entry.get("source"), "distance": hit.distance}
            for hit in hits], "note": isolation_note(index.spacing(), hits[0].distance) if hits else None})
    return results


def format_table(results: list[dict]) -> str:
    blocks = []
    for result in results:
        lines = [f"{result['query']}: {len(result['neighbours'])} nearest"]
        if not result["neighbours"]:
            lines.append("  (the index is empty)")
        name_width = max([4] + [len(str(n["name"])) for n in result["neighbours"]])
        if result["neighbours"]:
            lines.append(f"  {'#':>3}  {'distance':>9}  {'name':<{name_width}}  source")
        for rank, n in enumerate(result["neighbours"], 1):
            lines.append(f"  {rank:>3}  {n['distance']:>9.4f}  {str(n['name']):<{name_width}}  {n['source'] or '-'}")
        if result.get("note"):
            lines.append(f"  {result['note']}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main(argv=None) -> int:
    from napari_cryoswan.session import DEVICES

    p = argparse.ArgumentParser(prog="python -m training.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", metavar="INDEX", help="an index folder, or 'bundled' for the shipped index")
    p.add_argument("queries", nargs="+", metavar="QUERY_MAP", help="map files to search for")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--checkpoint", help="the checkpoint the index was built with (default: the index's "
                                        "own when it is a bundled one); bundled:swan names the shipped one")
    p.add_argument("--exclude-self", action="store_true",
                   help="leave out the index's entry for the query file itself")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("--k must be at least 1")

    from napari_cryoswan.checkpoint import CheckpointError

    try:
        results = search(args.index, args.queries, k=args.k, checkpoint=args.checkpoint, device=args.device,
                         batch_size=args.batch_size, exclude_self=args.exclude_self)
    except (CheckpointError, LatentIndexError, ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=1) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
