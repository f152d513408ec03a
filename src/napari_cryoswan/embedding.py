"""Map embeddings for latent search: one vector per preprocessed map, derived from a Cryo-SWAN
encoder, that knows a rotated, noisier or differently contoured copy of a map from another
protein (docs/EXPLORER.md has the measurements behind each step).

The recipe, for one 64³ preprocessed box:

1. **Canonical density** (``canonical_box``): the box's inscribed sphere (the corners set to the
   background: a rotated copy of a map that runs out of its box fills them with other density),
   a Gaussian pre-filter (σ = 1.5 voxels), z-scoring, and zero below mean + 1 s.d.: two copies
   of a map at other resolutions, noise levels, contours or crops become alike before the
   encoder sees them (the same fair pre-filter the 3-D Zernike anchor gets).
2. **Pose** (``principal_pose``): the density is moved so that its centre of mass sits at the
   box centre and its inertia axes lie along z, y, x (largest spread first); each axis points
   to the side with the positive third moment. Where an angular harmonic of order 3 or more
   about the axis that stands apart outweighs the spread's anisotropy across it (a symmetric
   oligomer, whose two spreads there are equal), that harmonic sets the turn instead. The
   encoder's positional encoding makes its features depend on where density lies, so without
   this a rotated copy looks like another map.
3. **Shell pooling** (``shell_features``): each level's continuous latent, pooled over
   concentric shells about the box centre (6 shells at 16³, 4 at 8³, by grid size whatever the
   model) by its mean and its standard deviation: invariant to any pose error left about the
   centre, it still keeps where density lies radially, and the spread says how varied the latent
   is within a shell.
4. **Invariance head** (``EmbeddingHead``, optional): a small MLP trained on the training
   corpus's rotated and degraded copies with a supervised contrastive loss
   (``training.train_embedding``), so that copies of one map land close and other maps far.
   Without a head the standardised shell features are the embedding.
5. **Zernike term** (``DescriptorTerm``, part of a trained head): the 3-D Zernike invariants of
   the pre-filtered density in the inscribed sphere (``descriptors.zernike_prefiltered_sphere``),
   standardised over the head's training maps and weighted by λ, appended to the head's unit
   vector. The head leads on degraded copies; the invariants are exact where the head blurs fine
   differences (a map simulated again, a sub-assembly one peptide short). Together they match or
   beat each alone on clean and degraded copies, within the benchmarks' intervals; on maps
   simulated again they are level with the invariants or behind them, depending on the draw
   (docs/EXPLORER.md). λ was chosen by cross-validation over the training structures.

``Embedder`` holds a model and its head and names the recipe in ``version``: an index built
with another version (or another head) is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .preprocess import distance_from_centre, inscribed_sphere, zscored

# 5: the Zernike term; 4: the inscribed sphere; 3: oligomers posed by their harmonic; 2: shells
# pooled by mean and s.d.
RECIPE = "pose-shells-zernike-5"
# steps 1-3 (the encoded shell features); 5: shells counted by grid size (Cryo-SWAN's unchanged)
FEATURES_RECIPE = "pose-shells-5"
DESCRIPTOR = "zernike_prefiltered_sphere"  # step 5, a name of descriptors.describe_boxes
DESCRIPTOR_WEIGHT = 3.0  # λ: the fewest misses over clean, hard and re-simulated maps in CV
PREFILTER_SIGMA = 1.5  # voxels
CONTOUR_SDS = 1.0  # density kept above mean + this many s.d.
MAX_SHELLS = 6
HEAD_FORMAT = "cryoswan-embedding-head"
HEAD_SUFFIX = ".embedding.pt"

Progress = Callable[[int, int], None]


class EmbeddingError(ValueError):
    """A head file that is unreadable or belongs to another autoencoder."""


# --- 1. canonical density and 2. pose --------------------------------------------------------

def canonical_box(box: np.ndarray, *, sigma: float = PREFILTER_SIGMA,
                  contour_sds: float = CONTOUR_SDS) -> np.ndarray:
    """The pre-filtered density inside the box's inscribed sphere and above its contour, z-scored."""
    from scipy.ndimage import gaussian_filter

    data = zscored(gaussian_filter(inscribed_sphere(box).astype(np.float64), sigma))
    return zscored(np.where(data > contour_sds, data, 0.0)).astype(np.float32)


def principal_pose(box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre of mass, rotation) of the positive density; the rotation's rows are the box's new
    z, y, x axes, with det = +1.

    The rows are the inertia axes, largest spread first, each pointing to its positive third
    moment, unless, in the plane across the axis whose spread stands apart (a ring's or a rod's
    axis), an angular harmonic of order m ≥ 3 is stronger than the plane's inertia anisotropy.
    A C3 or higher symmetric oligomer has equal spreads in that plane, so its inertia axes there
    are set by noise and copies would come out turned by arbitrary angles about the symmetry
    axis. The harmonic's phase fixes the turn up to 2π/m instead (for an m-fold oligomer, its own
    symmetry): the rows are then the harmonic's first lobe, the axis across it and the apart
    axis, in the apart axis's place by spread.
    """
    weight = np.clip(np.asarray(box, np.float64), 0, None).ravel()
    if not weight.sum() > 0:
        raise ValueError("The map has no positive density to orient.")
    points = np.indices(box.shape).reshape(3, -1).astype(np.float64)
    centre = points @ weight / weight.sum()
    offsets = points - centre[:, None]
    inertia = (offsets * weight) @ offsets.T / weight.sum()
    spreads, vectors = np.linalg.eigh(inertia)
    spreads, axes = spreads[::-1], vectors[:, ::-1].T.copy()
    third_moment = ((axes @ offsets) ** 3 * weight).sum(1)
    axes *= np.where(third_moment < 0, -1.0, 1.0)[:, None]
    apart = 0 if spreads[0] - spreads[1] > spreads[1] - spreads[2] else 2
    in_plane = [k for k in range(3) if k != apart]
    order, phase = _dominant_harmonic(axes[in_plane] @ offsets, weight)
    if order >= 3:
        first = np.cos(phase) * axes[in_plane[0]] + np.sin(phase) * axes[in_plane[1]]
        second = np.cross(axes[apart], first)  # right-handed by construction
        return centre, np.stack([axes[apart], first, second] if apart == 0 else [first, second, axes[apart]])
    if np.linalg.det(axes) < 0:  # a mirror is no pose: flip the least spread axis back
        axes[2] *= -1
    return centre, axes


def _dominant_harmonic(plane_offsets_2N: np.ndarray, weight_N: np.ndarray, orders=range(2, 9)) -> tuple[int, float]:
    """(m, angle of the first lobe) of the angular harmonic, m in ``orders``, that is strongest
    in the density's projection on a plane. Weighted by the squared radius, the m = 2 harmonic
    is the plane's inertia anisotropy, so orders compare on one scale."""
    x, y = plane_offsets_2N
    weight = weight_N * (x * x + y * y)
    if not weight.sum() > 0:  # all density on the axis: no turn to fix, the inertia axes stand
        return 2, 0.0
    angle = np.arctan2(y, x)
    coefficients = {m: (weight * np.exp(-1j * m * angle)).sum() / weight.sum() for m in orders}
    order = max(coefficients, key=lambda m: abs(coefficients[m]))
    return order, -np.angle(coefficients[order]) / order


def posed_box(box: np.ndarray) -> np.ndarray:
    """``box`` resampled (trilinear) so its centre of mass is at the box centre and the axes of
    ``principal_pose`` lie along the box axes."""
    from scipy.ndimage import affine_transform

    centre, axes = principal_pose(box)
    box_centre = (np.asarray(box.shape) - 1) / 2.0
    # affine_transform pulls: output point p reads the input at axesᵀ (p − box centre) + centre.
    return affine_transform(box, axes.T, offset=centre - axes.T @ box_centre, order=1,
                            mode="constant", cval=0.0).astype(np.float32)


def degraded_copy(box: np.ndarray, rng: np.random.Generator, *, blur: float = 1.0,
                  snr: tuple[float, float] = (1.0, 2.0), contour_sds: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """A copy of ``box`` as another experiment might give it: turned by a uniformly random
    rotation (cubic-spline interpolation), blurred (Gaussian, ``blur`` voxels: a lower
    resolution), noised at an SNR drawn from ``snr`` (``denoise.add_noise``) and masked at a
    contour drawn from mean + ``contour_sds`` s.d.; z-scored. The head learns to see through
    these, and the retrieval benchmark's hard queries are made the same way.
    """
    from scipy.ndimage import gaussian_filter

    from .denoise import add_noise
    from .preprocess import random_rotations, rotate

    turned = gaussian_filter(rotate(np.asarray(box, np.float32), random_rotations(1, rng)[0]), blur)
    noisy = add_noise(turned, rng.uniform(*snr), rng).astype(np.float64)
    level = noisy.mean() + rng.uniform(*contour_sds) * noisy.std()
    return zscored(np.where(noisy > level, noisy, 0.0)).astype(np.float32)


# --- 3. shell pooling ------------------------------------------------------------------------

def shell_features(model, x_B1dhw):
    """(B, F): each level's latent pooled over concentric shells about the box centre, by the
    mean of each channel in each shell, then by its standard deviation."""
    import torch

    latents = model.encode(x_B1dhw).latents
    parts = []
    for name in sorted(latents):
        z_BCdhw = latents[name].float()
        count = shells_for(z_BCdhw.shape[-1])
        shell_index = _shell_index(z_BCdhw.shape[-1], count).to(z_BCdhw.device)
        shells = [z_BCdhw[..., shell_index == shell] for shell in range(count)]
        parts += [z_BCk.mean(-1) for z_BCk in shells] + [z_BCk.std(-1) for z_BCk in shells]
    return torch.cat(parts, 1)


def shells_for(size: int) -> int:
    """How many shells pool a size³ latent: one per voxel of radius, at most ``MAX_SHELLS``
    (16³ → 6, 8³ → 4), whichever model made it, so that one grid gets one pooling."""
    return max(1, min(MAX_SHELLS, size // 2))


def _shell_index(size: int, shells: int):
    """Shell number of each voxel of a size³ grid, by radius from the centre over half the
    box; the corners beyond the inscribed sphere join the outermost shell."""
    import torch

    radius = torch.from_numpy(distance_from_centre((size,) * 3))
    return torch.clamp((radius / (size / 2.0) * shells).long(), max=shells - 1)


# --- 4. the invariance head, and 5. its Zernike term ------------------------------------------

@dataclass
class DescriptorTerm:
    """Step 5: a descriptor's values standardised over the head's training maps and scaled to
    ``weight``/√D, so that λ weighs the whole descriptor against the head's unit vector."""

    mean: np.ndarray
    std: np.ndarray
    weight: float = DESCRIPTOR_WEIGHT

    @classmethod
    def fitted(cls, descriptors_MD: np.ndarray, weight: float = DESCRIPTOR_WEIGHT) -> DescriptorTerm:
        descriptors_MD = np.asarray(descriptors_MD, np.float64)
        return cls(descriptors_MD.mean(0).astype(np.float32), (descriptors_MD.std(0) + 1e-12).astype(np.float32),
                   float(weight))

    def scaled(self, descriptors_ND: np.ndarray) -> np.ndarray:
        """(N, D) float32: the term of N maps, from their descriptor values."""
        z = (np.asarray(descriptors_ND, np.float64) - self.mean) / self.std
        return (self.weight / np.sqrt(len(self.mean)) * z).astype(np.float32)

    def of_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """(N, D) float32: the term of N preprocessed boxes."""
        from .descriptors import describe_boxes

        return self.scaled(describe_boxes(DESCRIPTOR, boxes))


@dataclass
class EmbeddingHead:
    """Standardisation of the shell features, then an MLP to a unit vector; with ``descriptor``
    (step 5), the embedding is that vector followed by the descriptor term.

    ``autoencoder_id``: the checkpoint id of the encoder whose features it was trained on.
    """

    autoencoder_id: str
    feature_mean: np.ndarray
    feature_std: np.ndarray
    state_dict: dict | None  # None: no MLP, the standardised features are the embedding
    hidden: int = 256
    out: int = 64
    provenance: dict | None = None
    descriptor: DescriptorTerm | None = None

    @property
    def head_id(self) -> str:
        """A short content hash of the weights, for index manifests."""
        import hashlib

        digest = hashlib.sha256(self.feature_mean.tobytes() + self.feature_std.tobytes())
        for key in sorted(self.state_dict or {}):
            digest.update(key.encode() + self.state_dict[key].cpu().numpy().tobytes())
        if self.descriptor is not None:
            term = self.descriptor
            digest.update(term.mean.tobytes() + term.std.tobytes() + np.float64(term.weight).tobytes())
        return digest.hexdigest()[:12]

    def network(self):
        return build_head_network(len(self.feature_mean), hidden=self.hidden, out=self.out)

    def apply(self, features_BF) -> np.ndarray:
        import torch

        if features_BF.shape[1] != len(self.feature_mean):
            raise EmbeddingError(f"this embedding head was fitted on {len(self.feature_mean)} latent features and "
                                 f"the autoencoder gives {features_BF.shape[1]}: train the head again with "
                                 "python -m training.train_embedding.")
        mean = torch.as_tensor(self.feature_mean, device=features_BF.device)
        std = torch.as_tensor(self.feature_std, device=features_BF.device)
        standardised = (features_BF - mean) / std
        if self.state_dict is None:
            return standardised.cpu().numpy()
        net = self.network().to(features_BF.device).eval()
        net.load_state_dict(self.state_dict)
        with torch.no_grad():
            return torch.nn.functional.normalize(net(standardised), dim=1).cpu().numpy()


def build_head_network(features: int, *, hidden: int = 256, out: int = 64, dropout: float = 0.2):
    from torch import nn

    return nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out))


def save_head(path: str | os.PathLike, head: EmbeddingHead, *, overwrite: bool = False) -> Path:
    """Write a head atomically (plain tensors and strings: it loads with weights_only)."""
    import torch

    from ._atomic import atomic_path

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists. Choose another name, or pass overwrite=True.")
    payload = {
        "format": HEAD_FORMAT, "format_version": 1, "recipe": RECIPE,
        "autoencoder_id": head.autoencoder_id,
        "feature_mean": torch.as_tensor(head.feature_mean), "feature_std": torch.as_tensor(head.feature_std),
        "state_dict": head.state_dict, "hidden": head.hidden, "out": head.out,
        "provenance": head.provenance or {},
    }
    if head.descriptor is not None:
        payload["descriptor"] = {"name": DESCRIPTOR, "mean": torch.as_tensor(head.descriptor.mean),
                                 "std": torch.as_tensor(head.descriptor.std), "weight": head.descriptor.weight}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp_name:
        torch.save(payload, tmp_name)
    return path


def load_head(path: str | os.PathLike) -> EmbeddingHead:
    import torch

    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EmbeddingError(f"{path}: no such embedding head file.") from None
    except Exception as err:  # torch raises many types for a bad file; all mean the same here
        raise EmbeddingError(f"{path.name}: not a readable embedding head (corrupt or truncated). "
                             "Train it again with python -m training.train_embedding.") from err
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
        raise EmbeddingError(f"{path.name} is not an embedding head (written by python -m training.train_embedding).")
    if payload.get("recipe") != RECIPE:
        raise EmbeddingError(f"{path.name} was trained for the embedding recipe {payload.get('recipe')!r}, "
                             f"this napari-cryoswan computes {RECIPE!r}: train it again.")
    term = payload.get("descriptor")
    if term is not None and term.get("name") != DESCRIPTOR:
        raise EmbeddingError(f"{path.name} carries the descriptor {term.get('name')!r}, this napari-cryoswan "
                             f"computes {DESCRIPTOR!r}: train it again.")
    return EmbeddingHead(payload["autoencoder_id"], payload["feature_mean"].numpy(),
                         payload["feature_std"].numpy(), payload["state_dict"], payload["hidden"],
                         payload["out"], payload.get("provenance"),
                         None if term is None else DescriptorTerm(term["mean"].numpy(), term["std"].numpy(),
                                                                  float(term["weight"])))


def head_beside(checkpoint_path: str | os.PathLike) -> Path:
    """Where a checkpoint's own head lives: ``swan.pt`` → ``swan.embedding.pt``."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + HEAD_SUFFIX)


# --- the embedder ----------------------------------------------------------------------------

class Embedder:
    """A model (and optionally its invariance head) that turns preprocessed boxes into vectors.

    Without a head the raw shell features are the embedding (a fallback for checkpoints that
    have none: docs/EXPLORER.md measures how much weaker it is).
    """

    def __init__(self, model, head: EmbeddingHead | None = None, *, device=None,
                 steps: tuple[str, ...] = ("canonical", "pose")):
        """``steps``: which of steps 1 and 2 run ("canonical", "pose"); fewer only to measure
        what each buys (benchmarks/bench_retrieval.py --ablations)."""
        self.model, self.head, self.device, self.steps = model, head, device, tuple(steps)

    @classmethod
    def for_checkpoint(cls, loaded, head: str | os.PathLike | None = None, *, device=None) -> Embedder:
        """The checkpoint's embedder: the head at ``head``, else the one saved beside the
        checkpoint (``head_beside``), else none. A head of another autoencoder is refused."""
        path = Path(head) if head is not None else head_beside(loaded.path)
        if head is None and not path.is_file():
            return cls(loaded.model, None, device=device)
        found = load_head(path)
        if found.autoencoder_id != loaded.checkpoint_id:
            raise EmbeddingError(
                f"{path.name} was trained on the encoder of checkpoint {found.autoencoder_id}, not "
                f"{loaded.checkpoint_id} ({loaded.path.name}). Train a head for this checkpoint with "
                "python -m training.train_embedding.")
        return cls(loaded.model, found, device=device)

    @property
    def version(self) -> str:
        """The recipe and the head's content hash: what an index must match."""
        skipped = "".join(f"-no-{step}" for step in ("canonical", "pose") if step not in self.steps)
        return f"{RECIPE}{skipped}+{self.head.head_id if self.head else 'no-head'}"

    def _prepared(self, box: np.ndarray) -> np.ndarray:
        box = canonical_box(box) if "canonical" in self.steps else np.asarray(box, np.float32)
        return posed_box(box) if "pose" in self.steps else box

    def features(self, boxes: np.ndarray, batch_size: int = 4, progress: Progress | None = None,
                 should_stop=None) -> np.ndarray:
        """(N, F) shell features of canonical, posed copies of (N, D, H, W) boxes."""
        from .engine import choose_device, map_batches

        device = self.device or choose_device()
        model = self.model.to(device).eval()
        prepared = np.stack([self._prepared(b) for b in boxes])
        parts = map_batches(lambda x: shell_features(model, x), prepared, device, batch_size, progress, should_stop)
        return np.concatenate([p.float().numpy() for p in parts])

    def embed(self, boxes: np.ndarray, batch_size: int = 4, progress: Progress | None = None,
              should_stop=None) -> np.ndarray:
        """(N, D) float32 embeddings of (N, D, H, W) preprocessed boxes, compared by Euclidean
        distance."""
        import torch

        features = self.features(boxes, batch_size, progress, should_stop)
        if self.head is None:
            return features.astype(np.float32)
        vectors = self.head.apply(torch.from_numpy(features)).astype(np.float32)
        if self.head.descriptor is None:
            return vectors
        return np.concatenate([vectors, self.head.descriptor.of_boxes(boxes)], axis=1)
