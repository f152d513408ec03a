from pathlib import Path

import mrcfile
import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Three real structures, simulated, three rotations each: one entry per split."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("corpus") / "tiny"
    subprocess.run([sys.executable, "-m", "training.build_corpus", "--out", str(out),
                    "--structures", str(DATA / "structures"), "--rotations", "3",
                    "--split", "0.34", "0.33", "0.33", "--quiet"], check=True)
    return out


def write_raw_mrc(path, data_file_order, *, voxel_xyz=(2.0, 2.0, 2.0), axis_order=(1, 2, 3),
                  origin_xyz=(0.0, 0.0, 0.0), start_crs=(0, 0, 0), space_group=1, compression=None):
    """Write an MRC file exactly as given (file order: sections, rows, columns), bypassing io.py."""
    with mrcfile.new(path, overwrite=True, compression=compression) as mrc:
        mrc.set_data(data_file_order)
        h = mrc.header
        h.mapc, h.mapr, h.maps = axis_order
        # mx/my/mz and the cell are per physical axis x, y, z
        size_crs = (h.nx, h.ny, h.nz)
        size_xyz = [0, 0, 0]
        for n, axis in zip(size_crs, axis_order):
            size_xyz[axis - 1] = int(n)
        h.mx, h.my, h.mz = size_xyz
        h.cella = tuple(float(n * v) for n, v in zip(size_xyz, voxel_xyz))
        h.origin = origin_xyz
        h.nxstart, h.nystart, h.nzstart = start_crs
        h.ispg = space_group
    return Path(path)


@pytest.fixture
def raw_mrc():
    return write_raw_mrc


@pytest.fixture(scope="session")
def small_checkpoints(tmp_path_factory):
    """Untrained small Cryo-SWAN (RQ1+RQ2) and RQ1-only checkpoints, seeded."""
    import torch

    from napari_cryoswan.checkpoint import save_checkpoint
    from napari_cryoswan.models.registry import build_model

    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name in ("swan", "swan-rq1"):
        torch.manual_seed(0)
        paths[name] = save_checkpoint(folder / f"{name}.pt", build_model(name, preset="small"),
                                      {"note": "untrained test model"})
    return paths


@pytest.fixture(scope="module")
def swan(small_checkpoints):
    """The small Cryo-SWAN checkpoint, loaded once per test module."""
    from napari_cryoswan.checkpoint import load_checkpoint

    return load_checkpoint(small_checkpoints["swan"])


DIFFUSION_STEPS = 4  # a tiny latent diffusion model trains this many steps in the tests


def diffusion_train_args(autoencoder, corpus, out, steps=DIFFUSION_STEPS, *extra):
    return ["--autoencoder", str(autoencoder), "--corpus", str(corpus), "--out", str(out),
            "--preset", "small", "--steps", str(steps), "--batch-size", "2", "--val-every", "2",
            "--checkpoint-every", "2", "--device", "cpu", *extra]


@pytest.fixture(scope="session")
def diffusion_run(small_checkpoints, tiny_corpus, tmp_path_factory):
    """A run folder of a tiny diffusion model trained on the small Cryo-SWAN's latents."""
    from training.train_diffusion import main

    out = tmp_path_factory.mktemp("diffusion") / "run"
    assert main(diffusion_train_args(small_checkpoints["swan"], tiny_corpus, out)) == 0
    return out


def blob_map(shape=(40, 50, 36), voxel=(2.5, 2.5, 2.5), origin=(10.0, -20.0, 5.0)):
    """A non-cubic test map: two Gaussian blobs of different size, off-centre."""
    from napari_cryoswan.io import DensityMap

    grid = np.indices(shape).astype(np.float32)
    centre = np.array(shape)[:, None, None, None] / 2
    blob = np.exp(-((grid - centre - 3) ** 2).sum(0) / 30.0)
    blob += 0.5 * np.exp(-((grid - centre + 6) ** 2).sum(0) / 12.0)
    return DensityMap(blob.astype(np.float32), voxel, origin)


@pytest.fixture
def make_blob_map():
    return blob_map


def filament_box(turn, *, zigzag: float = 5.0, box: int = 64) -> np.ndarray:
    """A filament three boxes long through the centre of a ``box``³ box, turned by the 3×3
    ``turn`` before the box cuts it: a zigzag of Gaussian beads (amplitude ``zigzag`` voxels)
    whose weights vary along it. Turned copies hold other density in the box's corners."""
    grid = np.indices((box,) * 3, dtype=float) - (box - 1) / 2
    out = np.zeros((box,) * 3)
    for k, t in enumerate(np.arange(-96.0, 97.0, 6.0)):
        centre = np.asarray(turn) @ np.array([t, zigzag * (-1) ** k, 0.0])
        weight = 1 + 0.4 * np.sin(0.13 * t + 0.5)
        out += weight * np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * 2.5**2))
    return out


@pytest.fixture(scope="session")
def filament_copies():
    """(a filament along z, the same turned onto the box's diagonal, another zigzag along z)."""
    from scipy.spatial.transform import Rotation

    onto_diagonal = Rotation.align_vectors([[1, 1, 1]], [[1, 0, 0]])[0].as_matrix()
    return filament_box(np.eye(3)), filament_box(onto_diagonal), filament_box(np.eye(3), zigzag=3.0)


@pytest.fixture
def fake_emdb_env(tmp_path, monkeypatch):
    """A local EMDB (see test_emdb.py) that the plugin finds through its environment variables."""
    from test_emdb import FakeEmdb

    (tmp_path / "served").mkdir()
    server = FakeEmdb(tmp_path / "served", {"EMD-1001": dict(method="singleParticle", mass=0.5)})
    monkeypatch.setenv("NAPARI_CRYOSWAN_EMDB_API", f"{server.url}/api")
    monkeypatch.setenv("NAPARI_CRYOSWAN_EMDB_FILES", f"{server.url}/files")
    monkeypatch.setenv("NAPARI_CRYOSWAN_CACHE", str(tmp_path / "cache"))
    yield server
    server.close()


@pytest.fixture
def viewer_with_reconstruct(make_napari_viewer, small_checkpoints):
    """A viewer with the Reconstruct widget docked, on the small test checkpoints and the CPU."""
    from napari_cryoswan.widgets.reconstruct import ReconstructWidget

    viewer = make_napari_viewer()
    widget = ReconstructWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.checkpoint.value = str(small_checkpoints["swan"])
    widget.rq1_checkpoint.value = str(small_checkpoints["swan-rq1"])
    widget.compare_rq1.value = True
    widget.device.value = "cpu"
    return viewer, widget
