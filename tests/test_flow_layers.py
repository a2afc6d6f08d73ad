"""Flow layers in float64: inverse(forward(x)) == x, log-det == autograd's, gradients, ActNorm init and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from dgm_lightning.nets.flow_layers import (
    ActNorm,
    AffineCoupling,
    FlowSequential,
    InvertibleConv1x1,
    Split,
    Squeeze,
    Unsqueeze,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
    conv_coupling_net,
    mlp_coupling_net,
    multiscale_flow,
    planar_flow,
    vector_flow,
)

DTYPE = torch.float64


def perturbed(module: nn.Module) -> nn.Module:
    """The module in float64 with every parameter moved off its (often zero or identity) initialisation,
    so that the tests see a generic layer, not the identity-like map flows start from."""
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


LAYERS = {
    "actnorm-image": (lambda: ActNorm(3), (3, 4, 4)),
    "actnorm-vector": (lambda: ActNorm(5), (5,)),
    "invconv-image": (lambda: InvertibleConv1x1(3), (3, 4, 4)),
    "invconv-vector": (lambda: InvertibleConv1x1(4), (4,)),
    "coupling-checkerboard-sigmoid": (
        lambda: AffineCoupling(checkerboard_mask(4, 4, 1), conv_coupling_net(2, (8, 8))),
        (2, 4, 4),
    ),
    "coupling-channel-tanh": (
        lambda: AffineCoupling(channel_mask(4, 0), conv_coupling_net(4, (8, 8)), scale="tanh"),
        (4, 2, 2),
    ),
    "coupling-vector": (
        lambda: AffineCoupling(alternating_mask(3, 1), mlp_coupling_net(3, (8, 8)), scale="tanh"),
        (3,),
    ),
    # other widths: one hidden layer (3x3 in, 3x3 out), three (3x3, 1x1, 1x1, 3x3)
    "coupling-checkerboard-one-hidden-layer": (
        lambda: AffineCoupling(checkerboard_mask(4, 4, 0), conv_coupling_net(2, (6,))),
        (2, 4, 4),
    ),
    "coupling-channel-widths": (
        lambda: AffineCoupling(channel_mask(4, 1), conv_coupling_net(4, (16, 8, 16)), scale="tanh"),
        (4, 2, 2),
    ),
    "coupling-vector-widths": (lambda: AffineCoupling(alternating_mask(3, 0), mlp_coupling_net(3, (16, 8, 16))), (3,)),
    "squeeze": (Squeeze, (1, 4, 4)),
    "unsqueeze": (Unsqueeze, (4, 2, 2)),
    "split": (lambda: Split(FlowSequential(ActNorm(2), InvertibleConv1x1(2))), (4, 2, 2)),
    "glow-multiscale": (
        lambda: multiscale_flow("glow", (1, 4, 4), num_scales=2, num_steps=2, hidden_dims=(4, 4)),
        (1, 4, 4),
    ),
    "realnvp-multiscale": (
        lambda: multiscale_flow("realnvp", (1, 4, 4), num_scales=2, num_steps=2, hidden_dims=(4, 4)),
        (1, 4, 4),
    ),
    "glow-multiscale-widths": (
        lambda: multiscale_flow("glow", (1, 4, 4), num_scales=2, num_steps=2, hidden_dims=(16, 8, 16)),
        (1, 4, 4),
    ),
    "realnvp-vector": (lambda: vector_flow("realnvp", 2, num_steps=3, hidden_dims=(8, 8)), (2,)),
    "glow-vector": (lambda: vector_flow("glow", 3, num_steps=2, hidden_dims=(8, 8)), (3,)),
    "realnvp-vector-widths": (lambda: vector_flow("realnvp", 4, num_steps=2, hidden_dims=(16, 8, 16)), (4,)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_inverse_undoes_forward_and_logdet_matches_autograd(name):
    build, shape = LAYERS[name]
    layer = perturbed(build()).eval()  # eval: ActNorm keeps its (perturbed) parameters
    x = torch.randn(3, *shape, dtype=DTYPE)
    y, logdet = layer(x)
    assert y.numel() == x.numel() and logdet.shape == (3,)
    torch.testing.assert_close(layer.inverse(y), x, atol=1e-4, rtol=0)
    for i in range(x.shape[0]):
        jac = jacobian(lambda xi: layer(xi[None])[0][0], x[i]).reshape(x[i].numel(), x[i].numel())
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac)[1], atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", [n for n in LAYERS if n not in ("squeeze", "unsqueeze")])
def test_every_parameter_receives_a_gradient(name):
    build, shape = LAYERS[name]
    layer = perturbed(build()).eval()
    y, logdet = layer(torch.randn(4, *shape, dtype=DTYPE))
    (y.pow(2).sum() - logdet.sum()).backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_couplings_start_near_the_identity_and_keep_the_masked_part():
    coupling = AffineCoupling(checkerboard_mask(4, 4, 0), conv_coupling_net(2, (8, 8)), scale="tanh").double()
    x = torch.randn(2, 2, 4, 4, dtype=DTYPE)
    y, logdet = coupling(x)
    torch.testing.assert_close(y, x)  # zero-initialised last layer: exactly the identity
    torch.testing.assert_close(logdet, torch.zeros(2, dtype=DTYPE))
    y, _ = perturbed(coupling)(x)
    kept = checkerboard_mask(4, 4, 0).bool().expand_as(x)
    assert torch.equal(y[kept], x[kept]) and not torch.allclose(y[~kept], x[~kept])


def test_actnorm_initialises_from_the_first_training_batch_once_and_the_flag_survives_a_checkpoint():
    layer = ActNorm(3)
    x = 5 + 3 * torch.randn(256, 3, 4, 4)
    y, _ = layer(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(3), atol=1e-2, rtol=0)
    loc = layer.loc.detach().clone()
    layer(x + 10)  # no second initialisation
    assert torch.equal(layer.loc, loc)
    restored = ActNorm(3)
    restored.load_state_dict(layer.state_dict())
    assert bool(restored.initialized)
    restored(x + 10)
    assert torch.equal(restored.loc, loc)
    fresh = ActNorm(3).eval()
    fresh(x)
    assert not fresh.initialized  # evaluation passes never initialise


def test_actnorm_does_not_initialise_from_a_nonfinite_batch():
    layer = ActNorm(2)
    layer(torch.full((4, 2), float("nan")))
    assert not layer.initialized and layer.loc.isfinite().all() and layer.log_scale.isfinite().all()
    layer(torch.randn(4, 2))
    assert layer.initialized


def test_invertible_conv_starts_as_a_rotation():
    conv = InvertibleConv1x1(4).double()
    w = conv.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=DTYPE), atol=1e-5, rtol=0)  # drawn in float32


def test_planar_flow_logdet_matches_autograd_and_stays_invertible():
    d = 3
    u, w, b = torch.randn(2, d, dtype=DTYPE), torch.randn(2, d, dtype=DTYPE), torch.randn(2, 1, dtype=DTYPE)
    u = -5 * w  # w.u < -1: the raw flow would not be invertible; the constraint must repair it
    z = torch.randn(5, 2, d, dtype=DTYPE)  # leading sample dimension broadcast over the parameters
    out, logdet = planar_flow(z, u, w, b)
    assert out.shape == z.shape and logdet.shape == (5, 2)
    for s in range(5):
        for i in range(2):
            params = u[i : i + 1], w[i : i + 1], b[i : i + 1]
            jac = jacobian(lambda zi, params=params: planar_flow(zi[None], *params)[0][0], z[s, i])
            torch.testing.assert_close(logdet[s, i], torch.linalg.slogdet(jac)[1])
            assert torch.linalg.det(jac) > 0  # orientation-preserving, so invertible


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: AffineCoupling(channel_mask(2, 0), nn.Identity(), scale="exp"), "choose one of: sigmoid, tanh"),
        (lambda: multiscale_flow("glow", (1, 6, 6), num_scales=2, num_steps=1, hidden_dims=(4,)), "squeezed 2"),
        (lambda: vector_flow("realnvp", 1, num_steps=1, hidden_dims=(4,)), "at least 2 features"),
        (lambda: vector_flow("glow", 2, num_steps=1, hidden_dims=()), "hidden_dims must hold one width per"),
        (lambda: conv_coupling_net(2, (8, -1)), r"hidden_dims\[1\] must be a positive integer, got -1"),
        (lambda: mlp_coupling_net(2, (8.5,)), r"hidden_dims\[0\] must be a positive integer, got 8.5"),
    ],
)
def test_bad_layer_arguments_fail_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_hidden_dims_set_the_widths_and_kernels_of_the_coupling_networks():
    conv = [m for m in conv_coupling_net(3, (16, 8, 16)) if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in conv] == [
        (3, 16, (3, 3)), (16, 8, (1, 1)), (8, 16, (1, 1)), (16, 6, (3, 3)),
    ]  # fmt: skip
    mlp = [m for m in mlp_coupling_net(3, (16, 8, 16)) if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in mlp] == [(3, 16), (16, 8), (8, 16), (16, 6)]
    assert all(not m.weight.any() and not m.bias.any() for m in (conv[-1], mlp[-1]))  # the identity at first


def test_two_hidden_dims_build_the_papers_coupling_networks_from_the_same_seed():
    """hidden_dims (h, h) is the network that ``hidden_channels=h`` (``hidden_features=h``) built before: the same
    layers, names and random draws in the same order, so that seeded models and old checkpoints stay the same."""
    torch.manual_seed(0)
    conv = conv_coupling_net(4, (64, 64))
    torch.manual_seed(0)
    reference = nn.Sequential(
        nn.Conv2d(4, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 8, 3, padding=1)
    )
    nn.init.zeros_(reference[4].weight)
    nn.init.zeros_(reference[4].bias)
    assert_same_state(conv, reference)
    torch.manual_seed(0)
    mlp = mlp_coupling_net(2, (64, 64))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    nn.init.zeros_(reference[4].weight)
    nn.init.zeros_(reference[4].bias)
    assert_same_state(mlp, reference)


def assert_same_state(module: nn.Module, reference: nn.Module) -> None:
    state, expected = module.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in state.items())
