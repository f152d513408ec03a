"""Train the invariance head of a checkpoint's map embedding (``napari_cryoswan.embedding``).

    python -m training.train_embedding --checkpoint bundled:swan \\
        --corpus corpus_default corpus_assemblies --out swan.embedding.pt

Every map of the training split is seen as it is and as ``--degraded`` degraded copies
(``embedding.degraded_copy``: another rotation, a blur, noise, another contour); the frozen
encoder turns each into shell features, once. A small MLP then learns, with a supervised
contrastive loss (Khosla et al. 2020), to bring the views of one shape together: the corpus's
five rotations of an entry and their degraded copies are one class, every other entry another.
The head records the checkpoint id of its encoder; ``Embedder.for_checkpoint`` finds it when it
is saved beside the checkpoint (``swan.pt`` → ``swan.embedding.pt``). The split must be one the
autoencoder was trained on, so that the maps retrieval is measured on stay unseen. Several corpora
are read as one: a head that has seen large assemblies as well as single proteins finds both
(docs/EXPLORER.md). The head also carries the recipe's Zernike term (step 5), standardised over
the same clean maps and weighted by ``--descriptor-weight``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def training_views(corpus, indices, *, degraded: int, seed: int):
    """Each map's boxes (its clean view, then ``degraded`` copies), entry id and structure group,
    map by map: the views a head is trained on, drawn the same way for a given seed."""
    from napari_cryoswan.embedding import degraded_copy

    rng = np.random.default_rng(seed)
    for i in indices:
        box = corpus.load(int(i))
        sample = corpus.samples[int(i)]
        yield np.stack([box] + [degraded_copy(box, rng) for _ in range(degraded)]), sample["entry_id"], sample["group"]


def view_features(embedder, corpus, indices, *, degraded: int, seed: int, progress=None):
    """(features (M, F), class labels (M,), split groups (M,)) of each map's clean view and
    ``degraded`` copies: a class is an entry, a group the structure its entry belongs to."""
    features, labels, groups = [], [], []
    views = training_views(corpus, indices, degraded=degraded, seed=seed)
    for done, (boxes, entry, group) in enumerate(views, start=1):
        features.append(embedder.features(boxes, batch_size=len(boxes)))
        labels += [entry] * len(boxes)
        groups += [group] * len(boxes)
        if progress is not None:
            progress(done, len(indices))
    return (np.concatenate(features), np.unique(labels, return_inverse=True)[1],
            np.unique(groups, return_inverse=True)[1])


def views_key(loaded, corpus, split: str, *, degraded: int, seed: int) -> dict:
    """What encoded views depend on: a views cache of another key is encoded again."""
    from napari_cryoswan.embedding import FEATURES_RECIPE

    return {"checkpoint_id": loaded.checkpoint_id, "corpus_id": corpus.corpus_id, "split": split,
            "degraded": degraded, "seed": seed, "recipe": FEATURES_RECIPE}


def cached_view_features(cache: Path | None, key: dict, compute):
    """``compute()``'s (features, labels, groups), kept in the ``.npz`` file ``cache`` under
    ``key`` (the checkpoint, corpus, split, copies and seed that made them): a head variant
    (another ``--sibling-weight``, ``--steps``) then trains in seconds instead of re-encoding
    every view. A cache of another key is encoded again and replaced, and says so."""
    import json
    import zipfile

    from napari_cryoswan._atomic import atomic_path

    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as stored:
                if json.loads(str(stored["key"])) == key:
                    return stored["features"], stored["labels"], stored["groups"]
            print(f"{cache} holds the views of other settings: encoding them again.", file=sys.stderr)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:  # not an .npz of ours
            print(f"{cache} cannot be read ({err}): encoding the views again.", file=sys.stderr)
    views = compute()
    if cache is not None:
        with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, key=json.dumps(key, sort_keys=True), features=views[0], labels=views[1], groups=views[2])
    return views


def fit_head(features_MF: np.ndarray, labels_M: np.ndarray, *, autoencoder_id: str, steps: int = 600,
             temperature: float = 0.1, jitter: float = 0.1, seed: int = 0, groups_M: np.ndarray | None = None,
             sibling_weight: float = 1.0, provenance: dict | None = None):
    """An ``EmbeddingHead`` fitted by full-batch supervised contrastive learning.

    ``jitter``: Gaussian noise added to the standardised features at each step, a cheap
    augmentation on top of the degraded views. ``sibling_weight`` β weighs, in each view's
    softmax, the views of other entries of its own group (``groups_M``: the sub-assemblies of one
    structure, which may differ by one chain) β times as much as unrelated maps: hard negatives,
    which the degraded copies otherwise teach the head to merge.
    """
    import torch

    from napari_cryoswan.embedding import EmbeddingHead, build_head_network

    if not sibling_weight > 0:
        raise ValueError(f"sibling_weight is a positive weight, not {sibling_weight}.")
    torch.manual_seed(seed)
    mean, std = features_MF.mean(0), features_MF.std(0) + 1e-6
    x_MF = torch.from_numpy((features_MF - mean) / std).float()
    labels = torch.from_numpy(labels_M)
    positives = (labels[:, None] == labels[None]).float().fill_diagonal_(0)
    if not positives.sum(1).all():
        raise ValueError("Every class needs two views or more: use --degraded 1 or more.")
    net = build_head_network(x_MF.shape[1])
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    self_mask = torch.eye(len(x_MF), dtype=torch.bool)
    log_weight_MM = torch.zeros(len(x_MF), len(x_MF))
    if sibling_weight != 1.0:
        if groups_M is None:
            raise ValueError("sibling_weight needs the views' groups.")
        groups = torch.from_numpy(np.asarray(groups_M))
        siblings = (groups[:, None] == groups[None]) & (labels[:, None] != labels[None])
        log_weight_MM = log_weight_MM.masked_fill(siblings, float(np.log(sibling_weight)))
    for _ in range(steps):
        e_MD = torch.nn.functional.normalize(net(x_MF + jitter * torch.randn_like(x_MF)), dim=1)
        logits = e_MD @ e_MD.T / temperature + log_weight_MM
        log_p = logits.masked_fill(self_mask, -1e9).log_softmax(1)
        loss = (-(log_p * positives).sum(1) / positives.sum(1)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return EmbeddingHead(autoencoder_id, mean.astype(np.float32), std.astype(np.float32), state,
                         provenance={**(provenance or {}), "final_loss": float(loss.detach())})


def parse_args(argv=None):
    from napari_cryoswan.embedding import DESCRIPTOR_WEIGHT

    p = argparse.ArgumentParser(prog="python -m training.train_embedding", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="the autoencoder (a file or bundled:NAME)")
    p.add_argument("--corpus", required=True, nargs="+",
                   help="one corpus or several, split as the autoencoder's training corpus (by structure)")
    p.add_argument("--split", default="train", choices=("train", "val", "test"))
    p.add_argument("--degraded", type=int, default=1, help="degraded copies per map (default 1)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--sibling-weight", type=float, default=1.0,
                   help="weight of other entries of a map's own structure among its negatives (default 1: "
                        "as any other map)")
    p.add_argument("--seed", type=int, default=0, help="draws the degraded copies and, unless --init-seed "
                                                         "is given, the head's initialisation")
    p.add_argument("--init-seed", type=int, default=None,
                   help="seeds only the head's initialisation and feature jitter: a head of another "
                        "initialisation on the same views (and the same --views-cache)")
    p.add_argument("--descriptor-weight", type=float, default=DESCRIPTOR_WEIGHT,
                   help="λ of the Zernike term appended to the head's vector (default: the recipe's "
                        f"{DESCRIPTOR_WEIGHT}; 0: the head's vector alone)")
    p.add_argument("--views-cache", type=Path, default=None,
                   help="an .npz file that keeps the encoded views for the next head of the same settings")
    p.add_argument("--out", required=True, help="the head file to write (NAME.embedding.pt beside the checkpoint)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    from tqdm import tqdm

    from napari_cryoswan.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
    from napari_cryoswan.descriptors import describe_boxes
    from napari_cryoswan.embedding import DESCRIPTOR, DescriptorTerm, Embedder, save_head
    from napari_cryoswan.engine import choose_device
    from training.corpus import CorpusError, CorpusSet

    args = parse_args(argv)
    if Path(args.out).exists() and not args.overwrite:
        print(f"{args.out} exists: choose another --out, or pass --overwrite.", file=sys.stderr)
        return 2
    try:
        loaded = load_checkpoint(resolve_checkpoint(args.checkpoint))
        corpus = CorpusSet(args.corpus)
    except (CheckpointError, CorpusError) as err:
        print(err, file=sys.stderr)
        return 2
    embedder = Embedder(loaded.model, None, device=choose_device(args.device))
    indices = corpus.split_indices(args.split)
    start = time.perf_counter()

    def encode():
        with tqdm(total=len(indices), desc="encoding views", unit="map") as bar:
            return view_features(embedder, corpus, indices, degraded=args.degraded, seed=args.seed,
                                 progress=lambda done, total: bar.update(1))

    key = views_key(loaded, corpus, args.split, degraded=args.degraded, seed=args.seed)
    features, labels, groups = cached_view_features(args.views_cache, key, encode)
    provenance = {"corpus_id": corpus.corpus_id, "split": args.split, "maps": len(indices),
                  "classes": int(labels.max() + 1), "degraded": args.degraded, "steps": args.steps,
                  "seed": args.seed, "sibling_weight": args.sibling_weight, "checkpoint_file": loaded.path.name}
    init_seed = args.seed if args.init_seed is None else args.init_seed
    if init_seed != args.seed:
        provenance["init_seed"] = init_seed
    head = fit_head(features, labels, autoencoder_id=loaded.checkpoint_id, steps=args.steps, seed=init_seed,
                    groups_M=groups, sibling_weight=args.sibling_weight, provenance=provenance)
    if args.descriptor_weight > 0:  # step 5's standardisation: over the clean maps the head was trained on
        described = [describe_boxes(DESCRIPTOR, corpus.load(int(i))[None])[0]
                     for i in tqdm(indices, desc="Zernike term", unit="map")]
        head.descriptor = DescriptorTerm.fitted(np.stack(described), args.descriptor_weight)
    save_head(args.out, head, overwrite=args.overwrite)
    print(f"{args.out}: head {head.head_id} for checkpoint {loaded.checkpoint_id}, {len(features)} views of "
          f"{provenance['classes']} shapes, final loss {head.provenance['final_loss']:.3f}, "
          f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
