"""Export the network a user deploys, noise -> samples, as a ``torch.export`` program that needs only torch.

``export_sampler(model, folder)`` writes ``folder/sampler.pt2`` and, beside it, ``folder/sampler.json``: what
a sampler needs besides the network (the noise size, the output shape and value range, the labels a conditional
model takes, a token model's vocabulary). A program without dgm-lightning draws samples with::

    import json, torch
    meta = json.load(open("sampler.json"))
    sampler = torch.export.load("sampler.pt2").module()
    noise = torch.randn(16, *meta["noise_shape"]) * 1.0  # the temperature: 1 the model's distribution, 0 its mode
    samples = sampler(noise)  # conditional models: sampler(noise, labels), labels int64 (16,) in [0, num_classes)

On the command line: ``python train.py export runs/.../checkpoints/last.ckpt --out exported/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from dgm_lightning.base import GenerativeModel

SAMPLER_FILE = "sampler.pt2"
METADATA_FILE = "sampler.json"


class _Sampler(nn.Module):
    """noise (B, *noise_shape) -> samples: the model's own ``from_noise``, the map that ``sample`` uses."""

    def __init__(self, model: GenerativeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, noise: Tensor) -> Tensor:
        return self.model.from_noise(noise)


class _ConditionalSampler(_Sampler):
    """(noise (B, *noise_shape), labels (B,)) -> samples of those classes."""

    def forward(self, noise: Tensor, labels: Tensor) -> Tensor:
        return self.model.from_noise(noise, labels=labels)


def export_sampler(model: GenerativeModel, folder: str | Path) -> Path:
    """Write ``model``'s noise -> samples network (a GAN's weight average where it has one) to
    ``folder/sampler.pt2`` with a dynamic batch size, and its description to ``folder/sampler.json``.

    Returns the path of the program. The model is exported in eval mode, on the CPU, in float32.
    """
    if not hasattr(model, "from_noise"):
        raise TypeError(f"{type(model).__name__} does not generate samples from noise, so it has no sampler to export")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", torch.float32).eval()
    conditional = model.num_classes is not None
    sampler = (_ConditionalSampler if conditional else _Sampler)(model)
    noise = torch.randn(2, *model.noise_shape)
    args = (noise, torch.arange(2) % model.num_classes) if conditional else (noise,)
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = tuple({0: batch} for _ in args)
    with torch.no_grad():
        # once eagerly first: what a model prepares on its first sample (a GAN's average recomputes its batch-norm
        # statistics) belongs in the program's weights, not in its graph
        sampler(*args)
        program = torch.export.export(sampler, args, dynamic_shapes=dynamic_shapes)
    path = folder / SAMPLER_FILE
    torch.export.save(program, path)
    (folder / METADATA_FILE).write_text(json.dumps(sampler_metadata(model), indent=2) + "\n")
    return path


def sampler_metadata(model: GenerativeModel) -> dict:
    """What a program needs to draw samples with the exported network, besides the network."""
    import dgm_lightning

    meta = {
        "model": type(model).__name__,
        "inputs": ["noise", "labels"] if model.num_classes is not None else ["noise"],
        "noise_shape": list(model.noise_shape),
        "noise": "standard normal, multiplied by the temperature (1: the model's distribution, 0: its mode)",
        "output_shape": ["batch", *model.data_shape],
        "value_range": list(model.value_range),
        "num_classes": model.num_classes,
        "dgm_lightning_version": dgm_lightning.__version__,
        "torch_version": torch.__version__,
    }
    if callable(getattr(model, "generate", None)):  # a generation loop (RecurrentVAE): from_noise runs it greedily
        meta["noise"] = "standard normal: the latent code, generated greedily (each step's most likely token, or mean)"
    vocabulary = getattr(model, "vocabulary", None)
    if vocabulary is not None:
        meta["output_shape"] = ["batch", "max_len + 1"]
        meta["vocabulary"] = {"tokens": list(vocabulary.tokens), "level": vocabulary.level}
    return meta


def load_checkpoint(path: str | Path, model: str | None = None) -> GenerativeModel:
    """A model from a checkpoint, its class read from the checkpoint (``train.py`` records it) or named."""
    import dgm_lightning

    if model is None:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        class_path = checkpoint.get("hyper_parameters", {}).get("_class_path")
        if class_path is None:
            raise ValueError(f"{path} does not record its model class; name it with --model (e.g. --model VAE)")
        model = class_path.rsplit(".", 1)[-1]
    cls = getattr(dgm_lightning, model, None)
    if not (isinstance(cls, type) and issubclass(cls, GenerativeModel)):
        raise ValueError(f"unknown model {model!r}; choose one of the dgm_lightning models, e.g. VAE, GAN, Flow")
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)


def main(args: list[str]) -> Path:
    """``train.py export CHECKPOINT --out FOLDER``: export a checkpoint's sampler."""
    parser = argparse.ArgumentParser(prog="train.py export", description=export_sampler.__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by train.py (or the Trainer)")
    parser.add_argument("--out", default="exported", help="folder for sampler.pt2 and sampler.json")
    parser.add_argument("--model", default=None, help="the model class, if the checkpoint does not record it")
    options = parser.parse_args(args)
    path = export_sampler(load_checkpoint(options.checkpoint, options.model), options.out)
    print(f"exported {path} (and {path.with_name(METADATA_FILE).name}); load it with torch.export.load")
    return path
