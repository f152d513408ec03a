"""Map I/O: axis order, voxel size, origin, modes, gzip, refusals and atomic writing."""

import gzip
import itertools
import os

import mrcfile
import numpy as np
import pytest

from napari_cryoswan import io
from napari_cryoswan.io import (
    MapReadError,
    MissingVoxelSizeWarning,
    NonFiniteValuesWarning,
    SpaceGroupWarning,
    read_header,
    read_map,
    write_map,
)


def zyx_volume(shape=(5, 6, 7)):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def to_file_order(volume_zyx, axis_order):
    """Arrange a (z, y, x) volume as a file with MAPC/MAPR/MAPS = axis_order stores it."""
    mapc, mapr, maps = axis_order
    position = {3: 0, 2: 1, 1: 2}  # array axis of z, y, x in the zyx volume
    return np.ascontiguousarray(np.transpose(volume_zyx, (position[maps], position[mapr], position[mapc])))


@pytest.mark.parametrize("axis_order", list(itertools.permutations((1, 2, 3))))
def test_every_axis_order_reads_back_as_zyx(tmp_path, raw_mrc, axis_order):
    volume = zyx_volume()
    path = raw_mrc(tmp_path / "m.mrc", to_file_order(volume, axis_order),
                   voxel_xyz=(1.0, 2.0, 3.0), axis_order=axis_order)
    density = read_map(path)
    np.testing.assert_array_equal(density.data, volume)
    assert density.voxel_size == (3.0, 2.0, 1.0)


def test_emd_3001_swapped_axes_and_anisotropic_voxels(data_dir):
    density = read_map(data_dir / "emd_3001.map.gz")
    with mrcfile.open(data_dir / "emd_3001.map.gz") as mrc:
        raw = np.asarray(mrc.data)
        vx, vy, vz = (float(v) for v in mrc.voxel_size.tolist())
    assert density.header["axis_order"] == (3, 1, 2)  # columns are z, rows x, sections y
    # file axes (sections=y, rows=x, columns=z) become (z, y, x)
    np.testing.assert_array_equal(density.data, np.transpose(raw, (2, 0, 1)))
    assert density.shape == (73, 25, 43)
    assert density.voxel_size == pytest.approx((vz, vy, vx), rel=1e-6)
    assert len(set(density.voxel_size)) == 3
    # No ORIGIN, so the origin comes from the start indices: rows (x) −21, sections (y) −12.
    assert density.origin == pytest.approx((0.0, -12 * vy, -21 * vx), abs=1e-3)
    assert density.header["emdb_id"] == "EMD-3001"


def test_emd_3197_header_fields(data_dir):
    density = read_map(data_dir / "emd_3197.map.gz")
    assert density.shape == (20, 20, 20)
    assert density.voxel_size == pytest.approx((11.4, 11.4, 11.4))
    assert density.header["emdb_id"] == "EMD-3197"
    assert density.header["mean"] == pytest.approx(density.header["header_dmean"], rel=1e-4)
    assert density.header["axis_order_names"] == "xyz"
    assert density.data.dtype == np.float32


def test_origin_field_wins_over_start_indices(tmp_path, raw_mrc):
    path = raw_mrc(tmp_path / "m.mrc", zyx_volume(), voxel_xyz=(2.0, 2.0, 2.0),
                   origin_xyz=(10.0, 20.0, 30.0), start_crs=(1, 2, 3))
    assert read_map(path).origin == (30.0, 20.0, 10.0)


@pytest.mark.parametrize("dtype,mode", [(np.int8, 0), (np.int16, 1), (np.float32, 2),
                                        (np.uint16, 6), (np.float16, 12)])
def test_density_modes(tmp_path, raw_mrc, dtype, mode):
    volume = (zyx_volume() % 100).astype(dtype)
    path = raw_mrc(tmp_path / "m.mrc", volume)
    density = read_map(path)
    assert density.header["mode"] == mode
    assert density.data.dtype == np.float32
    np.testing.assert_array_equal(density.data, volume.astype(np.float32))


def test_gzipped_map(tmp_path, raw_mrc):
    volume = zyx_volume()
    path = raw_mrc(tmp_path / "m.mrc.gz", volume, compression="gzip")
    with open(path, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    np.testing.assert_array_equal(read_map(path).data, volume)


def test_complex_mode_is_refused(tmp_path, raw_mrc):
    path = raw_mrc(tmp_path / "m.mrc", zyx_volume().astype(np.complex64))
    with pytest.raises(MapReadError, match="complex"):
        read_map(path)


def test_2d_image_is_refused(tmp_path):
    with mrcfile.new(tmp_path / "image.mrc") as mrc:
        mrc.set_data(np.zeros((8, 8), np.float32))
    with pytest.raises(MapReadError, match="2-D image"):
        read_map(tmp_path / "image.mrc")


def test_image_stack_is_refused(tmp_path):
    with mrcfile.new(tmp_path / "stack.mrc") as mrc:
        mrc.set_data(np.zeros((4, 8, 8), np.float32))
        mrc.set_image_stack()
    with pytest.raises(MapReadError, match="image stack"):
        read_map(tmp_path / "stack.mrc")


def test_space_group_0_volume_is_opened_as_a_volume_with_a_warning(tmp_path, raw_mrc):
    # As a common viewer writes a 97³ map at 3 Å: space group 0, but MZ = NZ and a 291 Å cell.
    volume = np.random.default_rng(0).normal(size=(97, 97, 97)).astype(np.float32)
    path = raw_mrc(tmp_path / "viewer.mrc", volume, voxel_xyz=(3.0, 3.0, 3.0), space_group=0)
    with pytest.warns(SpaceGroupWarning, match="opened as a single 3-D volume although its space group"):
        density = read_map(path)
    np.testing.assert_array_equal(density.data, volume)
    assert density.voxel_size == (3.0, 3.0, 3.0)
    assert density.header["space_group"] == 0
    assert len(density.header["notes"]) == 1 and "291 × 291 × 291 Å" in density.header["notes"][0]
    with pytest.warns(SpaceGroupWarning):
        assert read_header(path)["notes"] == density.header["notes"]


def test_a_volume_with_a_volume_space_group_has_no_notes(tmp_path, raw_mrc):
    path = raw_mrc(tmp_path / "m.mrc", zyx_volume())
    assert read_map(path).header["notes"] == []


@pytest.mark.parametrize("mz", [1, 4])
def test_space_group_0_stack_is_still_refused(tmp_path, raw_mrc, mz):
    path = raw_mrc(tmp_path / "stack.mrc", zyx_volume((8, 6, 7)), space_group=0)
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.mz = mz  # an image stack: one section per image (MZ = 1), or MZ ≠ NZ
    expected = rf"an image stack \(space group 0, MZ = {mz}\).*set its space group to 1"
    with pytest.raises(MapReadError, match=expected):
        read_map(path)


def test_truncated_file_is_refused(tmp_path, raw_mrc):
    path = raw_mrc(tmp_path / "m.mrc", zyx_volume((8, 8, 8)))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 100])
    with pytest.raises(MapReadError, match="truncated"):
        read_map(path)


def test_truncated_gzip_is_refused(tmp_path, raw_mrc):
    plain = raw_mrc(tmp_path / "m.mrc", np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
    packed = gzip.compress(plain.read_bytes())
    path = tmp_path / "m.mrc.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(MapReadError, match="truncated or corrupt|not a readable"):
        read_map(path)


def test_non_mrc_file_is_refused(tmp_path):
    path = tmp_path / "notes.map"
    path.write_text("this is a text file, not a map\n" * 100)
    with pytest.raises(MapReadError, match="not a readable MRC"):
        read_map(path)


def test_missing_file(tmp_path):
    with pytest.raises(MapReadError, match="no such file"):
        read_map(tmp_path / "absent.mrc")


def test_zero_voxel_size_is_reported_not_guessed(tmp_path, raw_mrc):
    path = raw_mrc(tmp_path / "m.mrc", zyx_volume(), voxel_xyz=(0.0, 0.0, 0.0))
    with pytest.warns(MissingVoxelSizeWarning, match="no usable voxel size"):
        density = read_map(path)
    assert density.voxel_size is None


def test_nan_and_inf_are_reported_and_zeroed(tmp_path, raw_mrc):
    volume = zyx_volume()
    volume[0, 0, 0], volume[1, 2, 3] = np.nan, np.inf
    path = raw_mrc(tmp_path / "m.mrc", volume)
    with pytest.warns(NonFiniteValuesWarning, match="2 of 210"):
        density = read_map(path)
    assert np.isfinite(density.data).all()
    assert density.data[0, 0, 0] == 0 and density.data[1, 2, 3] == 0
    assert density.header["nonfinite_voxels"] == 2


def test_all_nan_map_is_refused(tmp_path, raw_mrc):
    path = raw_mrc(tmp_path / "m.mrc", np.full((4, 4, 4), np.nan, np.float32))
    with pytest.raises(MapReadError, match="every voxel"):
        read_map(path)


def test_huge_map_is_refused_from_its_header(tmp_path, raw_mrc):
    path = raw_mrc(tmp_path / "m.mrc", zyx_volume((8, 8, 8)))
    with pytest.raises(MapReadError, match="more than the limit"):
        read_header(path, max_voxels=100)


@pytest.mark.parametrize("name", ["out.mrc", "out.map.gz"])
def test_write_round_trip_keeps_geometry_and_validates(tmp_path, name):
    volume = np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32)
    path = write_map(tmp_path / name, volume, (1.5, 2.0, 2.5), origin=(-10.0, 5.0, 7.5))
    assert mrcfile.validate(str(path), print_file=open(os.devnull, "w"))
    density = read_map(path)
    np.testing.assert_array_equal(density.data, volume)
    assert density.voxel_size == pytest.approx((1.5, 2.0, 2.5))
    assert density.origin == pytest.approx((-10.0, 5.0, 7.5))


def test_write_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "out.mrc"
    write_map(path, np.ones((4, 4, 4)), 2.0)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_map(path, np.zeros((4, 4, 4)), 2.0)
    assert path.read_bytes() == before
    write_map(path, np.zeros((4, 4, 4)), 2.0, overwrite=True)
    assert read_map(path).data.max() == 0


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.mrc"
    write_map(path, np.ones((4, 4, 4)), 2.0)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mrcfile.mrcfile.MrcFile, "flush", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_map(path, np.zeros((4, 4, 4)), 2.0, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mrc"]


def test_unknown_voxel_size_stays_unknown_through_a_write(tmp_path):
    path = write_map(tmp_path / "out.mrc", np.ones((4, 4, 4)), None)
    with pytest.warns(MissingVoxelSizeWarning):
        assert read_map(path).voxel_size is None


def test_write_refuses_non_volumes(tmp_path):
    with pytest.raises(ValueError, match="3-D"):
        write_map(tmp_path / "out.mrc", np.ones((4, 4)), 2.0)


@pytest.mark.parametrize("label,written", [
    ("emd_3197 … − input", "emd_3197 ... - input"),
    ("8 Å, 64³ box, ±2 µm – résumé", "8 A, 64^3 box, +/-2 um - resume"),
    ("漢字", None),
    ("Å" * 100, "A" * 80),
])
def test_non_ascii_labels_are_transliterated(tmp_path, label, written):
    path = write_map(tmp_path / "out.mrc", np.ones((4, 4, 4)), 2.0, label=label)
    assert mrcfile.validate(str(path), print_file=open(os.devnull, "w"))
    labels = [text for text in read_map(path).header["labels"] if not text.startswith("Created by mrcfile")]
    assert labels == ([written] if written else [])


# ─── reading in slabs, or memory-mapped ─────────────────────────────────────────────────────


@pytest.fixture
def tiny_slabs(monkeypatch):
    """Slabs of one section and memory-mapping from the first byte, so small files take every path."""
    monkeypatch.setattr(io, "SLAB_BYTES", 1)
    monkeypatch.setattr(io, "LAZY_MIN_BYTES", 0)


@pytest.mark.parametrize("axis_order", [(1, 2, 3), (3, 1, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.float16])
@pytest.mark.parametrize("suffix", [".mrc", ".mrc.gz"])
def test_slab_reading_matches_the_whole_map(tmp_path, raw_mrc, tiny_slabs, axis_order, dtype, suffix):
    volume = (np.random.default_rng(2).normal(size=(9, 10, 11)) * 50).astype(dtype)
    path = raw_mrc(tmp_path / f"m{suffix}", to_file_order(volume, axis_order), axis_order=axis_order,
                   compression="gzip" if suffix.endswith(".gz") else None)
    density = read_map(path)
    np.testing.assert_array_equal(density.data, volume.astype(np.float32))
    assert density.data.dtype == np.float32 and density.data.flags.c_contiguous
    mapped = suffix == ".mrc" and dtype == np.float32 and axis_order == (1, 2, 3)
    assert density.header["memory_mapped"] == mapped
    exact = volume.astype(np.float64)
    expected = {"min": exact.min(), "max": exact.max(), "mean": exact.mean(), "std": exact.std()}
    for key, value in expected.items():
        assert density.header[key] == pytest.approx(value, rel=1e-6, abs=1e-9)


def test_memory_mapped_map_is_read_only_and_never_touches_the_file(tmp_path, raw_mrc, tiny_slabs):
    volume = np.random.default_rng(3).normal(size=(6, 7, 8)).astype(np.float32)
    path = raw_mrc(tmp_path / "m.mrc", volume)
    before = path.read_bytes()
    density = read_map(path)
    assert density.header["memory_mapped"]
    assert type(density.data) is np.ndarray and not density.data.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        density.data[0, 0, 0] = 1.0
    np.testing.assert_array_equal(density.data, volume)
    del density
    assert path.read_bytes() == before


def test_lazy_false_reads_a_writable_copy(tmp_path, raw_mrc, tiny_slabs):
    volume = zyx_volume()
    density = read_map(raw_mrc(tmp_path / "m.mrc", volume), lazy=False)
    assert not density.header["memory_mapped"] and density.data.flags.writeable
    np.testing.assert_array_equal(density.data, volume)


def test_small_maps_are_not_memory_mapped(tmp_path, raw_mrc):
    # Below LAZY_MIN_BYTES a mapping saves nothing and would hold a file descriptor open.
    density = read_map(raw_mrc(tmp_path / "m.mrc", zyx_volume()))
    assert not density.header["memory_mapped"] and density.data.flags.writeable


def test_nan_in_a_mappable_map_gives_a_cleaned_copy(tmp_path, raw_mrc, tiny_slabs):
    volume = zyx_volume()
    volume[3, 2, 1] = np.nan
    path = raw_mrc(tmp_path / "m.mrc", volume)
    with pytest.warns(NonFiniteValuesWarning, match="1 of 210"):
        density = read_map(path)
    assert not density.header["memory_mapped"] and density.data[3, 2, 1] == 0
    volume[3, 2, 1] = 0
    np.testing.assert_array_equal(density.data, volume)
    assert density.header["mean"] == pytest.approx(volume.mean(dtype=np.float64))
