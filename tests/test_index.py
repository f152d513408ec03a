"""The latent index: build, reopen, extend, resume, refuse, search, decode; and its two CLIs."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_cryoswan.engine import Cancelled
from napari_cryoswan.index import (
    CodeLayout,
    LatentIndexError,
    decode_entry,
    nearest,
    open_index,
)
from napari_cryoswan.io import read_map, write_map
from napari_cryoswan.preprocess import preprocess
from training import build_index, search

NAMES = ("alpha", "beta", "emd_1234", "delta")


def _blob(rng, shape=(32, 32, 32)):
    grid = np.indices(shape).astype(np.float32)
    centre = rng.uniform(10, 22, 3)[:, None, None, None]
    return np.exp(-((grid - centre) ** 2).sum(0) / rng.uniform(5, 40)).astype(np.float32)


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Four small maps at 4 Å (one named like an EMDB entry), an exact copy of the first, and a
    file that is not a map at all."""
    folder = tmp_path_factory.mktemp("maps")
    rng = np.random.default_rng(0)
    for name in NAMES:
        write_map(folder / f"{name}.mrc", _blob(rng), 4.0)
    shutil.copy(folder / "alpha.mrc", folder / "alpha_copy.mrc")
    (folder / "broken.mrc").write_bytes(b"not a map" * 10)
    return folder


@pytest.fixture(scope="module")
def built(maps, small_checkpoints, tmp_path_factory):
    """The index of every map in the folder, built once through the command line."""
    out = tmp_path_factory.mktemp("built") / "index"
    assert build_index.main(["--maps", str(maps), "--checkpoint", str(small_checkpoints["swan"]),
                             "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    return out


def _sources(maps, swan, names):
    sources, refused = build_index.map_sources([maps / f"{n}.mrc" for n in names], swan.contract)
    assert not refused
    return sources


def _contents(index):
    """What an index holds, independent of how it was cut into shards and when."""
    return [(row, index.embeddings[i], index.codes_of([i])[0]) for i, row in enumerate(index.rows)]


def _assert_same(a, b):
    assert [row for row, _, _ in a] == [row for row, _, _ in b]
    for (_, embedding_a, codes_a), (_, embedding_b, codes_b) in zip(a, b):
        np.testing.assert_allclose(embedding_a, embedding_b, atol=1e-6)
        np.testing.assert_array_equal(codes_a, codes_b)


# --- building and reopening -----------------------------------------------------------------------


def test_build_records_what_is_known_and_skips_what_cannot_be_read(built, maps, swan, capsys):
    index = open_index(built, checkpoint_id=swan.checkpoint_id)
    assert len(index) == 5 and index.embeddings.shape == (5, index.embedding_dim)
    manifest = index.manifest
    assert manifest["checkpoint"] == {"id": swan.checkpoint_id, "file": "swan.pt", "model": "swan", "bundled": None}
    assert manifest["input"] == {"box": 64, "voxel_size": 4.0, "normalisation": "z-score"}
    assert manifest["preprocessing"]["box"] == 64 and manifest["count"] == 5
    assert manifest["codes"]["layout"] == [["rq1", [1, 4, 6, 8, 10, 12, 14, 16]], ["rq2", [1, 2, 4, 8]]]
    assert manifest["codes"]["per_map"] == 10946 and manifest["codes"]["dtype"] == "uint16"
    by_name = {row["name"]: row for row in index.rows}
    assert set(by_name) == {"alpha", "alpha_copy", "beta", "delta", "emd_1234"}
    assert by_name["emd_1234"]["emdb_id"] == "EMD-1234" and by_name["beta"]["emdb_id"] is None
    row = by_name["alpha"]
    assert row["source"] == str((maps / "alpha.mrc").resolve()) and row["key"] == row["source"]
    assert row["voxel_size"] == [4.0, 4.0, 4.0] and row["box_shape"] == [32, 32, 32]
    # nothing invented: a map file gives no mass, PDB id or split
    assert row["mass_kda"] is None and row["pdb_id"] is None and row["split"] is None
    assert index.codes_of([0]).dtype == np.uint16


def test_an_unreadable_map_is_reported_in_the_summary(maps, small_checkpoints, tmp_path, capsys):
    out = tmp_path / "index"
    assert build_index.main(["--maps", str(maps / "broken.mrc"), str(maps / "beta.mrc"), str(tmp_path / "nope.mrc"),
                             "--checkpoint", str(small_checkpoints["swan"]), "--out", str(out),
                             "--device", "cpu", "--quiet"]) == 0
    summary = capsys.readouterr().err
    assert "1 maps; added 1, 0 already there, 2 skipped" in summary
    assert "broken.mrc: not a readable MRC/CCP4 map" in summary and "no such file or folder" in summary


def test_an_index_grows_and_a_second_run_adds_nothing(maps, swan, small_checkpoints, tmp_path, capsys):
    out = tmp_path / "index"
    args = ["--checkpoint", str(small_checkpoints["swan"]), "--out", str(out), "--device", "cpu", "--quiet"]
    assert build_index.main(["--maps", str(maps / "alpha.mrc"), str(maps / "beta.mrc"), *args]) == 0
    first = _contents(open_index(out))
    assert build_index.main(["--maps", str(maps / "beta.mrc"), str(maps / "delta.mrc"), *args]) == 0
    assert "added 1, 1 already there" in capsys.readouterr().err
    grown = open_index(out)
    assert [row["name"] for row in grown.rows] == ["alpha", "beta", "delta"]
    _assert_same(_contents(grown)[:2], first)


def test_an_index_of_another_checkpoint_or_embedding_is_refused(built, small_checkpoints, tmp_path, capsys):
    before = (built / "manifest.json").read_text()
    assert build_index.main(["--maps", str(tmp_path), "--checkpoint", str(small_checkpoints["swan-rq1"]),
                             "--out", str(built), "--device", "cpu", "--quiet"]) == 2
    message = capsys.readouterr().err
    assert "built with checkpoint" in message and "swan.pt" in message and "swan-rq1.pt" in message
    assert "python -m training.build_index" in message
    assert (built / "manifest.json").read_text() == before

    with pytest.raises(LatentIndexError, match="this run uses 0123456789ab"):
        open_index(built, checkpoint_id="0123456789ab")
    other = tmp_path / "other"
    shutil.copytree(built, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["embedding"]["version"] = "some-older-recipe"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LatentIndexError, match="embeddings are 'some-older-recipe'.*Rebuild"):
        open_index(other)


def test_a_build_killed_mid_way_resumes_to_the_same_index(maps, swan, tmp_path, monkeypatch):
    sources = _sources(maps, swan, ("alpha", "beta", "emd_1234", "delta"))
    options = dict(shard_size=2, batch_size=1, device=_cpu(), show_progress=False)
    reference = build_index.index_sources(sources, swan, tmp_path / "reference", **options)
    assert reference.added == 4

    # Stopped between batches of the second shard: the first shard is committed.
    out = tmp_path / "resumed"
    calls = iter(range(100))
    with pytest.raises(Cancelled):
        build_index.index_sources(sources, swan, out, should_stop=lambda: next(calls) >= 2, **options)
    assert len(open_index(out)) == 2

    # Killed inside an add, after the shard's files, before the manifest that commits them.
    from napari_cryoswan import index as index_module

    def die(*args):
        raise OSError("killed")

    monkeypatch.setattr(index_module, "_write_manifest", die)
    with pytest.raises(OSError):
        build_index.index_sources(sources, swan, out, **options)
    monkeypatch.undo()
    assert len(open_index(out)) == 2  # still readable, at its last commit
    assert (out / "shards" / "00001.codes.npy").exists()  # the uncommitted shard's files

    report = build_index.index_sources(sources, swan, out, **options)
    assert (report.added, report.present) == (2, 2)
    _assert_same(_contents(open_index(out)), _contents(open_index(tmp_path / "reference")))


def test_ranks_build_parts_that_rank_0_merges(maps, swan, tmp_path):
    sources = _sources(maps, swan, ("alpha", "beta", "emd_1234"))
    options = dict(shard_size=1, batch_size=1, device=_cpu(), show_progress=False)
    single = open_index(build_index.build_index(sources, swan, tmp_path / "single", **options).index)

    out = tmp_path / "parts"
    # Rank 1 first: without torchrun the barrier is a no-op, and rank 0 merges what is there.
    build_index.build_index(sources, swan, out, rank=1, world=2, **options)
    assert len(open_index(build_index.part_folder(out, 1))) == 1 and not (out / "manifest.json").exists()
    build_index.build_index(sources, swan, out, rank=0, world=2, **options)
    merged = open_index(out)
    assert not (out / "parts").exists()
    assert [row["name"] for row in merged.rows] == ["alpha", "emd_1234", "beta"]  # rank 0's, then rank 1's
    order = [single.row_of(row["key"]) for row in merged.rows]
    assert [merged.rows[i] for i in range(3)] == [single.rows[i] for i in order]
    np.testing.assert_allclose(merged.embeddings, single.embeddings[order], atol=1e-6)
    np.testing.assert_array_equal(merged.codes_of(range(3)), single.codes_of(order))

    # A merge cut short after committing a part, before deleting it: the next merge adds nothing twice.
    build_index.index_sources(sources[:2], swan, build_index.part_folder(out, 0), **options)
    assert build_index.merge_parts(out, swan) == 0
    assert len(open_index(out)) == 3 and not (out / "parts").exists()


def test_a_corpus_index_carries_the_manifest_metadata(tiny_corpus, small_checkpoints, tmp_path):
    out = tmp_path / "index"
    assert build_index.main(["--corpus", str(tiny_corpus), "--split", "train", "val", "--checkpoint",
                             str(small_checkpoints["swan"]), "--out", str(out), "--device", "cpu",
                             "--quiet"]) == 0
    rows = open_index(out).rows
    assert len(rows) == 6 and {row["split"] for row in rows} == {"train", "val"}
    for row in rows:
        assert row["pdb_id"] == row["entry_id"] and len(row["pdb_id"]) == 4
        assert row["mass_kda"] > 0 and row["emdb_id"] is None and row["source_kind"] == "structure"
        assert row["name"].startswith(row["entry_id"] + "_r") and row["box_shape"] and row["voxel_size"]
        # no path of the machine that built it: the bundled index ships
        assert row["source"] == f"{tiny_corpus.name}/maps/{row['name']}.mrc"
        assert "/" not in row["origin_source"] and row["origin_source"].endswith(".pdb.gz")


def test_a_corpus_index_can_hold_one_orientation_of_each_entry(tiny_corpus, small_checkpoints, tmp_path):
    out = tmp_path / "index"
    assert build_index.main(["--corpus", str(tiny_corpus), "--rotations", "0", "--checkpoint",
                             str(small_checkpoints["swan"]), "--out", str(out), "--device", "cpu",
                             "--quiet"]) == 0
    rows = open_index(out).rows
    assert len(rows) == 3 and all(row["rotation_index"] == 0 for row in rows)
    assert {row["split"] for row in rows} == {"train", "val", "test"}


# --- codes ------------------------------------------------------------------------------------------


def test_stored_codes_decode_to_the_models_own_reconstruction(built, maps, swan):
    import torch

    index = open_index(built, checkpoint_id=swan.checkpoint_id)
    row = index.find("beta")[0]
    prepared = preprocess(read_map(maps / "beta.mrc"), swan.contract.settings())
    x = torch.from_numpy(prepared.data)[None, None]
    with torch.no_grad():
        codes = swan.model.encode(x).codes
        direct = swan.model.reconstruct(x)[0, 0].numpy()
    for level, scales in index.codes(row).items():
        for stored, fresh in zip(scales, codes[level]):
            np.testing.assert_array_equal(stored, fresh.numpy())
    shown = decode_entry(index, row, swan, device=_cpu())
    np.testing.assert_allclose(shown, direct, atol=1e-5)
    in_density = decode_entry(index, row, swan.model, device=_cpu(), denormalise=True)
    np.testing.assert_allclose(in_density, direct * prepared.record.std + prepared.record.mean, atol=1e-5)
    with pytest.raises(LatentIndexError, match="decode them with the checkpoint the index was built with"):
        decode_entry(index, row, SimpleNamespace(checkpoint_id="0123456789ab", model=swan.model))


def test_a_code_layout_packs_and_unpacks():
    layout = CodeLayout((("rq1", (1, 2)), ("rq2", (1,))), codebook_size=300)
    rng = np.random.default_rng(0)
    codes = {"rq1": [rng.integers(0, 300, (3, s, s, s)) for s in (1, 2)], "rq2": [rng.integers(0, 300, (3, 1, 1, 1))]}
    packed = layout.pack(codes)
    assert packed.shape == (3, 10) and packed.dtype == np.uint16
    for level, scales in layout.unpack(packed).items():
        for a, b in zip(scales, codes[level]):
            np.testing.assert_array_equal(a, b)
    assert CodeLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    with pytest.raises(LatentIndexError, match="continuous"):
        layout.pack({"rq1": [np.zeros((3, s, s, s)) for s in (1, 2)], "rq2": [np.zeros((3, 1, 1, 1))]})


# --- search -----------------------------------------------------------------------------------------


def test_a_maps_exact_copy_is_its_nearest_neighbour(built, maps, swan):
    from napari_cryoswan.index import embed_maps

    index = open_index(built, checkpoint_id=swan.checkpoint_id)
    query = embed_maps(swan, [read_map(maps / "alpha.mrc")], device=_cpu()).embeddings[0]
    hits = index.search(query, k=3)
    assert {hits[0].entry["name"], hits[1].entry["name"]} == {"alpha", "alpha_copy"}
    # the index was embedded in batches of 4, the query alone: equal up to float rounding
    assert hits[0].distance < 1e-5 and hits[1].distance < 1e-5 < hits[2].distance
    own = index.row_of(str((maps / "alpha.mrc").resolve()))
    hits = index.search(query, k=10, exclude=own)
    assert hits[0].entry["name"] == "alpha_copy" and len(hits) == 4
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)


def test_nearest_is_exact_with_ties_in_row_order_and_exclusions():
    embeddings = np.array([[0, 0], [3, 4], [0, 1], [0, 1], [1, 0]], np.float32)
    rows, distances = nearest(embeddings, np.zeros(2), k=3)
    assert rows.tolist() == [0, 2, 3] and distances.tolist() == [0, 1, 1]
    rows, _ = nearest(embeddings, np.zeros(2), k=3, exclude=[0, 2])
    assert rows.tolist() == [3, 4, 1]
    rows, _ = nearest(embeddings, np.zeros(2), k=10, exclude=[1])
    assert rows.tolist() == [0, 2, 3, 4]
    with pytest.raises(LatentIndexError, match="dimension 3.*another embedding.*build_index"):
        nearest(embeddings, np.zeros(3), k=1)


def test_a_query_as_far_from_its_nearest_map_as_distinct_maps_lie_apart_is_said_to_have_no_copy():
    from napari_cryoswan.index import LatentIndex, isolation_note

    # On a line: entry a in two orientations (0.05 apart: copies, not neighbours), b, c and d.
    points = np.array([[0.0, 0.0], [0.05, 0.0], [1.0, 0.0], [2.2, 0.0], [3.5, 0.0]], np.float32)
    rows = [{"key": f"k{i}", "name": f"map {i}", "entry_id": entry} for i, entry in enumerate("aabcd")]
    index = LatentIndex(Path("line"), {}, rows, points, [])
    np.testing.assert_allclose(index.spacing(), [0.95, 0.95, 1.0, 1.2, 1.3], atol=1e-6)
    assert isolation_note(index.spacing(), 0.3) is None  # nearer than any two distinct maps: a copy
    note = isolation_note(index.spacing(), 1.25)
    assert note.startswith("No map of the index is a near copy of this one: the nearest lies at d = 1.25")
    assert "farther than 80% of the index's maps" in note and "(median d = 1.00)" in note
    one_entry = LatentIndex(Path("one"), {}, rows[:2], points[:2], [])
    assert len(one_entry.spacing()) == 0 and isolation_note(one_entry.spacing(), 5.0) is None


def test_find_matches_names_and_ids_in_any_spelling(built):
    index = open_index(built)
    assert [index.rows[i]["name"] for i in index.find("EMD_1234")] == ["emd_1234"]
    assert [index.rows[i]["name"] for i in index.find("emd-1234")] == ["emd_1234"]
    assert {index.rows[i]["name"] for i in index.find("ALPHA")} == {"alpha", "alpha_copy"}
    assert index.find("zzz") == [] and index.find("  ") == []


def test_search_prints_json_and_a_table(built, maps, small_checkpoints, capsys):
    queries = [str(maps / "alpha.mrc"), str(maps / "delta.mrc")]
    common = [str(built), *queries, "--k", "3", "--checkpoint", str(small_checkpoints["swan"]), "--device", "cpu"]
    assert search.main([*common, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in results] == queries
    for result in results:
        assert set(result) == {"query", "neighbours", "note"} and len(result["neighbours"]) == 3
        assert result["note"] is None  # each query has an exact copy in the index
        assert all(set(n) == {"name", "source", "distance"} for n in result["neighbours"])
        distances = [n["distance"] for n in result["neighbours"]]
        assert distances == sorted(distances) and distances[0] < 1e-5
    assert results[1]["neighbours"][0]["name"] == "delta"
    assert search.main([*common, "--exclude-self", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["neighbours"][0]["name"] == "alpha_copy"
    assert search.main(common) == 0
    table = capsys.readouterr().out
    assert "alpha.mrc: 3 nearest" in table and "distance" in table and "delta" in table
    assert "near copy" not in table
    far = {"query": "far.mrc", "neighbours": [{"name": "delta", "source": None, "distance": 1.4}],
           "note": "No map of the index is a near copy of this one: …"}
    assert search.format_table([far]).splitlines()[-1] == "  No map of the index is a near copy of this one: …"


def test_search_says_what_is_missing(built, maps, tmp_path, capsys):
    # an index of a checkpoint that is not bundled needs it named
    assert search.main([str(built), str(maps / "alpha.mrc")]) == 2
    assert "give that checkpoint with --checkpoint" in capsys.readouterr().err
    assert search.main([str(tmp_path), str(maps / "alpha.mrc")]) == 2
    assert "not a latent index" in capsys.readouterr().err


def test_search_reads_the_bundled_index(maps, capsys):
    assert search.main(["bundled", str(maps / "alpha.mrc"), "--k", "3", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    distances = [n["distance"] for n in result["neighbours"]]
    assert len(distances) == 3 and distances == sorted(distances)
    assert result["note"] is None or result["note"].startswith("No map of the index is a near copy")


def test_a_build_without_the_bundled_index_says_how_to_make_one(maps, monkeypatch, tmp_path, capsys):
    import importlib.resources

    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    assert search.main(["bundled", str(maps / "alpha.mrc")]) == 2
    message = capsys.readouterr().err
    assert "No latent index ships" in message and "python -m training.build_index" in message


# --- damaged indexes --------------------------------------------------------------------------------


def test_damaged_or_missing_files_give_clear_errors(built, small_checkpoints, tmp_path, capsys):
    def damaged(name):
        copy = tmp_path / name
        shutil.copytree(built, copy)
        return copy

    index = damaged("no_codes")
    (index / "shards" / "00000.codes.npy").unlink()
    with pytest.raises(LatentIndexError, match="00000.codes.npy: missing, but the index's manifest lists it"):
        open_index(index)

    index = damaged("pickled")
    np.save(index / "shards" / "00000.embeddings.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LatentIndexError, match="not a readable array"):
        open_index(index)

    index = damaged("short")
    np.save(index / "shards" / "00000.embeddings.npy", np.zeros((1, 3), np.float32))
    with pytest.raises(LatentIndexError, match="shard 00000 holds .* but the manifest says"):
        open_index(index)

    index = damaged("bad_json")
    (index / "manifest.json").write_text("{")
    with pytest.raises(LatentIndexError, match="not valid JSON"):
        open_index(index)

    index = damaged("bad_rows")
    (index / "shards" / "00000.rows.json").write_text("[1, 2")
    with pytest.raises(LatentIndexError, match="damaged metadata"):
        open_index(index)

    index = damaged("rows_without_fields")
    rows = json.loads((index / "shards" / "00000.rows.json").read_text())
    del rows["rows"][0]["voxel_size"]
    (index / "shards" / "00000.rows.json").write_text(json.dumps(rows))
    with pytest.raises(LatentIndexError, match="a row lacks fields"):
        open_index(index)

    index = damaged("shard_outside")
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../../elsewhere"
    (index / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LatentIndexError, match="names a shard '../../elsewhere', not five digits"):
        open_index(index)

    with pytest.raises(LatentIndexError, match="no manifest.json"):
        open_index(tmp_path)

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert build_index.main(["--maps", str(built), "--checkpoint", str(small_checkpoints["swan"]),
                             "--out", str(occupied), "--quiet"]) == 2
    assert "holds files but no index" in capsys.readouterr().err


def _cpu():
    import torch

    return torch.device("cpu")
