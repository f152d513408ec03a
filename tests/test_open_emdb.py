"""The "Open EMDB entry" dock widget in a real napari viewer, against a local EMDB."""

import pytest
from test_emdb import ALWAYS

from napari_cryoswan.widgets.open_emdb import OpenEmdbWidget


@pytest.fixture
def fake(fake_emdb_env):
    return fake_emdb_env


@pytest.fixture
def errors():
    """The messages of napari's error notifications while the test runs."""
    from napari.utils.notifications import notification_manager

    seen = []

    def record(notification):
        if str(notification.severity) == "error":
            seen.append(notification.message)

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture
def widget(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = OpenEmdbWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return widget


def open_and_wait(qtbot, widget, text):
    widget.accession.value = text
    widget.open_button.clicked.emit(True)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)


def test_the_widget_is_in_the_manifest():
    from npe2 import PluginManager

    manager = PluginManager.instance()
    manager.discover()
    names = {w.display_name for w in manager.get_manifest("napari-cryoswan").contributions.widgets}
    assert "Open EMDB entry" in names


def test_open_an_entry_as_a_layer_with_its_contour(qtbot, widget, fake, tmp_path, errors):
    open_and_wait(qtbot, widget, "emdb:1001")
    layer = widget.viewer.layers["EMD-1001"]
    assert layer.data.shape == (16, 16, 16) and tuple(layer.scale) == (6.0, 6.0, 6.0)
    assert layer.metadata["recommended_contour"] == pytest.approx(0.2)
    assert layer.metadata["emdb_title"] == "test entry EMD-1001"
    assert widget.accession.value == "EMD-1001"
    assert widget.status.value.startswith("Opened EMD-1001, test entry EMD-1001, 4.2 Å, "
                                          "recommended contour 0.2 (downloaded)")
    assert widget.progress.value == widget.progress.max and not errors
    assert widget.open_button.enabled and not widget.cancel_button.enabled
    # a second time, from the cache
    requests = len(fake.log)
    open_and_wait(qtbot, widget, "EMD-1001")
    assert "(from the cache)" in widget.status.value and len(fake.log) == requests
    assert len(widget.viewer.layers) == 2


def test_unknown_entry_and_bad_text_say_why(qtbot, widget, fake, errors):
    open_and_wait(qtbot, widget, "EMD-9999")
    assert errors == [widget.status.value.replace("Failed: ", "Could not open ")]
    assert errors[0].startswith("Could not open EMD-9999: EMDB has no released entry")
    widget.accession.value = "hello"
    widget.open()
    assert errors[1] == "'hello' is not an EMDB accession. Type one like EMD-1234, 1234 or emdb:1234."
    assert len(widget.viewer.layers) == 0 and widget.worker is None


def test_cancel_frees_the_widget_at_once_and_adds_nothing(qtbot, widget, fake, tmp_path, errors):
    fake.stall[fake.map_path("EMD-1001")] = ALWAYS
    widget.accession.value = "EMD-1001"
    widget.open()
    # the UI thread stays free while the worker waits on the stalled server: progress arrives
    qtbot.waitUntil(lambda: widget.status.value.startswith("Downloading"), timeout=10_000)
    assert widget.cancel_button.enabled and not widget.open_button.enabled
    widget.cancel_button.clicked.emit(True)
    assert widget.status.value == "Cancelled." and widget.open_button.enabled
    assert not widget.cancel_button.enabled
    fake.release.set()  # the stalled response ends; the worker sees the cancel and stops
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    qtbot.wait(50)
    assert len(widget.viewer.layers) == 0 and widget.status.value == "Cancelled." and not errors
    cached = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cached == []  # no partial map
