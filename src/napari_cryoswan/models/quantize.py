"""Codebooks and quantizers: Algorithm 2 (multi-scale residual), plain VQ, RQ and stochastic.

One :class:`ResidualQuantizer` covers three latent spaces by its perception scales:

- Cryo-SWAN and VAR (Algorithm 2): scales (1, 4, …, 16), a Conv3d φ refines each scale;
- RQ-VAE: the full latent size D times, no φ (``refine=False``);
- VQ-VAE: the full latent size once, no φ.

Codebooks are seeded from data on the first training batch and count how often each code is
chosen (per scale), so that usage can be reported after a validation pass (``usage()``). Unused
codes are renewed either by the legacy rule (unused for ``dead_after`` training forwards) or, in
live codebooks, by ``Codebook.step_()`` once per optimizer step: an EMA of usage summed over
processes, renewal from a FIFO of recent residuals, and k-means after a warm-up.
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
    - residual_energies: mean squared L2 norm of that residual (detached): the error that each
      scale's nearest-code search and the quantizer's loss reduce. It can fall where the mean
      norm rises (a scale that evens out the residual's large and small vectors).
    """

    f_hat_BCdhw: torch.Tensor
    codes: list[torch.Tensor]
    loss: torch.Tensor
    residual_norms: list[torch.Tensor] = field(default_factory=list)
    residual_energies: list[torch.Tensor] = field(default_factory=list)


def residual_statistics(quantized: QuantizerOutput) -> dict[str, torch.Tensor]:
    """A level's per-scale residual norms and energies, as ``ModelOutput.levels`` holds them."""
    return {"residual_norms": torch.stack(quantized.residual_norms),
            "residual_energies": torch.stack(quantized.residual_energies)}


def expected_codes_used(counts_V: torch.Tensor, draws: int) -> float:
    """How many distinct codes ``draws`` independent draws from the frequencies ``counts_V`` are
    expected to hit: Σ_v 1 − (1 − p_v)^draws. Usage on a sample of that many assignments cannot be
    expected above it, however healthy the codebook: a skewed code distribution leaves rare codes
    unseen in a small split."""
    p_V = counts_V.double() / counts_V.sum().clamp_min(1)
    return float((1 - torch.exp(draws * torch.log1p(-p_V.clamp_max(1 - 1e-12)))).sum())


class Codebook(nn.Module):
    """V code vectors of dimension C, trained by gradient, seeded from data and kept alive.

    Unused codes are renewed in one of two ways:

    - legacy (``dead_ema=None``, what configs saved before "codebooks that live" get): a code
      unused for ``dead_after`` training forwards is re-seeded inside the forward pass from that
      batch's vectors, sampled by their quantization error;
    - live (``dead_ema`` set): the forward pass only counts assignments and keeps a FIFO of
      recent residual vectors; ``step_()``, called once per optimizer step, sums the counts over
      processes, updates an EMA of each code's assignments per volume, and replaces the codes
      whose EMA fell below ``dead_below`` with uniform draws from the FIFO.

    With ``kmeans_after`` set, ``step_()`` re-seeds the whole codebook with k-means centres of
    the FIFO after that many optimizer steps (the first batch's data seeding covers the warm-up).
    Renewed rows are reported once by ``pop_renewed_rows()`` so that the trainer can clear their
    optimizer state: a new code should not move with its predecessor's momentum.

    Shape:
        - weight: (V, C)
        - nearest(z_NC) → idx_N; lookup(idx_*) → (*, C)
    """

    # Per-process state that DDP must neither broadcast nor compare: each rank keeps its own
    # data's residuals, and its counts until step_() sums them.
    process_local_buffers = ("fifo_NC", "fifo_next", "fifo_filled", "step_counts_V", "step_volumes")

    def __init__(self, size: int, dim: int, dead_after: int = 50, *, slots: tuple[int, ...] = (),
                 dead_ema: float | None = None, dead_below: float = 0.01,
                 kmeans_after: int | None = None, fifo_rows: int | None = None):
        super().__init__()
        self.size, self.dim, self.dead_after = size, dim, dead_after
        self.slots = tuple(slots)  # the scale of each quantization step that shares this codebook
        self.dead_ema, self.dead_below, self.kmeans_after = dead_ema, dead_below, kmeans_after
        self.weight = nn.Parameter(torch.empty(size, dim).uniform_(-1.0 / size, 1.0 / size))
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("steps_since_used", torch.zeros(size, dtype=torch.long), persistent=False)
        self.register_buffer("counts", torch.zeros(max(len(self.slots), 1), size, dtype=torch.long),
                             persistent=False)
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long), persistent=False)
        self._renewed: list[torch.Tensor] = []
        if self.live:
            rows = fifo_rows or max(16 * size, 4096)
            self.fifo_push = max(rows // 8, 1)  # the FIFO holds about the last eight steps
            self.register_buffer("fifo_NC", torch.zeros(rows, dim), persistent=False)
            self.register_buffer("fifo_next", torch.zeros((), dtype=torch.long), persistent=False)
            self.register_buffer("fifo_filled", torch.zeros((), dtype=torch.long), persistent=False)
            self.register_buffer("step_counts_V", torch.zeros(size, dtype=torch.long), persistent=False)
            self.register_buffer("step_volumes", torch.zeros((), dtype=torch.long), persistent=False)
            self.register_buffer("usage_ema_V", torch.zeros(size), persistent=False)
            self.register_buffer("steps", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def live(self) -> bool:
        """Whether step_() maintains this codebook (EMA expiry and/or k-means after a warm-up)."""
        return self.dead_ema is not None or self.kmeans_after is not None

    @property
    def grace(self) -> float:
        """The usage EMA a new code starts from: it expires after about ln 2 / (1 − decay)
        optimizer steps (69 at 0.99) unless it is chosen."""
        return 2.0 * self.dead_below

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
        self.weight[start:start + count] = _pick_distinct(vectors_NC, count)
        if self.live:
            self.usage_ema_V[start:start + count] = self.grace

    @torch.no_grad()
    def record_(self, codes: list[torch.Tensor], training: bool) -> None:
        """Count the codes chosen at each quantization step (codes[i]: idx_B… of slot i); while
        training also age the codes that were not, and keep this step's counts for step_()."""
        used_SV = torch.stack([torch.bincount(idx.flatten(), minlength=self.size) for idx in codes])
        self.counts += used_SV
        if training:
            used_V = used_SV.sum(0)
            self.steps_since_used += 1
            self.steps_since_used[used_V > 0] = 0
            if self.live:
                self.step_counts_V += used_V
                self.step_volumes += codes[0].shape[0]

    @torch.no_grad()
    def remember_(self, vectors_NC: torch.Tensor) -> None:
        """Push a uniform sample of this step's residual vectors into the FIFO (live mode)."""
        if not self.live or vectors_NC.shape[0] == 0:
            return
        rows = self.fifo_NC.shape[0]
        take = min(vectors_NC.shape[0], self.fifo_push)
        picked_NC = vectors_NC[torch.randperm(vectors_NC.shape[0], device=vectors_NC.device)[:take]]
        start = int(self.fifo_next)
        slots_N = (start + torch.arange(take, device=self.fifo_NC.device)) % rows
        self.fifo_NC[slots_N] = picked_NC.float()
        self.fifo_next.fill_((start + take) % rows)
        self.fifo_filled.fill_(min(rows, int(self.fifo_filled) + take))

    def fifo(self) -> torch.Tensor:
        """The residual vectors held now. Shape: (n, C), n ≤ the FIFO's rows"""
        return self.fifo_NC[: int(self.fifo_filled)]

    @torch.no_grad()
    def restart_dead_(self, pool_NC: torch.Tensor, error_N: torch.Tensor) -> int:
        """Legacy renewal: re-seed codes unused for `dead_after` steps from pool vectors, favouring
        the vectors that the codebook represents worst (sampling weight = their quantization error)."""
        dead = (self.steps_since_used >= self.dead_after).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        weights = error_N.float().clamp_min(0) + 1e-12
        rows = torch.multinomial(weights, dead.numel(), replacement=dead.numel() > weights.numel())
        self.weight[dead] = pool_NC[rows].float()
        self.steps_since_used[dead] = 0
        self.restarts += dead.numel()
        self._note_renewed(dead)
        return int(dead.numel())

    @torch.no_grad()
    def step_(self) -> int:
        """Once per optimizer step, after it (live mode): sum this step's counts over processes,
        run k-means when the warm-up ends, else update the usage EMA and renew expired codes.

        Returns the number of codes renewed. Every process must call it (it all-reduces).
        """
        if not self.live or not bool(self.initialised):
            return 0
        counts = torch.cat([self.step_counts_V, self.step_volumes.view(1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.step_counts_V.zero_()
        self.step_volumes.zero_()
        self.steps += 1
        if self.kmeans_after is not None and int(self.steps) == self.kmeans_after and int(self.fifo_filled):
            self._renew_(torch.arange(self.size, device=self.weight.device), kmeans(self.fifo(), self.size))
            return self.size
        if self.dead_ema is None or int(counts[-1]) == 0:
            return 0
        self.usage_ema_V.mul_(self.dead_ema).add_(counts[:-1].float() / float(counts[-1]), alpha=1 - self.dead_ema)
        dead = (self.usage_ema_V < self.dead_below).nonzero().flatten()
        if dead.numel() == 0 or int(self.fifo_filled) == 0:
            return 0
        self._renew_(dead, _pick_distinct(self.fifo(), dead.numel()))
        self.restarts += dead.numel()
        return int(dead.numel())

    @torch.no_grad()
    def warm_start_(self) -> None:
        """Before training on from weights alone (a checkpoint keeps no upkeep state): count the
        k-means warm-up as done and give every code a new code's grace, so that codes expire when
        they go unused, not all on the first step, and the trained codebook is not re-seeded."""
        if not self.live:
            return
        if self.kmeans_after is not None:
            self.steps.fill_(max(int(self.steps), self.kmeans_after))
        self.usage_ema_V.fill_(self.grace)

    def _renew_(self, rows: torch.Tensor, vectors_NC: torch.Tensor) -> None:
        self.weight[rows] = vectors_NC.to(self.weight.dtype)
        self.usage_ema_V[rows] = self.grace
        self.steps_since_used[rows] = 0
        self._note_renewed(rows)

    def _note_renewed(self, rows: torch.Tensor) -> None:
        """Merged as they come, so a loop that never pops holds at most V rows."""
        self._renewed = [torch.cat([*self._renewed, rows]).unique()]

    def pop_renewed_rows(self) -> torch.Tensor:
        """Rows renewed (restarted or re-seeded by k-means) since the last call. Shape: (n,)"""
        rows = self._renewed[0] if self._renewed else torch.zeros(0, dtype=torch.long, device=self.weight.device)
        self._renewed = []
        return rows

    def reset_usage(self) -> None:
        self.counts.zero_()

    def usage(self) -> dict:
        """Usage since the last reset: codes used, their fraction, perplexity, dead codes; for a
        codebook shared by several scales also each scale's share of the codebook (as VAR reports)."""
        counts_SV = self.counts.double()
        counts = counts_SV.sum(0)
        total = counts.sum()
        used = int((counts > 0).sum())
        probs = counts / total.clamp_min(1)
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
        report = {
            "size": self.size,
            "used": used,
            "fraction_used": used / self.size,
            "perplexity": float(entropy.exp()) if total > 0 else 0.0,
            "dead": self.size - used,
            "assignments": int(total),
            "restarts": int(self.restarts),
        }
        if len(self.slots) > 1:
            report["per_scale"] = [
                {"scale": scale, "used": int((c > 0).sum()), "fraction_used": int((c > 0).sum()) / self.size,
                 "assignments": int(c.sum())} for scale, c in zip(self.slots, counts_SV)]
        return report


def _pick_distinct(vectors_NC: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows drawn uniformly without replacement; with too few rows, repeats get a little
    jitter so that codes stay distinct. Shape: (N, C) → (count, C)"""
    n = vectors_NC.shape[0]
    if count <= n:
        return vectors_NC[torch.randperm(n, device=vectors_NC.device)[:count]].float()
    picked = vectors_NC[torch.randint(n, (count,), device=vectors_NC.device)].float()
    return picked + 0.01 * picked.std().clamp_min(1e-6) * torch.randn_like(picked)


def _nearest_with_distance(points_NC: torch.Tensor, centres_KC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre and the squared distance to it, in chunks. Shape: (N, C), (K, C) → (N,), (N,)"""
    idx, dist = [], []
    centre_sq_K = centres_KC.pow(2).sum(1)
    for chunk_MC in points_NC.split(_DISTANCE_CHUNK):
        d_MK = torch.addmm(centre_sq_K, chunk_MC, centres_KC.t(), alpha=-2.0)
        best, where = d_MK.min(1)
        idx.append(where)
        dist.append((best + chunk_MC.pow(2).sum(1)).clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


@torch.no_grad()
def kmeans(points_NC: torch.Tensor, k: int, iterations: int = 10) -> torch.Tensor:
    """k distinct centres of `points_NC`: k-means++ seeding, then Lloyd iterations. A cluster left
    empty takes a point drawn by its squared distance to the centres (as k-means++ would), so no
    centre is wasted. With fewer distinct points than k, the rest are jittered repeats.

    Shape: (N, C) → (k, C)
    """
    points_NC = points_NC.float()
    n = points_NC.shape[0]
    first = int(torch.randint(n, ()))
    chosen = [first]
    d2_N = (points_NC - points_NC[first]).pow(2).sum(1)
    while len(chosen) < k and float(d2_N.sum()) > 0:
        j = int(torch.multinomial(d2_N, 1))
        chosen.append(j)
        d2_N = torch.minimum(d2_N, (points_NC - points_NC[j]).pow(2).sum(1))
    centres_KC = points_NC[torch.tensor(chosen, device=points_NC.device)]
    if len(chosen) < k:  # fewer distinct points than centres: nothing for Lloyd to improve
        extra_KC = centres_KC[torch.randint(len(chosen), (k - len(chosen),), device=points_NC.device)]
        extra_KC = extra_KC + 0.01 * centres_KC.std().clamp_min(1e-6) * torch.randn_like(extra_KC)
        return torch.cat([centres_KC, extra_KC])
    for _ in range(iterations):
        idx_N, d2_N = _nearest_with_distance(points_NC, centres_KC)
        sums_KC = torch.zeros_like(centres_KC).index_add_(0, idx_N, points_NC)
        sizes_K = torch.bincount(idx_N, minlength=k)
        centres_KC = torch.where(sizes_K[:, None] > 0, sums_KC / sizes_K.clamp_min(1)[:, None], centres_KC)
        empty = (sizes_K == 0).nonzero().flatten()
        if empty.numel():
            weights_N = d2_N + 1e-12
            centres_KC[empty] = points_NC[torch.multinomial(weights_N, empty.numel(), replacement=False)]
    return centres_KC


@contextmanager
def _full_precision(device_type: str):
    """Distances and codebook losses in float32 even under bf16/fp16 autocast."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


class ResidualQuantizer(nn.Module):
    """Algorithm 2: residual quantization over perception scales with a shared codebook.

    For each scale s: take the residual (encoder map minus the running approximation) down to
    s³ with area interpolation, find the nearest code per position, bring the codes back to the
    full latent size with trilinear interpolation, refine them with a Conv3d φ, and add them to
    the approximation. The loss (Alg. 2 line 10 / Eq. 5, with VAR's semantics) at each scale is

        ‖f_quant − sg[f]‖²  +  β ‖sg[f_quant] − f‖²

    on the cumulative approximation after the scale: the first term trains the codebook and φ,
    the second commits the encoder. It is averaged over scales (line 13). One straight-through
    estimator at the end passes the decoder's gradient to the encoder.

    φ is initialised to the identity (a Dirac kernel), so a data-seeded codebook shrinks the
    residual from the first step. ``phi_mix`` r makes it VAR's φ(h) = (1 − r)·h + r·conv(h),
    whose identity half cannot drift; ``phi_shared`` K shares K convs between the scales, each
    serving the scales nearest its place in the sequence (VAR: r = 0.5, K = 4). The codebook
    options (``dead_ema``, ``dead_below``, ``kmeans_after``) are :class:`Codebook`'s.
    scales[-1] must equal the latent size.

    Shape:
        - f_BCdhw: (B, C, S, S, S) with S = scales[-1]
        - output.f_hat_BCdhw: (B, C, S, S, S); output.codes[i]: (B, s_i, s_i, s_i)
    """

    def __init__(self, codebook_size: int, dim: int, scales: tuple[int, ...], beta: float, *,
                 refine: bool = True, dead_after: int = 50, phi_mix: float | None = None,
                 phi_shared: int = 0, dead_ema: float | None = None, dead_below: float = 0.01,
                 kmeans_after: int | None = None):
        super().__init__()
        if codebook_size < len(scales):
            raise ValueError("the codebook needs at least one code per scale to be seeded from data")
        self.scales, self.beta = tuple(scales), beta
        self.codebook = Codebook(codebook_size, dim, dead_after, slots=self.scales, dead_ema=dead_ema,
                                 dead_below=dead_below, kmeans_after=kmeans_after)
        self.phi_index = _phi_positions(len(self.scales), phi_shared)
        self.phis = nn.ModuleList(Phi(dim, phi_mix) for _ in range(max(self.phi_index) + 1)) if refine else None

    def forward(self, f_BCdhw: torch.Tensor) -> QuantizerOutput:
        size = f_BCdhw.shape[-1]
        if f_BCdhw.shape[-3:] != (size,) * 3 or self.scales[-1] != size:
            raise ValueError(f"expected a cubic latent of edge {self.scales[-1]}, got {tuple(f_BCdhw.shape)}")
        with _full_precision(f_BCdhw.device.type):
            return self._quantize(f_BCdhw.float())

    def _quantize(self, f_BCdhw: torch.Tensor) -> QuantizerOutput:
        book = self.codebook
        seeding = self.training and not bool(book.initialised)
        quotas = _seed_quotas(book.size, f_BCdhw.shape[0], self.scales) if seeding else None
        legacy_restarts = self.training and book.dead_ema is None
        f_no_grad = f_BCdhw.detach()
        f_rest = f_no_grad.clone()
        f_quant = torch.zeros_like(f_no_grad)
        loss = f_BCdhw.new_zeros(())
        codes, norms, energies, pool, errors = [], [], [], [], []
        seeded = 0
        for si, scale in enumerate(self.scales):
            rest_NC = _to_rows(_resize(f_rest, scale, "area"))
            if seeding:
                book.seed_(rest_NC, seeded, quotas[si])
                seeded += quotas[si]
            idx_N = book.nearest(rest_NC)
            h_BCdhw = self._embed(idx_N, si, f_BCdhw.shape)
            f_quant = f_quant + h_BCdhw
            f_rest = f_rest - h_BCdhw.detach()
            loss = loss + mse(f_quant, f_no_grad) + self.beta * mse(f_quant.detach(), f_BCdhw)
            codes.append(idx_N.view(-1, scale, scale, scale))
            norms.append(f_rest.detach().norm(dim=1).mean())
            energies.append(f_rest.detach().pow(2).sum(1).mean())
            if self.training:
                pool.append(rest_NC)
            if legacy_restarts:
                errors.append((rest_NC - book.weight.detach()[idx_N]).pow(2).sum(1))
        if seeding:
            book.initialised.fill_(True)
        book.record_(codes, self.training)
        if self.training:
            book.remember_(torch.cat(pool))
        if legacy_restarts:
            book.restart_dead_(torch.cat(pool), torch.cat(errors))
        return QuantizerOutput(_straight_through(f_BCdhw, f_quant), codes, loss / len(self.scales), norms, energies)

    def _embed(self, idx_N: torch.Tensor, si: int, full_shape: torch.Size) -> torch.Tensor:
        """Codes of scale si, as a full-size map refined by its φ. Shape: (B·s³,) → (B, C, S, S, S)"""
        scale = self.scales[si]
        h_BCsss = self.codebook.lookup(idx_N.view(-1, scale, scale, scale)).permute(0, 4, 1, 2, 3).contiguous()
        h_BCdhw = _resize(h_BCsss, full_shape[-1], "trilinear")
        return self.phi(si)(h_BCdhw) if self.phis is not None else h_BCdhw

    def phi(self, si: int) -> nn.Module:
        """The φ that refines scale si (shared by neighbouring scales when phi_shared is set)."""
        return self.phis[self.phi_index[si]]

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


class Phi(nn.Conv3d):
    """φ of Alg. 2 line 9: a 3³ conv initialised to the identity (Dirac kernel, zero bias).

    With ``mix`` r it is VAR's φ(h) = (1 − r)·h + r·conv(h): the fixed identity half keeps φ near
    the identity however far the conv moves. ``mix=None`` is the free conv of older configs.
    """

    def __init__(self, dim: int, mix: float | None = None):
        super().__init__(dim, dim, 3, padding=1)
        nn.init.dirac_(self.weight)
        nn.init.zeros_(self.bias)
        self.mix = mix

    def forward(self, h_BCdhw: torch.Tensor) -> torch.Tensor:
        if self.mix is None:
            return super().forward(h_BCdhw)
        return h_BCdhw * (1 - self.mix) + super().forward(h_BCdhw) * self.mix


def _phi_positions(n_scales: int, shared: int) -> tuple[int, ...]:
    """Which φ serves each scale: one per scale, or ``shared`` φs each serving the scales whose
    relative position si / (n − 1) falls in its equal share of [0, 1] (VAR's choice by position)."""
    if not shared or shared >= n_scales:
        return tuple(range(n_scales))
    return tuple(min(int(si / (n_scales - 1) * shared), shared - 1) for si in range(n_scales))


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

    The codebook options (``dead_ema``, ``dead_below``, ``kmeans_after``) are :class:`Codebook`'s.

    Shape:
        - z_BCdhw: (B, C, d, h, w)
        - output.f_hat_BCdhw: (B, C, d, h, w); output.codes: [idx_Bdhw (B, d, h, w)]
    """

    def __init__(self, codebook_size: int, dim: int, temperature: float = 0.5,
                 init_variance: float = 1.0, dead_after: int = 50, *, dead_ema: float | None = None,
                 dead_below: float = 0.01, kmeans_after: int | None = None):
        super().__init__()
        self.temperature = temperature
        self.codebook = Codebook(codebook_size, dim, dead_after, dead_ema=dead_ema, dead_below=dead_below,
                                 kmeans_after=kmeans_after)
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
        # Autograd keeps this copy: a legacy dead-code restart below rewrites the codebook in place.
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
        idx_Bdhw = idx_N.view(B, d, h, w)
        self.codebook.record_([idx_Bdhw], self.training)
        if self.training:
            self.codebook.remember_(z_NC.detach())
        if self.training and self.codebook.dead_ema is None:
            self.codebook.restart_dead_(z_NC.detach(), dist_NV.detach().min(-1).values)
        zq_BCdhw = zq_NC.view(B, d, h, w, C).permute(0, 4, 1, 2, 3).contiguous()
        return QuantizerOutput(zq_BCdhw, [idx_Bdhw], loss)

    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Shape: codes[0] (B, d, h, w) → (B, C, d, h, w)"""
        return self.codebook.lookup(codes[0]).permute(0, 4, 1, 2, 3).contiguous()
