"""Sub-assemblies: connected, distinct subsets of touching chains."""

import numpy as np
import pytest

from napari_cryoswan.simulate import (
    CLASH_DISTANCE,
    POINT_GROUPS,
    Atoms,
    chain_contacts,
    chain_names,
    load_atoms,
    shape_signature,
    subassemblies,
    symmetric_assemblies,
)


def blob(centre, n=60, radius=3.0, seed=0):
    """A compact cloud of carbon atoms around ``centre`` (x, y, z)."""
    rng = np.random.default_rng(seed)
    return rng.normal(scale=radius / 2, size=(n, 3)) + np.asarray(centre, float)


def complex_of(blobs: dict[str, np.ndarray], name="toy") -> Atoms:
    xyz = np.vstack(list(blobs.values()))
    chain = np.concatenate([[c] * len(b) for c, b in blobs.items()])
    return Atoms(xyz, np.full(len(xyz), 6.0), chain, name)


@pytest.fixture
def chain_of_four_and_a_loner():
    """A–B–C–D touch their neighbours in a line (8 Å apart); E floats 100 Å away.

    Each blob has its own shape, so no two subsets are symmetry copies.
    """
    blobs = {c: blob((8.0 * i, 0, 0), n=50 + 10 * i, seed=i) for i, c in enumerate("ABCD")}
    blobs["E"] = blob((100.0, 0, 0), seed=9)
    return complex_of(blobs)


def is_connected(members, graph) -> bool:
    members = set(members)
    reached, frontier = set(), [next(iter(members))]
    while frontier:
        chain = frontier.pop()
        if chain not in reached:
            reached.add(chain)
            frontier += [c for c in graph[chain] if c in members]
    return reached == members


def test_contact_graph_links_only_touching_chains(chain_of_four_and_a_loner):
    graph = chain_contacts(chain_of_four_and_a_loner)
    assert graph == {"A": {"B"}, "B": {"A", "C"}, "C": {"B", "D"}, "D": {"C"}, "E": set()}


def test_subassemblies_are_connected_distinct_and_smaller_than_the_whole(chain_of_four_and_a_loner):
    atoms = chain_of_four_and_a_loner
    graph = chain_contacts(atoms)
    subs = subassemblies(atoms, max_count=50, max_chains=4)
    chain_sets = [frozenset(chain_names(s)) for s in subs]
    # Every connected set of 2..4 chains of the line A-B-C-D: AB BC CD ABC BCD ABCD.
    assert set(chain_sets) == {frozenset(s) for s in ("AB", "BC", "CD", "ABC", "BCD", "ABCD")}
    assert len(chain_sets) == len(set(chain_sets))
    assert all(is_connected(s, graph) for s in chain_sets)
    assert [s.name for s in subs] == [f"toy-sub{k:02d}" for k in range(len(subs))]
    for sub, members in zip(subs, chain_sets):
        assert len(sub.xyz) == sum((atoms.chain == c).sum() for c in members)


def test_subassemblies_respect_the_caps_and_the_seed(chain_of_four_and_a_loner):
    atoms = chain_of_four_and_a_loner
    capped = subassemblies(atoms, max_count=3, max_chains=2)
    assert len(capped) == 3 and all(len(chain_names(s)) == 2 for s in capped)
    again = subassemblies(atoms, max_count=3, max_chains=2)
    assert [chain_names(s) for s in capped] == [chain_names(s) for s in again]
    assert subassemblies(atoms, max_count=0) == []


def test_symmetry_copies_are_kept_once():
    # Four identical blobs on a ring (C4): the four neighbouring pairs have one shape, and so do
    # the four triples; opposite blobs do not touch.
    base = blob((0, 0, 0), seed=1)
    ring = {}
    for k, name in enumerate("ABCD"):
        angle = k * np.pi / 2
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        ring[name] = (base + [6.0, 0, 0]) @ rotation.T
    atoms = complex_of(ring, "ring")
    subs = subassemblies(atoms, max_count=20, max_chains=3)
    assert sorted(len(chain_names(s)) for s in subs) == [2, 3]
    signatures = [shape_signature(s) for s in subs]
    assert not np.allclose(signatures[0], signatures[1], rtol=0.05)


def test_a_single_chain_or_a_pair_has_no_subassemblies(data_dir):
    assert subassemblies(load_atoms(data_dir / "structures" / "1AKE.pdb.gz")) == []
    pair = complex_of({"A": blob((0, 0, 0)), "B": blob((6, 0, 0), seed=2)})
    assert subassemblies(pair) == []  # the only connected pair is the whole complex


def test_real_protein_dna_complex(data_dir):
    atoms = load_atoms(data_dir / "assemblies" / "3MHT.pdb.gz")  # protein A, DNA strands C and D
    subs = subassemblies(atoms)
    chain_sets = {frozenset(chain_names(s)) for s in subs}
    assert frozenset("CD") in chain_sets  # the two DNA strands pair
    assert len(chain_sets) == len(subs) >= 2
    assert all(s.mass_kda < atoms.mass_kda for s in subs)


# --- Symmetric assemblies -------------------------------------------------------------------------


def copies_of(assembly: Atoms) -> list[np.ndarray]:
    """The atoms of each copy: chains are renamed ``{chain}/{copy}``."""
    copy = np.array([name.rsplit("/", 1)[1] for name in assembly.chain]).astype(int)
    return [assembly.xyz[copy == k] for k in range(copy.max() + 1)]


@pytest.fixture(scope="module")
def subunit():
    return complex_of({"A": blob((5.0, -3.0, 2.0), n=200, radius=8.0)}, name="unit")


@pytest.fixture(scope="module")
def every_assembly(subunit):
    return symmetric_assemblies(subunit, count=50, seed=0, min_mass_kda=0.0, max_mass_kda=1e9,
                                filament_length=150.0)


def test_every_symmetry_is_built_once_with_the_group_s_number_of_copies(subunit, every_assembly):
    from scipy.spatial.transform import Rotation

    labels = [symmetry for _, symmetry in every_assembly]
    assert sorted(label for label in labels if not label.startswith("helix")) == sorted(POINT_GROUPS)
    assert sum(label.startswith("helix") for label in labels) == 1
    for assembly, symmetry in every_assembly:
        copies = len(copies_of(assembly))
        if not symmetry.startswith("helix"):
            assert copies == len(Rotation.create_group(symmetry))
        assert assembly.mass_kda == pytest.approx(copies * subunit.mass_kda)
        assert assembly.name.startswith("unit-sym")


def test_copies_touch_without_clashing(every_assembly):
    from scipy.spatial import cKDTree

    for assembly, symmetry in every_assembly:
        copies = copies_of(assembly)
        others = np.vstack(copies[1:])
        nearest = cKDTree(copies[0]).query(others, k=1)[0].min()
        # The smallest clash-free radius (and rise): the closest copy sits just past the limit.
        assert CLASH_DISTANCE <= nearest < CLASH_DISTANCE + 1.0, symmetry


def test_a_filament_spans_its_length_and_point_groups_stay_compact(subunit, every_assembly):
    size = np.ptp(subunit.xyz, axis=0).max()
    for assembly, symmetry in every_assembly:
        extent = np.ptp(assembly.xyz, axis=0)
        if symmetry.startswith("helix"):
            assert extent[2] >= 150.0 and extent[:2].max() < 6 * size
        else:  # rings and shells of the subunit, not scattered copies
            assert extent.max() < 12 * size


def test_assemblies_depend_on_the_seed_only_and_respect_the_mass_window(subunit):
    first = symmetric_assemblies(subunit, count=3, seed=1, min_mass_kda=0.0, max_mass_kda=1e9)
    again = symmetric_assemblies(subunit, count=3, seed=1, min_mass_kda=0.0, max_mass_kda=1e9)
    other = symmetric_assemblies(subunit, count=3, seed=2, min_mass_kda=0.0, max_mass_kda=1e9)
    assert [s for _, s in first] == [s for _, s in again]
    assert all(np.array_equal(a.xyz, b.xyz) for (a, _), (b, _) in zip(first, again))
    assert not all(np.array_equal(a.xyz, b.xyz) for (a, _), (b, _) in zip(first, other))
    heavy_only = symmetric_assemblies(subunit, count=50, min_mass_kda=40 * subunit.mass_kda,
                                      max_mass_kda=1e9)
    assert sorted(s for _, s in heavy_only if not s.startswith("helix")) == ["I"]
