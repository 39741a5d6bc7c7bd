"""Quantizers: encoder tokens ``[B, N, input_dim]`` -> discrete codes -> ``[B, N, input_dim]``.

Quantizers share one interface (see ``FactorizedQuantizer``'s docstring); each is built by its
config (``VQConfig``, ``FSQConfig``, ``NoQuantizerConfig``: the model's nested ``quantizer`` option,
picked on the command line by the ``vq-quantizer`` / ``fsq-quantizer`` / ``no-quantizer`` subcommand):

- ``FactorizedQuantizer`` ("vq"): factorized, l2-normalised vector quantizer (ViT-VQGAN, Yu et al.
  2022, sec. 3.2). Encoder features are projected to a small code dimension, l2-normalised, and
  snapped to the nearest code by cosine similarity. The straight-through estimator passes gradients
  from the quantized output back to the encoder; the codebook and commitment losses (VQ-VAE, van den
  Oord et al. 2017, eq. 3) pull codes and encodings together. The codebook is initialised by
  spherical k-means on the first training batch, and codes left unused are restarted at random
  current encodings (as in Jukebox / vector-quantize-pytorch's dead-code expiry): without these
  the codebook collapses to a handful of codes early in training.
- ``FSQuantizer`` ("fsq"): finite scalar quantization (Mentzer et al. 2023, arXiv 2309.15505).
  A few bounded scalar channels are each rounded to a fixed number of levels; the implicit codebook
  is their product grid, so there is no codebook to learn, collapse or restart, and no auxiliary loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Type, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from nerfstudio.configs.base_config import InstantiateConfig
from torch import nn
from typing_extensions import Annotated

from vq3d_nerfstudio.checks import NonNegativeFloat, PositiveInt, ranged, renamed, under_current_names
from vq3d_nerfstudio.errors import Vq3dError

# ---------------------------------------------------------------------------------------------------
# Vector quantization: pure functions
# ---------------------------------------------------------------------------------------------------


def nearest_codes(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the most similar code for each latent.

    Args:
        latents: ``[..., D]`` latents. The argmax of the dot product with unit codes does not depend on
            a latent's (positive) length, so unnormalised latents, e.g. blends, snap the same.
        codebook: ``[K, D]`` l2-normalised codes.

    Returns:
        ``[...]`` long indices into the codebook (argmax of the dot product = cosine similarity).
    """
    flat = latents.reshape(-1, latents.shape[-1])
    return (flat @ codebook.t()).argmax(dim=-1).reshape(latents.shape[:-1])


def vq_losses(latents: torch.Tensor, codes: torch.Tensor, beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codebook and commitment losses.

    Args:
        latents: ``[..., D]`` encoder latents (normalised).
        codes: ``[..., D]`` the codes chosen for them.
        beta: commitment weight (0.25 in VQ-VAE and ViT-VQGAN).

    Returns:
        ``(codebook_loss, commitment_loss)``: ``mean |sg(z) - e|^2`` and ``beta * mean |z - sg(e)|^2``.
    """
    codebook_loss = F.mse_loss(codes, latents.detach())
    commitment_loss = beta * F.mse_loss(latents, codes.detach())
    return codebook_loss, commitment_loss


def code_perplexity(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """``exp(entropy)`` of the code histogram: 1 when one code is used, K when all are used evenly."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1)
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())


def spherical_kmeans_step(latents: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """One Lloyd iteration of spherical k-means (Dhillon & Modha 2001).

    Args:
        latents: ``[N, D]`` unit-length latents.
        centroids: ``[K, D]`` unit-length centroids.

    Returns:
        ``[K, D]`` unit-length centroids: each is the normalised sum (= normalised mean) of the latents
        whose most cosine-similar centroid it was; a centroid that won no latent (or whose latents sum to
        ~0) keeps its old value.
    """
    assign = nearest_codes(latents, centroids)  # (N,)
    sums = torch.zeros_like(centroids).index_add_(0, assign, latents)  # (K, D)
    keep = sums.norm(dim=-1, keepdim=True) <= 1e-6  # (K, 1) empty or cancelling clusters
    return torch.where(keep, centroids, F.normalize(sums, dim=-1))


def kmeans_plus_plus_seeds(
    latents: torch.Tensor, num_codes: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) for unit-length latents.

    The first seed is a uniformly drawn latent; each next one is drawn with probability proportional to
    its squared distance ``|x - c|^2 = 2 - 2 cos(x, c)`` to the nearest seed so far, so well-separated
    clusters each get a seed and a latent already chosen is (almost surely) not chosen again.

    Args:
        latents: ``[N, D]`` unit-length latents, ``N >= num_codes``.
        num_codes: number of seeds ``K``.
        generator: optional ``torch.Generator`` on ``latents.device``.

    Returns:
        ``[K, D]`` seeds, rows of ``latents``.
    """
    n = latents.shape[0]
    chosen = torch.empty(num_codes, dtype=torch.long, device=latents.device)
    chosen[:1] = torch.randint(n, (1,), generator=generator, device=latents.device)
    dist2 = (2 - 2 * latents @ latents[chosen[0]]).clamp_min(0)  # (N,) to the nearest seed so far
    for k in range(1, num_codes):
        # + tiny: all-duplicate latents still give a valid (uniform) distribution, with no host sync
        chosen[k : k + 1] = torch.multinomial(dist2 + 1e-12, 1, generator=generator)
        dist2 = torch.minimum(dist2, (2 - 2 * latents @ latents[chosen[k]]).clamp_min(0))
    return latents[chosen]


def kmeans_codebook(
    latents: torch.Tensor,
    num_codes: int,
    num_iters: int,
    generator: Optional[torch.Generator] = None,
    noise_std: float = 0.01,
) -> torch.Tensor:
    """A data-dependent codebook: spherical k-means of ``latents`` (cosine similarity).

    With at least ``num_codes`` latents: k-means++ seeds then ``num_iters`` Lloyd iterations. With fewer,
    k-means is not defined: every latent becomes a code, the rest are latents drawn with replacement, and
    each code gets Gaussian noise of ``noise_std`` per dimension so duplicates are distinct codes.

    Args:
        latents: ``[N, D]`` latents (normalised here).
        num_codes: codebook size ``K``.
        num_iters: Lloyd iterations (a few suffice for an initialisation).
        generator: optional ``torch.Generator`` on ``latents.device``.
        noise_std: per-dimension noise for the ``N < K`` case.

    Returns:
        ``[K, D]`` unit-length codes (float32 at least).
    """
    latents = F.normalize(latents.to(torch.promote_types(latents.dtype, torch.float32)), dim=-1)
    n, dim = latents.shape
    device = latents.device
    if n < num_codes:
        extra = torch.randint(n, (num_codes - n,), generator=generator, device=device)
        pick = torch.cat([torch.arange(n, device=device), extra])
        noise = torch.randn(num_codes, dim, generator=generator, device=device, dtype=latents.dtype)
        return F.normalize(latents[pick] + noise_std * noise, dim=-1)
    centroids = kmeans_plus_plus_seeds(latents, num_codes, generator)
    for _ in range(num_iters):
        centroids = spherical_kmeans_step(latents, centroids)
    return centroids


def reset_optimizer_rows(optimizer: torch.optim.Optimizer, param: torch.Tensor, rows_mask: torch.Tensor) -> None:
    """Zero the Adam/AdamW moment rows of ``param`` selected by ``rows_mask``, in place.

    After a code is restarted, its old first and second moments describe a different vector; left in
    place they would steer the new code with stale momentum. Zeroed, the row's next update is Adam's
    first-step update again (bias correction uses the shared step count, so it is not exactly the first
    step's size, but it carries no history). ``max_exp_avg_sq`` (amsgrad) is zeroed too when present.
    Does nothing when the optimizer holds no state for ``param`` yet (before its first step).

    Args:
        optimizer: a ``torch.optim.Adam`` / ``AdamW`` (any optimizer whose per-parameter state keys
            ``exp_avg``, ``exp_avg_sq`` are shaped like the parameter).
        param: the parameter, e.g. ``quantizer.codebook`` ``[K, D]``.
        rows_mask: ``[K]`` bool, rows to reset, e.g. ``quantizer.last_restarted``.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    rows_mask = rows_mask.to(param.device)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state and torch.is_tensor(state[key]) and state[key].shape == param.shape:
            state[key][rows_mask] = 0


# ---------------------------------------------------------------------------------------------------
# Vector quantization: module
# ---------------------------------------------------------------------------------------------------


class FactorizedQuantizer(nn.Module):
    """Quantize ``[B, N, input_dim]`` tokens to a codebook of ``codebook_size`` codes of ``code_dim``.

    The quantizer interface (shared with ``FSQuantizer``):

    - ``forward(tokens)`` -> ``(quantized, indices, losses)``: ``quantized`` is ``[B, N, input_dim]``
      (the chosen codes projected back up, with straight-through gradients), ``indices`` ``[B, N]``
      long, ``losses`` a dict with ``codebook`` and ``commitment`` scalars. In training mode it also
      initialises the codebook (first call) and restarts dead codes.
    - ``quantize(tokens)`` -> ``(quantized, indices)`` with no side effects (inference).
    - ``get_output_from_indices(indices)``: in eval mode ``get_output_from_indices(forward(x)[1])``
      equals ``forward(x)[0]``.
    - ``encode(tokens)`` -> ``[B, N, code_dim]`` latents in code space, before snapping;
      ``snap(latents)`` -> indices of their codes; ``get_codes_from_indices(indices)`` -> codes in
      code space; ``project_out`` maps code space to ``input_dim``. Edits that blend latents snap them
      with ``snap`` and never need to know how a quantizer finds its codes.
    - ``codebook_size``, ``code_dim``.

    Codebook learning (training mode only):

    - The first training forward sets the data-dependent state, then ``initialized`` (a saved buffer,
      so a resumed run does not redo it): with ``kmeans_init`` the codebook becomes the spherical
      k-means of that batch's latents, and the usage EMA starts at the expected count ``N / K``.
    - ``code_usage`` is an EMA of how many of a step's ``N`` latents (all ranks) picked each code. A code
      is dead when its usage falls below ``dead_code_fraction * N / K``, i.e. it is picked at less than
      that fraction of the uniform rate; dead codes move onto random current latents.
    - ``last_restarted`` (``[K]`` bool, not saved) marks the codes the last training forward replaced
      (all of them on the k-means step), so the trainer can reset their optimizer moments with
      ``reset_optimizer_rows``.

    Under DDP the usage counts are all-reduced and rank 0's codebook is broadcast after an
    initialisation or a restart, so every rank keeps the same codes.
    """

    has_codes = True
    """Tokens become code indices (``no-quantizer`` has none)."""

    def __init__(
        self,
        input_dim: int,
        codebook_size: int,
        code_dim: int,
        beta: float = 0.25,
        usage_decay: float = 0.95,
        dead_code_fraction: float = 0.03,
        dead_code_threshold: Optional[float] = None,
        kmeans_init: bool = True,
        num_kmeans_iters: int = 10,
    ) -> None:
        """
        Args:
            input_dim: token width.
            codebook_size: number of codes ``K``.
            code_dim: code width (ViT-VQGAN: 32).
            beta: commitment loss weight.
            usage_decay: decay of the per-step usage EMA.
            dead_code_fraction: a code is dead when its usage EMA < this * (latents per step) / K;
                0 disables restarts.
            dead_code_threshold: legacy absolute threshold on the usage EMA (picks per step). When not
                None it replaces the relative one (0 disables restarts); a value above every usage, e.g.
                2.0 with ``N / K`` <= 1, makes every code dead in a training step (tests use this).
            kmeans_init: initialise the codebook by spherical k-means on the first training batch.
            num_kmeans_iters: Lloyd iterations of that k-means.
        """
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.usage_decay = usage_decay
        self.dead_code_fraction = dead_code_fraction
        self.dead_code_threshold = dead_code_threshold
        self.kmeans_init = kmeans_init
        self.num_kmeans_iters = num_kmeans_iters
        self.project_in = nn.Linear(input_dim, code_dim)
        self.project_out = nn.Linear(code_dim, input_dim)
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))
        # EMA of how many latents picked each code per step; saved, so a resumed run keeps it.
        self.register_buffer("code_usage", torch.ones(codebook_size))
        # Whether the first-training-step initialisation (k-means, usage EMA) has run; saved.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Codes replaced by the last training forward, for the trainer's optimizer reset; not saved.
        self.register_buffer("last_restarted", torch.zeros(codebook_size, dtype=torch.bool), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before ``initialized`` existed hold a trained codebook: never re-initialise it.
        if prefix + "codebook" in state_dict and prefix + "initialized" not in state_dict:
            state_dict[prefix + "initialized"] = torch.ones((), dtype=torch.bool)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def restarts_enabled(self) -> bool:
        """Whether training steps track usage and restart dead codes."""
        if self.dead_code_threshold is not None:
            return self.dead_code_threshold > 0
        return self.dead_code_fraction > 0

    @torch.no_grad()
    def initialize_codebook(self, latents: torch.Tensor) -> None:
        """Set the codebook to the spherical k-means of ``latents`` ``[N, code_dim]`` (rank 0's, under
        DDP) and mark every code in ``last_restarted``."""
        codes = kmeans_codebook(latents, self.codebook_size, self.num_kmeans_iters)
        self.codebook.data.copy_(codes.to(self.codebook.dtype))
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.codebook.data, src=0)
        self.last_restarted.fill_(True)

    @torch.no_grad()
    def restart_dead_codes(self, latents: torch.Tensor, indices: torch.Tensor, initialize_usage: bool = False) -> int:
        """Update the usage EMA with this step's picks; move dead codes onto randomly chosen current
        latents and mark them in ``last_restarted``. Under DDP the counts are summed over ranks and rank
        0's new codebook is broadcast, so every rank keeps the same codes.

        With ``N`` latents this step (all ranks) the expected count per code is ``N / K``; dead means
        usage < ``dead_code_fraction * N / K`` (or < ``dead_code_threshold`` when that is set). A
        restarted code's usage is reset to ``max(1, N / K)``: at least the one pick of the latent it was
        copied from, at least the expected count.

        Args:
            latents: ``[N, code_dim]`` this step's normalised latents; indices: ``[N]`` their codes.
            initialize_usage: first step: start the EMA at ``N / K`` before this step's update.

        Returns:
            number of codes restarted.
        """
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size).to(self.code_usage.dtype)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
        expected = counts.sum() / self.codebook_size  # scalar tensor, N / K
        if initialize_usage:
            self.code_usage.copy_(expected.expand_as(self.code_usage))
        self.code_usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        if self.dead_code_threshold is not None:
            dead = self.code_usage < self.dead_code_threshold
        else:
            dead = self.code_usage < self.dead_code_fraction * expected
        self.last_restarted |= dead
        num_dead = int(dead.sum())
        if num_dead:
            choice = torch.randint(latents.shape[0], (num_dead,), device=latents.device)
            self.codebook.data[dead] = latents[choice].to(self.codebook.dtype)
            self.code_usage[dead] = expected.clamp_min(1.0)
            if distributed:
                dist.broadcast(self.codebook.data, src=0)
        return num_dead

    def normalized_codebook(self) -> torch.Tensor:
        """``[K, code_dim]`` unit-length codes."""
        return F.normalize(self.codebook, dim=-1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, input_dim]`` -> ``[B, N, code_dim]`` unit-length latents (before snapping)."""
        return F.normalize(self.project_in(tokens), dim=-1)

    def snap(self, latents: torch.Tensor) -> torch.Tensor:
        """``[..., code_dim]`` latents in code space (any positive length) -> ``[...]`` long indices of
        the most cosine-similar codes."""
        return nearest_codes(latents, self.normalized_codebook())

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``[...]`` long -> ``[..., code_dim]`` unit-length codes (code space, before ``project_out``)."""
        return F.embedding(indices, self.normalized_codebook())

    def forward(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        latents = self.encode(tokens)  # (B, N, code_dim)
        codebook = self.normalized_codebook()
        indices = nearest_codes(latents.detach(), codebook)  # (B, N)
        if self.training:
            self.last_restarted.zero_()
            flat = latents.detach().reshape(-1, self.code_dim)  # (B*N, code_dim)
            first_step = not bool(self.initialized)
            if first_step and self.kmeans_init:
                self.initialize_codebook(flat)
                codebook = self.normalized_codebook()
                indices = nearest_codes(latents.detach(), codebook)
            if self.restarts_enabled and self.restart_dead_codes(flat, indices, first_step):
                codebook = self.normalized_codebook()
                indices = nearest_codes(latents.detach(), codebook)
            self.initialized.fill_(True)
        codes = F.embedding(indices, codebook)
        codebook_loss, commitment_loss = vq_losses(latents, codes, self.beta)
        straight_through = latents + (codes - latents).detach()
        quantized = self.project_out(straight_through)
        return quantized, indices, {"codebook": codebook_loss, "commitment": commitment_loss}

    @torch.no_grad()
    def quantize(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(quantized, indices)`` with no side effects (no initialisation, no code restarts, no
        losses): for inference, the viewer, and stage 2."""
        indices = self.snap(self.encode(tokens))
        return self.get_output_from_indices(indices), indices

    def output_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code-space values ``[B, N, code_dim]`` (codes, latents or blends) -> ``[B, N, input_dim]``."""
        return self.project_out(codes)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` long -> ``[B, N, input_dim]``."""
        return self.output_from_codes(self.get_codes_from_indices(indices))


# ---------------------------------------------------------------------------------------------------
# Finite scalar quantization: pure functions
# ---------------------------------------------------------------------------------------------------


def fsq_bound(z: torch.Tensor, levels: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Squash each channel so that rounding it gives exactly ``L`` integer levels (FSQ, Mentzer et al.
    2023, sec. 3 and app. A.1): ``tanh(z + shift) * half_l - offset`` with
    ``half_l = (L - 1)(1 + eps) / 2``, ``offset = 0.5`` for even ``L`` else 0,
    ``shift = atanh(offset / half_l)`` (so ``bound(0) = 0``).

    Rounded, odd ``L`` gives ``{-(L-1)/2, ..., (L-1)/2}`` and even ``L`` gives ``{-L/2, ..., L/2 - 1}``:
    the output lies in ``(-half_l - offset, half_l - offset)``, and ``eps`` pushes the open ends just past
    the outer levels (by ``(L - 1) eps / 2 < 0.5``) so they are reached.

    Args:
        z: ``[..., d]`` unbounded values.
        levels: ``[d]`` long, levels per channel (each >= 2).
        eps: margin, 1e-3 as in the paper.

    Returns:
        ``[..., d]`` bounded values, same dtype as ``z``.
    """
    levels_f = levels.to(z.dtype)
    half_l = (levels_f - 1) * (1 + eps) / 2
    offset = (levels % 2 == 0).to(z.dtype) * 0.5
    shift = torch.atanh(offset / half_l)
    return torch.tanh(z + shift) * half_l - offset


def fsq_half_width(levels: torch.Tensor) -> torch.Tensor:
    """``[d]`` long ``L // 2``: integer levels divided by it lie in ``[-1, 1]``."""
    return levels // 2


def mixed_radix_basis(levels: torch.Tensor) -> torch.Tensor:
    """``[d]`` long place values of a mixed-radix number with digit ``i`` in ``[0, levels[i])``:
    ``(1, L0, L0*L1, ...)`` (the first channel is the least significant digit)."""
    return torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), dim=0)


def fsq_codes_to_indices(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Snap ``[..., d]`` code-space values to the grid and return ``[...]`` long mixed-radix indices.

    Channel ``i``'s digit is ``round(codes_i * h_i) + h_i`` (``h = L // 2``) clamped to ``[0, L_i - 1]``:
    values off the grid go to the nearest level, values past either end to that end. The index is
    ``sum_i digit_i * basis_i``; e.g. levels ``(3, 2)``: ``(-1, -1) -> 0``, ``(0, -1) -> 1``,
    ``(-1, 0) -> 3``, ``(1, 0) -> 5``.
    """
    half = fsq_half_width(levels)
    steps = torch.round(codes * half.to(codes.dtype))  # integer levels, centred
    steps = torch.clamp(steps, min=(-half).to(codes.dtype), max=(levels - 1 - half).to(codes.dtype))
    return ((steps.long() + half) * mixed_radix_basis(levels)).sum(dim=-1)


def fsq_indices_to_codes(
    indices: torch.Tensor, levels: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of ``fsq_codes_to_indices`` on the grid: ``[...]`` long -> ``[..., d]`` grid points
    ``(digit - h) / h``, in ``[-1, 1]``."""
    digits = (indices.unsqueeze(-1) // mixed_radix_basis(levels)) % levels  # (..., d)
    half = fsq_half_width(levels)
    return (digits - half).to(dtype) / half.to(dtype)


# ---------------------------------------------------------------------------------------------------
# Finite scalar quantization: module
# ---------------------------------------------------------------------------------------------------


class FSQuantizer(nn.Module):
    """Finite scalar quantization of ``[B, N, input_dim]`` tokens (Mentzer et al. 2023), with ``groups``
    codes per token.

    ``project_in`` maps a token to ``groups`` groups of ``d = len(levels)`` channels; ``encode`` bounds
    them with ``fsq_bound`` and divides by ``L // 2``; ``forward`` rounds to the grid with a straight-through
    gradient, so d quantized / d tokens is that of ``project_out(encode(tokens))``. Each group's implicit
    codebook is the product grid, ``codebook_size = prod(levels)`` codes, indexed in mixed radix (first
    channel least significant): a token carries ``groups * log2(codebook_size)`` bits. With one group
    (the default) latents are ``[B, N, d]`` and indices ``[B, N]``; with G groups they gain a group axis,
    ``[B, N, G, d]`` and ``[B, N, G]`` (lucidrains' FSQ calls G ``num_codebooks``). The losses are zeros:
    FSQ needs no codebook or commitment loss. Same interface as ``FactorizedQuantizer`` (see there), with
    no codebook parameter, usage statistics or restarts. The paper recommends e.g. levels
    ``(8, 5, 5, 5)`` for ~2^10 codes, ``(8, 8, 8, 5, 5, 5)`` for 2^16.
    """

    has_codes = True
    """Tokens become code indices (``no-quantizer`` has none)."""

    def __init__(self, input_dim: int, levels: Sequence[int], eps: float = 1e-3, groups: int = 1) -> None:
        """
        Args:
            input_dim: token width.
            levels: number of levels per channel, each >= 2.
            eps: ``fsq_bound``'s margin.
            groups: codes per token (>= 1), each over its own ``len(levels)`` channels.
        """
        super().__init__()
        levels = tuple(int(level) for level in levels)
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be a non-empty sequence of integers >= 2, got {levels}")
        if groups < 1:
            raise ValueError(f"FSQ groups must be >= 1, got {groups}")
        self.level_counts = levels
        self.codebook_size = math.prod(levels)
        self.code_dim = len(levels)
        self.groups = groups
        self.eps = eps
        self.project_in = nn.Linear(input_dim, groups * self.code_dim)
        self.project_out = nn.Linear(groups * self.code_dim, input_dim)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)

    def _grouped(self, channels: torch.Tensor) -> torch.Tensor:
        """``[B, N, G * d]`` -> ``[B, N, G, d]`` (unchanged with one group)."""
        return channels if self.groups == 1 else channels.unflatten(-1, (self.groups, self.code_dim))

    def output_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code-space values ``[B, N, d]`` (one group) or ``[B, N, G, d]`` (codes, latents or blends)
        -> ``[B, N, input_dim]``."""
        if self.groups > 1:
            codes = codes.flatten(-2)
        return self.project_out(codes.to(self.project_out.weight.dtype))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, input_dim]`` -> ``[B, N, d]`` (``[B, N, G, d]``) bounded values before rounding,
        divided by ``L // 2`` (code space: the grid points lie in ``[-1, 1]``). Computed in at least
        float32 so that rounding under autocast lands on the right level."""
        z = self._grouped(self.project_in(tokens))
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        return fsq_bound(z, self.levels, self.eps) / fsq_half_width(self.levels).to(z.dtype)

    def snap(self, latents: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` code-space values (any, e.g. blends) -> ``[...]`` long indices of the nearest grid
        points (per channel; clamped to the grid)."""
        return fsq_codes_to_indices(latents, self.levels)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``[...]`` long -> ``[..., d]`` grid points in code space (before ``project_out``)."""
        return fsq_indices_to_codes(indices, self.levels, self.project_out.weight.dtype)

    def forward(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        latents = self.encode(tokens)  # (B, N, d) or (B, N, G, d)
        half = fsq_half_width(self.levels).to(latents.dtype)
        grid = torch.round(latents * half) / half
        codes = latents + (grid - latents).detach()  # straight-through rounding
        indices = self.snap(latents.detach())  # (B, N) or (B, N, G)
        quantized = self.output_from_codes(codes)
        zero = torch.zeros((), device=tokens.device)
        return quantized, indices, {"codebook": zero, "commitment": zero.clone()}

    @torch.no_grad()
    def quantize(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(quantized, indices)`` with no side effects: for inference, the viewer, and stage 2."""
        indices = self.snap(self.encode(tokens))
        return self.get_output_from_indices(indices), indices

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` (``[B, N, G]``) long -> ``[B, N, input_dim]``."""
        return self.output_from_codes(self.get_codes_from_indices(indices))


# ---------------------------------------------------------------------------------------------------
# No quantizer: continuous tokens
# ---------------------------------------------------------------------------------------------------


class NoCodesError(Vq3dError, ValueError):
    """Asked a model with continuous tokens (``no-quantizer``) for code indices."""


class ContinuousTokens(nn.Module):
    """``no-quantizer``: the encoder's tokens go to the decoder as they are, with no codes. Beyond
    the paper: a reconstruction-only model (single image to 3D, as LRM-style models are), which measured
    the token bound (BENCHMARKS.md, token capacity). The quantizer interface where it makes sense
    (``encode``, ``output_from_codes`` and ``forward`` pass tokens through; the losses are zeros);
    everything about codes raises :class:`NoCodesError`, since stage 2, the token cache and code-space
    edits need codes."""

    has_codes = False
    codebook_size = 0

    def _no_codes(self, *args) -> torch.Tensor:
        raise NoCodesError(
            "this model has continuous tokens (no-quantizer) and no codes: stage 2, token caches and "
            "code-space edits need a run trained with fsq-quantizer (or vq-quantizer)"
        )

    snap = get_codes_from_indices = get_output_from_indices = _no_codes

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def output_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return codes

    def forward(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, None, Dict[str, torch.Tensor]]:
        zero = torch.zeros((), device=tokens.device)
        return tokens, None, {"codebook": zero, "commitment": zero.clone()}

    def quantize(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return tokens, None


# ---------------------------------------------------------------------------------------------------
# Configs: the model's ``quantizer`` is one of these (a tyro subcommand on the command line)
# ---------------------------------------------------------------------------------------------------


@dataclass
class QuantizerConfig(InstantiateConfig):
    """What every quantizer config tells the model: ``setup(input_dim)`` builds the module;
    ``codebook_size`` (codes a code index ranges over) and ``groups`` (codes per token) are derived
    from the options, never stored, so they cannot disagree with them."""

    @property
    def codebook_size(self) -> int:
        raise NotImplementedError

    @property
    def groups(self) -> int:
        return 1

    @property
    def has_codes(self) -> bool:
        return self.codebook_size > 0

    def setup(self, input_dim: int) -> nn.Module:  # type: ignore[override]
        raise NotImplementedError


@dataclass
class VQConfig(QuantizerConfig):
    """ViT-VQGAN's factorized, l2-normalised learned codebook (the paper's choice)."""

    _target: Type = field(default_factory=lambda: FactorizedQuantizer)
    size: PositiveInt = 1024
    """Number of codes in the learned codebook."""
    code_dim: PositiveInt = 32
    """Dimension of the l2-normalised code space (factorized codes, ViT-VQGAN)."""
    commitment_beta: NonNegativeFloat = 0.25
    """Commitment loss weight inside the VQ loss (VQ-VAE's beta)."""
    use_kmeans_init: renamed(bool, "--pipeline.model.quantizer.kmeans-init") = True
    """Initialise the codebook by spherical k-means on the first training batch's latents (random
    codes far from every encoding are never picked, so most of the codebook stayed unused)."""
    dead_code_fraction: NonNegativeFloat = 0.03
    """A code is restarted on a current latent when its usage (an EMA of picks per step) falls below
    this fraction of the expected picks per code per step (latents per step / codebook size), so the
    threshold scales with batch and codebook size; 0 turns restarts off. The optimizer's moments of
    restarted codes are reset."""

    @property
    def codebook_size(self) -> int:
        return self.size

    def setup(self, input_dim: int) -> FactorizedQuantizer:  # type: ignore[override]
        return FactorizedQuantizer(
            input_dim, self.size, self.code_dim, self.commitment_beta,
            kmeans_init=self.use_kmeans_init, dead_code_fraction=self.dead_code_fraction,
        )

    def __setstate__(self, state: Dict) -> None:
        """A ``config.yml`` saved before the boolean was named ``use_kmeans_init`` loads its value.
        Removal: with the old flag, at version 0.2.0."""
        self.__dict__.update(under_current_names(VQConfig, state))


@dataclass
class FSQConfig(QuantizerConfig):
    """Finite scalar quantization (Mentzer et al. 2023): a fixed grid of levels per channel, no
    codebook to learn or collapse, no auxiliary loss; G codes per token with ``groups``."""

    _target: Type = field(default_factory=lambda: FSQuantizer)
    levels: ranged(Tuple[int, ...], 2) = (8, 5, 5, 5)
    """Levels per channel; a code is one point of their product grid (8*5*5*5 = 1000 codes: the FSQ
    paper's levels for ~2^10; (8, 8, 8, 6, 5) = 15,360 for ~2^14)."""
    groups: PositiveInt = 1  # type: ignore[assignment]
    """Codes per token, each over its own channels with these levels (1: the paper's one code per
    token). G codes carry G times the bits; code indices then have a trailing axis of G, and stage 2
    models h x w x G codes."""

    @property
    def codebook_size(self) -> int:
        return math.prod(int(level) for level in self.levels)

    def setup(self, input_dim: int) -> FSQuantizer:  # type: ignore[override]
        return FSQuantizer(input_dim, self.levels, groups=self.groups)


@dataclass
class NoQuantizerConfig(QuantizerConfig):
    """Beyond the paper: continuous tokens (no codes), a reconstruction-only model for single-image
    3D; stage 2, token caches and code-space edits refuse such a run."""

    _target: Type = field(default_factory=lambda: ContinuousTokens)

    @property
    def codebook_size(self) -> int:
        return 0

    def setup(self, input_dim: int) -> ContinuousTokens:  # type: ignore[override]
        return ContinuousTokens()


QUANTIZER_COMMANDS = {"vq-quantizer": VQConfig, "fsq-quantizer": FSQConfig, "no-quantizer": NoQuantizerConfig}
"""The subcommand that picks each config on the command line (``ns-train vq3d-tiny fsq-quantizer
--pipeline.model.quantizer.groups 4``)."""

AnnotatedQuantizerUnion = Union[  # type: ignore  # prefix_name=False: "fsq-quantizer", not "pipeline.model.quantizer:fsq-quantizer"
    tuple(Annotated[config, tyro.conf.subcommand(name=name, prefix_name=False)] for name, config in QUANTIZER_COMMANDS.items())
]


def legacy_quantizer_config(state: Dict) -> QuantizerConfig:
    """The nested config for a model config saved before quantizers had their own (``quantizer``
    a string beside flat ``codebook_size``, ``fsq_levels``, ... fields), which it pops from ``state``.
    Removal: at version 0.2.0, with :data:`LEGACY_QUANTIZER_FIELDS`, when runs saved before commit 426d7d4
    (2026-12-05) no longer need to load; drop tests/test_quantizer.py's flat-fields test with it."""
    old = {key: state.pop(key) for key in LEGACY_QUANTIZER_FIELDS if key in state}
    kind = state.pop("quantizer")
    if kind == "fsq":
        return FSQConfig(levels=tuple(old.get("fsq_levels", (8, 5, 5, 5))), groups=int(old.get("fsq_groups", 1)))
    if kind == "none":
        return NoQuantizerConfig()
    return VQConfig(
        size=int(old.get("codebook_size", 1024)), code_dim=int(old.get("code_dim", 32)),
        commitment_beta=float(old.get("commitment_beta", 0.25)), use_kmeans_init=bool(old.get("codebook_kmeans_init", True)),
        dead_code_fraction=float(old.get("dead_code_fraction", 0.03)),
    )


LEGACY_QUANTIZER_FIELDS = ("codebook_size", "code_dim", "commitment_beta", "fsq_levels", "fsq_groups",
                           "codebook_kmeans_init", "dead_code_fraction")
