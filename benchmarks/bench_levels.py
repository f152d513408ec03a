"""Does Cryo-SWAN's second level carry information? Per checkpoint, on a corpus split:

- test MSE of the full reconstruction (decode_codes of the map's own codes);
- "RQ2 swapped": the MSE when each map is decoded with its own RQ1 codes and the next map's RQ2
  codes (unchanged when the decoder ignores RQ2);
- the MSE of every single-level variant the checkpoint was trained to decode ("RQ1", "RQ2");
- RQ2's quantized latent: mean per-dimension s.d. and effective rank (exp of the entropy of its
  singular-value spectrum);
- codebook usage per level (codes used, perplexity) over ``--usage-maps`` training maps, and on
  the split's maps beside the usage that as many independent draws from the training maps' code
  frequencies are expected to reach (``quantize.expected_codes_used``): a split that uses about
  that many is as varied as its size allows, one far below it lives in a corner of the codebook;
- per level, the residual left after each scale, as its energy (mean squared norm: the error
  that the nearest-code search and the quantizer's loss reduce) and as its mean norm, and for
  each the scales after which it is larger than before them ("grows at"; "none" when it shrinks
  at every scale), on the split's maps. The mean norm can rise where the energy falls: a scale
  that evens out large and small residual vectors;
- the last validation loss of the run, when a ``validation.jsonl`` lies beside the checkpoint.

    python benchmarks/bench_levels.py --corpus corpus_default runs/literal/model.pt runs/residual/model.pt

Prints the machine, versions, settings and date, then a markdown table; ``--json`` writes all.
MSE on the corpus's z-scored maps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCH = 10


def level_statistics(model, volumes, usage_volumes) -> dict:
    """The measurements of the module docstring for one model. Shape: volumes (N, 1, D, H, W)."""
    import torch

    from napari_cryoswan.models.quantize import expected_codes_used

    def batched(function, tensor):
        return [function(tensor[i:i + BATCH]) for i in range(0, len(tensor), BATCH)]

    def mse(a, b) -> float:
        return float(((a - b) ** 2).mean())

    row = {}
    with torch.inference_mode():
        encodings = batched(model.encode, volumes)
        codes = {level: [torch.cat([e.codes[level][s] for e in encodings])
                         for s in range(len(encodings[0].codes[level]))]
                 for level in encodings[0].codes}

        def decode(all_codes):
            return torch.cat([model.decode_codes({k: [c[i:i + BATCH] for c in v] for k, v in all_codes.items()})
                              for i in range(0, len(volumes), BATCH)])

        row["mse"] = mse(decode(codes), volumes)
        if "rq2" in codes:
            row["mse_rq2_swapped"] = mse(decode({**codes, "rq2": [c.roll(1, 0) for c in codes["rq2"]]}),
                                         volumes)
            latent = torch.cat([e.quantized["rq2"] for e in encodings])
            flat = latent.permute(0, 2, 3, 4, 1).reshape(-1, latent.shape[1])
            row["rq2_latent_sd"] = float(flat.std(0).mean())
            share = torch.linalg.svdvals(flat - flat.mean(0)) ** 2
            share = share / share.sum()
            row["rq2_effective_rank"] = float(torch.exp(-(share * share.clamp_min(1e-12).log()).sum()))
        model.reset_usage()
        outputs = batched(model, volumes)
        split_usage = model.codebook_usage()
        for k, level in enumerate(outputs[0].levels):
            for statistic, key in (("energy", "residual_energies"), ("norm", "residual_norms")):
                values = torch.stack([o.levels[level][key] for o in outputs]).mean(0).tolist()
                grows = [str(s) for s, before, after in zip(model.config.scales[k][1:], values, values[1:])
                         if after > before]
                row[f"{level}_residual_{statistic}_grows_at"] = ", ".join(grows) or "none"
                row[f"{level}_{key}"] = " ".join(f"{value:.4g}" for value in values)
        variants = batched(model.reconstruction_variants, volumes)
        for name in variants[0]:
            row[f"mse_{name}"] = mse(torch.cat([v[name] for v in variants]), volumes)
        model.reset_usage()
        batched(model, usage_volumes)
        for level, usage in model.codebook_usage().items():
            row[f"{level}_used"], row[f"{level}_perplexity"] = usage["used"], usage["perplexity"]
            row[f"{level}_used_split"] = split_usage[level]["used"]
            row[f"{level}_used_split_expected"] = round(expected_codes_used(
                model.codebooks()[level].counts.sum(0), split_usage[level]["assignments"]))
    return row


def main(argv=None) -> None:
    import torch

    from _machine import run_line
    from napari_cryoswan.checkpoint import load_checkpoint, resolve_checkpoint
    from training.corpus import CorpusSet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--corpus", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--usage-maps", type=int, default=200, help="training maps to count usage on")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--device", default="cpu", help="where the models run (default cpu)")
    args = p.parse_args(argv)

    corpus = CorpusSet([args.corpus])
    volumes = torch.from_numpy(corpus.load_batch(corpus.split_indices(args.split))[:, None]).to(args.device)
    usage = torch.from_numpy(corpus.load_batch(corpus.split_indices("train")[:args.usage_maps])[:, None]).to(args.device)
    print(f"# Information in each level\n\n{run_line()}\ndevice {args.device}; corpus {args.corpus} (id {corpus.corpus_id}), {args.split} split: "
          f"{len(volumes)} maps; usage over {len(usage)} training maps\n")
    rows = {}
    for spec in args.checkpoints:
        loaded = load_checkpoint(resolve_checkpoint(spec))
        row = {"checkpoint_id": loaded.checkpoint_id,
               **level_statistics(loaded.model.to(args.device), volumes, usage)}
        log = Path(spec).with_name("validation.jsonl")
        if log.is_file():
            last = json.loads(log.read_text().splitlines()[-1])
            row.update(val_step=last["step"], val_loss=last["loss"])
        rows[spec] = row
        print(f"{spec}: done", flush=True)
    columns = sorted({key for row in rows.values() for key in row} - {"checkpoint_id"},
                     key=lambda k: (not k.startswith("mse"), not k.startswith("val"), k))
    print("\n| checkpoint | id | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for spec, row in rows.items():
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "—")) for c in columns]
        print(f"| {spec} | {row['checkpoint_id']} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
