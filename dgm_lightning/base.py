"""Plumbing shared by the models: data checks, label conditioning, divergence policy, logging."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn import functional as F
from typing_extensions import override

from dgm_lightning.checkpoint_io import check_checkpoint_file
from dgm_lightning.compat import attached_trainer, logs_this_step, restricted_classmethod
from dgm_lightning.data_checks import DataChecks
from dgm_lightning.objectives import Objective
from dgm_lightning.optimizers import (
    contiguous_states,
    fusable,
    match_state_layout,
    optimizer_config,
    trainable_parameters,
)


def comparable_settings(hparams: Mapping) -> dict:
    """Settings as plain values: tuples as lists (a YAML config gives lists), without LightningCLI's ``_`` entries."""

    def plain(value):
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return {key: plain(value) for key, value in hparams.items() if not key.startswith("_")}


class GenerativeModel(DataChecks, L.LightningModule):
    """Base of the models: holds what the model expects of its data and checks it.

    The protocol that callbacks, tests and benchmarks rely on, the same in every family:

    - ``objective(batch) -> Objective``: the training objective on a batch as the DataModule yields it, named scalar
      terms with ``loss`` the one minimised (a GAN: ``generator_objective`` and ``discriminator_objective``).
    - ``sample(n, *, labels=None, temperature=1.0)``: n examples; ``labels`` only in the families that can be
      class-conditional (a conditional model draws the classes in turn when not given them), ``temperature`` scales
      the noise (0: the mode). ``from_noise(noise)`` is the same map from given noise of ``noise_shape``.
    - ``encode(x)`` / ``decode(z)``: posterior mean / decoder mean, in the latent-variable models only; a generation
      that is a loop (RecurrentVAE) is ``generate``.
    - ``log_prob(x)``: log-density in nats per example, exact for flows, an importance-weighted (IWAE) lower bound
      for latent-variable models. It is differentiable in every family (a training objective can use it), so wrap
      it in ``torch.no_grad()`` to evaluate.
    - ``optimizer`` / ``lr_scheduler``: injected callables (``dgm_lightning.optimizers``); a GAN has one of each per
      network.

    Divergence policy (``skip_nonfinite``): a training step whose loss terms are not all finite is
    skipped on every rank together, with a warning naming the terms; after ``max_nonfinite_steps``
    such steps in a row, training stops with an error naming them. Weights are never updated from a
    non-finite loss.

    Data checks: a DataModule's declared ``data_spec`` is compared in ``setup``; the batches themselves, from any
    DataModule, are checked for shape (always), for values in ``value_range`` and labels in [0, num_classes) (the
    first training batch of each epoch and every evaluation batch: see ``check_batch``), and the inputs of the
    public methods (``encode``, ``decode``, ``log_prob``) on every call.

    Args:
        data_shape: shape of one example: (C, H, W) for images, (D,) for vectors.
        value_range: (low, high) of the data's values.
        num_classes: number of classes for a class-conditional model, None for an unconditional one.
        compile: compile each network in place (``nn.Module.compile``) when the Trainer sets the model up,
            after ``setup`` has built the networks that are sized from the data. The parameter names do not
            change, so checkpoints load with or without it. The first steps are slow while it compiles.
        channels_last: hold the networks' 4-D weights, and so their convolutions' activations, in channels-last
            memory format while the Trainer runs (from ``configure_model`` to ``teardown``: afterwards they are
            contiguous again, so code that views parameters flat, like ``parameters_to_vector``, works on the
            fitted model). On CPU it made the convolutional families' training steps 7-30 % faster (README,
            "Memory format"); a model without convolutions is unchanged. The values are the same up to float
            rounding; checkpoints load either way.
    """

    def __init__(
        self,
        *,
        data_shape: Sequence[int],
        value_range: Sequence[float],
        num_classes: int | None,
        compile: bool = False,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if len(data_shape) == 0 or any(int(s) <= 0 for s in data_shape):
            raise ValueError(f"the data shape must be positive sizes, such as (C, H, W), got {tuple(data_shape)}")
        if len(value_range) != 2 or not value_range[0] < value_range[1] or not all(map(math.isfinite, value_range)):
            raise ValueError(f"value_range must be (low, high) with low < high, both finite, got {tuple(value_range)}")
        if num_classes is not None and (not isinstance(num_classes, numbers.Integral) or num_classes < 2):
            raise ValueError(f"num_classes must be >= 2 for a conditional model (or None), got {num_classes!r}")
        self.data_shape = tuple(int(s) for s in data_shape)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.num_classes = num_classes
        self.nonfinite_steps = 0
        self.compile_networks = compile  # not self.compile: that is nn.Module's method
        self.channels_last = channels_last
        self._check_next_training_batch = True  # see check_batch: the first training batch of each epoch is checked
        # per stage, per set of term names: (sums of value x batch size, one per name; number of examples) so far
        self._term_sums: dict[str, dict[tuple[str, ...], tuple[Tensor, int]]] = {}

    max_nonfinite_steps = 10

    # -- optimization ----------------------------------------------------------------------------

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        """The injected ``optimizer`` over the trainable parameters, and ``lr_scheduler`` when given: the families
        with one optimizer set both attributes from their arguments (``dgm_lightning.optimizers``)."""
        params = trainable_parameters(self)
        return optimizer_config(params, self.optimizer, self.lr_scheduler, allow_fused=fusable(self))

    # -- the steps of a family with one objective -------------------------------------------------

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """The step of every family with one objective (``objective``): skipped under the divergence policy, or
        its terms logged and its loss returned, and ``on_objective`` called. (The GAN steps its own.)"""
        objective = self.objective(batch)
        if self.skip_nonfinite(objective.terms):
            return None  # Lightning skips the optimizer step
        self.log_terms(objective.terms, "train", objective.batch_size)
        self.on_objective(objective, "train")
        return objective.loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def evaluation_step(self, batch: Any, stage: str) -> None:
        """A validation or test step: the objective's terms logged, and ``on_objective`` called."""
        objective = self.objective(batch)
        self.log_terms(objective.terms, stage, objective.batch_size)
        self.on_objective(objective, stage)

    def on_objective(self, objective: Objective, stage: str) -> None:
        """Called with each step's objective once its terms are logged (not for a skipped training step): what a
        family does with it beside logging, such as gathering the codes."""

    # -- data contract -------------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        """Compare the model's expectations with what the DataModule declares (its ``data_spec``)."""
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        spec = getattr(datamodule, "data_spec", None)
        if spec is None:
            return
        name = type(self).__name__
        if tuple(spec.data_shape) != self.data_shape:
            raise ValueError(
                f"{name} was built for examples of shape {self.data_shape} but "
                f"{type(datamodule).__name__} yields {tuple(spec.data_shape)}; set the model's data_shape to match "
                f'(--model.data_shape "{list(spec.data_shape)}")'
            )
        if tuple(spec.value_range) != self.value_range:
            raise ValueError(
                f"{name} expects pixel values in {self.value_range} but {type(datamodule).__name__} yields "
                f"{tuple(spec.value_range)}; set the same value_range on the model and the data"
            )
        if self.num_classes is not None and spec.num_classes != self.num_classes:
            raise ValueError(
                f"{name} is conditional on {self.num_classes} classes but {type(datamodule).__name__} "
                f"has {spec.num_classes}; set num_classes to match, or to None for an unconditional model"
            )

    @override
    def configure_model(self) -> None:
        # load_from_checkpoint calls this hook too, without a Trainer: the loaded model stays contiguous, as the
        # fitted one is after teardown
        if self.channels_last and attached_trainer(self) is not None:
            self.to(memory_format=torch.channels_last)  # in place: the parameters stay the same objects
        if self.compile_networks:
            for net in self.children():
                if next(net.parameters(), None) is not None:
                    net.compile()

    @override
    def teardown(self, stage: str) -> None:
        if self.channels_last:
            self.to(memory_format=torch.contiguous_format)  # see channels_last in the class docstring
            self._match_optimizer_states()  # for an optimizer stepped after fit (see match_state_layout)

    @override
    def on_train_start(self) -> None:
        self._match_optimizer_states()  # the Trainer has just restored them from a checkpoint, if resuming

    def _match_optimizer_states(self) -> None:
        for optimizer in self.trainer.optimizers:
            match_state_layout(optimizer)

    @override
    def on_fit_start(self) -> None:
        # seed_everything gives every rank the same seed, so every rank would draw the same noise (posterior
        # samples, word dropout, dequantization) for its different data; offset each rank's stream, unless a
        # resumed run has just restored every rank's own state from the checkpoint
        if self.trainer.world_size > 1 and self.trainer.ckpt_path is None:
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    @override
    def on_train_epoch_start(self) -> None:
        self._check_next_training_batch = True  # check_batch checks the epoch's first batch

    @override
    def on_fit_end(self) -> None:
        # Lightning only logs "No training batches" and returns; an empty training set deserves an error
        if self.trainer.num_training_batches == 0 and self.trainer.limit_train_batches != 0:
            raise ValueError(
                "the training dataloader is empty, so nothing was trained: the dataset has no examples; "
                "check the DataModule's data and split fractions"
            )

    def skip_nonfinite(self, terms: dict[str, Tensor]) -> bool:
        """Apply the divergence policy to this step's loss terms; True means: skip the step."""
        # one check of all terms together: per-term isfinite().all() costs a few tensor operations per term and step
        finite = bool(torch.cat([v.detach().reshape(-1) for v in terms.values()]).isfinite().all())
        # every rank must agree, or the ranks that step would wait forever for the others' gradients
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            self.nonfinite_steps = 0
            return False
        self.nonfinite_steps += 1
        bad = ", ".join(name for name, v in terms.items() if not v.detach().isfinite().all()) or "on another rank"
        if self.nonfinite_steps >= self.max_nonfinite_steps:
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite loss terms ({bad}) in {self.nonfinite_steps} training steps in a "
                "row; stopping. Check the data for NaN/Inf, lower the learning rate, or clip gradients"
            )
        rank_zero_warn(f"{type(self).__name__}: skipping a training step with non-finite loss terms: {bad}")
        return True

    def init_log_scale(self, likelihood: str, gaussian_scale: float) -> None:
        """``log_scale``, the Gaussian likelihoods' log standard deviation: a parameter for ``gaussian_learned``,
        a fixed buffer otherwise (the Bernoulli likelihoods ignore it)."""
        log_scale = torch.tensor(float(gaussian_scale)).log()
        if likelihood == "gaussian_learned":
            self.log_scale = torch.nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    # -- class conditioning ----------------------------------------------------------------------

    def check_labels(self, labels: Tensor | None, n: int) -> Tensor | None:
        """Validate labels for n examples: required by a conditional model, refused by an unconditional one."""
        name = type(self).__name__
        if self.num_classes is None:
            if labels is not None:
                raise ValueError(f"{name} is unconditional (num_classes=None) and takes no labels")
            return None
        if labels is None:
            raise ValueError(f"{name} is conditional (num_classes={self.num_classes}): pass labels")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        # the range needs the values, which torch.export's tracing does not have
        if (
            not torch.compiler.is_exporting()
            and labels.numel()
            and (labels.min() < 0 or labels.max() >= self.num_classes)
        ):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        return labels.to(self.device)

    def default_labels(self, n: int) -> Tensor | None:
        """Labels for sampling when none are given: the classes in turn (0, 1, ..., 0, 1, ...)."""
        return None if self.num_classes is None else torch.arange(n, device=self.device) % self.num_classes

    def condition_images(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Append one-hot label maps as extra channels: (B, C, H, W) -> (B, C + num_classes, H, W)."""
        if labels is None:
            return x
        onehot = F.one_hot(labels.long(), self.num_classes).to(x.dtype)
        return torch.cat([x, onehot[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)

    def condition_vectors(self, z: Tensor, labels: Tensor | None) -> Tensor:
        """Append one-hot labels: (B, D) -> (B, D + num_classes)."""
        if labels is None:
            return z
        return torch.cat([z, F.one_hot(labels.long(), self.num_classes).to(z.dtype)], dim=1)

    # -- checkpoints -----------------------------------------------------------------------------

    @override
    @restricted_classmethod  # refuses a call on an instance, as Lightning's own does
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path | IO,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ):
        """Lightning's ``load_from_checkpoint``, but a local file that is not a readable checkpoint gets an error
        saying so (``check_checkpoint_file``) instead of torch's advice to load it with ``weights_only=False``.

        Args: as ``LightningModule.load_from_checkpoint``; ``kwargs`` replace settings saved in the checkpoint.
        """
        if isinstance(checkpoint_path, (str, Path)) and Path(checkpoint_path).is_file():
            check_checkpoint_file(checkpoint_path, weights_only=weights_only)
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs
        )  # fmt: skip

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning saves no random state, so a resumed run would draw other noise and shuffle other
        # batches than an uninterrupted one. Every rank's CPU generator state is kept (gathered, since
        # only rank zero writes the file); CUDA generators are not, so GPU resumes are not bitwise.
        state = torch.get_rng_state()
        trainer = attached_trainer(self)
        states = self.all_gather(state) if trainer is not None and trainer.world_size > 1 else state[None]
        checkpoint["rng_states"] = states.cpu()
        contiguous_states(checkpoint.get("optimizer_states", []))  # as the weights are after teardown

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # only when a Trainer resumes: loading weights for inference must not reset the caller's random state,
        # and load_from_checkpoint(path, lr=...) overrides settings on purpose
        if attached_trainer(self) is None:
            return
        self._check_resumed_settings(checkpoint.get("hyper_parameters", {}))
        states = checkpoint.get("rng_states")
        if states is not None and self.trainer.global_rank < states.shape[0]:
            # a copy: torch.set_rng_state crashes the process (segfault, torch 2.14) on a row of the gathered states
            # that does not start its storage, i.e. every rank but the first
            torch.set_rng_state(states[self.trainer.global_rank].clone())

    def _check_resumed_settings(self, saved: dict) -> None:
        """Refuse to resume a run with other model settings than it was trained with: the result would be
        neither run, and a changed size would otherwise fail later as a bare state_dict shape error."""
        ours, theirs = comparable_settings(self.hparams), comparable_settings(saved)
        if "_class_path" in saved:  # a checkpoint of another model (LightningCLI records the class)
            ours["model"], theirs["model"] = type(self).__name__, saved["_class_path"].rsplit(".", 1)[-1]
        changed = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key, "-") != theirs.get(key, "-"))
        if not changed:
            return
        details = "; ".join(
            f"{key}: {theirs.get(key, '-')!r} in the checkpoint, {ours.get(key, '-')!r} now" for key in changed
        )
        config = Path(self.trainer.ckpt_path or ".").parent.parent / "config.yaml"
        hint = f" (that run's settings are in {config})" if config.is_file() else ""
        raise ValueError(
            f"{type(self).__name__}: the checkpoint was trained with other settings ({details}). To resume it, "
            f"give the model the checkpoint's settings{hint}; to start afresh, leave out --ckpt_path"
        )

    # -- logging ---------------------------------------------------------------------------------

    def log_terms(self, terms: dict[str, Tensor], stage: str, batch_size: int) -> None:
        """Add named scalars to this epoch's means, logged as ``{stage}/{name}`` at the epoch's end; training also
        logs ``train/{name}_step``, rank zero's batch, on the logger's steps. The progress bar shows the
        ``progress_bar_terms`` of both (so its step values change on the logger's steps, ``log_every_n_steps``).

        Written by hand rather than one ``self.log`` per term and step: Lightning's bookkeeping costs about a
        millisecond per ``self.log`` call, as much as a whole training step of a small model (benchmarks/overhead.py).
        Here a step costs a few tensor operations whatever the number of terms (they are summed as one vector per
        set of names; a set can vary, as with a lazy penalty), and an epoch one all-reduce for all its terms.
        """
        sums = self._term_sums.setdefault(stage, {})
        names = tuple(terms)
        total, count = sums.get(names, (0.0, 0))
        # float32 each: under autocast the terms can differ in dtype (bf16 and float32), which stack refuses
        values = torch.stack([value.detach().float() for value in terms.values()])
        sums[names] = (total + values * batch_size, count + batch_size)
        if stage == "train" and logs_this_step(self.trainer):
            # One copy to the host for all terms: the logger would wait for each term's value apart, and the
            # progress bar reads its values after every step (a wait each time, for values left on a GPU)
            self._log_named(dict(zip(names, values.cpu(), strict=True)), "train/{}_step", on_step=True)

    # the terms that the progress bar shows (rank zero's step values and the epoch means): the main objective
    progress_bar_terms: tuple[str, ...] = ("loss",)

    def _log_named(self, values: dict[str, Tensor], key: str, on_step: bool | None = None) -> None:
        """``log_dict`` each term's value under ``key.format(name)``; those of ``progress_bar_terms`` also on the
        progress bar. The same number of ``self.log`` calls as one ``log_dict``, so no cost added."""
        for prog_bar in (True, False):
            group = {
                key.format(name): value
                for name, value in values.items()
                if (name in self.progress_bar_terms) == prog_bar
            }
            if group:
                self.log_dict(group, prog_bar=prog_bar, on_step=on_step)

    def _log_epoch_means(self, stage: str) -> None:
        groups = self._term_sums.pop(stage, {})
        if not groups:
            return
        sums: dict[str, tuple[Tensor, int]] = {}  # per term: (sum of value x batch size, number of examples)
        for names, (group_total, group_count) in groups.items():
            for name, value in zip(names, group_total, strict=True):
                total, count = sums.get(name, (0.0, 0))
                sums[name] = (total + value, count + group_count)
        # (terms, 2): weighted sum and count; summed over ranks, so the mean weighs every example once
        totals = torch.stack([torch.stack([total, torch.as_tensor(count).to(total)]) for total, count in sums.values()])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        # one self.log per term: loggers and callbacks (ModelCheckpoint(monitor="train/loss")) read the same name
        self._log_named(dict(zip(sums, totals[:, 0] / totals[:, 1], strict=True)), f"{stage}/{{}}")

    @override
    def on_train_epoch_end(self) -> None:
        self._log_epoch_means("train")

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch_means("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch_means("test")
