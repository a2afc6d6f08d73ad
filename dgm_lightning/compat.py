"""The private APIs of Lightning and its loggers that dgm-lightning relies on, in one place, each covered by a test
(tests/test_compat.py) so that a release that changes one fails there, by name."""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger


def drop_unset_wandb_anonymous(logger: WandbLogger) -> None:
    """Stop WandbLogger from passing ``anonymous=None`` to ``wandb.init``, which recent wandb releases answer with
    "The anonymous setting has no effect and will be removed" on every run. WandbLogger keeps its ``wandb.init``
    arguments in the private ``_wandb_init``; only an unset value (None) is dropped, so ``anonymous=True`` is
    still passed on. Call before the run starts (before the first use of ``logger.experiment``)."""
    if logger._wandb_init.get("anonymous", "set") is None:
        del logger._wandb_init["anonymous"]


def restricted_classmethod(method):
    """Lightning's ``classmethod`` that refuses a call on an instance, such as ``model.load_from_checkpoint(path)``,
    whose loaded model would be dropped: ``LightningModule.load_from_checkpoint`` is one, so an override keeps that
    guard with it. Private in ``lightning.pytorch.utilities.model_helpers``."""
    from lightning.pytorch.utilities.model_helpers import _restricted_classmethod

    return _restricted_classmethod(method)
