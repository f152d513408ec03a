"""Build a latent-search index: ``python -m training.build_index (--maps PATH… | --corpus DIR
[--split S …]) --checkpoint CKPT --out INDEX``.

Every map is embedded (``napari_cryoswan.embedding``) and encoded with the checkpoint, and its
codes, embedding and metadata are added to the index folder (``napari_cryoswan.index`` describes
the format). ``--maps`` takes map files or folders of them, each preprocessed for the
checkpoint's input contract, as reconstruction does; ``--corpus`` takes a corpus from
``training.build_corpus`` (optionally only some splits), whose boxes are preprocessed already
and whose manifest gives each map's EMDB or PDB id, mass and split.

An existing index is extended: maps already in it are skipped, so running the same command after
a kill resumes the build (a shard is committed every ``--shard-size`` maps, so at most that much
work is redone). An index of another checkpoint or embedding version is refused. A map that
cannot be read or preprocessed is reported and skipped; the summary at the end lists them.

Several GPUs (or CPU processes): ``torchrun --nproc_per_node N -m training.build_index …``.
Each rank embeds every N-th map not yet in the index into its own index under INDEX/parts/, and
rank 0 merges the parts once all are done (a merge cut short is finished by the next run).

    python -m training.build_index --corpus corpus/ --checkpoint bundled:swan --out my_index
    python -m training.build_index --maps emdb_maps/ extra.map --checkpoint runs/swan/model.pt --out my_index
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_cryoswan.index import (
    PARTS_DIR,
    LatentIndex,
    LatentIndexError,
    check_index_folder,
    create_index,
    delete_index,
    embed_maps,
    map_row,
    open_index_for,
    read_manifest,
)

DEFAULT_SHARD_SIZE = 256  # maps per committed shard: the most work a kill can lose
_PDB_ID = re.compile(r"^[0-9][A-Za-z0-9]{3}$")


@dataclass(frozen=True)
class Source:
    """One map to index: ``load()`` gives its preprocessed box and its metadata row."""

    key: str
    label: str  # what a report calls it (a path or a sample id)
    load: Callable[[], tuple[np.ndarray, dict]]


@dataclass
class BuildReport:
    index: Path
    added: int = 0
    present: int = 0  # already in the index (or another rank's share): not embedded again
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (map, why)
    notes: list[str] = field(default_factory=list)  # what preprocessing warned about

    def summary(self, total: int | None = None) -> str:
        lines = [f"{self.index}: {'' if total is None else f'{total} maps; '}added {self.added}, "
                 f"{self.present} already there, {len(self.skipped)} skipped."]
        lines += [f"  skipped {label}: {why}" for label, why in self.skipped]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# --- sources ---------------------------------------------------------------------------------------


def map_sources(paths: Sequence[str | os.PathLike], contract) -> tuple[list[Source], list[tuple[str, str]]]:
    """Map files, and the map files in folders (sorted), as sources; and the paths that are
    neither (with why). A file named twice is indexed once."""
    from napari_cryoswan.io import is_map_path

    files, refused = [], []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(p for p in given.iterdir() if p.is_file() and is_map_path(p))
            if not found:
                refused.append((str(given), "a folder with no .mrc/.map/.ccp4(.gz) files"))
            files += found
        elif not given.exists():
            refused.append((str(given), "no such file or folder"))
        elif not is_map_path(given):
            refused.append((str(given), "not a map file (.mrc, .map, .ccp4, optionally .gz)"))
        else:
            files.append(given)
    sources, seen = [], set()
    for path in files:
        key = str(path.resolve())
        if key not in seen:
            seen.add(key)
            sources.append(Source(key, str(path), _map_loader(path, contract)))
    return sources, refused


def _map_loader(path: Path, contract):
    def load():
        from napari_cryoswan.io import read_map
        from napari_cryoswan.preprocess import preprocess

        density = read_map(path)
        prepared = preprocess(density, contract.settings())
        return prepared.data, map_row(path, density, prepared.record)

    return load


def corpus_sources(folder: str | os.PathLike, contract, splits: Sequence[str] | None = None,
                   rotations: Sequence[int] | None = None) -> list[Source]:
    """The samples of a corpus (of ``splits``, all when None; of the ``rotations`` indices, all
    when None), in manifest order. The corpus must hold the boxes the checkpoint takes."""
    from training.corpus import Corpus

    corpus = Corpus(folder)
    if (corpus.box, corpus.voxel_size) != (contract.box, contract.voxel_size) or contract.normalisation != "z-score":
        raise LatentIndexError(
            f"{folder} holds {corpus.box}³ maps at {corpus.voxel_size:g} Å, z-scored, but the checkpoint "
            f"takes {contract.box}³ at {contract.voxel_size:g} Å ({contract.normalisation}). Index a "
            "corpus built for it, or give the maps with --maps.")
    ids = (range(len(corpus)) if not splits
           else sorted(int(i) for split in dict.fromkeys(splits) for i in corpus.split_indices(split)))
    if rotations is not None:
        ids = [i for i in ids if corpus.samples[i].get("rotation_index", 0) in set(rotations)]
    return [Source(corpus_row(corpus, i)["key"], corpus.samples[i]["sample_id"], _corpus_loader(corpus, i))
            for i in ids]


def corpus_row(corpus, i: int) -> dict:
    """The metadata row of corpus sample ``i``: its ids from the manifest, never guessed."""
    from napari_cryoswan.io import emdb_id_from
    from training.corpus import group_of

    sample = corpus.samples[i]
    kind = sample.get("source_kind")
    parent = str(sample.get("parent_id") or sample.get("entry_id") or "")
    emdb_id = None
    if kind in ("map", "emdb"):
        emdb_id = emdb_id_from(parent) or emdb_id_from(sample.get("source") or "")
    # A structure's parent is its file's stem: a PDB id when the file was named by one ("1AKE",
    # chains like "1ahsA" join their entry), else no id at all.
    group = group_of(parent)
    pdb_id = group.upper() if kind == "structure" and _PDB_ID.match(group) else None
    record = sample.get("preprocessing") or {}
    return {
        # The sample's content hash: a rebuilt corpus that changed a map gives it a new key.
        "key": f"corpus/{sample['sample_id']}/{sample['sha256'][:16]}",
        "name": sample["sample_id"],
        # Relative to the corpus folder's name, and the origin by file name only: a row must not
        # carry the paths of the machine that built the index (the bundled one ships).
        "source": f"{corpus.path.name}/{sample['file']}",
        "source_kind": kind,
        "emdb_id": emdb_id,
        "pdb_id": pdb_id,
        "voxel_size": record.get("source_voxel_size"),
        "box_shape": record.get("source_shape"),
        "mass_kda": sample.get("mass_kda"),
        "split": sample.get("split"),
        "entry_id": sample.get("entry_id"),
        "rotation_index": sample.get("rotation_index"),
        "origin_source": Path(sample["source"]).name if sample.get("source") else None,
        "placement": None,  # a corpus box is rotated: it does not lie over its source
    }


def _corpus_loader(corpus, i: int):
    return lambda: (corpus.load(i), corpus_row(corpus, i))


# --- building --------------------------------------------------------------------------------------


def open_existing(folder: str | os.PathLike, checkpoint) -> LatentIndex | None:
    """The index in ``folder`` when there is one (refused if it is another checkpoint's or
    embedding version's), None when the folder can hold a new one."""
    folder = Path(folder)
    check_index_folder(folder)
    if (folder / "manifest.json").exists():
        return open_index_for(folder, checkpoint)
    return None


def part_folder(out: str | os.PathLike, rank: int) -> Path:
    return Path(out) / PARTS_DIR / f"rank-{rank}"


def index_sources(
    sources: Sequence[Source],
    checkpoint,
    folder: str | os.PathLike,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 4,
    device=None,
    skip_keys: set[str] | frozenset = frozenset(),
    show_progress: bool = True,
    should_stop=None,
) -> BuildReport:
    """Add the sources not yet in the index in ``folder`` (nor in ``skip_keys``) to it, a shard
    of ``shard_size`` maps at a time. Maps that fail to load are reported, not raised."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    index = open_existing(folder, checkpoint)
    report = BuildReport(folder)
    todo = [s for s in sources if s.key not in skip_keys and (index is None or s.key not in index)]
    report.present = len(sources) - len(todo)
    bar = tqdm(total=len(sources), initial=report.present, unit="map", dynamic_ncols=True,
               disable=not show_progress)
    try:
        for start in range(0, len(todo), shard_size):
            chunk = todo[start:start + shard_size]
            boxes, rows = [], []
            for i, source in enumerate(chunk, 1):
                bar.set_postfix_str(f"reading {i}/{len(chunk)}")
                loaded = _load(source, report)
                if loaded is not None:
                    boxes.append(loaded[0])
                    rows.append(loaded[1])
            bar.update(len(chunk) - len(boxes))  # the skipped ones are done with
            if not boxes:
                continue
            embedded = embed_maps(checkpoint, np.stack(boxes), device=device, batch_size=batch_size,
                                  should_stop=should_stop,
                                  progress=lambda done, total: bar.set_postfix_str(f"embedding {done}/{total}"))
            if index is None:
                index = create_index(folder, checkpoint, layout=embedded.layout,
                                     embedding_dim=embedded.embeddings.shape[1],
                                     embedding_version=embedded.embedding_version)
            index.add(embedded.embeddings, embedded.codes, rows)
            report.added += len(rows)
            bar.update(len(rows))
    finally:
        bar.close()
    return report


def _load(source: Source, report: BuildReport):
    """(box, row), or None with the reason in the report."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            box, row = source.load()
        except (OSError, ValueError, KeyError) as err:  # MapReadError and CorpusError are ValueErrors
            reason = str(err) or type(err).__name__
            report.skipped.append((source.label, reason.removeprefix(f"{source.label}: ")))
            return None
    report.notes += [f"{source.label}: {w.message}" for w in caught
                     if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    return box, row


def merge_parts(out: str | os.PathLike, checkpoint, *, shard_size: int = DEFAULT_SHARD_SIZE) -> int:
    """Move every rank's part (INDEX/parts/rank-R) into the index in ``out``, rank by rank;
    returns the number of maps added. A part is deleted only once its maps are committed, and
    maps already in the index are not added again, so a merge cut short is finished by the next."""
    out = Path(out)
    parts_dir = out / PARTS_DIR
    if not parts_dir.is_dir():
        return 0
    index = open_existing(out, checkpoint)
    added = 0
    folders = sorted((p for p in parts_dir.iterdir() if p.is_dir() and p.name.startswith("rank-")),
                     key=lambda p: int(p.name.removeprefix("rank-")) if p.name[5:].isdigit() else -1)
    for folder in folders:
        if not (folder / "manifest.json").exists():
            delete_index(folder)  # a part that committed nothing
            continue
        part = open_index_for(folder, checkpoint)
        new = [i for i, row in enumerate(part.rows) if index is None or row["key"] not in index]
        for start in range(0, len(new), shard_size):
            chunk = new[start:start + shard_size]
            if index is None:
                index = create_index(out, checkpoint, layout=part.layout, embedding_dim=part.embedding_dim,
                                     embedding_version=part.manifest["embedding"]["version"])
            index.add(part.embeddings[chunk], part.codes_of(chunk), [part.rows[i] for i in chunk])
            added += len(chunk)
        delete_index(folder)
    if not any(parts_dir.iterdir()):
        parts_dir.rmdir()
    return added


def build_index(
    sources: Sequence[Source],
    checkpoint,
    out: str | os.PathLike,
    *,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 4,
    device=None,
    show_progress: bool = True,
) -> BuildReport:
    """Index ``sources`` into ``out`` as one of ``world`` processes.

    Alone (``world`` 1) it adds to the index directly. One of several, it embeds every
    ``world``-th map not yet in the index (from ``rank``) into its own part, waits at
    ``barrier`` for the others, and rank 0 merges the parts.
    """
    out = Path(out)
    main = open_existing(out, checkpoint)  # refuses another checkpoint's index before any work
    if world == 1:
        return index_sources(sources, checkpoint, out, shard_size=shard_size, batch_size=batch_size,
                             device=device, show_progress=show_progress)
    pending = [s for s in sources if main is None or s.key not in main]
    mine = pending[rank::world]
    report = index_sources(mine, checkpoint, part_folder(out, rank), shard_size=shard_size,
                           batch_size=batch_size, device=device, show_progress=show_progress)
    barrier()
    # Rank 0 reports the whole index; the others their own part (and what it skipped).
    report.present = len(sources) - len(pending)
    if rank == 0:
        report.added = merge_parts(out, checkpoint, shard_size=shard_size)
        report.index = out
    barrier()
    return report


# --- command line ----------------------------------------------------------------------------------


def _torchrun() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables torchrun sets; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _distributed_barrier(world: int):
    """A barrier over the torchrun processes (gloo: it needs no GPU). Ranks wait for the slowest
    at the end of a build that may take hours, so the timeout is a day, not torch's 30 minutes."""
    if world == 1:
        return lambda: None, lambda: None
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
    return dist.barrier, dist.destroy_process_group


def parse_args(argv=None) -> argparse.Namespace:
    from napari_cryoswan.session import DEVICES

    p = argparse.ArgumentParser(prog="python -m training.build_index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--maps", nargs="+", metavar="PATH", help="map files, or folders of them")
    source.add_argument("--corpus", metavar="DIR", help="a corpus folder from training.build_corpus")
    p.add_argument("--split", nargs="+", choices=("train", "val", "test"),
                   help="with --corpus: index only these splits (default: all)")
    p.add_argument("--rotations", nargs="+", type=int, metavar="I",
                   help="with --corpus: index only the samples of these rotation indices (0: one orientation "
                        "of each entry; default: all)")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file (.pt), or bundled:swan / bundled:swan-rq1 for the shipped weights")
    p.add_argument("--out", required=True, help="the index folder: created, or extended when it exists")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="maps per committed shard: the most work a kill loses (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.split and not args.corpus:
        p.error("--split goes with --corpus")
    if args.shard_size < 1:
        p.error("--shard-size must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from napari_cryoswan.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
    from napari_cryoswan.engine import choose_device

    rank, world, local_rank = _torchrun()
    try:
        device = choose_device(args.device)
        if world > 1 and device.type == "cuda":
            import torch

            device = torch.device("cuda", local_rank)
        checkpoint = load_checkpoint(resolve_checkpoint(args.checkpoint))
        refused = []
        if args.corpus:
            sources = corpus_sources(args.corpus, checkpoint.contract, args.split, args.rotations)
        else:
            sources, refused = map_sources(args.maps, checkpoint.contract)
        barrier, teardown = _distributed_barrier(world)
        try:
            report = build_index(sources, checkpoint, args.out, rank=rank, world=world, barrier=barrier,
                                 shard_size=args.shard_size, batch_size=args.batch_size, device=device,
                                 show_progress=not args.quiet and rank == 0)
        finally:
            teardown()
    except (CheckpointError, LatentIndexError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nInterrupted. Every committed shard of {args.out} is kept: run the same command "
              "again to resume.", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"error: could not write the index ({err}). What was committed is intact; free some "
              "space and run the same command again.", file=sys.stderr)
        return 1
    report.skipped[:0] = refused
    if rank == 0:
        total = read_manifest(args.out)["count"] if Path(args.out, "manifest.json").exists() else 0
        print(report.summary(total), file=sys.stderr)
    elif report.skipped:
        print(f"rank {rank}:\n{report.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from training.train import _interrupt_on_sigterm  # `kill` stops a build as Ctrl-C does

    _interrupt_on_sigterm()
    sys.exit(main())
