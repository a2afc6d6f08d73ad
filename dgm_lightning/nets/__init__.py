"""Plain ``nn.Module`` networks (no Lightning) that the models build by default or accept injected."""

from dgm_lightning.nets.autoencoder_nets import (
    ConvDecoder,
    ConvEncoder,
    MLPDecoder,
    MLPEncoder,
    build_decoder,
    build_encoder,
)
from dgm_lightning.nets.flow_layers import (
    ActNorm,
    AffineCoupling,
    FlowSequential,
    InvertibleConv1x1,
    Split,
    Squeeze,
    Unsqueeze,
    multiscale_flow,
    planar_flow,
    vector_flow,
)
from dgm_lightning.nets.gan_nets import (
    DCGANFeatures,
    DCGANGenerator,
    Discriminator,
    MLPFeatures,
    MLPGenerator,
    apply_spectral_norm,
    build_discriminator,
    build_generator,
)
from dgm_lightning.nets.pixelcnn import GatedPixelCNN
from dgm_lightning.nets.quantizer import VectorQuantizer
from dgm_lightning.nets.sequence_nets import SequenceDecoder, SequenceEncoder
from dgm_lightning.nets.vqvae_nets import GridDecoder, GridEncoder

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "FlowSequential",
    "InvertibleConv1x1",
    "Split",
    "Squeeze",
    "Unsqueeze",
    "multiscale_flow",
    "planar_flow",
    "vector_flow",
    "ConvDecoder",
    "ConvEncoder",
    "DCGANFeatures",
    "DCGANGenerator",
    "Discriminator",
    "MLPDecoder",
    "MLPEncoder",
    "MLPFeatures",
    "MLPGenerator",
    "apply_spectral_norm",
    "build_decoder",
    "build_discriminator",
    "build_encoder",
    "build_generator",
    "SequenceDecoder",
    "SequenceEncoder",
    "GatedPixelCNN",
    "GridDecoder",
    "GridEncoder",
    "VectorQuantizer",
]
