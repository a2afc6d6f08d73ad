"""Plumbing shared by the models: data checks, label conditioning, divergence policy, logging."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn import functional as F


def _comparable(hparams: Mapping) -> dict:
    """Settings as plain values: tuples as lists (a YAML config gives lists), without LightningCLI's ``_`` entries."""

    def plain(value):
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return {key: plain(value) for key, value in hparams.items() if not key.startswith("_")}


def check_positive(**values: float | None) -> None:
    """Raise a ValueError for each named value that is not > 0 (None means 'not used' and passes)."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


class GenerativeModel(L.LightningModule):
    """Base of the models: holds what the model expects of its data and checks it.

    Divergence policy (``skip_nonfinite``): a training step whose loss terms are not all finite is
    skipped on every rank together, with a warning naming the terms; after ``max_nonfinite_steps``
    such steps in a row, training stops with an error naming them. Weights are never updated from a
    non-finite loss.

    Args:
        data_shape: shape of one example: (C, H, W) for images, (D,) for vectors.
        value_range: (low, high) of the data's values.
        num_classes: number of classes for a class-conditional model, None for an unconditional one.
        compile: compile each network in place (``nn.Module.compile``) when the Trainer sets the model up,
            after ``setup`` has built the networks that are sized from the data. The parameter names do not
            change, so checkpoints load with or without it. The first steps are slow while it compiles.
    """

    def __init__(
        self,
        *,
        data_shape: Sequence[int],
        value_range: Sequence[float],
        num_classes: int | None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if len(data_shape) == 0 or any(int(s) <= 0 for s in data_shape):
            raise ValueError(f"the data shape must be positive sizes, such as (C, H, W), got {tuple(data_shape)}")
        if len(value_range) != 2 or not value_range[0] < value_range[1]:
            raise ValueError(f"value_range must be (low, high) with low < high, got {tuple(value_range)}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 for a conditional model (or None), got {num_classes}")
        self.data_shape = tuple(int(s) for s in data_shape)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.num_classes = num_classes
        self.nonfinite_steps = 0
        self.compile_networks = compile  # not self.compile: that is nn.Module's method
        # per stage, per set of term names: (sums of value x batch size, one per name; number of examples) so far
        self._term_sums: dict[str, dict[tuple[str, ...], tuple[Tensor, int]]] = {}

    max_nonfinite_steps = 10

    # -- data contract -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Compare the model's expectations with what the DataModule declares (its ``data_spec``)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        spec = getattr(datamodule, "data_spec", None)
        if spec is None:
            return
        name = type(self).__name__
        if tuple(spec.data_shape) != self.data_shape:
            raise ValueError(
                f"{name} was built for examples of shape {self.data_shape} but "
                f"{type(datamodule).__name__} yields {tuple(spec.data_shape)}; set the model's shape to match "
                f'(for image models: --model.img_shape "{list(spec.data_shape)}")'
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

    def configure_model(self) -> None:
        if self.compile_networks:
            for net in self.children():
                if next(net.parameters(), None) is not None:
                    net.compile()

    def on_fit_start(self) -> None:
        # seed_everything gives every rank the same seed, so every rank would draw the same noise (posterior
        # samples, word dropout, dequantization) for its different data; offset each rank's stream, unless a
        # resumed run has just restored every rank's own state from the checkpoint
        if self.trainer.world_size > 1 and self.trainer.ckpt_path is None:
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def on_fit_end(self) -> None:
        # Lightning only logs "No training batches" and returns; an empty training set deserves an error
        if self.trainer.num_training_batches == 0 and self.trainer.limit_train_batches != 0:
            raise ValueError(
                "the training dataloader is empty, so nothing was trained: the dataset has no examples; "
                "check the DataModule's data and split fractions"
            )

    def unpack_batch(self, batch: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """Split a batch into data and labels and check the data's shape (a cheap, sync-free check)."""
        if isinstance(batch, Tensor):
            x, y = batch, None
        elif isinstance(batch, (list, tuple)) and len(batch) in (1, 2):
            x, y = batch[0], (batch[1] if len(batch) == 2 else None)
        else:
            raise TypeError(
                f"{type(self).__name__} expects a batch that is an image tensor or an (images, labels) pair, "
                f"got {type(batch).__name__}"
            )
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"{type(self).__name__} expects batches of shape (B, {', '.join(map(str, self.data_shape))}) "
                f"but got {tuple(x.shape)}; set the model's shape (img_shape for image models) to match the data"
            )
        self.check_evaluation_data(x)
        if self.num_classes is None:
            return x, None
        if y is None:
            raise ValueError(
                f"{type(self).__name__} is conditional (num_classes={self.num_classes}) but the batch has no labels"
            )
        return x, y

    def check_evaluation_data(self, x: Tensor) -> None:
        """Outside training, refuse data with NaN or Inf values (in training the divergence policy skips such a
        step); a sync per batch, which evaluation can afford."""
        if not self.training and x.is_floating_point() and not bool(x.isfinite().all()):
            raise ValueError(
                f"{type(self).__name__}: a batch to evaluate holds NaN or Inf values; the metrics would be NaN. "
                "Check the data that the DataModule yields"
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
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning saves no random state, so a resumed run would draw other noise and shuffle other
        # batches than an uninterrupted one. Every rank's CPU generator state is kept (gathered, since
        # only rank zero writes the file); CUDA generators are not, so GPU resumes are not bitwise.
        state = torch.get_rng_state()
        states = self.all_gather(state) if self._trainer is not None and self.trainer.world_size > 1 else state[None]
        checkpoint["rng_states"] = states.cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # only when a Trainer resumes: loading weights for inference must not reset the caller's random state,
        # and load_from_checkpoint(path, lr=...) overrides settings on purpose
        if self._trainer is None:
            return
        self._check_resumed_settings(checkpoint.get("hyper_parameters", {}))
        states = checkpoint.get("rng_states")
        if states is not None and self.trainer.global_rank < states.shape[0]:
            torch.set_rng_state(states[self.trainer.global_rank])

    def _check_resumed_settings(self, saved: dict) -> None:
        """Refuse to resume a run with other model settings than it was trained with: the result would be
        neither run, and a changed size would otherwise fail later as a bare state_dict shape error."""
        ours, theirs = _comparable(self.hparams), _comparable(saved)
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
        logs ``train/{name}_step``, rank zero's batch, on the logger's steps.

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
        if stage == "train" and (self.trainer._logger_connector.should_update_logs or self.trainer.fast_dev_run):
            # the logger connector's own test for "this step is written": private, so tests/test_models.py checks it
            self.log_dict({f"train/{name}_step": value.detach() for name, value in terms.items()}, on_step=True)

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
        self.log_dict(dict(zip((f"{stage}/{name}" for name in sums), totals[:, 0] / totals[:, 1], strict=True)))

    def on_train_epoch_end(self) -> None:
        self._log_epoch_means("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_means("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_means("test")
