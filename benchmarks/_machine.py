"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_line(**versions: str) -> str:
    """The date, the CPU, torch's threads and the versions: what a benchmark prints first.
    ``versions``: further packages, e.g. ``run_line(**{"scikit-image": skimage.__version__})``."""
    import datetime

    import torch

    extra = "".join(f", {name} {version}" for name, version in versions.items())
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_name()}, "
            f"{torch.get_num_threads()} torch threads; Python {platform.python_version()}, "
            f"torch {torch.__version__}{extra}")
