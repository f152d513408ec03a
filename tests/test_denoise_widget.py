"""The Denoise dock widget in a real napari viewer (under Xvfb), and the session use case
behind it."""

import time

import numpy as np
import pytest

from napari_cryoswan import denoise as denoise_module
from napari_cryoswan.io import DensityMap
from napari_cryoswan.metrics import psnr
from napari_cryoswan.session import Session, bundled_checkpoint
from napari_cryoswan.widgets.denoise import DenoiseWidget
from test_reconstruct_widget import add_map, run_and_wait


@pytest.fixture
def viewer_with_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = DenoiseWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.device.value = "cpu"
    return viewer, widget


def test_noise_then_a_classical_filter_gives_two_layers_over_the_input(qtbot, viewer_with_widget,
                                                                      make_blob_map):
    from napari_cryoswan.widgets.fsc_plot import FSCWidget

    viewer, widget = viewer_with_widget
    source = add_map(viewer, make_blob_map(), "blobs")
    widget.method.value = "gaussian"
    widget.add_noise.value = True
    widget.snr.value = 0.5
    widget.seed.value = 3
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert "Against the clean map" in widget.status.value
    names = ["blobs", "blobs noisy SNR 0.5", "blobs denoised (gaussian)"]
    assert [layer.name for layer in viewer.layers] == names
    for layer, variant in zip(viewer.layers[1:], ["noisy (SNR 0.5)", "denoised (gaussian)"]):
        meta = layer.metadata
        # on the model's box, placed over the input in Å, as reconstructions are
        assert layer.data.shape == (64, 64, 64)
        np.testing.assert_allclose(layer.scale, (4.0, 4.0, 4.0))
        np.testing.assert_allclose(layer.translate, meta["preprocessing"]["box_origin"])
        assert [str(u) for u in layer.units] == ["angstrom"] * 3
        assert meta["source_layer"] == "blobs" and meta["source_layer_id"] == source.unique_id
        assert meta["variant"] == variant and meta["method"] == "gaussian"
        assert meta["params"] == {"sigma": 1.0}
        assert (meta["snr"], meta["seed"]) == (0.5, 3)
        assert "checkpoint" not in meta  # a classical filter reads none
        assert meta["fsc"]["resolution_0.5_kind"] and meta["metrics"]["psnr"] > 0
        assert layer.iso_threshold == pytest.approx(source.iso_threshold)
    noisy, denoised = viewer.layers[1:]
    assert denoised.metadata["metrics"]["psnr"] > noisy.metadata["metrics"]["psnr"] + 5
    assert tuple(noisy.contrast_limits) == tuple(denoised.contrast_limits)  # one grey scale
    assert viewer.layers.selection.active is denoised
    plot = FSCWidget(viewer)
    assert set(plot.curves()) == {f"{name} vs clean map" for name in names[1:]}
    plot.redraw()
    np.testing.assert_allclose(plot.axes.lines[1].get_ydata(), denoised.metadata["fsc"]["correlation"])


def test_a_second_method_on_the_same_noise_reuses_the_noisy_layer(qtbot, viewer_with_widget,
                                                                  make_blob_map):
    viewer, widget = viewer_with_widget
    add_map(viewer, make_blob_map(), "blobs")
    widget.add_noise.value = True
    for method in ("gaussian", "band-pass"):
        widget.method.value = method
        run_and_wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == [
        "blobs", "blobs noisy SNR 0.5", "blobs denoised (gaussian)", "blobs denoised (band-pass)"]
    assert "blobs noisy SNR 0.5" in widget.status.value
    widget.seed.value = 1  # other noise: a layer of its own
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == 6 and viewer.layers[4].name.startswith("blobs noisy SNR 0.5")


def test_swan_denoises_with_the_bundled_denoiser(qtbot, viewer_with_widget, make_blob_map):
    viewer, widget = viewer_with_widget
    add_map(viewer, make_blob_map(), "blobs")
    widget.method.value = "swan"
    assert widget.checkpoint.enabled
    assert typed(widget.checkpoint) == bundled_checkpoint("swan-denoiser") != ""  # the default
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert "Against the input" in widget.status.value
    assert [layer.name for layer in viewer.layers] == ["blobs", "blobs denoised (swan)"]
    meta = viewer.layers[1].metadata
    assert meta["model"] == "swan" and meta["checkpoint"] == bundled_checkpoint("swan-denoiser")
    assert len(meta["checkpoint_id"]) == 12
    assert meta["params"]["noise_sd_from"] == "estimated" and "snr" not in meta
    assert "fsc_against" not in meta  # against the input it denoised


def typed(field):
    from napari_cryoswan.widgets._jobs import typed_path

    return typed_path(field)


def test_the_checkpoint_field_is_for_the_model_methods_only(viewer_with_widget, make_blob_map):
    viewer, widget = viewer_with_widget
    add_map(viewer, make_blob_map(), "blobs")
    for name, method in denoise_module.METHODS.items():
        widget.method.value = name
        assert widget.checkpoint.enabled == method.needs_model, name
        assert widget.method.tooltip == method.summary
        assert ("checkpoint" in widget.plan.value) == method.needs_model, widget.plan.value
    assert not widget.snr.enabled and not widget.seed.enabled
    widget.add_noise.value = True
    assert widget.snr.enabled and widget.seed.enabled


def test_cancel_stops_the_run_and_adds_nothing(qtbot, viewer_with_widget, make_blob_map,
                                                monkeypatch):
    viewer, widget = viewer_with_widget
    original = denoise_module.gaussian
    monkeypatch.setattr(denoise_module, "gaussian",
                        lambda *args, **kwargs: (time.sleep(1.0), original(*args, **kwargs))[1])
    add_map(viewer, make_blob_map(), "blobs")
    widget.method.value = "gaussian"
    widget.run()
    assert widget.jobs.running
    widget.cancel_button.clicked.emit()
    assert widget.status.value.startswith("Cancelling")
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=30_000)
    assert widget.status.value == "Cancelled." and widget.progress.value == 0
    assert len(viewer.layers) == 1 and widget.run_button.enabled


def test_a_map_without_voxel_size_asks_for_it_to_denoise(qtbot, viewer_with_widget, make_blob_map):
    viewer, widget = viewer_with_widget
    add_map(viewer, DensityMap(make_blob_map().data, None), "novox")
    widget.method.value = "band-pass"
    assert widget.plan.value == ("No voxel size: enter the map's voxel size (Å per voxel) to "
                                 "denoise it.")
    widget.voxel_size.value = 3.0  # the base widget's field (tested with Reconstruct)
    run_and_wait(qtbot, widget)
    record = viewer.layers["novox denoised (band-pass)"].metadata["preprocessing"]
    assert tuple(record["source_voxel_size"]) == (3.0, 3.0, 3.0)


# --- the session use case --------------------------------------------------------------------


def test_denoising_a_noisy_copy_comes_closer_to_the_clean_map(make_blob_map):
    stages = []
    result = Session("cpu").denoise(make_blob_map(), None, "gaussian", snr=0.5, seed=0,
                                    stage=lambda done, total, message: stages.append(message))
    assert psnr(result.denoised.box, result.reference) > psnr(result.noisy.box, result.reference) + 5
    assert result.denoised.metrics["psnr"] > result.noisy.metrics["psnr"] + 5
    assert stages[0] == "preprocessing" and "adding noise at SNR 0.5" in stages
    assert stages[-1] == "done"
    # the reference is the map itself, preprocessed into the box
    clean = Session("cpu").denoise(make_blob_map(), None, "gaussian")
    np.testing.assert_allclose(clean.reference, result.reference)
    assert clean.noisy is None and clean.summary().startswith("Against the input")


@pytest.mark.parametrize("method, rtol", [("gaussian", 1e-5), ("swan", 0.02)])
def test_the_result_is_in_the_units_of_the_input(make_blob_map, method, rtol):
    session = Session("cpu")
    density = make_blob_map(shape=(24, 24, 24), voxel=(4.0, 4.0, 4.0))
    scaled = DensityMap(density.data * 100, density.voxel_size, density.origin)
    one = session.denoise(density, bundled_checkpoint("swan"), method, snr=0.5)
    other = session.denoise(scaled, bundled_checkpoint("swan"), method, snr=0.5)
    np.testing.assert_allclose(other.reference, one.reference * 100, rtol=1e-5, atol=1e-4)
    # the projection's codes may flip on rounding: compare the maps, not every voxel
    for stat in (np.mean, np.std):
        assert stat(other.denoised.box) == pytest.approx(stat(one.denoised.box * 100), rel=rtol)
    # and not the noisy map's s.d.: the denoised map is as strong as the clean one
    assert np.std(one.denoised.box) == pytest.approx(np.std(one.reference), rel=0.25)
