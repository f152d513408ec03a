"""The latent index: maps embedded by one checkpoint, kept on disk, searched by nearest neighbour.

An index is a folder::

    manifest.json                   what the index holds (below): the commit point
    shards/NNNNN.embeddings.npy     (n, D) float32: each map's embedding (``embedding.Embedder``)
    shards/NNNNN.codes.npy          (n, C) uint16: each map's codes, every level and scale
                                    flattened in the order of the manifest's code layout, so a
                                    map can be shown again (``decode_entry``) when its file is gone
    shards/NNNNN.rows.json          {"rows": [...]}: one metadata row per map (``ROW_FIELDS``)
    index.lock                      held by the one process that adds to the index
    parts/rank-R/                   during a distributed build only: each process's own index,
                                    merged into this one by rank 0 (``training.build_index``)

``manifest.json`` holds: ``format`` "cryoswan-index" and ``format_version``; ``checkpoint``
(``id``, the ``checkpoint.checkpoint_id`` content hash, its ``file`` name, ``model`` and
``bundled``, the bundled name or null); ``input`` (the checkpoint's input contract) and
``preprocessing`` (the ``PreprocessSettings`` maps were prepared with); ``embedding``
(``version``, ``embedding.Embedder.version``: the recipe and the head, and ``dim``); ``codes`` (``layout``: [level,
[scales]] pairs, ``per_map``, ``codebook_size``, ``dtype``); ``count``; ``shards`` ([{``name``,
``count``}], in order); ``created`` and ``updated``.

Adding maps writes a new shard (each file atomically), then rewrites the manifest atomically to
list it. A process killed mid-add leaves shard files that no manifest lists: readers never see
them, and the next writer deletes them, so the index stays readable at its previous state.

Embeddings from another checkpoint or another embedding recipe are not comparable: opening an
index with either different is refused (the signature habit of micro-sam's embedding cache).
Nothing is unpickled: arrays are read with ``allow_pickle=False``, metadata is JSON.

Search is exact: Euclidean distances to every embedding (numpy), nearest first.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ._atomic import atomic_path, write_json_atomic
from .embedding import RECIPE as EMBEDDING_RECIPE

FORMAT = "cryoswan-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
LOCK = "index.lock"
PARTS_DIR = "parts"
CODE_DTYPE = np.uint16
# The metadata every row holds (None where unknown; nothing is invented), beside optional extras
# (``entry_id``, ``rotation_index``, ``source_kind``, ``placement``…).
ROW_FIELDS = ("key", "name", "source", "emdb_id", "pdb_id", "voxel_size", "box_shape",
              "mass_kda", "split")
BUILD_COMMAND = "python -m training.build_index (--maps PATH… | --corpus DIR) --checkpoint CKPT --out INDEX"

Progress = Callable[[int, int], None]
StopCheck = Callable[[], bool]

_SHARD_NAME = re.compile(r"^\d{5}$")
_SHARD_FILE = re.compile(r"^(\d{5})\.(embeddings\.npy|codes\.npy|rows\.json)$")


class LatentIndexError(ValueError):
    """An index that cannot be used as asked. The message says what is wrong and what to do."""


# --- codes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeLayout:
    """Where each level's and scale's codes sit in a map's flat row of ``per_map`` codes.

    ``levels``: (level name, scales) pairs in the order ``encode`` gives them; scale s holds s³
    codes of one map, in C order of its (s, s, s) grid.
    """

    levels: tuple[tuple[str, tuple[int, ...]], ...]
    codebook_size: int | None = None

    @classmethod
    def of_codes(cls, codes: dict, codebook_size: int | None = None) -> CodeLayout:
        """The layout of ``model.encode(x).codes``: level → list of (B, s, s, s) integer codes."""
        levels = []
        for name, scales in codes.items():
            sizes = []
            for code_Bsss in scales:
                shape = tuple(code_Bsss.shape[1:])
                if len(shape) != 3 or len(set(shape)) != 1:
                    raise LatentIndexError(f"Codes of level {name} have shape {tuple(code_Bsss.shape)}, "
                                           "not (B, s, s, s): this model's codes cannot be indexed.")
                sizes.append(int(shape[0]))
            levels.append((str(name), tuple(sizes)))
        return cls(tuple(levels), codebook_size)

    @classmethod
    def from_dict(cls, values: dict) -> CodeLayout:
        return cls(tuple((str(name), tuple(int(s) for s in scales)) for name, scales in values["layout"]),
                   values.get("codebook_size"))

    def to_dict(self) -> dict:
        return {"layout": [[name, list(scales)] for name, scales in self.levels],
                "per_map": self.per_map, "codebook_size": self.codebook_size,
                "dtype": np.dtype(CODE_DTYPE).name}

    @property
    def per_map(self) -> int:
        return sum(s**3 for _, scales in self.levels for s in scales)

    def pack(self, codes: dict) -> np.ndarray:
        """Codes as ``encode`` gives them (tensors or arrays) → (N, per_map) uint16."""
        if [name for name, _ in self.levels] != list(codes):
            raise LatentIndexError(f"Codes of levels {list(codes)}, but the index holds "
                                   f"{[name for name, _ in self.levels]}.")
        parts_Nc = []
        for name, scales in self.levels:
            if len(codes[name]) != len(scales):
                raise LatentIndexError(f"Level {name} has {len(codes[name])} scales, the index {len(scales)}.")
            for code_Nsss, s in zip(codes[name], scales):
                code_Nsss = np.asarray(code_Nsss.cpu() if hasattr(code_Nsss, "cpu") else code_Nsss)
                if not np.issubdtype(code_Nsss.dtype, np.integer):
                    raise LatentIndexError(
                        "This model's codes are continuous vectors, not codebook indices: only a "
                        "quantized model (swan, swan-rq1, vq, rq, var, hq) can fill an index.")
                if code_Nsss.shape[1:] != (s, s, s):
                    raise LatentIndexError(f"Level {name} codes of shape {code_Nsss.shape[1:]}, "
                                           f"the index expects {(s, s, s)}.")
                parts_Nc.append(code_Nsss.reshape(len(code_Nsss), -1))
        codes_NC = np.concatenate(parts_Nc, axis=1)
        limit = np.iinfo(CODE_DTYPE).max
        if codes_NC.size and (codes_NC.min() < 0 or codes_NC.max() > limit):
            raise LatentIndexError(f"Codes outside 0…{limit} do not fit the index's {np.dtype(CODE_DTYPE).name}.")
        return codes_NC.astype(CODE_DTYPE)

    def unpack(self, codes_NC: np.ndarray) -> dict[str, list[np.ndarray]]:
        """(N, per_map) codes → level → list of (N, s, s, s) int64 arrays, as ``decode_codes`` takes."""
        codes_NC = np.asarray(codes_NC)
        if codes_NC.ndim != 2 or codes_NC.shape[1] != self.per_map:
            raise LatentIndexError(f"Codes of shape {codes_NC.shape}; this layout has {self.per_map} per map.")
        out, start = {}, 0
        for name, scales in self.levels:
            out[name] = []
            for s in scales:
                flat_Nc = codes_NC[:, start:start + s**3]
                out[name].append(flat_Nc.astype(np.int64).reshape(len(codes_NC), s, s, s))
                start += s**3
        return out


# --- embedding maps with a checkpoint --------------------------------------------------------------


@dataclass
class EmbeddedMaps:
    """What ``embed_maps`` gives: one embedding and one row of codes per map, in input order."""

    embeddings: np.ndarray  # (N, D) float32
    codes: np.ndarray  # (N, per_map) uint16, in ``layout`` order
    layout: CodeLayout
    records: list  # the PreprocessRecord of each map; None for boxes given preprocessed
    embedding_version: str  # ``Embedder.version`` of the embedder that made them


def embed_maps(
    checkpoint,
    maps,
    *,
    device=None,
    batch_size: int = 4,
    contour_level: float | None = None,
    progress: Progress | None = None,
    should_stop: StopCheck | None = None,
    embedder=None,
) -> EmbeddedMaps:
    """Embed maps and encode their codes with a loaded checkpoint.

    Args:
        checkpoint: a ``LoadedCheckpoint`` of a quantized autoencoder.
        maps: ``DensityMap`` objects, preprocessed here for the checkpoint's input contract (the
            pipeline reconstruction uses), or an (N, box, box, box) array of boxes preprocessed
            for it already (a corpus's maps).
        progress: called as (maps done, total) after each batch.
        should_stop: checked between batches; ``engine.Cancelled`` is raised when it says True.
        embedder: an ``embedding.Embedder``; by default the checkpoint's own
            (``Embedder.for_checkpoint``: its invariance head when one is saved beside it).
    """
    from .embedding import Embedder
    from .engine import Cancelled, batches, choose_device, map_batches

    device = device if device is not None else choose_device()
    embedder = embedder or Embedder.for_checkpoint(checkpoint, device=device)
    settings = checkpoint.contract.settings(contour_level)
    preprocessed = isinstance(maps, np.ndarray)
    box = checkpoint.contract.box
    if preprocessed and (maps.ndim != 4 or maps.shape[1:] != (box,) * 3):
        raise LatentIndexError(f"Boxes of shape {maps.shape}: this checkpoint takes (N, {box}, {box}, {box}), "
                               f"preprocessed to {box}³ at {checkpoint.contract.voxel_size:g} Å.")
    total = len(maps)
    embeddings, codes, records, layout = [], [], [], None
    for part in batches(total, batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled()
        if preprocessed:
            boxes = np.asarray(maps[part], np.float32)
            records += [None] * len(boxes)
        else:
            from .preprocess import preprocess

            prepared = [preprocess(density, settings) for density in maps[part]]
            boxes = np.stack([p.data for p in prepared])
            records += [p.record for p in prepared]
        embeddings.append(embedder.embed(boxes, batch_size=batch_size))
        # A second encoding pass: the embedding encodes a posed, canonical copy of each box.
        (codes_of_batch,) = map_batches(lambda x: checkpoint.model.encode(x).codes, boxes, device,
                                        batch_size=len(boxes))
        if layout is None:
            layout = CodeLayout.of_codes(codes_of_batch, getattr(checkpoint.model.config, "codebook_size", None))
        codes.append(layout.pack(codes_of_batch))
        if progress is not None:
            progress(part.stop, total)
    if layout is None:
        raise LatentIndexError("No maps to embed.")
    return EmbeddedMaps(np.concatenate(embeddings).astype(np.float32), np.concatenate(codes), layout, records,
                        embedder.version)


def decode_codes(model, codes_NC: np.ndarray, layout: CodeLayout, *, device=None, batch_size: int = 4) -> np.ndarray:
    """(N, per_map) stored codes → (N, box, box, box) float32 reconstructions, z-scored as the
    model's input was (``denormalise`` with a row's ``placement`` gives density units)."""
    import torch

    from .engine import autocast, batches, choose_device

    device = device if device is not None else choose_device()
    model = model.to(device).eval()
    boxes = []
    for part in batches(len(codes_NC), batch_size):
        codes = {name: [torch.from_numpy(c).to(device) for c in scales]
                 for name, scales in layout.unpack(codes_NC[part]).items()}
        with torch.inference_mode(), autocast(device):
            boxes.append(model.decode_codes(codes)[:, 0].float().cpu().numpy())
    return np.concatenate(boxes)


def decode_entry(index: LatentIndex, row: int, checkpoint, *, device=None, denormalise: bool = False) -> np.ndarray:
    """Entry ``row`` of ``index`` shown again from its codes: a (box, box, box) float32 array.

    ``checkpoint``: the index's own, as a ``LoadedCheckpoint`` (its id is checked: codes mean
    nothing to another codebook) or as a bare model (not checked).
    ``denormalise``: undo the z-scoring with the mean and s.d. its preprocessing recorded, when
    the row has them (maps; a corpus's boxes have none and stay z-scored).
    """
    found_id = getattr(checkpoint, "checkpoint_id", None)
    if found_id is not None and found_id != index.checkpoint_id:
        recorded = index.manifest["checkpoint"]
        raise LatentIndexError(f"{index.path} holds codes of checkpoint {recorded['id']} ({recorded['file']}), "
                               f"not of {found_id}: decode them with the checkpoint the index was built with.")
    model = getattr(checkpoint, "model", checkpoint)
    box = decode_codes(model, index.codes_of([row]), index.layout, device=device)[0]
    placement = index.rows[row].get("placement") or {}
    if denormalise and placement.get("std") is not None:
        box = box * placement["std"] + placement["mean"]
    return box.astype(np.float32)


def map_row(path: str | os.PathLike, density, record=None, *, key: str | None = None) -> dict:
    """The metadata row of a map read from ``path`` (a ``DensityMap``) and preprocessed as
    ``record`` says. Its key is the resolved path unless given. The mass and PDB id of a map
    file are unknown (None); the EMDB id comes from the file name or header labels."""
    from .io import emdb_id_from

    path = Path(path)
    source = str(path.resolve())
    return {
        "key": key or source,
        "name": map_name(path),
        "source": source,
        "source_kind": "map",
        "emdb_id": density.header.get("emdb_id") or emdb_id_from(path),
        "pdb_id": None,
        "voxel_size": None if density.voxel_size is None else [float(v) for v in density.voxel_size],
        "box_shape": [int(n) for n in density.shape],
        "mass_kda": None,
        "split": None,
        "placement": describe_record(record),
    }


def map_name(path: str | os.PathLike) -> str:
    """A map file's name without its map suffixes: 'emd_3197.map.gz' → 'emd_3197'."""
    from .io import MAP_SUFFIXES

    name = Path(path).name
    for suffix in sorted(MAP_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def describe_record(record) -> dict | None:
    """What a row keeps of a ``PreprocessRecord``: where the box lay over its source, and the
    mean and s.d. that z-scored it (to undo it when the box is shown again)."""
    if record is None:
        return None
    return {"voxel_size": float(record.voxel_size), "box_origin": [float(v) for v in record.box_origin],
            "mean": None if record.mean is None else float(record.mean),
            "std": None if record.std is None else float(record.std),
            "fraction_outside": float(record.fraction_outside)}


# --- search ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Neighbour:
    row: int  # position in the index
    distance: float  # Euclidean, between embeddings
    entry: dict  # the row's metadata


def nearest(embeddings_ND: np.ndarray, query_D: np.ndarray, k: int,
            exclude: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours: (rows, distances), nearest first, ties by row.

    Distances come from the differences themselves, not |a|² + |b|² − 2a·b, so a duplicate is at
    exactly 0 and the order of near ties is not float32 cancellation noise.
    """
    query_D = np.asarray(query_D, np.float32).reshape(-1)
    if embeddings_ND.ndim != 2 or query_D.shape[0] != embeddings_ND.shape[1]:
        raise LatentIndexError(f"A query of dimension {query_D.shape[0]} against embeddings of "
                               f"shape {embeddings_ND.shape}: the index was built with another embedding. "
                               f"Rebuild it for this checkpoint into a new folder: {BUILD_COMMAND}")
    difference_ND = embeddings_ND - query_D
    distances_N = np.sqrt(np.einsum("nd,nd->n", difference_ND, difference_ND))
    if len(exclude):
        distances_N[np.asarray(exclude, int)] = np.inf
    k = min(int(k), int(np.isfinite(distances_N).sum()))
    if k <= 0:
        return np.zeros(0, int), np.zeros(0, np.float32)
    candidates = np.argpartition(distances_N, k - 1)[:k] if k < len(distances_N) else np.arange(len(distances_N))
    # The k-th distance may be shared by rows argpartition left out: take every row at or below it.
    cutoff = distances_N[candidates].max()
    candidates = np.flatnonzero(distances_N <= cutoff)
    order = np.lexsort((candidates, distances_N[candidates]))[:k]
    rows = candidates[order]
    return rows, distances_N[rows].astype(np.float32)


SPACING_SAMPLE = 256  # indexed maps whose nearest other entry sets the scale a query's distance is read on


def isolation_note(spacing: np.ndarray, distance: float) -> str | None:
    """A sentence for a query whose nearest map lies at ``distance``, as far from it as the
    index's distinct maps typically lie from each other (at or beyond the median of its
    ``LatentIndex.spacing``), else None. Distances alone do not say that; without it a user
    reads the nearest maps as matches."""
    if len(spacing) < 2 or not distance >= np.median(spacing):
        return None
    share = float(np.mean(spacing < distance))
    return (f"No map of the index is a near copy of this one: the nearest lies at d = {distance:.2f}, "
            f"farther than {share:.0%} of the index's maps lie from their own nearest other map "
            f"(median d = {np.median(spacing):.2f}): the nearest maps are the least unlike, not matches.")


# --- the index -------------------------------------------------------------------------------------


class LatentIndex:
    """An open index: its rows and embeddings in memory, its codes memory-mapped.

    Open one with ``open_index`` or make one with ``create_index``; ``add`` appends maps.

    Example::

        index = open_index("my_index", checkpoint_id=loaded.checkpoint_id)
        embedded = embed_maps(loaded, [read_map("query.map")])
        for hit in index.search(embedded.embeddings[0], k=5):
            print(hit.entry["name"], hit.distance)
    """

    def __init__(self, path: Path, manifest: dict, rows: list[dict], embeddings_ND: np.ndarray,
                 code_shards: list[np.ndarray]):
        self.path = Path(path)
        self.manifest = manifest
        self.rows = rows
        self.embeddings = embeddings_ND
        self._code_shards = code_shards
        self._shard_starts = np.cumsum([0] + [len(c) for c in code_shards])
        self._keys = {row["key"]: i for i, row in enumerate(rows)}
        self._search_texts: list[str] | None = None
        self._spacing: tuple[int, np.ndarray] | None = None  # (maps, spacing()) once computed

    # --- what it holds

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def layout(self) -> CodeLayout:
        return CodeLayout.from_dict(self.manifest["codes"])

    @property
    def checkpoint_id(self) -> str:
        return self.manifest["checkpoint"]["id"]

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding"]["dim"])

    @property
    def contract(self):
        from .checkpoint import InputContract

        return InputContract.from_dict(self.manifest["input"])

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def row_of(self, key: str) -> int | None:
        """The position of the map with this key, or None."""
        return self._keys.get(key)

    def codes_of(self, rows: Sequence[int]) -> np.ndarray:
        """(len(rows), per_map) uint16 codes, read from the shards."""
        rows = np.asarray(rows, int).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise LatentIndexError(f"Rows {rows.tolist()} outside this index of {len(self)} maps.")
        out = np.empty((len(rows), self.layout.per_map), CODE_DTYPE)
        shard_of = np.searchsorted(self._shard_starts, rows, side="right") - 1
        for i, (row, shard) in enumerate(zip(rows, shard_of)):
            out[i] = self._code_shards[shard][row - self._shard_starts[shard]]
        return out

    def codes(self, row: int) -> dict[str, list[np.ndarray]]:
        """One map's codes as ``model.decode_codes`` takes them: level → list of (1, s, s, s)."""
        return self.layout.unpack(self.codes_of([row]))

    # --- search

    def search(self, query_D: np.ndarray, k: int = 10, *, exclude: Sequence[int] | int | str = ()) -> list[Neighbour]:
        """The ``k`` maps nearest to an embedding, nearest first.

        ``exclude``: rows (or one row, or a key) to leave out, such as the query's own entry.
        """
        if isinstance(exclude, str):
            exclude = [self._keys[exclude]] if exclude in self._keys else []
        elif isinstance(exclude, (int, np.integer)):
            exclude = [int(exclude)]
        rows, distances = nearest(self.embeddings, query_D, k, exclude)
        return [Neighbour(int(r), float(d), self.rows[r]) for r, d in zip(rows, distances)]

    def spacing(self) -> np.ndarray:
        """Sorted distances from the index's maps (``SPACING_SAMPLE`` of them at most, drawn with
        a fixed seed) to their nearest map of another entry (another orientation of one entry is
        a copy, not a neighbour): how far apart the distinct maps of this index lie, the scale on
        which a query's distance says "a copy" or "nothing like it" (``isolation_note``)."""
        if self._spacing is not None and self._spacing[0] == len(self):
            return self._spacing[1]
        entries = np.array([str(row.get("entry_id") or f"row {i}") for i, row in enumerate(self.rows)])
        rows = np.arange(len(self))
        if len(rows) > SPACING_SAMPLE:
            rows = np.sort(np.random.default_rng(0).choice(rows, SPACING_SAMPLE, replace=False))
        found = [nearest(self.embeddings, self.embeddings[row], 1, np.flatnonzero(entries == entries[row]))[1]
                 for row in rows]
        spacing = np.sort(np.concatenate(found)) if found else np.zeros(0, np.float32)
        self._spacing = (len(self), spacing)
        return spacing

    def find(self, text: str, limit: int | None = None) -> list[int]:
        """Rows whose name, EMDB id, PDB id, entry id or file name contain ``text`` (any case;
        'emd_3197' finds 'EMD-3197'), in index order."""
        needle = _searchable(text)
        if not needle:
            return []
        if self._search_texts is None or len(self._search_texts) != len(self.rows):
            self._search_texts = [_row_text(row) for row in self.rows]  # once: typing stays fast
        found = [i for i, row_text in enumerate(self._search_texts) if needle in row_text]
        return found if limit is None else found[:limit]

    # --- adding

    def add(self, embeddings_ND: np.ndarray, codes_NC: np.ndarray, rows: list[dict]) -> None:
        """Append maps as one new shard, then commit it by rewriting the manifest.

        Raises:
            LatentIndexError: shapes that do not fit the index, a key already in it, rows that
                are not JSON, or another process that changed the index since it was opened.
        """
        embeddings_ND = np.asarray(embeddings_ND, np.float32)
        codes_NC = np.asarray(codes_NC)
        n = len(rows)
        if embeddings_ND.shape != (n, self.embedding_dim) or codes_NC.shape != (n, self.layout.per_map):
            raise LatentIndexError(
                f"{n} rows with embeddings {embeddings_ND.shape} and codes {codes_NC.shape}; this index "
                f"takes ({n}, {self.embedding_dim}) and ({n}, {self.layout.per_map}).")
        if not np.all(np.isfinite(embeddings_ND)):
            raise LatentIndexError("Some embeddings are NaN or infinite: the model failed on those maps.")
        if codes_NC.dtype != CODE_DTYPE:
            raise LatentIndexError(f"Codes must be {np.dtype(CODE_DTYPE).name} (CodeLayout.pack).")
        keys = [_checked_row(row) for row in rows]
        repeated = sorted({key for key in keys if key in self._keys} | _duplicates(keys))
        if repeated:
            raise LatentIndexError(f"Already in the index or given twice: {', '.join(repeated[:5])}.")
        if n == 0:
            return
        with _writer_lock(self.path):
            on_disk = _read_manifest(self.path)
            if on_disk["shards"] != self.manifest["shards"]:
                raise LatentIndexError(f"{self.path} was changed by another process since it was "
                                       "opened. Open it again, then add.")
            _remove_orphans(self.path, on_disk)
            name = f"{len(self.manifest['shards']):05d}"
            _write_shard(self.path, name, embeddings_ND, codes_NC, rows)
            manifest = {**self.manifest,
                        "shards": [*self.manifest["shards"], {"name": name, "count": n}],
                        "count": len(self) + n, "updated": _now()}
            _write_manifest(self.path, manifest)
        self.manifest = manifest
        self.rows = self.rows + list(rows)
        self.embeddings = np.concatenate([self.embeddings, embeddings_ND])
        self._code_shards.append(_load_array(self.path, name, "codes"))
        self._shard_starts = np.append(self._shard_starts, len(self))
        self._keys.update((key, len(self) - n + i) for i, key in enumerate(keys))


def create_index(path: str | os.PathLike, checkpoint, *, layout: CodeLayout, embedding_dim: int,
                 embedding_version: str, contour_level: float | None = None) -> LatentIndex:
    """A new, empty index for ``checkpoint`` (a ``LoadedCheckpoint``) in a new or empty folder,
    for embeddings of ``embedding_version`` (``Embedder.version``).

    A folder that holds only what an unfinished index leaves (shards no manifest lists, the
    lock) counts as empty; anything else is refused.
    """
    from .checkpoint import bundled_checkpoint_path

    path = Path(path)
    if (path / MANIFEST).exists():
        raise LatentIndexError(f"{path} already holds an index. Open it to add maps, or choose another folder.")
    check_index_folder(path)
    bundled = None
    for name in ("swan", "swan-rq1"):
        try:
            if Path(checkpoint.path).resolve() == bundled_checkpoint_path(name).resolve():
                bundled = name
        except ValueError:  # that bundled checkpoint is missing from this installation
            pass
    now = _now()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint": {"id": checkpoint.checkpoint_id, "file": Path(checkpoint.path).name,
                       "model": checkpoint.model.name, "bundled": bundled},
        "input": checkpoint.contract.to_dict(),
        "preprocessing": asdict(checkpoint.contract.settings(contour_level)),
        "embedding": {"version": embedding_version, "dim": int(embedding_dim)},
        "codes": layout.to_dict(),
        "count": 0,
        "shards": [],
        "created": now,
        "updated": now,
    }
    (path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    with _writer_lock(path):
        _remove_orphans(path, manifest)
        _write_manifest(path, manifest)
    return LatentIndex(path, manifest, [], np.zeros((0, int(embedding_dim)), np.float32), [])


def check_index_folder(path: str | os.PathLike) -> None:
    """Raise a LatentIndexError unless ``path`` holds an index or can hold a new one: missing,
    empty, or holding only what an unfinished build leaves."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LatentIndexError(f"{path} exists and is not a folder. Choose another folder for the index.")
    if path.is_dir() and not (path / MANIFEST).exists() and not _only_leftovers(path):
        raise LatentIndexError(f"{path} holds files but no index. Choose an empty or new folder.")


def open_index(path: str | os.PathLike, *, checkpoint_id: str | None = None,
               checkpoint_file: str | None = None, embedding_version: str | None = None) -> LatentIndex:
    """Read an index: its manifest, rows and embeddings; its codes are memory-mapped.

    Args:
        checkpoint_id: the checkpoint the caller will embed queries with; an index built with
            another is refused. None: not checked (reading and decoding need the index's own).
        checkpoint_file: that checkpoint's name, for the message.
        embedding_version: the caller's ``Embedder.version``; an index of another is refused.
            None: only the recipe is checked.

    Raises:
        LatentIndexError: not an index, a damaged or missing file, another format version, or
            another checkpoint or embedding version than the caller's (the message says which
            and how to rebuild).
    """
    path = Path(path)
    manifest = _read_manifest(path)
    check_signature(manifest, path, checkpoint_id=checkpoint_id, checkpoint_file=checkpoint_file,
                    embedding_version=embedding_version)
    rows, embeddings, codes = [], [], []
    dim, per_map = int(manifest["embedding"]["dim"]), int(manifest["codes"]["per_map"])
    for shard in manifest["shards"]:
        name, count = shard["name"], int(shard["count"])
        shard_rows = _load_rows(path, name)
        shard_embeddings = _load_array(path, name, "embeddings")
        shard_codes = _load_array(path, name, "codes")
        if (len(shard_rows), shard_embeddings.shape, shard_codes.shape, shard_codes.dtype) != \
                (count, (count, dim), (count, per_map), np.dtype(CODE_DTYPE)):
            raise LatentIndexError(
                f"{path / SHARDS_DIR}: shard {name} holds {len(shard_rows)} rows, embeddings "
                f"{shard_embeddings.shape} and codes {shard_codes.shape} {shard_codes.dtype}, but the "
                f"manifest says {count} maps of ({dim},) and ({per_map},) uint16. The index is damaged: "
                f"rebuild it with {BUILD_COMMAND}.")
        rows += shard_rows
        embeddings.append(np.asarray(shard_embeddings, np.float32))
        codes.append(shard_codes)
    embeddings_ND = np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)
    return LatentIndex(path, manifest, rows, embeddings_ND, codes)


def open_index_for(path: str | os.PathLike, checkpoint) -> LatentIndex:
    """``open_index`` for a caller that embeds with ``checkpoint`` (a ``LoadedCheckpoint``) and
    its own embedder: an index of another checkpoint or head is refused."""
    from .embedding import Embedder

    return open_index(path, checkpoint_id=checkpoint.checkpoint_id, checkpoint_file=Path(checkpoint.path).name,
                      embedding_version=Embedder.for_checkpoint(checkpoint).version)


def check_signature(manifest: dict, path: Path, *, checkpoint_id: str | None = None,
                    checkpoint_file: str | None = None, embedding_version: str | None = None) -> None:
    """Refuse an index whose embeddings this run cannot compare with its own: another embedding
    recipe, or (when given) another checkpoint or embedding version (another head)."""
    recorded = manifest["checkpoint"]
    differences = []
    if checkpoint_id is not None and recorded["id"] != checkpoint_id:
        differences.append(f"it was built with checkpoint {recorded['id']} ({recorded['file']}), this run "
                           f"uses {checkpoint_id}" + (f" ({checkpoint_file})" if checkpoint_file else ""))
    version = manifest["embedding"]["version"]
    expected = embedding_version or EMBEDDING_RECIPE
    if version != expected and not (embedding_version is None and version.split("+")[0] == EMBEDDING_RECIPE):
        differences.append(f"its embeddings are '{version}', this run makes '{expected}'")
    if differences:
        raise LatentIndexError(
            f"{path}: {'; '.join(differences)}. Distances between the two would mean nothing. Rebuild "
            f"the index for this checkpoint into a new folder: {BUILD_COMMAND}"
            + (f", or use the checkpoint it was built with ({recorded['file']})."
               if checkpoint_id is not None and recorded["id"] != checkpoint_id else "."))


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the index in ``path``, checked for format (not for signature)."""
    return _read_manifest(Path(path))


def bundled_index_path() -> Path:
    """The index shipped inside the package (``data/index``), or a LatentIndexError that says
    none ships and how to build one."""
    from importlib.resources import as_file, files

    with as_file(files(__package__) / "data" / "index") as folder:
        if not (Path(folder) / MANIFEST).is_file():
            raise LatentIndexError(
                "No latent index ships with this build of napari-cryoswan (there is no "
                f"{Path(folder)}). Build one: python -m training.build_index --corpus CORPUS "
                "--checkpoint bundled:swan --out my_index (or --maps FOLDER), then search it with "
                "python -m training.search my_index QUERY.map.")
        return Path(folder)


def delete_index(path: str | os.PathLike) -> None:
    """Remove an index folder's own files (manifest first, so a delete cut short leaves no
    half-index behind, only leftovers that ``create_index`` accepts), then the folder if empty."""
    path = Path(path)
    (path / MANIFEST).unlink(missing_ok=True)
    shards = path / SHARDS_DIR
    if shards.is_dir():
        for child in shards.iterdir():
            if _SHARD_FILE.match(child.name) or child.name.endswith(".tmp"):
                child.unlink()
        if not any(shards.iterdir()):
            shards.rmdir()
    (path / LOCK).unlink(missing_ok=True)
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


# --- files -------------------------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        hint = (" It holds shards but no manifest: its build was cut off before the first commit; "
                "run the build again." if (path / SHARDS_DIR).is_dir() else "")
        raise LatentIndexError(f"{path}: no {MANIFEST}, so this is not a latent index.{hint} "
                               f"Build one with {BUILD_COMMAND}.")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LatentIndexError(f"{file}: not valid JSON ({err}). The index is damaged: rebuild it "
                               f"with {BUILD_COMMAND}.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LatentIndexError(f"{file}: not a napari-cryoswan latent index (no '{FORMAT}' format tag).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LatentIndexError(
            f"{file}: index format version {manifest.get('format_version')!r}; this napari-cryoswan "
            f"reads version {FORMAT_VERSION}. Rebuild the index with this version ({BUILD_COMMAND}).")
    missing = [key for key in ("checkpoint", "input", "embedding", "codes", "shards", "count") if key not in manifest]
    if missing:
        raise LatentIndexError(f"{file}: the manifest lacks {', '.join(missing)}. Rebuild the index.")
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    write_json_atomic(path / MANIFEST, manifest)


def _shard_file(path: Path, name: str, what: str) -> Path:
    suffix = "rows.json" if what == "rows" else f"{what}.npy"
    return path / SHARDS_DIR / f"{name}.{suffix}"


def _write_shard(path: Path, name: str, embeddings_ND: np.ndarray, codes_NC: np.ndarray, rows: list[dict]) -> None:
    for what, array in (("embeddings", embeddings_ND), ("codes", codes_NC)):
        with atomic_path(_shard_file(path, name, what)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
    with atomic_path(_shard_file(path, name, "rows")) as tmp, open(tmp, "w") as fh:
        json.dump({"rows": rows}, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _load_array(path: Path, name: str, what: str) -> np.ndarray:
    file = _shard_file(path, name, what)
    try:
        # Codes are memory-mapped: 22 kB a map for the bundled model, read only when shown.
        return np.load(file, mmap_mode="r" if what == "codes" else None, allow_pickle=False)
    except FileNotFoundError:
        raise LatentIndexError(f"{file}: missing, but the index's manifest lists it. The index is "
                               f"damaged: restore the file or rebuild the index ({BUILD_COMMAND}).") from None
    except (ValueError, OSError, EOFError) as err:
        raise LatentIndexError(f"{file}: not a readable array ({err}). The index is damaged: "
                               f"rebuild it with {BUILD_COMMAND}.") from err


def _load_rows(path: Path, name: str) -> list[dict]:
    if not _SHARD_NAME.match(str(name)):  # a manifest must not point outside shards/
        raise LatentIndexError(f"{path}: its manifest names a shard {name!r}, not five digits. The index "
                               f"is damaged: rebuild it with {BUILD_COMMAND}.")
    file = _shard_file(path, name, "rows")
    try:
        rows = json.loads(file.read_text())["rows"]
    except FileNotFoundError:
        raise LatentIndexError(f"{file}: missing, but the index's manifest lists it. Restore it or "
                               f"rebuild the index ({BUILD_COMMAND}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise LatentIndexError(f"{file}: damaged metadata ({err}). Rebuild the index with {BUILD_COMMAND}.") from err
    incomplete = next((row for row in rows if not isinstance(row, dict) or not set(ROW_FIELDS) <= set(row)), None)
    if incomplete is not None:
        raise LatentIndexError(f"{file}: a row lacks fields of {ROW_FIELDS} ({str(incomplete)[:80]}). The index "
                               f"is damaged: rebuild it with {BUILD_COMMAND}.")
    return rows


def _remove_orphans(path: Path, manifest: dict) -> None:
    """Delete shard files that the manifest does not list: what a killed add left."""
    listed = {shard["name"] for shard in manifest["shards"]}
    folder = path / SHARDS_DIR
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        match = _SHARD_FILE.match(child.name)
        if (match and match.group(1) not in listed) or (child.name.startswith(".") and child.name.endswith(".tmp")):
            child.unlink(missing_ok=True)


def _only_leftovers(path: Path) -> bool:
    for child in path.iterdir():
        if child.name == LOCK or (child.name.startswith(f".{MANIFEST}.") and child.name.endswith(".tmp")):
            continue
        if child.name == PARTS_DIR and child.is_dir():
            continue
        if child.name == SHARDS_DIR and child.is_dir() and all(
                _SHARD_FILE.match(f.name) or f.name.endswith(".tmp") for f in child.iterdir()):
            continue
        return False
    return True


@contextmanager
def _writer_lock(path: Path):
    """One writer at a time. fcntl is POSIX: elsewhere the index is not locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LatentIndexError(f"{path} is being written by another process. Wait for it to "
                                   "finish, then try again.") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _checked_row(row: dict) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("key"), str) or not row["key"]:
        raise LatentIndexError(f"A row needs a non-empty 'key' (what identifies its map): {row!r}.")
    try:
        json.dumps(row, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise LatentIndexError(f"Row {row['key']}: not plain JSON ({err}).") from err
    return row["key"]


def _duplicates(keys: list[str]) -> set[str]:
    seen, repeated = set(), set()
    for key in keys:
        (repeated if key in seen else seen).add(key)
    return repeated


def _row_text(row: dict) -> str:
    """What ``find`` searches in a row, in one string (fields apart, so no match spans two)."""
    fields = (row.get("name"), row.get("emdb_id"), row.get("pdb_id"), row.get("entry_id"),
              Path(row["source"]).name if row.get("source") else None)
    return "\n".join(_searchable(f) for f in fields if f)


def _searchable(text) -> str:
    return str(text).lower().replace("_", "-").strip()


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
