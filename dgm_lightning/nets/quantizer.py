"""Vector quantisation with the straight-through estimator: a codebook learned by its loss or by EMA updates,
initialised by k-means, with dead-code restarts, its statistics reduced across DDP ranks. A plain nn.Module.

Written here rather than taken from ``vector-quantize-pytorch`` (MIT, well kept; version 1.32 measured): that
library decides whether to all-reduce its codebook statistics once, when the module is built
(``sync_codebook=None`` means ``torch.distributed.is_initialized()`` at construction). A LightningModule is built
before the Trainer starts the process group, so under DDP its default silently keeps one codebook per rank, and
``sync_codebook=True`` fails in every single-process run ("Default process group has not been initialized"). Here
the reduction is decided on each call (``all_reduce_`` below), so one model trains on one process or many. The
library would also add five packages (einops, einx, frozendict, loguru, torch-einops-utils) for about 150 lines.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch import distributed as dist
from torch.nn import functional as F

from dgm_lightning.checks import check_choice, check_fraction, check_non_negative, check_positive_int

CodebookUpdate = Literal["ema", "loss"]
CodebookInit = Literal["kmeans", "random"]


def distributed() -> bool:
    """Whether a process group of more than one rank is running (decided per call, see the module docstring)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: Tensor) -> Tensor:
    """Sum the tensor over the ranks in place when a process group runs; the tensor itself otherwise."""
    if distributed():
        dist.all_reduce(tensor)
    return tensor


def broadcast_(tensor: Tensor) -> Tensor:
    """Rank zero's tensor on every rank, in place, when a process group runs."""
    if distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the code frequencies ``counts`` (K,): K when every code is used equally, 1 when one is."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def nearest_codes(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Index (N,) of the codebook row (K, D) nearest each vector (N, D) in Euclidean distance."""
    # in the inputs' dtype: autocast would run the product in bfloat16 or float16, whose rounding (0.4 % in bf16)
    # picks another code for vectors whose two nearest codes are closer than that
    with torch.autocast(vectors.device.type, enabled=False):
        # ||v - e||^2 = ||v||^2 - 2 v.e + ||e||^2; ||v||^2 is the same for every code, so it is left out
        distances = (codebook * codebook).sum(1) - 2 * vectors @ codebook.T  # (N, K)
    return distances.argmin(1)


def random_rows(vectors: Tensor, n: int) -> Tensor:
    """n rows of vectors (N, D) drawn without replacement when N >= n (with it otherwise), the same on every rank
    (rank zero's draw)."""
    if vectors.shape[0] >= n:
        index = torch.randperm(vectors.shape[0], device=vectors.device)[:n]
    else:
        index = torch.randint(0, vectors.shape[0], (n,), device=vectors.device)
    return broadcast_(vectors[index].contiguous())


def kmeans_plus_plus(vectors: Tensor, k: int) -> Tensor:
    """k seeds (k, D) among vectors (N, D) by k-means++ (each drawn with probability proportional to its squared
    distance to the nearest seed so far), drawn on rank zero's vectors and shared with every rank."""
    seeds = torch.empty(k, vectors.shape[1], device=vectors.device, dtype=vectors.dtype)
    seeds[0] = vectors[torch.randint(0, vectors.shape[0], (1,), device=vectors.device)]
    nearest = (vectors - seeds[0]).pow(2).sum(1)  # (N,) squared distance to the nearest seed
    for i in range(1, k):
        # all vectors on seeds already (fewer distinct vectors than k): any vector, uniformly
        weights = nearest if bool(nearest.sum() > 0) else torch.ones_like(nearest)
        seeds[i] = vectors[torch.multinomial(weights, 1)]
        nearest = torch.minimum(nearest, (vectors - seeds[i]).pow(2).sum(1))
    return broadcast_(seeds)


def kmeans(vectors: Tensor, k: int, iterations: int) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of vectors (N, D) into k centroids from k-means++ seeds: (centroids (k, D), counts (k,)).

    Under DDP every rank's vectors count: the sums and counts are all-reduced, so every rank gets the same centroids.
    An empty cluster keeps its centroid.

    References: Arthur & Vassilvitskii 2007, "k-means++: the advantages of careful seeding" (SODA).
    """
    centroids = kmeans_plus_plus(vectors, k)
    counts = torch.zeros(k, device=vectors.device, dtype=vectors.dtype)
    for _ in range(iterations):
        index = nearest_codes(vectors, centroids)
        counts = all_reduce_(torch.bincount(index, minlength=k).to(vectors.dtype))
        sums = all_reduce_(torch.zeros_like(centroids).index_add_(0, index, vectors))
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
    return centroids, counts


class VectorQuantizer(nn.Module):
    """Replace each D-vector of a grid (B, D, H, W) by its nearest codebook entry, gradients passed straight through.

    The codebook is learned either by its loss (``update="loss"``: ``codebook_loss``, ||sg[z_e] - e||^2, to be added
    to the objective) or by exponential moving averages of the assigned encoder outputs (``update="ema"``, Razavi et
    al.: cluster sizes N_k and sums m_k, e_k = m_k / N_k with Laplace smoothing); either way the encoder is pulled
    to its codes by ``commitment_loss``, ||z_e - sg[e]||^2 (weighted by the model's beta). Both are summed over the
    grid's elements and averaged over the batch, the scale of a log-likelihood summed over pixels.

    The codes' recent usage is kept in both modes. In training mode, before the first batch is
    quantised the codebook is initialised (``init``: ``kmeans`` of that batch's vectors, or ``random`` of them),
    and after each batch a code whose recent usage is below ``dead_code_threshold`` is restarted at a random
    encoder output of the batch (Dhariwal et al. 2020). A batch with NaN or Inf on any rank changes nothing. Under
    DDP the cluster sizes and sums are all-reduced and the k-means and restarts use shared draws, so the codebook is
    the same on every rank. In evaluation mode nothing changes.

    Args:
        num_embeddings: codebook size K.
        embedding_dim: size D of each code.
        update: ``ema`` or ``loss`` (see above).
        decay: EMA decay of the cluster sizes and sums (0.99 in Razavi et al.).
        epsilon: Laplace smoothing of the cluster sizes.
        init: ``kmeans`` or ``random`` encoder outputs of the first training batch; before it, uniform in
            [-1/K, 1/K] (van den Oord et al.).
        kmeans_iterations: Lloyd iterations of the k-means initialisation.
        dead_code_threshold: recent usage (assignments per batch, an EMA with ``usage_decay``) below which a code
            is restarted; 0 disables.
        usage_decay: decay of that usage's EMA: faster than the codebook's, so that a code the encoder has left
            is restarted within tens of batches (with 0.99 a code once used 50 times a batch would wait 400).

    References: van den Oord et al. 2017, arXiv:1711.00937; Razavi et al. 2019, arXiv:1906.00446 (EMA updates);
        Dhariwal et al. 2020, arXiv:2005.00341 (random restarts); Lancucki et al. 2020, arXiv:2005.08520 (k-means
        initialisation).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        update: CodebookUpdate = "ema",
        decay: float = 0.99,
        epsilon: float = 1e-5,
        init: CodebookInit = "kmeans",
        kmeans_iterations: int = 10,
        dead_code_threshold: float = 1.0,
        usage_decay: float = 0.9,
    ) -> None:
        super().__init__()
        check_positive_int(
            num_embeddings=num_embeddings, embedding_dim=embedding_dim, kmeans_iterations=kmeans_iterations
        )
        check_choice("update", update, CodebookUpdate)
        check_choice("init", init, CodebookInit)
        check_fraction(decay=decay, usage_decay=usage_decay)
        check_non_negative(epsilon=epsilon, dead_code_threshold=dead_code_threshold)
        if num_embeddings < 2:
            raise ValueError(f"num_embeddings must be >= 2 (one code carries no information), got {num_embeddings}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.update, self.decay, self.epsilon = update, float(decay), float(epsilon)
        self.init, self.kmeans_iterations = init, kmeans_iterations
        self.dead_code_threshold, self.usage_decay = float(dead_code_threshold), float(usage_decay)
        codebook = torch.empty(num_embeddings, embedding_dim).uniform_(-1 / num_embeddings, 1 / num_embeddings)
        if update == "loss":
            self.codebook = nn.Parameter(codebook)
        else:  # changed by the EMA updates alone, never by an optimizer
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_sums", codebook.clone())
        self.register_buffer("ema_counts", torch.ones(num_embeddings))
        self.register_buffer("usage", torch.ones(num_embeddings))  # the recent usage that dead_code_threshold reads
        # saved in checkpoints, so that a resumed run does not initialise its trained codebook again
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, z: Tensor, *, learn: bool | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Quantise a grid z (B, D, H, W): (the codes with straight-through gradients (B, D, H, W), their indices
        (B, H, W), losses ``commitment_loss`` and, with ``update="loss"``, ``codebook_loss``). ``learn``: whether
        the batch initialises and updates the codebook and restarts dead codes (None: in training mode)."""
        if z.dim() != 4 or z.shape[1] != self.embedding_dim:
            raise ValueError(
                f"the quantiser expects encoder outputs (B, {self.embedding_dim}, H, W) (embedding_dim), got "
                f"{tuple(z.shape)}; the encoder's last layer must give embedding_dim channels"
            )
        b, d, h, w = z.shape
        vectors = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B * H * W, D), one row per grid position
        # a batch with NaN or Inf (which the model's divergence policy skips) must not reach the codebook's statistics
        learns = (self.training if learn is None else learn) and self.all_finite(vectors.detach())
        if learns and not bool(self.initialized):
            self.initialize(vectors.detach().to(self.codebook.dtype))
        index = nearest_codes(vectors.detach().to(self.codebook.dtype), self.codebook.detach())
        quantized = F.embedding(index, self.codebook).view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        losses = {"commitment_loss": (z - quantized.detach()).pow(2).sum((1, 2, 3)).mean()}
        if self.update == "loss":
            losses["codebook_loss"] = (z.detach() - quantized).pow(2).sum((1, 2, 3)).mean()
        if learns:
            self.update_codebook(vectors.detach().to(self.codebook.dtype), index)
        # straight-through: the forward value is the code, the gradient reaches z as if quantisation were identity
        return z + (quantized - z).detach(), index.view(b, h, w), losses

    @staticmethod
    def all_finite(vectors: Tensor) -> bool:
        """Whether every rank's vectors are finite (one all-reduce): the ranks skip a batch's updates together."""
        bad = all_reduce_((~vectors.isfinite()).any().float().reshape(1))
        return not bool(bad.item())

    @torch.no_grad()
    def initialize(self, vectors: Tensor) -> None:
        """Set the codebook from the first training batch's encoder outputs (N, D): k-means or random rows."""
        if self.init == "kmeans":
            codebook, counts = kmeans(vectors, self.num_embeddings, self.kmeans_iterations)
        else:
            codebook = random_rows(vectors, self.num_embeddings)
            counts = all_reduce_(torch.bincount(nearest_codes(vectors, codebook), minlength=self.num_embeddings))
        self.codebook.data.copy_(codebook)
        # the counts as the EMA's start, scaled to one batch's worth per rank, so a code k-means left empty is dead
        counts = counts.to(self.ema_counts) / (dist.get_world_size() if distributed() else 1)
        self.ema_counts.copy_(counts)
        self.usage.copy_(counts)
        if self.update == "ema":
            self.ema_sums.copy_(codebook * counts[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def update_codebook(self, vectors: Tensor, index: Tensor) -> None:
        """One training batch's updates: the EMA of the cluster sizes (and sums, and the codebook, with
        ``update="ema"``), then the restart of dead codes. Statistics are summed over ranks, then divided by their
        number, so that the EMA counts stay per rank's batch (what ``dead_code_threshold`` is measured in)."""
        ranks = dist.get_world_size() if distributed() else 1
        onehot = F.one_hot(index, self.num_embeddings).to(vectors.dtype)  # (N, K)
        with torch.autocast(vectors.device.type, enabled=False):  # the sums in the codebook's dtype, as above
            sums = onehot.T @ vectors
        statistics = all_reduce_(torch.cat([onehot.sum(0)[:, None], sums], dim=1)) / ranks
        counts, sums = statistics[:, 0], statistics[:, 1:]  # (K,), (K, D)
        self.ema_counts.mul_(self.decay).add_(counts.to(self.ema_counts), alpha=1 - self.decay)
        self.usage.mul_(self.usage_decay).add_(counts.to(self.usage), alpha=1 - self.usage_decay)
        if self.update == "ema":
            self.ema_sums.mul_(self.decay).add_(sums.to(self.ema_sums), alpha=1 - self.decay)
            # Laplace smoothing keeps a code whose count decays towards 0 from dividing by 0
            n = self.ema_counts.sum()
            smoothed = (self.ema_counts + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
            self.codebook.copy_(self.ema_sums / smoothed[:, None])
        self.restart_dead_codes(vectors)

    @torch.no_grad()
    def restart_dead_codes(self, vectors: Tensor) -> Tensor:
        """Move each code whose recent usage is below ``dead_code_threshold`` to a random encoder output of the
        batch (N, D), with the threshold as its new usage and cluster size; returns the restarted codes' mask (K,)."""
        dead = self.usage < self.dead_code_threshold
        # the mask is the same on every rank (the counts are reduced), so all ranks take this branch together
        if self.dead_code_threshold == 0 or not bool(dead.any()):
            return dead
        fresh = random_rows(vectors, self.num_embeddings).to(self.codebook)
        self.codebook.data.copy_(torch.where(dead[:, None], fresh, self.codebook.data))
        threshold = torch.full_like(self.usage, self.dead_code_threshold)
        self.usage.copy_(torch.where(dead, threshold, self.usage))
        self.ema_counts.copy_(torch.where(dead, threshold, self.ema_counts))
        if self.update == "ema":
            self.ema_sums.copy_(torch.where(dead[:, None], fresh * self.dead_code_threshold, self.ema_sums))
        return dead

    def lookup(self, index: Tensor) -> Tensor:
        """The codes (B, D, H, W) of an index grid (B, H, W)."""
        return F.embedding(index, self.codebook).permute(0, 3, 1, 2)
