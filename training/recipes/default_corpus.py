"""Build the default offline corpora from the project's shared data folder.

    python -m training.recipes.default_corpus DATA_DIR [--out corpus_default] [--meshes-out corpus_meshes]
        [--assemblies-out corpus_assemblies]

DATA_DIR is the offline data folder (``shared/data`` beside the repository; its README gives the
provenance of every file). The inputs are exactly the files listed, with their sha256, in
``default_corpus.sha256`` beside this script; the recipe checks them first and stops if one is
missing or differs, so the corpora it builds are the same everywhere (with ``--no-meshes`` the
meshes are neither needed nor checked). Nothing in the product reads
DATA_DIR: training and evaluation read only the corpora built here.

1. Proteins (``--out``): the 18 structures of ``structures/`` with up to 20 sub-assemblies each
   (connected sets of 2–6 touching chains, distinct up to symmetry), and the 50 single chains of
   ``structures/single_chains/``; simulated at 8 Å on the 4 Å grid, 5 rotations each. Entries whose
   density does not fit the 64³ box (more than 5 % outside) are dropped, with the reason logged.
2. Shapes (``--meshes-out``): the 800 ``random_*.obj`` assemblies and the 9 named meshes,
   voxelised as solid densities, 5 rotations each. The one empty mesh is skipped.

3. Large complexes (``--assemblies-out``, only when given): for every structure of 1., up to 3
   symmetric assemblies of its copies (rings, double rings, tetrahedral, octahedral and
   icosahedral shells of 0.5–4 MDa, and 384 Å helical filaments; ``simulate.symmetric_assemblies``),
   cropped to the 64³ box as ProteinNet3D crops large entries. Every structure keeps the split it
   has in the protein corpus (``--split-from``), so the two corpora train side by side
   (``training.train --corpus corpus_default corpus_assemblies``) without a test structure leaking.

Every build resumes if interrupted: run the same command again.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from training.build_corpus import main as build_corpus

LOCK_FILE = Path(__file__).with_name("default_corpus.sha256")
SUBASSEMBLIES_PER_STRUCTURE = 20
MAX_CHAINS = 6
ASSEMBLIES_PER_STRUCTURE = 3


def locked_inputs(data_dir: Path, meshes: bool = True) -> dict[str, list[Path]]:
    """The recipe's input files by kind, each checked against its recorded sha256; without
    ``meshes`` the meshes are neither needed nor listed."""
    problems, inputs = [], {"structures": [], "meshes": []}
    for line in LOCK_FILE.read_text().splitlines():
        digest, relative = line.split(maxsplit=1)
        if relative.startswith("meshes/") and not meshes:
            continue
        path = data_dir / relative
        if not path.is_file():
            problems.append(f"missing: {relative}")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"changed: {relative}")
        inputs["meshes" if relative.startswith("meshes/") else "structures"].append(path)
    if problems:
        shown = "\n  ".join(problems[:20])
        raise SystemExit(f"{data_dir} is not the data this recipe was written for "
                         f"({len(problems)} problems):\n  {shown}")
    return inputs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.recipes.default_corpus",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="the offline data folder (holds structures/ and meshes/)")
    parser.add_argument("--out", default="corpus_default", help="the protein corpus folder (default corpus_default)")
    parser.add_argument("--meshes-out", default="corpus_meshes", help="the shape corpus folder (default corpus_meshes)")
    parser.add_argument("--no-meshes", action="store_true", help="build no shape corpus")
    parser.add_argument("--assemblies-out", help="also build the large-complex corpus in this folder")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild corpora that exist")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    inputs = locked_inputs(args.data_dir, meshes=not args.no_meshes)
    common = ["--workers", str(args.workers)] + (["--overwrite"] if args.overwrite else [])
    status = build_corpus(["--out", args.out, "--structures", *map(str, inputs["structures"]),
                           "--subassemblies", str(SUBASSEMBLIES_PER_STRUCTURE),
                           "--max-chains", str(MAX_CHAINS), *common])
    if status == 0 and args.assemblies_out:
        status = build_corpus(["--out", args.assemblies_out, "--structures", *map(str, inputs["structures"]),
                               "--assemblies", str(ASSEMBLIES_PER_STRUCTURE), "--assemblies-only",
                               "--split-from", args.out, *common])
    if status == 0 and not args.no_meshes:
        status = build_corpus(["--out", args.meshes_out, "--meshes", *map(str, inputs["meshes"]), *common])
    return status


if __name__ == "__main__":
    sys.exit(main())
