"""Sequence DataModules: text lines (vocabulary, UNK, padding), images read row by row, CSV time series."""

from __future__ import annotations

import pytest
import torch

from datamodules import CSVSequenceDataModule, DigitsDataModule, SequentialImageDataModule, TextLinesDataModule
from datamodules.sequences import SAMPLE_CORPUS, SAMPLE_SERIES, pad_batch
from dgm_lightning.vocabulary import EOS, PAD, SPECIALS, UNK, Vocabulary
from tests.helpers import write_idx_files

# -- text ----------------------------------------------------------------------------------------


def test_the_vocabulary_is_built_on_the_training_split_and_other_tokens_become_unk(tmp_path):
    lines = [f"line {i} of text" for i in range(40)]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n\n   \n")  # blank lines are no sequences
    dm = TextLinesDataModule(str(tmp_path / "t.txt"), level="word", val_fraction=0.25, test_fraction=0.25)
    dm.setup("fit")
    vocab = dm.vocabulary
    assert vocab.tokens[:4] == SPECIALS and {"line", "of", "text"} <= set(vocab.tokens)
    train_numbers = {int(tokens[1]) for tokens in dm.lines["train"]}
    assert set(vocab.tokens[4:]) == {"line", "of", "text"} | {str(i) for i in train_numbers}
    assert sum(len(split) for split in dm.lines.values()) == 40
    for seq in dm.splits["val"]:
        assert seq[1] == UNK  # the number of a validation line never occurs in training
        assert vocab.decode(seq.tolist()) == "line <unk> of text"
    assert dm.data_spec.data_shape == (64, len(vocab))


def test_text_batches_are_padded_with_their_lengths_and_long_lines_cut(tmp_path):
    (tmp_path / "t.txt").write_text("ab\nabcdefghij\nabcd\n" * 10)
    dm = TextLinesDataModule(str(tmp_path / "t.txt"), max_len=6, batch_size=30)
    dm.setup("fit")
    x, lengths = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.long and x.shape == (len(dm.splits["train"]), 6)
    assert set(lengths.tolist()) <= {2, 4, 6}
    for row, n in zip(x, lengths, strict=True):
        assert (row[:n] != PAD).all() and (row[n:] == PAD).all()


def test_set_vocabulary_reencodes_with_a_models_vocabulary_and_survives_a_checkpoint(tmp_path):
    (tmp_path / "t.txt").write_text("abc\nbcd\ncde\n" * 10)
    dm = TextLinesDataModule(str(tmp_path / "t.txt"), batch_size=4)
    dm.setup("fit")
    other = Vocabulary(SPECIALS + ("c", "b"), "char")
    dm.set_vocabulary(other)
    assert all(set(seq.tolist()) <= {UNK, 4, 5} for seq in dm.splits["train"])
    fresh = TextLinesDataModule(str(tmp_path / "t.txt"))
    fresh.setup("fit")
    fresh.load_state_dict(dm.state_dict())
    assert fresh.vocabulary == other
    fresh.setup("predict")  # every line of the file, encoded with the kept vocabulary
    assert len(fresh.splits["predict"]) == 30 and fresh.vocabulary == other
    with pytest.raises(ValueError, match="word-level"):
        dm.set_vocabulary(Vocabulary(SPECIALS, "word"))


def test_lines_become_a_padded_batch_of_ids_and_back():
    vocab = Vocabulary(SPECIALS + ("a", "b", " "), "char")
    ids, lengths = vocab.encode_lines(["ab", "b az"])  # 'z' is no token: <unk>
    assert ids.tolist() == [[4, 5, PAD, PAD], [5, 6, 4, UNK]] and lengths.tolist() == [2, 4]
    assert vocab.decode_rows(torch.cat([ids, torch.full((2, 1), EOS), torch.full((2, 1), 4)], 1)) == ["ab", "b a<unk>"]
    with pytest.raises(ValueError, match="no empty line"):
        vocab.encode_lines(["ab", "  "])


def test_bad_text_input_fails_clearly(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="holds no text"):
        TextLinesDataModule(str(tmp_path / "empty.txt")).setup("fit")
    with pytest.raises(FileNotFoundError, match="no text file"):
        TextLinesDataModule(str(tmp_path / "missing.txt")).setup("fit")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        TextLinesDataModule(str(tmp_path / "latin1.txt")).setup("fit")
    for kwargs, message in [
        ({"max_len": 0}, "max_len must be > 0"),
        ({"level": "byte"}, "choose one of: char, word"),
        ({"batch_size": 0}, "batch_size must be > 0"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "sum below 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            TextLinesDataModule(str(tmp_path / "empty.txt"), **kwargs)
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="split is empty"):
        TextLinesDataModule(str(tmp_path / "three.txt")).setup("fit")


def test_the_shipped_corpus_is_used_by_default():
    assert SAMPLE_CORPUS.is_file() and SAMPLE_SERIES.is_file()
    dm = TextLinesDataModule()
    dm.setup("fit")
    assert sum(len(s) for s in dm.splits.values()) >= 300
    assert len(dm.vocabulary) > 20  # characters of English text


# -- images read row by row ----------------------------------------------------------------------


def test_digits_rows_are_sequences_of_the_same_images_in_the_same_splits():
    dm = SequentialImageDataModule("digits", batch_size=16, eval_batch_size=32)
    dm.setup("fit")
    images = DigitsDataModule()
    images.setup("fit")
    for split in ("train", "val", "test"):
        assert torch.equal(torch.stack(dm.splits[split]), images.splits[split].tensors[0][:, 0])
    x, lengths = next(iter(dm.val_dataloader()))
    assert x.shape == (32, 8, 8) and lengths.tolist() == [8] * 32 and 0 <= x.min() and x.max() <= 1
    assert next(iter(dm.train_dataloader()))[0].shape == (16, 8, 8)
    assert dm.data_spec.data_shape == (8, 8)


def test_fashion_mnist_rows_from_the_original_files(tmp_path):
    write_idx_files(tmp_path, n_train=24, n_test=8)
    dm = SequentialImageDataModule("fashion_mnist", data_dir=str(tmp_path), batch_size=4)
    dm.setup("fit")
    x, lengths = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 28, 28) and lengths.tolist() == [28] * 4
    assert len(dm.splits["test"]) == 8  # the official test set
    with pytest.raises(ValueError, match="choose one of: digits, mnist, fashion_mnist"):
        SequentialImageDataModule("cifar")


# -- CSV time series -----------------------------------------------------------------------------


def write_csv(path, rows: int = 100) -> None:
    lines = ["time,a,b"] + [f"{t},{t},{2 * t + 1}" for t in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_csv_windows_are_split_in_time_order_and_standardized_by_the_training_rows(tmp_path):
    write_csv(tmp_path / "s.csv")
    dm = CSVSequenceDataModule(str(tmp_path / "s.csv"), columns=["a", "b"], window=10, stride=5)
    dm.setup("fit")
    # 80 / 10 / 10 rows: windows every 5 rows that fit whole in their split
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [15, 1, 1]
    assert torch.allclose(dm.mean, torch.tensor([39.5, 80.0]))
    restored = [torch.cat(dm.splits[s]) * dm.std + dm.mean for s in ("train", "val", "test")]
    assert restored[0][:, 0].max() < restored[1][:, 0].min() <= restored[1][:, 0].max() < restored[2][:, 0].min()
    x, lengths = next(iter(dm.train_dataloader()))
    assert x.shape == (15, 10, 2) and lengths.tolist() == [10] * 15
    assert dm.data_spec.data_shape == (10, 2)
    assert torch.cat(dm.splits["train"]).mean(0).abs().max() < 0.1


def test_bad_csv_input_fails_clearly(tmp_path):
    write_csv(tmp_path / "s.csv")
    with pytest.raises(ValueError, match=r"columns \['c'\] are not in"):
        CSVSequenceDataModule(str(tmp_path / "s.csv"), columns=["c"]).setup("fit")
    with pytest.raises(ValueError, match="the val split has 10 rows, fewer than window=20"):
        CSVSequenceDataModule(str(tmp_path / "s.csv"), window=20).setup("fit")
    (tmp_path / "bad.csv").write_text("a\n1\nx\n")
    with pytest.raises(ValueError, match="line 3 is not numeric"):
        CSVSequenceDataModule(str(tmp_path / "bad.csv")).setup("fit")
    with pytest.raises(ValueError, match="window and stride must be > 0"):
        CSVSequenceDataModule(window=0)


def test_pad_batch_pads_continuous_sequences_with_zeros():
    x, lengths = pad_batch([torch.ones(2, 3), torch.ones(4, 3)])
    assert x.shape == (2, 4, 3) and lengths.tolist() == [2, 4] and x[0, 2:].eq(0).all()
