"""Densities simulated from atomic models."""

import numpy as np
import pytest

from napari_cryoswan.preprocess import centre_of_mass
from napari_cryoswan.simulate import SIGMA_PER_RESOLUTION, Atoms, load_atoms, simulate_density

TINY_PDB = """\
ATOM      1  N   ALA A   1      10.000  10.000  10.000  1.00  0.00           N
ATOM      2  CA  ALA A   1      11.000  10.000  10.000  1.00  0.00           C
ATOM      3  H   ALA A   1      10.500  10.500  10.000  1.00  0.00           H
HETATM    4  O   HOH A 101      20.000  20.000  20.000  1.00  0.00           O
HETATM    5  DUM DUM A 201      30.000  30.000  30.000  1.00  0.00           N
ATOM      6  CA  GLY B   1      14.000  12.000  10.000  1.00  0.00           C
END
"""


def test_waters_hydrogens_and_pseudo_atoms_are_dropped(tmp_path):
    path = tmp_path / "tiny.pdb"
    path.write_text(TINY_PDB)
    atoms = load_atoms(path)
    assert sorted(atoms.atomic_number.tolist()) == [6, 6, 7]
    assert sorted(set(atoms.chain.tolist())) == ["A", "B"]


def test_atoms_blur_to_the_requested_resolution():
    # The density's variance about its centre is the atoms' own spread plus σ² of the blur
    # (the trilinear spreading adds voxel²/6 on average over atom positions; that is taken off).
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-3, 3, size=(400, 3)) + np.array([5.0, -7.0, 2.0])
    atoms = Atoms(xyz, np.full(400, 6.0), np.full(400, "A"), "cloud")
    density = simulate_density(atoms, voxel_size=1.0, resolution=8.0, box=48)
    d = density.data / density.data.sum()
    grid_zyx = np.indices(d.shape) + np.asarray(density.origin)[:, None, None, None]
    mean = [(d * g).sum() for g in grid_zyx]
    variance = np.array([(d * (g - m) ** 2).sum() for g, m in zip(grid_zyx, mean)])
    expected = xyz[:, ::-1].var(axis=0) + (8.0 * SIGMA_PER_RESOLUTION) ** 2
    np.testing.assert_allclose(variance, expected, rtol=0.03)
    np.testing.assert_allclose(mean, xyz[:, ::-1].mean(axis=0), atol=0.02)


def test_real_structure_mass_is_conserved_and_centred(data_dir):
    atoms = load_atoms(data_dir / "structures" / "1AKE.pdb.gz")
    assert 1500 < len(atoms.xyz) < 1700  # 1661 records less waters
    density = simulate_density(atoms, voxel_size=4.0, resolution=8.0)
    assert density.voxel_size == (4.0, 4.0, 4.0)
    assert density.data.sum() == pytest.approx(atoms.atomic_number.sum(), rel=1e-3)
    np.testing.assert_allclose(centre_of_mass(density.data), (np.array(density.shape) - 1) / 2, atol=0.6)


def test_not_a_structure_is_refused(tmp_path):
    path = tmp_path / "bad.pdb"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="bad.pdb"):
        load_atoms(path)
