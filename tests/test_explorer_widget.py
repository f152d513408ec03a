"""The Explorer dock widget in a real napari viewer (under Xvfb): clicks on the plot open maps
as layers laid side by side, a hub's anchor opens its members, a map layer is placed and its
neighbours open, selections and searches open sets, and what goes wrong is said in the widget.

The index is built for real (small test model); its projection is written by hand (points on
a circle, one hub), so that what a click hits does not depend on how UMAP lays points out.
"""

import time

import numpy as np
import pytest

from napari_cryoswan.explorer import Projection, _meta_for, hub_parameters, write_projection
from napari_cryoswan.index import open_index
from napari_cryoswan.io import read_map
from napari_cryoswan.projection import Hub
from napari_cryoswan.widgets import explorer as widget_module
from napari_cryoswan.widgets.explorer import ExplorerWidget
from test_explorer import build, write_maps
from test_reconstruct_widget import add_map

K = 3
PITCH = 64 * 4.0 * (1 + widget_module.GAP)


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory, small_checkpoints):
    """(index folder, maps folder, the hub's rows): six maps on a circle, one hub of three."""
    tmp = tmp_path_factory.mktemp("explorer_widget")
    maps = write_maps(tmp / "maps", origin=(8.0, -12.0, 20.0))
    out = tmp / "index"
    build(maps, small_checkpoints["swan"], out)
    index = open_index(out)
    angles = np.linspace(0, 2 * np.pi, len(index), endpoint=False)
    coords = np.stack([5 * np.cos(angles), 5 * np.sin(angles)], 1).astype(np.float32)
    rows = [index.find(name)[0] for name in ("beta", "delta", "gamma")]
    distances = [float(np.linalg.norm(index.embeddings[r] - index.embeddings[rows[0]])) for r in rows]
    hub = Hub(0, rows[0], tuple(rows), tuple(distances))
    write_projection(index, Projection(coords, (hub,), _meta_for(index, 0, hub_parameters(len(index)))))
    return out, maps, rows


@pytest.fixture
def explorer(make_napari_viewer, qtbot, index_folder, small_checkpoints):
    viewer = make_napari_viewer()
    widget = ExplorerWidget(viewer, open_on_start=False)
    viewer.window.add_dock_widget(widget)
    widget.session.device_name = "cpu"
    widget.k.value = K
    widget.open_index(str(index_folder[0]), str(small_checkpoints["swan"]))
    wait(qtbot, widget)
    assert widget.explorer is not None, widget.status.value
    return viewer, widget


def wait(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: not widget.tasks.running and not widget.jobs.running, timeout=timeout)


def click(widget, xy, kind="button_press_event"):
    """A mouse event on the plot at data coordinates ``xy``, as matplotlib delivers it."""
    from matplotlib.backend_bases import MouseEvent

    widget.canvas.draw()  # the layout is final: data → pixels holds
    x, y = widget.axes.transData.transform(xy)
    event = MouseEvent(kind, widget.canvas, x, y, button=1 if kind == "button_press_event" else None)
    widget.canvas.callbacks.process(kind, event)


def row_named(widget, name):
    return widget.explorer.find(name)[0]


def opened_layers(viewer):
    """The maps the explorer opened (not the labels over them)."""
    from napari.layers import Image

    return [layer for layer in viewer.layers if "explorer" in layer.metadata and isinstance(layer, Image)]


def test_a_click_on_a_point_opens_the_map_and_its_neighbours_side_by_side(qtbot, explorer):
    viewer, widget = explorer
    alpha = row_named(widget, "alpha")
    assert widget.explorer.projection.hub_of(alpha) is None
    click(widget, widget.explorer.projection.coords[alpha])
    wait(qtbot, widget)
    layers = opened_layers(viewer)
    assert len(layers) == K + 1, widget.status.value
    assert layers[0].name == "#0 alpha" and layers[1].name.startswith("#1 alpha_copy d=0.00")
    assert widget.status.value.startswith("Opened alpha and its nearest maps: #0 alpha"), widget.status.value
    distances = []
    for rank, layer in enumerate(layers):
        meta = layer.metadata
        assert meta["explorer"]["rank"] == rank and meta["explorer"]["opened_as"] == "neighbours"
        assert meta["checkpoint_id"] == widget.explorer.index.checkpoint_id and meta["model"] == "swan"
        assert meta["source"].endswith(".mrc") and meta["units"] == "density"
        assert meta["index_entry"]["name"] in layer.name
        distances.append(meta["explorer"]["distance"])
        # side by side, nearest first, at 4 Å in Å units
        np.testing.assert_allclose(layer.scale, (4.0, 4.0, 4.0))
        np.testing.assert_allclose(layer.translate, (0.0, 0.0, rank * PITCH))
        assert layer.data.shape == (64, 64, 64)
    assert distances == sorted(distances) and distances[0] == 0.0
    assert widget.highlighted == [layer.metadata["explorer"]["row"] for layer in layers]
    assert viewer.layers.selection.active is layers[0]
    # each box is named above it, in the theme's text colour
    labels = viewer.layers["explorer labels 1"]
    assert list(labels.features["label"])[:2] == ["#0 alpha", "#1 alpha_copy\nd = 0.00"]
    np.testing.assert_allclose(labels.data[:, 2], [layer.translate[2] + 32 * 4.0 for layer in layers], atol=2.5)
    viewer.theme = "light"
    assert np.all(np.asarray(labels.text.color.constant)[:3] < 0.3)  # the light theme writes dark text


def test_over_their_sources_each_map_lies_where_its_file_put_it(qtbot, explorer, index_folder):
    from napari_cryoswan.preprocess import preprocess

    viewer, widget = explorer
    widget.layout_choice.value = "over their sources"
    widget.open_row(row_named(widget, "beta"), k=1)
    wait(qtbot, widget)
    beta = opened_layers(viewer)[0]
    record = preprocess(read_map(index_folder[1] / "beta.mrc"), widget.explorer.contract.settings()).record
    np.testing.assert_allclose(beta.translate, record.box_origin)


def test_a_new_set_replaces_the_last_and_never_the_users_layers(qtbot, explorer, index_folder):
    viewer, widget = explorer
    own = add_map(viewer, read_map(index_folder[1] / "delta.mrc"), "my map")
    widget.open_row(row_named(widget, "beta"))
    wait(qtbot, widget)
    first = opened_layers(viewer)
    # right of the user's map, so they do not overlap
    assert first[0].translate[2] > own.extent.world[1][2]
    widget.open_row(row_named(widget, "gamma"))
    wait(qtbot, widget)
    second = opened_layers(viewer)
    assert len(second) == K + 1 and second[0].name == "#0 gamma" and own in viewer.layers
    assert {layer.metadata["explorer"]["set"] for layer in second} == {2}
    widget.replace.value = False
    widget.open_row(row_named(widget, "alpha"))
    wait(qtbot, widget)
    assert len(opened_layers(viewer)) == 2 * (K + 1)
    third = [layer for layer in opened_layers(viewer) if layer.metadata["explorer"]["set"] == 3]
    assert third[0].translate[2] > max(layer.extent.world[1][2] for layer in second)


def test_a_click_on_a_hubs_anchor_opens_its_members(qtbot, explorer, index_folder):
    viewer, widget = explorer
    hub_rows = index_folder[2]
    click(widget, widget.explorer.projection.coords[hub_rows[0]])
    wait(qtbot, widget)
    layers = opened_layers(viewer)
    assert [layer.metadata["explorer"]["row"] for layer in layers] == list(hub_rows), widget.status.value
    assert layers[0].name == "H0 #0 beta" and layers[1].name.startswith("H0 #1 delta d=")
    assert all(layer.metadata["explorer"]["hub"] == 0 for layer in layers)
    assert widget.hub.value == 0 and "hub 0" in widget.status.value
    # the hub list does the same
    widget.remove_explorer_layers()
    widget.open_hub_button.clicked.emit()
    wait(qtbot, widget)
    assert len(opened_layers(viewer)) == 3


def test_a_map_layer_is_placed_on_the_plot_and_its_neighbours_open_beside_it(qtbot, explorer, index_folder):
    viewer, widget = explorer
    query = add_map(viewer, read_map(index_folder[1] / "gamma.mrc"), "query gamma")
    assert widget.query_layer.value is query
    widget.similar_button.clicked.emit()
    wait(qtbot, widget)
    gamma = row_named(widget, "gamma")
    name, xy = widget.queries[-1]
    assert name == "query gamma"
    np.testing.assert_allclose(xy, widget.explorer.projection.coords[gamma], atol=1e-3)
    marks = [c for c in widget.axes.collections if len(c.get_offsets()) == 1
             and np.allclose(c.get_offsets()[0], xy)]
    assert marks, "the query is marked on the plot"
    layers = opened_layers(viewer)
    assert len(layers) == K and layers[0].name == "#1 gamma d=0.00", widget.status.value
    assert layers[0].metadata["explorer"]["query"] == "query gamma"
    assert layers[0].metadata["explorer"]["row"] == gamma
    assert widget.status.value.startswith("Placed query gamma at")
    # in a row beside the query map, level with the box the model saw
    assert layers[0].translate[2] > query.extent.world[1][2]
    np.testing.assert_allclose([layer.translate[2] for layer in layers],
                               layers[0].translate[2] + PITCH * np.arange(K))
    assert np.ptp([tuple(layer.translate[:2]) for layer in layers], 0).max() == 0


def test_a_query_layer_removed_during_the_search_drops_its_result(qtbot, explorer, index_folder, monkeypatch):
    viewer, widget = explorer
    original = widget.session.find_similar
    monkeypatch.setattr(widget.session, "find_similar",
                        lambda *a, **k: (time.sleep(1.0), original(*a, **k))[1])
    query = add_map(viewer, read_map(index_folder[1] / "gamma.mrc"), "query")
    widget.find_similar(query)
    assert widget.cancel_button.enabled
    viewer.layers.remove(query)
    wait(qtbot, widget)
    assert "dropped" in widget.status.value and "removed" in widget.status.value
    assert opened_layers(viewer) == [] and widget.queries == []


def test_cancel_drops_a_set_being_decoded(qtbot, explorer, monkeypatch):
    viewer, widget = explorer
    original = widget.session.open_neighbours

    def slow(*args, should_stop=None, **kwargs):
        time.sleep(0.5)
        return original(*args, should_stop=should_stop, **kwargs)

    monkeypatch.setattr(widget.session, "open_neighbours", slow)
    widget.open_row(0)
    assert widget.cancel_button.enabled and widget.status.value.startswith("Opening")
    widget.cancel_button.clicked.emit()
    assert widget.status.value == "Cancelled." and not widget.cancel_button.enabled
    wait(qtbot, widget)
    assert opened_layers(viewer) == [] and widget.status.value == "Cancelled."
    widget.open_row(0)  # and the next request runs
    wait(qtbot, widget)
    assert len(opened_layers(viewer)) == K + 1


def test_a_lasso_opens_a_set_within_the_cap_and_says_so(qtbot, explorer, monkeypatch):
    viewer, widget = explorer
    monkeypatch.setattr(widget_module, "MAX_OPEN", 4)
    widget.select_mode.value = "lasso"
    assert widget._selector is not None
    widget._lasso_done([(-9, -9), (9, -9), (9, 9), (-9, 9)])
    wait(qtbot, widget)
    assert len(opened_layers(viewer)) == 4
    assert "6 maps; the 4 nearest to its centre open: at most 4" in widget.status.value
    assert sorted(widget.highlighted) == list(range(6))
    widget.select_mode.value = "box"
    widget.remove_explorer_layers()
    press = type("Event", (), {"xdata": 4.0, "ydata": -1.0})
    release = type("Event", (), {"xdata": 6.0, "ydata": 1.0})
    widget._box_done(press, release)
    wait(qtbot, widget)
    assert [layer.metadata["explorer"]["row"] for layer in opened_layers(viewer)] == [0]
    widget._box_done(type("Event", (), {"xdata": 0.1, "ydata": 0.1}), type("Event", (), {"xdata": 0.2, "ydata": 0.2}))
    assert "No maps in the box" in widget.status.value


def test_the_search_box_finds_a_map_by_id(qtbot, explorer):
    viewer, widget = explorer
    widget.find_text.value = "EMD-1234"
    widget.find_text.native.returnPressed.emit()
    wait(qtbot, widget)
    assert opened_layers(viewer)[0].name == "#0 emd_1234"
    widget.find("nothing like it")
    assert "No map in index matches 'nothing like it'" in widget.status.value


def test_hovering_names_the_map_and_colouring_by_a_column(qtbot, explorer, index_folder):
    viewer, widget = explorer
    beta = index_folder[2][0]
    click(widget, widget.explorer.projection.coords[beta], kind="motion_notify_event")
    assert widget._hover.get_visible() and widget._hover.get_text() == "beta · hub 0"
    click(widget, (0.0, 0.0), kind="motion_notify_event")
    assert not widget._hover.get_visible()
    for i, row in enumerate(widget.explorer.rows):  # in memory only: a numeric column to colour by
        row["mass_kda"] = 50.0 * i
    widget._index_opened(None, widget.explorer)  # as when it is opened again
    widget.colour_by.value = "mass_kda"
    assert widget._colorbar is not None
    widget.colour_by.value = "hub"
    assert widget._colorbar is None


def test_a_missing_or_foreign_index_is_said_in_the_widget(qtbot, explorer, tmp_path):
    viewer, widget = explorer
    shown = widget.explorer
    widget.open_index(str(tmp_path / "nope"))
    wait(qtbot, widget)
    assert "no such folder" in widget.status.value and widget.explorer is shown
    widget.open_index(str(tmp_path))
    wait(qtbot, widget)
    assert "not a latent index" in widget.status.value


def test_without_a_bundled_index_the_widget_says_how_to_get_one(qtbot, make_napari_viewer, monkeypatch):
    from napari_cryoswan.index import LatentIndexError

    def none_ships():
        raise LatentIndexError("No latent index ships with this build of napari-cryoswan. Build one: "
                               "python -m training.build_index …")

    monkeypatch.setattr("napari_cryoswan.index.bundled_index_path", none_ships)
    viewer = make_napari_viewer()
    widget = ExplorerWidget(viewer)
    viewer.window.add_dock_widget(widget)
    wait(qtbot, widget)
    assert widget.status.value.startswith("No latent index ships") and widget.explorer is None
    assert widget.axes.texts[0].get_text() == "No index open. Choose an index folder above."
    widget.open_row(0)
    assert "No index is open yet" in widget.status.value


def test_closing_the_dock_lets_go_of_the_viewer(qtbot, make_napari_viewer, index_folder, small_checkpoints):
    viewer = make_napari_viewer()
    widget = ExplorerWidget(viewer, index=str(index_folder[0]), open_on_start=False)
    widget.checkpoint.value = str(small_checkpoints["swan"])
    dock = viewer.window.add_dock_widget(widget)
    viewer.window.remove_dock_widget(dock)
    qtbot.waitUntil(lambda: widget.closed, timeout=5_000)
    wait(qtbot, widget)
    viewer.add_image(np.zeros((4, 4, 4), np.float32))  # must not reach the closed widget
    callbacks = [getattr(cb, "__self__", None) for cb in viewer.layers.events.inserted.callbacks]
    assert widget not in callbacks and widget.tasks.closed
