"""A matplotlib canvas for dock widgets: follows the napari theme, lets go of the viewer on close.

The widget that owns a ``PlotCanvas`` puts it in its layout, draws on ``canvas.figure`` in the
``draw`` function it passes, and connects the viewer and layer events it needs through
``connect_event``. The canvas then redraws when the napari theme changes, with the theme's
colours; rasterises through a single-shot timer that it owns, once the event loop is idle; and,
through ``_lifetime.DockConnections``, disconnects every event connected through it as soon as
its dock is closed, after which it never draws again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QVBoxLayout, QWidget

from ._lifetime import DockConnections, weak_callback


class ThemeColors(NamedTuple):
    text: str
    background: str


class PlotCanvas(QWidget):
    """A matplotlib figure in a widget, drawn by ``draw(colors)`` with the napari theme's colours.

    Args:
        viewer: the napari viewer whose theme the figure follows.
        draw: called with ``ThemeColors`` to (re)build the figure's artists.
        figsize: the figure's size in inches; min_height: the canvas's minimum height in pixels
            (a docked plot must stay readable beside tall docks).
    """

    def __init__(self, viewer, draw: Callable[[ThemeColors], None], *,
                 figsize: tuple[float, float] = (4.5, 3.2), min_height: int = 380,
                 parent: QWidget | None = None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = viewer
        self._draw = weak_callback(draw)  # usually a method of the widget that holds this canvas
        self.figure = Figure(figsize=figsize, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(min_height)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._rasterise)
        self.lifetime = DockConnections(self)
        self.connect_event = self.lifetime.connect_event
        self.disconnect_event = self.lifetime.disconnect_event
        self.connect_event(viewer.events.theme, self.redraw)

    @property
    def closed(self) -> bool:
        return self.lifetime.closed

    @property
    def connections(self) -> list[tuple]:
        """The (emitter, callback) pairs connected through this canvas and still connected."""
        return self.lifetime.connections

    def colors(self) -> ThemeColors:
        from napari.utils.theme import get_theme

        theme = get_theme(self.viewer.theme)
        return ThemeColors(str(theme.text.as_hex()), str(theme.canvas.as_hex()))

    def redraw(self, event=None) -> None:
        """Rebuild the figure now with the theme's colours; rasterise when the loop is idle."""
        if not self.closed and self.lifetime.widget_deleted():  # deleted outside a dock
            self.close_down()
        draw = None if self.closed else self._draw()
        if draw is None:
            return
        colors = self.colors()
        self.figure.set_facecolor(colors.background)
        draw(colors)
        self._timer.start(0)

    def close_down(self) -> None:
        """Disconnect every event and never draw again (idempotent; touches no Qt object)."""
        self.lifetime.close_down()

    def _rasterise(self) -> None:
        if self.closed:
            return
        # Hold the top-level widget while drawing: were it garbage (an undocked widget no one
        # refers to), a collection during the draw would delete the canvas under it.
        keep_alive = self.window()
        self.canvas.draw()
        del keep_alive

