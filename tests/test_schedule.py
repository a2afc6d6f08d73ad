"""Annealing schedules: the values of ``schedule_value`` and ``ParameterSchedule`` on a real training run."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from callbacks.schedule import SCHEDULES, ParameterSchedule, schedule_value
from dgm_lightning import VAE
from tests.helpers import images, trainer

# -- schedule_value ------------------------------------------------------------------------------


def value(kind: str, step: float, start: float = 0.0, end: float = 1.0, num_steps: int = 100, **kw) -> float:
    return schedule_value(kind, step, start=start, end=end, num_steps=num_steps, **kw)


def test_linear_start_mid_end_and_hold():
    assert value("linear", 0, 2.0, 4.0) == 2.0
    assert value("linear", 50, 2.0, 4.0) == pytest.approx(3.0)
    assert value("linear", 25, 2.0, 4.0) == pytest.approx(2.5)
    assert value("linear", 100, 2.0, 4.0) == pytest.approx(4.0)
    assert value("linear", 1000, 2.0, 4.0) == pytest.approx(4.0)


def test_cosine_endpoints_and_midpoint():
    assert value("cosine", 0) == pytest.approx(0.0, abs=1e-15)
    assert value("cosine", 50) == pytest.approx(0.5)
    assert value("cosine", 100) == pytest.approx(1.0)
    assert value("cosine", 250) == pytest.approx(1.0)
    # slow start: below the linear schedule in the first half
    assert value("cosine", 20) < value("linear", 20)


def test_sigmoid_endpoints_midpoint_and_monotone():
    assert value("sigmoid", 0, 1.0, 3.0) == pytest.approx(1.0, abs=1e-12)
    assert value("sigmoid", 100, 1.0, 3.0) == pytest.approx(3.0, abs=1e-12)
    assert value("sigmoid", 50, 1.0, 3.0) == pytest.approx(2.0, abs=1e-12)
    assert value("sigmoid", 500, 1.0, 3.0) == pytest.approx(3.0, abs=1e-12)
    values = [value("sigmoid", s) for s in range(101)]
    assert all(b > a for a, b in pairwise(values))


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_monotone_schedules_are_non_decreasing_and_within_range(kind):
    values = [value(kind, s, 0.2, 0.9) for s in range(0, 130)]
    assert all(b >= a for a, b in pairwise(values))
    assert min(values) == pytest.approx(0.2) and max(values) == pytest.approx(0.9)


def test_cyclical_fu_et_al():
    def cyc(step):
        return value("cyclical", step, 0.0, 1.0, num_steps=100, num_cycles=4, ratio=0.5)

    assert cyc(0) == 0.0
    assert cyc(6.25) == pytest.approx(0.5)
    assert cyc(12.5) == pytest.approx(1.0)
    assert cyc(20) == pytest.approx(1.0)
    assert cyc(24.9) == pytest.approx(1.0)
    assert cyc(25) == pytest.approx(0.0)
    assert cyc(37.5) == pytest.approx(1.0)
    assert cyc(50) == pytest.approx(0.0)
    assert cyc(99) == pytest.approx(1.0)
    # keeps cycling after num_steps
    assert cyc(100) == pytest.approx(cyc(0))
    assert cyc(106.25) == pytest.approx(0.5)
    assert cyc(137.5) == pytest.approx(1.0)


def test_cyclical_ratio_one_rises_over_the_whole_period():
    assert value("cyclical", 10, num_steps=40, num_cycles=2, ratio=1.0) == pytest.approx(0.5)
    assert value("cyclical", 19, num_steps=40, num_cycles=2, ratio=1.0) == pytest.approx(0.95)
    assert value("cyclical", 20, num_steps=40, num_cycles=2, ratio=1.0) == pytest.approx(0.0)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_decreasing_schedules(kind):
    assert value(kind, 0, 1.0, 0.25) == pytest.approx(1.0)
    end_step = 12.5 if kind == "cyclical" else 100
    assert value(kind, end_step, 1.0, 0.25) == pytest.approx(0.25)
    mid = 6.25 if kind == "cyclical" else 50
    assert value(kind, mid, 1.0, 0.25) == pytest.approx(0.625)


def test_schedule_value_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown schedule 'exponential'"):
        value("exponential", 3)


# -- ParameterSchedule: construction ----------------------------------------------------------------


def test_unknown_schedule_name_raises():
    with pytest.raises(ValueError, match="unknown schedule") as info:
        ParameterSchedule("beta", "exponential")  # type: ignore[arg-type]
    for kind in SCHEDULES:
        assert kind in str(info.value)


@pytest.mark.parametrize("num_steps", [0, -5])
def test_non_positive_num_steps_raises(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        ParameterSchedule("beta", num_steps=num_steps)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_cycles=0), r"num_steps and num_cycles must be > 0, got \d+ and 0"),
        (dict(ratio=0.0), r"ratio must be in \(0, 1\], got 0.0"),
        (dict(ratio=1.5), r"ratio must be in \(0, 1\], got 1.5"),
    ],
)
def test_bad_cycle_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParameterSchedule("beta", "cyclical", **kwargs)


def test_value_method_uses_the_configured_schedule():
    sched = ParameterSchedule("beta", "cosine", start=0.5, end=2.0, num_steps=10)
    for step in (0, 3, 5, 10, 20):
        assert sched.value(step) == schedule_value("cosine", step, start=0.5, end=2.0, num_steps=10)


def test_state_key_distinguishes_attributes():
    assert ParameterSchedule("beta").state_key != ParameterSchedule("free_bits").state_key
    assert ParameterSchedule("beta").state_key == ParameterSchedule("beta", "cosine").state_key


# -- ParameterSchedule: on a real model ----------------------------------------------------------


class Recorder(Callback):
    """Records an attribute of the model at fit start and before every training batch."""

    def __init__(self, attribute: str = "beta") -> None:
        self.attribute = attribute
        self.at_fit_start: float | None = None
        self.values: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.at_fit_start = getattr(pl_module, self.attribute)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.values.append(getattr(pl_module, self.attribute))


def _vae() -> VAE:
    return VAE(latent_dim=2, data_shape=(1, 8, 8), hidden_dims=[16])


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(images(32)), batch_size=8)  # 4 batches per epoch


def _linear(step: int) -> float:
    return schedule_value("linear", step, start=0.0, end=1.0, num_steps=8)


def test_schedule_sets_attribute_before_every_batch():
    model = _vae()
    sched, rec = ParameterSchedule("beta", "linear", num_steps=8), Recorder()
    trainer(max_epochs=2, callbacks=[sched, rec]).fit(model, _loader())
    assert rec.values == pytest.approx([_linear(i) for i in range(8)])
    assert rec.values[0] == 0.0 and rec.values[-1] == pytest.approx(7 / 8)
    assert rec.at_fit_start == 0.0  # constructor value 1.0 replaced before training starts
    assert model.beta == pytest.approx(7 / 8)
    assert sched.batches_seen == 8


def test_two_schedules_run_together():
    model = _vae()
    rec_beta, rec_fb = Recorder("beta"), Recorder("free_bits")
    callbacks = [
        ParameterSchedule("beta", "linear", num_steps=4),
        ParameterSchedule("free_bits", "cosine", start=1.0, end=0.0, num_steps=4),
        rec_beta,
        rec_fb,
    ]
    trainer(max_epochs=1, callbacks=callbacks).fit(model, _loader())
    assert rec_beta.values == pytest.approx([i / 4 for i in range(4)])
    expected_fb = [schedule_value("cosine", i, start=1.0, end=0.0, num_steps=4) for i in range(4)]
    assert rec_fb.values == pytest.approx(expected_fb)


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint")
def test_schedule_state_is_checkpointed_and_restored(tmp_path):
    first_rec = Recorder()
    first = trainer(
        max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path,
        callbacks=[ParameterSchedule("beta", "linear", num_steps=8), first_rec,
                   ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )  # fmt: skip
    first.fit(_vae(), _loader())
    assert first_rec.values == pytest.approx([_linear(i) for i in range(4)])
    last = tmp_path / "last.ckpt"
    assert last.is_file()

    sched, rec = ParameterSchedule("beta", "linear", num_steps=8), Recorder()
    model = _vae()
    second = trainer(max_epochs=2, callbacks=[sched, rec])
    second.fit(model, _loader(), ckpt_path=last)
    # the second epoch continues the schedule (batches 4..7) instead of restarting at 0
    assert rec.values == pytest.approx([_linear(i) for i in range(4, 8)])
    assert rec.at_fit_start == pytest.approx(_linear(4))
    assert sched.batches_seen == 8
    assert model.beta == pytest.approx(_linear(7))


def test_unknown_attribute_raises_at_fit_naming_schedulable_ones():
    sched = ParameterSchedule("betta", num_steps=8)  # construction does not know the model yet
    with pytest.raises(ValueError, match="betta") as info:
        trainer(max_epochs=1, callbacks=[sched]).fit(_vae(), _loader())
    message = str(info.value)
    assert "schedulable attributes" in message
    assert "beta" in message.split("schedulable attributes")[1]
    assert "free_bits" in message


def test_non_float_attribute_raises_at_fit():
    with pytest.raises(ValueError, match="latent_dim"):
        trainer(max_epochs=1, callbacks=[ParameterSchedule("latent_dim")]).fit(_vae(), _loader())


def test_schedule_logs_value_under_train_attribute():
    model = _vae()
    t = trainer(max_epochs=1, callbacks=[ParameterSchedule("beta", "linear", num_steps=8)])
    t.fit(model, _loader())
    assert math.isclose(float(t.callback_metrics["train/beta"]), _linear(3), rel_tol=1e-6)
