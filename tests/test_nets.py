"""Default encoder and decoder networks: exact shapes for many image sizes, gradients, argument checks."""

from __future__ import annotations

import pytest
import torch

from dgm_lightning.nets import build_decoder, build_encoder

ARCHITECTURES = ("mlp", "conv")
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_encoder_decoder_shapes_and_every_parameter_gets_gradient(architecture, shape):
    encoder = build_encoder(architecture, shape, 10, None)
    decoder = build_decoder(architecture, 10, shape, None)
    x = torch.rand(2, *shape)
    code = encoder(x)
    assert code.shape == (2, 10)
    out = decoder(code)
    assert out.shape == (2, *shape)
    assert decoder(torch.randn(2, 10)).shape == (2, *shape)

    loss = (out - torch.rand_like(out)).pow(2).mean()
    loss.backward()
    params = list(encoder.named_parameters()) + [("decoder." + n, p) for n, p in decoder.named_parameters()]
    assert params
    for name, p in params:
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 1, 1), (2, 9, 16)], ids=lambda s: "x".join(map(str, s)))
def test_odd_and_non_square_sizes_round_trip_exactly(architecture, shape):
    encoder = build_encoder(architecture, shape, 4, [8, 8])
    decoder = build_decoder(architecture, 4, shape, [8, 8])
    assert decoder(encoder(torch.rand(3, *shape))).shape == (3, *shape)


@pytest.mark.parametrize(
    ("architecture", "encoder_biases", "decoder_biases"),
    [
        # mlp: 64 -> 4 -> 12 -> 6, and back 6 -> 12 -> 4 -> 64
        ("mlp", [4, 12, 6], [12, 4, 64]),
        # conv: channels 4, 12 then a linear head; decoder: head to 12 x 2 x 2, up to 4 channels twice, then 1
        ("conv", [4, 12, 6], [48, 4, 4, 1]),
    ],
)
def test_hidden_dims_are_used_and_mirrored(architecture, encoder_biases, decoder_biases):
    encoder = build_encoder(architecture, (1, 8, 8), 6, [4, 12])
    decoder = build_decoder(architecture, 6, (1, 8, 8), [4, 12])
    assert [p.shape[0] for n, p in encoder.named_parameters() if n.endswith("bias")] == encoder_biases
    assert [p.shape[0] for n, p in decoder.named_parameters() if n.endswith("bias")] == decoder_biases


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("bad", [(8, 8), (1, 0, 8), (0, 8, 8), (1, 8, -1), (1, 1, 8, 8)])
def test_bad_image_shape_raises(architecture, bad):
    with pytest.raises(ValueError, match="three positive sizes"):
        build_encoder(architecture, bad, 10, None)
    with pytest.raises(ValueError, match="three positive sizes"):
        build_decoder(architecture, 10, bad, None)


@pytest.mark.parametrize("build", [build_encoder, build_decoder])
def test_unknown_architecture_names_choices(build):
    args = ("resnet", (1, 8, 8), 10, None) if build is build_encoder else ("resnet", 10, (1, 8, 8), None)
    with pytest.raises(ValueError, match="mlp, conv") as info:
        build(*args)
    assert "resnet" in str(info.value)
