"""Rebuild the two bundled denoising checkpoints from the offline data, in one command.

    python -m training.recipes.denoising_checkpoints DATA_DIR [--work runs] [--install]

1. builds (or resumes) the protein and shape corpora with ``training.recipes.default_corpus``;
2. trains ``swan-shapes``: Cryo-SWAN on the voxelised meshes, for the paper's ModelNet denoising
   protocol, with the settings of the protein checkpoints (``default_checkpoints``) and the
   1,500 steps the shipped file was trained for;
3. fine-tunes ``swan-denoiser``: the bundled ``swan``'s encoder, trained on noisy copies (SNR
   0.1–2) of the protein corpus's training maps to give the codes of the clean maps, its
   codebooks and decoder unchanged (``training.train --init --input-snr --train-only encoder``);
4. scores both with ``training.evaluate_denoise`` (shapes on the shape corpus's test split,
   proteins on the protein corpus's, where the fine-tune is a row beside the plain projection);
5. with ``--install``, writes both into ``src/napari_cryoswan/checkpoints/`` as
   ``swan-shapes.pt`` and ``swan-denoiser.pt``, their weights stored in half precision
   (``save_checkpoint(half=True)``) so that the bundled files keep to the size budget; asking
   nothing, so pass it only when you mean to replace the shipped files.

A killed run resumes when the same command is run again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from training import evaluate_denoise
from training.recipes import default_corpus
from training.recipes.default_checkpoints import (PACKAGE_CHECKPOINTS, TRAIN_ARGS, recipe_parser,
                                                  train_or_resume)

DENOISER_SNR = ("0.1", "2")  # the benchmark's range of SNRs, drawn log-uniformly per map
SHAPES_STEPS = "1500"  # the budget of the shipped swan-shapes.pt
SNRS = ["0.1", "0.25", "0.5", "1", "2"]
EVALUATE_ARGS = ["--split", "test", "--max-maps", "10", "--snr", *SNRS, "--seed", "0"]


def denoiser_args(init) -> list[str]:
    """``training.train``'s settings of the noise-aware fine-tune of the autoencoder ``init``."""
    return ["--init", str(init), "--input-snr", *DENOISER_SNR, "--train-only", "encoder",
            "--steps", "600", "--batch-size", "4", "--lr", "3e-4", "--val-every", "100",
            "--checkpoint-every", "50", "--max-val", "32", "--seed", "0", "--no-amp"]


def main(argv=None) -> int:
    parser = recipe_parser("training.recipes.denoising_checkpoints", __doc__,
                           installs="swan-shapes.pt and swan-denoiser.pt")
    args = parser.parse_args(argv)

    proteins, shapes = args.work / "corpus_default", args.work / "corpus_meshes"
    code = default_corpus.main([str(args.data_dir), "--out", str(proteins), "--meshes-out", str(shapes),
                                 "--workers", str(args.workers)])
    device = ["--device", args.device]
    runs = {"swan-shapes": args.work / "swan-shapes", "swan-denoiser": args.work / "swan-denoiser"}
    code = code or train_or_resume(runs["swan-shapes"], ["--model", "swan", "--preset", "cpu",
                                                         "--corpus", str(shapes), "--steps", SHAPES_STEPS,
                                                         *TRAIN_ARGS, *device])
    code = code or train_or_resume(runs["swan-denoiser"], ["--model", "swan", "--corpus", str(proteins),
                                                           *denoiser_args("bundled:swan"), *device])
    finals = {name: run / "model.pt" for name, run in runs.items()}
    code = code or evaluate_denoise.main([
        "--checkpoint", str(finals["swan-shapes"]), "--corpus", str(shapes), *EVALUATE_ARGS,
        "--out", str(args.work / "report_denoise_shapes"), *device])
    code = code or evaluate_denoise.main([
        "--checkpoint", "bundled:swan", "--denoiser", str(finals["swan-denoiser"]),
        "--corpus", str(proteins), *EVALUATE_ARGS, "--out", str(args.work / "report_denoise"),
        *device])
    if code or not args.install:
        return code
    for name, final in finals.items():
        install_half(final, PACKAGE_CHECKPOINTS / f"{name}.pt")
    print(f"Installed {', '.join(finals)} into {PACKAGE_CHECKPOINTS}")
    return 0


def install_half(source: Path, target: Path) -> Path:
    """Write the checkpoint ``source`` to ``target`` with its weights in half precision."""
    from napari_cryoswan.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(source)
    return save_checkpoint(target, loaded.model, {**loaded.provenance, "stored_as": "float16"},
                           contract=loaded.contract, overwrite=True, half=True)


if __name__ == "__main__":
    sys.exit(main())
