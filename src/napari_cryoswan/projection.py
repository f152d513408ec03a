"""The latent explorer's core: a 2-D UMAP of map embeddings, placing new maps on it, and hubs.

Inputs are (N, D) float embedding vectors (see ``embedding.py``), compared by Euclidean
distance. Every function here is pure (arrays in, arrays or small frozen dataclasses out), so
an index folder can store what they return as plain arrays and JSON beside its embeddings and
recompute any of it later. Nothing is pickled: not a UMAP model, not a clusterer.

- ``fit_projection(vectors)`` → (N, 2) float32 UMAP coordinates, deterministic for a seed.
- ``place(query_vectors, vectors, coords)`` → (M, 2): new maps on an existing projection,
  without refitting (inverse-distance-weighted mean of the k nearest indexed maps' coordinates).
- ``find_hubs(vectors, coords)`` → ``list[Hub]``: dense groups of geometrically similar maps,
  as the paper calls them (Fig. 3d). A hub's anchor is a real map, the medoid of its members,
  never a centroid; maps in no dense group belong to no hub.
- ``hub_labels(hubs, n)`` → (N,) int, -1 for no hub.
- ``hub_stability(vectors, seeds=...)`` → how much the hubs depend on the UMAP seed;
  ``compare_labelings(labelings)`` is the same summary for labels you already have.

How hubs are found, and why (numbers from ``benchmarks/bench_hubs.py``: 20 synthetic 64-D
clusters plus 10% noise maps, N = 2,000 unless said, default settings, 5 UMAP seeds):
- HDBSCAN runs on the 2-D projection by default (``cluster_on="projection"``). The picture is
  what the user sees, so hubs agree with it; HDBSCAN on 2-D points uses a k-d tree, where on
  64+ dimensions it is near-quadratic; and it recovers the true clusters far better: ARI 0.995
  vs 0.71 on well-separated clusters, 0.74 vs 0.11 on tangled ones (0.82 at N = 50,000),
  because density is a weak signal in high dimensions. ``cluster_on="embedding"`` is the
  seed-free alternative (stability 1.0 by construction) for those who value that over recovery.
- The price is that hubs move with the UMAP seed (and with the order of the rows): the
  adjusted Rand index between seeds is 0.998 on well-separated clusters and 0.83–0.90 on
  tangled ones; ``hub_stability`` measures it on your data. Where the embedding itself does
  not separate the clusters, neither way finds them (ARI < 0.2) and hubs are unstable.
- Membership is then checked in the embedding (``max_mads``): UMAP has to put every map
  somewhere, and maps like nothing else land on the edges of groups. On the picture alone
  4–55% of the noise maps stay out of hubs; with the check 98–100%, for a loss of 0.3–6% of the
  genuine members, and recovery and stability both improve.
- Anchors and member rankings are always computed in the embedding: geometric similarity is an
  embedding distance, not a distance on the picture.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

ClusterSpace = Literal["projection", "embedding"]
CLUSTER_SPACES = ("projection", "embedding")
HubSelection = Literal["eom", "leaf"]
HUB_SELECTIONS = ("eom", "leaf")

# HDBSCAN's min_samples for hubs: the density scale. The default matches fit_projection's
# n_neighbors, because a UMAP layout holds no trustworthy structure finer than one neighbourhood:
# with HDBSCAN's own default (min_samples = min_size = 5), 50,000 synthetic maps in 20 clusters
# split into ~1,800 hubs that change with the seed (ARI vs truth 0.32); with 15, into ~60 (0.82).
HUB_MIN_SAMPLES = 15

# Pairwise distances are computed in blocks of about this many float64 values (~64 MB), so
# 50,000 maps never need an N × N matrix.
_BLOCK_VALUES = 8_000_000


# ─── validation ──────────────────────────────────────────────────────────────────────────────


def _as_vectors(vectors, name: str = "vectors", *, dims: int | None = None) -> np.ndarray:
    """``vectors`` as a finite (N, D) float array, or a ValueError that says what is wrong."""
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, one row per map; got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); it needs at least one map and one dimension")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers; got dtype {array.dtype}")
    if dims is not None and array.shape[1] != dims:
        raise ValueError(f"{name} has {array.shape[1]} dimensions but the index has {dims}; "
                         "were they embedded with the same checkpoint and recipe?")
    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad_rows.size:
        shown = ", ".join(str(i) for i in bad_rows[:5]) + (", …" if bad_rows.size > 5 else "")
        raise ValueError(f"{name} has NaN or infinite values in {bad_rows.size} row(s) ({shown}); "
                         "re-embed those maps or leave them out")
    return array


def _as_coords(coords, n: int, name: str = "coords") -> np.ndarray:
    """``coords`` as a finite (n, 2) array matching n maps."""
    array = _as_vectors(coords, name)
    if array.shape != (n, 2):
        raise ValueError(f"{name} must have shape ({n}, 2), one 2-D point per map; got {array.shape}")
    return array


def _positive_int(value, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}; got {value!r}")
    return int(value)


# ─── distances ───────────────────────────────────────────────────────────────────────────────


def _squared_distances(a: np.ndarray, b: np.ndarray, dtype=np.float64) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances, clipped at 0.

    float64 by default because the expansion |a|² − 2a·b + |b|² cancels badly in float32: two
    identical unit vectors come out ~1e-4 apart, enough to reorder close neighbours. float32
    is for shortlisting candidates whose distances are then computed exactly.
    """
    a = a.astype(dtype, copy=False)
    b = b.astype(dtype, copy=False)
    squared = a @ b.T
    squared *= -2.0
    squared += np.einsum("ij,ij->i", a, a)[:, None]  # einsum: no N × D temporary for the norms
    squared += np.einsum("ij,ij->i", b, b)[None, :]
    return np.maximum(squared, 0.0, out=squared)


def _row_blocks(n_rows: int, n_columns: int):
    """Slices over n_rows so that each block × n_columns stays near _BLOCK_VALUES."""
    step = max(1, _BLOCK_VALUES // max(1, n_columns))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _nearest(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (M, k) of each query's k nearest vectors, nearest first, and their exact distances.

    A shortlist of 2k candidates comes from the float32 expansion (one pass over the index,
    without copying it to float64: a single query against 50,000 maps is a few milliseconds);
    their distances are then computed directly as |q − v| in float64, so that a query equal to
    an indexed vector is exactly 0 away from it and close neighbours keep their true order.
    """
    shortlist = min(len(vectors), 2 * k)
    indices = np.empty((len(queries), k), dtype=np.intp)
    distances = np.empty((len(queries), k), dtype=np.float64)
    for rows in _row_blocks(len(queries), max(len(vectors), shortlist * vectors.shape[1])):
        squared = _squared_distances(queries[rows], vectors, dtype=np.float32)
        if shortlist < len(vectors):
            candidates = np.argpartition(squared, shortlist - 1, axis=1)[:, :shortlist]
        else:
            candidates = np.broadcast_to(np.arange(len(vectors)), squared.shape).copy()
        differences = vectors[candidates].astype(np.float64) - queries[rows, None, :].astype(np.float64)
        exact = np.sqrt((differences * differences).sum(-1))
        order = np.argsort(exact, axis=1, kind="stable")[:, :k]
        indices[rows] = np.take_along_axis(candidates, order, 1)
        distances[rows] = np.take_along_axis(exact, order, 1)
    return indices, distances


# ─── projection ──────────────────────────────────────────────────────────────────────────────


def fit_projection(vectors, *, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """UMAP of the embeddings to 2-D, the latent explorer's picture.

    Deterministic for a seed: umap-learn with ``random_state`` runs single-threaded and gives
    the same layout on the same machine and versions (slower than its parallel mode; at 50,000
    maps this is the price of a reproducible index).

    Small inputs are handled rather than refused: ``n_neighbors`` shrinks to N − 1 when there
    are fewer maps than neighbours; under 16 maps the layout starts from a random init, because
    UMAP's spectral init needs more points than eigenvectors; 2 or fewer maps get a trivial
    layout (the first at (0, 0), the second at (1, 0)).

    Shape:
        vectors: (N, D) → (N, 2) float32.
    """
    vectors = _as_vectors(vectors)
    seed = _positive_int(seed, "seed", minimum=0)
    n_neighbors = _positive_int(n_neighbors, "n_neighbors", minimum=2)
    if not 0.0 <= float(min_dist):
        raise ValueError(f"min_dist must be ≥ 0; got {min_dist!r}")
    n_maps = len(vectors)
    if n_maps <= 2:
        return np.array([[0.0, 0.0], [1.0, 0.0]][:n_maps], dtype=np.float32)

    import umap  # heavy (numba); only when a projection is asked for

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(n_neighbors, n_maps - 1),
        min_dist=float(min_dist),
        metric="euclidean",
        random_state=seed,
        n_jobs=1,  # what random_state forces anyway; saying so silences umap's warning
        init="spectral" if n_maps >= 16 else "random",
    )
    with warnings.catch_warnings():
        # A kNN graph of well-separated groups is disconnected; UMAP lays the pieces out itself.
        warnings.filterwarnings("ignore", message=".*Graph is not fully connected.*")
        coords_N2 = reducer.fit_transform(vectors.astype(np.float32, copy=False))
    return np.ascontiguousarray(coords_N2, dtype=np.float32)


def place(query_vectors, vectors, coords, *, k: int = 10) -> np.ndarray:
    """Where new maps fall on an existing projection, without refitting it.

    Each query lands at the inverse-distance-weighted mean of the coordinates of its k nearest
    indexed maps (Euclidean, in the embedding). UMAP's own ``transform`` starts the same way
    (a mean of the neighbours' positions, weighted by fuzzy membership rather than 1/d) before
    it optimises; this needs only the arrays an index stores, not a pickled UMAP model, and
    never moves the indexed maps.
    A query equal to an indexed vector lands exactly on that map's point (several equal ones:
    on their mean). The point is a weighted mean, so it lies inside the hull of its neighbours:
    a map unlike anything indexed lands between its nearest maps rather than off on its own.

    Shape:
        query_vectors: (M, D); vectors: (N, D); coords: (N, 2) → (M, 2) float32.
    """
    vectors = _as_vectors(vectors)
    queries = _as_vectors(query_vectors, "query_vectors", dims=vectors.shape[1])
    coords = _as_coords(coords, len(vectors))
    k = min(_positive_int(k, "k"), len(vectors))

    neighbours_Mk, distances_Mk = _nearest(queries, vectors, k)
    exact_Mk = distances_Mk == 0.0
    with np.errstate(divide="ignore"):
        weights_Mk = np.where(exact_Mk.any(1, keepdims=True), exact_Mk.astype(np.float64), 1.0 / distances_Mk)
    weights_Mk /= weights_Mk.sum(1, keepdims=True)
    placed_M2 = (weights_Mk[:, :, None] * coords[neighbours_Mk].astype(np.float64)).sum(1)
    return placed_M2.astype(np.float32)


# ─── hubs ────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Hub:
    """A dense group of geometrically similar maps.

    ``anchor`` is the row of the member with the least total embedding distance to the other
    members (the medoid: a real map, which the explorer can open). ``members`` are rows ranked
    by embedding distance to the anchor, the anchor first; ``distances`` go with them.
    """

    id: int
    anchor: int
    members: tuple[int, ...]
    distances: tuple[float, ...]

    def __post_init__(self):
        if len(self.members) != len(self.distances):
            raise ValueError(f"hub {self.id}: {len(self.members)} members but {len(self.distances)} distances")
        if not self.members or self.members[0] != self.anchor:
            raise ValueError(f"hub {self.id}: the anchor ({self.anchor}) must be the first member")

    @property
    def size(self) -> int:
        return len(self.members)

    def to_dict(self) -> dict:
        """Plain JSON types only."""
        return {"id": int(self.id), "anchor": int(self.anchor),
                "members": [int(m) for m in self.members],
                "distances": [float(d) for d in self.distances]}

    @classmethod
    def from_dict(cls, data: dict) -> Hub:
        try:
            return cls(id=int(data["id"]), anchor=int(data["anchor"]),
                       members=tuple(int(m) for m in data["members"]),
                       distances=tuple(float(d) for d in data["distances"]))
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a hub record ({error!r}); expected id, anchor, members, distances") from error


def _medoid(members_vectors: np.ndarray) -> int:
    """Position (within the given rows) of the one with the least total distance to the rest."""
    totals = np.empty(len(members_vectors))
    for rows in _row_blocks(len(members_vectors), len(members_vectors)):
        totals[rows] = np.sqrt(_squared_distances(members_vectors[rows], members_vectors)).sum(1)
    return int(np.argmin(totals))  # ties: the lowest row, so the choice is reproducible


def _distances_to(rows: np.ndarray, anchor: int, vectors: np.ndarray) -> np.ndarray:
    differences = vectors[rows].astype(np.float64) - vectors[anchor].astype(np.float64)
    return np.sqrt((differences * differences).sum(1))


def _hub_from_rows(hub_id: int, rows: np.ndarray, vectors: np.ndarray, *, min_size: int,
                   max_mads: float | None) -> Hub | None:
    """The hub of these rows: medoid anchor, far outliers dropped, members ranked; None if too few remain."""
    anchor = int(rows[_medoid(vectors[rows])])
    if max_mads is not None:
        # UMAP has to put every map somewhere, and a map like nothing else often lands on the
        # edge of a dense group. A hub is about geometric similarity, so membership is checked
        # in the embedding: a member far further from the anchor than is usual in this hub
        # (median + max_mads robust standard deviations) is not similar enough to belong.
        distances = _distances_to(rows, anchor, vectors)
        median = np.median(distances)
        robust_sd = 1.4826 * np.median(np.abs(distances - median))
        rows = rows[distances <= median + max_mads * robust_sd]
        if len(rows) < min_size:
            return None
        anchor = int(rows[_medoid(vectors[rows])])  # the medoid of the members that stay
    distances = _distances_to(rows, anchor, vectors)
    # by distance, then the anchor before any duplicate of it, then by row: one fixed order
    order = np.lexsort((rows, rows != anchor, distances))
    return Hub(id=hub_id, anchor=anchor, members=tuple(int(r) for r in rows[order]),
               distances=tuple(float(d) for d in distances[order]))


def cluster_labels(points, *, min_size: int = 5, min_samples: int | None = HUB_MIN_SAMPLES,
                   selection: HubSelection = "eom") -> np.ndarray:
    """HDBSCAN labels of the points (N, d): -1 for noise, else a group number.

    ``min_size`` is HDBSCAN's ``min_cluster_size``: the smallest hub. ``min_samples`` is the
    density scale (see HUB_MIN_SAMPLES; None: HDBSCAN's default, ``min_size``): larger smooths
    more and calls more points noise; smaller finds smaller hubs, which move more with the seed.
    ``selection`` is HDBSCAN's ``cluster_selection_method``: "eom" keeps the most persistent
    groups, which can be one group that holds most points when the density has no deep valleys;
    "leaf" keeps the finest dense groups of the hierarchy.
    """
    points = _as_vectors(points, "points")
    min_size = _positive_int(min_size, "min_size", minimum=2)
    min_samples = min_size if min_samples is None else _positive_int(min_samples, "min_samples")
    if selection not in HUB_SELECTIONS:
        raise ValueError(f"selection must be one of {HUB_SELECTIONS}; got {selection!r}")
    if len(points) < min_size:
        return np.full(len(points), -1, dtype=np.intp)  # too few maps for any hub

    from sklearn.cluster import HDBSCAN

    clusterer = HDBSCAN(min_cluster_size=min_size, min_samples=min(min_samples, len(points) - 1) or 1,
                        metric="euclidean", cluster_selection_method=selection, copy=True)
    return clusterer.fit_predict(points.astype(np.float64, copy=False)).astype(np.intp)


def find_hubs(vectors, coords=None, *, min_size: int = 5, min_samples: int | None = HUB_MIN_SAMPLES,
              cluster_on: ClusterSpace = "projection", max_mads: float | None = 3.0,
              selection: HubSelection = "eom") -> list[Hub]:
    """Hubs: dense groups of geometrically similar maps (the paper's Fig. 3d), largest first.

    HDBSCAN (scikit-learn) finds the groups, on the 2-D ``coords`` (``cluster_on="projection"``,
    the default; see the module docstring for why) or on the ``vectors`` themselves
    (``cluster_on="embedding"``, where ``coords`` may be None). Maps in no dense group belong
    to no hub. Each hub's anchor is its medoid in the embedding, and its members are ranked by
    embedding distance to the anchor.

    Membership is then checked in the embedding: a member whose distance to the anchor exceeds
    the hub's median distance by more than ``max_mads`` robust standard deviations (1.4826 ×
    the median absolute deviation) is dropped, and the anchor recomputed over the members that
    stay; a hub left with fewer than ``min_size`` members is dissolved. On the benchmark's data
    this keeps 98–100% of the noise maps out of hubs, where HDBSCAN on the picture alone keeps
    4–55% out (module docstring). In few dimensions, where distances spread more, it also trims
    some genuine members of a Gaussian tail. ``max_mads=None`` turns the check off.

    Hub ids are 0, 1, … by decreasing size (ties: lower anchor row first), so they do not
    depend on HDBSCAN's label order.

    Shape:
        vectors: (N, D); coords: (N, 2) or None → list of Hub.
    """
    vectors = _as_vectors(vectors)
    if cluster_on not in CLUSTER_SPACES:
        raise ValueError(f"cluster_on must be one of {CLUSTER_SPACES}; got {cluster_on!r}")
    if cluster_on == "projection":
        if coords is None:
            raise ValueError("cluster_on='projection' needs coords (from fit_projection)")
        points = _as_coords(coords, len(vectors))
    else:
        if coords is not None:
            _as_coords(coords, len(vectors))  # still refuse coords of the wrong index
        points = vectors
    if max_mads is not None and not max_mads >= 0:
        raise ValueError(f"max_mads must be ≥ 0 or None; got {max_mads!r}")
    labels = cluster_labels(points, min_size=min_size, min_samples=min_samples, selection=selection)

    groups = [np.flatnonzero(labels == label) for label in np.unique(labels[labels >= 0])]
    hubs = [_hub_from_rows(-1, rows, vectors, min_size=min_size, max_mads=max_mads) for rows in groups]
    hubs = [hub for hub in hubs if hub is not None]
    hubs.sort(key=lambda hub: (-hub.size, hub.anchor))
    return [Hub(id=i, anchor=h.anchor, members=h.members, distances=h.distances) for i, h in enumerate(hubs)]


def hub_labels(hubs, n: int) -> np.ndarray:
    """(n,) int: each map's hub id, -1 for maps in no hub."""
    n = _positive_int(n, "n", minimum=0)
    labels = np.full(n, -1, dtype=np.intp)
    for hub in hubs:
        members = np.asarray(hub.members, dtype=np.intp)
        if members.size and (members.min() < 0 or members.max() >= n):
            raise ValueError(f"hub {hub.id} has members outside 0…{n - 1}; is it from another index?")
        if (labels[members] >= 0).any():
            raise ValueError(f"hub {hub.id} shares maps with another hub; hubs must not overlap")
        labels[members] = hub.id
    return labels


# ─── stability across UMAP seeds ─────────────────────────────────────────────────────────────


def _noise_as_singletons(labels: np.ndarray) -> np.ndarray:
    """Labels where each -1 becomes a group of its own: a map in no hub shares no hub."""
    labels = labels.copy()
    noise = labels < 0
    labels[noise] = labels.max(initial=-1) + 1 + np.arange(noise.sum())
    return labels


def adjusted_rand(labels_a, labels_b) -> float:
    """Adjusted Rand index of two hub labellings, with each unhubbed map (-1) its own group.

    Counting all -1 maps as one group would reward two runs for agreeing on noise as if it
    were a hub.
    """
    from sklearn.metrics import adjusted_rand_score

    a, b = np.asarray(labels_a), np.asarray(labels_b)
    return float(adjusted_rand_score(_noise_as_singletons(a), _noise_as_singletons(b)))


def partner_jaccard(labels_a, labels_b) -> np.ndarray:
    """(N,) for each map, the Jaccard index of its hub co-members in two labellings.

    A map's partners are the other members of its hub (none if it is in no hub). Two empty
    sets agree (1.0): a map alone in both runs kept its (lack of) partners.
    """
    a, b = np.asarray(labels_a, dtype=np.intp), np.asarray(labels_b, dtype=np.intp)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"two (N,) labellings of the same maps are needed; got shapes {a.shape} and {b.shape}")
    if a.size == 0:
        return np.zeros(0)
    # shift so -1 has a slot; the counts for slot 0 (noise) are never used as partners
    a1, b1 = a + 1, b + 1
    joint = np.zeros((a1.max() + 1, b1.max() + 1), dtype=np.int64)
    np.add.at(joint, (a1, b1), 1)
    partners_a = np.where(a >= 0, np.bincount(a1)[a1] - 1, 0)
    partners_b = np.where(b >= 0, np.bincount(b1)[b1] - 1, 0)
    shared = np.where((a >= 0) & (b >= 0), joint[a1, b1] - 1, 0)
    union = partners_a + partners_b - shared
    return np.where(union > 0, shared / np.maximum(union, 1), 1.0)


def compare_labelings(labelings, *, names=None) -> dict:
    """How much several hub labellings of the same maps agree (the summary ``hub_stability`` gives).

    ``labelings``: a sequence of (N,) label arrays (-1: no hub), e.g. one per UMAP seed;
    ``names``: one name per labelling for ``pair_ari`` (default 0, 1, …). Plain JSON types.
    """
    labelings = [np.asarray(labels, dtype=np.intp) for labels in labelings]
    names = list(range(len(labelings))) if names is None else list(names)
    if len(labelings) < 2 or len(names) != len(labelings):
        raise ValueError(f"need at least two labellings and one name each; got {len(labelings)} and {len(names)}")
    if len({labels.shape for labels in labelings}) != 1 or labelings[0].ndim != 1:
        raise ValueError("every labelling must be an (N,) array over the same maps")

    pair_ari, jaccards = [], []
    for (name_a, a), (name_b, b) in itertools.combinations(zip(names, labelings), 2):
        pair_ari.append([name_a, name_b, adjusted_rand(a, b)])
        jaccards.append(partner_jaccard(a, b))
    aris = [ari for _, _, ari in pair_ari]
    jaccards = np.stack(jaccards)
    return {
        "ari_mean": float(np.mean(aris)),
        "ari_min": float(np.min(aris)),
        "pair_ari": pair_ari,
        "n_hubs": [int(np.unique(labels[labels >= 0]).size) for labels in labelings],
        "hubbed_share": [float((labels >= 0).mean()) if labels.size else 0.0 for labels in labelings],
        "partner_jaccard_mean": float(jaccards.mean()),
        "partners_kept_share": float((jaccards >= 0.5).mean()),
    }


def hub_stability(vectors, *, seeds=(0, 1, 2, 3, 4), n_neighbors: int = 15, min_dist: float = 0.1,
                  min_size: int = 5, min_samples: int | None = HUB_MIN_SAMPLES,
                  cluster_on: ClusterSpace = "projection", max_mads: float | None = 3.0,
                  selection: HubSelection = "eom", return_labels: bool = False) -> dict:
    """How much the hubs depend on the UMAP seed: one projection and one set of hubs per seed.

    Returns plain JSON types:
      - ``seeds``, ``cluster_on``: what was compared;
      - ``ari_mean``, ``ari_min``: adjusted Rand index of the hub labels over every pair of
        seeds (unhubbed maps each their own group; 1 = the same hubs);
      - ``pair_ari``: [seed_a, seed_b, ari] for every pair;
      - ``n_hubs``: hubs per seed; ``hubbed_share``: share of maps in a hub, per seed;
      - ``partner_jaccard_mean``: each map's Jaccard index of hub co-members between two seeds,
        averaged over maps and pairs; ``partners_kept_share``: share of (map, pair of seeds)
        with Jaccard ≥ 0.5, i.e. maps that kept at least half their partners;
      - ``labels`` (only with ``return_labels``): each seed's labels, as lists.
    With ``cluster_on="embedding"`` the hubs do not depend on the seed, and this says so (1.0)
    after clustering once.
    """
    vectors = _as_vectors(vectors)
    seeds = [_positive_int(s, "seed", minimum=0) for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be at least two different seeds; got {seeds}")
    if cluster_on not in CLUSTER_SPACES:
        raise ValueError(f"cluster_on must be one of {CLUSTER_SPACES}; got {cluster_on!r}")

    labelings = []
    for seed in seeds:
        if cluster_on == "embedding" and labelings:
            labelings.append(labelings[0])  # the seed plays no part
            continue
        coords = fit_projection(vectors, seed=seed, n_neighbors=n_neighbors, min_dist=min_dist) \
            if cluster_on == "projection" else None
        hubs = find_hubs(vectors, coords, min_size=min_size, min_samples=min_samples, cluster_on=cluster_on,
                         max_mads=max_mads, selection=selection)
        labelings.append(hub_labels(hubs, len(vectors)))

    result = {"seeds": seeds, "cluster_on": cluster_on, **compare_labelings(labelings, names=seeds)}
    if return_labels:
        result["labels"] = {str(seed): labels.tolist() for seed, labels in zip(seeds, labelings)}
    return result
