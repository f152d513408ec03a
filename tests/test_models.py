"""Cryo-SWAN, its quantizers and the baselines: shapes, round trips, losses and learning."""

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_cryoswan.models import (MODEL_NAMES, PAPER_CODEBOOK_SIZE, build_from_config, build_model,
                                    default_optimizer, model_config)
from napari_cryoswan.models.baselines import axis_angle_to_matrix
from napari_cryoswan.models.blocks import VoxelPositionalEncoding
from napari_cryoswan.models.quantize import ResidualQuantizer, StochasticQuantizer
from napari_cryoswan.models.swan import RQ1_SCALES, RQ2_SCALES, CryoSwan

STRUCTURES = Path(__file__).parent / "data" / "structures"


def small(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name, preset="small")


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
    assert list(full.reconstruction_variants(x)) == ["RQ1+RQ2"]


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
        norms = out.levels[level]["residual_norms"]
        assert torch.all(norms[1:] < norms[:-1]), (level, norms)
        assert norms[0] < out.levels[level]["latent"].norm(dim=1).mean()  # the first scale too


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
