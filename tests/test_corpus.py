"""The corpus format, its builder (structures, maps, meshes) and the mesh voxeliser."""

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh

from training.build_corpus import main, parse_args
from training.corpus import (
    JOURNAL,
    MANIFEST,
    SPLITS,
    Corpus,
    CorpusError,
    assign_splits,
    compute_corpus_id,
    group_of,
)
from training.mesh import MeshError, MeshSettings, mesh_density, voxelise

DATA = Path(__file__).parent / "data"


def build(out, *args) -> Corpus:
    assert main(["--out", str(out), "--quiet", "--rotations", "2", *map(str, args)]) == 0
    return Corpus(out)


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """Every local source in one corpus: structures (+ sub-assemblies), maps with a CSV, meshes."""
    tmp = tmp_path_factory.mktemp("mixed")
    (tmp / "contours.csv").write_text("emdb_id,contour,resolution,mass_kda\nEMD-3197,0.02,20.0,\n")
    cube = tmp / "cube.off"
    trimesh.creation.box((2, 1, 1)).export(cube)
    sphere = tmp / "sphere.ply"
    trimesh.creation.icosphere(2).export(sphere)
    return build(tmp / "corpus",
                 "--structures", DATA / "structures" / "1AKE.pdb.gz", DATA / "assemblies",
                 "--subassemblies", "3",
                 "--maps", DATA / "emd_3197.map.gz", "--maps-csv", tmp / "contours.csv",
                 "--meshes", DATA / "meshes", cube, sphere)


# --- The split ------------------------------------------------------------------------------------


def test_split_by_group_has_no_leakage_and_the_right_proportions():
    # 300 entries of 5 rotations, and 10 complexes whose sub-assemblies make 60 samples each.
    sizes = {f"E{i:03d}": 5 for i in range(300)} | {f"C{i}": 60 for i in range(10)}
    split = assign_splits(sizes, (0.8, 0.1, 0.1), seed=0)
    assert set(split) == set(sizes) and set(split.values()) == set(SPLITS)
    samples = {s: sum(n for g, n in sizes.items() if split[g] == s) for s in SPLITS}
    groups = {s: sum(1 for g in sizes if split[g] == s) for s in SPLITS}
    for name, fraction in zip(SPLITS, (0.8, 0.1, 0.1)):
        assert groups[name] / len(sizes) == pytest.approx(fraction, abs=0.01)
        assert samples[name] / sum(sizes.values()) == pytest.approx(fraction, abs=0.02)
    # Stratified by size: the big families are shared out like the small entries.
    assert sorted(split[f"C{i}"] for i in range(10)) == ["test"] + ["train"] * 8 + ["val"]
    assert assign_splits(sizes, seed=0) == split
    assert assign_splits(sizes, seed=1) != split
    with pytest.raises(CorpusError, match="sum"):
        assign_splits(sizes, (0.8, 0.1, 0.2))


def test_a_small_corpus_still_has_every_split():
    assert sorted(assign_splits({"a": 5, "b": 5, "c": 10}).values()) == sorted(SPLITS)
    assert sorted(assign_splits({"a": 5, "b": 5}).values()) == ["train", "val"]
    assert set(assign_splits({"a": 5, "b": 5}, (1.0, 0.0, 0.0)).values()) == {"train"}


def test_groups_join_chains_to_their_pdb_entry():
    assert group_of("1ahsA") == group_of("1AHS") == "1AHS"
    assert group_of("3ENL") == "3ENL"
    assert group_of("EMD-3197") == "EMD-3197"
    assert group_of("random_000") == "random_000"


def test_rotations_and_subassemblies_never_span_two_splits(mixed_corpus):
    split_of_group = {}
    for sample in mixed_corpus.samples:
        assert split_of_group.setdefault(sample["group"], sample["split"]) == sample["split"]
    subs = [s for s in mixed_corpus.samples if s.get("variant") == "subassembly"]
    assert subs and all(s["group"] == "3MHT" and s["parent_id"] == "3MHT" for s in subs)
    all_ids = np.concatenate([mixed_corpus.split_indices(s) for s in SPLITS])
    assert sorted(all_ids) == list(range(len(mixed_corpus)))


# --- The format -----------------------------------------------------------------------------------


def test_every_source_gives_64_cubed_z_scored_float32_maps(mixed_corpus):
    kinds = {s["source_kind"] for s in mixed_corpus.samples}
    assert kinds == {"structure", "map", "mesh"}
    volumes = mixed_corpus.load_batch(range(len(mixed_corpus)))
    assert volumes.shape == (len(mixed_corpus), 64, 64, 64) and volumes.dtype == np.float32
    np.testing.assert_allclose(volumes.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(volumes.std(axis=(1, 2, 3)), 1.0, atol=1e-4)
    # Two rotations of every entry, each a different rotation of the same thing.
    by_entry = {}
    for sample in mixed_corpus.samples:
        by_entry.setdefault(sample["entry_id"], []).append(sample)
    assert all(len(v) == 2 and v[0]["sha256"] != v[1]["sha256"] for v in by_entry.values())


def test_manifest_round_trip(mixed_corpus):
    manifest = json.loads((mixed_corpus.path / MANIFEST).read_text())
    assert manifest == mixed_corpus.manifest
    assert compute_corpus_id(manifest) == mixed_corpus.corpus_id
    assert mixed_corpus.verify() == []
    sample = next(s for s in mixed_corpus.samples if s["entry_id"] == "1AKE")
    assert sample["mass_kda"] == pytest.approx(21.9, abs=0.5) and sample["resolution"] == 8.0
    assert len(sample["preprocessing"]["rotation"]) == 3 and sample["preprocessing"]["voxel_size"] == 4.0
    masked = next(s for s in mixed_corpus.samples if s["source_kind"] == "map")
    assert masked["entry_id"] == "EMD-3197" and masked["preprocessing"]["contour_level"] == 0.02
    # The skipped mesh (no triangles) is reported with its reason, and has no samples.
    assert [(s["key"], "no triangles" in s["reason"]) for s in manifest["skipped"]] == [("random_168", True)]


def test_batches_cover_a_split_once_in_a_seeded_order(mixed_corpus):
    seen = [ids for ids, volumes in mixed_corpus.batches("train", batch_size=4, seed=3)]
    assert sorted(np.concatenate(seen)) == sorted(mixed_corpus.split_indices("train"))
    again = [ids for ids, _ in mixed_corpus.batches("train", batch_size=4, seed=3)]
    assert all(np.array_equal(a, b) for a, b in zip(seen, again))
    with pytest.raises(CorpusError, match="split"):
        mixed_corpus.split_indices("training")


def test_a_folder_without_a_manifest_is_not_a_corpus(tmp_path):
    with pytest.raises(CorpusError, match="not a built corpus"):
        Corpus(tmp_path)


# --- Building: resume, refusals -------------------------------------------------------------------


def test_an_interrupted_build_resumes_to_the_same_corpus(tmp_path):
    inputs = ["--structures", DATA / "structures"]
    reference = build(tmp_path / "reference", *inputs)
    # Cut a build short: one entry journaled (but one of its maps lost since), a second entry's
    # map written but not journaled, and a journal line half-written when the process died.
    partial = build(tmp_path / "partial", "--structures", DATA / "structures" / "1AKE.pdb.gz",
                    DATA / "structures" / "1PWC.pdb.gz")
    (partial.path / MANIFEST).unlink()
    (partial.path / "maps" / "1PWC_r1.mrc").unlink()
    (partial.path / "maps" / "3ENL_r0.mrc").write_bytes(b"half a map")
    with open(partial.path / JOURNAL, "a") as fh:
        fh.write('{"type": "entry", "key": "3EN')
    resumed = build(tmp_path / "partial", *inputs)
    assert resumed.corpus_id == reference.corpus_id
    assert resumed.verify() == []
    assert all(json.loads(line) for line in (resumed.path / JOURNAL).read_text().splitlines())


def test_large_assemblies_are_cropped_not_dropped_and_keep_the_split_of_the_corpus_beside(tmp_path):
    beside = build(tmp_path / "proteins", "--structures", DATA / "structures")
    large = build(tmp_path / "large", "--structures", DATA / "structures" / "1AKE.pdb.gz",
                  "--assemblies", "2", "--assemblies-only", "--split-from", beside.path)
    split_beside = {s["group"]: s["split"] for s in beside.samples}
    assert {s["group"] for s in large.samples} == {"1AKE"}
    assert {s["split"] for s in large.samples} == {split_beside["1AKE"]}
    assert large.manifest["split"]["fixed_groups"] == 1
    assert len({s["entry_id"] for s in large.samples}) == 2  # two assemblies, two rotations each
    for sample in large.samples:
        assert sample["variant"] == "assembly" and sample["copies"] >= 24 and sample["mass_kda"] >= 500
        assert sample["preprocessing"]["rotation"] is not None
    data = large.load_batch(range(len(large)))
    assert data.shape == (4, 64, 64, 64)
    assert np.allclose(data.mean(axis=(1, 2, 3)), 0, atol=1e-4)
    assert not np.allclose(data[0], data[1])  # the rotations differ
    # A 1AKE shell or filament fills far more of the box than 1AKE itself.
    filled = lambda v: (v > v.mean() + v.std()).mean()  # noqa: E731
    assert min(filled(v) for v in data) > 3 * filled(beside.load(int(np.flatnonzero(
        [s["entry_id"] == "1AKE" for s in beside.samples])[0])))


def test_nothing_is_overwritten_without_asking(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert main(["--out", str(tmp_path / "notes"), "--structures", str(DATA / "structures"), "--quiet"]) == 2
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"

    corpus = build(tmp_path / "corpus", "--structures", DATA / "structures" / "1AKE.pdb.gz")
    before = (corpus.path / MANIFEST).read_bytes()
    # Other settings on an existing corpus: refused, and the corpus left as it was.
    assert main(["--out", str(corpus.path), "--structures", str(DATA / "structures" / "1AKE.pdb.gz"),
                 "--resolution", "6", "--quiet"]) == 2
    assert (corpus.path / MANIFEST).read_bytes() == before
    rebuilt = build(tmp_path / "corpus", "--structures", DATA / "structures" / "1AKE.pdb.gz",
                    "--resolution", "6", "--overwrite")
    assert rebuilt.corpus_id != corpus.corpus_id
    assert {s["resolution"] for s in rebuilt.samples} == {6.0}


def test_clear_errors_for_bad_inputs(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "c"), "--structures", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "c"), "--structures", str(DATA / "emd_3197.map.gz")]) == 2
    assert "not a PDB/mmCIF file" in capsys.readouterr().err
    duplicate = tmp_path / "copy"
    duplicate.mkdir()
    (duplicate / "1AKE.pdb.gz").write_bytes((DATA / "structures" / "1AKE.pdb.gz").read_bytes())
    assert main(["--out", str(tmp_path / "c"), "--structures", str(DATA / "structures"), str(duplicate)]) == 2
    assert "1AKE" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("contour,resolution\n0.1,4\n")
    assert main(["--out", str(tmp_path / "c"), "--maps", str(DATA / "emd_3197.map.gz"),
                 "--maps-csv", str(tmp_path / "bad.csv")]) == 2
    assert "emdb_id" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["--out", str(tmp_path / "c"), "--structures", str(DATA / "structures"),
                 "--split-from", str(tmp_path / "no-corpus")]) == 2
    assert "not a built corpus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path / "c"), "--structures", str(DATA / "structures"), "--assemblies-only"])
    assert "--assemblies N" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_help_documents_every_source(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--structures", "--subassemblies", "--maps-csv", "--meshes", "--emdb", "--emdb-api",
                   "--rate", "--overwrite", "--workers", "--rotations", "--split"):
        assert option in text


# --- Meshes ---------------------------------------------------------------------------------------


UNBLURRED = MeshSettings(blur_sigma=0.0)


def test_a_closed_sphere_fills_its_volume():
    sphere = trimesh.creation.icosphere(subdivisions=4)
    density, scale = voxelise(sphere.vertices, sphere.faces, UNBLURRED)
    assert density.sum() == pytest.approx(sphere.volume * scale**3, rel=0.01)
    assert density[32, 32, 32] == 1.0 and density[0, 0, 0] == 0.0
    # The bounding sphere fits the box with its margin: the radius is 32 - 3 voxels.
    assert scale * 1.0 == pytest.approx(29.0, rel=0.01)


def test_a_closed_cube_fills_its_volume_and_blur_keeps_the_mass():
    cube = trimesh.creation.box((1, 1, 1))
    density, scale = voxelise(cube.vertices, cube.faces, UNBLURRED)
    assert density.sum() == pytest.approx(scale**3, rel=0.05)  # within a layer of sub-voxels
    half = scale / 2 - 1
    centre = slice(int(32 - half), int(32 + half))
    assert np.all(density[centre, centre, centre] == 1.0)
    blurred, _ = voxelise(cube.vertices, cube.faces, MeshSettings(blur_sigma=1.0))
    assert blurred.sum() == pytest.approx(density.sum(), rel=1e-3)


def test_overlapping_parts_fill_as_their_union():
    a, b = trimesh.creation.box((1, 1, 1)), trimesh.creation.box((1, 1, 1))
    b.apply_translation((0.5, 0, 0))
    vertices = np.vstack([a.vertices, b.vertices])
    faces = np.vstack([a.faces, b.faces + len(a.vertices)])
    density, scale = voxelise(vertices, faces, UNBLURRED)
    assert density.sum() == pytest.approx(1.5 * scale**3, rel=0.05)  # not 1.0: the overlap is filled
    assert density[32, 32, 32] == 1.0


def test_a_cube_with_a_hole_still_fills_and_an_open_sheet_is_refused():
    cube = trimesh.creation.box((1, 1, 1))
    holed, scale = voxelise(cube.vertices, cube.faces[2:], UNBLURRED)  # one face's two triangles gone
    assert holed.sum() == pytest.approx(scale**3, rel=0.05)
    sheet = trimesh.creation.box((1, 1, 1))
    with pytest.raises(MeshError, match="encloses no volume"):
        voxelise(sheet.vertices, sheet.faces[:2], UNBLURRED)


@pytest.mark.parametrize("suffix", [".off", ".obj", ".ply"])
def test_mesh_files_of_every_format_load(tmp_path, suffix):
    path = tmp_path / f"capsule{suffix}"
    trimesh.creation.capsule(height=2.0, radius=0.5).export(path)
    density = mesh_density(path)
    assert density.data.shape == (64, 64, 64) and density.voxel_size == (4.0, 4.0, 4.0)
    assert 0.01 < density.header["fill_fraction"] < 0.2


def test_broken_mesh_files_are_refused_with_a_reason(tmp_path):
    with pytest.raises(MeshError, match="no triangles"):
        mesh_density(DATA / "meshes" / "random_168.obj")
    garbage = tmp_path / "garbage.ply"
    garbage.write_bytes(b"ply\nformat nonsense\n\x00\x01")
    with pytest.raises(MeshError, match="garbage.ply"):
        mesh_density(garbage)
