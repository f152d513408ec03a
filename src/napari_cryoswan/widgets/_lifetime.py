"""Viewer events connected on behalf of a docked widget, let go of when its dock closes.

napari's close button and ``viewer.window.remove_dock_widget`` take the docked widget out of its
``QDockWidget`` (``setParent(None)``) and delete the dock later; closing the viewer deletes the
main window with its docks. ``DockConnections`` watches the widget and its ancestors up to the
dock for that parent change, and the dock for ``destroyed``, and then disconnects every event
connected through it. Closed stays closed, so nothing queued reaches a deleted widget.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable

from qtpy import API_NAME
from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QDockWidget, QWidget


class DockConnections:
    """Connect napari events (viewer, layer list, layer) for ``widget`` until its dock closes.

    ``on_close`` callbacks run once, when it closes (they must touch no Qt object: the widget
    may be being deleted). A plain Python object: Qt's ``destroyed`` signals call its bound
    methods, never a closure over a Qt object that may already be gone.
    """

    def __init__(self, widget: QWidget):
        self._widget = weakref.ref(widget)
        self._filter = _ParentChanges(widget, self._watch_ancestors)
        self._connections: list[tuple] = []  # (emitter, weak reference to the callback)
        self._on_close: list[Callable[[], None]] = []
        self._closed = False
        self._docked = False
        self._watched: list[weakref.ref] = []
        self._docks: set[int] = set()
        self._watch_ancestors()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connections(self) -> list[tuple]:
        """The (emitter, callback) pairs connected through this object and still connected."""
        return [(emitter, ref()) for emitter, ref in self._connections if ref() is not None]

    def connect_event(self, emitter, callback: Callable) -> None:
        if self._closed:
            return
        emitter.connect(callback)
        # Held weakly, as napari holds methods, so nothing here keeps a widget alive.
        self._connections.append((emitter, weak_callback(callback)))

    def disconnect_event(self, emitter, callback: Callable) -> None:
        """Disconnect one event connected through ``connect_event`` (e.g. of a removed layer)."""
        for pair in list(self._connections):
            if pair[0] is emitter and pair[1]() == callback:
                self._connections.remove(pair)
                emitter.disconnect(callback)

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def close_down(self) -> None:
        """Disconnect every event and run the close callbacks (idempotent; touches no Qt object)."""
        if self._closed:
            return
        self._closed = True
        connections, self._connections = self._connections, []
        for emitter, ref in connections:
            callback = ref()
            if callback is not None:  # a dead one is dropped by napari at its next emission
                emitter.disconnect(callback)
        for callback in self._on_close:
            callback()

    def widget_deleted(self) -> bool:
        """Whether the watched widget's Qt object is gone (deleted outside any dock)."""
        widget = self._widget()
        return widget is None or deleted(widget)

    def _watch_ancestors(self) -> None:
        if self._closed:
            return
        for ref in self._watched:
            widget = ref()
            if widget is not None and not deleted(widget) and not deleted(self._filter):
                widget.removeEventFilter(self._filter)
        chain, dock, widget = [], None, self._widget()
        while widget is not None:
            if isinstance(widget, QDockWidget):
                dock = widget
                break
            chain.append(widget)
            widget = widget.parentWidget()
        if dock is None and self._docked:  # taken out of its dock: napari closed it
            self.close_down()
            return
        for widget in chain:
            widget.installEventFilter(self._filter)
        self._watched = [weakref.ref(widget) for widget in chain]
        if dock is not None:
            self._docked = True
            if id(dock) not in self._docks:
                self._docks.add(id(dock))
                dock.destroyed.connect(self._dock_destroyed)

    def _dock_destroyed(self, *args) -> None:
        self.close_down()


class _ParentChanges(QObject):
    """Calls back when a watched widget gets another parent (napari closing a dock)."""

    def __init__(self, parent: QWidget, callback: Callable[[], None]):
        super().__init__(parent)
        self._callback = weak_callback(callback)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.ParentChange:
            callback = self._callback()
            if callback is not None:
                callback()
        return False


def weak_callback(callback: Callable) -> Callable[[], Callable | None]:
    """A reference that gives ``callback`` back, without keeping a method's object alive."""
    return weakref.WeakMethod(callback) if inspect.ismethod(callback) else (lambda: callback)


def deleted(obj: QObject) -> bool:
    """Whether the Qt object behind a Python wrapper is gone."""
    if API_NAME.startswith("PySide"):
        import shiboken6

        return not shiboken6.isValid(obj)
    from qtpy import sip

    return sip.isdeleted(obj)
