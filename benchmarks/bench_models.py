"""Throughput and peak memory of every registry model on 64³ volumes.

For each model and batch size: parameters, then reconstruct (eval forward), encode, decode and
train step (forward, backward, Adam step) throughput in volumes per second, medians over
repeats after a warm-up, and the peak memory of a reconstruction and of a training step.

Each (model, batch) runs in a fresh worker process, so that on a CPU the peak memory can be
read as the growth of the process's peak resident set (ru_maxrss) over its size once the model,
the optimizer and the input exist; reconstruction is measured before training, which needs
more. On a GPU it is torch.cuda.max_memory_allocated over the same baseline.

    python benchmarks/bench_models.py                                # CPU, full presets
    python benchmarks/bench_models.py --device cuda --amp bf16 --batch-sizes 1 8 32
    python benchmarks/bench_models.py --models swan vq --preset small --repeats 3

Prints the machine, versions, settings and date, then a markdown table; --json writes both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from _machine import cpu_name
import torch

from napari_cryoswan.models import MODEL_NAMES, build_model, default_optimizer

VOLUME = 64
PHASES = ("reconstruct", "encode", "decode", "train")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--preset", default="full", choices=("small", "cpu", "full"),
                        help="model size; 'cpu' exists for swan and swan-rq1 only (the bundled checkpoints)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per phase (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    return parser.parse_args()


# ─── memory ──────────────────────────────────────────────────────────────────────────────────


def peak_bytes(device: torch.device) -> int:
    """Peak memory so far: the CUDA allocator's, or this process's peak resident set."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ─── timing ──────────────────────────────────────────────────────────────────────────────────


def median_seconds(run, device: torch.device, repeats: int) -> float:
    """Median wall time of run() over `repeats` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        _synchronise(device)
        start = time.perf_counter()
        run()
        _synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(name: str, batch: int, args, device: torch.device) -> dict:
    """All phases for one model and batch size (run in a worker process)."""
    torch.manual_seed(0)
    model = build_model(name, preset=args.preset).to(device)
    optimizer = default_optimizer(model)
    x = torch.randn(batch, 1, VOLUME, VOLUME, VOLUME, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    def train_step():
        model.train()
        with autocast:
            total, _ = model.loss(x)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    def inference(fn):
        def run():
            model.eval()
            with torch.inference_mode(), autocast:
                return fn()
        return run

    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "batch": batch}
    baseline = current_bytes(device)
    row["reconstruct_vol_s"] = batch / median_seconds(inference(lambda: model(x).recon), device, args.repeats)
    row["reconstruct_peak_mib"] = (peak_bytes(device) - baseline) / 2**20
    # The first training step seeds the codebooks from data, so encode/decode see real codes.
    row["train_vol_s"] = batch / median_seconds(train_step, device, args.repeats)
    row["train_peak_mib"] = (peak_bytes(device) - baseline) / 2**20
    codes = inference(lambda: model.encode(x).codes)()
    row["encode_vol_s"] = batch / median_seconds(inference(lambda: model.encode(x)), device, args.repeats)
    row["decode_vol_s"] = batch / median_seconds(inference(lambda: model.decode_codes(codes)), device, args.repeats)
    row["reconstruct_s_per_vol"] = 1.0 / row["reconstruct_vol_s"]
    return row


def run_worker(name: str, batch: int) -> dict:
    """Run bench_one in a fresh process with this script's settings; returns its row."""
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", name, str(batch)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {name} batch {batch}: " + ", ".join(f"{p} {row[f'{p}_vol_s']:.2f} vol/s" for p in PHASES),
          file=sys.stderr, flush=True)
    return row


# ─── report ──────────────────────────────────────────────────────────────────────────────────


def environment(args, device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "amp": args.amp,
        "preset": args.preset,
        "batch_sizes": args.batch_sizes,
        "repeats": args.repeats,
        "volume": f"{VOLUME}³",
        "command": " ".join(["python", *sys.argv]),
        # Other work on the machine slows every number: the 1-minute load average, at the start.
        "load_average_start": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def markdown_table(rows: list[dict]) -> str:
    header = ("| model | params | batch | reconstruct vol/s | s/vol | encode vol/s | decode vol/s "
              "| train vol/s | peak MiB (recon) | peak MiB (train) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['batch']} | {r['reconstruct_vol_s']:.2f} "
            f"| {r['reconstruct_s_per_vol']:.3f} | {r['encode_vol_s']:.2f} | {r['decode_vol_s']:.2f} "
            f"| {r['train_vol_s']:.2f} | {r['reconstruct_peak_mib']:.0f} | {r['train_peak_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(bench_one(args.worker[0], int(args.worker[1]), args, device)))
        return
    env = environment(args, device)
    rows = [run_worker(name, batch) for name in args.models for batch in args.batch_sizes]
    env["load_average_end"] = round(os.getloadavg()[0], 2)
    print("\n".join(f"- {key}: {value}" for key, value in env.items()))
    print()
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
