"""What reaches a model is checked: value range and labels of the user's own data, non-finite settings, the public
protocol's inputs (encode, decode, log_prob, sample) and files that are not checkpoints (issue 18, points 2, 9-11)."""

from __future__ import annotations

import math
import pickle
from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dgm_lightning import AE, GAN, VAE, Classifier, Flow, FlowVAE, RecurrentVAE
from tests.helpers import trainer

IMG = (1, 4, 4)
STEPS, FEATURES = 5, 3  # of the RecurrentVAE's continuous sequences
NAN, INF = float("nan"), float("inf")


def build(family: str, **kwargs) -> L.LightningModule:
    """A tiny model of a family; kwargs replace its settings."""
    small = dict(latent_dim=2, data_shape=IMG, hidden_dims=[8])
    builders = {
        "ae": lambda: AE(**{**small, **kwargs}),
        "vae": lambda: VAE(**{**small, **kwargs}),
        "flowvae": lambda: FlowVAE(**{**small, "num_flows": 1, **kwargs}),
        "flow": lambda: Flow(
            "realnvp", **{"data_shape": IMG, "num_scales": 1, "num_steps": 1, "hidden_dims": (4, 4), **kwargs}
        ),
        "gan": lambda: GAN(**{**small, "architecture": "mlp", **kwargs}),
        "classifier": lambda: Classifier(**{"num_classes": 3, "data_shape": IMG, "hidden_dims": (4,), **kwargs}),
        "rvae": lambda: RecurrentVAE(
            **{"likelihood": "bernoulli", "input_dim": FEATURES, "latent_dim": 2, "hidden_dims": [8], **kwargs}
        ),
    }
    return builders[family]()


FAMILIES = ["ae", "vae", "flowvae", "flow", "gan", "classifier", "rvae"]
GENERATIVE = [f for f in FAMILIES if f != "classifier"]
CONDITIONAL = ["ae", "vae", "flowvae", "flow", "gan", "classifier"]


def data(model: L.LightningModule, n: int = 8, *, beyond: float = 0.5) -> torch.Tensor:
    """n examples for the model whose values reach ``beyond`` of the range's width past both ends of value_range."""
    low, high = model.value_range
    shape = (STEPS, FEATURES) if isinstance(model, RecurrentVAE) else model.data_shape
    unit = torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))
    unit.view(n, -1)[:, 0], unit.view(n, -1)[:, 1] = 0.0, 1.0  # every example spans the whole stretch
    return low + (high - low) * (unit * (1 + 2 * beyond) - beyond)


class OwnData(L.LightningDataModule):
    """A user's DataModule: it declares nothing (no data_spec), so only the batches tell what it yields."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__()
        self.dataset = TensorDataset(*tensors)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=4)

    val_dataloader = test_dataloader = predict_dataloader = train_dataloader


def run(model: L.LightningModule, stage: str, *tensors: torch.Tensor, **trainer_kwargs) -> None:
    """One stage of a Trainer on the user's own data (a RecurrentVAE takes its (x, lengths) pairs as loaders)."""
    t = trainer(**{"fast_dev_run": True, **trainer_kwargs})
    if isinstance(model, RecurrentVAE):
        tensors = (*tensors, torch.full((tensors[0].shape[0],), STEPS))
        loader = OwnData(*tensors).train_dataloader()
        loaders = {"fit": {"train_dataloaders": loader}}.get(stage, {"dataloaders": loader})
        return getattr(t, stage)(model, **loaders)
    getattr(t, stage)(model, datamodule=OwnData(*tensors))


def with_labels(model: L.LightningModule, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple:
    if getattr(model, "num_classes", None) is None:
        return (x,)
    return x, torch.arange(x.shape[0]) % model.num_classes if labels is None else labels


# -- point 2: data outside value_range, labels outside [0, num_classes) -------------------------------------------


@pytest.mark.parametrize("stage", ["fit", "validate", "predict"])
@pytest.mark.parametrize("family", FAMILIES)
def test_data_outside_the_value_range_from_the_users_own_datamodule_is_named(family, stage):
    if family == "classifier" and stage == "predict":
        pytest.skip("a Classifier has no predict step")
    model = build(family)
    x = data(model)
    low, high = model.value_range
    width = high - low
    what = "a training batch" if stage == "fit" else "a batch to evaluate"
    message = (
        rf"expects values in value_range \({low}, {high}\) but {what} holds values from {low - width / 2:g} to "
        rf"{high + width / 2:g}; .*(--model.value_range|--model.likelihood gaussian)"  # the flag to change
    )
    with pytest.raises(ValueError, match=message):
        run(model, stage, *with_labels(model, x))


@pytest.mark.parametrize("family", ["ae", "vae", "flowvae", "rvae"])
def test_data_outside_a_bernoulli_likelihoods_range_points_to_a_gaussian_likelihood(family):
    model = build(family)
    with pytest.raises(
        ValueError, match=r"the bernoulli likelihood models values in \(0, 1\).*--model.likelihood gaussian"
    ):
        run(model, "fit", data(model))


def test_two_moons_into_a_default_flow_are_refused_instead_of_a_negative_nll():
    """The issue's case: a Flow with its defaults (logit, value_range (0, 1)) on points in -1 .. 2 reported -44 nats."""
    from datamodules.toy2d import sample_toy2d

    points = sample_toy2d("two_moons", 64, torch.Generator().manual_seed(0))
    assert points.min() < -1 and points.max() > 1.5
    model = Flow("realnvp", data_shape=(2,), num_steps=2, hidden_dims=(8, 8))
    with pytest.raises(ValueError, match=r"value_range \(0.0, 1.0\) but a training batch holds values from -"):
        run(model, "fit", points)


@pytest.mark.parametrize("family", CONDITIONAL)
def test_labels_outside_the_classes_are_named_in_training_and_evaluation(family):
    model = build(family, num_classes=3)
    x = data(model, beyond=0.0)
    labels = torch.tensor([0, 1, 2, 3] * 2)  # 3 is no class of a 3-class model
    for stage, what in [("fit", "a training batch"), ("validate", "a batch to evaluate")]:
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, 3\), but {what} has labels from 0 to 3"):
            run(model, stage, x, labels)


@pytest.mark.parametrize("family", ["vae", "gan"])
def test_training_checks_only_the_first_batch_of_each_epoch_and_evaluation_every_batch(family, monkeypatch):
    """The range check waits for the device: in steady-state training it must not run at all."""
    model = build(family)
    calls = []
    check = model.check_values
    monkeypatch.setattr(model, "check_values", lambda *a, **k: (calls.append(k["what"]), check(*a, **k)))
    x = data(model, n=12, beyond=0.0)  # 3 batches of 4
    run(model, "fit", x, fast_dev_run=False, max_epochs=2, limit_val_batches=0)
    assert calls == ["a training batch"] * 2
    calls.clear()
    run(model, "validate", x, fast_dev_run=False)
    assert calls == ["a batch to evaluate"] * 3


def test_padding_after_a_sequences_end_is_not_checked():
    model = build("rvae")
    x = data(model, beyond=0.0)
    x[:, -2:] = 7.0  # padding: outside (0, 1), but after each sequence's last real step
    lengths = torch.full((x.shape[0],), STEPS - 2)
    trainer(fast_dev_run=True).fit(model, train_dataloaders=DataLoader(TensorDataset(x, lengths), batch_size=4))
    with pytest.raises(ValueError, match="holds values from 0 to 7"):
        model.encode(x, torch.full((x.shape[0],), STEPS))


# -- point 9: non-finite settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, kwargs, message",
    [
        ("vae", {"beta": NAN}, "beta must be >= 0 and finite, got nan"),
        ("vae", {"beta": INF}, "beta must be >= 0 and finite, got inf"),
        ("vae", {"free_bits": INF}, "free_bits must be >= 0 and finite"),
        ("vae", {"likelihood": "gaussian", "value_range": (-INF, INF)}, "value_range .* both finite"),
        ("vae", {"num_classes": 2.5}, "num_classes must be >= 2 .* got 2.5"),
        ("ae", {"gaussian_scale": INF}, "gaussian_scale must be > 0 and finite"),
        ("flowvae", {"beta": INF}, "beta must be >= 0 and finite"),
        ("flow", {"logit_alpha": NAN}, r"logit_alpha must be in \(0, 0.5\), got nan"),
        ("gan", {"gp_weight": NAN}, "gp_weight must be >= 0 and finite, got nan"),
        ("gan", {"r1_gamma": INF}, "r1_gamma must be >= 0 and finite"),
        ("gan", {"instance_noise": NAN}, "instance_noise must be >= 0 and finite"),
        ("gan", {"ema_rampup": INF}, "ema_rampup must be > 0 and finite"),
        ("gan", {"gradient_clip_val": INF}, "gradient_clip_val must be > 0 and finite"),
        ("rvae", {"beta": NAN}, "beta must be >= 0 and finite"),
        ("rvae", {"free_bits": INF}, "free_bits must be >= 0 and finite"),
        ("rvae", {"gaussian_scale": INF, "likelihood": "gaussian"}, "gaussian_scale must be > 0 and finite"),
        ("classifier", {"feature_dim": INF}, "feature_dim must be a positive integer, got inf"),
    ],
)
def test_non_finite_settings_are_refused_where_they_are_given(family, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(family, **kwargs)


@pytest.mark.parametrize("lr", [INF, NAN, 0.0])
def test_an_injected_optimizer_with_a_learning_rate_that_is_not_finite_and_positive_is_refused(lr):
    model = build("ae", optimizer=partial(torch.optim.SGD, lr=lr))
    with pytest.raises(ValueError, match=rf"optimizer builds SGD with lr {lr}, which would train nothing"):
        model.configure_optimizers()


@pytest.mark.parametrize("family", GENERATIVE)
def test_sample_refuses_a_fractional_count_and_a_non_finite_temperature(family):
    model = build(family)
    with pytest.raises(ValueError, match="n must be a positive integer, got 2.5"):
        model.sample(2.5)
    for temperature in (NAN, INF, -1.0):
        with pytest.raises(ValueError, match=rf"temperature must be a finite number >= 0 .*got {temperature}"):
            model.sample(2, temperature=temperature)
    assert model.sample(2, temperature=0.5).isfinite().all()


@pytest.mark.parametrize("family", ["vae", "flowvae", "rvae"])
def test_log_prob_refuses_a_fractional_number_of_samples(family):
    model = build(family)
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got 2.5"):
        model.log_prob(data(model, beyond=0.0), num_samples=2.5)


# -- point 10: the public protocol checks its input --------------------------------------------------------------

PUBLIC_INPUTS = [
    ("ae", "encode"), ("vae", "encode"), ("vae", "log_prob"), ("flowvae", "encode"), ("flowvae", "log_prob"),
    ("flow", "log_prob"), ("rvae", "encode"), ("rvae", "log_prob"), ("rvae", "reconstruct"),
]  # fmt: skip


@pytest.mark.parametrize("family, method", PUBLIC_INPUTS)
def test_encode_and_log_prob_refuse_nan_and_values_outside_the_range(family, method):
    model = build(family)
    x = data(model, n=2, beyond=0.0)
    x.view(-1)[3] = NAN
    with pytest.raises(ValueError, match=f"the input of {method} holds NaN or Inf values"):
        getattr(model, method)(x)
    x = data(model, n=2)
    with pytest.raises(ValueError, match=rf"expects values in .*value_range.* but the input of {method} holds values"):
        getattr(model, method)(x)
    assert getattr(model, method)(data(model, n=2, beyond=0.0)).isfinite().all()


@pytest.mark.parametrize("family, method", [pair for pair in PUBLIC_INPUTS if pair[0] != "rvae"])
def test_encode_and_log_prob_name_the_expected_and_the_given_shape(family, method):
    model = build(family)
    with pytest.raises(ValueError, match=rf"expects the input of {method} of shape \(B, 1, 4, 4\) but got \(2, 16\)"):
        getattr(model, method)(torch.rand(2, 16))


def test_flow_log_prob_takes_dequantized_values_up_to_one_step_above_the_range():
    model = build("flow")  # 256 levels in (0, 1): dequantized data fill [0, 1 + 1/255)
    assert model.log_prob(torch.full((1, *IMG), 1 + 0.5 / 255)).isfinite().all()
    with pytest.raises(ValueError, match=r"expects values in \[0, 1.00392\] \(from value_range \(0.0, 1.0\)\)"):
        model.log_prob(torch.full((1, *IMG), 1 + 2 / 255))


@pytest.mark.parametrize("family", ["ae", "vae", "flowvae"])  # RecurrentVAE: generate, in test_recurrent_vae.py
def test_decode_names_codes_of_the_wrong_shape_and_refuses_nan(family):
    model = build(family)
    with pytest.raises(ValueError, match=r"expects codes of shape \(B, 2\) \(latent_dim\) as the input of decode, but "
                                         r"got \(3, 5\)"):  # fmt: skip
        model.decode(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="the input of decode holds NaN or Inf values"):
        model.decode(torch.tensor([[0.0, NAN]]))


def test_classifier_features_name_images_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, 4, 4\) but got \(2, 3, 4, 4\)"):
        build("classifier").features(torch.rand(2, 3, 4, 4))


# -- point 11: files that are not checkpoints ---------------------------------------------------------------------

CLASSES = [AE, VAE, FlowVAE, Flow, GAN, Classifier, RecurrentVAE]


def not_checkpoints(folder) -> dict:
    """Files that load_from_checkpoint must refuse, by kind, and what their error says."""
    checkpoint = folder / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, checkpoint)
    whole = checkpoint.read_bytes()
    files = {
        "garbage": (b"not a checkpoint at all " * 40, "neither a zip archive"),
        "pickle": (pickle.dumps({"state_dict": {}}), "neither a zip archive"),
        "truncated": (whole[: len(whole) // 2], "PytorchStreamReader failed reading zip archive"),
        "empty": (b"", "neither a zip archive"),
    }
    paths = {}
    for kind, (content, reason) in files.items():
        (folder / f"{kind}.ckpt").write_bytes(content)
        paths[kind] = (folder / f"{kind}.ckpt", rf"is not a readable checkpoint \({reason}")
    torch.save({"weights": torch.zeros(2)}, folder / "foreign.ckpt")
    paths["foreign"] = (folder / "foreign.ckpt", "not a checkpoint of a dgm-lightning model")
    return paths


@pytest.mark.parametrize("model_cls", CLASSES, ids=lambda cls: cls.__name__)
def test_load_from_checkpoint_says_a_file_is_no_checkpoint_without_advising_weights_only_false(model_cls, tmp_path):
    for kind, (path, message) in not_checkpoints(tmp_path).items():
        with pytest.raises(ValueError, match=message) as error:
            model_cls.load_from_checkpoint(path)
        assert "weights_only" not in str(error.value), kind
        shown = error.value.__cause__ or (None if error.value.__suppress_context__ else error.value.__context__)
        assert shown is None, kind  # torch's error, with its advice, is not shown as the cause


def test_a_checkpoint_that_needs_code_to_load_is_refused_naming_it(tmp_path):
    import argparse

    torch.save({"state_dict": {}, "hyper_parameters": {"args": argparse.Namespace(a=1)}}, tmp_path / "code.ckpt")
    with pytest.raises(ValueError, match=r"refers to code, which loading would run: .*argparse.Namespace") as error:
        VAE.load_from_checkpoint(tmp_path / "code.ckpt")
    assert "weights_only" not in str(error.value)


def test_load_from_checkpoint_still_loads_and_still_refuses_a_call_on_an_instance(tmp_path):
    model = build("vae", likelihood="gaussian", beta=0.5)
    t = trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    t.fit(model, datamodule=OwnData(data(model, beyond=0.0)))
    t.save_checkpoint(tmp_path / "model.ckpt")
    restored = VAE.load_from_checkpoint(tmp_path / "model.ckpt", beta=0.25)
    assert restored.beta == 0.25 and restored.likelihood == "gaussian"
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values(), strict=True)
    )
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        model.load_from_checkpoint(tmp_path / "model.ckpt")
    assert math.isfinite(restored.log_prob(data(model, n=2, beyond=0.0), num_samples=2).sum().item())
