"""The EMDB client, opening one entry, and the curation, against a real HTTP server on
127.0.0.1 that answers like EMDB (and misbehaves as servers do)."""

import base64
import csv
import gzip
import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from napari_cryoswan.io import write_map
from training.corpus import Corpus
from training.emdb import (
    CurationState,
    EmdbError,
    EmdbSettings,
    RateLimiter,
    _search_docs,
    curate,
    entry_metadata,
    rejection,
)

REPO = Path(__file__).resolve().parents[1]


def emdb_entry(emdb_id, method, mass=None, mass_units="MDa", contour=0.2, pixel=6.0, box=16,
               macromolecules=None):
    """An entry as the EMDB API serves it (the fields the curation reads, in their real places)."""
    number = emdb_id.split("-")[1]
    sample = {"name": {"valueOf_": "test complex"}}
    if mass is not None:
        sample["supramolecule_list"] = {"supramolecule": [{
            "supramolecule_id": 1, "parent": 0,
            "molecular_weight": {"theoretical": {"valueOf_": mass, "units": mass_units}}}]}
    if macromolecules:
        sample["macromolecule_list"] = {"macromolecule": macromolecules}
    return {
        "emdb_id": emdb_id,
        "admin": {"title": f"test entry {emdb_id}"},
        "structure_determination_list": {"structure_determination": [{
            "method": method,
            "image_processing": [{"final_reconstruction": {"resolution": {"valueOf_": "4.2", "units": "Å"}}}],
        }]},
        "map": {
            "file": f"emd_{number}.map.gz",
            "contour_list": {"contour": [{"level": contour / 2, "primary": False},
                                         {"level": str(contour), "primary": True, "source": "AUTHOR"}]},
            "pixel_spacing": {a: {"valueOf_": pixel, "units": "Å"} for a in "xyz"},
            "dimensions": {"col": box, "row": box, "sec": box},
        },
        "sample": sample,
    }


def gz_map_bytes(tmp_path, seed: int, box=16, pixel=6.0) -> bytes:
    """A small gzipped MRC with a blob in it, written by our own writer."""
    rng = np.random.default_rng(seed)
    grid = np.indices((box,) * 3) - (box - 1) / 2 - rng.uniform(-1, 1, 3)[:, None, None, None]
    data = np.exp(-(grid**2).sum(axis=0) / (2 * 2.5**2)).astype(np.float32)
    path = write_map(tmp_path / f"source_{seed}.mrc.gz", data, pixel)
    return path.read_bytes()


ENTRIES = {
    "EMD-1001": dict(method="singleParticle", mass=0.5),
    "EMD-1002": dict(method="helical", mass=0.5),
    "EMD-1003": dict(method="subtomogramAveraging", mass=300, mass_units="kDa"),
    "EMD-1004": dict(method="singleParticle", mass=0.05),
    "EMD-1005": dict(method="singleParticle", mass=2.0),
    "EMD-1006": dict(method="singleParticle", mass=0.8),
    "EMD-1007": dict(method="singleParticle", mass=0.4),
    "EMD-1008": dict(method="singleParticle", macromolecules=[
        {"molecular_weight": {"theoretical": {"valueOf_": "0.06", "units": "MDa"}}, "number_of_copies": "4"}]),
}
KEEPABLE = {"EMD-1001", "EMD-1003", "EMD-1006", "EMD-1008"}
ALWAYS = 10**9  # misbehave on every request


class FakeEmdb:
    """Serves /api/search, /api/entry and /files/structures/…/map/…, and logs every request.

    ``fail_first``: paths answered 503 the first time; ``corrupt_first`` / ``always_corrupt``:
    map paths whose bytes are damaged (same length, so only a checksum can tell); ``no_md5``:
    map paths served without Content-MD5 (as EMDB's file server does), so only the gzip CRC
    can tell; ``map_delay``: seconds each map response takes. Misbehaviour, each a dict of
    path → how many requests it hits (``ALWAYS`` for every one): ``drop`` closes the connection
    without an answer, ``truncate`` sends half the announced bytes and closes, ``stall`` sends
    half and then goes silent until the server closes.
    """

    def __init__(self, tmp_path, entries=ENTRIES):
        self.entries = {i: emdb_entry(i, **kw) for i, kw in entries.items()}
        self.listed = sorted(self.entries)  # what the search finds
        self.maps = {f"/files/structures/{i}/map/emd_{i[4:]}.map.gz": gz_map_bytes(tmp_path, n)
                     for n, i in enumerate(entries)}
        self.fail_first, self.corrupt_first, self.always_corrupt, self.no_md5 = set(), set(), set(), set()
        self.map_delay = 0.0
        self.drop, self.truncate, self.stall = {}, {}, {}
        self.log: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self.release = threading.Event()  # ends every stall
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def requests_to(self, path: str) -> int:
        return sum(1 for _, p in self.log if p == path)

    def map_path(self, emdb_id: str) -> str:
        return f"/files/structures/{emdb_id}/map/emd_{emdb_id[4:]}.map.gz"

    def _respond(self, handler):
        parsed = urllib.parse.urlparse(handler.path)
        with self._lock:
            seen_before = self.requests_to(parsed.path)
            self.log.append((time.monotonic(), parsed.path))
        if parsed.path in self.fail_first and not seen_before:
            return _send(handler, 503, b"busy", {"Retry-After": "0"})
        if seen_before < self.drop.get(parsed.path, 0):
            handler.close_connection = True
            return None  # nothing at all: the client sees the connection close
        if seen_before < self.truncate.get(parsed.path, 0) or seen_before < self.stall.get(parsed.path, 0):
            body = self.maps.get(parsed.path) or b"x" * 4096
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            if seen_before < self.stall.get(parsed.path, 0):
                self.release.wait(60)
            handler.close_connection = True
            return None
        if parsed.path.startswith("/api/search/"):
            query = urllib.parse.parse_qs(parsed.query)
            rows, page = int(query["rows"][0]), int(query["page"][0])
            ids = self.listed[(page - 1) * rows: page * rows]
            return _send(handler, 200, json.dumps([{"emdb_id": i} for i in ids]).encode())
        if parsed.path.startswith("/api/entry/"):
            entry = self.entries.get(parsed.path.rsplit("/", 1)[1])
            return _send(handler, 200, json.dumps(entry).encode()) if entry else _send(handler, 404, b"")
        if parsed.path in self.maps:
            time.sleep(self.map_delay)
            body = self.maps[parsed.path]
            headers = {"Content-Type": "application/octet-stream"}
            if parsed.path not in self.no_md5:
                headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
            if parsed.path in self.always_corrupt or (parsed.path in self.corrupt_first and not seen_before):
                middle = len(body) // 2
                body = body[:middle] + bytes(b ^ 0xFF for b in body[middle:middle + 64]) + body[middle + 64:]
            return _send(handler, 200, body, headers)
        return _send(handler, 404, b"")

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake._respond(self)

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _send(handler, status, body, headers=None):
    handler.send_response(status)
    for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def fake_emdb(tmp_path):
    server = FakeEmdb(tmp_path)
    yield server
    server.close()


def settings_for(server, **changes):
    defaults = dict(api_url=f"{server.url}/api", files_url=f"{server.url}/files", page_size=3,
                    requests_per_second=40.0, retries=2, backoff=0.01, timeout=10)
    return EmdbSettings(**{**defaults, **changes})


def test_entry_metadata_reads_the_emdb_fields():
    meta = entry_metadata(emdb_entry("EMD-1234", "singleParticle", mass=0.75, contour=0.03, pixel=1.1, box=320))
    assert (meta.method, meta.resolution, meta.contour) == ("singleParticle", 4.2, 0.03)  # the primary one
    assert meta.pixel_size == (1.1, 1.1, 1.1) and meta.dimensions == (320, 320, 320)
    assert meta.mass_kda == pytest.approx(750.0)
    assert meta.map_file == "emd_1234.map.gz"
    summed = entry_metadata(emdb_entry("EMD-1", "singleParticle",
                                       macromolecules=ENTRIES["EMD-1008"]["macromolecules"]))
    assert summed.mass_kda == pytest.approx(240.0)  # 4 copies of 60 kDa
    assert _search_docs({"response": {"docs": [{"emdb_id": "EMD-1"}]}}) == [{"emdb_id": "EMD-1"}]


def test_rejection_reasons():
    settings = EmdbSettings()
    def reason(**kw):
        return rejection(entry_metadata(emdb_entry("EMD-9", **kw)), settings)
    assert reason(method="singleParticle", mass=0.5) is None
    assert "method" in reason(method="tomography", mass=0.5)
    assert "outside" in reason(method="singleParticle", mass=1.6)
    assert "no molecular weight" in reason(method="singleParticle")


def test_curation_filters_retries_verifies_and_respects_the_rate_limit(fake_emdb, tmp_path, monkeypatch):
    search_page_1 = "/api/search/" + urllib.parse.quote(EmdbSettings().query, safe="")
    fake_emdb.fail_first.add(search_page_1)
    fake_emdb.corrupt_first.add(fake_emdb.map_path("EMD-1006"))
    fake_emdb.always_corrupt.add(fake_emdb.map_path("EMD-1007"))
    fake_emdb.no_md5.add(fake_emdb.map_path("EMD-1007"))  # caught by the gzip CRC instead
    settings = settings_for(fake_emdb)
    released = []  # the limiter's clock reading at each call it let go
    real_wait = RateLimiter.wait

    def recorded_wait(limiter):
        real_wait(limiter)
        released.append(limiter._next - limiter.interval)

    monkeypatch.setattr(RateLimiter, "wait", recorded_wait)

    kept = curate(tmp_path / "dl", settings, show_progress=False)

    assert {r["emdb_id"] for r in kept} == KEEPABLE
    state = CurationState(tmp_path / "dl", settings).entries
    assert {i for i, r in state.items() if r["status"] == "rejected"} == {"EMD-1002", "EMD-1004", "EMD-1005"}
    assert state["EMD-1007"]["status"] == "failed" and "corrupt" in state["EMD-1007"]["reason"]
    # Rejected entries cost no download; a corrupt one is fetched again, a hopeless one given up.
    for emdb_id in ("EMD-1002", "EMD-1004", "EMD-1005"):
        assert fake_emdb.requests_to(fake_emdb.map_path(emdb_id)) == 0
    assert fake_emdb.requests_to(fake_emdb.map_path("EMD-1006")) == 2
    assert fake_emdb.requests_to(fake_emdb.map_path("EMD-1007")) == settings.retries + 1
    assert fake_emdb.requests_to(search_page_1) == 4  # 8 ids at 3 a page, after one 503
    # Each kept map is on disk, byte-identical to what the server holds, and listed in the CSV.
    for record in kept:
        path = tmp_path / "dl" / "maps" / record["file"]
        assert path.read_bytes() == fake_emdb.maps[fake_emdb.map_path(record["emdb_id"])]
        gzip.decompress(path.read_bytes())
    with open(tmp_path / "dl" / "emdb_maps.csv") as fh:
        rows = {r["emdb_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == KEEPABLE and float(rows["EMD-1001"]["contour"]) == pytest.approx(0.2)
    assert not list((tmp_path / "dl" / "maps").glob(".*.tmp"))  # no partial download left
    # The rate limit: every request the server saw went through the limiter, which let them go at
    # least 1/rate apart; and the server saw them arrive over nearly (n - 1)/rate. (Times taken
    # outside the limiter carry scheduling jitter of a few ms on a busy machine: the limiter's
    # own clock readings do not.)
    interval = 1 / settings.requests_per_second
    assert len(released) == len(fake_emdb.log)
    assert np.diff(released).min() >= interval - 1e-9
    arrivals = sorted(t for t, _ in fake_emdb.log)
    assert arrivals[-1] - arrivals[0] >= 0.9 * (len(arrivals) - 1) * interval


def test_rate_limiter_spaces_calls():
    now = [0.0]
    slept = []
    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=lambda s: (slept.append(s), now.__setitem__(0, now[0] + s)))
    for _ in range(3):
        limiter.wait()
    assert slept == [0.25, 0.25]
    now[0] += 10.0
    limiter.wait()
    assert slept == [0.25, 0.25]  # no wait after a long pause


def test_missing_entry_fails_without_retries(fake_emdb, tmp_path):
    fake_emdb.entries.pop("EMD-1003")
    settings = settings_for(fake_emdb)
    curate(tmp_path / "dl", settings, show_progress=False)
    state = CurationState(tmp_path / "dl", settings).entries
    assert state["EMD-1003"]["status"] == "failed" and "404" in state["EMD-1003"]["reason"]
    assert fake_emdb.requests_to("/api/entry/EMD-1003") == 1


def test_other_filters_refuse_to_resume(fake_emdb, tmp_path):
    curate(tmp_path / "dl", settings_for(fake_emdb, limit=1), show_progress=False)
    with pytest.raises(EmdbError, match="other filters"):
        curate(tmp_path / "dl", settings_for(fake_emdb, min_kda=200), show_progress=False)


def test_a_killed_build_resumes_without_fetching_finished_maps_again(fake_emdb, tmp_path):
    fake_emdb.map_delay = 0.3
    downloads, corpus = tmp_path / "dl", tmp_path / "corpus"
    command = [sys.executable, "-m", "training.build_corpus", "--out", str(corpus), "--emdb",
               "--emdb-dir", str(downloads), "--emdb-api", f"{fake_emdb.url}/api",
               "--emdb-files", f"{fake_emdb.url}/files", "--rate", "50", "--backoff", "0.01",
               "--rotations", "2", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = downloads / "emdb_state.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _kept_ids(state_file) == set():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = _kept_ids(state_file)
    expected = KEEPABLE | {"EMD-1007"}  # nothing is corrupt on this server
    assert done_before and done_before != expected  # it was cut off mid-way

    from training.build_corpus import main
    fake_emdb.map_delay = 0.0
    assert main(command[3:]) == 0

    map_requests = {i: fake_emdb.requests_to(fake_emdb.map_path(i)) for i in expected}
    assert all(map_requests[i] == 1 for i in done_before)  # finished maps are not fetched again
    assert all(1 <= n <= 2 for n in map_requests.values())  # at most one cut off by the kill
    assert not list((downloads / "maps").glob(".*.tmp"))  # the cut-off download was cleared
    data = Corpus(corpus)
    assert {s["entry_id"] for s in data.samples} == expected
    assert all(s["source_kind"] == "emdb" and s["preprocessing"]["contour_level"] == pytest.approx(0.2)
               for s in data.samples)
    volume = data.load(0)
    assert volume.shape == (64, 64, 64) and volume.dtype == np.float32
    assert abs(volume.mean()) < 1e-4 and volume.std() == pytest.approx(1.0, abs=1e-4)


def _kept_ids(state_file: Path) -> set[str]:
    """Kept ids in a state file that another process is appending to (read-only)."""
    kept = set()
    lines = state_file.read_text().splitlines() if state_file.exists() else []
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written right now
        if record.get("status") == "kept":
            kept.add(record["emdb_id"])
    return kept


# --- Opening one entry (napari_cryoswan.emdb.fetch_entry) ----------------------------------------


def server_for(fake, **changes):
    from napari_cryoswan.emdb import EmdbServer

    defaults = dict(api_url=f"{fake.url}/api", files_url=f"{fake.url}/files",
                    requests_per_second=0, retries=2, backoff=0.01, timeout=5)
    return EmdbServer(**{**defaults, **changes})


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("text,expected", [
    ("EMD-1234", "EMD-1234"), ("emd_1234", "EMD-1234"), ("1234", "EMD-1234"),
    ("emdb:1234", "EMD-1234"), ("EMDB:EMD-1234", "EMD-1234"), (" EMD-0042 ", "EMD-0042"),
    ("emd-42", "EMD-0042"), ("EMD-51234", "EMD-51234"),
    ("12", None), ("map.mrc", None), ("emd_1234.map.gz", None), ("EMD-12a4", None), ("", None),
])
def test_accessions_are_read_as_biologists_write_them(text, expected):
    from napari_cryoswan.emdb import accession_or_none, parse_accession

    assert accession_or_none(text) == expected
    if expected is None:
        with pytest.raises(ValueError, match="is not an EMDB accession"):
            parse_accession(text)


def test_fetch_entry_downloads_verifies_and_caches(fake_emdb, tmp_path, monkeypatch):
    from napari_cryoswan.emdb import fetch_entry
    from napari_cryoswan.io import read_header

    # The environment names the cache and the server, as a user or a test would set them.
    monkeypatch.setenv("NAPARI_CRYOSWAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NAPARI_CRYOSWAN_EMDB_API", f"{fake_emdb.url}/api")
    monkeypatch.setenv("NAPARI_CRYOSWAN_EMDB_FILES", f"{fake_emdb.url}/files/")
    seen = []

    entry = fetch_entry("emdb:1001", progress=lambda done, total: seen.append((done, total)))

    body = fake_emdb.maps[fake_emdb.map_path("EMD-1001")]
    assert entry.path == tmp_path / "cache" / "emdb" / "EMD-1001" / "emd_1001.map.gz"
    assert entry.path.read_bytes() == body and read_header(entry.path)["shape_zyx"] == (16, 16, 16)
    assert seen[0] == (0, len(body)) and seen[-1] == (len(body), len(body))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert entry.meta.contour == pytest.approx(0.2) and entry.meta.resolution == pytest.approx(4.2)
    assert entry.meta.title == "test entry EMD-1001" and not entry.from_cache
    assert entry.layer_metadata()["recommended_contour"] == pytest.approx(0.2)
    assert files_in(tmp_path / "cache") == ["emd_1001.map.gz", "entry.json"]

    requests = len(fake_emdb.log)
    again = fetch_entry("EMD-1001")  # from the cache: no request at all
    assert again.from_cache and again.path == entry.path and again.meta == entry.meta
    assert len(fake_emdb.log) == requests


def test_unknown_accession_is_one_request_and_a_clear_error(fake_emdb, tmp_path):
    from napari_cryoswan.emdb import EntryNotFound, fetch_entry

    with pytest.raises(EntryNotFound, match=r"^EMD-9999: EMDB has no released entry .*HTTP 404"):
        fetch_entry("9999", server=server_for(fake_emdb), cache=tmp_path / "cache")
    assert fake_emdb.requests_to("/api/entry/EMD-9999") == 1
    assert files_in(tmp_path / "cache") == []


def test_no_network_says_so(tmp_path):
    import socket

    from napari_cryoswan.emdb import EmdbError, EmdbServer, fetch_entry

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = EmdbServer(api_url=f"http://127.0.0.1:{port}/api", files_url=f"http://127.0.0.1:{port}/files",
                        retries=1, backoff=0.01, timeout=2)
    with pytest.raises(EmdbError, match=r"EMD-1001: .*cannot reach 127\.0\.0\.1.*Check the network"):
        fetch_entry("EMD-1001", server=server, cache=tmp_path / "cache")
    assert files_in(tmp_path / "cache") == []


def test_a_stalled_server_times_out_and_leaves_nothing(fake_emdb, tmp_path):
    from napari_cryoswan.emdb import EmdbError, fetch_entry

    fake_emdb.stall[fake_emdb.map_path("EMD-1001")] = ALWAYS
    started = time.monotonic()
    with pytest.raises(EmdbError, match=r"did not answer within 0\.5 s \(2 tries\)"):
        fetch_entry("EMD-1001", server=server_for(fake_emdb, timeout=0.5, retries=1), cache=tmp_path / "cache")
    assert time.monotonic() - started < 10
    assert fake_emdb.requests_to(fake_emdb.map_path("EMD-1001")) == 2
    assert files_in(tmp_path / "cache") == []  # no partial map, no record


def test_dropped_and_truncated_downloads_are_retried(fake_emdb, tmp_path):
    from napari_cryoswan.emdb import fetch_entry

    fake_emdb.drop["/api/entry/EMD-1001"] = 1
    fake_emdb.truncate[fake_emdb.map_path("EMD-1001")] = 1
    fake_emdb.drop[fake_emdb.map_path("EMD-1003")] = 1
    for emdb_id in ("EMD-1001", "EMD-1003"):
        entry = fetch_entry(emdb_id, server=server_for(fake_emdb), cache=tmp_path / "cache")
        assert entry.path.read_bytes() == fake_emdb.maps[fake_emdb.map_path(emdb_id)]
        assert fake_emdb.requests_to(fake_emdb.map_path(emdb_id)) == 2
    assert fake_emdb.requests_to("/api/entry/EMD-1001") == 2


def test_a_download_that_stays_truncated_fails_with_a_message(fake_emdb, tmp_path):
    from napari_cryoswan.emdb import EmdbError, fetch_entry

    fake_emdb.truncate[fake_emdb.map_path("EMD-1001")] = ALWAYS
    with pytest.raises(EmdbError, match=r"EMD-1001: .*the download failed \(3 tries\); last: the download was "
                                        r"cut short: .* bytes arrived of the .* announced.*Nothing was kept"):
        fetch_entry("EMD-1001", server=server_for(fake_emdb), cache=tmp_path / "cache")
    assert fake_emdb.requests_to(fake_emdb.map_path("EMD-1001")) == 3
    assert files_in(tmp_path / "cache") == []


def test_cancelling_a_download_keeps_nothing(fake_emdb, tmp_path):
    from napari_cryoswan.emdb import fetch_entry
    from napari_cryoswan.engine import Cancelled

    calls = []
    with pytest.raises(Cancelled):
        fetch_entry("EMD-1001", server=server_for(fake_emdb), cache=tmp_path / "cache",
                    progress=lambda done, total: calls.append(done), should_stop=lambda: bool(calls))
    assert files_in(tmp_path / "cache") == []
