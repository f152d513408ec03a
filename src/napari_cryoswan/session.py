"""The one door into the core: a ``Session`` holds the device, the loaded checkpoints and the
use cases that widgets and command-line tools call.

There is one session per napari viewer (``Session.for_viewer``) and one per command-line run.
Widgets import only this module and ``layers``; everything a use case needs (preprocessing for
the checkpoint's input contract, the device, the models) is decided here, off the UI thread.
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path

from ._atomic import atomic_path as write_atomically  # noqa: F401 (for widgets that save files)
from .checkpoint import CheckpointError, LoadedCheckpoint, checkpoint_file, load_checkpoint
from .denoise import METHODS as DENOISE_METHODS  # names and summaries, for the widgets
from .denoise import DenoisedMap, denoise_map, method_named
from .engine import Cancelled  # noqa: F401 (what a cancelled use case raises, for the widgets)
from .explorer import (  # noqa: F401 (the explorer's pure helpers, for its widget)
    DecodedEntry,
    ExplorerError,
    ExplorerIndex,
    Projection,
    SimilarMaps,
    entry_layer_data,
    entry_layer_name,
    entry_metadata,
    grid_translations,
    nearest_to_centre,
    rows_in_box,
    rows_in_polygon,
)
from .generate import DEFAULT_STEPS, DEFAULT_STRENGTH, GenerationResult, LoadedDiffusion
from .index import LatentIndexError
from .io import DensityMap
from .reconstruction import (
    ReconstructionResult,
    Stage,
    describe_preprocessing,
    input_concerns,
    reconstruct_map,
)

DEVICES = ("auto", "cpu", "cuda")
CONTROL_VARIANT = "RQ1"  # what the separately trained RQ1-only model decodes
# Its label beside the full model, which may decode an in-model "RQ1" of its own.
CONTROL_LABEL = "RQ1 control"

_viewer_sessions: dict[int, Session] = {}


class Session:
    """Device, checkpoint cache and use cases for one viewer or one command-line run.

    Checkpoints are read and hashed once per file version (path, size, modification time) and
    their models kept; a changed file is read again. Safe to call from worker threads.
    """

    def __init__(self, device: str = "auto"):
        self.device_name = device
        self._checkpoints: dict[tuple, LoadedCheckpoint] = {}
        self._indexes: dict[tuple, ExplorerIndex] = {}
        self._diffusions: dict[tuple, LoadedDiffusion] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_viewer(cls, viewer) -> Session:
        """The viewer's session, made on first use and dropped with the viewer."""
        key = id(viewer)
        if key not in _viewer_sessions:
            _viewer_sessions[key] = cls()
            weakref.finalize(viewer, _viewer_sessions.pop, key, None)
        return _viewer_sessions[key]

    @property
    def device(self):
        from .engine import choose_device

        return choose_device(self.device_name)

    def checkpoint(self, path: str | os.PathLike, kind: str = "autoencoder") -> LoadedCheckpoint:
        """The checkpoint at ``path``, read once and then served from memory."""
        loaded = self._cached(self._checkpoints, path, lambda p: load_checkpoint(p, kind=kind))
        if loaded.kind != kind:
            raise CheckpointError(
                f"{Path(path).name} holds a {loaded.kind} model, not an {kind}. "
                f"Choose an {kind} checkpoint.")
        return loaded

    def _cached(self, cache: dict, path: str | os.PathLike, load):
        """``load(path)``, once per version (path, size, modification time) of the file."""
        key = _file_version(path)
        with self._lock:
            if key not in cache:
                cache[key] = load(path)
            return cache[key]

    def cached_checkpoint(self, path: str | os.PathLike) -> LoadedCheckpoint | None:
        """The checkpoint if it is already in memory (never reads a file: for the UI thread)."""
        try:
            return self._checkpoints.get(_file_version(path))
        except CheckpointError:
            return None

    # --- use cases -----------------------------------------------------------------------

    def describe_reconstruction(self, density: DensityMap, checkpoint: str | os.PathLike,
                                contour_level: float | None = None) -> tuple[str, list[str]]:
        """(what preprocessing will do, why the map may be far from the training data).

        Uses the checkpoint's input contract when it is loaded, else the paper's, and says so.
        """
        from .checkpoint import InputContract
        from .preprocess import PreprocessSettings

        loaded = self.cached_checkpoint(checkpoint)
        contract = loaded.contract if loaded else InputContract.of(PreprocessSettings())
        settings = contract.settings(contour_level)
        text = describe_preprocessing(density, settings)
        if loaded is None:
            text += " (the checkpoint's own input contract is read when it runs)"
        return text, input_concerns(density, settings)

    def reconstruct(
        self,
        density: DensityMap,
        checkpoint: str | os.PathLike,
        control: str | os.PathLike | None = None,
        *,
        contour_level: float | None = None,
        stage: Stage | None = None,
        should_stop=None,
        by_scale: bool = False,
    ) -> ReconstructionResult:
        """Reconstruct a map with a checkpoint and, optionally, its RQ1-only control, whose
        reconstruction is labelled ``CONTROL_LABEL``.

        The preprocessing is the checkpoint's input contract; ``contour_level`` masks the map
        first. Warnings about the input are in ``result.notes``. ``by_scale`` also decodes the
        checkpoint after each perception scale (``result.by_scale``).
        """
        report = stage or (lambda done, total, message: None)
        report(0, 1, "loading the checkpoint")
        loaded = [self.checkpoint(checkpoint)]
        if control is not None:
            loaded.append(self.checkpoint(control))
            check_control(loaded[0], loaded[1])
        contract = loaded[0].contract
        if by_scale and not hasattr(loaded[0].model, "reconstructions_by_scale"):
            raise CheckpointError(f"{loaded[0].path.name} holds a '{loaded[0].model.name}' model, which "
                                  "has no perception scales to decode one by one. Untick that option.")
        result = reconstruct_map(density, loaded, contract.settings(contour_level), self.device,
                                 stage=stage, should_stop=should_stop, by_scale=by_scale)
        for variant in result.variants[len(loaded[0].model.variants):]:
            variant.variant = CONTROL_LABEL
        # The run measured the density outside the box: its note replaces the estimate.
        result.notes[:0] = input_concerns(density, contract.settings(contour_level),
                                          estimate_outside=False)
        return result

    def describe_denoising(self, density: DensityMap, checkpoint: str | os.PathLike | None,
                           method: str) -> tuple[str, list[str]]:
        """``describe_reconstruction`` for a denoising method: the model methods preprocess for
        their checkpoint, the classical ones for the paper's box (64³ at 4 Å), where their
        results can be compared with the model's."""
        from .preprocess import PreprocessSettings

        if density.voxel_size is None:
            return "No voxel size: enter the map's voxel size (Å per voxel) to denoise it.", []
        if method_named(method).needs_model:
            return self.describe_reconstruction(density, checkpoint)
        settings = PreprocessSettings()
        return (describe_preprocessing(density, settings),
                input_concerns(density, settings, for_model=False))

    def denoise(
        self,
        density: DensityMap,
        checkpoint: str | os.PathLike | None,
        method: str,
        *,
        snr: float | None = None,
        seed=0,
        params: dict | None = None,
        stage: Stage | None = None,
        should_stop=None,
    ) -> DenoisedMap:
        """Denoise a map with a method of ``DENOISE_METHODS`` in the model's box.

        With ``snr``, noise at that SNR (and ``seed``) is added to the preprocessed map first and
        the clean map is the reference; otherwise the result is judged against the input. Only
        the model methods read ``checkpoint``; the classical ones work on the paper's box (64³
        at 4 Å). Warnings about the input are in ``result.notes``.
        """
        from .preprocess import PreprocessSettings

        loaded, settings, device = None, PreprocessSettings(), None
        uses_model = method_named(method).needs_model
        if uses_model:
            (stage or (lambda done, total, message: None))(0, 1, "loading the checkpoint")
            loaded = self.checkpoint(checkpoint)
            settings, device = loaded.contract.settings(), self.device
        result = denoise_map(density, settings, method, checkpoint=loaded, snr=snr, seed=seed,
                             params=params, device=device, stage=stage, should_stop=should_stop)
        result.notes[:0] = input_concerns(density, settings, estimate_outside=False,
                                          for_model=uses_model)
        return result

    # --- generation ----------------------------------------------------------------------

    def diffusion_path(self, autoencoder: str | os.PathLike, diffusion: str | os.PathLike | None) -> Path:
        """The diffusion checkpoint to use: the one given, else the one beside the autoencoder
        (``swan.pt`` → ``swan.diffusion.pt``, which the bundled Cryo-SWAN ships).

        Raises:
            CheckpointError: none given and none beside the autoencoder; says how to train one.
        """
        from .generate import diffusion_beside

        if diffusion is not None and str(diffusion).strip() not in ("", "."):
            return Path(diffusion)
        return diffusion_beside(checkpoint_file(autoencoder), shown_as=str(autoencoder))

    def describe_generation(self, density: DensityMap, autoencoder: str | os.PathLike,
                            diffusion: str | os.PathLike | None) -> tuple[str, list[str]]:
        """``describe_reconstruction``, plus which diffusion model will make the variants (or
        why there is none)."""
        text, concerns = self.describe_reconstruction(density, autoencoder)
        try:
            text += f" Variants from {self.diffusion_path(autoencoder, diffusion).name}."
        except CheckpointError as err:
            concerns = [" ".join(str(err).split()), *concerns]
        return text, concerns

    def generate(self, density: DensityMap, autoencoder: str | os.PathLike,
                 diffusion: str | os.PathLike | None = None, *, n: int = 4,
                 strength: float = DEFAULT_STRENGTH, seed: int = 0, steps: int = DEFAULT_STEPS,
                 contour_level: float | None = None,
                 stage: Stage | None = None, should_stop=None) -> GenerationResult:
        """``n`` variants of an anchor map on its own grid (``generate.generate_variants``).

        ``diffusion``: a diffusion checkpoint trained on ``autoencoder``'s latents; None for the
        one beside the autoencoder. Any other pairing is refused with what to do.
        """
        from .generate import generate_variants, load_diffusion

        report = stage or (lambda done, total, message: None)
        report(0, 1, "loading the checkpoints")
        loaded = self.checkpoint(autoencoder)
        model = self._cached(self._diffusions, self.diffusion_path(autoencoder, diffusion), load_diffusion)

        def progress(done, total):
            report(done, total, f"denoising the latents of {n} variant{'s' * (n > 1)}")

        return generate_variants(density, model, loaded, n=n, strength=strength, seed=seed, steps=steps,
                                 contour_level=contour_level, device=self.device,
                                 progress=progress, should_stop=should_stop)

    # --- the latent explorer -------------------------------------------------------------

    def open_index(self, path: str | os.PathLike | None = None,
                   checkpoint: str | os.PathLike | None = None) -> ExplorerIndex:
        """A latent index opened for exploring, with the checkpoint that built it; read once per
        version of its manifest and then served from memory (with its projection).

        Args:
            path: an index folder; None (or '') for the one shipped in the package.
            checkpoint: the checkpoint the index was built with. Not needed for an index of a
                bundled checkpoint, nor when that checkpoint file lies in or beside the index
                folder; any other checkpoint is refused.

        Raises:
            LatentIndexError: no bundled index, not an index, a damaged one, or one that this
                checkpoint (or this installation's bundled one, or its embedding head) did not
                build; the message says what to do.
        """
        from .index import bundled_index_path, open_index_for, read_manifest

        bundled = path is None or str(path).strip() in ("", ".")
        folder = bundled_index_path() if bundled else Path(path)
        if not folder.is_dir():
            raise LatentIndexError(f"{folder}: no such folder. Choose a latent index folder "
                                   "(python -m training.build_index builds one).")
        manifest = read_manifest(folder)
        stat = (folder / "manifest.json").stat()
        given = None if checkpoint is None or str(checkpoint).strip() in ("", ".") else str(checkpoint)
        key = (str(folder.resolve()), stat.st_mtime_ns, stat.st_size, given)
        with self._lock:
            cached = self._indexes.get(key)
        if cached is not None:
            return cached
        loaded = self._index_checkpoint(manifest, folder, given)
        explorer = ExplorerIndex(open_index_for(folder, loaded), loaded,
                                 "bundled index" if bundled else folder.name)
        with self._lock:
            self._indexes = {k: v for k, v in self._indexes.items() if k[0] != key[0]}
            self._indexes[key] = explorer
        return explorer

    def explore(self, explorer: ExplorerIndex, *, refit: bool = False, seed: int | None = None,
                stage: Stage | None = None) -> Projection:
        """The index's UMAP and hubs: stored with the index (read, or fitted once and stored
        there; ``explorer.projection_of``), kept with the opened index."""
        from .explorer import projection_of

        if explorer.projection is None or refit or (seed is not None and explorer.projection.meta.get("seed") != seed):
            explorer.projection = projection_of(explorer.index, seed=seed, refit=refit, progress=stage)
            if explorer.projection.note:
                explorer.notes = [explorer.projection.note]
        return explorer.projection

    def find_similar(self, density: DensityMap, explorer: ExplorerIndex, k: int = 8, *,
                     contour_level: float | None = None, decode: bool = True,
                     should_stop=None, stage: Stage | None = None) -> SimilarMaps:
        """The ``k`` maps of the index nearest to a map: preprocessed for the index's checkpoint
        contract, embedded with the index's own embedder, placed on its projection; with
        ``decode``, the neighbours are decoded for display (``result.maps``)."""
        from .explorer import find_similar

        self.explore(explorer, stage=stage)
        return find_similar(explorer, density, k=k, device=self.device, contour_level=contour_level,
                            decode=decode, stage=stage, should_stop=should_stop)

    def open_neighbours(self, explorer: ExplorerIndex, rows, *, should_stop=None,
                        stage: Stage | None = None) -> list[DecodedEntry]:
        """Index entries (rows, or ``index.Neighbour`` from ``explorer.neighbours``, hub members
        or a search) decoded from their codes, with their metadata and distance."""
        from .explorer import decode_rows

        return decode_rows(explorer, list(rows), device=self.device, stage=stage, should_stop=should_stop)

    def _index_checkpoint(self, manifest: dict, folder: Path, given: str | None) -> LoadedCheckpoint:
        """The checkpoint an index records: the one given (which must be it), the bundled one
        it names, one already loaded with its id, or its file in or beside the index folder."""
        from .index import BUILD_COMMAND

        recorded = manifest["checkpoint"]
        built_with = f"{recorded['file']} (id {recorded['id']})"
        if given is not None:
            loaded = self.checkpoint(given)
            if loaded.checkpoint_id != recorded["id"]:
                raise LatentIndexError(
                    f"{folder} was built with the checkpoint {built_with}, not with "
                    f"{loaded.path.name} (id {loaded.checkpoint_id}): its distances and codes mean "
                    f"nothing to another model. Choose {recorded['file']}, or rebuild the index for "
                    f"this checkpoint: {BUILD_COMMAND}.")
            return loaded
        if recorded.get("bundled"):
            from .checkpoint import bundled_checkpoint_path

            loaded = self.checkpoint(bundled_checkpoint_path(recorded["bundled"]))
            if loaded.checkpoint_id != recorded["id"]:
                raise LatentIndexError(
                    f"{folder} was built with the bundled {recorded['bundled']} checkpoint {recorded['id']}, "
                    f"but this installation's is {loaded.checkpoint_id}: rebuild the index "
                    f"({BUILD_COMMAND}), or choose the checkpoint file it was built with.")
            return loaded
        with self._lock:
            for loaded in self._checkpoints.values():
                if loaded.checkpoint_id == recorded["id"] and loaded.kind == "autoencoder":
                    return loaded
        for candidate in (folder / recorded["file"], folder.parent / recorded["file"]):
            if candidate.is_file():
                loaded = self.checkpoint(candidate)
                if loaded.checkpoint_id == recorded["id"]:
                    return loaded
        raise LatentIndexError(
            f"{folder} was built with the checkpoint {built_with}, which is not a bundled one: "
            "choose that checkpoint file to open it.")


def bundled_checkpoint(name: str) -> str:
    """The path of a checkpoint shipped in the package, or '' when this installation lacks it."""
    from .checkpoint import bundled_checkpoint_path

    try:
        return str(bundled_checkpoint_path(name))
    except CheckpointError:
        return ""


def fsc_of_maps(a: DensityMap, b: DensityMap) -> dict:
    """The FSC of two maps on one grid, as ``FSCCurve.to_dict()`` (what layer metadata holds)."""
    from .metrics import fsc_between_maps

    return fsc_between_maps(a, b).to_dict()


def save_fsc_curves(path: str | os.PathLike, curves: dict[str, dict]) -> Path:
    """Write FSC curves (label → ``FSCCurve.to_dict()``) as CSV, atomically."""
    from .metrics import fsc_curves_csv

    path = Path(path)
    with write_atomically(path) as tmp:
        Path(tmp).write_text(fsc_curves_csv(curves))
    return path


def parse_accession(text: str) -> str:
    """'EMD-1234' from 'EMD-1234', 'emd_1234', '1234' or 'emdb:1234'; ValueError otherwise."""
    from . import emdb

    return emdb.parse_accession(text)


def open_emdb_entry(accession: str, progress=None, should_stop=None):
    """An EMDB entry's map, from the cache or downloaded: (``emdb.EmdbMap``, its layer data,
    the warnings raised while reading it, to be shown from the UI thread)."""
    from ._reader import read_density_layers_quietly
    from .emdb import fetch_entry

    entry = fetch_entry(accession, progress=progress, should_stop=should_stop)
    layer_data, notices = read_density_layers_quietly(entry.path, entry.layer_metadata())
    return entry, layer_data, notices


def check_control(main: LoadedCheckpoint, control: LoadedCheckpoint) -> None:
    """The control must be an RQ1-only model trained for the same input as the main one."""
    if tuple(control.model.variants) != (CONTROL_VARIANT,):
        raise CheckpointError(
            f"The RQ1 checkpoint {control.path.name} holds a '{control.model.name}' model, which "
            f"decodes {', '.join(control.model.variants)}, not the RQ1-only Cryo-SWAN ablation. "
            "Choose a swan-rq1 checkpoint, or untick the RQ1 comparison.")
    if control.contract != main.contract:
        raise CheckpointError(
            f"The RQ1 checkpoint {control.path.name} was trained on {_contract_text(control)} maps "
            f"and {main.path.name} on {_contract_text(main)}: they cannot reconstruct the same "
            "input. Choose checkpoints trained on the same corpus.")


def _contract_text(loaded: LoadedCheckpoint) -> str:
    return f"{loaded.contract.box}³ at {loaded.contract.voxel_size:g} Å"


def _file_version(path: str | os.PathLike) -> tuple:
    path = checkpoint_file(path)
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
