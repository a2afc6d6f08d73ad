"""What a model of padded sequences knows of its data: a vocabulary (tokens) or features per step (continuous
values), given or taken from the DataModule in ``setup``; the checks of its batches and inputs; lines of text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from dgm_lightning.base import GenerativeModel
from dgm_lightning.compat import attached_trainer
from dgm_lightning.vocabulary import PAD, Vocabulary

DEFAULT_MAX_LEN = 64


class SequenceModel(GenerativeModel):
    """Base of the models of sequences (``RecurrentVAE``): batches ``(x, lengths)``, x token ids (B, T) padded with
    ``<pad>`` or values (B, T, input_dim), and the data those need.

    The networks are sized by the vocabulary or the features per step, so they are built once those are known
    (``build_networks``): in the constructor when given, else in ``setup`` from the DataModule, which comes before
    the Trainer builds the optimizer. The vocabulary is stored in the hyperparameters, so a checkpoint decodes text
    on its own. Subclasses define ``build_networks``, and ``sample`` and ``interpolate``, which the text methods
    decode.

    Args:
        likelihood: ``categorical`` for token sequences, or a likelihood of continuous values.
        value_range: (low, high) of continuous values (the Bernoulli likelihood's range: see ``data_range``).
        sample_max_len: longest sequence generated unless told; None: the DataModule's, else 64.
        compile: see ``GenerativeModel``.
    """

    def __init__(
        self, *, likelihood: str, value_range: Sequence[float], sample_max_len: int | None, compile: bool
    ) -> None:
        # data_shape is (max_len, features per step) once the data is known
        super().__init__(
            data_shape=(sample_max_len or DEFAULT_MAX_LEN, 1), value_range=value_range, num_classes=None,
            compile=compile,
        )  # fmt: skip
        self.likelihood = likelihood
        self.is_tokens = likelihood == "categorical"
        self.max_len = sample_max_len  # None until a DataModule tells it
        self.vocabulary: Vocabulary | None = None
        self.input_dim: int | None = None

    def build_networks(self, feature_dim: int) -> None:
        """Build the default networks (those not injected) for a vocabulary size or features per step."""
        raise NotImplementedError

    # -- the data: its vocabulary or features per step -----------------------------------------------

    @property
    def feature_dim(self) -> int | None:
        """Vocabulary size (tokens) or features per step (continuous); None until known."""
        return len(self.vocabulary) if self.vocabulary is not None else self.input_dim

    def set_vocabulary(self, vocabulary: Vocabulary) -> None:
        """Adopt a vocabulary (stored in the hyperparameters, so in checkpoints) and build the default nets."""
        if not self.is_tokens:
            raise ValueError(f"a vocabulary is for token sequences (likelihood categorical), not {self.likelihood!r}")
        self._check_unbuilt(len(vocabulary), "tokens")
        self.vocabulary = vocabulary
        self.hparams["vocab"] = list(vocabulary.tokens)
        self.hparams["vocab_level"] = vocabulary.level
        self._build(len(vocabulary))

    def set_input_dim(self, input_dim: int) -> None:
        """Set the features per step of continuous sequences (stored in the hyperparameters); build the nets."""
        self._check_unbuilt(input_dim, "features per step")
        self.input_dim = input_dim
        self.hparams["input_dim"] = input_dim
        self._build(input_dim)

    def _check_unbuilt(self, size: int, what: str) -> None:
        # the networks' input and output layers are sized once; another size would need new networks
        if self.feature_dim is not None and self.feature_dim != size:
            raise ValueError(f"{type(self).__name__} was built for {self.feature_dim} {what}, not {size}")

    def _build(self, feature_dim: int) -> None:
        self.data_shape = (self.max_len or DEFAULT_MAX_LEN, feature_dim)
        self.build_networks(feature_dim)

    def require_data(self) -> None:
        """Refuse to run before the networks exist: before the vocabulary or the features per step are known."""
        if self.feature_dim is None:
            what = "vocab" if self.is_tokens else "input_dim"
            raise RuntimeError(
                f"{type(self).__name__} does not know its data yet: pass {what}, or fit it with a sequence DataModule"
            )

    @override
    def setup(self, stage: str) -> None:
        """Take the vocabulary (or the features per step) and the sequence length from the DataModule, or check
        that they match."""
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        if datamodule is None:
            self.require_data()
            return
        spec = getattr(datamodule, "data_spec", None)
        if self.max_len is None and spec is not None:
            self.max_len = self.hparams["sample_max_len"] = int(spec.data_shape[0])
            self.data_shape = (self.max_len, self.data_shape[1])
        if self.is_tokens:
            self._take_vocabulary(datamodule)
        else:
            self._take_input_dim(datamodule, spec)

    def _take_vocabulary(self, datamodule: Any) -> None:
        vocabulary = getattr(datamodule, "vocabulary", None)
        if vocabulary is None:
            raise ValueError(
                f"{type(self).__name__} with the categorical likelihood models token sequences, but "
                f"{type(datamodule).__name__} has no vocabulary; use TextLinesDataModule, or a bernoulli/gaussian "
                "likelihood for continuous data"
            )
        if self.vocabulary is None:
            self.set_vocabulary(vocabulary)
        elif vocabulary != self.vocabulary:
            # the model's vocabulary (from its checkpoint) wins: the data is encoded with it
            datamodule.set_vocabulary(self.vocabulary)

    def _take_input_dim(self, datamodule: Any, spec: Any) -> None:
        name, data_name = type(self).__name__, type(datamodule).__name__
        if getattr(datamodule, "vocabulary", None) is not None:
            raise ValueError(f"{data_name} yields token sequences: use likelihood categorical, not {self.likelihood!r}")
        if spec is None or len(spec.data_shape) != 2:
            raise ValueError(
                f"{name} needs a sequence DataModule yielding (x, lengths) batches; {data_name} is not one"
            )
        features = int(spec.data_shape[1])
        if self.input_dim is None:
            self.set_input_dim(features)
        elif features != self.input_dim:
            raise ValueError(
                f"{name} was built for {self.input_dim} features per step but {data_name} yields {features}; "
                f"set --model.input_dim {features}"
            )
        if self.likelihood == "bernoulli" and tuple(spec.value_range) != (0.0, 1.0):
            raise ValueError(f"the bernoulli likelihood needs values in (0, 1), {data_name} yields {spec.value_range}")

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("vocab")
        if saved is not None and self.vocabulary is not None and tuple(saved) != self.vocabulary.tokens:
            raise ValueError(
                f"the checkpoint's vocabulary ({len(saved)} tokens) differs from this model's "
                f"({len(self.vocabulary)}); build the model from the checkpoint ({type(self).__name__}"
                ".load_from_checkpoint, or --ckpt_path on the command line, which reads its hyperparameters)"
            )
        super().on_load_checkpoint(checkpoint)  # the other settings, and the random states

    # -- batches and inputs ----------------------------------------------------------------------

    @property
    def data_range(self) -> tuple[float, float]:
        # only the Bernoulli bounds continuous values; the Gaussians model any real values
        return self.value_range if self.likelihood == "bernoulli" else (-math.inf, math.inf)

    def value_range_advice(self) -> str:
        return (
            "the bernoulli likelihood models values in (0, 1): map the data into (0, 1), or use a gaussian "
            'likelihood (likelihood="gaussian" in Python, --model.likelihood gaussian on the command line)'
        )

    def check_sequences(
        self, x: Tensor, lengths: Tensor | None = None, method: str | None = None
    ) -> tuple[Tensor, Tensor]:
        """Validate a padded batch and its lengths; default lengths: non-padding tokens, or all steps.

        Continuous values are checked (NaN or Inf, and the Bernoulli's range on the real steps) as a training
        batch's are (``check_batch``), or, for the input of a public ``method``, always (``check_values``).
        """
        self.require_data()
        name = type(self).__name__
        if self.is_tokens:
            if x.dim() != 2 or x.dtype.is_floating_point:
                raise ValueError(f"{name} expects token ids of shape (B, T) and an integer type, got {tuple(x.shape)}")
            if x.numel() and (x.min() < 0 or x.max() >= len(self.vocabulary)):
                raise ValueError(
                    f"token ids must lie in [0, {len(self.vocabulary)}) (the vocabulary), got {x.min()}..{x.max()}"
                )
            if lengths is None:
                lengths = (x != PAD).sum(1)
        else:
            if x.dim() != 3 or x.shape[2] != self.input_dim:
                raise ValueError(f"{name} expects sequences of shape (B, T, {self.input_dim}), got {tuple(x.shape)}")
            if lengths is None:
                lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
        if lengths.shape != (x.shape[0],) or lengths.numel() and (lengths.min() < 1 or lengths.max() > x.shape[1]):
            raise ValueError(f"lengths must be one value in [1, {x.shape[1]}] per sequence, got {lengths.tolist()}")
        lengths = lengths.to(x.device)
        if not self.is_tokens:  # token ids are checked above
            real_steps = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None])[..., None]  # (B, T, 1)
            if method is None:
                self.check_batch(x, mask=real_steps)
            else:
                self.check_values(x, what=f"the input of {method}", mask=real_steps)
        return x, lengths

    def unpack_batch(self, batch: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """A batch ``(x, lengths)`` (or x alone) -> validated x and lengths."""
        if isinstance(batch, Tensor):
            return self.check_sequences(batch)
        if isinstance(batch, (list, tuple)) and len(batch) in (1, 2):
            return self.check_sequences(batch[0], batch[1] if len(batch) == 2 else None)
        raise TypeError(f"{type(self).__name__} expects batches (x, lengths), got {type(batch).__name__}")

    # -- text: token sequences as lines, with the model's vocabulary ------------------------------------------

    def encode_text(self, lines: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Text lines -> padded ids (B, T) and lengths (B,) on the model's device (unknown tokens: ``<unk>``)."""
        ids, lengths = self._vocabulary().encode_lines(lines)
        return ids.to(self.device), lengths.to(self.device)

    def decode_text(self, ids: Tensor) -> list[str]:
        """Token ids (B, T) -> one string per row, up to its ``<eos>``."""
        return self._vocabulary().decode_rows(ids)

    def sample_text(self, n: int, *, temperature: float = 1.0, max_len: int | None = None) -> list[str]:
        """n sampled lines of text (``sample``)."""
        return self.decode_text(self.sample(n, temperature=temperature, max_len=max_len))

    def interpolate_text(self, start: str, end: str, *, steps: int = 8) -> list[str]:
        """Homotopy between two lines of text: ``steps`` greedy generations from start to end (``interpolate``)."""
        (a, la), (b, lb) = self.encode_text([start]), self.encode_text([end])
        path = self.interpolate(a, b, steps=steps, start_lengths=la, end_lengths=lb)
        return [self.decode_text(ids)[0] for ids in path]

    def _vocabulary(self) -> Vocabulary:
        if self.vocabulary is None:
            raise RuntimeError(f"{type(self).__name__} has no vocabulary (it models continuous sequences or is unfit)")
        return self.vocabulary
