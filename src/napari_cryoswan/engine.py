"""Running models: device choice, batching, mixed precision, progress and cancellation.

Compute functions here take a ``progress(done, total)`` callback and a ``should_stop()`` check
instead of knowing about any UI, so napari workers, the CLI and tests drive them alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np

Progress = Callable[[int, int], None]
StopCheck = Callable[[], bool]


class Cancelled(Exception):
    """The caller asked to stop; partial results were discarded."""


def choose_device(preference: str = "auto"):
    """'auto': CUDA when there is a GPU, else the CPU. 'cuda' or 'cpu' force one."""
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "CUDA was asked for, but PyTorch sees no GPU here. Choose 'auto' or 'cpu', or install "
            "a CUDA build of PyTorch."
        )
    if preference not in ("cpu", "cuda"):
        raise ValueError(f"Unknown device {preference!r}; use 'auto', 'cpu' or 'cuda'.")
    return torch.device(preference)


def autocast(device, enabled: bool = True):
    """bf16 autocast on CUDA (the paper's GPUs support it); full precision on the CPU."""
    import torch

    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def map_batches(
    function: Callable,
    volumes: np.ndarray,
    device,
    batch_size: int = 4,
    progress: Progress | None = None,
    should_stop: StopCheck | None = None,
) -> list:
    """Apply ``function(x)`` (x: a (b, 1, D, H, W) tensor on ``device``) batch by batch.

    Returns the list of per-batch results, moved to the CPU. Checks ``should_stop`` between
    batches and raises ``Cancelled`` when it answers True.
    """
    import torch

    volumes = np.asarray(volumes, dtype=np.float32)
    results = []
    total = len(volumes)
    for part in batches(total, batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled()
        x = torch.from_numpy(volumes[part][:, None]).to(device)
        with torch.inference_mode(), autocast(device):
            results.append(_to_cpu(function(x)))
        if progress is not None:
            progress(part.stop, total)
    return results


def reconstruct(
    model,
    volumes: np.ndarray,
    device=None,
    batch_size: int = 4,
    progress: Progress | None = None,
    should_stop: StopCheck | None = None,
    by_scale: bool = False,
) -> dict[str, np.ndarray]:
    """Reconstruct (N, D, H, W) volumes; returns variant name → (N, D, H, W) float32 arrays.

    A model gives one entry per reconstruction variant it decodes (``reconstruction_variants``),
    or with ``by_scale`` one per perception scale (``CryoSwan.reconstructions_by_scale``).
    """
    if len(volumes) == 0:
        raise ValueError("No volumes to reconstruct.")
    device = device or choose_device()
    model = model.to(device).eval()
    decode = model.reconstructions_by_scale if by_scale else model.reconstruction_variants
    parts = map_batches(decode, volumes, device, batch_size, progress, should_stop)
    return {
        name: np.concatenate([p[name][:, 0].float().numpy() for p in parts])
        for name in parts[0]
    }


def code_maps(
    model,
    volumes: np.ndarray,
    device=None,
    batch_size: int = 4,
    should_stop: StopCheck | None = None,
) -> dict[str, np.ndarray]:
    """Each perception scale's code indices over the grid of (N, D, H, W) volumes
    (``CryoSwan.code_maps_by_scale``): step name → (N, D, H, W) int32."""
    device = device or choose_device()
    model = model.to(device).eval()
    parts = map_batches(model.code_maps_by_scale, volumes, device, batch_size, None, should_stop)
    return {name: np.concatenate([p[name][:, 0].numpy().astype(np.int32) for p in parts]) for name in parts[0]}


def _to_cpu(value):
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value.detach().cpu() if hasattr(value, "detach") else value
