"""Projection, placement and hubs: read as usage examples of napari_cryoswan.projection.

Few UMAP fits (each is single-threaded numba work): one module-scoped projection of a small
synthetic corpus serves most tests.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from napari_cryoswan.projection import (
    Hub,
    compare_labelings,
    find_hubs,
    fit_projection,
    hub_labels,
    hub_stability,
    partner_jaccard,
    place,
)

DIMS = 16
SIZES = (40, 40, 55, 70)  # clusters 0 and 1 are mirror images of each other about their midpoint
N_NOISE = 12


@pytest.fixture(scope="module")
def corpus():
    """Four well-separated Gaussian clusters in 16-D, then a dozen lone maps far from all."""
    rng = np.random.default_rng(7)
    centres = rng.normal(0.0, 1.0, (len(SIZES), DIMS)) * 4.0
    spread = 0.3
    first = centres[0] + spread * rng.normal(size=(SIZES[0], DIMS))
    midpoint_01 = (centres[0] + centres[1]) / 2
    parts = [first, 2 * midpoint_01 - first]  # mirrored: a query at the midpoint has twin neighbours
    parts += [centres[c] + spread * rng.normal(size=(size, DIMS)) for c, size in enumerate(SIZES) if c >= 2]
    noise = rng.uniform(-15.0, 15.0, (N_NOISE, DIMS))
    vectors = np.concatenate(parts + [noise]).astype(np.float32)
    truth = np.concatenate([np.full(size, c) for c, size in enumerate(SIZES)] + [np.full(N_NOISE, -1)])
    order = rng.permutation(len(vectors))  # hubs must not rely on rows arriving grouped
    return {"vectors": vectors[order], "truth": truth[order], "midpoint_01": midpoint_01.astype(np.float32)}


@pytest.fixture(scope="module")
def coords(corpus):
    return fit_projection(corpus["vectors"], seed=0)


@pytest.fixture(scope="module")
def hubs(corpus, coords):
    return find_hubs(corpus["vectors"], coords, min_size=5)


# ─── fit_projection ──────────────────────────────────────────────────────────────────────────


def test_projection_is_2d_float32_and_deterministic_for_a_seed(corpus, coords):
    assert coords.shape == (len(corpus["vectors"]), 2)
    assert coords.dtype == np.float32
    assert np.isfinite(coords).all()
    np.testing.assert_array_equal(fit_projection(corpus["vectors"], seed=0), coords)


@pytest.mark.parametrize("n_maps", [1, 2, 3, 4, 7, 17])
def test_tiny_inputs_get_a_layout_not_a_crash(n_maps):
    vectors = np.random.default_rng(n_maps).normal(size=(n_maps, 8)).astype(np.float32)
    coords = fit_projection(vectors, seed=3)
    assert coords.shape == (n_maps, 2) and coords.dtype == np.float32
    assert np.isfinite(coords).all()
    np.testing.assert_array_equal(fit_projection(vectors, seed=3), coords)
    assert find_hubs(vectors, coords, min_size=5) == [] or n_maps >= 5
    placed = place(vectors[:1], vectors, coords)
    np.testing.assert_array_equal(placed[0], coords[0])


# ─── hubs ────────────────────────────────────────────────────────────────────────────────────


def test_separated_clusters_become_separate_hubs(corpus, hubs):
    truth = corpus["truth"]
    assert len(hubs) == len(SIZES)
    found = set()
    for hub in hubs:
        clusters = set(truth[list(hub.members)])
        assert len(clusters) == 1, f"hub {hub.id} mixes clusters {clusters}"
        cluster = clusters.pop()
        assert cluster >= 0, "noise maps formed a hub"
        assert hub.size >= 0.9 * SIZES[cluster]
        found.add(cluster)
    assert found == set(range(len(SIZES)))
    assert [hub.id for hub in hubs] == list(range(len(hubs)))
    assert [hub.size for hub in hubs] == sorted((hub.size for hub in hubs), reverse=True)


def test_anchor_is_the_medoid_by_brute_force(corpus, hubs):
    vectors = corpus["vectors"].astype(np.float64)
    for hub in hubs:
        members = vectors[list(hub.members)]
        totals = [sum(np.linalg.norm(a - b) for b in members) for a in members]
        assert hub.anchor in hub.members
        assert totals[hub.members.index(hub.anchor)] == pytest.approx(min(totals), rel=1e-9)


def test_members_are_ranked_by_embedding_distance_to_the_anchor(corpus, hubs):
    vectors = corpus["vectors"].astype(np.float64)
    for hub in hubs:
        assert hub.members[0] == hub.anchor and hub.distances[0] == 0.0
        assert list(hub.distances) == sorted(hub.distances)
        expected = np.linalg.norm(vectors[list(hub.members)] - vectors[hub.anchor], axis=1)
        np.testing.assert_allclose(hub.distances, expected, rtol=1e-9)
        assert len(set(hub.members)) == hub.size


def test_lone_maps_belong_to_no_hub(corpus, hubs):
    labels = hub_labels(hubs, len(corpus["vectors"]))
    assert labels.shape == (len(corpus["vectors"]),)
    assert (labels[corpus["truth"] < 0] == -1).all()
    for hub in hubs:
        assert (labels[list(hub.members)] == hub.id).all()


def test_hubs_can_be_found_in_the_embedding_itself(corpus):
    hubs = find_hubs(corpus["vectors"], None, min_size=5, cluster_on="embedding")
    labels = hub_labels(hubs, len(corpus["vectors"]))
    assert len(hubs) == len(SIZES)
    assert (labels[corpus["truth"] < 0] == -1).all()


def test_leaf_selection_splits_a_group_into_its_dense_parts():
    # Two far groups, each three tight clumps close together: HDBSCAN's default ("eom") keeps
    # the two groups, "leaf" their dense parts, none of which straddles the two groups.
    rng = np.random.default_rng(0)
    clumps = 0.2 * np.array([[0, 0], [1, 0], [0.5, 0.9]])
    centres = np.concatenate([clumps, clumps + [20, 0]])
    points = np.concatenate([centre + rng.normal(0, 0.05, (20, 2)) for centre in centres])
    group = np.repeat([0, 1], 60)
    coarse = find_hubs(points, None, min_size=5, cluster_on="embedding")
    fine = find_hubs(points, None, min_size=5, cluster_on="embedding", selection="leaf")
    assert sorted(len(hub.members) for hub in coarse) == [60, 60]
    assert len(fine) > 2 and all(len(set(group[list(hub.members)])) == 1 for hub in fine)
    with pytest.raises(ValueError, match="selection"):
        find_hubs(points, None, cluster_on="embedding", selection="biggest")


def test_a_far_map_that_the_picture_puts_inside_a_group_is_not_a_member():
    # Coordinates made by hand: 20 maps in one tight spot on the picture, as UMAP might draw
    # them, but map 0 is far from the others in the embedding (UMAP glued it on). 32-D, as
    # embeddings are: distances concentrate, so the rule trims no genuine member here.
    rng = np.random.default_rng(1)
    vectors = rng.normal(0.0, 0.1, (40, 32))
    vectors[20:] += 10.0  # a second group, so HDBSCAN has two clusters to choose
    vectors[0] += 0.2  # twice as far from the rest as they are from each other
    coords = np.concatenate([rng.normal(0, 0.05, (20, 2)), rng.normal(5, 0.05, (20, 2))])
    checked = find_hubs(vectors, coords, min_size=5)
    unchecked = find_hubs(vectors, coords, min_size=5, max_mads=None)
    assert 0 in np.flatnonzero(hub_labels(unchecked, 40) >= 0)
    assert hub_labels(checked, 40)[0] == -1
    assert (hub_labels(checked, 40)[1:] >= 0).all()


def test_hub_survives_json(hubs):
    for hub in hubs:
        record = json.loads(json.dumps(hub.to_dict()))
        assert Hub.from_dict(record) == hub
    with pytest.raises(ValueError, match="not a hub record"):
        Hub.from_dict({"id": 0, "anchor": 3})
    with pytest.raises(ValueError, match="anchor"):
        Hub(id=0, anchor=3, members=(1, 3), distances=(0.0, 1.0))


def test_hub_labels_refuse_hubs_from_another_index():
    hub = Hub(id=0, anchor=1, members=(1, 9), distances=(0.0, 1.0))
    with pytest.raises(ValueError, match="outside"):
        hub_labels([hub], 5)
    with pytest.raises(ValueError, match="overlap"):
        hub_labels([hub, Hub(id=1, anchor=9, members=(9,), distances=(0.0,))], 10)


# ─── place ───────────────────────────────────────────────────────────────────────────────────


def test_an_indexed_map_lands_on_its_own_point(corpus, coords):
    rows = [0, 17, 123]
    placed = place(corpus["vectors"][rows], corpus["vectors"], coords)
    assert placed.shape == (3, 2)
    np.testing.assert_array_equal(placed, coords[rows])


def test_a_map_between_two_clusters_lands_between_them(corpus, coords):
    truth = corpus["truth"]
    centre_0, centre_1 = coords[truth == 0].mean(0), coords[truth == 1].mean(0)
    placed = place(corpus["midpoint_01"][None], corpus["vectors"], coords)[0]
    along = np.dot(placed - centre_0, centre_1 - centre_0) / np.dot(centre_1 - centre_0, centre_1 - centre_0)
    assert 0.25 < along < 0.75


def test_placement_is_an_inverse_distance_weighted_mean():
    vectors = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    coords = np.array([[0.0, 0.0], [4.0, 2.0], [100.0, 100.0]])
    placed = place(np.array([[0.25, 0.0], [0.5, 0.0]]), vectors, coords, k=2)
    # distances 0.25 and 0.75: weights 4 and 4/3, i.e. 3/4 and 1/4
    np.testing.assert_allclose(placed, [[1.0, 0.5], [2.0, 1.0]], rtol=1e-6)
    assert place(vectors[:1], vectors, coords, k=50).shape == (1, 2)  # k larger than the index


# ─── stability ───────────────────────────────────────────────────────────────────────────────


def test_partner_jaccard_by_hand():
    a = np.array([0, 0, 0, 1, 1, -1, -1])
    b = np.array([5, 5, 2, 2, 2, -1, 3])
    # map 0: {1,2} vs {1} → 1/2; map 2: {0,1} vs {3,4} → 0; map 3: {4} vs {2,4} → 1/2;
    # map 5: alone in both → 1; map 6: alone, then in a hub of one (no partners) → 1
    np.testing.assert_allclose(partner_jaccard(a, b), [0.5, 0.5, 0.0, 0.5, 0.5, 1.0, 1.0])


def test_relabelled_hubs_are_the_same_hubs():
    a = np.array([0, 0, 1, 1, -1, -1])
    summary = compare_labelings([a, np.array([1, 1, 0, 0, -1, -1])], names=["x", "y"])
    assert summary["ari_mean"] == pytest.approx(1.0)
    assert summary["partner_jaccard_mean"] == 1.0
    assert summary["pair_ari"] == [["x", "y", pytest.approx(1.0)]]
    # two runs that agree only on which maps are noise do not score as agreeing hubs
    assert compare_labelings([a, np.array([0, 1, 0, 1, -1, -1])])["ari_mean"] < 0.5


def test_hub_stability_across_seeds(corpus):
    report = hub_stability(corpus["vectors"], seeds=(0, 1), min_size=5)
    json.dumps(report)  # plain types only
    assert report["seeds"] == [0, 1] and report["n_hubs"] == [4, 4]
    assert report["ari_min"] > 0.95
    assert report["partners_kept_share"] > 0.95
    seedless = hub_stability(corpus["vectors"], seeds=(0, 1), cluster_on="embedding")
    assert seedless["ari_min"] == pytest.approx(1.0)


# ─── bad input ───────────────────────────────────────────────────────────────────────────────


def test_bad_input_is_refused_with_a_reason(corpus, coords):
    vectors = corpus["vectors"]
    with_nan = vectors.copy()
    with_nan[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 row\(s\) \(3\)"):
        fit_projection(with_nan)
    with pytest.raises(ValueError, match="2-D"):
        fit_projection(vectors[0])
    with pytest.raises(ValueError, match="empty"):
        fit_projection(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="8 dimensions but the index has 16"):
        place(vectors[:2, :8], vectors, coords)
    with pytest.raises(ValueError, match=r"coords must have shape"):
        place(vectors[:2], vectors, coords[:10])
    with pytest.raises(ValueError, match="NaN"):
        place(with_nan[3:4], vectors, coords)
    with pytest.raises(ValueError, match="cluster_on"):
        find_hubs(vectors, coords, cluster_on="umap")
    with pytest.raises(ValueError, match="needs coords"):
        find_hubs(vectors)
    with pytest.raises(ValueError, match="min_size"):
        find_hubs(vectors, coords, min_size=1)
    with pytest.raises(ValueError, match="seeds"):
        hub_stability(vectors, seeds=(1, 1))


def test_importing_the_module_loads_neither_umap_nor_sklearn():
    code = ("import sys, napari_cryoswan.projection; "
            "print(sorted(m for m in ('umap', 'sklearn', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
