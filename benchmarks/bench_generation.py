"""Anchor-conditioned generation: similarity, diversity, realism and novelty of the
latent diffusion model's variants, against the naive alternative of noising the anchor's latent.

On held-out anchors (by default the test split, one orientation per entry), for each strength
the diffusion model (``napari_cryoswan.generate``, SDEdit with DDIM) makes ``--n`` variants per
anchor (variant i: seed + i, as ``generate_boxes`` does; anchors are batched together, and one
anchor is checked against ``generate_boxes`` itself). Measured, in the model's 64³ box
(normalised units, as the corpus stores maps):

1. **Similarity**: correlation and FSC 0.5 resolution (``metrics.fsc``, voxel size from the
   autoencoder's contract) of each variant against the anchor's reconstruction (what strength
   0 gives) and against the anchor map; whether the mean falls monotonically with strength.
2. **Diversity**: mean pairwise correlation between the variants of one anchor, beside the
   anchor's self-consistency (correlation of the anchor with its own reconstruction).
3. **Realism**, in the explorer's embedding (``Embedder.for_checkpoint``): the Fréchet distance
   between all variants at a strength and the real held-out maps (val + test, all
   orientations), and the mean distance from each map to its nearest real held-out map of
   another entry than its anchor. Beside it, the **noise baseline** at the same similarity:
   Gaussian noise of s.d. σ added to the anchor's standardised RQ1 latent (the diffusion
   model's ``standardise``), snapped with ``snap_to_codes`` and decoded, with σ interpolated on
   a sweep so that its mean correlation to the reconstruction matches the variants'. The FD's
   reference is the same number of random training maps against the same held-out maps (its
   s.d. over draws is the FD's sampling noise); a nearest-distance difference counts when it
   exceeds 2 standard errors of the paired (same anchor, same seed) difference.
4. **Not copies**: each variant's nearest training map (embedding distance, entry), against the
   anchor's own nearest training map, and the share of variants nearer to a training map than
   the copy threshold: the median embedding distance between two orientations of one held-out
   entry.
5. ``--figure``: z-projections (sum over z) of the anchor, its reconstruction and variants at
   three strengths (``--figure-strengths``), plus the noise baseline matched to the middle one
   (the paper's Fig. 5b), cropped to the anchor's extent.

    python benchmarks/bench_generation.py --corpus corpus_default --diffusion runs/diffusion/model.pt \\
        [--autoencoder bundled:swan] [--anchors N] [--n 4] [--strengths 0.1 0.3 0.5 0.7 0.9] \\
        [--steps 50] [--seed 0] [--figure generation.png] [--json generation.json] [--cache PREFIX]

``--cache PREFIX`` keeps the real maps' embeddings (PREFIX.held.npz, PREFIX.train.npz, keyed by
embedder, checkpoint and corpus): they are about a third of a default run.

Prints the machine, versions, settings, date and checkpoint ids, then markdown tables and, in
words, where the noise baseline wins.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_STRENGTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Snapping absorbs much of the noise (RQ1's coarse scales average it away): matching strong
# edits takes σ of several times the latent's own spread.
DEFAULT_SIGMAS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 15.0, 20.0, 50.0, 100.0)
SWEEP_VARIANTS = 2  # variants per anchor in the σ sweep (the matched σ then uses --n)
FIGURE_STRENGTHS = (0.3, 0.5, 0.9)
FD_DRAWS = 20  # random training subsets that give the FD's sampling spread


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- generation, batched over anchors ------------------------------------------------------


def take_codes(codes: dict, index_B) -> dict:
    """The codes of the anchors ``index_B`` (one row per variant)."""
    return {name: [c[index_B] for c in level] for name, level in codes.items()}


def make_boxes(ae_model, z_ACdhw, codes: dict, *, n: int, seed: int, batch_size: int, latent_of):
    """Variants of every anchor: ``latent_of(z_BCdhw, noise_BCdhw)`` gives raw RQ1 latents,
    which are snapped (coarser levels: the anchor's codes) and decoded.

    Variant i of each anchor draws ``variant_noise([seed + i])``, as ``generate_boxes`` does.
    Shape: z (A, C, d, h, w) → (A, n, 64, 64, 64) float32.
    """
    import torch

    from napari_cryoswan.generate import decode_latents, variant_noise

    A = z_ACdhw.shape[0]
    pairs = [(a, i) for a in range(A) for i in range(n)]
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        index_B = torch.tensor([a for a, _ in chunk], device=z_ACdhw.device)
        noise_BCdhw = variant_noise([seed + i for _, i in chunk], tuple(z_ACdhw.shape[1:])).to(z_ACdhw.device)
        with torch.inference_mode():
            z_BCdhw = latent_of(z_ACdhw[index_B], noise_BCdhw)
        out.append(decode_latents(ae_model, z_BCdhw, take_codes(codes, index_B)))
    boxes = np.concatenate(out)
    return boxes.reshape(A, n, *boxes.shape[1:])


def diffusion_boxes(ae_model, diffusion_model, z_ACdhw, codes, *, strength, steps, **kw):
    """SDEdit variants (``LatentDiffusion.edit``) of every anchor: (A, n, 64, 64, 64)."""
    return make_boxes(ae_model, z_ACdhw, codes, latent_of=lambda z, noise: diffusion_model.edit(
        z, strength=strength, steps=steps, noise_BCdhw=noise), **kw)


def noise_boxes(ae_model, diffusion_model, z_ACdhw, codes, *, sigma, **kw):
    """The naive baseline: σ·noise added to the standardised latent: (A, n, 64, 64, 64)."""
    return make_boxes(ae_model, z_ACdhw, codes, latent_of=lambda z, noise: diffusion_model.unstandardise(
        diffusion_model.standardise(z) + sigma * noise), **kw)


# ---- measures ------------------------------------------------------------------------------


def standardised_rows(boxes) -> np.ndarray:
    """(N, V) rows of zero mean and unit norm: their dot products are correlations."""
    flat = np.asarray(boxes, np.float64).reshape(len(boxes), -1)
    flat = flat - flat.mean(1, keepdims=True)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def correlations(boxes, reference) -> np.ndarray:
    """Correlation of each of (N, …) boxes with one reference box."""
    return standardised_rows(boxes) @ standardised_rows(reference[None])[0]


def mean_pairwise_correlation(boxes) -> float:
    """Mean correlation over the distinct pairs of (n, …) boxes."""
    rows = standardised_rows(boxes)
    c = rows @ rows.T
    return float(c[np.triu_indices(len(rows), 1)].mean())


def fsc_value(a, b, voxel_size: float) -> tuple[float, str]:
    """FSC 0.5 in Å and its kind; for no crossing the bound (Nyquist or box edge) stands in."""
    from napari_cryoswan.metrics import fsc

    r = fsc(a, b, voxel_size).resolution(0.5)
    return float(r.angstrom if r.angstrom is not None else r.limit), r.kind


def frechet_distance(a_ND, b_MD) -> float:
    """Fréchet distance of two Gaussians fitted to (N, D) and (M, D) samples (real part of
    scipy's sqrtm: with fewer samples than dimensions the covariances are singular)."""
    from scipy.linalg import sqrtm

    a_ND, b_MD = np.asarray(a_ND, np.float64), np.asarray(b_MD, np.float64)
    s_a, s_b = np.cov(a_ND, rowvar=False), np.cov(b_MD, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cross = sqrtm(s_a @ s_b).real
    return float(((a_ND.mean(0) - b_MD.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * cross))


def distances(a_ND, b_MD) -> np.ndarray:
    """(N, M) Euclidean distances."""
    a_ND, b_MD = np.asarray(a_ND, np.float64), np.asarray(b_MD, np.float64)
    d2 = (a_ND ** 2).sum(1)[:, None] + (b_MD ** 2).sum(1)[None] - 2 * a_ND @ b_MD.T
    return np.sqrt(np.clip(d2, 0, None))


def nearest_other_entry(e_ND, entries_N, real_MD, real_entries_M) -> np.ndarray:
    """Distance from each vector to its nearest real vector of another entry."""
    d = distances(e_ND, real_MD)
    d[np.asarray(entries_N)[:, None] == np.asarray(real_entries_M)[None]] = np.inf
    return d.min(1)


def mean_sd(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "count": int(v.size)}


def match_sigma(sigmas, curve, target: float) -> tuple[float, bool]:
    """σ whose mean correlation is ``target``, linearly interpolated on the sweep's first
    bracketing interval; (σ, clamped): clamped when the target lies outside the sweep."""
    for i in range(len(sigmas) - 1):
        hi, lo = curve[i], curve[i + 1]
        if min(hi, lo) <= target <= max(hi, lo) and hi != lo:
            return float(sigmas[i] + (target - hi) / (lo - hi) * (sigmas[i + 1] - sigmas[i])), False
    return float(sigmas[0] if target > curve[0] else sigmas[-1]), True


# ---- the corpus and its embeddings -------------------------------------------------------


def anchor_indices(corpus, split: str, limit: int | None) -> np.ndarray:
    """One orientation (the first in manifest order) of each entry of a split."""
    seen, chosen = set(), []
    for i in corpus.split_indices(split):
        entry = corpus.samples[i]["entry_id"]
        if entry not in seen:
            seen.add(entry)
            chosen.append(i)
    return np.array(chosen[:limit] if limit else chosen, dtype=int)


def embed_indices(embedder, corpus, indices, chunk: int = 64) -> np.ndarray:
    """Embeddings of corpus maps, read ``chunk`` at a time."""
    parts = [embedder.embed(corpus.load_batch(indices[i:i + chunk]), batch_size=16)
             for i in range(0, len(indices), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, 64), np.float32)


def real_embeddings(embedder, corpus, indices, cache: str | None, key: str) -> np.ndarray:
    """Embeddings of corpus maps, read from / written to ``cache`` (an .npz) when it holds
    the same samples for the same embedder, checkpoint and corpus (``key``)."""
    ids = np.array([corpus.samples[i]["sample_id"] for i in indices])
    if cache and Path(cache).is_file():
        with np.load(cache) as stored:
            if str(stored["key"]) == key and np.array_equal(stored["ids"], ids):
                return stored["embeddings"]
    vectors = embed_indices(embedder, corpus, indices)
    if cache:
        np.savez(cache, key=key, ids=ids, embeddings=vectors)
    return vectors


# ---- the run -------------------------------------------------------------------------------


def load_models(args):
    from napari_cryoswan.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
    from napari_cryoswan.generate import diffusion_beside, load_diffusion

    ae_path = resolve_checkpoint(args.autoencoder)
    path = Path(args.diffusion) if args.diffusion else diffusion_beside(ae_path, shown_as=args.autoencoder)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such diffusion checkpoint.")
    autoencoder = load_checkpoint(ae_path)
    diffusion = load_diffusion(path, autoencoder=autoencoder)
    if args.no_calibration:  # strength linear in timesteps, as without a calibration
        diffusion.model.strength_calibration = None
    return autoencoder, diffusion


def run(args) -> tuple[dict, dict]:
    """All measures; returns (results for JSON, boxes kept for the figure)."""
    import torch

    from napari_cryoswan.embedding import Embedder
    from napari_cryoswan.generate import encode_latents, generate_boxes
    from training.corpus import Corpus

    clock = {"start": time.perf_counter()}
    device = torch.device(args.device)
    autoencoder, diffusion = load_models(args)
    ae_model, diff_model = autoencoder.model.to(device).eval(), diffusion.model.to(device).eval()
    voxel = float(autoencoder.contract.voxel_size)
    corpus = Corpus(args.corpus)
    anchors = anchor_indices(corpus, args.split, args.anchors)
    anchor_entries = np.array([corpus.samples[i]["entry_id"] for i in anchors])
    x_A1dhw = corpus.load_batch(anchors)[:, None]
    z_ACdhw, codes, recon_Adhw = [], {}, []
    for a in range(len(anchors)):  # one at a time, as generate_boxes: RQ1's argmin can flip a
        x = torch.from_numpy(x_A1dhw[a:a + 1]).to(device)  # code on batch-size rounding
        z, c = encode_latents(ae_model, x)
        z_ACdhw.append(z)
        for name, level in c.items():
            codes.setdefault(name, []).append(level)
        recon_Adhw.append(make_reconstruction(ae_model, c))
    z_ACdhw = torch.cat(z_ACdhw)
    codes = {name: [torch.cat(parts) for parts in zip(*chunks)] for name, chunks in codes.items()}
    recon_Adhw = np.concatenate(recon_Adhw)
    anchors_Adhw = x_A1dhw[:, 0]
    kw = dict(n=args.n, seed=args.seed, batch_size=args.batch_size)

    # 1–2. diffusion variants: similarity and diversity
    self_corr = np.array([correlations(recon_Adhw[a][None], anchors_Adhw[a])[0] for a in range(len(anchors))])
    self_fsc = [fsc_value(anchors_Adhw[a], recon_Adhw[a], voxel) for a in range(len(anchors))]
    variants, rows = {}, []
    for s in args.strengths:
        log(f"diffusion, strength {s:g} …")
        boxes = diffusion_boxes(ae_model, diff_model, z_ACdhw, codes, strength=s, steps=args.steps, **kw)
        variants[s] = boxes
        rows.append(similarity_row(s, boxes, recon_Adhw, anchors_Adhw, voxel))
    clock["diffusion"] = time.perf_counter()
    check = check_against_core(ae_model, diff_model, anchors_Adhw[0], variants[args.strengths[0]][0],
                               args, generate_boxes)

    # 3. the noise baseline: sweep σ, then match each strength's mean correlation
    log("noise baseline: σ sweep …")
    sweep_kw = {**kw, "n": min(args.n, SWEEP_VARIANTS)}
    sweep = [float(correlation_to_recon(noise_boxes(ae_model, diff_model, z_ACdhw, codes, sigma=g, **sweep_kw),
                                        recon_Adhw).mean()) for g in args.sigmas]
    noise = {}
    for row in rows:
        sigma, clamped = match_sigma(args.sigmas, sweep, row["corr_recon"]["mean"])
        boxes = noise_boxes(ae_model, diff_model, z_ACdhw, codes, sigma=sigma, **kw)
        noise[row["strength"]] = boxes
        row["noise"] = {"sigma": sigma, "clamped": clamped,
                        "corr_recon": mean_sd(correlation_to_recon(boxes, recon_Adhw)),
                        "pairwise": mean_sd([mean_pairwise_correlation(b) for b in boxes])}
    clock["noise"] = time.perf_counter()

    # 3–4. the embedding: realism and nearest training maps
    log("embedding real maps …")
    embedder = Embedder.for_checkpoint(autoencoder, device=device)
    held = np.concatenate([corpus.split_indices(s) for s in ("val", "test")])
    train = corpus.split_indices("train")
    key = f"{embedder.version}|{autoencoder.checkpoint_id}|{corpus.corpus_id}"
    held_e = real_embeddings(embedder, corpus, held, args.cache and f"{args.cache}.held.npz", key)
    train_e = real_embeddings(embedder, corpus, train, args.cache and f"{args.cache}.train.npz", key)
    held_entries = np.array([corpus.samples[i]["entry_id"] for i in held])
    train_entries = np.array([corpus.samples[i]["entry_id"] for i in train])
    clock["embed_real"] = time.perf_counter()
    log("embedding generated maps …")
    reference = embedding_reference(embedder, anchors_Adhw, recon_Adhw, anchor_entries, held_e, held_entries,
                                    train_e, args)
    for row in rows:
        s = row["strength"]
        for boxes, target in ((variants[s], row), (noise[s], row["noise"])):
            target.update(embedding_row(embedder, boxes, anchor_entries, held_e, held_entries, train_e,
                                        train_entries, reference))
    clock["embed_generated"] = time.perf_counter()
    monotonic = {k: bool(np.all(np.diff([r[k]["mean"] for r in sorted(rows, key=lambda r: r["strength"])]) < 0))
                 for k in ("corr_recon", "corr_anchor")}
    result = {
        "autoencoder": str(autoencoder.path), "autoencoder_id": autoencoder.checkpoint_id,
        "diffusion": str(diffusion.path), "diffusion_id": diffusion.checkpoint_id,
        "diffusion_training": {k: v for k, v in diffusion.training.items() if k in ("step", "best_val")},
        "corpus_id": corpus.corpus_id, "voxel_size": voxel, "embedding": embedder.version,
        "anchors": [corpus.samples[i]["sample_id"] for i in anchors],
        "held_out_maps": len(held), "training_maps": len(train),
        "self_consistency": {"corr": mean_sd(self_corr), "per_anchor": self_corr.tolist(),
                             "fsc05": summarise_fsc(self_fsc)},
        "core_check": check,
        "sigma_sweep": {"sigmas": list(args.sigmas), "corr_recon": sweep, "variants_per_anchor": sweep_kw["n"]},
        "reference": reference, "rows": rows, "monotonic": monotonic,
        "seconds": {k: round(v - clock["start"], 1) for k, v in clock.items() if k != "start"},
    }
    return result, {"anchors": anchors_Adhw, "recon": recon_Adhw, "variants": variants, "noise": noise,
                    "ids": result["anchors"]}


def make_reconstruction(ae_model, codes) -> np.ndarray:
    from napari_cryoswan.generate import decode

    return decode(ae_model, codes)[:, 0].float().cpu().numpy()


def correlation_to_recon(boxes_And, recon_Adhw) -> np.ndarray:
    """(A·n,) correlations of each anchor's variants with its reconstruction."""
    return np.concatenate([correlations(b, r) for b, r in zip(boxes_And, recon_Adhw)])


def summarise_fsc(values) -> dict:
    """Mean ± s.d. in Å over (value, kind) pairs, and how many did not cross 0.5 (their bound
    stands in: Nyquist for "no crossing", the box edge for "beyond the box")."""
    angstrom = [v for v, _ in values]
    return {**mean_sd(angstrom), "no_crossing": sum(k == "no crossing" for _, k in values),
            "beyond_box": sum(k == "beyond the box" for _, k in values)}


def similarity_row(strength, boxes_And, recon_Adhw, anchors_Adhw, voxel) -> dict:
    """Correlation and FSC against reconstruction and anchor; pairwise correlation."""
    pairs = [(v, a) for a in range(len(boxes_And)) for v in boxes_And[a]]
    pairwise = [mean_pairwise_correlation(b) for b in boxes_And] if boxes_And.shape[1] > 1 else [np.nan]
    identical = sum(int((np.triu(standardised_rows(b) @ standardised_rows(b).T, 1) > 0.9999).sum())
                    for b in boxes_And)
    corr_recon, corr_anchor = correlation_to_recon(boxes_And, recon_Adhw), correlation_to_recon(boxes_And, anchors_Adhw)
    fsc_recon = [fsc_value(v, recon_Adhw[a], voxel) for v, a in pairs]
    fsc_anchor = [fsc_value(v, anchors_Adhw[a], voxel) for v, a in pairs]
    return {
        "strength": float(strength),
        "corr_recon": mean_sd(corr_recon), "corr_anchor": mean_sd(corr_anchor),
        "fsc05_recon": summarise_fsc(fsc_recon), "fsc05_anchor": summarise_fsc(fsc_anchor),
        "per_variant": {"corr_recon": corr_recon.tolist(), "corr_anchor": corr_anchor.tolist(),
                        "fsc05_recon": fsc_recon, "fsc05_anchor": fsc_anchor},
        "pairwise": mean_sd(pairwise), "pairwise_per_anchor": [float(p) for p in pairwise],
        "identical_pairs": identical,
    }


def embedding_reference(embedder, anchors_Adhw, recon_Adhw, anchor_entries, held_e, held_entries,
                        train_e, args) -> dict:
    """What real maps give: nearest other-entry distances, the copy threshold, and the FD of
    as many random training maps as there are variants per strength (mean and s.d. over
    ``FD_DRAWS`` draws: how much FD moves by sampling alone)."""
    same = held_entries[:, None] == held_entries[None]
    within = distances(held_e, held_e)[np.triu(same, 1)]
    anchor_e, recon_e = embedder.embed(anchors_Adhw, batch_size=16), embedder.embed(recon_Adhw, batch_size=16)
    n_fd = len(anchors_Adhw) * args.n
    rng = np.random.default_rng(args.seed)
    fd_draws = [frechet_distance(train_e[rng.choice(len(train_e), size=min(n_fd, len(train_e)), replace=False)],
                                 held_e) for _ in range(FD_DRAWS)]
    anchor_train = distances(anchor_e, train_e).min(1)
    return {
        "copy_threshold": float(np.median(within)) if within.size else float("nan"),
        "copy_threshold_pairs": int(within.size),
        "held_nearest_other": mean_sd(nearest_other_entry(held_e, held_entries, held_e, held_entries)),
        "anchor_nearest_other": mean_sd(nearest_other_entry(anchor_e, anchor_entries, held_e, held_entries)),
        "recon_nearest_other": mean_sd(nearest_other_entry(recon_e, anchor_entries, held_e, held_entries)),
        "anchor_nearest_train": mean_sd(anchor_train), "anchor_nearest_train_per_anchor": anchor_train.tolist(),
        "fd_train_sample": mean_sd(fd_draws), "fd_samples": min(n_fd, len(train_e)),
        "fd_recon": frechet_distance(recon_e, held_e) if len(recon_e) > 1 else float("nan"),
    }


def embedding_row(embedder, boxes_And, anchor_entries, held_e, held_entries, train_e, train_entries,
                  reference) -> dict:
    """FD, nearest other-entry held-out distance and nearest training map of every variant."""
    A, n = boxes_And.shape[:2]
    e = embedder.embed(boxes_And.reshape(A * n, *boxes_And.shape[2:]), batch_size=16)
    entries = np.repeat(anchor_entries, n)
    d_train = distances(e, train_e)
    nearest = d_train.argmin(1)
    nearest_d = d_train[np.arange(len(e)), nearest]
    own = np.repeat(reference["anchor_nearest_train_per_anchor"], n)
    nearest_other = nearest_other_entry(e, entries, held_e, held_entries)
    found = train_entries[nearest]
    names, counts = np.unique(found, return_counts=True)
    top = names[counts.argmax()]
    return {
        "fd": frechet_distance(e, held_e), "fd_samples": int(len(e)),
        "nearest_other": mean_sd(nearest_other), "nearest_other_per_variant": nearest_other.tolist(),
        "nearest_train": mean_sd(nearest_d),
        "nearer_than_anchor": float((nearest_d < own).mean()),
        "copies": float((nearest_d < reference["copy_threshold"]).mean()),
        "distinct_nearest_train_entries": int(len(set(found))),
        "most_common_nearest_train": [str(top), float(np.mean(found == top))],
        "nearest_train_entries": found.tolist(), "nearest_train_distances": nearest_d.tolist(),
    }


def check_against_core(ae_model, diffusion_model, anchor_dhw, batched_ndhw, args, generate_boxes) -> dict:
    """The batched path against ``generate_boxes`` for the first anchor and strength."""
    boxes, _ = generate_boxes(ae_model, diffusion_model, anchor_dhw, n=args.n, strength=args.strengths[0],
                              seed=args.seed, steps=args.steps, device=args.device, batch_size=args.batch_size)
    return {"strength": args.strengths[0], "max_abs_difference": float(np.abs(boxes - batched_ndhw).max()),
            "min_correlation": float(min(correlations(b[None], r)[0] for b, r in zip(boxes, batched_ndhw)))}


# ---- figure ----------------------------------------------------------------------------------


def figure(path, kept: dict, result: dict, args) -> None:
    """Per anchor: anchor and reconstruction, then variants at ``--figure-strengths`` and the
    noise baseline matched to the middle one, each a projection along z (sum over axis 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(args.figure_anchors, len(kept["anchors"]))
    strengths = [min(args.strengths, key=lambda s: abs(s - f)) for f in args.figure_strengths]
    strengths = list(dict.fromkeys(strengths))
    noise_s = strengths[len(strengths) // 2]
    sigma = next(r["noise"]["sigma"] for r in result["rows"] if r["strength"] == noise_s)
    cols = max(2, min(args.n, 4))
    rows_per = 2 + len(strengths)
    fig, axes = plt.subplots(shown * rows_per, cols, figsize=(1.9 * cols, 1.9 * shown * rows_per), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for a in range(shown):
        recon = kept["recon"][a]
        panels = [[(kept["anchors"][a], f"{kept['ids'][a]}\nanchor"),
                   (recon, f"reconstruction\nr={correlations(kept['anchors'][a][None], recon)[0]:.2f} to anchor")]]
        for s in strengths:
            panels.append([(v, f"s={s:g} seed {args.seed + i}\nr={correlations(v[None], recon)[0]:.2f}")
                           for i, v in enumerate(kept["variants"][s][a][:cols])])
        panels.append([(v, f"noise σ={sigma:.2f} (≈s={noise_s:g})\nseed {args.seed + i} "
                           f"r={correlations(v[None], recon)[0]:.2f}")
                       for i, v in enumerate(kept["noise"][noise_s][a][:cols])])
        scale = recon.sum(0)
        vmin, vmax = np.percentile(scale, 1), np.percentile(scale, 99.9)
        view = crop_window(scale)
        for r, row in enumerate(panels):
            for c, (box, label) in enumerate(row):
                ax = axes[a * rows_per + r, c]
                ax.imshow(box.sum(0)[view], cmap="gray", vmin=vmin, vmax=vmax, origin="lower")
                ax.set_title(label, fontsize=6.5)
    fig.suptitle(f"Variants, projected along z, cropped to each anchor's extent\n"
                 f"(r: correlation with the reconstruction; {args.steps} DDIM steps)",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def crop_window(projection_hw, margin: int = 6, smallest: int = 24):
    """A square (y, x) window about where the projection exceeds 10 % of its range."""
    p = projection_hw - projection_hw.min()
    ys, xs = np.nonzero(p > 0.1 * p.max())
    if not len(ys):
        return np.s_[:, :]
    size = min(max(np.ptp(ys), np.ptp(xs), smallest) + 2 * margin, p.shape[0])
    starts = [int(np.clip((lo + hi) // 2 - size // 2, 0, p.shape[0] - size))
              for lo, hi in ((ys.min(), ys.max()), (xs.min(), xs.max()))]
    return np.s_[starts[0]:starts[0] + size, starts[1]:starts[1] + size]


# ---- report ----------------------------------------------------------------------------------


def environment(args) -> dict:
    import monai
    import torch

    from _machine import cpu_name

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores", "python": platform.python_version(),
        "torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
    }


def fmt(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}"


def fmt_fsc(d: dict) -> str:
    censored = [f"{d['no_crossing']} ≤ Nyquist"] * bool(d["no_crossing"]) + \
               [f"{d['beyond_box']} > box"] * bool(d["beyond_box"])
    return f"{d['mean']:.1f} ± {d['sd']:.1f}" + (f" ({', '.join(censored)})" if censored else "")


def report(result: dict) -> str:
    rows, ref, sc = result["rows"], result["reference"], result["self_consistency"]
    out = [f"Self-consistency (anchor vs its reconstruction): r = {fmt(sc['corr'])}, "
           f"FSC 0.5 = {fmt_fsc(sc['fsc05'])} Å over {sc['corr']['count']} anchors.",
           f"Batched path vs generate_boxes (strength {result['core_check']['strength']:g}, first anchor): "
           f"max |Δ| = {result['core_check']['max_abs_difference']:.2e}, "
           f"min r = {result['core_check']['min_correlation']:.6f}.", "",
           "### 1–2. Similarity and diversity (mean ± s.d.; FSC in Å, censored values at their bound)", "",
           "| strength | r to recon | r to anchor | FSC 0.5 to recon | FSC 0.5 to anchor | pairwise r | "
           "pairwise < self-consistency | identical pairs |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        below = sum(p < s for p, s in zip(r["pairwise_per_anchor"], sc["per_anchor"]))
        out.append(f"| {r['strength']:g} | {fmt(r['corr_recon'])} | {fmt(r['corr_anchor'])} | "
                   f"{fmt_fsc(r['fsc05_recon'])} | {fmt_fsc(r['fsc05_anchor'])} | {fmt(r['pairwise'])} | "
                   f"{below}/{len(r['pairwise_per_anchor'])} anchors | {r['identical_pairs']} |")
    m = result["monotonic"]
    out += ["", f"Monotonic fall with strength: r to recon {'yes' if m['corr_recon'] else 'NO'}, "
                f"r to anchor {'yes' if m['corr_anchor'] else 'NO'}.", "",
            "### 3. Realism in the explorer embedding, against the noise baseline at matched similarity", "",
            f"FD: {rows[0]['fd_samples']} generated maps per strength against {result['held_out_maps']} real "
            f"held-out maps (val + test, all orientations), 64-d: noisy with so few samples. Reference: "
            f"{ref['fd_samples']} random training maps give FD {fmt(ref['fd_train_sample'])} "
            f"({ref['fd_train_sample']['count']} draws: the s.d. is FD's sampling noise); the anchors' "
            f"reconstructions ({sc['corr']['count']}) give {ref['fd_recon']:.3f}.",
            f"Nearest real held-out map of another entry: real held-out maps {fmt(ref['held_nearest_other'])}, "
            f"the anchors {fmt(ref['anchor_nearest_other'])}, their reconstructions "
            f"{fmt(ref['recon_nearest_other'])}. Lower is more realistic for both FD and this distance.",
            f"Noise σ sweep (mean r to recon, {result['sigma_sweep']['variants_per_anchor']} variants per anchor): "
            + ", ".join(f"σ {g:g}: {c:.3f}" for g, c in zip(result["sigma_sweep"]["sigmas"],
                                                         result["sigma_sweep"]["corr_recon"])) + ".", "",
            "| strength | noise σ (matched) | r to recon: diffusion / noise | FD: diffusion / noise | "
            "nearest other entry: diffusion / noise | pairwise r: diffusion / noise |",
            "|---|---|---|---|---|---|"]
    wins = []
    for r in rows:
        z = r["noise"]
        out.append(f"| {r['strength']:g} | {z['sigma']:.3f}{' (clamped)' * z['clamped']} | "
                   f"{r['corr_recon']['mean']:.3f} / {z['corr_recon']['mean']:.3f} | {r['fd']:.3f} / {z['fd']:.3f} | "
                   f"{fmt(r['nearest_other'])} / {fmt(z['nearest_other'])} | "
                   f"{r['pairwise']['mean']:.3f} / {z['pairwise']['mean']:.3f} |")
        lost = [name + (f" ({caveat})" if small else "") for name, d, b, small, caveat in (
            ("FD", r["fd"], z["fd"], r["fd"] - z["fd"] < ref["fd_train_sample"]["sd"],
             "by less than FD's sampling s.d."),
            ("nearest-real distance", r["nearest_other"]["mean"], z["nearest_other"]["mean"],
             not paired_significant(r, z), "within 2 s.e. of the paired difference")) if b < d]
        if lost:
            unmatched = " (σ clamped to the sweep's end: similarity not matched)" if z["clamped"] else ""
            wins.append(f"strength {r['strength']:g}: the noise baseline wins on {' and '.join(lost)}{unmatched}")
    out += ["", "Noise baseline: " + ("; ".join(wins) + "." if wins else "the diffusion model is more "
                                      "realistic on both measures at every strength.")]
    out += ["", "### 4. Not copies: nearest training map (embedding distance)", "",
            f"Copy threshold: median distance between two orientations of one held-out entry, "
            f"{ref['copy_threshold']:.3f} ({ref['copy_threshold_pairs']} pairs). The anchors' own nearest "
            f"training map: {fmt(ref['anchor_nearest_train'])}.", "",
            "| strength | nearest training map | nearer than the anchor's own | below copy threshold | "
            "distinct nearest entries | most common (share) | noise: nearest training map | "
            "noise: below copy threshold |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        z = r["noise"]
        out.append(f"| {r['strength']:g} | {fmt(r['nearest_train'])} | {r['nearer_than_anchor']:.2f} | "
                   f"{r['copies']:.2f} | {r['distinct_nearest_train_entries']}/{r['fd_samples']} | "
                   f"{r['most_common_nearest_train'][0]} ({r['most_common_nearest_train'][1]:.2f}) | "
                   f"{fmt(z['nearest_train'])} | {z['copies']:.2f} |")
    secs = result["seconds"]
    out += ["", "Seconds from start: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items())]
    return "\n".join(out)


def paired_significant(row: dict, noise: dict) -> bool:
    """Whether the mean nearest-real distance of diffusion and noise variants (paired by anchor
    and seed) differ by more than 2 standard errors of the paired difference."""
    d = np.subtract(row["nearest_other_per_variant"], noise["nearest_other_per_variant"])
    return bool(len(d) > 1 and abs(d.mean()) > 2 * d.std(ddof=1) / np.sqrt(len(d)))


def main(argv=None) -> int:
    from napari_cryoswan.generate import DEFAULT_STEPS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--diffusion", default=None,
                   help="diffusion checkpoint (default: the one bundled beside the autoencoder)")
    p.add_argument("--autoencoder", default="bundled:swan")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="where anchors come from")
    p.add_argument("--anchors", type=int, default=None, help="at most this many anchors (default: all)")
    p.add_argument("--n", type=int, default=4, help="variants per anchor and strength")
    p.add_argument("--strengths", type=float, nargs="+", default=list(DEFAULT_STRENGTHS))
    p.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS),
                   help="the noise baseline's σ sweep, in standardised latent units, ascending")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps of a full chain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-calibration", action="store_true",
                   help="ignore the checkpoint's strength calibration (t0 = strength·T)")
    p.add_argument("--batch-size", type=int, default=16, help="variants denoised together")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default=None,
                   help="path prefix for the real maps' embeddings (PREFIX.held.npz, PREFIX.train.npz)")
    p.add_argument("--figure", default=None, help="write the figure here (png)")
    p.add_argument("--figure-anchors", type=int, default=2)
    p.add_argument("--figure-strengths", type=float, nargs="+", default=list(FIGURE_STRENGTHS),
                   help="rows of the figure (the nearest of --strengths is shown)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.n < 2 or args.steps < 1 or not all(0 < s <= 1 for s in args.strengths):
        p.error("--n must be at least 2 (diversity needs pairs), --steps positive, strengths in (0, 1]")
    args.strengths = sorted(args.strengths)
    args.sigmas = sorted(args.sigmas)
    from napari_cryoswan.checkpoint import CheckpointError

    env = environment(args)
    start = time.perf_counter()
    try:
        result, kept = run(args)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.figure:
        figure(args.figure, kept, result, args)
    result["seconds"]["total"] = round(time.perf_counter() - start, 1)
    print(json.dumps(env, indent=1))
    print(f"\nAutoencoder {result['autoencoder_id']} ({result['autoencoder']}); diffusion {result['diffusion_id']} "
          f"({result['diffusion']}, {result['diffusion_training'] or 'final'}); corpus {result['corpus_id']}; "
          f"embedding {result['embedding']}")
    print(f"{len(result['anchors'])} anchors ({args.split} split), {args.n} variants each, "
          f"{args.steps} DDIM steps\n")
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps({**env, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
