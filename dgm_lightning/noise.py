"""Training noise that a resumed run draws again exactly: one random stream per (seed, rank, batch)."""

from __future__ import annotations

from typing import Any

import torch


class NoiseStream:
    """The random stream of each training batch, seeded by (``seed``, rank, batches seen so far).

    A model's latent and instance noise drawn from it depend on the batch count alone, not on what else drew random
    numbers before (data order, other ranks, a restart): a run resumed from a checkpoint that saved ``state_dict``
    draws exactly the noise that the uninterrupted run would have drawn, and every rank draws its own.

    Args:
        seed: the seed of all the streams.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.batches_seen = 0  # the counter that seeds the next batch's stream
        self._generator: torch.Generator | None = None  # one, reseeded per batch

    def next_batch(self, device: torch.device, rank: int) -> torch.Generator:
        """The stream of the next training batch on ``device`` for ``rank``; counts the batch."""
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
        # tuples of ints hash deterministically (no per-process salt, unlike strings)
        self._generator.manual_seed(hash((self.seed, rank, self.batches_seen)) % 2**63)
        self.batches_seen += 1
        return self._generator

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the seed and the batch count."""
        return {"noise_seed": self.seed, "batches_seen": self.batches_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the streams where ``state_dict`` left them."""
        self.seed = int(state["noise_seed"])
        self.batches_seen = int(state["batches_seen"])
