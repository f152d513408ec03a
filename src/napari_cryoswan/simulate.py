"""Simulate a density map from an atomic model (PDB or mmCIF, optionally gzipped).

The recipe, like ChimeraX's ``molmap``: drop waters, hydrogens and membrane pseudo-atoms,
weight each atom by its atomic number, and blur with a Gaussian of standard deviation
``resolution / (π·√2)`` (≈ 0.225 × resolution). Atoms are spread onto the grid trilinearly; the
tent kernel that this adds has a variance of voxel²/6 per axis, which the Gaussian subtracts so
the total blur is the one asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .io import DensityMap

SIGMA_PER_RESOLUTION = 1.0 / (np.pi * np.sqrt(2.0))
# OPM membrane pseudo-atoms and other non-atoms that some files carry.
PSEUDO_ATOM_RESIDUES = {"DUM"}


@dataclass(frozen=True)
class Atoms:
    """Atom positions in Å as (N, 3) x, y, z, with atomic numbers and chain names."""

    xyz: np.ndarray
    atomic_number: np.ndarray
    chain: np.ndarray
    name: str

    def subset(self, mask: np.ndarray, name: str | None = None) -> Atoms:
        return Atoms(self.xyz[mask], self.atomic_number[mask], self.chain[mask], name or self.name)

    @property
    def mass_kda(self) -> float:
        """Approximate mass from atomic numbers (≈ 2 Da per proton+neutron pair; H omitted)."""
        return float(self.atomic_number.sum() * 2.0 / 1000.0)


def load_atoms(path: str | os.PathLike) -> Atoms:
    """Read the first model of a structure, without waters, hydrogens or pseudo-atoms."""
    import gemmi

    path = Path(path)
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable PDB/mmCIF structure ({err}).") from err
    structure.remove_waters()
    structure.remove_hydrogens()
    xyz, number, chain = [], [], []
    for ch in structure[0]:
        for residue in ch:
            if residue.name in PSEUDO_ATOM_RESIDUES:
                continue
            for atom in residue:
                xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                number.append(atom.element.atomic_number)
                chain.append(ch.name)
    if not xyz:
        raise ValueError(f"{path}: the structure holds no atoms after removing waters and H.")
    stem = path.name.split(".")[0]
    return Atoms(np.asarray(xyz, float), np.asarray(number, float), np.asarray(chain), stem)


def simulate_density(
    atoms: Atoms,
    voxel_size: float = 4.0,
    resolution: float = 8.0,
    box: int | None = None,
) -> DensityMap:
    """Blur atoms into a cubic density map.

    Args:
        atoms: from ``load_atoms``.
        voxel_size: Å per voxel.
        resolution: Å; the Gaussian σ is ``resolution / (π·√2)``.
        box: edge in voxels, centred on the atoms' centre of mass. None: just big enough to hold
            the atoms and three σ of blur around them.
    Returns:
        A ``DensityMap`` whose origin places it over the atomic model.
    """
    sigma = resolution * SIGMA_PER_RESOLUTION
    centre_xyz = np.average(atoms.xyz, axis=0, weights=atoms.atomic_number)
    if box is None:
        half_extent = np.abs(atoms.xyz - centre_xyz).max() + 3 * sigma
        box = int(np.ceil(2 * half_extent / voxel_size)) + 2
    # Voxel i sits at origin + i·voxel_size; the box centre is the centre of mass.
    origin_xyz = centre_xyz - (box - 1) / 2 * voxel_size
    grid_xyz = (atoms.xyz - origin_xyz) / voxel_size
    density = _splat_trilinear(grid_xyz[:, ::-1], atoms.atomic_number, box)

    from scipy.ndimage import gaussian_filter

    blur_var = (sigma / voxel_size) ** 2 - 1.0 / 6.0  # minus the trilinear kernel's variance
    if blur_var > 0:
        density = gaussian_filter(density, np.sqrt(blur_var), mode="constant")
    header = {
        "source": "simulated",
        "structure": atoms.name,
        "resolution": resolution,
        "n_atoms": int(len(atoms.xyz)),
        "mass_kda": round(atoms.mass_kda, 1),
    }
    return DensityMap(
        data=density.astype(np.float32),
        voxel_size=(voxel_size,) * 3,
        origin=tuple(float(o) for o in origin_xyz[::-1]),
        header=header,
    )


def _splat_trilinear(points_zyx: np.ndarray, weights: np.ndarray, box: int) -> np.ndarray:
    """Spread each weighted point onto its 8 neighbouring voxels; points outside are dropped."""
    density = np.zeros((box,) * 3, dtype=np.float64)
    base = np.floor(points_zyx).astype(int)
    frac = points_zyx - base
    for corner in np.ndindex(2, 2, 2):
        offset = np.array(corner)
        index = base + offset
        w = weights * np.prod(np.where(offset, frac, 1 - frac), axis=1)
        inside = np.all((index >= 0) & (index < box), axis=1)
        np.add.at(density, tuple(index[inside].T), w[inside])
    return density


# --- Sub-assemblies: one complex, many distinct shapes -----------------------------------------

CONTACT_DISTANCE = 4.5  # Å between any two atoms of two chains: a contact, as in interface tools
# Two subsets whose mass and principal radii agree this closely are symmetry copies.
SAME_SHAPE_TOLERANCE = 0.05


def chain_contacts(atoms: Atoms, cutoff: float = CONTACT_DISTANCE) -> dict[str, set[str]]:
    """The chain contact graph: each chain name maps to the chains that have an atom within
    ``cutoff`` Å of one of its atoms."""
    from scipy.spatial import cKDTree

    names = chain_names(atoms)
    xyz = {name: atoms.xyz[atoms.chain == name] for name in names}
    trees = {name: cKDTree(xyz[name]) for name in names}
    lo = {name: xyz[name].min(axis=0) - cutoff for name in names}
    hi = {name: xyz[name].max(axis=0) + cutoff for name in names}
    graph: dict[str, set[str]] = {name: set() for name in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if np.any(lo[a] > hi[b]) or np.any(lo[b] > hi[a]):
                continue  # the boxes do not overlap: no contact possible
            distance, _ = trees[b].query(xyz[a], k=1, distance_upper_bound=cutoff)
            if np.isfinite(distance).any():
                graph[a].add(b)
                graph[b].add(a)
    return graph


def subassemblies(
    atoms: Atoms,
    max_count: int = 20,
    max_chains: int = 6,
    min_chains: int = 2,
    cutoff: float = CONTACT_DISTANCE,
    seed: int = 0,
) -> list[Atoms]:
    """Distinct sub-assemblies of a complex: connected sets of ``min_chains``…``max_chains``
    chains in the contact graph, smaller than the whole complex.

    Sets are grown from a random chain by adding random touching chains, so large complexes
    give a varied sample instead of every set that contains the first chain. A set is kept
    when it is new and its shape is not a symmetry copy of one already kept (same mass and
    principal radii within 5 %). The result depends only on the structure and ``seed``.

    Returns up to ``max_count`` ``Atoms``, named ``{name}-sub{k:02d}``, in the order found.
    """
    graph = chain_contacts(atoms, cutoff)
    largest = min(max_chains, len(graph) - 1)
    growable = sorted(name for name, touching in graph.items() if touching)
    if largest < min_chains or not growable or max_count <= 0:
        return []
    rng = np.random.default_rng([seed, *atoms.name.encode()])
    kept: list[Atoms] = []
    seen: set[frozenset[str]] = set()
    signatures: list[np.ndarray] = []
    for _ in range(50 * max_count):  # bounded: small complexes run out of new sets
        if len(kept) == max_count:
            break
        members = _grow_connected(graph, rng.choice(growable), rng.integers(min_chains, largest + 1), rng)
        if len(members) < min_chains or members in seen:
            continue
        seen.add(members)
        sub = atoms.subset(np.isin(atoms.chain, sorted(members)), f"{atoms.name}-sub{len(kept):02d}")
        signature = shape_signature(sub)
        if any(np.allclose(signature, s, rtol=SAME_SHAPE_TOLERANCE) for s in signatures):
            continue
        signatures.append(signature)
        kept.append(sub)
    return kept


def shape_signature(atoms: Atoms) -> np.ndarray:
    """Rotation-invariant shape summary: total weight and the three principal radii of gyration."""
    weights = atoms.atomic_number
    centred = atoms.xyz - np.average(atoms.xyz, axis=0, weights=weights)
    gyration = (centred * weights[:, None]).T @ centred / weights.sum()
    radii = np.sqrt(np.clip(np.linalg.eigvalsh(gyration), 0.0, None))
    return np.concatenate([[weights.sum()], radii])


def chain_names(atoms: Atoms) -> list[str]:
    """The chains of ``atoms`` in file order."""
    return list(dict.fromkeys(atoms.chain.tolist()))


def _grow_connected(graph, start: str, size: int, rng: np.random.Generator) -> frozenset[str]:
    """Up to ``size`` chains, connected: from ``start``, add random chains that touch the set."""
    members = [start]
    frontier = set(graph[start])
    while len(members) < size and frontier:
        pick = rng.choice(sorted(frontier))
        members.append(pick)
        frontier = (frontier | graph[pick]) - set(members)
    return frozenset(members)


# --- Symmetric assemblies: large complexes that fill or overflow the box ------------------------

CLASH_DISTANCE = 3.0  # Å between atoms of two copies: closer counts as a clash
POINT_GROUPS = ([f"C{n}" for n in range(3, 9)] + [f"D{n}" for n in range(2, 7)] + ["T", "O", "I"])
HELIX_MAX_SUBUNIT_KDA = 400.0  # a filament of heavier subunits is a few copies across the box
_PROBE_ATOMS = 1500  # atoms per copy in the clash search (a fixed random subset, for speed)
_PLACEMENTS = 6  # random placements tried per assembly; the most compact is kept


def symmetric_assemblies(
    atoms: Atoms,
    count: int = 3,
    seed: int = 0,
    min_mass_kda: float = 500.0,
    max_mass_kda: float = 4000.0,
    filament_length: float = 384.0,
) -> list[tuple[Atoms, str]]:
    """Large complexes built from copies of ``atoms``: point-group assemblies (rings Cn, double
    rings Dn, tetrahedral, octahedral and icosahedral shells) and helical filaments, the shapes
    of EMDB's large entries (chaperonins, proteasomes, capsids, filaments).

    Each copy is the subunit in one random orientation (per assembly), moved out from the
    symmetry centre by the smallest radius (and, for a filament, the smallest rise per subunit)
    at which no two copies clash (atoms closer than ``CLASH_DISTANCE``), so the copies pack
    tightly and touch; of ``_PLACEMENTS`` random placements the most compact is kept. Point
    groups are kept when the assembly's mass lies in [``min_mass_kda``, ``max_mass_kda``]
    (4 MDa: an 80S ribosome); a filament, of subunits up to
    ``HELIX_MAX_SUBUNIT_KDA``, is ``filament_length`` Å long, so it crosses and overflows a
    256 Å box. Up to ``count`` assemblies of distinct symmetries, chosen at random; the result
    depends only on the structure and ``seed``.

    Returns:
        ``(Atoms, symmetry)`` pairs: atoms named ``{name}-sym{k:02d}``, centred on the symmetry
        centre, chains renamed ``{chain}/{copy}``; symmetry such as ``"D5"``, ``"I"`` or
        ``"helix 4.3/turn, rise 11.2 Å"``.
    """
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng([seed, *atoms.name.encode(), 7])  # 7: not subassemblies' stream
    subunit_kda = atoms.mass_kda
    choices = [g for g in POINT_GROUPS
               if min_mass_kda <= len(Rotation.create_group(g)) * subunit_kda <= max_mass_kda]
    if subunit_kda <= HELIX_MAX_SUBUNIT_KDA:
        choices.append("helix")
    picked = rng.permutation(choices)[:max(count, 0)]
    centred = atoms.xyz - np.average(atoms.xyz, axis=0, weights=atoms.atomic_number)
    probe_index = rng.choice(len(centred), min(len(centred), _PROBE_ATOMS), replace=False)
    assemblies = []
    for k, symmetry in enumerate(picked):
        place = _helix if symmetry == "helix" else partial(_point_group, group=str(symmetry))
        placements = []
        for _ in range(_PLACEMENTS):
            orientation = Rotation.random(random_state=rng).as_matrix()
            placements.append((orientation, *place(centred[probe_index] @ orientation.T, rng, filament_length)))
        # The most compact placement: real assemblies pack tightly.
        orientation, transforms, radius, label = min(placements, key=lambda placement: placement[2])
        subunit = centred @ orientation.T
        copies = [subunit @ rotation.T + shift for rotation, shift in transforms]
        chains = np.concatenate([np.char.add(atoms.chain.astype(str), f"/{i}") for i in range(len(copies))])
        assemblies.append((Atoms(np.vstack(copies), np.tile(atoms.atomic_number, len(copies)), chains,
                                 f"{atoms.name}-sym{k:02d}"), label or str(symmetry)))
    return assemblies


def _point_group(probe, rng, length, group):
    """The subunit's atoms ``probe`` (oriented, centred) moved to R·d and rotated by each element g
    of the group, at the smallest clash-free R. Returns ([(g, g·R·d)], R, "")."""
    from scipy.spatial.transform import Rotation

    rotations = Rotation.create_group(group).as_matrix()
    if group[0] == "C":  # any direction off the axis; a shift along the axis moves the whole ring
        direction = np.array([1.0, 0.0, 0.0])
    elif group[0] == "D":  # off the axis and off the two-fold axes: two rings, one above the other
        tilt = rng.uniform(0.25, 0.8)
        direction = np.array([np.cos(tilt), 0.0, np.sin(tilt)])
    else:  # a general position of the shell
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
    others = [g for g in rotations if not np.allclose(g, np.eye(3), atol=1e-6)]

    def clear(radius: float) -> bool:
        placed = probe + radius * direction
        return not _clash(placed, np.concatenate([placed @ g.T for g in others]))

    radius = _smallest_clear(clear, step=4.0)
    return [(g, g @ (radius * direction)) for g in rotations], radius, ""


def _helix(probe, rng, length):
    """A one-start helix, ``length`` Å long, of the subunit's atoms ``probe`` (oriented, centred)
    with a random number of subunits per turn (3–8): the smallest radius at which neighbours in
    the turn do not clash, then the smallest rise at which no copy within a turn and a half does.
    Returns ([(rotation, shift)], radius, description)."""
    per_turn = rng.uniform(3.0, 8.0)

    def turn(k):
        c, s = np.cos(2 * np.pi * k / per_turn), np.sin(2 * np.pi * k / per_turn)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def copy(k, radius, rise):
        return (probe + [radius, 0.0, 0.0]) @ turn(k).T + [0.0, 0.0, k * rise]

    radius = _smallest_clear(lambda r: not _clash(copy(0, r, 0.0), copy(1, r, 0.0)), step=4.0)
    neighbours = range(1, int(np.ceil(1.5 * per_turn)) + 1)
    rise = _smallest_clear(lambda h: not _clash(copy(0, radius, h),
                                                np.concatenate([copy(k, radius, h) for k in neighbours])),
                           step=1.0)
    half = int(np.ceil(length / (2 * rise)))
    transforms = [(turn(k), turn(k) @ [radius, 0.0, 0.0] + [0.0, 0.0, k * rise]) for k in range(-half, half + 1)]
    return transforms, radius, f"helix {per_turn:.1f}/turn, rise {rise:.1f} Å"


def _clash(a: np.ndarray, b: np.ndarray, distance: float = CLASH_DISTANCE) -> bool:
    from scipy.spatial import cKDTree

    found, _ = cKDTree(a).query(b, k=1, distance_upper_bound=distance)
    return bool(np.isfinite(found).any())


def _smallest_clear(clear, step: float, limit: float = 2000.0, tolerance: float = 0.25) -> float:
    """The smallest value ≥ 0 at which ``clear`` holds: walk up in ``step``s, then bisect."""
    high = 0.0
    while not clear(high):
        high += step
        if high > limit:
            raise ValueError(f"no clash-free placement below {limit} Å")
    low = max(high - step, 0.0)
    while high - low > tolerance and high > 0:
        middle = (low + high) / 2
        low, high = (low, middle) if clear(middle) else (middle, high)
    return high
