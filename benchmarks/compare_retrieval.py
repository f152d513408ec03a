"""Two runs of a retrieval benchmark with two autoencoders, compared query by query.

Two ``bench_retrieval.py`` runs, or two ``bench_retrieval_cv.py`` runs, must have drawn the same
maps, copies and folds: the same corpus, splits, ``--max-maps``, ``--folds``, ``--views-seed`` and
``--seed``, which their JSON files record. The model-free descriptors see only the maps, so their
hits must agree query for query; a pair of runs where they do not is refused.

For each latent method the two runs share (``SWAN shells``, ``SWAN embedding``, the head alone;
the names are the bench's, whichever autoencoder it ran) and each form, this prints the top-1 rate
of run A minus that of run B with a 95 % interval from a bootstrap over entries
(``bench_retrieval.paired_difference``): a gap that a few maps of one structure decide spans zero.

    python benchmarks/bench_retrieval.py --corpus corpus_default --checkpoint runs/rq/model.pt \\
        --splits val test --seed 0 --experiment --json retrieval_rq.json
    python benchmarks/bench_retrieval.py --corpus corpus_default --checkpoint bundled:swan \\
        --splits val test --seed 0 --experiment --json retrieval_swan.json
    python benchmarks/compare_retrieval.py retrieval_rq.json retrieval_swan.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_retrieval import ANCHORS, HEAD_ALONE, RESAMPLES, STANDARDISED, paired_difference  # noqa: E402

FORMS = ("clean", "hard", "experiment", "structure")
LATENT_METHODS = (*STANDARDISED, "SWAN embedding", HEAD_ALONE)
SAME_DRAW = ("corpus", "splits", "max_maps", "folds", "views_seed", "seed", "experiment")


def same_queries(a: dict, b: dict) -> None:
    """Raise ValueError unless the two runs drew the same maps and copies."""
    differing = [key for key in SAME_DRAW if a["settings"].get(key) != b["settings"].get(key)]
    if differing or a["entries_of_queries"] != b["entries_of_queries"]:
        raise ValueError(f"The runs did not draw the same queries (settings that differ: {differing or 'none'}, "
                         "entries of the queries compared too): run both with the same --corpus, --splits, "
                         "--max-maps, --folds, --views-seed, --seed and --experiment.")
    rows_b = {r["method"]: r for r in b["rows"]}
    for row in a["rows"]:
        if row["method"] in ANCHORS and row["method"] in rows_b:
            for form in FORMS:
                if row.get(f"{form}_hits") != rows_b[row["method"]].get(f"{form}_hits"):
                    raise ValueError(f"{row['method']} found other {form} hits in the two runs: the copies "
                                     "differ (another version of the bench or of the corpus?).")


def compare(a: dict, b: dict, seed: int = 0) -> list[dict]:
    """For every latent method and form in both runs: A's top-1 rate minus B's, with its interval."""
    same_queries(a, b)
    rows_a, rows_b = ({r["method"]: r for r in run["rows"]} for run in (a, b))
    rng = np.random.default_rng(seed)
    found = []
    for method in LATENT_METHODS:
        if method not in rows_a or method not in rows_b:
            continue
        for form in FORMS:
            if f"{form}_hits" not in rows_a[method] or f"{form}_hits" not in rows_b[method]:
                continue
            clusters = a.get(f"entries_of_{form}_queries", a["entries_of_queries"])
            difference, low, high = paired_difference(rows_a[method][f"{form}_hits"],
                                                      rows_b[method][f"{form}_hits"], clusters, rng)
            found.append({"method": method, "form": form, "a": rows_a[method][f"{form}_top1"],
                          "b": rows_b[method][f"{form}_top1"], "difference": difference, "low": low, "high": high})
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path, help="the --json of run A")
    p.add_argument("b", type=Path, help="the --json of run B, of the same benchmark")
    p.add_argument("--seed", type=int, default=0, help="draws the bootstrap")
    args = p.parse_args(argv)
    a, b = (json.loads(path.read_text()) for path in (args.a, args.b))
    try:
        found = compare(a, b, args.seed)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    for name, run in (("A", a), ("B", b)):
        head = run["settings"].get("head")
        print(f"{name}: {run['settings']['checkpoint']} ({run['checkpoint_id']})" + (f", head {head}" if head else ""))
    print(f"{a['maps']} maps; top-1 rates and A − B with a 95 % interval (entries resampled {RESAMPLES}×)\n")
    print("| method | form | A | B | A − B [95 %] |\n|---|---|---|---|---|")
    for c in found:
        print(f"| {c['method']} | {c['form']} | {c['a']:.2f} | {c['b']:.2f} | "
              f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
