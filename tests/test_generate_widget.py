"""The Generate dock widget in a real napari viewer (under Xvfb), with a tiny diffusion model."""

import shutil
import time

import numpy as np
import pytest

from napari_cryoswan import generate as generate_module
from napari_cryoswan.widgets.generate import GenerateWidget
from test_reconstruct_widget import add_map, run_and_wait


@pytest.fixture
def viewer_with_widget(make_napari_viewer, small_checkpoints, diffusion_run):
    viewer = make_napari_viewer()
    widget = GenerateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.device.value = "cpu"
    widget.checkpoint.value = str(small_checkpoints["swan"])
    widget.diffusion.value = str(diffusion_run / "model.pt")
    widget.steps.value = 4
    return viewer, widget


def test_variants_arrive_as_layers_that_overlay_the_anchor(qtbot, viewer_with_widget, make_blob_map,
                                                          diffusion_run):
    from napari_cryoswan.widgets.fsc_plot import FSCWidget

    viewer, widget = viewer_with_widget
    anchor = add_map(viewer, make_blob_map(), "blobs")
    widget.count.value, widget.strength.value, widget.seed.value = 3, 0.6, 7
    assert "model.pt" in widget.plan.value and "diffusion" not in widget.concerns.value
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done: 3 variants of blobs at strength 0.6"), widget.status.value
    variants = list(viewer.layers)[1:]
    assert [layer.name for layer in variants] == [f"blobs variant {i} (s 0.6, seed {7 + i})" for i in range(3)]
    for i, layer in enumerate(variants):
        # the anchor's own grid: they overlay it and pair with it in the FSC plot
        assert layer.data.shape == anchor.data.shape
        np.testing.assert_allclose(layer.scale, anchor.scale)
        np.testing.assert_allclose(layer.translate, anchor.translate)
        meta = layer.metadata
        assert meta["source_layer"] == "blobs" and meta["source_layer_id"] == anchor.unique_id
        assert (meta["strength"], meta["seed"], meta["steps"]) == (0.6, 7 + i, 4)
        assert meta["model"] == "latent-diffusion" and meta["checkpoint"].endswith("model.pt")
        assert meta["fsc_against"] == "anchor" and meta["fsc"]["resolution_0.5_kind"]
        assert -1.0 <= meta["metrics"]["correlation"] <= 1.0
        assert layer.iso_threshold == pytest.approx(anchor.iso_threshold)
    assert not np.array_equal(variants[0].data, variants[1].data)  # each its own seed
    assert viewer.canvas.grid.enabled and viewer.layers.selection.active is variants[0]
    plot = FSCWidget(viewer)
    assert set(plot.curves()) == {f"{layer.name} vs anchor" for layer in variants}
    curve = plot.add_pair_of(variants[0], anchor)
    assert len(curve["correlation"]) > 1 and f"{variants[0].name} vs blobs" in plot.curves()


def test_without_a_diffusion_model_it_says_how_to_train_one(qtbot, viewer_with_widget, make_blob_map,
                                                            small_checkpoints, tmp_path):
    viewer, widget = viewer_with_widget
    alone = shutil.copy(small_checkpoints["swan"], tmp_path / "mine.pt")
    widget.checkpoint.value = str(alone)
    widget.diffusion.line_edit.value = ""  # look beside the autoencoder: there is none
    add_map(viewer, make_blob_map(), "blobs")
    assert "No diffusion checkpoint" in widget.concerns.value
    assert "python -m training.train_diffusion --autoencoder" in widget.concerns.value
    run_and_wait(qtbot, widget)
    assert "python -m training.train_diffusion" in widget.status.value
    assert len(viewer.layers) == 1


def test_the_model_beside_the_autoencoder_is_found(qtbot, viewer_with_widget, make_blob_map,
                                                   small_checkpoints, diffusion_run, tmp_path):
    viewer, widget = viewer_with_widget
    autoencoder = shutil.copy(small_checkpoints["swan"], tmp_path / "mine.pt")
    shutil.copy(diffusion_run / "model.pt", tmp_path / "mine.diffusion.pt")
    widget.checkpoint.value = str(autoencoder)
    widget.diffusion.line_edit.value = ""  # as a user empties the field
    widget.count.value = 1
    add_map(viewer, make_blob_map(), "blobs")
    assert "mine.diffusion.pt" in widget.plan.value
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert viewer.layers[-1].metadata["checkpoint"].endswith("mine.diffusion.pt")


def test_another_autoencoder_is_refused(qtbot, viewer_with_widget, make_blob_map, small_checkpoints):
    viewer, widget = viewer_with_widget
    widget.checkpoint.value = str(small_checkpoints["swan-rq1"])
    add_map(viewer, make_blob_map(), "blobs")
    run_and_wait(qtbot, widget)
    assert "learned the latents of autoencoder" in widget.status.value
    assert len(viewer.layers) == 1


def test_cancel_stops_the_run_and_adds_nothing(qtbot, viewer_with_widget, make_blob_map, monkeypatch):
    viewer, widget = viewer_with_widget
    original = generate_module.snap_to_codes
    monkeypatch.setattr(generate_module, "snap_to_codes",
                        lambda *args, **kwargs: (time.sleep(1.0), original(*args, **kwargs))[1])
    add_map(viewer, make_blob_map(), "blobs")
    widget.run()
    widget.cancel_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=30_000)
    assert widget.status.value == "Cancelled." and len(viewer.layers) == 1


def test_a_result_for_a_changed_anchor_is_dropped(qtbot, viewer_with_widget, make_blob_map, monkeypatch):
    viewer, widget = viewer_with_widget
    original = generate_module.snap_to_codes
    monkeypatch.setattr(generate_module, "snap_to_codes",
                        lambda *args, **kwargs: (time.sleep(1.0), original(*args, **kwargs))[1])
    anchor = add_map(viewer, make_blob_map(), "blobs")
    widget.run()
    anchor.translate = (0.0, 0.0, 0.0)
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=30_000)
    assert widget.status.value.startswith("Result dropped") and len(viewer.layers) == 1
