"""Rebuild every bundled file that stands on Cryo-SWAN's latent, for one autoencoder, in one command.

    python -m training.recipes.latent_checkpoints DATA_DIR --autoencoder CKPT [--work runs] [--install]

The embedding head, the latent diffusion model and the noise-aware denoiser are fitted to one
autoencoder's latent and refuse any other; the bundled index holds that autoencoder's codes. So a
new ``swan.pt`` ships only together with all four. This recipe builds them into
``WORK/latent/``, laid out as the package holds them:

1. builds (or resumes) the protein and large-complex corpora with ``training.recipes.default_corpus``;
2. copies CKPT to ``WORK/latent/swan.pt`` (a folder holding another autoencoder is refused);
3. trains its embedding head on both corpora's training splits (``training.train_embedding``)
   into ``swan.embedding.pt``, keeping the encoded views in ``embedding_views.npz`` for head
   variants;
4. trains the latent diffusion model on the protein corpus (``training.train_diffusion``, the
   ``cpu`` preset, 2,000 steps) and calibrates its strength (``training.calibrate_diffusion``)
   into ``swan.diffusion.pt``;
5. fine-tunes the noise-aware denoiser from CKPT (``denoising_checkpoints.denoiser_args``);
6. with ``--install``, writes ``swan.pt``, its head, its diffusion model and ``swan-denoiser.pt``
   (half precision) into ``src/napari_cryoswan/checkpoints/``, then builds the bundled index from
   the installed ``bundled:swan`` (the protein corpus, one orientation per entry), fits its
   projection and hubs, and replaces ``src/napari_cryoswan/data/index/`` with it. It asks nothing:
   pass it only when you mean to replace the shipped files.

Each step is skipped when its output is there, and the training runs resume, so a killed recipe
goes on when the same command is run again (a killed ``--install`` too: every file is written
atomically, and running it again writes them all). The benchmarks that judge the result are listed in
docs/CHECKPOINTS.md.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from napari_cryoswan._atomic import copy_atomic
from training import build_index, calibrate_diffusion, train_diffusion, train_embedding
from training.recipes.default_checkpoints import (PACKAGE_CHECKPOINTS, protein_corpora, recipe_parser,
                                                  train_or_resume)
from training.recipes.denoising_checkpoints import denoiser_args, install_half

DIFFUSION_ARGS = ["--preset", "cpu", "--steps", "2000"]  # the shipped swan.diffusion.pt's budget
PACKAGE_INDEX = PACKAGE_CHECKPOINTS.parent / "data" / "index"
INDEX_PARTS = ("manifest.json", "shards", "projection")


def place_autoencoder(autoencoder: str, folder: Path) -> Path:
    """``folder/swan.pt``: a copy of the autoencoder, which every later step reads. A folder that
    already holds another autoencoder is refused, since its other files were fitted to that one."""
    from napari_cryoswan.checkpoint import checkpoint_id, resolve_checkpoint

    source, target = resolve_checkpoint(autoencoder), folder / "swan.pt"
    if not source.is_file():
        raise FileNotFoundError(f"{source} is not a checkpoint file.")
    if target.is_file():
        if checkpoint_id(target) != checkpoint_id(source):
            raise FileExistsError(f"{folder} holds the files of another autoencoder "
                                  f"({checkpoint_id(target)}, not {checkpoint_id(source)}): "
                                  "choose another --work, or remove that folder.")
        return target
    folder.mkdir(parents=True, exist_ok=True)
    copy_atomic(source, target)
    return target


def build_files(autoencoder: Path, corpus: Path, large: Path, folder: Path, device: list[str]) -> int:
    """Steps 3-5: the head, the calibrated diffusion model and the denoiser run, beside
    ``autoencoder``. Returns an exit code."""
    head, diffusion = folder / "swan.embedding.pt", folder / "swan.diffusion.pt"
    code = 0
    if not head.is_file():
        code = train_embedding.main(["--checkpoint", str(autoencoder), "--corpus", str(corpus), str(large),
                                     "--views-cache", str(folder / "embedding_views.npz"), "--out", str(head),
                                     *device])
    if not code and not diffusion.is_file():
        run = folder / "diffusion"
        if not (run / "model.pt").is_file():
            resume = ["--resume"] if (run / "last.pt").is_file() else []
            code = train_diffusion.main(["--autoencoder", str(autoencoder), "--corpus", str(corpus),
                                         "--out", str(run), *DIFFUSION_ARGS, *device, *resume])
        if not code:
            code = calibrate_diffusion.main(["--checkpoint", str(run / "model.pt"), "--corpus", str(corpus),
                                             "--autoencoder", str(autoencoder), "--out", str(diffusion),
                                             *device])
    if not code:
        code = train_or_resume(folder / "swan-denoiser",
                               ["--model", "swan", "--corpus", str(corpus), *denoiser_args(autoencoder), *device])
    return code


def install(folder: Path, corpus: Path, device: list[str]) -> int:
    """Step 6: the four files into the package, then the bundled index built from them."""
    for name in ("swan.pt", "swan.embedding.pt", "swan.diffusion.pt"):
        copy_atomic(folder / name, PACKAGE_CHECKPOINTS / name)
    install_half(folder / "swan-denoiser" / "model.pt", PACKAGE_CHECKPOINTS / "swan-denoiser.pt")
    index = folder / "index"
    if index.exists():  # it may hold an older autoencoder's codes: build it again from the installed one
        shutil.rmtree(index)
    code = build_index.main(["--corpus", str(corpus), "--rotations", "0", "--checkpoint", "bundled:swan",
                             "--out", str(index), *device])
    if code:
        return code
    from napari_cryoswan import explorer

    code = explorer.main([str(index)])
    if code:
        return code
    staged = PACKAGE_INDEX.with_name("index.partial")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    for part in INDEX_PARTS:
        copy = shutil.copytree if (index / part).is_dir() else shutil.copyfile
        copy(index / part, staged / part)
    shutil.rmtree(PACKAGE_INDEX, ignore_errors=True)
    staged.replace(PACKAGE_INDEX)
    print(f"Installed swan.pt, swan.embedding.pt, swan.diffusion.pt and swan-denoiser.pt into "
          f"{PACKAGE_CHECKPOINTS}, and the index into {PACKAGE_INDEX}")
    return 0


def main(argv=None) -> int:
    parser = recipe_parser("training.recipes.latent_checkpoints", __doc__,
                           installs="swan.pt, the files that stand on it and the bundled index")
    parser.add_argument("--autoencoder", required=True,
                        help="the Cryo-SWAN checkpoint (a file, or bundled:swan) whose latent the files serve")
    args = parser.parse_args(argv)

    code, corpus, large = protein_corpora(args)
    if code:
        return code
    folder, device = args.work / "latent", ["--device", args.device]
    try:
        autoencoder = place_autoencoder(args.autoencoder, folder)
    except (FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    code = build_files(autoencoder, corpus, large, folder, device)
    if code or not args.install:
        return code
    return install(folder, corpus, device)


if __name__ == "__main__":
    sys.exit(main())
