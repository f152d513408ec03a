"""Calibrate a diffusion checkpoint's strength, so that similarity to the anchor falls evenly.

    python -m training.calibrate_diffusion --checkpoint DIFFUSION.pt --corpus DIR --out CALIBRATED.pt \\
        [--split val] [--maps 8] [--points 20] [--steps 50] [--seed 0] [--autoencoder CKPT] [--device D]

On maps of a corpus split the diffusion model did not train on (one orientation per entry), it
measures how similar a variant stays to its map's reconstruction for each SDEdit start timestep
(``generate.measure_strength_calibration``) and writes the checkpoint again with that curve, which
``edit_start`` then inverts: strength s starts where similarity has fallen by the share s of its
whole fall. The weights are unchanged. ``--out`` must be a new file unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    from napari_cryoswan.generate import DEFAULT_STEPS

    p = argparse.ArgumentParser(prog="python -m training.calibrate_diffusion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the diffusion checkpoint to calibrate")
    p.add_argument("--corpus", required=True, help="a corpus built for its autoencoder")
    p.add_argument("--out", required=True, help="where to write the calibrated checkpoint")
    p.add_argument("--split", default="val", help="maps the model did not train on (default %(default)s)")
    p.add_argument("--maps", type=int, default=8, help="entries to measure on (default %(default)s)")
    p.add_argument("--points", type=int, default=20, help="start timesteps measured (default %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps of a full chain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autoencoder", help="default: the bundled Cryo-SWAN, which must be the one it learned")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a = p.parse_args(argv)
    if min(a.maps, a.points, a.steps) < 1:
        p.error("--maps, --points and --steps must be positive")
    return a


def run(args) -> Path:
    import numpy as np
    import torch

    from napari_cryoswan.checkpoint import load_checkpoint, resolve_checkpoint
    from napari_cryoswan.generate import load_diffusion, measure_strength_calibration, save_diffusion
    from training.corpus import Corpus

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists: choose another --out, or pass --overwrite.")
    autoencoder = load_checkpoint(resolve_checkpoint(args.autoencoder or "bundled:swan"))
    diffusion = load_diffusion(args.checkpoint, autoencoder=autoencoder)
    corpus = Corpus(args.corpus)
    first_of_entry = {}
    for i in corpus.split_indices(args.split):
        first_of_entry.setdefault(corpus.samples[i]["entry_id"], int(i))
    chosen = list(first_of_entry.values())[:args.maps]
    if not chosen:
        raise ValueError(f"the {args.split} split of {args.corpus} holds no maps.")

    def progress(done, total):
        print(f"\rmeasured {done}/{total} maps", end="", file=sys.stderr, flush=True)

    calibration = measure_strength_calibration(
        autoencoder.model, diffusion.model, corpus.load_batch(np.array(chosen)), points=args.points,
        steps=args.steps, seed=args.seed, device=torch.device(args.device), progress=progress)
    print(file=sys.stderr)
    diffusion.model.strength_calibration = {**calibration, "split": args.split, "corpus_id": corpus.corpus_id}
    save_diffusion(out, diffusion.model, autoencoder_id=diffusion.autoencoder_id,
                   autoencoder_path=diffusion.autoencoder_path, contract=diffusion.contract,
                   provenance=diffusion.provenance, training=diffusion.training, overwrite=True)
    for t, r in zip(calibration["timesteps"], calibration["similarity"]):
        print(f"t0 {t:4d}: similarity {r:.3f}")
    return out


def main(argv=None) -> int:
    from napari_cryoswan.checkpoint import CheckpointError

    args = parse_args(argv)
    try:
        path = run(args)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
