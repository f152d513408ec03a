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
from napari_cryoswan.io import MapReadError, read_map
from napari_cryoswan.layers import density_from_layer

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


@pytest.fixture
def notifications():
    """Every napari notification (what the user sees as a toast) while the test runs."""
    from napari.utils.notifications import notification_manager

    seen = []

    def record(notification):
        seen.append(notification)

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)
    # an error notification holds its traceback, and with it the viewer: let the viewer go
    notification_manager.records[:] = [n for n in notification_manager.records if n not in seen]
    seen.clear()


def messages(notifications, severity: str) -> list[str]:
    return [n.message for n in notifications if str(n.severity) == severity]


def open_like_the_gui(qtbot, viewer, path, notifications):
    """Open a file as File > Open and drag-and-drop do: napari's Qt open, called from the event
    loop with napari's hooks installed (as in napari.run()), so an error becomes a notification."""
    from napari.utils.notifications import notification_manager
    from qtpy.QtCore import QTimer

    before = len(notifications)
    with notification_manager:
        QTimer.singleShot(0, lambda: viewer.window._qt_viewer._qt_open([str(path)], stack=False))
        qtbot.waitUntil(lambda: len(notifications) > before, timeout=10_000)
    # PyQt reports a slot's exception through PyErr_Print, which keeps it (and the viewer its
    # traceback holds) in sys.last_*: let it go, so the viewer can be collected
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    return notifications[before:]


def unreadable_maps(folder: Path, raw_mrc) -> dict:
    """Files with a map's name that are not readable maps, and words of the reason for each."""
    (folder / "notes.map").write_text("not a map")
    with mrcfile.new(folder / "image.mrc") as mrc:
        mrc.set_data(np.zeros((8, 8), np.float32))
    whole = raw_mrc(folder / "whole.mrc", np.ones((8, 8, 8), np.float32))
    (folder / "truncated.mrc").write_bytes(whole.read_bytes()[:1500])
    with mrcfile.new(folder / "fourier.mrc") as mrc:
        mrc.set_data(np.zeros((4, 4, 4), np.complex64))
    return {"notes.map": "not a readable MRC/CCP4 map", "image.mrc": "2-D image",
            "truncated.mrc": "the file is truncated", "fourier.mrc": "complex (Fourier-space) data"}


def test_reader_leaves_other_files_to_other_readers(tmp_path):
    assert get_reader(str(tmp_path / "image.tif")) is None
    assert get_reader([str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc")]) is None


def test_why_a_map_cannot_be_read_reaches_the_user(make_napari_viewer, qtbot, tmp_path, raw_mrc,
                                                   notifications, caplog):
    viewer = make_napari_viewer()
    for name, reason in unreadable_maps(tmp_path, raw_mrc).items():
        path = tmp_path / name
        # in the GUI: napari's error notification carries the plugin's sentence, not only
        # napari's "refused the file"
        shown = open_like_the_gui(qtbot, viewer, path, notifications)
        assert [str(n.severity) for n in shown] == ["error"]
        assert f"MapReadError: {path}: " in shown[0].message and reason in shown[0].message
        assert "refused the file" not in shown[0].message
        # in a script: the plugin's own exception, with the same sentence
        with pytest.raises(MapReadError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            viewer.open(str(path), plugin="napari-cryoswan")
        assert f"cannot read {path}" in caplog.text
    assert len(viewer.layers) == 0


def test_reading_warnings_become_notifications_every_time(make_napari_viewer, tmp_path, raw_mrc,
                                                          notifications):
    novox = raw_mrc(tmp_path / "novox.mrc", np.ones((4, 5, 6), np.float32), voxel_xyz=(0, 0, 0))
    data = np.ones((4, 5, 6), np.float32)
    data[0, 0, :2] = np.nan
    nans = raw_mrc(tmp_path / "nans.mrc", data)
    viewer = make_napari_viewer()
    for _ in range(2):  # again: napari's own warning hook shows a message only the first time
        for path in (novox, nans):
            viewer.open(str(path), plugin="napari-cryoswan")
    warned = [m for m in messages(notifications, "warning") if str(tmp_path) in m]
    assert len(warned) == 4
    assert sum("no usable voxel size" in m and "novox.mrc" in m for m in warned) == 2
    assert sum("2 of 120 voxels are NaN or Inf" in m for m in warned) == 2
    assert len(viewer.layers) == 4


def test_space_group_zero_volume_opens_with_a_notice(make_napari_viewer, tmp_path, raw_mrc,
                                                    notifications):
    from napari_cryoswan import io

    if not hasattr(io, "SpaceGroupWarning"):
        pytest.skip("io.py does not have SpaceGroupWarning yet")
    path = raw_mrc(tmp_path / "sg0.mrc", np.ones((6, 7, 8), np.float32), space_group=0)
    viewer = make_napari_viewer()
    layer = viewer.open(str(path), plugin="napari-cryoswan")[0]
    assert layer.data.shape == (6, 7, 8)
    assert any("sg0.mrc" in m for m in messages(notifications, "warning"))


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
    assert density_from_layer(layer).voxel_size == pytest.approx(density.voxel_size)


def test_open_map_without_voxel_size(make_napari_viewer, tmp_path, raw_mrc, notifications):
    path = raw_mrc(tmp_path / "novox.mrc", np.ones((4, 5, 6), np.float32), voxel_xyz=(0, 0, 0))
    viewer = make_napari_viewer()
    layer = viewer.open(str(path), plugin="napari-cryoswan")[0]
    assert any("no usable voxel size" in m for m in messages(notifications, "warning"))
    assert density_from_layer(layer).voxel_size is None
    assert [str(u) for u in layer.units] == ["pixel"] * 3


@pytest.mark.parametrize("key,name,voxel", [("simulated_4jsv", "4JSV sim", 4.0),
                                            ("emd_3197", "EMD-3197", 11.4)])
def test_open_samples(make_napari_viewer, key, name, voxel):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cryoswan", key)
    layer = viewer.layers[name]
    assert layer.data.ndim == 3 and layer.data.std() > 0
    np.testing.assert_allclose(layer.scale, (voxel,) * 3, rtol=1e-5)
    assert [str(u) for u in layer.units] == ["angstrom"] * 3


def test_every_sample_opens_with_density_above_its_contour(make_napari_viewer):
    """EMD-3197's 20³ box has no voxel above mean + 2 s.d.: it must not open invisible."""
    viewer = make_napari_viewer()
    for key in ("emd_3197", "simulated_4jsv"):
        layer = viewer.open_sample("napari-cryoswan", key)[0]
        assert (layer.data > layer.iso_threshold).mean() > 0.001


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


@pytest.mark.parametrize("name, label", [("4JSV sim Δ RQ1+RQ2", "4JSV sim Delta RQ1+RQ2"),
                                         ("blobs (8 Å, 64³)", "blobs (8 A, 64^3)")])
def test_a_layer_with_a_non_ascii_name_saves(make_napari_viewer, tmp_path, name, label):
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.ones((8, 8, 8), np.float32), name=name, scale=(4.0, 4.0, 4.0),
                             units=("angstrom",) * 3)
    out = tmp_path / "saved.mrc"
    layer.save(str(out), plugin="napari-cryoswan")
    assert f"napari-cryoswan: {label}" in read_map(out).header["labels"]


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
    assert shown["layers"] == ["4JSV sim"] and shown["ndisplay"] == 3
    assert {"Reconstruct (Cryo-SWAN) (napari-cryoswan)", "FSC plot (napari-cryoswan)"} <= shown["docks"]
    assert shown["chosen map"] == shown["layers"][0]


def test_main_command_opens_the_window_when_an_argument_fails(monkeypatch, qtbot, tmp_path, data_dir,
                                                             fake_emdb_env, notifications):
    import napari

    from napari_cryoswan.__main__ import main

    bad = tmp_path / "bad.mrc"
    bad.write_text("not a map")
    shown = {}

    def fake_run():
        viewer = napari.current_viewer()
        shown["layers"] = [layer.name for layer in viewer.layers]
        shown["docks"] = set(viewer.window.dock_widgets)
        shown["contour"] = viewer.layers["EMD-1001"].metadata["recommended_contour"]
        viewer.close()

    monkeypatch.setattr(napari, "run", fake_run)
    main([str(bad), str(data_dir / "emd_3001.map.gz"), "EMD-1001", "--sample", "none"])
    assert shown["layers"] == ["EMD-3001", "EMD-1001"]
    assert shown["contour"] == pytest.approx(0.2)
    assert {f"{name} (napari-cryoswan)" for name in
            ("Reconstruct (Cryo-SWAN)", "FSC plot", "Open EMDB entry")} <= shown["docks"]
    errors = messages(notifications, "error")
    assert len(errors) == 1
    assert errors[0].startswith(f"Could not open {bad}: not a readable MRC/CCP4 map")


def test_open_into_mixes_maps_and_emdb_entries(make_napari_viewer, tmp_path, data_dir, fake_emdb_env,
                                               notifications):
    from napari_cryoswan.__main__ import open_into

    viewer = make_napari_viewer()
    missing = tmp_path / "missing.mrc"
    notes = tmp_path / "notes.txt"
    notes.write_text("not a map")
    failures = open_into(viewer, [data_dir / "emd_3001.map.gz", "emdb:1001", "EMD-9999", missing,
                                  notes], sample="simulated_4jsv")
    assert [layer.name for layer in viewer.layers] == ["4JSV sim", "EMD-3001",
                                                       "EMD-1001"]
    entry = viewer.layers["EMD-1001"]
    assert entry.metadata["recommended_contour"] == pytest.approx(0.2)
    assert entry.metadata["emdb_title"] == "test entry EMD-1001"
    assert entry.metadata["source_url"].endswith("/files/structures/EMD-1001/map/emd_1001.map.gz")
    np.testing.assert_allclose(entry.scale, (6.0, 6.0, 6.0))
    assert viewer.dims.ndisplay == 3 and "Open EMDB entry (napari-cryoswan)" in viewer.window.dock_widgets
    assert failures == messages(notifications, "error")
    assert failures[0].startswith("Could not open EMD-9999: EMDB has no released entry with this "
                                  "accession (the server answered HTTP 404)")
    assert failures[1] == f"Could not open {missing}: no such file."
    assert failures[2].startswith(f"Could not open {notes}: not a map file name")
    assert len(failures) == 3
