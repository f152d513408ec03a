"""Cryo-SWAN, its quantizers and the baselines: shapes, round trips, losses and learning."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_cryoswan.models import (MODEL_NAMES, PAPER_CODEBOOK_SIZE, build_from_config, build_model,
                                    default_optimizer, model_config)
from napari_cryoswan.models.baselines import axis_angle_to_matrix
from napari_cryoswan.models.blocks import VoxelPositionalEncoding
from napari_cryoswan.models.quantize import Phi, ResidualQuantizer, StochasticQuantizer, kmeans
from napari_cryoswan.models.registry import step_codebooks, warm_start_codebooks
from napari_cryoswan.models.registry import VAR_SCALES
from napari_cryoswan.models.swan import RQ1_SCALES, RQ2_SCALES, CryoSwan

STRUCTURES = Path(__file__).parent / "data" / "structures"


# Algorithm 1 read literally (the presets train the approximation design, docs/MODELS.md)
LITERAL = {"decoder_input": "rq1", "approx_weight": 0.0}


def small(name: str, seed: int = 0, **config):
    torch.manual_seed(seed)
    return build_model(name, preset="small", **config)


def seeded_swan(x: torch.Tensor, **config):
    """A small Cryo-SWAN of the given config whose codebooks one training forward on x seeded."""
    model = small("swan", **config)
    model(x)
    return model


def are_rows_of(vectors_NC: torch.Tensor, rows_MC: torch.Tensor) -> torch.Tensor:
    """For each vector: is it exactly one of the rows?"""
    return (vectors_NC.detach()[:, None, :] == rows_MC[None]).all(-1).any(1)


def volumes(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, 64, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def densities() -> torch.Tensor:
    """64³, 4 Å, z-scored densities simulated at 8 Å from the structures in tests/data."""
    from napari_cryoswan.preprocess import preprocess
    from napari_cryoswan.simulate import load_atoms, simulate_density

    paths = sorted(STRUCTURES.glob("*.pdb.gz"))
    assert len(paths) >= 3
    maps = [preprocess(simulate_density(load_atoms(p), voxel_size=4.0, resolution=8.0)).data for p in paths]
    return torch.from_numpy(np.stack(maps))[:, None]


# ─── Cryo-SWAN: Algorithm 1 and 2 shapes ─────────────────────────────────────────────────────


def test_swan_codes_and_latents_have_the_shapes_of_each_level_and_scale():
    model = small("swan")
    out = model(volumes(2))
    assert out.recon.shape == (2, 1, 64, 64, 64)
    assert list(out.codes) == ["rq1", "rq2"]
    assert [tuple(c.shape) for c in out.codes["rq1"]] == [(2, s, s, s) for s in RQ1_SCALES]
    assert [tuple(c.shape) for c in out.codes["rq2"]] == [(2, s, s, s) for s in RQ2_SCALES]
    code_dim = model.config.code_dim
    assert out.levels["rq1"]["quantized"].shape == (2, code_dim, 16, 16, 16)
    assert out.levels["rq2"]["quantized"].shape == (2, code_dim, 8, 8, 8)
    # decoder_2 brings level 2 up to 16³, where it is concatenated with Enc[1]
    assert out.levels["rq2"]["decoded"].shape[-3:] == (16, 16, 16)
    assert set(out.losses) >= {"total", "recon", "commit", "commit/rq1", "commit/rq2"}
    torch.testing.assert_close(out.losses["commit"], out.losses["commit/rq1"] + out.losses["commit/rq2"])


def test_the_rq1_ablation_is_one_level_of_the_same_class():
    full, rq1 = small("swan"), small("swan-rq1")
    assert isinstance(rq1, CryoSwan) and rq1.config.levels == 1 and full.config.levels == 2
    x = volumes(1)
    assert list(rq1.encode(x).codes) == ["rq1"]
    assert list(rq1.reconstruction_variants(x)) == ["RQ1"]
    assert list(full.reconstruction_variants(x)) == ["RQ1+RQ2", "RQ2"]  # RQ2: the approximation
    assert list(small("swan", **LITERAL).reconstruction_variants(x)) == ["RQ1+RQ2"]


@pytest.mark.parametrize("decoder_input", ["residual", "both"])
def test_both_levels_reach_the_reconstruction(decoder_input):
    torch.manual_seed(0)
    model = build_model("swan", preset="small", decoder_input=decoder_input, approx_weight=0.0)
    x = volumes(2)
    model(x).losses["total"].backward()  # seeds the codebooks
    assert all(p.grad is not None for p in model.quantizers[1].parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        codes = model.encode(x).codes
        other = model.encode(volumes(2, seed=1)).codes
        swapped = {"rq1": codes["rq1"], "rq2": other["rq2"]}
        # RQ2's codes alone change the decoded map: the literal Algorithm 1 ignores them
        assert (model.decode_codes(swapped) - model.decode_codes(codes)).abs().max() > 1e-3
    literal = small("swan", **LITERAL)
    literal(x)
    literal.eval()
    with torch.no_grad():
        codes = literal.encode(x).codes
        swapped = {"rq1": codes["rq1"], "rq2": literal.encode(volumes(2, seed=1)).codes["rq2"]}
        torch.testing.assert_close(literal.decode_codes(swapped), literal.decode_codes(codes))


def test_in_the_residual_design_rq1_quantizes_what_rq2_left():
    model = seeded_swan(volumes(2), decoder_input="residual")
    model.eval()
    with torch.no_grad():
        out = model(volumes(2))
    level1 = out.levels["rq1"]
    prior = model.prior_convs[0](out.levels["rq2"]["decoded"])
    # what the decoder reads is RQ2's prior plus RQ1's codes, decoded from RQ1's codes
    torch.testing.assert_close(level1["quantized"], prior + model.quantizers[0].decode(out.codes["rq1"]))


def test_level_dropout_gives_an_in_model_rq1_beside_rq1_plus_rq2():
    x = volumes(4)
    model = seeded_swan(x, decoder_input="residual", level_dropout=0.5, approx_weight=0.0)
    assert model.variants == ("RQ1+RQ2", "RQ1")
    variants = model.reconstruction_variants(x[:2])
    assert list(variants) == ["RQ1+RQ2", "RQ1"] and model.training  # the mode is restored
    assert all(v.shape == (2, 1, 64, 64, 64) for v in variants.values())
    assert (variants["RQ1"] - variants["RQ1+RQ2"]).abs().max() > 1e-3
    torch.testing.assert_close(variants["RQ1+RQ2"], model.reconstruct(x[:2]))
    # while training, a share of the maps is decoded without level 2, drawn per map
    r_BCdhw = torch.ones(64, 3, 2, 2, 2)
    dropped = (model._drop_coarse(r_BCdhw, False) == 0).flatten(1).all(1).float().mean()
    assert 0.25 < dropped < 0.75
    model.eval()
    assert model._drop_coarse(r_BCdhw, False).eq(1).all()
    # without level dropout no in-model RQ1 is offered: it would be decoded out of distribution
    assert build_model("swan", preset="small", decoder_input="residual", approx_weight=0.0).variants == ("RQ1+RQ2",)
    with pytest.raises(ValueError, match="decoder_input"):
        build_model("swan", preset="small", decoder_input="sideways")


def test_fine_dropout_makes_level_2_reconstruct_alone():
    x = volumes(2)
    model = seeded_swan(x, decoder_input="residual", fine_dropout=0.5, approx_weight=0.0)
    assert model.variants == ("RQ1+RQ2", "RQ2")
    variants = model.reconstruction_variants(x)
    # "RQ2" decodes RQ2's prior alone: the first step of the by-scale decode that holds all of RQ2
    torch.testing.assert_close(variants["RQ2"], model.reconstructions_by_scale(x)["RQ2 8³"])
    assert (variants["RQ2"] - variants["RQ1+RQ2"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="fine_dropout needs"):
        build_model("swan", preset="small", fine_dropout=0.5, **LITERAL)


def test_the_approximation_loss_asks_level_2_for_the_coarse_map():
    x = volumes(2)
    model = seeded_swan(x, decoder_input="residual", approx_weight=0.5)
    out = model(x)
    target = torch.nn.functional.interpolate(x, size=16, mode="area")
    approx = out.levels["rq1"]["approximation"]
    assert approx.shape == (2, 1, 16, 16, 16)
    torch.testing.assert_close(out.losses["approx"], ((approx - target) ** 2).mean())
    torch.testing.assert_close(out.losses["total"],
                               out.losses["recon"] + out.losses["commit"] + 0.5 * out.losses["approx"])
    # the loss reaches level 2's decoder: RQ2 must carry the approximation
    model.zero_grad()
    out.losses["approx"].backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.decoders[1].parameters())
    # the in-model "RQ2" is that approximation on the input's grid
    assert model.variants == ("RQ1+RQ2", "RQ2")
    variants = model.reconstruction_variants(x)
    assert variants["RQ2"].shape == x.shape
    model.eval()
    with torch.no_grad():
        coarse = model(x).levels["rq1"]["approximation"]
    upsampled = torch.nn.functional.interpolate(coarse, size=64, mode="trilinear", align_corners=False)
    torch.testing.assert_close(variants["RQ2"], upsampled)
    assert (variants["RQ2"] - variants["RQ1+RQ2"]).abs().max() > 1e-3
    # a level-1-only model, or the literal design, has no prior to ask
    with pytest.raises(ValueError, match="approx_weight"):
        build_model("swan", preset="small", decoder_input="rq1", approx_weight=0.5)
    assert "approx" not in small("swan", decoder_input="residual", approx_weight=0.0)(x).losses


def test_a_noise_aware_fine_tune_asks_the_approximation_of_the_clean_map():
    clean = volumes(2)
    noisy = clean + torch.randn_like(clean)
    model = seeded_swan(clean, decoder_input="residual", approx_weight=0.5)
    out = model(noisy)
    terms = model.losses_against(out, clean)
    approx = out.levels["rq1"]["approximation"]
    target = torch.nn.functional.interpolate(clean, size=16, mode="area")
    torch.testing.assert_close(terms["approx"], ((approx - target) ** 2).mean())
    torch.testing.assert_close(terms["recon"], ((out.recon - clean) ** 2).mean())
    torch.testing.assert_close(terms["total"], terms["recon"] + terms["commit"] + 0.5 * terms["approx"])
    assert float(terms["approx"]) < float(out.losses["approx"])  # the noise is not asked for


def test_the_reconstruction_after_each_perception_scale_ends_at_the_full_one():
    torch.manual_seed(0)
    model = build_model("swan", preset="small", decoder_input="residual")
    x = volumes(2)
    model(x)
    steps = model.reconstructions_by_scale(x)
    assert list(steps) == [f"RQ2 {s}³" for s in RQ2_SCALES] + [f"RQ1 {s}³" for s in RQ1_SCALES]
    torch.testing.assert_close(steps["RQ1 16³"], model.reconstruct(x))
    assert (steps["RQ2 1³"] - steps["RQ1 16³"]).abs().max() > 1e-3
    # the literal Algorithm 1 decodes level 1's codes only: its steps are RQ1's scales
    assert list(small("swan", **LITERAL).reconstructions_by_scale(x)) == [f"RQ1 {s}³" for s in RQ1_SCALES]


def test_each_scales_code_map_covers_the_block_of_the_box_it_pooled():
    torch.manual_seed(0)
    model = build_model("swan", preset="small", decoder_input="residual")
    x = volumes(2)
    model(x)
    maps, codes = model.code_maps_by_scale(x), model.encode(x).codes
    assert list(maps) == list(model.reconstructions_by_scale(x))  # one map per step
    for level, scales in (("rq2", RQ2_SCALES), ("rq1", RQ1_SCALES)):
        for scale, idx_Bsss in zip(scales, codes[level]):
            code_map = maps[f"{level.upper()} {scale}³"][:, 0]
            assert code_map.shape == (2, 64, 64, 64) and code_map.dtype == torch.int64
            # voxel i of the box lies in cell floor(i·s/64) of the s³ code grid
            cell = torch.arange(64) * scale // 64
            torch.testing.assert_close(code_map, idx_Bsss[:, cell][:, :, cell][:, :, :, cell])
    assert maps["RQ2 1³"][0].unique().numel() == 1  # the coarsest scale: one code for the whole box
    assert maps["RQ1 16³"][0].unique().numel() > 1


def test_full_presets_carry_the_paper_hyperparameters():
    config = model_config("swan", "full")
    assert config["scales"] == (RQ1_SCALES, RQ2_SCALES) == ((1, 4, 6, 8, 10, 12, 14, 16), (1, 2, 4, 8))
    assert config["pe_freqs"] == 10 and config["codebook_size"] == PAPER_CODEBOOK_SIZE == 4096
    optimizer = default_optimizer(torch.nn.Linear(2, 2))
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 1e-5


def test_positional_encoding_is_equation_1():
    v = torch.tensor([-1.3, 0.0, 0.25, 2.0]).view(1, 1, 4, 1, 1)
    features = VoxelPositionalEncoding(10)(v)
    assert features.shape == (1, 21, 4, 1, 1)
    torch.testing.assert_close(features[:, 0], v[:, 0])
    for level in range(10):
        torch.testing.assert_close(features[:, 1 + level], torch.sin(2**level * torch.pi * v[:, 0]))
        torch.testing.assert_close(features[:, 11 + level], torch.cos(2**level * torch.pi * v[:, 0]))


# ─── the residual quantizer ──────────────────────────────────────────────────────────────────


def test_commitment_loss_matches_a_hand_computation():
    """Alg. 2 on a 2³ latent, scales (1, 2), three 2-D codes, φ at its identity initialisation."""
    beta = 0.25
    quantizer = ResidualQuantizer(codebook_size=3, dim=2, scales=(1, 2), beta=beta)
    codes = np.array([[1.0, 0.0], [0.0, 0.5], [-0.5, -0.5]])
    with torch.no_grad():
        quantizer.codebook.weight.copy_(torch.tensor(codes))
    quantizer.codebook.initialised.fill_(True)
    f_np = np.random.default_rng(1).normal(0.3, 0.6, size=(1, 2, 2, 2, 2))
    f = torch.tensor(f_np, dtype=torch.float32, requires_grad=True)
    out = quantizer(f)

    # by hand: scale 1 quantizes the mean vector; trilinear upsampling of one voxel is a constant
    vectors = f_np[0].reshape(2, -1).T  # (8 positions, C)
    first = np.argmin(((vectors.mean(0) - codes) ** 2).sum(1))
    approx_1 = np.broadcast_to(codes[first], vectors.shape)
    second = np.array([np.argmin(((r - codes) ** 2).sum(1)) for r in vectors - approx_1])
    approx_2 = approx_1 + codes[second]
    mse_1, mse_2 = ((approx_1 - vectors) ** 2).mean(), ((approx_2 - vectors) ** 2).mean()
    expected = ((1 + beta) * mse_1 + (1 + beta) * mse_2) / 2

    assert out.codes[0].flatten().tolist() == [first]
    assert out.codes[1].flatten().tolist() == second.tolist()
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # Only the β term reaches the encoder: d/df of β‖sg[f_quant] − f‖², averaged over scales.
    out.loss.backward()
    grad = sum(beta * 2 * (vectors - a) / vectors.size for a in (approx_1, approx_2)) / 2
    np.testing.assert_allclose(f.grad[0].reshape(2, -1).T.numpy(), grad, rtol=1e-5, atol=1e-7)


def test_straight_through_estimator_passes_the_decoder_gradient_unchanged():
    quantizer = ResidualQuantizer(codebook_size=16, dim=4, scales=(1, 2, 4), beta=0.25)
    f = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
    out = quantizer(f)
    upstream = torch.randn_like(out.f_hat_BCdhw)
    (out.f_hat_BCdhw * upstream).sum().backward()
    torch.testing.assert_close(f.grad, upstream)


def test_gradients_reach_every_encoder_through_the_straight_through_estimator():
    model = small("swan")
    out = model(volumes(2))
    out.losses["recon"].backward()  # the reconstruction alone: no commitment gradient
    for encoder in model.encoders:  # level 2 trains through level 1's estimator
        first_conv = encoder.layers[0]
        assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


def test_residual_norm_falls_scale_to_scale_once_the_codebook_is_seeded_from_data(densities):
    model = small("swan").train()
    x = densities
    model(x)  # the first training batch seeds every codebook from its residuals
    assert all(bool(book.initialised) for book in model.codebooks().values())
    model.eval()
    with torch.no_grad():
        out = model(x)
    for level in ("rq1", "rq2"):
        norms, energies = out.levels[level]["residual_norms"], out.levels[level]["residual_energies"]
        assert torch.all(norms[1:] < norms[:-1]), (level, norms)
        assert norms[0] < out.levels[level]["latent"].norm(dim=1).mean()  # the first scale too
        assert torch.all(energies[1:] < energies[:-1]), (level, energies)
        assert energies[0] < out.levels[level]["latent"].pow(2).sum(1).mean()


def test_codebook_is_seeded_with_encoder_vectors():
    quantizer = ResidualQuantizer(32, 3, (4,), 0.25, refine=False)
    f = torch.randn(2, 3, 4, 4, 4)
    assert not bool(quantizer.codebook.initialised)
    quantizer.train()(f)
    rows = f.permute(0, 2, 3, 4, 1).reshape(-1, 3)
    assert bool(quantizer.codebook.initialised) and are_rows_of(quantizer.codebook.weight, rows).all()


def test_dead_codes_restart_from_current_encoder_vectors():
    quantizer = ResidualQuantizer(8, 3, (4,), 0.25, refine=False, dead_after=5)
    quantizer.train()(torch.randn(2, 3, 4, 4, 4))
    book = quantizer.codebook
    with torch.no_grad():
        book.weight[:2] = 100.0  # two codes far from every vector: never chosen again
    book.steps_since_used[:2] = 4
    f = torch.randn(2, 3, 4, 4, 4)
    quantizer(f)
    rows = f.permute(0, 2, 3, 4, 1).reshape(-1, 3)
    assert int(book.restarts) == 2
    assert are_rows_of(book.weight[:2], rows).all() and not are_rows_of(book.weight[2:], rows).any()
    assert book.steps_since_used[:2].tolist() == [0, 0]


@pytest.mark.parametrize("make", [
    lambda: ResidualQuantizer(8, 3, (4,), 0.25, refine=False, dead_after=1),
    lambda: StochasticQuantizer(codebook_size=8, dim=3, dead_after=1),
], ids=["vector", "stochastic"])
def test_backward_runs_after_a_dead_code_restart_in_the_same_step(make):
    quantizer = make().train()
    quantizer(torch.randn(2, 3, 4, 4, 4))
    with torch.no_grad():
        quantizer.codebook.weight[:2] = 100.0  # never chosen: dead after one step
    z = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    out = quantizer(z)
    assert int(quantizer.codebook.restarts) >= 2
    (out.f_hat_BCdhw.square().mean() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_expected_codes_used_matches_sampling_and_its_bounds():
    from napari_cryoswan.models.quantize import expected_codes_used

    uniform = torch.ones(4096)
    assert expected_codes_used(uniform, 29_250) == pytest.approx(4096 * (1 - (1 - 1 / 4096) ** 29_250))
    assert expected_codes_used(uniform, 1) == pytest.approx(1.0)
    skewed = torch.tensor([1000.0, 10, 1, 0, 0])  # codes never seen are never expected
    assert expected_codes_used(skewed, 10**6) == pytest.approx(3.0)
    draws = torch.multinomial(skewed / skewed.sum(), 50 * 2000, replacement=True,
                              generator=torch.Generator().manual_seed(0)).view(2000, 50)
    seen = torch.tensor([row.unique().numel() for row in draws], dtype=torch.float64).mean()
    assert expected_codes_used(skewed, 50) == pytest.approx(float(seen), abs=0.03)


def test_codebook_usage_is_reported_per_level_after_a_validation_pass():
    model = small("swan")
    model(volumes(2))
    model.reset_usage()
    model.eval()
    with torch.no_grad():
        model(volumes(2, seed=1))
    usage = model.codebook_usage()
    assert list(usage) == ["rq1", "rq2"]
    rq1 = usage["rq1"]
    assert rq1["assignments"] == 2 * sum(s**3 for s in RQ1_SCALES)
    assert 0 < rq1["fraction_used"] <= 1 and rq1["used"] + rq1["dead"] == rq1["size"]
    assert 1 <= rq1["perplexity"] <= rq1["used"]
    # and per scale, as VAR reports it: scale s can use at most 2·s³ codes of the shared book
    per_scale = rq1["per_scale"]
    assert [p["scale"] for p in per_scale] == list(RQ1_SCALES)
    assert [p["assignments"] for p in per_scale] == [2 * s**3 for s in RQ1_SCALES]
    for p in per_scale:
        assert 1 <= p["used"] <= min(rq1["size"], 2 * p["scale"] ** 3)
        assert p["fraction_used"] == p["used"] / rq1["size"]
    assert max(p["used"] for p in per_scale) <= rq1["used"]
    model.reset_usage()
    assert model.codebook_usage()["rq1"]["assignments"] == 0


def test_target_vae_pose_posteriors_start_narrow():
    # Poses as wide as their 1 rad prior hide the shape from the decoder: it learns only the mean.
    model = small("target-vae")
    with torch.no_grad():
        posterior = model._posterior(volumes(2))
    for pose in ("rotation", "translation"):
        assert posterior[pose][1].exp().sqrt().max() < 0.2
    assert posterior["z"][1].exp().sqrt().min() > 0.2  # the content latent keeps its prior width


def test_stochastic_quantizer_samples_while_training_and_is_deterministic_in_eval():
    torch.manual_seed(0)
    quantizer = StochasticQuantizer(codebook_size=16, dim=4)
    z = torch.randn(1, 4, 4, 4, 4)
    first, second = quantizer.train()(z).f_hat_BCdhw, quantizer(z).f_hat_BCdhw
    assert not torch.allclose(first, second)
    quantizer.eval()
    hard = quantizer(z)
    torch.testing.assert_close(hard.f_hat_BCdhw, quantizer.decode(hard.codes))
    assert hard.loss.item() > 0


# ─── every model in the registry ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registry_model_runs_forward_and_backward(name):
    model = small(name)
    total, terms = model.loss(volumes(2))
    assert torch.isfinite(total) and {"total", "recon"} <= set(terms)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_decoding_the_codes_equals_the_forward_pass_in_eval_mode(name):
    model = small(name)
    x = volumes(2)
    model(x)  # a training step seeds the codebooks
    model.eval()
    with torch.no_grad():
        recon = model(x).recon
        codes = model.encode(x).codes
        torch.testing.assert_close(model.decode_codes(codes), recon, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.reconstruct(x), recon, rtol=0, atol=1e-6)
    assert model.training is False


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_config_rebuilds_the_same_architecture(name):
    model = small(name)
    clone = build_from_config(model.config_dict())
    assert clone.name == name and type(clone) is type(model)
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_unknown_names_and_presets_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("unet")
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("swan", preset="huge")
    with pytest.raises(ValueError, match="unknown preset"):  # the VAEs have no codes to size
        model_config("drgn-vae", "cpu")


def test_a_fixed_seed_gives_the_same_output():
    x = volumes(2)
    first, second, other = small("swan", seed=3)(x), small("swan", seed=3)(x), small("swan", seed=4)(x)
    torch.testing.assert_close(first.recon, second.recon, rtol=0, atol=0)
    assert first.losses["total"].item() == second.losses["total"].item()
    assert all(torch.equal(a, b) for a, b in zip(first.codes["rq1"], second.codes["rq1"]))
    assert not torch.allclose(first.recon, other.recon)


def test_latent_rotation_is_a_proper_rotation():
    omega = torch.tensor([[0.0, 0.0, torch.pi / 2], [0.3, -1.1, 0.7]])
    rotation = axis_angle_to_matrix(omega)
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(2))
    # a quarter turn about z takes x to y
    torch.testing.assert_close(rotation[0] @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]),
                               atol=1e-6, rtol=0)


# ─── learning on real densities ──────────────────────────────────────────────────────────────


def test_a_short_fit_of_the_small_swan_lowers_the_reconstruction_loss(densities):
    x = densities
    model = small("swan")
    optimizer = default_optimizer(model)
    model(x)  # seed the codebooks, as the first training step does

    def eval_recon() -> float:
        model.eval()
        with torch.no_grad():
            value = model(x).losses["recon"].item()
        model.train()
        return value

    before = eval_recon()
    for _ in range(12):
        total, _ = model.loss(x)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    after = eval_recon()
    assert after < 0.8 * before, (before, after)


# ─── codebooks that live ─────────────────────────────────────────────────────────────────────


def far_from_origin(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Latents whose vectors all lie near (5, 5, 5): a code near the origin is never chosen."""
    return 5 + 0.3 * torch.randn(batch, 3, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


def optimise(quantizer, optimizer, steps: int, seed: int = 0) -> None:
    for step in range(steps):
        out = quantizer(far_from_origin(seed=seed + step))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        step_codebooks(quantizer, optimizer)


def test_weight_decay_spares_codebooks_phi_norms_and_biases():
    model = small("swan")
    groups = default_optimizer(model).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in decayed} == {
        n for n, p in model.named_parameters()
        if n.endswith(".weight") and p.dim() == 5 and ".phis." not in n}  # conv weights only
    assert not any("codebook" in names[i] or "norm" in names[i] for i in decayed)
    assert sum(len(g["params"]) for g in groups) == len(names)
    assert {g["weight_decay"] for g in groups} == {1e-5, 0.0}


@pytest.mark.parametrize("decay_all", [False, True], ids=["grouped", "decay-all"])
def test_an_unused_code_keeps_its_norm_over_50_optimizer_steps(decay_all):
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(8, 3, (4,), 0.25, refine=False, dead_after=1000).train()
    quantizer(far_from_origin())  # seeds the codes near (5, 5, 5)
    with torch.no_grad():
        quantizer.codebook.weight[0] = torch.tensor([0.02, 0.0, 0.0])  # never the nearest
    optimise(quantizer, default_optimizer(quantizer, decay_all=decay_all), 50)
    norm = quantizer.codebook.weight[0].norm().item()
    if decay_all:  # Adam's coupled decay is the row's only gradient: it walks to zero at lr a step
        assert norm < 0.002
    else:
        assert norm == pytest.approx(0.02, rel=1e-6)


def test_adam_forgets_the_moments_of_renewed_rows():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(8, 3, (4,), 0.25, refine=False, dead_ema=0.9).train()
    optimizer = default_optimizer(quantizer)
    optimise(quantizer, optimizer, 4)  # every code chosen: every row has moments
    book = quantizer.codebook
    state = optimizer.state[book.weight]
    assert (state["exp_avg_sq"][:2] > 0).all()
    with torch.no_grad():
        book.weight[:2] = 100.0  # never chosen again
    book.usage_ema_V[:2] = 0.0  # and expired at the next step
    optimise(quantizer, optimizer, 1, seed=10)
    assert int(book.restarts) == 2 and (book.weight[:2] < 50).all()
    for key in ("exp_avg", "exp_avg_sq"):
        assert (state[key][:2] == 0).all(), key
        assert (state[key][2:] != 0).any(), key


def gaussian_mixture(centres_KC: torch.Tensor, per_cluster: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    points = centres_KC.repeat_interleave(per_cluster, 0)
    return points + 0.1 * torch.randn(points.shape, generator=g)


MIXTURE_CENTRES = torch.tensor([[4.0, 0, 0], [-4, 0, 0], [0, 4, 0], [0, -4, 0], [0, 0, 4], [0, 0, -4]])


def covers(codes_VC: torch.Tensor, centres_KC: torch.Tensor, radius: float = 0.3) -> bool:
    return bool((torch.cdist(centres_KC, codes_VC).min(1).values < radius).all())


def test_kmeans_finds_distinct_centres_that_cover_every_cluster():
    torch.manual_seed(0)
    points = gaussian_mixture(MIXTURE_CENTRES, 200)
    centres = kmeans(points, 12)
    assert centres.shape == (12, 3) and centres.unique(dim=0).shape[0] == 12
    assert covers(centres, MIXTURE_CENTRES)
    # fewer distinct points than centres: jittered, still distinct
    few = kmeans(MIXTURE_CENTRES.repeat(3, 1), 8)
    assert few.unique(dim=0).shape[0] == 8 and covers(few, MIXTURE_CENTRES, radius=1e-6)


def test_kmeans_after_a_warm_up_reseeds_the_codebook_from_recent_residuals():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(12, 3, (4,), 0.25, refine=False, kmeans_after=3).train()
    book = quantizer.codebook

    def latents(centres, seed):  # 2 volumes of 4³ vectors drawn from the mixture
        points = gaussian_mixture(centres, 128, seed)
        points = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))[:128]]
        return points.view(2, 4, 4, 4, 3).permute(0, 4, 1, 2, 3)

    quantizer(latents(MIXTURE_CENTRES[:2], 0))  # the first batch seeds codes from two clusters only
    assert step_codebooks(quantizer) == 0 and not covers(book.weight.detach(), MIXTURE_CENTRES)
    quantizer(latents(MIXTURE_CENTRES, 1))
    step_codebooks(quantizer)
    quantizer(latents(MIXTURE_CENTRES, 2))
    assert step_codebooks(quantizer) == 12  # the third step ends the warm-up: every row renewed
    codes = book.weight.detach()
    assert codes.unique(dim=0).shape[0] == 12 and covers(codes, MIXTURE_CENTRES)


def test_dead_codes_expire_on_a_usage_ema_and_renew_from_the_residual_fifo():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(8, 3, (4,), 0.25, refine=False, dead_ema=0.9, dead_below=0.01).train()
    book = quantizer.codebook
    quantizer(far_from_origin(seed=0))
    with torch.no_grad():
        book.weight[0] = 100.0  # never chosen from now on
    book.step_counts_V[0] = 0  # nor counted for the seeding batch
    step_codebooks(quantizer)
    seen = [far_from_origin(seed=0)]
    # A new code starts at twice the threshold: unused, 0.9^t halves it after 7 steps (0.9^6 > ½).
    for step in range(1, 7):
        assert book.weight[0, 0].item() == 100.0, step
        seen.append(far_from_origin(seed=step))
        quantizer(seen[-1])
        step_codebooks(quantizer)
    assert int(book.restarts) == 1 and book.weight[0, 0].item() != 100.0
    rows = torch.cat([f.permute(0, 2, 3, 4, 1).reshape(-1, 3) for f in seen])
    assert are_rows_of(book.weight[:1], book.fifo()).all()  # a draw from the FIFO …
    assert book.fifo().shape[0] == rows.shape[0] and are_rows_of(book.fifo(), rows).all()  # … of all 7 steps
    assert book.usage_ema_V[0].item() == pytest.approx(2 * 0.01)


def test_a_warm_started_codebook_neither_expires_its_codes_at_once_nor_reseeds_them():
    torch.manual_seed(0)
    # 64 codes for 64 vectors a step: in any one step many codes go unchosen, as in a real codebook.
    quantizer = ResidualQuantizer(64, 3, (4,), 0.25, refine=False, dead_ema=0.9, dead_below=0.01,
                                  kmeans_after=2).train()
    quantizer(far_from_origin(batch=1, seed=0))  # seeds the codes from data, as a trained codebook's are
    book = quantizer.codebook
    book.step_counts_V.zero_()
    book.step_volumes.zero_()
    trained = book.weight.detach().clone()
    loaded = copy.deepcopy(quantizer)  # the upkeep state as a checkpoint leaves it: none
    loaded.codebook.usage_ema_V.zero_()
    cold = copy.deepcopy(loaded)
    warm_start_codebooks(loaded)
    for step in range(3):
        for q in (loaded, cold):
            q(far_from_origin(batch=1, seed=step + 1))
            step_codebooks(q)
    assert int(cold.codebook.restarts) > 0  # cold: codes unchosen in the first step expire …
    assert int(loaded.codebook.restarts) == 0  # warm: none within a new code's grace
    assert torch.equal(loaded.codebook.weight, trained)  # and no k-means re-seeding at step 2
    assert not torch.equal(cold.codebook.weight, trained)


def test_legacy_codebooks_are_not_maintained_by_the_step():
    quantizer = ResidualQuantizer(8, 3, (4,), 0.25, refine=False).train()
    quantizer(torch.randn(2, 3, 4, 4, 4))
    assert not quantizer.codebook.live and step_codebooks(quantizer) == 0
    assert not hasattr(quantizer.codebook, "fifo_NC")


def test_var_phi_keeps_a_fixed_identity_half_and_shares_four_convs_by_position():
    quantizer = ResidualQuantizer(16, 4, tuple(range(1, 9)), 0.25, phi_mix=0.5, phi_shared=4)
    assert len(quantizer.phis) == 4 and quantizer.phi_index == (0, 0, 1, 1, 2, 2, 3, 3)
    h = torch.randn(2, 4, 8, 8, 8)
    for si in range(8):
        torch.testing.assert_close(quantizer.phi(si)(h), h)  # the identity at initialisation
    phi = quantizer.phi(0)
    with torch.no_grad():
        phi.weight.add_(torch.randn_like(phi.weight))
        phi.bias.add_(1.0)
    free = Phi(4)
    free.load_state_dict(phi.state_dict())
    # however far the conv moves, φ stays half the identity: φ(h) − h = ½ (conv(h) − h)
    torch.testing.assert_close(phi(h) - h, 0.5 * (free(h) - h))
    legacy = ResidualQuantizer(16, 4, tuple(range(1, 9)), 0.25)
    assert len(legacy.phis) == 8 and legacy.phi_index == tuple(range(8)) and legacy.phi(3).mix is None
    var = ResidualQuantizer(16, 4, VAR_SCALES, 0.25, phi_shared=4)
    assert [var.phi_index.count(k) for k in range(4)] == [3, 3, 3, 3]


def test_residual_norm_falls_scale_to_scale_at_initialisation_with_var_phi():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(256, 4, (1, 2, 4, 8), 0.25, phi_mix=0.5, phi_shared=4)
    f = torch.nn.functional.avg_pool3d(torch.randn(4, 4, 10, 10, 10), 3, 1)  # smooth-ish 8³ latents
    quantizer.train()(f)  # seeds the codebook
    with torch.no_grad():
        out = quantizer.eval()(f)
    norms, energies = torch.stack(out.residual_norms), torch.stack(out.residual_energies)
    assert torch.all(norms[1:] < norms[:-1]) and norms[0] < f.norm(dim=1).mean(), norms
    # the energy is the squared norm's mean: the MSE (times C) between f and the sum of the codes
    torch.testing.assert_close(energies[-1], (f - out.f_hat_BCdhw).pow(2).sum(1).mean())
    assert torch.all(energies[1:] < energies[:-1]), energies


def test_the_swan_presets_train_the_approximation_design():
    for preset in ("small", "cpu", "full"):
        config = model_config("swan", preset)
        assert (config["decoder_input"], config["approx_weight"]) == ("residual", 1.0), preset
    assert model_config("swan-rq1", "cpu")["approx_weight"] == 0.0  # one level: nothing to approximate
    with pytest.raises(ValueError, match="set approx_weight=0 too"):  # the literal design says so
        model_config("swan", "cpu", decoder_input="rq1")
    assert model_config("swan", "cpu", **LITERAL)["decoder_input"] == "rq1"


@pytest.mark.parametrize("name", ["swan", "swan-rq1", "vq", "rq", "var", "hq"])
def test_presets_switch_on_codebooks_that_live(name):
    for preset in ("small", "cpu", "full"):
        config = model_config(name, preset)
        assert config["dead_ema"] == 0.99 and config["kmeans_after"] == 100, preset
        if name in ("swan", "swan-rq1", "var"):
            assert config["phi_mix"] == 0.5 and config["phi_shared"] == 4, preset


@pytest.mark.parametrize("name", ["vq", "rq", "var", "hq"])
def test_the_quantized_baselines_have_the_bundled_models_size_at_the_cpu_preset(name):
    """Table 1 at the bundled size compares backbones of one width: the single-level baselines
    take the RQ1-only ablation's stages, HQ-VAE's three stages take Cryo-SWAN's."""
    config = model_config(name, "cpu")
    like = model_config("swan" if name == "hq" else "swan-rq1", "cpu")
    backbone = ("widths", "blocks", "code_dim", "codebook_size")
    assert {k: config[k] for k in backbone} == {k: like[k] for k in backbone}
    assert config["codebook_size"] == PAPER_CODEBOOK_SIZE
    torch.manual_seed(0)
    model = build_model(name, preset="cpu").eval()
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert model(x).recon.shape == x.shape


def test_a_config_saved_before_these_fields_rebuilds_the_legacy_quantizer():
    config = model_config("swan", "small")
    for key in ("dead_ema", "dead_below", "kmeans_after", "phi_mix", "phi_shared"):
        del config[key]  # as in the bundled checkpoints
    model = build_from_config({"name": "swan", **config})
    for quantizer in model.quantizers:
        assert not quantizer.codebook.live
        assert len(quantizer.phis) == len(quantizer.scales) and all(phi.mix is None for phi in quantizer.phis)
