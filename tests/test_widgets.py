"""The dock widgets in a real napari viewer (under Xvfb): reconstruct and FSC."""

import time

import numpy as np
import pytest

from napari_cryoswan import reconstruction
from napari_cryoswan.layers import density_from_layer, density_layer_data
from napari_cryoswan.metrics import fsc_between_maps
from napari_cryoswan.widgets.fsc_plot import FSCWidget
from napari_cryoswan.widgets.reconstruct import ReconstructWidget


@pytest.fixture
def viewer_with_widget(make_napari_viewer, small_checkpoints):
    viewer = make_napari_viewer()
    widget = ReconstructWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.checkpoint.value = str(small_checkpoints["swan"])
    widget.rq1_checkpoint.value = str(small_checkpoints["swan-rq1"])
    widget.compare_rq1.value = True
    widget.device.value = "cpu"
    return viewer, widget


def add_map(viewer, density, name):
    data, kwargs, _ = density_layer_data(density, name)
    return viewer.add_image(data, **kwargs)


def run_and_wait(qtbot, widget, timeout=60_000):
    widget.run()
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=timeout)


def check_result_layers(viewer, source, widget):
    names = [f"{source.name} RQ1+RQ2", f"{source.name} RQ1", f"{source.name} RQ1+RQ2 − input"]
    assert [layer.name for layer in viewer.layers][1:] == names, widget.status.value
    for name in names:
        layer = viewer.layers[name]
        np.testing.assert_allclose(layer.scale, source.scale)
        np.testing.assert_allclose(layer.translate, source.translate)
        assert layer.data.shape == source.data.shape
        assert np.abs(layer.data).max() > 0
        meta = layer.metadata
        assert meta["source_layer"] == source.name
        assert meta["checkpoint_id"] and meta["checkpoint"].endswith(".pt")
        assert meta["preprocessing"]["voxel_size"] == 4.0
        assert tuple(meta["preprocessing"]["source_shape"]) == source.data.shape
    assert viewer.layers[names[0]].metadata["level"] == "RQ1+RQ2"
    assert viewer.layers[names[1]].metadata["level"] == "RQ1"
    assert "fsc" in viewer.layers[names[0]].metadata


def test_reconstruct_the_sample(qtbot, viewer_with_widget):
    viewer, widget = viewer_with_widget
    viewer.open_sample("napari-cryoswan", "simulated_4jsv")
    source = viewer.layers[0]
    widget.layer.value = source
    assert "resample 4 Å → 4 Å (64×64×64 → 64×64×64)" in widget.plan.value
    run_and_wait(qtbot, widget)
    check_result_layers(viewer, source, widget)
    assert widget.status.value.startswith("Done")


def test_reconstruct_a_non_cubic_map_at_another_voxel_size(qtbot, viewer_with_widget, make_blob_map):
    viewer, widget = viewer_with_widget
    source = add_map(viewer, make_blob_map(shape=(40, 50, 36), voxel=(2.5, 2.5, 2.5)), "blobs")
    widget.layer.value = source
    assert "2.5 Å → 4 Å" in widget.plan.value
    run_and_wait(qtbot, widget)
    check_result_layers(viewer, source, widget)


def slow_preprocessing(monkeypatch, seconds=1.0):
    original = reconstruction.preprocess

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(reconstruction, "preprocess", slow)


def test_cancel_a_running_job(qtbot, viewer_with_widget, make_blob_map, monkeypatch):
    viewer, widget = viewer_with_widget
    slow_preprocessing(monkeypatch)
    widget.layer.value = add_map(viewer, make_blob_map(), "blobs")
    widget.run()
    assert widget.jobs.running and widget.cancel_button.enabled
    widget.cancel_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=30_000)
    assert widget.status.value == "Cancelled."
    assert len(viewer.layers) == 1
    assert widget.run_button.enabled


def test_result_for_a_deleted_layer_is_dropped(qtbot, viewer_with_widget, make_blob_map, monkeypatch):
    viewer, widget = viewer_with_widget
    slow_preprocessing(monkeypatch)
    source = add_map(viewer, make_blob_map(), "blobs")
    other = add_map(viewer, make_blob_map(), "other")
    widget.layer.value = source
    widget.run()
    viewer.layers.remove(source)
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=60_000)
    assert [layer.name for layer in viewer.layers] == ["other"]
    assert other.metadata.get("level") is None
    assert "dropped" in widget.status.value and "removed" in widget.status.value
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert widget._napari_progress is None


def test_result_for_changed_data_is_dropped(qtbot, viewer_with_widget, make_blob_map, monkeypatch):
    viewer, widget = viewer_with_widget
    slow_preprocessing(monkeypatch)
    source = add_map(viewer, make_blob_map(), "blobs")
    widget.layer.value = source
    widget.run()
    source.data = source.data * 2
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=60_000)
    assert [layer.name for layer in viewer.layers] == ["blobs"]
    assert "dropped" in widget.status.value and "changed" in widget.status.value
    assert widget.run_button.enabled


def test_without_an_rq1_checkpoint_rq1_is_stated_unavailable(qtbot, viewer_with_widget, make_blob_map):
    viewer, widget = viewer_with_widget
    source = add_map(viewer, make_blob_map(), "blobs")
    widget.layer.value = source
    widget.rq1_checkpoint.value = ""
    run_and_wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["blobs", "blobs RQ1+RQ2", "blobs RQ1+RQ2 − input"]
    assert "RQ1 alone: unavailable" in widget.status.value


def test_a_two_level_model_in_the_rq1_slot_is_refused(qtbot, viewer_with_widget, make_blob_map,
                                                       small_checkpoints):
    viewer, widget = viewer_with_widget
    widget.layer.value = add_map(viewer, make_blob_map(), "blobs")
    widget.rq1_checkpoint.value = str(small_checkpoints["swan"])
    run_and_wait(qtbot, widget)
    assert "not the RQ1-only Cryo-SWAN ablation" in widget.status.value
    assert [layer.name for layer in viewer.layers] == ["blobs"] and widget.run_button.enabled


def test_missing_checkpoint_is_reported(qtbot, viewer_with_widget, make_blob_map, tmp_path):
    viewer, widget = viewer_with_widget
    widget.layer.value = add_map(viewer, make_blob_map(), "blobs")
    widget.checkpoint.value = str(tmp_path / "absent.pt")
    widget.run()
    assert not widget.jobs.running
    assert "does not exist" in widget.status.value


def test_fsc_widget_follows_reconstructions_and_pairs(qtbot, viewer_with_widget, make_blob_map, tmp_path):
    viewer, widget = viewer_with_widget
    plot = FSCWidget(viewer)
    viewer.window.add_dock_widget(plot)
    source = add_map(viewer, make_blob_map(shape=(32, 32, 32), voxel=(4.0, 4.0, 4.0)), "blobs")
    widget.layer.value = source
    run_and_wait(qtbot, widget)
    curves = plot.curves()
    assert set(curves) == {"blobs RQ1+RQ2 vs input", "blobs RQ1 vs input"}
    # the plotted line is the layer's FSC, which is metrics.fsc of the model box
    line = plot.axes.lines[0]
    np.testing.assert_allclose(line.get_ydata(), viewer.layers["blobs RQ1+RQ2"].metadata["fsc"]["correlation"])

    recon = viewer.layers["blobs RQ1+RQ2"]
    pair = plot.add_pair_of(source, recon)
    expected = fsc_between_maps(density_from_layer(source), density_from_layer(recon))
    np.testing.assert_allclose(pair["correlation"], expected.correlation)
    assert len(plot.axes.lines) == 3 + 2  # three curves and the 0.5 and 0.143 lines
    (legend,) = plot.figure.legends
    assert "Å at 0.5" in legend.get_texts()[0].get_text()

    for suffix in ("png", "svg"):
        assert plot.save_figure(tmp_path / f"fsc.{suffix}").stat().st_size > 1000
    rows = plot.save_csv(tmp_path / "fsc.csv").read_text().splitlines()
    # two model-box curves (64³: 33 shells) and the pair on the 32³ input grid (17 shells)
    assert rows[0].startswith("curve,") and len(rows) == 1 + 2 * 33 + 17


def test_fsc_widget_follows_the_theme(make_napari_viewer):
    from napari.utils.theme import get_theme

    viewer = make_napari_viewer()
    plot = FSCWidget(viewer)
    viewer.theme = "light"
    expected = get_theme("light").canvas.as_rgb_tuple()
    face = tuple(round(255 * c) for c in plot.axes.get_facecolor()[:3])
    assert face == tuple(expected[:3])
