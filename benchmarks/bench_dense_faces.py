"""Where the "fills its own box" warning draws its line: ``reconstruction.fraction_of_faces_dense``
(the share of a map's box-face voxels above its mean + 1 s.d., once blurred) over every map of
training corpora and over map files, against ``DENSE_FACES_FRACTION``; with ``--snr``, also over
every corpus map noised at each SNR (``denoise.add_noise``, seed 0): a noisy particle is still a
particle, and must not be flagged. Each line is measured twice: as the warning measures it (the
map blurred by ``DENSE_FACES_BLUR`` voxels) and unblurred, the rule before the blur, which shows
what the blur is for.

    python benchmarks/bench_dense_faces.py --corpus corpus_default corpus_assemblies \
        --maps ../shared/data/maps/*.map.gz --snr 2 1 0.5 0.25

Prints the machine and date, then per corpus the largest value, its 99th percentile and how many
maps lie above the threshold, and per map file its value.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    from _machine import run_line
    from napari_cryoswan.denoise import add_noise
    from napari_cryoswan.io import DensityMap, read_map
    from napari_cryoswan.reconstruction import DENSE_FACES_FRACTION, fraction_of_faces_dense
    from training.corpus import CorpusSet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", nargs="*", default=[], help="corpus folders: every map of every split")
    p.add_argument("--maps", nargs="*", default=[], help="map files")
    p.add_argument("--snr", nargs="*", type=float, default=[], help="also measure the corpus maps noised at these SNRs")
    args = p.parse_args(argv)

    print(f"# Dense box faces\n\n{run_line()}\nthreshold DENSE_FACES_FRACTION = {DENSE_FACES_FRACTION}\n")
    print("| maps | n | largest | 99th percentile | above the threshold | unblurred: largest, 99th percentile, "
          "above |\n|---|---|---|---|---|---|")
    for folder in args.corpus:
        corpus = CorpusSet([folder])
        rows = [i for split in ("train", "val", "test") for i in corpus.split_indices(split)]
        for snr in [None, *args.snr]:
            rng = np.random.default_rng(0)
            values = []  # (blurred, unblurred) per map
            for i in rows:
                box = corpus.load_batch([i])[0]
                density = DensityMap(box if snr is None else add_noise(box, snr, rng), (1.0,) * 3)
                values.append([fraction_of_faces_dense(density), fraction_of_faces_dense(density, blur=0)])
            what = f"corpus {folder} (id {corpus.corpus_id})" + ("" if snr is None else f", noised at SNR {snr:g}")
            print(f"| {what} | {len(values)} | " + " | ".join(
                f"{v.max():.3f} | {np.percentile(v, 99):.3f} | {int((v > DENSE_FACES_FRACTION).sum())}"
                for v in np.array(values).T) + " |")
    for path in args.maps:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a missing voxel size does not matter here
            density = read_map(path)
        value, unblurred = fraction_of_faces_dense(density), fraction_of_faces_dense(density, blur=0)
        print(f"| {Path(path).name} | 1 | {value:.3f} | — | {int(value > DENSE_FACES_FRACTION)} | "
              f"{unblurred:.3f}, —, {int(unblurred > DENSE_FACES_FRACTION)} |")


if __name__ == "__main__":
    main()
