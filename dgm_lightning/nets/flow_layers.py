"""Invertible layers for normalizing flows: plain ``nn.Module``s, no Lightning.

Every invertible layer maps ``forward(x) -> (y, logdet)`` and ``inverse(y) -> x``, where ``logdet`` has
shape (B,): the log absolute determinant of the Jacobian dy/dx of each example. Layers work on images
(B, C, H, W) and, where it makes sense, on vectors (B, D).

References: NICE, Dinh et al. 2014, arXiv:1410.8516; RealNVP, Dinh et al. 2016, arXiv:1605.08803;
    Glow, Kingma & Dhariwal 2018, arXiv:1807.03039; planar flows, Rezende & Mohamed 2015, arXiv:1505.05770.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from dgm_lightning.checks import check_choice, check_hidden_dims

FlowArchitecture = Literal["realnvp", "glow"]
CouplingScale = Literal["sigmoid", "tanh"]


def _sum_per_example(t: Tensor) -> Tensor:
    """Sum every dimension but the batch dimension: (B, ...) -> (B,)."""
    return t.flatten(1).sum(1)


class FlowSequential(nn.Sequential):
    """A composition of invertible layers: log-determinants add up, the inverse runs in reverse order."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self):
            y = layer.inverse(y)
        return y


class ActNorm(nn.Module):
    """Per-channel affine layer ``y = (x + loc) * exp(log_scale)`` with data-dependent initialisation.

    On its first forward pass in training mode it sets loc and scale so that the batch's output has zero
    mean and unit variance per channel (averaged over all ranks under DDP, so that ranks stay identical).
    The ``initialized`` buffer is saved in checkpoints, so a resumed run does not initialise again.

    Args:
        num_features: channels C of (B, C, H, W) inputs, or features D of (B, D) inputs.

    References: Kingma & Dhariwal 2018, arXiv:1807.03039.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        return p.view(1, -1, *([1] * (x.dim() - 2)))  # broadcast over batch and spatial dims

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        stats = torch.stack([x.mean(dims), x.pow(2).mean(dims)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
        if not stats.isfinite().all():
            return  # a batch with NaN/Inf (its step is skipped by the divergence policy) must not set the scale
        mean, var = stats[0], (stats[1] - stats[0] ** 2).clamp(min=0)
        self.loc.copy_(-mean)
        self.log_scale.copy_(-0.5 * (var + 1e-6).log())
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self.initialized:
            self._initialize(x.detach())
        y = (x + self._view(self.loc, x)) * self._view(self.log_scale, x).exp()
        pixels = x[0, 0].numel()  # H * W for images, 1 for vectors
        return y, (self.log_scale.sum() * pixels).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * self._view(-self.log_scale, y).exp() - self._view(self.loc, y)


class InvertibleConv1x1(nn.Module):
    """Invertible 1x1 convolution (a linear map of the channels, or of the features of a vector), LU-decomposed.

    ``W = P L (U + diag(sign(s) exp(log|s|)))`` with a fixed permutation P, so the log-determinant is
    ``H * W * sum(log|s|)``: linear in the channels instead of cubic. Initialised as a random rotation.

    Args:
        num_channels: channels C of (B, C, H, W) inputs, or features D of (B, D) inputs.

    References: Kingma & Dhariwal 2018, arXiv:1807.03039 (section 3.2).
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        q = torch.linalg.qr(torch.randn(num_channels, num_channels))[0]
        p, lower, upper = torch.linalg.lu(q)
        s = upper.diagonal()
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", s.sign())
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.register_buffer("eye", torch.eye(num_channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(s.abs().log())

    def weight(self) -> Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ lower @ upper

    def _apply_matrix(self, x: Tensor, w: Tensor) -> Tensor:
        if x.dim() == 2:
            return F.linear(x, w)
        return F.conv2d(x, w[:, :, None, None])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pixels = x[0, 0].numel()
        return self._apply_matrix(x, self.weight()), (self.log_s.sum() * pixels).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return self._apply_matrix(y, torch.linalg.inv(self.weight()))


def checkerboard_mask(height: int, width: int, parity: int) -> Tensor:
    """A (1, H, W) mask of ones where (row + column) % 2 == parity: the pixels a coupling keeps."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((rows + cols) % 2 == parity).float()[None]


def channel_mask(num_channels: int, parity: int) -> Tensor:
    """A (C, 1, 1) mask keeping the first half of the channels (parity 0) or the second half (parity 1)."""
    first = (torch.arange(num_channels) < num_channels // 2).float()
    return (first if parity == 0 else 1 - first)[:, None, None]


def alternating_mask(num_features: int, parity: int) -> Tensor:
    """A (D,) mask keeping the even features (parity 0) or the odd ones (parity 1)."""
    return (torch.arange(num_features) % 2 == parity).float()


class AffineCoupling(nn.Module):
    """Affine coupling: the masked part passes unchanged and parameterises an affine map of the rest.

    ``y = m * x + (1 - m) * (x * scale + shift)`` with ``(raw_scale, shift) = net(m * x)``. The scale
    is kept bounded so that the log-determinant cannot blow up: ``sigmoid(raw + 2)`` (Glow; in (0, 1),
    close to 1 at initialisation) or ``exp(c * tanh(raw))`` with a learned per-feature c (RealNVP).

    Args:
        mask: 1 for the features that condition, 0 for those transformed; shape broadcastable to one
            example: (1, H, W) checkerboard, (C, 1, 1) channels, or (D,) for vectors.
        net: maps the masked input (B, *shape) to (B, 2 * C, ...): raw scales, then shifts.
        scale: ``sigmoid`` or ``tanh``.

    References: Dinh et al. 2016, arXiv:1605.08803; Kingma & Dhariwal 2018, arXiv:1807.03039.
    """

    def __init__(self, mask: Tensor, net: nn.Module, *, scale: CouplingScale = "sigmoid") -> None:
        super().__init__()
        check_choice("coupling scale", scale, CouplingScale)
        self.register_buffer("mask", mask)
        self.net = net
        self.scale = scale
        if scale == "tanh":
            # one factor per channel (or feature): the mask's first dim is C, D, or 1 for a checkerboard
            self.tanh_factor = nn.Parameter(torch.ones(mask.shape[0], *([1] * (mask.dim() - 1))))

    def _scale_shift(self, x_kept: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = self.net(x_kept).chunk(2, dim=1)
        if self.scale == "sigmoid":
            log_scale = F.logsigmoid(raw + 2.0)
        else:
            log_scale = self.tanh_factor * torch.tanh(raw)
        free = 1 - self.mask
        return log_scale * free, shift * free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_scale, shift = self._scale_shift(x * self.mask)
        return x * log_scale.exp() + shift, _sum_per_example(log_scale)

    def inverse(self, y: Tensor) -> Tensor:
        # the kept part of y equals that of x, so the net sees the same input as in forward
        log_scale, shift = self._scale_shift(y * self.mask)
        return (y - shift) * (-log_scale).exp()


class Squeeze(nn.Module):
    """Space to depth: (B, C, H, W) -> (B, 4C, H/2, W/2), volume-preserving (log-determinant 0).

    References: Dinh et al. 2016, arXiv:1605.08803 (section 3.6).
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return F.pixel_shuffle(y, 2)


class Unsqueeze(nn.Module):
    """Depth to space, the inverse of ``Squeeze``: (B, 4C, H, W) -> (B, C, 2H, 2W)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.pixel_shuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return F.pixel_unshuffle(y, 2)


class Split(nn.Module):
    """Multi-scale split: factor out the first half of the channels, send the second half through ``flow``.

    The factored-out half leaves the flow unchanged and is modelled directly by the base distribution,
    so the output keeps the input's shape and the whole flow stays a bijection of the data's shape.

    Args:
        flow: invertible module for the remaining (B, C - C // 2, H, W) half.

    References: Dinh et al. 2016, arXiv:1605.08803 (section 3.6).
    """

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        half = x.shape[1] // 2
        y, logdet = self.flow(x[:, half:])
        return torch.cat([x[:, :half], y], dim=1), logdet

    def inverse(self, y: Tensor) -> Tensor:
        half = y.shape[1] // 2
        return torch.cat([y[:, :half], self.flow.inverse(y[:, half:])], dim=1)


def zero_init(layer: nn.Conv2d | nn.Linear) -> nn.Conv2d | nn.Linear:
    """Zero the last layer of a coupling net, so that every coupling starts close to the identity."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def conv_coupling_net(in_channels: int, hidden_dims: Sequence[int]) -> nn.Module:
    """A 3x3 conv into the first hidden layer, 1x1 convs between hidden layers, a zero-initialised 3x3 conv out:
    (B, C, H, W) -> (B, 2C, H, W). ``hidden_dims`` (64, 64) is RealNVP's and Glow's 3x3, 1x1, 3x3 network.

    Args:
        in_channels: C.
        hidden_dims: channels of the hidden layers, one entry per hidden layer.
    """
    check_hidden_dims(hidden_dims, layer="hidden layer of a coupling network")
    layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden_dims[0], 3, padding=1), nn.ReLU()]
    for n_in, n_out in zip(hidden_dims[:-1], hidden_dims[1:], strict=True):
        layers += [nn.Conv2d(n_in, n_out, 1), nn.ReLU()]
    layers.append(zero_init(nn.Conv2d(hidden_dims[-1], 2 * in_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def mlp_coupling_net(num_features: int, hidden_dims: Sequence[int]) -> nn.Module:
    """An MLP with ReLU, its output layer zero-initialised: (B, D) -> (B, 2D).

    Args:
        num_features: D.
        hidden_dims: sizes of the hidden layers, one entry per hidden layer.
    """
    check_hidden_dims(hidden_dims, layer="hidden layer of a coupling network")
    layers: list[nn.Module] = []
    for n_in, n_out in zip([num_features, *hidden_dims[:-1]], hidden_dims, strict=True):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    layers.append(zero_init(nn.Linear(hidden_dims[-1], 2 * num_features)))
    return nn.Sequential(*layers)


def glow_step(num_channels: int, hidden_dims: Sequence[int]) -> FlowSequential:
    """One Glow step on (B, C, H, W): ActNorm, invertible 1x1 convolution, channel-mask affine coupling."""
    return FlowSequential(
        ActNorm(num_channels),
        InvertibleConv1x1(num_channels),
        AffineCoupling(channel_mask(num_channels, 0), conv_coupling_net(num_channels, hidden_dims)),
    )


def realnvp_step(mask: Tensor, num_channels: int, hidden_dims: Sequence[int]) -> FlowSequential:
    """One RealNVP step on (B, C, H, W): ActNorm (for batch norm) and a tanh-bounded affine coupling."""
    net = conv_coupling_net(num_channels, hidden_dims)
    return FlowSequential(ActNorm(num_channels), AffineCoupling(mask, net, scale="tanh"))


def multiscale_flow(
    architecture: FlowArchitecture,
    data_shape: Sequence[int],
    *,
    num_scales: int,
    num_steps: int,
    hidden_dims: Sequence[int],
) -> FlowSequential:
    """The multi-scale flow of RealNVP or Glow as one bijection of (B, C, H, W).

    Each scale squeezes, applies ``num_steps`` steps, factors out half of the channels (``Split``) and
    hands the other half to the next scale, then unsqueezes, so the output has the input's shape. Glow
    steps: ActNorm, 1x1 conv, coupling. RealNVP scale: ``num_steps`` checkerboard couplings before the
    squeeze and ``num_steps`` channel couplings after it, the masks alternating.

    Args:
        architecture: ``realnvp`` or ``glow``.
        data_shape: (C, H, W); H and W must be divisible by 2 ** num_scales.
        num_scales: L, the number of scales.
        num_steps: K, steps per scale.
        hidden_dims: channels of the coupling nets' hidden layers (``conv_coupling_net``).

    References: Dinh et al. 2016, arXiv:1605.08803; Kingma & Dhariwal 2018, arXiv:1807.03039.
    """
    c, h, w = data_shape
    if h % 2**num_scales or w % 2**num_scales:
        raise ValueError(
            f"images of size {h}x{w} cannot be squeezed {num_scales} times (each halves H and W); "
            f"use num_scales so that 2 ** num_scales divides H and W"
        )
    layers: list[nn.Module] = []
    if architecture == "realnvp":
        layers += [realnvp_step(checkerboard_mask(h, w, k % 2), c, hidden_dims) for k in range(num_steps)]
    layers.append(Squeeze())
    c, h, w = 4 * c, h // 2, w // 2
    if architecture == "glow":
        layers += [glow_step(c, hidden_dims) for _ in range(num_steps)]
    else:
        layers += [realnvp_step(channel_mask(c, k % 2), c, hidden_dims) for k in range(num_steps)]
    if num_scales > 1:
        rest = (c - c // 2, h, w)
        inner = multiscale_flow(
            architecture, rest, num_scales=num_scales - 1, num_steps=num_steps, hidden_dims=hidden_dims
        )
        layers.append(Split(inner))
    layers.append(Unsqueeze())
    return FlowSequential(*layers)


def vector_flow(
    architecture: FlowArchitecture, num_features: int, *, num_steps: int, hidden_dims: Sequence[int]
) -> FlowSequential:
    """A coupling stack for (B, D) vectors (tabular or 2D data): ``num_steps`` steps.

    RealNVP: ActNorm and a tanh-bounded coupling, the mask alternating between even and odd features.
    Glow: ActNorm, an LU-decomposed invertible linear map, a sigmoid-scaled coupling.

    Args:
        architecture: ``realnvp`` or ``glow``.
        num_features: D.
        num_steps: K, the number of steps.
        hidden_dims: sizes of the coupling MLPs' hidden layers (``mlp_coupling_net``).
    """
    if num_features < 2:
        raise ValueError(f"coupling layers need at least 2 features, got data of {num_features}")
    layers: list[nn.Module] = []
    for k in range(num_steps):
        net = mlp_coupling_net(num_features, hidden_dims)
        if architecture == "glow":
            layers += [ActNorm(num_features), InvertibleConv1x1(num_features)]
            layers.append(AffineCoupling(alternating_mask(num_features, 0), net))
        else:
            layers += [ActNorm(num_features), AffineCoupling(alternating_mask(num_features, k % 2), net, scale="tanh")]
    return FlowSequential(*layers)


def planar_flow(z: Tensor, u: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """One planar flow ``f(z) = z + u' tanh(w.z + b)`` with amortised (per-example) parameters.

    ``u`` is modified to ``u'`` so that ``w.u' >= -1``, which keeps the map invertible.

    Args:
        z: (..., B, D) points; leading sample dimensions broadcast against the parameters.
        u, w: (B, D); b: (B, 1).

    Returns:
        f(z) with z's shape, and log |det df/dz| of shape (..., B).

    References: Rezende & Mohamed 2015, arXiv:1505.05770 (appendix A.1).
    """
    wu = (w * u).sum(-1, keepdim=True)
    u_hat = u + (F.softplus(wu) - 1 - wu) * w / (w.pow(2).sum(-1, keepdim=True) + 1e-8)
    h = torch.tanh((z * w).sum(-1, keepdim=True) + b)  # (..., B, 1)
    psi = (1 - h.pow(2)) * w
    logdet = (1 + (psi * u_hat).sum(-1)).abs().clamp(min=1e-12).log()
    return z + u_hat * h, logdet
