"""Dock widget: FSC curves in a matplotlib figure that follows the napari theme.

It plots the curve stored in the metadata of every reconstruction layer (reconstruction
against the preprocessed input), and the FSC of any two image layers on the same grid that the
user adds. The figure saves as PNG or SVG, the curves as CSV.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from magicgui.widgets import ComboBox, Container, PushButton
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QVBoxLayout, QWidget

from ..metrics import FSC_THRESHOLDS


class FSCWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer):  # noqa: F821 (a string: napari injects by it)
        super().__init__()
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = viewer
        self.figure = Figure(figsize=(4.5, 3.2), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(380)  # a docked plot must stay readable beside tall docks
        self._draw_timer = QTimer(self)
        self._draw_timer.setSingleShot(True)
        self._draw_timer.timeout.connect(self._draw_now)
        self.axes = self.figure.add_subplot()
        self.pairs: dict[str, dict] = {}  # user-added pair curves, label → FSCCurve.to_dict()

        self.first = ComboBox(label="map A", choices=self._image_layers, nullable=True)
        self.second = ComboBox(label="map B", choices=self._image_layers, nullable=True)
        self.add_pair = PushButton(text="Add FSC of A and B")
        self.save_figure_button = PushButton(text="Save figure…")
        self.save_csv_button = PushButton(text="Save curves (CSV)…")
        controls = Container(widgets=[self.first, self.second, self.add_pair,
                                      self.save_figure_button, self.save_csv_button])
        layout = QVBoxLayout(self)
        layout.addWidget(self.canvas)
        layout.addWidget(controls.native)

        self.add_pair.clicked.connect(self.add_selected_pair)
        self.save_figure_button.clicked.connect(lambda: self._ask_and_save("figure"))
        self.save_csv_button.clicked.connect(lambda: self._ask_and_save("csv"))
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._layers_changed)
        viewer.events.theme.connect(self.redraw)
        self._layers_changed()

    def _image_layers(self, widget=None) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and layer.ndim == 3]

    def curves(self) -> dict[str, dict]:
        """Every curve shown: reconstruction layers' own, then the user's pairs."""
        stored = {f"{layer.name} vs input": layer.metadata["fsc"] for layer in self.viewer.layers
                  if isinstance(layer.metadata.get("fsc"), dict)}
        return {**stored, **self.pairs}

    def add_selected_pair(self) -> None:
        from napari.utils.notifications import show_error

        a, b = self.first.value, self.second.value
        if a is None or b is None:
            show_error("Choose two map layers.")
            return
        try:
            self.add_pair_of(a, b)
        except ValueError as err:
            show_error(str(err))

    def add_pair_of(self, a, b) -> dict:
        from ..layers import density_from_layer
        from ..metrics import fsc_between_maps

        curve = fsc_between_maps(density_from_layer(a), density_from_layer(b)).to_dict()
        self.pairs[f"{a.name} vs {b.name}"] = curve
        self.redraw()
        return curve

    def redraw(self, event=None) -> None:
        from napari.utils.theme import get_theme

        theme = get_theme(self.viewer.theme)
        text, background = str(theme.text.as_hex()), str(theme.canvas.as_hex())
        ax = self.axes
        ax.clear()
        self.figure.set_facecolor(background)
        ax.set_facecolor(background)
        curves = self.curves()
        for label, curve in curves.items():
            # Layer names run long: wrap them so the legend below the axes stays narrow.
            ax.plot(curve["frequency"], curve["correlation"],
                    label=f"{textwrap.fill(label, 50)}\n{curve['resolution_0.5']:.1f} Å at 0.5, "
                          f"{curve['resolution_0.143']:.1f} Å at 0.143")
        for threshold in FSC_THRESHOLDS:
            ax.axhline(threshold, color=text, lw=0.7, ls="--", alpha=0.7)
            ax.annotate(f"{threshold:g}", (1.0, threshold), xycoords=("axes fraction", "data"),
                        color=text, fontsize=7, ha="right", va="bottom")
        ax.set_xlabel("spatial frequency (1/Å)", color=text)
        ax.set_ylabel("FSC", color=text)
        ax.set_ylim(-0.05, 1.05)
        ax.tick_params(colors=text)
        for spine in ax.spines.values():
            spine.set_color(text)
        for legend in self.figure.legends:
            legend.remove()
        if curves:
            self.figure.legend(loc="outside lower center", fontsize=7, facecolor=background,
                               labelcolor=text, edgecolor=text)
        else:
            ax.text(0.5, 0.5, "Reconstruct a map, or add a pair of maps", ha="center",
                    transform=ax.transAxes, color=text)
        self._draw_timer.start(0)

    def _draw_now(self) -> None:
        """Rasterise the figure once the event loop is idle, unless the canvas is gone: a redraw
        queued just before the dock closed must not raise on its deleted Qt object."""
        try:
            self.canvas.draw()
        except RuntimeError as err:
            if "deleted" not in str(err):
                raise

    def save_figure(self, path: str | Path) -> Path:
        """Save the figure; the format follows the suffix (.png or .svg)."""
        path = Path(path)
        if path.suffix.lower() not in (".png", ".svg"):
            raise ValueError("Save the figure as .png or .svg.")
        self.figure.savefig(path, facecolor=self.figure.get_facecolor())
        return path

    def save_csv(self, path: str | Path) -> Path:
        from ..metrics import fsc_curves_csv

        path = Path(path)
        path.write_text(fsc_curves_csv(self.curves()))
        return path

    def _ask_and_save(self, what: str) -> None:
        from napari.utils.notifications import show_error

        if what == "figure":
            path, _ = QFileDialog.getSaveFileName(self, "Save FSC figure", "fsc.png",
                                                  "PNG (*.png);;SVG (*.svg)")
        else:
            path, _ = QFileDialog.getSaveFileName(self, "Save FSC curves", "fsc.csv", "CSV (*.csv)")
        if not path:
            return
        try:
            self.save_figure(path) if what == "figure" else self.save_csv(path)
        except (OSError, ValueError) as err:
            show_error(f"Could not save {path}: {err}")

    def _layers_changed(self, event=None) -> None:
        self.first.reset_choices()
        self.second.reset_choices()
        self.redraw()
