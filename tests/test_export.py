"""Export: each family's noise -> samples network as a torch.export program equal to the model, needing only torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dgm_lightning import AE, GAN, VAE, Classifier, Flow, FlowVAE, RecurrentVAE
from dgm_lightning.export import METADATA_FILE, export_sampler
from dgm_lightning.vocabulary import SPECIALS

IMAGES = dict(data_shape=(1, 8, 8), hidden_dims=[16])

MODELS = {
    "VAE": lambda: VAE(4, **IMAGES),
    "conditional VAE": lambda: VAE(4, num_classes=3, **IMAGES),
    "AE": lambda: AE(4, **IMAGES),
    "FlowVAE": lambda: FlowVAE(4, num_flows=2, **IMAGES),
    "GAN (EMA)": lambda: GAN(8, data_shape=(2,), architecture="mlp", hidden_dims=[16]),
    "conditional GAN": lambda: GAN(8, data_shape=(1, 8, 8), architecture="mlp", hidden_dims=[16], num_classes=3),
    "Glow": lambda: Flow(
        "glow", data_shape=(1, 8, 8), num_scales=1, num_steps=1, hidden_dims=(8, 8), quantization_levels=17
    ),  # fmt: skip
    "RealNVP 2D": lambda: Flow(
        "realnvp", data_shape=(2,), num_steps=2, hidden_dims=(8, 8), quantization_levels=None, preprocessing="none"
    ),  # fmt: skip
    "RecurrentVAE continuous": lambda: RecurrentVAE(
        4, input_dim=3, likelihood="gaussian", sample_max_len=6, hidden_dims=[8], embedding_dim=4
    ),  # fmt: skip
    "RecurrentVAE tokens": lambda: RecurrentVAE(
        4, vocab=[*SPECIALS, "a", "b", "c"], sample_max_len=6, hidden_dims=[8], embedding_dim=4
    ),  # fmt: skip
}


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter and buffer off its initial value, so the program is compared on non-trivial weights
    (a GAN's average, an AE's fitted Gaussian and a class-conditional base all start at identities or zeros)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model


def _inputs(model, n: int) -> tuple[torch.Tensor, ...]:
    noise = torch.randn(n, *model.noise_shape, generator=torch.Generator().manual_seed(n))
    return (noise,) if model.num_classes is None else (noise, torch.arange(n) % model.num_classes)


@pytest.mark.parametrize("name", MODELS)
def test_the_exported_sampler_equals_the_model_at_two_batch_sizes(name, tmp_path):
    model = _perturbed(MODELS[name]()).eval()
    path = export_sampler(model, tmp_path)
    program = torch.export.load(path).module()
    for n in (3, 5):
        args = _inputs(model, n)
        labels = {} if len(args) == 1 else {"labels": args[1]}
        expected = model.from_noise(args[0], **labels)
        assert torch.allclose(program(*args), expected, atol=1e-5), name
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    assert meta["noise_shape"] == list(model.noise_shape)
    assert meta["inputs"] == (["noise"] if model.num_classes is None else ["noise", "labels"])
    assert meta["value_range"] == list(model.value_range)


def test_from_noise_is_what_sample_draws():
    """sample(n, temperature=t) decodes t * N(0, I) noise: the map that is exported is the one that samples."""
    model = _perturbed(VAE(4, **IMAGES)).eval()
    torch.manual_seed(3)
    samples = model.sample(5, temperature=0.7)
    torch.manual_seed(3)
    noise = 0.7 * torch.randn(5, *model.noise_shape)
    assert torch.allclose(samples, model.from_noise(noise))


def test_loading_the_program_needs_only_torch(tmp_path):
    model = _perturbed(GAN(8, data_shape=(2,), architecture="mlp", hidden_dims=[16])).eval()
    export_sampler(model, tmp_path)
    noise = torch.randn(4, 8)
    torch.save(noise, tmp_path / "noise.pt")
    expected = model.from_noise(noise)
    script = f"""
import sys
for name in ("dgm_lightning", "lightning", "datamodules", "callbacks"):
    sys.modules[name] = None  # importing any of them now fails
import json, torch
meta = json.load(open({str(tmp_path / METADATA_FILE)!r}))
sampler = torch.export.load({str(tmp_path / "sampler.pt2")!r}).module()
noise = torch.load({str(tmp_path / "noise.pt")!r})
assert list(noise.shape[1:]) == meta["noise_shape"]
torch.save(sampler(noise), {str(tmp_path / "out.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expected, atol=1e-5)


def test_the_token_model_writes_its_vocabulary_beside_the_program(tmp_path):
    model = MODELS["RecurrentVAE tokens"]().eval()
    export_sampler(model, tmp_path)
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    assert meta["vocabulary"] == {"tokens": list(model.vocabulary.tokens), "level": "char"}


def test_a_model_without_a_sampler_is_refused(tmp_path):
    with pytest.raises(TypeError, match="Classifier does not generate samples"):
        export_sampler(Classifier(data_shape=(1, 8, 8), hidden_dims=[8]), tmp_path)


def test_export_from_the_command_line(tmp_path):
    from dgm_lightning.cli import main

    root = tmp_path / "runs"
    main(["fit", "--config", "ae_digits", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(root)])  # fmt: skip
    (checkpoint,) = root.rglob("last.ckpt")
    main(["export", str(checkpoint), "--out", str(tmp_path / "exported")])
    model = AE.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    program = torch.export.load(tmp_path / "exported" / "sampler.pt2").module()
    noise = torch.randn(3, *model.noise_shape)
    assert torch.allclose(program(noise), model.from_noise(noise), atol=1e-5)
