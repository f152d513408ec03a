"""The wheel carries the manifest and data, and both packages import from any folder."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_holds_the_manifest_data_and_training(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("napari_cryoswan-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        manifest = archive.read("napari_cryoswan/napari.yaml").decode()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    # the symlink inside the package became a real copy of the top-level manifest
    assert manifest == (ROOT / "napari.yaml").read_text()
    assert "napari-cryoswan = napari_cryoswan:napari.yaml" in entry_points
    assert {"napari_cryoswan/data/4JSV.pdb.gz", "napari_cryoswan/data/emd_3197.map.gz",
            "napari_cryoswan/checkpoints/swan.pt", "napari_cryoswan/checkpoints/swan-rq1.pt",
            "training/__init__.py"} <= names


def test_both_packages_import_from_another_folder(tmp_path):
    code = "import napari_cryoswan, training; print(napari_cryoswan.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
