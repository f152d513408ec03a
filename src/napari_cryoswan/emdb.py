"""EMDB: open an entry by its accession, and the HTTP client that the corpus curation shares.

The API, as this client uses it (both base URLs are settings, so a mirror or a test server works;
``NAPARI_CRYOSWAN_EMDB_API`` and ``NAPARI_CRYOSWAN_EMDB_FILES`` override them for ``fetch_entry``):

- entry: ``{api}/entry/EMD-1234`` gives the entry's JSON: ``admin`` (``title``),
  ``structure_determination_list``, ``map`` (``file``, ``contour_list``, ``pixel_spacing``,
  ``dimensions``) and ``sample`` (molecular weights).
- map: ``{files}/structures/EMD-1234/map/emd_1234.map.gz``.

Every request waits for the rate limit; failures that may pass (timeouts, dropped connections,
429, 5xx, a truncated or corrupt download) are retried with exponential backoff (``Retry-After``
is honoured). A download is verified before it is kept: its length against ``Content-Length``,
its MD5 against ``Content-MD5`` when the server sends one, and the gzip stream's own CRC. It is
written under a temporary name and renamed into place, so no partial file is ever left under a
map's name.

``fetch_entry`` keeps maps in a user cache folder (``NAPARI_CRYOSWAN_CACHE`` overrides it); an
entry found there opens without the network. Delete its folder to fetch it again.
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
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._atomic import atomic_path
from .engine import Cancelled

logger = logging.getLogger(__name__)

API_URL = "https://www.ebi.ac.uk/emdb/api"
FILES_URL = "https://ftp.ebi.ac.uk/pub/databases/emdb"
CACHE_ENV = "NAPARI_CRYOSWAN_CACHE"
API_ENV = "NAPARI_CRYOSWAN_EMDB_API"
FILES_ENV = "NAPARI_CRYOSWAN_EMDB_FILES"
ENTRY_RECORD = "entry.json"
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_MASS_UNITS_KDA = {"mda": 1000.0, "kda": 1.0, "da": 0.001}
_USER_AGENT = "napari-cryoswan (python urllib)"
_BLOCK = 1 << 18
# "EMD-1234", "emd_1234", "EMD1234", "emdb:1234", "emdb:EMD-1234" (ChimeraX's form), or "1234".
_ACCESSION = re.compile(r"^(?:emdb:\s*)?(?:emd[-_]?)?(\d{1,6})$", re.IGNORECASE)

Progress = Callable[[int, int], None]
StopCheck = Callable[[], bool]


class EmdbError(RuntimeError):
    """A request or download that failed for good. The message says which and why."""


class HttpStatusError(EmdbError):
    """The server answered with an HTTP error that retrying will not change (404, 403…)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class EntryNotFound(EmdbError):
    """EMDB has no released entry with this accession."""


class _Retryable(Exception):
    """A failure that may pass: worth another try after a pause.

    ``kind`` words the final message: "unreachable", "timeout", "dropped", "corrupt", "server".
    """

    def __init__(self, message: str, kind: str = "server", retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


@dataclass(frozen=True)
class EmdbServer:
    """Where to ask, and how politely and patiently.

    ``timeout`` is per network operation (connecting, or waiting for the next bytes), so a
    server that stalls mid-download fails after it instead of hanging.
    """

    api_url: str = API_URL
    files_url: str = FILES_URL
    requests_per_second: float = 2.0
    retries: int = 2
    backoff: float = 1.0  # seconds before the first retry; doubled for each next one
    timeout: float = 30.0

    @classmethod
    def from_environment(cls, **changes) -> EmdbServer:
        """The default server, or the one ``NAPARI_CRYOSWAN_EMDB_API``/``_FILES`` name."""
        urls = {"api_url": os.environ.get(API_ENV) or API_URL,
                "files_url": os.environ.get(FILES_ENV) or FILES_URL}
        return cls(**{key: value.rstrip("/") for key, value in urls.items()}, **changes)


@dataclass
class EntryMetadata:
    """What the plugin and the corpus need from an entry (geometry in z, y, x)."""

    emdb_id: str
    method: str | None
    resolution: float | None
    contour: float | None  # the recommended (primary) contour level
    pixel_size: tuple[float, float, float] | None
    mass_kda: float | None
    map_file: str
    dimensions: tuple[int, int, int] | None = field(default=None)  # col, row, sec
    title: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EmdbMap:
    """An entry's primary map on disk, with the entry's facts a viewer shows."""

    accession: str
    path: Path
    meta: EntryMetadata
    url: str
    from_cache: bool = False

    def layer_metadata(self) -> dict:
        """The entry's facts for ``layer.metadata`` (the iso-surface reads the contour level)."""
        return {"emdb_id": self.accession, "emdb_title": self.meta.title,
                "recommended_contour": self.meta.contour,
                "resolution_angstrom": self.meta.resolution, "source_url": self.url}

    def describe(self) -> str:
        parts = [self.accession]
        if self.meta.title:
            parts.append(self.meta.title)
        if self.meta.resolution is not None:
            parts.append(f"{self.meta.resolution:g} Å")
        if self.meta.contour is not None:
            parts.append(f"recommended contour {self.meta.contour:g}")
        return ", ".join(parts)


# --- Accessions -----------------------------------------------------------------------------------


def accession_or_none(text: str) -> str | None:
    """'EMD-1234' for any way of writing an EMDB accession, or None for other text.

    A bare number counts only with 4 to 6 digits, so '12' stays a file name.
    """
    match = _ACCESSION.match(str(text).strip())
    if not match:
        return None
    digits = match.group(1)
    prefixed = not str(text).strip().isdigit()
    if not prefixed and len(digits) < 4:
        return None
    return f"EMD-{int(digits):04d}"


def parse_accession(text: str) -> str:
    """Like ``accession_or_none``, but text that is not an accession raises ValueError."""
    accession = accession_or_none(text)
    if accession is None:
        raise ValueError(f"'{text}' is not an EMDB accession. Type one like EMD-1234, 1234 or "
                         "emdb:1234.")
    return accession


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
    """GETs from the EMDB API and file server, rate-limited, retried, verified.

    ``settings`` is an ``EmdbServer``, or anything with its fields (the curation's settings).
    """

    def __init__(self, settings: EmdbServer | None = None):
        self.settings = settings or EmdbServer()
        self._limiter = RateLimiter(self.settings.requests_per_second)

    def entry(self, emdb_id: str, should_stop: StopCheck | None = None) -> dict:
        return self.get_json(f"{self.settings.api_url}/entry/{emdb_id}", should_stop)

    def map_url(self, meta: EntryMetadata) -> str:
        return f"{self.settings.files_url}/structures/{meta.emdb_id}/map/{meta.map_file}"

    def get_json(self, url: str, should_stop: StopCheck | None = None):
        def fetch():
            with self._open(url) as response:
                body = response.read()
            try:
                return json.loads(body)
            except json.JSONDecodeError as err:
                raise _Retryable(f"the response is not JSON ({err})") from err

        return self._with_retries(fetch, url, should_stop)

    def download(self, url: str, dest: Path, check: Callable[[Path], None] = lambda path: None,
                 progress: Progress | None = None, should_stop: StopCheck | None = None) -> dict:
        """Fetch ``url`` into ``dest``, verified, atomically; returns {"bytes", "sha256"}.

        ``check`` may add a test of the file, once it is complete and in place: a ValueError from
        it counts as a corrupt download (the file is removed and fetched again), an ``EmdbError``
        as final (the file is removed). ``progress(done_bytes, total_bytes)`` is called as
        blocks arrive (total 0 when the server does not say); ``should_stop()`` is checked
        between blocks and raises ``engine.Cancelled``. ``dest`` never holds a partial file: a
        failed transfer leaves it as it was, and a file that fails ``check`` is removed.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def fetch():
            with atomic_path(dest) as tmp:
                facts = self._stream_to(url, Path(tmp), progress, should_stop)
                try:
                    _verify_gzip(Path(tmp))
                except (OSError, EOFError, zlib.error) as err:
                    raise _Retryable(f"the download is corrupt ({err})", "corrupt") from err
            # Complete and intact: checked under its own name, whose suffix says how to read it.
            try:
                check(dest)
            except BaseException as err:
                dest.unlink(missing_ok=True)
                if isinstance(err, (ValueError, OSError, EOFError)):
                    raise _Retryable(f"the download is corrupt ({err})", "corrupt") from err
                raise
            return facts

        return self._with_retries(fetch, url, should_stop)

    def _stream_to(self, url: str, path: Path, progress: Progress | None,
                   should_stop: StopCheck | None) -> dict:
        sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
        with self._open(url) as response, open(path, "wb") as fh:
            expected_size = response.headers.get("Content-Length")
            expected_md5 = response.headers.get("Content-MD5")
            total = int(expected_size) if expected_size else 0
            if progress:
                progress(0, total)
            try:
                for block in iter(lambda: response.read(_BLOCK), b""):
                    if should_stop and should_stop():
                        raise Cancelled()
                    fh.write(block)
                    sha256.update(block)
                    md5.update(block)
                    size += len(block)
                    if progress:
                        progress(size, total)
            except (ConnectionError, http.client.HTTPException) as err:
                raise _Retryable(f"the connection dropped after {size:,} bytes ({err})",
                                 "dropped") from err
        if expected_size is not None and int(expected_size) != size:
            raise _Retryable(f"the download was cut short: {size:,} bytes arrived of the "
                             f"{int(expected_size):,} announced", "corrupt")
        if expected_md5 and base64.b64encode(md5.digest()).decode() != expected_md5.strip():
            raise _Retryable("the download is corrupt: its MD5 differs from the server's "
                             "Content-MD5", "corrupt")
        return {"bytes": size, "sha256": sha256.hexdigest()}

    def _open(self, url: str):
        self._limiter.wait()
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        try:
            return urllib.request.urlopen(request, timeout=self.settings.timeout)
        except urllib.error.HTTPError as err:
            if err.code in _RETRY_STATUS:
                raise _Retryable(f"HTTP {err.code} {err.reason}", "server",
                                 _retry_after(err.headers)) from err
            raise HttpStatusError(f"{url}: HTTP {err.code} {err.reason}.", err.code) from err
        except (urllib.error.URLError, TimeoutError, ConnectionError,
                http.client.HTTPException) as err:
            raise _network_failure(err) from err

    def _with_retries(self, action, url: str, should_stop: StopCheck | None = None):
        attempt = 0
        while True:
            if should_stop and should_stop():
                raise Cancelled()
            try:
                return action()
            except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
                failure = _network_failure(err)  # raised while reading
            except _Retryable as err:
                failure = err
            if attempt == self.settings.retries:
                raise EmdbError(_final_message(url, failure, attempt + 1, self.settings.timeout))
            pause = failure.retry_after or self.settings.backoff * 2**attempt
            logger.warning("%s: %s; retrying in %.1f s", url, failure, pause)
            _pause(pause, should_stop)
            attempt += 1


def _network_failure(err: BaseException) -> _Retryable:
    reason = getattr(err, "reason", err)
    if isinstance(err, TimeoutError) or isinstance(reason, TimeoutError):
        return _Retryable(f"no answer ({reason})", "timeout")
    if isinstance(err, urllib.error.URLError):
        return _Retryable(str(reason), "unreachable")
    return _Retryable(f"{type(err).__name__}: {err}", "dropped")


def _final_message(url: str, failure: _Retryable, tries: int, timeout: float) -> str:
    host = urllib.parse.urlsplit(url).netloc or url
    tries = f"{tries} {'try' if tries == 1 else 'tries'}"
    if failure.kind == "unreachable":
        return (f"{url}: cannot reach {host} ({failure}; {tries}). Check the network "
                "connection (or proxy settings), then try again.")
    if failure.kind == "timeout":
        return (f"{url}: {host} did not answer within {timeout:g} s ({tries}). The server "
                "is busy or stalled: try again later.")
    if failure.kind in ("dropped", "corrupt"):
        what = "download" if failure.kind == "corrupt" else "transfer"
        return (f"{url}: the {what} failed ({tries}); last: {failure}. Nothing was kept: "
                "try again later.")
    return f"{url}: failed ({tries}); last: {failure}. Try again later."


def _pause(seconds: float, should_stop: StopCheck | None) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if should_stop and should_stop():
            raise Cancelled()
        time.sleep(min(left, 0.1))


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers else None
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _verify_gzip(path: Path) -> None:
    """Read a gzip file to its end: Python checks the stream's CRC-32 and length there."""
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            return  # not gzipped: read_header's own checks apply
    with gzip.open(path, "rb") as fh:
        while fh.read(1 << 22):
            pass


# --- Entry metadata -------------------------------------------------------------------------------


def entry_metadata(entry: dict) -> EntryMetadata:
    """The fields the plugin and the curation need, from an entry's JSON (missing ones None)."""
    emdb_id = entry["emdb_id"]
    determination = _first(_get(entry, "structure_determination_list", "structure_determination")) or {}
    the_map = entry.get("map") or {}
    number = emdb_id.split("-")[-1]
    title = _get(entry, "admin", "title")
    return EntryMetadata(
        emdb_id=emdb_id,
        method=determination.get("method"),
        resolution=_resolution(determination),
        contour=_primary_contour(the_map),
        pixel_size=_pixel_size(the_map),
        mass_kda=_mass_kda(entry.get("sample") or {}),
        map_file=the_map.get("file") or f"emd_{number}.map.gz",
        dimensions=_dimensions(the_map),
        title=str(title).strip() if title else None,
    )


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


# --- Opening an entry -----------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where fetched maps live: ``$NAPARI_CRYOSWAN_CACHE``, else the user's cache folder."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # platformdirs comes with napari; the core does not need napari
        return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "napari-cryoswan"
    return Path(user_cache_dir("napari-cryoswan", appauthor=False))


def fetch_entry(
    accession: str,
    *,
    server: EmdbServer | None = None,
    cache: str | os.PathLike | None = None,
    progress: Progress | None = None,
    should_stop: StopCheck | None = None,
) -> EmdbMap:
    """The primary map of an EMDB entry, downloaded once into the cache, verified.

    ``accession`` may be written 'EMD-1234', 'emd_1234', '1234' or 'emdb:1234'. The map must be
    readable by ``io.read_header``, with the entry's dimensions. ``progress(done_bytes,
    total_bytes)`` follows the download; ``should_stop()`` cancels it (``engine.Cancelled``).

    Raises:
        ValueError: the text is not an accession.
        EntryNotFound: EMDB has no such entry.
        EmdbError: the network, the server or the download failed; the message says which.
    """
    from .io import DEFAULT_MAX_VOXELS

    accession = parse_accession(accession)
    folder = Path(cache) if cache is not None else cache_dir()
    folder = folder / "emdb" / accession
    cached = _cached(folder, accession)
    if cached is not None:
        return cached
    server = server or EmdbServer.from_environment()
    client = EmdbClient(server)
    try:
        entry = client.entry(accession, should_stop)
    except HttpStatusError as err:
        if err.status in (404, 410):
            raise EntryNotFound(
                f"{accession}: EMDB has no released entry with this accession (the server "
                f"answered HTTP {err.status}). Check it; accessions look like EMD-1234.") from err
        raise EmdbError(f"{accession}: {err}") from err
    except EmdbError as err:
        raise EmdbError(f"{accession}: {err}") from err
    try:
        meta = entry_metadata(entry)
    except (KeyError, TypeError, AttributeError) as err:
        raise EmdbError(f"{accession}: the EMDB entry could not be understood ({err!r}).") from err
    n_voxels = math.prod(meta.dimensions or ())
    if n_voxels > DEFAULT_MAX_VOXELS:
        raise EmdbError(f"{accession}: the map has {n_voxels:,} voxels, more than the "
                        f"{DEFAULT_MAX_VOXELS:,} this plugin opens. Download it yourself and bin "
                        "it first (e.g. ChimeraX 'volume resample').")
    url = client.map_url(meta)
    path = folder / Path(meta.map_file).name
    try:
        facts = client.download(url, path, lambda p: _check_map(p, meta), progress, should_stop)
    except HttpStatusError as err:
        raise EmdbError(f"{accession}: EMDB lists the entry, but its map file {url} is missing "
                        f"(HTTP {err.status}).") from err
    except EmdbError as err:
        raise EmdbError(f"{accession}: {err}") from err
    record = {"accession": accession, "file": path.name, "url": url, **facts,
              "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "meta": meta.to_dict()}
    with atomic_path(folder / ENTRY_RECORD) as tmp, open(tmp, "w") as fh:
        json.dump(record, fh, indent=1)
    return EmdbMap(accession, path, meta, url)


def _cached(folder: Path, accession: str) -> EmdbMap | None:
    """The entry's map from the cache, if a complete one is there (its size as recorded)."""
    try:
        record = json.loads((folder / ENTRY_RECORD).read_text())
        path = folder / record["file"]
        if path.stat().st_size != record["bytes"]:
            return None
        fields = dict(record["meta"])
        for key in ("pixel_size", "dimensions"):
            fields[key] = tuple(fields[key]) if fields.get(key) else None
        meta = EntryMetadata(**fields)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return EmdbMap(accession, path, meta, record.get("url", ""), from_cache=True)


def _check_map(path: Path, meta: EntryMetadata) -> None:
    """The download must be a map that ``io.read_header`` accepts, with the entry's dimensions.

    The transfer was verified before this runs, so a refusal here is final, not retried.
    """
    import warnings

    from .io import MapReadError, read_header

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warnings are shown when the map is opened
            header = read_header(path)
    except MapReadError as err:
        raise EmdbError(f"the file EMDB serves is not a map this plugin reads: {err}") from err
    if meta.dimensions and sorted(header["shape_zyx"]) != sorted(meta.dimensions):
        raise EmdbError(f"the map EMDB serves is {header['shape_zyx']} voxels, but the entry says "
                        f"{meta.dimensions}.")

