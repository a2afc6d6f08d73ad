"""The Trainer precision a model trains fastest in on the hardware at hand, by measurement (README "Scale, precision").

Measured on one thread of an Intel Xeon with AMX (Sapphire Rapids), batch 64, a plain loop: ``bf16-mixed`` made the
convolutional training steps 1.5-2.1x faster (conv VAE, DCGAN, Glow), left the MLPs as fast and made the LSTM VAE
6 % slower. Without AMX the CPU emulates bfloat16 convolutions, and GPUs are not measured yet (``benchmarks/gpu.py``),
so everywhere else the default stays ``32-true``. The resolved value is the run's: ``config.yaml`` and the loggers'
config record it, so a rerun from ``config.yaml`` trains in the same precision on any machine.
"""

from __future__ import annotations

import torch
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator
from torch import nn

from dgm_lightning.compat import cpu_has_bf16_matrix_units

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def default_precision(model: nn.Module, accelerator: str | Accelerator = "auto") -> str:
    """``"bf16-mixed"`` for a model with convolutions trained on a CPU with bfloat16 matrix units, else ``"32-true"``.

    In a Trainer of your own: ``L.Trainer(precision=default_precision(model))``; ``train.py`` does this for
    ``--trainer.precision auto``, its default. ``accelerator`` is the Trainer's (``"auto"`` is a CPU where torch sees
    no GPU).
    """
    if not on_cpu(accelerator) or not cpu_has_bf16_matrix_units():
        return "32-true"
    return "bf16-mixed" if any(isinstance(m, CONVOLUTIONS) for m in model.modules()) else "32-true"


def on_cpu(accelerator: str | Accelerator) -> bool:
    """Whether a Trainer given this ``accelerator`` trains on the CPU."""
    if isinstance(accelerator, Accelerator):
        return isinstance(accelerator, CPUAccelerator)
    if accelerator == "auto":
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return accelerator == "cpu"
