"""Factorized, l2-normalised vector quantizer (ViT-VQGAN, Yu et al. 2022, sec. 3.2).

Encoder features are projected to a small code dimension, l2-normalised, and snapped to the nearest
code by cosine similarity. The straight-through estimator passes gradients from the quantized output
back to the encoder; the codebook and commitment losses (VQ-VAE, van den Oord et al. 2017, eq. 3)
pull codes and encodings together. Codes left unused are restarted at random current encodings
(as in Jukebox / vector-quantize-pytorch's dead-code expiry): without this the codebook collapses to a
handful of codes early in training.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def nearest_codes(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the most similar code for each latent.

    Args:
        latents: ``[..., D]`` l2-normalised latents.
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


class FactorizedQuantizer(nn.Module):
    """Quantize ``[B, N, input_dim]`` tokens to a codebook of ``codebook_size`` codes of ``code_dim``.

    ``forward`` returns ``(quantized, indices, losses)``: ``quantized`` is ``[B, N, input_dim]``
    (the chosen codes projected back up, with straight-through gradients), ``indices`` ``[B, N]``,
    ``losses`` a dict with ``codebook`` and ``commitment``. ``get_output_from_indices`` rebuilds
    ``quantized`` from indices alone: in eval mode ``get_output_from_indices(forward(x)[1])`` equals
    ``forward(x)[0]``.
    """

    def __init__(
        self,
        input_dim: int,
        codebook_size: int,
        code_dim: int,
        beta: float = 0.25,
        usage_decay: float = 0.95,
        dead_code_threshold: float = 0.03,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.usage_decay = usage_decay
        self.dead_code_threshold = dead_code_threshold
        self.project_in = nn.Linear(input_dim, code_dim)
        self.project_out = nn.Linear(code_dim, input_dim)
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))
        # EMA of how many latents picked each code per step; saved, so a resumed run keeps it.
        self.register_buffer("code_usage", torch.ones(codebook_size))

    @torch.no_grad()
    def restart_dead_codes(self, latents: torch.Tensor, indices: torch.Tensor) -> int:
        """Update the usage EMA with this step's picks; move codes whose usage fell below the
        threshold onto randomly chosen current latents. Under DDP the counts are summed over ranks
        and rank 0's new codebook is broadcast, so every rank keeps the same codes.

        Args:
            latents: ``[N, code_dim]`` this step's normalised latents; indices: ``[N]`` their codes.

        Returns:
            number of codes restarted.
        """
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size).to(self.code_usage.dtype)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
        self.code_usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        dead = self.code_usage < self.dead_code_threshold
        num_dead = int(dead.sum())
        if num_dead:
            choice = torch.randint(latents.shape[0], (num_dead,), device=latents.device)
            self.codebook.data[dead] = latents[choice].to(self.codebook.dtype)
            self.code_usage[dead] = 1.0
            if distributed:
                dist.broadcast(self.codebook.data, src=0)
        return num_dead

    def normalized_codebook(self) -> torch.Tensor:
        """``[K, code_dim]`` unit-length codes."""
        return F.normalize(self.codebook, dim=-1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, input_dim]`` -> ``[B, N, code_dim]`` unit-length latents (before snapping)."""
        return F.normalize(self.project_in(tokens), dim=-1)

    def forward(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        latents = self.encode(tokens)
        codebook = self.normalized_codebook()
        indices = nearest_codes(latents.detach(), codebook)
        if self.training and self.dead_code_threshold > 0:
            if self.restart_dead_codes(latents.detach().reshape(-1, self.code_dim), indices):
                codebook = self.normalized_codebook()
                indices = nearest_codes(latents.detach(), codebook)
        codes = F.embedding(indices, codebook)
        codebook_loss, commitment_loss = vq_losses(latents, codes, self.beta)
        straight_through = latents + (codes - latents).detach()
        quantized = self.project_out(straight_through)
        return quantized, indices, {"codebook": codebook_loss, "commitment": commitment_loss}

    @torch.no_grad()
    def quantize(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(quantized, indices)`` with no side effects (no code restarts, no losses): for
        inference, the viewer, and stage 2."""
        indices = nearest_codes(self.encode(tokens), self.normalized_codebook())
        return self.get_output_from_indices(indices), indices

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` long -> ``[B, N, input_dim]``."""
        return self.project_out(F.embedding(indices, self.normalized_codebook()))
