"""Anchor-conditioned generation: a latent diffusion model over Cryo-SWAN's level-1 latent.

The paper's first downstream task (Fig. 5a–b, Supplementary Fig. S5): a DDPM learns the
distribution of Cryo-SWAN latents; conditioned on an anchor map, it produces structurally
similar variants, which the Cryo-SWAN decoder turns into density maps.

What the diffusion model learns
    RQ1's continuous latent ``encode(x).latents["rq1"]``, f_1 (code_dim × 16³), standardised per
    channel with the mean and s.d. of the training corpus (stored in the checkpoint as buffers).
    Why this tensor and not the quantized one: f_1 is what RQ1 quantizes, so running a sample
    through RQ1's quantizer is exactly what ``encode`` does to a real map; the anchor's own f_1
    snaps back to the anchor's own codes, and strength 0 gives the anchor's reconstruction
    exactly. The quantized f̂_1 is a sum of codebook vectors over eight scales: a lattice that
    Gaussian noise leaves at once and that gives the denoiser no smooth target. f_1 is the
    finest level, and with the default ``decoder_input="rq1"`` the only one the decoder reads;
    the coarser levels (RQ2, 8³) are taken from the anchor (for "residual"/"both" decoders they
    shape the decoder's input and, for "residual", where RQ1's residual stack starts).

The model
    MONAI's ``DiffusionModelUNet`` (3-D) with its ``DDPMScheduler`` for training (ε-prediction)
    and ``DDIMScheduler`` (η = 0, deterministic) for sampling. Sample clipping is off: a
    standardised latent is not an image in [−1, 1].

Conditioning on an anchor: SDEdit (Meng et al. 2022)
    ``strength`` s ∈ [0, 1]: the anchor's standardised latent is noised to a start timestep t₀
    with the DDPM forward process, then DDIM denoises it back to t = 0 (about t₀/T·steps
    steps). t₀ inverts the checkpoint's strength calibration (``measure_strength_calibration``:
    similarity then falls evenly with s) or, without one, is round(s·T) − 1. s = 0 returns the
    anchor's own reconstruction exactly; s = 1 starts from almost pure noise (an unconditional
    sample). Each variant i draws its noise from a
    generator seeded with ``seed + i``, so variant i does not depend on how many are asked for.

Snapping
    A generated latent goes through RQ1's quantizer to codes and then ``decode_codes``: every
    variant is a map that the decoder can express.

Back on the anchor's grid
    The anchor is preprocessed with the autoencoder's input contract (``preprocess``), variants
    are made in that box, the normalisation is undone (``denormalise``) and the box is resampled
    onto the anchor's own grid (same shape, voxel size, origin) through ``record.placement``:
    box voxel j sits at ``box_origin + j·voxel`` Å, anchor voxel i at ``origin + i·voxel``.
    Outside the box the variants are 0 (the preprocessing's padding value).

Checkpoints of kind "diffusion" are written and read here (``save_diffusion`` /
``load_diffusion``): ``checkpoint.load_checkpoint`` rebuilds autoencoders through the model
registry, which has no MONAI models. The file follows checkpoint.py's format (format tag,
version, kind, input contract, provenance; ``torch.load(weights_only=True)``; atomic write) and
records the autoencoder's checkpoint id; ``check_autoencoder`` refuses any other autoencoder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import (FORMAT, FORMAT_VERSION, CheckpointError, InputContract, _first_line, checkpoint_file,
                         checkpoint_id)
from .engine import Cancelled, Progress, StopCheck
from .io import DensityMap

LEVEL = "rq1"  # the latent the diffusion model learns
MODEL_NAME = "latent-diffusion"
DIFFUSION_SUFFIX = ".diffusion.pt"  # swan.pt → swan.diffusion.pt, beside its autoencoder
DEFAULT_STEPS = 50
# With the bundled model's calibrated strength: variants keep the anchor's shape (correlation
# 0.71 with its reconstruction), differ from each other, and lie nearer real maps than noise
# added to the latent at the same similarity (docs/GENERATION.md).
DEFAULT_STRENGTH = 0.3


@dataclass(frozen=True)
class DiffusionConfig:
    """The UNet and the noise schedule.

    - channels, num_res_blocks, attention_levels, norm_num_groups, num_head_channels: MONAI's
      ``DiffusionModelUNet`` (one entry of ``channels`` per resolution; 16³ → 8³ → 4³).
    - num_train_timesteps, schedule, beta_start, beta_end: the DDPM noise schedule, shared by
      the DDIM sampler.
    """

    channels: tuple[int, ...] = (64, 128, 256)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (False, False, True)
    norm_num_groups: int = 32
    num_head_channels: int = 32
    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("channels and attention_levels need one entry per resolution")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"every entry of channels must be a multiple of norm_num_groups "
                             f"({self.norm_num_groups}), not {self.channels}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # A few seconds a step on a 2-core CPU would be too much for tests: tiny, no attention.
    "small": DiffusionConfig(channels=(8, 8), num_res_blocks=1, attention_levels=(False, False),
                             norm_num_groups=4, num_head_channels=8),
    "cpu": DiffusionConfig(channels=(32, 64, 64), num_res_blocks=1,
                           attention_levels=(False, False, False), norm_num_groups=16),
    "full": DiffusionConfig(),
}


def latent_diffusion(*, code_dim: int, latent_size: int, config: DiffusionConfig | None = None):
    """A fresh ``LatentDiffusion`` (seed torch beforehand for reproducible weights)."""
    return _model_class()(code_dim=code_dim, latent_size=latent_size, config=config or DiffusionConfig())


def _model_class():
    """The nn.Module subclass is built on first use, so importing this module imports no torch."""
    global _LatentDiffusion
    if _LatentDiffusion is not None:
        return _LatentDiffusion
    import torch
    from monai.networks.nets import DiffusionModelUNet
    from torch import nn

    class LatentDiffusion(nn.Module):
        """MONAI's 3-D diffusion UNet over standardised RQ1 latents, with its schedulers.

        Shape:
            - z (raw latent): (B, code_dim, S, S, S), S = latent_size (16 for 64³ maps)
            - x (standardised): like z; ``standardise(z) = (z − mean_C) / std_C``
        """

        name = MODEL_NAME

        def __init__(self, *, code_dim: int, latent_size: int, config: DiffusionConfig):
            super().__init__()
            self.code_dim, self.latent_size, self.config = int(code_dim), int(latent_size), config
            self.unet = DiffusionModelUNet(
                spatial_dims=3, in_channels=code_dim, out_channels=code_dim,
                num_res_blocks=config.num_res_blocks, channels=config.channels,
                attention_levels=config.attention_levels, norm_num_groups=config.norm_num_groups,
                num_head_channels=config.num_head_channels)
            self.register_buffer("latent_mean_C", torch.zeros(code_dim))
            self.register_buffer("latent_std_C", torch.ones(code_dim))
            # {"timesteps": [...], "similarity": [...]} from ``measure_strength_calibration``
            self.strength_calibration: dict | None = None

        def config_dict(self) -> dict:
            return {"code_dim": self.code_dim, "latent_size": self.latent_size,
                    "level": LEVEL, **self.config.to_dict()}

        def set_statistics(self, mean_C: torch.Tensor, std_C: torch.Tensor) -> None:
            self.latent_mean_C.copy_(mean_C)
            self.latent_std_C.copy_(std_C.clamp_min(1e-6))

        def standardise(self, z_BCdhw: torch.Tensor) -> torch.Tensor:
            return (z_BCdhw - self.latent_mean_C.view(1, -1, 1, 1, 1)) / self.latent_std_C.view(1, -1, 1, 1, 1)

        def unstandardise(self, x_BCdhw: torch.Tensor) -> torch.Tensor:
            return x_BCdhw * self.latent_std_C.view(1, -1, 1, 1, 1) + self.latent_mean_C.view(1, -1, 1, 1, 1)

        def forward(self, x_BCdhw: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
            """The predicted noise ε(x_t, t)."""
            return self.unet(x_BCdhw, timesteps=t_B)

        def _schedule_args(self) -> dict:
            c = self.config
            return dict(num_train_timesteps=c.num_train_timesteps, schedule=c.schedule,
                        beta_start=c.beta_start, beta_end=c.beta_end, clip_sample=False)

        def ddpm(self):
            from monai.networks.schedulers import DDPMScheduler

            return DDPMScheduler(**self._schedule_args())

        def ddim(self):
            from monai.networks.schedulers import DDIMScheduler

            return DDIMScheduler(**self._schedule_args())

        def loss(self, x0_BCdhw: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
            """The DDPM objective: MSE between the noise added at a random timestep and the
            predicted noise. ``x0`` is standardised; ``generator`` (on x0's device) makes it
            reproducible."""
            scheduler = self.ddpm()
            noise = torch.randn(x0_BCdhw.shape, generator=generator, device=x0_BCdhw.device)
            t_B = torch.randint(0, self.config.num_train_timesteps, (x0_BCdhw.shape[0],),
                                generator=generator, device=x0_BCdhw.device)
            x_t = scheduler.add_noise(x0_BCdhw, noise, t_B)
            return torch.nn.functional.mse_loss(self(x_t, t_B), noise)

        def edit_start(self, strength: float) -> int:
            """The timestep t₀ that SDEdit noises to (−1: no noise, for strength 0).

            With a ``strength_calibration``, t₀ is where the measured similarity of a variant to
            its map's reconstruction has fallen by the share ``strength`` of its whole fall, so
            that similarity falls evenly with strength. Without one, t₀ = round(strength·T) − 1,
            linear in timesteps as SDEdit defines it.
            """
            s = check_strength(strength)
            T = self.config.num_train_timesteps
            if s == 0.0:
                return -1
            if self.strength_calibration is None:
                return min(int(round(s * T)), T) - 1
            t_K = np.array([-1.0, *self.strength_calibration["timesteps"]])
            r_K = np.minimum.accumulate([1.0, *self.strength_calibration["similarity"]])
            target = r_K[0] + s * (r_K[-1] - r_K[0])
            t0 = np.interp(target, r_K[::-1], t_K[::-1])  # r falls as t grows
            return T - 1 if s == 1.0 else int(np.clip(round(float(t0)), 0, T - 1))

        @torch.no_grad()
        def edit(self, z_BCdhw: torch.Tensor, *, strength: float, steps: int = DEFAULT_STEPS,
                 noise_BCdhw: torch.Tensor | None = None, progress: Progress | None = None,
                 should_stop: StopCheck | None = None, start: int | None = None) -> torch.Tensor:
            """SDEdit: noise raw latents to t₀ = round(strength·T) − 1, DDIM back to 0.

            ``noise_BCdhw``: the Gaussian noise to add (drawn by the caller for seeding).
            ``start``: t₀ itself, instead of ``edit_start(strength)`` (for calibrating).
            Returns raw (unstandardised) latents, like ``z``; ``z`` itself for strength 0.
            """
            T = self.config.num_train_timesteps
            t0 = self.edit_start(strength) if start is None else int(start)
            if t0 < 0:
                return z_BCdhw.clone()
            steps = max(1, min(int(steps), T))
            ddim = self.ddim()
            ddim.set_timesteps(steps, device=z_BCdhw.device)  # fixes the stride T // steps
            stride = T // steps
            chain = list(range(t0, -1, -stride))
            x0 = self.standardise(z_BCdhw)
            noise = torch.randn_like(x0) if noise_BCdhw is None else noise_BCdhw.to(x0)
            x = ddim.add_noise(x0, noise, torch.full((x0.shape[0],), t0, device=x0.device, dtype=torch.long))
            for done, t in enumerate(chain, start=1):
                if should_stop is not None and should_stop():
                    raise Cancelled()
                t_B = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
                x, _ = ddim.step(self(x, t_B), t, x)
                if progress is not None:
                    progress(done, len(chain))
            return self.unstandardise(x)

    _LatentDiffusion = LatentDiffusion
    return LatentDiffusion


_LatentDiffusion = None


def check_strength(strength: float) -> float:
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must lie between 0 and 1, not {strength}")
    return float(strength)


# ---- checkpoints -------------------------------------------------------------------------


@dataclass
class LoadedDiffusion:
    model: object  # LatentDiffusion, in eval mode (EMA weights)
    path: Path
    checkpoint_id: str
    autoencoder_id: str  # the checkpoint id of the autoencoder whose latents it learned
    autoencoder_path: str  # where that autoencoder was when training began (a hint only)
    contract: InputContract
    provenance: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)


def save_diffusion(path: str | os.PathLike, model, *, autoencoder_id: str, autoencoder_path: str = "",
                   contract: InputContract, provenance: dict | None = None,
                   training: dict | None = None, overwrite: bool = False) -> Path:
    """Write a diffusion checkpoint atomically (checkpoint.save_checkpoint, kind "diffusion",
    plus the autoencoder it belongs to)."""
    from .checkpoint import save_checkpoint

    extra = {"autoencoder": {"checkpoint_id": autoencoder_id, "path": str(autoencoder_path)}}
    if model.strength_calibration is not None:
        extra["strength_calibration"] = dict(model.strength_calibration)
    return save_checkpoint(path, model, provenance, training, contract=contract, kind="diffusion",
                           overwrite=overwrite, extra=extra)


def load_diffusion(path: str | os.PathLike, *, autoencoder=None, map_location: str = "cpu") -> LoadedDiffusion:
    """Rebuild a diffusion checkpoint's model (EMA weights, eval mode).

    ``autoencoder``: a ``LoadedCheckpoint``; when given, it must be the one the model was
    trained with (``check_autoencoder``).

    Raises:
        CheckpointError: missing, unreadable or foreign file, another kind of checkpoint,
            damaged config or weights, or another autoencoder.
    """
    import torch

    path = checkpoint_file(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # many types for a bad file; all mean the same here
        raise CheckpointError(
            f"{path.name}: not a readable napari-cryoswan checkpoint. The file is corrupt, "
            "truncated, or holds something other than plain weights: train it again.") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: this is not a napari-cryoswan checkpoint. Use one written by "
                              "python -m training.train_diffusion.")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {payload['format_version']} is newer than "
                              f"this napari-cryoswan understands ({FORMAT_VERSION}). Update napari-cryoswan.")
    kind = payload.get("kind", "autoencoder")
    if kind != "diffusion":
        raise CheckpointError(f"{path.name} holds an {kind} model, not a diffusion model. Choose a "
                              "diffusion checkpoint (python -m training.train_diffusion writes them).")
    try:
        config = dict(payload["config"])
        code_dim, latent_size = int(config.pop("code_dim")), int(config.pop("latent_size"))
        if config.pop("level", LEVEL) != LEVEL:
            raise ValueError("it learned another latent level")
        model = latent_diffusion(code_dim=code_dim, latent_size=latent_size, config=DiffusionConfig(**config))
        model.load_state_dict(payload["state_dict"])
        contract = InputContract.from_dict(payload["input"])
        ae = payload["autoencoder"]
        calibration = payload.get("strength_calibration")
        if calibration is not None:
            calibration = {**calibration, "timesteps": [int(t) for t in calibration["timesteps"]],
                           "similarity": [float(r) for r in calibration["similarity"]]}
            if len(calibration["timesteps"]) != len(calibration["similarity"]) or not calibration["timesteps"]:
                raise ValueError("its strength calibration is malformed")
        model.strength_calibration = calibration
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: this diffusion checkpoint is damaged ({_first_line(err)}).") from err
    model.eval()
    loaded = LoadedDiffusion(model, path, checkpoint_id(path), str(ae["checkpoint_id"]), str(ae.get("path", "")),
                             contract, payload.get("provenance", {}), payload.get("training", {}))
    if autoencoder is not None:
        check_autoencoder(loaded, autoencoder)
    return loaded


def check_autoencoder(diffusion: LoadedDiffusion, autoencoder) -> None:
    """Refuse an autoencoder other than the one the diffusion model learned the latents of."""
    if autoencoder.checkpoint_id != diffusion.autoencoder_id:
        raise CheckpointError(
            f"{diffusion.path.name} learned the latents of autoencoder {diffusion.autoencoder_id} "
            f"({diffusion.autoencoder_path or 'path unknown'}), but {autoencoder.path.name} is "
            f"{autoencoder.checkpoint_id}: its latents mean something else. Choose that autoencoder, "
            f"or train a diffusion model for this one: python -m training.train_diffusion "
            f"--autoencoder {autoencoder.path} --corpus CORPUS --out RUN")
    check_generatable(autoencoder.model)
    model = diffusion.model
    size = autoencoder.model.config.latent_size(1)
    if (model.code_dim, model.latent_size) != (autoencoder.model.config.code_dim, size):
        raise CheckpointError(f"{diffusion.path.name}: its latent shape does not fit {autoencoder.path.name}.")


def check_generatable(autoencoder_model) -> None:
    """Only Cryo-SWAN models (either ablation) have the RQ1 latent this module diffuses."""
    from .models.swan import CryoSwan

    if not isinstance(autoencoder_model, CryoSwan):
        raise CheckpointError(
            f"Generation needs a Cryo-SWAN autoencoder ('swan' or 'swan-rq1'), not "
            f"'{getattr(autoencoder_model, 'name', type(autoencoder_model).__name__)}'.")


def diffusion_path_for(autoencoder_path: str | os.PathLike) -> Path:
    """Where a diffusion model for an autoencoder is looked for: beside it, ``X.pt`` → ``X.diffusion.pt``."""
    path = Path(autoencoder_path)
    return path.with_name(path.name.removesuffix(".pt") + DIFFUSION_SUFFIX)


def diffusion_beside(autoencoder_path: str | os.PathLike, *, shown_as: str | None = None) -> Path:
    """The diffusion checkpoint beside an autoencoder file (``diffusion_path_for``).

    Raises:
        CheckpointError: there is none; the message names the autoencoder as ``shown_as`` (e.g.
            "bundled:swan", default its path) and says how to train one.
    """
    found = diffusion_path_for(autoencoder_path)
    if not found.is_file():
        shown_as = shown_as or str(autoencoder_path)
        raise CheckpointError(
            f"No diffusion checkpoint was given and none lies beside {Path(autoencoder_path).name} "
            f"(looked for {found}). Train one with\n"
            f"  python -m training.train_diffusion --autoencoder {shown_as} --corpus CORPUS --out RUN\n"
            f"then choose RUN/model.pt as the diffusion checkpoint (--checkpoint on the command line).")
    return found


# ---- latents, snapping, decoding ---------------------------------------------------------


def encode_latents(autoencoder_model, x_B1dhw):
    """RQ1's continuous latent and every level's codes of preprocessed maps (eval mode).

    Shape: x (B, 1, 64, 64, 64) → latent (B, code_dim, 16, 16, 16)
    """
    import torch

    from .models.base import evaluating

    with evaluating(autoencoder_model), torch.inference_mode():
        encoding = autoencoder_model.encode(x_B1dhw)
    return encoding.latents[LEVEL], encoding.codes


def snap_to_codes(autoencoder_model, z_BCdhw, anchor_codes: dict) -> dict:
    """Codes for generated RQ1 latents: RQ1's quantizer picks them, as ``encode`` does.

    The coarser levels keep the anchor's codes (``anchor_codes``: the anchor's, batch 1 or B).
    For a "residual" decoder RQ1 quantizes f_1 − p, p projected from level 2's output, so p is
    rebuilt from those coarser codes first.
    """
    import torch

    from .models.base import evaluating

    B = z_BCdhw.shape[0]
    codes = {name: [c.expand(B, *c.shape[1:]) if c.shape[0] == 1 else c for c in level]
             for name, level in anchor_codes.items()}
    model = autoencoder_model
    with evaluating(model), torch.inference_mode():
        prior = None
        if model.config.levels > 1 and model.config.decoder_input == "residual":
            r_BCdhw = None
            for k in reversed(range(1, model.config.levels)):
                f_hat = model.quantizers[k].decode(codes[model.level_name(k + 1)])
                r_BCdhw = model.decoders[k](model._decoder_input(k, f_hat, r_BCdhw))
            prior = model._prior(0, r_BCdhw)
        f_BCdhw = z_BCdhw if prior is None else z_BCdhw - prior
        codes[LEVEL] = model.quantizers[0](f_BCdhw.float()).codes
    return codes


def decode(autoencoder_model, codes: dict):
    """Shape: codes → (B, 1, 64, 64, 64)."""
    import torch

    from .models.base import evaluating

    with evaluating(autoencoder_model), torch.inference_mode():
        return autoencoder_model.decode_codes(codes)


def decode_latents(autoencoder_model, z_BCdhw, anchor_codes: dict) -> np.ndarray:
    """Generated RQ1 latents snapped to the codebooks (``snap_to_codes``) and decoded.

    Shape: z (B, C, d, h, w) → (B, 64, 64, 64) float32.
    """
    import torch

    with torch.inference_mode():
        boxes = decode(autoencoder_model, snap_to_codes(autoencoder_model, z_BCdhw, anchor_codes))
    return boxes[:, 0].float().cpu().numpy().astype(np.float32)


def variant_noise(seeds: Sequence[int], shape_Cdhw: tuple[int, ...]):
    """The Gaussian noise of each variant, from a CPU generator seeded with its own seed (the
    same numbers on every device). Shape: (len(seeds), C, d, h, w)."""
    import torch

    return torch.stack([torch.randn(shape_Cdhw, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


def generate_boxes(autoencoder_model, diffusion_model, x_11dhw, *, n: int, strength: float, seed: int = 0,
                   steps: int = DEFAULT_STEPS, device=None, batch_size: int = 8,
                   progress: Progress | None = None, should_stop: StopCheck | None = None):
    """Variants of one preprocessed map, in the model's box (normalised units).

    Returns (variants (n, D, H, W), anchor reconstruction (D, H, W)) as float32 arrays; the
    reconstruction is ``decode(encode codes)``, which strength 0 gives back exactly.
    """
    import torch

    from .engine import choose_device

    check_strength(strength)
    if n < 1:
        raise ValueError("Ask for at least one variant.")
    device = device or choose_device()
    autoencoder_model = autoencoder_model.to(device).eval()
    diffusion_model = diffusion_model.to(device).eval()
    x_11dhw = torch.as_tensor(np.asarray(x_11dhw, np.float32)).reshape(1, 1, *np.shape(x_11dhw)[-3:]).to(device)
    z_1Cdhw, anchor_codes = encode_latents(autoencoder_model, x_11dhw)
    reconstruction = decode(autoencoder_model, anchor_codes)[0, 0].float().cpu().numpy()
    if diffusion_model.edit_start(strength) < 0:  # strength 0: no noise, the anchor's own codes
        if progress is not None:
            progress(1, 1)
        return np.repeat(reconstruction[None], n, axis=0).astype(np.float32), reconstruction.astype(np.float32)
    seeds = [seed + i for i in range(n)]
    chunks = [seeds[i:i + batch_size] for i in range(0, n, batch_size)]
    out = []
    for c, chunk in enumerate(chunks):
        noise = variant_noise(chunk, tuple(z_1Cdhw.shape[1:])).to(device)
        z_BCdhw = z_1Cdhw.expand(len(chunk), *z_1Cdhw.shape[1:])

        def step_progress(done, total, c=c):
            if progress is not None:
                progress(c * total + done, len(chunks) * total)

        z_gen = diffusion_model.edit(z_BCdhw, strength=strength, steps=steps, noise_BCdhw=noise,
                                     progress=step_progress, should_stop=should_stop)
        out.append(decode_latents(autoencoder_model, z_gen, anchor_codes))
    return np.concatenate(out), reconstruction.astype(np.float32)


def measure_strength_calibration(autoencoder_model, diffusion_model, boxes_Bdhw, *, points: int = 20,
                                 steps: int = DEFAULT_STEPS, seed: int = 0, device=None,
                                 progress: Progress | None = None) -> dict:
    """How similar a variant stays to its map's reconstruction for each SDEdit start t₀, measured
    on preprocessed maps (held out from training): what ``edit_start`` inverts.

    ``points`` start timesteps evenly over (0, T]; at each, one variant per map (noise from
    ``seed``), snapped and decoded; similarity is its correlation with the reconstruction,
    averaged over the maps. Returns ``{"timesteps", "similarity", "maps", "steps", "seed"}``.
    """
    import torch

    from .engine import choose_device
    from .metrics import correlation

    device = device or choose_device()
    autoencoder_model = autoencoder_model.to(device).eval()
    diffusion_model = diffusion_model.to(device).eval()
    T = diffusion_model.config.num_train_timesteps
    timesteps = sorted({int(round(T * (k + 1) / points)) - 1 for k in range(points)})
    similarity_MK = []
    for m, box in enumerate(np.asarray(boxes_Bdhw, np.float32)):
        x_11dhw = torch.from_numpy(box).reshape(1, 1, *box.shape).to(device)
        z_1Cdhw, codes = encode_latents(autoencoder_model, x_11dhw)  # one map: as generate_boxes
        recon = decode(autoencoder_model, codes)[0, 0].float().cpu().numpy()
        noise = variant_noise([seed], tuple(z_1Cdhw.shape[1:])).to(device)
        row = []
        for t in timesteps:
            z_gen = diffusion_model.edit(z_1Cdhw, strength=1.0, start=t, steps=steps, noise_BCdhw=noise)
            row.append(correlation(decode_latents(autoencoder_model, z_gen, codes)[0], recon))
        similarity_MK.append(row)
        if progress is not None:
            progress(m + 1, len(boxes_Bdhw))
    return {"timesteps": timesteps, "similarity": [float(r) for r in np.mean(similarity_MK, axis=0)],
            "maps": len(similarity_MK), "steps": int(steps), "seed": int(seed)}


def box_on_grid(box: np.ndarray, record, like: DensityMap) -> np.ndarray:
    """Resample a box made from ``like`` (``preprocess`` → ``record``) onto ``like``'s grid.

    Box voxel j sits at ``record.box_origin + j·record.voxel_size`` Å and ``like``'s voxel i at
    ``like.origin + i·like.voxel_size``; cubic spline, zero outside the box.
    """
    from scipy.ndimage import affine_transform

    if record.rotation is not None:
        raise ValueError("A rotated box cannot be placed back on its source grid.")
    scale = np.asarray(like.voxel_size, float) / record.voxel_size
    offset = (np.asarray(like.origin, float) - np.asarray(record.box_origin, float)) / record.voxel_size
    return affine_transform(np.asarray(box, np.float32), scale, offset=offset, output_shape=like.shape,
                            order=3, mode="grid-constant", cval=0.0).astype(np.float32)


@dataclass
class GenerationResult:
    """Variants of one anchor, on the anchor's grid (shape, voxel size, origin)."""

    variants: list[DensityMap]
    reconstruction: DensityMap  # the anchor's own reconstruction, what strength 0 gives
    variant_boxes: np.ndarray  # (n, box, box, box) in the anchor's density units
    reconstruction_box: np.ndarray
    anchor_box: np.ndarray  # the anchor as the model saw it (preprocessed), same units
    record: object  # PreprocessRecord
    strength: float
    seeds: list[int]
    steps: int
    autoencoder_id: str
    diffusion_id: str
    diffusion_path: str
    fsc_to_anchor: list  # metrics.FSCCurve of each variant against anchor_box
    correlation_to_anchor: list[float]  # of each variant with anchor_box
    notes: list[str] = field(default_factory=list)


def generate_variants(anchor: DensityMap, diffusion: LoadedDiffusion, autoencoder, *, n: int = 4,
                      strength: float = DEFAULT_STRENGTH, seed: int = 0, steps: int = DEFAULT_STEPS,
                      contour_level: float | None = None, device=None,
                      progress: Progress | None = None,
                      should_stop: StopCheck | None = None) -> GenerationResult:
    """``n`` variants of ``anchor`` on its own grid.

    Args:
        diffusion: from ``load_diffusion``; autoencoder: the ``LoadedCheckpoint`` it was
            trained with (refused otherwise).
        strength: 0 (the anchor's reconstruction) … 1 (an unconditional sample).
        seed: variant i uses seed + i.
        steps: DDIM steps for a full chain (strength 1); a shorter chain takes fewer.
        contour_level: mask the anchor before preprocessing, as reconstruction does.
        progress: (done, total) over the denoising steps; should_stop: raises engine.Cancelled.
    """
    from .metrics import correlation, fsc
    from .preprocess import denormalise, preprocess

    check_autoencoder(diffusion, autoencoder)
    settings = autoencoder.contract.settings(contour_level)
    prepared = preprocess(anchor, settings)
    boxes, recon = generate_boxes(autoencoder.model, diffusion.model, prepared.data, n=n, strength=strength,
                                  seed=seed, steps=steps, device=device, progress=progress,
                                  should_stop=should_stop)
    if should_stop is not None and should_stop():
        raise Cancelled()
    record = prepared.record
    boxes = np.stack([denormalise(b, record) for b in boxes])
    recon = denormalise(recon, record)
    anchor_box = denormalise(prepared.data, record)
    on_grid = [anchor.with_data(box_on_grid(b, record, anchor), header={}) for b in boxes]
    return GenerationResult(
        variants=on_grid, reconstruction=anchor.with_data(box_on_grid(recon, record, anchor), header={}),
        variant_boxes=boxes, reconstruction_box=recon, anchor_box=anchor_box, record=record,
        strength=float(strength), seeds=[seed + i for i in range(n)], steps=int(steps),
        autoencoder_id=autoencoder.checkpoint_id, diffusion_id=diffusion.checkpoint_id,
        diffusion_path=str(diffusion.path),
        fsc_to_anchor=[fsc(b, anchor_box, record.voxel_size) for b in boxes],
        correlation_to_anchor=[correlation(b, anchor_box) for b in boxes],
        notes=list(filter(None, [record.cut_off_note()])))
