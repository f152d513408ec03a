"""Dock widget: the latent explorer. A UMAP of a latent index, coloured by hub or by a metadata
column; a click on a map opens it and its nearest maps as layers side by side, a click on a
hub's anchor (★) opens the hub; "Find similar" embeds a map layer, marks it on the plot (✕) and
opens its nearest maps; a search box finds maps by name or id; a lasso or box opens a set.

It holds no math: ``Session.open_index``, ``explore``, ``open_neighbours`` and ``find_similar``
run in workers (progress, Cancel); the neighbours, hubs and selections come from the opened
index (``explorer.ExplorerIndex``), which answers at once. Each opened map is a layer named by
its rank, name and distance, with its index row, distance, checkpoint and source in
``layer.metadata`` (``explorer.entry_metadata``). A result that no longer applies (the index
was changed, a newer request was made, the query layer was removed or changed) is dropped.
The plot follows the napari theme and lets go of the viewer when the dock closes
(``_canvas.PlotCanvas``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from ..session import Session
from ._canvas import PlotCanvas, ThemeColors
from ._jobs import LayerJobRunner, density_layers, typed_path

MAX_OPEN = 16  # layers opened at once by a hub or a selection
DEFAULT_K = 8
SELECT_MODES = ("click", "lasso", "box")
LAYOUTS = ("side by side", "over their sources")
GAP = 0.15  # of a box's edge, between boxes laid side by side
LABEL_MARGIN = 0.85  # zoom after framing a set, so the labels centred over its outer boxes fit
NO_HUB_COLOUR = "#8a8a8a"
QUERY_COLOUR = "#ff3b30"
MAX_HUB_LABELS = 20
MAX_QUERIES_SHOWN = 5


class _TaskRelay(QObject):
    """Carries (task id, done, total, message) from a worker thread to the UI thread."""

    stage = Signal(object, int, int, str)


@dataclass
class _Task:
    id: int
    kind: str
    explorer: object  # the ExplorerIndex shown when the task started (None for opening one)
    stopped: bool = False


class _Tasks:
    """Jobs not bound to a layer: opening an index, decoding a set of maps. The newest job of
    a kind supersedes the older ones (which are asked to stop and whose results are dropped)."""

    def __init__(self, on_stage: Callable[[int, int, str], None]):
        self._relay = _TaskRelay()
        self._relay.stage.connect(self._stage)
        self._on_stage = on_stage
        self._latest: dict[str, int] = {}
        self._count = 0
        self._workers: dict[int, object] = {}
        self._tasks: dict[int, _Task] = {}
        self.closed = False

    @property
    def running(self) -> bool:
        return bool(self._workers)

    def start(self, kind: str, explorer, compute: Callable, on_result: Callable,
              on_error: Callable) -> _Task:
        """Run ``compute(stage, should_stop)`` in a worker; ``on_result(task, value)`` or
        ``on_error(task, error)`` is called in the UI thread, only for the newest task of its
        kind and only while the widget is open."""
        from superqt.utils import create_worker

        for task in self._tasks.values():
            if task.kind == kind:
                task.stopped = True
        self._count += 1
        task = _Task(self._count, kind, explorer)
        self._latest[kind] = task.id
        self._tasks[task.id] = task
        emit = self._relay.stage.emit
        worker = create_worker(compute, lambda done, total, message: emit(task.id, done, total, message),
                               lambda: task.stopped, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda value: self.current(task) and on_result(task, value))
        worker.errored.connect(lambda err: self.current(task) and on_error(task, err))
        worker.finished.connect(lambda: self._finished(task))
        self._workers[task.id] = worker
        worker.start()
        return task

    def current(self, task: _Task) -> bool:
        return not self.closed and self._latest.get(task.kind) == task.id and not task.stopped

    def cancel(self) -> None:
        for task in self._tasks.values():
            task.stopped = True

    def close(self) -> None:
        self.closed = True
        self.cancel()

    def _stage(self, task_id, done: int, total: int, message: str) -> None:
        task = self._tasks.get(task_id)
        if task is not None and self.current(task):
            self._on_stage(done, total, message)

    def _finished(self, task: _Task) -> None:
        self._workers.pop(task.id, None)
        self._tasks.pop(task.id, None)


class ExplorerWidget(QWidget):
    """The latent explorer dock.

    Args:
        viewer: the napari viewer.
        index: an index folder to open at once; None opens the bundled index (when this
            installation has one) unless ``open_on_start`` is False.
    """

    def __init__(self, viewer: napari.viewer.Viewer, index: str | None = None,  # noqa: F821
                 open_on_start: bool = True):
        super().__init__()
        self.viewer = viewer
        self.session = Session.for_viewer(viewer)
        self.explorer = None  # the ExplorerIndex shown
        self.highlighted: list[int] = []  # rows ringed on the plot: the last set or search
        self.queries: list[tuple[str, tuple[float, float]]] = []  # maps placed by Find similar
        self._set_count = 0
        self._empty_text = "Opening the bundled index…" if open_on_start else "No index open."
        self._scatter = None
        self._anchors = None
        self._anchor_hubs: list[int] = []
        self._hover = None
        self._selector = None
        self._colorbar = None
        self._similar_for = None
        self._columns: dict[str, str] = {}  # of the open index: what the plot can colour by

        self.plot = PlotCanvas(viewer, self._draw, figsize=(4.5, 4.2), min_height=360, parent=self)
        self.figure, self.canvas = self.plot.figure, self.plot.canvas
        self.axes = self.figure.add_subplot()

        self.index_path = FileEdit(label="index", mode="d", value="",
                                   tooltip="A latent index folder (python -m training.build_index). "
                                           "Empty: the index shipped with napari-cryoswan.")
        self.index_path.line_edit.native.setPlaceholderText("bundled index")
        self.checkpoint = FileEdit(label="checkpoint", value="", filter="*.pt",
                                   tooltip="Only for an index built with your own checkpoint: that "
                                           "checkpoint (.pt). Any other is refused.")
        self.checkpoint.line_edit.native.setPlaceholderText("the index's own")
        self.open_button = PushButton(text="Open index")
        self.colour_by = ComboBox(label="colour by", choices=["hub"],
                                  tooltip="Colour the maps by their hub, or by a metadata column.")
        self.select_mode = ComboBox(label="select", choices=SELECT_MODES, value="click",
                                    tooltip="click: a map opens with its nearest maps, a ★ opens its hub. "
                                            f"lasso / box: drag to open a set (at most {MAX_OPEN} layers).")
        self.k = SpinBox(label="neighbours", value=DEFAULT_K, min=1, max=MAX_OPEN,
                         tooltip="How many nearest maps open beside the one clicked or searched for.")
        self.layout_choice = ComboBox(label="layout", choices=LAYOUTS, value=LAYOUTS[0],
                                      tooltip="side by side: a row (or grid) of boxes, nearest first. "
                                              "over their sources: each decoded map where its source "
                                              "map lies (maps from a corpus have no source place).")
        self.replace = CheckBox(text="replace the previous set", value=True,
                                tooltip="Remove the layers the explorer opened before (never your own).")
        self.hub = ComboBox(label="hub", choices=[], nullable=True,
                            tooltip="A hub: a dense group of similar maps; its anchor is its medoid.")
        self.open_hub_button = PushButton(text="Open hub")
        self.find_text = LineEdit(label="find", value="",
                                  tooltip="A name, EMDB or PDB id, entry id, or #row; Enter opens "
                                          "the matches (one: with its nearest maps).")
        self.query_layer = ComboBox(label="map layer", choices=self._image_layers, nullable=True,
                                    tooltip="A 3-D map layer (any size and voxel size) to search for.")
        self.similar_button = PushButton(text="Find similar to this layer")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, max=1)
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        # A long message wraps; it never widens the dock (and squeezes the canvas).
        self.status.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
        self.controls = Container(labels=True, widgets=[
            self.index_path, self.checkpoint, self.open_button, self.colour_by, self.select_mode,
            self.k, self.layout_choice, self.replace, self.hub, self.open_hub_button, self.find_text,
            self.query_layer, self.similar_button, self.cancel_button])
        footer = Container(labels=False, widgets=[self.progress, self.status])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.plot, stretch=1)
        layout.addWidget(self.controls.native)
        layout.addWidget(footer.native)

        self.tasks = _Tasks(self._on_stage)
        self.jobs = LayerJobRunner(viewer, self._on_stage)
        self.plot.lifetime.on_close(self.tasks.close)
        self.open_button.clicked.connect(lambda: self.open_index())
        self.colour_by.changed.connect(self.redraw)
        self.select_mode.changed.connect(self._selection_mode_changed)
        self.open_hub_button.clicked.connect(lambda: self.hub.value is not None and self.open_hub(self.hub.value))
        self.find_text.native.returnPressed.connect(lambda: self.find(self.find_text.value))
        self.similar_button.clicked.connect(lambda: self.find_similar())
        self.cancel_button.clicked.connect(self.cancel)
        self.canvas.mpl_connect("pick_event", self._on_pick)
        self.canvas.mpl_connect("motion_notify_event", self._on_hover)
        events = viewer.layers.events
        for event in (events.inserted, events.removed):
            self.plot.connect_event(event, self._layers_changed)
        self.plot.connect_event(viewer.events.theme, self._theme_changed)
        self._layers_changed()
        self.redraw()
        if index is not None:
            self.index_path.value = str(index)
        if index is not None or open_on_start:
            self.open_index(notify=index is not None)

    @property
    def closed(self) -> bool:
        return self.plot.closed

    # --- opening an index --------------------------------------------------------------------

    def open_index(self, path: str | None = None, checkpoint: str | None = None, *,
                   notify: bool = True) -> None:
        """Open an index (the field's, or the bundled one when it is empty) and its projection,
        in a worker. A failure is said in the status line, and also notified when ``notify``
        (not when the dock opens without a bundled index: that is no error of the user's)."""
        if path is not None:
            self.index_path.value = str(path)
        if checkpoint is not None:
            self.checkpoint.value = str(checkpoint)
        folder = typed_path(self.index_path) or None
        given = typed_path(self.checkpoint) or None
        session = self.session

        def job(stage, should_stop):
            stage(0, 2, "reading the index")
            opened = session.open_index(folder, given)
            session.explore(opened, stage=stage)
            return opened

        self.status.value = f"Opening {folder or 'the bundled index'}…"
        self.tasks.start("index", None, job, self._index_opened,
                         lambda task, error: self._failed(task, error, notify=notify))
        self._set_running()

    def _index_opened(self, task, opened) -> None:
        self.explorer = opened
        self.highlighted, self.queries = [], []
        self._columns = opened.columns()
        self.colour_by.choices = ["hub", *self._columns]
        self.colour_by.value = "hub"
        hubs = opened.projection.hubs
        self.hub.choices = [(f"hub {h.id}: {_short(opened.rows[h.anchor].get('name'))} + {h.size - 1}", h.id)
                            for h in hubs]
        self.hub.value = hubs[0].id if hubs else None
        self._empty_text = f"{opened.label} is empty." if len(opened) == 0 else ""
        self.redraw()
        self._done(f"Opened {opened.describe()} (projection {opened.projection.origin}). "
                   "Click a map, or a ★ for its hub." + "".join(f" ⚠ {n}" for n in opened.notes))

    # --- opening maps ------------------------------------------------------------------------

    def open_row(self, row: int, k: int | None = None) -> None:
        """Open the map of ``row`` and its ``k`` nearest maps (a click on its point)."""
        explorer = self._need_index()
        if explorer is None:
            return
        try:
            neighbours = explorer.neighbours(row, self.k.value if k is None else k)
        except ValueError as err:
            return self._fail(str(err))
        name = _short(explorer.rows[row].get("name"))
        self._open(neighbours, opened_as="neighbours", what=f"{name} and its nearest maps")

    def open_hub(self, hub_id: int) -> None:
        """Open a hub's anchor and its members, nearest to the anchor first (up to MAX_OPEN)."""
        explorer = self._need_index()
        if explorer is None:
            return
        try:
            hub = explorer.projection.hub(hub_id)
        except ValueError as err:
            return self._fail(str(err))
        members = explorer.hub_members(hub_id, MAX_OPEN)
        more = f" (the {MAX_OPEN} nearest to its anchor of {hub.size} members)" if hub.size > MAX_OPEN else ""
        self.hub.value = hub_id
        self._open(members, opened_as="hub", hub=hub_id, prefix=f"H{hub_id} ",
                   what=f"hub {hub_id}{more}", highlight=list(hub.members))

    def open_rows(self, rows, *, what: str = "the selection") -> None:
        """Open chosen maps (a lasso, a box, a search), up to MAX_OPEN, those nearest the centre
        of the selection on the plot first."""
        from ..session import nearest_to_centre

        explorer = self._need_index()
        if explorer is None:
            return
        rows = [int(r) for r in rows]
        if not rows:
            self.highlighted = []
            self.redraw()
            return self._fail(f"No maps in {what}.", notify=False)
        kept = nearest_to_centre(explorer.projection.coords, rows, MAX_OPEN)
        more = (f" ({len(rows)} maps; the {MAX_OPEN} nearest to its centre open: at most {MAX_OPEN} "
                "layers at once)") if len(rows) > MAX_OPEN else ""
        self._open(explorer.rows_as_neighbours(kept), opened_as="selection", what=f"{what}{more}",
                   highlight=rows)

    def find(self, text: str) -> list[int]:
        """Maps whose name or id contain ``text``: ringed on the plot and opened (one match: with
        its nearest maps)."""
        explorer = self._need_index()
        if explorer is None or not str(text).strip():
            return []
        rows = explorer.find(text)
        if not rows:
            self.highlighted = []
            self.redraw()
            self._fail(f"No map in {explorer.label} matches '{text}'.", notify=False)
        elif len(rows) == 1:
            self.open_row(rows[0])
        else:
            self.open_rows(rows, what=f"the {len(rows)} maps that match '{text}'")
        return rows

    def _open(self, neighbours: list, *, opened_as: str, what: str, hub: int | None = None,
              prefix: str = "", highlight: list[int] | None = None) -> None:
        explorer, session = self.explorer, self.session
        self.highlighted = highlight if highlight is not None else [n.row for n in neighbours]
        self.redraw()

        def job(stage, should_stop):
            return session.open_neighbours(explorer, neighbours, stage=stage, should_stop=should_stop)

        def shown(task, decoded):
            if task.explorer is not self.explorer:
                return self._dropped("the index was changed")
            self._show_set(decoded, opened_as=opened_as, hub=hub, prefix=prefix, what=what)

        self.status.value = f"Opening {what}…"
        self.tasks.start("open", explorer, job, shown, self._failed)
        self._set_running()

    # --- find similar ----------------------------------------------------------------------

    def find_similar(self, layer=None) -> None:
        """Embed a map layer (the chosen one) in a worker, mark it on the plot and open its
        nearest maps beside it."""
        from ..layers import density_from_layer

        explorer = self._need_index()
        if explorer is None:
            return
        layer = layer if layer is not None else self.query_layer.value
        if layer is None:
            return self._fail("Choose a 3-D map layer to search for.")
        try:
            density = density_from_layer(layer)
        except ValueError as err:
            return self._fail(str(err))
        if density.voxel_size is None:
            return self._fail(f"'{layer.name}' has no voxel size: set the layer's scale (Å per voxel) "
                              "first, e.g. in the Reconstruct widget's voxel size field.")
        session, k = self.session, self.k.value

        def job(stage, should_stop):
            return session.find_similar(density, explorer, k, stage=stage, should_stop=should_stop)

        self.status.value = f"Embedding {layer.name}…"
        self._similar_for = explorer
        self.jobs.start(layer, density, job, self._similar_found, self._similar_failed, self._similar_dropped)
        self._set_running()

    def _similar_found(self, job, result) -> None:
        if self.closed:
            return
        if self._similar_for is not self.explorer:
            return self._dropped("the index was changed")
        name = job.layer.name
        self.queries = [*self.queries, (name, result.xy)][-MAX_QUERIES_SHOWN:]
        self.highlighted = [n.row for n in result.neighbours]
        record = result.record
        # The query's box (where the model saw the particle) fixes z and y; the row starts past
        # the query layer's own extent, so a large map does not hide its neighbours.
        extent = np.asarray(job.layer.extent.world)
        start = (record.box_origin[0], record.box_origin[1], float(extent[1][-1]))
        self._show_set(result.maps, opened_as="query", query=name, start=start, first_rank=1,
                       what=f"the maps nearest to {name}", placed=result.xy, query_layer=job.layer)
        if result.notes:
            self.status.value += " ⚠ " + " ".join(result.notes)

    def _similar_failed(self, job, error) -> None:
        if not self.closed:
            self._failed(None, error)

    def _similar_dropped(self, job, reason: str) -> None:
        if not self.closed:
            self._dropped(reason)

    # --- layers ----------------------------------------------------------------------------

    def _show_set(self, decoded: list, *, opened_as: str, what: str, hub: int | None = None,
                  query: str | None = None, prefix: str = "", start=None, first_rank: int = 0,
                  placed=None, query_layer=None) -> list:
        """Add decoded maps as layers: side by side (from ``start``) or over their sources."""
        from napari.layers import Layer

        from ..session import entry_layer_data, entry_layer_name, entry_metadata, grid_translations

        explorer = self.explorer
        if self.replace.value:
            self.remove_explorer_layers()
        self._set_count += 1
        translations = [None] * len(decoded)
        if self.layout_choice.value == "side by side" and decoded:
            pitch = max(d.extent for d in decoded) * (1 + GAP)
            if start is None:
                start = self._free_start(pitch * GAP)
            elif first_rank:
                start = (start[0], start[1], start[2] + pitch * GAP)
            translations = grid_translations(len(decoded), pitch, start=start)
        added = []
        for i, (entry, translate) in enumerate(zip(decoded, translations)):
            rank = first_rank + i
            name = entry_layer_name(entry, rank, prefix=prefix)
            metadata = entry_metadata(explorer, entry, rank=rank, opened_as=opened_as,
                                      set_id=self._set_count, query=query, hub=hub)
            data = entry_layer_data(entry, name=name, metadata=metadata, translate=translate)
            added.append(self.viewer.add_layer(Layer.create(*data)))
        if added and translations[0] is not None:
            self._label_boxes(added, pitch, query_layer)
        if added:
            self.viewer.layers.selection.active = added[0]
            self.viewer.reset_view()
            self.viewer.camera.zoom *= LABEL_MARGIN  # the labels over the outer boxes stay on the canvas
            # A 2-D view slices through the middle of the boxes, where their particles lie.
            centre = np.asarray(added[0].extent.world).mean(0)
            self.viewer.dims.set_point(range(3), tuple(float(v) for v in centre))
        self.redraw()
        listed = ", ".join(f"{layer.name}" for layer in added[:4]) + (", …" if len(added) > 4 else "")
        text = f"Opened {what}: {listed}."
        if placed is not None:
            text = f"Placed {query} at ({placed[0]:.2f}, {placed[1]:.2f}) ✕. " + text
        overlapping = sum(d.units == "z-score" for d in decoded)
        if self.layout_choice.value != "side by side" and overlapping > 1:
            text += (f" {overlapping} of them come from a corpus and have no source place: they lie over "
                     "each other at the origin. Choose 'side by side' to compare them.")
        self._done(text)
        return added

    def _label_boxes(self, layers: list, pitch: float, query=None) -> None:
        """One Points layer that names each box above it (rank and name, then the distance on a
        second line, so that neighbouring labels do not run into each other), and the query map
        when there is one, so a row of boxes reads without the layer list; it belongs to the set
        and goes with it."""
        from napari.utils.theme import get_theme

        labels = []
        for layer in layers:
            found = layer.metadata["explorer"]
            distance = found["distance"]
            labels.append(f"#{found['rank']} {_short(layer.metadata['index_entry'].get('name'), 16)}"
                          + ("" if distance is None or found["rank"] == 0 else f"\nd = {distance:.2f}"))
        set_id = layers[0].metadata["explorer"]["set"]
        if query is not None and query in self.viewer.layers and query.ndim == 3:
            layers = [*layers, query]
            labels.append(f"query: {_short(query.name, 16)}")
        extents = np.stack([np.asarray(layer.extent.world) for layer in layers])  # (n, 2, 3)
        centres = extents.mean(1)
        where = np.stack([centres[:, 0], extents[:, 0, 1] + 0.04 * pitch, centres[:, 2]], 1)
        colour = str(get_theme(self.viewer.theme).text.as_hex())
        # centred over each box: napari honours 'center' in 2-D and 3-D alike
        self.viewer.add_points(
            where, name=f"explorer labels {set_id}", size=1.0, face_color="transparent",
            border_color="transparent", border_width=0, features={"label": labels},
            text={"string": "{label}", "size": 8, "color": colour, "anchor": "center"},
            metadata={"explorer": {"set": set_id, "labels": True}}, units=("angstrom",) * 3)

    def _theme_changed(self, event=None) -> None:
        """The labels over the boxes take the new theme's text colour."""
        from napari.utils.theme import get_theme

        colour = str(get_theme(self.viewer.theme).text.as_hex())
        for layer in self.explorer_layers():
            if layer.metadata["explorer"].get("labels"):
                layer.text.color = colour

    def explorer_layers(self) -> list:
        """The layers the explorer opened (by their metadata), in the viewer's order."""
        return [layer for layer in self.viewer.layers
                if isinstance(layer.metadata.get("explorer"), dict) and "set" in layer.metadata["explorer"]]

    def remove_explorer_layers(self) -> None:
        for layer in self.explorer_layers():
            self.viewer.layers.remove(layer)

    def _free_start(self, gap: float) -> tuple[float, float, float]:
        """Where a new side-by-side set starts: right of every other layer, so it hides none."""
        others = [layer for layer in self.viewer.layers if layer.visible and layer.ndim == 3]
        if not others:
            return (0.0, 0.0, 0.0)
        extents = np.stack([np.asarray(layer.extent.world) for layer in others])
        return (float(extents[:, 0, 0].min()), float(extents[:, 0, 1].min()), float(extents[:, 1, 2].max()) + gap)

    def _image_layers(self, widget=None) -> list:
        return density_layers(self.viewer)

    def _layers_changed(self, event=None) -> None:
        self.query_layer.reset_choices()
        own = [layer for layer in self.query_layer.choices
               if layer is not None and "explorer" not in layer.metadata]
        if self.query_layer.value is None and own:
            self.query_layer.value = own[-1]  # the newest map of the user's, ready for one click

    # --- the plot ----------------------------------------------------------------------------

    def redraw(self, *args) -> None:
        self.plot.redraw()

    def _draw(self, colors: ThemeColors) -> None:
        ax = self.axes
        if self._colorbar is not None:
            self._colorbar.remove()
            self._colorbar = None
        ax.clear()
        self._scatter = self._anchors = self._hover = None
        self._anchor_hubs = []
        ax.set_facecolor(colors.background)
        for spine in ax.spines.values():
            spine.set_color(colors.text)
            spine.set_alpha(0.4)
        ax.set_xticks([])
        ax.set_yticks([])
        explorer = self.explorer
        if explorer is None or explorer.projection is None or len(explorer) == 0:
            ax.text(0.5, 0.5, self._empty_text or "No index open.", ha="center", va="center", wrap=True,
                    color=colors.text, fontsize=9, transform=ax.transAxes)
            self._make_selector(colors)
            return
        projection = explorer.projection
        coords = projection.coords
        size = float(np.clip(2500.0 / len(coords), 6.0, 40.0))
        point_colours = self._point_colours(explorer, colors, ax)
        self._scatter = ax.scatter(coords[:, 0], coords[:, 1], s=size, c=point_colours, linewidths=0,
                                   picker=True, pickradius=5, zorder=2)
        shown_hubs = list(projection.hubs)
        if shown_hubs:
            anchors = np.array([coords[h.anchor] for h in shown_hubs])
            hub_colours = _hub_colours([h.id for h in shown_hubs])
            self._anchors = ax.scatter(anchors[:, 0], anchors[:, 1], s=max(90.0, 4 * size), marker="*",
                                       c=hub_colours, edgecolors=colors.text, linewidths=0.7, picker=True,
                                       pickradius=6, zorder=4)
            self._anchor_hubs = [h.id for h in shown_hubs]
            for hub in shown_hubs[:MAX_HUB_LABELS]:
                x, y = coords[hub.anchor]
                ax.annotate(f"H{hub.id}", (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7,
                            color=colors.text, zorder=5)
        if self.highlighted:
            rows = np.asarray(self.highlighted, int)
            ax.scatter(coords[rows, 0], coords[rows, 1], s=size * 3.5, facecolors="none",
                       edgecolors=colors.text, linewidths=1.1, zorder=3)
        for i, (name, (x, y)) in enumerate(self.queries):
            latest = i == len(self.queries) - 1
            ax.scatter([x], [y], s=150 if latest else 90, marker="X", c=QUERY_COLOUR, edgecolors=colors.text,
                       linewidths=0.8, zorder=6, alpha=1.0 if latest else 0.6)
            if latest:
                ax.annotate(_short(name), (x, y), xytext=(7, -10), textcoords="offset points", fontsize=8,
                            color=QUERY_COLOUR, fontweight="bold", zorder=6)
        title = f"{explorer.label}: {len(explorer)} maps, {len(projection.hubs)} hubs"
        ax.set_title(title, color=colors.text, fontsize=9)
        ax.set_xlabel("UMAP 1", color=colors.text, fontsize=8)
        ax.set_ylabel("UMAP 2", color=colors.text, fontsize=8)
        self._hover = ax.annotate("", (0, 0), xytext=(8, 8), textcoords="offset points", fontsize=8,
                                  color=colors.text, zorder=10, visible=False,
                                  bbox={"boxstyle": "round,pad=0.3", "fc": colors.background,
                                        "ec": colors.text, "alpha": 0.9})
        self._make_selector(colors)

    def _point_colours(self, explorer, colors: ThemeColors, ax) -> np.ndarray:
        """(N, 4) RGBA: each map's hub colour, or its value of the chosen column (with a legend
        or a colour bar)."""
        from matplotlib import colormaps
        from matplotlib.colors import to_rgba
        from matplotlib.lines import Line2D

        column = self.colour_by.value
        grey = np.array(to_rgba(NO_HUB_COLOUR))
        if column == "hub" or column not in self._columns:
            return _hub_colours(explorer.projection.labels)
        values = explorer.column_values(column)
        if self._columns[column] == "number":
            known = np.array([np.nan if v is None else float(v) for v in values])
            finite = np.isfinite(known)
            low, high = float(np.nanmin(known)), float(np.nanmax(known))
            cmap = colormaps["viridis"]
            out = cmap(np.nan_to_num((known - low) / ((high - low) or 1.0)))
            out[~finite] = grey
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            self._colorbar = self.figure.colorbar(ScalarMappable(Normalize(low, high), cmap), ax=ax,
                                                  fraction=0.05, pad=0.02)
            self._colorbar.set_label(column, color=colors.text, fontsize=8)
            self._colorbar.ax.tick_params(colors=colors.text, labelsize=7)
            self._colorbar.outline.set_edgecolor(colors.text)
            return out
        categories = sorted({str(v) for v in values if v is not None})
        palette = colormaps["tab10"]
        colour_of = {c: np.array(palette(i % 10)) for i, c in enumerate(categories)}
        out = np.array([grey if v is None else colour_of[str(v)] for v in values])
        handles = [Line2D([], [], marker="o", linestyle="", color=colour_of[c], label=c) for c in categories]
        if any(v is None for v in values):
            handles.append(Line2D([], [], marker="o", linestyle="", color=NO_HUB_COLOUR, label="unknown"))
        # 'best' scans every point: slow for a large index
        legend = ax.legend(handles=handles, title=column, fontsize=7, title_fontsize=7,
                           loc="best" if len(values) < 2000 else "upper right", framealpha=0.6,
                           facecolor=colors.background, edgecolor=colors.text, labelcolor=colors.text,
                           markerscale=0.8)
        legend.get_title().set_color(colors.text)
        return out

    def _make_selector(self, colors: ThemeColors) -> None:
        from matplotlib.widgets import LassoSelector, RectangleSelector

        if self._selector is not None:
            self._selector.set_active(False)
            self._selector.disconnect_events()
            self._selector = None
        mode = self.select_mode.value
        if mode == "lasso":
            self._selector = LassoSelector(self.axes, self._lasso_done, props={"color": colors.text})
        elif mode == "box":
            self._selector = RectangleSelector(self.axes, self._box_done, interactive=False,
                                               props={"edgecolor": colors.text, "fill": False})

    def _selection_mode_changed(self, *args) -> None:
        self.redraw()
        if self.select_mode.value != "click":
            self.status.value = (f"Drag a {self.select_mode.value} around maps on the plot to open them "
                                 f"(at most {MAX_OPEN} at once).")

    # --- plot events -------------------------------------------------------------------------

    def _on_pick(self, event) -> None:
        if self.select_mode.value != "click" or self.explorer is None or not len(event.ind):
            return
        if event.artist is self._anchors:
            self.open_hub(self._anchor_hubs[int(event.ind[0])])
        elif event.artist is self._scatter:
            if self._anchors is not None and self._anchors.contains(event.mouseevent)[0]:
                return  # the anchor's own pick opens its hub
            self.open_row(self._nearest_of(event.ind, event.mouseevent))

    def _nearest_of(self, candidates, mouse) -> int:
        """Of the points under the cursor, the one nearest to it (on screen)."""
        coords = self.explorer.projection.coords[np.asarray(candidates)]
        on_screen = self.axes.transData.transform(coords)
        distance = np.hypot(on_screen[:, 0] - mouse.x, on_screen[:, 1] - mouse.y)
        return int(np.asarray(candidates)[int(np.argmin(distance))])

    def _on_hover(self, event) -> None:
        if self._hover is None or self._scatter is None or self.closed:
            return
        inside, info = (False, {}) if event.inaxes is not self.axes else self._scatter.contains(event)
        if inside and len(info.get("ind", ())):
            row = self._nearest_of(info["ind"], event)
            x, y = self.explorer.projection.coords[row]
            self._hover.xy = (x, y)
            self._hover.set_text(self.explorer.hover_text(row))
            # Flip to the left in the right half, so the label stays inside the plot.
            left = self.axes.transData.transform((x, y))[0] > self.axes.bbox.x0 + self.axes.bbox.width / 2
            self._hover.set_horizontalalignment("right" if left else "left")
            self._hover.set_position((-8 if left else 8, 8))
            self._hover.set_visible(True)
            self.canvas.draw_idle()
        elif self._hover.get_visible():
            self._hover.set_visible(False)
            self.canvas.draw_idle()

    def _lasso_done(self, vertices) -> None:
        from ..session import rows_in_polygon

        if self.explorer is not None and self.explorer.projection is not None:
            self.open_rows(rows_in_polygon(self.explorer.projection.coords, vertices), what="the lasso")

    def _box_done(self, press, release) -> None:
        from ..session import rows_in_box

        if self.explorer is None or self.explorer.projection is None or press.xdata is None or release.xdata is None:
            return
        rows = rows_in_box(self.explorer.projection.coords, (press.xdata, press.ydata),
                           (release.xdata, release.ydata))
        self.open_rows(rows, what="the box")

    # --- progress, errors ----------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop what runs: a set being decoded or an index being opened is dropped at once (its
        worker ends on its own); a search ends after its current step."""
        self.tasks.cancel()
        self.cancel_button.enabled = False
        self.progress.value = 0
        if self.jobs.running:
            self.jobs.cancel()
            self.status.value = "Cancelling… (stops after the current step)"
        else:
            self.status.value = "Cancelled."

    def _on_stage(self, done: int, total: int, message: str) -> None:
        if self.closed:
            return
        self.progress.max = max(total, 1)
        self.progress.value = min(done, self.progress.max)
        self.status.value = message[:1].upper() + message[1:] + "…"

    def _set_running(self) -> None:
        self.cancel_button.enabled = True

    def _done(self, text: str) -> None:
        self.progress.value = self.progress.max
        self.cancel_button.enabled = False
        self.status.value = text

    def _failed(self, task, error, notify: bool = True) -> None:
        from ..session import Cancelled

        if self.closed:
            return
        self.cancel_button.enabled = False
        self.progress.value = 0
        if isinstance(error, Cancelled):
            self.status.value = "Cancelled."
            return
        self._fail(str(error) or type(error).__name__, notify=notify)
        if self.explorer is None:
            self._empty_text = "No index open. Choose an index folder above."
            self.redraw()

    def _dropped(self, reason: str) -> None:
        self.cancel_button.enabled = False
        self.progress.value = 0
        self.status.value = f"Result dropped: {reason}."

    def _fail(self, message: str, notify: bool = True) -> None:
        from napari.utils.notifications import show_error

        self.status.value = message
        if notify:
            show_error(message)

    def _need_index(self):
        if self.explorer is None or self.explorer.projection is None:
            self._fail("No index is open yet: open one first (the bundled index, or a folder).", notify=False)
            return None
        return self.explorer


def _hub_colours(labels) -> np.ndarray:
    """(N, 4) RGBA: tab20 by hub id, grey for maps in no hub (-1)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    labels = np.asarray(labels, int)
    # tab20's saturated colours first, then their light partners: the first ten hubs differ most
    order = np.r_[0:20:2, 1:20:2]
    out = colormaps["tab20"](order[labels % 20])
    out[labels < 0] = to_rgba(NO_HUB_COLOUR)
    return out


def _short(name, length: int = 18) -> str:
    from ..layers import short_name

    return short_name(str(name), length)
