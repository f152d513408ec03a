"""The Reconstruct dock widget in a real napari viewer (under Xvfb)."""

import time

import numpy as np
import pytest

from napari_cryoswan import reconstruction
from napari_cryoswan.io import DensityMap
from napari_cryoswan.layers import density_layer_data
from napari_cryoswan.preprocess import centre_of_mass
from napari_cryoswan.widgets.reconstruct import ReconstructWidget


@pytest.fixture
def viewer_with_widget(viewer_with_reconstruct):
    return viewer_with_reconstruct


@pytest.fixture
def notifications(monkeypatch):
    """What the user is shown: every show_error / show_warning / show_info, in order."""
    shown = []
    for kind in ("show_error", "show_warning", "show_info"):
        monkeypatch.setattr(f"napari.utils.notifications.{kind}",
                            lambda message, kind=kind: shown.append((kind, message)))
    return shown


def shown(field) -> bool:
    """Whether a field is shown in its dock (the test viewer's window itself stays hidden)."""
    return not field.native.isHidden()


def add_map(viewer, density, name):
    data, kwargs, _ = density_layer_data(density, name)
    return viewer.add_image(data, **kwargs)


def run_and_wait(qtbot, widget, timeout=60_000):
    widget.run()
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=timeout)


def world_centre(layer):
    return centre_of_mass(np.asarray(layer.data)) * np.asarray(layer.scale) + np.asarray(layer.translate)


def check_result_layers(viewer, source, widget):
    names = ["blobs RQ1+RQ2", "blobs RQ2", "blobs RQ1 control", "blobs Δ RQ1+RQ2"]
    names = [n.replace("blobs", source.name) for n in names]
    assert [layer.name for layer in viewer.layers][1:] == names, widget.status.value
    for name in names:
        layer = viewer.layers[name]
        meta = layer.metadata
        # on the model's box, placed over the input in Å
        assert layer.data.shape == (64, 64, 64)
        np.testing.assert_allclose(layer.scale, (4.0, 4.0, 4.0))
        np.testing.assert_allclose(layer.translate, meta["preprocessing"]["box_origin"])
        assert [str(u) for u in layer.units] == ["angstrom"] * 3
        assert meta["source_layer"] == source.name and meta["source_layer_id"] == source.unique_id
        assert meta["checkpoint_id"] and meta["checkpoint"].endswith(".pt")
        assert tuple(meta["preprocessing"]["source_shape"]) == source.data.shape
    assert viewer.layers[names[0]].metadata["variant"] == "RQ1+RQ2"
    assert viewer.layers[names[1]].metadata["variant"] == "RQ2"  # level 2's approximation
    assert "RQ2 is level 2 alone: the map's coarse approximation" in widget.status.value
    assert viewer.layers[names[2]].metadata["variant"] == "RQ1 control"
    assert viewer.layers[names[2]].metadata["model"] == "swan-rq1"
    assert "fsc" in viewer.layers[names[0]].metadata
    difference = viewer.layers[names[3]]
    assert not difference.visible


def test_reconstruct_the_sample_in_one_click(qtbot, viewer_with_widget):
    viewer, widget = viewer_with_widget
    viewer.open_sample("napari-cryoswan", "simulated_4jsv")
    source = viewer.layers[0]
    assert widget.layer.value is source  # the newest map is chosen for one click
    assert "resample 4 Å → 4 Å (64×64×64 → 64×64×64)" in widget.plan.value
    assert source.rendering == "iso"
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert widget.progress.value == widget.progress.max
    recon = viewer.layers[1]
    assert recon.rendering == "iso" and recon.iso_threshold == pytest.approx(source.iso_threshold)
    # results get their own contrast, not a copy of the input's
    assert recon.contrast_limits[1] <= float(recon.data.max()) + 1e-6


def test_a_non_cubic_map_at_another_voxel_size_is_overlaid(qtbot, viewer_with_widget, make_blob_map):
    viewer, widget = viewer_with_widget
    source = add_map(viewer, make_blob_map(shape=(40, 50, 36), voxel=(2.5, 2.5, 2.5)), "blobs")
    widget.layer.value = source
    assert "2.5 Å → 4 Å" in widget.plan.value
    run_and_wait(qtbot, widget)
    check_result_layers(viewer, source, widget)
    # the box is centred on the density: its centre lies within a voxel of the map's centre of mass
    box = viewer.layers["blobs RQ1+RQ2"]
    box_centre = np.asarray(box.translate) + 31.5 * np.asarray(box.scale)
    np.testing.assert_allclose(box_centre, world_centre(source), atol=4.0)


def slow_preprocessing(monkeypatch, seconds=1.0):
    original = reconstruction.preprocess

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(reconstruction, "preprocess", slow)


def test_cancel_says_it_is_cancelling_and_resets_the_bar(qtbot, viewer_with_widget, make_blob_map,
                                                          monkeypatch):
    viewer, widget = viewer_with_widget
    slow_preprocessing(monkeypatch)
    widget.layer.value = add_map(viewer, make_blob_map(), "blobs")
    widget.run()
    assert widget.jobs.running and widget.cancel_button.enabled
    widget.cancel_button.clicked.emit()
    assert widget.status.value.startswith("Cancelling")
    assert not widget.cancel_button.enabled
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=30_000)
    assert widget.status.value == "Cancelled."
    assert widget.progress.value == 0
    assert len(viewer.layers) == 1
    assert widget.run_button.enabled


def test_every_stage_is_shown(qtbot, viewer_with_widget, make_blob_map):
    viewer, widget = viewer_with_widget
    seen = []
    original = widget._on_stage
    widget.jobs._relay.stage.disconnect()
    widget.jobs._relay.stage.connect(lambda *args: (original(*args), seen.append(widget.status.value)))
    widget.layer.value = add_map(viewer, make_blob_map(), "blobs")
    run_and_wait(qtbot, widget)
    stages = " | ".join(seen)
    for stage in ("Loading the checkpoint…", "Preprocessing…", "Reconstructing with swan…",
                  "Reconstructing with swan-rq1…"):
        assert stage in stages, stages


@pytest.mark.parametrize("change, reason", [
    (lambda viewer, layer: viewer.layers.remove(layer), "removed"),
    (lambda viewer, layer: setattr(layer, "data", layer.data * 2), "changed"),
    (lambda viewer, layer: setattr(layer, "scale", (3.0, 3.0, 3.0)), "voxel size or origin"),
    (lambda viewer, layer: setattr(layer, "translate", (5.0, 0.0, 0.0)), "voxel size or origin"),
])
def test_a_result_whose_input_changed_is_dropped(qtbot, viewer_with_widget, make_blob_map,
                                                 monkeypatch, notifications, change, reason):
    viewer, widget = viewer_with_widget
    slow_preprocessing(monkeypatch)
    source = add_map(viewer, make_blob_map(), "blobs")
    other = add_map(viewer, make_blob_map(), "other")
    widget.layer.value = source
    widget.run()
    change(viewer, source)
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=60_000)
    assert not any("RQ1" in layer.name for layer in viewer.layers)
    assert other.metadata.get("variant") is None
    assert "dropped" in widget.status.value and reason in widget.status.value
    assert any(reason in message for _, message in notifications)
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_without_an_rq1_checkpoint_rq1_is_stated_not_run(qtbot, viewer_with_widget, make_blob_map):
    viewer, widget = viewer_with_widget
    source = add_map(viewer, make_blob_map(), "blobs")
    widget.layer.value = source
    widget.compare_rq1.value = False
    run_and_wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["blobs", "blobs RQ1+RQ2", "blobs RQ2", "blobs Δ RQ1+RQ2"]
    assert "RQ1 alone: not run" in widget.status.value


def test_the_reconstruction_after_each_perception_scale_and_its_code_map_are_4d_layers(
        qtbot, viewer_with_widget, make_blob_map):
    viewer, widget = viewer_with_widget
    source = add_map(viewer, make_blob_map(), "blobs")
    widget.layer.value = source
    widget.compare_rq1.value = False
    widget.by_scale.value = True
    run_and_wait(qtbot, widget)
    steps = viewer.layers["blobs by scale"]
    labels = steps.metadata["scale_steps"]
    assert steps.data.shape == (len(labels), 64, 64, 64) and labels[-1] == "RQ1 16³"
    # the last step is the full reconstruction, shown first and named above the canvas
    np.testing.assert_allclose(steps.data[-1], viewer.layers["blobs RQ1+RQ2"].data, atol=1e-4)
    np.testing.assert_allclose(steps.translate[1:], viewer.layers["blobs RQ1+RQ2"].translate)
    assert viewer.dims.current_step[0] == len(labels) - 1
    assert viewer.dims.axis_labels[0] == "perception scale"
    overlay = viewer.canvas.overlays["text"]
    assert "after RQ1 16³" in overlay.text and overlay.visible
    viewer.dims.set_current_step(0, 0)
    assert f"after {labels[0]} (step 1 of {len(labels)})" in overlay.text
    # each step's code map: a hidden labels layer on the same slider, the cursor reads the code
    codes = viewer.layers["blobs codes by scale"]
    assert codes.data.shape == steps.data.shape and not codes.visible
    np.testing.assert_allclose(codes.translate, steps.translate)
    assert len(np.unique(codes.data[0])) == 1 and len(np.unique(codes.data[-1])) > 1  # 1³: one code
    label = int(codes.data[-1, 32, 32, 32])
    assert codes.features["code"][list(codes.features["index"]).index(label)] == label - 1
    # other widgets take 3-D maps only: the 4-D layers are not offered as inputs
    widget.reset_choices()
    assert steps not in widget.layer.choices and codes not in widget.layer.choices


def test_a_two_level_model_in_the_rq1_slot_is_refused(qtbot, viewer_with_widget, make_blob_map,
                                                       small_checkpoints, notifications):
    viewer, widget = viewer_with_widget
    widget.layer.value = add_map(viewer, make_blob_map(), "blobs")
    widget.rq1_checkpoint.value = str(small_checkpoints["swan"])
    run_and_wait(qtbot, widget)
    assert "not the RQ1-only Cryo-SWAN ablation" in widget.status.value
    assert notifications and notifications[-1][0] == "show_error"
    assert [layer.name for layer in viewer.layers] == ["blobs"] and widget.run_button.enabled


def test_an_emptied_checkpoint_field_says_choose_one(qtbot, viewer_with_widget, make_blob_map):
    import os

    viewer, widget = viewer_with_widget
    widget.layer.value = add_map(viewer, make_blob_map(), "blobs")
    widget.checkpoint.line_edit.value = ""  # as a user empties the field
    run_and_wait(qtbot, widget)
    assert "No checkpoint chosen" in widget.status.value
    assert os.getcwd() not in widget.status.value


def test_a_map_without_voxel_size_asks_for_it_and_honours_it(qtbot, viewer_with_widget):
    viewer, widget = viewer_with_widget
    data = np.zeros((48, 48, 48), np.float32)
    data[20:28, 18:30, 20:26] = 1.0
    source = add_map(viewer, DensityMap(data, None), "novox")
    widget.layer.value = source
    assert shown(widget.voxel_size)
    assert "No voxel size" in widget.plan.value
    widget.run()
    assert not widget.jobs.running and "enter it" in widget.status.value
    widget.voxel_size.value = 2.0
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done"), widget.status.value
    np.testing.assert_allclose(source.scale, (2.0, 2.0, 2.0))
    assert [str(u) for u in source.units] == ["angstrom"] * 3
    record = viewer.layers["novox RQ1+RQ2"].metadata["preprocessing"]
    assert tuple(record["source_voxel_size"]) == (2.0, 2.0, 2.0)


def test_a_scale_set_on_a_pixel_layer_is_the_voxel_size(viewer_with_widget):
    viewer, widget = viewer_with_widget
    source = viewer.add_image(np.random.default_rng(0).random((30, 30, 30), dtype=np.float32),
                              name="pixels")
    widget.layer.value = source
    assert shown(widget.voxel_size) and "No voxel size" in widget.plan.value
    source.scale = (2.0, 2.0, 2.0)
    widget.describe()
    assert not shown(widget.voxel_size) and "2 Å → 4 Å" in widget.plan.value


def test_a_map_far_from_the_training_data_is_flagged_before_the_run(viewer_with_widget, make_blob_map):
    viewer, widget = viewer_with_widget
    widget.layer.value = add_map(viewer, make_blob_map(shape=(18, 4, 11), voxel=(0.45,) * 3), "microED")
    assert shown(widget.concerns) and "only" in widget.concerns.value


def test_the_status_adds_only_new_warnings_and_is_cleared_for_another_map(qtbot, viewer_with_widget,
                                                                         make_blob_map, notifications):
    viewer, widget = viewer_with_widget
    tiny = add_map(viewer, make_blob_map(shape=(18, 4, 11), voxel=(0.45,) * 3), "microED")
    widget.layer.value = tiny
    concern = widget.concerns.value.splitlines()[0].removeprefix("⚠ ")
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done: microED RQ1+RQ2")
    assert concern not in widget.status.value and concern in widget.concerns.value  # said once
    assert any(concern in message for kind, message in notifications if kind == "show_warning")
    widget.layer.value = add_map(viewer, make_blob_map(), "blobs")
    assert widget.status.value == "" and widget.progress.value == 0  # not the last map's result


def test_density_cut_off_by_the_box_reaches_the_user(qtbot, viewer_with_widget, notifications):
    viewer, widget = viewer_with_widget
    grid = np.indices((100, 40, 40)).astype(np.float32)
    data = sum(w * np.exp(-((grid - np.array(c)[:, None, None, None]) ** 2).sum(0) / 20.0)
               for w, c in ((1.0, (30, 20, 20)), (0.5, (90, 20, 20))))
    source = add_map(viewer, DensityMap(data.astype(np.float32), (4.0, 4.0, 4.0)), "two")
    widget.layer.value = source
    assert "outside the model's 64³ box" in widget.concerns.value
    run_and_wait(qtbot, widget)
    assert "cut off" in widget.status.value
    assert any("cut off" in message for kind, message in notifications if kind == "show_warning")
    assert any("cut off" in note for note in viewer.layers["two RQ1+RQ2"].metadata["notes"])


def test_a_second_run_reuses_the_loaded_checkpoints(qtbot, viewer_with_widget, make_blob_map,
                                                    monkeypatch):
    from napari_cryoswan import session as session_module

    viewer, widget = viewer_with_widget
    widget.layer.value = add_map(viewer, make_blob_map(), "blobs")
    run_and_wait(qtbot, widget)
    loads = []
    original = session_module.load_checkpoint
    monkeypatch.setattr(session_module, "load_checkpoint",
                        lambda *a, **k: loads.append(a) or original(*a, **k))
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done") and loads == []


def test_closing_the_dock_disconnects_it_from_the_viewer(qtbot, make_napari_viewer, make_blob_map):
    viewer = make_napari_viewer()
    widget = ReconstructWidget(viewer)
    dock = viewer.window.add_dock_widget(widget)
    viewer.window.remove_dock_widget(dock)
    qtbot.waitUntil(lambda: widget.closed, timeout=5_000)
    add_map(viewer, make_blob_map(), "after")  # must not reach the closed widget
    callbacks = [getattr(cb, "__self__", None) for cb in viewer.layers.events.inserted.callbacks]
    assert widget not in callbacks


def test_a_missing_checkpoint_file_is_reported(qtbot, viewer_with_widget, make_blob_map, tmp_path):
    viewer, widget = viewer_with_widget
    widget.layer.value = add_map(viewer, make_blob_map(), "blobs")
    widget.checkpoint.value = str(tmp_path / "absent.pt")
    run_and_wait(qtbot, widget)
    assert "absent.pt: no such checkpoint file" in widget.status.value
    assert [layer.name for layer in viewer.layers] == ["blobs"] and widget.run_button.enabled
