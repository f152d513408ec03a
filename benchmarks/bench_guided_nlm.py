"""Non-local means guided by the latent projection: does Cryo-SWAN's estimate help the filter
that beats it?

Non-local means averages voxels whose surrounding patches look alike; at low SNR the noisy
patches mislead it. Here the patch distances are taken on two channels, the noisy map and
``alpha`` × the projection (``swan-rotations`` through the checkpoint), with scikit-image's
multichannel ``denoise_nl_means`` (h = h_factor · σ, patches 5³ within ±6 voxels, as the
``nl-means`` method), and only the noisy channel's average is kept. Each setting is scored
against plain non-local means and the projection on the same noisy maps (noise seeded as in
``training.evaluate_denoise``). The settings are chosen on the scored maps, which flatters the
guided rows.

    python benchmarks/bench_guided_nlm.py --checkpoint bundled:swan-denoiser --corpus corpus_default

Prints the machine, versions, settings and date, then a markdown table of mean PSNR (dB, the
project's [0, 1] scale of ``metrics.psnr``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def guided_nl_means(noisy: np.ndarray, guide: np.ndarray, noise_sd: float, alpha: float,
                    h_factor: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    channels = np.stack([noisy, alpha * guide], axis=-1)
    return denoise_nl_means(channels, patch_size=5, patch_distance=6, h=h_factor * noise_sd,
                            sigma=noise_sd, fast_mode=True, channel_axis=-1)[..., 0]


def main(argv=None) -> None:
    import skimage

    from _machine import run_line
    from napari_cryoswan.checkpoint import load_checkpoint, resolve_checkpoint
    from napari_cryoswan.denoise import add_noise, denoise, noise_sd_for
    from napari_cryoswan.metrics import psnr
    from training.evaluate_denoise import EVALUATION_STREAM, corpus_split, noise_seed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="bundled:swan-denoiser")
    p.add_argument("--corpus", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--maps", type=int, default=4, help="maps spread over the split (default 4)")
    p.add_argument("--snr", type=float, nargs="+", default=[0.1, 0.5, 2.0])
    p.add_argument("--alpha", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--h-factor", type=float, nargs="+", default=[0.8, 1.2])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    loaded = load_checkpoint(resolve_checkpoint(args.checkpoint))
    clean, description = corpus_split(args.corpus, args.split, loaded.contract, args.maps)
    print(f"# Guided non-local means\n\n{run_line(**{'scikit-image': skimage.__version__})}\n"
          f"checkpoint {args.checkpoint} ({loaded.checkpoint_id}); {description}\n")
    settings = list(itertools.product(args.alpha, args.h_factor))
    labels = ["nl-means", "swan-rotations", *(f"guided α {a:g}, h {h:g} σ" for a, h in settings)]
    table = {label: {} for label in labels}
    for snr in args.snr:
        scores = {label: [] for label in labels}
        for i, volume in enumerate(clean):
            noisy = add_noise(volume, snr, [*noise_seed(args.seed, snr, EVALUATION_STREAM), i])
            sd = noise_sd_for(volume, snr)
            guide = denoise(noisy, "swan-rotations", model=loaded.model, noise_sd=sd, device="cpu").volume
            outputs = [denoise(noisy, "nl-means", noise_sd=sd).volume, guide,
                       *(guided_nl_means(noisy, guide, sd, a, h) for a, h in settings)]
            for label, output in zip(labels, outputs):
                scores[label].append(psnr(output, volume))
        for label in labels:
            table[label][snr] = float(np.mean(scores[label]))
        print(f"SNR {snr:g} done", flush=True)
    print("\n| method | " + " | ".join(f"SNR {s:g}" for s in args.snr) + " |")
    print("|---|" + "---|" * len(args.snr))
    for label, row in table.items():
        print(f"| {label} | " + " | ".join(f"{row[s]:.2f}" for s in args.snr) + " |")


if __name__ == "__main__":
    main()
