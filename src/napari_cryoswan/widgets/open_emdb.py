"""Dock widget: open an EMDB entry by its accession (EMD-1234, 1234 or emdb:1234).

It runs ``session.open_emdb_entry`` in a worker (download with progress and cancel, then the
plugin's reader), and adds the layer with the entry's facts in its metadata
(``recommended_contour`` among them). A download that was cancelled, or superseded by a newer
one, never adds a layer.
"""

from __future__ import annotations

from magicgui.widgets import Container, Label, LineEdit, ProgressBar, PushButton
from qtpy.QtCore import QObject, Signal

from ..session import open_emdb_entry


class _ProgressRelay(QObject):
    """Carries (job id, done bytes, total bytes) from the worker thread to the UI thread.

    ``object`` rather than ``int``: a Qt int is 32 bits, and maps can pass 2 GiB.
    """

    progress = Signal(object, object, object)


class OpenEmdbWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer):  # noqa: F821 (a string: napari injects by it)
        super().__init__(labels=True)
        self.viewer = viewer
        self.accession = LineEdit(label="accession", value="")
        self.accession.tooltip = "EMD-1234, 1234 or emdb:1234"
        self.open_button = PushButton(text="Open")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="download", value=0, max=1)
        self.status = Label(label="status", value="")
        self.extend([self.accession, self.open_button, self.cancel_button, self.progress,
                     self.status])
        self.status.native.setWordWrap(True)

        self._relay = _ProgressRelay()
        self._relay.progress.connect(self._on_progress)
        self._latest = 0
        self._job = 0  # the id of the download whose result is wanted; 0 when none is
        self._stopped: set[int] = set()
        self.worker = None
        self.open_button.clicked.connect(lambda: self.open())
        self.accession.native.returnPressed.connect(lambda: self.open())
        self.cancel_button.clicked.connect(self.cancel)
        self.native.destroyed.connect(self._forget)

    def open(self) -> None:
        """Start downloading the entry typed in the field (the Open button)."""
        from napari.utils.notifications import show_error
        from superqt.utils import create_worker

        from ..session import parse_accession

        try:
            accession = parse_accession(self.accession.value)
        except ValueError as err:
            self.status.value = str(err)
            show_error(str(err))
            return
        self.cancel()
        self._latest += 1
        self._job = job = self._latest
        self.accession.value = accession
        relay = self._relay.progress
        stopped = self._stopped
        # superqt's worker, not napari's: napari's reports every error, a cancellation included,
        # as an uncaught exception; here _on_error decides what the user sees.
        worker = create_worker(open_emdb_entry, accession,
                               lambda done, total: relay.emit(job, done, total),
                               lambda: job in stopped, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda value: self._on_result(job, value))
        worker.errored.connect(lambda err: self._on_error(job, accession, err))
        worker.finished.connect(lambda: self._finished(worker))
        self.worker = worker
        self._set_running(True)
        self.progress.value, self.progress.max = 0, 0  # busy until the size is known
        self.status.value = f"Asking EMDB for {accession}…"
        worker.start()

    def cancel(self) -> None:
        """Stop the current download; the widget is free at once, the worker ends on its own."""
        if not self._job:
            return
        self._stopped.add(self._job)
        self._job = 0
        self._set_running(False)
        self.status.value = "Cancelled."

    def _on_progress(self, job: int, done: int, total: int) -> None:
        if job != self._job:
            return
        if total:
            # a QProgressBar counts in 32-bit ints: show kiB
            self.progress.max = max(total // 1024, 1)
            self.progress.value = min(done // 1024, self.progress.max)
            self.status.value = f"Downloading {_mb(done)} of {_mb(total)}…"
        else:
            self.status.value = f"Downloading {_mb(done)}…"

    def _on_result(self, job: int, value) -> None:
        from napari.layers import Layer

        from .._reader import show_notices

        if job != self._job:
            return  # cancelled, or a newer download was started
        self._job = 0
        entry, layer_data, notices = value
        added = [self.viewer.add_layer(Layer.create(*data)) for data in layer_data]
        show_notices(notices)
        self._set_running(False)
        self.progress.max = self.progress.value = 1
        where = "from the cache" if entry.from_cache else "downloaded"
        self.status.value = f"Opened {entry.describe()} ({where}) as '{added[0].name}'."

    def _on_error(self, job: int, accession: str, error: Exception) -> None:
        from napari.utils.notifications import show_error

        from ..session import Cancelled

        if job != self._job or isinstance(error, Cancelled):
            return
        self._job = 0
        self._set_running(False)
        message = str(error) if accession in str(error) else f"{accession}: {error}"
        self.status.value = f"Failed: {message}"
        show_error(f"Could not open {message}")

    def _finished(self, worker) -> None:
        if self.worker is worker:
            self.worker = None

    def _set_running(self, running: bool) -> None:
        self.open_button.enabled = not running
        self.cancel_button.enabled = running

    def _forget(self, *args) -> None:
        """The dock was closed: stop the download and drop what it would bring."""
        self._stopped.add(self._job)
        self._job = 0


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"
