"""The wheel carries the manifest and every data file, and both packages work from it."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = {"napari_cryoswan": ROOT / "src" / "napari_cryoswan", "training": ROOT / "training"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a clean copy of the sources, as from a fresh clone: a checkout's own
    build/ and *.egg-info (left by earlier builds) can carry files the configuration omits."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE", "napari.yaml"):
        shutil.copy2(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("src", "training"):
        shutil.copytree(ROOT / folder, source / folder, symlinks=True, ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(source)],
        check=True, capture_output=True,
    )
    (built,) = out.glob("napari_cryoswan-*.whl")
    return built


def test_wheel_holds_the_manifest_data_and_training(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        manifest = archive.read("napari_cryoswan/napari.yaml").decode()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    # the symlink inside the package became a real copy of the top-level manifest
    assert manifest == (ROOT / "napari.yaml").read_text()
    assert "napari-cryoswan = napari_cryoswan:napari.yaml" in entry_points
    assert {"napari_cryoswan/data/4JSV.pdb.gz", "napari_cryoswan/data/emd_3197.map.gz",
            "napari_cryoswan/checkpoints/swan.pt", "napari_cryoswan/checkpoints/swan-rq1.pt",
            "napari_cryoswan/checkpoints/swan.embedding.pt", "napari_cryoswan/data/index/manifest.json",
            "napari_cryoswan/data/index/shards/00000.codes.npy", "napari_cryoswan/data/index/projection/meta.json",
            "training/__init__.py", "training/recipes/default_corpus.sha256"} <= names


def test_wheel_holds_every_file_of_both_packages(wheel):
    """Each non-Python file in the packages' folders is read at run time by something."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    expected = set()
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*"):
            relative = path.relative_to(folder)
            if path.is_file() and "__pycache__" not in relative.parts and path.suffix != ".pyc" \
                    and not path.name.startswith("."):
                expected.add(f"{package}/{relative.as_posix()}")
    assert expected - names == set()


def test_recipe_finds_its_lock_file_when_installed_from_the_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the checkout's editable install
    code = "import training.recipes.default_corpus as r; print(r.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))
    run = subprocess.run([sys.executable, "-m", "training.recipes.default_corpus", str(tmp_path / "no-data")],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    # it read its list of inputs, and says which are missing here (not a FileNotFoundError)
    assert run.returncode == 1
    assert "is not the data this recipe was written for" in run.stderr, run.stderr
    assert "missing: structures/" in run.stderr
    assert "FileNotFoundError" not in run.stderr


def test_both_packages_import_from_another_folder(tmp_path):
    code = "import napari_cryoswan, training; print(napari_cryoswan.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
