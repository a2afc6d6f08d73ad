"""Recurrent encoder and decoder for sequence VAEs: token ids or feature vectors in, packed by length."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

Cell = Literal["lstm", "gru"]
CELLS: tuple[str, ...] = ("lstm", "gru")
RNNState = Tensor | tuple[Tensor, Tensor]


def _rnn(cell: str, input_size: int, hidden_dim: int, num_layers: int, bidirectional: bool) -> nn.RNNBase:
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose one of: {', '.join(CELLS)}")
    rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
    return rnn_cls(input_size, hidden_dim, num_layers, batch_first=True, bidirectional=bidirectional)


def _run_rnn(rnn: nn.RNNBase, inputs, state: RNNState | None = None):
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
        if vocab_size <= 0 or embedding_dim <= 0:
            raise ValueError(f"vocab_size and embedding_dim must be > 0, got {vocab_size} and {embedding_dim}")
        return nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx), embedding_dim
    if input_dim <= 0:
        raise ValueError(f"input_dim must be > 0, got {input_dim}")
    return None, input_dim


class SequenceEncoder(nn.Module):
    """(B, T) token ids or (B, T, D) features with their lengths (B,) -> (B, out_dim), from the final RNN states.

    Sequences are packed, so padding never reaches the RNN and the result does not depend on it.

    Args:
        out_dim: output size (2 * latent_dim for a Gaussian posterior: mean and log-variance).
        vocab_size: number of token ids (token input), or None.
        input_dim: features per step (continuous input), or None.
        embedding_dim: size of token embeddings.
        hidden_dim: RNN hidden size.
        num_layers: stacked RNN layers.
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
        hidden_dim: int = 128,
        num_layers: int = 1,
        cell: Cell = "lstm",
        bidirectional: bool = True,
        padding_idx: int = 0,
    ) -> None:
        super().__init__()
        self.embedding, rnn_in = _input_layer(vocab_size, input_dim, embedding_dim, padding_idx)
        self.rnn = _rnn(cell, rnn_in, hidden_dim, num_layers, bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.head = nn.Linear(self.num_directions * hidden_dim, out_dim)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        h = x if self.embedding is None else self.embedding(x)
        # pack_padded_sequence wants lengths on the CPU; enforce_sorted=False returns states in input order
        packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, state = _run_rnn(self.rnn, packed)
        h_n = state[0] if isinstance(state, tuple) else state  # (layers * directions, B, H)
        last = h_n.view(self.rnn.num_layers, self.num_directions, x.shape[0], -1)[-1]  # top layer: (dirs, B, H)
        return self.head(last.transpose(0, 1).flatten(1))


class SequenceDecoder(nn.Module):
    """Autoregressive RNN decoder whose initial state is computed from z (Bowman et al. 2016).

    ``forward(inputs, z, state=None)`` runs over the whole input sequence (teacher forcing) or over one
    step at a time (generation, passing the returned state back in) and gives per-step output parameters
    (logits over the vocabulary, or per-feature Bernoulli logits / Gaussian means).

    Args:
        latent_dim: size of z.
        out_dim: outputs per step.
        vocab_size, input_dim, embedding_dim, hidden_dim, num_layers, cell, padding_idx: as ``SequenceEncoder``.

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
        hidden_dim: int = 128,
        num_layers: int = 1,
        cell: Cell = "lstm",
        padding_idx: int = 0,
    ) -> None:
        super().__init__()
        self.embedding, rnn_in = _input_layer(vocab_size, input_dim, embedding_dim, padding_idx)
        self.rnn = _rnn(cell, rnn_in, hidden_dim, num_layers, bidirectional=False)
        # an LSTM has two state tensors (h, c), a GRU one; all come from z
        self.num_states = 2 if cell == "lstm" else 1
        self.init_state = nn.Linear(latent_dim, self.num_states * num_layers * hidden_dim)
        self.head = nn.Linear(hidden_dim, out_dim)

    def initial_state(self, z: Tensor) -> RNNState:
        layers, hidden = self.rnn.num_layers, self.rnn.hidden_size
        # (B, states * layers * H) -> (states, layers, B, H), the layout nn.LSTM / nn.GRU expect
        states = torch.tanh(self.init_state(z)).view(z.shape[0], self.num_states, layers, hidden)
        states = states.permute(1, 2, 0, 3).contiguous()
        return (states[0], states[1]) if self.num_states == 2 else states[0]

    def forward(self, inputs: Tensor, z: Tensor, state: RNNState | None = None) -> tuple[Tensor, RNNState]:
        h = inputs if self.embedding is None else self.embedding(inputs)
        out, state = _run_rnn(self.rnn, h, self.initial_state(z) if state is None else state)
        return self.head(out), state
