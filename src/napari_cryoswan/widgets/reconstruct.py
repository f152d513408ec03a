"""Dock widget: reconstruct an image layer with Cryo-SWAN (RQ1+RQ2) and its RQ1 ablation.

It only collects the choices, runs ``reconstruction.reconstruct_map`` in a worker and turns the
result into layers that overlay the input: each reconstruction and the difference map of the
full model, with their provenance in ``layer.metadata``.
"""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, ProgressBar, PushButton

from ._jobs import LayerJobRunner

DEVICES = ("auto", "cpu", "cuda")


def _bundled(name: str) -> str:
    from ..checkpoint import CheckpointError, bundled_checkpoint_path

    try:
        return str(bundled_checkpoint_path(name))
    except CheckpointError:
        return ""


class ReconstructWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer):  # noqa: F821 (a string: napari injects by it)
        super().__init__(labels=True)
        self.viewer = viewer
        self.layer = ComboBox(label="map", choices=self._image_layers, nullable=True)
        self.checkpoint = FileEdit(label="checkpoint", value=_bundled("swan"), filter="*.pt")
        self.compare_rq1 = CheckBox(text="also RQ1 alone (ablation checkpoint)",
                                    value=bool(_bundled("swan-rq1")))
        self.rq1_checkpoint = FileEdit(label="RQ1 checkpoint", value=_bundled("swan-rq1"),
                                       filter="*.pt")
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.plan = Label(label="preprocessing", value="")
        self.run_button = PushButton(text="Reconstruct")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, max=1)
        self.status = Label(label="status", value="")
        self.extend([self.layer, self.checkpoint, self.compare_rq1, self.rq1_checkpoint,
                     self.device, self.plan, self.run_button, self.cancel_button, self.progress,
                     self.status])
        self.plan.native.setWordWrap(True)
        self.status.native.setWordWrap(True)

        self.jobs = LayerJobRunner(viewer, self._on_stage)
        self._napari_progress = None
        self.layer.changed.connect(self._describe)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.jobs.cancel)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    def _image_layers(self, widget=None) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb]

    def _refresh_layers(self, event=None) -> None:
        self.layer.reset_choices()
        maps = [choice for choice in self.layer.choices if choice is not None]
        if self.layer.value is None and maps:
            self.layer.value = maps[-1]  # the newest map, ready for one click
        self._describe()

    def _describe(self, *args) -> None:
        from ..layers import density_from_layer
        from ..reconstruction import describe_preprocessing

        layer = self.layer.value
        if layer is None:
            self.plan.value = "Open a 3-D map to reconstruct."
            return
        self.plan.value = describe_preprocessing(density_from_layer(layer))

    def _checkpoint_paths(self) -> list[Path]:
        paths = [Path(self.checkpoint.value)]
        if self.compare_rq1.value and _chosen(self.rq1_checkpoint.value):
            paths.append(Path(self.rq1_checkpoint.value))
        for path in paths:
            if not _chosen(path) or not path.is_file():
                raise FileNotFoundError(
                    f"Checkpoint '{path}' does not exist. Choose a checkpoint file (.pt), or "
                    "untick the RQ1 comparison if you have no RQ1 checkpoint.")
        return paths

    def run(self) -> None:
        """Start a reconstruction of the chosen layer (the Reconstruct button)."""
        from napari.utils import progress
        from napari.utils.notifications import show_error

        layer = self.layer.value
        if layer is None:
            show_error("Choose a map layer to reconstruct.")
            return
        try:
            paths = self._checkpoint_paths()
        except FileNotFoundError as err:
            self.status.value = str(err)
            show_error(str(err))
            return
        from ..layers import density_from_layer

        density = density_from_layer(layer)
        device = self.device.value
        self._set_running(True)
        self.status.value = f"Reconstructing {layer.name}…"
        self._napari_progress = progress(total=len(paths) + 2, desc=f"Cryo-SWAN: {layer.name}")
        self.jobs.start(layer, lambda stage, stop: _compute(density, paths, device, stage, stop),
                        self._add_layers, self._on_error, self._on_dropped)

    def _on_stage(self, done: int, total: int, message: str) -> None:
        self.progress.max = total
        self.progress.value = done
        self.status.value = message
        bar = self._napari_progress  # may be closed by a result that arrives meanwhile
        if bar is not None:
            bar.update(done - bar.n)
            bar.set_description(f"Cryo-SWAN: {message}")

    def _add_layers(self, job, result) -> None:
        from ..layers import density_from_layer

        source = density_from_layer(job.layer)
        added = []
        for data, kwargs, kind in result_layer_data(job.layer, source, result):
            added.append(self.viewer.add_layer(_make_layer(data, kwargs, kind)))
        self.status.value = "Done: " + ", ".join(layer.name for layer in added)
        if not any(level.level == "RQ1" for level in result.levels):
            self.status.value += ". RQ1 alone: unavailable (no RQ1 ablation checkpoint chosen)."
        self._set_running(False)

    def _on_dropped(self, job, reason: str) -> None:
        from napari.utils.notifications import show_info

        self._set_running(False)
        self.status.value = f"Result dropped: {reason}."
        show_info(f"A result was dropped because {reason}.")

    def _on_error(self, job, error) -> None:
        from napari.utils.notifications import show_error

        from ..engine import Cancelled

        self._set_running(False)
        if isinstance(error, Cancelled):
            self.status.value = "Cancelled."
            return
        self.status.value = f"Failed: {error}"
        show_error(f"Reconstruction of '{job.layer.name}' failed: {error}")

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        if not running and self._napari_progress is not None:
            self._napari_progress.close()
            self._napari_progress = None


def _chosen(path) -> bool:
    """Whether a FileEdit names a file at all: an emptied one reads as '', '.' or a folder."""
    return str(path) not in ("", ".") and not Path(path).is_dir()


def _compute(density, paths, device_name, stage, should_stop):
    """The worker's job: load the checkpoints and reconstruct (runs off the UI thread)."""
    from ..checkpoint import CheckpointError, load_checkpoint
    from ..engine import choose_device
    from ..reconstruction import reconstruct_map

    device = choose_device(device_name)
    checkpoints = [load_checkpoint(path) for path in paths]
    if len(checkpoints) > 1 and checkpoints[1].model.name != "swan-rq1":
        raise CheckpointError(
            f"The RQ1 checkpoint {paths[1].name} holds a '{checkpoints[1].model.name}' model, not "
            "the RQ1-only Cryo-SWAN ablation ('swan-rq1'). Choose a swan-rq1 checkpoint, or untick "
            "the RQ1 comparison.")
    return reconstruct_map(density, checkpoints, device, stage=stage, should_stop=should_stop)


def result_layer_data(layer, source, result) -> list[tuple]:
    """LayerData for each reconstruction and the difference map of the first (full) model."""
    from ..io import DensityMap
    from ..layers import density_layer_data

    common = {"source_layer": layer.name, "preprocessing": result.record.to_dict(),
              "voxel_size": source.voxel_size, "origin": source.origin}
    contrast = tuple(float(v) for v in (source.data.min(), source.data.max()))
    out = []
    for level in result.levels:
        metadata = {**common, "level": level.level, "model": level.model,
                    "checkpoint": level.checkpoint, "checkpoint_id": level.checkpoint_id,
                    "fsc": level.fsc.to_dict(), "metrics": level.metrics}
        density = DensityMap(level.on_input_grid, source.voxel_size, source.origin)
        out.append(density_layer_data(density, f"{layer.name} {level.level}", metadata,
                                      contrast_limits=contrast))
    if result.levels:
        full = result.levels[0]
        difference = result.difference(full, source)
        bound = float(abs(difference).max()) or 1.0
        metadata = {**common, "level": f"{full.level} − input", "model": full.model,
                    "checkpoint": full.checkpoint, "checkpoint_id": full.checkpoint_id}
        density = DensityMap(difference, source.voxel_size, source.origin)
        out.append(density_layer_data(density, f"{layer.name} {full.level} − input", metadata,
                                      colormap="PiYG", contrast_limits=(-bound, bound),
                                      visible=False))
    return out


def _make_layer(data, kwargs, kind):
    from napari.layers import Layer

    return Layer.create(data, kwargs, kind)
