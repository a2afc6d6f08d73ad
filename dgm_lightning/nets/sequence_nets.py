"""Recurrent encoder and decoder for sequence VAEs (token ids or feature vectors in, packed by length), and what a
decoder with ``SequenceDecoder``'s call convention reads: its inputs in training (``teacher_forcing``), and its own
outputs in the autoregressive generation loops (``generate_tokens``, ``generate_values``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributions import Categorical
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from dgm_lightning.checks import check_choice, check_hidden_dims, check_positive_int
from dgm_lightning.vocabulary import BOS, EOS, PAD, UNK

Cell = Literal["lstm", "gru"]
RNNState = Tensor | tuple[Tensor, Tensor]  # one layer's: h (GRU) or (h, c) (LSTM), each (directions, B, H)
DecoderState = tuple[RNNState, ...]  # one per stacked layer


def _rnn_layers(cell: str, input_size: int, hidden_dims: Sequence[int], bidirectional: bool) -> nn.ModuleList:
    """One single-layer RNN per width, each reading the outputs of the one below (both directions joined), as a
    stacked ``nn.LSTM`` does: ``nn.LSTM`` and ``nn.GRU`` stack layers of one width only."""
    check_choice("cell", cell, Cell)
    check_hidden_dims(hidden_dims, layer="RNN layer")
    rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
    directions = 2 if bidirectional else 1
    layers = []
    for width in hidden_dims:
        layers.append(rnn_cls(input_size, width, batch_first=True, bidirectional=bidirectional))
        input_size = directions * width
    return nn.ModuleList(layers)


def _run_rnn(rnn: nn.RNNBase, inputs: Tensor | PackedSequence, state: RNNState | None = None):
    """``rnn(inputs, state)``, in float32 under CPU autocast: oneDNN has no bf16 LSTM for every shape ("could not
    create a primitive descriptor"), while CUDA autocast runs recurrent layers in half precision as they are."""
    if not torch.is_autocast_enabled("cpu"):
        return rnn(inputs, state)
    if state is not None:
        state = tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()
    with torch.autocast("cpu", enabled=False):
        return rnn(inputs.float(), state)


def _input_layer(
    vocab_size: int | None, input_dim: int | None, embedding_dim: int, padding_idx: int
) -> tuple[nn.Module | None, int]:
    """An embedding for token ids, or nothing for feature vectors; returns it and the RNN's input size."""
    if (vocab_size is None) == (input_dim is None):
        raise ValueError("give exactly one of vocab_size (token ids) and input_dim (feature vectors)")
    if vocab_size is not None:
        check_positive_int(vocab_size=vocab_size, embedding_dim=embedding_dim)
        return nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx), embedding_dim
    check_positive_int(input_dim=input_dim)
    return None, input_dim


class SequenceEncoder(nn.Module):
    """(B, T) token ids or (B, T, D) features with their lengths (B,) -> (B, out_dim), from the top layer's final
    states.

    Sequences are packed, so padding never reaches the RNN and the result does not depend on it.

    Args:
        out_dim: output size (2 * latent_dim for a Gaussian posterior: mean and log-variance).
        vocab_size: number of token ids (token input), or None.
        input_dim: features per step (continuous input), or None.
        embedding_dim: size of the token embeddings (token input only: features enter the RNN as they are).
        hidden_dims: one width per stacked RNN layer, from the input up.
        cell: ``lstm`` or ``gru``.
        bidirectional: read the sequence both ways and join both final states.
        padding_idx: id of the padding token (its embedding stays zero).
    """

    def __init__(
        self,
        *,
        out_dim: int,
        vocab_size: int | None = None,
        input_dim: int | None = None,
        embedding_dim: int = 64,
        hidden_dims: Sequence[int] = (128,),
        cell: Cell = "lstm",
        bidirectional: bool = True,
        padding_idx: int = PAD,
    ) -> None:
        super().__init__()
        self.embedding, rnn_in = _input_layer(vocab_size, input_dim, embedding_dim, padding_idx)
        self.rnns = _rnn_layers(cell, rnn_in, hidden_dims, bidirectional)
        self.head = nn.Linear((2 if bidirectional else 1) * hidden_dims[-1], out_dim)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        h = x if self.embedding is None else self.embedding(x)
        # pack_padded_sequence wants lengths on the CPU; enforce_sorted=False returns states in input order
        outputs = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        for rnn in self.rnns:
            outputs, state = _run_rnn(rnn, outputs)
        h_n = state[0] if isinstance(state, tuple) else state  # the top layer's: (directions, B, H)
        return self.head(h_n.transpose(0, 1).flatten(1))


class SequenceDecoder(nn.Module):
    """Autoregressive RNN decoder whose initial state is computed from z (Bowman et al. 2016).

    ``forward(inputs, z, state=None) -> (params, state)`` runs over the whole input sequence (teacher forcing) or
    over one step at a time (generation, passing the returned state back in) and gives per-step output parameters
    (B, T, out_dim): logits over the vocabulary, or per-feature Bernoulli logits / Gaussian means. ``state`` is
    opaque to the caller (here: one state per layer); ``generate_tokens`` and ``generate_values`` run any decoder
    with this call convention.

    Args:
        latent_dim: size of z.
        out_dim: outputs per step.
        vocab_size, input_dim, embedding_dim, hidden_dims, cell, padding_idx: as ``SequenceEncoder``.

    References: Bowman et al. 2016, arXiv:1511.06349.
    """

    def __init__(
        self,
        *,
        latent_dim: int,
        out_dim: int,
        vocab_size: int | None = None,
        input_dim: int | None = None,
        embedding_dim: int = 64,
        hidden_dims: Sequence[int] = (128,),
        cell: Cell = "lstm",
        padding_idx: int = PAD,
    ) -> None:
        super().__init__()
        self.embedding, rnn_in = _input_layer(vocab_size, input_dim, embedding_dim, padding_idx)
        self.rnns = _rnn_layers(cell, rnn_in, hidden_dims, bidirectional=False)
        self.hidden_dims = tuple(int(width) for width in hidden_dims)
        # an LSTM has two state tensors (h, c), a GRU one; every layer's come from z
        self.num_states = 2 if cell == "lstm" else 1
        self.init_state = nn.Linear(latent_dim, self.num_states * sum(self.hidden_dims))
        self.head = nn.Linear(self.hidden_dims[-1], out_dim)

    def initial_state(self, z: Tensor) -> DecoderState:
        states = torch.tanh(self.init_state(z)).view(z.shape[0], self.num_states, -1)  # (B, states, sum of widths)
        layers = []
        for layer in states.split(self.hidden_dims, dim=2):  # (B, states, H) per layer
            layer = layer.permute(1, 0, 2)[:, None].contiguous()  # (states, 1, B, H): the layout nn.LSTM/GRU expect
            layers.append((layer[0], layer[1]) if self.num_states == 2 else layer[0])
        return tuple(layers)

    def forward(self, inputs: Tensor, z: Tensor, state: DecoderState | None = None) -> tuple[Tensor, DecoderState]:
        h = inputs if self.embedding is None else self.embedding(inputs)
        states = []
        for rnn, layer_state in zip(self.rnns, self.initial_state(z) if state is None else state, strict=True):
            h, layer_state = _run_rnn(rnn, h, layer_state)
            states.append(layer_state)
        return self.head(h), tuple(states)


def teacher_forcing(
    x: Tensor, lengths: Tensor, *, tokens: bool, word_dropout: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """What a decoder reads and predicts in training: inputs, targets and the mask of the steps that count (B, T').

    Tokens (x: ids (B, T)): the decoder reads ``<bos> x_1 .. x_L`` and predicts ``x_1 .. x_L <eos>``; word dropout
    replaces inputs other than ``<bos>`` by ``<unk>``. Continuous (x: (B, T, D)): it reads ``0, x_1 .. x_{L-1}`` and
    predicts ``x_1 .. x_L``; word dropout zeroes whole steps. Padding never counts.

    Args:
        x: the padded batch.
        lengths: its sequences' lengths (B,).
        tokens: whether x holds token ids.
        word_dropout: probability of dropping each input (0 outside training).
    """
    b, t = x.shape[:2]
    if tokens:
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


def generate_tokens(decoder: nn.Module, z: Tensor, *, max_len: int, temperature: float = 0.0) -> Tensor:
    """Token ids generated from codes z (B, latent_dim), from ``<bos>``, feeding each token back in.

    Returns ids (B, T <= max_len + 1): each row ends in ``<eos>`` (forced after max_len tokens) and then padding;
    the loop stops once every row has ended, except while ``torch.export`` traces it (it has no values to test):
    the exported generation returns max_len + 1 steps. ``temperature`` divides the logits; 0 picks the most likely
    token (greedy).

    Args:
        decoder: ``(inputs (B, T), z, state=None) -> (logits (B, T, vocabulary size), state)``, as
            ``SequenceDecoder``.
        z: the codes.
        max_len: most tokens before ``<eos>``.
        temperature: 0 (greedy) or the divisor of the logits.
    """
    n = z.shape[0]
    state = None
    inputs = torch.full((n, 1), BOS, device=z.device)
    out = torch.full((n, max_len + 1), PAD, device=z.device)  # room for <eos> after max_len tokens
    done = torch.zeros(n, dtype=torch.bool, device=z.device)
    for t in range(max_len + 1):
        logits, state = decoder(inputs, z, state)
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
        if not torch.compiler.is_exporting() and done.all():
            return out[:, : t + 1]
        inputs = token[:, None]
    return out


def generate_values(
    decoder: nn.Module, z: Tensor, *, input_dim: int, max_len: int, draw: Callable[[Tensor], Tensor]
) -> Tensor:
    """Continuous sequences (B, max_len, input_dim) generated from codes z (B, latent_dim), feeding each step back
    in; the first input is a step of zeros, what the decoder reads in place of ``<bos>`` in training.

    Args:
        decoder: ``(inputs (B, T, input_dim), z, state=None) -> (params (B, T, out), state)``, as
            ``SequenceDecoder``.
        z: the codes.
        input_dim: features per step.
        max_len: steps to generate.
        draw: a step's output parameters (B, out) -> its values (B, input_dim): the likelihood's mean, or a sample.
    """
    inputs = z.new_zeros(z.shape[0], 1, input_dim)
    state = None
    steps = []
    for _ in range(max_len):
        params, state = decoder(inputs, z, state)
        x_t = draw(params[:, -1])
        steps.append(x_t)
        inputs = x_t[:, None]
    return torch.stack(steps, 1)
