"""The FSC figure (one drawing for the widget and the report), the FSC dock widget and its
canvas in a real napari viewer (under Xvfb)."""

import functools

import numpy as np
import pytest
from matplotlib.figure import Figure
from qtpy.QtCore import QEvent
from qtpy.QtWidgets import QApplication, QVBoxLayout, QWidget

from napari_cryoswan.figures import draw_fsc
from napari_cryoswan.layers import density_from_layer
from napari_cryoswan.metrics import FSCCurve, fsc, fsc_between_maps
from napari_cryoswan.widgets._canvas import PlotCanvas
from napari_cryoswan.widgets.fsc_plot import FSCWidget


def curve_dict(correlation, voxel_size):
    shells = np.arange(len(correlation))
    box = 2 * (len(correlation) - 1)
    return FSCCurve(shells, shells / (box * voxel_size), np.asarray(correlation, float),
                    np.ones(len(correlation)), box, voxel_size).to_dict()


def legend_texts(figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


# The figure, without Qt


def test_frequency_axis_ends_at_the_nyquist_of_the_maps_compared():
    axes = Figure(layout="constrained").add_subplot()
    coarse = curve_dict(np.linspace(1, 0, 11), voxel_size=11.4)  # Nyquist 1/22.8 Å⁻¹
    draw_fsc(axes, {"11.4 Å maps": coarse})
    assert axes.get_xlim() == pytest.approx((0.0, 1 / 22.8))
    fine = curve_dict(np.linspace(1, 0, 33), voxel_size=4.0)  # Nyquist 1/8 Å⁻¹
    draw_fsc(axes, {"11.4 Å maps": coarse, "4 Å maps": fine})
    assert axes.get_xlim() == pytest.approx((0.0, 1 / 8.0))


def test_resolutions_are_labelled_as_crossing_nyquist_or_beyond_the_box():
    figure = Figure(layout="constrained")
    axes = figure.add_subplot()
    curves = {
        "crosses": curve_dict([1.0, 0.9, 0.7, 0.3, 0.1], voxel_size=4.0),
        "identical": curve_dict([1.0] * 5, voxel_size=4.0),
        "unrelated": curve_dict([1.0, 0.05, 0.02, 0.01, 0.0], voxel_size=4.0),
    }
    draw_fsc(axes, curves, text_color="white", background="black")
    texts = legend_texts(figure)
    # 0.143 falls between shells 3 and 4: s* = 3 + (0.3 − 0.143) / 0.2 = 3.785, 32 Å / s* = 8.45 Å
    assert texts[0] == "crosses\n12.8 Å at 0.5, 8.5 Å at 0.143"
    assert texts[1] == "identical\n≤ 8.0 Å (Nyquist) at 0.5, ≤ 8.0 Å (Nyquist) at 0.143"
    assert texts[2] == "unrelated\n> 32.0 Å (box edge) at 0.5, > 32.0 Å (box edge) at 0.143"
    assert not any("inf" in text for text in texts)
    assert len(axes.lines) == 3 + 2  # three curves, the 0.5 and 0.143 lines
    # the two crossings of the first curve are marked on it, nothing for the others
    (markers,) = axes.collections
    np.testing.assert_allclose(markers.get_offsets(), [[2.5 / 32, 0.5], [3.785 / 32, 0.143]])
    assert figure.get_facecolor()[:3] == (0.0, 0.0, 0.0)


def test_without_curves_the_figure_says_what_to_do():
    figure = Figure(layout="constrained")
    axes = figure.add_subplot()
    draw_fsc(axes, {"a": curve_dict([1.0] * 5, 4.0)})
    draw_fsc(axes, {}, empty_text="Add a pair of maps")
    assert not figure.legends and len(axes.lines) == 2  # the 0.5 and 0.143 lines only
    assert [t.get_text() for t in axes.texts if "pair" in t.get_text()] == ["Add a pair of maps"]


def test_the_report_draws_the_same_figure(monkeypatch, tmp_path):
    from training import evaluate

    saved = []
    monkeypatch.setattr(evaluate, "_save_figure", lambda fig, path: saved.append(fig))
    curve = curve_dict([0.0, 1.0, 1.0, 1.0, 1.0], voxel_size=4.0)
    result = evaluate.ModelResult("swan (RQ1+RQ2)", "RQ1+RQ2", "swan", "swan.pt", "abc", {},
                                  curve["frequency"], curve["correlation"], {})
    evaluate._plot_fsc([result], tmp_path / "fsc.png")
    (figure,) = saved
    assert legend_texts(figure) == ["swan (RQ1+RQ2)\n≤ 8.0 Å (Nyquist) at 0.5, "
                                    "≤ 8.0 Å (Nyquist) at 0.143"]
    assert figure.axes[0].get_xlim() == pytest.approx((0.0, 1 / 8.0))


class FakeModel:
    """Stands in for a checkpoint's model: its 'reconstructions' are chosen by the test."""

    name = "swan"

    def reset_usage(self):
        pass

    def codebook_usage(self):
        return {}


def test_the_report_prints_resolutions_without_a_crossing_as_such(monkeypatch, tmp_path):
    import csv
    import json
    from types import SimpleNamespace

    from napari_cryoswan import checkpoint, engine
    from napari_cryoswan.session import Session
    from training import evaluate

    rng = np.random.default_rng(0)
    volumes = rng.normal(size=(3, 16, 16, 16)).astype(np.float32)
    outputs = {"RQ1+RQ2": volumes + 1e-3 * rng.normal(size=volumes.shape).astype(np.float32),
               "RQ1": rng.normal(size=volumes.shape).astype(np.float32)}  # unrelated to the input
    monkeypatch.setattr(engine, "reconstruct", lambda model, v, **kwargs: outputs)
    fake = SimpleNamespace(model=FakeModel(), contract=checkpoint.InputContract(16, 4.0),
                           checkpoint_id="abc", provenance={})
    monkeypatch.setattr(Session, "checkpoint", lambda self, path: fake)
    results = evaluate.evaluate_checkpoints(["swan.pt"], lambda contract: volumes, "cpu",
                                            progress=lambda m: None)
    evaluate.write_report(results, tmp_path, "three test volumes")

    markdown = (tmp_path / "report.md").read_text()
    assert "inf" not in markdown.lower()
    # 16 voxels of 4 Å: Nyquist 8 Å, box edge 64 Å
    assert "| **≤ 8.00 Å (Nyquist)** | **≤ 8.00 Å (Nyquist)** |" in markdown  # the best, in bold
    assert "| swan (RQ1) |" in markdown and "> 64.00 Å (box edge)" in markdown
    assert "| FSC 0.5 (Å) ↓ | > 64.00 Å (box edge) | ≤ 8.00 Å (Nyquist) | — |" in markdown
    assert "| swan (RQ1+RQ2) | 0 / 3 / 0 | 0 / 3 / 0 |" in markdown  # per-volume kinds, counted
    assert "| swan (RQ1) | 0 / 0 / 3 |" in markdown

    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert rows[0]["fsc_0.5"] == "" and rows[0]["fsc_0.5_kind"] == "no crossing"
    assert rows[1]["fsc_0.5"] == "" and rows[1]["fsc_0.5_kind"] == "beyond the box"
    report = json.loads((tmp_path / "report.json").read_text())
    first = report["results"][0]
    assert first["metrics"]["fsc_0.143"] is None
    assert first["fsc_resolutions"]["fsc_0.143"] == {"threshold": 0.143, "kind": "no crossing",
                                                     "angstrom": None, "limit": 8.0}
    assert first["fsc_per_map"]["fsc_0.5"] == {"crossing": 0, "no crossing": 3,
                                               "beyond the box": 0}


# The FSC widget in a viewer


def add_result_layer(viewer, name, voxel_size=4.0, seed=0):
    """An image layer as a reconstruction is shown: its FSC against its input in the metadata."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(size=(32, 32, 32)).astype(np.float32)
    recon = volume + 0.5 * rng.normal(size=volume.shape).astype(np.float32)
    metadata = {"fsc": fsc(recon, volume, voxel_size).to_dict()}
    return viewer.add_image(recon, name=name, scale=(voxel_size,) * 3, metadata=metadata)


def test_fsc_widget_plots_stored_curves_and_pairs(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    plot = FSCWidget(viewer)
    viewer.window.add_dock_widget(plot)
    recon = add_result_layer(viewer, "blobs RQ1+RQ2")
    add_result_layer(viewer, "blobs RQ1", seed=1)
    source = viewer.add_image(np.asarray(recon.data) * 2 + 1, name="blobs", scale=(4.0,) * 3)
    assert set(plot.curves()) == {"blobs RQ1+RQ2 vs input", "blobs RQ1 vs input"}
    np.testing.assert_allclose(plot.axes.lines[0].get_ydata(), recon.metadata["fsc"]["correlation"])
    assert [c for c in plot.first.choices if c is not None] == [recon, viewer.layers["blobs RQ1"], source]

    pair = plot.add_pair_of(source, recon)
    expected = fsc_between_maps(density_from_layer(source), density_from_layer(recon))
    np.testing.assert_allclose(pair["correlation"], expected.correlation)
    assert len(plot.axes.lines) == 3 + 2  # three curves and the 0.5 and 0.143 lines
    texts = legend_texts(plot.figure)
    assert texts[2].startswith("blobs vs blobs RQ1+RQ2\n≤ 8.0 Å (Nyquist) at 0.5")  # a scaled copy
    assert all(" at 0.5, " in text and "inf" not in text for text in texts)

    for suffix in ("png", "svg"):
        assert plot.save_figure(tmp_path / f"fsc.{suffix}").stat().st_size > 1000
    rows = plot.save_csv(tmp_path / "fsc.csv").read_text().splitlines()
    assert rows[0].startswith("curve,") and len(rows) == 1 + 3 * 17  # 32³ boxes: 17 shells

    viewer.layers.remove("blobs RQ1")
    assert set(plot.curves()) == {"blobs RQ1+RQ2 vs input", "blobs vs blobs RQ1+RQ2"}


def test_fsc_widget_shows_the_reconstruct_widgets_results(viewer_with_reconstruct, qtbot,
                                                          make_blob_map):
    from napari_cryoswan.layers import density_layer_data

    viewer, reconstruct = viewer_with_reconstruct
    plot = FSCWidget(viewer)
    viewer.window.add_dock_widget(plot)
    data, kwargs, _ = density_layer_data(make_blob_map(shape=(32, 32, 32), voxel=(4.0,) * 3),
                                         "blobs")
    reconstruct.layer.value = viewer.add_image(data, **kwargs)
    reconstruct.run()
    qtbot.waitUntil(lambda: not reconstruct.jobs.running, timeout=60_000)

    results = [layer for layer in viewer.layers if "fsc" in layer.metadata]
    assert len(results) == 3  # RQ1+RQ2, level 2's approximation (RQ2) and the RQ1-only control
    assert set(plot.curves()) == {f"{layer.name} vs input" for layer in results}
    texts = legend_texts(plot.figure)
    assert len(texts) == 3 and all(" at 0.5, " in t and " at 0.143" in t for t in texts)
    plot.add_pair_of(*results[:2])  # the reconstructions lie on the same grid
    assert len(legend_texts(plot.figure)) == 4


def test_a_pair_on_different_grids_is_refused_with_the_reason(make_napari_viewer, qtbot,
                                                              monkeypatch):
    viewer = make_napari_viewer()
    plot = FSCWidget(viewer)
    qtbot.addWidget(plot)  # not docked: deleted at the end of the test, before the viewer
    a = viewer.add_image(np.zeros((8, 8, 8), np.float32), name="a", scale=(0.46, 0.39, 0.45))
    b = viewer.add_image(np.zeros((8, 8, 8), np.float32), name="b", scale=(0.46, 0.39, 0.45))
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    plot.first.value, plot.second.value = a, b
    plot.add_selected_pair()
    assert errors and "anisotropic voxels" in errors[0] and plot.pairs == {}


def test_fsc_widget_follows_the_theme(make_napari_viewer, qtbot):
    from napari.utils.theme import get_theme

    viewer = make_napari_viewer()
    plot = FSCWidget(viewer)
    qtbot.addWidget(plot)
    viewer.theme = "light"
    expected = get_theme("light").canvas.as_rgb_tuple()
    face = tuple(round(255 * c) for c in plot.axes.get_facecolor()[:3])
    assert face == tuple(expected[:3])


# Closing: no callback of the viewer may still reach a closed widget


def emitters_of(viewer) -> list:
    emitters = [*viewer.events.emitters.values(), *viewer.layers.events.emitters.values()]
    for layer in viewer.layers:
        emitters += list(layer.events.emitters.values())
    return emitters


def referents(callback) -> list:
    if isinstance(callback, tuple):  # napari holds a method as (weak reference, name)
        return [callback[0]()]
    if isinstance(callback, functools.partial):
        return [*referents(callback.func), *callback.args]
    found = [getattr(callback, "__self__", None)]
    for cell in getattr(callback, "__closure__", None) or ():
        try:
            found.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return found


def part_of(obj, widget) -> bool:
    if obj is widget:
        return True
    try:
        native = getattr(obj, "native", obj)  # magicgui widgets wrap a QWidget
        return native is widget or isinstance(native, QWidget) and widget.isAncestorOf(native)
    except RuntimeError:  # a deleted Qt object (napari's own, after the viewer closed)
        return False


def callbacks_into(viewer, widget) -> list:
    return [(emitter, callback) for emitter in emitters_of(viewer) for callback in emitter.callbacks
            if any(part_of(obj, widget) for obj in referents(callback))]


def process_deferred_deletes():
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QApplication.processEvents()


@pytest.mark.parametrize("close", ["remove_dock_widget", "close button"])
def test_closing_the_dock_disconnects_the_widget(make_napari_viewer, qtbot, close):
    viewer = make_napari_viewer()
    plot = FSCWidget(viewer)
    dock = viewer.window.add_dock_widget(plot, name="FSC")
    add_result_layer(viewer, "recon")
    assert callbacks_into(viewer, plot)  # theme and layer list while docked
    plot.redraw()  # a redraw queued as the dock closes
    drawn = []
    plot.canvas.draw = lambda: drawn.append(True)

    if close == "remove_dock_widget":
        viewer.window.remove_dock_widget(plot)
    else:
        dock.title.close_button.click()
    assert plot.plot.closed and not plot.plot.connections
    assert not callbacks_into(viewer, plot)

    # the viewer goes on: layers come and go, the theme changes, timers fire, the dock is deleted
    face = plot.figure.get_facecolor()
    add_result_layer(viewer, "another")
    viewer.layers.remove("recon")
    viewer.theme = "light"
    qtbot.wait(20)
    process_deferred_deletes()
    assert not callbacks_into(viewer, plot)
    assert not drawn and plot.figure.get_facecolor() == face
    assert set(plot.curves()) == {"another vs input"}  # the widget itself still works


def test_closing_the_viewer_disconnects_the_widget(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    plot = FSCWidget(viewer)
    canvas = plot.plot
    viewer.window.add_dock_widget(plot)
    add_result_layer(viewer, "recon")
    plot.redraw()
    viewer.close()  # removes the layers, then deletes the window with its docks
    process_deferred_deletes()
    assert canvas.closed and not canvas.connections
    viewer.theme = "light"  # the model outlives its window
    qtbot.wait(20)
    assert not callbacks_into(viewer, plot) and not callbacks_into(viewer, canvas)


class Scatter(QWidget):
    """A widget that knows nothing of FSC: a canvas redrawn when a layer's data changes."""

    def __init__(self, viewer, layer):
        super().__init__()
        self.plot = PlotCanvas(viewer, self.draw, figsize=(3, 3), min_height=100, parent=self)
        QVBoxLayout(self).addWidget(self.plot)
        self.axes = self.plot.figure.add_subplot()
        self.colors = []
        self.layer = layer
        self.plot.connect_event(layer.events.data, self.plot.redraw)

    def draw(self, colors):
        self.colors.append(colors)
        self.axes.clear()
        self.axes.scatter(*np.asarray(self.layer.data).T[:2], color=colors.text)


def test_the_canvas_redraws_once_idle_and_lets_go_of_layer_events(make_napari_viewer, qtbot):
    from napari.utils.theme import get_theme

    viewer = make_napari_viewer()
    points = viewer.add_points(np.random.default_rng(0).random((10, 2)))
    scatter = Scatter(viewer, points)
    viewer.window.add_dock_widget(scatter, name="scatter")
    qtbot.wait(20)
    drawn, built = [], len(scatter.colors)
    scatter.plot.canvas.draw = lambda: drawn.append(True)
    points.data = points.data[:5]
    viewer.theme = "light"
    assert len(scatter.colors) > built + 1  # rebuilt at once, for each event
    assert scatter.colors[-1].background == get_theme("light").canvas.as_hex()
    qtbot.waitUntil(lambda: bool(drawn))
    qtbot.wait(20)
    assert len(drawn) == 1  # rasterised once, when the event loop was idle

    scatter.plot.disconnect_event(points.events.data, scatter.plot.redraw)
    built = len(scatter.colors)
    points.data = points.data[:3]
    assert len(scatter.colors) == built
    scatter.plot.connect_event(points.events.data, scatter.plot.redraw)
    viewer.window.remove_dock_widget(scatter)
    assert not callbacks_into(viewer, scatter)
    points.data = points.data[:2]
    viewer.theme = "dark"
    qtbot.wait(20)
    assert len(scatter.colors) == built and len(drawn) == 1


def test_a_canvas_deleted_outside_any_dock_closes_at_the_next_event(make_napari_viewer):
    viewer = make_napari_viewer()
    plot = PlotCanvas(viewer, lambda colors: None)
    assert callbacks_into(viewer, plot)
    plot.deleteLater()
    process_deferred_deletes()
    viewer.theme = "light"  # reaches the deleted canvas once, which disconnects instead of drawing
    assert plot.closed and not callbacks_into(viewer, plot)


def test_a_map_pair_uses_the_maps_own_grid(make_napari_viewer, qtbot):
    """The FSC of two maps is on their grid, whatever the model's box: 11.4 Å voxels here."""
    viewer = make_napari_viewer()
    plot = FSCWidget(viewer)
    qtbot.addWidget(plot)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(20, 20, 20)).astype(np.float32)
    a = viewer.add_image(data, name="a", scale=(11.4,) * 3)
    b = viewer.add_image(data + rng.normal(size=data.shape).astype(np.float32), name="b",
                         scale=(11.4,) * 3)
    plot.add_pair_of(a, b)
    assert plot.axes.get_xlim() == pytest.approx((0.0, 1 / 22.8))


def test_the_plot_draws_visible_layers_curves_and_at_most_six(make_napari_viewer, qtbot):
    from napari_cryoswan.metrics import fsc

    viewer = make_napari_viewer()
    plot = FSCWidget(viewer)
    viewer.window.add_dock_widget(plot)
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(16, 16, 16)).astype(np.float32)
    curve = fsc(volume, volume + rng.normal(size=volume.shape).astype(np.float32), 4.0).to_dict()
    layers = [viewer.add_image(volume, name=f"r{i}", metadata={"fsc": curve}) for i in range(8)]
    assert len(plot.curves()) == 8
    assert len(plot.axes.lines) == 6 + 2  # the six newest curves and the two threshold lines
    assert "6 newest of 8" in plot.axes.get_title()
    for layer in layers[:3]:
        layer.visible = False
    assert set(plot.curves()) == {f"r{i} vs input" for i in range(3, 8)}
    assert len(plot.axes.lines) == 5 + 2 and not plot.axes.get_title()
