"""The checks of data and inputs that every model runs: the batches a step receives, what a caller passes to the
public methods, codes and noise; each error names what was seen and the setting to change."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dgm_lightning.checks import check_positive_int, check_temperature


class DataChecks:
    """The data checks of ``GenerativeModel``, which it inherits (a mixin, one idea apart from the training plumbing).

    They read the model's ``data_shape``, ``value_range``, ``num_classes``, ``training``, ``noise_shape`` and, where
    codes are checked, ``latent_dim``; labels go through its ``check_labels``.
    """

    def unpack_batch(self, batch: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """Split a batch into data and labels and check them: the shapes always (sync-free), the values as
        ``check_batch`` says."""
        if isinstance(batch, Tensor):
            x, y = batch, None
        elif isinstance(batch, (list, tuple)) and len(batch) in (1, 2):
            x, y = batch[0], (batch[1] if len(batch) == 2 else None)
        else:
            raise TypeError(
                f"{type(self).__name__} expects a batch that is an image tensor or an (images, labels) pair, "
                f"got {type(batch).__name__}"
            )
        self.check_shape(x, "batches")
        if self.num_classes is None:
            y = None
        elif y is None:
            raise ValueError(
                f"{type(self).__name__} is conditional (num_classes={self.num_classes}) but the batch has no labels"
            )
        elif tuple(y.shape) != (x.shape[0],):
            raise ValueError(
                f"{type(self).__name__} expects one class index per example, labels of shape ({x.shape[0]},), "
                f"but the batch's labels have shape {tuple(y.shape)}"
            )
        self.check_batch(x, y)
        return x, y

    def check_shape(self, x: Tensor, what: str) -> None:
        """Refuse x unless it is a batch of examples of ``data_shape`` (sync-free); ``what`` names x in the error."""
        if x.dim() == 0 or tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"{type(self).__name__} expects {what} of shape (B, {', '.join(map(str, self.data_shape))}) "
                f"but got {tuple(x.shape)}; set the model's data_shape to match the data"
            )

    def check_batch(self, x: Tensor, labels: Tensor | None = None, *, mask: Tensor | None = None) -> None:
        """Check the values of a batch that reaches a step (``check_values``) wherever that costs no steady-state sync.

        The check waits for the device once. Evaluation checks every batch (its metrics need finite data, so it would
        wait anyway); a training loop checks its first batch (the Trainer's: of each epoch), where a DataModule's
        mistake (another value range, other labels) shows at once, and then runs without waiting, as a loop of your
        own does (``objective`` in training mode). NaN or Inf in training are the divergence policy's, which skips
        such a step.

        Args:
            x: the batch's data.
            labels: its labels (None: none to check).
            mask: the entries of x that count (True), such as the real steps of padded sequences; None: all.
        """
        if self.training:
            if not self._check_next_training_batch:
                return
            self._check_next_training_batch = False
        what = "a training batch" if self.training else "a batch to evaluate"
        self.check_values(x, labels, what=what, mask=mask, finite=not self.training)

    def check_input(
        self, x: Tensor, labels: Tensor | None, method: str, *, value_range: tuple[float, float] | None = None
    ) -> Tensor | None:
        """Check what a caller passes to a public method (``encode``, ``log_prob``, ...) as batches are checked: the
        shape, the labels, NaN or Inf and the value range (one wait for the device). Returns the labels on the
        model's device; ``value_range`` as in ``check_values``."""
        what = f"the input of {method}"
        self.check_shape(x, what)
        labels = self.check_labels(labels, x.shape[0])
        self.check_values(x, what=what, value_range=value_range)
        return labels

    def check_codes(self, z: Tensor, method: str) -> None:
        """Refuse codes passed to a public method (``decode``) of a model with a ``latent_dim`` unless they are
        (B, latent_dim) and finite (one wait for the device)."""
        name = type(self).__name__
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"{name} expects codes of shape (B, {self.latent_dim}) (latent_dim) as the input of {method}, "
                f"but got {tuple(z.shape)}"
            )
        if not torch.compiler.is_exporting() and not bool(z.isfinite().all()):  # tracing has shapes, no values
            raise ValueError(f"{name}: the input of {method} holds NaN or Inf values; pass finite codes")

    def draw_noise(self, n: int, temperature: float) -> Tensor:
        """Standard normal noise for n samples (n, *noise_shape), scaled by ``temperature``, after checking both:
        what ``sample`` passes to ``from_noise`` in the models that draw from noise."""
        check_positive_int(n=n)
        check_temperature(temperature)
        return temperature * torch.randn(n, *self.noise_shape, device=self.device)

    def check_noise(self, noise: Tensor, labels: Tensor | None, method: str = "from_noise") -> Tensor | None:
        """Refuse noise for ``from_noise`` unless it is (B, *noise_shape), and check the labels; returns them."""
        if noise.dim() == 0 or tuple(noise.shape[1:]) != tuple(self.noise_shape):
            raise ValueError(
                f"{type(self).__name__} expects noise of shape (B, {', '.join(map(str, self.noise_shape))}) "
                f"(noise_shape) as the input of {method}, but got {tuple(noise.shape)}"
            )
        return self.check_labels(labels, noise.shape[0])

    def check_values(
        self,
        x: Tensor,
        labels: Tensor | None = None,
        *,
        what: str,
        mask: Tensor | None = None,
        finite: bool = True,
        value_range: tuple[float, float] | None = None,
    ) -> None:
        """Refuse NaN or Inf in x, values outside the value range and labels outside [0, num_classes), with errors that
        name what was seen and the setting to change; waits for the device once.

        Args:
            x: the data.
            labels: their labels (None: none to check).
            what: how the errors name x ("a batch to evaluate", "the input of encode").
            mask: the entries of x whose range counts (True), such as the real steps of padded sequences; None: all.
            finite: refuse NaN and Inf (otherwise they are left out of the range).
            value_range: the range that x must lie in, when not ``data_range`` (a flow's dequantized data).
        """
        if x.numel() == 0:
            return
        low, high = self.data_range if value_range is None else value_range
        finite_values = x.isfinite()
        counted = finite_values if mask is None else finite_values & mask
        stats = [
            finite_values.all(),
            torch.where(counted, x, math.inf).amin(),
            torch.where(counted, x, -math.inf).amax(),
        ]
        if labels is not None and labels.numel():
            stats += [labels.amin(), labels.amax()]
        values = torch.stack([stat.float() for stat in stats]).tolist()  # the one wait for the device
        name = type(self).__name__
        if finite and not values[0]:
            raise ValueError(
                f"{name}: {what} holds NaN or Inf values; the results (loss, metrics, codes) would be NaN. "
                "Check the data: what the DataModule yields, or the tensor passed"
            )
        # a rounding error's margin: data mapped into the range by arithmetic can overshoot its ends by an ulp
        margin = 1e-5 * (high - low)
        if values[1] < low - margin or values[2] > high + margin:
            expected = f"value_range {self.value_range}"
            if (low, high) != self.value_range:
                expected = f"[{low:.6g}, {high:.6g}] (from {expected})"
            raise ValueError(
                f"{name} expects values in {expected} but {what} holds values from {values[1]:.6g} to "
                f"{values[2]:.6g}; {self.value_range_advice()}"
            )
        if len(values) == 5 and not (values[3] >= 0 and values[4] < self.num_classes):
            raise ValueError(
                f"{name} is conditional on num_classes={self.num_classes} classes: labels must lie in "
                f"[0, {self.num_classes}), but {what} has labels from {values[3]:g} to {values[4]:g}; give the model "
                "the data's number of classes (num_classes=... in Python, --model.num_classes on the command line)"
            )

    @property
    def data_range(self) -> tuple[float, float]:
        """The (low, high) that the data must lie in: ``value_range``, where a family gives it that meaning."""
        return self.value_range

    def value_range_advice(self) -> str:
        """What to do about data outside the value range: the end of that error message (a family with a Bernoulli
        likelihood, ``likelihood``, can only take (0, 1))."""
        likelihood = getattr(self, "likelihood", None)
        if likelihood in ("bernoulli", "continuous_bernoulli"):
            return (
                f"the {likelihood} likelihood models values in (0, 1): map the data into (0, 1), or use a gaussian "
                'likelihood with the range of the data (likelihood="gaussian", value_range=(low, high) in Python; '
                '--model.likelihood gaussian --model.value_range "[low, high]" on the command line)'
            )
        return (
            "map the data into that range, or give the model the range of the data: value_range=(low, high) in "
            'Python, --model.value_range "[low, high]" on the command line'
        )
