"""Time and peak memory of reading and preprocessing large maps (read_map + preprocess).

For each map size it writes a synthetic float32 MRC map (a few thousand Gaussian "atoms" in a
compact particle, plus a little noise) to a temporary folder, then runs
``preprocess(read_map(path), PreprocessSettings())`` in a fresh worker process per (map, path):

- crop:     the default: the map is memory-mapped, and its spectrum cropped to half the target
            voxel size, slab by slab, before the low-pass (``PreprocessSettings.fourier_crop``);
- direct:   the same code with ``fourier_crop=False``: low-pass and interpolation on the full grid;
- baseline: (with --baseline-ref) the package as it was at a git revision, for a before/after
            ratio in one run;
- reconstruct: the whole reconstruct use case, as the widget runs it: read_map, then
            ``Session.reconstruct`` with the bundled Cryo-SWAN and its RQ1 control on the CPU
            (preprocessing, both models, FSC, results on the model's box). The checkpoints are
            loaded before the memory baseline is taken: the growth is the map's work alone.

Time is the median wall time over --repeats runs in the worker, split into read_map and
preprocess. Peak memory is the growth of the worker's peak resident set (VmHWM) over its
resident set once Python, numpy, scipy, mrcfile and the package are imported, also as a multiple of the
map's own size. Pages of a memory-mapped map count as resident once read (though the
kernel can drop them at any time, as they are clean copies of the file).

    python benchmarks/bench_large_maps.py                                  # 512³ @ 1 Å, 640³ @ 0.8 Å
    python benchmarks/bench_large_maps.py --sizes 256@1.0 --repeats 1     # a quick run
    python benchmarks/bench_large_maps.py --baseline-ref d81f3a4 --paths crop direct

Prints the machine, versions, settings and date, then a markdown table; --json writes both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
PATHS = ("crop", "direct", "baseline", "reconstruct")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["512@1.0", "640@0.8"],
                        help="maps as EDGE@VOXEL (cubic, voxel in Å)")
    parser.add_argument("--paths", nargs="+", default=["crop", "direct"], choices=PATHS)
    parser.add_argument("--baseline-ref", default=None,
                        help="git revision whose src/napari_cryoswan is timed as the 'baseline' path")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--contour-sigmas", type=float, default=None,
                        help="also mask at mean + this many standard deviations (default: no mask)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the maps are written (default: a temporary folder, removed after)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--worker", nargs=3, metavar=("MAP", "PATH", "MAP_BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "baseline" in args.paths and not args.baseline_ref:
        args.paths.remove("baseline")
    if args.baseline_ref and "baseline" not in args.paths:
        args.paths.append("baseline")
    return args


# ─── maps ────────────────────────────────────────────────────────────────────────────────────


def parse_size(text: str) -> tuple[int, float]:
    edge, voxel = text.split("@")
    return int(edge), float(voxel)


def write_synthetic_map(path: Path, edge: int, voxel: float, seed: int = 0) -> None:
    """A particle of Gaussian atoms (σ = 1 Å) filling the middle of the box, plus weak noise."""
    from napari_cryoswan.io import write_map

    rng = np.random.default_rng(seed)
    extent = edge * voxel
    n_atoms = 20000
    positions = extent / 2 + rng.normal(size=(n_atoms, 3)) * extent * 0.12
    data = np.empty((edge,) * 3, np.float32)
    for z0 in range(0, edge, 32):  # noise slab by slab, so writing needs little more than the map
        data[z0:z0 + 32] = 0.02 * rng.standard_normal((min(32, edge - z0), edge, edge), np.float32)
    sigma, axis = 1.0, np.arange(edge) * voxel
    reach = int(np.ceil(4 * sigma / voxel))
    for p in positions:
        centre = np.round(p / voxel).astype(int)
        box = tuple(slice(max(c - reach, 0), min(c + reach + 1, edge)) for c in centre)
        g = [np.exp(-((axis[b] - x) ** 2) / (2 * sigma**2)).astype(np.float32) for b, x in zip(box, p)]
        data[box] += g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
    write_map(path, data, voxel, overwrite=True, label=f"synthetic {edge}^3 at {voxel} A")


# ─── worker ──────────────────────────────────────────────────────────────────────────────────


def peak_bytes() -> int:
    """This process's peak resident set: VmHWM, where Linux has it, else ru_maxrss.

    ru_maxrss of a child started from a big parent can start at the parent's peak (Linux carries
    the high-water mark across fork and exec); VmHWM belongs to the process's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_one(map_path: Path, path: str, map_bytes: int, args) -> dict:
    """read_map + preprocess of one map, --repeats times (run in a fresh worker process)."""
    import mrcfile  # noqa: F401 (imported before the baseline, like the rest)
    import scipy.fft  # noqa: F401
    import scipy.ndimage  # noqa: F401

    import napari_cryoswan
    from napari_cryoswan.io import read_map
    from napari_cryoswan.preprocess import PreprocessSettings, preprocess

    settings = PreprocessSettings(**({"fourier_crop": False} if path == "direct" else {}))
    session = None
    if path == "reconstruct":
        from napari_cryoswan.checkpoint import bundled_checkpoint_path
        from napari_cryoswan.io import DensityMap
        from napari_cryoswan.session import Session

        session = Session("cpu")
        checkpoints = [bundled_checkpoint_path(name) for name in ("swan", "swan-rq1")]
        for checkpoint in checkpoints:
            session.checkpoint(checkpoint)
        warm_up = DensityMap(np.random.default_rng(0).random((64,) * 3, np.float32), (4.0,) * 3)
        session.reconstruct(warm_up, *checkpoints)  # torch's first call, outside the measure
    baseline = current_bytes()
    reads, preps, lazy = [], [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        density = read_map(map_path)
        reads.append(time.perf_counter() - start)
        lazy = bool(density.header.get("memory_mapped", False))
        if args.contour_sigmas is not None:
            level = density.header["mean"] + args.contour_sigmas * density.header["std"]
            settings = _with(settings, contour_level=level)
        start = time.perf_counter()
        if session is None:
            out = preprocess(density, settings)
        else:
            out = session.reconstruct(density, *checkpoints, contour_level=settings.contour_level)
        preps.append(time.perf_counter() - start)
        del density, out
    growth = peak_bytes() - baseline
    return {
        "read_s": statistics.median(reads),
        "preprocess_s": statistics.median(preps),
        "total_s": statistics.median(np.add(reads, preps).tolist()),
        "peak_mib": growth / 2**20,
        "peak_x_map": growth / map_bytes,
        "memory_mapped": lazy,
        "package": str(Path(napari_cryoswan.__file__).parent),
    }


def _with(settings, **changes):
    from dataclasses import replace

    return replace(settings, **changes)


def run_worker(map_path: Path, path: str, map_bytes: int, baseline_src: Path | None) -> dict:
    """bench_one in a fresh process with this script's settings; returns its row."""
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", str(map_path), path, str(map_bytes)]
    env = dict(os.environ)
    if path == "baseline":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(baseline_src), env.get("PYTHONPATH")]))
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def extract_baseline(ref: str, folder: Path) -> Path:
    """The package at git revision ``ref``, unpacked under ``folder``; returns its src folder."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src/napari_cryoswan"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src"


# ─── report ──────────────────────────────────────────────────────────────────────────────────


def environment(args) -> dict:
    import mrcfile
    import scipy

    from napari_cryoswan.preprocess import PreprocessSettings

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "mrcfile": mrcfile.__version__,
        "settings": str(PreprocessSettings()),
        "contour_sigmas": args.contour_sigmas,
        "baseline_ref": args.baseline_ref,
        "repeats": args.repeats,
        "command": " ".join(["python", *sys.argv]),
        # Other work on the machine slows every number: the 1-minute load average, at the start.
        "load_average_start": round(os.getloadavg()[0], 2),
    }


def markdown_table(rows: list[dict]) -> str:
    header = ("| map | MiB | path | memory-mapped | read_map s | preprocess (or reconstruct) s | total s | vs crop "
              "| peak MiB | peak × map |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    crop_time = {r["map"]: r["total_s"] for r in rows if r["path"] == "crop"}
    for r in rows:
        ratio = r["total_s"] / crop_time[r["map"]] if r["map"] in crop_time else float("nan")
        lines.append(
            f"| {r['map']} | {r['map_mib']:.0f} | {r['path']} | {'yes' if r['memory_mapped'] else 'no'} "
            f"| {r['read_s']:.2f} | {r['preprocess_s']:.2f} | {r['total_s']:.2f} | {ratio:.1f}× "
            f"| {r['peak_mib']:.0f} | {r['peak_x_map']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.worker:
        map_path, path, map_bytes = args.worker
        print(json.dumps(bench_one(Path(map_path), path, int(map_bytes), args)))
        return
    env = environment(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cryoswan-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    baseline_src = None
    if args.baseline_ref:
        folder = Path(tempfile.mkdtemp(prefix="cryoswan-baseline-"))
        baseline_src = extract_baseline(args.baseline_ref, folder)
    rows = []
    try:
        for size in args.sizes:
            edge, voxel = parse_size(size)
            map_path = workdir / f"synthetic_{edge}_{voxel:g}A.mrc"
            write_synthetic_map(map_path, edge, voxel)
            map_bytes = edge**3 * 4
            for path in args.paths:
                row = {"map": f"{edge}³ @ {voxel:g} Å", "map_mib": map_bytes / 2**20, "path": path,
                       **run_worker(map_path, path, map_bytes, baseline_src)}
                rows.append(row)
                print(f"  {row['map']} {path}: {row['total_s']:.2f} s, peak {row['peak_mib']:.0f} MiB "
                      f"({row['peak_x_map']:.2f}× the map)", file=sys.stderr, flush=True)
            map_path.unlink()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        if baseline_src is not None:
            shutil.rmtree(baseline_src.parent, ignore_errors=True)
    env["load_average_end"] = round(os.getloadavg()[0], 2)
    print("\n".join(f"- {key}: {value}" for key, value in env.items()))
    print()
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
