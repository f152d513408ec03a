"""How many bits would a better coder of a model's code indices need than the stream we count?

``training.evaluate`` compares a model's latent with the textbook codecs at the size of a real
stream of its indices (``codecs.index_stream``: fixed-width packing or LZMA, the shorter). LZMA
knows nothing about the model. This benchmark asks how far an entropy coder that does could go,
per quantized level, on the split's maps:

- **fixed**: every index at ceil(log2(codebook size)) bits (``codecs.latent_bits``);
- **stream**: the mean size of ``codecs.index_stream`` (what ``training.evaluate`` counts);
- **per-scale frequencies**: the ideal length, -Σ log2 p_s(code), of an arithmetic coder whose
  code frequencies at each scale s come from ``--fit-maps`` training maps (add-½ counts, so a
  code unseen there still has a finite length);
- **parent-conditioned**: the same with each code conditioned on its parent, the code at the
  same place one scale coarser: p(code | parent) = (n(parent, code) + α p_s(code)) / (n(parent)
  + α), which falls back on the per-scale frequencies where a parent was seldom seen. α is the
  value of ``--alphas`` with the shortest length on the validation split, so the test split
  does not choose it.

Ideal lengths are what an arithmetic coder reaches within a few bits per map. The frequency
tables are part of the decoder, as the model's weights are, and are not counted.

    python benchmarks/bench_index_entropy.py --corpus corpus_default --checkpoint bundled:swan

Prints the machine, versions, settings and date, then a markdown table (bits per map).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parent_indices(child_NDHW: np.ndarray, parent_NDHW: np.ndarray) -> np.ndarray:
    """For every position of a scale, the code at the same place one scale coarser."""
    axes = [np.arange(n) * m // n for n, m in zip(child_NDHW.shape[1:], parent_NDHW.shape[1:])]
    return parent_NDHW[:, axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]


class ScaleFrequencies:
    """Code frequencies of one scale of one level, with add-½ counts."""

    def __init__(self, codes: np.ndarray, size: int):
        counts = np.bincount(codes.ravel(), minlength=size) + 0.5
        self.p = counts / counts.sum()

    def bits(self, codes: np.ndarray) -> np.ndarray:
        """Ideal code length of each code (same shape as ``codes``)."""
        return -np.log2(self.p[codes])


class ParentFrequencies:
    """Code frequencies conditioned on the parent's code, blended with the scale's frequencies."""

    def __init__(self, codes: np.ndarray, parents: np.ndarray, scale: ScaleFrequencies, size: int):
        self.size, self.scale = size, scale
        pairs, counts = np.unique(parents.ravel() * size + codes.ravel(), return_counts=True)
        self.pairs, self.pair_counts = pairs, counts
        self.parent_counts = np.bincount(parents.ravel(), minlength=size)

    def bits(self, codes: np.ndarray, parents: np.ndarray, alpha: float) -> np.ndarray:
        keys = parents * self.size + codes
        where = np.searchsorted(self.pairs, keys).clip(max=len(self.pairs) - 1)
        seen = np.where(self.pairs[where] == keys, self.pair_counts[where], 0)
        p = (seen + alpha * self.scale.p[codes]) / (self.parent_counts[parents] + alpha)
        return -np.log2(p)


def level_lengths(fit: list[np.ndarray], scored: list[np.ndarray], size: int,
                  alphas: list[float]) -> dict[str, float | dict[float, float]]:
    """Mean ideal bits per map of one level's ``scored`` indices, with frequencies from ``fit``.
    Shape: fit and scored, per scale, (N, d, h, w)."""
    per_scale = 0.0
    by_alpha = dict.fromkeys(alphas, 0.0)
    for s, (fit_codes, codes) in enumerate(zip(fit, scored)):
        frequencies = ScaleFrequencies(fit_codes, size)
        scale_bits = frequencies.bits(codes).sum()
        per_scale += scale_bits
        if s == 0:  # no coarser scale: the parent-conditioned coder uses the scale's frequencies
            for alpha in alphas:
                by_alpha[alpha] += scale_bits
            continue
        conditioned = ParentFrequencies(fit_codes, parent_indices(fit_codes, fit[s - 1]), frequencies, size)
        parents = parent_indices(codes, scored[s - 1])
        for alpha in alphas:
            by_alpha[alpha] += conditioned.bits(codes, parents, alpha).sum()
    n = len(scored[0])
    return {"per_scale": per_scale / n, "parent": {a: b / n for a, b in by_alpha.items()}}


def main(argv=None) -> None:
    from _machine import run_line
    from napari_cryoswan.checkpoint import load_checkpoint, resolve_checkpoint
    from napari_cryoswan.codecs import latent_bits
    from napari_cryoswan.engine import choose_device
    from training.corpus import CorpusSet
    from training.evaluate import code_indices, mean_stream_bits

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="bundled:swan")
    p.add_argument("--corpus", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--fit-maps", type=int, default=200, help="training maps the frequencies come from")
    p.add_argument("--alphas", type=float, nargs="+", default=[4, 16, 64, 256, 1024, 4096],
                   help="blend weights of the parent-conditioned coder, chosen on the validation split")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    device = choose_device(args.device)
    loaded = load_checkpoint(resolve_checkpoint(args.checkpoint))
    model = loaded.model.to(device).eval()
    sizes = {level: book.size for level, book in model.codebooks().items()}
    fixed_bits = latent_bits(model, loaded.contract.box)
    corpus = CorpusSet([args.corpus])
    chosen = {"train": corpus.split_indices("train")[:args.fit_maps], "val": corpus.split_indices("val"),
              args.split: corpus.split_indices(args.split)}
    indices = {split: code_indices(model, corpus.load_batch(ids), device) for split, ids in chosen.items()}
    print(f"# Ideal lengths of the code indices\n\n{run_line()}\ncheckpoint {args.checkpoint} "
          f"(id {loaded.checkpoint_id}); corpus {args.corpus} (id {corpus.corpus_id}); frequencies "
          f"from {len(chosen['train'])} training maps; {args.split} split: {len(chosen[args.split])} maps\n")
    print("| level | fixed | stream (LZMA or packed) | per-scale frequencies | parent-conditioned (α) |")
    print("|---|---|---|---|---|")
    totals = np.zeros(4)
    for level, scored in indices[args.split].items():
        fit, size = indices["train"][level], sizes[level]
        on_val = level_lengths(fit, indices["val"][level], size, args.alphas)["parent"]
        alpha = min(on_val, key=on_val.get)
        lengths = level_lengths(fit, scored, size, [alpha])
        row = np.array([fixed_bits[level], mean_stream_bits(scored, size), lengths["per_scale"],
                        lengths["parent"][alpha]])
        totals += row
        print(f"| {level} | {row[0]:,.0f} | {row[1]:,.0f} | {row[2]:,.0f} | {row[3]:,.0f} ({alpha:g}) |")
    if len(indices[args.split]) > 1:
        print(f"| all | {totals[0]:,.0f} | {totals[1]:,.0f} | {totals[2]:,.0f} | {totals[3]:,.0f} |")
    print(f"\nAgainst the stream: per-scale frequencies {totals[2] / totals[1] - 1:+.1%}, "
          f"parent-conditioned {totals[3] / totals[1] - 1:+.1%}.")


if __name__ == "__main__":
    main()
