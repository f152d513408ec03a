"""The map embedding: canonical density, pose, shell features, the invariance head, its Zernike
term and its file."""

import dataclasses

import numpy as np
import pytest
import torch

from napari_cryoswan.checkpoint import load_checkpoint
from napari_cryoswan.descriptors import describe_boxes
from napari_cryoswan.embedding import (
    DESCRIPTOR,
    DESCRIPTOR_WEIGHT,
    DescriptorTerm,
    Embedder,
    EmbeddingError,
    canonical_box,
    degraded_copy,
    head_beside,
    load_head,
    posed_box,
    principal_pose,
    save_head,
    shell_features,
    shells_for,
)
from napari_cryoswan.preprocess import rotate
from training import train_embedding


def _asymmetric(seed: int, size: int = 64) -> np.ndarray:
    """Three Gaussian blobs of different sizes and weights: distinct inertia axes and a third
    moment on each of them, so the pose is well defined."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3).astype(np.float32)
    box = np.zeros((size,) * 3, np.float32)
    for weight, width in zip((1.0, 0.7, 0.5), (4.0, 3.0, 2.5)):
        centre = size / 2 + rng.uniform(-9, 9, 3)
        box += weight * np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * width**2))
    return (box - box.mean()) / box.std()


def _turn(seed: int) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=seed).as_matrix()


def _correlation(a, b) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_a_rotated_copy_is_posed_like_its_original():
    original = _asymmetric(0)
    turned = rotate(original, _turn(1))
    assert _correlation(original, turned) < 0.5  # the rotation matters before posing
    assert _correlation(posed_box(original), posed_box(turned)) > 0.95


def _trimer(size: int = 64) -> np.ndarray:
    """A C3 oligomer: three subunits (a blob and a smaller one beside it, so the ring has a
    hand) around an axis, and a cap on one side of the ring. Its two in-plane spreads are equal."""
    grid = np.indices((size,) * 3).astype(np.float32) - size / 2
    box = np.exp(-((grid - np.array([6.0, 0, 0])[:, None, None, None]) ** 2).sum(0) / (2 * 3.0**2))
    for turn in (0, 2 * np.pi / 3, 4 * np.pi / 3):
        for radius, offset, width, weight in ((11.0, 0.0, 3.5, 1.0), (12.0, 0.6, 2.5, 0.6)):
            centre = np.array([0.0, radius * np.cos(turn + offset), radius * np.sin(turn + offset)])
            box += weight * np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * width**2))
    return (box - box.mean()) / box.std()


def test_a_symmetric_oligomer_is_posed_alike_in_any_orientation():
    """Its inertia axes in the ring's plane are arbitrary: the ring's harmonic fixes the turn."""
    original = _trimer()
    posed = [posed_box(rotate(original, _turn(seed))) for seed in range(4)]
    assert min(_correlation(posed[0], other) for other in posed[1:]) > 0.95
    _, axes = principal_pose(original)
    assert np.linalg.det(axes) == pytest.approx(1.0) and abs(axes[2] @ [1.0, 0, 0]) > 0.99  # ring axis last


def test_a_filament_cut_by_its_box_is_posed_alike_in_any_orientation(filament_copies):
    """The box cuts a turned copy elsewhere; within the inscribed sphere both hold the same."""
    original, turned, _ = filament_copies
    assert _correlation(posed_box(canonical_box(original)), posed_box(canonical_box(turned))) > 0.95


def test_density_on_one_line_or_voxel_is_posed_without_warnings():
    import warnings

    rod, voxel = np.zeros((2, 16, 16, 16), np.float32)
    rod[2:14, 8, 8] = voxel[8, 8, 8] = 1.0
    for box in (rod, voxel):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            centre, axes = principal_pose(box)
        assert np.allclose(centre, [8 if box is voxel else 7.5, 8, 8]) and np.linalg.det(axes) == pytest.approx(1.0)


def test_the_pose_is_a_proper_rotation_with_axes_by_spread():
    centre, axes = principal_pose(_asymmetric(2))
    assert np.allclose(axes @ axes.T, np.eye(3), atol=1e-8) and np.linalg.det(axes) == pytest.approx(1.0)
    posed = posed_box(_asymmetric(2))
    spread = [np.average((np.indices(posed.shape)[k] - 31.5) ** 2, weights=np.clip(posed, 0, None))
              for k in range(3)]
    assert spread[0] > spread[1] > spread[2]


def test_the_canonical_density_is_zscored_and_zero_below_the_contour():
    box = canonical_box(_asymmetric(3) + np.random.default_rng(0).normal(0, 1, (64,) * 3))
    assert abs(box.mean()) < 1e-5 and box.std() == pytest.approx(1.0, rel=1e-4)
    assert (box == box.min()).mean() > 0.5  # the background is one value: masked


def test_a_degraded_copy_is_seeded_and_still_correlates_once_posed():
    original = _asymmetric(4)
    first = degraded_copy(original, np.random.default_rng(7))
    assert np.array_equal(first, degraded_copy(original, np.random.default_rng(7)))
    assert not np.array_equal(first, degraded_copy(original, np.random.default_rng(8)))
    assert _correlation(posed_box(canonical_box(original)), posed_box(canonical_box(first))) > 0.7


def test_rotated_copies_are_the_nearest_maps_without_a_head():
    """With the bundled encoder (an untrained one's features swing with any change of input)."""
    from napari_cryoswan.checkpoint import bundled_checkpoint_path

    embedder = Embedder(load_checkpoint(bundled_checkpoint_path("swan")).model, None)
    assert embedder.head is None and embedder.version.endswith("+no-head")
    gallery = np.stack([_asymmetric(seed) for seed in (10, 11, 12, 13)])
    queries = np.stack([rotate(box, _turn(5 + k)) for k, box in enumerate(gallery)])
    vectors, query_vectors = embedder.embed(gallery), embedder.embed(queries)
    distances = ((query_vectors[:, None] - vectors[None]) ** 2).sum(-1)
    assert list(distances.argmin(1)) == [0, 1, 2, 3]


def test_a_recipe_without_a_step_names_itself(swan):
    box = _asymmetric(30)[None]
    full, unposed = Embedder(swan.model, None), Embedder(swan.model, None, steps=("canonical",))
    assert unposed.version != full.version and "-no-pose" in unposed.version
    assert not np.allclose(full.features(box), unposed.features(box))


class _FixedLatents:
    """A stand-in encoder whose latents are given: shell pooling can be checked by hand."""

    def __init__(self, **latents):
        from types import SimpleNamespace

        self.result = SimpleNamespace(latents={k: torch.as_tensor(v) for k, v in latents.items()})

    def encode(self, x):
        return self.result


def test_shell_features_are_each_shells_mean_then_its_spread():
    # RQ2-sized latent (8³, 4 shells): channel 0 is the radius, channel 1 a constant.
    centre = 3.5
    radius = np.sqrt(((np.indices((8, 8, 8)) - centre) ** 2).sum(0))
    latent = np.stack([radius, np.full_like(radius, 2.0)])[None].astype(np.float32)
    features = shell_features(_FixedLatents(rq2=latent), None).numpy()[0]
    shell = np.minimum((radius / 4.0 * 4).astype(int), 3)
    means = [radius[shell == k].mean() for k in range(4)]
    spreads = [radius[shell == k].std(ddof=1) for k in range(4)]
    # Per shell, both channels: the four shells' means, then the four shells' spreads.
    expected = np.ravel([[m, 2.0] for m in means] + [[s, 0.0] for s in spreads])
    assert np.allclose(features, expected, atol=1e-5)
    assert all(np.diff(means) > 0)  # outer shells lie farther out


def test_a_latent_is_pooled_by_its_grid_size_whatever_its_level_is_called():
    # One pooling per grid: a baseline's single 16³ latent gets the 6 shells of Cryo-SWAN's 16³ RQ1.
    assert [shells_for(size) for size in (2, 4, 8, 16, 32)] == [1, 2, 4, 6, 6]
    latent = np.random.default_rng(0).normal(size=(1, 3, 16, 16, 16)).astype(np.float32)
    for level in ("rq1", "latent", "bottom"):
        assert shell_features(_FixedLatents(**{level: latent}), None).shape == (1, 2 * 3 * 6)


def test_a_head_fitted_on_other_features_says_to_train_it_again():
    features, labels = _labelled_features()
    head = train_embedding.fit_head(features, labels, autoencoder_id="x", steps=2)
    with pytest.raises(EmbeddingError, match="fitted on 20 latent features.*gives 24.*train the head again"):
        head.apply(torch.zeros(2, 24))


def _labelled_features(seed: int = 0):
    """Six classes of 8 views each in 20 dimensions: class means apart, views spread."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (6, 20))
    labels = np.repeat(np.arange(6), 8)
    return (means[labels] + rng.normal(0, 1, (48, 20))).astype(np.float32), labels


def test_weighing_siblings_as_harder_negatives_pushes_them_apart():
    """Two entries of one structure lie close (sub-assemblies that differ by a chain); a larger
    sibling weight separates them further relative to how tightly each one's views gather."""
    rng = np.random.default_rng(1)
    means = rng.normal(0, 3, (6, 20))
    means[1] = means[0] + rng.normal(0, 0.3, 20)  # entry 1 is entry 0 with a little more
    labels = np.repeat(np.arange(6), 8)
    features = (means[labels] + rng.normal(0, 1, (48, 20))).astype(np.float32)
    groups = np.array([0, 0, 1, 2, 3, 4])[labels]

    def separation(weight):
        head = train_embedding.fit_head(features, labels, autoencoder_id="x", steps=150, groups_M=groups,
                                        sibling_weight=weight)
        vectors = head.apply(torch.from_numpy(features))
        centres = np.stack([vectors[labels == k].mean(0) for k in (0, 1)])
        spread = np.mean([np.linalg.norm(vectors[labels == k] - centres[i], axis=1).mean()
                          for i, k in enumerate((0, 1))])
        return np.linalg.norm(centres[0] - centres[1]) / spread

    assert separation(4.0) > 1.08 * separation(1.0)  # 8.99 against 7.64 when written
    with pytest.raises(ValueError, match="groups"):
        train_embedding.fit_head(features, labels, autoencoder_id="x", steps=1, sibling_weight=2.0)
    with pytest.raises(ValueError, match="positive weight"):
        train_embedding.fit_head(features, labels, autoencoder_id="x", steps=1, groups_M=groups, sibling_weight=0.0)


def test_the_head_brings_views_of_one_shape_together_and_round_trips(swan, tmp_path):
    features, labels = _labelled_features()
    head = train_embedding.fit_head(features, labels, autoencoder_id=swan.checkpoint_id, steps=150)
    vectors = head.apply(torch.from_numpy(features))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    distances = ((vectors[:, None] - vectors[None]) ** 2).sum(-1) + np.diag(np.full(48, np.inf))
    assert (labels[distances.argmin(1)] == labels).mean() > 0.95
    path = save_head(tmp_path / "model.embedding.pt", head)
    again = load_head(path)
    assert again.head_id == head.head_id
    assert np.allclose(again.apply(torch.from_numpy(features)), vectors, atol=1e-6)
    with pytest.raises(FileExistsError):
        save_head(path, head)


def test_a_head_saved_beside_its_checkpoint_is_found_and_another_ones_refused(swan, small_checkpoints, tmp_path):
    import shutil

    checkpoint = shutil.copy(small_checkpoints["swan"], tmp_path / "mine.pt")
    loaded = load_checkpoint(checkpoint)
    features, labels = _labelled_features()
    features = np.random.default_rng(0).normal(0, 1, (48, 160)).astype(np.float32)
    save_head(head_beside(checkpoint), train_embedding.fit_head(features, labels, autoencoder_id=loaded.checkpoint_id,
                                                                steps=2))
    embedder = Embedder.for_checkpoint(loaded)
    assert embedder.head is not None and embedder.version.split("+")[1] == embedder.head.head_id
    other = load_checkpoint(small_checkpoints["swan-rq1"])
    with pytest.raises(EmbeddingError, match="Train a head for this checkpoint"):
        Embedder.for_checkpoint(other, head_beside(checkpoint))


def test_a_damaged_head_file_says_what_to_do(tmp_path):
    bad = tmp_path / "bad.embedding.pt"
    bad.write_bytes(b"not a head" * 10)
    with pytest.raises(EmbeddingError, match="train_embedding"):
        load_head(bad)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(EmbeddingError, match="not an embedding head"):
        load_head(tmp_path / "other.pt")
    with pytest.raises(EmbeddingError, match="no such"):
        load_head(tmp_path / "missing.embedding.pt")


def test_a_head_of_an_earlier_embedding_recipe_is_refused(tmp_path):
    features, labels = _labelled_features()
    save_head(tmp_path / "old.embedding.pt", train_embedding.fit_head(features, labels, autoencoder_id="x", steps=2))
    payload = torch.load(tmp_path / "old.embedding.pt", weights_only=True)
    torch.save({**payload, "recipe": "pose-shells-1"}, tmp_path / "old.embedding.pt")
    with pytest.raises(EmbeddingError, match="train it again"):
        load_head(tmp_path / "old.embedding.pt")


def test_train_embedding_reads_several_corpora_as_one(tiny_corpus, small_checkpoints, tmp_path):
    import shutil

    from training.corpus import Corpus, CorpusSet

    other = shutil.copytree(tiny_corpus, tmp_path / "other")
    out = tmp_path / "both.embedding.pt"
    assert train_embedding.main(["--checkpoint", str(small_checkpoints["swan"]), "--corpus", str(tiny_corpus),
                                 str(other), "--out", str(out), "--steps", "2", "--device", "cpu"]) == 0
    provenance = load_head(out).provenance
    assert provenance["corpus_id"] == CorpusSet([tiny_corpus, other]).corpus_id
    assert provenance["maps"] == 2 * len(Corpus(tiny_corpus).split_indices("train"))


def test_train_embedding_writes_a_head_that_the_embedder_uses(tiny_corpus, small_checkpoints, tmp_path, capsys):
    import shutil

    checkpoint = shutil.copy(small_checkpoints["swan"], tmp_path / "model.pt")
    out = head_beside(checkpoint)
    assert train_embedding.main(["--checkpoint", str(checkpoint), "--corpus", str(tiny_corpus), "--out", str(out),
                                 "--steps", "3", "--device", "cpu"]) == 0
    head = load_head(out)
    assert head.provenance["split"] == "train" and head.provenance["degraded"] == 1
    assert train_embedding.main(["--checkpoint", str(checkpoint), "--corpus", str(tiny_corpus), "--out", str(out),
                                 "--device", "cpu"]) == 2
    assert "exists" in capsys.readouterr().err
    embedder = Embedder.for_checkpoint(load_checkpoint(checkpoint))
    vectors = embedder.embed(np.stack([_asymmetric(20), _asymmetric(21)]))
    assert head.descriptor is not None and head.descriptor.weight == DESCRIPTOR_WEIGHT
    assert vectors.shape == (2, head.out + len(head.descriptor.mean))  # the head's vector, then step 5's term
    assert np.allclose(np.linalg.norm(vectors[:, :head.out], axis=1), 1.0, atol=1e-5)
    alone = tmp_path / "alone.embedding.pt"
    assert train_embedding.main(["--checkpoint", str(checkpoint), "--corpus", str(tiny_corpus), "--out", str(alone),
                                 "--steps", "3", "--device", "cpu", "--descriptor-weight", "0"]) == 0
    assert load_head(alone).descriptor is None


def test_the_zernike_term_tells_apart_maps_that_the_head_sends_to_one_vector(swan, tmp_path):
    """A head whose MLP gives every map the same vector: only step 5 can find a rotated copy, and
    it does; the term survives the head file and changes the head's id."""
    gallery = np.stack([_asymmetric(seed) for seed in (40, 41, 42)])
    queries = np.stack([rotate(box, _turn(7 + k)) for k, box in enumerate(gallery)])
    width = Embedder(swan.model, None).features(gallery[:1]).shape[1]
    features = np.random.default_rng(0).normal(0, 1, (48, width)).astype(np.float32)
    blind = train_embedding.fit_head(features, _labelled_features()[1], autoencoder_id=swan.checkpoint_id, steps=1)
    blind.state_dict[max(k for k in blind.state_dict if k.endswith(".weight"))].zero_()
    head = dataclasses.replace(blind, descriptor=DescriptorTerm.fitted(describe_boxes(DESCRIPTOR, gallery)))
    assert head.head_id != blind.head_id
    again = load_head(save_head(tmp_path / "term.embedding.pt", head))
    assert again.head_id == head.head_id and again.descriptor.weight == DESCRIPTOR_WEIGHT
    head_vectors = Embedder(swan.model, blind).embed(np.concatenate([gallery, queries]))
    assert np.ptp(head_vectors, axis=0).max() < 1e-6  # the head alone cannot tell the maps apart
    vectors, query_vectors = (Embedder(swan.model, again).embed(b) for b in (gallery, queries))
    distances = ((query_vectors[:, None] - vectors[None]) ** 2).sum(-1)
    assert list(distances.argmin(1)) == [0, 1, 2]


def test_a_views_cache_trains_the_next_head_without_encoding_again(tiny_corpus, small_checkpoints, tmp_path,
                                                                   monkeypatch, capsys):
    cache, encoded = tmp_path / "views.npz", []
    encode = train_embedding.view_features
    monkeypatch.setattr(train_embedding, "view_features", lambda *a, **k: encoded.append(1) or encode(*a, **k))
    args = ["--checkpoint", str(small_checkpoints["swan"]), "--corpus", str(tiny_corpus), "--steps", "2",
            "--device", "cpu", "--views-cache", str(cache)]
    assert train_embedding.main([*args, "--out", str(tmp_path / "a.embedding.pt")]) == 0
    assert train_embedding.main([*args, "--out", str(tmp_path / "b.embedding.pt"), "--sibling-weight", "3"]) == 0
    assert len(encoded) == 1 and cache.is_file()  # the second head read the views
    first, second = (load_head(tmp_path / f"{n}.embedding.pt") for n in "ab")
    assert first.provenance["maps"] == second.provenance["maps"] and second.provenance["sibling_weight"] == 3.0
    # Another initialisation on the same views: read from the cache, and another head.
    assert train_embedding.main([*args, "--out", str(tmp_path / "i.embedding.pt"), "--init-seed", "1"]) == 0
    reseeded = load_head(tmp_path / "i.embedding.pt")
    assert len(encoded) == 1 and reseeded.provenance["init_seed"] == 1 and "init_seed" not in first.provenance
    assert reseeded.head_id != first.head_id and np.array_equal(reseeded.feature_mean, first.feature_mean)
    assert train_embedding.main([*args, "--out", str(tmp_path / "c.embedding.pt"), "--degraded", "2"]) == 0
    assert len(encoded) == 2 and "other settings: encoding them again" in capsys.readouterr().err
    cache.write_bytes(b"PK\x03\x04 cut short")  # a damaged cache is encoded again, not a crash
    assert train_embedding.main([*args, "--out", str(tmp_path / "d.embedding.pt"), "--degraded", "2"]) == 0
    assert len(encoded) == 3 and "cannot be read" in capsys.readouterr().err


def test_training_views_are_drawn_again_the_same_for_a_seed(tiny_corpus, small_checkpoints):
    from training.corpus import Corpus

    corpus = Corpus(tiny_corpus)
    indices = corpus.split_indices("train")[:3]
    first = list(train_embedding.training_views(corpus, indices, degraded=2, seed=5))
    again = list(train_embedding.training_views(corpus, indices, degraded=2, seed=5))
    other = list(train_embedding.training_views(corpus, indices, degraded=2, seed=6))
    assert [b.shape for b, _, _ in first] == [(3, *corpus.load(int(indices[0])).shape)] * 3
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))  # the same copies: a cache stays valid
    assert not np.array_equal(first[0][0][1], other[0][0][1])  # another seed, other degraded copies
    assert np.array_equal(first[0][0][0], corpus.load(int(indices[0])))  # the clean view comes first
    embedder = Embedder(load_checkpoint(small_checkpoints["swan"]).model, None, device=torch.device("cpu"))
    features, labels, _ = train_embedding.view_features(embedder, corpus, indices, degraded=2, seed=5)
    assert np.allclose(features[:3], embedder.features(first[0][0], batch_size=3), atol=1e-5)
    assert len(labels) == 9 and len(set(labels[:3])) == 1
