"""Tokens of text sequences: a tokenizer (characters or words), a vocabulary that travels with checkpoints, and
batches of ids to and from lines of text."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from dgm_lightning.checks import check_choice

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS = range(4)
Level = Literal["char", "word"]


def tokenize(line: str, level: str) -> list[str]:
    """A line of text -> its tokens: characters (``char``) or whitespace-separated words (``word``)."""
    check_choice("level", level, Level)
    line = line.strip()
    return list(line) if level == "char" else line.split()


@dataclass(frozen=True)
class Vocabulary:
    """Tokenizer and token <-> id map: the specials ``<pad> <unk> <bos> <eos>`` (ids 0-3), then the tokens.

    Args:
        tokens: every token, the four specials first.
        level: ``char`` (every character is a token) or ``word`` (whitespace-separated words).
    """

    tokens: tuple[str, ...]
    level: Level = "char"

    def __post_init__(self) -> None:
        check_choice("level", self.level, Level)
        if tuple(self.tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with the special tokens {SPECIALS}, got {self.tokens[:4]}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("a vocabulary must not hold a token twice")
        object.__setattr__(self, "_ids", {token: i for i, token in enumerate(self.tokens)})

    @classmethod
    def build(
        cls, lines: Iterable[Sequence[str]], *, level: Level = "char", min_freq: int = 1, max_size: int | None = None
    ) -> Vocabulary:
        """The vocabulary of tokenized lines: tokens seen at least ``min_freq`` times, most frequent first."""
        counts = Counter(token for line in lines for token in line)
        ranked = sorted(
            (t for t, c in counts.items() if c >= min_freq and t not in SPECIALS), key=lambda t: (-counts[t], t)
        )
        return cls(SPECIALS + tuple(ranked[:max_size]), level)

    def __len__(self) -> int:
        return len(self.tokens)

    def tokenize(self, line: str) -> list[str]:
        return tokenize(line, self.level)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Token strings -> ids; tokens not in the vocabulary become ``<unk>``."""
        return [self._ids.get(token, UNK) for token in tokens]  # type: ignore[attr-defined]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, up to the first ``<eos>``; padding and ``<bos>`` are dropped."""
        tokens = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                tokens.append(self.tokens[i])
        return ("" if self.level == "char" else " ").join(tokens)

    def encode_lines(self, lines: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Lines of text -> padded ids (B, T) and lengths (B,): a batch as a text DataModule yields it."""
        ids = [torch.tensor(self.encode(self.tokenize(line)), dtype=torch.long) for line in lines]
        if not ids or any(len(row) == 0 for row in ids):
            raise ValueError("encode_text needs at least one line, and no empty line")
        return pad_sequence(ids, batch_first=True, padding_value=PAD), torch.tensor([len(row) for row in ids])

    def decode_rows(self, ids: Tensor) -> list[str]:
        """Token ids (B, T) -> one line of text per row, up to its ``<eos>`` (``decode``)."""
        return [self.decode(row) for row in ids.tolist()]
