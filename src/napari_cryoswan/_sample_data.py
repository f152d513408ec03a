"""napari sample data: a density simulated from a real structure, and a real EMDB map."""

from __future__ import annotations

from importlib.resources import as_file, files

from .layers import density_layer_data

SAMPLE_STRUCTURE = "4JSV.pdb.gz"  # mTOR kinase–mLST8, 294 kDa (PDB 4JSV)
SAMPLE_MAP = "emd_3197.map.gz"  # EMD-3197, a subtomogram average at 11.4 Å/voxel


def simulated_4jsv():
    """mTOR–mLST8 (PDB 4JSV) simulated at 8 Å resolution on a 64³ grid at 4 Å/voxel."""
    from .simulate import load_atoms, simulate_density

    with as_file(files(__package__) / "data" / SAMPLE_STRUCTURE) as path:
        atoms = load_atoms(path)
    density = simulate_density(atoms, voxel_size=4.0, resolution=8.0, box=64)
    # A short name, so result names stay readable in the layer list; the rest goes in metadata.
    return [density_layer_data(density, "4JSV sim", {
        "description": "mTOR–mLST8 (PDB 4JSV) simulated at 8 Å resolution, 4 Å/voxel"})]


def emd_3197():
    """EMD-3197, the real map as deposited."""
    from .io import read_map

    with as_file(files(__package__) / "data" / SAMPLE_MAP) as path:
        density = read_map(path)
    return [density_layer_data(density, "EMD-3197", {"source_path": f"bundled sample {SAMPLE_MAP}"})]
