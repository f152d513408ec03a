"""``python -m napari_cryoswan [maps or EMDB accessions...]``: napari with the plugin's widgets
docked, a sample map in 3-D, and the bundled Cryo-SWAN checkpoints selected, ready to reconstruct.

Arguments are map files (.mrc, .map, .ccp4, optionally .gz) or EMDB accessions (EMD-1234, 1234,
emdb:1234), in any mix. Entries are downloaded before the window opens (the terminal shows the
progress) and cached. An argument that cannot be opened costs only its own layer: the window
opens anyway, with a notification that says why."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger("napari_cryoswan")

WIDGETS = ("Reconstruct (Cryo-SWAN)", "FSC plot", "Open EMDB entry", "Latent explorer")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m napari_cryoswan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("maps", nargs="*", metavar="MAP_OR_ACCESSION",
                        help="MRC/CCP4 maps to open (.mrc, .map, .ccp4, .gz), or EMDB accessions")
    parser.add_argument("--sample", default="simulated_4jsv", choices=["simulated_4jsv", "emd_3197", "none"],
                        help="bundled sample to open (default: %(default)s)")
    args = parser.parse_args(argv)

    fetched = fetch_entries(args.maps)

    import napari

    viewer = napari.Viewer(title="napari-cryoswan")
    open_into(viewer, args.maps, sample=args.sample, fetched=fetched)
    napari.run()


def accession_of(argument: str) -> str | None:
    """The EMDB accession an argument names, or None for a file (an existing file wins)."""
    from pathlib import Path

    from .emdb import accession_or_none

    return None if Path(argument).exists() else accession_or_none(argument)


def fetch_entries(arguments, show_progress: bool = True) -> dict:
    """Download the EMDB entries among the arguments, with a progress bar on the terminal.

    Returns accession → ``emdb.EmdbMap``, or the exception that stopped that entry.
    """
    from tqdm.auto import tqdm

    from .emdb import fetch_entry

    results = {}
    for accession in dict.fromkeys(filter(None, map(accession_of, arguments))):
        with tqdm(desc=accession, unit="B", unit_scale=True, leave=False,
                  disable=not show_progress) as bar:
            def progress(done, total, bar=bar):
                bar.total = total or None
                bar.update(done - bar.n)

            try:
                results[accession] = fetch_entry(accession, progress=progress)
            except Exception as err:  # one entry's failure is reported when the window opens
                results[accession] = err
    return results


def open_into(viewer, arguments=(), *, sample: str = "simulated_4jsv",
              fetched: dict | None = None) -> list[str]:
    """Open the sample and each map or EMDB entry, show them in 3-D and dock the widgets.

    ``fetched`` holds entries ``fetch_entries`` already downloaded; others are fetched here. An
    argument that fails costs only its own layer: its reason becomes an error notification (and
    a log line), and the rest still opens. Returns the failures' messages.
    """
    from napari.utils.notifications import show_error

    failures = []

    def fail(argument: str, error: Exception) -> None:
        reason = str(error) or type(error).__name__
        message = (f"Could not open {reason}" if reason.startswith(f"{argument}:")
                   else f"Could not open {argument}: {reason}")
        logger.error(message)
        show_error(message)
        failures.append(message)

    if sample != "none":
        try:
            viewer.open_sample("napari-cryoswan", sample)
        except Exception as err:
            fail(f"the sample '{sample}'", err)
    fetched = dict(fetched or {})
    for argument in map(str, arguments):
        label = argument
        try:
            accession = accession_of(argument)
            if accession:
                label = accession
                _open_entry(viewer, fetched.get(accession) or accession)
            else:
                _open_map(viewer, argument)
        except Exception as err:
            fail(label, err)
    viewer.dims.ndisplay = 3
    for widget in WIDGETS:
        viewer.window.add_plugin_dock_widget("napari-cryoswan", widget)
    return failures


def _open_map(viewer, path: str) -> None:
    from pathlib import Path

    from .io import is_map_path

    if not Path(path).exists():
        raise FileNotFoundError("no such file.")
    if not is_map_path(path):
        raise ValueError("not a map file name (.mrc, .map, .ccp4, optionally .gz), nor an EMDB "
                         "accession (EMD-1234).")
    viewer.open(path, plugin="napari-cryoswan")


def _open_entry(viewer, entry) -> None:
    """Add an entry's map as a layer; ``entry`` is an ``EmdbMap``, an accession or an error."""
    from napari.layers import Layer

    from ._reader import read_density_layers_quietly, show_notices
    from .session import open_emdb_entry

    if isinstance(entry, Exception):
        raise entry
    if isinstance(entry, str):
        entry, layer_data, notices = open_emdb_entry(entry)
    else:
        layer_data, notices = read_density_layers_quietly(entry.path, entry.layer_metadata())
    for data in layer_data:
        viewer.add_layer(Layer.create(*data))
    show_notices(notices)


if __name__ == "__main__":
    main()
