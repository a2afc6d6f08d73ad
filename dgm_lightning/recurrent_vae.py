"""Recurrent (LSTM/GRU) sequence VAE over token sequences or continuous sequences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Normal, kl_divergence
from torchmetrics import CatMetric, MeanMetric
from typing_extensions import override

from dgm_lightning import objectives
from dgm_lightning.checks import (
    check_choice,
    check_fraction,
    check_hidden_dims,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_temperature,
)
from dgm_lightning.nets.sequence_nets import (
    Cell,
    SequenceDecoder,
    SequenceEncoder,
    generate_tokens,
    generate_values,
    teacher_forcing,
)
from dgm_lightning.objectives import Objective
from dgm_lightning.optimizers import check_injected
from dgm_lightning.posteriors import (
    Posterior,
    check_posterior,
    latent_log_prob,
    own_prior,
    posterior_code,
    posterior_distribution,
    posterior_out_dim,
    sphere_from_noise,
)
from dgm_lightning.sequence_model import DEFAULT_MAX_LEN, SequenceModel
from dgm_lightning.vae_checks import check_posterior_settings
from dgm_lightning.vocabulary import PAD, Level, Vocabulary

SequenceLikelihood = Literal["categorical", "bernoulli", "gaussian", "gaussian_learned"]
RecurrentObjective = Literal["elbo", "iwae"]


@dataclass
class SequenceObjective(Objective):
    """An ``Objective`` with the batch's number of predicted steps, the weight of its per-token NLL.

    Args:
        terms, batch_size, codes: as ``Objective``.
        num_targets: predicted steps of the batch's sequences, summed: their tokens and ``<eos>``, or their steps
            (continuous sequences).
    """

    num_targets: Tensor | None = None


class RecurrentVAE(SequenceModel):
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
        embedding_dim: size of the token embeddings (token sequences; continuous steps enter the RNNs as they are).
        hidden_dims: one width per stacked RNN layer, from the input up, in the encoder and the decoder.
        bidirectional: bidirectional encoder.
        word_dropout: probability of dropping a decoder input while training.
        posterior: the latent geometry, as in ``VAE`` (``dgm_lightning.posteriors``): ``gaussian`` (standard normal
            prior) or, codes on the unit sphere in latent_dim dimensions with the uniform prior on it,
            ``power_spherical`` or ``von_mises_fisher`` (not with free bits; ``mi`` is logged for the Gaussian
            only). ``sample`` then draws the uniform prior at any temperature above 0.
        objective: ``elbo`` (the beta-ELBO) or ``iwae``, the importance-weighted bound with ``training_samples``
            samples per sequence as the training objective (Burda et al. 2015; as in ``VAE``, and logged beside
            the ``elbo``).
        training_samples: importance samples per sequence of the ``iwae`` objective (> 1).
        beta: weight of the KL term.
        free_bits: nats per latent dimension below which the KL is not penalised (``elbo`` only).
        iwae_samples: importance samples for ``test/nll``.
        iwae_chunk_size: importance samples decoded at once by ``log_prob`` and ``test/nll`` (see ``VAE``).
        optimizer: builds the optimizer from the parameters (None: Adam with lr 1e-3); on the command line
            ``--model.optimizer AdamW --model.optimizer.lr 3e-4``.
        lr_scheduler: builds a learning-rate scheduler from the optimizer, stepped once per epoch (None: a constant
            rate); e.g. ``--model.lr_scheduler CosineAnnealingLR --model.lr_scheduler.T_max 50``.
        compile: compile the networks with torch.compile when training starts (see ``GenerativeModel``).
        encoder: your own encoder: (x, lengths) -> (B, 2 * latent_dim), mean and log-variance (a hyperspherical
            posterior: (B, latent_dim + 1), direction and concentration).
        decoder: your own decoder: (inputs, z, state=None) -> (per-step parameters (B, T, out), state),
            like ``SequenceDecoder``.

    References: Bowman et al. 2016, arXiv:1511.06349; cyclical annealing, Fu et al. 2019, arXiv:1903.10145;
        free bits, Kingma et al. 2016, arXiv:1606.04934; IWAE bound, Burda et al. 2015, arXiv:1509.00519;
        hyperspherical latents, Davidson et al. 2018, arXiv:1804.00891, De Cao & Aziz 2020, arXiv:2006.04437;
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
        hidden_dims: Sequence[int] = (128,),
        bidirectional: bool = True,
        word_dropout: float = 0.0,
        beta: float = 1.0,
        free_bits: float = 0.0,
        posterior: Posterior = "gaussian",
        objective: RecurrentObjective = "elbo",
        training_samples: int = 1,
        iwae_samples: int = 50,
        iwae_chunk_size: int = 10,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        check_choice("likelihood", likelihood, SequenceLikelihood)
        check_choice("vocab_level", vocab_level, Level)
        check_choice("cell", cell, Cell)
        check_positive_int(
            latent_dim=latent_dim,
            embedding_dim=embedding_dim,
            iwae_samples=iwae_samples,
            iwae_chunk_size=iwae_chunk_size,
        )
        check_positive_int(input_dim=input_dim, sample_max_len=sample_max_len)
        check_hidden_dims(hidden_dims, layer="RNN layer")
        check_positive(gaussian_scale=gaussian_scale)
        check_fraction(word_dropout=word_dropout)
        check_non_negative(beta=beta, free_bits=free_bits)
        check_injected(optimizer=optimizer, lr_scheduler=lr_scheduler)
        _check_data_kind(likelihood, vocab, input_dim)
        _check_objective(objective, training_samples=training_samples, free_bits=free_bits)
        check_posterior(posterior, latent_dim)
        check_posterior_settings(posterior, objective=objective, free_bits=free_bits)
        super().__init__(likelihood=likelihood, value_range=value_range, sample_max_len=sample_max_len, compile=compile)
        if likelihood == "bernoulli" and self.value_range != (0.0, 1.0):
            raise ValueError(f"the bernoulli likelihood models values in (0, 1) but value_range is {self.value_range}")
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer", "lr_scheduler"])
        self.latent_dim, self.posterior_name = latent_dim, posterior
        self.word_dropout, self.beta, self.free_bits = float(word_dropout), float(beta), float(free_bits)
        self.iwae_samples, self.iwae_chunk_size = iwae_samples, iwae_chunk_size
        self.objective_name, self.training_samples = objective, training_samples  # not self.objective: the method
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
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

    def build_networks(self, feature_dim: int) -> None:
        """The default encoder and decoder, those not injected, for a vocabulary size or features per step."""
        h = self.hparams
        inputs = {"vocab_size": feature_dim} if self.is_tokens else {"input_dim": feature_dim}
        shared = dict(embedding_dim=h.embedding_dim, hidden_dims=h.hidden_dims, cell=h.cell, padding_idx=PAD)
        if self.encoder is None:
            self.encoder = SequenceEncoder(
                out_dim=posterior_out_dim(self.posterior_name, self.latent_dim),
                bidirectional=h.bidirectional,
                **inputs,
                **shared,
            )
        if self.decoder is None:
            self.decoder = SequenceDecoder(latent_dim=self.latent_dim, out_dim=feature_dim, **inputs, **shared)

    # -- the model -------------------------------------------------------------------------------

    @property
    def prior(self) -> Distribution:
        """p(z): the posterior's own prior (standard normal, or uniform on the sphere)."""
        return own_prior(self.posterior_name, self.prior_loc, self.prior_scale)

    def posterior(self, x: Tensor, lengths: Tensor) -> Distribution:
        """q(z | x): a Normal with batch shape (B, latent_dim), or a hyperspherical distribution (batch (B,))."""
        out = self.encoder(x, lengths)
        out_dim = posterior_out_dim(self.posterior_name, self.latent_dim)
        if out.shape != (x.shape[0], out_dim):
            raise ValueError(
                f"the encoder must output shape (B, {out_dim}) for the {self.posterior_name} posterior with "
                f"latent_dim={self.latent_dim}, got {tuple(out.shape)}"
            )
        return posterior_distribution(self.posterior_name, out)

    def encode(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Sequences -> posterior means (B, latent_dim); on the sphere, the mean direction."""
        x, lengths = self.check_sequences(x, lengths, "encode")
        return posterior_code(self.posterior(x, lengths))

    def step_log_prob(self, params: Tensor, targets: Tensor) -> Tensor:
        """log p(target_t | ...) per step (B, T) from decoder outputs (B, T, out)."""
        if self.is_tokens:
            return Categorical(logits=params, validate_args=False).log_prob(targets)
        dist = objectives.reconstruction_distribution(self.likelihood, params.flatten(0, 1), log_scale=self.log_scale)
        return dist.log_prob(targets.flatten(0, 1)).view(targets.shape[:2])

    def reconstruction_log_prob(self, x: Tensor, lengths: Tensor, z: Tensor, word_dropout: float = 0.0) -> Tensor:
        """log p(x | z) per sequence (B,), summed over the real steps only."""
        inputs, targets, mask = teacher_forcing(x, lengths, tokens=self.is_tokens, word_dropout=word_dropout)
        params, _ = self.decoder(inputs, z)
        return torch.where(mask, self.step_log_prob(params, targets), 0.0).sum(1)

    def num_targets(self, lengths: Tensor) -> Tensor:
        """Predicted steps per sequence: tokens and <eos>, or the steps of a continuous sequence."""
        return lengths + 1 if self.is_tokens else lengths

    def objective(self, batch: Tensor | Sequence[Tensor]) -> SequenceObjective:
        """The negative ELBO (``loss``, with ``beta``, ``free_bits`` and, in training, ``word_dropout``) or IWAE bound
        (``objective``), its terms and in evaluation ``mi``, on a batch ``(x, lengths)``; with the batch's codes and
        predicted steps."""
        x, lengths = self.unpack_batch(batch)
        q = self.posterior(x, lengths)
        dropout = self.word_dropout if self.training else 0.0
        if self.objective_name == "iwae":
            log_weights = self.log_weights(x, lengths, self.training_samples, q=q, word_dropout=dropout)
            terms = objectives.iwae_terms(*log_weights, beta=self.beta)
        else:
            reconstruction = self.reconstruction_log_prob(x, lengths, q.rsample(), dropout)  # (B,)
            kl = kl_divergence(q, self.prior)  # (B, latent_dim); (B,) on the sphere
            terms = objectives.elbo_terms(reconstruction, kl, beta=self.beta, free_bits=self.free_bits)
        if not self.training and x.shape[0] > 1 and isinstance(q, Normal):  # a diagnostic, in validation and test
            terms["mi"] = objectives.mutual_information(q)
        return SequenceObjective(
            terms, batch_size=x.shape[0], codes=posterior_code(q).detach(), num_targets=self.num_targets(lengths).sum()
        )

    def log_prob(self, x: Tensor, lengths: Tensor | None = None, *, num_samples: int = 50) -> Tensor:
        """log p(x) per sequence in nats (B,): exact for flows, an importance-weighted (IWAE) estimate for
        latent-variable models such as this one (with ``num_samples`` posterior samples, a lower bound that tightens
        as they grow); differentiable, so wrap it in ``torch.no_grad()`` to evaluate.

        Decodes B * ``iwae_chunk_size`` sequences at once.
        """
        check_positive_int(num_samples=num_samples)
        x, lengths = self.check_sequences(x, lengths, "log_prob")
        draw = lambda k: self.log_weights(x, lengths, k)  # noqa: E731
        return objectives.iwae_bound(objectives.chunked_log_weights(draw, num_samples, self.iwae_chunk_size))

    def log_weights(
        self, x: Tensor, lengths: Tensor, num_samples: int, *, q: Distribution | None = None, word_dropout: float = 0.0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """log p(x | z_k), log p(z_k) and log q(z_k | x) for ``num_samples`` reparameterised draws z_k from the
        posterior q (computed here unless given), each (num_samples, B); decodes B * num_samples sequences."""
        q = self.posterior(x, lengths) if q is None else q
        z = q.rsample((num_samples,))  # (K, B, D); reparameterised, so the estimate is differentiable
        repeats = (num_samples,) + (1,) * (x.dim() - 1)
        log_px = self.reconstruction_log_prob(
            x.repeat(*repeats), lengths.repeat(num_samples), z.flatten(0, 1), word_dropout
        )  # fmt: skip
        return log_px.view(num_samples, -1), latent_log_prob(self.prior, z), latent_log_prob(q, z)

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, z: Tensor, *, max_len: int | None = None, temperature: float = 0.0) -> Tensor:
        """Sequences generated from codes (B, latent_dim), feeding each output back in (``generate_tokens``,
        ``generate_values`` in ``dgm_lightning.nets.sequence_nets``, with this model's decoder).

        Tokens: ids (B, T <= max_len + 1) ending in ``<eos>`` and then padding; ``temperature`` divides the logits,
        0 picks the most likely token (greedy). Continuous: (B, max_len, input_dim); 0 takes the mean of each step,
        above 0 samples it (``draw_step``).

        Args:
            z: the codes.
            max_len: most tokens before ``<eos>``, or steps; None: the model's (``sample_max_len``).
            temperature: 0 for the greedy or mean sequence, 1 for the model's distribution.
        """
        self.require_data()
        self.check_codes(z, "generate")
        max_len = (self.max_len or DEFAULT_MAX_LEN) if max_len is None else max_len
        check_positive_int(max_len=max_len)
        check_temperature(temperature)
        if self.is_tokens:
            return generate_tokens(self.decoder, z, max_len=max_len, temperature=temperature)
        draw = partial(self.draw_step, temperature=temperature)
        return generate_values(self.decoder, z, input_dim=self.input_dim, max_len=max_len, draw=draw)

    def draw_step(self, params: Tensor, temperature: float) -> Tensor:
        """The values of one generated step of a continuous sequence from the decoder's parameters (B, input_dim):
        the likelihood's mean at temperature 0, else a sample (the Bernoulli's logits divided by the temperature,
        the Gaussian's noise scaled by it)."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(params) if temperature == 0 else torch.bernoulli(torch.sigmoid(params / temperature))
        return params if temperature == 0 else params + temperature * self.log_scale.exp() * torch.randn_like(params)

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, max_len: int | None = None) -> Tensor:
        """n sequences generated from z ~ N(0, temperature^2 I) (on the sphere: its direction, uniform), at that
        temperature (``generate``): 1 samples the model, 0 gives its mode's greedy sequence (z = 0; on the sphere the
        code e1), the same every time. An unconditional model: it takes no labels."""
        noise = self.draw_noise(n, temperature)  # checks n and the temperature
        return self.generate(self.latent_from_noise(noise), max_len=max_len, temperature=temperature)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of the standard normal noise of one sample (``from_noise``): (latent_dim,)."""
        return (self.latent_dim,)

    def latent_from_noise(self, noise: Tensor) -> Tensor:
        """Codes from standard normal noise (B, latent_dim): the noise itself under the N(0, I) prior, its direction
        under the uniform prior on the sphere (e1 for zero noise)."""
        return noise if self.posterior_name == "gaussian" else sphere_from_noise(noise)

    def from_noise(self, noise: Tensor) -> Tensor:
        """Sequences from standard normal noise (B, latent_dim), through the prior's codes (``latent_from_noise``),
        generated greedily (``generate`` at temperature 0, to the model's ``max_len``): an exported sampler
        (``dgm_lightning.export``) is this map."""
        return self.generate(self.latent_from_noise(noise), temperature=0.0)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, lengths: Tensor | None = None, *, temperature: float = 0.0) -> Tensor:
        """Generate from the posterior means of x (continuous sequences keep their length T)."""
        x, lengths = self.check_sequences(x, lengths, "reconstruct")
        max_len = None if self.is_tokens else x.shape[1]
        return self.generate(posterior_code(self.posterior(x, lengths)), max_len=max_len, temperature=temperature)

    @torch.no_grad()
    def interpolate(
        self, start: Tensor, end: Tensor, *, steps: int = 8, start_lengths: Tensor | None = None,
        end_lengths: Tensor | None = None, max_len: int | None = None,
    ) -> list[Tensor]:  # fmt: skip
        """Homotopy: greedy generations from ``steps`` points on the line between the codes of start and end.

        Returns one generated batch per point, from start (first) to end (last).
        """
        check_positive_int(steps=steps)
        z0, z1 = self.encode(start, start_lengths), self.encode(end, end_lengths)
        if z0.shape != z1.shape:
            raise ValueError(f"start and end must hold as many sequences, got {z0.shape[0]} and {z1.shape[0]}")
        if max_len is None and not self.is_tokens:
            max_len = start.shape[1]
        points = [self.latent_from_noise(torch.lerp(z0, z1, t)) for t in torch.linspace(0, 1, steps).tolist()]
        return [self.generate(z, max_len=max_len) for z in points]

    # -- Lightning hooks -------------------------------------------------------------------------

    def on_objective(self, objective: SequenceObjective, stage: str) -> None:
        if stage != "val":
            return
        self.val_codes.update(objective.codes)
        if self.is_tokens:
            # the ELBO bounds the NLL: per token, this is an upper bound on the validation perplexity's log
            count = objective.num_targets
            self.token_nll["val"].update(-objective.terms["elbo"].detach() * objective.batch_size / count, weight=count)

    @override
    def test_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)  # the objective's terms
        x, lengths = self.unpack_batch(batch)
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

    @override
    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.val_codes.update_called:
            codes = self.val_codes.compute()  # gathered from all ranks, so every rank logs the same value
            if codes.shape[0] >= 2:
                self.log("val/active_units", objectives.active_units(codes).float(), sync_dist=True)
        self.val_codes.reset()
        self._log_token_metrics("val")

    @override
    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_token_metrics("test")

    @override
    def predict_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> dict[str, Any]:
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


def _check_data_kind(likelihood: str, vocab: Sequence[str] | None, input_dim: int | None) -> None:
    """Refuse a vocabulary for continuous sequences and features per step for tokens."""
    if likelihood == "categorical" and input_dim is not None:
        raise ValueError("input_dim is for continuous sequences; the categorical likelihood takes a vocab")
    if likelihood != "categorical" and vocab is not None:
        raise ValueError(f"vocab is for token sequences (likelihood categorical), not for {likelihood!r}")


def _check_objective(objective: str, *, training_samples: int, free_bits: float) -> None:
    """Refuse an objective's settings that it would ignore, or that make it another objective."""
    check_choice("objective", objective, RecurrentObjective)
    check_positive_int(training_samples=training_samples)
    if objective == "iwae" and training_samples == 1:
        raise ValueError(
            "the iwae objective with training_samples=1 is the ELBO: give it more importance samples per sequence, "
            "such as training_samples=5 (--model.training_samples 5)"
        )
    if objective == "elbo" and training_samples != 1:
        raise ValueError("training_samples applies to the iwae objective, not to 'elbo': leave it out")
    if objective == "iwae" and free_bits:
        raise ValueError("free_bits applies to the elbo objective, not to 'iwae': leave it out")
