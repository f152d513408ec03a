"""Denoising a map: latent projection through a Cryo-SWAN checkpoint, and the classical filters
it is judged against (paper, Fig. 5c).

Everything works on one cubic volume (D, H, W) in the model's box (64³ at 4 Å for the bundled
checkpoints), in any units: each method returns its result in the units of its input.

The noise model, the one used everywhere (``add_noise``): white Gaussian noise, added to the
whole box, with

    SNR = var(clean map) / var(noise)

where the variances are taken over the whole box. On a z-scored clean map (variance 1) the noise
s.d. is 1/√SNR: √2 at SNR 0.5.

Methods (``METHODS``; ``denoise`` runs any of them by name):

- ``band-pass``: the paper's band-pass, "low 0.25, high 0.01" read as the pass band
  0.01–0.25 cycles per voxel (``band_pass``);
- ``gaussian``: a Gaussian low-pass whose width is chosen on clean validation maps
  (``tune_gaussian_sigma``);
- ``nl-means``: scikit-image's 3-D non-local means, h = 0.8 σ (its recommendation with
  ``fast_mode`` and a known σ);
- ``wavelet``: scikit-image's BayesShrink wavelet denoiser;
- ``swan``: encode the noisy map, decode it (``project``);
- ``swan-rotations``: the projection averaged over the 24 rotations of the cube.

Methods that need the noise s.d. take it from the caller or estimate it from the map
(``estimate_noise_sd``, scikit-image's wavelet estimate).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .engine import Cancelled, StopCheck

if TYPE_CHECKING:
    from .checkpoint import LoadedCheckpoint
    from .io import DensityMap
    from .metrics import FSCCurve
    from .preprocess import PreprocessRecord, PreprocessSettings

Progress = Callable[[int, int, str], None]  # (done, total, what is happening)
CubeRotation = tuple[tuple[int, int, int], tuple[bool, bool, bool]]  # (axis order, flipped axes)

# The clean variance estimate var(noisy) − σ² never falls below this fraction of var(noisy), so a
# map that seems to be all noise is still scaled by a small positive s.d.
MIN_CLEAN_VARIANCE_FRACTION = 0.01
# Gaussian widths (voxels) tried by ``tune_gaussian_sigma``.
GAUSSIAN_SIGMAS = tuple(np.round(np.arange(0.25, 4.01, 0.25), 2))
# The width tuned on the default corpus's validation split at SNR 0.5 (docs/DENOISING.md): the
# default when no validation maps are at hand.
DEFAULT_GAUSSIAN_SIGMA = 1.0


def noise_sd_for(volume: np.ndarray, snr: float) -> float:
    """The noise s.d. that gives ``volume`` the signal-to-noise ratio ``snr`` (module docstring)."""
    if not snr > 0:
        raise ValueError(f"SNR must be positive, not {snr!r}.")
    return float(np.sqrt(np.var(volume, dtype=np.float64) / snr))


def add_noise(volume: np.ndarray, snr: float, seed) -> np.ndarray:
    """``volume`` plus white Gaussian noise at ``snr`` = var(volume) / var(noise), over the box.

    ``seed``: anything ``numpy.random.default_rng`` takes (an int, a list of ints, a
    Generator); the same seed gives the same noise. Shape: (D, H, W) in, the same out (float32).
    """
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, noise_sd_for(volume, snr), np.shape(volume))
    return (np.asarray(volume, np.float64) + noise).astype(np.float32)


def estimate_noise_sd(volume: np.ndarray) -> float:
    """The s.d. of white Gaussian noise in ``volume``: scikit-image's robust wavelet estimate
    (median absolute deviation of the finest diagonal detail coefficients)."""
    from skimage.restoration import estimate_sigma

    return float(estimate_sigma(np.asarray(volume, np.float32)))


def clean_sd(volume: np.ndarray, noise_sd: float) -> float:
    """The s.d. of the signal under the noise: √(var(volume) − σ²), the noise being independent
    of the signal; never below √(``MIN_CLEAN_VARIANCE_FRACTION`` · var(volume))."""
    total = float(np.var(volume, dtype=np.float64))
    return float(np.sqrt(max(total - noise_sd**2, MIN_CLEAN_VARIANCE_FRACTION * total)))


# --- classical filters --------------------------------------------------------------------


def band_pass(volume: np.ndarray, lowpass: float = 0.25, highpass: float = 0.01) -> np.ndarray:
    """Keep the spatial frequencies between ``highpass`` and ``lowpass`` cycles per voxel.

    The paper's "low 0.25, high 0.01": a low-pass at 0.25 cycles/voxel (a 4-voxel period, 16 Å
    at 4 Å) and a high-pass at 0.01 (100 voxels). Both edges are ``preprocess.lowpass``'s raised
    cosine. In a 64³ box the lowest non-zero frequency is 1/64 = 0.016 cycles/voxel, so the
    high-pass removes the mean and nothing else. Shape: (D, H, W) in and out.
    """
    from .preprocess import lowpass as fourier_lowpass

    if not 0 <= highpass < lowpass <= 0.5:
        raise ValueError(f"The pass band needs 0 ≤ highpass < lowpass ≤ 0.5 cycles/voxel; got "
                         f"highpass {highpass:g}, lowpass {lowpass:g}.")
    voxel = (1.0, 1.0, 1.0)  # frequencies in cycles per voxel
    kept = fourier_lowpass(volume, voxel, 1.0 / lowpass)
    if highpass > 0:
        kept -= fourier_lowpass(volume, voxel, 1.0 / highpass)
    return kept


def gaussian(volume: np.ndarray, sigma: float = DEFAULT_GAUSSIAN_SIGMA) -> np.ndarray:
    """Gaussian low-pass of width ``sigma`` voxels. Shape: (D, H, W) in and out."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(volume, np.float32), sigma)


def tune_gaussian_sigma(clean_volumes: Sequence[np.ndarray], snr: float, seed,
                        sigmas: Sequence[float] = GAUSSIAN_SIGMAS) -> tuple[float, dict]:
    """The Gaussian width that gives the best mean PSNR on ``clean_volumes`` made noisy at
    ``snr`` (volume i with ``add_noise`` seed [*seed, i]).

    Tune on validation maps, never on the maps that are scored. Returns (best sigma in voxels,
    {sigma: mean PSNR in dB}).
    """
    from .metrics import psnr

    seeds = [int(s) for s in np.atleast_1d(seed)]
    noisy = [add_noise(v, snr, [*seeds, i]) for i, v in enumerate(clean_volumes)]
    scores = {float(s): float(np.mean([psnr(gaussian(n, s), c)
                                       for n, c in zip(noisy, clean_volumes)])) for s in sigmas}
    return max(scores, key=scores.get), scores


def nl_means(volume: np.ndarray, noise_sd: float, h_factor: float = 0.8, patch_size: int = 5,
             patch_distance: int = 6) -> np.ndarray:
    """scikit-image's non-local means in 3-D (``fast_mode``), told the noise s.d., with
    h = ``h_factor`` · σ (0.8, scikit-image's starting point for this mode). Patches of 5³
    searched within ±6 voxels, as in scikit-image's 3-D example: about 5 s for 64³ on 2 cores.
    Shape: (D, H, W) in and out."""
    from skimage.restoration import denoise_nl_means

    data = np.asarray(volume, np.float32)
    return denoise_nl_means(data, patch_size=patch_size, patch_distance=patch_distance,
                            h=h_factor * noise_sd, sigma=noise_sd, fast_mode=True
                            ).astype(np.float32)


def wavelet(volume: np.ndarray, noise_sd: float) -> np.ndarray:
    """scikit-image's wavelet denoiser, BayesShrink soft thresholds per sub-band, told the noise
    s.d. Shape: (D, H, W) in and out."""
    from skimage.restoration import denoise_wavelet

    data = np.asarray(volume, np.float32)
    return denoise_wavelet(data, sigma=noise_sd, method="BayesShrink", mode="soft",
                           rescale_sigma=True).astype(np.float32)


# --- latent projection ---------------------------------------------------------------------


def cube_rotations() -> list[CubeRotation]:
    """The 24 rotations of a cube as (axis order, flipped axes): exact on a voxel grid."""
    rotations = []
    for order in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            matrix = np.eye(3)[list(order)] * np.where(flips, -1, 1)[:, None]
            if round(np.linalg.det(matrix)) == 1:  # proper rotations only, no mirror images
                rotations.append((order, flips))
    return rotations


def rotate_cube(volume: np.ndarray, rotation: CubeRotation) -> np.ndarray:
    """``volume`` (D, H, W) turned by a cube rotation (``cube_rotations``)."""
    order, flips = rotation
    turned = np.transpose(volume, order)
    return np.flip(turned, [axis for axis, flip in enumerate(flips) if flip])


def unrotate_cube(volume: np.ndarray, rotation: CubeRotation) -> np.ndarray:
    """The inverse of ``rotate_cube``: ``unrotate_cube(rotate_cube(v, r), r) == v``."""
    order, flips = rotation
    unflipped = np.flip(volume, [axis for axis, flip in enumerate(flips) if flip])
    return np.transpose(unflipped, np.argsort(order))


def project(volume: np.ndarray, model, noise_sd: float, *, rotations: bool = False,
            passes: int = 1, input_scale: str = "clean", output_scale: str = "clean",
            device=None, batch_size: int = 4, progress: Progress | None = None,
            should_stop: StopCheck | None = None) -> np.ndarray:
    """Latent projection: the model encodes the map and decodes it from its codes.

    The model learned clean z-scored maps, so the map is brought to that scale first: its mean
    removed, divided by the clean s.d. (``clean_sd``: √(var − σ²)), so its signal has unit
    variance under the noise. The output is a clean map's estimate on that scale, so it is
    multiplied by the same clean s.d. and the mean added back. Dividing (``input_scale``) or
    multiplying (``output_scale``) by the noisy map's s.d. instead ("noisy"), as the reconstruct
    path does, is kept for the ablation: multiplying by it inflates the result by √(1 + 1/SNR).

    ``rotations``: average the projections of the 24 cube rotations of the map, each turned back
    (``cube_rotations``). ``passes``: project the result again this many times in all.

    Shape: volume (D, H, W), the model's box; the result likewise, in the volume's units.
    """
    from .engine import choose_device, reconstruct

    if device is None or isinstance(device, str):
        device = choose_device(device or "auto")
    volume = np.asarray(volume, np.float32)
    box = getattr(getattr(model, "config", None), "volume_size", None)
    if box is not None and volume.shape != (box,) * 3:
        raise ValueError(f"The model takes {box}³ volumes; this one is {volume.shape}. Preprocess "
                         "the map for the checkpoint's input contract first.")
    mean, noisy_sd = float(volume.mean()), float(volume.std())
    scales = {"clean": clean_sd(volume, noise_sd), "noisy": noisy_sd}
    if {input_scale, output_scale} - set(scales) or passes < 1:
        raise ValueError(f"input_scale and output_scale are 'clean' or 'noisy', passes at least "
                         f"1; got {input_scale!r}, {output_scale!r}, {passes}.")
    turns = cube_rotations() if rotations else cube_rotations()[:1]  # the first is the identity
    x_DHW = (volume - mean) / scales[input_scale]
    total = passes * len(turns)
    for p in range(passes):
        x_RDHW = np.stack([rotate_cube(x_DHW, r) for r in turns])
        step = None if progress is None else (
            lambda done, _, p=p: progress(p * len(turns) + done, total, "projecting"))
        out = reconstruct(model, x_RDHW, device, batch_size, step, should_stop)
        y_RDHW = out[model.variants[0]]
        x_DHW = np.mean([unrotate_cube(y, r) for y, r in zip(y_RDHW, turns)], axis=0)
    return (x_DHW * scales[output_scale] + mean).astype(np.float32)


# --- one entry point -----------------------------------------------------------------------


@dataclass
class Job:
    """What a method may use besides the volume and its own parameters."""

    noise_sd: float | None = None
    model: object = None
    device: object = None
    progress: Progress | None = None
    should_stop: StopCheck | None = None


@dataclass(frozen=True)
class Method:
    """A denoising method: ``run(volume, params, job)`` and its parameters' defaults."""

    run: Callable[[np.ndarray, dict, Job], np.ndarray]
    summary: str
    defaults: dict = field(default_factory=dict)
    needs_noise_sd: bool = False
    needs_model: bool = False


def _run_projection(volume: np.ndarray, params: dict, job: Job) -> np.ndarray:
    return project(volume, job.model, job.noise_sd, device=job.device, progress=job.progress,
                   should_stop=job.should_stop, **params)


METHODS: dict[str, Method] = {
    "band-pass": Method(lambda v, p, job: band_pass(v, **p),
                        "the paper's band-pass, 0.01–0.25 cycles/voxel",
                        {"lowpass": 0.25, "highpass": 0.01}),
    "gaussian": Method(lambda v, p, job: gaussian(v, **p),
                       "Gaussian low-pass, width (voxels) tuned on validation maps",
                       {"sigma": DEFAULT_GAUSSIAN_SIGMA}),
    "nl-means": Method(lambda v, p, job: nl_means(v, job.noise_sd, **p),
                       "3-D non-local means (scikit-image), h = 0.8 σ",
                       {"h_factor": 0.8, "patch_size": 5, "patch_distance": 6},
                       needs_noise_sd=True),
    "wavelet": Method(lambda v, p, job: wavelet(v, job.noise_sd, **p),
                      "BayesShrink wavelet denoiser (scikit-image)", needs_noise_sd=True),
    "swan": Method(_run_projection, "latent projection through the checkpoint",
                   {"rotations": False, "passes": 1, "input_scale": "clean",
                    "output_scale": "clean"}, needs_noise_sd=True, needs_model=True),
    "swan-rotations": Method(_run_projection,
                             "latent projection averaged over the 24 rotations of the cube",
                             {"rotations": True, "passes": 1, "input_scale": "clean",
                              "output_scale": "clean"}, needs_noise_sd=True, needs_model=True),
}


def method_named(name: str) -> Method:
    """The method of ``METHODS`` called ``name``, or a ValueError that lists them."""
    if name not in METHODS:
        raise ValueError(f"Unknown denoising method {name!r}; choose one of "
                         f"{', '.join(METHODS)}.")
    return METHODS[name]


@dataclass
class Denoised:
    """A denoised volume (D, H, W) float32, with the method and every parameter it ran with
    (``noise_sd`` and ``noise_sd_from``, "given" or "estimated", for methods that use it)."""

    volume: np.ndarray
    method: str
    params: dict


def denoise(volume: np.ndarray, method: str, *, model=None, params: dict | None = None,
            noise_sd: float | None = None, device=None, progress: Progress | None = None,
            should_stop: StopCheck | None = None) -> Denoised:
    """Denoise one volume with a method of ``METHODS``.

    Args:
        volume: (D, H, W); for the model methods, the model's box (z-scored or not: results
            come back in the volume's units).
        model: an ``Autoencoder`` (``LoadedCheckpoint.model``), for ``swan`` and
            ``swan-rotations``.
        params: overrides of the method's defaults (``METHODS[method].defaults``).
        noise_sd: the noise s.d., when known; else methods that need it estimate it.
        progress: called as (done, total, message).
        should_stop: checked before the work and between model batches; True raises
            ``engine.Cancelled``.
    """
    spec = method_named(method)
    unknown = set(params or {}) - set(spec.defaults)
    if unknown:
        raise ValueError(f"{method} has no parameter {', '.join(sorted(unknown))}; it takes "
                         f"{', '.join(spec.defaults) or 'none'}.")
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3:
        raise ValueError(f"Denoising needs one 3-D volume; got shape {volume.shape}.")
    if spec.needs_model and model is None:
        raise ValueError(f"{method} needs a model: choose an autoencoder checkpoint.")
    report = progress or (lambda done, total, message: None)
    if should_stop is not None and should_stop():
        raise Cancelled()
    resolved = {**spec.defaults, **(params or {})}
    recorded = dict(resolved)
    if spec.needs_noise_sd:
        recorded["noise_sd_from"] = "given" if noise_sd is not None else "estimated"
        noise_sd = estimate_noise_sd(volume) if noise_sd is None else float(noise_sd)
        recorded["noise_sd"] = noise_sd
    report(0, 1, method)
    job = Job(noise_sd, model, device, progress, should_stop)
    out = spec.run(volume, resolved, job)
    report(1, 1, "done")
    return Denoised(np.asarray(out, np.float32), method, recorded)


# --- a whole map, as the Denoise widget runs it ----------------------------------------------


@dataclass
class Judged:
    """A volume in the model's box, in the input map's density units, with its FSC and voxel
    metrics against the reference (``DenoisedMap.reference``)."""

    box: np.ndarray
    fsc: FSCCurve
    metrics: dict[str, float]


@dataclass
class DenoisedMap:
    """A map denoised in the model's box (the checkpoint's input contract).

    ``reference`` is the preprocessed input, in its density units: the clean map when noise was
    added first (``snr``), so the FSC and the metrics then say how well the method restored it;
    without added noise they say how much the method changed the map. ``params`` are the
    method's parameters as it ran them, on the normalised box (``noise_sd`` in its units).
    """

    record: PreprocessRecord
    method: str
    params: dict
    reference: np.ndarray
    denoised: Judged
    noisy: Judged | None = None  # the input with the noise added, when it was
    snr: float | None = None
    seed: int | None = None
    model: str | None = None
    checkpoint: str | None = None
    checkpoint_id: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def placement(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(scale, translate) in Å, (z, y, x), that lay the box over the input map."""
        return self.record.placement

    def summary(self) -> str:
        """One line for the user: how the result compares with its reference."""
        def judged(j: Judged) -> str:
            if not np.isfinite(j.metrics["psnr"]):
                return "identical"
            return (f"PSNR {j.metrics['psnr']:.1f} dB, FSC 0.5 at "
                    f"{j.fsc.resolution(0.5).format()}")

        if self.noisy is None:
            return f"Against the input (how much it changed): {judged(self.denoised)}."
        return (f"Against the clean map: noisy {judged(self.noisy)}; denoised "
                f"{judged(self.denoised)}.")


def denoise_map(density: DensityMap, settings: PreprocessSettings, method: str, *,
                checkpoint: LoadedCheckpoint | None = None, snr: float | None = None, seed=0,
                params: dict | None = None, device=None, stage: Progress | None = None,
                should_stop: StopCheck | None = None) -> DenoisedMap:
    """Preprocess a map (``settings``: the checkpoint's input contract), optionally add noise at
    ``snr`` (``add_noise`` on the normalised box, with ``seed``), denoise it with ``method`` and
    judge the result against the preprocessed input.

    Every method returns its result in the units of the box it is given, and the noise is added
    after the normalisation, so undoing the normalisation (``denormalise``) brings the result to
    the input's density units: linear bookkeeping, right with or without noise. The scale that
    matters is the model's, and ``project`` sets it from the clean s.d. (``clean_sd``), not from
    the noisy map's, which would inflate the result. With noise added its s.d. is known and
    given to the method; otherwise the method estimates it.

    Args:
        density: a map with a voxel size.
        checkpoint: for the methods that need a model.
        stage: called as (done, total, message) as the work advances.
        should_stop: checked between the steps and between the model's batches; True raises
            ``engine.Cancelled``.
    """
    from .metrics import fsc, voxel_metrics
    from .preprocess import denormalise, preprocess

    spec = method_named(method)
    if spec.needs_model and checkpoint is None:
        raise ValueError(f"{method} needs a model: choose an autoencoder checkpoint.")
    report = stage or (lambda done, total, message: None)
    total = 100  # percent: the method's own progress fills most of the bar

    def check():
        if should_stop is not None and should_stop():
            raise Cancelled()

    def method_progress(done: int, steps: int, message: str) -> None:
        detail = f" ({message} {done} of {steps})" if steps > 1 else ""
        report(15 + (80 * done) // max(steps, 1), total, f"denoising with {method}{detail}")

    check()
    report(0, total, "preprocessing")
    prepared = preprocess(density, settings)
    clean, record = prepared.data, prepared.record
    given = clean
    noise_sd = None
    if snr is not None:
        check()
        report(10, total, f"adding noise at SNR {snr:g}")
        noise_sd = noise_sd_for(clean, snr)
        given = add_noise(clean, snr, seed)
    check()
    report(15, total, f"denoising with {method}")
    model = None if checkpoint is None else checkpoint.model
    result = denoise(given, method, model=model, params=params, noise_sd=noise_sd, device=device,
                     progress=method_progress, should_stop=should_stop)
    check()
    report(95, total, "measuring the FSC and the metrics")
    reference = denormalise(clean, record)

    def judge(volume: np.ndarray) -> Judged:
        box = denormalise(volume, record)
        curve = fsc(box, reference, settings.voxel_size).up_to(record.source_nyquist)
        return Judged(box, curve, voxel_metrics(volume, clean))

    uses_model = spec.needs_model and checkpoint is not None
    out = DenoisedMap(
        record=record, method=method, params=result.params, reference=reference,
        denoised=judge(result.volume), noisy=None if snr is None else judge(given),
        snr=snr, seed=None if snr is None else seed,
        model=checkpoint.model.name if uses_model else None,
        checkpoint=str(checkpoint.path) if uses_model else None,
        checkpoint_id=checkpoint.checkpoint_id if uses_model else None)
    out.notes += filter(None, [record.cut_off_note()])
    altered = [f"low-passed at {record.lowpass_cutoff:g} Å"] if record.lowpass_cutoff else []
    altered += ["padded with zeros"] if np.any(record.padding) else []
    if result.params.get("noise_sd_from") == "estimated" and altered:
        out.notes.append(
            f"The noise s.d. was estimated in the model's box, where the map was "
            f"{' and '.join(altered)}: the estimate assumes white noise everywhere, so it is "
            "likely too low and the method too gentle.")
    report(total, total, "done")
    return out
