"""python -m training.train: a short fit, resume after a kill, reproducibility, torchrun."""

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import training.train as train_module
from napari_cryoswan.checkpoint import load_checkpoint
from napari_cryoswan.models import registry
from training.train import RunFolderError, TrainSettings, _lock_run_folder, parse_args, train

def settings(corpus, out, **changes) -> TrainSettings:
    corpus = [str(c) for c in corpus] if isinstance(corpus, list) else str(corpus)
    base = TrainSettings(model="swan", corpus=corpus, out=str(out), preset="small", steps=6,
                         batch_size=2, val_every=3, checkpoint_every=3, device="cpu", seed=3)
    return replace(base, **changes)


def state(path):
    return load_checkpoint(path).model.state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_short_run_writes_checkpoints_and_logs(tiny_corpus, tmp_path):
    final = train(settings(tiny_corpus, tmp_path / "run"), progress=False)
    run = tmp_path / "run"
    assert final == run / "model.pt"
    assert {p.name for p in run.iterdir()} >= {"config.json", "train_log.csv", "validation.jsonl",
                                               "last.pt", "best.pt", "model.pt"}
    rows = list(csv.DictReader(open(run / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["loss"]) > 0 and float(r["volumes_per_s"]) > 0 for r in rows)
    validations = [json.loads(line) for line in open(run / "validation.jsonl")]
    assert [v["step"] for v in validations] == [3, 6]
    usage = validations[-1]["codebook_usage"]
    assert set(usage) == {"rq1", "rq2"} and 0 < usage["rq1"]["fraction_used"] <= 1
    loaded = load_checkpoint(final)
    assert loaded.provenance["step"] == 6
    assert loaded.provenance["corpus_id"] == json.load(open(run / "config.json"))["corpus_id"]
    assert loaded.training == {}  # the release weights carry no optimiser state


def test_resume_after_a_kill_reaches_the_uninterrupted_state(tiny_corpus, tmp_path, monkeypatch):
    # k-means at step 4 and fast expiry, so that the restored FIFO, usage EMA and optimizer
    # state all decide what the resumed steps do
    small_swan = registry._REGISTRY["swan"][2]["small"]
    for key, value in {"kmeans_after": 4, "dead_ema": 0.5, "dead_below": 1.0}.items():
        monkeypatch.setitem(small_swan, key, value)
    straight = train(settings(tiny_corpus, tmp_path / "straight"), progress=False)
    usage = [json.loads(line) for line in open(tmp_path / "straight" / "validation.jsonl")][-1]["codebook_usage"]
    assert any(level["restarts"] > 0 for level in usage.values())

    original = train_module._log_row

    def killed_at_step_5(step, terms, rate):
        if step == 5:
            raise KeyboardInterrupt
        return original(step, terms, rate)

    monkeypatch.setattr(train_module, "_log_row", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(settings(tiny_corpus, tmp_path / "killed"), progress=False)
    assert load_checkpoint(tmp_path / "killed" / "last.pt").training["step"] == 3
    monkeypatch.setattr(train_module, "_log_row", original)

    resumed = train(settings(tiny_corpus, tmp_path / "killed", resume=True), progress=False)
    assert_same_weights(state(resumed), state(straight))
    rows = list(csv.DictReader(open(tmp_path / "killed" / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # no step logged twice
    assert json.loads((tmp_path / "killed" / "config.json").read_text())["resumed_at_steps"] == [3]


def test_a_time_budget_ends_the_run_at_a_step_and_a_resume_with_more_time_goes_on(
        tiny_corpus, tmp_path, monkeypatch):
    seconds = iter(range(10_000))
    monkeypatch.setattr(train_module, "step_clock", lambda device: lambda: float(next(seconds)))  # 1 s a step
    run = tmp_path / "run"
    final = train(settings(tiny_corpus, run, steps=20, val_every=10, checkpoint_every=10, time_budget=2.5),
                  progress=False)
    # steps 1-3 cost 3 s, past the 2.5 s budget: the run ends at step 3, validated and saved there
    assert [int(r["step"]) for r in csv.DictReader(open(run / "train_log.csv"))] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in open(run / "validation.jsonl")] == [3]
    assert load_checkpoint(run / "last.pt").training["train_seconds"] == 3.0
    assert load_checkpoint(final).provenance["step"] == 3 and load_checkpoint(final).provenance["train_seconds"] == 3.0
    # a resume counts the time already spent: 2 more seconds reach a 4.5 s budget
    train(settings(tiny_corpus, run, steps=20, val_every=10, checkpoint_every=10, time_budget=4.5, resume=True),
          progress=False)
    assert [int(r["step"]) for r in csv.DictReader(open(run / "train_log.csv"))] == [1, 2, 3, 4, 5]
    assert load_checkpoint(final).provenance["step"] == 5
    assert load_checkpoint(final).provenance["time_budget"] == 4.5
    assert json.loads((run / "config.json").read_text())["time_budget"] == 4.5
    with pytest.raises(SystemExit):
        parse_args(["--model", "swan", "--corpus", str(tiny_corpus), "--out", "x", "--time-budget", "0"])


def test_a_fixed_seed_reproduces_a_run_and_another_seed_does_not(tiny_corpus, tmp_path):
    a = train(settings(tiny_corpus, tmp_path / "a", steps=3), progress=False)
    b = train(settings(tiny_corpus, tmp_path / "b", steps=3), progress=False)
    c = train(settings(tiny_corpus, tmp_path / "c", steps=3, seed=4), progress=False)
    assert_same_weights(state(a), state(b))
    with pytest.raises(AssertionError):
        assert_same_weights(state(a), state(c))


def test_run_folder_is_never_overwritten(tiny_corpus, tmp_path):
    train(settings(tiny_corpus, tmp_path / "run", steps=1), progress=False)
    with pytest.raises(RunFolderError, match="--resume"):
        train(settings(tiny_corpus, tmp_path / "run", steps=1), progress=False)
    with pytest.raises(RunFolderError, match="no last.pt"):
        train(settings(tiny_corpus, tmp_path / "empty", resume=True), progress=False)


def test_a_run_folder_in_use_by_another_process_is_refused(tiny_corpus, tmp_path):
    train(settings(tiny_corpus, tmp_path / "run", steps=1), progress=False)
    held = _lock_run_folder(tmp_path / "run")  # as a second training process would hold it
    try:
        with pytest.raises(RunFolderError, match="in use by another training process"):
            train(settings(tiny_corpus, tmp_path / "run", steps=2, resume=True), progress=False)
    finally:
        held.close()
    assert train(settings(tiny_corpus, tmp_path / "run", steps=2, resume=True), progress=False).is_file()


def test_command_line_defaults_are_the_papers():
    parsed = parse_args(["--model", "vq", "--corpus", "c", "--out", "o"])
    assert parsed.lr == 1e-3 and parsed.weight_decay == 1e-5 and not parsed.decay_all


def test_a_run_begun_with_decay_on_every_parameter_resumes_only_with_it(tiny_corpus, tmp_path):
    train(settings(tiny_corpus, tmp_path / "run", steps=3, decay_all=True), progress=False)
    with pytest.raises(RunFolderError, match="--decay-all"):
        train(settings(tiny_corpus, tmp_path / "run", steps=4, resume=True), progress=False)
    assert train(settings(tiny_corpus, tmp_path / "run", steps=4, resume=True, decay_all=True),
                 progress=False).is_file()


def test_set_replaces_fields_of_the_preset_and_a_resume_must_repeat_it(tiny_corpus, tmp_path):
    parsed = parse_args(["--model", "swan", "--corpus", "c", "--out", "o",
                         "--set", "decoder_input=residual", "--set", "level_dropout=0.25"])
    assert parsed.overrides == {"decoder_input": "residual", "level_dropout": 0.25}
    changed = {"decoder_input": "residual", "level_dropout": 0.25}
    final = train(settings(tiny_corpus, tmp_path / "run", steps=3, overrides=changed), progress=False)
    loaded = load_checkpoint(final)
    assert loaded.model.config.decoder_input == "residual" and loaded.model.variants == ("RQ1+RQ2", "RQ1", "RQ2")
    assert loaded.provenance["overrides"] == changed
    with pytest.raises(RunFolderError, match="another configuration"):
        train(settings(tiny_corpus, tmp_path / "run", steps=4, resume=True), progress=False)
    with pytest.raises(RunFolderError, match="decoder_input"):
        train(settings(tiny_corpus, tmp_path / "bad", overrides={"decoder_input": "sideways"}), progress=False)


def test_several_corpora_of_one_geometry_train_as_one(tiny_corpus, tmp_path):
    import shutil

    from training.corpus import Corpus, CorpusError, CorpusSet

    shapes = tmp_path / "shapes"
    shutil.copytree(tiny_corpus, shapes)
    both = CorpusSet([tiny_corpus, shapes])
    one = Corpus(tiny_corpus)
    assert len(both) == 2 * len(one) and both.corpus_id not in (one.corpus_id, Corpus(shapes).corpus_id)
    np.testing.assert_array_equal(both.load(len(one)), one.load(0))
    assert both.samples[len(one)] == Corpus(shapes).samples[0] and len(both.samples) == len(both)
    # a short validation pass sees both corpora
    val = both.interleaved_indices("val", 2)
    assert len(val) == 2 and val[0] < len(one) <= val[1]
    final = train(settings([tiny_corpus, shapes], tmp_path / "run", steps=2), progress=False)
    assert load_checkpoint(final).provenance["corpus_id"] == both.corpus_id

    manifest = json.loads((shapes / "manifest.json").read_text())
    (shapes / "manifest.json").write_text(json.dumps({**manifest, "voxel_size": 5.0}))
    with pytest.raises(CorpusError, match="cannot learn both"):
        train(settings([tiny_corpus, shapes], tmp_path / "other", steps=2), progress=False)


@pytest.mark.parametrize("model", ["vq", "hq", "drgn-vae"])
def test_baselines_train_through_the_same_command(tiny_corpus, tmp_path, model):
    out = tmp_path / model
    code = train_module.main(["--model", model, "--preset", "small", "--corpus", str(tiny_corpus),
                              "--out", str(out), "--steps", "2", "--batch-size", "2",
                              "--val-every", "2", "--checkpoint-every", "2", "--device", "cpu"])
    assert code == 0
    assert load_checkpoint(out / "model.pt").model.name == model


def test_two_process_torchrun_with_gloo(tiny_corpus, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         "29517", "-m", "training.train", "--model", "swan", "--preset", "small", "--corpus",
         str(tiny_corpus), "--out", str(out), "--steps", "3", "--batch-size", "4",
         "--val-every", "3", "--checkpoint-every", "3", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(out / "config.json"))["world_size"] == 2
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert load_checkpoint(out / "model.pt").provenance["step"] == 3


COUNTS_ON_TWO_RANKS = """
import json, sys
import torch
import torch.distributed as dist
from napari_cryoswan.models.quantize import Codebook

dist.init_process_group("gloo")
rank = dist.get_rank()
book = Codebook(4, 2, dead_ema=0.5, dead_below=0.01)
book.initialised.fill_(True)
book.usage_ema_V.fill_(1.0)
# rank 0: one volume choosing code 0 twice; rank 1: two volumes choosing code 1 five times, code 2 once
codes = torch.tensor([[0, 0]]) if rank == 0 else torch.tensor([[1, 1, 1], [1, 1, 2]])
book.record_([codes], training=True)
book.step_()
json.dump(book.usage_ema_V.tolist(), open(f"{sys.argv[1]}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_usage_counts_are_summed_over_ranks_before_codes_expire(tmp_path):
    script = tmp_path / "counts.py"
    script.write_text(COUNTS_ON_TWO_RANKS)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
         str(script), str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    # both ranks: EMA ½·1 + ½·(counts summed over ranks) / (volumes summed over ranks: 3)
    expected = [0.5 + 0.5 * c / 3 for c in (2, 5, 1, 0)]
    for rank in (0, 1):
        ema = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert ema == pytest.approx(expected), rank


ENCODER_SIDE = ("encoders.", "combi_convs.", "quant_convs.")


def test_noise_aware_fine_tune_changes_only_the_encoder(tiny_corpus, small_checkpoints, tmp_path):
    init = small_checkpoints["swan"]
    final = train(settings(tiny_corpus, tmp_path / "run", init=str(init), input_snr=(0.5, 2.0),
                           train_only="encoder", steps=3, lr=1e-2), progress=False)
    base, tuned = load_checkpoint(init), load_checkpoint(final)
    before, after = base.model.state_dict(), tuned.model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(key.startswith(ENCODER_SIDE) for key in changed)
    assert any(key.startswith("encoders.") for key in changed)
    assert tuned.model.config_dict() == base.model.config_dict()
    assert tuned.provenance["init_checkpoint_id"] == base.checkpoint_id
    assert tuned.provenance["input_snr"] == [0.5, 2.0] and tuned.provenance["train_only"] == "encoder"
    # the fine-tune resumes like any run
    train(settings(tiny_corpus, tmp_path / "run", init=str(init), input_snr=(0.5, 2.0),
                   train_only="encoder", steps=4, lr=1e-2, resume=True), progress=False)
    assert len(list(csv.DictReader(open(tmp_path / "run" / "train_log.csv")))) == 4


def test_noisy_inputs_follow_the_noise_model_and_their_seed():
    from training.train import noisy_inputs

    rng = np.random.default_rng(0)
    clean = rng.normal(size=(6, 16, 16, 16)).astype(np.float32) * 2.0
    noisy = noisy_inputs(clean, (0.25, 4.0), [1, 2])
    snrs = clean.var(axis=(1, 2, 3)) / (noisy - clean).var(axis=(1, 2, 3))
    assert np.all((snrs > 0.25 * 0.85) & (snrs < 4.0 * 1.15)) and snrs.max() / snrs.min() > 1.5
    np.testing.assert_array_equal(noisy, noisy_inputs(clean, (0.25, 4.0), [1, 2]))
    assert not np.array_equal(noisy, noisy_inputs(clean, (0.25, 4.0), [1, 3]))


def test_losses_against_a_target_swap_only_the_reconstruction_term():
    from napari_cryoswan.models.base import ModelOutput

    model = registry.build_model("vq", preset="small")
    recon, clean = torch.zeros(1, 1, 4, 4, 4), torch.ones(1, 1, 4, 4, 4)
    losses = {"recon": torch.tensor(0.5), "commit": torch.tensor(0.25), "total": torch.tensor(0.75)}
    terms = model.losses_against(ModelOutput(recon, losses, {}), clean)
    assert float(terms["recon"]) == 1.0 and float(terms["total"]) == 1.25
    assert float(terms["commit"]) == 0.25


def test_training_on_from_init_keeps_the_trained_codebooks(tiny_corpus, tmp_path):
    trained = train(settings(tiny_corpus, tmp_path / "first", steps=2), progress=False)
    train(settings(tiny_corpus, tmp_path / "more", init=str(trained), steps=2), progress=False)
    buffers = load_checkpoint(tmp_path / "more" / "last.pt").training["buffers"]
    books = [name[:-len(".restarts")] for name in buffers if name.endswith("codebook.restarts")]
    assert books
    kmeans_after = load_checkpoint(trained).model.config.kmeans_after
    for book in books:
        # Without the warm start most codes would expire on the first step, and k-means would
        # re-seed the codebook once the run reached kmeans_after steps.
        assert int(buffers[f"{book}.restarts"]) == 0, book
        assert int(buffers[f"{book}.steps"]) >= kmeans_after + 2, book


def test_init_must_hold_the_named_model_and_takes_no_set(tiny_corpus, small_checkpoints, tmp_path):
    with pytest.raises(RunFolderError, match="not --model 'swan-rq1'"):
        train(settings(tiny_corpus, tmp_path / "run", model="swan-rq1",
                       init=str(small_checkpoints["swan"])), progress=False)
    with pytest.raises(SystemExit):
        parse_args(["--model", "swan", "--corpus", "c", "--out", "o", "--init", "x.pt",
                    "--set", "level_dropout=0.1"])
    with pytest.raises(SystemExit):
        parse_args(["--model", "swan", "--corpus", "c", "--out", "o", "--input-snr", "2", "1"])
