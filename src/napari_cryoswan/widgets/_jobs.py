"""Run one model job at a time off the UI thread, with progress, cancel and stale-result checks.

A job belongs to an input layer. When its result arrives, it is used only if it is still the
latest job and its input layer is still in the viewer with the same data; otherwise it is
dropped, as a result computed from something the user has since changed or removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qtpy.QtCore import QObject, Signal


class _StageRelay(QObject):
    """Carries (done, total, message) from the worker thread to the UI thread."""

    stage = Signal(int, int, str)


@dataclass
class Job:
    id: int
    layer: object
    data: object  # the layer's data object when the job started
    data_version: int


class LayerJobRunner:
    """Starts jobs for a widget and decides whether their results still apply."""

    def __init__(self, viewer, on_stage: Callable[[int, int, str], None]):
        self.viewer = viewer
        self._relay = _StageRelay()
        self._relay.stage.connect(on_stage)
        self._latest = 0
        self._versions: dict[int, int] = {}
        self._cancel_requested = False
        self.worker = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, layer, compute: Callable, on_result: Callable, on_error: Callable,
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
        job = Job(self._latest, layer, layer.data, self._versions[id(layer)])
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
        if job.layer.data is not job.data or self._versions.get(id(job.layer)) != job.data_version:
            return f"the data of its input layer '{job.layer.name}' changed"
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
        if id(layer) in self._versions:
            return
        self._versions[id(layer)] = 0

        def bump(event=None, key=id(layer)):
            self._versions[key] += 1

        layer.events.data.connect(bump)
