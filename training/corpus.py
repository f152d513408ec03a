"""The training-corpus format: how ``training.build_corpus`` writes it and how training reads it.

A corpus is a folder::

    manifest.json   what is in it: settings, the split, one record per sample (below)
    maps/           one 64³ float32 map per sample at 4 Å, z-scored, as MRC (opens in napari,
                    ChimeraX and every cryo-EM tool; 1 MiB each)
    journal.jsonl   the build's log, one line per finished entry: what makes a build resumable

A sample record holds ``sample_id``, ``file``, ``entry_id`` (the map, structure, sub-assembly
or mesh that was rotated), ``parent_id`` (the structure a sub-assembly was cut from, else the
entry itself), ``group`` (the unit of the split), ``source_kind``, ``source`` and
``source_sha256`` (the input file), ``rotation_index``, ``mass_kda`` (None when unknown),
``resolution``, ``preprocessing`` (the ``PreprocessRecord``, rotation matrix included),
``sha256`` (of the map's float32 data) and ``split``.

The split (0.8/0.1/0.1 by default) is made by group with a fixed seed, so the rotated copies of
one map, and the sub-assemblies of one complex, never span two splits. Entries named like PDB
chains (``1ahsA``) join the group of their PDB entry (``1AHS``). The split is stratified by group
size (``assign_splits``), so every split gets its share of the groups and a like mix of small
entries and large families of sub-assemblies.

``corpus_id`` is a hash of the manifest without paths and timestamps: the same inputs, settings
and library builds give the same id, and any change of content or split gives a new one (another
numpy or SciPy build may change the maps' last bits, and with them the id: docs/CORPUS.md).
Checkpoints carry it as provenance.

``Corpus`` is the reader. It needs numpy and mrcfile only (no torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from itertools import zip_longest
from pathlib import Path

import numpy as np

from napari_cryoswan._atomic import atomic_path, write_json_atomic

FORMAT = "cryoswan-corpus"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
MAPS_DIR = "maps"
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
_PDB_CHAIN_ENTRY = re.compile(r"^([0-9][A-Za-z0-9]{3})[A-Za-z0-9]{1,4}$")


class CorpusError(ValueError):
    """A corpus folder that cannot be read or written as asked. The message says what to do."""


class Corpus:
    """Read a built corpus.

    Example::

        corpus = Corpus("corpus/")
        train = corpus.split_indices("train")
        for ids, volumes in corpus.batches("train", batch_size=16, seed=0):
            ...  # volumes: (16, 64, 64, 64) float32

    Args:
        path: the corpus folder.
        cache: keep every map read in memory (1 MiB each), for runs of many epochs.
    """

    def __init__(self, path: str | os.PathLike, cache: bool = False):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = (" Its build did not finish: run the same build_corpus command again to resume it."
                    if (self.path / JOURNAL).is_file() else "")
            raise CorpusError(f"{self.path}: no {MANIFEST}, so this is not a built corpus.{hint}")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise CorpusError(f"{manifest_path}: not valid JSON ({err}). Rebuild the corpus.") from err
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise CorpusError(
                f"{manifest_path}: format {self.manifest.get('format')!r} version "
                f"{self.manifest.get('format_version')!r}; this reader knows {FORMAT!r} version "
                f"{FORMAT_VERSION}. Rebuild the corpus with this version of training.build_corpus."
            )
        self.samples: list[dict] = self.manifest["samples"]
        self.box = int(self.manifest["box"])
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    @property
    def corpus_id(self) -> str:
        return self.manifest["corpus_id"]

    @property
    def voxel_size(self) -> float:
        return float(self.manifest["voxel_size"])

    def __len__(self) -> int:
        return len(self.samples)

    def split_indices(self, split: str) -> np.ndarray:
        """Indices (into ``samples``) of one split, in manifest order."""
        if split not in SPLITS:
            raise CorpusError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
        return np.array([i for i, s in enumerate(self.samples) if s["split"] == split], dtype=int)

    def load(self, index: int) -> np.ndarray:
        """One sample as a (64, 64, 64) float32 array, (z, y, x)."""
        from napari_cryoswan.io import read_map

        index = int(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        path = self.path / self.samples[index]["file"]
        data = read_map(path).data
        if data.shape != (self.box,) * 3:
            raise CorpusError(f"{path}: shape {data.shape}, but the corpus holds {self.box}³ maps. "
                              "The file was changed after the build; rebuild the corpus.")
        if self._cache is not None:
            self._cache[index] = data
        return data

    def load_batch(self, indices: Sequence[int]) -> np.ndarray:
        """Samples stacked as a (B, 64, 64, 64) float32 array."""
        if not len(indices):
            return np.zeros((0,) + (self.box,) * 3, np.float32)
        return np.stack([self.load(i) for i in indices])

    def batches(
        self, split: str, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch of (indices, volumes) batches over a split; the order depends on ``seed`` only."""
        ids = self.split_indices(split)
        if shuffle:
            ids = np.random.default_rng(seed).permutation(ids)
        for start in range(0, len(ids), batch_size):
            part = ids[start:start + batch_size]
            if drop_last and len(part) < batch_size:
                break
            yield part, self.load_batch(part)

    def verify(self) -> list[str]:
        """Problems found by re-reading every map and checking its hash; empty when all is well."""
        problems = []
        for i, sample in enumerate(self.samples):
            try:
                digest = data_sha256(self.load(i))
            except (OSError, ValueError) as err:
                problems.append(f"{sample['sample_id']}: {err}")
                continue
            if digest != sample["sha256"]:
                problems.append(f"{sample['sample_id']}: the data does not match its hash in the manifest.")
        return problems


class CorpusSet:
    """Several corpora read as one (proteins and shapes, say): their samples one after the other.

    They must hold maps of one geometry (box and voxel size), since one model learns them all.
    Indices run over the corpora in the order given; ``corpus_id`` names the combination.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], cache: bool = False):
        if not paths:
            raise CorpusError("No corpus given.")
        self.corpora = [Corpus(path, cache) for path in paths]
        first = self.corpora[0]
        for other in self.corpora[1:]:
            if (other.box, other.voxel_size) != (first.box, first.voxel_size):
                raise CorpusError(
                    f"{other.path} holds {other.box}³ maps at {other.voxel_size:g} Å and {first.path} "
                    f"{first.box}³ at {first.voxel_size:g} Å: one model cannot learn both. Build "
                    "them with the same --box and --voxel-size.")
        self.box, self.voxel_size = first.box, first.voxel_size
        self._starts = np.cumsum([0] + [len(c) for c in self.corpora])
        self.samples: list[dict] = [sample for c in self.corpora for sample in c.samples]

    @property
    def corpus_id(self) -> str:
        if len(self.corpora) == 1:
            return self.corpora[0].corpus_id
        joined = "+".join(c.corpus_id for c in self.corpora)
        return hashlib.sha256(joined.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def split_indices(self, split: str) -> np.ndarray:
        return np.concatenate([c.split_indices(split) + start for c, start in zip(self.corpora, self._starts)])

    def interleaved_indices(self, split: str, count: int) -> np.ndarray:
        """Up to ``count`` indices of a split, taken from each corpus in turn, so that a small
        validation pass sees every corpus."""
        per_corpus = [list(c.split_indices(split) + start) for c, start in zip(self.corpora, self._starts)]
        taken = [i for group in zip_longest(*per_corpus) for i in group if i is not None]
        return np.array(taken[:count], dtype=int)

    def load(self, index: int) -> np.ndarray:
        which = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.corpora[which].load(int(index) - int(self._starts[which]))

    def load_batch(self, indices: Sequence[int]) -> np.ndarray:
        if not len(indices):
            return np.zeros((0,) + (self.box,) * 3, np.float32)
        return np.stack([self.load(i) for i in indices])


# --- Writing ------------------------------------------------------------------------------------


def data_sha256(data: np.ndarray) -> str:
    """Hash of a map's values (float32, C order): independent of the file header."""
    return hashlib.sha256(np.ascontiguousarray(data, dtype=np.float32).tobytes()).hexdigest()


def group_of(entry_id: str) -> str:
    """The split group of an entry: PDB-chain names (``1ahsA``) join their PDB entry (``1AHS``)."""
    match = _PDB_CHAIN_ENTRY.match(entry_id)
    return match.group(1).upper() if match else entry_id


def assign_splits(
    group_sizes: dict[str, int], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, str]:
    """Give every group one split: stratified by group size, random within a stratum.

    Groups are sorted by their number of samples, largest first (equal sizes in an order shuffled
    by ``seed``), and dealt in blocks: for 0.8/0.1/0.1 a block of 10 groups sends a random 8 to
    train, 1 to val and 1 to test. So each split gets ``fractions`` of the groups, with the same
    mix of small entries and large families of sub-assemblies, and so close to ``fractions`` of
    the samples. The last, partial block gives every split its first group before any split gets
    another, so a corpus of three groups still has one in each split. Deterministic for the same
    groups, sizes and seed.
    """
    pattern = _block_pattern(fractions)
    rng = np.random.default_rng(seed)
    shuffled = [str(g) for g in rng.permutation(sorted(group_sizes))]
    ordered = sorted(shuffled, key=lambda g: -group_sizes[g])  # stable: ties stay shuffled
    assigned = {}
    for start in range(0, len(ordered), len(pattern)):
        block = ordered[start:start + len(pattern)]
        if len(block) == len(pattern):
            labels = rng.permutation(pattern)
        else:
            block, labels = list(rng.permutation(block)), _fill_order(pattern, fractions)
        for group, split in zip(block, labels):
            assigned[str(group)] = SPLITS[split]
    return assigned


def _fill_order(pattern: np.ndarray, fractions: Sequence[float]) -> list[int]:
    """The block's slots in the order a partial block takes them: always the split that has used
    the smallest part of its slots (the larger split first on a tie, so train is never empty)."""
    slots = np.bincount(pattern, minlength=len(SPLITS))
    used = np.zeros(len(SPLITS))
    order = []
    for _ in range(len(pattern)):
        progress = [used[k] / slots[k] if used[k] < slots[k] else np.inf for k in range(len(SPLITS))]
        split = min(range(len(SPLITS)), key=lambda k: (progress[k], -fractions[k], k))
        order.append(split)
        used[split] += 1
    return order


def _block_pattern(fractions: Sequence[float]) -> np.ndarray:
    """The split of each slot in the smallest block that holds ``fractions`` exactly (≤ 100)."""
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (len(SPLITS),) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise CorpusError(f"Split fractions must be {len(SPLITS)} non-negative numbers summing to 1; "
                          f"got {fractions.tolist()}.")
    exact = [n for n in range(1, 101) if np.allclose(fractions * n, np.round(fractions * n), atol=1e-6)]
    size = exact[0] if exact else 100
    slots = fractions * size
    counts = np.floor(slots + 1e-6).astype(int)
    counts[np.argsort(counts - slots)[: size - counts.sum()]] += 1  # largest remainders
    return np.repeat(np.arange(len(SPLITS)), counts)


def compute_corpus_id(manifest: dict) -> str:
    """sha256 of the manifest's content, less paths and timestamps (see the module docstring)."""
    portable = {
        key: value for key, value in manifest.items()
        if key not in ("corpus_id", "created", "build", "skipped")
    }
    portable["samples"] = [
        {k: v for k, v in sample.items() if k != "source"} for sample in manifest["samples"]
    ]
    text = json.dumps(portable, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CorpusWriter:
    """Builds a corpus folder entry by entry, resumably.

    Each finished entry is appended to ``journal.jsonl`` (flushed and synced), after its maps are
    written. Opening a folder that holds a journal resumes it: finished entries are skipped, and
    maps that no journal line names (left by an entry cut off mid-way) are removed. ``finish``
    deals the split and writes ``manifest.json`` atomically.

    Args:
        path: the corpus folder; created if missing.
        box, voxel_size: the corpus geometry; a resumed corpus must have the same.
        overwrite: delete an existing corpus in ``path`` first (only a corpus: a folder holding
            anything else is refused).
    """

    def __init__(self, path: str | os.PathLike, box: int, voxel_size: float, overwrite: bool = False):
        self.path = Path(path)
        self.box, self.voxel_size = int(box), float(voxel_size)
        self.entries: dict[str, dict] = {}
        self.sources: dict[str, dict] = {}
        if self.path.exists():
            self._open_existing(overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MAPS_DIR).mkdir(exist_ok=True)
        if not (self.path / JOURNAL).exists():
            self._append({"type": "corpus", "format": FORMAT, "format_version": FORMAT_VERSION,
                          "box": self.box, "voxel_size": self.voxel_size})

    @property
    def maps_dir(self) -> Path:
        return self.path / MAPS_DIR

    @property
    def resumed_entries(self) -> int:
        return len(self.entries)

    def use_source(self, kind: str, settings: dict) -> None:
        """Declare the settings of one source kind; a resumed build must use the same ones."""
        settings = json.loads(json.dumps(settings))  # as the journal will hold them
        previous = self.sources.get(kind)
        if previous is not None and previous != settings:
            changed = ", ".join(f"{k} {previous.get(k)!r} then, {settings.get(k)!r} now"
                                for k in sorted(set(previous) | set(settings))
                                if previous.get(k) != settings.get(k))
            raise CorpusError(
                f"{self.path} was built with other {kind} settings ({changed}). Use the same "
                "settings to resume, another folder, or --overwrite to start again."
            )
        if previous is None:
            self.sources[kind] = settings
            self._append({"type": "source", "kind": kind, "settings": settings})

    def is_done(self, key: str) -> bool:
        return key in self.entries

    def add_entry(self, entry: dict) -> None:
        """Record a finished entry: ``key``, ``status`` ('done' or 'skipped'), ``samples``."""
        if entry["key"] in self.entries:
            raise CorpusError(f"Entry {entry['key']!r} was built twice; entry keys must be unique.")
        self.entries[entry["key"]] = entry
        self._append({"type": "entry", **entry})

    def finish(self, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS, build: dict | None = None,
               fixed_splits: dict[str, str] | None = None) -> dict:
        """Deal the split, write ``manifest.json`` atomically, and return the manifest.

        Groups in ``fixed_splits`` keep the split given there; the others are dealt."""
        samples = sorted(
            (dict(s) for e in self.entries.values() if e["status"] == "done" for s in e["samples"]),
            key=lambda s: s["sample_id"],
        )
        sizes: dict[str, int] = {}
        for sample in samples:
            sizes[sample["group"]] = sizes.get(sample["group"], 0) + 1
        fixed = {g: s for g, s in (fixed_splits or {}).items() if g in sizes}
        split_of = {**assign_splits({g: n for g, n in sizes.items() if g not in fixed}, fractions, seed), **fixed}
        for sample in samples:
            sample["split"] = split_of[sample["group"]]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "box": self.box,
            "voxel_size": self.voxel_size,
            "split": {
                "seed": seed,
                "fractions": dict(zip(SPLITS, map(float, fractions))),
                "by": "group",
                "samples": {s: sum(x["split"] == s for x in samples) for s in SPLITS},
                "groups": {s: sum(v == s for v in split_of.values()) for s in SPLITS},
                **({"fixed_groups": len(fixed)} if fixed else {}),  # absent otherwise: ids stay as they were
            },
            "sources": self.sources,
            "samples": samples,
            "skipped": [{"key": e["key"], "source": e.get("source"), "reason": e["reason"]}
                        for e in self.entries.values() if e["status"] == "skipped"],
            "created": _now(),
            "build": build or {},
        }
        manifest["corpus_id"] = compute_corpus_id(manifest)
        write_json_atomic(self.path / MANIFEST, manifest)
        return manifest

    def _open_existing(self, overwrite: bool) -> None:
        is_corpus = (self.path / JOURNAL).exists() or (self.path / MANIFEST).exists()
        if not self.path.is_dir():
            raise CorpusError(f"{self.path} exists and is not a folder. Choose another --out.")
        if not is_corpus and any(self.path.iterdir()):
            raise CorpusError(f"{self.path} holds files but no corpus. Choose an empty or new folder.")
        if overwrite and is_corpus:
            self._delete_corpus()
        elif is_corpus:
            self._resume()

    def _delete_corpus(self) -> None:
        # The journal goes last: a delete cut short still leaves a corpus that resumes.
        (self.path / MANIFEST).unlink(missing_ok=True)
        if self.maps_dir.is_dir():
            for child in self.maps_dir.iterdir():
                child.unlink()
            self.maps_dir.rmdir()
        (self.path / JOURNAL).unlink()

    def _resume(self) -> None:
        journal = self.path / JOURNAL
        if not journal.exists():
            raise CorpusError(f"{self.path} holds a finished corpus without its build journal, so it "
                              "cannot be extended. Use --overwrite to rebuild it, or another folder.")
        for record in read_journal(journal):
            if record["type"] == "corpus":
                if (record["box"], record["voxel_size"]) != (self.box, self.voxel_size):
                    raise CorpusError(
                        f"{self.path} holds {record['box']}³ maps at {record['voxel_size']} Å, not "
                        f"{self.box}³ at {self.voxel_size} Å. Use another folder or --overwrite.")
            elif record["type"] == "source":
                self.sources[record["kind"]] = record["settings"]
            elif record["type"] == "entry":
                entry = {k: v for k, v in record.items() if k != "type"}
                self.entries[entry["key"]] = entry
        self._forget_incomplete_entries()
        self._remove_orphans()

    def _forget_incomplete_entries(self) -> None:
        """Entries whose maps are not all on disk any more are built again."""
        for key, entry in list(self.entries.items()):
            if not all((self.path / s["file"]).is_file() for s in entry.get("samples", [])):
                del self.entries[key]

    def _remove_orphans(self) -> None:
        if not self.maps_dir.is_dir():
            return
        known = {Path(s["file"]).name for e in self.entries.values() for s in e.get("samples", [])}
        for child in self.maps_dir.iterdir():
            if child.name not in known:
                child.unlink()

    def _append(self, record: dict) -> None:
        append_journal(self.path / JOURNAL, record)


def append_journal(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and sync it to disk: a record survives a kill right after."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_journal(path: Path) -> list[dict]:
    """The journal's records. A last line cut short (the build was killed while writing it) is
    dropped from the file, so its entry is built again and later lines start clean."""
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise CorpusError(f"{path}: line {number + 1} is corrupt. Rebuild with --overwrite.") from None
            lines = lines[:-1]
    if text and (len(lines) < len(text.splitlines()) or not text.endswith("\n")):
        _rewrite_lines(path, lines)
    return records


def _rewrite_lines(path: Path, lines: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write("".join(line + "\n" for line in lines))


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
