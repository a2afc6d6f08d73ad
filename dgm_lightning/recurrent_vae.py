"""Recurrent (LSTM/GRU) sequence VAE over token sequences or continuous sequences, and its vocabulary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Normal
from torch.nn.utils.rnn import pad_sequence
from torchmetrics import CatMetric, MeanMetric

from dgm_lightning import objectives
from dgm_lightning.base import GenerativeModel
from dgm_lightning.checks import check_non_negative, check_positive, check_positive_int, check_temperature
from dgm_lightning.nets.sequence_nets import Cell, SequenceDecoder, SequenceEncoder
from dgm_lightning.vocabulary import BOS, EOS, PAD, UNK, Level, Vocabulary

DEFAULT_MAX_LEN = 64
SEQUENCE_LIKELIHOODS = ("categorical", "bernoulli", "gaussian", "gaussian_learned")
SequenceLikelihood = Literal["categorical", "bernoulli", "gaussian", "gaussian_learned"]


class RecurrentVAE(GenerativeModel):
    """VAE over sequences with an RNN encoder and an autoregressive RNN decoder initialised from z.

    Token sequences (``likelihood: categorical``): batches are ``(ids, lengths)``, ids (B, T) padded with
    ``<pad>`` (id 0). The decoder reads ``<bos> x_1 .. x_L`` and predicts ``x_1 .. x_L <eos>`` (teacher
    forcing); padding never counts in the loss. The vocabulary is a constructor argument (``vocab``), taken
    from the DataModule in ``setup`` when not given, and stored in the hyperparameters, so a checkpoint
    decodes text on its own. Continuous sequences (``bernoulli``, ``gaussian``, ``gaussian_learned``):
    batches are ``(x, lengths)``, x (B, T, input_dim); the decoder reads ``0, x_1 .. x_{L-1}``. The default
    networks are built once the vocabulary or ``input_dim`` is known: in the constructor, or in ``setup``
    from the DataModule (before the optimizer is made).

    Against posterior collapse: ``beta`` (anneal it with ``ParameterSchedule``, linear or cyclical),
    ``free_bits`` and ``word_dropout`` (decoder inputs replaced by ``<unk>``, or zeroed for continuous data,
    with this probability while training). Logged: ``loss``, ``elbo``, ``reconstruction``, ``kl``, ``mi``
    (an estimate of I(x; z) under q from each batch, at most log of the batch size) per stage;
    ``val/active_units``; for tokens ``{stage}/nll_per_token`` and ``{stage}/ppl`` (from the ELBO in
    validation, from the IWAE estimate in test); ``test/nll`` (IWAE, nats per sequence).

    Args:
        latent_dim: size of z.
        vocab: the tokens, ``<pad> <unk> <bos> <eos>`` first (categorical likelihood); None: from the DataModule.
        vocab_level: how the tokens of ``vocab`` are joined into text: ``char`` (no separator) or ``word``.
        input_dim: features per step of continuous sequences; None: from the DataModule.
        likelihood: ``categorical`` (tokens), ``bernoulli`` (values in (0, 1)), ``gaussian`` (fixed scale
            ``gaussian_scale``) or ``gaussian_learned``.
        value_range: (low, high) of continuous values; the Bernoulli needs (0, 1).
        gaussian_scale: standard deviation of the Gaussian likelihoods (initial value when learned).
        sample_max_len: longest sequence that ``sample`` and ``reconstruct`` generate unless told (tokens, without
            ``<eos>``); None: the DataModule's (its ``max_len`` for text, its sequence length for continuous
            data), else 64. (Named apart from the DataModule's ``max_len``: Lightning refuses to log
            hyperparameters that model and DataModule share with different values.)
        cell: ``lstm`` or ``gru``.
        embedding_dim: token embedding size.
        hidden_dim: RNN hidden size (encoder and decoder).
        num_layers: stacked RNN layers.
        bidirectional: bidirectional encoder.
        word_dropout: probability of dropping a decoder input while training.
        beta: weight of the KL term.
        free_bits: nats per latent dimension below which the KL is not penalised.
        iwae_samples: importance samples for ``test/nll``.
        lr: Adam learning rate.
        compile: compile the networks with torch.compile when training starts (see ``GenerativeModel``).
        encoder: your own encoder: (x, lengths) -> (B, 2 * latent_dim), mean and log-variance.
        decoder: your own decoder: (inputs, z, state=None) -> (per-step parameters (B, T, out), state),
            like ``SequenceDecoder``.

    References: Bowman et al. 2016, arXiv:1511.06349; cyclical annealing, Fu et al. 2019, arXiv:1903.10145;
        free bits, Kingma et al. 2016, arXiv:1606.04934; IWAE bound, Burda et al. 2015, arXiv:1509.00519;
        mutual information and active units as collapse diagnostics, He et al. 2019, arXiv:1901.05534.
    """

    def __init__(
        self,
        latent_dim: int = 16,
        *,
        vocab: Sequence[str] | None = None,
        vocab_level: Level = "char",
        input_dim: int | None = None,
        likelihood: SequenceLikelihood = "categorical",
        value_range: Sequence[float] = (0.0, 1.0),
        gaussian_scale: float = 0.1,
        sample_max_len: int | None = None,
        cell: Cell = "lstm",
        embedding_dim: int = 64,
        hidden_dim: int = 128,
        num_layers: int = 1,
        bidirectional: bool = True,
        word_dropout: float = 0.0,
        beta: float = 1.0,
        free_bits: float = 0.0,
        iwae_samples: int = 50,
        lr: float = 1e-3,
        compile: bool = False,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        objectives.check_choice("likelihood", likelihood, SEQUENCE_LIKELIHOODS)
        check_choice("vocab_level", vocab_level, Level)
        objectives.check_choice("cell", cell, ("lstm", "gru"))
        sizes = dict(latent_dim=latent_dim, embedding_dim=embedding_dim, hidden_dim=hidden_dim, num_layers=num_layers)
        for name, value in dict(
            sizes, iwae_samples=iwae_samples, sample_max_len=1 if sample_max_len is None else sample_max_len
        ).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_positive(gaussian_scale=gaussian_scale, lr=lr)
        if not 0 <= word_dropout < 1:
            raise ValueError(f"word_dropout must be in [0, 1), got {word_dropout}")
        check_non_negative(beta=beta, free_bits=free_bits)
        tokens = likelihood == "categorical"
        if tokens and input_dim is not None:
            raise ValueError("input_dim is for continuous sequences; the categorical likelihood takes a vocab")
        if not tokens and vocab is not None:
            raise ValueError(f"vocab is for token sequences (likelihood categorical), not for {likelihood!r}")
        if input_dim is not None and input_dim <= 0:
            raise ValueError(f"input_dim must be > 0, got {input_dim}")
        super().__init__(
            data_shape=(sample_max_len or DEFAULT_MAX_LEN, 1),
            value_range=value_range,
            num_classes=None,
            compile=compile,
        )
        if likelihood == "bernoulli" and self.value_range != (0.0, 1.0):
            raise ValueError(f"the bernoulli likelihood models values in (0, 1) but value_range is {self.value_range}")
        self.save_hyperparameters(ignore=["encoder", "decoder"])
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.is_tokens = tokens
        self.max_len = sample_max_len  # None until a DataModule tells it
        self.word_dropout = float(word_dropout)
        self.beta = float(beta)
        self.free_bits = float(free_bits)
        self.iwae_samples = iwae_samples
        self.lr = lr
        self.vocabulary: Vocabulary | None = None
        self.input_dim: int | None = None
        self.encoder, self.decoder = encoder, decoder
        self.init_log_scale(likelihood, gaussian_scale)
        self.register_buffer("prior_loc", torch.zeros(latent_dim))
        self.register_buffer("prior_scale", torch.ones(latent_dim))
        self.val_codes = CatMetric()
        # per-token NLL, weighted by token counts and synced across ranks; perplexity is exp of its mean
        self.token_nll = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        if vocab is not None:
            self.set_vocabulary(Vocabulary(tuple(vocab), vocab_level))
        elif input_dim is not None:
            self.set_input_dim(input_dim)

    # -- building --------------------------------------------------------------------------------

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
        h = self.hparams
        inputs = {"vocab_size": feature_dim} if self.is_tokens else {"input_dim": feature_dim}
        shared = dict(embedding_dim=h.embedding_dim, hidden_dim=h.hidden_dim, num_layers=h.num_layers, cell=h.cell)
        if self.encoder is None:
            self.encoder = SequenceEncoder(
                out_dim=2 * self.latent_dim, bidirectional=h.bidirectional, padding_idx=PAD, **inputs, **shared
            )
        if self.decoder is None:
            self.decoder = SequenceDecoder(
                latent_dim=self.latent_dim, out_dim=feature_dim, padding_idx=PAD, **inputs, **shared
            )

    def _require_nets(self) -> None:
        if self.feature_dim is None:
            what = "vocab" if self.is_tokens else "input_dim"
            raise RuntimeError(
                f"{type(self).__name__} does not know its data yet: pass {what}, or fit it with a sequence DataModule"
            )

    def setup(self, stage: str) -> None:
        """Take the vocabulary (or the feature size) from the DataModule, or check that it matches."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            self._require_nets()
            return
        name, data_name = type(self).__name__, type(datamodule).__name__
        vocabulary = getattr(datamodule, "vocabulary", None)
        spec = getattr(datamodule, "data_spec", None)
        if self.max_len is None and spec is not None:
            self.max_len = self.hparams["sample_max_len"] = int(spec.data_shape[0])
            self.data_shape = (self.max_len, self.data_shape[1])
        if self.is_tokens:
            if vocabulary is None:
                raise ValueError(
                    f"{name} with the categorical likelihood models token sequences, but {data_name} has no "
                    "vocabulary; use TextLinesDataModule, or a bernoulli/gaussian likelihood for continuous data"
                )
            if self.vocabulary is None:
                self.set_vocabulary(vocabulary)
            elif vocabulary != self.vocabulary:
                # the model's vocabulary (from its checkpoint) wins: the data is encoded with it
                datamodule.set_vocabulary(self.vocabulary)
            return
        if vocabulary is not None:
            raise ValueError(f"{data_name} yields token sequences: use likelihood categorical, not {self.likelihood!r}")
        if spec is None or len(spec.data_shape) != 2:
            raise ValueError(
                f"{name} needs a sequence DataModule yielding (x, lengths) batches; {data_name} is not one"
            )
        if self.input_dim is None:
            self.set_input_dim(spec.data_shape[1])
        elif spec.data_shape[1] != self.input_dim:
            raise ValueError(
                f"{name} was built for {self.input_dim} features per step but {data_name} yields "
                f"{spec.data_shape[1]}; set --model.input_dim {spec.data_shape[1]}"
            )
        if self.likelihood == "bernoulli" and tuple(spec.value_range) != (0.0, 1.0):
            raise ValueError(f"the bernoulli likelihood needs values in (0, 1), {data_name} yields {spec.value_range}")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("vocab")
        if (
            self.is_tokens
            and saved is not None
            and self.vocabulary is not None
            and tuple(saved) != self.vocabulary.tokens
        ):
            raise ValueError(
                f"the checkpoint's vocabulary ({len(saved)} tokens) differs from this model's "
                f"({len(self.vocabulary)}); build the model from the checkpoint (RecurrentVAE.load_from_checkpoint, "
                "or --ckpt_path on the command line, which reads its hyperparameters)"
            )
        super().on_load_checkpoint(checkpoint)  # the other settings, and the random states

    # -- inputs ----------------------------------------------------------------------------------

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
        self._require_nets()
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

    def encode_text(self, lines: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Text lines -> padded ids (B, T) and lengths (B,), with this model's vocabulary (unknowns: ``<unk>``)."""
        vocabulary = self._vocabulary()
        ids = [torch.tensor(vocabulary.encode(vocabulary.tokenize(line)), dtype=torch.long) for line in lines]
        if not ids or any(len(i) == 0 for i in ids):
            raise ValueError("encode_text needs at least one line, and no empty line")
        return pad_sequence(ids, batch_first=True, padding_value=PAD).to(self.device), torch.tensor(
            [len(i) for i in ids], device=self.device
        )

    def decode_text(self, ids: Tensor) -> list[str]:
        """Token ids (B, T) -> one string per row, up to its ``<eos>``."""
        vocabulary = self._vocabulary()
        return [vocabulary.decode(row) for row in ids.tolist()]

    def _vocabulary(self) -> Vocabulary:
        if self.vocabulary is None:
            raise RuntimeError(f"{type(self).__name__} has no vocabulary (it models continuous sequences or is unfit)")
        return self.vocabulary

    # -- the model -------------------------------------------------------------------------------

    @property
    def prior(self) -> Normal:
        return Normal(self.prior_loc, self.prior_scale, validate_args=False)

    def posterior(self, x: Tensor, lengths: Tensor) -> Normal:
        """q(z | x) with batch shape (B, latent_dim)."""
        out = self.encoder(x, lengths)
        if out.shape != (x.shape[0], 2 * self.latent_dim):
            raise ValueError(f"the encoder must output shape (B, {2 * self.latent_dim}), got {tuple(out.shape)}")
        loc, log_var = out.chunk(2, dim=1)
        return Normal(loc, (0.5 * log_var).exp(), validate_args=False)

    def encode(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Sequences -> posterior means (B, latent_dim)."""
        x, lengths = self.check_sequences(x, lengths, "encode")
        return self.posterior(x, lengths).mean

    def _teacher_forcing(self, x: Tensor, lengths: Tensor, word_dropout: float) -> tuple[Tensor, Tensor, Tensor]:
        """Decoder inputs, targets and the mask of steps that count (B, T'), padding excluded."""
        b, t = x.shape[:2]
        if self.is_tokens:
            steps = torch.arange(t + 1, device=x.device)
            mask = steps[None] <= lengths[:, None]  # x_1 .. x_L and <eos>
            targets = torch.cat([x, x.new_full((b, 1), PAD)], 1)
            targets = torch.where(steps[None] == lengths[:, None], EOS, targets)
            inputs = torch.cat([x.new_full((b, 1), BOS), x], 1)
            if word_dropout > 0:
                drop = torch.rand(inputs.shape, device=x.device) < word_dropout
                drop[:, 0] = False  # <bos> always stays
                inputs = torch.where(drop, UNK, inputs)
            return inputs, targets, mask
        mask = torch.arange(t, device=x.device)[None] < lengths[:, None]
        inputs = torch.cat([x.new_zeros(b, 1, x.shape[2]), x[:, :-1]], 1)  # zeros stand for <bos>
        if word_dropout > 0:
            keep = torch.rand(b, t, 1, device=x.device) >= word_dropout
            inputs = inputs * keep
        return inputs, x, mask

    def step_log_prob(self, params: Tensor, targets: Tensor) -> Tensor:
        """log p(target_t | ...) per step (B, T) from decoder outputs (B, T, out)."""
        if self.is_tokens:
            return Categorical(logits=params, validate_args=False).log_prob(targets)
        dist = objectives.reconstruction_distribution(self.likelihood, params.flatten(0, 1), log_scale=self.log_scale)
        return dist.log_prob(targets.flatten(0, 1)).view(targets.shape[:2])

    def reconstruction_log_prob(self, x: Tensor, lengths: Tensor, z: Tensor, word_dropout: float = 0.0) -> Tensor:
        """log p(x | z) per sequence (B,), summed over the real steps only."""
        inputs, targets, mask = self._teacher_forcing(x, lengths, word_dropout)
        params, _ = self.decoder(inputs, z)
        return torch.where(mask, self.step_log_prob(params, targets), 0.0).sum(1)

    def num_targets(self, lengths: Tensor) -> Tensor:
        """Predicted steps per sequence: tokens and <eos>, or the steps of a continuous sequence."""
        return lengths + 1 if self.is_tokens else lengths

    def loss_terms(self, x: Tensor, lengths: Tensor) -> tuple[dict[str, Tensor], Normal]:
        """Named scalar terms (``loss`` is minimised) and the posterior of the batch."""
        q = self.posterior(x, lengths)
        dropout = self.word_dropout if self.training else 0.0
        reconstruction = self.reconstruction_log_prob(x, lengths, q.rsample(), dropout)  # (B,)
        kl = objectives.gaussian_kl(q, self.prior)  # (B, latent_dim)
        terms = objectives.elbo_terms(reconstruction, kl, beta=self.beta, free_bits=self.free_bits)
        if not self.training and x.shape[0] > 1:  # a diagnostic, in validation and test
            terms["mi"] = objectives.mutual_information(q)
        return terms, q

    @torch.no_grad()
    def log_prob(self, x: Tensor, lengths: Tensor | None = None, *, num_samples: int = 50) -> Tensor:
        """Importance-weighted estimate of log p(x) per sequence in nats (B,); decodes B * num_samples at once."""
        check_positive_int(num_samples=num_samples)
        x, lengths = self.check_sequences(x, lengths, "log_prob")
        q = self.posterior(x, lengths)
        z = q.sample((num_samples,))  # (K, B, D)
        log_w = self.prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        repeats = (num_samples,) + (1,) * (x.dim() - 1)
        log_px = self.reconstruction_log_prob(x.repeat(*repeats), lengths.repeat(num_samples), z.flatten(0, 1))
        return objectives.iwae_bound(log_w + log_px.view(num_samples, -1))

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, z: Tensor, *, max_len: int | None = None, temperature: float = 0.0) -> Tensor:
        """Generate from codes (B, latent_dim), feeding each output back in.

        Tokens: ids (B, T <= max_len) ending in ``<eos>`` and then padding (a row with no ``<eos>`` ran to
        max_len); ``temperature`` divides the logits, 0 picks the most likely token (greedy).
        Continuous: (B, max_len, input_dim); 0 takes the mean of each step, above 0 samples it (the Gaussian
        noise scaled by the temperature).
        """
        self._require_nets()
        self.check_codes(z, "decode")
        max_len = (self.max_len or DEFAULT_MAX_LEN) if max_len is None else max_len
        if not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        check_temperature(temperature)
        n = z.shape[0]
        state = None
        if self.is_tokens:
            inputs = torch.full((n, 1), BOS, device=z.device)
            out = torch.full((n, max_len + 1), PAD, device=z.device)  # room for <eos> after max_len tokens
            done = torch.zeros(n, dtype=torch.bool, device=z.device)
            for t in range(max_len + 1):
                logits, state = self.decoder(inputs, z, state)
                logits = logits[:, -1].clone()
                logits[:, [PAD, BOS]] = -torch.inf  # never generated: they are no targets
                if t == max_len:
                    token = torch.full_like(done, EOS, dtype=torch.long)
                elif temperature == 0:
                    token = logits.argmax(-1)
                else:
                    token = Categorical(logits=logits / temperature).sample()
                out[:, t] = torch.where(done, PAD, token)
                done |= token == EOS
                # every row has ended: stop early, except while torch.export traces (it has no values to test;
                # the exported generation returns max_len + 1 steps, padded after each <eos>)
                if not torch.compiler.is_exporting() and done.all():
                    return out[:, : t + 1]
                inputs = token[:, None]
            return out
        inputs = z.new_zeros(n, 1, self.input_dim)
        steps = []
        for _ in range(max_len):
            params, state = self.decoder(inputs, z, state)
            params = params[:, -1]
            if self.likelihood == "bernoulli":
                x_t = (
                    torch.sigmoid(params) if temperature == 0 else torch.bernoulli(torch.sigmoid(params / temperature))
                )
            else:
                x_t = params + temperature * self.log_scale.exp() * torch.randn_like(params)
            steps.append(x_t)
            inputs = x_t[:, None]
        return torch.stack(steps, 1)

    @torch.no_grad()
    def sample(
        self, n: int, *, labels: Tensor | None = None, temperature: float = 1.0, max_len: int | None = None
    ) -> Tensor:
        """n sequences decoded from z ~ N(0, I); ``temperature`` as in ``decode`` (0: greedy)."""
        check_positive_int(n=n)
        self.check_labels(labels, n)  # an unconditional model: refuses labels
        return self.decode(
            torch.randn(n, self.latent_dim, device=self.device), max_len=max_len, temperature=temperature
        )

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of the standard normal noise of one sample (``from_noise``): (latent_dim,)."""
        return (self.latent_dim,)

    def from_noise(self, noise: Tensor) -> Tensor:
        """Sequences from standard normal noise (B, latent_dim), which is z under the N(0, I) prior, decoded greedily
        (``decode`` at temperature 0, to the model's ``max_len``): an exported sampler (``dgm_lightning.export``)
        is this map."""
        return self.decode(noise, temperature=0.0)

    def sample_text(self, n: int, *, temperature: float = 1.0, max_len: int | None = None) -> list[str]:
        """n sampled lines of text."""
        return self.decode_text(self.sample(n, temperature=temperature, max_len=max_len))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, lengths: Tensor | None = None, *, temperature: float = 0.0) -> Tensor:
        """Decode the posterior means of x (continuous sequences keep their length T)."""
        x, lengths = self.check_sequences(x, lengths, "reconstruct")
        max_len = None if self.is_tokens else x.shape[1]
        return self.decode(self.posterior(x, lengths).mean, max_len=max_len, temperature=temperature)

    @torch.no_grad()
    def interpolate(
        self, start: Tensor, end: Tensor, *, steps: int = 8, start_lengths: Tensor | None = None,
        end_lengths: Tensor | None = None, max_len: int | None = None,
    ) -> list[Tensor]:  # fmt: skip
        """Homotopy: greedy decodings of ``steps`` points on the line between the codes of start and end.

        Returns one decoded batch per point, from start (first) to end (last).
        """
        check_positive_int(steps=steps)
        z0, z1 = self.encode(start, start_lengths), self.encode(end, end_lengths)
        if z0.shape != z1.shape:
            raise ValueError(f"start and end must hold as many sequences, got {z0.shape[0]} and {z1.shape[0]}")
        if max_len is None and not self.is_tokens:
            max_len = start.shape[1]
        return [self.decode(torch.lerp(z0, z1, t), max_len=max_len) for t in torch.linspace(0, 1, steps).tolist()]

    def interpolate_text(self, start: str, end: str, *, steps: int = 8) -> list[str]:
        """Homotopy between two lines of text: ``steps`` greedy decodings from start to end."""
        (a, la), (b, lb) = self.encode_text([start]), self.encode_text([end])
        return [
            self.decode_text(ids)[0] for ids in self.interpolate(a, b, steps=steps, start_lengths=la, end_lengths=lb)
        ]

    # -- Lightning hooks -------------------------------------------------------------------------

    def _shared_step(self, batch: Any, stage: str) -> dict[str, Tensor] | None:
        x, lengths = self.unpack_batch(batch)
        terms, q = self.loss_terms(x, lengths)
        if stage == "train" and self.skip_nonfinite(terms):
            return None
        self.log_terms(terms, stage, batch_size=x.shape[0])
        if stage == "val":
            self.val_codes.update(q.mean.detach())
            if self.is_tokens:
                # the ELBO bounds the NLL: per token, this is an upper bound on the validation perplexity's log
                count = self.num_targets(lengths).sum()
                self.token_nll["val"].update(-terms["elbo"].detach() * x.shape[0] / count, weight=count)
        return terms

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        terms = self._shared_step(batch, "train")
        return None if terms is None else terms["loss"]  # None: Lightning skips the optimizer step

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, lengths = self.unpack_batch(batch)
        self._shared_step((x, lengths), "test")
        nll = -self.log_prob(x, lengths, num_samples=self.iwae_samples)  # (B,)
        self.log_terms({"nll": nll.mean()}, "test", batch_size=x.shape[0])
        if self.is_tokens:
            count = self.num_targets(lengths).sum()
            self.token_nll["test"].update(nll.sum() / count, weight=count)

    def _log_token_metrics(self, stage: str) -> None:
        metric = self.token_nll[stage]
        if self.is_tokens and metric.update_called:
            per_token = metric.compute()
            self.log_dict({f"{stage}/nll_per_token": per_token, f"{stage}/ppl": per_token.exp()})
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.val_codes.update_called:
            codes = self.val_codes.compute()  # gathered from all ranks, so every rank logs the same value
            if codes.shape[0] >= 2:
                self.log("val/active_units", objectives.active_units(codes).float(), sync_dist=True)
        self.val_codes.reset()
        self._log_token_metrics("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_token_metrics("test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Inputs, their reconstructions and as many samples: text lines for tokens, tensors otherwise."""
        x, lengths = self.unpack_batch(batch)
        reconstructions, samples = self.reconstruct(x, lengths), self.sample(x.shape[0])
        if self.is_tokens:
            inputs = [self.vocabulary.decode(row[:n]) for row, n in zip(x.tolist(), lengths.tolist(), strict=True)]
            return {
                "inputs": inputs,
                "reconstructions": self.decode_text(reconstructions),
                "samples": self.decode_text(samples),
            }
        return {"inputs": x, "reconstructions": reconstructions, "samples": samples}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
