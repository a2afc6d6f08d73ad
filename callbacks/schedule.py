"""Anneal a float attribute of the model (a VAE's beta, a free-bits level, ...) batch by batch."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

SCHEDULES = ("linear", "cosine", "cyclical", "sigmoid")


def schedule_value(
    kind: str, step: int, *, start: float, end: float, num_steps: int, num_cycles: int = 4, ratio: float = 0.5
) -> float:
    """The scheduled value after ``step`` batches.

    ``linear``, ``cosine`` and ``sigmoid`` go from start to end over num_steps and then hold end.
    ``cyclical`` splits num_steps into num_cycles periods; in each it rises linearly from start to end
    over the first ``ratio`` of the period and holds end for the rest, and it keeps cycling afterwards.

    References: cyclical annealing, Fu et al. 2019, arXiv:1903.10145; sigmoid (logistic) annealing,
        Bowman et al. 2016, arXiv:1511.06349.
    """
    if kind == "cyclical":
        period = num_steps / num_cycles
        progress = min(1.0, (step % period) / (period * ratio))
    else:
        t = min(1.0, step / num_steps)
        if kind == "linear":
            progress = t
        elif kind == "cosine":
            progress = 0.5 * (1 - math.cos(math.pi * t))
        elif kind == "sigmoid":
            # a logistic curve over [0, 1], rescaled so that it starts and ends exactly at start and end
            k = 10.0
            lo, hi = 1 / (1 + math.exp(k / 2)), 1 / (1 + math.exp(-k / 2))
            progress = (1 / (1 + math.exp(-k * (t - 0.5))) - lo) / (hi - lo)
        else:
            raise ValueError(f"unknown schedule {kind!r}; choose one of: {', '.join(SCHEDULES)}")
    return start + (end - start) * progress


class ParameterSchedule(Callback):
    """Set ``pl_module.<attribute>`` before every training batch from a schedule; log it as train/<attribute>.

    Counts training batches itself (not ``global_step``, which advances once per optimizer step) and
    saves that count in checkpoints, so a resumed run continues the schedule where it stopped.

    Args:
        attribute: name of a float attribute of the model, e.g. ``beta``.
        schedule: ``linear``, ``cosine``, ``cyclical`` or ``sigmoid``.
        start: value at the first batch.
        end: value reached after ``num_steps`` batches (per cycle for ``cyclical``).
        num_steps: length of the schedule in training batches.
        num_cycles: cycles within num_steps (``cyclical`` only).
        ratio: share of each cycle spent rising (``cyclical`` only).
    """

    def __init__(
        self,
        attribute: str,
        schedule: Literal["linear", "cosine", "cyclical", "sigmoid"] = "linear",
        *,
        start: float = 0.0,
        end: float = 1.0,
        num_steps: int = 1000,
        num_cycles: int = 4,
        ratio: float = 0.5,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if num_steps <= 0 or num_cycles <= 0:
            raise ValueError(f"num_steps and num_cycles must be > 0, got {num_steps} and {num_cycles}")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.attribute = attribute
        self.schedule = schedule
        self.kwargs = dict(start=start, end=end, num_steps=num_steps, num_cycles=num_cycles, ratio=ratio)
        self.batches_seen = 0

    @property
    def state_key(self) -> str:
        # one state per annealed attribute, so that several schedules can run together
        return self._generate_state_key(attribute=self.attribute)

    def value(self, step: int) -> float:
        return schedule_value(self.schedule, step, **self.kwargs)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        current = getattr(pl_module, self.attribute, None)
        if not isinstance(current, float):
            floats = sorted(k for k, v in vars(pl_module).items() if isinstance(v, float) and not k.startswith("_"))
            raise ValueError(
                f"ParameterSchedule: {type(pl_module).__name__} has no float attribute {self.attribute!r}; "
                f"schedulable attributes: {', '.join(floats) or 'none'}"
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after a resume, the model holds its constructor value until the first batch; set it now
        setattr(pl_module, self.attribute, self.value(self.batches_seen))

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        value = self.value(self.batches_seen)
        setattr(pl_module, self.attribute, value)
        pl_module.log(f"train/{self.attribute}", value, on_step=True, on_epoch=False)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.batches_seen += 1

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = state_dict["batches_seen"]
