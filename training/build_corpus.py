"""Build a training corpus: ``python -m training.build_corpus --out DIR SOURCES...``.

Four sources, in any mix, all written in the one format of ``training.corpus``:

- ``--structures``: PDB/mmCIF files (or folders of them), simulated on the corpus grid at
  ``--resolution`` (8 Å), each optionally with ``--subassemblies`` sub-complexes of touching
  chains (``napari_cryoswan.simulate.subassemblies``) and ``--assemblies`` symmetric assemblies
  of its copies (rings, shells, filaments: ``simulate.symmetric_assemblies``), which share their
  parent's split.
- ``--maps``: real maps (e.g. from EMDB), masked at the recommended contour from ``--maps-csv``.
- ``--meshes``: .off/.obj/.ply/.stl shapes voxelised as densities (``training.mesh``).
- ``--emdb``: curate maps from the EMDB REST API into ``--emdb-dir`` (``training.emdb``), then
  add them as real maps.

Every entry then goes through the ProteinNet3D preprocessing (``napari_cryoswan.preprocess``:
mask, resample to 4 Å with an anti-alias filter, centre, crop/pad to 64³, rotate, z-score) as
``--rotations`` random rotations (5, the paper's). Entries that fail (an unreadable file, a mesh
with no volume, a map too large for the box) are skipped with their reason, in the log and in
the manifest.

An existing corpus folder is resumed (finished entries are kept, new sources are added) unless
``--overwrite`` is given; anything else in the folder is refused.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import multiprocessing
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from napari_cryoswan.hashing import file_sha256
from napari_cryoswan.io import emdb_id_from, is_map_path
from napari_cryoswan.preprocess import PreprocessSettings
from training._defaults import dataclass_defaults
from training.corpus import (
    DEFAULT_FRACTIONS,
    SPLITS,
    CorpusError,
    CorpusWriter,
    data_sha256,
    group_of,
)

logger = logging.getLogger("training.build_corpus")

STRUCTURE_SUFFIXES = tuple(s + gz for s in (".pdb", ".ent", ".cif", ".mmcif") for gz in ("", ".gz"))


@dataclass(frozen=True)
class BuildSettings:
    """Everything a worker needs to turn one entry into samples (picklable)."""

    box: int = PreprocessSettings.box  # the paper's 64³ at 4 Å, as the preprocessing says
    voxel_size: float = PreprocessSettings.voxel_size
    rotations: int = 5
    seed: int = 0
    max_outside: float = 0.05  # of the density cut off by the box before an entry is dropped
    resolution: float = 8.0
    subassemblies: int = 0
    max_chains: int = 6
    assemblies: int = 0
    assemblies_only: bool = False
    contact: float = 4.5
    mesh_margin: float = 3.0
    mesh_supersample: int = 2
    mesh_blur: float = 0.5

    def for_source(self, kind: str) -> dict:
        """The settings that shape one source's samples (a resumed build must keep them)."""
        common = {"rotations": self.rotations, "seed": self.seed, "max_outside": self.max_outside}
        specific = {
            "structure": {"resolution": self.resolution, "subassemblies": self.subassemblies,
                          "max_chains": self.max_chains, "contact": self.contact,
                          # only when used, so corpora built without them keep their ids
                          **({"assemblies": self.assemblies, "assemblies_only": self.assemblies_only}
                             if self.assemblies else {})},
            "mesh": {"margin": self.mesh_margin, "supersample": self.mesh_supersample,
                     "blur_sigma": self.mesh_blur},
        }
        return {**common, **specific.get(kind, {})}


@dataclass(frozen=True)
class Task:
    """One entry to build: a structure, map or mesh file."""

    kind: str  # "structure", "map", "mesh" or "emdb"
    key: str  # the entry id, unique in the corpus
    path: str
    info: dict = field(default_factory=dict)  # contour, resolution, mass_kda, pixel_size, url


class EntryTooLarge(ValueError):
    """More of the density than allowed falls outside the box."""


# --- One entry (runs in a worker) -----------------------------------------------------------------


def build_entry(task: Task, settings: BuildSettings, maps_dir: Path) -> dict:
    """Turn one entry into rotated samples written to ``maps_dir``; returns its journal record.

    All of an entry's samples are made before any is written, so an entry that fails leaves no
    maps behind."""
    started = time.perf_counter()
    record = {"key": task.key, "kind": task.kind, "source": task.path}
    try:
        source_sha256 = file_sha256(task.path)
        samples, dropped = _SAMPLERS[task.kind](task, settings)
        if not samples:
            return {**record, "status": "skipped", "reason": "; ".join(dropped)}
        _write_samples(samples, maps_dir)
    except (ValueError, OSError) as err:  # MapReadError, MeshError, bad structures are ValueErrors
        return {**record, "status": "skipped", "reason": str(err)}
    for sample, _ in samples:
        sample["source_sha256"] = source_sha256
    return {**record, "status": "done", "samples": [sample for sample, _ in samples],
            "dropped": dropped, "seconds": round(time.perf_counter() - started, 2)}


def _write_samples(samples: list[tuple[dict, np.ndarray]], maps_dir: Path) -> None:
    """Write every map of an entry, or, if one write fails, none."""
    from napari_cryoswan.io import write_map

    written = []
    try:
        for sample, data in samples:
            written.append(write_map(maps_dir / Path(sample["file"]).name, data,
                                     sample["preprocessing"]["voxel_size"], sample["preprocessing"]["box_origin"],
                                     label=f"napari-cryoswan corpus sample {sample['sample_id']}"))
    except OSError:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _structure_samples(task, settings):
    from napari_cryoswan.simulate import chain_names, load_atoms, simulate_density, subassemblies

    atoms = load_atoms(task.path)
    variants = [] if settings.assemblies_only else [atoms]
    if settings.subassemblies > 0 and not settings.assemblies_only:
        variants += subassemblies(atoms, settings.subassemblies, settings.max_chains,
                                  cutoff=settings.contact, seed=settings.seed)
    samples, dropped = [], []
    for variant in variants:
        entry_id = task.key + variant.name[len(atoms.name):]  # "4V8R" or "4V8R-sub03"
        density = simulate_density(variant, settings.voxel_size, settings.resolution)
        meta = {"mass_kda": round(variant.mass_kda, 1), "resolution": settings.resolution,
                "chains": chain_names(variant),
                "variant": "full" if variant is atoms else "subassembly"}
        try:
            samples += _rotated_samples(density, entry_id, task, meta, settings)
        except EntryTooLarge as err:
            dropped.append(f"{entry_id}: {err}")
    if settings.assemblies > 0:
        built = _assembly_samples(atoms, task, settings)
        if not built:
            dropped.append(f"{task.key}: no symmetric assembly of its {atoms.mass_kda:.0f} kDa lies in "
                           "0.5–4 MDa, and it is too heavy for a filament")
        samples += built
    return samples, dropped


def _assembly_samples(atoms, task, settings) -> list[tuple[dict, np.ndarray]]:
    """Symmetric assemblies of the structure (``simulate.symmetric_assemblies``), cropped to the
    box as ProteinNet3D crops large entries; never dropped for what lies outside the box.

    Each copy's rotation is applied to the atoms before simulation, not to the boxed map, so the
    box cuts a rotated complex along its faces as a real box-filling map is cut (rotating a
    cropped map would leave empty corners and oblique cut planes inside the box)."""
    from napari_cryoswan.preprocess import CroppedDensityWarning, preprocess, random_rotations
    from napari_cryoswan.simulate import Atoms, chain_names, simulate_density, symmetric_assemblies

    preprocess_settings = PreprocessSettings(voxel_size=settings.voxel_size, box=settings.box)
    length = 1.5 * settings.box * settings.voxel_size  # a filament crosses the box with room to spare
    samples = []
    for assembly, symmetry in symmetric_assemblies(atoms, settings.assemblies, seed=settings.seed,
                                                   filament_length=length):
        entry_id = task.key + assembly.name[len(atoms.name):]  # "3ENL-sym01"
        meta = {"mass_kda": round(assembly.mass_kda, 1), "resolution": settings.resolution,
                "chains": chain_names(atoms), "variant": "assembly", "symmetry": symmetry,
                "copies": len(assembly.xyz) // len(atoms.xyz)}
        centre = np.average(assembly.xyz, axis=0, weights=assembly.atomic_number)
        for k, rotation_zyx in enumerate(random_rotations(settings.rotations, _rng_for(settings.seed, entry_id))):
            rotation_xyz = rotation_zyx[::-1, ::-1]  # the same rotation in (x, y, z) coordinates
            turned = Atoms((assembly.xyz - centre) @ rotation_xyz.T + centre, assembly.atomic_number,
                           assembly.chain, assembly.name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CroppedDensityWarning)  # cropped on purpose
                copy = preprocess(simulate_density(turned, settings.voxel_size, settings.resolution),
                                  preprocess_settings)
            record = replace(copy.record, rotation=tuple(map(tuple, rotation_zyx.tolist())))
            samples.append(_sample(f"{entry_id}_r{k}", entry_id, task, k, meta, record, copy.data))
    return samples


def _map_samples(task, settings):
    from napari_cryoswan.io import read_map

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing voxel size is handled just below
        density = read_map(task.path)
    pixel_size = task.info.get("pixel_size")
    if density.voxel_size is None and pixel_size:
        density = density.with_data(density.data, voxel_size=tuple(pixel_size))
    meta = {k: task.info.get(k) for k in ("mass_kda", "resolution", "contour")}
    if task.info.get("url"):
        meta["url"] = task.info["url"]
    return _rotated_samples(density, task.key, task, meta, settings, contour=task.info.get("contour")), []


def _mesh_samples(task, settings):
    from training.mesh import MeshSettings, mesh_density

    mesh_settings = MeshSettings(box=settings.box, voxel_size=settings.voxel_size,
                                 margin=settings.mesh_margin, supersample=settings.mesh_supersample,
                                 blur_sigma=settings.mesh_blur)
    density = mesh_density(task.path, mesh_settings)
    meta = {"mass_kda": None, "resolution": None,
            "voxels_per_mesh_unit": round(density.header["voxels_per_mesh_unit"], 6)}
    return _rotated_samples(density, task.key, task, meta, settings), []


_SAMPLERS = {"structure": _structure_samples, "map": _map_samples, "emdb": _map_samples,
             "mesh": _mesh_samples}


def _rotated_samples(density, entry_id, task, meta, settings, contour=None) -> list[tuple[dict, np.ndarray]]:
    """Preprocess ``density`` into ``settings.rotations`` rotated copies: (record, data) pairs."""
    from napari_cryoswan.preprocess import CroppedDensityWarning, augment

    preprocess = PreprocessSettings(voxel_size=settings.voxel_size, box=settings.box, contour_level=contour)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CroppedDensityWarning)  # measured and judged just below
        copies = augment(density, preprocess, settings.rotations, _rng_for(settings.seed, entry_id))
    outside = copies[0].record.fraction_outside
    if outside > settings.max_outside:
        raise EntryTooLarge(f"{outside:.1%} of its density falls outside the {settings.box}³ box "
                            f"(limit {settings.max_outside:.0%})")
    return [_sample(f"{entry_id}_r{k}", entry_id, task, k, meta, copy.record, copy.data)
            for k, copy in enumerate(copies)]


def _sample(sample_id, entry_id, task, rotation_index, meta, record, data) -> tuple[dict, np.ndarray]:
    """One sample's manifest record and its map."""
    return ({"sample_id": sample_id, "file": f"maps/{sample_id}.mrc", "entry_id": entry_id,
             "parent_id": task.key, "group": group_of(task.key), "source_kind": task.kind,
             "source": task.path, "rotation_index": rotation_index, **meta,
             "preprocessing": record.to_dict(), "sha256": data_sha256(data)}, data)


def _rng_for(seed: int, entry_id: str) -> np.random.Generator:
    """Rotations that depend on the seed and the entry only: not on order, workers or resumes."""
    digest = hashlib.sha256(entry_id.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


# --- Finding the inputs ---------------------------------------------------------------------------


def collect_files(paths: list[str], accepts, what: str) -> list[Path]:
    """Files named directly, plus the matching files in named folders (not recursive)."""
    found = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and accepts(p))
            if not matches:
                raise CorpusError(f"{path}: no {what} files in this folder.")
            found += matches
        elif path.is_file():
            if not accepts(path):
                raise CorpusError(f"{path}: not a {what} file (by its suffix).")
            found.append(path)
        else:
            raise CorpusError(f"{path}: no such file or folder.")
    return found


def structure_tasks(paths: list[str]) -> list[Task]:
    files = collect_files(paths, lambda p: p.name.lower().endswith(STRUCTURE_SUFFIXES), "PDB/mmCIF")
    return [Task("structure", p.name.split(".")[0], str(p)) for p in files]


def mesh_tasks(paths: list[str]) -> list[Task]:
    from training.mesh import is_mesh_path

    files = collect_files(paths, is_mesh_path, "mesh (.off, .obj, .ply, .stl)")
    return [Task("mesh", p.name.split(".")[0], str(p)) for p in files]


def map_tasks(paths: list[str], csv_path: str | None = None) -> list[Task]:
    files = collect_files(paths, is_map_path, "map (.mrc, .map, .ccp4, optionally .gz)")
    rows = read_maps_csv(csv_path) if csv_path else {}
    tasks = []
    for path in files:
        emdb_id = emdb_id_from(path)
        info = rows.get(path.name) or rows.get(emdb_id) or {}
        if csv_path and not info:
            logger.warning("%s: not in %s, so it is not masked at a contour level.", path, csv_path)
        tasks.append(Task("map", emdb_id or path.name.split(".")[0], str(path), info))
    return tasks


def read_maps_csv(path: str) -> dict[str, dict]:
    """Rows of a maps CSV keyed by EMDB id (and by file name when a ``file`` column is given).

    Columns: ``emdb_id`` (EMD-1234 or 1234), ``contour``, ``resolution``; optional ``mass_kda``,
    ``file``, ``pixel_size`` ("z y x" Å, used when a map's header has none).
    """
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "emdb_id" not in reader.fieldnames:
            raise CorpusError(f"{path}: a maps CSV needs an 'emdb_id' column (and contour, resolution).")
        rows = {}
        for line, row in enumerate(reader, start=2):
            info = {key: _number(row.get(key), path, line, key) for key in ("contour", "resolution", "mass_kda")}
            if row.get("pixel_size"):
                info["pixel_size"] = [_number(v, path, line, "pixel_size") for v in row["pixel_size"].split()]
            emdb_id = row["emdb_id"].strip()
            emdb_id = emdb_id if emdb_id.upper().startswith("EMD") else f"EMD-{emdb_id}"
            rows[emdb_id.upper().replace("_", "-")] = info
            if row.get("file"):
                rows[row["file"].strip()] = info
    return rows


def _number(text, path, line, column) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise CorpusError(f"{path}, line {line}: {column} {text!r} is not a number.") from None


def emdb_tasks(args) -> list[Task]:
    from training.emdb import EmdbSettings, curate

    settings = EmdbSettings(
        api_url=args.emdb_api.rstrip("/"), files_url=args.emdb_files.rstrip("/"),
        query=args.emdb_query, min_kda=args.min_kda, max_kda=args.max_kda, limit=args.emdb_limit,
        requests_per_second=args.rate, retries=args.retries, backoff=args.backoff,
    )
    kept = curate(args.emdb_dir, settings, show_progress=not args.quiet)
    maps_dir = Path(args.emdb_dir) / "maps"
    return [Task("emdb", r["emdb_id"], str(maps_dir / r["file"]),
                 {k: r.get(k) for k in ("contour", "resolution", "mass_kda", "pixel_size", "url")})
            for r in kept]


# --- The build ------------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> dict:
    """Collect the tasks, build what is not built yet, and write the manifest."""
    started = time.perf_counter()
    settings = BuildSettings(
        box=args.box, voxel_size=args.voxel_size, rotations=args.rotations, seed=args.seed,
        max_outside=args.max_outside, resolution=args.resolution, subassemblies=args.subassemblies,
        max_chains=args.max_chains, contact=args.contact, assemblies=args.assemblies,
        assemblies_only=args.assemblies_only, mesh_margin=args.mesh_margin,
        mesh_supersample=args.mesh_supersample, mesh_blur=args.mesh_blur,
    )
    if not (args.structures or args.maps or args.meshes or args.emdb):
        raise CorpusError("Nothing to build: give --structures, --maps, --meshes or --emdb.")
    tasks = _local_tasks(args)  # checked before the folder is touched: a wrong input changes nothing
    fixed_splits = _splits_of(args.split_from) if args.split_from else None
    _refuse_duplicate_keys(tasks)
    writer = CorpusWriter(args.out, settings.box, settings.voxel_size, overwrite=args.overwrite)
    if args.emdb:
        tasks += emdb_tasks(args)
        _refuse_duplicate_keys(tasks)
    for kind in sorted({"map" if t.kind == "emdb" else t.kind for t in tasks}):
        writer.use_source(kind, settings.for_source(kind))
    if writer.resumed_entries:
        logger.info("Resuming %s: %d entries were built before.", args.out, writer.resumed_entries)
    run_tasks(writer, tasks, settings, args.workers, show_progress=not args.quiet)
    return writer.finish(args.seed, args.split, _build_info(args, settings, time.perf_counter() - started),
                         fixed_splits=fixed_splits)


def _splits_of(path: str) -> dict[str, str]:
    """Each group's split in an existing corpus, so that a corpus built to train beside it puts
    the same structures in the same splits (nothing of a test structure leaks into training)."""
    from training.corpus import Corpus

    corpus = Corpus(path)
    return {sample["group"]: sample["split"] for sample in corpus.samples}


def _local_tasks(args) -> list[Task]:
    tasks = []
    if args.structures:
        tasks += structure_tasks(args.structures)
    if args.maps:
        tasks += map_tasks(args.maps, args.maps_csv)
    if args.meshes:
        tasks += mesh_tasks(args.meshes)
    return tasks


def _refuse_duplicate_keys(tasks: list[Task]) -> None:
    seen: dict[str, str] = {}
    for task in tasks:
        if task.key in seen:
            raise CorpusError(f"Two inputs give the entry id {task.key!r}: {seen[task.key]} and "
                              f"{task.path}. Rename one, or build them into separate corpora.")
        seen[task.key] = task.path


def run_tasks(writer: CorpusWriter, tasks: list[Task], settings: BuildSettings, workers: int,
              show_progress: bool = True) -> None:
    """Build the unfinished tasks, biggest files first, journaling each as it finishes."""
    from tqdm.auto import tqdm

    todo = sorted((t for t in tasks if not writer.is_done(t.key)),
                  key=lambda t: Path(t.path).stat().st_size, reverse=True)
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="entries", unit="entry",
               disable=not show_progress)
    work = partial(build_entry, settings=settings, maps_dir=writer.maps_dir)
    n_samples = 0
    with _pool(workers) as pool:
        for entry in (pool.imap_unordered(work, todo) if pool else map(work, todo)):
            writer.add_entry(entry)
            if entry["status"] == "skipped":
                logger.warning("Skipped entry %s: %s", entry["key"], entry["reason"])
            for reason in entry.get("dropped", []):
                logger.warning("Dropped %s", reason)
            n_samples += len(entry.get("samples", []))
            bar.set_postfix(samples=n_samples, refresh=False)
            bar.update()
    bar.close()


@contextmanager
def _pool(workers: int):
    """A spawn-started process pool, or None for one worker (work then runs in this process)."""
    if workers <= 1:
        yield None
        return
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _build_info(args, settings: BuildSettings, seconds: float) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from napari_cryoswan import __version__

    versions = {}
    for package in ("numpy", "scipy", "gemmi", "mrcfile", "trimesh"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"code_version": __version__, "arguments": vars(args), "settings": asdict(settings),
            "seconds": round(seconds, 1), "versions": versions}


# --- Command line ---------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    from training.emdb import DEFAULT_QUERY, EmdbSettings

    emdb_defaults = EmdbSettings()
    parser = argparse.ArgumentParser(
        prog="python -m training.build_corpus",
        description="Build a training corpus of 64³ maps at 4 Å (the ProteinNet3D recipe) from "
                    "atomic structures, real maps, meshes and/or EMDB, with a manifest and a "
                    "train/val/test split made by entry.",
        epilog="Examples:\n"
               "  python -m training.build_corpus --out corpus --structures pdbs/ --subassemblies 20\n"
               "  python -m training.build_corpus --out corpus --maps maps/ --maps-csv contours.csv\n"
               "  python -m training.build_corpus --out shapes --meshes meshes/ --workers 2\n"
               "  python -m training.build_corpus --out pn3d --emdb --emdb-dir emdb_downloads/\n"
               "See docs/CORPUS.md for the format and the recipe of the default corpus.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    out = parser.add_argument_group("corpus")
    out.add_argument("--out", required=True, help="the corpus folder; an existing corpus is resumed/extended")
    out.add_argument("--overwrite", action="store_true", help="delete the corpus in --out first and rebuild it")
    d = dataclass_defaults(BuildSettings)
    out.add_argument("--box", type=int, default=d["box"], help="box edge in voxels (default %(default)s)")
    out.add_argument("--voxel-size", type=float, default=d["voxel_size"], help="Å per voxel (default %(default)s)")
    out.add_argument("--rotations", type=int, default=d["rotations"],
                     help="random rotations per entry (default %(default)s, the paper's)")
    out.add_argument("--seed", type=int, default=d["seed"],
                     help="seed of the rotations, sub-assemblies and split (default %(default)s)")
    out.add_argument("--split", type=float, nargs=3, default=list(DEFAULT_FRACTIONS), metavar=SPLITS,
                     help="train/val/test fractions of the entries; an entry's rotations and "
                          "sub-assemblies share its split (default 0.8 0.1 0.1)")
    out.add_argument("--split-from", metavar="CORPUS",
                     help="give every group that CORPUS holds the split it has there (for a corpus "
                          "that trains beside it); other groups are dealt as usual")
    out.add_argument("--max-outside", type=float, default=d["max_outside"],
                     help="drop entries with more than this fraction of density outside the box (default "
                          "%(default)s; --assemblies are cropped, never dropped)")
    out.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    out.add_argument("--quiet", action="store_true", help="no progress bars; warnings only")

    structures = parser.add_argument_group("atomic structures (simulated densities)")
    structures.add_argument("--structures", nargs="+", metavar="PATH",
                            help="PDB/mmCIF files (optionally .gz) or folders of them")
    structures.add_argument("--resolution", type=float, default=d["resolution"],
                            help="resolution of the simulated density in Å (default %(default)s, Nyquist at 4 Å)")
    structures.add_argument("--subassemblies", type=int, default=d["subassemblies"], metavar="N",
                            help="also up to N distinct sub-assemblies of touching chains per structure "
                                 "(default %(default)s)")
    structures.add_argument("--max-chains", type=int, default=d["max_chains"],
                            help="chains per sub-assembly at most (default %(default)s)")
    structures.add_argument("--assemblies", type=int, default=d["assemblies"], metavar="N",
                            help="also up to N symmetric assemblies per structure (rings, shells, "
                                 "filaments of its copies: large complexes that fill or overflow the box, "
                                 "cropped as ProteinNet3D crops them; default %(default)s)")
    structures.add_argument("--assemblies-only", action="store_true",
                            help="only the assemblies: not the structure itself nor its sub-assemblies")
    structures.add_argument("--contact", type=float, default=d["contact"],
                            help="Å between atoms for two chains to touch (default %(default)s)")

    maps = parser.add_argument_group("real maps")
    maps.add_argument("--maps", nargs="+", metavar="PATH",
                      help="map files (.mrc/.map/.ccp4, optionally .gz) or folders")
    maps.add_argument("--maps-csv", metavar="CSV",
                      help="columns emdb_id, contour, resolution (optional mass_kda, file, pixel_size); "
                           "the contour is the mask level")

    meshes = parser.add_argument_group("meshes (voxelised as solid densities)")
    meshes.add_argument("--meshes", nargs="+", metavar="PATH", help=".off/.obj/.ply/.stl files or folders")
    meshes.add_argument("--mesh-margin", type=float, default=d["mesh_margin"],
                        help="voxels between the shape and the box (default %(default)s)")
    meshes.add_argument("--mesh-supersample", type=int, default=d["mesh_supersample"],
                        help="occupancy samples per voxel edge (default %(default)s)")
    meshes.add_argument("--mesh-blur", type=float, default=d["mesh_blur"],
                        help="Gaussian blur σ in voxels (default %(default)s: about 9 Å resolution)")

    emdb = parser.add_argument_group("EMDB curation (network)")
    emdb.add_argument("--emdb", action="store_true",
                      help="curate single-particle and subtomogram-averaging maps from the EMDB API")
    emdb.add_argument("--emdb-dir", metavar="DIR",
                      help="downloads and emdb_state.jsonl (resumable); required with --emdb")
    emdb.add_argument("--emdb-api", default=emdb_defaults.api_url,
                      help=f"API base URL (default {emdb_defaults.api_url})")
    emdb.add_argument("--emdb-files", default=emdb_defaults.files_url,
                      help=f"file server base URL (default {emdb_defaults.files_url})")
    emdb.add_argument("--emdb-query", default=DEFAULT_QUERY,
                      help="Solr search query (default: released SPA and STA entries)")
    emdb.add_argument("--min-kda", type=float, default=emdb_defaults.min_kda, help="lightest entry kept (default 100)")
    emdb.add_argument("--max-kda", type=float, default=emdb_defaults.max_kda, help="heaviest entry kept (default 1500)")
    emdb.add_argument("--emdb-limit", type=int, help="stop after this many maps are kept (default: all)")
    emdb.add_argument("--rate", type=float, default=emdb_defaults.requests_per_second,
                      help="requests per second at most (default 2)")
    emdb.add_argument("--retries", type=int, default=emdb_defaults.retries,
                      help="retries of a failed request (default 4)")
    emdb.add_argument("--backoff", type=float, default=emdb_defaults.backoff,
                      help="seconds before the first retry, doubled each time (default 2)")
    args = parser.parse_args(argv)
    if args.emdb and not args.emdb_dir:
        parser.error("--emdb needs --emdb-dir, the folder for the downloads and the curation state.")
    if args.maps_csv and not args.maps:
        parser.error("--maps-csv goes with --maps.")
    if args.assemblies_only and args.assemblies < 1:
        parser.error("--assemblies-only builds only the assemblies: give their number with --assemblies N.")
    if args.rotations < 1 or args.workers < 1 or args.box < 8 or args.voxel_size <= 0:
        parser.error("--rotations and --workers must be ≥ 1, --box ≥ 8, --voxel-size > 0.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from training.emdb import EmdbError

    try:
        manifest = build(args)
    except (CorpusError, EmdbError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(manifest, args.out))
    return 0


def summary(manifest: dict, path: str) -> str:
    split = manifest["split"]
    size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    lines = [
        f"corpus {path}: id {manifest['corpus_id']}, {len(manifest['samples'])} samples, "
        f"{size / 2**20:.0f} MiB; this run took {manifest['build']['seconds']:.0f} s",
        "  " + ", ".join(f"{s}: {split['samples'][s]} samples / {split['groups'][s]} groups" for s in SPLITS),
    ]
    if manifest["skipped"]:
        lines.append(f"  skipped {len(manifest['skipped'])} inputs (reasons in manifest.json 'skipped')")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
