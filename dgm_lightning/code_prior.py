"""The VQ-VAE's second stage: an autoregressive prior over its code grids, which makes the pair a generative model."""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from dgm_lightning.base import GenerativeModel
from dgm_lightning.checkpoint_io import check_checkpoint_file
from dgm_lightning.checks import check_positive_int, check_temperature
from dgm_lightning.nets.pixelcnn import GatedPixelCNN
from dgm_lightning.objectives import Objective
from dgm_lightning.optimizers import check_injected
from dgm_lightning.vqvae import VQVAE, vqvae_settings

FIRST_STAGE = "`python train.py fit --config configs/vqvae_fashion_mnist.yaml` (or another configs/vqvae_*.yaml)"


def load_vqvae(path: str | Path) -> VQVAE:
    """The VQVAE of a checkpoint, with an error that says what the file is when it is not one."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no VQ-VAE checkpoint at {path}; give vqvae_checkpoint the checkpoints/last.ckpt of a VQ-VAE run, "
            f"trained with {FIRST_STAGE}"
        )
    checkpoint = check_checkpoint_file(path, weights_only=True)
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path")
    if class_path is not None and class_path.rsplit(".", 1)[-1] != "VQVAE":
        raise ValueError(
            f"{path} is a checkpoint of {class_path}, not of a VQVAE; the prior is trained on the codes of a VQ-VAE: "
            f"give vqvae_checkpoint the last.ckpt of a run of {FIRST_STAGE}"
        )
    try:
        return outside_instantiation(VQVAE.load_from_checkpoint, path, map_location="cpu", weights_only=True)
    except (TypeError, KeyError, RuntimeError) as error:  # another model's settings or weights
        raise ValueError(
            f"{path} is not a checkpoint of a VQVAE ({type(error).__name__}: {str(error)[:200]}); give "
            f"vqvae_checkpoint the last.ckpt of a run of {FIRST_STAGE}"
        ) from None


def outside_instantiation(build: Callable[..., VQVAE], *args: Any, **kwargs: Any) -> VQVAE:
    """Build the VQ-VAE in a fresh context: LightningCLI instantiates a model inside a context whose settings every
    LightningModule built in it would record as its own hyperparameters (so the nested VQ-VAE would record the
    prior's); a new ``contextvars.Context`` holds every context variable at its default."""
    return contextvars.Context().run(build, *args, **kwargs)


class VQVAEPrior(GenerativeModel):
    """A gated PixelCNN prior p(z) over the code grids of a trained, frozen VQ-VAE: with its decoder, a generative
    model of images (the second stage of van den Oord et al. 2017).

    Trained on the codes the frozen VQ-VAE gives the DataModule's images (the same DataModule as the first stage):
    ``loss`` is the negative log-likelihood of the code grid in nats per code (``bits_per_code`` in bits). The
    VQ-VAE is a frozen submodule: its weights are in this model's checkpoint and its settings in its hyperparameters
    (``vqvae_settings``), so ``VQVAEPrior.load_from_checkpoint(path).sample(16)`` needs no other file.

    ``sample(n, temperature=...)`` draws code grids position by position in raster order, the logits divided by
    ``temperature`` (0: the most likely code at each step), and decodes them (decoder means). ``code_log_prob`` is
    the exact discrete log-likelihood log p(z) of code grids. ``log_prob(x)`` is log p(x | z_q(x)) + log p(z(x)),
    the ELBO of the two-stage model with its one-hot posterior (which has no entropy and no sampling): a lower
    bound on log p(x) in nats that is tight only where the encoder's code is the one code that explains x; with a
    Bernoulli likelihood on grey levels it bounds a density of that likelihood, not of the discrete images (as the
    VAE's). Evaluation logs ``elbo`` and ``bpd`` (that bound in bits per image dimension) beside the loss.

    Args:
        vqvae_checkpoint: a VQVAE's checkpoint (a run's checkpoints/last.ckpt); not read when ``vqvae_settings``
            or ``vqvae`` are given.
        channels: channels of the PixelCNN's stacks.
        num_layers: gated layers; the receptive field reaches num_layers * (kernel_size // 2) rows up.
        kernel_size: odd width of each layer's view.
        vqvae_settings: the VQ-VAE's settings, recorded here when the model is built from ``vqvae_checkpoint`` so
            that this model's checkpoint rebuilds it (its weights are in the checkpoint); leave it unset.
        optimizer: builds the optimizer of the prior's parameters (None: Adam, lr 1e-3).
        lr_scheduler: builds a learning-rate scheduler, stepped once per epoch (None: a constant rate).
        compile: compile the networks when training starts (see ``GenerativeModel``).
        channels_last: channels-last weights and activations in training (see ``GenerativeModel``).
        vqvae: a trained VQVAE to use instead of a checkpoint; one with injected networks must be passed again to
            ``load_from_checkpoint(path, vqvae=...)`` (its settings do not rebuild its networks).
        prior: your own prior network: code grids (B, h, w) -> causal logits (B, num_embeddings, h, w).

    References: van den Oord et al. 2017, arXiv:1711.00937; gated PixelCNN, van den Oord et al. 2016,
        arXiv:1606.05328.
    """

    def __init__(
        self,
        vqvae_checkpoint: str | None = None,
        *,
        channels: int = 64,
        num_layers: int = 6,
        kernel_size: int = 3,
        vqvae_settings: dict[str, Any] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        channels_last: bool = True,
        vqvae: VQVAE | None = None,
        prior: nn.Module | None = None,
    ) -> None:
        if vqvae is None and vqvae_settings is not None:
            vqvae = outside_instantiation(VQVAE, **vqvae_settings)  # its weights come with this model's state_dict
        elif vqvae is None and vqvae_checkpoint is not None:
            vqvae = load_vqvae(vqvae_checkpoint)
        elif vqvae is None:
            raise ValueError(
                "VQVAEPrior is the second stage of a VQ-VAE: it needs the trained VQ-VAE whose codes it models. Give "
                "it vqvae_checkpoint=... (--model.vqvae_checkpoint runs/.../checkpoints/last.ckpt), the checkpoint of "
                f"a run of {FIRST_STAGE}; or vqvae=the VQVAE itself (which loading a prior whose VQ-VAE has networks "
                "of your own needs: load_from_checkpoint(path, vqvae=...))"
            )
        if not isinstance(vqvae, VQVAE):
            raise TypeError(f"vqvae must be a VQVAE, got {type(vqvae).__name__}")
        super().__init__(data_shape=vqvae.data_shape, value_range=vqvae.value_range, num_classes=None,
                         compile=compile, channels_last=channels_last)  # fmt: skip
        self.save_hyperparameters(ignore=["vqvae", "prior", "optimizer", "lr_scheduler"])
        # recorded for load_from_checkpoint, which then rebuilds the VQ-VAE without its file
        self.hparams["vqvae_settings"] = vqvae_settings_of(vqvae)
        check_injected(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.vqvae = vqvae.requires_grad_(False)  # frozen; used in evaluation mode only (frozen_vqvae)
        self.prior = GatedPixelCNN(vqvae.num_embeddings, channels, num_layers, kernel_size) if prior is None else prior

    @contextmanager
    def frozen_vqvae(self) -> Iterator[VQVAE]:
        """The VQ-VAE in evaluation mode (its networks as at inference; its public methods leave the codebook alone
        in any mode), and back in the mode it had. It follows this model's mode otherwise: Lightning warns about
        modules in evaluation mode when training starts, and a frozen VQ-VAE is not a mistake to warn about."""
        mode = self.vqvae.training
        self.vqvae.train(False)
        try:
            yield self.vqvae
        finally:
            self.vqvae.train(mode)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.vqvae.grid_shape

    @property
    def latent_dim(self) -> int:
        return self.vqvae.latent_dim

    # -- the prior -------------------------------------------------------------------------------

    def logits(self, index: Tensor) -> Tensor:
        """Causal logits (B, K, h, w) of code grids (B, h, w)."""
        logits = self.prior(index)
        expected = (index.shape[0], self.vqvae.num_embeddings, *self.grid_shape)
        if tuple(logits.shape) != expected:
            raise ValueError(f"the prior network must output logits of shape {expected}, got {tuple(logits.shape)}")
        return logits

    def code_log_prob(self, index: Tensor) -> Tensor:
        """log p(z) of code grids (B, h, w) in nats, (B,): exact (a product of categoricals in raster order)."""
        self.vqvae.check_indices(index, "code_log_prob")
        return -F.cross_entropy(self.logits(index), index, reduction="none").sum((1, 2))

    @torch.no_grad()
    def sample_indices(self, n: int, *, temperature: float = 1.0) -> Tensor:
        """n code grids (n, h, w) drawn position by position, the logits divided by ``temperature`` (0: argmax)."""
        check_positive_int(n=n)
        check_temperature(temperature)
        h, w = self.grid_shape
        index = torch.zeros(n, h, w, dtype=torch.long, device=self.device)
        # a network that says so (GatedPixelCNN.rows_suffice) gives row i's logits from the rows up to it alone
        cut = getattr(self.prior, "rows_suffice", False)
        for i in range(h):
            for j in range(w):
                grid = index[:, : i + 1] if cut else index
                logits = self.prior(grid)[:, :, i, j].float()  # (n, K): depends on the positions before (i, j)
                if temperature == 0:
                    index[:, i, j] = logits.argmax(1)
                else:
                    index[:, i, j] = torch.multinomial(F.softmax(logits / temperature, dim=1), 1)[:, 0]
        return index

    # -- the protocol ----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """n images (n, C, H, W): code grids from the prior (``sample_indices``) through the VQ-VAE's decoder."""
        self.check_labels(labels, n)
        return self.vqvae.decode_indices(self.sample_indices(n, temperature=temperature))

    def encode(self, x: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """The VQ-VAE's quantised grid of x, flattened (B, latent_dim)."""
        with self.frozen_vqvae() as vqvae:
            return vqvae.encode(x, labels=labels)

    def decode(self, z: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """The VQ-VAE's decoder means of flattened grids (B, latent_dim)."""
        return self.vqvae.decode(z, labels=labels)

    def reconstruct(self, x: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """The VQ-VAE's reconstruction of x."""
        with self.frozen_vqvae() as vqvae:
            return vqvae.reconstruct(x, labels=labels)

    def log_prob(self, x: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """log p(x | z_q(x)) + log p(z(x)) in nats, (B,): the two-stage model's ELBO (see the class docstring);
        differentiable in the prior's parameters (the VQ-VAE is frozen)."""
        self.check_input(x, labels, "log_prob")
        grid, index = self.frozen_codes(x)
        return self.image_log_prob(x, grid) + self.code_log_prob(index)

    @torch.no_grad()
    def frozen_codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The frozen VQ-VAE's quantised grid (B, embedding_dim, h, w) and code indices (B, h, w) of images x."""
        with self.frozen_vqvae() as vqvae:
            grid, index, _ = vqvae.quantize(x)
        return grid, index

    @torch.no_grad()
    def image_log_prob(self, x: Tensor, grid: Tensor) -> Tensor:
        """log p(x | z_q) (B,) under the frozen VQ-VAE's decoder."""
        return self.vqvae.decoder_distribution(grid).log_prob(x)

    def objective(self, batch: Tensor | Sequence[Tensor]) -> Objective:
        """The code grids' negative log-likelihood (``loss``, nats per code; ``bits_per_code``); in evaluation also
        ``elbo`` (nats per image) and ``bpd`` (its negative in bits per image dimension). The Objective's ``codes``
        are the batch's code indices (B, h * w)."""
        x, _ = self.unpack_batch(batch)
        grid, index = self.frozen_codes(x)
        log_pz = -F.cross_entropy(self.logits(index), index, reduction="none").sum((1, 2))
        loss = -log_pz.mean() / math.prod(self.grid_shape)
        terms = {"loss": loss, "bits_per_code": loss.detach() / math.log(2)}
        if not self.training:  # the decoder is needed for the bound only
            elbo = (self.image_log_prob(x, grid) + log_pz).mean()
            terms["elbo"] = elbo
            terms["bpd"] = -elbo / (math.prod(self.data_shape) * math.log(2))
        return Objective(terms, batch_size=x.shape[0], codes=index.flatten(1))

    @override
    def predict_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """For each input batch: the inputs, their reconstructions (the VQ-VAE's) and as many samples."""
        x, _ = self.unpack_batch(batch)
        return {"inputs": x, "reconstructions": self.reconstruct(x), "samples": self.sample(x.shape[0])}


def vqvae_settings_of(vqvae: VQVAE) -> dict[str, Any] | None:
    """The settings that rebuild the VQ-VAE, or None when its networks were injected (settings do not rebuild them)."""
    return vqvae_settings(vqvae) if vqvae.default_networks else None
