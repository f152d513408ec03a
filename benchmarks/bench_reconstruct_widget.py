"""Time one click on Reconstruct, end to end, in a real napari viewer (run under Xvfb).

A click counts from the button until its layers are in the viewer, and until the queued paint
events that draw them have run, in 3-D as the main command shows them (under Xvfb the paint is
Mesa's software OpenGL, which a GPU does in milliseconds). The first click of a session includes
reading the checkpoints (the widget starts reading them when it opens; the click may come before
that ends); later clicks reuse them. The FSC plot is docked as in the main command, so its redraw counts.

    xvfb-run -a python benchmarks/bench_reconstruct_widget.py --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

from _machine import cpu_name


def click_and_wait(viewer, widget, app, timeout: float = 120.0) -> tuple[float, float]:
    """(seconds until the layers are in the viewer, seconds until they are painted)."""
    n_layers = len(viewer.layers)
    tic = time.perf_counter()
    widget.run_button.clicked.emit()
    while widget.jobs.running or len(viewer.layers) == n_layers:
        app.processEvents()
        time.sleep(0.005)
        if time.perf_counter() - tic > timeout:
            raise TimeoutError(widget.status.value)
    added = time.perf_counter() - tic
    for _ in range(3):  # the queued paint events that draw the new layers
        app.processEvents()
    return added, time.perf_counter() - tic


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="repeated clicks after the first")
    parser.add_argument("--sample", default="simulated_4jsv", choices=["simulated_4jsv", "emd_3197"])
    args = parser.parse_args(argv)

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    tic = time.perf_counter()
    viewer = napari.Viewer(show=True)
    viewer.open_sample("napari-cryoswan", args.sample)
    viewer.dims.ndisplay = 3
    _, widget = viewer.window.add_plugin_dock_widget("napari-cryoswan", "Reconstruct (Cryo-SWAN)")
    viewer.window.add_plugin_dock_widget("napari-cryoswan", "FSC plot")
    app = QApplication.instance()
    app.processEvents()
    startup = time.perf_counter() - tic

    first = click_and_wait(viewer, widget, app)
    repeated = []
    for _ in range(args.repeats):
        # Results accumulate, as they do for a user: removing several layers at once and adding
        # new ones crashes Mesa's software OpenGL under Xvfb (napari alone, without this plugin).
        widget.layer.value = viewer.layers[0]
        repeated.append(click_and_wait(viewer, widget, app))
    assert widget.status.value.startswith("Done"), widget.status.value

    print(f"# Reconstruct widget, one click ({datetime.date.today()})\n")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; "
          f"{platform.platform()}; python {platform.python_version()}, torch {torch.__version__}, "
          f"napari {napari.__version__}; load average {os.getloadavg()[0]:.2f}")
    print(f"sample: {args.sample}; checkpoints: bundled swan + swan-rq1; device: "
          f"{widget.device.value}; 3-D view, FSC plot docked\n")
    added, painted = zip(*repeated)
    print("| what | layers in the viewer (s) | and painted (s) |\n|---|---|---|")
    print(f"| viewer, sample and docks open | {startup:.2f} | |")
    print(f"| first click (checkpoints read meanwhile) | {first[0]:.2f} | {first[1]:.2f} |")
    print(f"| repeated click, median of {len(repeated)} | {statistics.median(added):.2f} | "
          f"{statistics.median(painted):.2f} |")
    print(f"| repeated click, slowest | {max(added):.2f} | {max(painted):.2f} |")
    viewer.close()


if __name__ == "__main__":
    main()
