"""Flow (RealNVP, Glow): exact likelihood bookkeeping, learning, sampling, conditioning, divergence policy."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.autograd.functional import jacobian
from torch.distributions import Normal
from torch.utils.data import DataLoader, TensorDataset

from callbacks.density import density_panels
from datamodules import DigitsDataModule, Toy2DDataModule
from dgm_lightning import Flow
from dgm_lightning.nets import flow_layers
from dgm_lightning.nets.flow_layers import AffineCoupling, FlowSequential, alternating_mask, mlp_coupling_net
from tests.helpers import images, trainer

DTYPE = torch.float64
TINY = dict(num_scales=2, num_steps=2, hidden_dims=(8, 8))


def perturb(model: nn.Module) -> nn.Module:
    """Move every parameter off its identity-like initialisation, so that tests see a generic flow."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()  # eval: ActNorm keeps its parameters instead of initialising from the data


MODELS = {
    "glow-image-logit": dict(architecture="glow", data_shape=(1, 4, 4), quantization_levels=17, **TINY),
    "realnvp-image-logit": dict(architecture="realnvp", data_shape=(2, 4, 4), value_range=(-1.0, 1.0), **TINY),
    "realnvp-vector": dict(
        architecture="realnvp",
        data_shape=(3,),
        value_range=(-4.0, 4.0),
        quantization_levels=None,
        preprocessing="none",
        num_steps=3,
        hidden_dims=(8, 8),
    ),  # fmt: skip
    "glow-vector-conditional": dict(
        architecture="glow", data_shape=(2,), num_classes=3, quantization_levels=5, num_steps=2, hidden_dims=(8, 8)
    ),
    # coupling networks of three hidden layers of other widths: 3x3, 1x1, 1x1, 3x3 convolutions; a 4-layer MLP
    "realnvp-image-widths": dict(
        architecture="realnvp", data_shape=(1, 4, 4), num_scales=2, num_steps=2, hidden_dims=(16, 8, 16)
    ),
    "glow-vector-widths": dict(
        architecture="glow",
        data_shape=(3,),
        value_range=(-2.0, 2.0),
        quantization_levels=None,
        preprocessing="none",
        num_steps=2,
        hidden_dims=(16, 8, 16),
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", MODELS)
def test_whole_model_inverts_and_its_log_prob_matches_the_autograd_jacobian(name):
    model = perturb(Flow(**MODELS[name]).double())
    low, high = model.value_range
    x = low + (high - low) * torch.rand(2, *model.data_shape, dtype=DTYPE)
    labels = torch.tensor([0, 2]) if model.num_classes else None

    def to_z(xi: torch.Tensor) -> torch.Tensor:
        return model.flow(model.preprocess(xi[None]))[0][0]

    z = torch.stack([to_z(xi) for xi in x])
    torch.testing.assert_close(model.preprocess.inv(model.flow.inverse(z)), x, atol=1e-4, rtol=0)
    log_prob = model.log_prob(x, labels=labels)
    for i in range(2):
        jac = jacobian(to_z, x[i]).reshape(x[i].numel(), x[i].numel())
        base = model.base_distribution(None if labels is None else labels[i : i + 1])
        expected = base.log_prob(z[i].flatten()[None])[0] + torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(log_prob[i], expected, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize(
    "kwargs, box",
    [
        # dequantized data fill [0, 1 + delta); a tiny logit_alpha leaves no base mass outside the data space
        (dict(quantization_levels=5, preprocessing="logit", logit_alpha=1e-6), (0.0, 1.0 + 1 / 4)),
        (dict(quantization_levels=None, preprocessing="logit", logit_alpha=1e-6), (0.0, 1.0)),
        # without preprocessing the density covers the plane; log_prob takes points in value_range only
        (dict(quantization_levels=None, preprocessing="none", value_range=(-9.0, 9.0)), (-9.0, 9.0)),
    ],
    ids=["dequantized-logit", "continuous-logit", "none"],
)
def test_the_density_integrates_to_one_over_the_data_space(kwargs, box):
    """Every change-of-variables term (scaling to [0, 1], logit, flow) counted: a 2D density must integrate to 1."""
    model = perturb(Flow("realnvp", data_shape=(2,), num_steps=2, hidden_dims=(8, 8), **kwargs).double())
    n = 801
    edges = torch.linspace(*box, n + 1, dtype=DTYPE)
    mid = (edges[1:] + edges[:-1]) / 2  # midpoint rule copes with the logit's integrable edges
    grid = torch.cartesian_prod(mid, mid)
    with torch.no_grad():
        mass = model.log_prob(grid).exp().sum() * (edges[1] - edges[0]) ** 2
    assert abs(mass.item() - 1) < 0.01, mass


def test_the_logit_margin_only_loses_mass_so_the_nll_is_an_upper_bound():
    """logit_alpha > 0 maps the data space onto a bounded part of the base; the rest of its mass is wasted."""
    model = perturb(
        Flow("realnvp", data_shape=(2,), quantization_levels=None, num_steps=2, hidden_dims=(8, 8)).double()
    )
    mid = (torch.arange(800, dtype=DTYPE) + 0.5) / 800
    with torch.no_grad():
        mass = model.log_prob(torch.cartesian_prod(mid, mid)).exp().mean()
    assert 0.5 < mass < 1


def test_nll_and_bits_per_dim_of_a_known_density():
    """An identity flow without preprocessing: the model is N(0, I) on dequantized data x + delta * u."""
    model = Flow(data_shape=(3,), value_range=(0.0, 1.0), quantization_levels=5, preprocessing="none",
                 flow=FlowSequential())  # fmt: skip
    x = torch.tensor([[0.0, 0.25, 1.0], [0.5, 0.75, 0.0]])
    torch.manual_seed(1)
    terms = model.objective(x).terms
    torch.manual_seed(1)
    dequantized = x + 0.25 * torch.rand_like(x)
    nll = -Normal(0.0, 1.0).log_prob(dequantized).sum(1).mean()
    torch.testing.assert_close(terms["nll"], nll)
    # bits/dim of the discrete data: each of the 5 levels is a cell of width 1/4
    torch.testing.assert_close(terms["bpd"], (nll / 3 + math.log(4)) / math.log(2))
    continuous = Flow(data_shape=(3,), quantization_levels=None, preprocessing="none", flow=FlowSequential())
    terms = continuous.objective(x).terms
    torch.testing.assert_close(terms["bpd"], -Normal(0.0, 1.0).log_prob(x).sum(1).mean() / (3 * math.log(2)))


def test_a_uniform_model_of_discrete_data_costs_log2_levels_bits():
    """Logit preprocessing with a logistic base is uniform on [0, 1): exactly log2(levels) bits per dimension."""
    model = Flow(data_shape=(2,), quantization_levels=17, logit_alpha=1e-9, flow=FlowSequential())
    model.base_distribution = lambda labels: torch.distributions.Independent(  # standard logistic, log-density
        torch.distributions.TransformedDistribution(
            torch.distributions.Uniform(torch.zeros(2), torch.ones(2)), [torch.distributions.SigmoidTransform().inv]
        ),
        1,
    )
    x = torch.randint(0, 17, (64, 2)) / 16.0
    bpd = model.objective(x).terms["bpd"]
    torch.testing.assert_close(bpd, torch.tensor(math.log2(17)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("architecture", ["glow", "realnvp"])
def test_finite_likelihood_at_initialisation_and_every_parameter_gets_a_gradient(architecture):
    model = Flow(architecture, data_shape=(1, 8, 8), num_classes=10, quantization_levels=17, **TINY)
    x, y = images(8), torch.arange(8)
    terms = model.objective((x, y)).terms  # first pass: ActNorm initialises from this batch
    assert all(v.isfinite() for v in terms.values())
    assert 0 < terms["bpd"] < 2 * math.log2(17)
    perturb(model).train()
    model.objective((x, y)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def rbf_mmd(a: torch.Tensor, b: torch.Tensor, bandwidth: float = 0.5) -> float:
    """Squared maximum mean discrepancy of two point sets (N, D), (M, D) with a Gaussian kernel (biased estimate)."""
    kernel = lambda x, y: torch.exp(-torch.cdist(x, y).square() / (2 * bandwidth**2))  # noqa: E731
    return (kernel(a, a).mean() + kernel(b, b).mean() - 2 * kernel(a, b).mean()).item()


def test_two_moons_test_nll_falls_clearly_below_the_base_density_and_samples_move_onto_the_moons():
    data = Toy2DDataModule("two_moons", num_train=4000, num_val=200, num_test=1000, batch_size=200)
    data.setup()
    model = Flow("realnvp", data_shape=(2,), value_range=(-4.0, 4.0), quantization_levels=None,
                 preprocessing="none", num_steps=6, hidden_dims=(32, 32),
                 optimizer=partial(torch.optim.Adam, lr=5e-3))  # fmt: skip
    test_points = data.splits["test"].tensors[0]
    base_nll = -Normal(0.0, 1.0).log_prob(test_points).sum(1).mean().item()
    trainer(max_epochs=12, limit_val_batches=0).fit(model, datamodule=data)
    (metrics,) = trainer().test(model, datamodule=data, verbose=False)
    # seen: 3.83 nats under the base density (which is also the model's at initialisation), 2.57 after training
    assert metrics["test/nll"] < base_nll - 0.8, (metrics, base_nll)
    assert metrics["test/bpd"] == pytest.approx(metrics["test/nll"] / (2 * math.log(2)), rel=1e-4)
    # the samples, not only the density: seen MMD^2 to the test points 0.056 for the base, 0.0068 after training
    # (0.0019 for as many training points)
    mmd_samples, mmd_base = rbf_mmd(model.sample(1000), test_points), rbf_mmd(torch.randn(1000, 2), test_points)
    assert mmd_samples < 0.25 * mmd_base, (mmd_samples, mmd_base)


def test_samples_lie_on_the_data_grid_in_value_range_and_follow_the_labels():
    model = Flow("glow", data_shape=(1, 8, 8), value_range=(-1.0, 1.0), quantization_levels=17, num_classes=10, **TINY)
    samples = model.sample(6, temperature=0.7)
    assert samples.shape == (6, 1, 8, 8) and samples.min() >= -1 and samples.max() <= 1
    levels = (samples + 1) / 2 * 16
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    with torch.no_grad():  # move the base of class 3: the same noise must give other samples
        model.base_loc[3] = 1.0
    threes, zeros = torch.full((4,), 3), torch.zeros(4, dtype=torch.long)
    torch.manual_seed(0)
    a = model.sample(4, labels=threes)
    torch.manual_seed(0)
    assert not torch.equal(a, model.sample(4, labels=zeros))
    modes = model.sample(3, labels=threes[:3], temperature=0.0)  # temperature 0: the class's mode, every time
    assert torch.equal(modes[0], modes[1]) and torch.equal(modes[0], modes[2])
    with pytest.raises(ValueError, match="must lie in"):
        model.sample(2, labels=torch.tensor([0, 10]))


def test_class_conditional_flow_prefers_the_true_labels_after_training():
    torch.manual_seed(0)
    y = torch.arange(256) % 2
    x = torch.randn(256, 2) * 0.3 + torch.tensor([[-2.0, 0.0], [2.0, 0.0]])[y]
    model = Flow("realnvp", data_shape=(2,), value_range=(-4.0, 4.0), num_classes=2, quantization_levels=None,
                 preprocessing="none", num_steps=2, hidden_dims=(16, 16),
                 optimizer=partial(torch.optim.Adam, lr=1e-2))  # fmt: skip
    trainer(max_epochs=20).fit(model, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=64))
    with torch.no_grad():
        right, wrong = model.log_prob(x, labels=y).mean(), model.log_prob(x, labels=1 - y).mean()
    assert right > wrong + 2, (right, wrong)


class OverflowingLogdet(nn.Module):
    """A layer whose log-determinant overflows float32, as an exploding coupling scale would."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(100.0))

    def forward(self, x):
        return x, self.log_scale.exp().expand(x.shape[0]) * 1e10  # exp(100) * 1e10 = inf in float32

    def inverse(self, y):
        return y


def test_an_overflowing_logdet_skips_the_step_without_touching_the_weights_then_stops():
    coupling = AffineCoupling(alternating_mask(2, 0), mlp_coupling_net(2, (8, 8)), scale="tanh")
    flow = FlowSequential(perturb(coupling), OverflowingLogdet())
    model = Flow(data_shape=(2,), quantization_levels=None, preprocessing="none", flow=flow)
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(TensorDataset(torch.rand(8, 2)), batch_size=8)  # in the default value_range (0, 1)
    with pytest.warns(UserWarning, match="non-finite loss terms: loss, nll, bpd"):
        trainer(max_epochs=1).fit(model, train_dataloaders=loader)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    model.max_nonfinite_steps = 3
    loader = DataLoader(TensorDataset(torch.rand(32, 2)), batch_size=8)
    with pytest.raises(FloatingPointError, match=r"non-finite loss terms \(loss, nll, bpd\) in 3 training steps"):
        trainer(max_epochs=1).fit(model, train_dataloaders=loader)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_fit_test_predict_and_resume_from_a_checkpoint_on_digits(tmp_path):
    digits = DigitsDataModule(batch_size=64, eval_batch_size=100)
    model = Flow("glow", data_shape=(1, 8, 8), quantization_levels=17, num_classes=10, **TINY)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, enable_checkpointing=True,
                callbacks=[checkpoint])  # fmt: skip
    t.fit(model, datamodule=digits)
    (metrics,) = trainer(limit_test_batches=2).test(model, datamodule=digits, verbose=False)
    assert {"test/nll", "test/bpd", "test/loss"} <= set(metrics)
    assert 0 < metrics["test/bpd"] < math.log2(17)  # better than uniform after a few steps
    (batch,) = trainer(limit_predict_batches=1).predict(model, datamodule=digits)
    assert batch["samples"].shape == batch["inputs"].shape == (100, 1, 8, 8)  # an evaluation batch
    restored = Flow.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert restored.hparams.quantization_levels == 17
    actnorms = [m for m in restored.modules() if hasattr(m, "initialized")]
    assert actnorms and all(bool(m.initialized) for m in actnorms)
    x, y = digits.splits["test"].tensors[0][:16], digits.splits["test"].tensors[1][:16]
    with torch.no_grad():  # training mode on purpose: a resumed ActNorm must not initialise again
        torch.testing.assert_close(restored.log_prob(x, labels=y), model.eval().log_prob(x, labels=y))
        torch.testing.assert_close(copy.deepcopy(model).log_prob(x, labels=y), model.log_prob(x, labels=y))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"architecture": "maf"}, "choose one of: realnvp, glow"),
        ({"preprocessing": "tanh"}, "choose one of: logit, none"),
        ({"quantization_levels": 1}, "quantization_levels must be >= 2"),
        ({"logit_alpha": 0.5}, "logit_alpha must be in"),
        ({"num_steps": 0}, "num_steps must be a positive integer, got 0"),
        ({"num_scales": 1.5}, "num_scales must be a positive integer, got 1.5"),
        ({"hidden_dims": ()}, "hidden_dims must hold one width per hidden layer of a coupling network, at least one"),
        ({"hidden_dims": (8, 0)}, r"hidden_dims\[1\] must be a positive integer, got 0"),
        ({"optimizer": torch.optim.Adam([nn.Parameter(torch.zeros(1))])}, "optimizer must be a callable that builds"),
        ({"data_shape": (1, 8)}, "must be \\(C, H, W\\) or \\(D,\\)"),
        ({"data_shape": (1, 6, 6)}, "cannot be squeezed 2 times"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
    ],
)
def test_bad_constructor_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Flow(**{"data_shape": (1, 8, 8), **kwargs})


def test_an_injected_flow_that_changes_the_shape_is_named():
    class Halve(nn.Module):
        def forward(self, x):
            return x[:, :2], x.new_zeros(x.shape[0])

    model = Flow(data_shape=(4,), quantization_levels=None, preprocessing="none", flow=Halve())
    with pytest.raises(ValueError, match=r"the flow must map \(B, 4\) to the same shape"):
        model.log_prob(torch.rand(2, 4))


def test_a_flow_that_does_not_fit_the_datamodule_fails_before_training():
    with pytest.raises(ValueError, match=r"built for examples of shape \(2,\).*yields \(1, 8, 8\)"):
        trainer(fast_dev_run=True).fit(Flow(data_shape=(2,)), datamodule=DigitsDataModule())


# -- the one model API (issue 12): widths, injected optimizers, the objective, log_prob's gradient -------------------


@pytest.mark.parametrize("architecture", ["glow", "realnvp"])
@pytest.mark.parametrize("data_shape", [(1, 8, 8), (3,)], ids=["image", "vector"])
def test_hidden_dims_are_the_widths_of_every_coupling_networks_hidden_layers(architecture, data_shape):
    model = Flow(architecture, data_shape=data_shape, num_steps=2, hidden_dims=(16, 8, 16))
    nets = [m.net for m in model.modules() if isinstance(m, AffineCoupling)]
    assert len(nets) >= 2
    for net in nets:
        layers = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
        if len(data_shape) == 3:
            widths = [layer.out_channels for layer in layers]
            assert [layer.kernel_size[0] for layer in layers] == [3, 1, 1, 3]
            assert widths == [16, 8, 16, 2 * layers[0].in_channels]
        else:
            assert [layer.out_features for layer in layers] == [16, 8, 16, 2 * 3]


def flow_coupling_net_before_issue_12(in_channels: int, width: int) -> nn.Module:
    """Flow's coupling network as it was with ``hidden_channels=width``: the reference the default must reproduce."""
    net = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 1), nn.ReLU(),
        nn.Conv2d(width, 2 * in_channels, 3, padding=1),
    )  # fmt: skip
    nn.init.zeros_(net[4].weight)
    nn.init.zeros_(net[4].bias)
    return net


@pytest.mark.parametrize("architecture", ["glow", "realnvp"])
def test_the_default_widths_give_the_flow_of_hidden_channels_64_parameter_for_parameter(architecture, monkeypatch):
    torch.manual_seed(0)
    new = Flow(architecture)
    assert new.hparams.hidden_dims == (64, 64)
    monkeypatch.setattr(
        flow_layers, "conv_coupling_net", lambda c, hidden_dims: flow_coupling_net_before_issue_12(c, 64)
    )
    torch.manual_seed(0)
    old = Flow(architecture)
    # parameter counts of Flow(architecture, hidden_channels=64) before issue 12
    assert sum(p.numel() for p in new.parameters()) == {"glow": 117_616, "realnvp": 171_560}[architecture]
    old_state = old.state_dict()
    assert new.state_dict().keys() == old_state.keys()  # the same names: checkpoints still load
    assert all(torch.equal(value, old_state[name]) for name, value in new.state_dict().items())


def test_an_injected_optimizer_and_scheduler_train_the_flow():
    model = Flow(data_shape=(2,), quantization_levels=None, preprocessing="none", num_steps=1, hidden_dims=(4,),
                 optimizer=partial(torch.optim.SGD, lr=0.1),
                 lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))  # fmt: skip
    assert not {"optimizer", "lr_scheduler", "lr"} & set(model.hparams)
    before = [p.detach().clone() for p in model.parameters()]
    fit = trainer(max_epochs=1)
    fit.fit(model, train_dataloaders=DataLoader(TensorDataset(torch.rand(8, 2)), batch_size=4))
    (optimizer,) = fit.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # 0.1, halved after the one epoch
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_objective_is_the_negative_mean_log_prob_of_the_batch_dequantized_and_log_prob_is_differentiable():
    model = perturb(Flow("glow", data_shape=(1, 4, 4), num_classes=3, quantization_levels=17, **TINY))
    x, y = images(4, (1, 4, 4)), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(5)
    objective = model.objective((x, y))
    torch.manual_seed(5)
    log_prob = model.log_prob(model.dequantize(x), labels=y)
    assert objective.batch_size == 4 and set(objective.terms) == {"loss", "nll", "bpd"}
    torch.testing.assert_close(objective.loss, -log_prob.mean())
    torch.testing.assert_close(objective.terms["nll"], objective.loss)
    with torch.no_grad():  # the noise counts: without it, another value
        assert not torch.allclose(objective.loss, -model.log_prob(x, labels=y).mean())
    log_prob.mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_density_panels_evaluate_the_differentiable_log_prob_without_a_graph():
    model = Flow("realnvp", data_shape=(2,), value_range=(-4.0, 4.0), quantization_levels=None, preprocessing="none",
                 num_steps=1, hidden_dims=(4,))  # fmt: skip
    grad_enabled = []
    log_prob = model.log_prob
    model.log_prob = lambda x: (grad_enabled.append(torch.is_grad_enabled()), log_prob(x))[1]
    panels = density_panels(model, None, (-4.0, 4.0), num_points=16, resolution=8)
    assert grad_enabled == [False] and panels.dtype == torch.uint8
