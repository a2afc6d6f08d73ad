"""Each private API in dgm_lightning/compat.py still behaves as the module expects (a new release fails here)."""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger

from dgm_lightning.compat import drop_unset_wandb_anonymous


def test_wandb_logger_keeps_its_init_arguments_in_wandb_init_and_only_an_unset_anonymous_is_dropped(tmp_path):
    unset = WandbLogger(save_dir=str(tmp_path), offline=True)
    given = WandbLogger(save_dir=str(tmp_path), offline=True, anonymous=True)
    assert unset._wandb_init["anonymous"] is None and given._wandb_init["anonymous"] == "allow"
    drop_unset_wandb_anonymous(unset)
    drop_unset_wandb_anonymous(given)
    assert "anonymous" not in unset._wandb_init and given._wandb_init["anonymous"] == "allow"
    assert unset._wandb_init["dir"] == str(tmp_path)  # the rest is left as it was
