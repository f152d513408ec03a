"""The latent explorer's core (no Qt, no napari): an opened index with its checkpoint, the UMAP
projection stored with the index, and the questions the Explorer widget asks of them.

- ``projection_of(index)``: the index's 2-D UMAP and hubs, read from ``INDEX/projection/`` when
  they were fitted for the index as it is now, else fitted (``projection.fit_projection`` and
  ``find_hubs``) and stored there, so that opening the explorer does not refit. A folder that
  cannot be written (a read-only bundled index) gets one fitted in memory, and says so.
- ``ExplorerIndex``: an index opened for exploring, with the checkpoint that built it:
  neighbours of a row or of a query vector, hub members, name/id search, hover labels, the
  metadata columns a plot can colour by.
- ``place_query``, ``rows_in_polygon``, ``rows_in_box``: where a new map falls on the picture,
  and which maps a lasso or box selection holds.
- ``decode_rows``: index entries shown again from their codes (``index.decode_entry``), in
  density units over their source when the row records where its box lay, else z-scored.
- ``find_similar``: a map (any size, any voxel size) preprocessed for the index's checkpoint,
  embedded with the index's own embedder, placed on the projection, its neighbours decoded.

The projection folder::

    INDEX/projection/coords.npy   (N, 2) float32: row i of the index at coords[i]
    INDEX/projection/hubs.json    {"hubs": [Hub.to_dict(), …]}
    INDEX/projection/meta.json    what it was fitted for (the index's count, manifest 'updated'
                                  stamp, checkpoint and embedding version), the seed, the UMAP
                                  and hub parameters, the date, and the SHA-256 of the two files
                                  above; written last, so it is the commit point

Each file is written atomically and nothing is pickled. A projection whose files do not match
their digests, or whose index has changed since, is fitted again.

``python -m napari_cryoswan.explorer INDEX [--seed S] [--refit]`` stores an index's projection
(what a bundled, read-only index must ship with).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROJECTION_DIR = "projection"
PROJECTION_FORMAT = "cryoswan-projection"
PROJECTION_FORMAT_VERSION = 1
UMAP_PARAMETERS = {"n_neighbors": 15, "min_dist": 0.1}
DEFAULT_SEED = 0
PLACE_NEIGHBOURS = 10  # indexed maps a query's place on the picture is averaged over

# Metadata a plot can colour by, when they vary: categories and numbers. Identifiers, paths and
# nested values are not offered.
NOT_COLUMNS = {"key", "name", "source", "origin_source", "placement", "box_shape", "voxel_size",
               "entry_id", "emdb_id", "pdb_id", "rotation_index"}
MAX_CATEGORIES = 12

Stage = Callable[[int, int, str], None]  # (done, total, what is happening)


class ExplorerError(ValueError):
    """What the explorer cannot do as asked; the message says what to do instead."""


# --- the projection stored with the index --------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """The picture of an index: each row's 2-D place and the hubs.

    ``origin``: "stored" (read from the index folder), "fitted and stored", or "fitted in
    memory" (the folder could not be written; ``note`` says why).
    """

    coords: np.ndarray  # (N, 2) float32
    hubs: tuple  # of projection.Hub, largest first
    meta: dict
    origin: str = "stored"
    note: str | None = None

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def labels(self) -> np.ndarray:
        """(N,) each row's hub id, -1 for rows in no hub."""
        from .projection import hub_labels

        return hub_labels(self.hubs, len(self.coords))

    def hub(self, hub_id: int):
        for hub in self.hubs:
            if hub.id == hub_id:
                return hub
        raise ExplorerError(f"No hub {hub_id}: this projection has {len(self.hubs)} hubs.")

    def hub_of(self, row: int) -> int | None:
        label = int(self.labels[row])
        return None if label < 0 else label


def hub_parameters(n: int) -> dict:
    """``find_hubs`` settings for an index of n maps. Hubs are found on the embedding, not on
    the 2-D picture: on the default corpus's 179 entries they are then the same for every UMAP
    seed, where hubs found on the picture reshuffle between seeds (docs/EXPLORER.md). A hub
    holds 3 maps or more (2 under a dozen maps; 5 from a thousand up, so a large index is not cut
    into crumbs). HDBSCAN keeps its finest dense groups ("leaf"): on the bundled index its
    default ("eom") puts 71 of 179 maps in one hub."""
    min_size = 5 if n >= 1000 else 3 if n >= 12 else 2
    return {"min_size": min_size, "min_samples": min_size, "cluster_on": "embedding", "max_mads": 3.0,
            "selection": "leaf"}


def fit_index_projection(index, *, seed: int = DEFAULT_SEED, stage: Stage | None = None) -> Projection:
    """Fit the UMAP and hubs of ``index`` (nothing is read or written)."""
    from .projection import find_hubs, fit_projection

    report = stage or (lambda done, total, message: None)
    n = len(index)
    hubs_settings = hub_parameters(n)
    if n == 0:
        coords, hubs = np.zeros((0, 2), np.float32), ()
    else:
        report(0, 2, f"laying out {n} maps (UMAP)")
        coords = fit_projection(index.embeddings, seed=seed, **UMAP_PARAMETERS)
        report(1, 2, "finding hubs")
        hubs = tuple(find_hubs(index.embeddings, coords, **hubs_settings))
    report(2, 2, "projection ready")
    return Projection(np.asarray(coords, np.float32), hubs, _meta_for(index, seed, hubs_settings), "fitted in memory")


def read_projection(index) -> Projection | None:
    """The projection stored in the index folder, when it was fitted for the index as it is now
    and its files are whole; otherwise None (fit one)."""
    from .projection import Hub

    folder = Path(index.path) / PROJECTION_DIR
    try:
        meta = json.loads((folder / "meta.json").read_text())
        coords_bytes = (folder / "coords.npy").read_bytes()
        hubs_bytes = (folder / "hubs.json").read_bytes()
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != PROJECTION_FORMAT or \
            meta.get("format_version") != PROJECTION_FORMAT_VERSION or not _fitted_for(meta, index):
        return None
    if meta.get("coords_sha256") != _sha256(coords_bytes) or meta.get("hubs_sha256") != _sha256(hubs_bytes):
        return None  # a write cut short, or files from another fit
    try:
        import io

        coords = np.load(io.BytesIO(coords_bytes), allow_pickle=False)
        hubs = tuple(Hub.from_dict(h) for h in json.loads(hubs_bytes)["hubs"])
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    if coords.shape != (len(index), 2) or not np.isfinite(coords).all():
        return None
    return Projection(coords.astype(np.float32, copy=False), hubs, meta, "stored")


def write_projection(index, projection: Projection) -> Path:
    """Store ``projection`` in ``INDEX/projection/`` (each file atomically, meta.json last)."""
    from ._atomic import atomic_path

    folder = Path(index.path) / PROJECTION_DIR
    folder.mkdir(exist_ok=True)
    coords_buffer = _npy_bytes(np.ascontiguousarray(projection.coords, np.float32))
    hubs_bytes = json.dumps({"hubs": [h.to_dict() for h in projection.hubs]}).encode()
    meta = {**projection.meta, "coords_sha256": _sha256(coords_buffer), "hubs_sha256": _sha256(hubs_bytes)}
    for name, payload in (("coords.npy", coords_buffer), ("hubs.json", hubs_bytes),
                          ("meta.json", json.dumps(meta, indent=1).encode())):
        with atomic_path(folder / name) as tmp, open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
    return folder


def projection_of(index, *, seed: int | None = None, refit: bool = False,
                  progress: Stage | None = None) -> Projection:
    """The projection of ``index``: the stored one when it was fitted for the index as it is
    now (and for ``seed``, when one is given), else a new fit, stored when the folder is
    writable (``refit`` forces a new fit).

    Args:
        seed: the UMAP seed; None takes whatever seed the stored projection has (a new fit
            uses ``DEFAULT_SEED``).
        progress: called with (done, total, message) as the fit goes.
    """
    if not refit:
        stored = read_projection(index)
        if stored is not None and (seed is None or stored.meta.get("seed") == seed):
            return stored
    fitted = fit_index_projection(index, seed=DEFAULT_SEED if seed is None else seed, stage=progress)
    try:
        write_projection(index, fitted)
    except OSError as err:
        reason = "it is read-only" if isinstance(err, PermissionError) or not os.access(index.path, os.W_OK) \
            else f"it could not be written ({err.strerror or err})"
        note = (f"The projection was fitted now, in memory: {index.path} holds none for its "
                f"{len(index)} maps and {reason}, so it is fitted again each time the index is "
                "opened. Store one with python -m napari_cryoswan.explorer INDEX from a writable copy.")
        return Projection(fitted.coords, fitted.hubs, fitted.meta, "fitted in memory", note)
    return Projection(fitted.coords, fitted.hubs, fitted.meta, "fitted and stored")


def _meta_for(index, seed: int, hubs_settings: dict) -> dict:
    import datetime

    manifest = index.manifest
    return {"format": PROJECTION_FORMAT, "format_version": PROJECTION_FORMAT_VERSION,
            "count": len(index), "index_updated": manifest.get("updated"),
            "checkpoint_id": manifest["checkpoint"]["id"],
            "embedding_version": manifest["embedding"]["version"],
            "seed": int(seed), "umap": dict(UMAP_PARAMETERS), "hubs": dict(hubs_settings),
            "fitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _fitted_for(meta: dict, index) -> bool:
    manifest = index.manifest
    return (meta.get("count") == len(index) and meta.get("index_updated") == manifest.get("updated")
            and meta.get("checkpoint_id") == manifest["checkpoint"]["id"]
            and meta.get("embedding_version") == manifest["embedding"]["version"]
            and meta.get("umap") == dict(UMAP_PARAMETERS)  # fitted by the rules of this version
            and meta.get("hubs") == hub_parameters(len(index)))


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- places on the picture -------------------------------------------------------------------


def place_query(index, projection: Projection, vector) -> tuple[float, float]:
    """Where a map embedded as ``vector`` (D,) falls on the projection, without refitting it
    (``projection.place``: among its nearest indexed maps)."""
    from .projection import place

    if len(index) == 0:
        raise ExplorerError("The index is empty: there is no picture to place a map on.")
    x, y = place(np.asarray(vector, np.float32).reshape(1, -1), index.embeddings, projection.coords,
                 k=min(PLACE_NEIGHBOURS, len(index)))[0]
    return float(x), float(y)


def rows_in_polygon(coords, vertices) -> np.ndarray:
    """Rows whose point lies inside the polygon (a lasso's (M, 2) vertices), in row order
    (even-odd rule; a point on an edge may fall either way)."""
    points = np.asarray(coords, np.float64).reshape(-1, 2)
    polygon = np.asarray(vertices, np.float64).reshape(-1, 2)
    if len(polygon) < 3 or len(points) == 0:
        return np.zeros(0, int)
    x, y = points[:, 0][:, None], points[:, 1][:, None]
    x1, y1 = polygon[:, 0][None], polygon[:, 1][None]
    x2, y2 = np.roll(polygon[:, 0], -1)[None], np.roll(polygon[:, 1], -1)[None]
    crosses = (y1 > y) != (y2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at_x = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    inside = (crosses & (x < at_x)).sum(1) % 2 == 1
    return np.flatnonzero(inside)


def rows_in_box(coords, corner_a, corner_b) -> np.ndarray:
    """Rows whose point lies in the rectangle between two corners (x, y), in row order."""
    points = np.asarray(coords, np.float64).reshape(-1, 2)
    low = np.minimum(corner_a, corner_b)
    high = np.maximum(corner_a, corner_b)
    return np.flatnonzero(((points >= low) & (points <= high)).all(1))


def nearest_to_centre(coords, rows, limit: int) -> list[int]:
    """Up to ``limit`` of ``rows``, those nearest the median of their points first: what a
    selection larger than the layers the viewer should open at once keeps."""
    rows = np.asarray(rows, int)
    if len(rows) == 0:
        return []
    points = np.asarray(coords, np.float64)[rows]
    distance = np.linalg.norm(points - np.median(points, 0), axis=1)
    return [int(r) for r in rows[np.lexsort((rows, distance))][:limit]]


def grid_translations(count: int, pitch: float, *, start=(0.0, 0.0, 0.0),
                      columns: int | None = None) -> list[tuple[float, float, float]]:
    """(z, y, x) translations in Å that lay ``count`` boxes side by side: along x, ``columns``
    to a row (default: all in one row up to 5, else about a square), rows down along y."""
    if columns is None:
        columns = count if count <= 5 else math.ceil(math.sqrt(count))
    columns = max(1, int(columns))
    z, y, x = (float(v) for v in start)
    return [(z, y + (i // columns) * pitch, x + (i % columns) * pitch) for i in range(count)]


# --- an index opened for exploring -----------------------------------------------------------


@dataclass
class ExplorerIndex:
    """An index, the checkpoint it was built with (to decode its codes and embed queries), and
    its projection once fitted or read (``projection_of``).

    ``label``: how the widget names it ("bundled index" or the folder's name).
    """

    index: object  # index.LatentIndex
    checkpoint: object  # checkpoint.LoadedCheckpoint, the one the index records
    label: str
    projection: Projection | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def path(self) -> Path:
        return Path(self.index.path)

    @property
    def rows(self) -> list[dict]:
        return self.index.rows

    @property
    def contract(self):
        return self.checkpoint.contract

    def describe(self) -> str:
        """One line: what the index holds and what built it."""
        recorded = self.index.manifest["checkpoint"]
        text = (f"{self.label}: {len(self)} maps, {recorded['model']} {recorded['file']} "
                f"({recorded['id']})")
        if self.projection is not None:
            text += f", {len(self.projection.hubs)} hubs"
        return text

    # --- neighbours

    def neighbours(self, row: int, k: int) -> list:
        """Row ``row`` itself (distance 0), then its ``k`` nearest other maps, nearest first."""
        from .index import Neighbour

        row = self._checked_row(row)
        others = self.index.search(self.index.embeddings[row], k, exclude=row)
        return [Neighbour(row, 0.0, self.rows[row]), *others]

    def search(self, vector, k: int) -> list:
        """The ``k`` maps nearest to an embedding, nearest first (``index.Neighbour``)."""
        return self.index.search(np.asarray(vector, np.float32), k)

    def isolation_note(self, distance: float) -> str | None:
        """``index.isolation_note`` on this index's spacing: None unless nothing in it is near."""
        from .index import isolation_note

        return isolation_note(self.index.spacing(), distance)

    def hub_members(self, hub_id: int, limit: int | None = None) -> list:
        """A hub's anchor, then its members by distance to it (``index.Neighbour``)."""
        from .index import Neighbour

        hub = self._projection().hub(hub_id)
        members = list(zip(hub.members, hub.distances))[:limit]
        return [Neighbour(int(r), float(d), self.rows[r]) for r, d in members]

    def rows_as_neighbours(self, rows: Sequence[int]) -> list:
        """Chosen rows (a selection) as ``index.Neighbour`` with no distance."""
        from .index import Neighbour

        return [Neighbour(self._checked_row(r), math.nan, self.rows[r]) for r in rows]

    def find(self, text: str, limit: int | None = None) -> list[int]:
        """Rows whose name, EMDB/PDB id, entry id or file name contain ``text``; '#12' is
        row 12."""
        stripped = str(text).strip()
        if stripped.startswith("#") and stripped[1:].isdigit():
            row = int(stripped[1:])
            return [row] if row < len(self) else []
        return self.index.find(text, limit)

    # --- what a plot shows

    def identifier(self, row: int) -> str | None:
        entry = self.rows[row]
        return entry.get("emdb_id") or entry.get("pdb_id") or entry.get("entry_id")

    def hover_text(self, row: int) -> str:
        """name · id · hub: what the plot says under the cursor."""
        entry = self.rows[row]
        parts = [str(entry.get("name") or entry.get("key"))]
        identifier = self.identifier(row)
        if identifier and identifier != parts[0]:
            parts.append(str(identifier))
        hub = self.projection.hub_of(row) if self.projection is not None else None
        parts.append("no hub" if hub is None else f"hub {hub}")
        return " · ".join(parts)

    def columns(self) -> dict[str, str]:
        """Metadata a plot can colour by: name → "category" or "number"; only the columns
        whose values differ between maps."""
        out = {}
        names = dict.fromkeys(k for row in self.rows for k in row if k not in NOT_COLUMNS)
        for name in names:
            values = [row.get(name) for row in self.rows]
            known = [v for v in values if v is not None]
            if not known or any(isinstance(v, (dict, list)) for v in known):
                continue
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in known):
                if len(set(known)) > 1:
                    out[name] = "number"
            elif 1 < len(set(map(str, known))) <= MAX_CATEGORIES or \
                    (len(set(map(str, known))) == 1 and len(known) < len(values)):
                out[name] = "category"
        return out

    def column_values(self, name: str) -> list:
        return [row.get(name) for row in self.rows]

    def _projection(self) -> Projection:
        if self.projection is None:
            raise ExplorerError("The index has no projection yet: open it in the explorer first.")
        return self.projection

    def _checked_row(self, row: int) -> int:
        row = int(row)
        if not 0 <= row < len(self):
            raise ExplorerError(f"Row {row} is outside this index of {len(self)} maps.")
        return row


# --- maps shown again from their codes -------------------------------------------------------


@dataclass
class DecodedEntry:
    """An index entry decoded from its codes, ready to become a layer.

    In density units over its source (``units`` "density") when its row records where its box
    lay; z-scored at the checkpoint's voxel size with origin 0 otherwise (a corpus's rotated
    box lies over nothing).
    """

    data: np.ndarray  # (box, box, box) float32
    voxel_size: float  # Å
    origin: tuple[float, float, float]  # Å, (z, y, x): where it overlays its source
    units: str  # "density" or "z-score"
    row: int
    distance: float | None  # to what the set was opened around; None for a selection
    entry: dict

    @property
    def name(self) -> str:
        return str(self.entry.get("name") or self.entry.get("key"))

    @property
    def extent(self) -> float:
        """The box's edge in Å."""
        return float(self.data.shape[-1]) * self.voxel_size

    def density(self):
        from .io import DensityMap

        return DensityMap(self.data, (self.voxel_size,) * 3, tuple(self.origin))


def decode_rows(explorer: ExplorerIndex, neighbours: Sequence, *, device=None,
                stage: Stage | None = None, should_stop=None) -> list[DecodedEntry]:
    """Decode index entries (``index.Neighbour``, or plain rows) from their codes, one by one
    (``index.decode_entry``, which refuses a checkpoint that did not build the index)."""
    from .engine import Cancelled
    from .index import Neighbour, decode_entry

    report = stage or (lambda done, total, message: None)
    contract_voxel = float(explorer.contract.voxel_size)
    out = []
    total = len(neighbours)
    for i, hit in enumerate(neighbours):
        if should_stop is not None and should_stop():
            raise Cancelled()
        if not isinstance(hit, Neighbour):
            hit = explorer.rows_as_neighbours([hit])[0]
        report(i, total, f"decoding {hit.entry.get('name') or hit.row} ({i + 1} of {total})")
        placement = hit.entry.get("placement") or {}
        in_density = placement.get("std") is not None and placement.get("box_origin") is not None
        box = decode_entry(explorer.index, hit.row, explorer.checkpoint, device=device, denormalise=in_density)
        distance = None if hit.distance is None or math.isnan(hit.distance) else float(hit.distance)
        if in_density:
            voxel = float(placement.get("voxel_size") or contract_voxel)
            origin = tuple(float(v) for v in placement["box_origin"])
        else:
            voxel, origin = contract_voxel, (0.0, 0.0, 0.0)
        out.append(DecodedEntry(box, voxel, origin, "density" if in_density else "z-score",
                                hit.row, distance, dict(hit.entry)))
    report(total, total, "decoded")
    return out


def entry_metadata(explorer: ExplorerIndex, decoded: DecodedEntry, *, rank: int, opened_as: str,
                   set_id: int, query: str | None = None, hub: int | None = None) -> dict:
    """A decoded entry's layer metadata: where it comes from (the index, its row and metadata,
    the checkpoint that decodes it) and why it was opened (rank, distance, query or hub)."""
    recorded = explorer.index.manifest["checkpoint"]
    return {
        "variant": "decoded from the index",
        "model": recorded["model"],
        "checkpoint": str(explorer.checkpoint.path),
        "checkpoint_id": recorded["id"],
        "voxel_size": (decoded.voxel_size,) * 3,
        "origin": tuple(decoded.origin),
        "units": decoded.units,
        "source": decoded.entry.get("source"),
        "index_entry": dict(decoded.entry),
        "explorer": {"index": str(explorer.path), "index_label": explorer.label, "row": decoded.row,
                     "key": decoded.entry.get("key"), "rank": rank, "distance": decoded.distance,
                     "opened_as": opened_as, "set": set_id, "query": query, "hub": hub},
    }


def entry_layer_name(decoded: DecodedEntry, rank: int, *, prefix: str = "") -> str:
    """'#2 7A5F_r1 d=0.83': rank, name and distance, short enough for the layer list."""
    from .layers import short_name

    name = f"{prefix}#{rank} {short_name(decoded.name)}"
    return name if decoded.distance is None or rank == 0 and decoded.distance == 0 else \
        f"{name} d={decoded.distance:.2f}"


def entry_layer_data(decoded: DecodedEntry, *, name: str, metadata: dict, translate=None) -> tuple:
    """A napari LayerData tuple for a decoded entry: at its own place, or at ``translate``."""
    from .layers import density_layer_data

    density = decoded.density()
    if translate is not None:
        density = density.with_data(density.data, origin=tuple(float(v) for v in translate))
    return density_layer_data(density, name, metadata)


# --- a new map searched against the index ----------------------------------------------------


@dataclass
class SimilarMaps:
    """What ``find_similar`` found for a query map."""

    vector: np.ndarray  # (D,) the query's embedding
    xy: tuple[float, float]  # its place on the projection
    record: object  # preprocess.PreprocessRecord: where its box lay over the query map
    neighbours: list  # index.Neighbour, nearest first
    maps: list[DecodedEntry]  # the neighbours decoded (empty when not asked)
    notes: list[str] = field(default_factory=list)


def find_similar(explorer: ExplorerIndex, density, *, k: int = 8, device=None,
                 contour_level: float | None = None, decode: bool = True,
                 stage: Stage | None = None, should_stop=None) -> SimilarMaps:
    """The maps of the index nearest to ``density`` (a ``DensityMap`` of any size and voxel
    size): preprocessed for the index's checkpoint contract, embedded with the index's own
    embedder (``embedding.Embedder.for_checkpoint``), placed on the projection, searched, and
    (``decode``) its neighbours decoded."""
    from .engine import Cancelled
    from .index import embed_maps
    from .reconstruction import input_concerns

    report = stage or (lambda done, total, message: None)
    if len(explorer) == 0:
        raise ExplorerError(f"{explorer.label} is empty: there is nothing to compare the map with.")
    if density.voxel_size is None:
        raise ExplorerError("The map has no voxel size: set it (Å per voxel) before searching.")
    settings = explorer.contract.settings(contour_level)
    notes = input_concerns(density, settings)
    total = 3 + (min(k, len(explorer)) if decode else 0)
    report(0, total, "preprocessing and embedding the map")
    embedded = embed_maps(explorer.checkpoint, [density], device=device, contour_level=contour_level,
                          should_stop=should_stop)
    vector = embedded.embeddings[0]
    record = embedded.records[0]
    if should_stop is not None and should_stop():
        raise Cancelled()
    report(1, total, "placing it on the projection")
    projection = explorer.projection if explorer.projection is not None else projection_of(explorer.index)
    xy = place_query(explorer.index, projection, vector)
    report(2, total, "searching the index")
    neighbours = explorer.search(vector, k)
    maps = []
    if decode:
        maps = decode_rows(explorer, neighbours, device=device, should_stop=should_stop,
                           stage=lambda done, _, message: report(3 + done, total, message))
    report(total, total, "done")
    if record.cut_off_note():
        notes = [n for n in notes if "cut off" not in n] + [record.cut_off_note()]
    isolated = explorer.isolation_note(neighbours[0].distance) if neighbours else None
    if isolated:
        notes = [isolated, *notes]
    return SimilarMaps(vector, xy, record, neighbours, maps, notes)


# --- command line ----------------------------------------------------------------------------


def main(argv=None) -> int:
    """Store an index's projection: ``python -m napari_cryoswan.explorer INDEX``."""
    import argparse
    import sys

    from .index import LatentIndexError, open_index

    parser = argparse.ArgumentParser(prog="python -m napari_cryoswan.explorer",
                                     description="Fit and store the UMAP projection and hubs of a latent "
                                                 "index (INDEX/projection/), so the explorer opens it at once.")
    parser.add_argument("index", help="an index folder from python -m training.build_index")
    parser.add_argument("--seed", type=int, default=None, help=f"UMAP seed (default: the stored one, else {DEFAULT_SEED})")
    parser.add_argument("--refit", action="store_true", help="fit again even when a stored projection matches")
    args = parser.parse_args(argv)
    try:
        index = open_index(args.index)
        projection = projection_of(index, seed=args.seed, refit=args.refit,
                                   progress=lambda done, total, message: print(f"{message}…", file=sys.stderr))
    except (LatentIndexError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(str(h.size) for h in projection.hubs[:12])
    print(f"{args.index}: {len(index)} maps, {len(projection.hubs)} hubs ({sizes}"
          f"{', …' if len(projection.hubs) > 12 else ''}); projection {projection.origin}, "
          f"seed {projection.meta['seed']}.")
    if projection.note:
        print(projection.note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
