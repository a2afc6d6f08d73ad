"""Checks of a VAE's strategy settings (objective, posterior, prior): each refuses a value out of range, or a
combination that is undefined or that would leave a setting unused, with an error that names it and says why."""

from __future__ import annotations

from typing import Literal

from dgm_lightning.checks import check_choice, check_non_negative, check_positive_int
from dgm_lightning.objectives import Kernel
from dgm_lightning.priors import check_prior_supports

VAEObjective = Literal["elbo", "iwae", "miwae", "piwae", "beta_tc", "mmd"]
VAEPrior = Literal["standard_normal", "mixture", "vamp", "uniform"]


def check_objective_settings(
    objective: str,
    *,
    free_bits: float,
    training_samples: int,
    miwae_groups: int,
    mi_weight: float,
    dim_kl_weight: float,
    dataset_size: int | None,
    mmd_weight: float,
    mmd_kernel: str,
) -> None:
    """Refuse settings out of range, and settings that the chosen objective would ignore (changed from their
    defaults), naming the objectives that use them."""
    check_choice("objective", objective, VAEObjective)
    check_choice("mmd_kernel", mmd_kernel, Kernel)
    check_non_negative(free_bits=free_bits, mi_weight=mi_weight, dim_kl_weight=dim_kl_weight, mmd_weight=mmd_weight)
    check_positive_int(training_samples=training_samples, miwae_groups=miwae_groups, dataset_size=dataset_size)
    used_by = {
        "free_bits": (free_bits != 0.0, ("elbo",)),
        "training_samples": (training_samples != 1, ("iwae", "miwae", "piwae")),
        "miwae_groups": (miwae_groups != 1, ("miwae", "piwae")),
        "mi_weight": (mi_weight != 1.0, ("beta_tc",)),
        "dim_kl_weight": (dim_kl_weight != 1.0, ("beta_tc",)),
        "dataset_size": (dataset_size is not None, ("beta_tc",)),
        "mmd_weight": (mmd_weight != 10.0, ("mmd",)),
        "mmd_kernel": (mmd_kernel != "imq", ("mmd",)),
    }
    for name, (changed, objectives_using) in used_by.items():
        if changed and objective not in objectives_using:
            *others, last = objectives_using
            names = f"{', '.join(others)} and {last} objectives" if others else f"{last} objective"
            raise ValueError(
                f"{name} applies to the {names}, not to {objective!r}: leave it out, or choose "
                f"objective={objectives_using[0]!r}"
            )
    if objective in ("iwae", "miwae", "piwae") and training_samples == 1:
        raise ValueError(
            f"the {objective} objective with training_samples=1 is the ELBO: give it more importance samples per "
            "example, such as training_samples=5 (--model.training_samples 5)"
        )
    if objective in ("miwae", "piwae") and miwae_groups == 1:
        raise ValueError(f"{objective} with miwae_groups=1 is the iwae objective: give miwae_groups > 1, or use iwae")
    if objective in ("miwae", "piwae") and training_samples % miwae_groups:
        raise ValueError(
            f"{objective} splits its training_samples ({training_samples}) into miwae_groups ({miwae_groups}) of "
            "equal size: give a training_samples that miwae_groups divides"
        )


def check_posterior_settings(posterior: str, *, objective: str, free_bits: float) -> None:
    """Refuse a hyperspherical posterior where it is undefined: with free bits (its KL to the uniform has no
    per-dimension split) or with beta_tc (it does not factorise over dimensions)."""
    if posterior == "gaussian":
        return
    if free_bits:
        raise ValueError(
            f"free_bits needs a KL per latent dimension, which the {posterior} posterior's KL to the uniform prior on "
            "the sphere does not have: leave free_bits at 0, or use the gaussian posterior"
        )
    if objective == "beta_tc":
        raise ValueError(
            f"the beta_tc objective splits the KL over latent dimensions, which needs a posterior that factorises "
            f"over them: the {posterior} posterior does not; use the gaussian posterior, or another objective"
        )


def check_prior_settings(
    prior: str | None,
    *,
    posterior: str,
    num_classes: int | None,
    free_bits: float,
    mixture_components: int,
    pseudo_inputs: int,
) -> str:
    """The prior to use (None: the posterior's own) after refusing one the posterior does not go with (a Gaussian
    prior for codes on the sphere, a uniform one on the sphere for Gaussian codes), free bits with a prior that has
    no per-dimension KL, and the vamp prior for a conditional VAE; returns its name."""
    own = "standard_normal" if posterior == "gaussian" else "uniform"
    prior = own if prior is None else prior
    check_choice("prior", prior, VAEPrior)
    check_positive_int(mixture_components=mixture_components, pseudo_inputs=pseudo_inputs)
    if (prior == "uniform") != (posterior != "gaussian"):
        raise ValueError(
            f"the {prior} prior does not go with the {posterior} posterior: a hyperspherical posterior takes the "
            "uniform prior on the sphere, a gaussian one takes standard_normal, mixture or vamp (leave prior unset "
            "for the posterior's own)"
        )
    if prior != "uniform":
        check_prior_supports(prior, num_classes=num_classes)
    if free_bits and prior != own:
        raise ValueError(
            f"free_bits needs the KL per latent dimension, which the {prior} prior's Monte Carlo KL does not have: "
            "leave free_bits at 0, or use the standard_normal prior"
        )
    if mixture_components != 10 and prior != "mixture":
        raise ValueError(f"mixture_components applies to the mixture prior, not to {prior!r}: leave it out")
    if pseudo_inputs != 500 and prior != "vamp":
        raise ValueError(f"pseudo_inputs applies to the vamp prior, not to {prior!r}: leave it out")
    return prior
