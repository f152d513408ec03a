"""``python -m napari_cryoswan [maps...]``: napari with the plugin's widgets docked, a sample
map in 3-D, and the bundled Cryo-SWAN checkpoints selected, ready to reconstruct."""

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m napari_cryoswan", description=__doc__)
    parser.add_argument("maps", nargs="*", help="MRC/CCP4 maps to open (.mrc, .map, .ccp4, .gz)")
    parser.add_argument("--sample", default="simulated_4jsv", choices=["simulated_4jsv", "emd_3197", "none"],
                        help="bundled sample to open (default: %(default)s)")
    args = parser.parse_args(argv)

    import napari

    viewer = napari.Viewer(title="napari-cryoswan")
    if args.sample != "none":
        viewer.open_sample("napari-cryoswan", args.sample)
    for path in args.maps:
        viewer.open(path, plugin="napari-cryoswan")
    viewer.dims.ndisplay = 3
    for widget in ("Reconstruct (Cryo-SWAN)", "FSC plot"):
        viewer.window.add_plugin_dock_widget("napari-cryoswan", widget)
    napari.run()


if __name__ == "__main__":
    main()
