"""Dock widget: FSC curves in a matplotlib figure that follows the napari theme.

It plots the curve stored in the metadata of every reconstruction layer (reconstruction
against the preprocessed input), and the FSC of any two image layers on the same grid that the
user adds. The figure (``figures.draw_fsc``, as in the evaluation report) saves as PNG or SVG,
the curves as CSV. Its canvas (``_canvas.PlotCanvas``) lets go of the viewer when the dock closes.
"""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import ComboBox, Container, PushButton
from qtpy.QtWidgets import QFileDialog, QVBoxLayout, QWidget

from ._canvas import PlotCanvas, ThemeColors
from ._jobs import density_layers


MAX_DRAWN = 6


class FSCWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer):  # noqa: F821 (a string: napari injects by it)
        super().__init__()
        self.viewer = viewer
        self.plot = PlotCanvas(viewer, self._draw, parent=self)
        self.figure, self.canvas = self.plot.figure, self.plot.canvas
        self.axes = self.figure.add_subplot()
        self.pairs: dict[str, dict] = {}  # user-added pair curves, label → FSCCurve.to_dict()

        self.first = ComboBox(label="map A", choices=self._image_layers, nullable=True,
                              tooltip="Two maps on the same voxel grid (e.g. half maps).")
        self.second = ComboBox(label="map B", choices=self._image_layers, nullable=True,
                               tooltip="Two maps on the same voxel grid (e.g. half maps).")
        self.add_pair = PushButton(text="Add FSC of A and B",
                                   tooltip="Add the FSC curve of map A against map B to the plot.")
        self.save_figure_button = PushButton(text="Save figure…", tooltip="PNG or SVG.")
        self.save_csv_button = PushButton(
            text="Save curves (CSV)…",
            tooltip="The curves of the visible results and of the pairs, shell by shell.")
        controls = Container(widgets=[self.first, self.second, self.add_pair,
                                      self.save_figure_button, self.save_csv_button])
        layout = QVBoxLayout(self)
        layout.addWidget(self.plot)
        layout.addWidget(controls.native)

        self.add_pair.clicked.connect(self.add_selected_pair)
        self.save_figure_button.clicked.connect(lambda: self._ask_and_save("figure"))
        self.save_csv_button.clicked.connect(lambda: self._ask_and_save("csv"))
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered, events.renamed):
            self.plot.connect_event(event, self._layers_changed)
        self.plot.connect_event(events, self._layer_shown_or_hidden)  # the list relays each layer's
        self._layers_changed()

    def _image_layers(self, widget=None) -> list:
        return density_layers(self.viewer)

    def curves(self) -> dict[str, dict]:
        """The curves of the visible reconstruction layers, then the user's pairs (what the
        figure draws, up to ``MAX_DRAWN`` of them, and what the CSV holds)."""
        stored = {f"{layer.name} vs {layer.metadata.get('fsc_against', 'input')}": layer.metadata["fsc"]
                  for layer in self.viewer.layers
                  if isinstance(layer.metadata.get("fsc"), dict) and layer.visible}
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
        from ..session import fsc_of_maps

        curve = fsc_of_maps(density_from_layer(a), density_from_layer(b))
        self.pairs[f"{a.name} vs {b.name}"] = curve
        self.redraw()
        return curve

    def redraw(self, event=None) -> None:
        self.plot.redraw()

    def _draw(self, colors: ThemeColors) -> None:
        from ..figures import draw_fsc

        curves = self.curves()
        drawn = dict(list(curves.items())[-MAX_DRAWN:])  # a legend of more would hide the axes
        title = None if len(drawn) == len(curves) else (
            f"The {len(drawn)} newest of {len(curves)} curves: hide result layers to choose")
        draw_fsc(self.axes, drawn, text_color=colors.text, background=colors.background,
                 title=title, empty_text="Reconstruct a map, or add a pair of maps")

    def save_figure(self, path: str | Path) -> Path:
        """Save the figure; the format follows the suffix (.png or .svg)."""
        path = Path(path)
        if path.suffix.lower() not in (".png", ".svg"):
            raise ValueError("Save the figure as .png or .svg.")
        from ..session import write_atomically

        with write_atomically(path) as tmp:
            self.figure.savefig(tmp, facecolor=self.figure.get_facecolor(),
                                format=path.suffix.lstrip(".").lower())
        return path

    def save_csv(self, path: str | Path) -> Path:
        from ..session import save_fsc_curves

        return save_fsc_curves(path, self.curves())

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

    def _layer_shown_or_hidden(self, event) -> None:
        if event.type == "visible":
            self.redraw()

    def _layers_changed(self, event=None) -> None:
        self.first.reset_choices()
        self.second.reset_choices()
        self.redraw()
