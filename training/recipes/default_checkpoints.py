"""Rebuild the bundled checkpoints from the offline data, in one command.

    python -m training.recipes.default_checkpoints DATA_DIR [--work runs] [--workers N] [--install]

1. builds (or resumes) the protein corpus and the large-complex corpus with
   ``training.recipes.default_corpus`` (no meshes);
2. trains Cryo-SWAN (RQ1+RQ2) and its RQ1-only ablation on both corpora, with the same settings
   and budget (3,000 steps: docs/MODELS.md measured the literal design still improving there);
3. evaluates both on the protein corpus's test split with ``training.evaluate``;
4. rebuilds what stands on the new Cryo-SWAN's latent (its embedding head, diffusion model and
   denoiser) with ``training.recipes.latent_checkpoints``;
5. with ``--install``, writes ``swan.pt`` with those files and the bundled index built on it
   (``latent_checkpoints --install``), and ``swan-rq1.pt``, into the package (asking nothing:
   pass it only when you mean to replace the shipped weights; without it the files stay in the
   work folder).

The shipped files were trained with these settings on one GPU (docs/CHECKPOINTS.md); their
predecessors came from this recipe at commit 9108e0d. A killed run resumes when the same command
is run again.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from napari_cryoswan._atomic import copy_atomic
from training import evaluate, train
from training.recipes import default_corpus

MODELS = ("swan", "swan-rq1")
# What every bundled model's training shares; the step budget is each recipe's own. No bf16
# autocast (--no-amp): a GPU trains in float32, as the CPU runs were measured (cuDNN may use TF32).
TRAIN_ARGS = ["--batch-size", "4", "--val-every", "100", "--checkpoint-every", "50", "--seed", "0", "--no-amp"]
STEPS = "3000"
PACKAGE_CHECKPOINTS = Path(__file__).resolve().parents[2] / "src" / "napari_cryoswan" / "checkpoints"


def train_or_resume(out: Path, train_args: list[str]) -> int:
    """Run ``training.train`` into ``out`` unless it finished there: resumed from its last
    checkpoint, or started again when it stopped before the first one."""
    if (out / "model.pt").is_file():
        return 0
    if out.is_dir() and not (out / "last.pt").is_file():
        print(f"{out} stopped before its first checkpoint: starting it again")
        shutil.rmtree(out)
    resume = ["--resume"] if (out / "last.pt").is_file() else []
    return train.main([*train_args, "--out", str(out), *resume])


def recipe_parser(module: str, description: str, *, installs: str) -> argparse.ArgumentParser:
    """The arguments every checkpoint recipe takes: the data folder, --work, --device, the
    corpus step's --workers, and --install (which writes what ``installs`` names)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="the offline data folder (structures/, meshes/)")
    parser.add_argument("--work", type=Path, default=Path("runs"), help="corpora, runs and reports")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=2,
                        help="processes that build the corpora (default 2; a machine's core count is faster)")
    parser.add_argument("--install", action="store_true", help=f"replace {installs} in the package")
    return parser


def protein_corpora(args: argparse.Namespace) -> tuple[int, Path, Path]:
    """(exit code, proteins, large complexes): the two corpora of the bundled models under
    ``--work``, built or resumed."""
    corpus, large = args.work / "corpus_default", args.work / "corpus_assemblies"
    code = default_corpus.main([str(args.data_dir), "--out", str(corpus), "--no-meshes",
                                "--assemblies-out", str(large), "--workers", str(args.workers)])
    return code, corpus, large


def main(argv=None) -> int:
    parser = recipe_parser("training.recipes.default_checkpoints", __doc__,
                           installs="swan.pt (with the files that stand on it) and swan-rq1.pt")
    parser.add_argument("--preset", default="cpu", choices=("cpu", "full"),
                        help="'cpu' (the bundled models' widths) or 'full' (the paper's widths; a GPU's work)")
    args = parser.parse_args(argv)

    code, corpus, large = protein_corpora(args)
    if code:
        return code
    finals = []
    for model in MODELS:
        out = args.work / model
        code = train_or_resume(out, ["--model", model, "--corpus", str(corpus), str(large), "--device",
                                     args.device, "--preset", args.preset, "--steps", STEPS, *TRAIN_ARGS])
        if code:
            return code
        finals.append(out / "model.pt")
    code = evaluate.main(["--checkpoints", *map(str, finals), "--corpus", str(corpus),
                          "--split", "test", "--out", str(args.work / "report"),
                          "--device", args.device])
    if code:
        return code
    # Imported here: that recipe takes its helpers from this module.
    from training.recipes import latent_checkpoints

    code = latent_checkpoints.main([str(args.data_dir), "--work", str(args.work), "--autoencoder", str(finals[0]),
                                    "--device", args.device, "--workers", str(args.workers),
                                    *(["--install"] if args.install else [])])
    if code or not args.install:
        return code
    copy_atomic(finals[1], PACKAGE_CHECKPOINTS / "swan-rq1.pt")
    print(f"Installed swan-rq1 into {PACKAGE_CHECKPOINTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
