"""What every family's objective method returns: named scalar terms, the one minimised among them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Objective:
    """A family's objective on one batch: what its ``objective`` method returns (a GAN's ``generator_objective`` and
    ``discriminator_objective`` as well), so that steps, tests, benchmarks and callbacks reach any family's loss the
    same way: ``model.objective(batch).loss``.

    Args:
        terms: named scalar terms, logged as ``{stage}/{name}``; ``loss`` is the one minimised.
        batch_size: examples in the batch: the weight of its terms in the epoch's means.
        codes: the batch's codes (B, latent_dim) in the latent-variable models (posterior means), detached; None
            in the other families.
    """

    terms: dict[str, Tensor]
    batch_size: int
    codes: Tensor | None = None

    def __post_init__(self) -> None:
        if "loss" not in self.terms:
            raise ValueError(f"an objective's terms must include 'loss', the one minimised; got {sorted(self.terms)}")

    @property
    def loss(self) -> Tensor:
        """The term that the optimizer minimises."""
        return self.terms["loss"]
