"""napari reader: MRC/CCP4 maps (optionally gzipped) as image layers in Å.

What the user sees when a map cannot be read, or is read with a caveat, is decided here:
- a file with a map suffix that is not a readable map gets a reader that raises the
  ``MapReadError`` of ``io.read_header``. napari shows that exception's sentence in its error
  notification (a reader that returns None would show only napari's "refused the file").
- the warnings of ``io.read_map`` (no voxel size, NaN voxels, space group…) become warning
  notifications each time a map is opened. napari turns warnings into notifications only while
  its event loop runs, and only the first time a message is seen, so it cannot be relied on.
"""

from __future__ import annotations

import logging
import warnings

from .io import MapReadError, is_map_path, read_header, read_map
from .layers import density_layer_data

logger = logging.getLogger(__name__)


def get_reader(path):
    """A reader for one map file, None (as npe2 expects) for files that are not maps at all."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    path = str(path)
    if not is_map_path(path):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read_map warns again, when the map is opened
            read_header(path)  # cheap: refuses non-MRC, 2-D, stacks, truncation before reading
    except MapReadError as err:
        logger.warning("napari-cryoswan cannot read %s: %s", path, err)
        return _refusal(err)
    return read_density_layers


def _refusal(error: MapReadError):
    def refuse(path, **kwargs):
        raise error

    return refuse


def read_density_layers(path, **kwargs):
    """The npe2 reader function: one image layer, its warnings shown as notifications."""
    if isinstance(path, list):
        path = path[0]
    layers, notices = read_density_layers_quietly(path)
    show_notices(notices)
    return layers


def read_density_layers_quietly(path, metadata: dict | None = None) -> tuple[list, list[str]]:
    """The layer data of a map, and the messages of the warnings raised while reading it.

    For callers that read off the UI thread (the EMDB widget) and show the messages later, from
    the UI thread. Warnings that are not ``UserWarning`` (deprecations from libraries) are issued
    again as they came. (``catch_warnings`` is process-wide before Python 3.14: a warning that
    another thread raises meanwhile can land here.)
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        density = read_map(path)
    notices = []
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            notices.append(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    name = density.header.get("emdb_id") or _stem(path)
    return [density_layer_data(density, name, metadata)], notices


def show_notices(notices: list[str]) -> None:
    from napari.utils.notifications import show_warning

    for notice in notices:
        show_warning(notice)


def _stem(path: str) -> str:
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".mrc", ".map", ".ccp4"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name
