"""Codebooks and quantizers: Algorithm 2 (multi-scale residual), plain VQ, RQ and stochastic.

One :class:`ResidualQuantizer` covers three latent spaces by its perception scales:

- Cryo-SWAN and VAR (Algorithm 2): scales (1, 4, …, 16), a Conv3d φ refines each scale;
- RQ-VAE: the full latent size D times, no φ (``refine=False``);
- VQ-VAE: the full latent size once, no φ.

Codebooks are seeded from data on the first training batch, restart codes that went unused
for ``dead_after`` training steps, and count how often each code is chosen, so that usage can be
reported after a validation pass (``usage()``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import mse

# Rows of the distance matrix computed at once: 1024 × 4096 floats stay in cache.
_DISTANCE_CHUNK = 1024


@dataclass
class QuantizerOutput:
    """What a quantizer returns.

    - f_hat_BCdhw: the quantized map, with straight-through gradients to the input.
    - codes: one index map idx_Bsss per scale (per residual step for RQ, one for VQ).
    - loss: the quantizer's loss term (a scalar).
    - residual_norms: mean L2 norm of the residual left after each scale (detached).
    """

    f_hat_BCdhw: torch.Tensor
    codes: list[torch.Tensor]
    loss: torch.Tensor
    residual_norms: list[torch.Tensor] = field(default_factory=list)


class Codebook(nn.Module):
    """V code vectors of dimension C, trained by gradient, with data seeding and restarts.

    Shape:
        - weight: (V, C)
        - nearest(z_NC) → idx_N; lookup(idx_*) → (*, C)
    """

    def __init__(self, size: int, dim: int, dead_after: int):
        super().__init__()
        self.size, self.dim, self.dead_after = size, dim, dead_after
        self.weight = nn.Parameter(torch.empty(size, dim).uniform_(-1.0 / size, 1.0 / size))
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("steps_since_used", torch.zeros(size, dtype=torch.long), persistent=False)
        self.register_buffer("counts", torch.zeros(size, dtype=torch.long), persistent=False)
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long), persistent=False)

    def distances(self, z_NC: torch.Tensor, weight_VC: torch.Tensor | None = None) -> torch.Tensor:
        """Squared distances to every code (of `weight_VC`, by default the codebook's), up to the
        per-row constant ‖z‖² (argmin-safe).

        Shape: z_NC (N, C) → (N, V)
        """
        weight = self.weight if weight_VC is None else weight_VC
        return torch.addmm(weight.pow(2).sum(1), z_NC, weight.t(), alpha=-2.0)

    @torch.no_grad()
    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row, in cache-sized chunks. Shape: (N, C) → (N,)"""
        chunks = [self.distances(chunk).argmin(1) for chunk in z_NC.split(_DISTANCE_CHUNK)]
        return torch.cat(chunks)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)

    @torch.no_grad()
    def seed_(self, vectors_NC: torch.Tensor, start: int, count: int) -> None:
        """Copy `count` random rows of vectors_NC into codes start … start+count-1.

        With fewer vectors than codes, rows repeat with a little jitter so codes stay distinct.
        """
        n = vectors_NC.shape[0]
        if count <= n:
            picked = vectors_NC[torch.randperm(n, device=vectors_NC.device)[:count]].float()
        else:
            picked = vectors_NC[torch.randint(n, (count,), device=vectors_NC.device)].float()
            picked += 0.01 * picked.std().clamp_min(1e-6) * torch.randn_like(picked)
        self.weight[start:start + count] = picked

    @torch.no_grad()
    def record_(self, idx: torch.Tensor, training: bool) -> None:
        """Count the codes chosen; while training also age the codes that were not."""
        used = torch.bincount(idx.flatten(), minlength=self.size)
        self.counts += used
        if training:
            self.steps_since_used += 1
            self.steps_since_used[used > 0] = 0

    @torch.no_grad()
    def restart_dead_(self, pool_NC: torch.Tensor, error_N: torch.Tensor) -> int:
        """Re-seed codes unused for `dead_after` steps from pool vectors, favouring the vectors
        that the codebook represents worst (sampling weight = their quantization error)."""
        dead = (self.steps_since_used >= self.dead_after).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        weights = error_N.float().clamp_min(0) + 1e-12
        rows = torch.multinomial(weights, dead.numel(), replacement=dead.numel() > weights.numel())
        self.weight[dead] = pool_NC[rows].float()
        self.steps_since_used[dead] = 0
        self.restarts += dead.numel()
        return int(dead.numel())

    def reset_usage(self) -> None:
        self.counts.zero_()

    def usage(self) -> dict[str, float]:
        """Usage since the last reset: codes used, their fraction, perplexity, dead codes."""
        counts = self.counts.double()
        total = counts.sum()
        used = int((counts > 0).sum())
        probs = counts / total.clamp_min(1)
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
        return {
            "size": self.size,
            "used": used,
            "fraction_used": used / self.size,
            "perplexity": float(entropy.exp()) if total > 0 else 0.0,
            "dead": self.size - used,
            "assignments": int(total),
            "restarts": int(self.restarts),
        }


@contextmanager
def _full_precision(device_type: str):
    """Distances and codebook losses in float32 even under bf16/fp16 autocast."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


class ResidualQuantizer(nn.Module):
    """Algorithm 2: residual quantization over perception scales with a shared codebook.

    For each scale s: take the residual (encoder map minus the running approximation) down to
    s³ with area interpolation, find the nearest code per position, bring the codes back to the
    full latent size with trilinear interpolation, refine them with a Conv3d φ_s, and add them to
    the approximation. The loss (Alg. 2 line 10 / Eq. 5, with VAR's semantics) at each scale is

        ‖f_quant − sg[f]‖²  +  β ‖sg[f_quant] − f‖²

    on the cumulative approximation after the scale: the first term trains the codebook and φ,
    the second commits the encoder. It is averaged over scales (line 13). One straight-through
    estimator at the end passes the decoder's gradient to the encoder.

    φ is initialised to the identity (a Dirac kernel), so a data-seeded codebook shrinks the
    residual from the first step. scales[-1] must equal the latent size.

    Shape:
        - f_BCdhw: (B, C, S, S, S) with S = scales[-1]
        - output.f_hat_BCdhw: (B, C, S, S, S); output.codes[i]: (B, s_i, s_i, s_i)
    """

    def __init__(self, codebook_size: int, dim: int, scales: tuple[int, ...], beta: float,
                 refine: bool = True, dead_after: int = 50):
        super().__init__()
        if codebook_size < len(scales):
            raise ValueError("the codebook needs at least one code per scale to be seeded from data")
        self.scales, self.beta = tuple(scales), beta
        self.codebook = Codebook(codebook_size, dim, dead_after)
        self.phis = nn.ModuleList(_identity_conv(dim) for _ in scales) if refine else None

    def forward(self, f_BCdhw: torch.Tensor) -> QuantizerOutput:
        size = f_BCdhw.shape[-1]
        if f_BCdhw.shape[-3:] != (size,) * 3 or self.scales[-1] != size:
            raise ValueError(f"expected a cubic latent of edge {self.scales[-1]}, got {tuple(f_BCdhw.shape)}")
        with _full_precision(f_BCdhw.device.type):
            return self._quantize(f_BCdhw.float())

    def _quantize(self, f_BCdhw: torch.Tensor) -> QuantizerOutput:
        seeding = self.training and not bool(self.codebook.initialised)
        quotas = _seed_quotas(self.codebook.size, f_BCdhw.shape[0], self.scales) if seeding else None
        f_no_grad = f_BCdhw.detach()
        f_rest = f_no_grad.clone()
        f_quant = torch.zeros_like(f_no_grad)
        loss = f_BCdhw.new_zeros(())
        codes, norms, pool, errors = [], [], [], []
        seeded = 0
        for si, scale in enumerate(self.scales):
            rest_NC = _to_rows(_resize(f_rest, scale, "area"))
            if seeding:
                self.codebook.seed_(rest_NC, seeded, quotas[si])
                seeded += quotas[si]
            idx_N = self.codebook.nearest(rest_NC)
            h_BCdhw = self._embed(idx_N, si, f_BCdhw.shape)
            f_quant = f_quant + h_BCdhw
            f_rest = f_rest - h_BCdhw.detach()
            loss = loss + mse(f_quant, f_no_grad) + self.beta * mse(f_quant.detach(), f_BCdhw)
            codes.append(idx_N.view(-1, scale, scale, scale))
            norms.append(f_rest.detach().norm(dim=1).mean())
            if self.training:
                pool.append(rest_NC)
                errors.append((rest_NC - self.codebook.weight.detach()[idx_N]).pow(2).sum(1))
        if seeding:
            self.codebook.initialised.fill_(True)
        self.codebook.record_(torch.cat([c.flatten() for c in codes]), self.training)
        if self.training:
            self.codebook.restart_dead_(torch.cat(pool), torch.cat(errors))
        return QuantizerOutput(_straight_through(f_BCdhw, f_quant), codes, loss / len(self.scales), norms)

    def _embed(self, idx_N: torch.Tensor, si: int, full_shape: torch.Size) -> torch.Tensor:
        """Codes of scale si, as a full-size map refined by φ_si. Shape: (B·s³,) → (B, C, S, S, S)"""
        scale = self.scales[si]
        h_BCsss = self.codebook.lookup(idx_N.view(-1, scale, scale, scale)).permute(0, 4, 1, 2, 3).contiguous()
        h_BCdhw = _resize(h_BCsss, full_shape[-1], "trilinear")
        return self.phis[si](h_BCdhw) if self.phis is not None else h_BCdhw

    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """The quantized map from its codes (the forward pass without an encoder).

        Shape: codes[i] (B, s_i, s_i, s_i) → (B, C, S, S, S)
        """
        size = self.scales[-1]
        batch = codes[0].shape[0]
        full_shape = torch.Size((batch, self.codebook.dim, size, size, size))
        # Same additions in the same order as forward, so the result is bit-identical.
        f_quant = torch.zeros(full_shape, device=codes[0].device)
        with _full_precision(codes[0].device.type):
            for si, idx in enumerate(codes):
                f_quant = f_quant + self._embed(idx.flatten(), si, full_shape)
        return f_quant


def _identity_conv(dim: int) -> nn.Conv3d:
    conv = nn.Conv3d(dim, dim, 3, padding=1)
    nn.init.dirac_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _seed_quotas(codebook_size: int, batch: int, scales: tuple[int, ...]) -> list[int]:
    """Codes seeded from each scale's residuals, in proportion to that scale's vector count."""
    counts = [batch * s**3 for s in scales]
    quotas = [max(1, codebook_size * c // sum(counts)) for c in counts[:-1]]
    return quotas + [codebook_size - sum(quotas)]


def _resize(f_BCdhw: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if f_BCdhw.shape[-1] == size:
        return f_BCdhw
    return F.interpolate(f_BCdhw, size=(size, size, size), mode=mode)


def _to_rows(f_BCdhw: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) → (B·D·H·W, C)"""
    return f_BCdhw.permute(0, 2, 3, 4, 1).reshape(-1, f_BCdhw.shape[1])


def _straight_through(f_BCdhw: torch.Tensor, f_quant_BCdhw: torch.Tensor) -> torch.Tensor:
    """Values of f_quant, gradients of f. Without autograd the quantized map is returned as is,
    so decoding codes reproduces an inference forward pass bit for bit."""
    if torch.is_grad_enabled() and f_BCdhw.requires_grad:
        return f_BCdhw + (f_quant_BCdhw - f_BCdhw).detach()
    return f_quant_BCdhw


class StochasticQuantizer(nn.Module):
    """SQ-VAE's stochastic quantization (Takida et al. 2022), used by the HQ-VAE baseline.

    The posterior over codes is P(k | z) ∝ exp(−‖z − e_k‖² / 2σ²) with a learned σ². Training
    decodes a Gumbel-softmax relaxation of a sample from it; evaluation takes the most likely
    code. The loss is the per-position part of the SQ-VAE ELBO:

        E_P[‖z − e_k‖²] / 2σ²  +  KL(P ‖ uniform)

    which anneals itself: σ² shrinks as the decoder asks for sharper codes.

    Shape:
        - z_BCdhw: (B, C, d, h, w)
        - output.f_hat_BCdhw: (B, C, d, h, w); output.codes: [idx_Bdhw (B, d, h, w)]
    """

    def __init__(self, codebook_size: int, dim: int, temperature: float = 0.5,
                 init_variance: float = 1.0, dead_after: int = 50):
        super().__init__()
        self.temperature = temperature
        self.codebook = Codebook(codebook_size, dim, dead_after)
        self.log_variance = nn.Parameter(torch.tensor(math.log(init_variance)))

    def forward(self, z_BCdhw: torch.Tensor) -> QuantizerOutput:
        with _full_precision(z_BCdhw.device.type):
            return self._quantize(z_BCdhw.float())

    def _quantize(self, z_BCdhw: torch.Tensor) -> QuantizerOutput:
        B, C, d, h, w = z_BCdhw.shape
        z_NC = _to_rows(z_BCdhw)
        if self.training and not bool(self.codebook.initialised):
            self.codebook.seed_(z_NC.detach(), 0, self.codebook.size)
            self.codebook.initialised.fill_(True)
        # Autograd keeps this copy: the dead-code restart below rewrites the codebook in place.
        weight_VC = self.codebook.weight.clone()
        dist_NV = self.codebook.distances(z_NC, weight_VC) + z_NC.pow(2).sum(1, keepdim=True)
        logits_NV = -dist_NV / (2 * self.log_variance.exp())
        log_probs_NV = logits_NV.log_softmax(-1)
        probs_NV = log_probs_NV.exp()
        kl_N = (probs_NV * log_probs_NV).sum(-1) + math.log(self.codebook.size)
        loss = ((probs_NV * dist_NV).sum(-1) / (2 * self.log_variance.exp()) + kl_N).mean()
        idx_N = dist_NV.detach().argmin(-1)
        if self.training:
            zq_NC = F.gumbel_softmax(logits_NV, tau=self.temperature) @ weight_VC
        else:
            zq_NC = self.codebook.lookup(idx_N)
        self.codebook.record_(idx_N, self.training)
        if self.training:
            self.codebook.restart_dead_(z_NC.detach(), dist_NV.detach().min(-1).values)
        zq_BCdhw = zq_NC.view(B, d, h, w, C).permute(0, 4, 1, 2, 3).contiguous()
        return QuantizerOutput(zq_BCdhw, [idx_N.view(B, d, h, w)], loss)

    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Shape: codes[0] (B, d, h, w) → (B, C, d, h, w)"""
        return self.codebook.lookup(codes[0]).permute(0, 4, 1, 2, 3).contiguous()
