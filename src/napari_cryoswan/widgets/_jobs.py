"""What every model widget shares: a map, a checkpoint, a device, Run and Cancel, progress.

``LayerJobRunner`` runs one job at a time off the UI thread. A job belongs to an input layer
(by its napari ``unique_id``) and carries the map as it was when the job started. Its result is
used only if it is still the latest job and its input layer is still in the viewer with the same
data, voxel size and origin; otherwise it is dropped, with the reason shown.

``ModelJobWidget`` is the base of the model widgets: subclasses add their own fields and say
what runs in the worker (``compute``) and what the result becomes (``show``).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton
from qtpy.QtCore import QObject, Signal

from ..session import DEVICES, Session
from ._lifetime import DockConnections

ETA_AFTER_SECONDS = 2.0  # below this, an estimate of the time left is noise


class _StageRelay(QObject):
    """Carries (done, total, message) from the worker thread to the UI thread."""

    stage = Signal(int, int, str)


@dataclass
class Job:
    id: int
    layer: object
    density: object  # the DensityMap the job started from
    version: int  # of the layer's data and geometry when the job started


class LayerJobRunner:
    """Starts jobs for a widget and decides whether their results still apply."""

    def __init__(self, viewer, on_stage: Callable[[int, int, str], None]):
        self.viewer = viewer
        self._relay = _StageRelay()
        self._relay.stage.connect(on_stage)
        self._latest = 0
        self._versions: dict[str, int] = {}  # layer unique_id → changes of data or geometry
        self._cancel_requested = False
        self.worker = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    @property
    def cancelling(self) -> bool:
        return self.running and self._cancel_requested

    def start(self, layer, density, compute: Callable, on_result: Callable, on_error: Callable,
              on_dropped: Callable) -> Job:
        """Run ``compute(stage, should_stop)`` in a worker thread.

        Exactly one of these is called in the UI thread when it ends: ``on_result(job, value)``
        for a current result, ``on_dropped(job, reason)`` for a stale one, and
        ``on_error(job, exception)`` for failures and cancellations.
        """
        # superqt's worker, not napari's: napari's also reports every error (a cancellation
        # included) as an uncaught exception; here on_error decides what the user sees.
        from superqt.utils import create_worker

        self._watch(layer)
        self._latest += 1
        job = Job(self._latest, layer, density, self._versions[layer.unique_id])
        self._cancel_requested = False
        worker = create_worker(compute, self._relay.stage.emit, lambda: self._cancel_requested,
                               _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda value: self._deliver(job, value, on_result, on_dropped))
        worker.errored.connect(lambda err: on_error(job, err))
        worker.finished.connect(lambda: self._finished(worker))
        self.worker = worker
        worker.start()
        return job

    def cancel(self) -> None:
        self._cancel_requested = True

    def stale_reason(self, job: Job) -> str | None:
        """Why a job's result no longer applies, or None when it does."""
        if job.id != self._latest:
            return "a newer run was started"
        if job.layer not in self.viewer.layers:
            return f"its input layer '{job.layer.name}' was removed"
        if self._versions.get(job.layer.unique_id) != job.version:
            return (f"the data, voxel size or origin of its input layer '{job.layer.name}' "
                    "changed during the run")
        return None

    def _deliver(self, job: Job, value, on_result: Callable, on_dropped: Callable) -> None:
        reason = self.stale_reason(job)
        if reason is None:
            on_result(job, value)
        else:
            on_dropped(job, reason)

    def _finished(self, worker) -> None:
        if self.worker is worker:
            self.worker = None

    def _watch(self, layer) -> None:
        key = layer.unique_id
        if key in self._versions:
            return
        self._versions[key] = 0

        def bump(event=None):
            self._versions[key] += 1

        for event in (layer.events.data, layer.events.scale, layer.events.translate):
            event.connect(bump)


def density_layers(viewer) -> list:
    """The viewer's density maps: three-dimensional image layers that are not RGB pictures."""
    from napari.layers import Image

    return [layer for layer in viewer.layers if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb]


def typed_path(field: FileEdit) -> str:
    """The path as the user left it: an emptied field is '', not the working directory that
    ``FileEdit.value`` turns it into."""
    return field.line_edit.value.strip()


class ModelJobWidget(Container):
    """Map, voxel size (asked only when the map has none), checkpoint, device, Run, Cancel,
    progress and status. Subclasses implement ``compute`` and ``show`` and may add fields."""

    run_text = "Run"

    def __init__(self, viewer, *, checkpoint: str, extra: tuple = ()):
        super().__init__(labels=True)
        self.viewer = viewer
        self.session = Session.for_viewer(viewer)
        self.layer = ComboBox(label="map", choices=self._image_layers, nullable=True,
                              tooltip="The 3-D map layer to work on.")
        self.voxel_size = FloatSpinBox(
            label="voxel size (Å)", min=0.0, max=1000.0, step=0.01, value=0.0, visible=False,
            tooltip="This map has no voxel size. Enter it (Å per voxel, from its EMDB entry or "
                    "the software that made it); it becomes the layer's scale.")
        self.checkpoint = FileEdit(label="checkpoint", value=checkpoint, filter="*.pt",
                                   tooltip="A checkpoint (.pt) written by python -m training.train; "
                                           "it starts on the bundled one.")
        self.device = ComboBox(label="device", choices=DEVICES, value=self.session.device_name,
                               tooltip="auto: the GPU when PyTorch sees one, else the CPU.")
        self.plan = Label(label="preprocessing")
        self.concerns = Label(label="", visible=False)
        self.run_button = PushButton(text=self.run_text)
        self.cancel_button = PushButton(text="Cancel", enabled=False,
                                        tooltip="Stop after the current step.")
        self.progress = ProgressBar(label="progress", value=0, max=1)
        self.status = Label(label="status", value="")
        self.extend([self.layer, self.voxel_size, self.checkpoint, *extra, self.device, self.plan,
                     self.concerns, self.run_button, self.cancel_button, self.progress, self.status])
        for label in (self.plan, self.concerns, self.status):
            label.native.setWordWrap(True)

        self.jobs = LayerJobRunner(viewer, self._on_stage)
        self._started = 0.0
        self.layer.changed.connect(self.describe)
        self.layer.changed.connect(self._forget_last_run)
        self.checkpoint.changed.connect(self.describe)
        self.device.changed.connect(self._set_device)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.lifetime = DockConnections(self.native)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            self.lifetime.connect_event(event, self._refresh_layers)
        self._refresh_layers()

    @property
    def closed(self) -> bool:
        """Whether the dock was closed (the widget no longer listens to the viewer)."""
        return self.lifetime.closed

    # --- for subclasses ------------------------------------------------------------------

    # magicgui's Container is an ABC already: a subclass without these cannot be built.
    @abc.abstractmethod
    def compute(self, density) -> Callable:
        """What runs in the worker: a function of (stage, should_stop) returning a result."""

    @abc.abstractmethod
    def show(self, job: Job, result) -> str:
        """Turn a current result into layers (UI thread); returns the status line (the
        result's ``notes`` that the concerns above do not show are added to it)."""

    def contour_level(self) -> float | None:
        """The contour level to mask the map at before the model sees it (None: no mask)."""
        return None

    def describe(self, *args) -> None:
        """Say what will happen to the chosen map, before the run."""
        density = self.chosen_map()
        self.voxel_size.visible = density is not None and density.voxel_size is None
        if density is None:
            self.plan.value = "Open a 3-D map."
            self._show_concerns([])
            return
        text, concerns = self.plan_for(density)
        self.plan.value = text
        self._show_concerns(concerns)

    def plan_for(self, density) -> tuple[str, list[str]]:
        """(what the run will do to ``density``, why it may go badly), cheap enough for the UI
        thread; by default the checkpoint's preprocessing."""
        return self.session.describe_reconstruction(density, typed_path(self.checkpoint),
                                                    self.contour_level())

    # --- shared behaviour ----------------------------------------------------------------

    def chosen_map(self):
        from ..layers import density_from_layer

        layer = self.layer.value
        return None if layer is None else density_from_layer(layer)

    def run(self) -> None:
        """Start a job on the chosen map (the Run button)."""
        layer = self.layer.value
        if layer is None:
            return self._fail("Choose a map layer first.")
        if self.chosen_map().voxel_size is None:
            if not self.voxel_size.value > 0:
                return self._fail(f"'{layer.name}' has no voxel size: enter it (Å per voxel) in "
                                  "the voxel size field, then run again.")
            # The user's value becomes the layer's own, so every widget and a save agree.
            layer.scale = (self.voxel_size.value,) * 3
            layer.units = ("angstrom",) * 3
        density = self.chosen_map()
        self._set_running(True)
        self._started = time.perf_counter()
        self.status.value = f"Starting on {layer.name}…"
        self.jobs.start(layer, density, self.compute(density), self._on_result, self._on_error,
                        self._on_dropped)

    def cancel(self) -> None:
        if self.jobs.running:
            self.jobs.cancel()
            self.cancel_button.enabled = False
            self.status.value = "Cancelling… (stops after the current step)"

    def _on_stage(self, done: int, total: int, message: str) -> None:
        if self.jobs.cancelling:
            return
        self.progress.max = total
        self.progress.value = done
        elapsed = time.perf_counter() - self._started
        text = message[:1].upper() + message[1:] + "…"
        if 0 < done < total and elapsed > ETA_AFTER_SECONDS:
            text += f" about {elapsed * (total - done) / done:.0f} s left"
        self.status.value = text

    def _on_result(self, job: Job, result) -> None:
        from napari.utils.notifications import show_warning

        self._set_running(False)
        self.progress.value = self.progress.max
        notes = list(getattr(result, "notes", ()))
        # the concerns label already shows the chosen map's warnings: say only what it does not
        unshown = [n for n in notes if job.layer is not self.layer.value or n not in self.concerns.value]
        self.status.value = self.show(job, result) + "".join(f" ⚠ {n}" for n in unshown)
        for note in notes:
            show_warning(f"{job.layer.name}: {note}")

    def _on_dropped(self, job: Job, reason: str) -> None:
        from napari.utils.notifications import show_info

        self._set_running(False)
        self.progress.value = 0
        self.status.value = f"Result dropped: {reason}."
        show_info(f"A result was dropped because {reason}.")

    def _on_error(self, job: Job, error) -> None:
        from ..session import Cancelled

        self._set_running(False)
        self.progress.value = 0
        if isinstance(error, Cancelled):
            self.status.value = "Cancelled."
            return
        self._fail(f"{job.layer.name}: {error}")

    def _fail(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.value = message
        show_error(message)

    def _forget_last_run(self, *args) -> None:
        """Another map chosen: the last run's status and progress no longer describe it."""
        if not self.jobs.running:
            self.status.value = ""
            self.progress.value = 0

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running

    def _set_device(self, name: str) -> None:
        self.session.device_name = name

    def _show_concerns(self, concerns: list[str]) -> None:
        self.concerns.value = "\n".join(f"⚠ {c}" for c in concerns)
        self.concerns.visible = bool(concerns)

    def _image_layers(self, widget=None) -> list:
        return density_layers(self.viewer)

    def _refresh_layers(self, event=None) -> None:
        self.layer.reset_choices()
        maps = [choice for choice in self.layer.choices if choice is not None]
        if self.layer.value is None and maps:
            self.layer.value = maps[-1]  # the newest map, ready for one click
        self.describe()
