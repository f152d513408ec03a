"""Curate density maps from the EMDB REST API, as the paper did for ProteinNet3D.

The client (rate limit, retries, verified atomic downloads) and the entry parser are the plugin's
own, ``napari_cryoswan.emdb``; this module adds the search, the filters and the resumable state.
The API, as the curation uses it (both base URLs are settings, so a mirror or a test server works):

- search: ``{api}/search/{Solr query}?rows=100&page=P&wt=json&fl=emdb_id`` gives a JSON list of
  documents (a Solr ``{"response": {"docs": [...]}}`` body is read too). ``page`` counts from 1;
  the server returns at most 100 rows a page.
- entry: ``{api}/entry/EMD-1234`` gives the entry's JSON: ``structure_determination_list``,
  ``map`` (``file``, ``contour_list``, ``pixel_spacing``, ``dimensions``) and ``sample``
  (molecular weights).
- map: ``{files}/structures/EMD-1234/map/emd_1234.map.gz``.

``curate`` keeps single-particle and subtomogram-averaging entries of 100–1500 kDa that have a
recommended contour level, and downloads their maps. Every request waits for the rate limit;
failures that may pass (timeouts, 429, 5xx, a corrupt download) are retried with exponential
backoff (``Retry-After`` is honoured). A download is verified before it is kept: its length
against ``Content-Length``, its MD5 against ``Content-MD5`` when the server sends one, the gzip
stream's own CRC, and ``read_map`` must accept it with the entry's dimensions. Progress lives in
``emdb_state.jsonl`` (one line appended and synced per entry), so an interrupted curation resumes
where it stopped without fetching a finished map again; entries that failed are tried again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from napari_cryoswan.emdb import (  # noqa: F401 (re-exported for the curation's callers)
    EmdbClient,
    EmdbError,
    EmdbServer,
    EntryMetadata,
    RateLimiter,
    entry_metadata,
)
from training.corpus import CorpusError, append_journal, read_journal

logger = logging.getLogger(__name__)

STATE_FILE = "emdb_state.jsonl"
CURATED_CSV = "emdb_maps.csv"
METHODS = ("singleParticle", "subtomogramAveraging")
DEFAULT_QUERY = (
    'current_status:"REL" AND (structure_determination_method:"singleParticle" '
    'OR structure_determination_method:"subtomogramAveraging")'
)


@dataclass(frozen=True)
class EmdbSettings(EmdbServer):
    """Where to ask, what to keep, and how politely to ask (a curation is patient)."""

    retries: int = 4
    backoff: float = 2.0  # seconds before the first retry; doubled for each next one
    timeout: float = 60.0
    query: str = DEFAULT_QUERY
    methods: tuple[str, ...] = METHODS
    min_kda: float = 100.0
    max_kda: float = 1500.0
    limit: int | None = None  # stop once this many maps are kept
    page_size: int = 100
    max_voxels: int = 1024**3  # larger maps are skipped before download (read_map's limit)

    def filters(self) -> dict:
        """The settings that decide which entries are kept: a resumed curation must keep them."""
        return {"api_url": self.api_url, "files_url": self.files_url, "query": self.query,
                "methods": list(self.methods), "min_kda": self.min_kda, "max_kda": self.max_kda,
                "max_voxels": self.max_voxels}


def search_ids(client: EmdbClient, settings: EmdbSettings) -> list[str]:
    """Every EMDB id that the search query matches, page by page."""
    ids: dict[str, None] = {}  # ordered and fast to test
    page = 1
    while True:
        params = {"rows": settings.page_size, "page": page, "wt": "json", "fl": "emdb_id"}
        url = (f"{settings.api_url}/search/{urllib.parse.quote(settings.query, safe='')}"
               f"?{urllib.parse.urlencode(params)}")
        docs = _search_docs(client.get_json(url))
        fresh = [d["emdb_id"] for d in docs if d.get("emdb_id") and d["emdb_id"] not in ids]
        ids.update(dict.fromkeys(fresh))
        if len(docs) < settings.page_size or not fresh:
            return list(ids)
        page += 1


def _search_docs(body) -> list[dict]:
    if isinstance(body, list):
        return body
    if isinstance(body, dict) and isinstance(body.get("response"), dict):
        return body["response"].get("docs", [])
    raise EmdbError(f"Unexpected search response: {str(body)[:200]}")


def rejection(meta: EntryMetadata, settings: EmdbSettings) -> str | None:
    """Why an entry is not kept, or None when it is."""
    if (meta.method or "").lower() not in {m.lower() for m in settings.methods}:
        return f"method {meta.method!r} is not one of {', '.join(settings.methods)}"
    if meta.mass_kda is None:
        return "the entry gives no molecular weight"
    if not settings.min_kda <= meta.mass_kda <= settings.max_kda:
        return f"{meta.mass_kda:.0f} kDa is outside {settings.min_kda:g}–{settings.max_kda:g} kDa"
    if meta.contour is None:
        return "the entry gives no recommended contour level"
    if meta.dimensions and math.prod(meta.dimensions) > settings.max_voxels:
        return f"the map has {math.prod(meta.dimensions):,} voxels, over the limit of {settings.max_voxels:,}"
    return None


# --- Curation -------------------------------------------------------------------------------------


class CurationState:
    """``emdb_state.jsonl``: a first line with the filters and the candidates the search found,
    then one line per curated entry, appended and synced as each finishes (a later line for an
    id replaces an earlier one). Appending keeps a curation of 30,000 entries cheap to record."""

    def __init__(self, folder: Path, settings: EmdbSettings):
        self.path = folder / STATE_FILE
        self.filters = settings.filters()
        self.candidates: list[str] | None = None
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            records = read_journal(self.path)
        except (CorpusError, json.JSONDecodeError) as err:
            raise EmdbError(f"{self.path}: {err} Delete it to start the curation again.") from err
        if not records:
            return  # killed while the search's line was being written
        if records[0].get("filters") != self.filters:
            raise EmdbError(
                f"{self.path} was written by a curation with other filters ({records[0].get('filters')}). "
                "Use the same settings to resume, another --emdb-dir, or delete the state file.")
        self.candidates = records[0]["candidates"]
        self.entries = {r["emdb_id"]: r for r in records[1:]}

    def start(self, candidates: list[str]) -> None:
        self.candidates = candidates
        append_journal(self.path, {"filters": self.filters, "candidates": candidates})

    def record(self, emdb_id: str, outcome: dict) -> None:
        self.entries[emdb_id] = {"emdb_id": emdb_id, **outcome}
        append_journal(self.path, self.entries[emdb_id])

    def finished(self, emdb_id: str, maps_dir: Path) -> bool:
        """Kept with its verified map still on disk, or rejected for good (failures are retried)."""
        record = self.entries.get(emdb_id)
        if record is None:
            return False
        if record["status"] == "rejected":
            return True
        if record["status"] == "kept":
            path = maps_dir / record["file"]
            return path.is_file() and path.stat().st_size == record["bytes"]
        return False

    def kept(self) -> list[dict]:
        return [r for r in self.entries.values() if r["status"] == "kept"]


def curate(
    folder: str | os.PathLike,
    settings: EmdbSettings = EmdbSettings(),
    client: EmdbClient | None = None,
    show_progress: bool = True,
) -> list[dict]:
    """Search, filter and download EMDB maps into ``folder/maps``, resumably.

    Returns the kept entries (``emdb_id``, ``file``, ``contour``, ``resolution``, ``mass_kda``,
    ``pixel_size``, ``method``, ``url``), also written to ``folder/emdb_maps.csv``, which
    ``--maps-csv`` reads.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    maps_dir = folder / "maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    for leftover in maps_dir.glob(".*.tmp"):  # downloads cut off by a kill
        leftover.unlink(missing_ok=True)
    client = client or EmdbClient(settings)
    state = CurationState(folder, settings)
    if state.candidates is None:
        state.start(search_ids(client, settings))
    bar = tqdm(state.candidates, desc="EMDB entries", unit="entry", disable=not show_progress)
    for emdb_id in bar:
        if settings.limit is not None and len(state.kept()) >= settings.limit:
            break
        if not state.finished(emdb_id, maps_dir):
            state.record(emdb_id, _curate_entry(client, emdb_id, maps_dir, settings))
        bar.set_postfix(kept=len(state.kept()), refresh=False)
    bar.close()
    kept = state.kept()
    _write_csv(folder / CURATED_CSV, kept)
    return kept


def _curate_entry(client: EmdbClient, emdb_id: str, maps_dir: Path, settings: EmdbSettings) -> dict:
    try:
        meta = entry_metadata(client.entry(emdb_id))
    except (EmdbError, KeyError) as err:
        return {"status": "failed", "reason": f"metadata: {err}"}
    reason = rejection(meta, settings)
    if reason:
        return {"status": "rejected", "reason": reason, **meta.to_dict()}
    url = client.map_url(meta)
    try:
        facts = client.download(url, maps_dir / meta.map_file, check=lambda p: _check_map(p, meta))
    except EmdbError as err:
        logger.warning("%s: %s", emdb_id, err)
        return {"status": "failed", "reason": str(err), **meta.to_dict()}
    return {"status": "kept", "file": meta.map_file, "url": url, **facts, **meta.to_dict()}


def _check_map(path: Path, meta: EntryMetadata) -> None:
    """``read_map`` must accept the file, with the entry's dimensions."""
    import warnings

    from napari_cryoswan.io import read_header, read_map

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing voxel size is taken from the entry later
        header = read_header(path)
        read_map(path)
    if meta.dimensions and sorted(header["shape_zyx"]) != sorted(meta.dimensions):
        raise ValueError(f"the map is {header['shape_zyx']} voxels, the entry says {meta.dimensions}")


def _write_csv(path: Path, kept: list[dict]) -> None:
    import csv

    columns = ["emdb_id", "file", "contour", "resolution", "mass_kda", "pixel_size", "method", "url"]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for record in sorted(kept, key=lambda r: r["emdb_id"]):
            row = dict(record)
            row["pixel_size"] = " ".join(map(str, record["pixel_size"])) if record.get("pixel_size") else ""
            writer.writerow(row)
    os.replace(tmp, path)
