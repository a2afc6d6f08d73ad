"""Classifier: its objective (cross-entropy and accuracy), injected optimizer and scheduler, bad settings."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dgm_lightning import Classifier
from tests.helpers import images, trainer

TINY = dict(data_shape=(1, 8, 8), feature_dim=8, hidden_dims=(4,))


def test_the_objective_is_the_cross_entropy_of_the_labels_and_the_accuracy():
    torch.manual_seed(0)
    model = Classifier(3, **TINY).eval()
    x, y = images(6), torch.tensor([0, 1, 2, 0, 1, 2])
    objective = model.objective((x, y))
    logits = model(x)
    assert objective.batch_size == 6 and set(objective.terms) == {"loss", "accuracy"}
    torch.testing.assert_close(objective.loss, F.cross_entropy(logits, y))
    right = sum(int(logits[i].argmax() == y[i]) for i in range(6))  # by hand, example by example
    torch.testing.assert_close(objective.terms["accuracy"], torch.tensor(right / 6))
    with pytest.raises(ValueError, match=r"is conditional \(num_classes=3\) but the batch has no labels"):
        model.objective(x)


def test_an_injected_optimizer_and_scheduler_train_the_classifier():
    model = Classifier(2, **TINY, optimizer=partial(torch.optim.SGD, lr=0.1),
                       lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))  # fmt: skip
    assert not {"optimizer", "lr_scheduler", "lr"} & set(model.hparams)
    before = [p.detach().clone() for p in model.parameters()]
    fit = trainer(max_epochs=1)
    fit.fit(model, train_dataloaders=DataLoader(TensorDataset(images(8), torch.arange(8) % 2), batch_size=4))
    (optimizer,) = fit.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # 0.1, halved after the one epoch
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"feature_dim": 0}, "feature_dim must be a positive integer, got 0"),
        ({"optimizer": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)}, "optimizer must be a callable"),
        ({"lr_scheduler": 0.5}, "lr_scheduler must be a callable that builds it"),
    ],
)
def test_bad_constructor_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Classifier(3, **{**TINY, **kwargs})
