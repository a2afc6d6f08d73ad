"""RecurrentVAE: padding invariance, decoding, collapse countermeasures, metrics, checkpoints, bad input, DDP."""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import random
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.distributions import Normal
from torch.nn.utils.rnn import pack_padded_sequence

from callbacks import ParameterSchedule, TextLogger, run_dir
from datamodules import SequentialImageDataModule, TextLinesDataModule
from datamodules.sequences import pad_batch
from dgm_lightning import RecurrentVAE, Vocabulary, objectives
from dgm_lightning.cli import main
from dgm_lightning.nets import SequenceDecoder, SequenceEncoder
from dgm_lightning.nets.sequence_nets import teacher_forcing
from dgm_lightning.vocabulary import BOS, EOS, PAD, SPECIALS, UNK
from tests.helpers import trainer, wandb_history_keys, wandb_records

REPO = Path(__file__).resolve().parent.parent
TINY = dict(latent_dim=4, embedding_dim=8, hidden_dims=(16,))
VOCAB = SPECIALS + tuple("abcde ")
WORDS = ["red", "blue", "green", "small", "big", "old", "new", "cat", "dog", "fox", "owl", "bee"]


def write_corpus(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Lines of 2-4 words drawn independently: only a latent code can tell the decoder which words come."""
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) for _ in range(n)) + "\n")
    return path


def token_model(**kwargs) -> RecurrentVAE:
    return RecurrentVAE(vocab=VOCAB, **{**TINY, **kwargs})


def random_tokens(lengths: list[int], pad_to: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(len(SPECIALS), len(VOCAB), (n,), generator=generator) for n in lengths]
    x, lens = pad_batch(seqs)
    if pad_to is not None:
        x = torch.cat([x, x.new_full((x.shape[0], pad_to - x.shape[1]), PAD)], 1)
    return x, lens


# -- padding and variable lengths ---------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padding_does_not_change_the_loss_of_a_sequence(cell):
    model = token_model(cell=cell).eval()
    x, lengths = random_tokens([3, 7, 5])
    wide, _ = random_tokens([3, 7, 5], pad_to=12)
    terms = []
    for batch in (x, wide):
        torch.manual_seed(1)  # the same posterior noise for both
        terms.append(model.objective((batch, lengths)).terms)
    for name in terms[0]:
        torch.testing.assert_close(terms[0][name], terms[1][name], rtol=1e-5, atol=1e-5)
    # a sequence alone and padded inside a batch of longer ones: the same posterior and likelihood
    z = torch.randn(3, 4)
    in_batch = model.reconstruction_log_prob(x, lengths, z)
    alone = model.reconstruction_log_prob(x[:1, :3], lengths[:1], z[:1])
    torch.testing.assert_close(in_batch[:1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encode(x)[:1], model.encode(x[:1, :3]), rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_the_likelihood_of_a_continuous_sequence():
    model = RecurrentVAE(likelihood="gaussian", input_dim=3, **TINY).eval()
    x = torch.randn(2, 6, 3)
    lengths = torch.tensor([4, 6])
    noisy = x.clone()
    noisy[0, 4:] = 100.0  # whatever lies beyond a sequence's length must not matter
    z = torch.randn(2, 4)
    torch.testing.assert_close(
        model.reconstruction_log_prob(x, lengths, z), model.reconstruction_log_prob(noisy, lengths, z)
    )
    torch.testing.assert_close(model.encode(x, lengths), model.encode(noisy, lengths))


def test_teacher_forcing_targets_end_in_eos_and_word_dropout_spares_bos():
    x, lengths = random_tokens([2, 4])
    inputs, targets, mask = teacher_forcing(x, lengths, tokens=True)
    assert inputs[:, 0].eq(BOS).all() and torch.equal(inputs[:, 1:], x)
    assert targets[0, :3].tolist() == [*x[0, :2].tolist(), EOS] and targets[1, 4] == EOS
    assert mask.sum(1).tolist() == [3, 5]  # the tokens and <eos>; padding never counts
    dropped, _, _ = teacher_forcing(x.repeat(200, 1), lengths.repeat(200), tokens=True, word_dropout=0.5)
    assert dropped[:, 0].eq(BOS).all()
    share = dropped[:, 1:].eq(UNK).float().mean().item()
    assert 0.4 < share < 0.6, share


def decoder_inputs(model: RecurrentVAE, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """What the decoder reads when the model computes its loss on (x, lengths)."""
    seen = []
    hook = model.decoder.register_forward_hook(lambda module, args, output: seen.append(args[0].detach()))
    try:
        model.objective((x, lengths))
    finally:
        hook.remove()
    (inputs,) = seen
    return inputs


def test_word_dropout_zeroes_whole_steps_of_continuous_sequences_while_training_only():
    # continuous inputs have no <unk>: a dropped step is all zeros, what the first step reads in place of <bos>
    model = RecurrentVAE(likelihood="gaussian", input_dim=3, word_dropout=0.3, **TINY)
    x = 0.5 + torch.rand(500, 6, 3)  # no value is 0, so that a zero can only be a dropped step
    lengths = torch.full((500,), 6)
    shifted = torch.cat([torch.zeros(500, 1, 3), x[:, :-1]], 1)  # 0, x_1 .. x_{T-1}
    inputs = decoder_inputs(model.train(), x, lengths)
    assert inputs[:, 0].eq(0).all()
    dropped = inputs[:, 1:].eq(0).all(-1)  # (B, T - 1)
    # every step is either dropped as a whole or passed on unchanged
    assert torch.equal(inputs[:, 1:][~dropped], shifted[:, 1:][~dropped])
    assert inputs[:, 1:].eq(0).any(-1).equal(dropped)
    # at the configured rate (2500 steps: a standard deviation of 0.009), independently of the position
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.04)
    assert dropped.float().mean(0).sub(0.3).abs().max() < 0.08
    # evaluation reads the sequence itself
    assert torch.equal(decoder_inputs(model.eval(), x, lengths), shifted)


def test_word_dropout_replaces_token_inputs_by_unk_while_training_only():
    model = token_model(word_dropout=0.3)
    x, lengths = random_tokens([5] * 400)
    inputs = decoder_inputs(model.train(), x, lengths)
    assert inputs[:, 0].eq(BOS).all()
    dropped = inputs[:, 1:].eq(UNK)
    assert torch.equal(inputs[:, 1:][~dropped], x[~dropped])
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.04)
    assert torch.equal(decoder_inputs(model.eval(), x, lengths)[:, 1:], x)


@pytest.mark.parametrize(
    "kwargs",
    [{"vocab": VOCAB}, {"likelihood": "gaussian_learned", "input_dim": 3, "cell": "gru", "hidden_dims": (16, 8)}],
    ids=["tokens-lstm", "continuous-gru"],
)
def test_every_parameter_receives_a_gradient(kwargs):
    model = RecurrentVAE(**{**TINY, **kwargs}, word_dropout=0.3)
    x, lengths = random_tokens([3, 6, 4]) if "vocab" in kwargs else (torch.randn(3, 6, 3), torch.tensor([3, 6, 4]))
    model.objective((x, lengths)).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_injected_networks_are_used_and_not_stored_as_hyperparameters():
    encoder = SequenceEncoder(out_dim=8, vocab_size=len(VOCAB), embedding_dim=8, hidden_dims=[16], bidirectional=False)
    decoder = SequenceDecoder(latent_dim=4, out_dim=len(VOCAB), vocab_size=len(VOCAB), embedding_dim=8, hidden_dims=[8])
    model = token_model(encoder=encoder, decoder=decoder)
    assert model.encoder is encoder and model.decoder is decoder
    assert "encoder" not in model.hparams and "decoder" not in model.hparams
    x, lengths = random_tokens([2, 5])
    assert model.encode(x, lengths).shape == (2, 4)
    with pytest.raises(ValueError, match=r"encoder must output shape \(B, 8\)"):
        token_model(encoder=SequenceEncoder(out_dim=5, vocab_size=len(VOCAB))).encode(x, lengths)


# -- stacked layers: one RNN per width of hidden_dims ----------------------------------------------


def test_hidden_dims_stack_one_rnn_layer_per_width_and_the_stack_trains():
    model = token_model(hidden_dims=(32, 16))
    for net, directions in ((model.encoder, 2), (model.decoder, 1)):
        assert [rnn.hidden_size for rnn in net.rnns] == [32, 16]
        assert [rnn.input_size for rnn in net.rnns] == [8, directions * 32]  # each layer reads the one below
    assert model.encoder.head.in_features == 2 * 16 and model.decoder.head.in_features == 16  # the top layer's
    assert model.decoder.init_state.out_features == 2 * (32 + 16)  # (h, c) of every layer come from z
    x, lengths = random_tokens([3, 6, 4, 5])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        torch.manual_seed(0)  # the same posterior noise at every step: only the weights change
        loss = model.objective((x, lengths)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def load_rnn(stack: torch.nn.ModuleList, rnn: torch.nn.RNNBase) -> None:
    """Copy the weights of a multi-layer nn.LSTM/GRU into a stack of single-layer ones: its layer l is layer 0 of
    the stack's l-th module."""
    for name, value in rnn.state_dict().items():
        layer = int(name.split("_l")[1][0])
        stack[layer].state_dict()[name.replace(f"_l{layer}", "_l0")].copy_(value)


@pytest.mark.parametrize("cell, layers", [("lstm", 1), ("gru", 1), ("lstm", 2)])
def test_a_stack_of_equal_widths_computes_what_one_multi_layer_rnn_computes(cell, layers):
    # the networks before hidden_dims: one nn.LSTM/GRU of num_layers layers of one width; with the same weights a
    # stack of single layers gives the same codes and decoder outputs (so one layer computes what it did)
    torch.manual_seed(0)
    rnn_cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    sizes = dict(vocab_size=len(VOCAB), embedding_dim=8, hidden_dims=[16] * layers, cell=cell)
    encoder, decoder = SequenceEncoder(out_dim=6, **sizes), SequenceDecoder(latent_dim=4, out_dim=len(VOCAB), **sizes)
    old_encoder = rnn_cls(8, 16, layers, batch_first=True, bidirectional=True)
    old_decoder = rnn_cls(8, 16, layers, batch_first=True)
    load_rnn(encoder.rnns, old_encoder)
    load_rnn(decoder.rnns, old_decoder)
    x, lengths = random_tokens([3, 7, 5])
    packed = pack_padded_sequence(encoder.embedding(x), lengths, batch_first=True, enforce_sorted=False)
    _, state = old_encoder(packed)
    h_n = state[0] if cell == "lstm" else state
    old_codes = encoder.head(h_n.view(layers, 2, 3, 16)[-1].transpose(0, 1).flatten(1))
    torch.testing.assert_close(encoder(x, lengths), old_codes)
    z = torch.randn(3, 4)
    states = 2 if cell == "lstm" else 1
    # the old layout of the initial state: (B, states * layers * H) -> (states, layers, B, H)
    init = torch.tanh(decoder.init_state(z)).view(3, states, layers, 16).permute(1, 2, 0, 3).contiguous()
    old_out, _ = old_decoder(decoder.embedding(x), (init[0], init[1]) if cell == "lstm" else init[0])
    torch.testing.assert_close(decoder(x, z)[0], decoder.head(old_out))


# -- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["char", "word"])
def test_decoded_samples_contain_only_vocabulary_tokens(level, tmp_path):
    dm = TextLinesDataModule(str(write_corpus(tmp_path / "c.txt", n=60)), level=level, batch_size=16)
    model = RecurrentVAE(**TINY, sample_max_len=12)
    trainer(max_steps=3, limit_val_batches=1, num_sanity_val_steps=0).fit(model, datamodule=dm)
    tokens = set(model.vocabulary.tokens)
    for temperature in (0.0, 1.0, 2.0):
        ids = model.sample(32, temperature=temperature)
        assert ids.shape[1] <= 13 and ids.min() >= 0 and ids.max() < len(tokens)
        # nothing after <eos> but padding, and no <pad>/<bos> before it
        for row in ids.tolist():
            end = row.index(EOS) if EOS in row else len(row)
            assert all(t not in (PAD, BOS) for t in row[:end]) and all(t == PAD for t in row[end + 1 :])
        for line in model.decode_text(ids):
            # <unk> is a vocabulary token that spells out as five characters
            assert set(line.replace("<unk>", "") if level == "char" else line.split()) <= tokens, line
    greedy = model.sample(4, temperature=0.0, max_len=3)
    assert greedy.shape[1] <= 4 and (greedy == EOS).any(1).all()  # every row ends, at max_len at the latest


def test_reconstruct_and_interpolate_decode_with_the_vocabulary():
    model = token_model(sample_max_len=6)
    x, lengths = random_tokens([3, 5])
    recon = model.reconstruct(x, lengths)
    torch.testing.assert_close(recon, model.generate(model.encode(x, lengths)))
    path = model.interpolate(x[:1], x[1:], steps=5)
    assert len(path) == 5
    torch.testing.assert_close(path[0], model.generate(model.encode(x[:1])))
    torch.testing.assert_close(path[-1], model.generate(model.encode(x[1:])))
    lines = model.interpolate_text("abc", "ed a", steps=3)
    assert len(lines) == 3 and all(set(line.replace("<unk>", "")) <= set(VOCAB) for line in lines)
    continuous = RecurrentVAE(likelihood="bernoulli", input_dim=5, **TINY)
    seqs = torch.rand(2, 7, 5)
    assert continuous.reconstruct(seqs).shape == (2, 7, 5)
    assert continuous.sample(3, max_len=4).shape == (3, 4, 5)
    assert set(continuous.sample(3, max_len=4).unique().tolist()) <= {0.0, 1.0}  # sampled Bernoulli values
    assert len(continuous.interpolate(seqs[:1], seqs[1:], steps=4)) == 4


class ScriptedDecoder(torch.nn.Module):
    """A decoder with SequenceDecoder's call convention that writes tokens 4, 5, 4, ... and then <eos> at the step
    that the first entry of each row's code says; its state counts the steps. Records what it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, inputs, z, state=None):
        self.seen.append(inputs)
        step = torch.zeros(z.shape[0]) if state is None else state
        token = torch.where(step >= z[:, 0], EOS, 4 + step.long() % 2)
        logits = torch.zeros(z.shape[0], inputs.shape[1], len(VOCAB))
        logits[torch.arange(z.shape[0]), -1, token] = 5.0
        return logits, step + inputs.shape[1]


def test_generate_at_temperature_zero_is_greedy_feeds_tokens_back_and_stops_at_eos():
    decoder = ScriptedDecoder()
    model = token_model(decoder=decoder)  # an injected decoder: generate runs any with this call convention
    z = torch.tensor([[2.0, 0, 0, 0], [5.0, 0, 0, 0]])
    ids = model.generate(z, max_len=10, temperature=0.0)
    assert ids.tolist() == [[4, 5, EOS, PAD, PAD, PAD], [4, 5, 4, 5, 4, EOS]]
    assert len(decoder.seen) == 6  # stopped once every row had ended, not after max_len + 1 steps
    fed = torch.cat(decoder.seen, 1)  # (B, 6): <bos>, then each generated token
    assert fed[:, 0].eq(BOS).all() and fed[1, 1:].tolist() == ids[1, :5].tolist() and fed[0, 1:3].tolist() == [4, 5]
    assert model.generate(torch.tensor([[20.0, 0, 0, 0]]), max_len=3).tolist() == [[4, 5, 4, EOS]]  # forced end
    # the model's own decoder: no randomness at temperature 0, whatever the random state
    model = token_model(sample_max_len=8)
    z = torch.randn(5, 4)
    torch.manual_seed(1)
    first = model.generate(z)
    torch.manual_seed(2)
    assert torch.equal(first, model.generate(z))
    for row in first.tolist():
        end = row.index(EOS)  # every row ends, at max_len at the latest
        assert end <= 8 and all(t == PAD for t in row[end + 1 :])


def test_generate_of_continuous_values_at_temperature_zero_is_the_mean_of_each_step():
    model = RecurrentVAE(likelihood="bernoulli", input_dim=3, **TINY)
    z = torch.randn(2, 4)
    torch.manual_seed(1)
    means = model.generate(z, max_len=5)
    torch.manual_seed(2)
    assert torch.equal(means, model.generate(z, max_len=5)) and means.shape == (2, 5, 3)
    assert ((0 < means) & (means < 1)).all()  # probabilities, not sampled 0/1 values
    with torch.no_grad():  # step by step: the sigmoid of the decoder's logits given the previous means
        params, _ = model.decoder(torch.cat([torch.zeros(2, 1, 3), means[:, :-1]], 1), z)
    torch.testing.assert_close(means, torch.sigmoid(params))


def test_sample_takes_no_labels_and_at_temperature_zero_gives_the_modes_greedy_sequence():
    model = token_model(sample_max_len=6)
    assert "labels" not in inspect.signature(model.sample).parameters
    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):
        model.sample(2, labels=None)
    torch.manual_seed(3)
    assert torch.equal(model.sample(3, temperature=0.0), model.generate(torch.zeros(3, 4)))


def test_generate_names_codes_of_the_wrong_shape_and_refuses_nan():
    model = token_model()
    with pytest.raises(ValueError, match=r"expects codes of shape \(B, 4\) \(latent_dim\) as the input of generate"):
        model.generate(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="the input of generate holds NaN or Inf values"):
        model.generate(torch.tensor([[0.0, math.nan, 0.0, 0.0]]))
    assert not hasattr(model, "decode")  # decode means a decoder mean in the other families


def test_log_prob_is_the_reparameterised_iwae_estimate_and_differentiable():
    model = token_model()
    x, lengths = random_tokens([3, 5])
    torch.manual_seed(0)
    log_p = model.log_prob(x, lengths, num_samples=1)
    # with one sample, the estimate is log p(x | z) + log p(z) - log q(z | x) at z = mu + sigma * eps
    torch.manual_seed(0)
    q = model.posterior(x, lengths)
    z = q.rsample()
    by_hand = model.reconstruction_log_prob(x, lengths, z) + (model.prior.log_prob(z) - q.log_prob(z)).sum(-1)
    torch.testing.assert_close(log_p, by_hand)
    # the same gradients, the encoder's through z included, which a z drawn without reparameterisation lacks
    names, params = zip(*model.named_parameters(), strict=True)
    grads = dict(zip(names, torch.autograd.grad(log_p.sum(), params), strict=True))
    for name, want in zip(names, torch.autograd.grad(by_hand.sum(), params, retain_graph=True), strict=True):
        torch.testing.assert_close(grads[name], want, msg=name)
    d = z.detach()
    unreparameterised = model.reconstruction_log_prob(x, lengths, d) + (model.prior.log_prob(d) - q.log_prob(d)).sum(-1)
    (without_path,) = torch.autograd.grad(unreparameterised.sum(), model.encoder.head.weight)
    assert not torch.allclose(grads["encoder.head.weight"], without_path)
    with torch.no_grad():
        assert not model.log_prob(x, lengths, num_samples=2).requires_grad


# -- collapse countermeasures and diagnostics -----------------------------------------------------


def test_cyclical_annealing_keeps_information_in_z_that_constant_beta_loses(tmp_path):
    # Measured (seeds 0, 1, 2): with cyclical annealing KL 0.12-0.16 nats and 8 of 8 active units,
    # with beta fixed at 1 KL 0.011-0.012 and no active unit.
    path = write_corpus(tmp_path / "words.txt")
    results = {}
    for anneal in (True, False):
        L.seed_everything(0, verbose=False)
        dm = TextLinesDataModule(str(path), level="word", batch_size=32, val_fraction=0.2, test_fraction=0.1)
        adam = partial(torch.optim.Adam, lr=3e-3)
        model = RecurrentVAE(latent_dim=8, embedding_dim=16, hidden_dims=[64], word_dropout=0.5, optimizer=adam)
        schedule = [ParameterSchedule("beta", "cyclical", num_steps=400, num_cycles=4)] if anneal else []
        trainer(max_steps=400, limit_val_batches=0, num_sanity_val_steps=0, callbacks=schedule).fit(
            model, datamodule=dm
        )
        assert model.beta == 1.0  # both end at the full ELBO
        x, lengths = pad_batch(dm.splits["val"])
        with torch.no_grad():
            q = model.eval().posterior(x, lengths)
        kl = objectives.gaussian_kl(q, model.prior).sum(1).mean().item()
        results[anneal] = (kl, objectives.active_units(q.mean).item())
    (kl_cyclical, au_cyclical), (kl_constant, au_constant) = results[True], results[False]
    assert kl_cyclical > 0.05 > kl_constant, results
    assert au_cyclical > au_constant, results


def test_free_bits_hold_the_kl_term_at_its_floor():
    model = token_model(free_bits=0.5)
    x, lengths = random_tokens([4, 5, 6])
    torch.manual_seed(0)
    terms = model.objective((x, lengths)).terms
    q = model.posterior(x, lengths)  # the encoder's: the same posterior as the objective's
    kl_per_dim = objectives.gaussian_kl(q, model.prior)
    assert (kl_per_dim.mean(0) < 0.5).all()  # an untrained encoder: every dimension under the floor
    assert terms["loss"].item() == pytest.approx(-terms["reconstruction"].item() + 0.5 * 4, rel=1e-5)


def test_mutual_information_is_zero_for_an_uninformative_posterior_and_log_n_for_separated_ones():
    torch.manual_seed(0)
    n = 2000
    # the estimate's sampling noise here has a standard deviation of sqrt(0.5 / n) = 0.016 nats
    same = Normal(torch.zeros(n, 1), torch.ones(n, 1))
    assert abs(objectives.mutual_information(same).item()) < 0.06
    apart = Normal(100 * torch.arange(n, dtype=torch.float64)[:, None].expand(n, 3), torch.full((n, 3), 0.01))
    assert objectives.mutual_information(apart).item() == pytest.approx(math.log(n), abs=0.1)
    with pytest.raises(ValueError, match="N >= 2"):
        objectives.mutual_information(Normal(torch.zeros(1, 3), torch.ones(1, 3)))


# -- training, metrics, checkpoints ----------------------------------------------------------------


def active_units_by_hand(model: RecurrentVAE, dm: TextLinesDataModule) -> int:
    """The latent dimensions whose posterior mean varies by more than 0.01 over the whole validation set."""
    with torch.no_grad():
        codes = torch.cat([model.eval().encode(*model.unpack_batch(batch)) for batch in dm.val_dataloader()])
    return int((codes.var(dim=0) > 0.01).sum())


def test_variable_length_text_trains_tests_and_predicts_with_token_metrics(tmp_path):
    dm = TextLinesDataModule(str(write_corpus(tmp_path / "c.txt", n=80)), batch_size=16, max_len=30)
    model = RecurrentVAE(**TINY, iwae_samples=4, word_dropout=0.2)
    # a logger: Lightning refuses to log hyperparameters that model and DataModule share with different values
    t = trainer(max_steps=4, limit_val_batches=2, logger=CSVLogger(tmp_path))
    t.fit(model, datamodule=dm)
    assert t.callback_metrics["val/active_units"] == active_units_by_hand(model, dm)
    trained = model.encoder.head.weight.detach().clone()
    with torch.no_grad():  # the mean of z[0] made to vary a thousand times more: at least that unit is active
        model.encoder.head.weight[0] *= 1000
    (validated,) = t.validate(model, datamodule=dm, verbose=False)
    assert validated["val/active_units"] == active_units_by_hand(model, dm) >= 1
    with torch.no_grad():
        model.encoder.head.weight.copy_(trained)
    (metrics,) = t.test(model, datamodule=dm, verbose=False)
    assert all(math.isfinite(v) for v in metrics.values())
    assert {"test/elbo", "test/kl", "test/mi", "test/nll", "test/nll_per_token", "test/ppl"} <= set(metrics)
    assert metrics["test/ppl"] == pytest.approx(math.exp(metrics["test/nll_per_token"]), rel=1e-5)
    assert metrics["test/nll"] <= -metrics["test/elbo"] + 1.0  # the IWAE bound is at least as tight (up to noise)
    assert 1 < metrics["test/ppl"] < len(model.vocabulary)  # better than uniform over the vocabulary
    batches = t.predict(model, datamodule=dm)
    lines = [line for b in batches for line in b["inputs"]]
    assert len(lines) == 80 and sum(len(b["samples"]) for b in batches) == 80
    assert all(isinstance(s, str) for b in batches for s in b["reconstructions"])


def test_an_injected_optimizer_and_scheduler_train_the_networks_built_in_setup(tmp_path):
    dm = TextLinesDataModule(str(write_corpus(tmp_path / "c.txt", n=40)), batch_size=16)
    sgd, halve = partial(torch.optim.SGD, lr=0.1), partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    model = RecurrentVAE(**TINY, optimizer=sgd, lr_scheduler=halve)  # no vocab: the networks come in setup
    assert not list(model.parameters())
    assert "optimizer" not in model.hparams and "lr_scheduler" not in model.hparams
    t = trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    t.fit(model, datamodule=dm)
    (optimizer,) = t.optimizers
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["initial_lr"] == 0.1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)  # halved after each of the 2 epochs
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in model.parameters()} and optimized


def test_images_read_row_by_row_train_test_and_predict():
    from datamodules import SequentialImageDataModule

    dm = SequentialImageDataModule("digits", batch_size=32, eval_batch_size=40)
    model = RecurrentVAE(likelihood="bernoulli", **TINY, iwae_samples=3)
    t = trainer(max_steps=3, limit_val_batches=2, limit_test_batches=2, limit_predict_batches=1)
    t.fit(model, datamodule=dm)
    assert model.input_dim == 8 and model.max_len == 8  # taken from the DataModule
    (metrics,) = t.test(model, datamodule=dm, verbose=False)
    assert all(math.isfinite(v) for v in metrics.values()) and "test/ppl" not in metrics
    (batch,) = t.predict(model, datamodule=dm)
    assert batch["inputs"].shape == batch["reconstructions"].shape == batch["samples"].shape == (40, 8, 8)
    assert 0 <= batch["reconstructions"].min() and batch["reconstructions"].max() <= 1


def test_image_logger_skips_sequence_models(tmp_path):
    from callbacks import ImageLogger

    dm = TextLinesDataModule(str(write_corpus(tmp_path / "c.txt", n=40)), batch_size=16)
    t = trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[ImageLogger()], default_root_dir=tmp_path
    )
    t.fit(RecurrentVAE(**TINY), datamodule=dm)
    assert t.state.finished and not list(tmp_path.rglob("*.png"))


def test_text_samples_and_reconstructions_reach_the_run_folder_and_wandb_every_n_epochs(tmp_path):
    dm = TextLinesDataModule(str(write_corpus(tmp_path / "c.txt", n=60)), level="word", batch_size=16)
    logger = WandbLogger(project="dgm-lightning", save_dir=str(tmp_path), offline=True)
    text = TextLogger(every_n_epochs=2, num_samples=5, num_reconstructions=3, temperature=0.5, seed=7)
    t = trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=2, logger=logger, callbacks=[text])
    model = RecurrentVAE(**TINY)
    t.fit(model, datamodule=dm)
    logger.experiment.finish()
    # written after the second epoch only (epochs count from 0), in the run's own folder
    folder = run_dir(t) / "text"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*")) == [
        "reconstructions/epoch_0001.tsv",
        "samples/epoch_0001.txt",
    ]
    # what the model samples with that seed and temperature (after the last epoch: the final weights)
    torch.manual_seed(7)
    expected = model.sample_text(5, temperature=0.5)
    assert (folder / "samples" / "epoch_0001.txt").read_text(encoding="utf-8").splitlines() == expected
    # the first validation lines and their greedy reconstructions
    rows = list(csv.reader((folder / "reconstructions" / "epoch_0001.tsv").open(encoding="utf-8"), delimiter="\t"))
    x, lengths = pad_batch(dm.splits["val"][:3])
    assert rows[0] == ["input", "reconstruction"] and [r[0] for r in rows[1:]] == model.decode_text(x)
    assert [r[1] for r in rows[1:]] == model.decode_text(model.reconstruct(x, lengths))
    # the same rows reach W&B as tables
    (wandb_run,) = (tmp_path / "wandb").glob("offline-run-*")
    for _ in range(100):  # W&B's service may still be writing the run file when finish() returns: up to its end
        if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(wandb_run)):
            break
        time.sleep(0.1)
    assert {"val/text_samples/_type", "val/text_reconstructions/_type"} <= wandb_history_keys(wandb_run)
    (table,) = (wandb_run / "files" / "media" / "table" / "val").glob("text_samples_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == ["sample"] and content["data"] == [[line] for line in expected]


def test_the_text_logger_refuses_a_model_that_writes_no_text():
    dm = SequentialImageDataModule("digits", batch_size=64)
    t = trainer(max_epochs=1, limit_train_batches=1, callbacks=[TextLogger()])
    with pytest.raises(TypeError, match=r"RecurrentVAE \(likelihood 'bernoulli'\) does not generate text.*categorical"):
        t.fit(RecurrentVAE(likelihood="bernoulli", **TINY), datamodule=dm)
    with pytest.raises(ValueError, match="num_reconstructions must be >= 0 and finite, got -1"):
        TextLogger(num_reconstructions=-1)
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got 2.5"):
        TextLogger(num_samples=2.5)


def test_the_text_recipe_logs_text():
    recipe = yaml.safe_load((REPO / "configs" / "rvae_text.yaml").read_text())
    assert "callbacks.TextLogger" in [c["class_path"] for c in recipe["trainer"]["callbacks"]]


def test_the_vocabulary_travels_with_the_checkpoint(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", n=60)
    dm = TextLinesDataModule(str(corpus), batch_size=16)
    model = RecurrentVAE(**TINY)
    t = trainer(max_steps=2, limit_val_batches=1, default_root_dir=tmp_path)
    t.fit(model, datamodule=dm)
    t.save_checkpoint(tmp_path / "m.ckpt")
    corpus.unlink()
    restored = RecurrentVAE.load_from_checkpoint(tmp_path / "m.ckpt")
    assert restored.vocabulary == model.vocabulary
    z = torch.randn(3, 4)
    assert restored.decode_text(restored.generate(z)) == model.decode_text(model.generate(z))


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_the_exported_sampler_is_described_as_the_greedy_generation(likelihood, tmp_path):
    from dgm_lightning.export import METADATA_FILE, export_sampler

    data = {"vocab": VOCAB} if likelihood == "categorical" else {"input_dim": 3}
    model = RecurrentVAE(likelihood=likelihood, sample_max_len=4, **data, **TINY)
    export_sampler(model, tmp_path)
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    assert meta["noise"].startswith("standard normal: the latent code, generated greedily")
    assert meta["output_shape"] == (["batch", "max_len + 1"] if likelihood == "categorical" else ["batch", 4, 3])


def test_a_checkpoint_with_another_vocabulary_is_refused_by_name(tmp_path):
    model = token_model()
    checkpoint = {"hyper_parameters": {"vocab": list(SPECIALS + ("x",))}}
    with pytest.raises(ValueError, match=r"checkpoint's vocabulary \(5 tokens\) differs from this model's \(10\)"):
        model.on_load_checkpoint(checkpoint)


def test_predict_from_a_checkpoint_writes_text_without_the_original_file(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", n=60)
    common = ["--config", str(REPO / "configs" / "rvae_text.yaml"), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    tiny = ["--model.hidden_dims", "[16]", "--model.embedding_dim", "8", "--model.latent_dim", "4"]
    main(["fit", *common, *tiny, "--data.path", str(corpus), "--trainer.max_steps", "2"])
    (checkpoint,) = tmp_path.glob("dgm-lightning/*/checkpoints/last.ckpt")
    vocab = set(torch.load(checkpoint, weights_only=True)["hyper_parameters"]["vocab"])
    corpus.unlink()
    (tmp_path / "new.txt").write_text("zebra\na red owl\n")  # 'z' never occurred in training
    main(["predict", *common, "--data.path", str(tmp_path / "new.txt"), "--ckpt_path", str(checkpoint)])
    (folder,) = (tmp_path / "predictions").iterdir()
    assert (folder / "inputs.txt").read_text().splitlines() == ["<unk>ebra", "a red owl"]
    for name in ("reconstructions.txt", "samples.txt"):
        lines = (folder / name).read_text().splitlines()
        assert len(lines) == 2 and all(set(line.replace("<unk>", "")) <= vocab for line in lines)


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"likelihood": "poisson"}, "choose one of: categorical, bernoulli"),
        ({"cell": "rnn"}, "choose one of: lstm, gru"),
        ({"vocab_level": "byte"}, "choose one of: char, word"),
        ({"sample_max_len": 0}, "sample_max_len must be a positive integer"),
        ({"word_dropout": 1.0}, r"word_dropout must be in \[0, 1\)"),
        ({"vocab": ["a", "b"]}, "must start with the special tokens"),
        ({"input_dim": 3}, "input_dim is for continuous sequences"),
        ({"likelihood": "gaussian", "vocab": list(VOCAB)}, "vocab is for token sequences"),
        ({"likelihood": "bernoulli", "value_range": (-1, 1)}, "values in \\(0, 1\\)"),
        ({"hidden_dims": []}, "hidden_dims must hold one width per RNN layer, at least one"),
        ({"hidden_dims": [16, 0]}, r"hidden_dims\[1\] must be a positive integer, got 0"),
        ({"optimizer": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)}, "optimizer must be a callable"),
    ],
)
def test_bad_constructor_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RecurrentVAE(**kwargs)


def test_bad_sequences_fail_clearly():
    model = token_model()
    x, lengths = random_tokens([3, 4])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        model.encode(torch.tensor([[4, 5, 10]]))
    with pytest.raises(ValueError, match="lengths must be one value"):
        model.encode(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="token ids of shape"):
        model.encode(x.float())
    for max_len in (0, -3):
        with pytest.raises(ValueError, match="max_len must be a positive integer"):
            model.sample(2, max_len=max_len)
    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):  # an unconditional family
        model.sample(2, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="pass vocab"):
        RecurrentVAE().sample(2)
    with pytest.raises(ValueError, match=r"sequences of shape \(B, T, 3\)"):
        RecurrentVAE(likelihood="gaussian", input_dim=3).encode(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="no empty line"):
        model.encode_text([""])


def test_a_model_that_does_not_fit_the_datamodule_fails_before_training(tmp_path):
    from datamodules import DigitsDataModule, SequentialImageDataModule

    with pytest.raises(ValueError, match="has no vocabulary"):
        trainer(fast_dev_run=True).fit(RecurrentVAE(**TINY), datamodule=SequentialImageDataModule())
    with pytest.raises(ValueError, match="--model.input_dim 8"):
        trainer(fast_dev_run=True).fit(
            RecurrentVAE(likelihood="bernoulli", input_dim=5, **TINY), datamodule=SequentialImageDataModule()
        )
    with pytest.raises(ValueError, match="needs a sequence DataModule"):
        trainer(fast_dev_run=True).fit(RecurrentVAE(likelihood="bernoulli", **TINY), datamodule=DigitsDataModule())
    text = TextLinesDataModule(str(write_corpus(tmp_path / "c.txt", n=30)))
    with pytest.raises(ValueError, match="yields token sequences"):
        trainer(fast_dev_run=True).fit(RecurrentVAE(likelihood="gaussian", **TINY), datamodule=text)


def test_a_vocabulary_lists_every_token_once():
    with pytest.raises(ValueError, match="twice"):
        Vocabulary(SPECIALS + ("a", "a"))


# -- DDP -------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import lightning as L
import torch

from datamodules import TextLinesDataModule
from dgm_lightning import RecurrentVAE

if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    dm = TextLinesDataModule("corpus.txt", level="word", batch_size=8)
    model = RecurrentVAE(latent_dim=4, embedding_dim=8, hidden_dims=[16], word_dropout=0.2, iwae_samples=2)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=3, limit_val_batches=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    torch.save({"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(),
                "vocab": model.vocabulary.tokens, "metrics": metrics, "step": trainer.global_step},
               f"rank{trainer.global_rank}.pt")
"""


def test_ddp_with_two_cpu_processes_keeps_the_ranks_in_step(tmp_path):
    write_corpus(tmp_path / "corpus.txt", n=80)
    (tmp_path / "ddp_rvae.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "ddp_rvae.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["step"] == rank1["step"] == 3
    assert rank0["vocab"] == rank1["vocab"]
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["metrics"] == pytest.approx(rank1["metrics"])  # synced across ranks
    assert {"test/nll_per_token", "test/ppl"} <= set(rank0["metrics"])
