"""Plain ``nn.Module`` networks (no Lightning) that the models build by default or accept injected."""

from dgm_lightning.nets.autoencoder_nets import (
    ConvDecoder,
    ConvEncoder,
    MLPDecoder,
    MLPEncoder,
    build_decoder,
    build_encoder,
)

__all__ = ["ConvDecoder", "ConvEncoder", "MLPDecoder", "MLPEncoder", "build_decoder", "build_encoder"]
