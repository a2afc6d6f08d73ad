"""Generative adversarial networks: two networks, two optimizers, manual optimization, robust under DDP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from dgm_lightning import objectives
from dgm_lightning.base import GenerativeModel
from dgm_lightning.checks import check_non_negative, check_positive
from dgm_lightning.nets.gan_nets import (
    ARCHITECTURES,
    WarmupEMA,
    apply_spectral_norm,
    build_discriminator,
    build_generator,
)

GANLoss = Literal["non_saturating", "minimax", "least_squares", "wasserstein", "hinge"]


class GAN(GenerativeModel):
    """A GAN trained with manual optimization: ``n_critic`` discriminator steps, then one generator step, per batch.

    Step semantics: every optimizer step advances ``trainer.global_step``, so one training batch advances it by
    ``n_critic + 1`` (``max_steps`` counts optimizer steps; ``ParameterSchedule`` counts batches). All critic
    steps of a batch see the same real examples with fresh latent noise. Each rank draws its own latent and
    instance noise from a stream derived from (``noise_seed``, rank, batch count), so a resumed run draws
    exactly the noise the uninterrupted run would have drawn. LR schedulers are stepped once per epoch.

    Divergence policy (``skip_nonfinite``): a discriminator step whose terms are not finite skips the rest of
    the batch (both optimizers); a generator step whose loss is not finite is skipped. ``max_nonfinite_steps``
    batches in a row with a skipped step stop training. ``gp_weight``,
    ``r1_gamma``, ``instance_noise`` and ``label_smoothing`` are plain floats that ``ParameterSchedule`` can
    anneal. With ``ema_decay`` set, ``sample``, validation, test and predict use an exponential moving average of
    the generator weights (and batch-norm statistics), updated after each generator step and saved in checkpoints.
    Its decay warms up: after n updates the next one uses min(``ema_decay``, 0.5 ** (1 / (``ema_rampup`` n))), a
    half-life of at most ``ema_rampup`` times the steps so far (StyleGAN2's ramp-up), so that a short run does not
    sample from an average still dominated by the initial weights (with a fixed 0.999, for thousands of steps).
    Before it samples, the average's batch-norm statistics are recomputed for its own weights (an average of the
    trained generator's statistics does not fit them). ``sample(use_ema=False)`` draws from the raw generator.

    Args:
        latent_dim: size of the latent noise z ~ N(0, I).
        data_shape: (C, H, W) of the images, or (D,) for vector data such as 2D points (``mlp`` nets only).
        value_range: (low, high) of the data; the default generators end in tanh mapped onto it (images).
        architecture: default nets, ``mlp`` or ``dcgan`` (ignored for injected nets).
        hidden_dims: hidden sizes (mlp) or channels (dcgan, one stride-2 layer each) of the discriminator; the
            generator mirrors them. None picks sizes that suit ``data_shape``.
        num_classes: class-conditional GAN: the generator sees one-hot labels appended to z, the default
            discriminator is a projection discriminator.
        loss: ``non_saturating`` (DCGAN), ``minimax``, ``least_squares``, ``wasserstein`` or ``hinge``.
        n_critic: discriminator steps per generator step.
        gp_weight: weight of the WGAN-GP gradient penalty (0 disables; 10 in the paper).
        r1_gamma: R1 penalty gamma; the discriminator loss gains gamma / 2 * E||grad D(real)||^2 (0 disables).
        r1_interval: lazy R1: apply it every ``r1_interval`` discriminator steps, scaled by the interval.
        spectral_norm: spectral-normalise every linear, convolution and embedding layer of the discriminator.
        instance_noise: standard deviation of Gaussian noise added to real and generated discriminator inputs.
        label_smoothing: one-sided label smoothing: real targets are 1 - label_smoothing (cross-entropy and
            least-squares losses).
        lr_g, lr_d: Adam learning rates of generator and discriminator (two time-scale update rule).
        betas_g, betas_d: Adam betas of generator and discriminator.
        optimizer_g, optimizer_d: another optimizer, a callable params -> Optimizer (on the command line
            ``--model.optimizer_g RMSprop --model.optimizer_g.lr 5e-5``); replaces Adam, lr_* and betas_*.
        scheduler_g, scheduler_d: optional LR schedulers, callables Optimizer -> LRScheduler, stepped each epoch.
        gradient_clip_val: clip each network's gradients at this value (None: no clipping). The Trainer's own
            ``gradient_clip_val`` does not work with manual optimization; use this one.
        gradient_clip_algorithm: ``norm`` or ``value``.
        ema_decay: decay of the generator's weight average used for sampling, reached after a warm-up (see
            above). None: no average, sample the raw generator.
        ema_rampup: the warm-up: the average's half-life is at most this fraction of the generator steps so far
            (StyleGAN2 uses 0.05; 0.02 sampled best over 1 and 3 epochs of DCGAN on Fashion-MNIST:
            benchmarks/gan_ema.py).
        noise_seed: seed of the training noise streams; None takes ``torch.initial_seed()`` (set by
            ``seed_everything``).
        compile: compile the networks with torch.compile when training starts (see ``GenerativeModel``).
        generator: your own generator: (B, latent_dim [+ num_classes]) -> (B, *data_shape).
        discriminator: your own discriminator: (B, *data_shape) -> raw scores (B,) or (B, 1); called as
            ``discriminator(x, labels)`` when ``num_classes`` is set.

    References: Goodfellow et al. 2014, arXiv:1406.2661; DCGAN, Radford et al. 2015, arXiv:1511.06434;
        WGAN-GP, Gulrajani et al. 2017, arXiv:1704.00028; TTUR, Heusel et al. 2017, arXiv:1706.08500;
        R1, Mescheder et al. 2018, arXiv:1801.04406; spectral norm, Miyato et al. 2018, arXiv:1802.05957;
        projection discriminator, Miyato & Koyama 2018, arXiv:1802.05637; instance noise, Sønderby et al. 2016,
        arXiv:1610.04490; EMA of generator weights, Yazıcı et al. 2018, arXiv:1806.04498.
    """

    progress_bar_terms = ("d_loss", "g_loss")
    # shown by the command line when --optimizer is given for this model
    optimizer_flags = (
        "--model.lr_g, --model.lr_d, --model.betas_g, --model.betas_d, --model.optimizer_g, --model.optimizer_d, "
        "--model.scheduler_g, --model.scheduler_d"
    )

    def __init__(
        self,
        latent_dim: int = 64,
        *,
        data_shape: Sequence[int] = (1, 28, 28),
        value_range: Sequence[float] = (-1.0, 1.0),
        architecture: Literal["mlp", "dcgan"] = "dcgan",
        hidden_dims: Sequence[int] | None = None,
        num_classes: int | None = None,
        loss: GANLoss = "non_saturating",
        n_critic: int = 1,
        gp_weight: float = 0.0,
        r1_gamma: float = 0.0,
        r1_interval: int = 1,
        spectral_norm: bool = False,
        instance_noise: float = 0.0,
        label_smoothing: float = 0.0,
        lr_g: float = 1e-4,
        lr_d: float = 4e-4,
        betas_g: tuple[float, float] = (0.5, 0.999),
        betas_d: tuple[float, float] = (0.5, 0.999),
        optimizer_g: OptimizerCallable | None = None,
        optimizer_d: OptimizerCallable | None = None,
        scheduler_g: LRSchedulerCallable | None = None,
        scheduler_d: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        ema_decay: float | None = 0.999,
        ema_rampup: float = 0.02,
        noise_seed: int | None = None,
        compile: bool = False,
        generator: nn.Module | None = None,
        discriminator: nn.Module | None = None,
    ) -> None:
        if len(data_shape) not in (1, 3):
            raise ValueError(f"data_shape must be (C, H, W) for images or (D,) for vectors, got {tuple(data_shape)}")
        super().__init__(data_shape=data_shape, value_range=value_range, num_classes=num_classes, compile=compile)
        self.save_hyperparameters(
            ignore=["generator", "discriminator", "optimizer_g", "optimizer_d", "scheduler_g", "scheduler_d"]
        )
        if not isinstance(latent_dim, int) or latent_dim <= 0:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        if not isinstance(n_critic, int) or n_critic < 1:
            raise ValueError(
                f"n_critic (discriminator steps per generator step) must be an integer >= 1, got {n_critic}"
            )
        if not isinstance(r1_interval, int) or r1_interval < 1:
            raise ValueError(f"r1_interval must be an integer >= 1, got {r1_interval}")
        objectives.check_choice("loss", loss, objectives.GAN_LOSSES)
        objectives.check_choice("architecture", architecture, ARCHITECTURES)
        objectives.check_choice("gradient_clip_algorithm", gradient_clip_algorithm, ("norm", "value"))
        check_positive(lr_g=lr_g, lr_d=lr_d, gradient_clip_val=gradient_clip_val)
        check_non_negative(gp_weight=gp_weight, r1_gamma=r1_gamma, instance_noise=instance_noise)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if label_smoothing and loss in ("wasserstein", "hinge"):
            raise ValueError(f"label_smoothing applies to the cross-entropy and least-squares losses, not to {loss!r}")
        for name, betas in dict(betas_g=betas_g, betas_d=betas_d).items():
            if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
                raise ValueError(f"{name} must be two numbers in [0, 1), got {tuple(betas)}")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None (no average), got {ema_decay}")
        check_positive(ema_rampup=ema_rampup)

        self.latent_dim = latent_dim
        self.loss = loss
        self.n_critic = n_critic
        # plain floats, so that ParameterSchedule can anneal them
        self.gp_weight = float(gp_weight)
        self.r1_gamma = float(r1_gamma)
        self.r1_interval = r1_interval
        self.instance_noise = float(instance_noise)
        self.label_smoothing = float(label_smoothing)
        self.optimizer_g, self.optimizer_d = optimizer_g, optimizer_d
        self.scheduler_g, self.scheduler_d = scheduler_g, scheduler_d
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm

        cond = num_classes or 0
        # a gradient penalty is per example; batch norm makes D(x_i) depend on the rest of the batch
        per_example = gp_weight > 0 or r1_gamma > 0 or spectral_norm
        if generator is None:
            generator = build_generator(architecture, latent_dim + cond, self.data_shape, hidden_dims, self.value_range)
        if discriminator is None:
            discriminator = build_discriminator(
                architecture, self.data_shape, hidden_dims, num_classes=num_classes, batch_norm=not per_example
            )
        elif per_example and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in discriminator.modules()):
            raise ValueError(
                "the discriminator has batch norm, which mixes examples and so breaks a gradient penalty or spectral "
                "norm; use a discriminator without batch norm (layer/instance norm or none)"
            )
        if spectral_norm:
            apply_spectral_norm(discriminator)
        self.generator, self.discriminator = generator, discriminator
        self.ema: WarmupEMA | None = None
        if ema_decay is not None:
            # its buffers follow the generator's; batch-norm statistics are recomputed for it before use (sampling_net)
            self.ema = WarmupEMA(generator, ema_decay, rampup=ema_rampup)
            self.ema.requires_grad_(False)  # never trained: keeps it out of optimizers and DDP's gradient buckets

        self.noise_seed = torch.initial_seed() if noise_seed is None else int(noise_seed)
        self.batches_seen = 0  # training batches, the noise stream's counter (saved in checkpoints)
        self.d_steps = 0  # discriminator steps, for lazy R1 (saved in checkpoints)
        self._noise: torch.Generator | None = None

    # -- manual optimization -----------------------------------------------------------------------

    @property
    def automatic_optimization(self) -> bool:
        # Lightning rejects Trainer(gradient_clip_val) under manual optimization before any hook of the model
        # runs, with a message that cannot know the GAN's own flag; reading this property is its first check.
        trainer = self._trainer
        if trainer is not None and trainer.gradient_clip_val:
            raise ValueError(
                f"GAN clips the gradients of its two networks itself: remove Trainer(gradient_clip_val="
                f"{trainer.gradient_clip_val}) (--trainer.gradient_clip_val) and set GAN(gradient_clip_val=...) "
                "(--model.gradient_clip_val) instead"
            )
        return False

    def setup(self, stage: str) -> None:
        super().setup(stage)
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy):
            # DDP's reducer expects every parameter that required a gradient when the model was wrapped to
            # receive one in each backward pass. A GAN runs two (or n_critic + 1) backward passes per
            # training_step, each over one network: toggle_optimizer switches off requires_grad of the other
            # network, and the D step feeds D detached fakes made without a graph, so with the default
            # find_unused_parameters=False the reducer waits for the other network's gradients and fails with
            # "parameters that were not used in producing the loss". Alternatives weighed: letting every backward
            # reach both networks (no toggling, no detaching) satisfies the plain reducer but runs a backward pass
            # through G in each D step and writes gradients into the network that is not stepped; all-reducing
            # the stepped network's gradients by hand means bypassing DDP and syncing batch-norm buffers by hand.
            # find_unused_parameters=True makes the reducer search each loss's graph and mark the other network's
            # parameters ready without a gradient (left untouched, as they are unused on every rank); the cost is
            # a graph traversal per backward. Lightning calls prepare_for_backward before each manual_backward,
            # so the search is per backward pass, which is what two optimizers need. DDPStrategy has no public
            # setter; setup() runs before the strategy wraps the model, so its DDP kwargs still take effect here.
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def configure_optimizers(self) -> list[dict[str, Any]]:
        configs = []
        for net, factory, lr, betas, scheduler in (
            (self.generator, self.optimizer_g, self.hparams.lr_g, self.hparams.betas_g, self.scheduler_g),
            (self.discriminator, self.optimizer_d, self.hparams.lr_d, self.hparams.betas_d, self.scheduler_d),
        ):
            params = [p for p in net.parameters() if p.requires_grad]
            optimizer = factory(params) if factory is not None else torch.optim.Adam(params, lr=lr, betas=betas)
            config: dict[str, Any] = {"optimizer": optimizer}
            if scheduler is not None:
                config["lr_scheduler"] = scheduler(optimizer)
                if isinstance(config["lr_scheduler"], ReduceLROnPlateau):
                    raise ValueError("GAN steps its schedulers once per epoch without a metric; ReduceLROnPlateau "
                                     "is not supported, choose an epoch-based scheduler")  # fmt: skip
            configs.append(config)
        return configs

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # manual optimization: Lightning leaves the schedulers to us
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.step()

    # -- noise -------------------------------------------------------------------------------------

    def _training_noise(self) -> torch.Generator:
        """The noise stream of this batch: its own per (noise_seed, rank, batch), so resumes redraw it exactly."""
        if self._noise is None or self._noise.device != self.device:
            self._noise = torch.Generator(device=self.device)
        # tuples of ints hash deterministically (no per-process salt, unlike strings)
        self._noise.manual_seed(hash((self.noise_seed, self.global_rank, self.batches_seen)) % 2**63)
        return self._noise

    def latent(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n latent vectors z ~ N(0, I), shape (n, latent_dim)."""
        return torch.randn(n, self.latent_dim, device=self.device, generator=generator)

    def generate(self, z: Tensor, labels: Tensor | None, *, net: nn.Module | None = None) -> Tensor:
        """Examples (B, *data_shape) from latents z (B, latent_dim), by ``net`` (default: the trained generator)."""
        out = (self.generator if net is None else net)(self.condition_vectors(z, labels))
        if out.shape[1:] != self.data_shape:
            raise ValueError(f"the generator must output shape (B, {', '.join(map(str, self.data_shape))}), "
                             f"got {tuple(out.shape)}")  # fmt: skip
        return out

    def critic(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """The discriminator's raw scores (B,)."""
        out = self.discriminator(x) if self.num_classes is None else self.discriminator(x, labels)
        if out.numel() != x.shape[0]:
            raise ValueError(f"the discriminator must output one score per example, shape (B,) or (B, 1), "
                             f"got {tuple(out.shape)} for a batch of {x.shape[0]}")  # fmt: skip
        return out.reshape(x.shape[0])

    def _noisy(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.instance_noise == 0:
            return x
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return x + self.instance_noise * noise

    # -- the protocol callbacks use -----------------------------------------------------------------

    # latents whose activations give the weight average its batch-norm statistics: 8 batches of 128, drawn afresh
    # from the noise seed each time, so the statistics depend on the averaged weights alone (on every rank, resumed
    # or not)
    statistics_batches, statistics_batch_size = 8, 128

    def sampling_net(self, *, use_ema: bool = True) -> nn.Module:
        """The generator that ``sample`` and evaluation use: the weight average when there is one (and ``use_ema``),
        its batch-norm statistics recomputed first if its weights moved since (``WarmupEMA.recompute_batch_norm``);
        otherwise the trained generator."""
        if self.ema is None or not use_ema:
            return self.generator
        if self.ema.statistics_stale:
            self.ema.recompute_batch_norm(self.statistics_inputs())
        return self.ema.module

    def statistics_inputs(self) -> list[Tensor]:
        """The generator inputs (latents, conditioned on the classes in turn) that the average's batch-norm
        statistics are computed on: ``statistics_batches`` batches of ``statistics_batch_size``."""
        noise = torch.Generator(device=self.device).manual_seed(self.noise_seed)
        n = self.statistics_batch_size
        labels = self.default_labels(n)
        return [self.condition_vectors(self.latent(n, noise), labels) for _ in range(self.statistics_batches)]

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of the standard normal noise of one sample (``from_noise``): (latent_dim,)."""
        return (self.latent_dim,)

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None, temperature: float = 1.0, use_ema: bool = True) -> Tensor:
        """Draw n examples (n, *data_shape) in eval mode; ``temperature`` scales z; ``use_ema=False`` samples the
        raw generator."""
        labels = self.default_labels(n) if labels is None else labels
        return self.from_noise(self.draw_noise(n, temperature), labels=labels, use_ema=use_ema)

    def from_noise(self, noise: Tensor, *, labels: Tensor | None = None, use_ema: bool = True) -> Tensor:
        """Examples (B, *data_shape) from standard normal noise (B, latent_dim), which is z: the output of the
        sampling generator (``sampling_net``) in eval mode. ``sample`` scales the noise by its temperature; an
        exported sampler (``dgm_lightning.export``) is this map."""
        labels = self.check_noise(noise, labels)
        net = self.sampling_net(use_ema=use_ema)
        was_training = net.training
        net.eval()  # batch norm: running statistics, not those of this sample
        try:
            return self.generate(noise, labels, net=net)
        finally:
            net.train(was_training)

    # -- training ----------------------------------------------------------------------------------

    def discriminator_terms(
        self, x: Tensor, labels: Tensor | None, generator: torch.Generator | None, *, net: nn.Module | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss to minimise (penalties included) and its named terms, on real x."""
        with torch.no_grad():  # the D step needs no graph through G
            fake = self.generate(self.latent(x.shape[0], generator), labels, net=net)
        real, fake = self._noisy(x, generator), self._noisy(fake, generator)
        real_scores, fake_scores = self.critic(real, labels), self.critic(fake, labels)
        d_loss = objectives.discriminator_loss(
            self.loss, real_scores, fake_scores, real_target=1.0 - self.label_smoothing
        )
        terms = {"d_loss": d_loss, "d_real": real_scores.detach().mean(), "d_fake": fake_scores.detach().mean()}
        loss = d_loss
        if not torch.is_grad_enabled():  # evaluation: the penalties need input gradients, and train nothing here
            return loss, terms
        if self.gp_weight > 0:
            alpha = torch.rand(x.shape[0], device=x.device, generator=generator)
            terms["gradient_penalty"] = objectives.gradient_penalty(lambda v: self.critic(v, labels), real, fake, alpha)
            loss = loss + self.gp_weight * terms["gradient_penalty"]
        if self.r1_gamma > 0 and self.d_steps % self.r1_interval == 0:
            terms["r1_penalty"] = objectives.r1_penalty(lambda v: self.critic(v, labels), real)
            loss = loss + self.r1_gamma / 2 * self.r1_interval * terms["r1_penalty"]
        return loss, terms

    def generator_terms(self, n: int, labels: Tensor | None, generator: torch.Generator | None) -> dict[str, Tensor]:
        """The generator's loss on n fresh samples."""
        fake = self._noisy(self.generate(self.latent(n, generator), labels), generator)
        return {"g_loss": objectives.generator_loss(self.loss, self.critic(fake, labels))}

    def _optimizer_step(self, optimizer: Any, loss: Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()  # clips in on_before_optimizer_step

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Clipping here, not before optimizer.step(): under 16-mixed the precision plugin unscales the gradients
        # inside step(), just before this hook, so clipping earlier would cut the loss-scaled gradients
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    def training_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> dict[str, Tensor] | None:
        x, labels = self.unpack_batch(batch)
        opt_g, opt_d = self.optimizers()
        noise = self._training_noise()
        self.batches_seen += 1
        # the divergence policy counts bad batches in a row: a finite D step inside a batch whose G step then
        # diverges must not restart the count, or a diverging generator would be skipped forever
        bad_batches = self.nonfinite_steps
        before = self._buffers_snapshot()
        for _ in range(self.n_critic):
            self.toggle_optimizer(opt_d)
            loss, d_terms = self.discriminator_terms(x, labels, noise)
            if self.skip_nonfinite(d_terms):
                self.untoggle_optimizer(opt_d)
                self._restore_buffers(before)
                return None  # neither network steps on this batch
            self.nonfinite_steps = bad_batches
            self._optimizer_step(opt_d, loss)
            self.untoggle_optimizer(opt_d)
            self.d_steps += 1

        before = self._buffers_snapshot()
        self.toggle_optimizer(opt_g)
        g_terms = self.generator_terms(x.shape[0], labels, noise)
        skip = self.skip_nonfinite(g_terms)
        if not skip:
            self._optimizer_step(opt_g, g_terms["g_loss"])
        self.untoggle_optimizer(opt_g)
        if skip:
            self._restore_buffers(before)
            return None
        if self.ema is not None:
            self.ema.update_parameters(self.generator)
        terms = {**{k: v.detach() for k, v in d_terms.items()}, "g_loss": g_terms["g_loss"].detach()}
        self.log_terms(terms, "train", batch_size=x.shape[0])
        return terms

    def _buffers_snapshot(self) -> list[Tensor]:
        """Copies of the two networks' buffers. A skipped step must leave no trace, but its forward passes in
        training mode have moved batch norm's running statistics (NaN from a NaN batch, which would make every
        later evaluation NaN) and spectral norm's power iteration before the loss shows that it is not finite."""
        return [b.clone() for net in (self.generator, self.discriminator) for b in net.buffers()]

    def _restore_buffers(self, snapshot: list[Tensor]) -> None:
        buffers = [b for net in (self.generator, self.discriminator) for b in net.buffers()]
        for buffer, saved in zip(buffers, snapshot, strict=True):
            buffer.copy_(saved)

    def _evaluate(self, batch: Tensor | Sequence[Tensor], batch_idx: int, stage: str) -> None:
        """Both losses on held-out real data against the sampling generator, with noise fixed per batch index."""
        x, labels = self.unpack_batch(batch)
        noise = torch.Generator(device=self.device).manual_seed(batch_idx)
        net = self.sampling_net()
        _, terms = self.discriminator_terms(x, labels, noise, net=net)
        fake = self.generate(self.latent(x.shape[0], noise), labels, net=net)
        terms["g_loss"] = objectives.generator_loss(self.loss, self.critic(fake, labels))
        self.log_terms(terms, stage, batch_size=x.shape[0])

    def validation_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def predict_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """As many samples as the batch has examples (with its labels for a conditional GAN)."""
        x, labels = self.unpack_batch(batch)
        return {"samples": self.sample(x.shape[0], labels=labels)}

    # -- checkpoints -------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # the random states (data order)
        checkpoint["gan_counters"] = {
            "noise_seed": self.noise_seed,
            "batches_seen": self.batches_seen,
            "d_steps": self.d_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        counters = checkpoint.get("gan_counters")
        if counters is None:
            raise ValueError("this checkpoint was not written by a GAN (it has no 'gan_counters')")
        self.noise_seed = counters["noise_seed"]
        self.batches_seen = counters["batches_seen"]
        self.d_steps = counters["d_steps"]
