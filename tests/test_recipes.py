"""The one-command recipe of the bundled checkpoints: its flow, without the hour of training."""

from pathlib import Path

import pytest

from training.recipes import default_checkpoints as recipe


def fake_tools(monkeypatch, calls):
    def fake_train(argv):
        out = Path(argv[argv.index("--out") + 1])
        calls.append(("train", argv))
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.pt").write_bytes(b"weights of " + out.name.encode())
        return 0

    monkeypatch.setattr(recipe.default_corpus, "main", lambda argv: calls.append(("corpus", argv)) or 0)
    monkeypatch.setattr(recipe.train, "main", fake_train)
    monkeypatch.setattr(recipe.evaluate, "main", lambda argv: calls.append(("evaluate", argv)) or 0)
    from training.recipes import latent_checkpoints

    monkeypatch.setattr(latent_checkpoints, "main", lambda argv: calls.append(("latent", argv)) or 0)


def test_recipe_resumes_a_killed_run_and_restarts_one_killed_before_its_first_checkpoint(
        monkeypatch, tmp_path):
    calls = []
    fake_tools(monkeypatch, calls)
    (tmp_path / "swan").mkdir()
    (tmp_path / "swan" / "last.pt").write_bytes(b"state")  # killed after a checkpoint
    (tmp_path / "swan-rq1").mkdir()
    (tmp_path / "swan-rq1" / "config.json").write_text("{}")  # killed before its first one
    assert recipe.main(["data", "--work", str(tmp_path), "--preset", "full", "--workers", "16"]) == 0
    trains = {argv[argv.index("--model") + 1]: argv for kind, argv in calls if kind == "train"}
    assert "--resume" in trains["swan"] and "--resume" not in trains["swan-rq1"]
    assert all(argv[argv.index("--preset") + 1] == "full" for argv in trains.values())
    assert all(argv.count("--steps") == 1 and argv[argv.index("--steps") + 1] == "3000" for argv in trains.values())
    assert all("--no-amp" in argv for argv in trains.values())  # a GPU retrains the CPU's numerics
    for argv in trains.values():  # both models learn the proteins and the large complexes
        corpora = argv[argv.index("--corpus") + 1:argv.index("--device")]
        assert [Path(c).name for c in corpora] == ["corpus_default", "corpus_assemblies"]
    built = next(argv for kind, argv in calls if kind == "corpus")
    assert Path(built[built.index("--assemblies-out") + 1]).name == "corpus_assemblies"
    assert built[built.index("--workers") + 1] == "16"
    assert not (tmp_path / "swan-rq1" / "config.json").exists()
    evaluated = next(argv for kind, argv in calls if kind == "evaluate")
    assert evaluated[evaluated.index("--split") + 1] == "test"


def test_recipe_rebuilds_what_stands_on_swan_and_installs_only_when_asked(monkeypatch, tmp_path):
    calls = []
    fake_tools(monkeypatch, calls)
    package = tmp_path / "package_checkpoints"
    package.mkdir()
    monkeypatch.setattr(recipe, "PACKAGE_CHECKPOINTS", package)
    work = tmp_path / "work"
    assert recipe.main(["data", "--work", str(work)]) == 0
    latent = next(argv for kind, argv in calls if kind == "latent")
    assert latent[latent.index("--autoencoder") + 1] == str(work / "swan" / "model.pt")
    assert "--install" not in latent and not any(package.iterdir())
    calls.clear()
    assert recipe.main(["data", "--work", str(work), "--install"]) == 0
    assert "--install" in next(argv for kind, argv in calls if kind == "latent")  # swan.pt and its dependants
    assert (package / "swan-rq1.pt").read_bytes() == b"weights of swan-rq1"


def test_denoising_recipe_trains_shapes_fine_tunes_the_encoder_and_installs_half_weights(
        monkeypatch, tmp_path, small_checkpoints):
    import shutil

    from napari_cryoswan.checkpoint import load_checkpoint
    from training.recipes import denoising_checkpoints as denoising

    calls = []

    def fake_train(argv):
        out = Path(argv[argv.index("--out") + 1])
        calls.append(("train", argv))
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(small_checkpoints["swan"], out / "model.pt")
        return 0

    monkeypatch.setattr(denoising.default_corpus, "main", lambda argv: calls.append(("corpus", argv)) or 0)
    monkeypatch.setattr(recipe.train, "main", fake_train)
    monkeypatch.setattr(denoising.evaluate_denoise, "main",
                        lambda argv: calls.append(("evaluate", argv)) or 0)
    package = tmp_path / "package"
    monkeypatch.setattr(denoising, "PACKAGE_CHECKPOINTS", package)
    assert denoising.main(["data", "--work", str(tmp_path / "work"), "--install"]) == 0
    trains = {Path(argv[argv.index("--out") + 1]).name: argv for kind, argv in calls if kind == "train"}
    shapes, denoiser = trains["swan-shapes"], trains["swan-denoiser"]
    assert shapes[shapes.index("--corpus") + 1].endswith("corpus_meshes")
    assert shapes.count("--steps") == 1 and shapes[shapes.index("--steps") + 1] == "1500"  # as shipped
    assert denoiser[denoiser.index("--init") + 1] == "bundled:swan"
    assert denoiser[denoiser.index("--train-only") + 1] == "encoder" and "--input-snr" in denoiser
    assert "--no-amp" in shapes and "--no-amp" in denoiser  # float32 on a GPU too
    built = next(argv for kind, argv in calls if kind == "corpus")
    assert built[built.index("--workers") + 1] == "2"  # the default
    evaluations = [argv for kind, argv in calls if kind == "evaluate"]
    assert [argv[argv.index("--corpus") + 1].rsplit("/", 1)[-1] for argv in evaluations] == [
        "corpus_meshes", "corpus_default"]
    assert "--denoiser" in evaluations[1]
    for name in ("swan-shapes", "swan-denoiser"):
        installed = package / f"{name}.pt"
        assert installed.stat().st_size < 0.6 * small_checkpoints["swan"].stat().st_size
        assert load_checkpoint(installed).provenance["stored_as"] == "float16"


def test_the_corpus_recipe_checks_the_meshes_only_when_it_builds_them(tmp_path):
    from training.recipes import default_corpus

    lock = default_corpus.LOCK_FILE.read_text().splitlines()
    for digest, relative in (line.split(maxsplit=1) for line in lock):
        if relative.startswith("structures/"):  # a tampered copy of the one file it reads
            (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / relative).write_bytes(b"not the recorded file")
    structures = sum(not line.split(maxsplit=1)[1].startswith("meshes/") for line in lock)
    with pytest.raises(SystemExit, match=rf"\({structures} problems\)"):
        default_corpus.locked_inputs(tmp_path, meshes=False)
    with pytest.raises(SystemExit, match=rf"\({len(lock)} problems\)"):  # every mesh missing too
        default_corpus.locked_inputs(tmp_path)


def test_the_corpus_recipe_builds_large_complexes_only_when_asked_with_the_protein_split(monkeypatch):
    from training.recipes import default_corpus

    calls = []
    monkeypatch.setattr(default_corpus, "locked_inputs",
                        lambda data, meshes: {"structures": [Path("s/1AKE.pdb.gz")], "meshes": [Path("m/a.obj")]})
    monkeypatch.setattr(default_corpus, "build_corpus", lambda argv: calls.append(argv) or 0)
    assert default_corpus.main(["data", "--out", "proteins", "--no-meshes"]) == 0
    assert len(calls) == 1 and "--assemblies" not in calls[0]
    calls.clear()
    assert default_corpus.main(["data", "--out", "proteins", "--no-meshes", "--assemblies-out", "large"]) == 0
    proteins, large = calls
    assert proteins[proteins.index("--out") + 1] == "proteins"
    assert large[large.index("--out") + 1] == "large" and "--assemblies-only" in large
    assert large[large.index("--split-from") + 1] == "proteins"  # no test structure leaks into training


def fake_latent_tools(monkeypatch, calls, checkpoint):
    """Every tool of the latent recipe, writing what the real one writes (``checkpoint``'s weights)."""
    import shutil

    from training.recipes import latent_checkpoints as latent

    def writes(kind, output):
        def tool(argv):
            calls.append((kind, argv))
            out = Path(argv[argv.index("--out") + 1] if "--out" in argv else argv[0])
            target = output(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoint, target)
            return 0
        return tool

    monkeypatch.setattr(recipe.default_corpus, "main", lambda argv: calls.append(("corpus", argv)) or 0)
    monkeypatch.setattr(latent.train_embedding, "main", writes("head", lambda out: out))
    monkeypatch.setattr(latent.train_diffusion, "main", writes("diffusion", lambda out: out / "model.pt"))
    monkeypatch.setattr(latent.calibrate_diffusion, "main", writes("calibrate", lambda out: out))
    monkeypatch.setattr(recipe.train, "main", writes("train", lambda out: out / "model.pt"))
    monkeypatch.setattr(latent.build_index, "main", writes("index", lambda out: out / "manifest.json"))

    def fake_projection(argv):
        calls.append(("projection", argv))
        (Path(argv[0]) / "projection").mkdir()
        (Path(argv[0]) / "projection" / "meta.json").write_text("{}")
        (Path(argv[0]) / "shards").mkdir()
        return 0

    import napari_cryoswan.explorer

    monkeypatch.setattr(napari_cryoswan.explorer, "main", fake_projection)
    return latent


def test_latent_recipe_fits_every_dependant_to_the_autoencoder_given_and_goes_on_after_a_kill(
        monkeypatch, tmp_path, small_checkpoints):
    calls = []
    latent = fake_latent_tools(monkeypatch, calls, small_checkpoints["swan"])
    work = tmp_path / "work"
    (work / "latent" / "diffusion").mkdir(parents=True)
    (work / "latent" / "diffusion" / "last.pt").write_bytes(b"state")  # killed mid-run
    args = ["data", "--work", str(work), "--autoencoder", str(small_checkpoints["swan"])]
    assert latent.main(args) == 0
    placed = work / "latent" / "swan.pt"
    assert placed.read_bytes() == small_checkpoints["swan"].read_bytes()
    by_kind = {kind: argv for kind, argv in calls}
    assert by_kind["head"][by_kind["head"].index("--checkpoint") + 1] == str(placed)
    assert [Path(c).name for c in by_kind["head"][by_kind["head"].index("--corpus") + 1:][:2]] == [
        "corpus_default", "corpus_assemblies"]
    assert by_kind["head"][by_kind["head"].index("--views-cache") + 1] == str(work / "latent" / "embedding_views.npz")
    assert "--resume" in by_kind["diffusion"]
    assert by_kind["calibrate"][by_kind["calibrate"].index("--autoencoder") + 1] == str(placed)
    assert by_kind["train"][by_kind["train"].index("--init") + 1] == str(placed)  # not bundled:swan
    assert "index" not in by_kind  # the index is built only from installed files
    calls.clear()
    assert latent.main(args) == 0  # all done: nothing is trained again
    assert [kind for kind, _ in calls] == ["corpus"]


def test_latent_recipe_refuses_a_folder_of_another_autoencoder(monkeypatch, tmp_path, small_checkpoints, capsys):
    latent = fake_latent_tools(monkeypatch, [], small_checkpoints["swan"])
    work = tmp_path / "work"
    (work / "latent").mkdir(parents=True)
    (work / "latent" / "swan.pt").write_bytes(b"another autoencoder")
    assert latent.main(["data", "--work", str(work), "--autoencoder", str(small_checkpoints["swan"])]) == 2
    assert "another autoencoder" in capsys.readouterr().err
    assert (work / "latent" / "swan.pt").read_bytes() == b"another autoencoder"  # nothing lost


def test_latent_recipe_installs_the_files_then_builds_the_index_from_the_installed_swan(
        monkeypatch, tmp_path, small_checkpoints):
    calls = []
    latent = fake_latent_tools(monkeypatch, calls, small_checkpoints["swan"])
    package = tmp_path / "package" / "checkpoints"
    package.mkdir(parents=True)
    old_index = tmp_path / "package" / "data" / "index"
    old_index.mkdir(parents=True)
    (old_index / "manifest.json").write_text("the old autoencoder's index")
    monkeypatch.setattr(latent, "PACKAGE_CHECKPOINTS", package)
    monkeypatch.setattr(latent, "PACKAGE_INDEX", old_index)
    assert latent.main(["data", "--work", str(tmp_path / "work"), "--autoencoder",
                        str(small_checkpoints["swan"]), "--install"]) == 0
    for name in ("swan.pt", "swan.embedding.pt", "swan.diffusion.pt", "swan-denoiser.pt"):
        assert (package / name).is_file()
    indexed = next(argv for kind, argv in calls if kind == "index")
    assert indexed[indexed.index("--checkpoint") + 1] == "bundled:swan"
    assert indexed[indexed.index("--rotations") + 1] == "0"
    assert sorted(p.name for p in old_index.iterdir()) == ["manifest.json", "projection", "shards"]
    assert (old_index / "manifest.json").read_bytes() == small_checkpoints["swan"].read_bytes()
    assert not old_index.with_name("index.partial").exists()
