"""Generative adversarial networks: two networks, two optimizers, manual optimization, robust under DDP."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from typing_extensions import override

from dgm_lightning import gan_checks, objectives, optimizers
from dgm_lightning.base import GenerativeModel
from dgm_lightning.compat import find_unused_parameters
from dgm_lightning.gan_checks import ClipAlgorithm, epoch_scheduler
from dgm_lightning.nets import gan_nets
from dgm_lightning.nets.gan_nets import Architecture, WarmupEMA
from dgm_lightning.noise import NoiseStream
from dgm_lightning.objectives import GANLoss, Objective
from dgm_lightning.optimizers import DiscriminatorAdam, GeneratorAdam

Batch = Tensor | Sequence[Tensor]
Rng = torch.Generator | None  # a stream of random numbers; None: torch's global one


class GAN(GenerativeModel):
    """A GAN trained with manual optimization: ``n_critic`` discriminator steps, then one generator step, per batch.

    Each network minimises the ``loss`` of its objective (``discriminator_objective``, ``generator_objective``),
    logged as ``d_loss`` and ``g_loss`` beside the other terms (``d_real``, ``d_fake``: mean raw scores; penalties).
    Every optimizer step advances ``trainer.global_step``: ``n_critic + 1`` per batch (``ParameterSchedule`` counts
    batches). The critic steps of a batch see the same real examples with fresh latents from the batch's own
    ``NoiseStream``, which a resumed run draws again exactly. ``gp_weight``, ``r1_gamma``, ``instance_noise`` and
    ``label_smoothing`` are plain floats that ``ParameterSchedule`` can anneal. Divergence policy
    (``skip_nonfinite``): a discriminator step whose terms are not finite skips the rest of the batch, a generator
    step whose loss is not finite is skipped. With ``ema_decay`` set, ``sample``, validation, test and predict use a
    weight average of the generator (``WarmupEMA``: its decay warms up, its batch-norm statistics are recomputed
    for its own weights, it is saved in checkpoints); ``sample(use_ema=False)`` draws from the raw generator.

    Args:
        latent_dim: size of the latent noise z ~ N(0, I).
        data_shape: (C, H, W) of the images, or (D,) for vector data such as 2D points (``mlp`` nets only).
        value_range: (low, high) of the data; the default generators end in tanh mapped onto it (images).
        architecture: default nets, ``mlp`` or ``dcgan`` (ignored for injected nets).
        hidden_dims: hidden sizes (mlp) or channels (dcgan, one stride-2 layer each) of the discriminator, mirrored
            by the generator; None picks sizes that suit ``data_shape``.
        num_classes: classes of a class-conditional GAN: one-hot labels appended to z, a projection discriminator.
        loss: ``non_saturating`` (DCGAN), ``minimax``, ``least_squares``, ``wasserstein`` or ``hinge``.
        n_critic: discriminator steps per generator step.
        gp_weight: weight of the WGAN-GP gradient penalty (0 disables; 10 in the paper).
        r1_gamma: R1 penalty gamma; the discriminator loss gains gamma / 2 * E||grad D(real)||^2 (0 disables).
        r1_interval: lazy R1: apply it every ``r1_interval`` discriminator steps, scaled by the interval.
        spectral_norm: spectral-normalise every linear, convolution and embedding layer of the discriminator.
        instance_noise: standard deviation of Gaussian noise added to real and generated discriminator inputs.
        label_smoothing: one-sided: real targets are 1 - label_smoothing (cross-entropy and least-squares losses).
        optimizer_g: builds the generator's optimizer from its parameters (None: ``GeneratorAdam``, Adam with lr 1e-4
            and betas (0.5, 0.999)); on the command line ``--model.optimizer_g AdamW --model.optimizer_g.lr 3e-4``.
        optimizer_d: the discriminator's (None: ``DiscriminatorAdam``, lr 4e-4: the two time-scale update rule's).
        lr_scheduler_g: builds a learning-rate scheduler from the generator's optimizer, stepped once per epoch
            (None: a constant rate); e.g. ``--model.lr_scheduler_g CosineAnnealingLR --model.lr_scheduler_g.T_max
            50``. Not ReduceLROnPlateau: the GAN steps its schedulers without a metric.
        lr_scheduler_d: the same for the discriminator's optimizer.
        gradient_clip_val: clip each network's gradients at this value (None: no clipping), instead of the Trainer's
            ``gradient_clip_val``, which does not work with manual optimization.
        gradient_clip_algorithm: ``norm`` or ``value``.
        ema_decay: decay of the generator's weight average, reached after a warm-up; None: sample the raw generator.
        ema_rampup: the warm-up: the average's half-life is at most this fraction of the generator steps so far
            (StyleGAN2 uses 0.05; 0.02 sampled best over 1 and 3 epochs of DCGAN on Fashion-MNIST:
            benchmarks/gan_ema.py).
        noise_seed: seed of the training noise streams; None: ``torch.initial_seed()`` (``seed_everything``'s).
        compile: compile the networks with torch.compile when training starts (see ``GenerativeModel``).
        channels_last: channels-last weights and activations in training (see ``GenerativeModel``).
        generator: your own generator: (B, latent_dim [+ num_classes]) -> (B, *data_shape).
        discriminator: your own: (B, *data_shape) -> raw scores (B,) or (B, 1); ``discriminator(x, labels)`` when
            ``num_classes`` is set.

    References: Goodfellow et al. 2014, arXiv:1406.2661; DCGAN, Radford et al. 2015, arXiv:1511.06434;
        WGAN-GP, Gulrajani et al. 2017, arXiv:1704.00028; TTUR, Heusel et al. 2017, arXiv:1706.08500;
        R1, Mescheder et al. 2018, arXiv:1801.04406; spectral norm, Miyato et al. 2018, arXiv:1802.05957;
        projection discriminator, Miyato & Koyama 2018, arXiv:1802.05637; instance noise, Sønderby et al. 2016,
        arXiv:1610.04490; EMA of generator weights, Yazıcı et al. 2018, arXiv:1806.04498.
    """

    progress_bar_terms = ("d_loss", "g_loss")

    def __init__(
        self,
        latent_dim: int = 64,
        *,
        data_shape: Sequence[int] = (1, 28, 28),
        value_range: Sequence[float] = (-1.0, 1.0),
        architecture: Architecture = "dcgan",
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
        optimizer_g: OptimizerCallable | None = None,
        optimizer_d: OptimizerCallable | None = None,
        lr_scheduler_g: LRSchedulerCallable | None = None,
        lr_scheduler_d: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: ClipAlgorithm = "norm",
        ema_decay: float | None = 0.999,
        ema_rampup: float = 0.02,
        noise_seed: int | None = None,
        compile: bool = False,
        channels_last: bool = True,
        generator: nn.Module | None = None,
        discriminator: nn.Module | None = None,
    ) -> None:
        super().__init__(data_shape=data_shape, value_range=value_range, num_classes=num_classes,
                         compile=compile, channels_last=channels_last)  # fmt: skip
        self.save_hyperparameters(ignore=["generator", "discriminator", "optimizer_g", "optimizer_d",
                                          "lr_scheduler_g", "lr_scheduler_d"])  # fmt: skip
        gan_checks.check_gan_settings(
            data_shape=data_shape, latent_dim=latent_dim, architecture=architecture, loss=loss, n_critic=n_critic,
            gp_weight=gp_weight, r1_gamma=r1_gamma, r1_interval=r1_interval, instance_noise=instance_noise,
            label_smoothing=label_smoothing, gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm, ema_decay=ema_decay, ema_rampup=ema_rampup,
        )  # fmt: skip
        optimizers.check_injected(optimizer_g=optimizer_g, optimizer_d=optimizer_d,
                                  lr_scheduler_g=lr_scheduler_g, lr_scheduler_d=lr_scheduler_d)  # fmt: skip
        self.automatic_optimization = False  # training_step steps both networks' optimizers itself
        self.latent_dim, self.loss, self.n_critic, self.r1_interval = latent_dim, loss, n_critic, r1_interval
        # plain floats, so that ParameterSchedule can anneal them
        self.gp_weight, self.r1_gamma = float(gp_weight), float(r1_gamma)
        self.instance_noise, self.label_smoothing = float(instance_noise), float(label_smoothing)
        self.optimizer_g, self.optimizer_d = optimizer_g, optimizer_d
        self.lr_scheduler_g, self.lr_scheduler_d = lr_scheduler_g, lr_scheduler_d
        self.gradient_clip_val, self.gradient_clip_algorithm = gradient_clip_val, gradient_clip_algorithm

        # a gradient penalty is per example; batch norm makes D(x_i) depend on the rest of the batch
        per_example = gp_weight > 0 or r1_gamma > 0 or spectral_norm
        if per_example and discriminator is not None:
            gan_checks.check_per_example_discriminator(discriminator)
        self.generator, self.discriminator = gan_nets.build_networks(
            architecture, latent_dim + (num_classes or 0), self.data_shape, hidden_dims, self.value_range,
            num_classes=num_classes, batch_norm=not per_example, spectral_norm=spectral_norm,
            generator=generator, discriminator=discriminator,
        )  # fmt: skip
        self.ema: WarmupEMA | None = None
        if ema_decay is not None:
            # its buffers follow the generator's; batch-norm statistics are recomputed for it before use (sampling_net)
            self.ema = WarmupEMA(self.generator, ema_decay, rampup=ema_rampup)
            self.ema.requires_grad_(False)  # never trained: keeps it out of optimizers and DDP's gradient buckets
        self.noise_stream = NoiseStream(torch.initial_seed() if noise_seed is None else noise_seed)
        self.d_steps = 0  # discriminator steps, for lazy R1 (saved in checkpoints)

    def discriminator_objective(self, batch: Batch, *, noise: Rng = None, net: nn.Module | None = None) -> Objective:
        """The discriminator's objective on real examples against as many generated ones: ``loss`` (what it minimises:
        the adversarial loss plus the weighted penalties), ``d_real`` and ``d_fake`` (its mean raw scores), and where
        they apply ``gradient_penalty`` and ``r1_penalty`` (with gradients enabled only: evaluation trains nothing).

        Args:
            batch: real examples, or (examples, labels), as the DataModule yields them.
            noise: the random stream of the latents, instance noise and interpolation weights (None: torch's global).
            net: the generator that makes the fakes (None: the trained one; evaluation passes ``sampling_net()``).
        """
        return self._discriminator_objective(*self.unpack_batch(batch), noise, net)

    def _discriminator_objective(
        self, x: Tensor, labels: Tensor | None, noise: Rng, net: nn.Module | None
    ) -> Objective:
        with torch.no_grad():  # the D step needs no graph through G
            fake = self.generator_output(self.latent(x.shape[0], noise), labels, net=net)
        real, fake = self._noisy(x, noise), self._noisy(fake, noise)
        real_scores, fake_scores = self.critic(real, labels), self.critic(fake, labels)
        loss = objectives.discriminator_loss(self.loss, real_scores, fake_scores, real_target=1 - self.label_smoothing)
        terms = {"d_real": real_scores.detach().mean(), "d_fake": fake_scores.detach().mean()}
        if torch.is_grad_enabled() and self.gp_weight > 0:
            alpha = torch.rand(x.shape[0], device=x.device, generator=noise)
            terms["gradient_penalty"] = objectives.gradient_penalty(lambda v: self.critic(v, labels), real, fake, alpha)
            loss = loss + self.gp_weight * terms["gradient_penalty"]
        if torch.is_grad_enabled() and self.r1_gamma > 0 and self.d_steps % self.r1_interval == 0:
            terms["r1_penalty"] = objectives.r1_penalty(lambda v: self.critic(v, labels), real)
            loss = loss + self.r1_gamma / 2 * self.r1_interval * terms["r1_penalty"]
        return Objective(terms={"loss": loss, **terms}, batch_size=x.shape[0])

    def generator_objective(self, batch: Batch, *, noise: Rng = None, net: nn.Module | None = None) -> Objective:
        """The generator's objective: ``loss``, its adversarial loss on as many fresh samples as the batch has
        examples (conditioned on the batch's labels). Args as ``discriminator_objective``."""
        return self._generator_objective(*self.unpack_batch(batch), noise, net)

    def _generator_objective(self, x: Tensor, labels: Tensor | None, noise: Rng, net: nn.Module | None) -> Objective:
        fake = self._noisy(self.generator_output(self.latent(x.shape[0], noise), labels, net=net), noise)
        loss = objectives.generator_loss(self.loss, self.critic(fake, labels))
        return Objective(terms={"loss": loss}, batch_size=x.shape[0])

    def latent(self, n: int, noise: Rng = None) -> Tensor:
        """n latent vectors z ~ N(0, I), shape (n, latent_dim), drawn from ``noise`` (None: torch's global stream)."""
        return torch.randn(n, self.latent_dim, device=self.device, generator=noise)

    def generator_output(self, z: Tensor, labels: Tensor | None, *, net: nn.Module | None = None) -> Tensor:
        """Examples (B, *data_shape) from latents z (B, latent_dim), by ``net`` (default: the trained generator)."""
        out = (self.generator if net is None else net)(self.condition_vectors(z, labels))
        gan_checks.check_generator_output(out, self.data_shape)
        return out

    def critic(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """The discriminator's raw scores (B,)."""
        out = self.discriminator(x) if self.num_classes is None else self.discriminator(x, labels)
        gan_checks.check_critic_output(out, x.shape[0])
        return out.reshape(x.shape[0])

    def _noisy(self, x: Tensor, noise: Rng) -> Tensor:
        """x plus instance noise of standard deviation ``instance_noise``, drawn from ``noise``."""
        if self.instance_noise == 0:
            return x
        return x + self.instance_noise * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=noise)

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor] | None:
        opt_g, opt_d = self.optimizers()
        noise = self.noise_stream.next_batch(self.device, self.global_rank)
        # the divergence policy counts bad batches in a row: a finite D step inside a batch whose G step then
        # diverges must not restart the count, or a diverging generator would be skipped forever
        bad_batches = self.nonfinite_steps
        restore_buffers = self._buffers_snapshot()
        for _ in range(self.n_critic):
            with self.toggled_optimizer(opt_d):
                d_objective = self.discriminator_objective(batch, noise=noise)
                d_terms = logged_terms(d_objective, "d")
                if self.skip_nonfinite(d_terms):
                    restore_buffers()
                    return None  # neither network steps on this batch
                self.nonfinite_steps = bad_batches
                self._optimizer_step(opt_d, d_objective.loss)
            self.d_steps += 1

        restore_buffers = self._buffers_snapshot()
        with self.toggled_optimizer(opt_g):
            g_objective = self.generator_objective(batch, noise=noise)
            g_terms = logged_terms(g_objective, "g")
            if self.skip_nonfinite(g_terms):
                restore_buffers()
                return None
            self._optimizer_step(opt_g, g_objective.loss)
        if self.ema is not None:
            self.ema.update_parameters(self.generator)
        terms = {name: value.detach() for name, value in {**d_terms, **g_terms}.items()}
        self.log_terms(terms, "train", batch_size=d_objective.batch_size)
        return terms

    def _optimizer_step(self, optimizer: Any, loss: Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()  # clips in on_before_optimizer_step

    @override
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Clipping here, not before optimizer.step(): under 16-mixed the precision plugin unscales the gradients
        # inside step(), just before this hook, so clipping earlier would cut the loss-scaled gradients
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def _buffers_snapshot(self) -> Callable[[], None]:
        """Copy the two networks' buffers; returns the function that puts them back. A skipped step must leave no
        trace, but its forward passes in training mode have moved batch norm's running statistics (NaN from a NaN
        batch, which would make every later evaluation NaN) and spectral norm's power iteration."""
        buffers = [b for net in (self.generator, self.discriminator) for b in net.buffers()]
        saved = [b.clone() for b in buffers]

        def restore() -> None:
            for buffer, copy in zip(buffers, saved, strict=True):
                buffer.copy_(copy)

        return restore

    @override
    def configure_optimizers(self) -> list[dict[str, Any]]:
        """The generator's optimizer, then the discriminator's (``self.optimizers()`` in that order), each with its
        scheduler where one is given."""
        params_g, params_d = (optimizers.trainable_parameters(net) for net in (self.generator, self.discriminator))
        fused = optimizers.fusable(self)
        return [
            optimizers.optimizer_config(params_g, self.optimizer_g, epoch_scheduler(self.lr_scheduler_g),
                                        default=GeneratorAdam, name="optimizer_g", allow_fused=fused),
            optimizers.optimizer_config(params_d, self.optimizer_d, epoch_scheduler(self.lr_scheduler_d),
                                        default=DiscriminatorAdam, name="optimizer_d", allow_fused=fused),
        ]  # fmt: skip

    @override
    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # manual optimization: Lightning leaves the schedulers to us
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.step()

    @override
    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        # the model's first hook in Trainer._run, before Lightning's _verify_loop_configurations rejects
        # Trainer(gradient_clip_val) under manual optimization with a message that cannot know the GAN's own flag
        if self.trainer.state.fn == TrainerFn.FITTING:
            gan_checks.check_trainer_clipping(self.trainer)
        return super().configure_callbacks()

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if isinstance(self.trainer.strategy, DDPStrategy):
            # Each backward pass reaches one network only (toggling an optimizer switches off requires_grad of the
            # other; the D step's fakes have no graph), which plain DDP fails on ("parameters that were not used in
            # producing the loss"). Its unused-parameter search marks the other network ready without a gradient, at
            # the cost of a graph traversal per backward (Lightning prepares one before each manual_backward).
            # Rejected: backward passes through both networks (gradients in the network not stepped, a G backward
            # per D step), or all-reducing by hand (bypassing DDP, syncing batch-norm buffers by hand).
            find_unused_parameters(self.trainer.strategy)

    def _evaluate(self, batch: Batch, batch_idx: int, stage: str) -> None:
        """Both objectives on held-out real data against the sampling generator, with noise fixed per batch index."""
        x, labels = self.unpack_batch(batch)  # checked once for both objectives (each check waits for the device)
        noise = torch.Generator(device=self.device).manual_seed(batch_idx)
        net = self.sampling_net()
        d_objective = self._discriminator_objective(x, labels, noise, net)
        g_objective = self._generator_objective(x, labels, noise, net)
        terms = {**logged_terms(d_objective, "d"), **logged_terms(g_objective, "g")}
        self.log_terms(terms, stage, batch_size=d_objective.batch_size)

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    @override
    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    @override
    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """As many samples as the batch has examples (with its labels for a conditional GAN)."""
        x, labels = self.unpack_batch(batch)
        return {"samples": self.sample(x.shape[0], labels=labels)}

    def sampling_net(self, *, use_ema: bool = True) -> nn.Module:
        """The generator that ``sample`` and evaluation use: the weight average (``WarmupEMA.fresh_module``) when
        there is one and ``use_ema``, otherwise the trained generator."""
        if self.ema is None or not use_ema:
            return self.generator
        return self.ema.fresh_module(self.statistics_inputs)

    def statistics_inputs(self) -> list[Tensor]:
        """The generator inputs that the average's batch-norm statistics are computed on: 8 batches of 128 latents
        (conditioned on the classes in turn), drawn afresh from the noise seed each time, so that the statistics
        depend on the averaged weights alone (on every rank, resumed or not)."""
        noise = torch.Generator(device=self.device).manual_seed(self.noise_stream.seed)
        return [self.condition_vectors(self.latent(128, noise), self.default_labels(128)) for _ in range(8)]

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
            return self.generator_output(noise, labels, net=net)
        finally:
            net.train(was_training)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # the random states (data order)
        checkpoint["gan_counters"] = {**self.noise_stream.state_dict(), "d_steps": self.d_steps}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        counters = checkpoint.get("gan_counters")
        if counters is None:
            raise ValueError("this checkpoint was not written by a GAN (it has no 'gan_counters')")
        self.noise_stream.load_state_dict(counters)
        self.d_steps = counters["d_steps"]


def logged_terms(objective: Objective, network: str) -> dict[str, Tensor]:
    """An objective's terms as they are logged: its ``loss`` named after its network (``d_loss``, ``g_loss``)."""
    return {(f"{network}_loss" if name == "loss" else name): value for name, value in objective.terms.items()}
