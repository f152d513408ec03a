"""Curate density maps from the EMDB REST API, as the paper did for ProteinNet3D.

The API, as this client uses it (both base URLs are settings, so a mirror or a test server works):

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

import base64
import gzip
import hashlib
import http.client
import json
import logging
import math
import os
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from training.corpus import CorpusError, append_journal, read_journal

logger = logging.getLogger(__name__)

STATE_FILE = "emdb_state.jsonl"
CURATED_CSV = "emdb_maps.csv"
METHODS = ("singleParticle", "subtomogramAveraging")
DEFAULT_QUERY = (
    'current_status:"REL" AND (structure_determination_method:"singleParticle" '
    'OR structure_determination_method:"subtomogramAveraging")'
)
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_MASS_UNITS_KDA = {"mda": 1000.0, "kda": 1.0, "da": 0.001}
_USER_AGENT = "napari-cryoswan corpus builder (python urllib)"


class EmdbError(RuntimeError):
    """A request or download that failed for good. The message says which and why."""


class _Retryable(Exception):
    """A failure that may pass: worth another try after a pause."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class EmdbSettings:
    """Where to ask, what to keep, and how politely to ask."""

    api_url: str = "https://www.ebi.ac.uk/emdb/api"
    files_url: str = "https://ftp.ebi.ac.uk/pub/databases/emdb"
    query: str = DEFAULT_QUERY
    methods: tuple[str, ...] = METHODS
    min_kda: float = 100.0
    max_kda: float = 1500.0
    limit: int | None = None  # stop once this many maps are kept
    requests_per_second: float = 2.0
    retries: int = 4
    backoff: float = 2.0  # seconds before the first retry; doubled for each next one
    timeout: float = 60.0
    page_size: int = 100
    max_voxels: int = 1024**3  # larger maps are skipped before download (read_map's limit)

    def filters(self) -> dict:
        """The settings that decide which entries are kept: a resumed curation must keep them."""
        return {"api_url": self.api_url, "files_url": self.files_url, "query": self.query,
                "methods": list(self.methods), "min_kda": self.min_kda, "max_kda": self.max_kda,
                "max_voxels": self.max_voxels}


@dataclass
class EntryMetadata:
    """What the corpus needs from an entry (geometry in z, y, x)."""

    emdb_id: str
    method: str | None
    resolution: float | None
    contour: float | None
    pixel_size: tuple[float, float, float] | None
    mass_kda: float | None
    map_file: str
    dimensions: tuple[int, int, int] | None = field(default=None)  # col, row, sec

    def to_dict(self) -> dict:
        return asdict(self)


# --- HTTP -----------------------------------------------------------------------------------------


class RateLimiter:
    """Spaces calls at least ``1 / per_second`` apart (thread-safe); 0 means no limit."""

    def __init__(self, per_second: float, clock=time.monotonic, sleep=time.sleep):
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._sleep(self._next - now)
                now = self._clock()  # sleep can overshoot: count from when the call really goes
            self._next = now + self.interval


class EmdbClient:
    """GETs from the EMDB API and file server, rate-limited, retried, verified."""

    def __init__(self, settings: EmdbSettings = EmdbSettings()):
        self.settings = settings
        self._limiter = RateLimiter(settings.requests_per_second)

    def search_ids(self) -> list[str]:
        """Every EMDB id that the search query matches, page by page."""
        ids: dict[str, None] = {}  # ordered and fast to test
        page = 1
        while True:
            params = {"rows": self.settings.page_size, "page": page, "wt": "json", "fl": "emdb_id"}
            url = (f"{self.settings.api_url}/search/{urllib.parse.quote(self.settings.query, safe='')}"
                   f"?{urllib.parse.urlencode(params)}")
            docs = _search_docs(self.get_json(url))
            fresh = [d["emdb_id"] for d in docs if d.get("emdb_id") and d["emdb_id"] not in ids]
            ids.update(dict.fromkeys(fresh))
            if len(docs) < self.settings.page_size or not fresh:
                return list(ids)
            page += 1

    def entry(self, emdb_id: str) -> dict:
        return self.get_json(f"{self.settings.api_url}/entry/{emdb_id}")

    def map_url(self, meta: EntryMetadata) -> str:
        return f"{self.settings.files_url}/structures/{meta.emdb_id}/map/{meta.map_file}"

    def get_json(self, url: str):
        def fetch():
            with self._open(url) as response:
                body = response.read()
            try:
                return json.loads(body)
            except json.JSONDecodeError as err:
                raise _Retryable(f"the response is not JSON ({err})") from err

        return self._with_retries(fetch, url)

    def download(self, url: str, dest: Path, check: Callable[[Path], None] = lambda path: None) -> dict:
        """Fetch ``url`` into ``dest`` (atomically), verified; ``check`` may add a test of the file
        (raising ValueError). Returns {"bytes", "sha256"}."""
        partial = dest.parent / "partial" / dest.name
        partial.parent.mkdir(parents=True, exist_ok=True)

        def fetch():
            try:
                facts = self._stream_to(url, partial)
                _verify_gzip(partial)
                check(partial)
            except (ConnectionError, TimeoutError, http.client.HTTPException, _Retryable, EmdbError):
                partial.unlink(missing_ok=True)
                raise  # the transfer failed, not the file: _with_retries decides
            except (ValueError, OSError, EOFError, zlib.error) as err:
                partial.unlink(missing_ok=True)
                raise _Retryable(f"the download is corrupt ({err})") from err
            os.replace(partial, dest)
            return facts

        return self._with_retries(fetch, url)

    def _stream_to(self, url: str, path: Path) -> dict:
        sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
        with self._open(url) as response, open(path, "wb") as fh:
            expected_size = response.headers.get("Content-Length")
            expected_md5 = response.headers.get("Content-MD5")
            for block in iter(lambda: response.read(1 << 20), b""):
                fh.write(block)
                sha256.update(block)
                md5.update(block)
                size += len(block)
        if expected_size is not None and int(expected_size) != size:
            raise ValueError(f"{size:,} bytes arrived of the {int(expected_size):,} announced")
        if expected_md5 and base64.b64encode(md5.digest()).decode() != expected_md5.strip():
            raise ValueError("its MD5 differs from the server's Content-MD5")
        return {"bytes": size, "sha256": sha256.hexdigest()}

    def _open(self, url: str):
        self._limiter.wait()
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        try:
            return urllib.request.urlopen(request, timeout=self.settings.timeout)
        except urllib.error.HTTPError as err:
            if err.code in _RETRY_STATUS:
                raise _Retryable(f"HTTP {err.code} {err.reason}", _retry_after(err.headers)) from err
            raise EmdbError(f"{url}: HTTP {err.code} {err.reason}.") from err
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            raise _Retryable(f"{type(err).__name__}: {err}") from err

    def _with_retries(self, action, url: str):
        attempt = 0
        while True:
            try:
                return action()
            except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
                failure = _Retryable(f"{type(err).__name__}: {err}")  # raised while reading
            except _Retryable as err:
                failure = err
            if attempt == self.settings.retries:
                raise EmdbError(f"{url}: failed {attempt + 1} times; last: {failure}.")
            pause = failure.retry_after or self.settings.backoff * 2**attempt
            logger.warning("%s: %s; retrying in %.1f s", url, failure, pause)
            time.sleep(pause)
            attempt += 1


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers else None
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _search_docs(body) -> list[dict]:
    if isinstance(body, list):
        return body
    if isinstance(body, dict) and isinstance(body.get("response"), dict):
        return body["response"].get("docs", [])
    raise EmdbError(f"Unexpected search response: {str(body)[:200]}")


def _verify_gzip(path: Path) -> None:
    """Read a gzip file to its end: Python checks the stream's CRC-32 and length there."""
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            return  # not gzipped: read_map's own checks apply
    with gzip.open(path, "rb") as fh:
        while fh.read(1 << 22):
            pass


# --- Entry metadata -------------------------------------------------------------------------------


def entry_metadata(entry: dict) -> EntryMetadata:
    """The fields the curation needs, from an entry's JSON (missing ones are None)."""
    emdb_id = entry["emdb_id"]
    determination = _first(_get(entry, "structure_determination_list", "structure_determination")) or {}
    the_map = entry.get("map") or {}
    number = emdb_id.split("-")[-1]
    return EntryMetadata(
        emdb_id=emdb_id,
        method=determination.get("method"),
        resolution=_resolution(determination),
        contour=_primary_contour(the_map),
        pixel_size=_pixel_size(the_map),
        mass_kda=_mass_kda(entry.get("sample") or {}),
        map_file=the_map.get("file") or f"emd_{number}.map.gz",
        dimensions=_dimensions(the_map),
    )


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


def _get(tree, *keys):
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _first(value):
    items = _as_list(value)
    return items[0] if items else None


def _float(value) -> float | None:
    if isinstance(value, dict):
        value = value.get("valueOf_")
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _resolution(determination: dict) -> float | None:
    for processing in _as_list(determination.get("image_processing")):
        value = _float(_get(processing, "final_reconstruction", "resolution"))
        if value is not None:
            return value
    return None


def _primary_contour(the_map: dict) -> float | None:
    contours = _as_list(_get(the_map, "contour_list", "contour"))
    primary = [c for c in contours if c.get("primary") in (True, "true", "True")]
    chosen = (primary or contours or [None])[0]
    return _float(chosen.get("level")) if chosen else None


def _pixel_size(the_map: dict) -> tuple[float, float, float] | None:
    spacing = the_map.get("pixel_spacing") or {}
    values = [_float(spacing.get(axis)) for axis in ("z", "y", "x")]
    return tuple(values) if all(v and v > 0 for v in values) else None


def _dimensions(the_map: dict) -> tuple[int, int, int] | None:
    dims = the_map.get("dimensions") or {}
    try:
        return tuple(int(dims[k]) for k in ("col", "row", "sec"))
    except (KeyError, TypeError, ValueError):
        return None


def _weight_kda(weight) -> float | None:
    """A ``molecular_weight`` block in kDa: experimental if given, else theoretical."""
    for kind in ("experimental", "theoretical"):
        block = _get(weight, kind)
        value = _float(block)
        if value is not None:
            unit = (block.get("units") if isinstance(block, dict) else None) or "MDa"
            factor = _MASS_UNITS_KDA.get(unit.lower())
            return value * factor if factor else None
    return None


def _mass_kda(sample: dict) -> float | None:
    """The whole sample's weight: its root supramolecule's, else its macromolecules' sum."""
    supramolecules = _as_list(_get(sample, "supramolecule_list", "supramolecule"))
    roots = [s for s in supramolecules if str(s.get("parent", "0")) == "0"] or supramolecules[:1]
    for root in roots:
        mass = _weight_kda(root.get("molecular_weight"))
        if mass is not None:
            return mass
    total, found = 0.0, False
    for molecule in _as_list(_get(sample, "macromolecule_list", "macromolecule")):
        mass = _weight_kda(molecule.get("molecular_weight"))
        if mass is not None:
            copies = _float(molecule.get("number_of_copies")) or 1.0
            total, found = total + mass * copies, True
    return total if found else None


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
    shutil.rmtree(maps_dir / "partial", ignore_errors=True)  # downloads cut off by a kill
    client = client or EmdbClient(settings)
    state = CurationState(folder, settings)
    if state.candidates is None:
        state.start(client.search_ids())
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
