"""The npe2 contributions: manifest, reader, writer and samples, in a real napari viewer."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from napari_cryoswan._reader import get_reader
from napari_cryoswan.io import read_map

ROOT = Path(__file__).parents[1]


def test_manifest_is_valid_and_installed():
    from npe2 import PluginManager, PluginManifest

    manifest = PluginManifest.from_file(ROOT / "napari.yaml")
    assert manifest.name == "napari-cryoswan"
    installed = PluginManager.instance()
    installed.discover()
    found = installed.get_manifest("napari-cryoswan")
    assert found.contributions.readers[0].command == "napari-cryoswan.get_reader"
    assert {s.key for s in found.contributions.sample_data} == {"simulated_4jsv", "emd_3197"}
    # every command resolves to a callable
    for command in found.contributions.commands:
        module, name = command.python_name.split(":")
        assert callable(getattr(__import__(module, fromlist=[name]), name))


def test_npe2_validate_with_imports():
    npe2 = shutil.which("npe2", path=os.path.dirname(sys.executable))
    result = subprocess.run([npe2, "validate", "napari-cryoswan", "--imports"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_napari_startup_path_stays_light():
    code = ("import sys, napari_cryoswan, napari_cryoswan._reader, napari_cryoswan._writer, "
            "napari_cryoswan._sample_data; print(sorted(m for m in ('torch', 'umap', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reader_declines_what_it_cannot_read(tmp_path, caplog):
    text = tmp_path / "notes.map"
    text.write_text("not a map")
    assert get_reader(str(tmp_path / "image.tif")) is None
    assert get_reader(str(text)) is None
    assert "cannot read" in caplog.text
    with mrcfile.new(tmp_path / "image.mrc") as mrc:
        mrc.set_data(np.zeros((8, 8), np.float32))
    assert get_reader(str(tmp_path / "image.mrc")) is None


def test_open_map_in_viewer(make_napari_viewer, data_dir):
    viewer = make_napari_viewer()
    layers = viewer.open(str(data_dir / "emd_3001.map.gz"), plugin="napari-cryoswan")
    layer = layers[0]
    density = read_map(data_dir / "emd_3001.map.gz")
    assert layer.name == "EMD-3001"
    assert layer.data.shape == (73, 25, 43)
    np.testing.assert_allclose(layer.scale, density.voxel_size)
    np.testing.assert_allclose(layer.translate, density.origin)
    assert [str(u) for u in layer.units] == ["angstrom"] * 3
    assert layer.metadata["axis_order"] == (3, 1, 2)
    assert layer.metadata["emdb_id"] == "EMD-3001"
    assert layer.metadata["voxel_size_known"] is True


def test_open_map_without_voxel_size(make_napari_viewer, tmp_path, raw_mrc):
    path = raw_mrc(tmp_path / "novox.mrc", np.ones((4, 5, 6), np.float32), voxel_xyz=(0, 0, 0))
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning, match="no usable voxel size"):
        layer = viewer.open(str(path), plugin="napari-cryoswan")[0]
    assert layer.metadata["voxel_size_known"] is False
    assert [str(u) for u in layer.units] == ["pixel"] * 3


@pytest.mark.parametrize("key,name,voxel", [("simulated_4jsv", "4JSV simulated (8 Å, 4 Å/voxel)", 4.0),
                                            ("emd_3197", "EMD-3197", 11.4)])
def test_open_samples(make_napari_viewer, key, name, voxel):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cryoswan", key)
    layer = viewer.layers[name]
    assert layer.data.ndim == 3 and layer.data.std() > 0
    np.testing.assert_allclose(layer.scale, (voxel,) * 3, rtol=1e-5)
    assert [str(u) for u in layer.units] == ["angstrom"] * 3


def test_simulated_sample_is_a_64_box_of_real_density(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cryoswan", "simulated_4jsv")
    layer = viewer.layers[0]
    assert layer.data.shape == (64, 64, 64)
    assert layer.metadata["structure"] == "4JSV"
    assert 250 < layer.metadata["mass_kda"] < 320


def test_save_layer_round_trip(make_napari_viewer, data_dir, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.open(str(data_dir / "emd_3001.map.gz"), plugin="napari-cryoswan")[0]
    out = tmp_path / "saved.mrc"
    layer.save(str(out), plugin="napari-cryoswan")
    assert mrcfile.validate(str(out), print_file=open(os.devnull, "w"))
    saved = read_map(out)
    np.testing.assert_array_equal(saved.data, layer.data)
    np.testing.assert_allclose(saved.voxel_size, layer.scale, rtol=1e-6)
    np.testing.assert_allclose(saved.origin, layer.translate, atol=1e-3)


def test_main_command_opens_the_sample_in_3d(monkeypatch, qtbot):
    import napari

    from napari_cryoswan.__main__ import main

    shown = {}

    def fake_run():
        viewer = napari.current_viewer()
        shown["layers"] = [layer.name for layer in viewer.layers]
        shown["ndisplay"] = viewer.dims.ndisplay
        shown["docks"] = set(viewer.window.dock_widgets)
        reconstruct = viewer.window.dock_widgets["Reconstruct (Cryo-SWAN) (napari-cryoswan)"]
        shown["chosen map"] = reconstruct.layer.value.name  # ready for one click
        viewer.close()

    monkeypatch.setattr(napari, "run", fake_run)
    main([])
    assert shown["layers"] == ["4JSV simulated (8 Å, 4 Å/voxel)"] and shown["ndisplay"] == 3
    assert {"Reconstruct (Cryo-SWAN) (napari-cryoswan)", "FSC plot (napari-cryoswan)"} <= shown["docks"]
    assert shown["chosen map"] == shown["layers"][0]
