"""Conversions between maps, results and napari layer data (no Qt, no napari import).

Layers are the interface between widgets. The metadata keys below are a contract (see
docs/ARCHITECTURE.md): a result layer says where it came from, so any widget can use it.

    source_layer      name of the map layer a result was computed from
    source_layer_id   that layer's napari ``unique_id``
    variant           which reconstruction: "RQ1+RQ2", "RQ1" (in-model), "RQ1 control",
                      "RQ1+RQ2 − input", …; a denoising's "denoised (nl-means)", "noisy (SNR 0.5)"
    method, params    a denoising's method and its parameters as it ran them (on the normalised
                      box: noise_sd in its units; noise_sd_from "given" or "estimated")
    snr, seed         the noise added before denoising, when it was (the reference is then the
                      clean map); a generated variant's seed
    model             registry name of the model ("swan", "swan-rq1", …)
    checkpoint        path of the checkpoint file; checkpoint_id its content hash
    preprocessing     the PreprocessRecord as a dict (where the model's box sits, in Å)
    fsc               FSCCurve.to_dict() of the result against the preprocessed input (the
                      clean map, when noise was added; the anchor, for a generated variant)
    fsc_against       what ``fsc`` compares with when it is not the input ("anchor", "clean map")
    strength, steps   a generated variant's SDEdit strength and DDIM steps (its seed in ``seed``)
    autoencoder_checkpoint_id   the autoencoder whose latents a diffusion model learned
    metrics           voxel metrics against the preprocessed input
    notes             what the user was told about the input (density cut off, …)
    voxel_size, origin   the geometry of the source map, in Å (z, y, x)
    recommended_contour  a map's author-recommended contour level, when known (EMDB)
"""

from __future__ import annotations

import numpy as np

from .io import DensityMap

NAME_LENGTH = 18  # a source name longer than this is shortened in result names
_LENGTH_IN_ANGSTROM = {"angstrom": 1.0, "nanometer": 10.0, "picometer": 0.01}


def density_layer_data(density: DensityMap, name: str, metadata: dict | None = None,
                       **kwargs) -> tuple:
    """A napari LayerData tuple that places the map in Å, with its header in the metadata.

    Shown in 3-D as an iso-surface at a contour level (the map's recommended one when known),
    as ChimeraX opens a map; the layer controls change the level.
    """
    voxel_known = density.voxel_size is not None
    layer_metadata = {**density.header, **(metadata or {})}
    layer_kwargs = {
        "name": name,
        "scale": density.voxel_size if voxel_known else (1.0, 1.0, 1.0),
        "translate": density.origin,
        "units": ("angstrom",) * 3 if voxel_known else ("pixel",) * 3,
        "metadata": layer_metadata,
        "colormap": "gray",
        "rendering": "iso",
        "iso_threshold": default_contour(density.data, layer_metadata.get("recommended_contour")),
        **kwargs,
    }
    return (density.data, layer_kwargs, "image")


def default_contour(data: np.ndarray, recommended: float | None = None) -> float:
    """The contour level a map opens at: its recommended level, else mean + 2 s.d., which
    encloses a particle's density and leaves the solvent noise of an EMDB box outside."""
    if recommended is not None:
        return float(recommended)
    sample = np.asarray(data[tuple(slice(None, None, max(1, n // 128)) for n in data.shape)])
    level, top = float(sample.mean() + 2.0 * sample.std()), float(sample.max())
    # A small box filled with density (EMD-3197: a 20³ membrane patch) can have no voxel above
    # mean + 2 s.d., and the map would open invisible: halfway from the mean to the top instead.
    return level if level < top else float(sample.mean() + 0.5 * (top - sample.mean()))


def voxel_size_of(scale, units) -> tuple[float, float, float] | None:
    """A layer's voxel size in Å, or None when it has none.

    The one rule: a layer whose units are lengths has a voxel size (converted to Å); a layer in
    pixel units has one only when someone set its scale away from 1, which is then read as Å.
    A map read without a voxel size is in pixel units at scale 1, so it has none until the user
    gives one, by the widget's voxel size field or the layer's scale.
    """
    scale = tuple(float(s) for s in scale)
    factors = [_LENGTH_IN_ANGSTROM.get(str(unit)) for unit in units]
    if all(f is not None for f in factors):
        return tuple(s * f for s, f in zip(scale, factors))
    if any(s != 1.0 for s in scale):
        return scale
    return None


def density_from_layer(layer) -> DensityMap:
    """The map an image layer shows: its data, voxel size (``voxel_size_of``) and origin.

    The data is not copied when it is float32 already (a memory-mapped map stays on disk).
    """
    data = np.asarray(layer.data)
    if data.ndim != 3:
        raise ValueError(f"Layer '{layer.name}' is {data.ndim}-D; a density map is 3-D.")
    if data.dtype != np.float32:
        data = data.astype(np.float32)
    return DensityMap(
        data=data,
        voxel_size=voxel_size_of(layer.scale, layer.units),
        origin=tuple(float(t) for t in layer.translate),
        header=dict(layer.metadata),
    )


def short_name(name: str, length: int = NAME_LENGTH) -> str:
    """A layer name short enough to stay readable in the layer list: a trailing note in
    parentheses goes first, then the end of the name."""
    if len(name) > length and name.endswith(")") and " (" in name:
        name = name[: name.rindex(" (")]
    return name if len(name) <= length else name[: length - 1] + "…"


def reconstruction_layer_data(source_name: str, source_id: str, result, contour: float | None) -> list[tuple]:
    """LayerData for each reconstruction and for the difference map of the first (full) one.

    Each lies on the model's box grid, placed by its scale and translate over the source map;
    the full metadata names the source, so short layer names lose nothing.
    """
    scale, translate = result.placement
    common = _provenance(source_name, source_id, result)
    stem = short_name(source_name)
    out = []
    for variant in result.variants:
        metadata = {**common, "variant": variant.variant, "model": variant.model,
                    "checkpoint": variant.checkpoint, "checkpoint_id": variant.checkpoint_id,
                    "fsc": variant.fsc.to_dict(), "metrics": variant.metrics}
        density = DensityMap(variant.box, scale, translate)
        out.append(density_layer_data(density, f"{stem} {variant.variant}", metadata,
                                      **_contour_kwargs(contour)))
    if result.by_scale is not None:
        out += _scale_steps_layer_data(stem, result, common, contour)
    if result.variants:
        full = result.variants[0]
        difference = result.difference(full)
        bound = float(np.abs(difference).max()) or 1.0
        metadata = {**common, "variant": f"{full.variant} − input", "model": full.model,
                    "checkpoint": full.checkpoint, "checkpoint_id": full.checkpoint_id}
        density = DensityMap(difference, scale, translate)
        out.append(density_layer_data(density, f"{stem} Δ {full.variant}", metadata,
                                      colormap="PiYG", contrast_limits=(-bound, bound),
                                      rendering="mip", visible=False))
    return out


def denoised_layer_data(source_name: str, source_id: str, result,
                        contour: float | None) -> list[tuple]:
    """LayerData for a denoising (``denoise.DenoisedMap``): the noisy map when noise was added,
    then the denoised one, each on the model's box placed over the source map."""
    scale, translate = result.placement
    common = {**_provenance(source_name, source_id, result),
              "method": result.method, "params": dict(result.params)}
    if result.snr is not None:  # noise was added: the input is the clean reference
        common.update(snr=result.snr, seed=result.seed, fsc_against="clean map")
    if result.checkpoint is not None:
        common.update(model=result.model, checkpoint=result.checkpoint,
                      checkpoint_id=result.checkpoint_id)
    stem = short_name(source_name)
    shown = [(f"denoised ({result.method})", f"denoised ({result.method})", result.denoised)]
    if result.noisy is not None:
        shown.insert(0, (f"noisy SNR {result.snr:g}", f"noisy (SNR {result.snr:g})", result.noisy))
    # One grey scale, the clean map's, so that slices of the noisy and denoised maps compare.
    low, high = float(result.reference.min()), float(result.reference.max())
    grey = {"contrast_limits": (low, high)} if high > low else {}
    out = []
    for label, variant, judged in shown:
        metadata = {**common, "variant": variant, "fsc": judged.fsc.to_dict(),
                    "metrics": judged.metrics}
        density = DensityMap(judged.box, scale, translate)
        out.append(density_layer_data(density, f"{stem} {label}", metadata,
                                      **grey, **_contour_kwargs(contour)))
    return out


def generated_layer_data(source_name: str, source_id: str, result, contour: float | None) -> list[tuple]:
    """LayerData for each variant of a generation (``generate.GenerationResult``), on the
    anchor's own grid so that it overlays the anchor; its FSC is against the anchor."""
    common = {**_provenance(source_name, source_id, result), "model": "latent-diffusion",
              "checkpoint": result.diffusion_path, "checkpoint_id": result.diffusion_id,
              "autoencoder_checkpoint_id": result.autoencoder_id, "strength": result.strength,
              "steps": result.steps, "fsc_against": "anchor"}
    stem = short_name(source_name)
    out = []
    for i, (variant, seed) in enumerate(zip(result.variants, result.seeds)):
        metadata = {**common, "variant": f"variant {i}", "seed": seed,
                    "fsc": result.fsc_to_anchor[i].to_dict(),
                    "metrics": {"correlation": result.correlation_to_anchor[i]}}
        name = f"{stem} variant {i} (s {result.strength:g}, seed {seed})"
        out.append(density_layer_data(variant, name, metadata, **_contour_kwargs(contour)))
    return out


def shown_already(layers, layer_data: tuple):
    """The layer among ``layers`` that already shows ``layer_data`` (same source, variant, place
    and voxels: the same noisy map made again by a run with the same seed), or None."""
    data, kwargs, _ = layer_data
    keys = ("source_layer_id", "variant", "snr", "seed")
    for layer in layers:
        meta = layer.metadata
        if (all(meta.get(k) == kwargs["metadata"].get(k) for k in keys)
                and np.allclose(layer.scale, kwargs["scale"])
                and np.allclose(layer.translate, kwargs["translate"])
                and np.shape(layer.data) == np.shape(data) and np.array_equal(layer.data, data)):
            return layer
    return None


def _provenance(source_name: str, source_id: str, result) -> dict:
    """The metadata every result layer of a run shares: its source, preprocessing and notes."""
    record = result.record
    return {"source_layer": source_name, "source_layer_id": source_id,
            "preprocessing": record.to_dict(), "notes": list(result.notes),
            "voxel_size": tuple(record.source_voxel_size), "origin": tuple(record.source_origin)}


def _scale_steps_layer_data(stem: str, result, common: dict, contour: float | None) -> list[tuple]:
    """Two 4-D layers, (step, z, y, x), whose first axis walks through the perception scales,
    coarse to fine (``scale_steps`` names each step): the reconstruction after each step, and
    the code map of each step's own scale (hidden at first: its blocks would hide the map).

    The code map is a Labels layer of code index + 1, since napari keeps label 0 for the
    background; its ``code`` feature gives the index itself under the cursor."""
    steps = result.by_scale
    scale, translate = result.placement
    metadata = {**common, "variant": f"{result.variants[0].variant} by scale", "model": steps.model,
                "checkpoint": steps.checkpoint, "checkpoint_id": steps.checkpoint_id,
                "scale_steps": list(steps.labels)}
    placed = {"scale": (1.0, *scale), "translate": (0.0, *translate),
              "units": ("pixel", "angstrom", "angstrom", "angstrom")}
    image = {"name": f"{stem} by scale", **placed, "metadata": metadata, "colormap": "gray", "rendering": "iso",
             "iso_threshold": default_contour(steps.boxes[-1]) if contour is None else float(contour)}
    codes = int(steps.codes.max()) + 1
    labels = {"name": f"{stem} codes by scale", **placed, "visible": False, "opacity": 0.5,
              "metadata": {**metadata, "variant": f"{result.variants[0].variant} codes by scale"},
              "features": {"index": np.arange(codes + 1), "code": np.arange(-1, codes)}}
    return [(steps.boxes, image, "image"), (steps.codes + 1, labels, "labels")]


def scale_step_label(layer, world_step: float) -> str | None:
    """The perception scale that a by-scale layer shows at a position of the first axis."""
    labels = layer.metadata.get("scale_steps") if layer.ndim == 4 else None
    if not labels:
        return None
    index = int(np.clip(round((world_step - layer.translate[0]) / layer.scale[0]), 0, len(labels) - 1))
    return f"{layer.name}: after {labels[index]} (step {index + 1} of {len(labels)})"


def _contour_kwargs(contour: float | None) -> dict:
    return {} if contour is None else {"iso_threshold": float(contour)}
