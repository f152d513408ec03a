"""Train the latent diffusion model of ``napari_cryoswan.generate`` on a corpus's RQ1 latents.

    python -m training.train_diffusion --autoencoder CKPT --corpus DIR --out RUN \\
        [--steps N --batch-size B --lr LR --seed S --preset small|cpu|full --resume --device D]

The corpus's train and val splits are encoded once by the (frozen) autoencoder into
``latents.pt`` in the run folder, keyed by the autoencoder's checkpoint id and the corpus id: a
cache with another key is encoded again (and says so). The latents are standardised per channel
with the training split's mean and s.d., which the checkpoint keeps.

Training follows ``training.train``'s run-folder conventions: Adam at a constant learning rate,
the gradient norm clipped at 1, batches and noise drawn from generators seeded with (seed, step)
so that a resumed run sees what an uninterrupted one sees, EMA weights (decay ``--ema``, warmed
up as (1 + step) / (10 + step)), the validation loss of the EMA weights every ``--val-every``
steps on fixed noise, atomic checkpoints. ``--resume`` continues from ``last.pt`` and refuses a
run of another autoencoder or another model configuration.

Run folder:
    config.json        the settings, autoencoder id, corpus id
    latents.pt         the encoded corpus (cache), keyed by autoencoder id and corpus id
    train_log.csv      step, loss, volumes_per_s (latents per second)
    validation.jsonl   per validation: step, loss (EMA weights)
    last.pt            the latest checkpoint, with training state
    model.pt           the final EMA weights (what training.generate loads)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from napari_cryoswan._atomic import atomic_path
from napari_cryoswan._atomic import write_json_atomic
from training.corpus import CorpusSet
from training.train import (RunFolderError, run_command, _append_csv, _append_jsonl, _check_run_folder,
                            _interrupt_on_sigterm, _lock_run_folder, _progress_bar, _record_resume,
                            _truncate_logs)

LOG_FIELDS = ("step", "loss", "volumes_per_s")
CACHE = "latents.pt"


@dataclass
class DiffusionTrainSettings:
    autoencoder: str
    corpus: str
    out: str
    preset: str = "full"
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-4
    grad_clip: float | None = 1.0
    ema: float = 0.999
    seed: int = 0
    val_every: int = 100
    checkpoint_every: int = 100
    max_val: int = 64
    device: str = "auto"
    resume: bool = False


def parse_args(argv=None) -> DiffusionTrainSettings:
    from napari_cryoswan.generate import PRESETS
    from napari_cryoswan.session import DEVICES

    d = DiffusionTrainSettings("", "", "")
    p = argparse.ArgumentParser(prog="python -m training.train_diffusion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder", required=True,
                   help="the Cryo-SWAN checkpoint whose latents to learn (a file, or bundled:swan)")
    p.add_argument("--corpus", required=True, help="a corpus folder from training.build_corpus")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="UNet size (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ema", type=float, default=d.ema, help="EMA decay of the saved weights")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--max-val", type=int, default=d.max_val, help="validation latents used at most")
    p.add_argument("--device", default=d.device, choices=DEVICES)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.val_every < 1 or a.checkpoint_every < 1:
        p.error("--steps, --batch-size, --val-every and --checkpoint-every must be positive")
    if not 0.0 <= a.ema < 1.0:
        p.error("--ema must lie in [0, 1)")
    return DiffusionTrainSettings(
        autoencoder=a.autoencoder, corpus=a.corpus, out=a.out, preset=a.preset, steps=a.steps,
        batch_size=a.batch_size, lr=a.lr, ema=a.ema, seed=a.seed, val_every=a.val_every,
        checkpoint_every=a.checkpoint_every, max_val=a.max_val, device=a.device, resume=a.resume)


def latent_cache(out: Path, autoencoder, corpus: CorpusSet, device, *, max_val: int = 64,
                 batch_size: int = 8, progress: bool = False) -> tuple[dict, bool]:
    """The encoded train and val splits, from ``out/latents.pt`` when its key matches.

    Returns ({"key", "train", "val"}, reused). "train"/"val": (N, C, 16, 16, 16) float32.
    """
    import torch

    from napari_cryoswan.engine import map_batches
    from napari_cryoswan.generate import LEVEL

    key = {"autoencoder_id": autoencoder.checkpoint_id, "corpus_id": corpus.corpus_id, "level": LEVEL,
           "max_val": int(max_val)}
    path = out / CACHE
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                return cached, True
        except Exception:  # a damaged cache is encoded again
            pass
    model = autoencoder.model.to(device).eval()
    encoded = {"key": key}
    for split, ids in (("train", corpus.split_indices("train")),
                       ("val", corpus.interleaved_indices("val", max_val))):
        parts = []
        for start in range(0, len(ids), 64):
            volumes = corpus.load_batch(ids[start:start + 64])
            parts += map_batches(lambda x: model.encode(x).latents[LEVEL].float(), volumes, device, batch_size)
        size = model.config.latent_size(1)
        encoded[split] = (torch.cat(parts) if parts else
                          torch.zeros(0, model.config.code_dim, size, size, size)).contiguous()
        if progress:
            print(f"encoded the {split} split: {len(ids)} maps", file=sys.stderr)
    with atomic_path(path) as tmp:
        torch.save(encoded, tmp)
    return encoded, False


def train(settings: DiffusionTrainSettings, progress: bool = True) -> Path:
    """Run training as ``settings`` say; returns the path of the final weights (model.pt)."""
    import torch

    from napari_cryoswan.checkpoint import load_checkpoint, resolve_checkpoint
    from napari_cryoswan.engine import choose_device
    from napari_cryoswan.generate import PRESETS, check_generatable, latent_diffusion, load_diffusion, save_diffusion

    out = Path(settings.out)
    _check_run_folder(out, settings.resume)
    autoencoder = load_checkpoint(resolve_checkpoint(settings.autoencoder))
    check_generatable(autoencoder.model)
    last = None
    if settings.resume:  # refuse before the lock and the cache touch anything
        last = load_diffusion(out / "last.pt")
        if last.autoencoder_id != autoencoder.checkpoint_id:
            raise RunFolderError(
                f"{out} trains a diffusion model for autoencoder {last.autoencoder_id} "
                f"({last.autoencoder_path}), not {autoencoder.checkpoint_id} ({settings.autoencoder}). "
                "Resume with that autoencoder, or start a new run in another --out.")
    run_lock = _lock_run_folder(out)
    device = choose_device(settings.device)
    corpus = CorpusSet([settings.corpus])
    contract = autoencoder.contract
    if (corpus.box, corpus.voxel_size) != (contract.box, contract.voxel_size):
        raise RunFolderError(f"{settings.corpus} holds {corpus.box}³ maps at {corpus.voxel_size:g} Å, but "
                             f"the autoencoder reads {contract.box}³ at {contract.voxel_size:g} Å.")
    if last is not None:
        began = json.loads((out / "config.json").read_text()).get("corpus_id") if (out / "config.json").is_file() else None
        if began not in (None, corpus.corpus_id):
            raise RunFolderError(f"{out} began on corpus {began}, not {corpus.corpus_id} ({settings.corpus}). "
                                 "Resume with that corpus, or start a new run in another --out.")
    cache, reused = latent_cache(out, autoencoder, corpus, device, max_val=settings.max_val, progress=progress)
    print(f"latent cache: {'reused' if reused else 'encoded'} ({out / CACHE})", file=sys.stderr)
    train_z, val_z = cache["train"], cache["val"]
    if len(train_z) == 0:
        raise RunFolderError(f"{settings.corpus}: the training split is empty.")

    torch.manual_seed(settings.seed)
    model = latent_diffusion(code_dim=train_z.shape[1], latent_size=train_z.shape[-1],
                             config=PRESETS[settings.preset]).to(device)
    model.set_statistics(train_z.mean(dim=(0, 2, 3, 4)).to(device), train_z.std(dim=(0, 2, 3, 4)).to(device))
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.Adam(model.unet.parameters(), lr=settings.lr)
    start_step, best_val = 0, math.inf
    if last is not None:
        if last.model.config_dict() != model.config_dict():
            raise RunFolderError("last.pt holds a model of another configuration: resume with the "
                                 f"--preset it began with (see {out / 'config.json'}).")
        state = last.training
        if "weights" not in state:
            raise RunFolderError("last.pt holds no training state, so the run cannot be resumed.")
        ema.load_state_dict(last.model.state_dict())
        model.load_state_dict(state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, best_val = int(state["step"]), float(state.get("best_val", math.inf))
        _truncate_logs(out, start_step, LOG_FIELDS)
        _record_resume(out, settings, start_step)
    else:
        write_json_atomic(out / "config.json", {
            **asdict(settings), "autoencoder_id": autoencoder.checkpoint_id, "corpus_id": corpus.corpus_id})

    provenance = {"corpus": str(settings.corpus), "corpus_id": corpus.corpus_id, "preset": settings.preset,
                  "seed": settings.seed, "ema": settings.ema}

    def save(path, step, training=None, extra=None):
        save_diffusion(path, ema, autoencoder_id=autoencoder.checkpoint_id,
                       autoencoder_path=str(autoencoder.path), contract=contract,
                       provenance={**provenance, "step": step, **(extra or {})}, training=training,
                       overwrite=True)

    bar = _progress_bar(settings.steps, start_step, progress)
    step = start_step
    try:
        for step in range(start_step + 1, settings.steps + 1):
            tic = time.perf_counter()
            rng = np.random.default_rng([settings.seed, step])
            ids = rng.choice(len(train_z), size=settings.batch_size, replace=len(train_z) < settings.batch_size)
            x0 = model.standardise(train_z[np.sort(ids)].to(device))
            generator = torch.Generator(device=device).manual_seed(settings.seed * 1_000_003 + step)
            model.train()
            loss = model.loss(x0, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            _update_ema(ema, model, min(settings.ema, (1 + step) / (10 + step)))
            rate = len(ids) / (time.perf_counter() - tic)
            _append_csv(out / "train_log.csv", {"step": step, "loss": loss.item(), "volumes_per_s": round(rate, 3)},
                        LOG_FIELDS)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update(1)
            if len(val_z) and (step % settings.val_every == 0 or step == settings.steps):
                record = {"step": step, "loss": validate(ema, val_z, device, settings.batch_size, settings.seed)}
                _append_jsonl(out / "validation.jsonl", record)
                best_val = min(best_val, record["loss"])
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                save(out / "last.pt", step, {
                    "step": step, "best_val": best_val,
                    "weights": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict()})
    except KeyboardInterrupt:
        print(f"\nInterrupted. Continue from the last checkpoint ({out / 'last.pt'}) with the same "
              "command and --resume.", file=sys.stderr)
        raise
    finally:
        bar.close()
    final = out / "model.pt"
    save(final, settings.steps, extra=_last_validation(out))
    run_lock.close()
    return final


def validate(model, val_z, device, batch_size: int, seed: int) -> float:
    """Mean DDPM loss over the validation latents, with noise and timesteps fixed by ``seed``."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(val_z), batch_size):
            x0 = model.standardise(val_z[start:start + batch_size].to(device))
            total += float(model.loss(x0, generator)) * len(x0)
            count += len(x0)
    return total / max(count, 1)


def _update_ema(ema, model, decay: float) -> None:
    import torch

    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def _last_validation(out: Path) -> dict:
    path = out / "validation.jsonl"
    if not path.is_file() or not path.read_text().strip():
        return {}
    last = json.loads(path.read_text().splitlines()[-1])
    return {"val_loss": last["loss"], "val_step": last["step"]}


def main(argv=None) -> int:
    from napari_cryoswan.checkpoint import CheckpointError

    return run_command(train, parse_args(argv), refused=(CheckpointError,))


if __name__ == "__main__":
    _interrupt_on_sigterm()
    sys.exit(main())
