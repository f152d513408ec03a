"""The latent explorer's core and its session use cases: the projection stored with the index,
placing a query, neighbours, selections, decoding entries, finding similar maps.

Small on purpose: 32³ maps at 4 Å, the small untrained test model, UMAP on a handful of points
(fitted for real once per module; elsewhere ``fit_projection`` is replaced by a stand-in, since
what is tested is when the explorer fits, not how UMAP lays points out).
"""

import json
import shutil

import numpy as np
import pytest

from napari_cryoswan import explorer as explorer_module
from napari_cryoswan.explorer import (
    PROJECTION_DIR,
    ExplorerIndex,
    Projection,
    decode_rows,
    entry_layer_data,
    entry_layer_name,
    entry_metadata,
    find_similar,
    grid_translations,
    nearest_to_centre,
    place_query,
    projection_of,
    read_projection,
    rows_in_box,
    rows_in_polygon,
)
from napari_cryoswan.index import LatentIndexError, create_index, decode_entry, embed_maps, open_index
from napari_cryoswan.io import read_map, write_map
from napari_cryoswan.session import Session
from training import build_index

NAMES = ("alpha", "beta", "gamma", "emd_1234", "delta")


def asymmetric_map(seed: int, size: int = 32) -> np.ndarray:
    """Three Gaussian blobs of different sizes and weights: a shape with a well-defined pose."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3).astype(np.float32)
    box = np.zeros((size,) * 3, np.float32)
    for weight, width in zip((1.0, 0.7, 0.5), rng.uniform(1.5, 3.5, 3)):
        centre = size / 2 + rng.uniform(-6, 6, 3)
        box += weight * np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * width**2))
    return box.astype(np.float32)


def write_maps(folder, names=NAMES, *, origin=(0.0, 0.0, 0.0)):
    """The maps at 4 Å, and an exact copy of the first ('<name>_copy')."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        write_map(folder / f"{name}.mrc", asymmetric_map(seed), 4.0, origin)
    shutil.copy(folder / f"{names[0]}.mrc", folder / f"{names[0]}_copy.mrc")
    return folder


def build(folder, checkpoint, out) -> None:
    assert build_index.main(["--maps", str(folder), "--checkpoint", str(checkpoint), "--out", str(out),
                             "--device", "cpu", "--quiet"]) == 0


def stand_in_fit(vectors, *, seed=0, **kwargs):
    """A deterministic layout in place of UMAP: the first two principal components."""
    centred = np.asarray(vectors, np.float64) - np.mean(vectors, 0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    return (centred @ axes[:2].T + seed).astype(np.float32)


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    return write_maps(tmp_path_factory.mktemp("explorer_maps"), origin=(8.0, -12.0, 20.0))


@pytest.fixture(scope="module")
def built(maps, small_checkpoints, tmp_path_factory):
    """An index of the maps (and the copy), with its projection fitted by UMAP and stored."""
    out = tmp_path_factory.mktemp("explorer_index") / "index"
    build(maps, small_checkpoints["swan"], out)
    projection = projection_of(open_index(out))
    assert projection.origin == "fitted and stored"
    return out


@pytest.fixture
def index_copy(built, tmp_path):
    """A copy of the built index that a test may change."""
    return shutil.copytree(built, tmp_path / "index")


@pytest.fixture
def opened(built, swan):
    index = open_index(built)
    return ExplorerIndex(index, swan, "test index", read_projection(index))


def _cpu():
    import torch

    return torch.device("cpu")


# --- the projection stored with the index ---------------------------------------------------------


def test_the_projection_is_stored_with_the_index_and_reused_without_a_refit(built, monkeypatch):
    folder = built / PROJECTION_DIR
    assert {p.name for p in folder.iterdir()} == {"coords.npy", "hubs.json", "meta.json"}
    meta = json.loads((folder / "meta.json").read_text())
    index = open_index(built)
    assert meta["count"] == len(index) == 6 and meta["index_updated"] == index.manifest["updated"]
    assert meta["seed"] == 0 and meta["umap"] == {"n_neighbors": 15, "min_dist": 0.1}
    assert meta["hubs"]["min_size"] == 2 and meta["checkpoint_id"] == index.checkpoint_id
    assert np.load(folder / "coords.npy", allow_pickle=False).shape == (6, 2)

    monkeypatch.setattr("napari_cryoswan.projection.fit_projection",
                        lambda *a, **k: pytest.fail("the stored projection was refitted"))
    again = projection_of(open_index(built))
    assert again.origin == "stored" and again.note is None
    np.testing.assert_array_equal(again.coords, np.load(folder / "coords.npy"))
    assert again.labels.shape == (6,)


def test_the_projection_is_fitted_again_when_the_index_grows(index_copy, maps, small_checkpoints,
                                                             tmp_path, monkeypatch):
    monkeypatch.setattr("napari_cryoswan.projection.fit_projection", stand_in_fit)
    extra = write_maps(tmp_path / "more", ("epsilon",))
    assert build_index.main(["--maps", str(extra / "epsilon.mrc"), "--checkpoint", str(small_checkpoints["swan"]),
                             "--out", str(index_copy), "--device", "cpu", "--quiet"]) == 0
    grown = open_index(index_copy)
    assert read_projection(grown) is None  # fitted for 6 maps, the index holds 7
    projection = projection_of(grown)
    assert projection.origin == "fitted and stored" and projection.coords.shape == (7, 2)
    assert projection_of(open_index(index_copy)).origin == "stored"
    # another seed is another fit; no seed takes the stored one, whatever its seed
    assert projection_of(grown, seed=3).meta["seed"] == 3
    assert projection_of(open_index(index_copy)).meta["seed"] == 3


def test_a_projection_fitted_by_other_hub_rules_is_fitted_again(index_copy, monkeypatch):
    # A projection stored by an earlier version, whose hubs were found another way.
    monkeypatch.setattr("napari_cryoswan.projection.fit_projection", stand_in_fit)
    meta_file = index_copy / PROJECTION_DIR / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "hubs": {**meta["hubs"], "selection": "eom"}}))
    assert read_projection(open_index(index_copy)) is None
    assert projection_of(open_index(index_copy)).meta["hubs"]["selection"] == "leaf"


def test_a_damaged_projection_is_fitted_again(index_copy, monkeypatch):
    monkeypatch.setattr("napari_cryoswan.projection.fit_projection", stand_in_fit)
    coords = index_copy / PROJECTION_DIR / "coords.npy"
    coords.write_bytes(coords.read_bytes()[:-8])  # a write cut short
    assert read_projection(open_index(index_copy)) is None
    assert projection_of(open_index(index_copy)).origin == "fitted and stored"
    (index_copy / PROJECTION_DIR / "hubs.json").write_text("{not json")
    assert projection_of(open_index(index_copy)).origin == "fitted and stored"


def test_a_read_only_index_gets_a_projection_in_memory_and_says_so(index_copy, monkeypatch):
    monkeypatch.setattr("napari_cryoswan.projection.fit_projection", stand_in_fit)
    shutil.rmtree(index_copy / PROJECTION_DIR)

    def refuse(*args, **kwargs):  # what a read-only folder answers (root may write anywhere)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(explorer_module, "write_projection", refuse)
    projection = projection_of(open_index(index_copy))
    assert projection.origin == "fitted in memory" and projection.coords.shape == (6, 2)
    assert "read-only" in projection.note and "python -m napari_cryoswan.explorer" in projection.note
    assert not (index_copy / PROJECTION_DIR).exists()


def test_the_command_line_stores_a_projection(index_copy, monkeypatch, capsys):
    monkeypatch.setattr("napari_cryoswan.projection.fit_projection", stand_in_fit)
    assert explorer_module.main([str(index_copy), "--refit", "--seed", "2"]) == 0
    assert "6 maps" in capsys.readouterr().out
    assert read_projection(open_index(index_copy)).meta["seed"] == 2


# --- places, neighbours, selections ---------------------------------------------------------------


def test_a_query_lands_on_the_map_it_copies(opened):
    coords = opened.projection.coords
    np.testing.assert_allclose(place_query(opened.index, opened.projection, opened.index.embeddings[2]),
                               coords[2], atol=1e-5)
    # a little off: near that map, compared with how far apart the maps lie
    nudged = opened.index.embeddings[2] + 1e-3 * np.std(opened.index.embeddings)
    spread = np.ptp(coords, 0).max()
    assert np.linalg.norm(np.subtract(place_query(opened.index, opened.projection, nudged), coords[2])) < 0.1 * spread


def test_neighbours_start_with_the_map_itself_then_the_nearest(opened):
    alpha, copy = opened.find("alpha")
    hits = opened.neighbours(alpha, 3)
    assert [h.row for h in hits[:2]] == [alpha, copy] and hits[0].distance == 0.0
    assert hits[1].distance < 1e-4 < hits[2].distance <= hits[3].distance
    assert len(hits) == 4
    with pytest.raises(ValueError, match="outside this index of 6"):
        opened.neighbours(6, 3)


def test_find_by_name_id_or_row(opened):
    assert [opened.rows[r]["name"] for r in opened.find("EMD-1234")] == ["emd_1234"]
    assert opened.find("#3") == [3] and opened.find("#6") == [] and opened.find("3") == opened.find("1234")
    assert opened.find("no such map") == []
    assert "emd_1234 · EMD-1234 · " in opened.hover_text(opened.find("emd_1234")[0])


def test_hub_members_start_with_the_anchor(opened):
    from napari_cryoswan.projection import Hub

    hub = Hub(0, 4, (4, 1, 2), (0.0, 0.5, 0.7))
    opened.projection = Projection(opened.projection.coords, (hub,), opened.projection.meta)
    members = opened.hub_members(0)
    assert [m.row for m in members] == [4, 1, 2] and [m.distance for m in members] == [0.0, 0.5, 0.7]
    assert [m.row for m in opened.hub_members(0, limit=2)] == [4, 1]
    assert opened.projection.hub_of(1) == 0 and opened.projection.hub_of(3) is None
    assert "hub 0" in opened.hover_text(1) and "no hub" in opened.hover_text(3)
    with pytest.raises(ValueError, match="No hub 5"):
        opened.hub_members(5)


def test_lasso_and_box_selections():
    coords = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [5, 5]], np.float32)
    square = [(-0.5, -0.5), (1.5, -0.5), (1.5, 1.5), (-0.5, 1.5)]
    assert list(rows_in_polygon(coords, square)) == [0, 1, 2, 3]
    triangle = [(-0.5, -0.5), (2.0, -0.5), (-0.5, 2.0)]
    assert list(rows_in_polygon(coords, triangle)) == [0, 1, 3]
    assert list(rows_in_polygon(coords, square[:2])) == []  # not a polygon
    assert list(rows_in_box(coords, (6, 6), (0.5, -1))) == [1, 2, 4]
    assert nearest_to_centre(coords, [0, 1, 2, 3, 4], 2) == [2, 1]  # the median is (1, 1); ties by row


def test_boxes_laid_side_by_side():
    assert grid_translations(3, 10.0, start=(1, 2, 3)) == [(1, 2, 3), (1, 2, 13), (1, 2, 23)]
    grid = grid_translations(9, 10.0)
    assert grid[2] == (0, 0, 20) and grid[3] == (0, 10, 0) and grid[8] == (0, 20, 20)


def test_metadata_columns_to_colour_by(swan, tmp_path):
    rows = [{"key": f"k{i}", "name": f"m{i}", "split": ("train", "test")[i % 2], "mass_kda": 10.0 * i,
             "source_kind": "structure", "placement": None} for i in range(3)]
    explorer = ExplorerIndex(_index_of_boxes(swan, tmp_path / "index", rows), swan, "boxes")
    assert explorer.columns() == {"split": "category", "mass_kda": "number"}
    assert explorer.column_values("split") == ["train", "test", "train"]


# --- decoding -------------------------------------------------------------------------------------


def test_an_entry_with_a_placement_is_decoded_in_density_units_over_its_source(opened, maps, swan):
    from napari_cryoswan.preprocess import preprocess

    row = opened.find("beta")[0]
    (shown,) = decode_rows(opened, [row], device=_cpu())
    placement = opened.rows[row]["placement"]
    assert shown.units == "density" and shown.voxel_size == 4.0 and shown.distance is None
    assert shown.origin == tuple(placement["box_origin"])
    # the box that preprocessing cut from the map file, where the file's origin puts it
    record = preprocess(read_map(maps / "beta.mrc"), swan.contract.settings()).record
    np.testing.assert_allclose(shown.origin, record.box_origin)
    np.testing.assert_allclose(shown.data, decode_entry(opened.index, row, swan, denormalise=True), atol=1e-6)
    assert abs(float(shown.data.mean()) - placement["mean"]) < 0.5 * placement["std"]

    hits = opened.neighbours(row, 2)
    decoded = decode_rows(opened, hits, device=_cpu())
    assert [d.row for d in decoded] == [h.row for h in hits]
    assert decoded[0].distance == 0.0 and decoded[1].distance == pytest.approx(hits[1].distance)
    metadata = entry_metadata(opened, decoded[1], rank=1, opened_as="neighbours", set_id=3)
    assert metadata["explorer"]["row"] == hits[1].row and metadata["explorer"]["rank"] == 1
    assert metadata["explorer"]["distance"] == pytest.approx(hits[1].distance)
    assert metadata["checkpoint_id"] == swan.checkpoint_id and metadata["model"] == "swan"
    assert metadata["source"] == hits[1].entry["source"] and metadata["index_entry"]["key"] == hits[1].entry["key"]
    name = entry_layer_name(decoded[1], 1)
    assert name.startswith("#1 ") and name.endswith(f"d={hits[1].distance:.2f}")
    assert entry_layer_name(decoded[0], 0) == "#0 beta"
    data, kwargs, kind = entry_layer_data(decoded[1], name=name, metadata=metadata, translate=(1.0, 2.0, 3.0))
    assert kind == "image" and kwargs["translate"] == (1.0, 2.0, 3.0) and kwargs["scale"] == (4.0,) * 3
    assert kwargs["metadata"]["explorer"]["set"] == 3


def test_an_entry_without_a_placement_is_decoded_zscored_at_the_origin(swan, tmp_path):
    rows = [{"key": f"corpus/k{i}", "name": f"box{i}", "placement": None} for i in range(2)]
    explorer = ExplorerIndex(_index_of_boxes(swan, tmp_path / "index", rows), swan, "boxes")
    shown = decode_rows(explorer, [1], device=_cpu())[0]
    assert shown.units == "z-score" and shown.origin == (0.0, 0.0, 0.0) and shown.voxel_size == 4.0
    np.testing.assert_allclose(shown.data, decode_entry(explorer.index, 1, swan), atol=1e-6)


def _index_of_boxes(swan, folder, rows):
    """An index of preprocessed boxes (as a corpus gives them), with the rows given."""
    boxes = np.stack([_zscored(np.pad(asymmetric_map(10 + i), 16)) for i in range(len(rows))])
    embedded = embed_maps(swan, boxes, device=_cpu())
    index = create_index(folder, swan, layout=embedded.layout, embedding_dim=embedded.embeddings.shape[1],
                         embedding_version=embedded.embedding_version)
    index.add(embedded.embeddings, embedded.codes, rows)
    return index


def _zscored(box):
    return ((box - box.mean()) / box.std()).astype(np.float32)


# --- finding similar maps -------------------------------------------------------------------------


def test_find_similar_ranks_a_maps_exact_copy_first(opened, maps):
    stages = []
    result = find_similar(opened, read_map(maps / "gamma.mrc"), k=3, device=_cpu(),
                          stage=lambda done, total, message: stages.append((done, total, message)))
    gamma = opened.find("gamma")[0]
    assert result.neighbours[0].row == gamma and result.neighbours[0].distance < 1e-4
    assert len(result.maps) == 3 and result.maps[0].row == gamma and result.maps[0].units == "density"
    np.testing.assert_allclose(result.xy, opened.projection.coords[gamma], atol=1e-2 * np.ptp(opened.projection.coords))
    assert result.record.box == 64 and stages[-1][2] == "done"
    assert any("decoding" in message for _, _, message in stages)
    assert not any("near copy" in note for note in result.notes)  # it has one: no warning


def test_find_similar_finds_a_rotated_copy_with_the_bundled_model(tmp_path, monkeypatch):
    """The bundled encoder's embedding (an untrained one's features swing with any change)."""
    from napari_cryoswan.io import DensityMap

    monkeypatch.setattr("napari_cryoswan.projection.fit_projection", stand_in_fit)
    folder = write_maps(tmp_path / "maps", ("one", "two", "three", "four"))
    (folder / "one_copy.mrc").unlink()
    build(folder, "bundled:swan", tmp_path / "index")
    session = Session("cpu")
    opened = session.open_index(tmp_path / "index")  # the index names its bundled checkpoint
    assert opened.index.manifest["checkpoint"]["bundled"] == "swan"
    turned = np.ascontiguousarray(np.rot90(asymmetric_map(2), 1, axes=(0, 2)))
    result = session.find_similar(DensityMap(turned, (4.0,) * 3), opened, 2, decode=False)
    assert result.neighbours[0].entry["name"] == "three" and result.maps == []
    assert opened.projection is not None  # explored on the way


# --- the session's use cases ----------------------------------------------------------------------


def test_the_session_opens_an_index_once_and_refuses_another_checkpoint(built, small_checkpoints):
    session = Session("cpu")
    with pytest.raises(LatentIndexError, match="swan.pt.*not a bundled one: choose that checkpoint file"):
        session.open_index(built)
    opened = session.open_index(built, small_checkpoints["swan"])
    assert session.open_index(built, small_checkpoints["swan"]) is opened
    assert session.open_index(built) is not None  # its checkpoint is loaded now: found by its id
    with pytest.raises(LatentIndexError, match=r"built with the checkpoint swan.pt .*not with swan-rq1.pt"):
        session.open_index(built, small_checkpoints["swan-rq1"])
    projection = session.explore(opened)
    assert projection.origin == "stored" and session.explore(opened) is projection
    assert opened.describe().startswith(f"index: 6 maps, swan swan.pt ({opened.index.checkpoint_id})")


def test_the_session_opens_neighbours_as_decoded_maps(built, small_checkpoints):
    session = Session("cpu")
    opened = session.open_index(built, small_checkpoints["swan"])
    session.explore(opened)
    beta = opened.find("beta")[0]
    decoded = session.open_neighbours(opened, opened.neighbours(beta, 2))
    assert decoded[0].row == beta and len(decoded) == 3 and decoded[0].distance == 0 < decoded[1].distance


def test_a_missing_or_foreign_folder_says_what_it_is(tmp_path, monkeypatch):
    session = Session("cpu")
    with pytest.raises(LatentIndexError, match="no such folder"):
        session.open_index(tmp_path / "nope")
    with pytest.raises(LatentIndexError, match="not a latent index"):
        session.open_index(tmp_path)

    def no_bundled_index():
        raise LatentIndexError("No latent index ships with this build of napari-cryoswan.")

    monkeypatch.setattr("napari_cryoswan.index.bundled_index_path", no_bundled_index)
    with pytest.raises(LatentIndexError, match="No latent index ships"):
        session.open_index(None)
