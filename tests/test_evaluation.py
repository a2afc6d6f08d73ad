"""Evaluation that fits in memory and finishes: the IWAE bound drawn in chunks of samples, and a test-time batch
size of its own in every DataModule."""

from __future__ import annotations

import pytest
import torch

from datamodules import (
    CSVSequenceDataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    SequentialImageDataModule,
    TextLinesDataModule,
    Toy2DDataModule,
)
from dgm_lightning import VAE, FlowVAE, RecurrentVAE, objectives
from dgm_lightning.vocabulary import SPECIALS
from tests.helpers import images

VOCAB = SPECIALS + tuple("abcde ")


def test_chunked_log_weights_draws_the_samples_chunk_by_chunk_and_keeps_them_all():
    drawn = []

    def log_weights(k: int):
        drawn.append(k)
        start = sum(drawn[:-1])
        log_px = torch.arange(start, start + k, dtype=torch.float64)[:, None].expand(k, 2)
        return log_px, torch.ones(k, 2, dtype=torch.float64), torch.full((k, 2), 0.5, dtype=torch.float64)

    log_w = objectives.chunked_log_weights(log_weights, 10, 4)
    assert drawn == [4, 4, 2]
    torch.testing.assert_close(log_w, torch.arange(10, dtype=torch.float64)[:, None].expand(10, 2) + 0.5)


def image_model(cls, **kwargs):
    return cls(latent_dim=4, data_shape=(1, 8, 8), hidden_dims=[32], **kwargs)


def token_batch():
    x = torch.randint(len(SPECIALS), len(VOCAB), (4, 6), generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([6, 4, 5, 3])


CASES = {
    "VAE": (lambda **kw: image_model(VAE, **kw), lambda: (images(4),)),
    "FlowVAE": (lambda **kw: image_model(FlowVAE, num_flows=2, **kw), lambda: (images(4),)),
    "RecurrentVAE": (
        lambda **kw: RecurrentVAE(vocab=VOCAB, latent_dim=4, embedding_dim=8, hidden_dims=(16,), **kw),
        token_batch,
    ),
}


@pytest.mark.parametrize("family", list(CASES))
def test_the_iwae_bound_in_chunks_is_the_bound_in_one_pass_and_decodes_a_chunk_at_a_time(family):
    build, batch = CASES[family]
    inputs, decoded = batch(), []
    one_pass, chunked = build(iwae_chunk_size=64).eval(), build(iwae_chunk_size=3).eval()
    chunked.load_state_dict(one_pass.state_dict())
    chunked.decoder.register_forward_pre_hook(lambda module, args: decoded.append(args[0].shape[0]))
    with torch.no_grad():
        torch.manual_seed(0)
        expected = one_pass.log_prob(*inputs, num_samples=16)
        torch.manual_seed(0)  # 4 examples x 4 latent dimensions: the chunks draw the one pass's noise
        actual = chunked.log_prob(*inputs, num_samples=16)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)
    assert max(decoded) == 4 * 3 and sum(decoded) == 4 * 16  # all 16 samples, 3 at a time


@pytest.mark.parametrize("family", list(CASES))
def test_a_chunk_size_below_one_is_refused(family):
    with pytest.raises(ValueError, match="iwae_chunk_size"):
        CASES[family][0](iwae_chunk_size=0)


DATAMODULES = {
    "digits": lambda **kw: DigitsDataModule(**kw),
    "toy2d": lambda **kw: Toy2DDataModule(num_train=300, num_val=100, num_test=100, **kw),
    "text": lambda **kw: TextLinesDataModule(**kw),
    "csv": lambda **kw: CSVSequenceDataModule(window=4, stride=1, **kw),
    "rows": lambda **kw: SequentialImageDataModule("digits", **kw),
}


def first_batch_size(loader) -> int:
    batch = next(iter(loader))
    return (batch[0] if isinstance(batch, (list, tuple)) else batch).shape[0]


@pytest.mark.parametrize("name", list(DATAMODULES))
def test_validation_test_and_predict_batches_have_their_own_size(name):
    data = DATAMODULES[name](batch_size=8, eval_batch_size=20)
    data.setup("fit")
    data.setup("test")
    assert first_batch_size(data.train_dataloader()) == 8
    for loader in (data.val_dataloader(), data.test_dataloader(), data.predict_dataloader()):
        assert len(loader.dataset) > 20 and first_batch_size(loader) == 20
    with pytest.raises(ValueError, match="eval_batch_size"):
        DATAMODULES[name](batch_size=8, eval_batch_size=0)


def test_the_evaluation_batch_is_larger_than_the_training_batch_by_default():
    data = FashionMNISTDataModule()  # no files needed to read its settings
    assert data.hparams.batch_size == 128 and data.eval_batch_size == 512
