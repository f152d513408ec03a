"""Variants of an anchor map from the latent diffusion model (``napari_cryoswan.generate``).

    python -m training.generate --anchor MAP --n N --strength S --seed K --out DIR \\
        [--checkpoint DIFFUSION.pt] [--autoencoder CKPT] [--steps T] [--device D]

Writes ``<anchor>_variant_<i>.mrc`` for i = 0 … N−1 on the anchor's own grid (shape, voxel size,
origin: they overlay it), each with its seed and the strength in its header label, and
``generation.json`` beside them: the anchor, the checkpoint ids, strength, seed, steps, and per
variant its seed, its correlation with the anchor's reconstruction and the FSC 0.5 resolution
against it (``metrics.fsc``, in the model's box, where both lie on one cubic grid).

``--autoencoder``: by default the one the diffusion checkpoint was trained with (where it was then),
else the bundled Cryo-SWAN; it must be that autoencoder in any case. ``--checkpoint``: by default
the diffusion model bundled beside the autoencoder (``swan.pt`` → ``swan.diffusion.pt``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    from napari_cryoswan.generate import DEFAULT_STEPS, DEFAULT_STRENGTH
    from napari_cryoswan.session import DEVICES

    p = argparse.ArgumentParser(prog="python -m training.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--anchor", required=True, help="the anchor map (.mrc, .map, .map.gz)")
    p.add_argument("--n", type=int, default=4, help="number of variants (default %(default)s)")
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH,
                   help="0: the anchor's reconstruction … 1: an unconditional sample (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="variant i uses seed + i (default %(default)s)")
    p.add_argument("--out", required=True, help="folder for the variants and generation.json")
    p.add_argument("--checkpoint", help="the diffusion checkpoint (default: the bundled one)")
    p.add_argument("--autoencoder", help="the Cryo-SWAN checkpoint it was trained with")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps of a full chain (default %(default)s)")
    p.add_argument("--contour", type=float, help="mask the anchor at this contour level first")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--overwrite", action="store_true", help="replace variants already in --out")
    a = p.parse_args(argv)
    if a.n < 1 or a.steps < 1:
        p.error("--n and --steps must be positive")
    if not 0.0 <= a.strength <= 1.0:
        p.error("--strength must lie between 0 and 1")
    return a


def _checkpoints(args):
    """(diffusion, autoencoder) as the arguments name them, or CheckpointError saying what to do."""
    from napari_cryoswan.checkpoint import bundled_checkpoint_path, load_checkpoint, resolve_checkpoint
    from napari_cryoswan.generate import check_autoencoder, diffusion_beside, load_diffusion

    if args.checkpoint:
        diffusion = load_diffusion(args.checkpoint)
        ae_path = (resolve_checkpoint(args.autoencoder) if args.autoencoder else
                   Path(diffusion.autoencoder_path) if Path(diffusion.autoencoder_path).is_file() else
                   bundled_checkpoint_path("swan"))
    else:
        shown_as = args.autoencoder or "bundled:swan"
        ae_path = resolve_checkpoint(shown_as)
        diffusion = load_diffusion(diffusion_beside(ae_path, shown_as=shown_as))
    autoencoder = load_checkpoint(ae_path)
    check_autoencoder(diffusion, autoencoder)
    return diffusion, autoencoder


def run(args) -> Path:
    """Generate and write; returns the path of generation.json."""
    from napari_cryoswan.engine import choose_device
    from napari_cryoswan.generate import generate_variants
    from napari_cryoswan.io import read_map, write_map
    from napari_cryoswan.metrics import correlation, fsc
    from napari_cryoswan._atomic import write_json_atomic

    diffusion, autoencoder = _checkpoints(args)
    anchor_path = Path(args.anchor)
    anchor = read_map(anchor_path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = anchor_path.name.split(".")[0]
    names = [out / f"{stem}_variant_{i:03d}.mrc" for i in range(args.n)]
    if not args.overwrite and (taken := [p for p in names if p.exists()]):
        raise FileExistsError(f"{taken[0]} exists: choose another --out, or pass --overwrite.")

    def progress(done, total):
        print(f"\rdenoising {done}/{total}", end="", file=sys.stderr, flush=True)

    result = generate_variants(anchor, diffusion, autoencoder, n=args.n, strength=args.strength, seed=args.seed,
                               steps=args.steps, contour_level=args.contour,
                               device=choose_device(args.device), progress=progress)
    print(file=sys.stderr)
    voxel = result.record.voxel_size
    reference = result.reconstruction_box
    variants = []
    for path, variant, box, seed in zip(names, result.variants, result.variant_boxes, result.seeds):
        write_map(path, variant.data, variant.voxel_size, variant.origin, overwrite=True,
                  label=f"cryo-swan variant seed {seed} strength {args.strength:g}")
        curve = fsc(box, reference, voxel)
        variants.append({
            "file": path.name, "seed": seed,
            "correlation": correlation(box, reference),
            "fsc_0.5": curve.resolution(0.5).to_dict(),
        })
    report = {
        "anchor": str(anchor_path.resolve()),
        "diffusion_checkpoint": str(diffusion.path), "diffusion_checkpoint_id": diffusion.checkpoint_id,
        "autoencoder_checkpoint": str(autoencoder.path), "autoencoder_checkpoint_id": autoencoder.checkpoint_id,
        "strength": args.strength, "seed": args.seed, "steps": args.steps, "n": args.n,
        "contour_level": args.contour,
        "grid": {"shape": list(anchor.shape), "voxel_size": list(anchor.voxel_size), "origin": list(anchor.origin)},
        "compared_with": "the anchor's reconstruction by the autoencoder, in the model's box",
        "notes": result.notes,
        "variants": variants,
    }
    write_json_atomic(out / "generation.json", report)
    return out / "generation.json"


def main(argv=None) -> int:
    from napari_cryoswan.checkpoint import CheckpointError
    from napari_cryoswan.io import MapReadError

    args = parse_args(argv)
    try:
        path = run(args)
    except (CheckpointError, MapReadError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"Wrote {args.n} variants and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
