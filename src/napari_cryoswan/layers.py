"""Conversions between ``DensityMap`` and napari layer data (no Qt, no napari import).

Layers are the interface between widgets: a result layer carries its provenance (source layer,
checkpoint, level, preprocessing record, FSC) in ``metadata``.
"""

from __future__ import annotations

import numpy as np

from .io import DensityMap


def density_layer_data(density: DensityMap, name: str, metadata: dict | None = None,
                       **kwargs) -> tuple:
    """A napari LayerData tuple that places the map in Å, with its header in the metadata."""
    voxel_known = density.voxel_size is not None
    layer_metadata = {**density.header, **(metadata or {}), "voxel_size_known": voxel_known}
    layer_kwargs = {
        "name": name,
        "scale": density.voxel_size if voxel_known else (1.0, 1.0, 1.0),
        "translate": density.origin,
        "units": ("angstrom",) * 3 if voxel_known else ("pixel",) * 3,
        "metadata": layer_metadata,
        "colormap": "gray",
        **kwargs,
    }
    return (density.data, layer_kwargs, "image")


def density_from_layer(layer) -> DensityMap:
    """The map an image layer shows: its data, scale as voxel size and translate as origin.

    A layer read from a file without a voxel size (``metadata["voxel_size_known"]`` False) gives
    a map without one, so nothing downstream mistakes its 1-per-voxel scale for Å.
    """
    data = np.asarray(layer.data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"Layer '{layer.name}' is {data.ndim}-D; a density map is 3-D.")
    known = layer.metadata.get("voxel_size_known", True)
    return DensityMap(
        data=data,
        voxel_size=tuple(float(s) for s in layer.scale) if known else None,
        origin=tuple(float(t) for t in layer.translate),
        header=dict(layer.metadata),
    )
