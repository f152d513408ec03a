"""Dock widget: reconstruct a map with Cryo-SWAN (RQ1+RQ2, and its in-model RQ1 where it has
one) and a separately trained RQ1-only control.

It collects the choices, runs ``Session.reconstruct`` in a worker and turns the result into
layers that overlay the input: each reconstruction and the difference map of the full model,
with their provenance in ``layer.metadata``.
"""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import CheckBox, FileEdit

from ..session import bundled_checkpoint
from ._jobs import Job, ModelJobWidget, typed_path


class ReconstructWidget(ModelJobWidget):
    run_text = "Reconstruct"

    def __init__(self, viewer: napari.viewer.Viewer):  # noqa: F821 (a string: napari injects by it)
        self.compare_rq1 = CheckBox(
            text="also RQ1 alone (control checkpoint)", value=bool(bundled_checkpoint("swan-rq1")),
            tooltip="Reconstruct with a separately trained RQ1-only model too, to see what the "
                    "second level adds.")
        self.rq1_checkpoint = FileEdit(label="RQ1 checkpoint", value=bundled_checkpoint("swan-rq1"),
                                       filter="*.pt", tooltip="An RQ1-only (swan-rq1) checkpoint.")
        self.mask = CheckBox(
            text="mask at the layer's contour level first",
            tooltip="Keep only the density above the map layer's iso-surface level (with a soft "
                    "edge) before the model sees it: for maps with other particles or noise in "
                    "the box.")
        self.by_scale = CheckBox(
            text="also each perception scale and its code map (4-D)",
            tooltip="Decode the codes scale by scale, coarse to fine, as the paper's Fig. 4b–c: "
                    "one layer whose first slider walks from the coarsest scale to the full "
                    "reconstruction, and a hidden labels layer of each scale's code map (a "
                    "colour per code; the cursor reads its index). The step shown is named at "
                    "the top of the canvas.")
        super().__init__(viewer, checkpoint=bundled_checkpoint("swan"),
                         extra=(self.compare_rq1, self.rq1_checkpoint, self.mask, self.by_scale))
        self.lifetime.connect_event(viewer.dims.events.current_step, self._name_scale_step)
        self.compare_rq1.changed.connect(self._rq1_enabled)
        self.mask.changed.connect(self.describe)
        self._rq1_enabled()
        self._warm_up()

    def contour_level(self) -> float | None:
        layer = self.layer.value
        return float(layer.iso_threshold) if self.mask.value and layer is not None else None

    def compute(self, density):
        session, checkpoint = self.session, typed_path(self.checkpoint)
        control = typed_path(self.rq1_checkpoint) if self.compare_rq1.value else None
        contour, by_scale = self.contour_level(), self.by_scale.value

        def job(stage, should_stop):
            return session.reconstruct(density, checkpoint, control, contour_level=contour,
                                       stage=stage, should_stop=should_stop, by_scale=by_scale)

        return job

    def show(self, job: Job, result) -> str:
        from ..layers import reconstruction_layer_data

        contour = float(job.layer.iso_threshold)
        added = [self.viewer.add_layer(_make_layer(*data)) for data in
                 reconstruction_layer_data(job.layer.name, job.layer.unique_id, result, contour)]
        self.viewer.layers.selection.active = added[0]  # its contour control, not the hidden Δ's
        if result.by_scale is not None:
            dims = self.viewer.dims
            dims.axis_labels = ("perception scale", *dims.axis_labels[1:])
            dims.set_current_step(0, len(result.by_scale.labels) - 1)  # the full map first
            self._name_scale_step()
        status = "Done: " + ", ".join(layer.name for layer in added)
        if any(v.variant == "RQ2" for v in result.variants):
            status += (". RQ2 is level 2 alone: the map's coarse approximation (on a grid 4× coarser), "
                       "to which RQ1's codes add the detail")
        if not any(v.variant.startswith("RQ1") and "+" not in v.variant for v in result.variants):
            status += (". RQ1 alone: not run (this checkpoint does not decode level 1 alone, and no "
                       "RQ1 control checkpoint was chosen).")
        return status

    def _name_scale_step(self, *args) -> None:
        """Name the perception scale that the visible by-scale layers show, above the canvas."""
        from ..layers import scale_step_label

        if self.viewer.dims.ndim < 4:
            return
        step = self.viewer.dims.point[0]
        labels = [scale_step_label(layer, step) for layer in self.viewer.layers if layer.visible]
        labels = [label for label in labels if label]
        overlay = _text_overlay(self.viewer)
        overlay.text = "\n".join(labels)
        overlay.visible = bool(labels)

    def _rq1_enabled(self, *args) -> None:
        self.rq1_checkpoint.enabled = self.compare_rq1.value

    def _warm_up(self) -> None:
        """Read the checkpoints in the background, so the first click does not wait for them
        and the plan can name the checkpoint's own input contract."""
        from superqt.utils import create_worker

        paths = [p for p in map(typed_path, (self.checkpoint, self.rq1_checkpoint)) if _chosen(p)]
        session = self.session

        def load():
            for path in paths:
                session.checkpoint(path)

        worker = create_worker(load, _start_thread=False, _ignore_errors=True)
        worker.finished.connect(lambda: self.closed or self.describe())
        worker.start()


def _text_overlay(viewer):
    """The canvas's text overlay (``viewer.text_overlay`` before napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.overlays["text"] if canvas is not None else viewer.text_overlay


def _chosen(path) -> bool:
    """Whether a FileEdit names a file at all: an emptied one reads as '', '.' or a folder."""
    return str(path) not in ("", ".") and Path(path).is_file()


def _make_layer(data, kwargs, kind):
    from napari.layers import Layer

    return Layer.create(data, kwargs, kind)
