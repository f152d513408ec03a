"""napari reader: MRC/CCP4 maps (optionally gzipped) as image layers in Å."""

from __future__ import annotations

import logging

from .io import MapReadError, is_map_path, read_header, read_map
from .layers import density_layer_data

logger = logging.getLogger(__name__)


def get_reader(path):
    """Return a reader for one map file, or None (as npe2 expects) for anything else."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    path = str(path)
    if not is_map_path(path):
        return None
    try:
        read_header(path)  # cheap: refuses non-MRC, 2-D, stacks, truncation before napari commits
    except MapReadError as err:
        logger.warning("napari-cryoswan cannot read %s: %s", path, err)
        return None
    return read_density_layers


def read_density_layers(path):
    if isinstance(path, list):
        path = path[0]
    density = read_map(path)
    name = density.header.get("emdb_id") or _stem(path)
    return [density_layer_data(density, name)]


def _stem(path: str) -> str:
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".mrc", ".map", ".ccp4"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name
