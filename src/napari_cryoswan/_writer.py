"""napari writer: an image layer as an MRC map that keeps its voxel size and origin."""

from __future__ import annotations

import numpy as np

from .io import write_map
from .layers import voxel_size_of


def write_mrc(path: str, data, meta: dict) -> list[str]:
    """Save one 3-D image layer. The layer's scale is the voxel size, its translate the origin.

    napari's Save dialog has already asked before replacing an existing file, so this writer
    overwrites; the core ``write_map`` refuses to unless told to.
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"Only 3-D image layers can be saved as MRC maps (this one is {data.ndim}-D).")
    # A map without a voxel size (pixel units at scale 1) keeps it unknown in the file.
    scale = voxel_size_of(meta.get("scale", (1.0, 1.0, 1.0)), meta.get("units", ("pixel",) * 3))
    translate = meta.get("translate", (0.0, 0.0, 0.0))
    name = meta.get("name", "layer")
    written = write_map(
        path, data, scale, tuple(translate), overwrite=True, label=f"napari-cryoswan: {name}"
    )
    return [str(written)]
