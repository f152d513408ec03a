"""Read and write cryo-EM maps (MRC/CCP4, optionally gzipped).

Everything past this module sees a map as a ``DensityMap``: float32 data indexed (z, y, x), a
voxel size and an origin in Å, also in (z, y, x), which is the order napari's ``scale`` and
``translate`` take. mrcfile reports voxel size and origin in (x, y, z) and the data in file order
(section, row, column); the MAPC/MAPR/MAPS header fields say which of x, y, z each file axis is.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ._atomic import atomic_path

logger = logging.getLogger(__name__)

MAP_SUFFIXES = (".mrc", ".map", ".ccp4", ".mrc.gz", ".map.gz", ".ccp4.gz")
# Density modes: int8, int16, float32, uint16, float16. 3 and 4 are complex (Fourier) data.
SUPPORTED_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
COMPLEX_MODES = (3, 4)
# 1024³ float32 voxels are 4 GiB; preprocessing adds up to about half that (preprocess.resample).
DEFAULT_MAX_VOXELS = 1024**3
# Maps smaller than this are read into memory even when ``lazy``: mapping them saves nothing, and
# every mapping holds a file descriptor open (a cache of thousands of small maps would run out).
LAZY_MIN_BYTES = 64 * 2**20
# Conversions and scans go through the data in slabs of about this size, not in whole-map copies.
SLAB_BYTES = 32 * 2**20
_AXIS_NAMES = {1: "x", 2: "y", 3: "z"}


class MapReadError(ValueError):
    """A file that is not a readable 3-D density map. The message says what to do."""


class MissingVoxelSizeWarning(UserWarning):
    """The header gives no voxel size, so distances in this map mean nothing until one is set."""


class NonFiniteValuesWarning(UserWarning):
    """The map holds NaN or Inf values; they were replaced by zero."""


class SpaceGroupWarning(UserWarning):
    """The header's space group says image stack, but its other fields describe one volume."""


@dataclass(frozen=True)
class DensityMap:
    """A 3-D density with its geometry.

    Attributes:
        data: float32 array indexed (z, y, x).
        voxel_size: Å per voxel along (z, y, x), or None when the file does not say.
        origin: position in Å of voxel (0, 0, 0), in (z, y, x).
        header: the header fields a user needs (JSON-friendly values).
    """

    data: np.ndarray
    voxel_size: tuple[float, float, float] | None
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    header: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    def with_data(self, data: np.ndarray, **changes) -> DensityMap:
        """A copy that holds new data (and optionally new geometry)."""
        return replace(self, data=data, **changes)


def is_map_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(MAP_SUFFIXES)


def emdb_id_from(path: str | os.PathLike, labels: list[str] = ()) -> str | None:
    """EMDB accession ('EMD-3197') from the file name or the header labels, if there is one."""
    for text in (Path(path).name, *labels):
        match = re.search(r"emd[_-](\d{4,})", text, flags=re.IGNORECASE)
        if match:
            return f"EMD-{match.group(1)}"
    return None


def read_map(
    path: str | os.PathLike, *, max_voxels: int = DEFAULT_MAX_VOXELS, lazy: bool = True
) -> DensityMap:
    """Read an MRC/CCP4 map (.mrc, .map, .ccp4, optionally .gz) into a ``DensityMap``.

    Args:
        lazy: memory-map an uncompressed float32 map stored in (z, y, x) order (and at least
            ``LAZY_MIN_BYTES`` big) instead of reading it: the data is never copied, and its
            pages are read as they are used. The array is read-only, so nothing can write to the
            file through it. Any other map (other modes or axis orders, .gz, NaN/Inf to replace)
            is read slab by slab into one new float32 array.
    Raises:
        MapReadError: the file is missing, not MRC, truncated, complex, 2-D, a stack, or too big.
    Warns:
        MissingVoxelSizeWarning: the header's voxel size is zero; ``voxel_size`` is then None.
        NonFiniteValuesWarning: NaN/Inf voxels were found and set to 0 (their count is in header).
        SpaceGroupWarning: space group 0 on a file whose header describes one volume.
    """
    path = Path(path)
    header, h = _read_header(path, max_voxels)
    try:
        data = _mapped_data(path, h, header) if lazy else None
        if data is None:
            data = _read_data(path, h, header)
    except (ValueError, OSError, EOFError) as err:
        raise MapReadError(
            f"{path}: the data block could not be read ({err}). The file is probably truncated "
            "or corrupt: download or export it again."
        ) from err
    _report_nonfinite(path, header, data.size)
    return DensityMap(
        data=data,
        voxel_size=header["voxel_size"],
        origin=header["origin"],
        header=header,
    )


def read_header(path: str | os.PathLike, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> dict:
    """Read and check a map's header without its data: cheap, so readers can test files with it.

    Returns the header fields as a JSON-friendly dict, geometry in (z, y, x) order.
    Raises ``MapReadError`` for anything that is not a readable 3-D density volume.
    """
    return _read_header(Path(path), max_voxels)[0]


def _read_header(path: Path, max_voxels: int):
    """(the header dict, the raw mrcfile header record)."""
    import mrcfile

    if not path.is_file():
        raise MapReadError(f"{path}: no such file.")
    try:
        with mrcfile.open(path, mode="r", permissive=False, header_only=True) as mrc:
            h = mrc.header.copy()
            voxel_xyz = mrc.voxel_size
    except (ValueError, OSError, EOFError) as err:
        raise MapReadError(
            f"{path}: not a readable MRC/CCP4 map ({err}). Open a density map in MRC format "
            "(.mrc, .map, .ccp4, optionally gzipped)."
        ) from err

    mode = int(h.mode)
    if mode in COMPLEX_MODES:
        raise MapReadError(
            f"{path}: MRC mode {mode} holds complex (Fourier-space) data, not a real-space density. "
            "Transform it back to real space first."
        )
    if mode not in SUPPORTED_MODES:
        raise MapReadError(f"{path}: MRC mode {mode} is not a density mode this reader supports "
                           f"({', '.join(f'{k} ({v})' for k, v in SUPPORTED_MODES.items())}).")
    shape_crs = (int(h.nx), int(h.ny), int(h.nz))  # columns, rows, sections
    cell_xyz = tuple(float(c) for c in (h.cella.x, h.cella.y, h.cella.z))
    notes = _refuse_images_and_stacks(path, shape_crs, int(h.ispg), int(h.mz), cell_xyz)
    n_voxels = int(np.prod(shape_crs))
    if n_voxels > max_voxels:
        raise MapReadError(
            f"{path}: the map has {n_voxels:,} voxels ({'×'.join(map(str, shape_crs))}), more than "
            f"the limit of {max_voxels:,}. Bin or crop it first (e.g. relion_image_handler "
            "--rescale_angpix, or ChimeraX 'volume resample'), or raise max_voxels."
        )
    _check_file_size(path, h, n_voxels)

    axis_order = (int(h.mapc), int(h.mapr), int(h.maps))
    if sorted(axis_order) != [1, 2, 3]:
        raise MapReadError(
            f"{path}: MAPC/MAPR/MAPS = {axis_order} is not a permutation of (1, 2, 3). "
            "The header is corrupt."
        )
    voxel_zyx = tuple(round(float(v), 6) for v in (voxel_xyz.z, voxel_xyz.y, voxel_xyz.x))
    voxel_size = _checked_voxel_size(path, voxel_zyx)
    labels = [
        bytes(label).decode("ascii", "replace").strip()
        for label in h.label[: int(h.nlabl)]
    ]
    header = {
        "source_path": str(path),
        "emdb_id": emdb_id_from(path, labels),
        "mode": mode,
        "dtype": SUPPORTED_MODES[mode],
        "voxel_size": voxel_size,
        "origin": _origin_zyx(h, axis_order, voxel_size),
        "axis_order": axis_order,
        "axis_order_names": "".join(_AXIS_NAMES[a] for a in axis_order),
        "shape_zyx": _to_zyx_shape(shape_crs, axis_order),
        "space_group": int(h.ispg),
        "cell_angstrom_xyz": cell_xyz,
        "header_dmin": float(h.dmin),
        "header_dmax": float(h.dmax),
        "header_dmean": float(h.dmean),
        "header_rms": float(h.rms),
        "labels": labels,
        "notes": notes,
    }
    return header, h


def write_map(
    path: str | os.PathLike,
    data: np.ndarray,
    voxel_size: tuple[float, float, float] | float | None,
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    *,
    overwrite: bool = False,
    label: str | None = None,
) -> Path:
    """Write a (z, y, x) volume as a float32 MRC file, atomically.

    The file is written beside its destination under a temporary name and renamed into place, so
    a failure (a full disk, a crash) never leaves a half-written map, nor touches an existing one.
    ``voxel_size`` and ``origin`` are in Å, (z, y, x). A voxel size of None is written as 0, the
    format's "unknown", so a map that never had one does not gain an invented one. A ``.gz``
    suffix writes a gzipped map. MRC labels hold 80 printable ASCII characters, so ``label``
    (often a layer name, "8 Å", "… − input") is transliterated and shortened to fit.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: data is not 3-D, or the voxel size is not positive.
    """
    import mrcfile

    path = Path(path)
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"Only 3-D volumes can be saved as maps; got shape {data.shape}.")
    voxel_zyx = np.broadcast_to(np.asarray(voxel_size or 0.0, dtype=float), (3,))
    if voxel_size is not None and not np.all(voxel_zyx > 0):
        raise ValueError(f"The voxel size must be positive, got {tuple(voxel_zyx)} Å.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists. Choose another name, or pass overwrite=True.")

    compression = "gzip" if path.name.lower().endswith(".gz") else None
    with atomic_path(path) as tmp_name:
        with mrcfile.new(tmp_name, overwrite=True, compression=compression) as mrc:
            mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
            mrc.voxel_size = tuple(voxel_zyx[::-1])
            mrc.header.origin = tuple(float(o) for o in np.asarray(origin, dtype=float)[::-1])
            mrc.update_header_stats()
            label = _ascii_label(label or "")
            if label:
                mrc.add_label(label)
    return path


# ASCII spellings, in cryo-EM text, of characters that Unicode's compatibility decomposition
# (NFKD) leaves non-ASCII or spells misleadingly (NFKD makes "64³" "643").
_ASCII_SPELLINGS = str.maketrans({
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-"),  # hyphens, dashes, minus
    **{sup: f"^{digit}" for digit, sup in enumerate("⁰¹²³⁴⁵⁶⁷⁸⁹")},
    "×": "x", "·": ".", "°": " deg", "µ": "u", "μ": "u", "±": "+/-", "≤": "<=", "≥": ">=",
    "→": "->", "←": "<-", "‘": "'", "’": "'", "“": '"', "”": '"', "«": '"', "»": '"',
    "ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "đ": "d",
    "ð": "d", "þ": "th", "α": "alpha", "β": "beta", "σ": "sigma", "Δ": "Delta", "∞": "inf",
})


def _ascii_label(text: str, limit: int = 80) -> str:
    """``text`` as at most ``limit`` printable ASCII characters, for an MRC header label.

    A few symbols get their usual spelling ('−' → '-', '³' → '^3', 'μ' → 'u'), accents go
    after a compatibility decomposition ('Å' → 'A', '…' → '...'), white space becomes one space,
    and what ASCII still cannot hold is dropped, so saving never fails because of a name.
    """
    text = unicodedata.normalize("NFKD", text.translate(_ASCII_SPELLINGS)).translate(_ASCII_SPELLINGS)
    text = "".join(c if c.isascii() and c.isprintable() else " " if c.isspace() else ""
                   for c in text)
    return " ".join(text.split())[:limit].strip()


def _refuse_images_and_stacks(path: Path, shape_crs, space_group: int, mz: int,
                              cell_xyz) -> list[str]:
    """Refuse images and stacks; returns notes on a volume whose space group says otherwise.

    MRC2014: space group 0 is an image or image stack, 401-630 a stack of volumes. MZ counts
    the sections of one volume: an image stack has MZ = 1, so space group 0 with MZ = NZ > 1 is
    a volume that some programs (viewers, older exporters) label as a stack.
    """
    nz = shape_crs[2]
    if min(shape_crs) < 2:
        kind = "a 2-D image"
    elif space_group == 0 and mz == nz:
        cell = " × ".join(f"{c:g}" for c in cell_xyz)
        message = (
            f"{path}: opened as a single 3-D volume although its space group (0) says image "
            f"stack: MZ = NZ = {nz} and the cell is {cell} Å, as for one volume. If it really is "
            f"a stack of {nz} images, open it as a stack elsewhere; if it is a volume, set its "
            "space group to 1 (e.g. mrcfile: mrc.header.ispg = 1) to silence this warning."
        )
        logger.warning(message)
        warnings.warn(message, SpaceGroupWarning, stacklevel=4)
        return [message]
    elif space_group == 0:
        kind = f"an image stack (space group 0, MZ = {mz})"
    elif space_group >= 401:
        kind = f"a stack of volumes (space group {space_group})"
    else:
        return []
    raise MapReadError(
        f"{path}: this is {kind}, nx, ny, nz = {shape_crs}, not a single 3-D density volume. "
        "Open a reconstructed map; if this file really is one volume, set its space group to 1 "
        "(e.g. mrcfile: mrc.header.ispg = 1)."
    )


def _checked_voxel_size(path: Path, voxel_zyx: tuple[float, float, float]):
    if all(np.isfinite(v) and v > 0 for v in voxel_zyx):
        return voxel_zyx
    message = (
        f"{path}: the header gives no usable voxel size ({voxel_zyx} Å in z, y, x). Distances, "
        "resolutions and resampling are meaningless until you set it: take it from the EMDB "
        "entry or the processing software."
    )
    logger.warning(message)
    warnings.warn(message, MissingVoxelSizeWarning, stacklevel=4)
    return None


def _origin_zyx(h, axis_order, voxel_zyx) -> tuple[float, float, float]:
    """The position of voxel (0, 0, 0) in Å, (z, y, x).

    MRC2014 files carry it in ORIGIN; older (CCP4-style) files carry it as NCSTART/NRSTART/
    NSSTART in voxels, in column/row/section order. Like ChimeraX, ORIGIN wins when it is set.
    """
    origin_xyz = np.array([h.origin.x, h.origin.y, h.origin.z], dtype=float)
    if np.any(origin_xyz != 0) or voxel_zyx is None:
        return tuple(round(float(o), 4) for o in origin_xyz[::-1])
    start_crs = (int(h.nxstart), int(h.nystart), int(h.nzstart))
    start_xyz = [0, 0, 0]
    for start, axis in zip(start_crs, axis_order):
        start_xyz[axis - 1] = start
    return tuple(round(s * v, 4) for s, v in zip(start_xyz[::-1], voxel_zyx))


def _zyx_axes(axis_order: tuple[int, int, int]) -> tuple[int, int, int]:
    """The file-order (section, row, column) array axis that holds z, y and x."""
    labels = (axis_order[2], axis_order[1], axis_order[0])  # the physical axis of each array axis
    return labels.index(3), labels.index(2), labels.index(1)


def _to_file_order(data_zyx: np.ndarray, axis_order: tuple[int, int, int]) -> np.ndarray:
    """A (section, row, column) view of a (z, y, x) array: the file's layout of the map."""
    return np.transpose(data_zyx, np.argsort(_zyx_axes(axis_order)))


def _to_zyx_shape(shape_crs, axis_order) -> tuple[int, int, int]:
    size = {axis: n for n, axis in zip(shape_crs, axis_order)}
    return (size[3], size[2], size[1])


def _check_file_size(path: Path, h, n_voxels: int) -> None:
    """Catch truncation of an uncompressed file from its size alone, before reading the data."""
    if path.name.lower().endswith(".gz"):
        return
    item_size = np.dtype(SUPPORTED_MODES[int(h.mode)]).itemsize
    expected = 1024 + int(h.nsymbt) + n_voxels * item_size
    actual = path.stat().st_size
    if actual < expected:
        raise MapReadError(
            f"{path}: the file is truncated: {actual:,} bytes where the header promises "
            f"{expected:,}. Download or export it again."
        )


def _data_offset(h) -> int:
    return 1024 + int(h.nsymbt)


def _slabs(n_sections: int, section_bytes: int):
    """(start, stop) section ranges of about ``SLAB_BYTES`` each."""
    step = max(1, SLAB_BYTES // max(section_bytes, 1))
    for start in range(0, n_sections, step):
        yield start, min(start + step, n_sections)


def _mapped_data(path: Path, h, header: dict) -> np.ndarray | None:
    """The data as a read-only memory map, or None where the file needs converting or is small."""
    import mrcfile.utils

    dtype = mrcfile.utils.data_dtype_from_header(h)
    shape = (int(h.nz), int(h.ny), int(h.nx))
    if (path.name.lower().endswith(".gz") or header["axis_order"] != (1, 2, 3)
            or dtype != np.dtype(np.float32) or int(np.prod(shape)) * 4 < LAZY_MIN_BYTES):
        return None
    mapped = np.memmap(path, dtype=dtype, mode="r", offset=_data_offset(h), shape=shape)
    stats = _RunningStats()
    for start, stop in _slabs(shape[0], shape[1] * shape[2] * 4):
        if not stats.add(mapped[start:stop]):
            return None  # NaN or Inf to replace: read it into memory instead
    header.update(stats.summary(), nonfinite_voxels=0, memory_mapped=True)
    # A plain ndarray view: read-only like the mapping, which it keeps alive.
    return np.asarray(mapped)


def _read_data(path: Path, h, header: dict) -> np.ndarray:
    """The data as a new float32 (z, y, x) array, converted from the file slab by slab.

    Each slab of sections is read, converted, scanned and written straight to its place in the
    output, so the memory used is the output and one slab, whatever the mode or axis order.
    """
    import gzip

    import mrcfile.utils

    dtype = mrcfile.utils.data_dtype_from_header(h)
    ny, nx = int(h.ny), int(h.nx)
    out = np.empty(header["shape_zyx"], np.float32)
    in_file_order = _to_file_order(out, header["axis_order"])  # a view: writes land in out
    direct = dtype == np.dtype(np.float32) and in_file_order.flags.c_contiguous
    stats, n_bad = _RunningStats(), 0
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        f.seek(_data_offset(h))
        for start, stop in _slabs(int(h.nz), ny * nx * dtype.itemsize):
            if direct:
                chunk = in_file_order[start:stop]
                _read_exactly(f, chunk)
            else:
                raw = np.empty((stop - start, ny, nx), dtype)
                _read_exactly(f, raw)
                chunk = raw.astype(np.float32)
            if not stats.add(chunk):
                bad = ~np.isfinite(chunk)
                n_bad += int(np.count_nonzero(bad))
                chunk[bad] = 0.0
                stats.add(chunk)
            if not direct:
                in_file_order[start:stop] = chunk
    header.update(stats.summary(), nonfinite_voxels=n_bad, memory_mapped=False)
    return out


def _read_exactly(f, array: np.ndarray) -> None:
    view = memoryview(array).cast("B")
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise EOFError(f"the data block ends after {done:,} of {len(view):,} bytes of a slab")
        done += n


def _report_nonfinite(path: Path, header: dict, size: int) -> None:
    n_bad = header["nonfinite_voxels"]
    if n_bad == 0:
        return
    if n_bad == size:
        raise MapReadError(f"{path}: every voxel is NaN or Inf; there is no density to show.")
    message = (
        f"{path}: {n_bad:,} of {size:,} voxels are NaN or Inf; they were set to 0. "
        "Check the map in the software that made it."
    )
    logger.warning(message)
    warnings.warn(message, NonFiniteValuesWarning, stacklevel=3)


class _RunningStats:
    """Minimum, maximum, mean and standard deviation of a map seen one slab at a time.

    Slab means and squared deviations are summed in float64 and merged with Chan et al.'s
    pairwise update, so the result is as precise as a float64 pass over the whole map.
    """

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = np.inf, -np.inf

    def add(self, chunk: np.ndarray) -> bool:
        """Add a float32 slab; False, adding nothing, when it holds NaN or Inf."""
        if chunk.size == 0:
            return True
        lo, hi = float(chunk.min()), float(chunk.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return False
        n = chunk.size
        mean = float(chunk.sum(dtype=np.float64)) / n
        deviation = chunk - np.float32(mean)
        np.square(deviation, out=deviation)
        m2 = float(deviation.sum(dtype=np.float64)) - n * (mean - float(np.float32(mean))) ** 2
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.n * n / total
        self.n = total
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        return True

    def summary(self) -> dict:
        return {
            "min": float(self.min),
            "max": float(self.max),
            "mean": float(self.mean),
            "std": float(np.sqrt(max(self.m2, 0.0) / max(self.n, 1))),
        }
