"""Fit a model on a corpus: ``python -m training.train --model swan --corpus DIR [DIR …] --out RUN``.

Several corpora of one geometry (box and voxel size) train as one: batches draw from all their
training maps alike, and the validation pass takes from each in turn (``corpus.CorpusSet``).

The paper's optimiser (Adam, lr 1e-3, weight decay 1e-5 on conv and linear weights; codebooks,
φ, norms and biases are not decayed) at a constant learning rate, with the gradient norm clipped
at 1 (the paper does not say; without it Cryo-SWAN's level-1 commitment loss diverged once dead
codes began to restart). After every optimiser step the codebooks count the step and renew dead
codes, and Adam forgets the moments of the renewed rows (``registry.step_codebooks``). Batches
are drawn from the training split by a generator seeded with (seed, step), so the data a step
sees does not depend on whether the run was interrupted. ``--resume`` restores the weights, the
optimiser, every model buffer (codebook ages included) and the torch RNG from ``last.pt``, written
every ``--checkpoint-every`` steps, and reaches the state an uninterrupted run reaches.

``--time-budget SECONDS`` compares models at equal compute rather than equal steps: the run ends
after the step at which its training steps have used that much time (``step_clock``), with a
last validation and checkpoint there; the time spent is kept in ``last.pt`` for a resume.

Run folder:
    config.json        the settings of the run
    train_log.csv      step, loss terms, volumes/s
    validation.jsonl   per validation: loss, PSNR and codebook usage per level
    last.pt            the latest checkpoint, with training state (written atomically)
    best.pt            the weights with the lowest validation loss
    model.pt           the final weights (what the plugin and evaluate load)

Noise-aware fine-tune (the denoiser of docs/DENOISING.md): ``--init CKPT`` starts from a
checkpoint's weights and configuration, ``--input-snr LO HI`` adds white Gaussian noise to every
input at an SNR drawn log-uniformly from [LO, HI] (``denoise.add_noise``, seeded by seed, step and
map) while the loss compares the reconstruction with the clean map, and ``--train-only encoder``
freezes the codebooks and the decoder (the model stays in eval mode, so no code is renewed):
the fine-tuned encoder learns to send a noisy map to codes that the unchanged decoder reads as
the clean map's. Validation adds the same kind of noise, seeded per map.

Several GPUs (or CPU processes): ``torchrun --nproc_per_node N -m training.train …``; the global
batch is split across processes and rank 0 writes the run folder.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from napari_cryoswan._atomic import atomic_path
from training._defaults import dataclass_defaults
from napari_cryoswan._atomic import write_json_atomic
from training.corpus import CorpusSet

LOG_FIELDS = ("step", "loss", "recon", "commit", "kl", "volumes_per_s")
VALIDATION_NOISE_STREAM = 2**32 - 1  # seeds validation noise apart from every training step (a step number)


@dataclass
class TrainSettings:
    model: str
    corpus: str | list[str]
    out: str
    preset: str = "full"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-5
    grad_clip: float | None = 1.0
    seed: int = 0
    val_every: int = 100
    checkpoint_every: int = 100
    max_val: int = 64
    device: str = "auto"
    amp: bool = True
    resume: bool = False
    decay_all: bool = False
    overrides: dict = field(default_factory=dict)
    init: str | None = None
    input_snr: tuple[float, float] | None = None
    train_only: str | None = None
    time_budget: float | None = None  # seconds of training steps (see step_clock), summed over resumes


def parse_args(argv=None) -> TrainSettings:
    from napari_cryoswan.models.registry import MODEL_NAMES, PRESETS
    from napari_cryoswan.session import DEVICES

    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=MODEL_NAMES)
    p.add_argument("--corpus", required=True, nargs="+",
                   help="corpus folders from training.build_corpus, of one box and voxel size (several: "
                        "their training maps are drawn alike, e.g. proteins and shapes)")
    p.add_argument("--out", required=True, help="the run folder to write")
    d = dataclass_defaults(TrainSettings)
    p.add_argument("--preset", default=d["preset"], choices=PRESETS,
                   help="model size: 'full' (the paper's codebook of 4096; a GPU's work), 'cpu' (the bundled "
                        "checkpoints' size; every model but the VAEs) or 'small' (tests, CPU demos)")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimiser steps in all (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="global batch, split across ranks (default %(default)s)")
    p.add_argument("--lr", type=float, default=d["lr"], help="Adam learning rate (paper and default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help="Adam weight decay (paper and default: %(default)s)")
    p.add_argument("--decay-all", action="store_true",
                   help="weight decay on every parameter, codebooks and φ included (runs made before "
                        "the decay was limited to conv and linear weights; resume those with it)")
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"],
                   help="clip the gradient norm (default %(default)s; 0 turns it off; see docs/TRAINING.md)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--val-every", type=int, default=d["val_every"],
                   help="steps between validations (default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"],
                   help="steps between checkpoints (default %(default)s)")
    p.add_argument("--max-val", type=int, default=d["max_val"],
                   help="validation volumes per pass (default %(default)s)")
    p.add_argument("--device", default=d["device"], choices=DEVICES)
    p.add_argument("--no-amp", dest="amp", action="store_false",
                   help="no bf16 autocast on CUDA (it is never used on the CPU)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop after the step at which the training steps have used this much time (CPU "
                        "time of this process on the CPU, wall time on a GPU; summed over resumes; "
                        "validation and checkpoints not counted), with a last validation and checkpoint "
                        "there; --steps stays the upper bound. For comparisons at equal compute")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="replace one field of the preset's model config, e.g. --set level_dropout=0.25 "
                        "(VALUE is read as JSON, else as text; repeatable)")
    noise = p.add_argument_group("from a checkpoint; the noise-aware fine-tune")
    noise.add_argument("--init", metavar="CKPT",
                       help="start from this checkpoint's weights and configuration (bundled:swan or "
                            "a .pt), its live codebooks warm; --model must name its model, and --preset "
                            "and --set do not apply")
    noise.add_argument("--input-snr", type=float, nargs=2, metavar=("LO", "HI"),
                       help="add noise to every input at an SNR drawn log-uniformly from [LO, HI] and "
                            "learn to reconstruct the clean map")
    noise.add_argument("--train-only", choices=("encoder",),
                       help="train only the encoder (and the convs that feed the quantizer); codebooks "
                            "and decoder stay as --init left them")
    args = p.parse_args(argv)
    args.overrides = _parse_overrides(args.overrides, p)
    if args.input_snr and not 0 < args.input_snr[0] <= args.input_snr[1]:
        p.error("--input-snr LO HI needs 0 < LO <= HI")
    if args.init and args.overrides:
        p.error("--set changes a new model's configuration; --init takes the checkpoint's")
    if args.time_budget is not None and not args.time_budget > 0:
        p.error("--time-budget needs a positive number of seconds")
    args.input_snr = tuple(args.input_snr) if args.input_snr else None
    return TrainSettings(**vars(args))


def _parse_overrides(items: list[str], parser: argparse.ArgumentParser) -> dict:
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            parser.error(f"--set {item}: expected FIELD=VALUE")
        try:
            overrides[name] = json.loads(text)
        except json.JSONDecodeError:
            overrides[name] = text
    return overrides


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked."""


def train(settings: TrainSettings, progress: bool = True) -> Path:
    """Run training as ``settings`` say; returns the path of the final weights (model.pt)."""
    import torch

    from napari_cryoswan.checkpoint import (InputContract, load_checkpoint, resolve_checkpoint,
                                            save_checkpoint)
    from napari_cryoswan.engine import autocast, choose_device
    from napari_cryoswan.models.registry import (
        build_model,
        default_optimizer,
        step_codebooks,
        warm_start_codebooks,
    )

    rank, world = _distributed_setup()
    if settings.time_budget is not None and world > 1:
        raise RunFolderError("--time-budget runs in one process: each rank's clock would stop it at "
                             "another step. Give torchrun's runs a number of --steps instead.")
    out = Path(settings.out)
    run_lock = None
    if rank == 0:  # the one writer of the run folder; other ranks only read last.pt
        _check_run_folder(out, settings.resume)
        run_lock = _lock_run_folder(out)
    device = choose_device(settings.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    corpus_paths = [settings.corpus] if isinstance(settings.corpus, str) else list(settings.corpus)
    corpus = CorpusSet(corpus_paths)
    train_ids = corpus.split_indices("train")
    val_ids = corpus.interleaved_indices("val", settings.max_val)
    if len(train_ids) == 0:
        raise RunFolderError(f"{', '.join(corpus_paths)}: the training split is empty.")

    torch.manual_seed(settings.seed)
    init_provenance = {}
    if settings.init:
        init = load_checkpoint(resolve_checkpoint(settings.init))
        _check_init(init, settings.model, corpus)
        model = init.model.to(device)
        warm_start_codebooks(model)  # a checkpoint keeps weights, not the codebooks' upkeep state
        init_provenance = {"init": str(settings.init), "init_checkpoint_id": init.checkpoint_id}
    else:
        try:
            model = build_model(settings.model, preset=settings.preset, **settings.overrides).to(device)
        except (TypeError, ValueError) as error:
            raise RunFolderError(f"--set {settings.overrides}: {error}") from error
    frozen = settings.train_only is not None
    if frozen:
        _freeze_all_but_encoder(model)
    optimizer = default_optimizer(model, settings.lr, settings.weight_decay, decay_all=settings.decay_all)
    start_step, best_val, spent = 0, math.inf, 0.0
    if settings.resume:
        last = load_checkpoint(out / "last.pt")
        if last.model.config_dict() != model.config_dict():
            raise RunFolderError("last.pt holds a model of another configuration: resume with the "
                                 f"--model, --preset and --set it began with (see {out / 'config.json'}).")
        model.load_state_dict(last.model.state_dict())
        start_step, best_val, spent = _restore(model, optimizer, last.training, device)
        if rank == 0:
            _truncate_logs(out, start_step)
            _record_resume(out, settings, start_step)
    elif rank == 0:
        write_json_atomic(out / "config.json", {
            **asdict(settings), "corpus_id": corpus.corpus_id, "world_size": world})

    wrapped = _wrap_distributed(model, device, world)
    provenance = {"corpus": ", ".join(map(str, corpus_paths)), "corpus_id": corpus.corpus_id,
                  "preset": None if settings.init else settings.preset, "overrides": settings.overrides,
                  "seed": settings.seed, **init_provenance}
    if settings.time_budget is not None:
        provenance["time_budget"] = settings.time_budget
    if settings.input_snr:
        provenance.update(input_snr=list(settings.input_snr), train_only=settings.train_only)
    # The model learns the corpus's maps, so they are its input contract.
    save = functools.partial(save_checkpoint, overwrite=True, contract=InputContract(
        corpus.box, corpus.voxel_size))
    bar = _progress_bar(settings.steps, start_step, progress and rank == 0)
    clock = step_clock(device)
    out_of_time = settings.time_budget is not None and spent >= settings.time_budget
    last_step = settings.steps if not out_of_time else start_step
    step = start_step
    try:
        for step in range(start_step + 1, last_step + 1):
            tic, tic_budget = time.perf_counter(), clock()
            ids = _batch_ids(train_ids, settings.batch_size, settings.seed, step, rank, world)
            clean = corpus.load_batch(ids)
            inputs = clean if not settings.input_snr else noisy_inputs(
                clean, settings.input_snr, [settings.seed, step, rank])
            x = torch.from_numpy(inputs[:, None]).to(device)
            model.train(not frozen)  # frozen codebooks must not count, seed or renew codes
            with autocast(device, settings.amp):
                output = wrapped(x)
            terms = output.losses if not settings.input_snr else model.losses_against(
                output, torch.from_numpy(clean[:, None]).to(device))
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            if not frozen:
                step_codebooks(model, optimizer)  # counts summed over ranks before any code is renewed
                _sync_codebooks(model, world)
            rate = len(ids) * world / (time.perf_counter() - tic)
            if rank != 0:
                continue
            row = _log_row(step, terms, rate)  # reads the losses, so a GPU has finished the step
            spent += clock() - tic_budget
            out_of_time = settings.time_budget is not None and spent >= settings.time_budget
            _append_csv(out / "train_log.csv", row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", vol_s=f"{rate:.1f}")
            bar.update(1)
            final_step = step == settings.steps or out_of_time
            if step % settings.val_every == 0 or final_step:
                record = validate(model, corpus, val_ids, device, settings.batch_size, step,
                                  settings.input_snr, settings.seed)
                _append_jsonl(out / "validation.jsonl", record)
                if record["loss"] < best_val:
                    best_val = record["loss"]
                    save(out / "best.pt", model, {**provenance, **record})
            if step % settings.checkpoint_every == 0 or final_step:
                save(out / "last.pt", model, {**provenance, "step": step},
                     _training_state(model, optimizer, step, best_val, spent))
            if out_of_time:
                print(f"\nThe time budget ({settings.time_budget:.0f} s) is spent after step {step}.",
                      file=sys.stderr)
                break
    except KeyboardInterrupt:
        # A step cut off halfway may have changed codebooks, so the periodic checkpoint,
        # not the state at the interrupt, is what a resumed run continues from.
        if rank == 0:
            print(f"\nInterrupted. Continue from the last checkpoint ({out / 'last.pt'}) with the "
                  "same command and --resume.", file=sys.stderr)
        raise
    finally:
        bar.close()
    final = out / "model.pt"
    if rank == 0:
        last_val = _last_validation(out)
        save(final, model, {**provenance, "step": step, "train_seconds": spent, **last_val})
        run_lock.close()
    _check_ranks_agree(model, world)
    _distributed_teardown(world)
    return final


def validate(model, corpus, ids, device, batch_size: int, step: int,
             input_snr: tuple[float, float] | None = None, seed: int = 0) -> dict:
    """Mean reconstruction loss and PSNR over ``ids``, and codebook usage per level. With
    ``input_snr`` the inputs get noise (seeded per map, the same at every validation) and the
    reconstructions are judged against the clean maps."""
    import torch

    from napari_cryoswan.engine import autocast, batches
    from napari_cryoswan.metrics import psnr

    model.eval()
    model.reset_usage()
    losses, psnrs = [], []
    with torch.inference_mode():
        for part in batches(len(ids), batch_size):
            volumes = corpus.load_batch(ids[part])
            inputs = volumes if not input_snr else np.stack([
                noisy_inputs(v[None], input_snr, [seed, VALIDATION_NOISE_STREAM, int(i)])[0]
                for v, i in zip(volumes, ids[part])])
            x = torch.from_numpy(inputs[:, None]).to(device)
            with autocast(device):
                output = model(x)
            recon_loss = output.losses["recon"] if not input_snr else model.losses_against(
                output, torch.from_numpy(volumes[:, None]).to(device))["recon"]
            losses.append(float(recon_loss) * len(volumes))
            recon = output.recon[:, 0].float().cpu().numpy()
            psnrs.extend(psnr(r, v) for r, v in zip(recon, volumes))
    model.train()
    return {
        "step": step,
        "loss": sum(losses) / max(len(ids), 1),
        "psnr": float(np.mean(psnrs)) if psnrs else float("nan"),
        "codebook_usage": model.codebook_usage(),
    }


def noisy_inputs(clean: np.ndarray, snr_range: tuple[float, float], seed: list[int]) -> np.ndarray:
    """Each map of ``clean`` (N, D, H, W) plus the noise model's white noise at an SNR drawn
    log-uniformly from ``snr_range``; map i's SNR and noise are seeded by ``[*seed, i]``."""
    from napari_cryoswan.denoise import add_noise

    low, high = np.log(snr_range[0]), np.log(snr_range[1])
    noisy = []
    for i, volume in enumerate(clean):
        rng = np.random.default_rng([*seed, i])
        noisy.append(add_noise(volume, float(np.exp(rng.uniform(low, high))), rng))
    return np.stack(noisy)


def _check_init(init, model_name: str, corpus) -> None:
    """--init must hold the --model, trained on maps of the corpus's geometry."""
    if init.model.name != model_name:
        raise RunFolderError(f"--init holds a {init.model.name!r} model, not --model {model_name!r}.")
    if (init.contract.box, init.contract.voxel_size) != (corpus.box, corpus.voxel_size):
        raise RunFolderError(
            f"--init was trained on {init.contract.box}³ maps at {init.contract.voxel_size:g} Å; the "
            f"corpus holds {corpus.box}³ maps at {corpus.voxel_size:g} Å.")


def _freeze_all_but_encoder(model) -> None:
    trainable = {id(p) for p in model.encoder_parameters()}
    if not trainable:
        raise RunFolderError(f"--train-only encoder: {model.name} names no encoder modules.")
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


def _batch_ids(train_ids, batch_size, seed, step, rank, world) -> np.ndarray:
    """The global batch of a step depends only on (seed, step); each rank takes its share."""
    rng = np.random.default_rng([seed, step])
    chosen = rng.choice(train_ids, size=batch_size, replace=len(train_ids) < batch_size)
    return chosen[rank::world]


def step_clock(device):
    """What a time budget counts: this process's CPU time on the CPU, so that runs sharing the
    cores with other work are charged only for their own; wall time on a GPU, where the work is
    not the process's CPU time."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def _training_state(model, optimizer, step: int, best_val: float, seconds: float = 0.0) -> dict:
    import torch

    return {
        "step": step,
        "best_val": best_val,
        "train_seconds": seconds,
        "optimizer": optimizer.state_dict(),
        # every buffer, the non-persistent ones too: codebook ages decide dead-code restarts
        "buffers": {k: v.detach().cpu().clone() for k, v in model.named_buffers()},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore(model, optimizer, state: dict, device) -> tuple[int, float, float]:
    import torch

    if not state:
        raise RunFolderError("last.pt holds no training state, so the run cannot be resumed.")
    if len(state["optimizer"]["param_groups"]) != len(optimizer.param_groups):
        raise RunFolderError("last.pt was written with weight decay on every parameter (or without "
                             "it); resume with the same --decay-all setting as the run began with.")
    optimizer.load_state_dict(state["optimizer"])
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in state["buffers"].items():
            buffers[name].copy_(value.to(device))
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), float(state["best_val"]), float(state.get("train_seconds", 0.0))


def _check_run_folder(out: Path, resume: bool) -> None:
    if resume and not (out / "last.pt").is_file():
        raise RunFolderError(f"{out}: there is no last.pt to resume from. Start without --resume.")
    if not resume and out.exists() and any(out.iterdir()):
        raise RunFolderError(
            f"{out} already holds a run. Continue it with --resume, or choose another --out."
        )


def _lock_run_folder(out: Path):
    """Hold an exclusive lock on the run folder while this process trains into it.

    Two processes writing one folder would interleave their logs and overwrite each other's
    checkpoints. The lock is released when the returned file is closed or the process ends.
    """
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / "run.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        lock.close()
        raise RunFolderError(f"{out} is in use by another training process (pid {owner}). Wait for "
                             "it to finish, or stop it and continue with --resume.") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _log_row(step: int, terms: dict, rate: float) -> dict:
    row = {"step": step, "loss": terms["total"].item(), "volumes_per_s": round(rate, 3)}
    for name in ("recon", "commit", "kl"):
        row[name] = terms[name].item() if name in terms else ""
    return row


def _append_csv(path: Path, row: dict, fields: tuple[str, ...] = LOG_FIELDS) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_logs(out: Path, step: int, fields: tuple[str, ...] = LOG_FIELDS) -> None:
    """Drop log lines a killed run wrote after its last checkpoint; they are about to be redone."""
    log = out / "train_log.csv"
    if log.exists():
        with open(log, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with atomic_path(log) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    val = out / "validation.jsonl"
    if val.exists():
        kept = [line for line in val.read_text().splitlines() if json.loads(line)["step"] <= step]
        with atomic_path(val) as tmp:
            Path(tmp).write_text("".join(line + "\n" for line in kept))


def _record_resume(out: Path, settings, start_step: int) -> None:
    """Keep config.json true to the run: a resume may extend --steps or --time-budget, and it says
    where it began."""
    path = out / "config.json"
    config = json.loads(path.read_text()) if path.exists() else asdict(settings)
    config["steps"] = settings.steps
    if hasattr(settings, "time_budget"):  # the diffusion trainer's settings have none
        config["time_budget"] = settings.time_budget
    config.setdefault("resumed_at_steps", []).append(start_step)
    write_json_atomic(path, config)


def _last_validation(out: Path) -> dict:
    path = out / "validation.jsonl"
    if not path.exists():
        return {}
    last = json.loads(path.read_text().splitlines()[-1])
    return {"val_loss": last["loss"], "val_psnr": last["psnr"], "codebook_usage": last["codebook_usage"]}


def _progress_bar(total: int, start: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def _distributed_setup() -> tuple[int, int]:
    """Join the process group when launched by torchrun; (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return dist.get_rank(), world


def _wrap_distributed(model, device, world: int):
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Each rank keeps its own residual FIFO and step counts (step_codebooks sums the counts):
    # DDP must not overwrite them with rank 0's at every forward.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, _process_local_buffers(model))
    # Codebook seeding and restarts change codes outside autograd: _sync_codebooks handles it.
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def _process_local_buffers(model) -> list[str]:
    return [f"{prefix}.{name}" for prefix, module in model.named_modules()
            for name in getattr(module, "process_local_buffers", ()) if hasattr(module, name)]


def _sync_codebooks(model, world: int) -> None:
    """Codes seeded or restarted from one rank's data must be the same on every rank."""
    if world == 1:
        return
    import torch.distributed as dist

    for book in model.codebooks().values():
        local = set(getattr(book, "process_local_buffers", ()))
        buffers = [tensor for name, tensor in book.named_buffers() if name not in local]
        for tensor in [*book.parameters(), *buffers]:
            dist.broadcast(tensor.data, src=0)


def _check_ranks_agree(model, world: int) -> None:
    """Every rank must end with rank 0's weights: DDP averages gradients, but codebooks change
    outside autograd and agree only through _sync_codebooks. A mismatch fails the run loudly."""
    if world == 1:
        return
    import torch
    import torch.distributed as dist

    for name, tensor in model.named_parameters():  # codebooks included; usage counts may differ
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(reference, tensor.detach()):
            raise RuntimeError(f"rank {dist.get_rank()} ended with a different {name} from rank 0's: "
                               "the processes did not train one model.")


def _distributed_teardown(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _interrupt_on_sigterm() -> None:
    """`kill` stops a run the way Ctrl-C does: it says how to resume."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv=None) -> int:
    return run_command(train, parse_args(argv))


def run_command(train_function, settings, refused: tuple = ()) -> int:
    """Run a trainer as a command: its exit status, and a sentence for each way it can stop.

    ``refused``: further exception types that mean "bad input" (status 2).
    """
    try:
        path = train_function(settings)
    except (RunFolderError, FileNotFoundError, ValueError, *refused) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as err:
        print(f"error: could not write the run folder ({err}). The last checkpoint written is "
              "intact; free some space and continue with --resume.", file=sys.stderr)
        return 1
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    _interrupt_on_sigterm()
    sys.exit(main())
