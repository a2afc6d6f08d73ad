"""VQ-VAE (issue 14): the quantiser's gradients, EMA updates, k-means initialisation and dead-code restarts against
hand computations; the PixelCNN prior's causality; a tiny VQ-VAE and prior fitting a batch; sampling, checkpoints,
resumes, codebook health and bad input. The DDP agreement of the codebook is tests/test_vqvae_ddp.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dgm_lightning import AE, VQVAE, VQVAEPrior
from dgm_lightning.nets import GatedPixelCNN, VectorQuantizer
from dgm_lightning.nets.quantizer import kmeans, perplexity
from tests.helpers import images, stand_in_flags, trainer

SHAPE = (1, 8, 8)


def tiny_vqvae(**settings) -> VQVAE:
    """A VQ-VAE of the 8x8 test images: a 4x4 grid of codes of 8 dimensions from a codebook of 16."""
    return VQVAE(16, 8, data_shape=SHAPE, hidden_dims=[16], residual_channels=8, **settings)


def loader(x: torch.Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(x), batch_size=batch_size)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    state, other = a.state_dict(), b.state_dict()
    return state.keys() == other.keys() and all(torch.equal(state[key], other[key]) for key in state)


# -- the quantiser ---------------------------------------------------------------------------------------------


def test_gradients_pass_straight_through_the_quantiser_to_every_encoder_weight():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(4, 3).eval()  # evaluation: the codebook stays as it is
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    out, index, _ = quantizer(z)
    assert torch.allclose(out.detach(), quantizer.lookup(index), atol=1e-6)  # the forward value is the code
    assert torch.equal(index, torch.cdist(z.detach().permute(0, 2, 3, 1), quantizer.codebook).argmin(-1))
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)  # the gradient, as if quantisation were the identity
    model = tiny_vqvae()
    model.objective((images(8, SHAPE),)).loss.backward()
    for name, parameter in model.encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_the_ema_update_matches_a_hand_computation():
    """Razavi et al.'s update in float64: N_k <- d N_k + (1 - d) n_k, m_k <- d m_k + (1 - d) sum of z assigned to
    k, e_k = m_k / (Laplace-smoothed N_k)."""
    quantizer = VectorQuantizer(3, 2, decay=0.9, epsilon=1e-3, dead_code_threshold=0).double()
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], dtype=torch.float64)
    quantizer.codebook.copy_(codebook)
    quantizer.ema_sums.copy_(codebook * 2)
    quantizer.ema_counts.fill_(2.0)
    quantizer.initialized.fill_(True)
    vectors = torch.tensor([[0.1, -0.1], [0.2, 0.0], [0.9, 1.2], [4.0, 6.0]], dtype=torch.float64)  # codes 0, 0, 1, 2
    z = vectors.T.reshape(1, 2, 2, 2)  # (B, D, H, W): position (h, w) holds vector 2h + w
    _, index, _ = quantizer(z)
    assert index.flatten().tolist() == [0, 0, 1, 2]
    counts = 0.9 * 2 + 0.1 * torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    sums = 0.9 * codebook * 2 + 0.1 * torch.stack([vectors[:2].sum(0), vectors[2], vectors[3]])
    n = counts.sum()
    smoothed = (counts + 1e-3) / (n + 3 * 1e-3) * n
    assert torch.allclose(quantizer.ema_counts, counts, rtol=0, atol=1e-12)
    assert torch.allclose(quantizer.codebook, sums / smoothed[:, None], rtol=0, atol=1e-12)
    quantizer.eval()  # evaluation changes nothing
    before = {name: value.clone() for name, value in quantizer.state_dict().items()}
    quantizer(z)
    assert all(torch.equal(before[name], value) for name, value in quantizer.state_dict().items())


def test_under_bf16_autocast_the_codes_and_the_ema_update_are_those_of_float32():
    """bf16-mixed (the default for a VQ-VAE on a CPU with AMX) autocasts matrix products: the codebook's distances
    and sums stay in its float32, or near-equidistant vectors get another code and the EMA sums lose 0.4 %."""
    torch.manual_seed(0)
    z = torch.randn(8, 16, 8, 8)

    def quantize(autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(1)
        quantizer = VectorQuantizer(256, 16, init="random", dead_code_threshold=0)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            quantizer(z)  # initialises the codebook from this batch and updates it
            _, index, _ = quantizer(z)
        return index, quantizer.ema_sums

    (index, sums), (index_bf16, sums_bf16) = quantize(False), quantize(True)
    assert torch.equal(index_bf16, index)
    assert torch.allclose(sums_bf16, sums, rtol=1e-6, atol=1e-6)


def test_the_losses_are_the_squared_distances_summed_over_the_grid():
    quantizer = VectorQuantizer(2, 1, update="loss", dead_code_threshold=0)
    quantizer.codebook.data.copy_(torch.tensor([[0.0], [1.0]]))
    quantizer.initialized.fill_(True)
    z = torch.tensor([0.25, 0.9, 0.6, -0.5]).view(1, 1, 2, 2)  # nearest codes 0, 1, 1, 0
    _, _, losses = quantizer(z)
    expected = 0.25**2 + 0.1**2 + 0.4**2 + 0.5**2
    assert losses["commitment_loss"].item() == pytest.approx(expected)
    assert losses["codebook_loss"].item() == pytest.approx(expected)


def test_a_dead_code_is_restarted_at_an_encoder_output_and_a_used_one_is_kept():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(3, 2, update="loss", dead_code_threshold=1.0, usage_decay=0.5)
    quantizer.codebook.data.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]]))  # code 2: never nearest
    quantizer.initialized.fill_(True)
    vectors = torch.tensor([[0.1, 0.0], [0.0, 0.1], [0.9, 1.0], [1.1, 1.0]])
    z = vectors.T.reshape(1, 2, 2, 2)
    quantizer(z)  # usage of code 2: 0.5 * 1 + 0.5 * 0 < 1: restarted at one of the batch's vectors
    restarted = quantizer.codebook[2].detach()
    assert any(torch.equal(restarted, v) for v in vectors), restarted
    assert torch.equal(quantizer.codebook[:2].detach(), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))  # used: untouched
    assert quantizer.usage[2] == 1.0  # the threshold: it survives a step in which it is used
    off = VectorQuantizer(3, 2, update="loss", dead_code_threshold=0.0, usage_decay=0.5)
    off.codebook.data.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]]))
    off.initialized.fill_(True)
    off(z)
    assert off.codebook[2].tolist() == [100.0, 100.0]  # dead_code_threshold 0: never restarted


def test_a_batch_with_nan_leaves_the_codebook_and_its_statistics_alone():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(4, 2)
    z = torch.randn(2, 2, 3, 3)
    bad = z.clone()
    bad[0, 0, 0, 0] = float("nan")
    quantizer(bad)  # the model's divergence policy skips such a step; the quantiser must not learn from it either
    assert not bool(quantizer.initialized)
    quantizer(z)
    before = {name: value.clone() for name, value in quantizer.state_dict().items()}
    quantizer(bad)
    assert all(torch.equal(before[name], value) for name, value in quantizer.state_dict().items())


def test_kmeans_initialises_the_codebook_at_the_clusters_of_the_first_training_batch():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    vectors = (centres.repeat_interleave(20, 0) + 0.1 * torch.randn(60, 2))[torch.randperm(60)]
    z = vectors.T.reshape(1, 2, 6, 10)
    quantizer = VectorQuantizer(3, 2, init="kmeans", dead_code_threshold=0)
    quantizer(z)
    assert bool(quantizer.initialized)
    found = quantizer.codebook[nearest_rows(quantizer.codebook, centres)]
    assert torch.allclose(found, centres, atol=0.1)  # one code per cluster, at its mean
    assert quantizer.ema_counts.sum() == pytest.approx(60 * 0.99 + 60 * 0.01)  # the k-means counts, then one update
    centroids, counts = kmeans(vectors, 3, iterations=10)
    assert sorted(counts.tolist()) == [20.0, 20.0, 20.0]
    again = quantizer.codebook.clone()
    quantizer(z + 100)  # initialised once only: a later batch moves the codes by an EMA step, not onto its clusters
    assert (quantizer.codebook - again).abs().max() < 10


def nearest_rows(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.cdist(targets, rows).argmin(1)


def test_perplexity_is_the_exponentiated_entropy_of_the_code_frequencies():
    assert perplexity(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(4.0)
    assert perplexity(torch.tensor([0, 7, 0])).item() == pytest.approx(1.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert perplexity(p * 4).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))


# -- the prior -------------------------------------------------------------------------------------------------


def test_the_pixelcnn_logits_at_a_position_depend_on_the_positions_before_it_only():
    torch.manual_seed(0)
    net = GatedPixelCNN(5, channels=8, num_layers=4, kernel_size=3).double()
    codes = torch.randint(0, 5, (1, 4, 4))
    logits = net(codes)
    for q in range(16):
        changed = codes.clone()
        changed.view(-1)[q] = (changed.view(-1)[q] + 1) % 5
        moved = (net(changed) - logits).abs().amax(1).view(-1)  # (16,): the change of each position's logits
        assert moved[: q + 1].max() == 0, q  # the position itself and those before it: untouched
        if q < 15:
            assert moved[q + 1] > 0, q  # the next position sees it (no blind spot to its left)
    assert (net(codes.roll(1, 0))[:, :, 0, 0] == logits[:, :, 0, 0]).all()  # the first position: a marginal
    assert net.rows_suffice  # what sampling relies on: the first rows' logits need no later rows
    for rows in (1, 2, 3):
        assert torch.allclose(net(codes[:, :rows]), logits[:, :, :rows], atol=1e-12)


# -- the two stages together -----------------------------------------------------------------------------------


def overfit(model, batch, steps: int, lr: float = 3e-3) -> tuple[float, float]:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model.objective(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_a_tiny_vqvae_and_its_prior_overfit_a_fixed_batch():
    torch.manual_seed(0)
    batch = (images(16, SHAPE),)
    x = batch[0]
    # the Bernoulli NLL cannot fall below the entropy of Bernoulli(x): what is left above it must fall
    floor = -(x * x.log() + (1 - x) * (1 - x).log()).flatten(1).sum(1).mean().item()
    vqvae = tiny_vqvae()
    first, last = overfit(vqvae, batch, 150)
    assert last - floor < 0.5 * (first - floor), (floor, first, last)
    prior = VQVAEPrior(vqvae=vqvae, channels=16, num_layers=4)
    codebook = vqvae.quantizer.codebook.clone()
    first, last = overfit(prior, batch, 150)
    assert first == pytest.approx(math.log(16), rel=0.2)  # nats per code: near uniform at the start
    assert last < 0.5 * first, (first, last)  # 16 grids of 16 positions are learnable by heart
    assert torch.equal(vqvae.quantizer.codebook, codebook)  # the frozen VQ-VAE is left as it was
    fresh = tiny_vqvae()  # in training mode, as built: its public methods must not initialise or move the codebook
    state = {name: value.clone() for name, value in fresh.state_dict().items()}
    fresh.encode(batch[0]), fresh.encode_indices(batch[0]), fresh.log_prob(batch[0]), fresh.reconstruct(batch[0])
    assert all(torch.equal(state[name], value) for name, value in fresh.state_dict().items())
    prior.eval()
    with torch.no_grad():
        elbo = prior.log_prob(batch[0])
        log_pz = prior.code_log_prob(vqvae.encode_indices(batch[0]))
        log_px = vqvae.decoder_distribution(vqvae.quantize(batch[0])[0]).log_prob(batch[0])
    assert torch.allclose(elbo, log_px + log_pz)
    assert (elbo > vqvae.eval().log_prob(batch[0])).all()  # a learned prior beats the uniform one on its data


def test_samples_have_the_declared_shape_and_range_and_temperature_zero_is_the_argmax():
    torch.manual_seed(0)
    prior = VQVAEPrior(vqvae=tiny_vqvae(), channels=8, num_layers=2).eval()
    samples = prior.sample(5)
    assert samples.shape == (5, *SHAPE) and samples.isfinite().all()
    assert samples.min() >= 0 and samples.max() <= 1
    index = prior.sample_indices(3, temperature=0.0)
    assert index.shape == (3, 4, 4) and torch.equal(index, prior.sample_indices(3, temperature=0.0))
    logits = prior.logits(index)
    assert torch.equal(index, logits.argmax(1))  # each position the most likely code given those before it
    with pytest.warns(UserWarning, match="codes drawn uniformly.*train its prior"):  # not images: said so
        assert tiny_vqvae().eval().sample(4).shape == (4, *SHAPE)  # the first stage samples its uniform prior
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(2, temperature=-1.0)


def fit_vqvae(root: Path, epochs: int = 1, **settings) -> tuple[VQVAE, Path]:
    torch.manual_seed(0)
    model = tiny_vqvae(**settings)
    run = trainer(max_epochs=epochs, default_root_dir=root)
    run.fit(model, train_dataloaders=loader(images(32, SHAPE)))
    path = root / "vqvae.ckpt"
    run.save_checkpoint(path)
    return model, path


def test_checkpoints_round_trip_and_the_prior_samples_from_its_own_checkpoint_alone(tmp_path):
    vqvae, vqvae_path = fit_vqvae(tmp_path)
    loaded = VQVAE.load_from_checkpoint(vqvae_path, weights_only=True)
    assert same_state(vqvae, loaded)
    assert bool(loaded.quantizer.initialized)  # a resumed or loaded model is not initialised again
    prior = VQVAEPrior(str(vqvae_path), channels=8, num_layers=2)
    run = trainer(max_epochs=1, default_root_dir=tmp_path)
    run.fit(prior, train_dataloaders=loader(images(32, SHAPE)))
    prior_path = tmp_path / "prior.ckpt"
    run.save_checkpoint(prior_path)
    vqvae_path.unlink()  # the prior's checkpoint holds the VQ-VAE
    again = VQVAEPrior.load_from_checkpoint(prior_path, weights_only=True)
    state = prior.state_dict()
    assert state.keys() == again.state_dict().keys() and any(key.startswith("vqvae.") for key in state)
    assert all(torch.equal(state[key], again.state_dict()[key]) for key in state)
    prior.eval(), again.eval()
    torch.manual_seed(1)
    expected = prior.sample(3)
    torch.manual_seed(1)
    assert torch.equal(again.sample(3), expected)


def test_a_prior_of_a_vqvae_with_networks_of_your_own_loads_with_that_vqvae_given(tmp_path):
    def own_vqvae() -> VQVAE:
        torch.manual_seed(0)
        encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 4, stride=2, padding=1))  # (B, 8, 4, 4)
        decoder = torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1))
        return tiny_vqvae(encoder=encoder, decoder=decoder)

    prior = VQVAEPrior(vqvae=own_vqvae(), channels=8, num_layers=2)
    assert prior.hparams.vqvae_settings is None  # settings cannot rebuild networks of your own
    run = trainer(max_steps=1, default_root_dir=tmp_path)
    run.fit(prior, train_dataloaders=loader(images(8, SHAPE)))
    run.save_checkpoint(tmp_path / "prior.ckpt")
    with pytest.raises(ValueError, match=r"load_from_checkpoint\(path, vqvae=...\)"):
        VQVAEPrior.load_from_checkpoint(tmp_path / "prior.ckpt", weights_only=True)
    loaded = VQVAEPrior.load_from_checkpoint(tmp_path / "prior.ckpt", weights_only=True, vqvae=own_vqvae())
    assert same_state(prior, loaded)


def test_a_resumed_vqvae_run_ends_where_an_uninterrupted_one_does(tmp_path):
    whole, _ = fit_vqvae(tmp_path / "whole", epochs=2)
    _, first_half = fit_vqvae(tmp_path / "half", epochs=1)
    torch.manual_seed(123)  # the resume restores the random state: this seed must not matter
    resumed = tiny_vqvae()
    trainer(max_epochs=2, default_root_dir=tmp_path / "half").fit(
        resumed, train_dataloaders=loader(images(32, SHAPE)), ckpt_path=first_half
    )
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_codebook_perplexity_and_usage_are_logged_and_a_collapse_warns():
    torch.manual_seed(0)
    x = images(32, SHAPE)
    model = tiny_vqvae()
    run = trainer(max_epochs=1)
    run.fit(model, train_dataloaders=loader(x), val_dataloaders=loader(x))
    metrics = run.callback_metrics
    with torch.no_grad():
        counts = torch.bincount(model.eval().encode_indices(x).flatten(), minlength=16)
    assert metrics["val/codebook_usage"].item() == pytest.approx((counts > 0).float().mean().item())
    assert metrics["val/codebook_perplexity"].item() == pytest.approx(perplexity(counts).item(), rel=1e-5)
    assert 0 < metrics["train/codebook_usage"] <= 1 and metrics["train/codebook_perplexity"] >= 1
    # constant images through a position-wise encoder: one vector everywhere, so one code used, 1/16 of them
    constant = torch.full((32, *SHAPE), 0.5)
    collapsed = tiny_vqvae(
        dead_code_threshold=0, encoder=torch.nn.Sequential(torch.nn.AvgPool2d(2), torch.nn.Conv2d(1, 8, 1))
    )
    with pytest.warns(UserWarning, match=r"collapsing: epoch 0 used 1 of 16 codes \(6.2%, below min_codebook_usage"):
        trainer(max_epochs=1).fit(collapsed, train_dataloaders=loader(constant))


# -- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"codebook_update": "adam"}, "unknown codebook_update 'adam'; choose one of: ema, loss"),
        ({"codebook_init": "zeros"}, "unknown codebook_init 'zeros'; choose one of: kmeans, random"),
        ({"num_embeddings": 1}, "num_embeddings must be >= 2"),
        ({"hidden_dims": [8, 8, 8, 8]}, "cannot be halved 4 times; use fewer hidden_dims"),
        ({"value_range": (-1.0, 1.0)}, "bernoulli likelihood models pixels in"),
        ({"decay": 1.0}, r"decay must be in \[0, 1\)"),
        ({"beta": -1.0}, "beta must be >= 0"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(settings, message):
    with pytest.raises(ValueError, match=message):
        VQVAE(**{"data_shape": SHAPE, "hidden_dims": [16], **settings})


def test_a_prior_needs_a_vqvae_checkpoint_and_refuses_another_models(tmp_path):
    with pytest.raises(ValueError, match="needs the trained VQ-VAE.*--model.vqvae_checkpoint"):
        VQVAEPrior()
    with pytest.raises(FileNotFoundError, match="no VQ-VAE checkpoint at"):
        VQVAEPrior(str(tmp_path / "missing.ckpt"))
    ae = AE(2, data_shape=SHAPE, hidden_dims=[8])
    run = trainer(max_steps=1, default_root_dir=tmp_path)
    run.fit(ae, train_dataloaders=loader(images(8, SHAPE)))
    run.save_checkpoint(tmp_path / "ae.ckpt")
    with pytest.raises(ValueError, match="is not a checkpoint of a VQVAE"):
        VQVAEPrior(str(tmp_path / "ae.ckpt"))
    checkpoint = torch.load(tmp_path / "ae.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "dgm_lightning.AE"  # as LightningCLI records it
    torch.save(checkpoint, tmp_path / "ae_cli.ckpt")
    with pytest.raises(ValueError, match="is a checkpoint of dgm_lightning.AE, not of a VQVAE"):
        VQVAEPrior(str(tmp_path / "ae_cli.ckpt"))


def test_bad_codes_are_refused():
    model = tiny_vqvae().eval()
    with pytest.raises(ValueError, match=r"code indices must lie in \[0, 16\)"):
        model.decode_indices(torch.full((1, 4, 4), 16))
    with pytest.raises(ValueError, match=r"expects code indices of shape \(B, 4, 4\)"):
        model.decode_indices(torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expects codes of shape \(B, 128\)"):
        model.decode(torch.zeros(1, 8))


def test_a_prior_recipe_trains_on_the_checkpoint_of_its_first_stage(tmp_path):
    from dgm_lightning.cli import main

    recipe = Path(__file__).resolve().parent.parent / "configs" / "vqvae_prior_digits.yaml"
    cli = main(["fit", "--config", str(recipe), *stand_in_flags(recipe, tmp_path), "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert isinstance(cli.model, VQVAEPrior) and cli.trainer.global_step == 2
    assert cli.model.hparams.vqvae_settings["num_embeddings"] == 32  # the first stage's, not the prior's settings
    assert "val/bpd" in cli.trainer.callback_metrics and "val/elbo" in cli.trainer.callback_metrics


def test_the_two_stage_model_gets_the_image_grids_the_offline_fid_and_predictions_of_the_other_families(tmp_path):
    from dgm_lightning import Classifier
    from dgm_lightning.cli import main

    classifier = tmp_path / "classifier.ckpt"  # trained for a step: its features make a FID all the same
    run = trainer(max_steps=1)
    labelled = TensorDataset(images(16, SHAPE), torch.arange(16) % 10)
    run.fit(Classifier(10, data_shape=SHAPE, feature_dim=8, hidden_dims=[4, 8]), DataLoader(labelled, batch_size=8))
    run.save_checkpoint(classifier)
    recipe = Path(__file__).resolve().parent.parent / "configs" / "vqvae_prior_digits.yaml"
    flags = [*stand_in_flags(recipe, tmp_path), "--trainer.logger", "false", "--trainer.enable_progress_bar",
             "false", "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    metrics = ["--trainer.callbacks+=callbacks.GenerativeMetrics", "--trainer.callbacks.metrics", "[fid]",
               "--trainer.callbacks.classifier_checkpoint", str(classifier), "--trainer.callbacks.num_samples", "40",
               "--trainer.callbacks+=callbacks.ImageLogger", "--trainer.callbacks.every_n_epochs", "1"]  # fmt: skip
    cli = main(["fit", "--config", str(recipe), *flags, *metrics, "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", "2"])  # fmt: skip
    assert cli.trainer.callback_metrics["val/fid"].isfinite()
    (grid,) = (tmp_path / "runs").rglob("images/samples/epoch_0000.png")  # the ImageLogger's samples of the prior
    last = cli.trainer.checkpoint_callback.last_model_path
    predicted = main(["predict", "--config", str(recipe), *flags, "--ckpt_path", last])
    (written,) = (tmp_path / "runs" / "predictions").iterdir()
    assert predicted.trainer.state.finished
    assert {"inputs.pt", "reconstructions.pt", "samples.pt", "samples.png"} <= {p.name for p in written.iterdir()}
    assert torch.load(written / "samples.pt").shape[1:] == SHAPE
